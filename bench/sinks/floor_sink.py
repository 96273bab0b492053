"""
The floor: a Twisted protocol that does no SMTP work at all.  It answers
each command line with a canned reply chosen by its first letters, finds the
end of DATA with one search, and writes through at once like infsmtp does.
No parsing, no state beyond "in DATA or not", no timeouts, no handlers.

What it measures is Twisted's reactor, transport and the kernel on this
machine: no Twisted server can be faster than this one by more than the
little Python it runs.  bench/server.py runs it next to the real servers so
that the ratios the goals ask for can be set against what is possible.

    python floor_sink.py PORT [--chunking]

With ``--chunking`` it also offers CHUNKING (RFC 3030) and takes BDAT
chunks by their count: what bench/client.py needs to measure a client's
BDAT against its DATA (smtp-sink does not offer CHUNKING).
"""

import sys

from twisted.internet import protocol, reactor

from infsmtp._writenow import writeNow

EHLO = b"250-floor.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE 0\r\n"
CHUNKING_EHLO = b"250-floor.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-CHUNKING\r\n250 SIZE 0\r\n"
REPLIES = {
    b"EHLO": EHLO,
    b"HELO": b"250 floor.test\r\n",
    b"MAIL": b"250 2.1.0 Ok\r\n",
    b"RCPT": b"250 2.1.5 Ok\r\n",
    b"RSET": b"250 2.0.0 Ok\r\n",
    b"NOOP": b"250 2.0.0 Ok\r\n",
}
END = b"\r\n.\r\n"


class Floor(protocol.Protocol):
    replies = REPLIES

    def connectionMade(self):
        self.transport.setTcpNoDelay(True)
        self.buffer = b""
        self.inData = False
        # Bytes of the current BDAT chunk still to come, and whether it is
        # the last one.
        self.chunkLeft = 0
        self.chunkLast = False
        writeNow(self.transport, b"220 floor.test ESMTP\r\n")

    def dataReceived(self, data):
        buffer = self.buffer + data
        out = []
        while True:
            if self.chunkLeft:
                taken = min(self.chunkLeft, len(buffer))
                self.chunkLeft -= taken
                buffer = buffer[taken:]
                if self.chunkLeft:
                    break
                out.append(b"250 2.0.0 Ok: queued\r\n" if self.chunkLast else b"250 2.0.0 Ok\r\n")
                continue
            if self.inData:
                end = buffer.find(END)
                if end < 0:
                    # Keep only what could begin the terminator.
                    buffer = buffer[-4:]
                    break
                buffer = buffer[end + 5:]
                self.inData = False
                out.append(b"250 2.0.0 Ok: queued\r\n")
                continue
            end = buffer.find(b"\n")
            if end < 0:
                break
            verb, line, buffer = buffer[:4].upper(), buffer[:end], buffer[end + 1:]
            if verb == b"BDAT":
                words = line.split()
                self.chunkLeft, self.chunkLast = int(words[1]), len(words) > 2
                if not self.chunkLeft:
                    out.append(b"250 2.0.0 Ok: queued\r\n" if self.chunkLast else b"250 2.0.0 Ok\r\n")
            elif verb == b"DATA":
                # smtp-source's DATA starts after the CRLF before it.
                self.inData = True
                buffer = b"\r\n" + buffer
                out.append(b"354 End data with <CR><LF>.<CR><LF>\r\n")
            elif verb == b"QUIT":
                out.append(b"221 2.0.0 Bye\r\n")
                writeNow(self.transport, b"".join(out))
                self.transport.loseConnection()
                return
            else:
                out.append(self.replies.get(verb, b"502 5.5.2 Error\r\n"))
        self.buffer = buffer
        if out:
            writeNow(self.transport, b"".join(out))


if __name__ == "__main__":
    if "--chunking" in sys.argv[2:]:
        Floor.replies = {**REPLIES, b"EHLO": CHUNKING_EHLO}
    factory = protocol.Factory.forProtocol(Floor)
    reactor.listenTCP(int(sys.argv[1]), factory, backlog=1024, interface="127.0.0.1")
    reactor.callWhenRunning(print, "ready", flush=True)
    reactor.run()

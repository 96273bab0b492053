"""
The server's TLS: the standard library's C{ssl.SSLObject} over memory
BIOs, between the connection's transport and L{ServerProtocol}.

Twisted's TLS (C{TLSMemoryBIOProtocol} over pyOpenSSL) cost about 900 us
of server CPU per STARTTLS connection where OpenSSL's own handshake work is
about 250 us: pyOpenSSL's calls and the exceptions it raises for every
"want read", a protocol wrapper on every read and write, a buffered write
(two C{epoll_ctl}) per record, and C{directlyProvides} on the transport
for each C{startTLS}.  Here a record goes out in the write that made it
(L{writeNow}), plaintext comes in with one call per record, and nothing
about the transport changes: the protocol gets an L{ServerTLS} as its
transport and the raw transport keeps calling the protocol, whose
C{dataReceived} is this layer's on that one connection.

Over TLS, before the handshake is done, the protocol's writes (an implicit
TLS greeting, or a 421 to a client refused at connect) and its close wait
for it; a failed handshake closes the connection (after OpenSSL's alert)
and is one line in the log.
"""

from __future__ import annotations

import ssl
from typing import Any, Callable

from twisted.logger import Logger

from .._writenow import writeNow
from .tls import CurrentCertificate

log = Logger()

def _nothing(*args: object) -> None:
    pass


#: Plaintext asked of OpenSSL per call: one record's worth at most.
_RECORD = 16384


class ServerTLS:
    """
    One connection's TLS, server side: the protocol's transport while TLS
    is on (it writes plaintext here; the records go to C{raw}), and the
    reader of the raw transport's bytes (L{dataReceived}, installed on the
    protocol instance in place of its own, which it feeds the plaintext).

    @ivar raw: the transport the records travel on.
    """

    def __init__(
        self,
        raw: Any,
        contexts: CurrentCertificate,
        deliver: Callable[[bytes], None],
        onHandshake: Callable[[], None],
        flush: Callable[[], None],
    ) -> None:
        """
        @param deliver: gives the protocol plaintext.
        @param onHandshake: tells it the handshake is done.
        @param flush: makes it write the replies it holds (before a close
            that the client asked for).
        """
        self.raw = raw
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = contexts.serverSide(self._incoming, self._outgoing)
        self._deliver = deliver
        self._onHandshake = onHandshake
        self._flush = flush
        self._handshaking = True
        # Plaintext written, and a close asked for, before the handshake
        # was done.
        self._held: list[bytes] = []
        self._closeAsked = False
        self._closed = False
        self._corked = False
        self.disconnecting = False

    # What the protocol sees (ITransport) ----------------------------------

    @property
    def tlsVersion(self) -> str | None:
        """
        The negotiated version, C{"TLSv1.3"} and the like (L{None} before
        the handshake).
        """
        return self._tls.version()

    @property
    def tlsResumed(self) -> bool:
        """
        Whether the client resumed an earlier session (an abbreviated
        handshake).
        """
        return self._tls.session_reused

    def write(self, data: bytes) -> None:
        if self._closed:
            return
        if self._handshaking:
            self._held.append(data)
            return
        self._tls.write(data)
        if not self._corked:
            self._send()

    def cork(self) -> None:
        """
        A close follows: keep the records of what is written until then,
        so that they and close_notify go out in one write.
        """
        self._corked = True

    def writeSequence(self, data: list[bytes]) -> None:
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        """
        Send what is written, then close_notify, then close the
        connection.  The client's close_notify is not waited for (RFC 8446
        6.1: only the sender's is required before it closes).
        """
        self.disconnecting = True
        if self._handshaking:
            self._closeAsked = True
            return
        self._shutDown()

    def abortConnection(self) -> None:
        self._closed = self.disconnecting = True
        self.raw.abortConnection()

    def getPeer(self) -> Any:
        return self.raw.getPeer()

    def getHost(self) -> Any:
        return self.raw.getHost()

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.raw.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self.raw.unregisterProducer()

    def pauseProducing(self) -> None:
        self.raw.pauseProducing()

    def resumeProducing(self) -> None:
        self.raw.resumeProducing()

    # The records -----------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        """
        Records from the client: the handshake's, then the plaintext they
        carry, given to the protocol.
        """
        if self._closed:
            return
        self._incoming.write(data)
        if self._handshaking and not self._handshake():
            return
        tls = self._tls
        incoming = self._incoming
        chunks: list[bytes] = []
        if not incoming.pending and not tls.pending():
            # The handshake took it all.
            return
        try:
            while True:
                chunk = tls.read(_RECORD)
                if not chunk:
                    # The client's close_notify (the standard library
                    # reads it as the end, b""): it sends nothing more.
                    # What came before it is still the client's, and so
                    # are the replies to it; then the connection ends.
                    self._deliverAll(chunks)
                    self._flush()
                    self._shutDown()
                    return
                chunks.append(chunk)
                if not incoming.pending and not tls.pending():
                    break
        except ssl.SSLWantReadError:
            # The rest of a record is still on its way.
            pass
        except ssl.SSLError as e:
            self._failed(e)
            return
        if self._outgoing.pending:
            # A TLS 1.3 key update answered, or the like.
            self._send()
        self._deliverAll(chunks)

    def _deliverAll(self, chunks: list[bytes]) -> None:
        if chunks:
            self._deliver(chunks[0] if len(chunks) == 1 else b"".join(chunks))

    def _handshake(self) -> bool:
        """
        Go on with the handshake; whether it is done.
        """
        try:
            self._tls.do_handshake()
        except ssl.SSLWantReadError:
            self._send()
            return False
        except ssl.SSLError as e:
            self._failed(e)
            return False
        self._handshaking = False
        # The server's last flight: TLS 1.2's Finished, or TLS 1.3's
        # session ticket.  Not kept for the next reply, though no client
        # waits for a ticket: its ACK would then wait too, and a client
        # with Nagle's algorithm on holds its next command until it comes
        # (a 40 ms delayed ACK per connection, measured).
        self._send()
        self._onHandshake()
        held, self._held = self._held, []
        if held and not self._closed:
            self._tls.write(b"".join(held))
            self._send()
        if self._closeAsked:
            self._shutDown()
            return False
        return True

    def release(self) -> None:
        """
        The connection is gone: drop the protocol's callbacks (which would
        otherwise keep it and this layer in a cycle) and read nothing more.
        """
        self._closed = self.disconnecting = True
        self._deliver = self._onHandshake = self._flush = _nothing
        self._held = []

    def _send(self) -> None:
        outgoing = self._outgoing
        if outgoing.pending:
            writeNow(self.raw, outgoing.read())

    def _shutDown(self) -> None:
        if self._closed:
            return
        self._closed = self.disconnecting = True
        try:
            self._tls.unwrap()
        except ssl.SSLError:
            # SSLWantReadError: the close_notify is written, the client's
            # not in (and not waited for); or TLS is broken already.
            pass
        self._send()
        self.raw.loseConnection()

    def _failed(self, error: ssl.SSLError) -> None:
        """
        The handshake failed, or a record did not decrypt: send OpenSSL's
        alert, and close.
        """
        self._closed = self.disconnecting = True
        self._send()
        peer = self.raw.getPeer()
        log.info(
            "TLS with {ip} failed: {reason}",
            ip=getattr(peer, "host", None) or str(peer),
            reason=error.reason or error.__class__.__name__,
        )
        self.raw.loseConnection()

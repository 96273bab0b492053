"""
Coverage-guided fuzzing of one server session with atheris (libFuzzer).

Where the model-based run (``run_session_model.py``) knows what each reply
must be, this one knows nothing of SMTP: libFuzzer mutates raw bytes, guided
by the branches of ``infsmtp`` they reach, and the harness checks only what
holds whatever the input:

- ``dataReceived`` never raises, and no failure is logged;
- every reply line is well-formed, printable UTF-8 (``parseReplies`` of the
  model test);
- the server closes the connection only after a 221 or 421 reply, and after
  one of those it has closed;
- what reaches a handler has no control character in the HELO name, the
  addresses or the parameters, and every message accepted is within the
  limits and free of bare CR and LF;
- once the connection is lost, nothing of the session is left on the clock.

The input's first bytes say where to cut it into ``dataReceived`` calls; the
rest is the byte stream (see ``splitInput``).  Run it from the repository's root:

    pip install atheris
    python fuzz/atheris_session.py -max_total_time=600 -dict=fuzz/smtp.dict \
        -artifact_prefix=/tmp/ /tmp/infsmtp-corpus

(The corpus folder is made, with a few realistic sessions in it, on the
first run; libFuzzer adds what it finds there.  A failing input is written
to ``/tmp/crash-<hash>``; rerun it with ``python fuzz/atheris_session.py
/tmp/crash-<hash>``.)
"""

from __future__ import annotations

import itertools
import os
import re
import sys

import atheris

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
sys.path.insert(0, os.path.join(HERE, ".."))

with atheris.instrument_imports(include=["infsmtp"]):
    from infsmtp import Server

from test_session_model import PEER, parseReplies  # noqa: E402
from twisted.internet import task  # noqa: E402
from twisted.internet.testing import StringTransport  # noqa: E402
from twisted.logger import globalLogBeginner, globalLogPublisher  # noqa: E402
from twisted.python import threadable  # noqa: E402

MAX_LINE = 512
MAX_DATA_LINE = 1000
MAX_SIZE = 6000
CONTROL = re.compile(r"[\x00-\x1f\x7f]")
BARE = re.compile(rb"\r(?!\n)|(?<!\r)\n")

SEEDS = [
    b"EHLO client.test\r\nMAIL FROM:<a@b.test> SIZE=100\r\nRCPT TO:<c@d.test>\r\nDATA\r\n"
    b"Subject: hi\r\n\r\n..dot\r\nbody\r\n.\r\nQUIT\r\n",
    b"HELO x\nMAIL FROM:<>\nRCPT TO:<postmaster>\nDATA\n.\r\nRSET\r\nNOOP\r\n",
    "EHLO c\r\nMAIL FROM:<jörg@exämple.test> SMTPUTF8 BODY=8BITMIME\r\nRCPT TO:<zoë@exämple.test>\r\n"
    "DATA\r\nx\r\n.\r\n".encode(),
    b"EHLO c\r\nMAIL FROM:<@r.test:a@[1.2.3.4]> AUTH=<>\r\nRCPT TO:<\"q x\"@d.test>\r\nVRFY a\r\nHELP\r\n",
]


class Checks:
    """
    One session's server, transport, clock and what the handlers saw.
    """

    def __init__(self) -> None:
        self.clock = task.Clock()
        self.problems: list[str] = []
        server = Server(
            hostname="mx.test",
            reactor=self.clock,
            maxLineLength=MAX_LINE,
            maxDataLineLength=MAX_DATA_LINE,
            maxMessageSize=MAX_SIZE,
            maxRecipients=4,
            maxErrors=100_000,
            receivedHeader=False,
        )
        server.onMailFrom = self.onMailFrom
        server.onRcptTo = self.onRcptTo
        server.onReceive = self.onReceive
        self.transport = StringTransport(peerAddress=PEER, lenient=True)
        self.protocol = server.buildFactory().buildProtocol(PEER)

    def envelope(self, session) -> None:
        texts = [session.helo, session.address, *session.rcptTo, session.mailFrom]
        texts += [v for v in session.mailParameters.values() if v is not None]
        for text in texts:
            if CONTROL.search(text):
                self.problems.append(f"control character reached a handler: {text!r}")

    def onMailFrom(self, session) -> bool:
        self.envelope(session)
        return True

    def onRcptTo(self, session) -> bool:
        self.envelope(session)
        return True

    def onReceive(self, session) -> bool:
        self.envelope(session)
        msg = session.msg
        if not session.rcptTo:
            self.problems.append("a message with no recipient")
        if len(msg) > MAX_SIZE:
            self.problems.append(f"a message of {len(msg)} bytes")
        if BARE.search(msg):
            self.problems.append(f"a bare CR or LF in an accepted message: {msg[:200]!r}")
        if msg and not msg.endswith(b"\r\n"):
            self.problems.append(f"an accepted message not ending in CRLF: {msg[-50:]!r}")
        if any(len(line) + 2 > MAX_DATA_LINE for line in msg.split(b"\r\n")):
            self.problems.append("an over-long line in an accepted message")
        return True

    def observe(self, event: dict) -> None:
        if event.get("log_failure") is not None:
            self.problems.append(event["log_failure"].getTraceback())


def splitInput(data: bytes) -> tuple[list[int], bytes]:
    """
    The cuts and the stream of a fuzz input: its first byte, modulo 9, is
    how many cuts; each takes the next two bytes (big-endian, an offset into
    the stream); the rest is the stream.
    """
    if not data:
        return [], b""
    count = data[0] % 9
    header = data[1 : 1 + 2 * count]
    cuts = [int.from_bytes(header[i : i + 2], "big") for i in range(0, len(header) - 1, 2)]
    return cuts, data[1 + 2 * count :]


def TestOneInput(data: bytes) -> None:
    cuts, stream = splitInput(data)
    checks = Checks()
    globalLogPublisher.addObserver(checks.observe)
    try:
        run(checks, stream, cuts)
    finally:
        globalLogPublisher.removeObserver(checks.observe)
    if checks.problems:
        raise AssertionError("\n".join(checks.problems))


def run(checks: Checks, stream: bytes, cuts: list[int]) -> None:
    protocol, transport, clock = checks.protocol, checks.transport, checks.clock
    protocol.makeConnection(transport)
    bounds = [0, *sorted(c for c in cuts if 0 < c < len(stream)), len(stream)]
    for start, stop in itertools.pairwise(bounds):
        protocol.dataReceived(stream[start:stop])
        clock.advance(0)
    codes = parseReplies(transport.value())
    closing = bool(transport.disconnecting)
    if closing and (not codes or codes[-1] not in (221, 421)):
        raise AssertionError(f"closed without 221 or 421; replies {codes}")
    if (221 in codes or 421 in codes) and not closing:
        raise AssertionError(f"221 or 421 sent, and the session goes on; replies {codes}")
    protocol.connectionLost(None)
    clock.advance(0)
    if clock.getDelayedCalls():
        raise AssertionError(f"left on the clock after the connection was lost: {clock.getDelayedCalls()}")


def main() -> None:
    # Handlers' logs would flood the fuzzer's output; Checks.observe still
    # sees every event.
    globalLogBeginner.beginLoggingTo([], redirectStandardIO=False)
    # session.disconnect() runs at once only in the reactor thread: here,
    # the fake clock's.
    threadable.registerAsIOThread()
    corpus = [arg for arg in sys.argv[1:] if not arg.startswith("-")]
    for folder in corpus:
        if not os.path.exists(folder):
            os.makedirs(folder)
            for index, seedInput in enumerate(SEEDS):
                with open(os.path.join(folder, f"seed-{index}"), "wb") as f:
                    f.write(b"\x00" + seedInput)  # no cuts
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()

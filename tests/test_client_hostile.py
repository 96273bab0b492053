"""
The client against hostile and broken servers over loopback: small Twisted
servers on 127.0.0.1 that flood it with reply lines, announce a SIZE no
integer can hold, echo the AUTH exchange, answer a pipelined MAIL with 421
and close, or are sent addresses that would inject parameters.

Each test checks that the client fails closed (an ``SMTPError`` subclass
that says what happened, nothing unsafe sent) and stays bounded (what it
holds of a reply never passes the limits of
:mod:`infsmtp._client.protocol`).  No test sleeps; every wait is bounded.
"""

from __future__ import annotations

import base64
import io
import tracemalloc
from typing import Callable, Union

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPullProducer
from twisted.internet.protocol import Factory
from twisted.protocols.basic import LineOnlyReceiver
from zope.interface import implementer

import infsmtp._client.client
from infsmtp import (
    AsyncClient,
    AuthMode,
    SMTPAuthenticationError,
    SMTPConnectError,
    SMTPError,
    SMTPProtocolError,
)
from infsmtp._client.protocol import (
    MAX_QUOTED_TEXT,
    MAX_REPLY_LINE,
    MAX_REPLY_LINES,
    MAX_REPLY_SIZE,
    ESMTPSessionClient,
)

MESSAGE = b"From: a@example.org\r\nTo: b@example.org\r\nSubject: hi\r\n\r\nhello\r\n"

#: How much a flooding server sends at most: far over every limit, and
#: still harmless to the machine if a client held all of it.
FLOOD_BYTES = 16 * 1024 * 1024

#: What the client process may grow by while flooded (traced by
#: tracemalloc): the reply limits, one socket read, and their copies.
FLOOD_MEMORY = 4 * 1024 * 1024

#: Bound on every wait, in seconds.
WAIT = 10

Action = Union[bytes, None, Callable[["HostileServer"], object]]


# ---------------------------------------------------------------- servers


class HostileServer(LineOnlyReceiver):
    """
    Greets, records each line it receives in ``received``, and answers each
    command as ``script`` says: verb (``b"EHLO"``, ``b"MAIL"``, ...;
    ``b"greeting"`` for the greeting, ``b"message"`` for the end of DATA)
    -> bytes to write, ``None`` for no answer, or a callable given this
    protocol.  Anything not in the script gets ``250 ok``.
    """

    delimiter = b"\r\n"
    MAX_LENGTH = 1024 * 1024

    DEFAULTS: dict[bytes, Action] = {
        b"greeting": b"220 hostile.test ESMTP\r\n",
        b"EHLO": b"250-hostile.test\r\n250 PIPELINING\r\n",
        b"DATA": b"354 go ahead\r\n",
        b"message": b"250 queued\r\n",
        b"QUIT": lambda server: server.close(b"221 bye\r\n"),
    }

    def __init__(self, script: dict[bytes, Action], received: list[bytes]) -> None:
        self.script = {**self.DEFAULTS, **script}
        self.received = received
        self.inData = False
        self.closed: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.act(self.script[b"greeting"])

    def lineReceived(self, line: bytes) -> None:
        self.received.append(line)
        if self.inData:
            if line == b".":
                self.inData = False
                self.act(self.script[b"message"])
            return
        verb = line.split(b" ", 1)[0].split(b":", 1)[0].upper()
        if verb == b"DATA" and self.script[b"DATA"] == b"354 go ahead\r\n":
            self.inData = True
        self.act(self.script.get(verb, b"250 ok\r\n"))

    def act(self, action: Action) -> None:
        if callable(action):
            action(self)
        elif action is not None:
            self.transport.write(action)

    def close(self, last: bytes) -> None:
        self.transport.write(last)
        self.transport.loseConnection()

    def connectionLost(self, reason: object = None) -> None:
        self.closed.callback(None)


@implementer(IPullProducer)
class Flood:
    """
    Write ``first``, then ``chunk`` again and again, each time the client
    has read the last one, until :data:`FLOOD_BYTES` are sent or the
    connection closes.
    """

    def __init__(self, first: bytes, chunk: bytes) -> None:
        self.first = first
        self.chunk = chunk
        self.sent = 0

    def __call__(self, server: HostileServer) -> None:
        self.transport = server.transport
        self.transport.registerProducer(self, False)
        self.transport.write(self.first)
        self.sent = len(self.first)

    def resumeProducing(self) -> None:
        if self.sent >= FLOOD_BYTES:
            self.transport.unregisterProducer()
            return
        self.transport.write(self.chunk)
        self.sent += len(self.chunk)

    def stopProducing(self) -> None:
        pass


@pytest_twisted.async_yield_fixture
async def hostileServer():
    """
    A factory of hostile servers on 127.0.0.1 and a free port:
    ``start(script)`` (see :class:`HostileServer`) returns ``(port,
    received)``, the lines the server receives.
    """
    listening, connections = [], []

    def start(script: dict[bytes, Action]) -> tuple[int, list[bytes]]:
        received: list[bytes] = []

        def build() -> HostileServer:
            server = HostileServer(script, received)
            connections.append(server)
            return server

        port = reactor.listenTCP(0, Factory.forProtocol(build), interface="127.0.0.1")
        listening.append(port)
        return port.getHost().port, received

    yield start
    for port in listening:
        await port.stopListening()
    for server in connections:
        if server.transport.connected:
            server.transport.abortConnection()
        await server.closed.addTimeout(WAIT, reactor)


def client(port: int, **settings) -> AsyncClient:
    c = AsyncClient()
    c.host, c.port = "127.0.0.1", port
    c.timeout = 5000
    for name, value in settings.items():
        setattr(c, name, value)
    return c


async def failure(d: Deferred) -> BaseException:
    """
    The exception ``d`` fails with within :data:`WAIT` seconds (a timeout
    fails it with ``TimeoutError``, which no test expects).
    """
    try:
        result = await d.addTimeout(WAIT, reactor)
    except BaseException as e:
        return e
    raise AssertionError(f"expected a failure, got {result!r}")


async def bounded(d: Deferred):
    return await d.addTimeout(WAIT, reactor)


class MeasuredSessionClient(ESMTPSessionClient):
    """
    The client's protocol, noting after each read the most it has held of
    an unfinished line and of an unfinished reply.
    """

    instances: list[MeasuredSessionClient] = []

    def __init__(self, *args: object, **settings: object) -> None:
        super().__init__(*args, **settings)
        self.instances.append(self)
        self.reads = self.peakBuffered = self.peakLines = self.peakReplySize = 0

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        self.reads += 1
        parser = self._parser
        self.peakBuffered = max(self.peakBuffered, len(self._buffer))
        self.peakLines = max(self.peakLines, len(parser._lines))
        self.peakReplySize = max(self.peakReplySize, getattr(parser, "_size", 0))


@pytest.fixture
def measured(monkeypatch):
    """
    Make every client use :class:`MeasuredSessionClient`; yields its list of
    instances.
    """
    MeasuredSessionClient.instances = []
    monkeypatch.setattr(infsmtp._client.client, "ESMTPSessionClient", MeasuredSessionClient)
    return MeasuredSessionClient.instances


# ------------------------------------------------------------ reply limits


SHORT_LINE = b"250-" + b"f" * 36 + b"\r\n"
LONG_LINE = b"250-" + b"F" * 2000 + b"\r\n"


@pytest.mark.parametrize(
    "first, chunk, error",
    [
        # Endless short lines: the line count ends it.
        (SHORT_LINE, SHORT_LINE * (65536 // len(SHORT_LINE)), f"more than {MAX_REPLY_LINES} lines"),
        # Endless long lines: the reply size ends it first.
        (LONG_LINE, LONG_LINE * (65536 // len(LONG_LINE)), f"longer than {MAX_REPLY_SIZE} bytes"),
        # One line that never ends.
        (b"250-", b"x" * 65536, f"reply line longer than {MAX_REPLY_LINE} bytes"),
    ],
    ids=["short-lines", "long-lines", "no-line-feed"],
)
@pytest_twisted.ensureDeferred
async def test_endlessReplyFailsAtItsLimitAndMemoryStaysBounded(hostileServer, measured, first, chunk, error):
    """
    A server that answers EHLO with reply lines forever (or with a line
    that never ends) makes connect() fail with SMTPProtocolError once a
    limit is passed, and the client never holds more than the limits of it.
    """
    flood = Flood(first, chunk)
    port, _ = hostileServer({b"EHLO": flood})
    c = client(port, timeout=3 * WAIT * 1000)  # So that no timeout ends it.
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        caught = await failure(c.connect())
        grown = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert isinstance(caught, SMTPProtocolError), caught
    assert error in str(caught)
    assert not c.connected
    [protocol] = measured
    assert protocol.reads > 0
    assert protocol.peakBuffered < MAX_REPLY_LINE
    assert protocol.peakLines <= MAX_REPLY_LINES
    assert protocol.peakReplySize <= MAX_REPLY_SIZE
    assert grown < FLOOD_MEMORY, f"the client grew by {grown} bytes"
    assert flood.sent < FLOOD_BYTES


def ehloReply(count: int, longest: int, total: int) -> bytes:
    """
    An EHLO reply of ``count`` lines, the longest ``longest`` bytes, all
    together ``total`` bytes, each line counted with its CRLF.
    """
    head = [b"250-hostile.test\r\n", b"250-PIPELINING\r\n", b"250-X-LONG" + b"l" * (longest - 12) + b"\r\n"]
    fillers = count - len(head)
    each, extra = divmod(total - sum(map(len, head)), fillers)
    lines = [b"250-X%04d" % i + b"f" * (each - 11 + (extra if i == fillers - 1 else 0)) + b"\r\n" for i in range(fillers)]
    lines[-1] = b"250 " + lines[-1][4:]
    reply = b"".join(head + lines)
    assert len(reply) == total and len(head[2]) == longest and max(map(len, lines)) < longest
    assert reply.count(b"\r\n") == count
    return reply


@pytest_twisted.ensureDeferred
async def test_replyAtEveryLimitAtOnceIsRead(hostileServer):
    """
    An EHLO reply of exactly MAX_REPLY_LINES lines and MAX_REPLY_SIZE bytes,
    one of its lines MAX_REPLY_LINE bytes long, is a good reply.
    """
    port, _ = hostileServer({b"EHLO": ehloReply(MAX_REPLY_LINES, MAX_REPLY_LINE, MAX_REPLY_SIZE)})
    c = client(port)
    await bounded(c.connect())
    extensions = c._protocol.extensions
    assert len(extensions) == MAX_REPLY_LINES - 1
    assert "PIPELINING" in extensions and extensions["X-LONG" + "L" * (MAX_REPLY_LINE - 12)] == ""
    assert await bounded(c.sendStream(io.BytesIO(MESSAGE), "a@example.org", ["b@example.org"])) == {}
    await bounded(c.disconnect())


@pytest.mark.parametrize(
    "count, longest, total, error",
    [
        (MAX_REPLY_LINES + 1, MAX_REPLY_LINE, MAX_REPLY_SIZE, f"more than {MAX_REPLY_LINES} lines"),
        (MAX_REPLY_LINES, MAX_REPLY_LINE + 1, MAX_REPLY_SIZE, f"reply line longer than {MAX_REPLY_LINE} bytes"),
        (MAX_REPLY_LINES, MAX_REPLY_LINE, MAX_REPLY_SIZE + 1, f"longer than {MAX_REPLY_SIZE} bytes"),
    ],
    ids=["one-line-more", "one-byte-longer-line", "one-byte-more"],
)
@pytest_twisted.ensureDeferred
async def test_replyOneOverALimitFails(hostileServer, count, longest, total, error):
    port, _ = hostileServer({b"EHLO": ehloReply(count, longest, total)})
    c = client(port)
    caught = await failure(c.connect())
    assert isinstance(caught, SMTPProtocolError) and error in str(caught), caught
    assert not c.connected


# ------------------------------------------------------- numbers and text


@pytest.mark.parametrize(
    "size",
    ["\N{SUPERSCRIPT TWO}".encode(), "\N{CIRCLED DIGIT ONE}".encode(), b"9" * 5000, b"0" * 20 + b"1"],
    ids=["superscript", "circled", "5000-digits", "21-digits"],
)
@pytest_twisted.ensureDeferred
async def test_malformedSizeIsIgnored(hostileServer, size):
    """
    A SIZE that is not 1 to 20 ASCII digits announces no limit the client
    can read: the message goes out (with its SIZE parameter), no exception.
    """
    port, received = hostileServer({b"EHLO": b"250-hostile.test\r\n250-PIPELINING\r\n250 SIZE " + size + b"\r\n"})
    c = client(port)
    await bounded(c.connect())
    assert await bounded(c.sendStream(io.BytesIO(MESSAGE), "a@example.org", ["b@example.org"])) == {}
    await bounded(c.disconnect())
    assert b"MAIL FROM:<a@example.org> SIZE=%d" % len(MESSAGE) in received


@pytest.mark.parametrize(
    "sender, recipient",
    [
        ("a@example.org", "x@y.z> NOTIFY=SUCCESS"),
        ("a@example.org> RET=FULL", "b@example.org"),
        ("a@example.org\x00", "b@example.org"),
        ("a@example.org", "b@example.org>\r\nRCPT TO:<c@example.org"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_addressesThatWouldInjectNeverReachTheServer(hostileServer, sender, recipient):
    port, received = hostileServer({})
    c = client(port)
    await bounded(c.connect())
    caught = await failure(c.sendStream(io.BytesIO(MESSAGE), sender, [recipient]))
    assert type(caught) is SMTPError and "address" in str(caught)
    # The session is still good, and the server saw only what was meant.
    assert await bounded(c.sendStream(io.BytesIO(MESSAGE), "a@example.org", ["b@example.org"])) == {}
    await bounded(c.disconnect())
    commands = [line for line in received if line.split(b" ")[0] in (b"EHLO", b"MAIL", b"RCPT", b"DATA", b"QUIT")]
    assert commands == [
        b"EHLO " + c.heloName.encode(),
        b"MAIL FROM:<a@example.org>",
        b"RCPT TO:<b@example.org>",
        b"DATA",
        b"QUIT",
    ]


@pytest_twisted.ensureDeferred
async def test_credentialsThatWouldInjectNeverReachTheServer(hostileServer):
    port, received = hostileServer({b"EHLO": b"250-hostile.test\r\n250 AUTH PLAIN XOAUTH2\r\n"})
    c = client(port, authMode=AuthMode.sasl, saslMechanisms=("XOAUTH2",), username="me\x01auth=Bearer stolen", password="t")
    await bounded(c.connect())
    caught = await failure(c.authenticate())
    assert isinstance(caught, SMTPAuthenticationError) and "username" in str(caught)
    await bounded(c.disconnect())
    assert not [line for line in received if line.startswith(b"AUTH")]


PASSWORD = "correct horse battery staple"


def echoPlain(server: HostileServer) -> None:
    # The AUTH line and the password, without a reply code.
    server.transport.write(b"you said " + server.received[-1] + b" " + PASSWORD.encode() + b"\r\n")


def echoLogin(server: HostileServer) -> None:
    # Ask for the user name and the password, then echo the answer, decoded
    # too, without a reply code.
    prompts = [b"334 VXNlcm5hbWU6\r\n", b"334 UGFzc3dvcmQ6\r\n"]

    def lineReceived(line: bytes) -> None:
        server.received.append(line)
        if prompts:
            server.transport.write(prompts.pop(0))
        else:
            server.transport.write(b"you said " + line + b" (" + base64.b64decode(line) + b")\r\n")

    server.lineReceived = lineReceived
    lineReceived(b"(AUTH LOGIN)")


@pytest.mark.parametrize("mechanism, action", [("PLAIN", echoPlain), ("LOGIN", echoLogin)])
@pytest_twisted.ensureDeferred
async def test_serverEchoingTheAuthExchangeCannotLeakCredentials(hostileServer, mechanism, action):
    """
    A malformed reply that echoes the AUTH exchange is quoted in the
    error without the password or its encodings.
    """
    port, _ = hostileServer({b"EHLO": b"250-hostile.test\r\n250 AUTH PLAIN LOGIN\r\n", b"AUTH": action})
    c = client(port, authMode=AuthMode.sasl, saslMechanisms=(mechanism,), username="me", password=PASSWORD)
    await bounded(c.connect())
    caught = await failure(c.authenticate())
    assert isinstance(caught, SMTPProtocolError), caught
    text = str(caught)
    assert text.startswith('malformed reply line from the server: "you said ')
    for secret in (PASSWORD, base64.b64encode(PASSWORD.encode()), base64.b64encode(b"\0me\0" + PASSWORD.encode())):
        assert (secret if isinstance(secret, str) else secret.decode()) not in text
    assert not c.connected


@pytest_twisted.ensureDeferred
async def test_longMalformedReplyIsQuotedShort(hostileServer):
    port, _ = hostileServer({b"VRFY": b"\x1b[2J" + b"z" * (MAX_REPLY_LINE - 10) + b"\r\n"})
    c = client(port)
    await bounded(c.connect())
    caught = await failure(c.verify("ann"))
    assert isinstance(caught, SMTPProtocolError)
    assert "\x1b" not in str(caught) and "\\x1b[2J" in str(caught)
    assert len(str(caught)) < MAX_QUOTED_TEXT + 100


# ------------------------------------------------------------ 421 and close


@pytest.mark.parametrize(
    "script",
    [
        {b"MAIL": None, b"RCPT": None},
        {b"MAIL": b"250 2.1.0 ok\r\n", b"RCPT": None},
    ],
    ids=["421-to-mail", "421-to-rcpt"],
)
@pytest_twisted.ensureDeferred
async def test_421ToPipelinedCommandsThenCloseIsReported(hostileServer, script):
    """
    With PIPELINING, a server that answers 421 and closes before the group's
    last reply: the client reports the 421 and its text, not a bare "the
    connection was lost".
    """
    closing = lambda server: server.close(b"421 4.7.0 hostile.test closing, try later\r\n")  # noqa: E731
    port, _ = hostileServer({**script, b"DATA": closing})
    c = client(port)
    await bounded(c.connect())
    caught = await failure(c.sendStream(io.BytesIO(MESSAGE), "a@example.org", ["b@example.org"]))
    assert isinstance(caught, SMTPConnectError), caught
    assert caught.code == 421
    assert caught.text == "the server closed the connection: 4.7.0 hostile.test closing, try later"
    assert not c.connected

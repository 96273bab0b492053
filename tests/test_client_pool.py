"""
Issue 11, item 10: ClientPool against real peers on loopback (aiosmtpd,
which does not pipeline, and Postfix's smtp-sink, which does): how many
connections carry how many messages, when a session retires, the rate
limit, and which failures send a message again (only those before any of it
went out, once) and which reach the caller.

Time that a promise needs (lifetime, idle timeout, NOOP check, rate) is a
task.Clock given to the pool; the connections themselves are real, made
through an endpoint on the real reactor.
"""

from __future__ import annotations

import io
import threading
from email.message import EmailMessage

import pytest
import pytest_twisted
from aiosmtpd.smtp import AuthResult
from peertools import EphemeralController, freePort
from test_client_interop import smtpSink  # noqa: F401 (a fixture)
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, gatherResults
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.protocols.portforward import ProxyFactory, ProxyServer

from infsmtp import (
    AuthMode,
    BlockingClientPool,
    ClientPool,
    SMTPAuthenticationError,
    SMTPConnectError,
    SMTPError,
)

#: Seconds: the bound on each wait below.
WAIT = 10

PASSWORD = "pool secret"


def message(number: int) -> bytes:
    return f"From: ann@example.org\r\nTo: bob@example.org\r\nSubject: {number}\r\n\r\nmessage {number}\r\n".encode()


def bounded(d: Deferred) -> Deferred:
    return d.addTimeout(WAIT, reactor)


class Peer:
    """
    An aiosmtpd handler that records, per connection (the client's port),
    each MAIL, NOOP, QUIT and delivered message.  C{mailReplies} and
    C{dataActions} script the next replies: a reply line, or for DATA
    C{"drop"} (close without answering, after recording the message),
    C{"close"} (close after answering) or C{"hold"} (answer once
    C{release} is set).
    """

    def __init__(self) -> None:
        self.connections = 0
        self.mails: list[int] = []
        self.noops: list[int] = []
        self.quits: list[int] = []
        self.delivered: list[tuple[int, bytes]] = []
        self.mailReplies: list[str] = []
        self.everyMail: str | None = None
        self.dataActions: list[str] = []
        self.release = threading.Event()
        self.held: Deferred[None] = Deferred()

    async def handle_MAIL(self, server, session, envelope, address, options):
        self.mails.append(session.peer[1])
        reply = self.mailReplies.pop(0) if self.mailReplies else self.everyMail
        if reply:
            return reply
        envelope.mail_from = address
        return "250 OK"

    async def handle_NOOP(self, server, session, envelope, arg):
        self.noops.append(session.peer[1])
        return "250 OK"

    async def handle_QUIT(self, server, session, envelope):
        self.quits.append(session.peer[1])
        return "221 Bye"

    async def handle_DATA(self, server, session, envelope):
        action = self.dataActions.pop(0) if self.dataActions else None
        self.delivered.append((session.peer[1], envelope.original_content))
        if action == "drop":
            server.transport.abort()
            return "250 never sent"
        if action == "close":
            # Once the 250 below has been written.
            server.loop.call_soon(server.transport.close)
        if action == "hold":
            reactor.callFromThread(self.held.callback, None)
            await server.loop.run_in_executor(None, self.release.wait, WAIT)
        return "250 2.0.0 OK"

    def authenticator(self, server, session, envelope, mechanism, authData):
        return AuthResult(success=authData.password.decode() == PASSWORD, handled=False)

    def subjects(self) -> list[str]:
        return [body.split(b"Subject: ")[1].split(b"\r\n")[0].decode() for _, body in self.delivered]

    def ports(self) -> list[int]:
        return [port for port, _ in self.delivered]


class CountingController(EphemeralController):
    def factory(self):
        self.handler.connections += 1
        return super().factory()


@pytest.fixture
def peer():
    handler = Peer()
    controller = CountingController(
        handler, hostname="127.0.0.1", port=0, authenticator=handler.authenticator, auth_require_tls=False
    )
    controller.start()
    # start() connects once itself, to see that the server runs.
    handler.connections = 0
    handler.port = controller.port
    yield handler
    handler.release.set()
    controller.stop()


@pytest_twisted.async_yield_fixture
async def pools():
    """
    C{make(peerPort, **ClientPoolKeywords)}: a pool to 127.0.0.1, closed
    after the test.
    """
    made = []

    def make(port, **keywords):
        keywords.setdefault("timeout", WAIT * 1000)
        keywords.setdefault("dataTimeout", WAIT * 1000)
        pool = ClientPool(host="127.0.0.1", port=port, **keywords)
        made.append(pool)
        return pool

    yield make
    for pool in made:
        await bounded(pool.close())


def clocked(peer, clock: Clock, **keywords) -> ClientPool:
    """
    A pool whose time is C{clock}, connecting through the real reactor.
    """
    return ClientPool(
        clock, endpoint=TCP4ClientEndpoint(reactor, "127.0.0.1", peer.port), timeout=WAIT * 1000, **keywords
    )


async def failure(d: Deferred) -> BaseException:
    try:
        result = await bounded(d)
    except BaseException as e:
        return e
    raise AssertionError(f"expected a failure, got {result!r}")


# Sharing connections ------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_messagesShareAtMostMaxConnections(peer, pools):
    """
    Six messages sent at once over maxConnections=2: the server sees two
    connections, both used, and every message once.
    """
    pool = pools(peer.port, maxConnections=2)
    results = await bounded(gatherResults([pool.sendmail("ann@example.org", ["bob@example.org"], message(n)) for n in range(6)]))
    assert results == [{}] * 6
    assert peer.connections == 2
    assert sorted(peer.subjects()) == [str(n) for n in range(6)]
    # Which session takes which message is the peer's speed's business.
    assert len(set(peer.ports())) == 2


@pytest_twisted.ensureDeferred
async def test_waitingSendsGoInOrderAndACancelledOneLeavesTheLine(peer, pools):
    """
    With one connection busy, later sends wait in the order made; the one
    cancelled while waiting is never sent.
    """
    pool = pools(peer.port, maxConnections=1)
    peer.dataActions = ["hold"]
    first = pool.sendmail("ann@example.org", ["bob@example.org"], message(1))
    await bounded(peer.held)
    second = pool.sendmail("ann@example.org", ["bob@example.org"], message(2))
    third = pool.sendmail("ann@example.org", ["bob@example.org"], message(3))
    fourth = pool.sendmail("ann@example.org", ["bob@example.org"], message(4))
    third.cancel()
    assert isinstance(await failure(third), CancelledError)
    peer.release.set()
    assert await bounded(gatherResults([first, second, fourth])) == [{}, {}, {}]
    assert peer.subjects() == ["1", "2", "4"]
    assert peer.connections == 1


@pytest_twisted.ensureDeferred
async def test_maxMessagesPerConnectionRotates(peer, pools):
    """
    maxMessagesPerConnection=2: five messages one after the other take
    three connections, two, two and one; each full one said QUIT.
    """
    pool = pools(peer.port, maxConnections=1, maxMessagesPerConnection=2)
    for n in range(5):
        assert await bounded(pool.sendMail(emailMessage(n))) == {}
    ports = peer.ports()
    assert peer.connections == 3
    assert [ports.index(p) for p in ports] == [0, 0, 2, 2, 4]
    await bounded(pool.close())
    assert sorted(peer.quits) == sorted(set(ports))


def emailMessage(number: int) -> EmailMessage:
    m = EmailMessage()
    m["From"], m["To"], m["Subject"] = "ann@example.org", "bob@example.org", str(number)
    m.set_content(f"message {number}")
    return m


@pytest_twisted.ensureDeferred
async def test_connectionLifetimeRetiresAfterTheMessage(peer):
    """
    connectionLifetime=60 on the pool's clock: a message at 59 s reuses the
    session, one at 60 s gets a new one, and the old one said QUIT.
    """
    clock = Clock()
    pool = clocked(peer, clock, connectionLifetime=60, idleTimeout=None, noopAfter=None)
    try:
        await bounded(pool.sendmail("ann@example.org", ["bob@example.org"], message(1)))
        clock.advance(59)
        await bounded(pool.sendmail("ann@example.org", ["bob@example.org"], message(2)))
        clock.advance(1)
        await bounded(pool.sendmail("ann@example.org", ["bob@example.org"], message(3)))
        first, second, third = peer.ports()
        assert first == second != third
        assert peer.connections == 2
    finally:
        await bounded(pool.close())
    assert peer.quits.count(first) == 1


@pytest_twisted.ensureDeferred
async def test_idleTimeoutClosesAndNoopChecksAnIdleSession(peer):
    """
    idleTimeout=30, noopAfter=10: idle 9 s, the session is reused as it
    is; idle 10 s, it is checked with NOOP first; idle 30 s, it was closed
    (QUIT) and a new one carries the next message.
    """
    clock = Clock()
    pool = clocked(peer, clock, idleTimeout=30, noopAfter=10)
    send = lambda n: bounded(pool.sendmail("ann@example.org", ["bob@example.org"], message(n)))  # noqa: E731
    try:
        await send(1)
        clock.advance(9)
        await send(2)
        assert peer.noops == []
        clock.advance(10)
        await send(3)
        first = peer.ports()[0]
        assert peer.noops == [first]
        clock.advance(30)
        # The idle session's goodbye is on its way; the next send does not
        # wait for it.
        await send(4)
        assert peer.ports() == [first, first, first, peer.ports()[3]] and peer.ports()[3] != first
        assert peer.connections == 2
    finally:
        await bounded(pool.close())
    assert peer.quits.count(first) == 1


@pytest_twisted.ensureDeferred
async def test_rateLimitDelaysAndNeverDrops(peer):
    """
    rateLimit=(2, 10): of five sends made at once two start now, two more
    10 s later and the last at 20 s, on the pool's clock.
    """
    clock = Clock()
    pool = clocked(peer, clock, rateLimit=(2, 10), maxConnections=5)
    try:
        sends = [pool.sendmail("ann@example.org", ["bob@example.org"], message(n)) for n in range(5)]
        await bounded(gatherResults(sends[:2]))
        assert [d.called for d in sends[2:]] == [False] * 3 and len(peer.delivered) == 2
        clock.advance(9.5)
        assert [d.called for d in sends[2:]] == [False] * 3
        clock.advance(0.5)
        await bounded(gatherResults(sends[2:4]))
        assert not sends[4].called and len(peer.delivered) == 4
        clock.advance(10)
        assert await bounded(sends[4]) == {}
        assert sorted(peer.subjects()) == [str(n) for n in range(5)]
    finally:
        await bounded(pool.close())


# Replacing sessions, and sending again only when it is safe ------------------


@pytest_twisted.ensureDeferred
async def test_serverClosedIdleSessionIsReplaced(peer, pools):
    """
    The server closes the session after the first message (as an idle
    timeout would): the next message goes out on a new connection, once,
    and the caller sees nothing of it.
    """
    pool = pools(peer.port, maxConnections=1)
    peer.dataActions = ["close"]
    assert await bounded(pool.sendmail("ann@example.org", ["bob@example.org"], message(1))) == {}
    assert await bounded(pool.sendmail("ann@example.org", ["bob@example.org"], message(2))) == {}
    assert peer.subjects() == ["1", "2"]
    first, second = peer.ports()
    assert first != second and peer.connections == 2
    assert peer.mails == [first, second]


@pytest_twisted.ensureDeferred
async def test_421AtMailIsSentAgainOnceOnAFreshConnection(peer, pools, logEvents):
    """
    The server answers MAIL with 421: nothing of the message went out, so
    it goes again on a new connection and is delivered once.
    """
    pool = pools(peer.port, maxConnections=2)
    peer.mailReplies = ["421 4.7.0 too busy, try later"]
    assert await bounded(pool.sendmail("ann@example.org", ["bob@example.org"], message(1))) == {}
    assert peer.subjects() == ["1"]
    assert len(peer.mails) == 2 and peer.mails[0] != peer.mails[1]
    assert peer.ports() == [peer.mails[1]]
    assert peer.connections == 2
    assert any("sending it again on a new one" in str(e.get("log_format", "")) for e in logEvents)


@pytest_twisted.ensureDeferred
async def test_421AtMailIsSentAgainOnlyOnce(peer, pools):
    """
    Every MAIL answered 421: two tries, then the caller gets the 421.
    """
    pool = pools(peer.port)
    peer.everyMail = "421 4.7.0 too busy, try later"
    error = await failure(pool.sendmail("ann@example.org", ["bob@example.org"], message(1)))
    assert isinstance(error, SMTPError) and error.code == 421 and error.step == "send"
    assert not error.messageStarted
    assert len(peer.mails) == 2 and peer.delivered == []


@pytest_twisted.ensureDeferred
async def test_connectionLostAfterTheFinalDotIsNotSentAgain(peer, pools):
    """
    The server takes the message, then drops the connection without
    answering: the message may have been delivered, so it does not go
    again; the caller gets the lost connection, marked messageStarted.
    """
    pool = pools(peer.port)
    peer.dataActions = ["drop"]
    error = await failure(pool.sendmail("ann@example.org", ["bob@example.org"], message(1)))
    assert isinstance(error, SMTPConnectError) and error.messageStarted and error.step == "send", error
    assert peer.subjects() == ["1"]
    assert len(peer.mails) == 1 and peer.connections == 1
    # The pool goes on with a new session.
    assert await bounded(pool.sendmail("ann@example.org", ["bob@example.org"], message(2))) == {}
    assert peer.subjects() == ["1", "2"] and peer.connections == 2


@pytest_twisted.ensureDeferred
async def test_permanentRefusalIsNotRetriedAndTheSessionGoesOn(peer, pools):
    pool = pools(peer.port, maxConnections=1)
    peer.mailReplies = ["550 5.7.1 not you"]
    error = await failure(pool.sendmail("ann@example.org", ["bob@example.org"], message(1)))
    assert error.code == 550 and not error.messageStarted
    assert await bounded(pool.sendmail("ann@example.org", ["bob@example.org"], message(2))) == {}
    assert len(peer.mails) == 2 and peer.mails[0] == peer.mails[1]
    assert peer.subjects() == ["2"] and peer.connections == 1


@pytest_twisted.ensureDeferred
async def test_refusedCredentialsFailTheSend(peer, pools):
    """
    authenticate() returning False is SMTPAuthenticationError (step
    "authenticate"), not a loop; right credentials go through.
    """
    wrong = pools(peer.port, username="ann", password="wrong")
    error = await failure(wrong.sendmail("ann@example.org", ["bob@example.org"], message(1)))
    assert isinstance(error, SMTPAuthenticationError) and error.code == 535 and error.step == "authenticate"
    assert peer.connections == 1 and peer.mails == []
    right = pools(peer.port, username="ann", password=PASSWORD, authMode=AuthMode.default)
    assert await bounded(right.sendmail("ann@example.org", ["bob@example.org"], message(2))) == {}
    assert peer.subjects() == ["2"]


@pytest_twisted.ensureDeferred
async def test_connectFailureAndClosedPool(pools):
    pool = pools(freePort(), maxConnections=1)
    error = await failure(pool.sendmail("ann@example.org", ["bob@example.org"], message(1)))
    assert isinstance(error, SMTPConnectError) and error.step == "connect", error
    # The slot came back: a second send fails the same way instead of waiting.
    error = await failure(pool.sendmail("ann@example.org", ["bob@example.org"], message(2)))
    assert isinstance(error, SMTPConnectError) and error.step == "connect", error
    await bounded(pool.close())
    closed = await failure(pool.sendmail("ann@example.org", ["bob@example.org"], message(3)))
    assert type(closed) is SMTPError and "closed" in str(closed)


def test_settingsAreCheckedAtOnce():
    with pytest.raises(TypeError, match="hots"):
        ClientPool(hots="127.0.0.1")
    with pytest.raises(ValueError, match="maxConnections"):
        ClientPool(maxConnections=0)
    with pytest.raises(ValueError, match="rateLimit"):
        ClientPool(rateLimit=(0, 1))


@pytest_twisted.ensureDeferred
async def test_blockingPoolFromThreads(peer):
    """
    BlockingClientPool from worker threads: three threads share one
    connection.
    """
    pool = BlockingClientPool(host="127.0.0.1", port=peer.port, timeout=WAIT * 1000, maxConnections=1)

    def sendFrom(n):
        return pool.sendStream(io.BytesIO(message(n)))

    results = await bounded(gatherResults([deferToThread(sendFrom, n) for n in range(3)]))
    assert results == [{}, {}, {}]
    await bounded(deferToThread(pool.close))
    assert sorted(peer.subjects()) == ["0", "1", "2"] and peer.connections == 1
    assert len(peer.quits) == 1
    with pytest.raises(SMTPError, match="use ClientPool.sendMail"):
        pool.sendMail(emailMessage(4))


# With PIPELINING (smtp-sink), connections counted by a forwarder ------------


class CuttingProxy(ProxyServer):
    def dataReceived(self, data: bytes) -> None:
        factory = self.factory
        factory.received += len(data)
        if factory.cutAfter is not None and factory.received > factory.cutAfter:
            # The network fails in the middle of the message.
            self.transport.abortConnection()
            if self.peer is not None:
                self.peer.transport.abortConnection()
            return
        super().dataReceived(data)


class CountingForwarder(ProxyFactory):
    """
    Forward to 127.0.0.1:C{port}, counting connections; with C{cutAfter},
    drop the connection once the client has sent that many bytes.
    """

    protocol = CuttingProxy

    def __init__(self, port: int, cutAfter: int | None = None) -> None:
        super().__init__("127.0.0.1", port)
        self.connections = 0
        self.received = 0
        self.cutAfter = cutAfter

    def buildProtocol(self, addr):
        self.connections += 1
        return super().buildProtocol(addr)


@pytest.fixture
def sink(smtpSink):  # noqa: F811
    """
    C{start(*smtpSinkOptions)}: an smtp-sink behind a forwarder that counts
    connections; returns the forwarder (C{.listenPort}).
    """
    listening = []

    def start(*options):
        port, _ = smtpSink(options=options)
        forwarder = CountingForwarder(port)
        forwarder.noisy = False
        listening.append(reactor.listenTCP(0, forwarder, interface="127.0.0.1"))
        forwarder.listenPort = listening[-1].getHost().port
        return forwarder

    yield start
    for port in listening:
        port.stopListening()


@pytest_twisted.ensureDeferred
async def test_pipelinedDropAfterTheFinalDotIsNotSentAgain(sink, pools):
    forwarder = sink("-q", ".")
    pool = pools(forwarder.listenPort)
    error = await failure(pool.sendmail("ann@example.org", ["bob@example.org"], message(1)))
    assert isinstance(error, SMTPConnectError) and error.messageStarted, error
    assert forwarder.connections == 1


@pytest_twisted.ensureDeferred
async def test_pipelined421ToTheFinalDotIsNotSentAgain(sink, pools):
    forwarder = sink("-Q", ".")
    pool = pools(forwarder.listenPort)
    error = await failure(pool.sendmail("ann@example.org", ["bob@example.org"], message(1)))
    assert error.code == 421 and error.messageStarted, error
    assert forwarder.connections == 1


@pytest_twisted.ensureDeferred
async def test_pipelined421AtMailIsSentAgainOnce(sink, pools):
    """
    smtp-sink answers the pipelined MAIL with 421 and hangs up: the
    envelope failed, so one more try on a new connection, then the 421.
    """
    forwarder = sink("-Q", "MAIL")
    pool = pools(forwarder.listenPort)
    error = await failure(pool.sendmail("ann@example.org", ["bob@example.org"], message(1)))
    assert isinstance(error, SMTPConnectError) and error.code == 421 and not error.messageStarted, error
    assert forwarder.connections == 2


@pytest_twisted.ensureDeferred
async def test_pipelinedMessagesShareOneConnection(sink, pools):
    forwarder = sink()
    pool = pools(forwarder.listenPort, maxConnections=1)
    sends = [pool.sendmail("ann@example.org", ["bob@example.org"], message(n)) for n in range(20)]
    assert await bounded(gatherResults(sends)) == [{}] * 20
    assert forwarder.connections == 1



@pytest_twisted.ensureDeferred
async def test_connectionLostInTheMiddleOfTheMessageIsNotSentAgain(peer, pools):
    """
    A large message is streamed; the connection fails half-way through it.
    Part of the stream is gone, so the message cannot go again: the caller
    gets the failure, marked messageStarted, and only one connection was made.
    """
    forwarder = CountingForwarder(peer.port, cutAfter=150_000)
    forwarder.noisy = False
    listening = reactor.listenTCP(0, forwarder, interface="127.0.0.1")
    try:
        pool = pools(listening.getHost().port)
        body = b"From: ann@example.org\r\nTo: bob@example.org\r\n\r\n" + b"x" * 76 + b"\r\n"
        big = io.BytesIO(body + (b"y" * 76 + b"\r\n") * 4000)
        error = await failure(pool.sendStream(big))
        assert isinstance(error, SMTPConnectError) and error.messageStarted, error
        assert forwarder.connections == 1 and peer.delivered == []
    finally:
        await listening.stopListening()


def test_unusedBlockingPoolClosesWithoutAReactor():
    """
    Closing a pool that never sent does not go through the reactor thread
    (this test runs in it, where a blocking call would raise), and a send
    after it fails.
    """
    with BlockingClientPool(host="127.0.0.1") as pool:
        pass
    failures = []
    pool._pool.sendmail("ann@example.org", ["bob@example.org"], message(1)).addErrback(failures.append)
    [closed] = failures
    assert closed.check(SMTPError) and "the pool is closed" in str(closed.value)

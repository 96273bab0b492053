"""
Shared fixtures for the interop and hostile-input suites.

The reactor runs under pytest-twisted in the main thread, so every blocking
client (smtplib, a raw socket, a subprocess) runs in a worker thread through
C{deferToThread}, and tests synchronise on Deferreds fired by the server's
handlers (L{Recorder}), never on sleeps.  Every blocking read has a socket
timeout and every wait a C{Deferred.addTimeout}, so nothing can hang.
"""

from __future__ import annotations

import collections
import os
import re
import smtplib
import socket
import ssl
from dataclasses import dataclass, field
from typing import Any, Callable

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.threads import deferToThread
from twisted.logger import globalLogPublisher

from infsmtp import Server

#: The bound on every single wait in these suites, in seconds.
WAIT = 20.0

HOSTNAME = "mx.interop.test"


def bounded(d: defer.Deferred, seconds: float = WAIT) -> defer.Deferred:
    """
    C{d}, failing with C{TimeoutError} after C{seconds}.
    """
    return d.addTimeout(seconds, reactor)


def inThread(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> defer.Deferred:
    """
    Run a blocking function off the reactor thread (bounded).
    """
    return bounded(deferToThread(fn, *args, **kwargs), 60)


class Recorder:
    """
    Handlers that record what the server decided and let tests wait for it.

    Each C{wait*} gives a Deferred firing once the count is reached, so a
    test waits on the server's own events instead of sleeping.
    """

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        self.disconnects: collections.Counter[int] = collections.Counter()
        self.connects: list[int] = []
        self.mailFroms: list[str] = []
        self.rcptTos: list[str] = []
        self._waiters: list[tuple[Callable[[], bool], defer.Deferred]] = []

    def _check(self) -> None:
        still = []
        for condition, d in self._waiters:
            if condition():
                # On the next reactor turn: the waiting test resumes once
                # the server has finished the event it is handling.
                reactor.callLater(0, lambda d=d: d.called or d.callback(None))
            else:
                still.append((condition, d))
        self._waiters = still

    def waitFor(self, condition: Callable[[], bool], seconds: float = WAIT) -> defer.Deferred:
        if condition():
            return defer.succeed(None)
        d: defer.Deferred = defer.Deferred()
        self._waiters.append((condition, d))
        return bounded(d, seconds)

    def waitReceived(self, n: int, seconds: float = WAIT) -> defer.Deferred:
        return self.waitFor(lambda: len(self.received) >= n, seconds)

    def waitDisconnects(self, n: int, seconds: float = WAIT) -> defer.Deferred:
        return self.waitFor(lambda: sum(self.disconnects.values()) >= n, seconds)

    # Handlers ---------------------------------------------------------------

    def onConnect(self, session: Any) -> None:
        self.connects.append(session.id)
        self._check()

    def onMailFrom(self, session: Any) -> None:
        self.mailFroms.append(session.address)
        self._check()

    def onRcptTo(self, session: Any) -> None:
        self.rcptTos.append(session.address)
        self._check()

    def onReceive(self, session: Any) -> None:
        self.received.append(
            {
                "id": session.id,
                "mailFrom": session.mailFrom,
                "rcptTo": list(session.rcptTo),
                "msg": session.msg,
                "secure": session.secure,
                "tlsVersion": session.tlsVersion,
                "authenticated": session.authenticated,
                "username": session.username,
                "mailParameters": dict(session.mailParameters),
                "helo": session.helo,
            }
        )
        self._check()

    def onDisconnect(self, session: Any) -> None:
        self.disconnects[session.id] += 1
        self._check()

    def install(self, server: Server, names: tuple[str, ...] = ("onConnect", "onMailFrom", "onRcptTo", "onReceive", "onDisconnect")) -> None:
        for name in names:
            setattr(server, name, getattr(self, name))


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest_twisted.async_yield_fixture
async def serve(certificateAuthority, recorder):
    """
    C{await serve(**kwargs)} starts a L{Server} on 127.0.0.1 with an
    ephemeral port and returns it.  Keywords are the Server's, plus:

    - C{tls=True}: load the localhost certificate (STARTTLS, or implicit TLS
      with C{implicitTls=True});
    - C{record=False}: do not install the L{recorder} handlers;
    - C{handlers={name: handler}}: handlers set after the recorder's.

    Every server started is stopped (and its sessions ended) at teardown.
    """
    servers: list[Server] = []

    async def start(tls: bool = False, record: bool = True, handlers: dict | None = None, **kwargs: Any) -> Server:
        kwargs.setdefault("port", 0)
        kwargs.setdefault("interface", "127.0.0.1")
        kwargs.setdefault("hostname", HOSTNAME)
        if tls:
            kwargs.setdefault("ssl", True)
        server = Server(**kwargs)
        if tls:
            server.setCertificate(certificateAuthority.localhost.certFile, certificateAuthority.localhost.keyFile)
        if record:
            recorder.install(server)
        for name, handler in (handlers or {}).items():
            setattr(server, name, handler)
        port = await bounded(server.startListening())
        assert port == server.port and port > 0
        servers.append(server)
        return server

    yield start
    for server in servers:
        await bounded(server.stopListening())


@pytest.fixture
def loggedFailures():
    """
    The Twisted log events carrying a failure, logged during the test.
    """
    events: list[dict] = []

    def observer(event: dict) -> None:
        if event.get("log_failure") is not None:
            events.append(event)

    globalLogPublisher.addObserver(observer)
    yield events
    globalLogPublisher.removeObserver(observer)


@pytest.fixture
def readDone(monkeypatch):
    """
    C{await readDone()}, from inside a handler's event: fires once the
    server's C{dataReceived} that is running returns, that is once the
    server has acted on all it read.  A test that shows the server did
    not run ahead of a pending handler waits for this event instead of
    sleeping to give a wrongly eager server a chance.
    """
    from infsmtp._server.protocol import ServerProtocol

    original = ServerProtocol.dataReceived
    depth = [0]
    waiters: list[defer.Deferred] = []

    def dataReceived(self: Any, data: bytes) -> None:
        depth[0] += 1
        try:
            original(self, data)
        finally:
            depth[0] -= 1
            if not depth[0]:
                done, waiters[:] = list(waiters), []
                for d in done:
                    d.callback(None)

    monkeypatch.setattr(ServerProtocol, "dataReceived", dataReceived)

    def wait() -> defer.Deferred:
        assert depth[0], "readDone() waits for a read in progress: call it from a handler's event"
        d: defer.Deferred = defer.Deferred()
        waiters.append(d)
        return bounded(d)

    return wait


# A raw client for hostile input -------------------------------------------

_REPLY_LINE = re.compile(rb"^(\d{3})([ -])(.*)$", re.S)


@dataclass
class Reply:
    code: int
    lines: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    def __repr__(self) -> str:
        return f"Reply({self.code}, {self.text!r})"


class ConnectionClosed(Exception):
    """
    The server closed the connection while a reply was expected.
    """


class RawClient:
    """
    A blocking socket client that writes exactly the bytes it is given and
    reads SMTP replies.  Run it in a worker thread.  The socket timeout
    bounds each read; it never serves as synchronisation.
    """

    def __init__(self, port: int, timeout: float = 10.0, host: str = "127.0.0.1") -> None:
        self.sock: Any = socket.create_connection((host, port), timeout=timeout)
        self._buffer = b""
        self.transcript: list[Reply] = []

    def send(self, data: bytes | str) -> None:
        if isinstance(data, str):
            data = data.encode("utf-8")
        self.sock.sendall(data)

    def _line(self) -> bytes:
        while b"\r\n" not in self._buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionClosed(f"connection closed; unread: {self._buffer!r}")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\r\n", 1)
        return line

    def reply(self) -> Reply:
        """
        Read one complete (possibly multi-line) reply.
        """
        lines: list[str] = []
        while True:
            raw = self._line()
            match = _REPLY_LINE.match(raw)
            assert match, f"malformed reply line {raw!r}"
            code, separator, text = match.groups()
            lines.append(text.decode("utf-8"))
            if separator == b" ":
                reply = Reply(int(code), lines)
                self.transcript.append(reply)
                return reply

    def replies(self, n: int) -> list[Reply]:
        return [self.reply() for _ in range(n)]

    def command(self, line: bytes | str) -> Reply:
        if isinstance(line, str):
            line = line.encode("utf-8")
        self.send(line + b"\r\n")
        return self.reply()

    def expect(self, line: bytes | str, code: int) -> Reply:
        reply = self.command(line)
        assert reply.code == code, f"{line!r}: expected {code}, got {reply}"
        return reply

    def readToEnd(self) -> bytes:
        """
        Everything the server sends until it closes the connection.
        """
        data, self._buffer = self._buffer, b""
        while True:
            chunk = self.sock.recv(65536)
            if not chunk:
                return data
            data += chunk

    def repliesToEnd(self) -> list[Reply]:
        """
        Every reply the server sends until it closes the connection.
        """
        out = []
        while True:
            try:
                out.append(self.reply())
            except ConnectionClosed as e:
                assert not self._buffer, str(e)
                return out

    def exchange(self, batch: bytes) -> list[Reply]:
        """
        Read the greeting, send C{batch} in one write (pipelining, or
        hostile bytes), and return every reply until the server closes.
        """
        assert self.reply().code == 220
        self.send(batch)
        return self.repliesToEnd()

    def startTLS(self, cafile: str, serverHostname: str = "localhost") -> None:
        """
        Wrap the socket in TLS (after a 220 to STARTTLS, or at once for
        implicit TLS).  Anything still buffered would be plaintext the
        server sent after its 220: a protocol error.
        """
        assert self._buffer == b"", f"plaintext after 220: {self._buffer!r}"
        context = ssl.create_default_context(cafile=cafile)
        self.sock = context.wrap_socket(self.sock, server_hostname=serverHostname)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def abort(self) -> None:
        """
        Vanish: close with a TCP reset, as a crashed client would.
        """
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        except OSError:
            pass
        self.close()

    def __enter__(self) -> "RawClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


@pytest.fixture
def raw():
    """
    C{raw(port)} opens a L{RawClient}; all are closed at teardown.
    C{raw(port, ehlo="name")} also reads the 220 greeting and has EHLO
    answered 250 before handing the client over.
    """
    clients: list[RawClient] = []

    def connect(port: int, timeout: float = 10.0, ehlo: str | None = None) -> RawClient:
        client = RawClient(port, timeout)
        clients.append(client)
        if ehlo is not None:
            greeting = client.reply()
            assert greeting.code == 220, greeting
            client.expect(f"EHLO {ehlo}", 250)
        return client

    yield connect
    for client in clients:
        client.close()


# A well-behaved client ----------------------------------------------------

MESSAGE = (
    b"From: Alice <alice@example.org>\r\n"
    b"To: Bob <bob@example.net>\r\n"
    b"Subject: well-behaved\r\n"
    b"\r\n"
    b"Hello Bob.\r\n"
)


def sendWithSmtplib(port: int, sender: str = "alice@example.org", recipients: tuple[str, ...] = ("bob@example.net",), message: bytes = MESSAGE) -> dict:
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=10) as client:
        return client.sendmail(sender, list(recipients), message)


@pytest.fixture
def assertServed(recorder):
    """
    C{await assertServed(server)}: a well-behaved smtplib client delivers a
    message, and it reaches C{onReceive} intact.  Used after every hostile
    case.
    """

    async def check(server: Server, message: bytes = MESSAGE) -> None:
        before = len(recorder.received)
        marker = os.urandom(8).hex().encode()
        body = message + b"marker " + marker + b"\r\n"
        refused = await inThread(sendWithSmtplib, server.port, message=body)
        assert refused == {}
        await recorder.waitReceived(before + 1)
        received = recorder.received[before]
        assert received["msg"].endswith(body)
        assert received["mailFrom"] == "alice@example.org"
        assert received["rcptTo"] == ["bob@example.net"]

    return check

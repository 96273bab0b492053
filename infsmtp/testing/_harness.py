"""
A handler's policy, tested without sockets.

L{ServerHarness} drives a real L{ServerProtocol} over an in-memory
transport with a fake clock: bytes in, replies out, exactly as a client
would see them, synchronously whenever the handlers answer at once.  It is
the harness infsmtp's own protocol tests use.

L{makeSession} builds a L{Session} with the fields a handler reads, for
calling a handler directly when the reply does not matter.

    >>> from infsmtp import Server, SMTPError
    >>> def onRcptTo(session):
    ...     if not session.address.endswith("@example.org"):
    ...         raise SMTPError(550, "5.1.1 No such user here")
    >>> h = ServerHarness(onRcptTo=onRcptTo)
    >>> h.ehlo()[-1]
    b'250 CHUNKING'
    >>> h.reply("MAIL FROM:<a@b.test>")
    (250, '2.1.0 Sender OK')
    >>> h.reply("RCPT TO:<x@elsewhere.test>")
    (550, '5.1.1 No such user here')
"""

from __future__ import annotations

from email.message import EmailMessage
from typing import Any, Iterable

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.testing import MemoryReactorClock, StringTransport

from .._server.server import HANDLER_NAMES, Server
from .._server.session import Session

#: The client address a harness session comes from (TEST-NET-1).
DEFAULT_PEER = ("192.0.2.7", 4242)


class MemoryTransport(StringTransport):
    """
    An in-memory transport that also counts writes and records what the
    protocol did to the connection.

    @ivar writes: the number of C{write} calls (one per batch of replies).
    @ivar tlsStarted: the TLS options given to C{startTLS}, or L{None}.
    @ivar aborted: whether C{abortConnection} was called.
    """

    aborted = False
    #: L{ServerProtocol} asks this transport to start TLS (C{startTLS},
    #: recorded in L{tlsStarted}) rather than starting its own over it.
    simulatesTLS = True

    def __init__(self, peer: tuple[str, int] = DEFAULT_PEER) -> None:
        host, port = peer
        address = IPv6Address("TCP", host, port) if ":" in host else IPv4Address("TCP", host, port)
        super().__init__(peerAddress=address)
        self.writes = 0
        self.tlsStarted: Any = None

    def write(self, data: bytes) -> None:
        self.writes += 1
        super().write(data)

    def startTLS(self, options: Any) -> None:
        self.tlsStarted = options

    def abortConnection(self) -> None:
        self.aborted = True
        self.loseConnection()


class ServerHarness:
    """
    One SMTP session of C{server}, driven in memory.

    @param server: the L{Server} whose handlers and settings to test.  When
        omitted, one is made with C{serverOptions} (handlers included, e.g.
        C{onRcptTo=policy}), the host name C{mx.test} and a
        L{MemoryReactorClock} as its reactor.  A server you make yourself
        should get C{reactor=MemoryReactorClock()} too: its timers then
        run on C{harness.clock}, never on a real reactor.
    @param tls: TLS options to offer STARTTLS with (C{transport.tlsStarted}
        records them when the client asks; no handshake happens).
    @param peer: the client's (address, port).

    @ivar server: the server.
    @ivar protocol: the L{ServerProtocol} of this session.
    @ivar transport: its L{MemoryTransport}.
    @ivar clock: the server's reactor when it is a fake clock (advance it
        to run handler deadlines and idle timeouts), else L{None}.
    """

    def __init__(
        self,
        server: Server | None = None,
        tls: Any = None,
        *,
        peer: tuple[str, int] = DEFAULT_PEER,
        **serverOptions: Any,
    ) -> None:
        if server is None:
            handlers = {name: serverOptions.pop(name) for name in HANDLER_NAMES if name in serverOptions}
            serverOptions.setdefault("hostname", "mx.test")
            serverOptions.setdefault("reactor", MemoryReactorClock())
            server = Server(**serverOptions)
            for name, handler in handlers.items():
                setattr(server, name, handler)
        elif serverOptions:
            raise TypeError("give either a server or the options to make one, not both")
        self.server = server
        reactor = server._reactor
        self.clock = reactor if isinstance(reactor, MemoryReactorClock) else None
        factory = server.buildFactory()
        if tls is not None:
            factory.tlsOptions = tls
        self.factory = factory
        self.protocol = factory.buildProtocol(None)
        self.transport = MemoryTransport(peer)
        self.protocol.makeConnection(self.transport)

    @property
    def session(self) -> Session:
        """
        The session the handlers see.
        """
        return self.protocol.session

    def take(self) -> list[bytes]:
        """
        The reply lines written since the last call (CRLF removed).
        """
        data = self.transport.value()
        self.transport.clear()
        return [line for line in data.split(b"\r\n") if line]

    def send(self, data: bytes | str) -> list[bytes]:
        """
        Feed C{data} to the server as the client's bytes and return the
        reply lines it wrote.  A C{str} is encoded as UTF-8 and gets a CRLF
        when it does not end with one (bytes are sent as they are).

        A handler that answers later (a pending Deferred) leaves its reply
        for L{take}.
        """
        if isinstance(data, str):
            data = data.encode("utf-8")
            if not data.endswith(b"\r\n"):
                data += b"\r\n"
        self.protocol.dataReceived(data)
        return self.take()

    def codes(self, data: bytes | str) -> list[int]:
        """
        The codes of the complete replies C{data} produced, in order.
        """
        return [int(line[:3]) for line in self.send(data) if line[3:4] == b" "]

    def reply(self, data: bytes | str) -> tuple[int, str]:
        """
        The last reply C{data} produced, as (code, text); a multi-line
        reply's lines are joined with newlines.

        @raise AssertionError: nothing was answered (yet).
        """
        lines = self.send(data)
        if not lines:
            raise AssertionError(f"no reply to {data!r} (a handler still deciding? see take())")
        last = [lines[-1]]
        for line in reversed(lines[:-1]):
            if line[3:4] != b"-":
                break
            last.insert(0, line)
        return int(last[-1][:3]), "\n".join(line[4:].decode("utf-8", "replace") for line in last)

    def ehlo(self, name: str = "client.test") -> list[bytes]:
        """
        Read the greeting (when not read yet) and say EHLO; the EHLO reply
        lines (however many extensions an C{onEhlo} left).
        """
        lines = self.send(f"EHLO {name}")
        while lines and lines[0][:3] == b"220":
            lines.pop(0)
        return lines

    def lose(self) -> None:
        """
        The client goes away (C{onDisconnect} runs; the session's timers
        are cancelled).
        """
        self.protocol.connectionLost(None)


class DetachedSession(Session):
    """
    A L{Session} without a connection, made by L{makeSession}:
    C{disconnect()} only sets C{disconnected}.
    """

    __slots__ = ("disconnected",)

    def disconnect(self) -> None:
        self.disconnected = True


def makeSession(
    *,
    id: int = 1,
    ip: str = DEFAULT_PEER[0],
    port: int = DEFAULT_PEER[1],
    helo: str = "",
    secure: bool = False,
    tlsVersion: str = "",
    username: str = "",
    password: str = "",
    authenticated: bool = False,
    address: str = "",
    mailFrom: str = "",
    rcptTo: Iterable[str] = (),
    mailParameters: dict[str, str | None] | None = None,
    message: bytes | str | EmailMessage | None = None,
    extensions: dict[str, str | None] | None = None,
) -> DetachedSession:
    """
    A session with these fields, to call a handler with directly.

        >>> def onRcptTo(session):
        ...     return session.authenticated or session.address.endswith("@example.org")
        >>> onRcptTo(makeSession(address="x@elsewhere.test", authenticated=True))
        True

    @param message: what C{session.msg} / C{session.message} give (for
        C{onReceive}): bytes as received (CRLF line ends), or a C{str} or an
        C{EmailMessage}, converted to CRLF bytes.
    """
    session = DetachedSession(id, ip, port, lambda: None)
    session.disconnected = False
    session.helo = helo
    session.secure = secure
    session.tlsVersion = tlsVersion or ("TLSv1.3" if secure else "")
    session.username = username
    session.password = password
    session.authenticated = authenticated
    session.address = address
    session.mailFrom = mailFrom
    session.rcptTo = list(rcptTo)
    session.mailParameters = dict(mailParameters or {})
    session.extensions = dict(extensions or {})
    if message is not None:
        if isinstance(message, EmailMessage):
            message = message.as_bytes()
        if isinstance(message, str):
            message = message.encode("utf-8")
        # Bare LFs become CRLF, as a message arrives over SMTP.
        session._setMessage(message.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"))
    return session

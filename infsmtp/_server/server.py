"""
L{Server}: the public face of the SMTP server, an L{IService} that listens
on an endpoint and builds L{ServerProtocol}s through L{ServerFactory}.
"""

from __future__ import annotations

import itertools
import os
import re
import socket
from dataclasses import dataclass
from typing import Any, Callable

from twisted.application import service
from twisted.internet import defer
from twisted.internet.endpoints import (
    TCP4ServerEndpoint,
    TCP6ServerEndpoint,
    serverFromString,
)
from twisted.internet.interfaces import IListeningPort, IReactorTime, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.mail import smtp
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from .._blocking import blockingCall
from .._enums import TLSVersion
from .._errors import SMTPError, SMTPTLSError
from .._events import SessionEvents
from .._signals import SigtermStops, runningUnderTwistd
from .handlers import HandlerSpec, adaptHandler
from .limits import ClientLimits, MemoryBudget, parseNetworks
from .protocol import ServerProtocol, SessionInfo
from .proxy import ProxyProtocolFactory
from .tls import CurrentCertificate, certificateHostname, checkCertificateNames, serverTLSOptions

log = Logger(namespace="infsmtp.server")

#: An endpoint string with this prefix reads a PROXY protocol header first.
HAPROXY_PREFIX = "haproxy:"

HANDLER_NAMES = (
    "onConnect",
    "onLogin",
    "onMailFrom",
    "onRcptTo",
    "onReceive",
    "onDisconnect",
    "onEhlo",
    "onVrfy",
)


def listenEndpoint(reactor: Any, description: str, backlog: int = 1024) -> IStreamServerEndpoint:
    """
    C{serverFromString}, with a listen backlog of C{backlog} for TCP unless
    the description sets one: Twisted's default of 50 drops SYNs as soon as
    a few hundred clients connect at once (a 500-session burst ran at
    64 messages/s instead of ~4,400).
    """
    kind = description.split(":", 1)[0].lower()
    if kind in ("tcp", "tcp6") and "backlog=" not in description:
        description = f"{description}:backlog={backlog}"
    return serverFromString(reactor, description)


@dataclass
class ServerSettings:
    """
    The limits and switches a session reads; fixed when listening starts.
    """

    hostname: str
    maxMessageSize: int
    maxRecipients: int
    maxLineLength: int
    maxDataLineLength: int | None
    maxErrors: int
    maxAuthFailures: int
    idleTimeout: float | None
    allowInsecureAuth: bool
    requireAuth: bool
    receivedHeader: bool
    spoolThreshold: int | None
    minDataRate: int
    handlerTimeout: float
    receiveTimeout: float
    dsn: bool = True
    chunking: bool = True
    lmtp: bool = False
    #: MAIL, AUTH and VRFY before STARTTLS are answered 530 (issue 14).
    requireStartTls: bool = False
    #: The greeting's text: the host name and the banner.
    greeting: str = ""
    #: Seconds the greeting waits (pregreet detection); 0: none.
    greetDelay: float = 0.0


class ServerFactory(smtp.SMTPFactory):
    """
    Builds L{ServerProtocol}s for a L{Server} and keeps the books: live
    sessions, the connection limit, session ids.
    """

    protocol = ServerProtocol  # type: ignore[assignment]
    noisy = False

    def __init__(
        self,
        server: "Server",
        settings: ServerSettings,
        tlsOptions: Any,
        clock: IReactorTime,
        implicitTLS: CurrentCertificate | None = None,
    ) -> None:
        super().__init__()
        self.server = server
        self.settings = settings
        #: What STARTTLS starts TLS with (L{None}: STARTTLS is not offered).
        self.tlsOptions = tlsOptions
        #: What every session starts TLS with before its greeting (implicit
        #: TLS), or L{None}.
        self.implicitTLS = implicitTLS
        self.clock = clock
        self.domain = settings.hostname
        self.sessions: set[ServerProtocol] = set()
        self.limits = server._clientLimits(clock)
        self.memoryBudget = MemoryBudget(server.messageMemoryLimit)
        #: Seconds of deadline a byte of DATA buys (the minimum data rate).
        self.secondsPerDataByte = 1 / settings.minDataRate if settings.minDataRate else float("inf")
        self.queuePrefix = os.urandom(3).hex().upper()
        #: EHLO's extension lines, formatted, by (secure, AUTH offered).
        self.extensionReplies: dict[tuple[bool, bool], bytes] = {}
        #: The session log (and the metrics' feed).
        self.events = SessionEvents(
            sessionLog=server.sessionLog,
            debug=server.debug,
            metrics=server.metrics,
            worker=server.worker[0] if server.worker else None,
        )
        self._toFlush: list[ServerProtocol] = []
        self._flushCall: Any = None
        self._allGone: list[defer.Deferred] = []

    def flushSoon(self, protocol: ServerProtocol) -> None:
        """
        Send C{protocol}'s replies at the end of this reactor iteration,
        with every other session's that answered in it.

        Write-through would send each reply the moment it is ready; a client
        then typically has to be woken for every one.  Sending them together
        after all the input that arrived at once was handled lets a client
        (or a load generator with many sessions) wake once for all of them,
        which made each send several microseconds cheaper under load.  An
        idle server adds no delay worth counting: the batch is one session.
        """
        self._toFlush.append(protocol)
        if self._flushCall is None:
            self._flushCall = self.clock.callLater(0, self._flushAll)

    def _flushAll(self) -> None:
        self._flushCall = None
        pending, self._toFlush = self._toFlush, []
        for protocol in pending:
            try:
                protocol.flushNow()
            except Exception:
                # One session's failure must not keep the others' replies.
                log.failure("sending replies for session {session!r}", session=getattr(protocol, "session", None))

    def buildProtocol(self, addr: Any) -> ServerProtocol:
        # self.protocol, as Twisted factories do: the testing kit's server
        # builds a subclass that can cut a connection on purpose.
        return self.protocol(self)

    @property
    def handlers(self) -> dict[str, Callable[[Any], Any] | None]:
        """
        The server's handlers by name (the live mapping: a handler set while
        serving applies to the next decision).
        """
        return self.server._handlers

    def nextSessionId(self) -> int:
        return next(self.server._sessionIds)

    def admit(self, protocol: ServerProtocol, ip: str | None) -> str | None:
        """
        Count a new connection from C{ip} in (L{None}: not an IP client, a
        UNIX socket's, which the per-client limits do not apply to).

        @return: L{None} when admitted (L{release} must follow), else why
            not, for the 421 reply.
        """
        if ip is not None:
            refusal = self.limits.connect(ip)
            if refusal is not None:
                return refusal
        if len(self.sessions) >= self.server.maxConnections:
            if ip is not None:
                self.limits.disconnect(ip)
            return "Too many connections, try again later"
        self.sessions.add(protocol)
        protocol.admittedFrom = ip
        return None

    def release(self, protocol: ServerProtocol) -> None:
        if protocol in self.sessions:
            self.sessions.remove(protocol)
            if protocol.admittedFrom is not None:
                self.limits.disconnect(protocol.admittedFrom)
        if not self.sessions:
            waiting, self._allGone = self._allGone, []
            for d in waiting:
                d.callback(None)

    def whenAllGone(self) -> defer.Deferred:
        if not self.sessions:
            return defer.succeed(None)
        d: defer.Deferred = defer.Deferred()
        self._allGone.append(d)
        return d


#: What a hostname in replies may be: printable, no spaces.
_HOSTNAME = re.compile(r"[\x21-\x7e]{1,255}")
#: What the greeting's text after the host name may be: printable ASCII
#: (RFC 5321's textstring, without HTAB), one line, short enough that the
#: greeting stays within the 512 octets of a reply line.
_BANNER = re.compile(r"[\x20-\x7e]{0,200}")


def _checkCount(name: str, value: Any, least: int, most: int | None, alternative: str = "") -> None:
    if type(value) is not int or value < least or (most is not None and value > most):
        wanted = f"an integer from {least} to {most}" if most is not None else f"an integer of at least {least}"
        raise ValueError(f"{name} must be {wanted}{' ' + alternative if alternative else ''}, not {value!r}")


def _checkSeconds(name: str, value: Any, positive: bool) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or value != value  # NaN
        or value == float("inf")
        or value < 0
        or (positive and value == 0)
    ):
        wanted = "a positive number of seconds" if positive else "a number of seconds, 0 or more"
        raise ValueError(f"{name} must be {wanted}, not {value!r}")


class _ProtocolSpelling:
    """
    C{Server.protocol.tls1_2} (the reference's spelling) gives the
    L{TLSVersion} enumeration on the class; an instance gives its
    C{minProtocol}.
    """

    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        if instance is None:
            return TLSVersion
        return instance.minProtocol


class _HandlerSlot:
    """
    A handler attribute: set it to L{None}, a callable, a script path or
    C{'package.module:function'}; strings are resolved (and checked) at
    once, so a typo fails where it is made.
    """

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        if instance is None:
            return self
        return instance._handlerSpecs[self.name]

    def __set__(self, instance: Any, value: HandlerSpec) -> None:
        instance._handlers[self.name] = adaptHandler(value, instance._threadPool)
        instance._handlerSpecs[self.name] = value


class Server(SigtermStops, service.Service):
    """
    An ESMTP server whose policy lives in handlers.

        >>> server = Server(port=2525)
        >>> def onRcptTo(session):
        ...     return session.address.endswith("@example.org")
        >>> server.onRcptTo = onRcptTo
        >>> server.onReceive = lambda session: print(session.message["Subject"])
        >>> server.start()

    The positional parameters are the reference's, in its order; the rest
    are keyword-only.

    @param ssl: accept TLS (needs L{setCertificate}): implicit TLS when
        C{implicitTls} is true or, when it is L{None}, when C{port == 465};
        otherwise STARTTLS is offered.
    @param verifyCertificate: the default of L{setCertificate}'s C{verify}.
    @param port: the TCP port; C{0} picks a free one (see C{server.port}
        once listening).
    @param maxConnections: simultaneous sessions; more are answered 421
        4.7.0.
    @param poolSize: threads running script handlers.
    @param minProtocol: the lowest TLS version accepted.
    @param maxProtocol: the highest TLS version accepted.
    @param interface: the address to listen on (C{''}: all IPv4; C{'::'}:
        IPv6).
    @param hostname: the name in the greeting, EHLO and C{Received:}
        (default: this machine's FQDN).
    @param endpoint: a Twisted server endpoint string (C{'tcp:2525'},
        C{'unix:/run/smtp.sock'}, ...) or an L{IStreamServerEndpoint}, used
        instead of C{port}/C{interface}.  C{'haproxy:tcp:2525'} reads a
        PROXY protocol header (v1 or v2) first: no greeting before it, and
        C{session.ip} is the client's address from it.
    @param proxyTimeout: seconds a C{haproxy:} listener waits for the
        header before closing.
    @param maxMessageSize: bytes (advertised in SIZE; 0: no limit).
    @param maxRecipients: per message; more are answered 452.
    @param maxLineLength: bytes per command line (CRLF included).
    @param maxDataLineLength: bytes per message line (CRLF included), or
        L{None} for no limit.
    @param maxErrors: client errors per session before 421 and close.
    @param maxAuthFailures: failed logins per session before 421 and close.
    @param timeout: seconds a client has to complete each command line
        (however its bytes trickle in) before 421 4.4.2 and close (RFC 5321
        4.5.3.2); a session waiting for its next command is closed after as
        long.
    @param minDataRate: bytes per second a message must come in at, on
        average, in DATA (Postfix's C{smtpd_min_data_rate}): each byte
        extends the deadline by C{1/minDataRate} seconds, never beyond
        C{timeout} from now.  0: any byte counts as progress.
    @param maxConnectionsPerClient: simultaneous sessions from one client
        (an IPv4 address, or an IPv6 /64); more are answered 421 4.7.0.
        0: no limit.
    @param maxConnectionRate: connections one client may open per minute
        (refused ones count too); more are answered 421 4.7.0.  0: no
        limit.
    @param maxAuthFailuresPerClient: failed logins from one client, across
        its connections, within about ten minutes, after which its AUTH is
        answered 421 4.7.0.  0: no limit.
    @param authFailureDelay: seconds the 535 of a client's first failed
        login waits, doubling with each further failure (up to 30 s); 0:
        no wait.
    @param trustedNetworks: CIDR strings (C{"10.0.0.0/8"}) whose clients
        the per-client limits do not apply to.  Loopback is not trusted
        unless listed.
    @param handlerTimeout: seconds a handler (but C{onReceive}) may take to
        answer; then the client gets the handler's 4xx and the late answer
        is ignored.
    @param receiveTimeout: the same for C{onReceive}.
    @param messageMemoryLimit: bytes of messages all sessions together may
        hold in memory (being received, or waiting for C{onReceive});
        beyond it messages spool to temporary files.  L{None}: no limit.
    @param allowInsecureAuth: offer AUTH without TLS (tests, or a trusted
        local socket only).
    @param requireAuth: refuse MAIL (530) until AUTH succeeded.
    @param receivedHeader: put a C{Received:} trace header before
        C{session.msg}.
    @param spoolThreshold: messages over this many bytes wait for
        C{onReceive} in a temporary file instead of memory (read
        C{session.msgFile} to keep it that way); L{None}: always in memory.
    @param backlog: the listen queue length.
    @param shutdownGrace: seconds a stopping service lets transactions in
        flight finish (see L{stopListening}).
    @param sessionLog: log every session's connect, TLS, accepted messages,
        AUTH and disconnect (with its counters), besides the refusals (every
        4xx/5xx reply, AUTH failures), which are always logged; see
        L{infsmtp._events} for the events and their fields.
    @param debug: log the transcript of every session, both directions
        (AUTH secrets replaced by C{***}), at the debug level.
    @param dsn: offer DSN (RFC 3461): C{RET} and C{ENVID} on MAIL,
        C{NOTIFY} and C{ORCPT} on RCPT are accepted, checked and handed to
        the handlers (C{session.mailParameters},
        C{session.rcptParameters}); without it they are answered 555.
    @param chunking: offer CHUNKING (RFC 3030): a message may come in BDAT
        chunks, counted rather than ended by a dot.
    @param lmtp: speak LMTP (RFC 2033) instead of SMTP: LHLO instead of
        EHLO/HELO, and after the message one reply per accepted recipient,
        which C{onReceive} may decide one by one (C{session.rcptResults}).
    @param reactor: the reactor (tests may pass another clock-bearing one).
    @param requireStartTls: answer MAIL, AUTH and VRFY before STARTTLS
        C{530 5.7.0 Must issue a STARTTLS command first} (Postfix's
        C{smtpd_tls_security_level = encrypt}; the usual setting for port
        587); AUTH is then never offered before TLS.  Needs C{ssl=True}.
        Implicit TLS sessions are secure from the start.
    @param banner: the greeting's text after the host name (C{220
        mx.example.org ESMTP infsmtp}): one line of printable ASCII, at
        most 200 characters; C{""} sends the host name alone.
    @param greetDelay: seconds the greeting waits, for pregreet detection
        (Postfix postscreen's C{postscreen_greet_wait}): a client that talks
        before the 220 is answered C{554 5.5.1} and disconnected, and the
        log says C{reason=pregreet}.  C{onConnect} runs after the delay,
        and only for clients that waited.  0 (the default): greet at once.
        Must be shorter than C{timeout}.

    @ivar metrics: the server's L{ServerMetrics} once L{enableMetrics} was
        called, else L{None}.
    @ivar worker: C{(index, count)} in a C{--workers} worker: session ids
        are then unique across the workers (worker I{i} of I{n} numbers its
        sessions I{i}+1, I{i}+1+I{n}, ...) and log lines carry the index.
    """

    protocol = _ProtocolSpelling()

    #: Whether SIGTERM stops gracefully with exit status 0 and SIGHUP
    #: reloads the certificate, as in C{twistd infsmtp}; L{None}: when the
    #: process is twistd (a .tac).
    handleSigterm: bool | None = None  # type: ignore[assignment]

    onConnect = _HandlerSlot()
    onLogin = _HandlerSlot()
    onMailFrom = _HandlerSlot()
    onRcptTo = _HandlerSlot()
    onReceive = _HandlerSlot()
    onDisconnect = _HandlerSlot()
    onEhlo = _HandlerSlot()
    onVrfy = _HandlerSlot()

    def __init__(
        self,
        ssl: bool = False,
        verifyCertificate: bool = False,
        port: int = 25,
        maxConnections: int = 1000,
        poolSize: int = 10,
        minProtocol: TLSVersion = TLSVersion.tls1_2,
        maxProtocol: TLSVersion = TLSVersion.tls1_3,
        *,
        interface: str = "",
        implicitTls: bool | None = None,
        hostname: str | None = None,
        endpoint: str | IStreamServerEndpoint | None = None,
        maxMessageSize: int = 32 * 1024 * 1024,
        maxRecipients: int = 1000,
        maxLineLength: int = 2048,
        maxDataLineLength: int | None = 2048,
        maxErrors: int = 20,
        maxAuthFailures: int = 3,
        timeout: float = 300,
        allowInsecureAuth: bool = False,
        requireAuth: bool = False,
        receivedHeader: bool = True,
        spoolThreshold: int | None = 8 * 1024 * 1024,
        backlog: int = 1024,
        shutdownGrace: float = 10,
        minDataRate: int = 500,
        maxConnectionsPerClient: int = 50,
        maxConnectionRate: int = 600,
        maxAuthFailuresPerClient: int = 30,
        authFailureDelay: float = 1.0,
        trustedNetworks: Any = (),
        handlerTimeout: float = 60,
        receiveTimeout: float = 300,
        messageMemoryLimit: int | None = 256 * 1024 * 1024,
        proxyTimeout: float = 5,
        sessionLog: bool = False,
        debug: bool = False,
        dsn: bool = True,
        chunking: bool = True,
        lmtp: bool = False,
        reactor: Any = None,
        requireStartTls: bool = False,
        banner: str = "ESMTP infsmtp",
        greetDelay: float = 0.0,
    ) -> None:
        self.ssl = ssl
        self.verifyCertificate = verifyCertificate
        self.port = port
        self.maxConnections = maxConnections
        self.poolSize = poolSize
        self.minProtocol = TLSVersion(minProtocol)
        self.maxProtocol = TLSVersion(maxProtocol)
        self.interface = interface
        self.implicitTls = implicitTls
        self.hostname = hostname or socket.getfqdn()
        self.endpoint = endpoint
        self.maxMessageSize = maxMessageSize
        self.maxRecipients = maxRecipients
        self.maxLineLength = maxLineLength
        self.maxDataLineLength = maxDataLineLength
        self.maxErrors = maxErrors
        self.maxAuthFailures = maxAuthFailures
        self.timeout = timeout
        self.allowInsecureAuth = allowInsecureAuth
        self.requireAuth = requireAuth
        self.receivedHeader = receivedHeader
        self.spoolThreshold = spoolThreshold
        self.backlog = backlog
        self.shutdownGrace = shutdownGrace
        self.minDataRate = minDataRate
        self.maxConnectionsPerClient = maxConnectionsPerClient
        self.maxConnectionRate = maxConnectionRate
        self.maxAuthFailuresPerClient = maxAuthFailuresPerClient
        self.authFailureDelay = authFailureDelay
        self.trustedNetworks = trustedNetworks
        self.handlerTimeout = handlerTimeout
        self.receiveTimeout = receiveTimeout
        self.messageMemoryLimit = messageMemoryLimit
        self.proxyTimeout = proxyTimeout
        self.sessionLog = sessionLog
        self.debug = debug
        self.dsn = dsn
        self.chunking = chunking
        self.lmtp = lmtp
        self.requireStartTls = requireStartTls
        self.banner = banner
        self.greetDelay = greetDelay
        self.metrics: Any = None
        self.worker: tuple[int, int] | None = None
        #: Callables returning a problem (a short sentence) or L{None}, asked
        #: by L{health}: a delivery adds its own (the Maildir is writable).
        self.healthChecks: list[Callable[[], str | None]] = []
        self._stopping = False
        self.checkSettings()
        if reactor is None:
            from twisted.internet import reactor
        self._reactor = reactor
        self._certificate: tuple[str, str, str | None, bool] | None = None
        # Host name -> the files of its certificate (SNI).
        self._namedCertificates: dict[str, tuple[str, str, str | None, bool]] = {}
        self._tlsOptions: Any = None
        # What every new TLS connection gets: the options set last.
        self._sessionTLS = CurrentCertificate()
        self._pool: ThreadPool | None = None
        self._handlers: dict[str, Callable[[Any], Any] | None] = dict.fromkeys(HANDLER_NAMES)
        self._handlerSpecs: dict[str, HandlerSpec] = dict.fromkeys(HANDLER_NAMES)
        self._sessionIds = itertools.count(1)
        self._listening: IListeningPort | None = None
        self._factory: ServerFactory | None = None

    # Configuration ----------------------------------------------------------

    def setCertificate(
        self,
        certFile: str,
        keyFile: str,
        rootCertFile: str | None = None,
        verify: bool | None = None,
        *,
        hostname: str | None = None,
    ) -> None:
        """
        Load the TLS certificate (PEM, the chain may follow the leaf) and key.

        With C{hostname} (C{"mail.example.org"}, or C{"*.example.org"} for
        any one label under it), the certificate is served to clients that
        ask for that name by SNI (RFC 6066); the one set without a hostname
        is the default, for every other client, and must be set too.

        On a running server the new certificate takes effect for new
        connections at once (a renewal needs no restart); connections
        already in TLS keep theirs.  When loading fails, nothing changes.

        @param rootCertFile: extra chain certificates, and the trust root
            when verifying.
        @param verify: check at once that the chain is valid (default: the
            constructor's C{verifyCertificate}).  The key is always checked
            against the certificate.
        @raise SMTPTLSError: with a sentence saying what is wrong; also when
            C{hostname} is no host name, or the certificate is not valid for
            it (clients asking for it would refuse it).
        """
        if verify is None:
            verify = self.verifyCertificate
        if hostname is not None:
            name = certificateHostname(hostname)
            checkCertificateNames(certFile, name)
            options = serverTLSOptions(certFile, keyFile, rootCertFile, verify, self.minProtocol, self.maxProtocol)
            self._namedCertificates[name] = (certFile, keyFile, rootCertFile, verify)
            sessions = self._sessionTLS
            if self._factory is not None:
                sessions.setNamed(name, options)
            return
        self._tlsOptions = serverTLSOptions(
            certFile, keyFile, rootCertFile, verify, self.minProtocol, self.maxProtocol
        )
        self._certificate = (certFile, keyFile, rootCertFile, verify)
        if self._factory is not None:
            self._sessionTLS.options = self._tlsOptions

    @property
    def implicit(self) -> bool:
        """
        Whether TLS starts with the first byte (rather than STARTTLS).
        """
        if not self.ssl:
            return False
        if self.implicitTls is None:
            return self.port == 465
        return bool(self.implicitTls)

    def setWorker(self, index: int, count: int) -> None:
        """
        This server is worker C{index} (from 0) of C{count}: its session ids
        are its own among all the workers', and its log lines say which
        worker wrote them.
        """
        if not 0 <= index < count:
            raise ValueError(f"worker {index} of {count}: the index must be from 0 to {count - 1}")
        self.worker = (index, count)
        self._sessionIds = itertools.count(index + 1, count)

    def enableMetrics(self) -> Any:
        """
        Count what the server does, in a Prometheus registry of its own
        (C{server.metrics.registry}); needs C{prometheus_client}
        (C{pip install infsmtp[metrics]}).  Call before the server starts.

        @return: the L{infsmtp._server.metrics.ServerMetrics}.
        @raise ImportError: C{prometheus_client} is not installed, with a
            sentence saying so.
        """
        if self.metrics is None:
            from .metrics import ServerMetrics

            self.metrics = ServerMetrics(self)
        return self.metrics

    @property
    def sessions(self) -> tuple[SessionInfo, ...]:
        """
        The live sessions, read-only (for a manhole or an admin page): each
        a L{SessionInfo} with C{id}, C{peer}, C{state}, C{age} (seconds) and
        C{bytes} (read from the client).
        """
        factory = self._factory
        if factory is None:
            return ()
        return tuple(
            sorted((p.describe() for p in factory.sessions if getattr(p, "_started", False)), key=lambda s: s.id)
        )

    def health(self) -> list[str]:
        """
        What is wrong, in short sentences; empty when healthy: listening,
        not shutting down, and every check of L{healthChecks} (the delivery
        target writable) passing.
        """
        problems = []
        if self._stopping:
            problems.append("shutting down")
        elif self._factory is None:
            problems.append("not listening")
        for check in self.healthChecks:
            try:
                problem = check()
            except Exception as e:  # noqa: BLE001 (a failing check is a problem, said in one line)
                problem = f"{getattr(check, '__qualname__', check)!s} failed: {e}"
            if problem:
                problems.append(problem)
        return problems

    def _threadPool(self) -> ThreadPool:
        if self._pool is None:
            pool = ThreadPool(minthreads=0, maxthreads=self.poolSize, name="infsmtp-handlers")
            pool.start()
            self._reactor.addSystemEventTrigger("during", "shutdown", pool.stop)
            self._pool = pool
        return self._pool

    def checkSettings(self) -> None:
        """
        Check every setting, so that a server that could never work (or
        would work wrongly: a data line limit too short to see the end of
        data, a negative timeout) refuses to start instead.  Called by the
        constructor and again when listening starts.

        @raise ValueError: naming the first wrong setting and what it must
            be.
        """
        counts = {
            # name: (least value, most value or None)
            "port": (0, 65535),
            "maxConnections": (1, None),
            "poolSize": (1, None),
            "maxMessageSize": (0, None),
            "maxRecipients": (1, None),
            # RFC 5321 4.5.3.1.4 and .6: a server must take command lines of
            # 512 octets and text lines of 1000.
            "maxLineLength": (512, None),
            "maxErrors": (1, None),
            "maxAuthFailures": (1, None),
            "backlog": (1, None),
            "minDataRate": (0, None),
            "maxConnectionsPerClient": (0, None),
            "maxConnectionRate": (0, None),
            "maxAuthFailuresPerClient": (0, None),
        }
        for name, (least, most) in counts.items():
            _checkCount(name, getattr(self, name), least, most)
        if self.maxDataLineLength is not None:
            _checkCount("maxDataLineLength", self.maxDataLineLength, 1000, None, "or None")
        for name in ("spoolThreshold", "messageMemoryLimit"):
            if getattr(self, name) is not None:
                _checkCount(name, getattr(self, name), 0, None, "or None")
        for name in ("timeout", "handlerTimeout", "receiveTimeout", "proxyTimeout"):
            _checkSeconds(name, getattr(self, name), positive=True)
        for name in ("shutdownGrace", "authFailureDelay"):
            _checkSeconds(name, getattr(self, name), positive=False)
        if self.minProtocol > self.maxProtocol:
            raise ValueError(
                f"minProtocol {self.minProtocol.name} is above maxProtocol {self.maxProtocol.name}"
            )
        if not isinstance(self.hostname, str) or not _HOSTNAME.fullmatch(self.hostname):
            raise ValueError(f"hostname must be a name without spaces or control characters, not {self.hostname!r}")
        if not isinstance(self.banner, str) or not _BANNER.fullmatch(self.banner):
            raise ValueError(
                f"banner must be one line of printable ASCII (no control characters), at most 200, not {self.banner!r}"
            )
        if self.requireStartTls and not self.ssl:
            # Every MAIL would be refused, forever.
            raise ValueError("requireStartTls needs ssl=True and a certificate: without TLS no client could send mail")
        _checkSeconds("greetDelay", self.greetDelay, positive=False)
        if self.greetDelay >= self.timeout:
            raise ValueError(f"greetDelay must be shorter than timeout ({self.timeout:g} s), not {self.greetDelay!r}")
        self._trusted = parseNetworks(self.trustedNetworks)

    def _clientLimits(self, clock: IReactorTime) -> ClientLimits:
        return ClientLimits(
            self.maxConnectionsPerClient,
            self.maxConnectionRate,
            self.maxAuthFailuresPerClient,
            self.authFailureDelay,
            self._trusted,
            clock,
        )

    def _settings(self) -> ServerSettings:
        self.checkSettings()
        return ServerSettings(
            hostname=self.hostname,
            maxMessageSize=self.maxMessageSize,
            maxRecipients=self.maxRecipients,
            maxLineLength=self.maxLineLength,
            maxDataLineLength=self.maxDataLineLength,
            maxErrors=self.maxErrors,
            maxAuthFailures=self.maxAuthFailures,
            idleTimeout=self.timeout,
            # requireStartTls: no AUTH before STARTTLS, whatever else says.
            allowInsecureAuth=self.allowInsecureAuth and not self.requireStartTls,
            requireAuth=self.requireAuth,
            receivedHeader=self.receivedHeader,
            spoolThreshold=self.spoolThreshold,
            minDataRate=self.minDataRate,
            handlerTimeout=self.handlerTimeout,
            receiveTimeout=self.receiveTimeout,
            dsn=self.dsn,
            chunking=self.chunking,
            lmtp=self.lmtp,
            requireStartTls=bool(self.requireStartTls),
            greeting=f"{self.hostname} {self.banner}" if self.banner else self.hostname,
            greetDelay=float(self.greetDelay),
        )

    def _tlsForSessions(self) -> Any:
        if not self.ssl:
            return None
        if self._tlsOptions is None:
            raise SMTPTLSError(
                "ssl=True needs setCertificate() before the server starts"
                + (" (without hostname: the certificate for clients that ask for no other name)"
                   if self._namedCertificates else "")
            )
        if self._certificate is not None:
            # min/maxProtocol may have changed since setCertificate().
            certFile, keyFile, root, verify = self._certificate
            self._tlsOptions = serverTLSOptions(
                certFile, keyFile, root, verify, self.minProtocol, self.maxProtocol
            )
        for name, (certFile, keyFile, root, verify) in self._namedCertificates.items():
            self._sessionTLS.setNamed(
                name, serverTLSOptions(certFile, keyFile, root, verify, self.minProtocol, self.maxProtocol)
            )
        return self._tlsOptions

    def _endpoint(self) -> IStreamServerEndpoint:
        if self.endpoint is not None:
            if isinstance(self.endpoint, str):
                description = self.endpoint
                if description.startswith(HAPROXY_PREFIX):
                    # Twisted's own haproxy: endpoint greets before the header
                    # is in; ours (in startListening) waits for it.
                    description = description[len(HAPROXY_PREFIX) :]
                return listenEndpoint(self._reactor, description, self.backlog)
            return self.endpoint
        if ":" in self.interface:
            return TCP6ServerEndpoint(self._reactor, self.port, self.backlog, self.interface)
        return TCP4ServerEndpoint(self._reactor, self.port, self.backlog, self.interface)

    def buildFactory(self) -> Any:
        """
        The protocol factory for one listening endpoint (wrapped for
        implicit TLS when so configured).  Used by L{startListening}; the
        twistd plugin uses it to listen on several endpoints.
        """
        if self._factory is None:
            # Once per listening run: the certificate files are read and
            # checked once, however many endpoints share the sessions.
            tls = self._tlsForSessions()
            self._sessionTLS.options = tls
            self._factory = ServerFactory(
                self,
                self._settings(),
                None if self.implicit or tls is None else self._sessionTLS,
                self._reactor,
                implicitTLS=self._sessionTLS if self.implicit else None,
            )
        return self._factory

    # Lifecycle --------------------------------------------------------------

    def startListening(self) -> defer.Deferred:
        """
        Start listening.

        @return: a Deferred firing with the bound port number (also in
            C{self.port}), or failing with L{SMTPError} (e.g. the port is in
            use).
        """
        if self._listening is not None:
            return defer.succeed(self.port)
        try:
            factory = self.buildFactory()
            endpoint = self._endpoint()
        except Exception:
            return defer.fail()
        if isinstance(self.endpoint, str) and self.endpoint.startswith(HAPROXY_PREFIX):
            factory = ProxyProtocolFactory(factory, self.proxyTimeout, self._reactor)

        def listening(port: IListeningPort) -> int:
            self._listening = port
            address = port.getHost()
            self.port = getattr(address, "port", self.port)
            log.info(
                "infsmtp listening on {address} ({tls})",
                address=address,
                tls="implicit TLS" if self.implicit else ("STARTTLS" if self.ssl else "plaintext"),
            )
            return self.port

        def failed(failure: Any) -> Any:
            self._factory = None
            if failure.check(SMTPError):
                return failure
            raise SMTPError(f"cannot listen: {failure.getErrorMessage()}")

        return endpoint.listen(factory).addCallbacks(listening, failed)

    def stopListening(self, grace: float = 0) -> defer.Deferred:
        """
        Stop listening and end the sessions.

        @param grace: seconds to let transactions in flight finish: idle
            sessions are answered 421 4.3.2 at once, busy ones after their
            message; whatever is left when the grace runs out is cut off
            (nothing it sent got a 250).
        @return: a Deferred firing once every session has ended.
        """
        port, self._listening = self._listening, None
        stopped = defer.maybeDeferred(port.stopListening) if port is not None else defer.succeed(None)
        factory = self._factory
        self._factory = None
        if factory is None:
            return stopped
        # Until every session has ended, /healthz says "shutting down".
        self._stopping = True
        for protocol in list(factory.sessions):
            protocol.shutdown()
            if grace <= 0 and protocol.transport is not None:
                protocol.transport.abortConnection()
        allGone = factory.whenAllGone()
        if grace > 0 and factory.sessions:
            timer = self._reactor.callLater(grace, self._abortAll, factory)
            allGone.addBoth(lambda r: (timer.active() and timer.cancel(), r)[1])
        done = defer.gatherResults([stopped, allGone]).addCallback(lambda _: None)
        return done.addBoth(lambda result: (setattr(self, "_stopping", False), result)[1])

    def _abortAll(self, factory: ServerFactory) -> None:
        for protocol in list(factory.sessions):
            if protocol.transport is not None:
                protocol.transport.abortConnection()

    @property
    def sessionCount(self) -> int:
        """
        The number of live sessions.
        """
        return len(self._factory.sessions) if self._factory is not None else 0

    def start(self, timeout: float = 30) -> None:
        """
        Start listening and wait until the server listens.  Runs the reactor
        in a background thread (through crochet) when none runs; from the
        reactor thread itself use L{startListening}.
        """
        blockingCall("Server.start()", "Server.startListening()", self.startListening, timeout=timeout)

    def stop(self, timeout: float = 30, grace: float = 0) -> None:
        """
        Stop listening, end the sessions (see L{stopListening} for
        C{grace}), and wait until that is done.
        """
        blockingCall(
            "Server.stop()", "Server.stopListening()", self.stopListening, grace, timeout=timeout
        )

    # IService -------------------------------------------------------------

    @property
    def grace(self) -> float:
        return self.shutdownGrace

    def reload(self) -> None:
        """
        Load the certificate files again (SIGHUP, after a renewal): a pair
        that does not load keeps the one in use, and the log says why.
        """
        if self._certificate is None:
            log.info("SIGHUP: no certificate to reload")
            return
        certificates = [(None, self._certificate), *self._namedCertificates.items()]
        for hostname, (certFile, keyFile, root, verify) in certificates:
            try:
                self.setCertificate(certFile, keyFile, root, verify, hostname=hostname)
            except SMTPError as e:
                log.error("SIGHUP: kept the certificate in use: {error}", error=str(e))
                continue
            log.info("SIGHUP: reloaded certificate {cert}", cert=certFile)

    def privilegedStartService(self) -> None:
        """
        Bind now, before twistd sheds its privileges (C{--uid}), so that a
        .tac can listen on port 25; see L{startService}.
        """
        super().privilegedStartService()
        self._listenNow()

    def startService(self) -> None:
        """
        Start listening, unless L{privilegedStartService} already did; a
        failure to listen is raised at once when the endpoint reports it
        synchronously (TCP does), so that twistd reports a port in use
        instead of running without it.
        """
        super().startService()
        if self._listening is None:
            self._listenNow()
        if self.handleSigterm or (self.handleSigterm is None and runningUnderTwistd()):
            self._reactor.callWhenRunning(self._installSigterm)

    def _listenNow(self) -> None:
        outcome: list[Any] = []
        self.startListening().addBoth(outcome.append)
        if outcome and isinstance(outcome[0], Failure):
            outcome[0].raiseException()

    def stopService(self) -> defer.Deferred:
        super().stopService()
        return self.stopListening(self.shutdownGrace)

"""
C{twistd infsmtp}: the server as users run it.

    twistd -n infsmtp                       # tcp:2525 on 127.0.0.1, ./Maildir
    twistd -n infsmtp --listen tcp:25 --listen haproxy:tcp:10025 \\
        --cert cert.pem --key key.pem --auth file:users.txt --maildir /var/mail/in

L{Options} is the command line, L{buildService} turns it into an
L{SMTPService} (a L{Server} listening on every C{--listen} endpoint), and
L{serviceMaker} is what the plugin in C{twisted/plugins/} points at.

Wrong configuration is reported in one line on standard error with exit
status 1, never with a traceback: L{buildService} raises
L{ConfigurationError} and L{makeService} (twistd's entry point) turns it
into that line, as L{SMTPService} does for an endpoint that cannot listen.
"""

from __future__ import annotations

import importlib
import os
import signal
import socket
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar

from twisted.application import service
from twisted.cred import error as credError
from twisted.cred import strcred
from twisted.cred.credentials import IUsernamePassword, UsernamePassword
from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.logger import ILogObserver, Logger
from twisted.python import usage
from twisted.python.failure import Failure

from .._enums import EncryptMode, TLSVersion
from .._errors import SMTPError
from .._server.proxy import ProxyProtocolFactory
from .._server.server import HANDLER_NAMES, HAPROXY_PREFIX, Server, listenEndpoint
from .._signals import SigtermStops
from .maildir import MaildirDelivery
from .systemd import sdNotify
from .workers import WorkerPool, adoptedEndpoint, parseTCPListen, workerArguments

log = Logger(namespace="infsmtp.twistd")

DEFAULT_LISTEN = "tcp:2525:interface=127.0.0.1"
DEFAULT_MAILDIR = "Maildir"


class ConfigurationError(SMTPError):
    """
    A setting the server cannot run with; its text is the one line shown.
    """


def _size(text: str) -> int:
    """
    A byte count, optionally with a K, M or G suffix (powers of 1024).
    """
    text = text.strip().upper().removesuffix("B")
    factor = 1
    for suffix, multiple in (("K", 1024), ("M", 1024**2), ("G", 1024**3)):
        if text.endswith(suffix):
            text, factor = text[:-1], multiple
            break
    value = int(text) * factor
    if value < 0:
        raise ValueError("a size cannot be negative")
    return value


_size.coerceDoc = "Bytes, or with a K, M or G suffix; 0 means no limit."  # type: ignore[attr-defined]


class Options(usage.Options, strcred.AuthOptionMixin):
    """
    The command line of C{twistd infsmtp}.
    """

    synopsis = "[options]"
    longdesc = (
        "An ESMTP server that stores every accepted message in a Maildir "
        "(or forwards it with --relay).  Without options it listens on "
        f"{DEFAULT_LISTEN} and delivers into ./{DEFAULT_MAILDIR}."
    )
    supportedInterfaces = (IUsernamePassword,)

    optFlags: ClassVar[list[list[str | None]]] = [
        ["implicit-tls", None, "TLS from the first byte on every listener (port 465 style); needs --cert."],
        ["allow-insecure-auth", None, "Offer AUTH without TLS (trusted networks and tests only)."],
        ["require-auth", None, "Refuse MAIL (530) until the client has authenticated."],
        ["require-starttls", None, "Refuse MAIL, AUTH and VRFY before STARTTLS (530 5.7.0): the usual setting for port 587; needs --cert."],
        ["no-received-header", None, "Do not add a Received: trace header."],
        ["lmtp", None, "Speak LMTP (RFC 2033) instead of SMTP: LHLO, and one reply per recipient after the message."],
        ["no-dsn", None, "Do not offer DSN (RFC 3461): RET, ENVID, NOTIFY and ORCPT are then refused with 555."],
        ["no-chunking", None, "Do not offer CHUNKING (RFC 3030): BDAT is then refused with 502."],
        ["relay-no-verify", None, "Do not verify the smarthost's certificate (tests only)."],
        ["print", None, "Print each message (envelope, headers, readable body) to standard output instead of storing it: a development sink (with -n)."],
        ["debug", None, "Log the SMTP transcript of every session, both directions (AUTH secrets replaced by ***)."],
    ]

    optParameters: ClassVar[list[list[Any]]] = [
        ["hostname", None, None, "Name in the greeting, EHLO reply and Received: header [default: this host's FQDN]."],
        ["banner", None, "ESMTP infsmtp", "Text of the greeting after the host name (one line of printable ASCII)."],
        ["greet-delay", None, 0.0, "Seconds the greeting waits; a client that talks before it is answered 554 and disconnected (pregreet detection, like postscreen). 0: greet at once.", float],
        ["maildir", "m", None, f"Maildir folder messages are stored in, created if missing [default: ./{DEFAULT_MAILDIR}]."],
        ["handlers", None, None, "Python file or module whose onConnect/onEhlo/onLogin/onMailFrom/onRcptTo/onReceive/onVrfy/onDisconnect become the handlers."],
        ["cert", "c", None, "PEM certificate (the chain may follow) offered with STARTTLS, or used by --implicit-tls."],
        ["key", "k", None, "PEM private key of --cert (unencrypted)."],
        ["root", None, None, "PEM file of further chain certificates sent after --cert."],
        ["min-tls", None, "1.2", "Lowest TLS version accepted: 1.0, 1.1, 1.2 or 1.3."],
        ["max-tls", None, "1.3", "Highest TLS version accepted: 1.0, 1.1, 1.2 or 1.3."],
        ["max-connections", None, 1000, "Simultaneous sessions; more are answered 421.", int],
        ["max-connections-per-client", None, 50, "Simultaneous sessions from one client (IPv4 address or IPv6 /64); more are answered 421 4.7.0. 0: no limit.", int],
        ["max-connection-rate", None, 600, "Connections one client may open per minute; more are answered 421 4.7.0. 0: no limit.", int],
        ["max-auth-failures-per-client", None, 30, "Failed logins from one client within about 10 minutes before its AUTH is answered 421 4.7.0. 0: no limit.", int],
        ["auth-failure-delay", None, 1.0, "Seconds a failed login's 535 waits, doubling with each failure of the client (up to 30). 0: none.", float],
        ["min-data-rate", None, 500, "Bytes per second a message must average in DATA. 0: any byte is progress.", int],
        ["handler-timeout", None, 60.0, "Seconds a handler (but onReceive) may take before the client is answered 4xx.", float],
        ["receive-timeout", None, 300.0, "Seconds onReceive (the delivery) may take before the client is answered 451.", float],
        ["message-memory", None, 256 * 1024**2, "Bytes of messages all sessions may hold in memory; beyond, messages spool to disk.", _size],
        ["max-message-size", None, 32 * 1024**2, "Largest message accepted, advertised in SIZE.", _size],
        ["max-recipients", None, 1000, "Recipients per message; more are answered 452.", int],
        ["timeout", None, 300.0, "Idle seconds before a session is closed with 421.", float],
        ["pool-size", None, 10, "Threads running handler scripts.", int],
        ["grace", None, 10.0, "Seconds a stopping server lets transactions in flight finish.", float],
        ["proxy-timeout", None, 5.0, "Seconds a haproxy: listener waits for the PROXY header.", float],
        ["workers", None, 1, "Worker processes sharing the tcp: listeners (one per core); one that dies is restarted.", int],
        ["workers-sockets", None, "shared", "How --workers listen: shared (one socket, the first worker to wake accepts) or reuseport (a socket per worker on the same port, SO_REUSEPORT: the kernel spreads connections, only one worker wakes)."],
        ["relay", None, None, "Forward every message to the smarthost HOST:PORT instead of storing it."],
        ["deliver", None, None, "Deliver every message into a mail store over LMTP instead of storing it: lmtp:ENDPOINT, a Twisted client endpoint (lmtp:unix:/run/dovecot/lmtp, lmtp:tcp:127.0.0.1:24)."],
        ["relay-tls", None, "starttls", "TLS to the smarthost: none, starttls or implicit."],
        ["relay-ca", None, None, "PEM trust roots for the smarthost's certificate [default: the system's]."],
        ["relay-user", None, None, "User name to authenticate to the smarthost with."],
        ["relay-password-file", None, None, "File whose first line is the smarthost password."],
        ["relay-timeout", None, None, "Seconds to wait for the smarthost's reply to the end of a message; past it the client is answered 451 and retries, and may deliver twice if the smarthost took it [default: 600 (RFC 5321), or 90% of --receive-timeout when that is shorter].", float],
        ["relay-connections", None, 4, "Sessions open to the smarthost at most, each reused for message after message; more messages at once wait their turn.", int],
        ["log-format", None, "text", "The log's lines: text (Postfix-like session lines) or json (one object a line, for Loki or Elasticsearch)."],
        ["metrics", None, None, "Endpoint serving Prometheus metrics at /metrics and a health check at /healthz, e.g. tcp:9125:interface=127.0.0.1 (needs pip install 'infsmtp[metrics]')."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        self["trusted"] = []
        self["inherit-fd"] = []
        self["worker"] = None
        #: Configuration errors found while parsing, reported in one line by
        #: buildServer (twistd answers a usage error with its whole help).
        self.errors: list[str] = []
        for name, handler in self._dispatch.items():
            if isinstance(handler, usage.CoerceParameter) and name in self:
                handler.coerce = self._collectingErrors(name, handler.coerce)

    def _collectingErrors(self, name: str, coerce: Callable[[str], Any]) -> Callable[[str], Any]:
        def checked(value: str) -> Any:
            try:
                return coerce(value)
            except ValueError as e:
                self.errors.append(f"--{name} {value}: {e}")
                return self[name]

        return checked

    def opt_listen(self, endpoint: str) -> None:
        """Endpoint to listen on, repeatable: tcp:, unix:, systemd:, haproxy:tcp:... [default: tcp:2525:interface=127.0.0.1]."""
        self["listen"].append(endpoint)

    opt_l = opt_listen

    def opt_trusted(self, network: str) -> None:
        """Network (CIDR) whose clients the per-client limits do not apply to, repeatable: --trusted 127.0.0.0/8."""
        self["trusted"].append(network)

    def opt_version(self) -> None:
        """Print infsmtp's version (and Twisted's), then exit."""
        from twisted import version as twistedVersion

        from .. import __version__

        print(f"infsmtp {__version__} (Twisted {twistedVersion.short()})")
        raise SystemExit(0)

    def getUsage(self, width: int | None = None) -> str:
        # --inherit-fd and --worker are between the --workers parent and
        # its children.
        hidden = ("inherit-fd", "worker")
        saved = self.longOpt
        self.longOpt = [name for name in saved if name.rstrip("=") not in hidden]
        try:
            return super().getUsage(width)
        finally:
            self.longOpt = saved

    def opt_inherit_fd(self, fd: str) -> None:
        """Internal, set by --workers: listen on this inherited descriptor instead of --listen."""
        try:
            self["inherit-fd"].append(int(fd))
        except ValueError:
            raise usage.UsageError(f"--inherit-fd {fd}: not a descriptor number") from None

    def opt_worker(self, which: str) -> None:
        """Internal, set by --workers: this process is worker INDEX/COUNT."""
        index, _, count = which.partition("/")
        if not (index.isdigit() and count.isdigit() and int(index) < int(count)):
            raise usage.UsageError(f"--worker {which}: expected INDEX/COUNT")
        self["worker"] = (int(index), int(count))

    def opt_auth(self, description: str) -> None:  # type: ignore[override]
        """Check AUTH with a twisted.cred checker: file:PATH, memory:USER:PASSWORD, unix... (see --help-auth)."""
        # twistd answers a usage error with its whole help text; a wrong
        # --auth is a configuration error, reported in one line later.
        kind, _, argument = description.partition(":")
        if kind == "file" and not os.path.isfile(argument):
            # Twisted only warns, then refuses every login.
            self.errors.append(f"--auth {description}: {argument or 'the file name'} is not a readable file")
            return
        try:
            super().opt_auth(description)
        except usage.UsageError as e:
            self.errors.append(f"--auth {description}: {e}")

    def postOptions(self) -> None:
        if not self["listen"]:
            self["listen"] = [DEFAULT_LISTEN]


# AUTH through twisted.cred ------------------------------------------------


class CheckerLogin:
    """
    An C{onLogin} handler that asks C{twisted.cred} checkers (those
    providing L{IUsernamePassword}); the first that accepts wins.

        server.onLogin = CheckerLogin([FilePasswordDB("users.txt")])
    """

    def __init__(self, checkers: Iterable[Any]) -> None:
        self.checkers = list(checkers)

    @staticmethod
    def _credentials(username: str, password: str) -> list[UsernamePassword]:
        # Twisted's checkers disagree on the type: FilePasswordDB compares
        # bytes, the in-memory one (strcred's memory:) str.
        return [
            UsernamePassword(username.encode("utf-8"), password.encode("utf-8")),
            UsernamePassword(username, password),  # type: ignore[arg-type]
        ]

    @defer.inlineCallbacks
    def __call__(self, session: Any) -> Any:
        for checker in self.checkers:
            for credentials in self._credentials(session.username, session.password):
                try:
                    yield defer.maybeDeferred(checker.requestAvatarId, credentials)
                except (credError.UnauthorizedLogin, credError.UnhandledCredentials):
                    continue
                return True
        return False


# --handlers ---------------------------------------------------------------


def loadHandlers(spec: str) -> dict[str, Callable[..., Any]]:
    """
    The handler functions (C{onConnect} ... C{onDisconnect}) defined by a
    Python file or an importable module.

    @raise ConfigurationError: it cannot be loaded, or defines none.
    """
    if spec.endswith(".py") or os.sep in spec or os.path.isfile(spec):
        path = os.path.abspath(spec)
        try:
            with open(path, "rb") as f:
                source = f.read()
        except OSError as e:
            raise ConfigurationError(f"--handlers {spec}: {e.strerror}") from None
        # Like "python lib/pol.py": the file's folder is on the import path,
        # so it can import the modules beside it.
        folder = os.path.dirname(path)
        if folder not in sys.path:
            sys.path.insert(0, folder)
        namespace: dict[str, Any] = {"__name__": "infsmtp_handlers", "__file__": path}
        try:
            exec(compile(source, path, "exec"), namespace)  # noqa: S102 (running the handlers file is the point)
        except SyntaxError as e:
            raise ConfigurationError(f"--handlers {spec}: syntax error line {e.lineno}: {e.msg}") from None
        except Exception as e:  # noqa: BLE001 (whatever the user's file raised, shown in one line)
            raise ConfigurationError(f"--handlers {spec}: {type(e).__name__}: {e}") from None
    else:
        # twistd's import path starts with its own folder, not the working
        # directory "python -m" would give: look there too, as a user expects.
        cwd = os.getcwd()
        if cwd not in sys.path and "" not in sys.path:
            sys.path.append(cwd)
        try:
            namespace = vars(importlib.import_module(spec))
        except Exception as e:  # noqa: BLE001 (as above, for a module)
            hint = f"; looked in the working directory {cwd} and the import path"
            if isinstance(e, ModuleNotFoundError) and e.name == spec.split(".")[0]:
                hint += " (for a file, give its path: --handlers ./file.py)"
            raise ConfigurationError(f"--handlers {spec}: cannot import: {e}{hint}") from None
    found = {name: namespace[name] for name in HANDLER_NAMES if callable(namespace.get(name))}
    if not found:
        raise ConfigurationError(f"--handlers {spec} defines none of {', '.join(HANDLER_NAMES)}")
    return found


# The service --------------------------------------------------------------


def describeAddress(address: Any) -> str:
    """
    C{127.0.0.1:2525}, C{[::1]:2525} or C{unix:/path}, for log lines.
    """
    if isinstance(address, IPv6Address):
        return f"[{address.host}]:{address.port}"
    if isinstance(address, IPv4Address):
        return f"{address.host}:{address.port}"
    if isinstance(address, UNIXAddress):
        name = address.name.decode("utf-8", "replace") if isinstance(address.name, bytes) else address.name
        return f"unix:{name}"
    return str(address)


class InstallsLogObserver:
    """
    Mixed into the service twistd runs: the log observer of
    C{--log-format} becomes the application's L{ILogObserver}, which twistd
    uses instead of its own (L{twisted.application.app.AppLogger.start}).
    """

    #: Set by L{makeService}, or L{None} to leave twistd's.
    logObserver: Any = None

    def setServiceParent(self, parent: Any) -> Any:
        if self.logObserver is not None and hasattr(parent, "setComponent"):
            parent.setComponent(ILogObserver, self.logObserver)
        return super().setServiceParent(parent)  # type: ignore[misc]


def buildLogObserver(options: Options, twistdOptions: Any) -> Any:
    """
    The observer writing twistd's log in the C{--log-format} asked for,
    where twistd would (C{--logfile}, or standard output with C{-n} and
    none, rotated by size and by SIGUSR1 like twistd's own); L{None} when
    twistd's C{--syslog} or C{--logger} chooses the observer instead.

    @raise ConfigurationError: C{json} cannot go where twistd sends it.
    """
    if twistdOptions.get("syslog") or twistdOptions.get("logger"):
        if options["log-format"] == "json":
            raise ConfigurationError("--log-format json writes to twistd's --logfile; not with --syslog or --logger")
        return None
    from twisted.python import logfile

    from .._events import LogFileObserver, isRotatable

    name = twistdOptions.get("logfile")
    if name == "-" or (not name and twistdOptions.get("nodaemon")):
        out: Any = sys.stdout
    elif not isRotatable(name):
        # /dev/null, a FIFO, a terminal: rotating renames the path and
        # creates a regular file in its place, so that a root process
        # logging to /dev/null would replace the device after 1 MB.
        out = open(name, "a", buffering=1, encoding="utf-8")
    else:
        out = logfile.LogFile.fromFullPath(name or "twistd.log")
        if hasattr(signal, "SIGUSR1") and not signal.getsignal(signal.SIGUSR1):

            def rotate(number: int, frame: Any) -> None:
                from twisted.internet import reactor

                reactor.callFromThread(out.rotate)

            signal.signal(signal.SIGUSR1, rotate)
    worker = options["worker"][0] if options["worker"] else None
    from twisted.internet import reactor

    return LogFileObserver(out, options["log-format"], worker, reactor)


class SMTPService(InstallsLogObserver, SigtermStops, service.Service):
    """
    A L{Server} listening on several endpoints, stopped gracefully.

    @param server: the configured server (its own C{port}/C{endpoint} are
        not used).
    @param listen: endpoint strings (a C{haproxy:} prefix puts our PROXY
        protocol reader in front) or L{IStreamServerEndpoint}s.
    @param grace: seconds stopping lets transactions in flight finish.
    @param proxyTimeout: seconds a C{haproxy:} listener waits for the
        header.
    @raise ConfigurationError: an endpoint string does not parse.
    """

    #: Set by twistd's L{makeService} when not daemonizing: a listener that
    #: fails to start ends the process with one line on standard error
    #: (a daemon raises instead, and twistd reports it through its status
    #: pipe to the waiting parent).
    exitOnListenFailure = False
    #: twistd's pid file, removed when exiting that way.
    pidfile: str | None = None
    #: The Maildir delivery to open at startService, or L{None}.
    maildir: MaildirDelivery | None = None
    #: The L{RelayDelivery} whose sessions to the smarthost end at
    #: stopService, once the server's own sessions have, or L{None}.
    relay: Any = None
    #: Where C{/metrics} and C{/healthz} are served (C{--metrics}), or
    #: L{None}.
    metricsEndpoint: str | None = None
    _metricsPort: Any = None

    def __init__(
        self,
        server: Server,
        listen: Iterable[str | IStreamServerEndpoint],
        grace: float = 10,
        proxyTimeout: float = 5,
        reactor: Any = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.server = server
        self.grace = grace
        self.proxyTimeout = proxyTimeout
        self._reactor = reactor
        self._ports: list[Any] = []
        self._listening = False
        self._stopping = False
        self.endpoints: list[tuple[str, IStreamServerEndpoint, bool]] = []
        for description in listen:
            if not isinstance(description, str):
                self.endpoints.append((repr(description), description, False))
                continue
            proxied = description.startswith(HAPROXY_PREFIX)
            inner = description[len(HAPROXY_PREFIX) :] if proxied else description
            try:
                endpoint = listenEndpoint(reactor, inner)
            except Exception as e:  # noqa: BLE001 (endpoint parsers raise anything)
                raise ConfigurationError(f"--listen {description}: {e}") from None
            self.endpoints.append((description, endpoint, proxied))

    def _factory(self, proxied: bool) -> Any:
        factory = self.server.buildFactory()
        if proxied:
            factory = ProxyProtocolFactory(factory, self.proxyTimeout, self._reactor)
        return factory

    def _listen(self) -> None:
        if self._listening:
            return
        self._listening = True
        tls = "implicit TLS" if self.server.implicit else ("STARTTLS" if self.server.ssl else "plaintext")
        for description, endpoint, proxied in self.endpoints:
            outcome: list[Any] = []
            d = endpoint.listen(self._factory(proxied))
            d.addCallback(self._listened, description, tls)
            d.addErrback(self._listenFailed, description)
            d.addBoth(outcome.append)
            if outcome and isinstance(outcome[0], Failure):
                self._startFailed(outcome[0].value)

    def _startFailed(self, error: BaseException) -> None:
        if self.exitOnListenFailure:
            self._removePidfile()
            _exit(str(error))
        raise error

    def _removePidfile(self) -> None:
        # twistd removes it only when startup fails with an exception.
        try:
            with open(self.pidfile or "", encoding="ascii") as f:
                ours = int(f.read().strip() or 0) == os.getpid()
            if ours:
                os.remove(self.pidfile or "")
        except (OSError, ValueError):
            pass

    def _listened(self, port: Any, description: str, tls: str) -> Any:
        self._ports.append(port)
        log.info(
            "infsmtp listening on {address} ({tls}{proxy})",
            address=describeAddress(port.getHost()),
            tls=tls,
            proxy=", PROXY protocol" if description.startswith(HAPROXY_PREFIX) else "",
            endpoint=description,
        )
        return port

    def _listenFailed(self, failure: Failure, description: str) -> Failure:
        error = ConfigurationError(f"cannot listen on {description}: {failure.getErrorMessage()}")
        log.critical("{error}", error=str(error))
        return Failure(error)

    def privilegedStartService(self) -> None:
        # Bind before twistd sheds privileges (ports below 1024).
        super().privilegedStartService()
        self._listen()

    def startService(self) -> None:
        super().startService()
        self._listen()
        if self.maildir is not None:
            try:
                self.maildir.open()
            except SMTPError as e:
                self._startFailed(ConfigurationError(str(e)))
        if self.metricsEndpoint:
            self._listenMetrics(self.metricsEndpoint)
        if self.handleSigterm:
            self._reactor.callWhenRunning(self._installSigterm)
            # Under systemd (Type=notify): listening, so ready.
            self._reactor.callWhenRunning(sdNotify, "READY=1")

    def _listenMetrics(self, description: str) -> None:
        from .._server.metrics import listenMetrics

        def listening(port: Any) -> Any:
            self._metricsPort = port
            log.info("infsmtp metrics on http://{address}/metrics", address=describeAddress(port.getHost()))
            return port

        failures: list[Failure] = []
        try:
            d = listenMetrics(self._reactor, description, self.server)
        except Exception as e:  # noqa: BLE001 (endpoint parsers raise anything)
            self._startFailed(ConfigurationError(f"--metrics {description}: {e}"))
            return
        # TCP reports a port in use at once: refused like a --listen.
        d.addCallbacks(listening, failures.append)
        if failures:
            self._startFailed(ConfigurationError(f"--metrics {description}: {failures[0].getErrorMessage()}"))

    def reload(self) -> None:
        """
        SIGHUP: the server reloads its certificate (see L{Server.reload}).
        """
        self.server.reload()

    def stopService(self) -> defer.Deferred:
        """
        Stop listening at once; idle sessions get 421 4.3.2, transactions in
        flight may finish within the grace period.
        """
        super().stopService()
        if self.handleSigterm:
            sdNotify("STOPPING=1")
        ports, self._ports = self._ports, []
        self._listening = False
        stopped = [defer.maybeDeferred(port.stopListening) for port in ports]
        stopped.append(self.server.stopListening(self.grace))
        done = defer.gatherResults(stopped, consumeErrors=True)
        if self.relay is not None:
            # After the sessions that may still be forwarding a message.
            done.addBoth(lambda _: self.relay.close())
        # /healthz answers 503 "shutting down" until the sessions are gone.
        done.addBoth(lambda _: self._stopMetrics())
        return done.addCallback(lambda _: None)

    def _stopMetrics(self) -> Any:
        port, self._metricsPort = self._metricsPort, None
        return port.stopListening() if port is not None else None


# Options -> service -------------------------------------------------------


def _tlsVersion(options: Options, name: str) -> TLSVersion:
    try:
        return TLSVersion.fromName(options[name])
    except ValueError as e:
        raise ConfigurationError(f"--{name}: {e}") from None


def _hostPort(text: str, default: int = 25) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = text, str(default)
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigurationError(f"--relay {text}: expected HOST:PORT")
    return host, int(port)


def _lmtpDelivery(options: Options) -> Any:
    from twisted.internet.endpoints import clientFromString

    from .relay import LMTPDelivery

    target = options["deliver"]
    scheme, _, endpoint = target.partition(":")
    if scheme.lower() != "lmtp" or not endpoint:
        raise ConfigurationError(f"--deliver {target}: expected lmtp:ENDPOINT (lmtp:unix:/run/dovecot/lmtp)")
    try:
        # Parsed now (no reactor needed to parse), so that a typo refuses
        # to start.
        clientFromString(None, endpoint)
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigurationError(f"--deliver {target}: {endpoint!r} is not a client endpoint ({e})") from None
    if options["relay-connections"] < 1:
        raise ConfigurationError(f"--relay-connections {options['relay-connections']}: must be at least 1")
    receiveTimeout = options["receive-timeout"]
    return LMTPDelivery(
        endpoint,
        # The store's replies to the end of a message come before the
        # server's own receiveTimeout answers 451.
        dataTimeout=round(min(600.0, 0.9 * receiveTimeout) * 1000),
        maxConnections=options["relay-connections"],
    )


def _relayDelivery(options: Options) -> Any:
    from .relay import RelayDelivery

    host, port = _hostPort(options["relay"])
    modes = {"none": EncryptMode.none, "starttls": EncryptMode.startTls, "implicit": EncryptMode.sslTls}
    mode = modes.get(options["relay-tls"].lower())
    if mode is None:
        raise ConfigurationError(f"--relay-tls {options['relay-tls']}: use none, starttls or implicit")
    password = None
    if options["relay-password-file"]:
        try:
            with open(options["relay-password-file"], encoding="utf-8") as f:
                password = f.readline().rstrip("\r\n")
        except OSError as e:
            raise ConfigurationError(f"--relay-password-file {options['relay-password-file']}: {e.strerror}") from None
    if options["relay-ca"] and not os.path.isfile(options["relay-ca"]):
        raise ConfigurationError(f"--relay-ca {options['relay-ca']}: no such file")
    # The smarthost's answer must come before the server's own deadline for
    # onReceive: past that the client is answered 451 and retries while the
    # smarthost may still take the message.
    receiveTimeout = options["receive-timeout"]
    relayTimeout = options["relay-timeout"]
    if relayTimeout is None:
        relayTimeout = min(600.0, 0.9 * receiveTimeout)
    elif not 0 < relayTimeout < receiveTimeout:
        raise ConfigurationError(
            f"--relay-timeout {relayTimeout:g}: must be over 0 and under --receive-timeout ({receiveTimeout:g}), "
            "or the client is answered 451 while the smarthost may still take the message"
        )
    if options["relay-connections"] < 1:
        raise ConfigurationError(f"--relay-connections {options['relay-connections']}: must be at least 1")
    return RelayDelivery(
        host,
        port,
        maxConnections=options["relay-connections"],
        encryptMode=mode,
        username=options["relay-user"],
        password=password,
        caCertFile=options["relay-ca"],
        verifyServerCertificate=not options["relay-no-verify"],
        dataTimeout=round(relayTimeout * 1000),
    )


#: Server parameter -> the option that sets it, for error messages.
_OPTION_NAMES = {
    "maxConnections": "--max-connections",
    "poolSize": "--pool-size",
    "maxMessageSize": "--max-message-size",
    "maxRecipients": "--max-recipients",
    "timeout": "--timeout",
    "shutdownGrace": "--grace",
    "maxConnectionsPerClient": "--max-connections-per-client",
    "maxConnectionRate": "--max-connection-rate",
    "maxAuthFailuresPerClient": "--max-auth-failures-per-client",
    "authFailureDelay": "--auth-failure-delay",
    "trusted network": "--trusted",
    "minDataRate": "--min-data-rate",
    "handlerTimeout": "--handler-timeout",
    "proxyTimeout": "--proxy-timeout",
    "receiveTimeout": "--receive-timeout",
    "messageMemoryLimit": "--message-memory",
    "minProtocol": "--min-tls",
    "maxProtocol": "--max-tls",
    "hostname": "--hostname",
    "banner": "--banner",
    "greetDelay": "--greet-delay",
}


def _optionSpelling(message: str) -> str:
    """
    A L{Server} setting error, with the option's name for the parameter's.
    """
    name = message.split(" ", 1)[0]
    if message.startswith("trusted network"):
        name = "trusted network"
    option = _OPTION_NAMES.get(name)
    return option + message[len(name) :] if option else message


def buildServer(options: Options) -> Server:
    """
    The L{Server} the options describe, handlers and delivery included.

    @raise ConfigurationError: with the one line to show.
    """
    if options.errors:
        raise ConfigurationError(options.errors[0])
    if options["key"] and not options["cert"]:
        raise ConfigurationError("--key needs --cert")
    if options["cert"] and not options["key"]:
        raise ConfigurationError("--cert needs --key")
    if options["implicit-tls"] and not options["cert"]:
        raise ConfigurationError("--implicit-tls needs --cert and --key")
    if options["require-starttls"] and not options["cert"]:
        raise ConfigurationError("--require-starttls needs --cert and --key: without TLS no client could send mail")
    if options["relay"] and options["maildir"]:
        raise ConfigurationError("--relay and --maildir are exclusive: a message is either forwarded or stored")
    if options["print"] and (options["relay"] or options["maildir"]):
        which = "--relay" if options["relay"] else "--maildir"
        raise ConfigurationError(f"--print and {which} are exclusive: a message is either printed or delivered")
    if options["deliver"]:
        other = next((o for o in ("relay", "maildir", "print") if options[o]), None)
        if other is not None:
            raise ConfigurationError(f"--deliver and --{other} are exclusive: a message goes one way")
    if options["log-format"] not in ("text", "json"):
        raise ConfigurationError(f"--log-format {options['log-format']}: use text or json")
    try:
        server = Server(
            ssl=bool(options["cert"]),
            maxConnections=options["max-connections"],
            poolSize=options["pool-size"],
            minProtocol=_tlsVersion(options, "min-tls"),
            maxProtocol=_tlsVersion(options, "max-tls"),
            implicitTls=bool(options["implicit-tls"]),
            hostname=options["hostname"],
            maxMessageSize=options["max-message-size"],
            maxRecipients=options["max-recipients"],
            timeout=options["timeout"],
            allowInsecureAuth=bool(options["allow-insecure-auth"]),
            requireAuth=bool(options["require-auth"]),
            receivedHeader=not options["no-received-header"],
            lmtp=bool(options["lmtp"]),
            dsn=not options["no-dsn"],
            chunking=not options["no-chunking"],
            shutdownGrace=options["grace"],
            proxyTimeout=options["proxy-timeout"],
            maxConnectionsPerClient=options["max-connections-per-client"],
            maxConnectionRate=options["max-connection-rate"],
            maxAuthFailuresPerClient=options["max-auth-failures-per-client"],
            authFailureDelay=options["auth-failure-delay"],
            trustedNetworks=options["trusted"],
            minDataRate=options["min-data-rate"],
            handlerTimeout=options["handler-timeout"],
            receiveTimeout=options["receive-timeout"],
            messageMemoryLimit=options["message-memory"],
            requireStartTls=bool(options["require-starttls"]),
            banner=options["banner"],
            greetDelay=options["greet-delay"],
            # What the operator of a daemon reads: every session's lines.
            sessionLog=True,
            debug=bool(options["debug"]),
        )
    except ValueError as e:
        raise ConfigurationError(_optionSpelling(str(e))) from None
    if options["worker"]:
        server.setWorker(*options["worker"])
    if options["metrics"]:
        from .._server.metrics import MetricsUnavailable

        try:
            server.enableMetrics()
        except MetricsUnavailable as e:
            raise ConfigurationError(f"--metrics {options['metrics']}: {e}") from None
    if options["cert"]:
        try:
            server.setCertificate(options["cert"], options["key"], options["root"])
        except SMTPError as e:
            raise ConfigurationError(str(e)) from None

    handlers = loadHandlers(options["handlers"]) if options["handlers"] else {}
    checkers = options.get("credInterfaces", {}).get(IUsernamePassword, [])
    if checkers:
        if "onLogin" in handlers:
            raise ConfigurationError("--auth and an onLogin in --handlers are exclusive: choose one")
        handlers["onLogin"] = CheckerLogin(checkers)
    elif options["require-auth"] and "onLogin" not in handlers:
        raise ConfigurationError("--require-auth needs --auth (or an onLogin handler)")
    if "onLogin" in handlers and not options["cert"] and not options["allow-insecure-auth"]:
        # AUTH is offered only over TLS: without it the server would run,
        # never offer AUTH, and (with --require-auth) refuse every message.
        which = "--auth" if checkers else "an onLogin in --handlers"
        raise ConfigurationError(
            f"{which} needs TLS: add --cert and --key (AUTH is offered only over TLS), "
            "or --allow-insecure-auth on a trusted network"
        )
    if "onReceive" in handlers and (options["relay"] or options["maildir"] or options["print"] or options["deliver"]):
        which = next(f"--{o}" for o in ("relay", "maildir", "print", "deliver") if options[o])
        raise ConfigurationError(f"{which} and an onReceive in --handlers are exclusive: choose one")
    if "onReceive" not in handlers:
        if options["print"]:
            from .printer import PrintDelivery

            # The terminal itself: twistd turns sys.stdout into log lines.
            handlers["onReceive"] = PrintDelivery(sys.__stdout__)
        elif options["relay"]:
            handlers["onReceive"] = _relayDelivery(options)
        elif options["deliver"]:
            handlers["onReceive"] = _lmtpDelivery(options)
        else:
            try:
                # Created in SMTPService.startService: once listening
                # worked, and as the user twistd --uid runs it as.
                handlers["onReceive"] = MaildirDelivery(options["maildir"] or DEFAULT_MAILDIR, create=False)
            except SMTPError as e:
                raise ConfigurationError(str(e)) from None
    for name, handler in handlers.items():
        setattr(server, name, handler)
    if isinstance(handlers["onReceive"], MaildirDelivery):
        server.healthChecks.append(handlers["onReceive"].healthProblem)
    return server


def buildService(options: Options, reactor: Any = None) -> SMTPService:
    """
    The service the options describe; see L{makeService} for twistd's.

    @raise ConfigurationError: with the one line to show.
    """
    server = buildServer(options)
    listen: list[Any] = list(options["listen"])
    if options["inherit-fd"]:
        # A --workers child: the parent bound the listeners.
        if reactor is None:
            from twisted.internet import reactor
        listen = [adoptedEndpoint(reactor, fd) for fd in options["inherit-fd"]]
    svc = SMTPService(server, listen, options["grace"], options["proxy-timeout"], reactor)
    svc.metricsEndpoint = options["metrics"]
    if isinstance(server.onReceive, MaildirDelivery):
        svc.maildir = server.onReceive
    elif options["relay"] or options["deliver"]:
        # Its sessions end when the service stops.
        svc.relay = server.onReceive
    return svc


class WorkerPoolService(InstallsLogObserver, SigtermStops, WorkerPool):
    """
    The C{--workers} parent: L{WorkerPool}, stopped by SIGTERM with exit
    status 0 once every worker has finished.
    """

    def __init__(self, *args: Any, grace: float = 10, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.grace = grace
        self._reactor = self.reactor

    def startService(self) -> None:
        super().startService()
        if self.handleSigterm:
            self._reactor.callWhenRunning(self._installSigterm)
            self._reactor.callWhenRunning(sdNotify, "READY=1")

    def stopService(self) -> defer.Deferred:
        if self.handleSigterm:
            sdNotify("STOPPING=1")
        return super().stopService()

    def reload(self) -> None:
        """
        SIGHUP: every worker reloads (each is an L{SMTPService}).
        """
        for worker in list(self.workers.values()):
            try:
                worker.transport.signalProcess("HUP")
            except Exception as e:  # noqa: BLE001 (a worker that just ended)
                log.info("SIGHUP: worker {index}: {error}", index=worker.index, error=str(e))


def buildWorkerPool(options: Options, argv: Sequence[str]) -> WorkerPoolService:
    """
    The C{--workers} parent for these options.  The configuration is
    checked here, once, so that its errors are one line from the parent
    rather than a restart loop of failing workers.

    @raise ConfigurationError: with the one line to show.
    """
    if options["workers"] < 1:
        raise ConfigurationError("--workers must be at least 1")
    if options["metrics"]:
        raise ConfigurationError(
            f"--metrics with --workers {options['workers']}: each worker would count only its own sessions; "
            "run one process per port and scrape each, or leave --workers out"
        )
    buildServer(options)
    try:
        for description in options["listen"]:
            parseTCPListen(description)
        pluginArgs, logfile = workerArguments(argv)
    except ValueError as e:
        raise ConfigurationError(str(e)) from None
    mode = options["workers-sockets"].lower()
    if mode not in ("shared", "reuseport"):
        raise ConfigurationError(f"--workers-sockets {options['workers-sockets']}: use shared or reuseport")
    if mode == "reuseport" and not hasattr(socket, "SO_REUSEPORT"):
        raise ConfigurationError("--workers-sockets reuseport: this system has no SO_REUSEPORT")
    pool = WorkerPoolService(
        options["listen"], options["workers"], pluginArgs, logfile, grace=options["grace"], reusePort=mode == "reuseport"
    )
    try:
        pool.bind()
    except OSError as e:
        raise ConfigurationError(f"cannot listen on {' '.join(options['listen'])}: {e.strerror}") from None
    return pool


def checkCanListen(descriptions: Iterable[str]) -> None:
    """
    Try each TCP listener before twistd daemonizes: a daemon's startup
    error reaches the terminal only as the first 100 bytes of a bytes repr
    (twistd's status pipe), so a port in use or a privileged port is
    reported here, in one line, while the terminal is still ours.  (The
    real bind comes later; this catches the common mistakes, not a race.)

    @raise ConfigurationError: a listener that cannot bind.
    """
    for description in descriptions:
        inner = description[len(HAPROXY_PREFIX) :] if description.startswith(HAPROXY_PREFIX) else description
        try:
            interface, port, family = parseTCPListen(inner)
        except ValueError:
            continue  # not TCP: nothing to try
        probe = socket.socket(family, socket.SOCK_STREAM)
        try:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((interface, port))
        except OSError as e:
            raise ConfigurationError(f"cannot listen on {description}: {e.strerror}") from None
        finally:
            probe.close()


def _exit(message: str) -> None:
    # Logging may have taken sys.stderr over by now; the line is for the
    # person at the terminal.
    stream = sys.__stderr__ or sys.stderr
    stream.write(f"twistd infsmtp: error: {message}\n")
    stream.flush()
    raise SystemExit(1)


def makeService(options: Options) -> Any:
    """
    twistd's entry point: L{buildService}, with a configuration error shown
    in one line (exit status 1), and SIGTERM stopping gracefully with exit
    status 0.
    """
    try:
        twistdOptions = getattr(options, "parent", None) or {}
        if options["workers"] > 1 and not options["inherit-fd"]:
            pool = buildWorkerPool(options, sys.argv)
            pool.handleSigterm = True
            pool.logObserver = buildLogObserver(options, twistdOptions)
            return pool
        if options["print"] and not twistdOptions.get("nodaemon", True):
            raise ConfigurationError("--print writes to the terminal, which a daemon has not: add -n")
        svc = buildService(options)
        if not twistdOptions.get("nodaemon") and not options["inherit-fd"]:
            checkCanListen(options["listen"])
        svc.logObserver = buildLogObserver(options, twistdOptions)
    except ConfigurationError as e:
        _exit(e.text)
    svc.exitOnListenFailure = bool(twistdOptions.get("nodaemon"))
    svc.pidfile = twistdOptions.get("pidfile") or None
    svc.handleSigterm = True
    return svc


#: The twistd plugin (see C{twisted/plugins/infsmtp_plugin.py}).
serviceMaker = service.ServiceMaker(
    "infsmtp",
    __name__,
    "An ESMTP server delivering into a Maildir (or relaying), with handler hooks.",
    "infsmtp",
)

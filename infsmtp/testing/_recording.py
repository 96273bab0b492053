"""
L{RecordingServer}: a real L{Server} on a loopback port that keeps every
message it accepts, for tests of code that sends mail, and that fails on
purpose when a test says so.

Everything a test asks for is scripted and deterministic: a reply chosen
per command and address, a 421 after so many messages, a delay, a
connection cut in the middle of DATA.  Nothing is random and nothing
sleeps: delays are the reactor's timers, and L{RecordingServer.waitFor}
waits on the arrival of messages, bounded.

The server runs in whatever thread runs the reactor.  From any other
thread (a plain test; crochet starts the reactor in a background thread)
L{start}, L{stop} and L{waitFor} block; in the reactor's thread (trial,
pytest-twisted) use L{startListening} and L{stopListening}, and
L{waitFor} returns a Deferred.
"""

from __future__ import annotations

import email.parser
import email.policy
import inspect
import shutil
import ssl
import tempfile
import threading
from dataclasses import dataclass
from email.message import EmailMessage
from typing import Any, Callable

from twisted.internet import defer
from twisted.internet.task import deferLater
from twisted.python.failure import Failure

from .._blocking import isReactorThread
from .._errors import SMTPError
from .._server.handlers import adaptHandler, callHandler, toDeferred
from .._server.protocol import ServerProtocol
from .._server.server import HANDLER_NAMES, Server
from .._server.session import Session
from ._certificates import CertificateAuthority

#: The commands a fault can be attached to, and what "address" means for
#: each (see L{RecordingServer.fail}).
FAULT_COMMANDS = {
    "CONNECT": "the client's IP address",
    "AUTH": "the user name",
    "MAIL": "the sender",
    "RCPT": "the recipient",
    "DATA": "any recipient of the message",
}

#: The handler each fault command is decided in.
_HANDLER_OF = {"CONNECT": "onConnect", "AUTH": "onLogin", "MAIL": "onMailFrom", "RCPT": "onRcptTo", "DATA": "onReceive"}

#: Where a session counts its accepted messages (for failAfter).
_COUNT_KEY = "infsmtp.testing.accepted"

#: The settings a test server starts from; any can be given instead.
TEST_DEFAULTS: dict[str, Any] = {
    "hostname": "localhost",
    # What the client sent, byte for byte (dot-unstuffed): no trace header.
    "receivedHeader": False,
    # A test sends fast, from one address, and may fail logins on purpose.
    "maxConnectionsPerClient": 0,
    "maxConnectionRate": 0,
    "maxAuthFailuresPerClient": 0,
    "authFailureDelay": 0,
    "shutdownGrace": 0,
}


class MessageWaitTimeout(AssertionError):
    """
    L{RecordingServer.waitFor} ran out of time.  An C{AssertionError}, so
    that pytest reports a failed test rather than an error in it.
    """


class ReceivedMessage(EmailMessage):
    """
    A message the server accepted: an L{EmailMessage} (C{msg["Subject"]},
    C{msg.get_content()}, ...) with its envelope.

    @ivar mailFrom: the sender given in MAIL FROM (C{""} for C{<>}).
    @ivar rcptTo: the accepted recipients, in order.
    @ivar peer: the client's (IP address, port).
    @ivar helo: the name the client gave in EHLO/HELO.
    @ivar tls: the TLS version that protected the session
        (C{"TLSv1.3"}), or L{None} for a plaintext one.
    @ivar user: the user name the client authenticated as, or L{None}.
    @ivar raw: the message as received (CRLF line ends, dot-unstuffed);
        the message itself is parsed with C{\\n} line ends, so that
        C{get_content()} gives C{"Hello.\\n"}.
    """

    mailFrom: str
    rcptTo: list[str]
    peer: tuple[str, int]
    helo: str
    tls: str | None
    user: str | None
    raw: bytes

    def summary(self) -> str:
        """
        One line: C{<sender> -> <recipient>, ...: Subject}.
        """
        recipients = ", ".join(f"<{r}>" for r in self.rcptTo)
        return f"<{self.mailFrom}> -> {recipients}: {self.get('Subject', '(no subject)')!s}"

    def __repr__(self) -> str:
        return f"<ReceivedMessage {self.summary()}>"


def _parse(raw: bytes) -> ReceivedMessage:
    parser = email.parser.BytesParser(_class=ReceivedMessage, policy=email.policy.default)
    # Python's email package keeps a body's CRLFs as they are: parsed with
    # \n line ends, get_content() gives text as a test would write it.
    return parser.parsebytes(raw.replace(b"\r\n", b"\n"))  # type: ignore[return-value]


@dataclass
class _Rule:
    """
    One scripted fault: what happens (C{action}), on which command, for
    which address (L{None}: any), how many more times (L{None}: always).
    """

    action: str  # "fail", "delay" or "disconnect"
    command: str
    address: str | None
    remaining: int | None
    code: int = 0
    text: str = ""
    seconds: float = 0.0

    def matches(self, command: str, addresses: list[str]) -> bool:
        if self.command != command or self.remaining == 0:
            return False
        return self.address is None or self.address in addresses


class _Faults:
    """
    The scripted faults, shared between the test's thread (which adds
    them) and the reactor's (which takes them as commands arrive).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rules: list[_Rule] = []
        self.failAfter: tuple[int, int, str] | None = None

    def add(self, rule: _Rule) -> None:
        with self._lock:
            self._rules.append(rule)

    def clear(self) -> None:
        with self._lock:
            self._rules = []
            self.failAfter = None

    def take(self, action: str, command: str, addresses: list[str]) -> _Rule | None:
        """
        The first rule for C{action} that matches, used up once.
        """
        addresses = [a.lower() for a in addresses]
        with self._lock:
            for rule in self._rules:
                if rule.action == action and rule.matches(command, addresses):
                    if rule.remaining is not None:
                        rule.remaining -= 1
                    return rule
        return None


def _checkTimes(times: int | None) -> None:
    if times is not None and (type(times) is not int or times < 1):
        raise ValueError(f"times must be a positive integer or None (every time), not {times!r}")


def _checkCommand(command: str, allowed: Any) -> str:
    name = command.upper() if isinstance(command, str) else command
    if name not in allowed:
        raise ValueError(f"command must be one of {', '.join(allowed)}, not {command!r}")
    return name


class _FaultInjectingProtocol(ServerProtocol):
    """
    The server protocol, able to cut its connection on purpose: when a
    command with a C{disconnectDuring} rule arrives (before it is answered)
    or, for DATA, once message bytes come after the 354.
    """

    _cutMessage = False

    def lookupMethod(self, command: bytes) -> Callable[[bytes], None] | None:
        faults: _Faults = self.factory.server.faults
        verb = command.decode("ascii", "replace")
        if faults.take("disconnect", verb, []) is not None:
            if verb != "DATA":
                return self._cut
            self._cutMessage = True
        return super().lookupMethod(command)

    def _cut(self, argument: bytes = b"") -> None:
        # Nothing more is read or answered: the client sees the connection
        # end where a crash or a network fault would end it.
        self._closing = True
        self.transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        if self._cutMessage and self._dataFramer is not None:
            self._cutMessage = False
            self._cut()
            return
        super().dataReceived(data)


class _FaultInjectingServer(Server):
    """
    A L{Server} whose sessions are L{_FaultInjectingProtocol}s reading
    C{faults}.
    """

    faults: _Faults

    def buildFactory(self) -> Any:
        fresh = self._factory is None
        factory = super().buildFactory()
        if fresh and self._factory is not None:
            self._factory.protocol = _FaultInjectingProtocol  # type: ignore[assignment]
        return factory


class _UserHandler:
    """
    A handler a test sets on the L{RecordingServer} (C{smtpd.onRcptTo =
    policy}): run after the scripted faults, before the recording.  Any
    form a L{Server} handler takes (callable, coroutine, script path,
    C{'module:function'}).
    """

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        if instance is None:
            return self
        return instance._userSpecs.get(self.name)

    def __set__(self, instance: Any, value: Any) -> None:
        instance._userHandlers[self.name] = adaptHandler(value, instance.server._threadPool)
        instance._userSpecs[self.name] = value
        if self.name == "onLogin":
            instance._installLogin()


class RecordingServer:
    """
    A real L{infsmtp.Server} on an ephemeral 127.0.0.1 port that records
    the messages it accepts (L{messages}) and fails on purpose when told to.

        >>> with RecordingServer() as smtpd:
        ...     with smtplib.SMTP(smtpd.host, smtpd.port) as client:
        ...         client.sendmail("app@example.org", ["bob@example.net"], b"Subject: Welcome\\r\\n\\r\\nHi")
        ...     assert smtpd.messages[0]["Subject"] == "Welcome"

    @param tls: L{None} (plaintext), C{"starttls"} or C{"implicit"} (TLS
        from the first byte).  The certificate is issued for C{localhost}
        and C{127.0.0.1} by a throwaway CA whose certificate is L{caFile}
        (L{sslContext} trusts it).
    @param users: user name -> password; AUTH PLAIN/LOGIN is offered and
        checked against them (without TLS too, unless C{tls} is set: then
        only after STARTTLS, as a real server would).
    @param requireAuth: refuse MAIL (530) before AUTH.
    @param maxMessageSize: the SIZE limit in bytes (0: none).
    @param serverOptions: any other L{Server} keyword (C{maxRecipients},
        C{timeout}, C{allowInsecureAuth}, C{handlerTimeout}...); see
        L{TEST_DEFAULTS} for what a test server starts from.

    Handlers set on this object (C{onConnect}, C{onLogin}, C{onMailFrom},
    C{onRcptTo}, C{onReceive}, C{onDisconnect}) decide after the scripted
    faults; a message is recorded only once C{onReceive} accepted it.
    """

    onConnect = _UserHandler()
    onLogin = _UserHandler()
    onMailFrom = _UserHandler()
    onRcptTo = _UserHandler()
    onReceive = _UserHandler()
    onDisconnect = _UserHandler()

    def __init__(
        self,
        *,
        tls: str | None = None,
        users: dict[str, str] | None = None,
        requireAuth: bool = False,
        maxMessageSize: int = 32 * 1024 * 1024,
        host: str = "127.0.0.1",
        port: int = 0,
        **serverOptions: Any,
    ) -> None:
        if tls not in (None, "starttls", "implicit"):
            raise ValueError(f"tls must be None, 'starttls' or 'implicit', not {tls!r}")
        if users is not None and (
            not isinstance(users, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in users.items())
        ):
            raise ValueError("users must map user names to passwords (str to str)")
        if requireAuth and users is None and "onLogin" not in serverOptions:
            raise ValueError("requireAuth needs users (or set onLogin) to log in with")
        handlers = {name: serverOptions.pop(name) for name in HANDLER_NAMES if name in serverOptions}
        options = dict(TEST_DEFAULTS)
        if users is not None and tls is None:
            options["allowInsecureAuth"] = True
        options.update(serverOptions)
        self.tls = tls
        self.users = users
        self.host = host
        self._messages: list[ReceivedMessage] = []
        self._changed = threading.Condition()
        self._waiters: list[tuple[Any, defer.Deferred, Any]] = []
        self._userHandlers: dict[str, Any] = dict.fromkeys(HANDLER_NAMES)
        self._userSpecs: dict[str, Any] = dict.fromkeys(HANDLER_NAMES)
        self._certificateFolder: str | None = None
        #: The throwaway CA's certificate (PEM) when C{tls} is set, for the
        #: client under test to trust; else L{None}.
        self.caFile: str | None = None
        self.server = _FaultInjectingServer(
            ssl=tls is not None,
            implicitTls=tls == "implicit",
            port=port,
            interface=host,
            requireAuth=requireAuth,
            maxMessageSize=maxMessageSize,
            **options,
        )
        self.server.faults = self.faults = _Faults()
        if tls is not None:
            self._certificateFolder = tempfile.mkdtemp(prefix="infsmtp-testing-")
            authority = CertificateAuthority.create(self._certificateFolder)
            leaf = authority.issue("localhost", "127.0.0.1")
            self.server.setCertificate(leaf.certFile, leaf.keyFile)
            self.caFile = authority.certFile
        self.server.onConnect = self._onConnect
        self.server.onMailFrom = self._onMailFrom
        self.server.onRcptTo = self._onRcptTo
        self.server.onReceive = self._onReceive
        self.server.onDisconnect = self._onDisconnect
        if users is not None:
            self._installLogin()
        for name, handler in handlers.items():
            setattr(self, name, handler)

    # Where it listens ---------------------------------------------------------

    @property
    def port(self) -> int:
        """
        The port it listens on (once started).
        """
        return self.server.port

    def sslContext(self) -> ssl.SSLContext:
        """
        A client C{SSLContext} trusting the throwaway CA (for C{smtplib}:
        C{client.starttls(context=smtpd.sslContext())} or
        C{SMTP_SSL(..., context=...)}).
        """
        if self.caFile is None:
            raise ValueError("this server has no TLS (make it with tls='starttls' or tls='implicit')")
        return ssl.create_default_context(cafile=self.caFile)

    # Life -------------------------------------------------------------------

    def startListening(self) -> defer.Deferred:
        """
        Start listening (from the reactor's thread); fires with the port.
        """
        return self.server.startListening()

    def stopListening(self) -> defer.Deferred:
        """
        Stop listening and cut every session (from the reactor's thread);
        L{waitFor}s still waiting fail.
        """
        return self.server.stopListening().addBoth(self._stopped)

    def start(self, timeout: float = 30) -> "RecordingServer":
        """
        Start listening and wait until it does (from any thread but the
        reactor's; a reactor is started in a background thread if none
        runs).
        """
        self.server.start(timeout)
        return self

    def stop(self, timeout: float = 30) -> None:
        """
        Stop, from any thread but the reactor's.
        """
        try:
            self.server.stop(timeout)
        finally:
            self._stopped(None)

    def __enter__(self) -> "RecordingServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def _stopped(self, result: Any) -> Any:
        if self._certificateFolder is not None:
            shutil.rmtree(self._certificateFolder, ignore_errors=True)
            self._certificateFolder = None
        waiters, self._waiters = self._waiters, []
        for what, d, timer in waiters:
            if timer.active():
                timer.cancel()
            d.errback(MessageWaitTimeout(f"the server stopped while waiting for {self._describe(what)}"))
        return result

    # What arrived ------------------------------------------------------------

    @property
    def messages(self) -> list[ReceivedMessage]:
        """
        The messages accepted so far, oldest first (the live list).
        """
        return self._messages

    def clear(self) -> None:
        """
        Forget the messages received so far (not the faults: see
        L{clearFaults}).
        """
        with self._changed:
            del self._messages[:]

    def waitFor(self, countOrPredicate: int | Callable[[ReceivedMessage], Any] = 1, timeout: float = 5.0) -> Any:
        """
        Wait for messages sent in the background.

        @param countOrPredicate: a number: wait until that many messages
            have arrived in all, and give the list; a function of one
            message: wait until one satisfies it, and give that one.
        @param timeout: seconds; then L{MessageWaitTimeout} (an
            C{AssertionError}) says what was waited for and what arrived.
        @return: from the reactor's thread, a Deferred (C{await
            smtpd.waitFor(2)}); from any other thread, the result itself.
        """
        if isinstance(countOrPredicate, bool) or not (
            isinstance(countOrPredicate, int) or callable(countOrPredicate)
        ):
            raise TypeError(f"waitFor takes a number of messages or a function of a message, not {countOrPredicate!r}")
        if isReactorThread():
            return self._waitInReactor(countOrPredicate, timeout)
        with self._changed:
            found: list[Any] = []

            def ready() -> bool:
                outcome = self._check(countOrPredicate)
                if outcome is not None:
                    found.append(outcome)
                    return True
                return False

            if not self._changed.wait_for(ready, timeout):
                raise self._timedOut(countOrPredicate, timeout)
            return found[0]

    def _check(self, what: Any) -> Any:
        if isinstance(what, int):
            return list(self._messages) if len(self._messages) >= what else None
        for message in list(self._messages):
            if what(message):
                return message
        return None

    def _describe(self, what: Any) -> str:
        if isinstance(what, int):
            return f"{what} message{'s' if what != 1 else ''}"
        return f"a message satisfying {getattr(what, '__qualname__', what)!s}"

    def _timedOut(self, what: Any, timeout: float) -> MessageWaitTimeout:
        arrived = [f"\n  {m.summary()}" for m in list(self._messages)]
        return MessageWaitTimeout(
            f"waited {timeout:g} s for {self._describe(what)}; "
            f"{len(arrived)} arrived{':' if arrived else ''}{''.join(arrived)}"
        )

    def _waitInReactor(self, what: Any, timeout: float) -> defer.Deferred:
        try:
            outcome = self._check(what)
        except Exception:
            return defer.fail()
        if outcome is not None:
            return defer.succeed(outcome)
        entry: list[Any] = []

        def cancel(d: defer.Deferred) -> None:
            if entry and entry[0] in self._waiters:
                self._waiters.remove(entry[0])
                if entry[0][2].active():
                    entry[0][2].cancel()

        d: defer.Deferred = defer.Deferred(cancel)
        timer = self.server._reactor.callLater(timeout, self._waitExpired, what, d, timeout)
        entry.append((what, d, timer))
        self._waiters.append(entry[0])
        return d

    def _waitExpired(self, what: Any, d: defer.Deferred, timeout: float) -> None:
        self._waiters = [w for w in self._waiters if w[1] is not d]
        d.errback(self._timedOut(what, timeout))

    def _record(self, session: Session) -> None:
        message = _parse(session.msg)
        message.mailFrom = session.mailFrom
        message.rcptTo = list(session.rcptTo)
        message.peer = (session.ip, session.port)
        message.helo = session.helo
        message.tls = (session.tlsVersion or "TLS") if session.secure else None
        message.user = session.username if session.authenticated else None
        message.raw = session.msg
        session.data[_COUNT_KEY] = session.data.get(_COUNT_KEY, 0) + 1
        with self._changed:
            self._messages.append(message)
            self._changed.notify_all()
        for waiter in list(self._waiters):
            what, d, timer = waiter
            try:
                outcome = self._check(what)
            except Exception:
                outcome, failure = None, Failure()
            else:
                failure = None
            if outcome is None and failure is None:
                continue
            self._waiters.remove(waiter)
            if timer.active():
                timer.cancel()
            if failure is not None:
                d.errback(failure)
            else:
                d.callback(outcome)

    # Faults on purpose ---------------------------------------------------------

    def fail(
        self,
        command: str,
        address: str | None = None,
        code: int = 550,
        text: str | None = None,
        times: int | None = None,
    ) -> None:
        """
        Answer C{command} with C{code} (4xx or 5xx) instead of deciding it.

            smtpd.fail("RCPT", "x@y.test", 550)          # that recipient, always
            smtpd.fail("DATA", code=451, times=2)        # the next two messages
            smtpd.fail("CONNECT", code=421)              # greet with 421 and close

        @param command: C{CONNECT} (the greeting), C{AUTH}, C{MAIL}, C{RCPT}
            or C{DATA} (the reply to the end of the message).
        @param address: only when it matches (case-insensitive): the sender
            for MAIL, the recipient for RCPT, any recipient for DATA, the
            user name for AUTH, the client's IP for CONNECT; L{None}: any.
        @param code: 421 also closes the connection, as a server does.
        @param times: how many matching commands fail, then the rule is
            spent; L{None}: every one.
        """
        name = _checkCommand(command, FAULT_COMMANDS)
        if isinstance(code, bool) or not isinstance(code, int) or not 400 <= code < 600:
            raise ValueError(f"code must be a 4xx or 5xx reply code, not {code!r}")
        _checkTimes(times)
        if name == "AUTH" and self.server.onLogin is None:
            raise ValueError("AUTH is not offered: make the server with users={...} (or set onLogin) first")
        self.faults.add(
            _Rule(
                "fail",
                name,
                address.lower() if address else None,
                times,
                code=code,
                text=text if text is not None else f"Deliberate failure of {name} (infsmtp.testing)",
            )
        )

    def failAfter(self, count: int, code: int = 421, text: str | None = None) -> None:
        """
        In every session, answer the MAIL FROM that follows the first
        C{count} accepted messages with C{code} (421: and close), as a
        server limiting messages per connection does.  A client that
        reconnects may send C{count} more.
        """
        if type(count) is not int or count < 0:
            raise ValueError(f"count must be an integer of at least 0, not {count!r}")
        if isinstance(code, bool) or not isinstance(code, int) or not 400 <= code < 600:
            raise ValueError(f"code must be a 4xx or 5xx reply code, not {code!r}")
        self.faults.failAfter = (count, code, text or f"Too many messages in this session ({count}) (infsmtp.testing)")

    def delay(self, command: str, seconds: float, address: str | None = None, times: int | None = None) -> None:
        """
        Answer C{command} C{seconds} late (the reactor's timer: the server
        goes on serving other sessions meanwhile).  Same C{command},
        C{address} and C{times} as L{fail}.  A delay past the server's
        C{handlerTimeout} (C{receiveTimeout} for DATA) is answered 451 /
        421, as it would be in production.
        """
        name = _checkCommand(command, FAULT_COMMANDS)
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 <= seconds < float("inf"):
            raise ValueError(f"seconds must be a number of seconds, 0 or more, not {seconds!r}")
        _checkTimes(times)
        self.faults.add(_Rule("delay", name, address.lower() if address else None, times, seconds=float(seconds)))

    def disconnectDuring(self, command: str = "DATA", times: int | None = None) -> None:
        """
        Cut the connection without a reply: for C{DATA}, once the message
        has begun (after the 354, when its first bytes arrive); for any
        other command (C{EHLO}, C{MAIL}, C{RCPT}, C{RSET}, C{QUIT},
        C{STARTTLS}, C{AUTH}...), as it arrives.  Nothing of that
        transaction is recorded.
        """
        name = command.upper() if isinstance(command, str) else command
        if not isinstance(name, str) or not name.isalpha():
            raise ValueError(f"command must be an SMTP command such as 'DATA' or 'RCPT', not {command!r}")
        _checkTimes(times)
        self.faults.add(_Rule("disconnect", name, None, times))

    def clearFaults(self) -> None:
        """
        Forget every fault set so far.
        """
        self.faults.clear()

    # The handlers the server runs ------------------------------------------------

    def _installLogin(self) -> None:
        if self.server.onLogin is None:
            self.server.onLogin = self._onLogin

    def _decide(self, command: str, addresses: list[str], name: str, session: Session, default: Any = None) -> Any:
        """
        The scripted faults for C{command}, then the test's own handler (or
        C{default}).  Synchronous unless a delay or the handler is not.
        """
        delay = self.faults.take("delay", command, addresses)
        failure = self.faults.take("fail", command, addresses)

        def decide(_: Any = None) -> Any:
            if failure is not None:
                raise SMTPError(failure.code, failure.text)
            handler = self._userHandlers[name] or default
            if handler is None:
                return None
            return handler(session)

        if delay is not None and delay.seconds > 0:
            return deferLater(self.server._reactor, delay.seconds, lambda: callHandler(lambda _: decide(), session))
        return decide()

    def _onConnect(self, session: Session) -> Any:
        return self._decide("CONNECT", [session.ip], "onConnect", session)

    def _onLogin(self, session: Session) -> Any:
        users = self.users

        def check(session: Session) -> bool:
            return users is not None and users.get(session.username) == session.password

        return self._decide("AUTH", [session.username], "onLogin", session, check)

    def _onMailFrom(self, session: Session) -> Any:
        limit = self.faults.failAfter
        if limit is not None and session.data.get(_COUNT_KEY, 0) >= limit[0]:
            raise SMTPError(limit[1], limit[2])
        return self._decide("MAIL", [session.address], "onMailFrom", session)

    def _onRcptTo(self, session: Session) -> Any:
        return self._decide("RCPT", [session.address], "onRcptTo", session)

    def _onReceive(self, session: Session) -> Any:
        try:
            result = self._decide("DATA", session.rcptTo, "onReceive", session)
        except SMTPError:
            self._receiveRefused(Failure(), session)
            raise
        if isinstance(result, defer.Deferred) or inspect.isawaitable(result):
            return toDeferred(result).addCallbacks(
                self._received, self._receiveRefused, callbackArgs=(session,), errbackArgs=(session,)
            )
        return self._received(result, session)

    def _received(self, result: Any, session: Session) -> Any:
        # Recorded only when the server will answer 250 (as it decides in
        # _receiveDecided: a returned bool, else session.received).
        accepted = result if type(result) is bool else (session.received if result is None else None)
        if accepted is True:
            self._record(session)
        return result

    def _receiveRefused(self, failure: Failure, session: Session) -> Failure:
        if failure.check(SMTPError) and failure.value.code is not None and 200 <= failure.value.code < 300:
            self._record(session)
        return failure

    def _onDisconnect(self, session: Session) -> Any:
        handler = self._userHandlers["onDisconnect"]
        return None if handler is None else handler(session)

"""
The server protocol: Twisted's L{ESMTP}, with its input path, its state
checks and its replies replaced.

Twisted's server is kept for what it does well (the C{do_}/C{ext_} command
dispatch, the extension listing, L{TimeoutMixin}, the C{host} property) and
overridden where it is wrong or slow:

- input goes through the sans-I/O framers of L{infsmtp._wire}, never line by
  line through C{LineOnlyReceiver}, and DATA is framed over whole buffers;
- while a handler's Deferred is pending, later input waits (the transport is
  paused), so pipelined replies come in order (twisted#8126);
- replies are queued and written in one write per batch of input;
- a failing handler answers 4xx, never 550, so no mail is lost to a bug;
- STARTTLS forgets everything, input pipelined behind it included.

Policy never lives here: every decision is a handler's (L{_handlers}), and
the protocol only turns decisions into replies.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import inspect
import re
import time
from typing import TYPE_CHECKING, Any, Callable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHandshakeListener, ISSLTransport
from twisted.logger import Logger
from twisted.mail import smtp
from twisted.python.failure import Failure
from zope.interface import implementer

from ._errors import SMTPError
from ._handlers import callHandler, toDeferred
from ._session import Session
from ._wire import (
    BARE_NEWLINE,
    LINE_TOO_LONG,
    LINE_TOO_LONG_IN_DATA,
    TOO_BIG,
    CommandLineFramer,
    DataFramer,
    PathSyntaxError,
    SpoolSink,
    cachedReply,
    defaultEnhancedCode,
    formatReply,
    parseCommand,
    parseMailArguments,
)
from ._writenow import closesAtOnce, isPlainTCP, writeNow

if TYPE_CHECKING:
    from ._server import ServerFactory

log = Logger(namespace="infsmtp.server")

_SAFE_HELO = re.compile(r"[^A-Za-z0-9.\-_:\[\]@]")

_dateCache: tuple[int, str] = (0, "")


def _receivedDate() -> str:
    """
    The RFC 5322 date for C{Received:}, formatted once a second (it costs
    more than the rest of the header).
    """
    global _dateCache
    now = int(time.time())
    if _dateCache[0] != now:
        _dateCache = (now, email.utils.format_datetime(email.utils.localtime()))
    return _dateCache[1]


#: Seconds a closing connection may take to flush and, over TLS, to finish
#: the close_notify exchange before it is cut off.
CLOSE_GRACE = 10.0

# An allowlist: no method inherited from Twisted (which would write to the
# transport out of order) is ever reachable from the wire.
_METHODS = {
    verb: "do_" + verb.decode("ascii")
    for verb in b"HELO EHLO MAIL RCPT DATA RSET NOOP QUIT VRFY EXPN HELP STARTTLS AUTH".split()
}

# The temporary replies for a failing handler: (code, enhanced, text).
_TRY_AGAIN = (451, "4.3.0", "Temporary failure, try again later")

# The replies of every transaction, formatted once.
_SENDER_OK = formatReply(250, "Sender OK", "2.1.0")
_RECIPIENT_OK = formatReply(250, "Recipient OK", "2.1.5")
_GO_AHEAD = formatReply(354, "End data with <CR><LF>.<CR><LF>")


@implementer(IHandshakeListener)
class ServerProtocol(smtp.ESMTP):
    """
    One SMTP session.  Built by L{ServerFactory}; see the module docstring.
    """

    factory: "ServerFactory"
    session: Session

    # State every session starts with lives on the class; an instance stores
    # only what it changes (fewer stores per connection, and a smaller
    # __dict__ per idle session).
    _timer: Any = None
    _lastInput = 0.0
    _dataFramer: DataFramer | None = None
    _busy = False
    _paused = False
    _open = False
    _closing = False
    _started = False
    _shuttingDown = False
    _errors = 0
    _authFailures = 0
    _messages = 0
    _ehlo = False
    _mailStarted = False
    _queueId = ""
    _dropRequested = False
    _lineHandler: Callable[[bytes], None] | None = None
    _heloSeen: str | None = None
    _heloSafe = ""
    _flushQueued = False
    _batchWrites = False

    def __init__(self, factory: "ServerFactory") -> None:
        super().__init__(contextFactory=factory.tlsOptions)
        self.factory = factory
        settings = factory.settings
        self.host = settings.hostname
        self.timeout = settings.idleTimeout
        self._clock = factory.clock
        self._seconds = factory.clock.seconds
        self._handlers = factory.handlers
        self._framer = CommandLineFramer(settings.maxLineLength)
        self._out: list[bytes] = []

    # Connection life ------------------------------------------------------

    def connectionMade(self) -> None:
        self._open = True
        # Replies are written in one write per batch already; Nagle would
        # only add a delayed-ACK wait to every round trip.
        setNoDelay = getattr(self.transport, "setTcpNoDelay", None)
        if setNoDelay is not None:
            try:
                setNoDelay(True)
            except OSError:
                pass  # not a TCP socket after all
        if not self.factory.admit(self):
            self._reply(421, f"{self.factory.settings.hostname} Too many connections, try again later", "4.7.0")
            self._close()
            return
        peer = self.transport.getPeer()
        self.session = Session(
            self.factory.nextSessionId(),
            str(getattr(peer, "host", peer)),
            int(getattr(peer, "port", 0) or 0),
            self._disconnectRequested,
        )
        self.session.secure = ISSLTransport.providedBy(self.transport)
        self._batchWrites = isPlainTCP(self.transport)
        self._started = True
        self._lastInput = self._seconds()
        self._armTimer(self.timeout)
        self._decide("onConnect", self._afterConnect, (421, "4.3.0", "Temporary failure, try again later"))
        self._flush()

    def _afterConnect(self, result: Any) -> None:
        if isinstance(result, bool):
            self.session.accept = result
        if self.session.accept:
            self._reply(220, f"{self.factory.settings.hostname} ESMTP infsmtp")
        else:
            self._reply(554, "No SMTP service here", "5.7.1")
            self._close()

    def handshakeCompleted(self) -> None:
        """
        TLS is up (implicit TLS or after STARTTLS): record what protects the
        session.
        """
        if not self._started:
            # Refused at connect (over maxConnections): no session; the 421
            # goes out now that TLS is up.
            return
        self.session.secure = True
        try:
            self.session.tlsVersion = self.transport.getHandle().get_protocol_version_name()
        except Exception:
            self.session.tlsVersion = "TLS"

    def connectionLost(self, reason: Failure = smtp.protocol.connectionDone) -> None:
        self._open = False
        self._cancelTimer()
        if self._started:
            self._started = False
            handler = self._handlers["onDisconnect"]
            if handler is not None:
                d = callHandler(handler, self.session)
                d.addErrback(
                    lambda f: log.failure("onDisconnect handler failed for session {id}", f, id=self.session.id)
                )
                # Releasing the last session fires stopListening()'s
                # Deferred, which must wait for onDisconnect to finish.
                d.addBoth(lambda _: self.factory.release(self))
                return
        self.factory.release(self)

    # Timeouts ------------------------------------------------------------------
    #
    # One DelayedCall per session.  Input only notes when it came; the call,
    # when it fires, re-arms itself for the rest of the period if input came
    # since.  Twisted's TimeoutMixin instead reschedules its call on every
    # read, which was a measurable share of a command's cost.

    def _armTimer(self, period: float | None) -> None:
        self._cancelTimer()
        if period:
            self._timer = self._clock.callLater(period, self._timerFired, period)

    def _cancelTimer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _timerFired(self, period: float) -> None:
        self._timer = None
        if not self._closing:
            idle = self._clock.seconds() - self._lastInput
            if idle < period:
                self._timer = self._clock.callLater(period - idle, self._timerFired, period)
                return
        self.timeoutConnection()

    def timeoutConnection(self) -> None:
        if self._closing:
            # Closing did not finish within an idle timeout: the client
            # neither read our last replies nor, over TLS, answered our
            # close_notify.  Cut it off.
            if self.transport is not None:
                self.transport.abortConnection()
            return
        self._reply(421, f"{self.factory.settings.hostname} Error: timeout exceeded", "4.4.2")
        self._close()

    def _disconnectRequested(self) -> None:
        """
        C{session.disconnect()}: answer the command in progress 421 (not
        what the handler would have answered) and close.
        """
        if not self._open or self._closing:
            return
        if self._busy:
            self._dropRequested = True
            return
        self._drop()

    def _drop(self) -> None:
        self._resetTransaction()
        self._reply(421, f"{self.factory.settings.hostname} Closing connection", "4.7.0")
        self._close()

    def shutdown(self) -> None:
        """
        The server is stopping: an idle session is told so at once; one in
        the middle of a transaction may finish it first.
        """
        self._shuttingDown = True
        if self._open and not self._busy and self._dataFramer is None and not self._mailStarted:
            self._reply(421, f"{self.factory.settings.hostname} Service shutting down", "4.3.2")
            self._close()

    # Output -----------------------------------------------------------------

    def _reply(self, code: int, text: str, enhanced: str | None = None, varies: bool = False) -> None:
        """
        Queue a reply.  C{enhanced}: the RFC 2034 code; L{None} picks a
        generic one, C{""} sends none (EHLO's extension list).  C{varies}:
        the text changes from one use to the next (not worth caching).
        """
        if enhanced is None:
            enhanced = defaultEnhancedCode(code)
        self._out.append((formatReply if varies else cachedReply)(code, text, enhanced))

    def _error(self, code: int, text: str, enhanced: str | None = None) -> None:
        """
        Answer a client error, and end a session that makes too many.
        Not cached: errors are rare, and their text may echo the client.
        """
        self._reply(code, text, enhanced, varies=True)
        self._errors += 1
        if self._errors >= self.factory.settings.maxErrors:
            self._reply(421, f"{self.factory.settings.hostname} Too many errors, closing connection", "4.7.0")
            self._close()

    def _flush(self) -> None:
        """
        Send the queued replies: at the end of this reactor iteration on
        plain TCP (see L{ServerFactory.flushSoon}), at once otherwise.
        """
        if self._out and not self._flushQueued:
            if self._batchWrites:
                self._flushQueued = True
                self.factory.flushSoon(self)
            else:
                self.flushNow()

    def flushNow(self) -> None:
        """
        Send the queued replies now, in one write.
        """
        self._flushQueued = False
        if self._out:
            data = b"".join(self._out) if len(self._out) > 1 else self._out[0]
            self._out = []
            if self.transport is not None and self._open:
                writeNow(self.transport, data)

    def _close(self) -> None:
        self._closing = True
        self.flushNow()
        if self.transport is None or not closesAtOnce(self.transport):
            # loseConnection waits until the replies are sent and, over TLS,
            # for the client's close_notify; a client that never lets it
            # finish must not hold its session (and a maxConnections slot)
            # for long.  A new call rather than the idle one moved sooner:
            # Twisted moves a DelayedCall sooner with a linear search of its
            # heap, which with 500 sessions cost ~45 us per connection.
            # (When the close finishes by itself, connectionLost, one
            # iteration away, cancels the idle call.)
            self._armTimer(CLOSE_GRACE if not self.timeout else min(self.timeout, CLOSE_GRACE))
        self._lineHandler = None
        if self.transport is not None:
            self.transport.loseConnection()

    # Input ----------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        self._lastInput = self._seconds()
        if self._dataFramer is not None and not self._busy:
            self._feedData(data)
            if self._framer.empty:
                self._afterInput()
            else:
                self._process()
        elif (
            # The lock-step case: exactly one whole command line, nothing
            # before it, nothing waiting.  Same result as going through the
            # framer, for less.
            data[-1:] == b"\n"
            and data.find(b"\n") == len(data) - 1
            and len(data) <= self._framer.maxLength + 1
            and self._framer.empty
            and not self._busy
            and self._lineHandler is None
        ):
            self._command(data[:-2] if data[-2:-1] == b"\r" else data[:-1])
            self._afterInput()
        else:
            self._framer.feed(data)
            self._process()

    def _process(self) -> None:
        """
        Act on buffered commands until one waits for a handler or the input
        runs out.
        """
        while not self._busy and not self._closing and self._dataFramer is None:
            line = self._framer.next()
            if line is None:
                break
            if self._lineHandler is not None:
                handler, self._lineHandler = self._lineHandler, None
                if line is LINE_TOO_LONG:
                    self._error(500, "Line too long", "5.5.2")
                else:
                    handler(line)
            else:
                self._command(line)
            if self._dataFramer is not None:
                rest = self._framer.takeRemainder()
                if rest:
                    self._feedData(rest)
        self._afterInput()

    def _afterInput(self) -> None:
        """
        Send the replies queued, and hold further input while a handler
        has not answered.
        """
        if self._busy and not self._paused and self._open:
            self._paused = True
            self.transport.pauseProducing()
        self._flush()

    def _wake(self) -> None:
        """
        A handler answered after a delay: go on with the waiting input.
        """
        if self._paused and self._open:
            self._paused = False
            self.transport.resumeProducing()
        self._process()

    def _command(self, line: bytes | object) -> None:
        if line is LINE_TOO_LONG:
            self._error(500, "Line too long", "5.5.2")
            return
        assert isinstance(line, bytes)
        verb, argument = parseCommand(line)
        if self._shuttingDown and not self._mailStarted and verb != b"QUIT":
            self._reply(421, f"{self.factory.settings.hostname} Service shutting down", "4.3.2")
            self._close()
            return
        method = self.lookupMethod(verb)
        if method is None:
            self._error(500, "Command unrecognized", "5.5.2")
            return
        method(argument)

    def lookupMethod(self, command: bytes) -> Callable[[bytes], None] | None:
        name = _METHODS.get(command)
        return None if name is None else getattr(self, name)

    # Handlers -------------------------------------------------------------

    def _decide(
        self,
        name: str,
        apply: Callable[[Any], None],
        temporary: tuple[int, str, str],
        then: Callable[[], None] | None = None,
    ) -> None:
        """
        Run the handler C{name} (or the default policy when none is set) and
        pass its result to C{apply}, which replies.  Input waits meanwhile.

        A handler raising L{SMTPError} chooses the reply; any other failure
        is logged and answered with the C{temporary} 4xx reply, so the
        client retries and nothing is lost to a bug.  C{then} runs after the
        reply, whichever it was.
        """
        handler = self._handlers[name]
        if handler is None:
            apply(None)
            if then is not None:
                then()
            return
        self._busy = True
        # Most handlers answer at once: call them directly and keep the
        # Deferred machinery for those that return a Deferred or awaitable.
        try:
            result = handler(self.session)
        except BaseException:
            self._handlerFailed(Failure(), name, temporary, then, True)
            return
        if type(result) is bool or result is None or not (isinstance(result, Deferred) or inspect.isawaitable(result)):
            self._handlerSucceeded(result, apply, then, True)
            return
        synchronous = True
        d = toDeferred(result)
        d.addCallbacks(
            lambda r: self._handlerSucceeded(r, apply, then, synchronous),
            lambda f: self._handlerFailed(f, name, temporary, then, synchronous),
        )
        d.addErrback(lambda f: log.failure("internal error after {handler}", f, handler=name))
        synchronous = False

    def _handlerSucceeded(
        self, result: Any, apply: Callable[[Any], None], then: Callable[[], None] | None, synchronous: bool
    ) -> None:
        self._busy = False
        if self._dropRequested:
            self._drop()
        elif self._open:
            apply(result)
            if then is not None:
                then()
            if not synchronous:
                self._wake()

    def _handlerFailed(
        self,
        failure: Failure,
        name: str,
        temporary: tuple[int, str, str],
        then: Callable[[], None] | None,
        synchronous: bool,
    ) -> None:
        self._busy = False
        if self._dropRequested:
            self._drop()
            return
        if not self._open:
            return
        if failure.check(SMTPError) and failure.value.code is not None:
            error = failure.value
            self._reply(error.code, error.text or "")
        else:
            log.failure("{handler} handler failed for session {id}", failure, handler=name, id=self.session.id)
            code, enhanced, text = temporary
            self._reply(code, text, enhanced)
        if then is not None:
            then()
        if not synchronous:
            self._wake()

    # Commands -------------------------------------------------------------

    def extensions(self) -> dict[bytes, list[bytes] | None]:
        settings = self.factory.settings
        ext: dict[bytes, list[bytes] | None] = {
            b"PIPELINING": None,
            b"SIZE": [str(settings.maxMessageSize or 0).encode()],
            b"8BITMIME": None,
            b"ENHANCEDSTATUSCODES": None,
            b"SMTPUTF8": None,
        }
        if self.factory.tlsOptions is not None and not self.session.secure:
            ext[b"STARTTLS"] = None
        if self._authOffered():
            ext[b"AUTH"] = [b"PLAIN", b"LOGIN"]
        return ext

    def _authOffered(self) -> bool:
        return self._handlers["onLogin"] is not None and (
            self.session.secure or self.factory.settings.allowInsecureAuth
        )

    def _resetTransaction(self) -> None:
        self._mailStarted = False
        self.session._resetTransaction()

    def _greet(self, argument: bytes, extended: bool) -> None:
        verb = "EHLO" if extended else "HELO"
        if not argument:
            self._error(501, f"Syntax: {verb} hostname", "5.5.4")
            return
        self._resetTransaction()
        self.session.helo = argument.decode("utf-8", "replace")
        self._ehlo = extended
        hostname = self.factory.settings.hostname
        if not extended:
            self._reply(250, hostname, "")
            return
        # The extension lines depend only on what the session may be
        # offered, so each variant is formatted once per factory.
        key = (self.session.secure, self._authOffered())
        listed = self.factory.extensionReplies.get(key)
        if listed is None:
            listed = formatReply(250, self.listExtensions().decode("ascii"), "")
            self.factory.extensionReplies[key] = listed
        self._out.append(f"250-{hostname} Hello {self.session.ip}\r\n".encode() + listed)

    def do_HELO(self, argument: bytes) -> None:
        self._greet(argument, False)

    def do_EHLO(self, argument: bytes) -> None:
        self._greet(argument, True)

    def do_NOOP(self, argument: bytes) -> None:
        self._reply(250, "OK")

    def do_RSET(self, argument: bytes) -> None:
        if argument:
            self._error(501, "Syntax: RSET", "5.5.4")
            return
        self._resetTransaction()
        self._reply(250, "OK")

    def do_QUIT(self, argument: bytes) -> None:
        self._reply(221, "Bye")
        self._close()

    def do_HELP(self, argument: bytes) -> None:
        self._reply(
            214,
            "Commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT VRFY HELP STARTTLS AUTH\n"
            "See RFC 5321",
            "2.0.0",
        )

    def do_VRFY(self, argument: bytes) -> None:
        if not argument:
            self._error(501, "Syntax: VRFY address", "5.5.4")
            return
        self._reply(252, "Cannot VRFY user, but will accept message and attempt delivery", "2.5.0")

    def do_EXPN(self, argument: bytes) -> None:
        self._error(502, "EXPN not available", "5.5.1")

    def do_MAIL(self, argument: bytes) -> None:
        settings = self.factory.settings
        if not self.session.helo:
            self._error(503, "Error: send HELO/EHLO first", "5.5.1")
            return
        if self._mailStarted:
            self._error(503, "Error: nested MAIL command", "5.5.1")
            return
        if settings.requireAuth and not self.session.authenticated:
            self._reply(530, "Authentication required", "5.7.0")
            return
        try:
            parsed = parseMailArguments(argument, b"FROM:", allowEmpty=True)
        except PathSyntaxError as e:
            self._error(501, f"Syntax: MAIL FROM:<address> ({e})", "5.5.4")
            return
        params = parsed.parameters
        for keyword, value in params.items():
            if keyword == "SIZE":
                if value is None or not value.isdigit():
                    self._error(501, "Syntax: SIZE=number", "5.5.4")
                    return
                if settings.maxMessageSize and int(value) > settings.maxMessageSize:
                    self._reply(552, "Message size exceeds fixed maximum message size", "5.3.4")
                    return
            elif keyword == "BODY":
                if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                    self._error(501, "Syntax: BODY=7BIT or BODY=8BITMIME", "5.5.4")
                    return
            elif keyword == "SMTPUTF8":
                if value is not None:
                    self._error(501, "Syntax: SMTPUTF8 takes no value", "5.5.4")
                    return
            elif keyword == "AUTH":
                pass  # RFC 4954 5: accepted, and not trusted.
            else:
                self._error(555, f"MAIL FROM parameter {keyword} not recognized", "5.5.4")
                return
        if not parsed.address.isascii() and "SMTPUTF8" not in params:
            self._reply(553, "Non-ASCII sender address needs SMTPUTF8", "5.6.7")
            return
        self._decideAddress("onMailFrom", parsed.address, params)

    def _decideAddress(self, name: str, address: str, params: dict[str, str | None] | None = None) -> None:
        """
        Let C{onMailFrom} or C{onRcptTo} decide on C{address}
        (C{session.address}, C{session.accept}), then answer.
        """
        session = self.session
        session.address = address
        session.accept = True
        if self._handlers[name] is None:
            self._addressDecided(name, address, params, None)
        else:
            self._decide(name, lambda result: self._addressDecided(name, address, params, result), _TRY_AGAIN)

    def _addressDecided(self, name: str, address: str, params: dict[str, str | None] | None, result: Any) -> None:
        session = self.session
        if isinstance(result, bool):
            session.accept = result
        if name == "onMailFrom":
            if session.accept:
                session.mailFrom = address
                session.mailParameters = params or {}
                self._mailStarted = True
                self._out.append(_SENDER_OK)
            else:
                self._reply(550, "Sender address rejected", "5.7.1")
        elif session.accept:
            session.rcptTo.append(address)
            self._out.append(_RECIPIENT_OK)
        else:
            self._reply(550, "Recipient address rejected", "5.7.1")

    def do_RCPT(self, argument: bytes) -> None:
        settings = self.factory.settings
        if not self._mailStarted:
            self._error(503, "Error: need MAIL command", "5.5.1")
            return
        try:
            parsed = parseMailArguments(argument, b"TO:", allowEmpty=False, allowPostmaster=True)
        except PathSyntaxError as e:
            self._error(501, f"Syntax: RCPT TO:<address> ({e})", "5.5.4")
            return
        if parsed.parameters:
            keyword = next(iter(parsed.parameters))
            self._error(555, f"RCPT TO parameter {keyword} not recognized", "5.5.4")
            return
        if not parsed.address.isascii() and "SMTPUTF8" not in self.session.mailParameters:
            self._reply(553, "Non-ASCII recipient address needs SMTPUTF8", "5.6.7")
            return
        if len(self.session.rcptTo) >= settings.maxRecipients:
            self._reply(452, "Too many recipients", "4.5.3")
            return
        self._decideAddress("onRcptTo", parsed.address)

    def do_DATA(self, argument: bytes) -> None:
        settings = self.factory.settings
        if argument:
            self._error(501, "Syntax: DATA", "5.5.4")
            return
        if not self._mailStarted:
            self._error(503, "Error: need MAIL command", "5.5.1")
            return
        if not self.session.rcptTo:
            self._error(554, "Error: no valid recipients", "5.5.1")
            return
        self._out.append(_GO_AHEAD)
        self._messages += 1
        # The x keeps ids apart: session 0x1's message 0x11 and session
        # 0x11's message 0x1 would both end in "111" without it.
        self._queueId = f"{self.factory.queuePrefix}{self.session.id:x}x{self._messages:x}"
        sink = SpoolSink(settings.spoolThreshold)
        if settings.receivedHeader:
            sink.write(self._receivedHeader(self._queueId))
        self._dataFramer = DataFramer(sink, settings.maxMessageSize or None, settings.maxDataLineLength)

    def _feedData(self, data: bytes) -> None:
        framer = self._dataFramer
        assert framer is not None
        rest = framer.feed(data)
        if rest is None:
            return
        self._dataFramer = None
        if rest:
            self._framer.feed(rest)
        self._messageComplete(framer)

    def _messageComplete(self, framer: DataFramer) -> None:
        session = self.session
        if framer.fault is not None:
            self._resetTransaction()
            if framer.fault == TOO_BIG:
                self._reply(552, "Message size exceeds fixed maximum message size", "5.3.4")
            elif framer.fault == LINE_TOO_LONG_IN_DATA:
                self._reply(500, "Line too long in message data", "5.5.2")
            elif framer.fault == BARE_NEWLINE:
                self._reply(550, "Message contains bare CR or LF; use CRLF line endings", "5.5.2")
            self._afterMessage()
            return
        sink = framer.sink
        assert isinstance(sink, SpoolSink)
        if sink.spooled:
            session._setMessage(None, sink.file())
        else:
            session._setMessage(sink.getvalue())
        session.received = True
        self._decide(
            "onReceive",
            self._receiveDecided,
            (451, "4.3.0", "Error processing message, try again later"),
            self._transactionDone,
        )

    def _receiveDecided(self, result: Any) -> None:
        session = self.session
        if isinstance(result, bool):
            session.received = result
        if session.received:
            # A hex id: one line, nothing to check, so no formatReply.
            self._out.append(b"250 2.0.0 OK queued as %s\r\n" % self._queueId.encode("ascii"))
        else:
            self._reply(554, "Message rejected", "5.7.1")

    def _transactionDone(self) -> None:
        self._resetTransaction()
        self._afterMessage()

    def _afterMessage(self) -> None:
        if self._shuttingDown:
            self.shutdown()

    def _receivedHeader(self, queueId: str) -> bytes:
        session = self.session
        if session.helo is not self._heloSeen:
            # Once per EHLO, not once per message.
            self._heloSeen = session.helo
            self._heloSafe = _SAFE_HELO.sub("?", session.helo)[:64] or "unknown"
        helo = self._heloSafe
        withProtocol = "ESMTP" if self._ehlo else "SMTP"
        if "SMTPUTF8" in session.mailParameters:
            withProtocol = "UTF8SMTP"
        if session.secure:
            withProtocol += "S"
        if session.authenticated:
            withProtocol += "A"
        recipient = f"\r\n\tfor <{session.rcptTo[0]}>" if len(session.rcptTo) == 1 else ""
        date = _receivedDate()
        tls = f" ({session.tlsVersion})" if session.tlsVersion else ""
        header = (
            f"Received: from {helo} ([{session.ip}])\r\n"
            f"\tby {self.factory.settings.hostname} (infsmtp) with {withProtocol}{tls}\r\n"
            f"\tid {queueId}{recipient}; {date}\r\n"
        )
        return header.encode("utf-8", "replace")

    def do_STARTTLS(self, argument: bytes) -> None:
        if argument:
            self._error(501, "Syntax: STARTTLS", "5.5.4")
            return
        if self.session.secure:
            self._error(503, "Error: TLS already active", "5.5.1")
            return
        if self.factory.tlsOptions is None:
            self._reply(454, "TLS not available", "4.7.0")
            return
        self._reply(220, "Ready to start TLS", "2.0.0")
        self.flushNow()
        # RFC 3207 4.2 and CVE-2011-0411: nothing the client sent before the
        # handshake may be acted upon, and everything learned so far is
        # forgotten.
        self._framer.clear()
        self._resetTransaction()
        self.session.helo = ""
        self._ehlo = False
        self.session.authenticated = False
        self.transport.startTLS(self.factory.tlsOptions)

    # AUTH (RFC 4954) ---------------------------------------------------------

    def do_AUTH(self, argument: bytes) -> None:
        if self._handlers["onLogin"] is None:
            self._error(502, "AUTH not available", "5.5.1")
            return
        if not self.session.secure and not self.factory.settings.allowInsecureAuth:
            self._reply(538, "Encryption required for requested authentication mechanism", "5.7.11")
            return
        if not self._ehlo:
            self._error(503, "Error: send EHLO first", "5.5.1")
            return
        if self.session.authenticated:
            self._error(503, "Error: already authenticated", "5.5.1")
            return
        if self._mailStarted:
            self._error(503, "Error: AUTH not permitted during a mail transaction", "5.5.1")
            return
        parts = argument.split()
        if not parts or len(parts) > 2:
            self._error(501, "Syntax: AUTH mechanism [initial-response]", "5.5.4")
            return
        mechanism = parts[0].upper()
        initial = parts[1] if len(parts) == 2 else None
        if mechanism == b"PLAIN":
            if initial is None:
                self._reply(334, "")
                self._lineHandler = self._authPlain
            else:
                self._authPlain(initial)
        elif mechanism == b"LOGIN":
            if initial is None:
                self._reply(334, "VXNlcm5hbWU6")  # "Username:"
                self._lineHandler = self._authLoginUsername
            else:
                self._authLoginUsername(initial)
        else:
            self._error(504, "Unrecognized authentication type", "5.5.4")

    def _decodeResponse(self, line: bytes) -> bytes | None:
        """
        Decode a base64 SASL response, answering the client when it is a
        cancel (C{*}) or not base64.
        """
        if line == b"*":
            self._error(501, "Authentication cancelled", "5.7.0")
            return None
        if line == b"=":
            return b""
        try:
            return base64.b64decode(line, validate=True)
        except (binascii.Error, ValueError):
            self._error(501, "Cannot decode response", "5.5.2")
            return None

    def _authPlain(self, line: bytes) -> None:
        decoded = self._decodeResponse(line)
        if decoded is None:
            return
        parts = decoded.split(b"\0")
        if len(parts) != 3 or not parts[1]:
            self._error(501, "Malformed PLAIN response", "5.5.2")
            return
        self._authDecoded(parts[1], parts[2])

    def _authLoginUsername(self, line: bytes) -> None:
        decoded = self._decodeResponse(line)
        if decoded is None:
            return
        self._reply(334, "UGFzc3dvcmQ6")  # "Password:"
        self._lineHandler = lambda line: self._authLoginPassword(decoded, line)

    def _authLoginPassword(self, username: bytes, line: bytes) -> None:
        decoded = self._decodeResponse(line)
        if decoded is None:
            return
        self._authDecoded(username, decoded)

    def _authDecoded(self, username: bytes, password: bytes) -> None:
        try:
            user, secret = username.decode("utf-8"), password.decode("utf-8")
        except UnicodeDecodeError:
            self._error(501, "Credentials are not UTF-8", "5.5.2")
            return
        session = self.session
        session.username, session.password = user, secret
        session.authenticated = False

        def apply(result: Any) -> None:
            if isinstance(result, bool):
                session.authenticated = result
            if session.authenticated:
                self._reply(235, "Authentication successful", "2.7.0")
                return
            self._authFailures += 1
            self._reply(535, "Authentication credentials invalid", "5.7.8")
            if self._authFailures >= self.factory.settings.maxAuthFailures:
                self._reply(421, f"{self.factory.settings.hostname} Too many authentication failures", "4.7.0")
                self._close()

        self._decide("onLogin", apply, (454, "4.7.0", "Temporary authentication failure"))

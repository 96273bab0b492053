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
- replies are queued and written in one write per batch of input, and the
  protocol is the transport's producer: a client that does not read its
  replies is no longer read from (nor are its buffered commands run) until
  it does;
- a failing, late or wrongly written handler answers 4xx, never 550 and
  never an acceptance, so no mail is lost to a bug;
- deadlines hold per command line and, in DATA, per byte (a minimum rate):
  a byte now and then does not keep a session;
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
from typing import TYPE_CHECKING, Any, Callable, NamedTuple

from twisted.internet import defer
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
    MAX_NUMBER_DIGITS,
    TOO_BIG,
    CommandLineFramer,
    DataFramer,
    PathSyntaxError,
    SpoolSink,
    cachedReply,
    decodeText,
    defaultEnhancedCode,
    formatReply,
    hasControl,
    parseCommand,
    parseMailArguments,
    parseNumber,
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
_CONNECT_TRY_AGAIN = (421, "4.3.0", "Temporary failure, try again later")

#: The session field each handler decides through.
_DECISIONS = {
    "onConnect": "accept",
    "onLogin": "authenticated",
    "onMailFrom": "accept",
    "onRcptTo": "accept",
    "onReceive": "received",
}

#: Replies queued before they are sent regardless of the batch: bounds the
#: output of one read full of pipelined commands.
MAX_QUEUED_REPLIES = 64

#: Bytes of input read on while a handler decides, before reading pauses.
MAX_HELD_WHILE_BUSY = 65536


class SessionInfo(NamedTuple):
    """
    One live session, as L{Server.sessions} lists it.
    """

    #: C{session.id}.
    id: int
    #: C{[ip]:port}, or C{unix socket}.
    peer: str
    #: C{connected}, C{greeted}, C{mail}, C{data}, C{waiting for onReceive}
    #: (a handler deciding), or C{closing}.
    state: str
    #: Seconds since it connected.
    age: float
    #: Bytes read from the client so far.
    bytes: int


class _TimedOut:
    """
    The outcome of a handler that did not answer within its deadline.
    """


_TIMED_OUT = _TimedOut()


class _Pending:
    """
    A handler's decision not made yet: what to do with it once it is.
    """

    __slots__ = ("name", "apply", "temporary", "then", "synchronous", "timer", "deferred", "started")

    def __init__(
        self,
        name: str,
        apply: Callable[[Any], None],
        temporary: tuple[int, str, str],
        then: Callable[[], None] | None,
    ) -> None:
        self.name = name
        self.apply = apply
        self.temporary = temporary
        self.then = then
        self.synchronous = True
        self.timer: Any = None
        self.deferred: Deferred | None = None
        self.started = 0.0

# The replies of every transaction, formatted once.
_SENDER_OK = formatReply(250, "Sender OK", "2.1.0")
_RECIPIENT_OK = formatReply(250, "Recipient OK", "2.1.5")
_GO_AHEAD = formatReply(354, "End data with <CR><LF>.<CR><LF>")
_AUTH_REFUSED = formatReply(535, "Authentication credentials invalid", "5.7.8")


def _nothing() -> None:
    """
    C{session.disconnect()} of a connection refused before its session.
    """


def refusalLimit(refusal: str) -> str:
    """
    The limit behind a connection refusal (L{ServerFactory.admit}'s text),
    for the session log and the metrics.
    """
    if refusal.startswith("too many connections from"):
        return "maxConnectionRate"
    if refusal.startswith("too many concurrent"):
        return "maxConnectionsPerClient"
    return "maxConnections"


def describeListener(address: Any) -> str:
    """
    C{127.0.0.1:2525}, C{[::1]:2525} or C{unix:/path}: where a session came in.
    """
    host = getattr(address, "host", None)
    if host is not None:
        return f"[{host}]:{address.port}" if ":" in host else f"{host}:{address.port}"
    name = getattr(address, "name", None)
    if isinstance(name, bytes):
        name = name.decode("utf-8", "replace")
    return f"unix:{name}" if name else str(address)


def _shortRepr(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


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
    _writeBlocked = False
    _producing = False
    _handshaking = False
    #: The client address the server's limits counted this session under
    #: (L{None} for a UNIX socket's client).
    admittedFrom: str | None = None
    _pending: _Pending | None = None
    _sink: SpoolSink | None = None
    _delayed: Any = None
    #: For the session log: the last command line, the handler whose
    #: decision is being turned into a reply, the AUTH mechanism in use,
    #: and the session's counters.
    _line: bytes | None = None
    _deciding: str | None = None
    _mechanism = ""
    _rejects = 0
    _startedAt = 0.0

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
        self._perByte = factory.secondsPerDataByte
        # Read on every command: instance attributes are cheaper to read
        # than the class's defaults.
        self._busy = self._paused = self._writeBlocked = self._closing = self._mailStarted = False
        self._dataFramer = self._lineHandler = self._sink = None
        self._commands = self._bytesIn = 0
        events = self._events = factory.events
        # Read on the success path: only the flags, never the events, when
        # no session log, metrics or debug asks for them.
        self._verbose = events.verbose
        self._timing = events.timing
        self._debug = events.debug
        if events.debug:
            # The transcript: wrappers on the instance, so that the
            # methods themselves stay as they are when debug is off.
            self._command = self._debugCommand  # type: ignore[method-assign]
            self.flushNow = self._debugFlushNow  # type: ignore[method-assign]
            self._feedData = self._debugFeedData  # type: ignore[method-assign]

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
        peer = self.transport.getPeer()
        host = getattr(peer, "host", None)
        if host is None:
            # A UNIX socket's client: no address (not "UNIXAddress(None)").
            ip = ""
        else:
            ip = str(host)
            if ip[:7] == "::ffff:" and "." in ip:
                # An IPv4 client of a dual-stack listener: its IPv4
                # address, as IPv4 allow-lists expect.
                ip = ip[7:]
        refusal = self.factory.admit(self, ip if host is not None else None)
        if refusal is not None:
            # No session: the log's is 0.
            self.session = Session(0, ip, int(getattr(peer, "port", 0) or 0), _nothing)
            self._reply(
                421, f"{self.factory.settings.hostname} {refusal}", "4.7.0", varies=True, reason=refusalLimit(refusal)
            )
            self._close()
            return
        # Twisted pauses its producer when the replies waiting to be sent
        # pass its buffer size: see pauseProducing.
        self.transport.registerProducer(self, True)
        self._producing = True
        self.session = Session(
            self.factory.nextSessionId(),
            ip,
            int(getattr(peer, "port", 0) or 0),
            self._disconnectRequested,
        )
        self.session.secure = self._handshaking = ISSLTransport.providedBy(self.transport)
        self._batchWrites = isPlainTCP(self.transport)
        self._started = True
        self._lastInput = self._startedAt = self._seconds()
        if self._verbose:
            self._events.connected(self, describeListener(self.transport.getHost()), self.session.secure)
        self._armTimer(self.timeout)
        self._decide("onConnect", self._afterConnect, _CONNECT_TRY_AGAIN)
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
        self._handshaking = False
        self.session.secure = True
        try:
            self.session.tlsVersion = self.transport.getHandle().get_protocol_version_name()
        except Exception:
            self.session.tlsVersion = "TLS"
        if self._verbose:
            self._events.tlsStarted(self, self.session.tlsVersion)

    def connectionLost(self, reason: Failure = smtp.protocol.connectionDone) -> None:
        self._open = False
        self._cancelTimer()
        # Let go of everything the session held for the connection at once,
        # not when the cyclic garbage collector happens to run: a session
        # reset in DATA holds a buffer of up to the spool threshold and,
        # beyond, an open spool file.
        pending, self._pending = self._pending, None
        if pending is not None and pending.timer.active():
            pending.timer.cancel()
        delayed, self._delayed = self._delayed, None
        if delayed is not None and delayed.active():
            delayed.cancel()
        self._dataFramer = None
        self._releaseSink()
        self._framer.clear()
        self._out = []
        self._lineHandler = None
        if self._started:
            self._started = False
            session = self.session
            if self._verbose:
                self._events.disconnected(
                    self, self._commands, self._messages, self._rejects, self._bytesIn, self._seconds() - self._startedAt
                )
            handler = self._handlers["onDisconnect"]
            if handler is not None:
                d = callHandler(handler, session)
                d.addTimeout(self.factory.settings.handlerTimeout, self._clock)
                d.addErrback(self._disconnectHandlerFailed, session.id)
                # Releasing the last session fires stopListening()'s
                # Deferred, which must wait for onDisconnect to finish.
                d.addBoth(lambda _: (session._release(), self.factory.release(self)))
                return
            session._release()
        self.factory.release(self)

    def _disconnectHandlerFailed(self, failure: Failure, sessionId: int) -> None:
        if failure.check(defer.TimeoutError):
            log.warn(
                "onDisconnect handler did not finish within {deadline:g} seconds (session {id})",
                deadline=self.factory.settings.handlerTimeout,
                id=sessionId,
            )
        else:
            log.failure("onDisconnect handler failed for session {id}", failure, id=sessionId)

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
            if self._busy:
                # A handler is deciding (or a failed login is made to
                # wait): the handler's own deadline applies, not the
                # client's.
                self._timer = self._clock.callLater(period, self._timerFired, period)
                return
            # _lastInput is when the client last completed something: a
            # command line, or (in DATA) enough bytes at the minimum rate.
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
        inData = self._dataFramer is not None
        self._reply(
            421,
            f"{self.factory.settings.hostname} Error: timeout exceeded",
            "4.4.2",
            reason="minDataRate" if inData else "timeout",
        )
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
        self._reply(421, f"{self.factory.settings.hostname} Closing connection", "4.7.0", reason="disconnect")
        self._resetTransaction()
        self._close()

    def shutdown(self) -> None:
        """
        The server is stopping: an idle session is told so at once; one in
        the middle of a transaction may finish it first.
        """
        self._shuttingDown = True
        if self._open and not self._busy and self._dataFramer is None and not self._mailStarted:
            self._reply(421, f"{self.factory.settings.hostname} Service shutting down", "4.3.2", reason="shutdown")
            self._close()

    # Output -----------------------------------------------------------------

    def _reply(
        self, code: int, text: str, enhanced: str | None = None, varies: bool = False, reason: str | None = None
    ) -> None:
        """
        Queue a reply.  C{enhanced}: the RFC 2034 code; L{None} picks a
        generic one, C{""} sends none (EHLO's extension list).  C{varies}:
        the text changes from one use to the next (not worth caching).
        C{reason}: for a 4xx or 5xx, the short name the session log and
        the metrics give it (the limit, C{protocol}, ...; a handler's
        decision is the handler's name).
        """
        if enhanced is None:
            enhanced = defaultEnhancedCode(code)
        self._out.append((formatReply if varies else cachedReply)(code, text, enhanced))
        if code >= 400:
            self._refused(code, reason)

    def _refused(self, code: int, reason: str | None) -> None:
        """
        Report the 4xx/5xx reply just queued to the session log: the
        command that caused it and the handler that chose it.
        """
        # The text as sent (its lines joined), after the code.
        lines = self._out[-1].decode("utf-8", "replace").split("\r\n")
        reply = " / ".join(line[4:] for line in lines if line)
        self._rejects += 1
        handler = self._deciding
        if handler == "onLogin" and code >= 500:
            # An onLogin that refused with its own 5xx: a failed login.
            self._events.authenticated(self, self._mechanism, False)
            return
        self._events.rejected(self, code, reply, self._line, handler, reason or handler or "protocol")

    def _error(self, code: int, text: str, enhanced: str | None = None, reason: str = "protocol") -> None:
        """
        Answer a client error, and end a session that makes too many.
        Not cached: errors are rare, and their text may echo the client.
        """
        self._reply(code, text, enhanced, varies=True, reason=reason)
        self._errors += 1
        if self._errors >= self.factory.settings.maxErrors:
            self._reply(
                421,
                f"{self.factory.settings.hostname} Too many errors, closing connection",
                "4.7.0",
                reason="maxErrors",
            )
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
            if self._producing:
                # TLS waits for its producer to go before it closes.
                self._producing = False
                self.transport.unregisterProducer()
            self.transport.loseConnection()

    # Backpressure (IPushProducer, registered on the transport) ----------

    def pauseProducing(self) -> None:
        """
        The transport holds more unsent replies than its buffer size: the
        client is not reading them.  Read nothing more from it, and run no
        more of its buffered commands, until it does (a client that never
        does is cut off by the deadline of its next command).
        """
        if self._handshaking:
            # TLS holds the greeting until the handshake is done, and
            # says so this way; reading on is what lets it finish.
            return
        self._writeBlocked = True
        self._updateReading()

    def resumeProducing(self) -> None:
        """
        The replies have drained: go on with the buffered commands, then
        read again.
        """
        self._writeBlocked = False
        if self._open and not self._closing:
            self._process()

    def stopProducing(self) -> None:
        """
        The connection is gone; L{connectionLost} does the cleaning.
        """

    def _updateReading(self) -> None:
        """
        Read from the transport unless the client is not reading our
        replies, or a handler is deciding (or a failed login waiting) and
        the input held meanwhile has reached L{MAX_HELD_WHILE_BUSY}: until
        then, reading goes on, so a client that leaves is noticed at once
        (its slot freed) rather than when the handler answers.
        """
        hold = self._writeBlocked or (self._busy and self._framer.buffered >= MAX_HELD_WHILE_BUSY)
        if hold != self._paused and self._open and not self._closing:
            self._paused = hold
            if hold:
                self.transport.pauseProducing()
            else:
                self.transport.resumeProducing()

    # Input ----------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        self._bytesIn += len(data)
        now = self._seconds()
        if self._dataFramer is not None and not self._busy:
            # In DATA, bytes buy time at the minimum data rate, never more
            # than the timeout: a sender trickling a byte now and then runs
            # out of time however often it sends.
            credit = self._lastInput + len(data) * self._perByte
            self._lastInput = credit if credit < now else now
            self._feedData(data)
            if self._dataFramer is None:
                # The end of data completes a record like a command line.
                self._lastInput = now
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
            and len(data) <= self._framer.maxLength
            and self._framer.empty
            and not self._busy
            and not self._writeBlocked
            and self._lineHandler is None
        ):
            self._lastInput = now
            self._command(data[:-2] if data[-2:-1] == b"\r" else data[:-1])
            self._afterInput()
        else:
            # Only a completed line restarts the deadline: a line trickled
            # in byte by byte must still end within the timeout.
            framer = self._framer
            lines = framer.lines
            framer.feed(data)
            self._process()
            if framer.lines != lines:
                self._lastInput = now

    def _process(self) -> None:
        """
        Act on buffered commands until one waits for a handler, the client
        stops reading our replies, or the input runs out.
        """
        while not self._busy and not self._closing and self._dataFramer is None and not self._writeBlocked:
            if len(self._out) >= MAX_QUEUED_REPLIES:
                # A read full of pipelined commands: send what is queued
                # now, which tells us (pauseProducing) whether the client
                # reads it, rather than queueing a reply for every one.
                self.flushNow()
                continue
            line = self._framer.next()
            if line is None:
                break
            if self._lineHandler is not None:
                handler, self._lineHandler = self._lineHandler, None
                if self._debug:
                    # A SASL response: it holds the password.
                    self._events.transcript(self, "<", "***")
                if line is LINE_TOO_LONG:
                    self._error(500, "Line too long", "5.5.2", reason="maxLineLength")
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
        has not answered or the client does not read.
        """
        if self._busy or self._paused:
            self._updateReading()
        self._flush()

    def _wake(self) -> None:
        """
        A handler answered after a delay: go on with the waiting input
        (the client's deadline starts again: it was waiting for us).
        """
        self._lastInput = self._seconds()
        self._process()

    def _command(self, line: bytes | object) -> None:
        self._commands += 1
        if line is LINE_TOO_LONG:
            self._line = None
            self._error(500, "Line too long", "5.5.2", reason="maxLineLength")
            return
        assert isinstance(line, bytes)
        self._line = line
        verb, argument = parseCommand(line)
        if self._shuttingDown and not self._mailStarted and verb != b"QUIT":
            self._reply(421, f"{self.factory.settings.hostname} Service shutting down", "4.3.2", reason="shutdown")
            self._close()
            return
        method = self.lookupMethod(verb)
        if method is None:
            self._error(500, "Command unrecognized", "5.5.2")
            return
        try:
            method(argument)
        except Exception:
            # A bug of ours must not drop the session without a word (nor
            # the replies queued before it): say so, and close cleanly.
            log.failure(
                "internal error on {verb} in session {id}", verb=verb.decode("ascii"), id=self.session.id
            )
            self._busy = False
            self._reply(
                421, f"{self.factory.settings.hostname} Internal error, closing connection", "4.3.0", reason="internal"
            )
            self._close()

    def lookupMethod(self, command: bytes) -> Callable[[bytes], None] | None:
        name = _METHODS.get(command)
        return None if name is None else getattr(self, name)

    # The debug transcript (installed on the instance by __init__) -----------

    def _debugCommand(self, line: bytes | object) -> None:
        if line is LINE_TOO_LONG:
            text = "(line too long)"
        else:
            assert isinstance(line, bytes)
            parts = line.split(None, 2)
            if len(parts) > 1 and parts[0].upper() == b"AUTH":
                # The initial response holds the password (PLAIN) or the
                # user name (LOGIN).
                text = "AUTH " + parts[1].decode("ascii", "replace") + (" ***" if len(parts) > 2 else "")
            else:
                text = line.decode("utf-8", "replace")
        self._events.transcript(self, "<", text)
        ServerProtocol._command(self, line)

    def _debugFeedData(self, data: bytes) -> None:
        self._events.transcript(self, "<", f"({len(data)} bytes of message data)")
        ServerProtocol._feedData(self, data)

    def _debugFlushNow(self) -> None:
        if self.transport is not None and self._open:
            for reply in self._out:
                for line in reply.decode("utf-8", "replace").split("\r\n"):
                    if line:
                        self._events.transcript(self, ">", line)
        ServerProtocol.flushNow(self)

    # A view for an admin page ------------------------------------------------

    def describe(self) -> "SessionInfo":
        """
        What L{Server.sessions} shows of this session.
        """
        if self._closing:
            state = "closing"
        elif self._pending is not None:
            state = f"waiting for {self._pending.name}"
        elif self._dataFramer is not None:
            state = "data"
        elif self._mailStarted:
            state = "mail"
        elif self.session.helo:
            state = "greeted"
        else:
            state = "connected"
        session = self.session
        peer = f"[{session.ip}]:{session.port}" if session.ip else "unix socket"
        return SessionInfo(session.id, peer, state, max(0.0, self._seconds() - self._startedAt), self._bytesIn)

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

        Fail closed: the handler's result must be L{None} or a C{bool}, and
        its decision field a C{bool}.  A handler raising L{SMTPError}
        chooses the reply (a 2xx one accepts, with that text); anything
        else (another exception, another result, no answer within the
        handler deadline) is logged and answered with the C{temporary} 4xx
        reply, so the client retries: nothing is lost to a bug, and nothing
        is accepted by one.  C{then} runs after the reply, whichever it was.
        """
        handler = self._handlers[name]
        if handler is None:
            apply(None)
            if then is not None:
                then()
            return
        self._busy = True
        started = self._seconds() if self._timing else 0.0
        # Most handlers answer at once: call them directly and keep the
        # Deferred machinery for those that return a Deferred or awaitable.
        try:
            result = handler(self.session)
        except BaseException:
            if self._timing:
                self._events.handlerTimed(self, name, self._seconds() - started)
            self._decided(name, apply, temporary, then, Failure(), True)
            return
        if result is None or type(result) is bool or not (isinstance(result, Deferred) or inspect.isawaitable(result)):
            if self._timing:
                self._events.handlerTimed(self, name, self._seconds() - started)
            self._decided(name, apply, temporary, then, result, True)
            return
        pending = self._pending = _Pending(name, apply, temporary, then)
        pending.started = started
        settings = self.factory.settings
        deadline = settings.receiveTimeout if name == "onReceive" else settings.handlerTimeout
        pending.timer = self._clock.callLater(deadline, self._handlerTimedOut, pending, deadline)
        d = pending.deferred = toDeferred(result)
        d.addBoth(self._handlerAnswered, pending)
        d.addErrback(lambda f: log.failure("internal error after {handler}", f, handler=name))
        pending.synchronous = False

    def _handlerAnswered(self, outcome: Any, pending: _Pending) -> None:
        if self._pending is not pending:
            return  # too late (answered 4xx already), or the client left
        self._pending = None
        if pending.timer.active():
            pending.timer.cancel()
        if self._timing:
            self._events.handlerTimed(self, pending.name, self._seconds() - pending.started)
        self._decided(pending.name, pending.apply, pending.temporary, pending.then, outcome, pending.synchronous)

    def _handlerTimedOut(self, pending: _Pending, deadline: float) -> None:
        if self._pending is not pending:
            return
        self._pending = None
        log.warn(
            "{handler} handler did not answer within {deadline:g} seconds (session {id}): answered {code}",
            handler=pending.name,
            deadline=deadline,
            id=self.session.id,
            code=pending.temporary[0],
        )
        if self._timing:
            self._events.handlerTimed(self, pending.name, self._seconds() - pending.started)
        self._decided(pending.name, pending.apply, pending.temporary, pending.then, _TIMED_OUT, False)
        # Tell the handler (a coroutine gets CancelledError); its late
        # outcome is ignored above.
        assert pending.deferred is not None
        pending.deferred.cancel()

    def _decided(
        self,
        name: str,
        apply: Callable[[Any], None],
        temporary: tuple[int, str, str],
        then: Callable[[], None] | None,
        outcome: Any,
        synchronous: bool,
    ) -> None:
        """
        A handler's outcome (its result, a L{Failure} or L{_TIMED_OUT}):
        reply accordingly.
        """
        self._busy = False
        if not self._open and not self._dropRequested:
            return
        # Replies from here on were chosen by this handler (the log says so).
        self._deciding = name
        if self._dropRequested:
            self._drop()
            self._deciding = None
            return
        problem = None
        if type(outcome) is bool:
            apply(outcome)
        elif outcome is None:
            # The decision is the field the handler set, which must be a
            # bool (a returned bool overrides it, so it is not looked at).
            value = getattr(self.session, _DECISIONS[name])
            if type(value) is bool:
                apply(None)
            else:
                problem = f"set session.{_DECISIONS[name]} to {_shortRepr(value)}, not True or False"
        elif isinstance(outcome, Failure) and outcome.check(SMTPError) and outcome.value.code is not None:
            code, text = outcome.value.code, outcome.value.text or ""
            if 200 <= code < 300:
                # An acceptance with the handler's own words: every apply
                # queues its positive reply first when told True, and that
                # reply is replaced (rather than every apply asking whether
                # to, on the path of every message).
                queued = len(self._out)
                apply(True)
                if len(self._out) > queued:
                    self._out[queued] = formatReply(code, text, defaultEnhancedCode(code))
            elif 400 <= code < 600:
                self._reply(code, text, varies=True)
                if code == 421 or name == "onConnect":
                    # 421 closes (RFC 5321 3.8); a refused greeting too.
                    self._close()
            else:
                problem = f"raised SMTPError with code {code}, not a 2xx, 4xx or 5xx reply"
        elif isinstance(outcome, Failure):
            log.failure("{handler} handler failed for session {id}", outcome, handler=name, id=self.session.id)
            self._temporary(temporary)
        elif outcome is _TIMED_OUT:
            self._temporary(temporary)
        else:
            problem = f"returned {type(outcome).__name__} {_shortRepr(outcome)}, not None, True or False"
        if problem is not None:
            log.error(
                "{handler} handler {problem} (session {id}): answered {code}",
                handler=name,
                problem=problem,
                id=self.session.id,
                code=temporary[0],
            )
            self._temporary(temporary)
        self._deciding = None
        if then is not None:
            then()
        if not synchronous:
            self._wake()

    def _temporary(self, temporary: tuple[int, str, str]) -> None:
        code, enhanced, text = temporary
        self._reply(code, text, enhanced)
        if code == 421:
            self._close()

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
        if self._sink is not None:
            self._releaseSink()
        self.session._resetTransaction()

    def _releaseSink(self) -> None:
        """
        The current message is no longer held: give its memory back to the
        server's budget.
        """
        sink, self._sink = self._sink, None
        if sink is not None:
            sink.release()

    def _greet(self, argument: bytes, extended: bool) -> None:
        verb = "EHLO" if extended else "HELO"
        if not argument:
            self._error(501, f"Syntax: {verb} hostname", "5.5.4")
            return
        helo = decodeText(argument)
        if helo is None:
            self._error(501, f"Syntax: {verb} hostname (control characters or bad UTF-8)", "5.5.2")
            return
        self._resetTransaction()
        self.session.helo = helo
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
        self._out.append(f"250-{hostname} Hello {self.session.ip or 'unix socket'}\r\n".encode() + listed)

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
            self._reply(530, "Authentication required", "5.7.0", reason="requireAuth")
            return
        try:
            parsed = parseMailArguments(argument, b"FROM:", allowEmpty=True)
        except PathSyntaxError as e:
            self._error(501, f"Syntax: MAIL FROM:<address> ({e})", "5.5.4")
            return
        params = parsed.parameters
        for keyword, value in params.items():
            if keyword == "SIZE":
                size = parseNumber(value)
                if size is None:
                    self._error(501, f"Syntax: SIZE=number (1 to {MAX_NUMBER_DIGITS} digits)", "5.5.4")
                    return
                if settings.maxMessageSize and size > settings.maxMessageSize:
                    self._reply(552, "Message size exceeds fixed maximum message size", "5.3.4", reason="maxMessageSize")
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
            self._reply(553, "Non-ASCII sender address needs SMTPUTF8", "5.6.7", reason="smtputf8")
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
            self._reply(553, "Non-ASCII recipient address needs SMTPUTF8", "5.6.7", reason="smtputf8")
            return
        if len(self.session.rcptTo) >= settings.maxRecipients:
            self._reply(452, "Too many recipients", "4.5.3", reason="maxRecipients")
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
        self._queueId = self.session.queueId = f"{self.factory.queuePrefix}{self.session.id:x}x{self._messages:x}"
        sink = self._sink = SpoolSink(settings.spoolThreshold, self.factory.memoryBudget)
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
            # Replied before the reset: the log line names the message.
            if framer.fault == TOO_BIG:
                self._reply(552, "Message size exceeds fixed maximum message size", "5.3.4", reason="maxMessageSize")
            elif framer.fault == LINE_TOO_LONG_IN_DATA:
                self._reply(500, "Line too long in message data", "5.5.2", reason="maxDataLineLength")
            elif framer.fault == BARE_NEWLINE:
                self._reply(550, "Message contains bare CR or LF; use CRLF line endings", "5.5.2", reason="bareNewline")
            self._resetTransaction()
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
            if self._verbose:
                sink = self._sink
                self._events.accepted(self, sink.size if sink is not None else 0)
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
        client = f"[{session.ip}]" if session.ip else "unix socket"
        header = (
            f"Received: from {helo} ({client})\r\n"
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
            self._reply(454, "TLS not available", "4.7.0", reason="tlsUnavailable")
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
        self._handshaking = True
        self.transport.startTLS(self.factory.tlsOptions)

    # AUTH (RFC 4954) ---------------------------------------------------------

    def do_AUTH(self, argument: bytes) -> None:
        if self._handlers["onLogin"] is None:
            self._error(502, "AUTH not available", "5.5.1")
            return
        if not self.session.secure and not self.factory.settings.allowInsecureAuth:
            self._reply(538, "Encryption required for requested authentication mechanism", "5.7.11", reason="authNeedsTls")
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
        if self.factory.limits.authBlocked(self.session.ip):
            self._reply(
                421,
                f"{self.factory.settings.hostname} Too many authentication failures from {self.session.ip}, "
                "try again later",
                "4.7.0",
                varies=True,
                reason="maxAuthFailuresPerClient",
            )
            self._close()
            return
        parts = argument.split()
        if not parts or len(parts) > 2:
            self._error(501, "Syntax: AUTH mechanism [initial-response]", "5.5.4")
            return
        mechanism = parts[0].upper()
        initial = parts[1] if len(parts) == 2 else None
        self._mechanism = mechanism.decode("ascii", "replace")
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
        if hasControl(user):
            self._error(501, "Control character in user name", "5.5.2")
            return
        session = self.session
        session.username, session.password = user, secret
        session.authenticated = False
        self._decide(
            "onLogin", self._loginDecided, (454, "4.7.0", "Temporary authentication failure"), self._forgetPassword
        )

    def _loginDecided(self, result: Any) -> None:
        session = self.session
        if isinstance(result, bool):
            session.authenticated = result
        if session.authenticated:
            self._reply(235, "Authentication successful", "2.7.0")
            self._events.authenticated(self, self._mechanism, True)
            return
        self._authFailures += 1
        delay = self.factory.limits.authFailed(session.ip)
        if delay <= 0:
            self._loginRefused()
            return
        # A tarpit: the 535 waits, longer with each failure of this client
        # (across its connections), and so does everything pipelined after.
        self._busy = True
        self._delayed = self._clock.callLater(delay, self._loginRefusedLater)

    def _loginRefusedLater(self) -> None:
        self._delayed = None
        self._busy = False
        if self._dropRequested:
            self._drop()
            return
        self._loginRefused()
        self._wake()

    def _loginRefused(self) -> None:
        # An AUTH failure line (what fail2ban reads), not a reject line.
        self._out.append(_AUTH_REFUSED)
        self._rejects += 1
        self._events.authenticated(self, self._mechanism, False)
        if self._authFailures >= self.factory.settings.maxAuthFailures:
            self._reply(
                421, f"{self.factory.settings.hostname} Too many authentication failures", "4.7.0", reason="maxAuthFailures"
            )
            self._close()

    def _forgetPassword(self) -> None:
        # The password is for onLogin only.
        self.session.password = ""

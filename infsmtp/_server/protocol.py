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

from typing import TYPE_CHECKING, Any, Callable, NamedTuple

from twisted.internet import defer
from twisted.internet.interfaces import IHandshakeListener, ISSLTransport
from twisted.logger import Logger
from twisted.mail import smtp
from twisted.python.failure import Failure
from zope.interface import implementer

from .._wire import (
    LINE_TOO_LONG,
    CommandLineFramer,
    DataFramer,
    SpoolSink,
    decodeText,
    formatReply,
    parseCommand,
)
from .._writenow import isPlainTCP
from .decisions import _CONNECT_TRY_AGAIN, HandlerDecisions, _Pending
from .handlers import callHandler
from .output import ReplyOutput
from .policy import PolicyHooks
from .sasl import SASLExchange
from .session import Session
from .tls import CurrentCertificate
from .tlslayer import ServerTLS
from .transaction import MailTransaction

if TYPE_CHECKING:
    from .server import ServerFactory

log = Logger(namespace="infsmtp.server")

# An allowlist: no method inherited from Twisted (which would write to the
# transport out of order) is ever reachable from the wire.
_METHODS = {
    verb: "do_" + verb.decode("ascii")
    for verb in b"HELO EHLO LHLO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY EXPN HELP STARTTLS AUTH".split()
}

#: Replies queued before they are sent regardless of the batch: bounds the
#: output of one read full of pipelined commands.
MAX_QUEUED_REPLIES = 64

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


@implementer(IHandshakeListener)
class ServerProtocol(ReplyOutput, HandlerDecisions, MailTransaction, SASLExchange, PolicyHooks, smtp.ESMTP):
    """
    One SMTP session.  Built by L{ServerFactory}; see the module docstring.

    Its rooms are mixins, each in its own module (methods of the protocol
    itself, so the per-command path calls no other object):
    L{ReplyOutput} (replies, the close, flow control), L{HandlerDecisions}
    (a handler's outcome turned into a reply), L{MailTransaction} (MAIL,
    RCPT, DATA and the message), L{SASLExchange} (AUTH), L{PolicyHooks}
    (pregreet detection, C{onEhlo}, C{onVrfy}).  What is left
    here: the connection's life, its deadlines, the input path, the
    commands of the session itself (EHLO, RSET, STARTTLS, ...) and their
    dispatch.
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
    #: The client address the server's limits counted this session under
    #: (L{None} for a UNIX socket's client).
    admittedFrom: str | None = None
    _pending: _Pending | None = None
    _sink: SpoolSink | None = None
    #: BDAT: the message's bytes in the chunks so far, and the reply owed to
    #: a refused chunk once its octets are read.
    _chunked = 0
    _chunkRefusal: tuple[int, str, str] | None = None
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
        # Not ESMTP.__init__: of what it and SMTP.__init__ set (mode, _from,
        # _to, _helo, delivery, deliveryFactory, challengers, ctx,
        # authenticated) nothing serves here (their state machine and AUTH
        # are not used; the session holds ours), and nine attributes more
        # in every connection's dict cost it a resize (callgrind: about 1 %
        # of a connection per message).
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
        # Read once per message.
        self._lmtp = settings.lmtp
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
        raw = self.transport
        implicit = self.factory.implicitTLS
        if implicit is not None:
            # Before anything is written: the greeting (or a refusal) goes
            # out once the handshake is done.
            self._startTLS(implicit)
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
        # Implicit TLS (started above), or a TLS endpoint of Twisted's.
        self.session.secure = implicit is not None or ISSLTransport.providedBy(self.transport)
        self._batchWrites = isPlainTCP(raw)
        self._started = True
        self._lastInput = self._startedAt = self._seconds()
        if self._verbose:
            self._events.connected(self, describeListener(self.transport.getHost()), self.session.secure)
        self._armTimer(self.timeout)
        if self.factory.settings.greetDelay:
            # Pregreet detection: onConnect and the 220 wait.
            self._waitToGreet(self.factory.settings.greetDelay)
            return
        self._decide("onConnect", self._afterConnect, _CONNECT_TRY_AGAIN)
        self._flush()

    def _afterConnect(self, result: Any) -> None:
        if isinstance(result, bool):
            self.session.accept = result
        if self.session.accept:
            self._reply(220, self.factory.settings.greeting)
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
        # Ours (ServerTLS), else a TLS endpoint of Twisted's.
        version = getattr(self.transport, "tlsVersion", None)
        if version is None:
            try:
                version = self.transport.getHandle().get_protocol_version_name()
            except Exception:
                version = "TLS"
        self.session.tlsVersion = version
        if self._verbose:
            self._events.tlsStarted(self, version, bool(getattr(self.transport, "tlsResumed", False)))

    def connectionLost(self, reason: Failure = smtp.protocol.connectionDone) -> None:
        self._open = False
        if type(self.transport) is ServerTLS:
            self.transport.release()
            del self.dataReceived
        self._cancelTimer()
        # Let go of everything the session held for the connection at once,
        # not when the cyclic garbage collector happens to run: a session
        # reset in DATA holds a buffer of up to the spool threshold and,
        # beyond, an open spool file.
        pending, self._pending = self._pending, None
        if pending is not None:
            if pending.timer.active():
                pending.timer.cancel()
            if self._greetWaiting:
                # Gone while onConnect decided, before the greeting.
                self._stopWaitingToGreet()
        delayed, self._delayed = self._delayed, None
        if delayed is not None:
            if delayed.active():
                delayed.cancel()
            if self._greetWaiting:
                # Gone during the greeting delay.
                self._stopWaitingToGreet()
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

    # Backpressure (IPushProducer, registered on the transport) ----------

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
        if settings.dsn:
            ext[b"DSN"] = None
        if settings.chunking:
            ext[b"CHUNKING"] = None
        if self.factory.tlsOptions is not None and not self.session.secure:
            ext[b"STARTTLS"] = None
        if self._authOffered():
            ext[b"AUTH"] = [b"PLAIN", b"LOGIN"]
        return ext

    def _authOffered(self) -> bool:
        return self._handlers["onLogin"] is not None and (
            self.session.secure or self.factory.settings.allowInsecureAuth
        )

    def _greet(self, argument: bytes, extended: bool) -> None:
        verb = ("LHLO" if self._lmtp else "EHLO") if extended else "HELO"
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
        if self._handlers["onEhlo"] is not None:
            self._ehloHook()
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
        if self._lmtp:
            self._error(500, "Error: this is LMTP: send LHLO", "5.5.1")
            return
        self._greet(argument, False)

    def do_EHLO(self, argument: bytes) -> None:
        if self._lmtp:
            self._error(500, "Error: this is LMTP: send LHLO", "5.5.1")
            return
        self._greet(argument, True)

    def do_LHLO(self, argument: bytes) -> None:
        """
        LMTP's EHLO (RFC 2033 4.1); unknown to an SMTP server.
        """
        if not self._lmtp:
            self._error(500, "Command unrecognized", "5.5.2")
            return
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
        if self.factory.settings.requireStartTls and not self.session.secure:
            self._reply(530, "Must issue a STARTTLS command first", "5.7.0", reason="requireStartTls")
            return
        if self._handlers["onVrfy"] is not None:
            self._vrfyHook(argument)
            return
        self._reply(252, "Cannot VRFY user, but will accept message and attempt delivery", "2.5.0")

    def do_EXPN(self, argument: bytes) -> None:
        self._error(502, "EXPN not available", "5.5.1")

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
        if self._withdrawnBy("STARTTLS"):
            # onEhlo removed it for this client (Postfix's reply).
            self._error(502, "Error: command not implemented", "5.5.1")
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
        if getattr(self.transport, "simulatesTLS", False):
            # The testing harness's transport: it records the request, and
            # the test says when the handshake is done.
            self.transport.startTLS(self.factory.tlsOptions)
        else:
            self._startTLS(self.factory.tlsOptions)

    def _startTLS(self, contexts: CurrentCertificate) -> None:
        """
        Put TLS between the transport and this protocol: the protocol
        writes to a L{ServerTLS}, which reads the transport's bytes in
        place of this protocol's L{dataReceived} (on this instance only)
        and hands it the plaintext.
        """
        tls = ServerTLS(self.transport, contexts, self.dataReceived, self.handshakeCompleted, self.flushNow)
        self.transport = tls
        self.dataReceived = tls.dataReceived  # type: ignore[method-assign]

    # AUTH (RFC 4954) ---------------------------------------------------------

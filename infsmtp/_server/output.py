"""
The server's output room: replies queued and sent in one write per batch
of input, the close, and the flow control that stops reading from a client
that does not read its replies.

A mixin of L{infsmtp._server.protocol.ServerProtocol} (its methods run on every
command, so they live on the protocol itself rather than on an object it
would call through).  It uses the protocol's C{transport}, C{factory},
C{_events} and timers.
"""

from __future__ import annotations

from .._wire import cachedReply, defaultEnhancedCode, formatReply
from .._writenow import closesAtOnce, writeNow
from .tlslayer import ServerTLS

#: Seconds a closing connection may take to flush and, over TLS, to finish
#: the close_notify exchange before it is cut off.
CLOSE_GRACE = 10.0

#: Bytes of input read on while a handler decides, before reading pauses.
MAX_HELD_WHILE_BUSY = 65536



class ReplyOutput:
    """
    Queue replies (C{_out}), send them in one write per batch (C{_flush},
    L{flushNow}), close after them (C{_close}), and be the transport's
    producer (L{pauseProducing}, L{resumeProducing}).
    """

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
        if type(self.transport) is ServerTLS:
            # The last replies and close_notify in one write.
            self.transport.cork()
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

    def pauseProducing(self) -> None:
        """
        The transport holds more unsent replies than its buffer size: the
        client is not reading them.  Read nothing more from it, and run no
        more of its buffered commands, until it does (a client that never
        does is cut off by the deadline of its next command).
        """
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

"""
The server's decisions room: a handler (C{onConnect} ... C{onReceive})
runs, and its outcome, whatever it is, becomes a reply: fail closed, with a
deadline, and in order with the pipelined input that waits meanwhile.

A mixin of L{infsmtp._server.protocol.ServerProtocol}; policy never lives here,
only the turning of decisions into replies.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from .._errors import SMTPError
from .._wire import defaultEnhancedCode, formatReply
from .handlers import toDeferred

log = Logger(namespace="infsmtp.server")

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
    "onEhlo": "accept",
    "onVrfy": "accept",
}

#: Handlers that may leave their decision field L{None}: they had nothing
#: to say (C{onVrfy}: VRFY answers 252 then).
_MAY_ABSTAIN = frozenset({"onVrfy"})


class _TimedOut:
    """
    The outcome of a handler that did not answer within its deadline.
    """


_TIMED_OUT = _TimedOut()


class _Pending:
    """
    A handler's decision not made yet: what to do with it once it is.
    """

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


def _shortRepr(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class HandlerDecisions:
    """
    Run a handler and turn its outcome into a reply (L{_decide}).
    """

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
            if type(value) is bool or (value is None and name in _MAY_ABSTAIN):
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
                if len(self._out) > queued and self._replyCount(name) == 1:
                    self._out[queued] = formatReply(code, text, defaultEnhancedCode(code))
            elif 400 <= code < 600:
                for _ in range(self._replyCount(name)):
                    self._reply(code, text, varies=True)
                if code == 421 or name == "onConnect":
                    # 421 closes (RFC 5321 3.8); a refused greeting too.
                    self._close()
            else:
                problem = f"raised SMTPError with code {code}, not a 2xx, 4xx or 5xx reply"
        elif isinstance(outcome, Failure):
            log.failure("{handler} handler failed for session {id}", outcome, handler=name, id=self.session.id)
            self._temporary(temporary, name)
        elif outcome is _TIMED_OUT:
            self._temporary(temporary, name)
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
            self._temporary(temporary, name)
        self._deciding = None
        if then is not None:
            then()
        if not synchronous:
            self._wake()

    def _replyCount(self, name: str) -> int:
        """
        How many replies the decision of handler C{name} answers: one, but
        in LMTP one per accepted recipient for C{onReceive} (RFC 2033 4.2).
        """
        return len(self.session.rcptTo) if name == "onReceive" and self._lmtp else 1

    def _temporary(self, temporary: tuple[int, str, str], name: str = "") -> None:
        code, enhanced, text = temporary
        for _ in range(self._replyCount(name)):
            self._reply(code, text, enhanced)
        if code == 421:
            self._close()

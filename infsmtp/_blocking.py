"""
Calling Deferred-returning code from ordinary threads.

The blocking ``Client`` and ``Server.start()`` / ``stop()`` are thin wrappers
over the Deferred APIs.  They need a reactor running in some thread: crochet
starts one in a background thread on first use (never at import), and a
program that runs its own reactor calls ``crochet.no_setup()`` first and then
uses the blocking API from its worker threads.

The hop itself is ours rather than crochet's ``run_in_reactor``: the call is
queued with ``callFromThread`` and the caller sleeps on a file descriptor of
its own thread (an eventfd, or a pipe), which the reactor thread writes once
the result is in.  Writing it releases the GIL, so the woken caller runs at
once; crochet's ``threading.Event`` is released while the reactor thread
still holds the GIL, and the caller, woken only to wait for the GIL, costs
about three more context switches and 20 us of CPU per call.  As with
crochet, a call still waiting when the reactor shuts down fails with
``crochet.ReactorStopped``, and so does any call made after that.
"""

from __future__ import annotations

import os
import select
import threading
from typing import Any, Callable, TypeVar

import crochet
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.python import log, threadable
from twisted.python.failure import Failure

from ._errors import SMTPError, SMTPTimeoutError

T = TypeVar("T")

# The reactor, once crochet was set up and the shutdown watched.
_reactor: Any = None


def _ensureReactor() -> Any:
    global _reactor
    if _reactor is None:
        from twisted.internet import reactor

        # setup() is idempotent, and a no-op after crochet.no_setup().
        crochet.setup()
        _watchShutdown(reactor)
        _reactor = reactor
    return _reactor


def isReactorThread() -> bool:
    """
    Whether the calling thread runs the reactor (so blocking would deadlock).
    """
    from twisted.internet import reactor

    return bool(reactor.running) and threadable.isInIOThread()


class _Wakeup:
    """
    A file descriptor one thread sleeps on until another writes it.
    """

    def __init__(self) -> None:
        if hasattr(os, "eventfd"):
            self.readFd = self.writeFd = os.eventfd(0, os.EFD_CLOEXEC)
            self.wait, self.set = self._readEventfd, self._writeEventfd
        else:
            self.readFd, self.writeFd = os.pipe()
            self.wait, self.set = self._readPipe, self._writePipe

    def _readEventfd(self) -> None:
        os.eventfd_read(self.readFd)

    def _writeEventfd(self) -> None:
        os.eventfd_write(self.writeFd, 1)

    def _readPipe(self) -> None:
        os.read(self.readFd, 1)

    def _writePipe(self) -> None:
        os.write(self.writeFd, b"x")

    def ready(self, timeout: float) -> bool:
        """
        Whether a write arrives within ``timeout`` seconds (not consumed).
        """
        poller = select.poll()
        poller.register(self.readFd, select.POLLIN)
        return bool(poller.poll(max(0, int(timeout * 1000))))

    def __del__(self) -> None:
        # Only once its thread is gone and no call refers to it, so nothing
        # writes to it any more (an abandoned call is never written to).
        try:
            os.close(self.readFd)
            if self.writeFd != self.readFd:
                os.close(self.writeFd)
        except (OSError, TypeError):  # TypeError: os torn down at exit.
            pass


class _Call:
    """
    One blocking call: its result, handed from the reactor thread to the
    waiting thread through that thread's :class:`_Wakeup`.
    """

    __slots__ = ("wakeup", "result", "done", "abandoned", "deferred")

    def __init__(self, wakeup: _Wakeup) -> None:
        self.wakeup = wakeup
        self.result: Any = None
        self.done = False
        self.abandoned = False
        self.deferred: Any = None

    def deliver(self, result: Any) -> None:
        # Reactor thread.  The decision is taken under the lock, so that a
        # waiter giving up knows whether a write is coming; the write itself
        # is made outside it, since the woken thread may run at once.
        with _lock:
            _pending.discard(self)
            if self.done:
                return
            abandoned = self.abandoned
            if not abandoned:
                self.result, self.done = result, True
        if not abandoned:
            self.wakeup.set()
        elif isinstance(result, Failure) and not result.check(CancelledError):
            log.err(result, "Unhandled error in an abandoned blocking call")

    def abandon(self) -> bool:
        """
        Give up waiting (calling thread); ``False`` if the result came first.
        """
        with _lock:
            if not self.done:
                self.abandoned = True
                _pending.discard(self)
                return True
        # The write is made or about to be: consume it, so that the next call
        # waits afresh.
        self.wakeup.wait()
        return False


_lock = threading.Lock()
_local = threading.local()
# Calls handed to the reactor and not yet answered.
_pending: set[_Call] = set()
_shutdownWatched = False
_reactorStopped = False


@crochet.run_in_reactor
def _untilShutdown() -> Deferred[None]:
    # Never fires: crochet fails it with ReactorStopped as the reactor shuts
    # down, at the same point as its own pending results.
    return Deferred()


def _watchShutdown(reactor: Any) -> None:
    global _shutdownWatched
    with _lock:
        if _shutdownWatched:
            return
        # Raises ReactorStopped when the reactor is gone already.
        sentinel = _untilShutdown()
        _shutdownWatched = True

    def watch() -> None:
        try:
            sentinel.wait(None)
        except BaseException:
            pass
        _failPending()

    # Crochet's results are threading.Events, with no callback: a thread
    # waits on this one.  (Our own trigger could come after the reactor's
    # thread pool trigger, which joins the very threads that wait here.)
    threading.Thread(target=watch, name="infsmtp: reactor shutdown", daemon=True).start()


def _failPending() -> None:
    # As the reactor shuts down: nobody is left to answer.
    global _reactorStopped
    with _lock:
        _reactorStopped = True
        calls = list(_pending)
    for call in calls:
        call.deliver(Failure(crochet.ReactorStopped()))


def _start(call: _Call, function: Callable[..., Any], args: tuple, kwargs: dict) -> None:
    # Reactor thread.
    if call.done or call.abandoned:
        return
    call.deferred = maybeDeferred(function, *args, **kwargs)
    call.deferred.addBoth(call.deliver)


def _cancel(call: _Call) -> None:
    # Reactor thread.
    if call.deferred is not None:
        call.deferred.cancel()


def blockingCall(
    what: str,
    alternative: str,
    function: Callable[..., Any],
    *args: Any,
    timeout: float | None = None,
    **kwargs: Any,
) -> Any:
    """
    Run C{function(*args, **kwargs)} in the reactor thread and wait for its
    result (unwrapping a Deferred).

    @param what: the blocking call's name, for the error message.
    @param alternative: what to call instead from the reactor thread.
    @param timeout: seconds to wait, or L{None} to wait as long as it takes
        (the function is expected to bound its own time).
    @raise SMTPError: when called from the reactor thread, where waiting
        would deadlock.  The check happens before anything is scheduled.
    @raise crochet.ReactorStopped: when the reactor stopped (or stops
        before the call finishes).
    """
    if isReactorThread():
        raise SMTPError(
            f"{what} blocks and cannot run in the reactor thread; "
            f"use {alternative} (it returns a Deferred) instead"
        )
    reactor = _ensureReactor()
    wakeup = getattr(_local, "wakeup", None)
    if wakeup is None:
        wakeup = _local.wakeup = _Wakeup()
    call = _Call(wakeup)
    with _lock:
        # Registered before it is queued, so that a shutdown in between
        # still answers it.
        if _reactorStopped:
            raise crochet.ReactorStopped()
        _pending.add(call)
    reactor.callFromThread(_start, call, function, args, kwargs)
    try:
        if timeout is None or wakeup.ready(timeout):
            wakeup.wait()
        elif call.abandon():
            reactor.callFromThread(_cancel, call)
            raise SMTPTimeoutError(f"{what} did not finish within {timeout} seconds")
    except BaseException:
        # Interrupted (KeyboardInterrupt, say): leave no write behind.
        if not call.done and not call.abandoned:
            call.abandon()
        raise
    result = call.result
    if isinstance(result, Failure):
        result.raiseException()
    return result

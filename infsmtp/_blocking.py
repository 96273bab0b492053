"""
Calling Deferred-returning code from ordinary threads.

The blocking ``Client`` and ``Server.start()`` / ``stop()`` are thin wrappers
over the Deferred APIs.  They need a reactor running in some thread: crochet
starts one in a background thread on first use (never at import), and a
program that runs its own reactor calls ``crochet.no_setup()`` first and then
uses the blocking API from its worker threads.
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

import crochet
from twisted.python import threadable

from ._errors import SMTPError, SMTPTimeoutError

T = TypeVar("T")

_started = False


def _ensureReactor() -> None:
    global _started
    if not _started:
        # setup() is idempotent, and a no-op after crochet.no_setup().
        crochet.setup()
        _started = True


def isReactorThread() -> bool:
    """
    Whether the calling thread runs the reactor (so blocking would deadlock).
    """
    # The thread check first: it is cheap, and most callers are not the
    # reactor's thread, so the reactor (an import per call) is seldom asked.
    if not threadable.isInIOThread():
        return False
    from twisted.internet import reactor

    return bool(reactor.running)


@crochet.run_in_reactor
def _inReactor(function: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    # Decorated once: crochet's decorator costs several microseconds to
    # build, which per call was a sizeable part of a blocking send.  crochet
    # runs this through maybeDeferred itself.
    return function(*args, **kwargs)


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
    """
    if isReactorThread():
        raise SMTPError(
            f"{what} blocks and cannot run in the reactor thread; "
            f"use {alternative} (it returns a Deferred) instead"
        )
    _ensureReactor()
    eventual = _inReactor(function, args, kwargs)
    try:
        return eventual.wait(timeout)
    except crochet.TimeoutError:
        eventual.cancel()
        raise SMTPTimeoutError(f"{what} did not finish within {timeout} seconds") from None

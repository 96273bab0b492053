"""
Handler adaptation: whatever the user gave as a handler becomes one
function C{session -> Deferred}.

A handler is L{None} (the default policy), a callable C{handler(session)}
returning L{None}, a C{bool}, a Deferred or a coroutine, or a string: a
Python script path (run in the server's thread pool with the global
C{session}) or C{'package.module:function'}.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import sys
from types import CodeType
from typing import Any, Callable

from twisted.internet.defer import Deferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

HandlerSpec = Callable[..., Any] | str | None

_MODULE_FUNCTION = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")


def scriptBase() -> str:
    """
    The folder relative script paths are taken from: the main script's, as
    the reference says; under twistd, the .tac's (C{-y}/C{--python}), else
    the working directory (twistd itself is not the user's script).
    """
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if path and os.path.basename(path) not in ("twistd", "twistd.py", "__main__.py"):
        return os.path.dirname(os.path.abspath(path))
    tac = _tacPath(sys.argv)
    if tac:
        return os.path.dirname(os.path.abspath(tac))
    return os.getcwd()


def _tacPath(argv: list[str]) -> str | None:
    """
    The .tac file named on a twistd command line, if any.
    """
    for index, arg in enumerate(argv):
        if arg in ("-y", "--python") and index + 1 < len(argv):
            return argv[index + 1]
        if arg.startswith("--python="):
            return arg[len("--python=") :]
        if arg.startswith("-y") and len(arg) > 2 and not arg.startswith("--"):
            return arg[2:]
    return None


def resolveObject(spec: str) -> Any:
    """
    Import C{'package.module:attribute'} (the attribute may be dotted).

    @raise ValueError: with a clear message when it cannot be found.
    """
    moduleName, _, attribute = spec.partition(":")
    try:
        target: Any = importlib.import_module(moduleName)
    except ImportError as e:
        raise ValueError(f"cannot import handler module {moduleName!r}: {e}") from None
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ValueError(f"handler {spec!r}: {moduleName} has no {attribute}") from None
    return target


class ScriptHandler:
    """
    A handler script, compiled once, run in a thread pool for each call with
    C{session} in its globals (and C{__file__} set to its path).
    """

    def __init__(self, path: str, pool: Callable[[], ThreadPool]) -> None:
        if not os.path.isabs(path):
            path = os.path.join(scriptBase(), path)
        self.path = path
        try:
            with open(path, "rb") as f:
                source = f.read()
        except OSError as e:
            raise ValueError(f"cannot read handler script {path}: {e.strerror}") from None
        try:
            self.code: CodeType = compile(source, path, "exec")
        except SyntaxError as e:
            raise ValueError(f"handler script {path} has a syntax error: {e}") from None
        self._pool = pool

    def _run(self, session: Any) -> None:
        exec(self.code, {"__name__": "__infsmtp_handler__", "__file__": self.path, "session": session})

    def __call__(self, session: Any) -> Deferred:
        from twisted.internet import reactor

        return deferToThreadPool(reactor, self._pool(), self._run, session)

    def __repr__(self) -> str:
        return f"<ScriptHandler {self.path}>"


def adaptHandler(spec: HandlerSpec, pool: Callable[[], ThreadPool]) -> Callable[[Any], Any] | None:
    """
    Turn a handler specification into a callable, resolving strings at
    once so that a wrong path or name fails when it is set, not when the
    first client comes.

    @param pool: gives the thread pool scripts run in (created lazily).
    @raise ValueError: an unusable specification.
    """
    if spec is None or callable(spec):
        return spec
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    if not isinstance(spec, str):
        raise ValueError(f"a handler must be None, a callable or a string, not {spec!r}")
    if _MODULE_FUNCTION.fullmatch(spec) and not spec.endswith(".py"):
        target = resolveObject(spec)
        if not callable(target):
            raise ValueError(f"handler {spec!r} is not callable")
        return target
    return ScriptHandler(spec, pool)


def callHandler(handler: Callable[[Any], Any], session: Any) -> Deferred:
    """
    Call C{handler(session)} and give its outcome as a Deferred, whatever it
    returned: a plain value, a Deferred, or a coroutine (or other
    awaitable).  An exception becomes a failed Deferred.
    """
    try:
        result = handler(session)
    except BaseException:
        from twisted.internet.defer import fail

        return fail()
    return toDeferred(result)


def toDeferred(result: Any) -> Deferred:
    """
    A handler's return value as a Deferred: a Deferred as it is, a
    coroutine or other awaitable run to its end, anything else at once.
    """
    if isinstance(result, Deferred):
        return result
    if inspect.iscoroutine(result):
        return Deferred.fromCoroutine(result)
    if inspect.isawaitable(result):
        return Deferred.fromCoroutine(_awaitIt(result))
    return succeed(result)


async def _awaitIt(awaitable: Any) -> Any:
    return await awaitable

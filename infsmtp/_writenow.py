"""
Write-through for plain TCP transports (server and client sides).

Twisted's C{transport.write} always buffers: the bytes wait for the next
reactor iteration, which costs two C{epoll_ctl} calls and a write event per
reply.  SMTP is a lock-step dialogue of small replies, so that overhead is a
large share of a session's CPU.  L{writeNow} sends at once when nothing is
queued ahead (so order is kept), on the transport's own socket, and hands
any remainder to the normal buffered path.

Knowing that nothing is queued means reading Twisted's private write buffer
(C{dataBuffer}, C{offset}, C{_tempDataLen}, ...), which any Twisted release
may change.  So that a change can cost speed but never correctness, the
shortcut is only taken for transport classes that passed L{_probe} at
import (a real write on a socket pair, watched through those attributes),
and it switches itself off for good the first time an attribute is missing.
Without it, L{writeNow} is C{transport.write} and L{closesAtOnce} says
C{False}: both are what any transport supports.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import protocol, tcp
from twisted.logger import Logger

_log = Logger()

# Exactly these classes: a subclass or a wrapper (TLS, PROXY) may buffer or
# transform what it is given.
_PLAIN_TCP = (tcp.Server, tcp.Client)

#: The private attributes read here, and the types they must have.
_SHAPE: dict[str, type | tuple[type, ...]] = {
    "connected": (int, bool),
    "disconnecting": (int, bool),
    "_writeDisconnected": (int, bool),
    "TLS": (int, bool),
    "dataBuffer": (bytes, bytearray, memoryview),
    "offset": int,
    "_tempDataLen": int,
    "socket": socket.socket,
}


def isPlainTCP(transport: Any) -> bool:
    """
    Whether C{transport} is Twisted's own TCP transport, without TLS.
    """
    # getattr: this must answer (conservatively) even on a Twisted whose
    # transports have lost the attribute.
    return type(transport) in _PLAIN_TCP and not getattr(transport, "TLS", True)


class _ProbeReactor:
    """
    Just enough of C{IReactorFDSet} for a transport that is never run: the
    probe drives its writes by hand.
    """

    def addReader(self, reader: object) -> None:
        pass

    def addWriter(self, writer: object) -> None:
        pass

    def removeReader(self, reader: object) -> None:
        pass

    def removeWriter(self, writer: object) -> None:
        pass


def _shapeProblem(transport: Any) -> str | None:
    """
    Why the attributes L{_idle} reads are not on C{transport} as expected,
    or C{None}.
    """
    for name, expected in _SHAPE.items():
        try:
            value = getattr(transport, name)
        except AttributeError:
            return f"it has no attribute {name!r}"
        if not isinstance(value, expected):
            return f"its {name!r} is a {type(value).__name__}"
    return None


def _probe(transportClass: type) -> str | None:
    """
    Why the shortcut cannot be used with C{transportClass}, or C{None}.

    Builds one over a socket pair, with a reactor that does nothing, and
    checks that L{_idle} sees what C{write} queues and sees it leave once
    the transport has written it: attributes that still exist but no longer
    hold the queue would otherwise let a reply overtake the ones queued
    before it.
    """
    ours, theirs = socket.socketpair()
    # Bounds the wait for the probe's bytes (on a Unix socket pair they are
    # there as soon as they are sent).
    theirs.settimeout(1.0)
    try:
        transport = transportClass.__new__(transportClass)
        tcp.Connection.__init__(transport, ours, protocol.Protocol(), _ProbeReactor())
        transport.connected = 1
        problem = _shapeProblem(transport)
        if problem is not None:
            return problem
        if not _idle(transport):
            return "a new transport does not look idle"
        transport.write(b"probe")
        if _idle(transport):
            return "what write() queues is not where it is looked for"
        transport.doWrite()
        if not _idle(transport):
            return "the queue still looks full once written"
        if theirs.recv(16) != b"probe":
            return "the probe's bytes did not arrive"
        return None
    except Exception as e:
        return f"the probe failed: {e!r}"
    finally:
        ours.close()
        theirs.close()


def _fastClasses() -> tuple[type, ...]:
    """
    The transport classes that pass L{_probe}; logs, once, why any other is
    left on the buffered path.
    """
    passed = []
    for transportClass in _PLAIN_TCP:
        problem = _probe(transportClass)
        if problem is None:
            passed.append(transportClass)
        else:
            _log.warn(
                "infsmtp: replies to {transport} connections go through Twisted's "
                "buffered write, one reactor iteration later, because {problem} "
                "(this Twisted's transports are not what infsmtp knows).",
                transport=transportClass.__qualname__,
                problem=problem,
            )
    return tuple(passed)


def _switchOff(error: Exception) -> None:
    """
    Stop taking the shortcut, for every transport, from now on.
    """
    global _FAST
    if _FAST:
        _FAST = ()
        _log.warn(
            "infsmtp: replies go through Twisted's buffered write from now on: "
            "a transport lost an attribute the shortcut reads ({error!r}).",
            error=error,
        )


def _idle(transport: Any) -> bool:
    """
    A plain TCP transport (already checked by the caller), still open, with
    nothing queued to send.
    """
    try:
        return (
            transport.connected
            and not transport.disconnecting
            and not transport._writeDisconnected
            and not transport.TLS
            and len(transport.dataBuffer) == transport.offset
            and not transport._tempDataLen
        )
    except AttributeError as e:
        _switchOff(e)
        return False


def writeNow(transport: Any, data: bytes) -> None:
    """
    Write C{data} to C{transport}, sending it immediately when possible.
    """
    # Only when nothing is queued ahead, so order is kept.
    if type(transport) in _FAST and _idle(transport):
        try:
            sent = transport.socket.send(data)
        except OSError:
            # Would block, interrupted, or the connection failed: the
            # buffered path below retries, or finds the error and reports
            # it the usual way.
            sent = 0
        except AttributeError as e:
            # Nothing was sent: the buffered path takes it all.
            _switchOff(e)
            sent = 0
        if sent >= len(data):
            return
        data = data[sent:]
    transport.write(data)


def closesAtOnce(transport: Any) -> bool:
    """
    Whether C{transport.loseConnection()} will finish by itself on the next
    reactor iteration: plain TCP with nothing left to send, so no peer (not
    reading, or owing a TLS close_notify) can hold it open.  C{False} when
    unsure.
    """
    return type(transport) in _FAST and _idle(transport)


#: The classes on which the shortcut is taken; empty once it is switched off.
#: (Last, as the probe runs the functions above.)
_FAST: tuple[type, ...] = _fastClasses()

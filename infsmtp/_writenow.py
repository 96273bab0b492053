"""
Write-through for plain TCP transports (server and client sides).

Twisted's C{transport.write} always buffers: the bytes wait for the next
reactor iteration, which costs two C{epoll_ctl} calls and a write event per
reply.  SMTP is a lock-step dialogue of small replies, so that overhead is a
large share of a session's CPU.  L{writeNow} sends at once when nothing is
queued ahead (so order is kept), on the transport's own socket, and hands
any remainder to the normal buffered path.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import tcp

# Exactly these classes: a subclass or a wrapper (TLS, PROXY) may buffer or
# transform what it is given.
_PLAIN_TCP = (tcp.Server, tcp.Client)


def isPlainTCP(transport: Any) -> bool:
    """
    Whether C{transport} is Twisted's own TCP transport, without TLS.
    """
    return type(transport) in _PLAIN_TCP and not transport.TLS


def _idlePlainTCP(transport: Any) -> bool:
    """
    A plain TCP transport, still open, with nothing queued to send.
    """
    return (
        isPlainTCP(transport)
        and transport.connected
        and not transport.disconnecting
        and not transport._writeDisconnected
        and len(transport.dataBuffer) == transport.offset
        and not transport._tempDataLen
    )


def writeNow(transport: Any, data: bytes) -> None:
    """
    Write C{data} to C{transport}, sending it immediately when possible.
    """
    # Only when nothing is queued ahead, so order is kept.
    if _idlePlainTCP(transport):
        try:
            sent = transport.socket.send(data)
        except OSError:
            # Would block, interrupted, or the connection failed: the
            # buffered path below retries, or finds the error and reports
            # it the usual way.
            sent = 0
        if sent >= len(data):
            return
        data = data[sent:]
    transport.write(data)


def closesAtOnce(transport: Any) -> bool:
    """
    Whether C{transport.loseConnection()} will finish by itself on the next
    reactor iteration: plain TCP with nothing left to send, so no peer (not
    reading, or owing a TLS close_notify) can hold it open.
    """
    return _idlePlainTCP(transport)

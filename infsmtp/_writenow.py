"""
Write-through for plain TCP transports (server and client sides).

Twisted's C{transport.write} always buffers: the bytes wait for the next
reactor iteration, which costs two C{epoll_ctl} calls and a write event per
reply.  SMTP is a lock-step dialogue of small replies, so that overhead is a
large share of a session's CPU.  L{writeNow} sends at once when nothing is
queued ahead (so order is kept), through the transport's own
C{writeSomeData}, and hands any remainder to the normal buffered path.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import tcp

# Exactly these classes: a subclass or a wrapper (TLS, PROXY) may buffer or
# transform what it is given.
_PLAIN_TCP = (tcp.Server, tcp.Client)


def _pending(transport: tcp.Connection) -> int:
    return len(transport.dataBuffer) - transport.offset + transport._tempDataLen


def writeNow(transport: Any, data: bytes) -> None:
    """
    Write C{data} to C{transport}, sending it immediately when possible.
    """
    if (
        type(transport) in _PLAIN_TCP
        and not transport.TLS
        and transport.connected
        and not transport.disconnecting
        and not transport._writeDisconnected
        and not _pending(transport)
    ):
        sent = transport.writeSomeData(data)
        if isinstance(sent, int):
            if sent >= len(data):
                return
            data = data[sent:]
    transport.write(data)

"""
C{sd_notify} for a server run by systemd (C{Type=notify}): C{READY=1} once
listening, C{STOPPING=1} when a stop begins.

The protocol is one datagram to the unix socket named by C{NOTIFY_SOCKET}
(C{@name} for an abstract one), so this is a plain socket, not a
dependency.  Without C{NOTIFY_SOCKET} (not under systemd) it does nothing.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

from twisted.logger import Logger

log = Logger(namespace="infsmtp.twistd")


def sdNotify(state: str, environ: Mapping[str, str] | None = None) -> bool:
    """
    Tell systemd C{state} (C{"READY=1"}, C{"STOPPING=1"}, ...).

    @return: whether it was sent (C{False} when not under systemd, or the
        socket refused it: logged once per call, never raised, since a
        server must not stop serving for its supervisor's sake).
    """
    address = (os.environ if environ is None else environ).get("NOTIFY_SOCKET")
    if not address:
        return False
    if address[0] == "@":
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode("utf-8"))
    except OSError as e:
        log.warn("cannot notify systemd ({state}) through {address}: {error}", state=state, address=address, error=e)
        return False
    return True

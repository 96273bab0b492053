"""
External peers of the interop tests (swaks, Postfix's smtp-source and
smtp-sink, curl, openssl, haproxy, aiosmtpd).
"""

import socket

import pytest
from aiosmtpd.controller import Controller


def freePort() -> int:
    """
    A loopback port free now (for peers that must be told their port).
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def requireTool(path: str) -> str:
    """
    The path of an external peer (swaks, smtp-source, ...).  Missing, the
    test is skipped on a developer's machine but fails in CI, where
    .ci/run installs every peer: a green CI never hides a missing peer.
    """
    import os
    import shutil

    found = shutil.which(path) or (path if os.access(path, os.X_OK) else None)
    if found:
        return found
    message = f"{path} is not installed (apt-get install swaks postfix curl openssl fail2ban)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


class EphemeralController(Controller):
    """
    An aiosmtpd controller on a port the kernel picks (C{port=0}); the
    port is in C{.port} once started.
    """

    def _trigger_server(self):
        self.port = self.server.sockets[0].getsockname()[1]
        super()._trigger_server()

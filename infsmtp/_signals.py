"""
Signals for a server run by twistd: SIGTERM stops gracefully and the
process exits 0 (Twisted's own handler makes it die of the signal: exit
status 143, which Docker and supervisors report as a failure); SIGHUP
reloads what can change without a restart.

Used by C{twistd infsmtp}'s services and by L{Server} itself when a .tac
runs it, so that both behave alike.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

from twisted.logger import Logger
from twisted.python import threadable

log = Logger(namespace="infsmtp.twistd")


def runningUnderTwistd() -> bool:
    """
    Whether this process is twistd (a .tac or a plugin being run).
    """
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None) or ""
    return os.path.basename(path) in ("twistd", "twistd.py")


class SigtermStops:
    """
    Mixed into a twistd service: SIGTERM stops the reactor (so the
    services stop gracefully) and the process exits with status 0, where
    Twisted's own handler makes it die of the signal.  A second SIGTERM
    while stopping is only logged.
    """

    #: Set by twistd's L{makeService}.
    handleSigterm = False
    _stopping = False
    _reactor: Any
    grace: float

    def _installSigterm(self) -> None:
        # After startup, so that this replaces the reactor's own handler.
        if threadable.isInIOThread() and hasattr(signal, "SIGTERM"):
            signal.signal(signal.SIGTERM, self._sigterm)
            if hasattr(signal, "SIGHUP"):
                signal.signal(signal.SIGHUP, self._sighup)

    def _sighup(self, number: int, frame: Any) -> None:
        self._reactor.callFromThread(self.reload)

    def reload(self) -> None:
        """
        SIGHUP: reload what can change without a restart (the certificate).
        """
        raise NotImplementedError

    def _sigterm(self, number: int, frame: Any) -> None:
        if self._stopping:
            log.info("SIGTERM again: already stopping")
            return
        self._stopping = True
        log.info("SIGTERM: stopping; transactions in flight have {grace:g} seconds", grace=self.grace)
        self._reactor.callFromThread(self._reactor.stop)

"""
Running C{twistd} as a subprocess for the plugin and C{.tac} tests.

The child runs the working tree's code (C{PYTHONPATH} is the checkout, so
the plugin in C{twisted/plugins/} is found whatever way infsmtp was
installed), logs to a file in a temporary folder, and every wait polls that
log or the process against a deadline: nothing waits on a fixed sleep, and
nothing can hang the suite.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

from peertools import freePort

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")

#: An ephemeral port on the loopback address: the log says which.
EPHEMERAL = "tcp:0:interface=127.0.0.1"

#: The bound on any single wait, in seconds.
DEADLINE = 20.0

# Our own listening line ("127.0.0.1:4321") and the Server's own, used by
# the .tac files ("IPv4Address(type='TCP', host='127.0.0.1', port=4321)").
_LISTENING = re.compile(
    r"infsmtp listening on (?:IPv4Address\(type='TCP', host='([^']+)', port=(\d+)\)|([\d.]+):(\d+))"
)


def childEnvironment(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def poll(condition, deadline: float = DEADLINE, interval: float = 0.02, what: str = "condition"):
    """
    Call C{condition()} until it returns something true, and return that;
    fail after C{deadline} seconds.
    """
    end = time.monotonic() + deadline
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {deadline:g}s waiting for {what}")
        time.sleep(interval)


class Twistd:
    """
    One C{twistd -n} child.

    @param args: what follows C{twistd -n --pidfile= --logfile LOG}
        (C{["infsmtp", "--listen", ...]} or C{["-y", "x.tac"]}).
    @param cwd: its working folder (a temporary one).
    """

    def __init__(self, args: Sequence[str], cwd: str, env: dict[str, str] | None = None) -> None:
        self.cwd = str(cwd)
        self.logPath = os.path.join(self.cwd, "twistd.log")
        self.stdoutPath = os.path.join(self.cwd, "twistd.stdout")
        self.stderrPath = os.path.join(self.cwd, "twistd.stderr")
        self.args = [TWISTD, "-n", "--pidfile=", "--logfile", self.logPath, *args]
        with open(self.stdoutPath, "wb") as out, open(self.stderrPath, "wb") as err:
            self.process = subprocess.Popen(
                self.args, cwd=self.cwd, stdout=out, stderr=err, env=env or childEnvironment()
            )

    def log(self) -> str:
        try:
            with open(self.logPath, encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def stderr(self) -> str:
        with open(self.stderrPath, encoding="utf-8", errors="replace") as f:
            return f.read()

    def stdout(self) -> str:
        with open(self.stdoutPath, encoding="utf-8", errors="replace") as f:
            return f.read()

    def _diagnosis(self) -> str:
        return f"\n--- log ---\n{self.log()}\n--- stderr ---\n{self.stderr()}"

    def waitLog(self, pattern: str, deadline: float = DEADLINE) -> re.Match:
        """
        Wait for a line matching C{pattern} in the log.
        """
        regex = re.compile(pattern)

        def found():
            match = regex.search(self.log())
            if match is None and self.process.poll() is not None:
                raise AssertionError(
                    f"twistd exited ({self.process.returncode}) before logging {pattern!r}" + self._diagnosis()
                )
            return match

        return poll(found, deadline, what=repr(pattern))

    def waitListening(self, count: int = 1, deadline: float = DEADLINE) -> list[tuple[str, int]]:
        """
        Wait until C{count} listeners are up; their (host, port).
        """

        def found():
            matches = _LISTENING.findall(self.log())
            if len(matches) < count:
                if self.process.poll() is not None:
                    raise AssertionError(f"twistd exited ({self.process.returncode}) before listening" + self._diagnosis())
                return None
            return [(a or c, int(b or d)) for a, b, c, d in matches]

        return poll(found, deadline, what="the listening line")

    @property
    def port(self) -> int:
        return self.waitListening()[0][1]

    def terminate(self, deadline: float = 30.0) -> int:
        """
        SIGTERM, and the exit status once it has exited.
        """
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(deadline)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
            raise AssertionError(f"twistd did not stop within {deadline}s after SIGTERM" + self._diagnosis()) from None

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)


def runTwistd(
    args: Sequence[str], cwd: str, deadline: float = DEADLINE, pidfile: str = "", daemon: bool = False
) -> subprocess.CompletedProcess:
    """
    Run a twistd that is expected to exit by itself (wrong configuration,
    or a daemon's parent).
    """
    return subprocess.run(
        [TWISTD, *([] if daemon else ["-n"]), f"--pidfile={pidfile}", "--logfile", os.path.join(str(cwd), "twistd.log"), *args],
        cwd=str(cwd),
        env=childEnvironment(),
        check=False,
        capture_output=True,
        text=True,
        timeout=deadline,
    )


def maildirFiles(path: str, sub: str = "new") -> list[str]:
    folder = os.path.join(str(path), sub)
    if not os.path.isdir(folder):
        return []
    return sorted(os.listdir(folder))


# An independent smarthost -----------------------------------------------


class Sink:
    """
    An aiosmtpd handler keeping what it accepts; refuses refuse@ (550) and
    any message whose subject says "reject" (554).
    """

    def __init__(self) -> None:
        self.envelopes: list[tuple[str, list[str], bytes]] = []

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address.startswith("refuse@"):
            return "550 5.1.1 No such user"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        if b"Subject: reject" in envelope.original_content:
            return "554 5.7.1 Rejected by the sink"
        self.envelopes.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content))
        return "250 OK sunk"


def runSmarthost(**settings):
    """
    An aiosmtpd server with a L{Sink} on a free loopback port, for the
    length of a fixture (C{yield from runSmarthost()}); C{settings} go to
    its C{Controller} (TLS, authenticator, ...).
    """
    from aiosmtpd.controller import Controller

    sink = Sink()
    controller = Controller(sink, hostname="127.0.0.1", port=freePort(), **settings)
    controller.start()
    sink.port = controller.port
    yield sink
    controller.stop()

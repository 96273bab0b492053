"""
Where twistd's --logfile is not a regular file (/dev/null, a FIFO): the
log is written there and never rotated.  Rotating renames the path and
creates a regular file in its place, so that a server running as root
with ``--logfile /dev/null`` replaced the device after 1 MB of log.

The FIFO stands in for /dev/null: a test must not risk the machine's.
"""

from __future__ import annotations

import os
import re
import smtplib
import stat
import threading

from twistdprocess import DEADLINE, Twistd, freePort, poll

from infsmtp._daemon.twistd import Options, buildLogObserver
from infsmtp._events import isRotatable


class FifoReader:
    """
    A FIFO at C{path} and a thread reading all that is written to it.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        os.mkfifo(path)
        self._fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        # Held open, so that the reader sees no end while writers come and
        # go (and a writer's open does not wait for a reader).
        self._keepOpen = os.open(path, os.O_WRONLY)
        os.set_blocking(self._fd, True)
        self._lock = threading.Lock()
        self._data = bytearray()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while chunk := os.read(self._fd, 65536):
            with self._lock:
                self._data += chunk

    def text(self) -> str:
        with self._lock:
            return self._data.decode("utf-8", "replace")

    def close(self) -> None:
        os.close(self._keepOpen)
        self._thread.join(DEADLINE)
        os.close(self._fd)


def test_isRotatable():
    assert isRotatable(None) or not os.path.exists("twistd.log")
    assert isRotatable("/nonexistent/folder/x.log")
    assert isRotatable(__file__)
    assert not isRotatable(os.devnull)
    assert not isRotatable(os.path.dirname(__file__))


def test_a_log_that_is_not_a_regular_file_is_never_rotated(tmp_path):
    fifo = FifoReader(str(tmp_path / "log"))
    try:
        options = Options()
        options.parseOptions(["--log-format", "text"])
        observer = buildLogObserver(options, {"logfile": fifo.path, "nodaemon": True})
        line = "x" * 1000
        # Past twistd's rotation size (1,000,000 bytes); errors are written
        # at once, not batched per reactor turn.
        for n in range(1200):
            observer({"log_level": _error(), "log_format": "{n} {line}", "n": n, "line": line,
                      "log_namespace": "test", "log_time": 0.0})
        poll(lambda: "1199 xxx" in fifo.text(), what="the last line through the FIFO")
        assert stat.S_ISFIFO(os.stat(fifo.path).st_mode)
        assert sorted(os.listdir(tmp_path)) == ["log"]
        assert fifo.text().count("\n") == 1200
        observer.outFile.close()
    finally:
        fifo.close()


def _error():
    from twisted.logger import LogLevel

    return LogLevel.error


def test_workers_share_a_log_that_is_not_a_regular_file(tmp_path):
    fifo = FifoReader(str(tmp_path / "twistd.log"))
    port = freePort()
    child = Twistd(["infsmtp", "--workers", "2", "--listen", f"tcp:{port}:interface=127.0.0.1"], str(tmp_path))
    try:
        # The parent says "workers share", each worker "listening on".
        poll(lambda: fifo.text().count("infsmtp listening on") == 2, what="both workers' lines in the FIFO")
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            client.noop()
        poll(lambda: re.search(r"worker=\d session=\d+ connect from", fifo.text()), what="a session's line")
        assert stat.S_ISFIFO(os.stat(fifo.path).st_mode)
        assert not [name for name in os.listdir(tmp_path) if name.startswith("twistd.log.")]
    finally:
        assert child.terminate() == 0, child.stderr()
        fifo.close()

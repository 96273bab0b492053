"""
``twistd -n infsmtp --workers N``: worker processes sharing one listening
socket, restarted when they die, stopped gracefully with the parent.
"""

from __future__ import annotations

import collections
import os
import re
import signal
import smtplib
import socket
import subprocess

import pytest_twisted
from peertools import requireTool
from twistdprocess import Twistd, freePort, maildirFiles, poll, runTwistd
from twisted.internet import protocol, reactor

from infsmtp._daemon.workers import ACCEPTS_PER_WAKEUP, SharedListenerEndpoint, bindListener


def workerPids(twistd: Twistd) -> dict[int, int]:
    return {int(i): int(p) for i, p in re.findall(r"worker (\d+) started \(pid (\d+)\)", twistd.log())}


def byWorker(maildir: str) -> collections.Counter:
    # A Maildir key holds its writer's pid: ...P<pid>Q<sequence>...
    return collections.Counter(re.search(r"P(\d+)Q", name).group(1) for name in maildirFiles(maildir))


def startPool(tmp_path, count: int = 2, *extra: str) -> tuple[Twistd, int, str]:
    port = freePort()
    maildir = str(tmp_path / "Maildir")
    twistd = Twistd(
        # smtp-source is one client opening 1,000 connections in seconds:
        # trusted, like a load balancer in front of the workers would be.
        ["infsmtp", "--workers", str(count), "--listen", f"tcp:{port}:interface=127.0.0.1", "--maildir", maildir,
         "--trusted", "127.0.0.0/8", *extra],
        tmp_path,
    )
    twistd.waitLog(rf"worker {count - 1} started")
    for index in range(count):
        poll(lambda i=index: "listening on" in _read(twistd.logPath + f".worker{i}"), what=f"worker {index} listening")
    return twistd, port, maildir


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""


def send(port: int, count: int) -> None:
    for _ in range(count):
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            client.sendmail("a@b.test", ["c@d.test"], b"Subject: w\r\n\r\nx\r\n")


def test_load_spreads_over_the_workers(tmp_path):
    """
    Each of two workers takes 35-65 % of smtp-source's messages (a
    connection per message; 12 runs gave 42-50 % to the smaller share).
    """
    source = requireTool("/usr/sbin/smtp-source")
    twistd, port, maildir = startPool(tmp_path)
    try:
        subprocess.run([source, "-s", "20", "-m", "1000", "-l", "512", f"127.0.0.1:{port}"], check=True, timeout=60)
        counts = byWorker(maildir)
        assert sum(counts.values()) == 1000
        assert set(counts) == {str(p) for p in workerPids(twistd).values()}
        assert min(counts.values()) >= 350, counts
    finally:
        assert twistd.terminate() == 0


def test_a_dead_worker_is_replaced(tmp_path):
    twistd, port, maildir = startPool(tmp_path)
    try:
        victim = workerPids(twistd)[0]
        os.kill(victim, signal.SIGKILL)
        twistd.waitLog(r"worker 0 ended .*starting another")
        poll(lambda: workerPids(twistd)[0] != victim, what="a new worker 0")
        poll(lambda: _read(twistd.logPath + ".worker0").count("listening on") >= 2, what="the new worker listening")
        send(port, 20)
        assert len(maildirFiles(maildir)) == 20
        assert str(victim) not in byWorker(maildir)
    finally:
        assert twistd.terminate() == 0


def test_sigterm_stops_every_worker(tmp_path):
    twistd, port, maildir = startPool(tmp_path, count=3)
    pids = list(workerPids(twistd).values())
    send(port, 3)
    assert twistd.terminate() == 0

    def gone(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        # A zombie is gone too: only its parent (the pool) could reap it.
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"

    poll(lambda: all(gone(p) for p in pids), what="every worker exiting")
    assert len(maildirFiles(maildir)) == 3


def test_port_in_use_is_one_line(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        result = runTwistd(
            ["infsmtp", "--workers", "2", "--listen", f"tcp:{port}:interface=127.0.0.1", "--maildir", str(tmp_path / "M")],
            tmp_path,
        )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("twistd infsmtp: error: cannot listen on"), result.stderr


def test_workers_share_tcp_listeners_only(tmp_path):
    result = runTwistd(["infsmtp", "--workers", "2", "--listen", f"unix:{tmp_path}/s.sock", "--maildir", str(tmp_path / "M")], tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip() == f"twistd infsmtp: error: --workers shares tcp: listeners only, not 'unix:{tmp_path}/s.sock'"


@pytest_twisted.ensureDeferred
async def test_a_shared_listener_accepts_a_few_connections_per_wakeup():
    """
    Twisted's port would take every waiting connection in one wake-up (a
    burst then goes to one worker); the workers' endpoint takes a few.
    """
    listener = bindListener("tcp:0:interface=127.0.0.1")
    accepted: list[protocol.Protocol] = []

    def build() -> protocol.Protocol:
        accepted.append(protocol.Protocol())
        return accepted[-1]

    # The endpoint adopts the descriptor and closes it, as in a worker.
    port = await SharedListenerEndpoint(reactor, listener.detach(), socket.AF_INET).listen(
        protocol.Factory.forProtocol(build)
    )
    port.stopReading()  # accept only when this test says so
    waiting = ACCEPTS_PER_WAKEUP + 2
    clients = [socket.create_connection(("127.0.0.1", port.getHost().port)) for _ in range(waiting)]
    try:
        port.doRead()
        assert len(accepted) == ACCEPTS_PER_WAKEUP
        port.doRead()
        assert len(accepted) == waiting
    finally:
        for client in clients:
            client.close()
        for server in accepted:
            server.transport.abortConnection()
        await port.stopListening()


def test_reuseport_gives_each_worker_its_own_socket(tmp_path):
    """
    --workers-sockets reuseport: a socket per worker on the one port; the
    kernel spreads smtp-source's connections over them (by their
    addresses: about half each), and a restarted worker takes its
    predecessor's socket.
    """
    source = requireTool("/usr/sbin/smtp-source")
    twistd, port, maildir = startPool(tmp_path, 2, "--workers-sockets", "reuseport")
    try:
        assert "each listen (SO_REUSEPORT) on" in twistd.log()
        # Each worker adopted one descriptor, not both.
        for index in range(2):
            assert _read(twistd.logPath + f".worker{index}").count("listening on") == 1
        subprocess.run([source, "-s", "20", "-m", "1000", "-l", "512", f"127.0.0.1:{port}"], check=True, timeout=60)
        counts = byWorker(maildir)
        assert sum(counts.values()) == 1000
        assert min(counts.values()) >= 350, counts
        victim = workerPids(twistd)[1]
        os.kill(victim, signal.SIGKILL)
        poll(lambda: workerPids(twistd)[1] != victim, what="a new worker 1")
        poll(lambda: _read(twistd.logPath + ".worker1").count("listening on") >= 2, what="the new worker listening")
        subprocess.run([source, "-s", "20", "-m", "200", "-l", "512", f"127.0.0.1:{port}"], check=True, timeout=60)
        after = byWorker(maildir)
        assert sum(after.values()) == 1200
        # The new worker 1 serves its share on the old socket.
        assert after[str(workerPids(twistd)[1])] > 0, after
    finally:
        assert twistd.terminate() == 0


def test_workers_sockets_is_shared_or_reuseport(tmp_path):
    result = runTwistd(
        ["infsmtp", "--workers", "2", "--listen", f"tcp:{freePort()}:interface=127.0.0.1", "--workers-sockets", "many"],
        tmp_path,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "twistd infsmtp: error: --workers-sockets many: use shared or reuseport"
    ]

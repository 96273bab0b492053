"""
Scale-out with real parts: Debian's HAProxy, run with
C{docs/deploy/haproxy.cfg} as DEPLOY.rst shows it, in front of two
C{twistd -n infsmtp --listen haproxy:tcp:...} instances on loopback.

The client connects from 127.0.0.7 (all of 127/8 is local on Linux), so
that its address is not HAProxy's (127.0.0.1): the PROXY v2 header must
carry it into C{session.ip} (recorded by a C{--handlers} file) and the
C{Received:} header.  Sessions spread over both instances, and SIGTERM to
one of them while a client keeps sending loses no message that got a 250:
the one in flight finishes on the stopping instance, new sessions go to
the other.

Every wait polls a condition against a deadline (L{poll}, L{Twistd}'s log
waits); HAProxy and both instances are stopped at teardown.
"""

from __future__ import annotations

import csv
import email
import email.policy
import io
import os
import re
import signal
import smtplib
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field

import pytest
from peertools import freePort, requireTool
from twistdprocess import EPHEMERAL, REPO, Twistd, maildirFiles, poll

HAPROXY_CONFIG = os.path.join(REPO, "docs", "deploy", "haproxy.cfg")

#: Where the client connects from: not HAProxy's address.
CLIENT_IP = "127.0.0.7"

#: The --handlers file each instance runs: every MAIL's sender and
#: session.ip, one line each, in the instance's folder.
HANDLERS = """\
def onMailFrom(session):
    with open("clients.txt", "a", encoding="utf-8") as f:
        f.write(f"{session.address} {session.ip}\\n")
"""


@dataclass
class Instance:
    name: str
    folder: str
    twistd: Twistd
    port: int

    @property
    def maildir(self) -> str:
        return os.path.join(self.folder, "Maildir")

    def messages(self) -> list[email.message.EmailMessage]:
        out = []
        for name in maildirFiles(self.maildir):
            with open(os.path.join(self.maildir, "new", name), "rb") as f:
                out.append(email.message_from_binary_file(f, policy=email.policy.default))
        return out

    def messageIds(self) -> set[str]:
        return {str(m["Message-ID"]) for m in self.messages()}

    def clients(self) -> dict[str, str]:
        """
        Sender -> session.ip, as the handler saw them.
        """
        try:
            with open(os.path.join(self.folder, "clients.txt"), encoding="utf-8") as f:
                return dict(line.split() for line in f if line.strip())
        except FileNotFoundError:
            return {}


@dataclass
class Cluster:
    """
    HAProxy on C{port}, in front of C{instances} (mx1, mx2).
    """

    folder: str
    port: int
    socketPath: str
    instances: list[Instance] = field(default_factory=list)
    haproxy: subprocess.Popen | None = None

    def stat(self) -> dict[str, str]:
        """
        The status of each backend server (C{UP}, C{DOWN}, ...), from
        HAProxy's runtime API.
        """
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(self.socketPath)
            s.sendall(b"show stat\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        rows = csv.DictReader(io.StringIO(data.decode().lstrip("# ")))
        return {
            row["svname"]: row["status"]
            for row in rows
            if row["pxname"] == "infsmtp" and row["svname"].startswith("mx")
        }

    def haproxyLog(self) -> str:
        with open(os.path.join(self.folder, "haproxy.log"), encoding="utf-8", errors="replace") as f:
            return f.read()

    def waitStatus(self, wanted: dict[str, str]) -> None:
        def reached():
            if self.haproxy.poll() is not None:
                raise AssertionError(f"haproxy exited ({self.haproxy.returncode})\n{self.haproxyLog()}")
            try:
                status = self.stat()
            except OSError:
                return False  # the socket is not there yet
            return all(status.get(name, "").startswith(state) for name, state in wanted.items())

        poll(reached, what=f"HAProxy to see {wanted}")


@pytest.fixture
def cluster(tmp_path):
    haproxy = requireTool("/usr/sbin/haproxy")
    handlers = tmp_path / "handlers.py"
    handlers.write_text(HANDLERS)
    cluster = Cluster(str(tmp_path), freePort(), str(tmp_path / "haproxy.sock"))
    try:
        for name in ("mx1", "mx2"):
            folder = tmp_path / name
            folder.mkdir()
            child = Twistd(
                [
                    "infsmtp",
                    "--listen",
                    "haproxy:" + EPHEMERAL,
                    "--maildir",
                    "Maildir",
                    "--hostname",
                    f"{name}.test",
                    "--handlers",
                    str(handlers),
                ],
                folder,
            )
            cluster.instances.append(Instance(name, str(folder), child, child.port))
        env = dict(
            os.environ,
            SMTP_BIND=f"127.0.0.1:{cluster.port}",
            HAPROXY_SOCKET=cluster.socketPath,
            INFSMTP_MX1=f"127.0.0.1:{cluster.instances[0].port}",
            INFSMTP_MX2=f"127.0.0.1:{cluster.instances[1].port}",
        )
        with open(tmp_path / "haproxy.log", "wb") as log:
            # -db: in the foreground, so that the test owns the process.
            cluster.haproxy = subprocess.Popen(
                [haproxy, "-db", "-f", HAPROXY_CONFIG], env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT
            )
        cluster.waitStatus({"mx1": "UP", "mx2": "UP"})
        yield cluster
    finally:
        if cluster.haproxy is not None and cluster.haproxy.poll() is None:
            cluster.haproxy.terminate()
            try:
                cluster.haproxy.wait(10)
            except subprocess.TimeoutExpired:
                cluster.haproxy.kill()
                cluster.haproxy.wait(5)
        for instance in cluster.instances:
            instance.twistd.kill()


def message(messageId: str, sender: str) -> bytes:
    return (
        f"From: {sender}\r\nTo: bob@example.net\r\nSubject: through HAProxy\r\n"
        f"Message-ID: {messageId}\r\n\r\nHello through HAProxy.\r\n"
    ).encode()


def connect(cluster: Cluster) -> smtplib.SMTP:
    client = smtplib.SMTP(timeout=10, local_hostname="client.test", source_address=(CLIENT_IP, 0))
    client.connect("127.0.0.1", cluster.port)
    return client


def send(cluster: Cluster, number: int) -> str:
    """
    One session, one message; its Message-ID once it got a 250.
    """
    messageId, sender = f"<{number}@client.test>", f"sender-{number}@example.org"
    with connect(cluster) as client:
        client.sendmail(sender, ["bob@example.net"], message(messageId, sender))
    return messageId


def test_clientAddressAndSpread(cluster):
    """
    The client's own address, not HAProxy's, is session.ip and is in the
    Received: header, on both instances; round-robin gives each instance
    its share of the sessions.
    """
    sent = {send(cluster, number) for number in range(10)}
    mx1, mx2 = cluster.instances
    assert mx1.messageIds() | mx2.messageIds() == sent
    assert len(mx1.messages()) >= 3 and len(mx2.messages()) >= 3, (len(mx1.messages()), len(mx2.messages()))
    for instance in cluster.instances:
        for stored in instance.messages():
            [received] = stored.get_all("Received")
            assert received.startswith(f"from client.test ([{CLIENT_IP}])"), received
            assert f"by {instance.name}.test (infsmtp)" in received
        clients = instance.clients()
        assert len(clients) == len(instance.messages())
        assert set(clients.values()) == {CLIENT_IP}
        instance.twistd.waitLog(r"session \d+ from " + re.escape(CLIENT_IP) + r":\d+: <sender-")


class Sender(threading.Thread):
    """
    A client that keeps sending, one message a session, each
    C{interval} seconds at most (well under the per-client connection
    rate); a message that gets no 250 (4xx, a closed connection) is tried
    again in a new session, as an MTA would.
    """

    def __init__(self, cluster: Cluster, interval: float = 0.05, limit: int = 300) -> None:
        super().__init__(daemon=True)
        self.cluster = cluster
        self.interval = interval
        self.limit = limit
        self.acknowledged: list[tuple[float, str]] = []  # (when the session started, Message-ID)
        self.failures: list[tuple[float, str]] = []
        self.halt = threading.Event()

    def run(self) -> None:
        number = 1000
        while not self.halt.is_set() and number < 1000 + self.limit:
            started = time.monotonic()
            try:
                self.acknowledged.append((started, send(self.cluster, number)))
                number += 1
            except (OSError, smtplib.SMTPException) as e:
                self.failures.append((started, repr(e)))
            # Pacing a load, not waiting for anything.
            self.halt.wait(self.interval)

    def stop(self) -> None:
        self.halt.set()
        self.join(20)
        assert not self.is_alive()


def test_stoppingOneInstanceLosesNothing(cluster):
    """
    SIGTERM to one instance while a client keeps sending: the transaction
    in flight on it finishes (250, and it is in that instance's Maildir),
    the instance exits 0, HAProxy marks it down and sends every new session
    to the other, and every message that got a 250 is in one of the two
    Maildirs.
    """
    sender = Sender(cluster)
    sender.start()
    try:
        poll(lambda: len(sender.acknowledged) >= 6, what="the first messages")

        # A transaction in flight: MAIL and RCPT accepted, DATA not yet sent.
        inFlight = connect(cluster)
        inFlight.ehlo()
        assert inFlight.mail("in-flight@example.org")[0] == 250
        assert inFlight.rcpt("bob@example.net")[0] == 250
        [stopping] = poll(
            lambda: [i for i in cluster.instances if "in-flight@example.org" in i.clients()],
            what="the in-flight session's instance",
        )
        [survivor] = [i for i in cluster.instances if i is not stopping]

        stopping.twistd.process.send_signal(signal.SIGTERM)
        stopping.twistd.waitLog(r"SIGTERM: stopping")
        code, reply = inFlight.data(message("<in-flight@client.test>", "in-flight@example.org"))
        assert code == 250, reply
        inFlight.close()
        assert stopping.twistd.process.wait(20) == 0, stopping.twistd.stderr()
        stoppedAt = time.monotonic()
        cluster.waitStatus({stopping.name: "DOWN", survivor.name: "UP"})

        poll(lambda: sum(t > stoppedAt for t, _ in sender.acknowledged) >= 10, what="messages after the stop")
    finally:
        sender.stop()

    acknowledged = {messageId for _, messageId in sender.acknowledged}
    stored = stopping.messageIds() | survivor.messageIds()
    assert acknowledged <= stored, f"lost: {sorted(acknowledged - stored)}"
    assert "<in-flight@client.test>" in stopping.messageIds()
    # Both took a share before the stop; after it, only the survivor.
    assert stopping.messageIds() - {"<in-flight@client.test>"} and survivor.messageIds()
    after = {messageId for t, messageId in sender.acknowledged if t > stoppedAt}
    assert after <= survivor.messageIds()
    assert not [f for t, f in sender.failures if t > stoppedAt], sender.failures

"""
Issue 12 through C{twistd -n infsmtp}: the log as an operator's tools read
it (the JSON lines, fail2ban's filter from docs/OPERATIONS.rst run by
Debian's C{fail2ban-regex} against the real log), C{--metrics} and
C{/healthz}, C{sd_notify} over a socket of the test's own, and the
one-line refusals.
"""

from __future__ import annotations

import json
import os
import re
import smtplib
import socket
import subprocess
import urllib.request

import pytest
from peertools import requireTool
from twistdprocess import EPHEMERAL, REPO, TWISTD, Twistd, childEnvironment, poll

OPERATIONS = os.path.join(REPO, "docs", "OPERATIONS.rst")

HANDLERS = """
def onRcptTo(session):
    return not session.address.startswith("nobody@")
"""


@pytest.fixture
def twistd(tmp_path):
    children: list[Twistd] = []

    def start(*args: str, env=None) -> Twistd:
        child = Twistd(["infsmtp", "--listen", EPHEMERAL, *args], tmp_path, env=env)
        children.append(child)
        child.waitListening()
        return child

    yield start
    for child in children:
        child.kill()


def test_json_log_and_debug_transcript(tmp_path, twistd):
    (tmp_path / "pol.py").write_text(HANDLERS)
    child = twistd("--handlers", "pol.py", "--log-format", "json", "--debug", "--maildir", str(tmp_path / "md"))
    with smtplib.SMTP("127.0.0.1", child.port, local_hostname="client.test", timeout=10) as client:
        refused = client.sendmail("a@b.test", ["c@d.test", "e@d.test", "nobody@d.test"], b"Subject: x\r\n\r\nhi\r\n")
    assert list(refused) == ["nobody@d.test"]
    child.waitLog(r'"event": "disconnect"')
    records = [json.loads(line) for line in child.log().splitlines()]  # every line is one object
    ours = [r for r in records if r["namespace"] == "infsmtp.session" and r["event"] != "transcript"]
    assert [r["event"] for r in ours] == ["connect", "reject", "accepted", "disconnect"]
    connect, reject, accepted, disconnect = ours
    assert (reject["code"], reject["recipients"], reject["handler"], reject["level"]) == (
        550, ["nobody@d.test"], "onRcptTo", "warn",
    )
    assert accepted["recipients"] == ["c@d.test", "e@d.test"] and accepted["sender"] == "a@b.test"
    # The Maildir's own line carries the same queue id.
    [stored] = [r for r in records if r["namespace"] == "infsmtp.maildir"]
    assert stored["queueId"] == accepted["queue"] and accepted["queue"] in stored["message"]
    assert {r["session"] for r in ours} == {connect["session"]} and disconnect["messages"] == 1
    transcript = [(r["direction"], r["line"]) for r in records if r.get("event") == "transcript"]
    assert ("<", "rcpt TO:<nobody@d.test>") in transcript  # as smtplib sent it
    assert (">", "550 5.7.1 Recipient address rejected") in transcript
    assert all(r["level"] == "debug" for r in records if r.get("event") == "transcript")


def _filterFromDocs(tmp_path) -> str:
    """
    The fail2ban filter as docs/OPERATIONS.rst shows it, written to a file.
    """
    with open(OPERATIONS, encoding="utf-8") as f:
        text = f.read()
    # The first ini block after the marker comment.
    block = text.split(".. fail2ban-filter:", 1)[1].split(".. code-block:: ini", 1)[1]
    lines = []
    for line in block.splitlines()[1:]:
        if line.strip() and not line.startswith("   "):
            break
        lines.append(line[3:])
    content = "\n".join(lines).strip() + "\n"
    assert content.startswith("[Definition]"), content
    path = tmp_path / "infsmtp.conf"
    path.write_text(content)
    return str(path)


def test_fail2ban_filter_in_the_docs_matches_the_auth_failures(tmp_path, twistd):
    fail2banRegex = requireTool("fail2ban-regex")
    filterFile = _filterFromDocs(tmp_path)
    child = twistd("--auth", "memory:bob:right", "--allow-insecure-auth", "--auth-failure-delay", "0")
    for _ in range(2):
        with smtplib.SMTP("127.0.0.1", child.port, local_hostname="client.test", timeout=10) as client:
            # A user name that tries to forge the address fail2ban bans.
            with pytest.raises(smtplib.SMTPAuthenticationError):
                client.login("x> from [192.0.2.66]:1", "wrong")  # smtplib tries PLAIN, then LOGIN
    with smtplib.SMTP("127.0.0.1", child.port, local_hostname="client.test", timeout=10) as client:
        client.login("bob", "right")
    child.waitLog(r"auth ok: PLAIN user=<bob>")
    log = child.log()
    failures = [line for line in log.splitlines() if " auth failed: " in line]
    assert len(failures) == 4
    result = subprocess.run(
        [fail2banRegex, "--print-all-matched", str(child.logPath), filterFile],
        capture_output=True, text=True, timeout=60, check=True,
    )
    counted = re.search(r"^Lines: (\d+) lines, (\d+) ignored, (\d+) matched", result.stdout, re.M)
    assert counted and int(counted.group(3)) == 4, result.stdout
    # The same regex in Python: it names the client, never the forged address.
    failregex = re.search(r"^failregex = (.*)$", open(filterFile).read(), re.M).group(1)
    pattern = re.compile(failregex.replace("<HOST>", r"(?P<host>[\d.:a-fA-F]+)"))
    hosts = []
    for line in log.splitlines():
        match = pattern.search(line.split(" ", 1)[1])
        if match:
            hosts.append(match.group("host"))
    assert hosts == ["127.0.0.1"] * 4


def _notifications(sock: socket.socket, count: int) -> list[str]:
    got: list[str] = []
    sock.settimeout(20)
    while len(got) < count:
        got.append(sock.recv(4096).decode())
    return got


def test_sd_notify_metrics_and_healthz(tmp_path, twistd):
    pytest.importorskip("prometheus_client")
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        child = twistd("--metrics", EPHEMERAL, env=childEnvironment(NOTIFY_SOCKET=path))
        assert _notifications(sock, 1) == ["READY=1"]
        port = int(child.waitLog(r"metrics on http://127\.0\.0\.1:(\d+)/metrics").group(1))
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as response:
            assert (response.status, response.read()) == (200, b"ok\n")
        with smtplib.SMTP("127.0.0.1", child.port, timeout=10) as client:
            client.sendmail("a@b.test", ["c@d.test"], b"Subject: x\r\n\r\nhi\r\n")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            text = response.read().decode()
        assert "infsmtp_messages_accepted_total 1.0" in text.splitlines()
        assert child.terminate() == 0
        assert _notifications(sock, 1) == ["STOPPING=1"]


def _oneLine(args: list[str], tmp_path, env=None) -> str:
    result = subprocess.run(
        [TWISTD, "-n", "--pidfile=", "--logfile", str(tmp_path / "x.log"), "infsmtp", *args],
        cwd=str(tmp_path), env=env or childEnvironment(), capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 1, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_metrics_with_workers_is_refused_in_one_line(tmp_path):
    line = _oneLine(["--workers", "2", "--metrics", "tcp:0", "--listen", EPHEMERAL], tmp_path)
    assert line.startswith("twistd infsmtp: error: --metrics with --workers 2: each worker would count only its own")


def test_metrics_without_prometheus_client_is_refused_in_one_line(tmp_path):
    shim = tmp_path / "shim" / "prometheus_client"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('not installed here')\n")
    env = childEnvironment()
    env["PYTHONPATH"] = str(tmp_path / "shim") + os.pathsep + env["PYTHONPATH"]
    line = _oneLine(["--metrics", "tcp:0", "--listen", EPHEMERAL], tmp_path, env)
    assert line == "twistd infsmtp: error: --metrics tcp:0: metrics need prometheus_client: pip install 'infsmtp[metrics]'"


def test_unknown_log_format_is_refused_in_one_line(tmp_path):
    line = _oneLine(["--log-format", "xml", "--listen", EPHEMERAL], tmp_path)
    assert line == "twistd infsmtp: error: --log-format xml: use text or json"


def test_workers_log_their_number_and_unique_session_ids(tmp_path):
    from twistdprocess import freePort

    port = freePort()
    child = Twistd(["infsmtp", "--workers", "2", "--listen", f"tcp:{port}:interface=127.0.0.1"], tmp_path)
    try:
        poll(lambda: os.path.exists(f"{child.logPath}.worker1") and "listening" in open(f"{child.logPath}.worker1").read(),
             what="worker 1 listening")
        poll(lambda: os.path.exists(f"{child.logPath}.worker0") and "listening" in open(f"{child.logPath}.worker0").read(),
             what="worker 0 listening")
        for _ in range(8):
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
                client.noop()

        def connects():
            found = []
            for index in (0, 1):
                with open(f"{child.logPath}.worker{index}", encoding="utf-8") as f:
                    found += [(index, m) for m in re.findall(r"worker=(\d) session=(\d+) connect from", f.read())]
            return found if len(found) == 8 else None

        found = poll(connects, what="8 connect lines")
        assert all(int(worker) == index for index, (worker, _) in found)
        ids = [int(session) for _, (_, session) in found]
        assert len(set(ids)) == 8
        assert all(i % 2 == (1 if index == 0 else 0) for (index, _), i in zip(found, ids, strict=True))
    finally:
        assert child.terminate() == 0

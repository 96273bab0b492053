"""
The development sink (issue 13 item 3): C{python -m infsmtp} and C{twistd
-n infsmtp --print} print what they receive.  swaks sends, as a developer's
terminal would; the sink runs as a child process whose standard output is
read until the message appears, bounded.
"""

from __future__ import annotations

import io
import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import time
from email.message import EmailMessage

import pytest
from peertools import requireTool
from twistdprocess import Twistd, childEnvironment, poll, runTwistd

from infsmtp._daemon.printer import PrintDelivery, formatMessage
from infsmtp.testing import makeSession

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: Bound on each wait for the child (seconds).
DEADLINE = 20.0

BANNER = re.compile(r"infsmtp sink listening on 127\.0\.0\.1:(\d+) \((plaintext|STARTTLS|implicit TLS)\)")


class Sink:
    """
    A C{python -m infsmtp} child; L{readUntil} reads its standard output.
    """

    def __init__(self, *args: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "infsmtp", "--port", "0", *args],
            cwd=REPO, env=childEnvironment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        self.output = ""
        self._selector = selectors.DefaultSelector()
        self._selector.register(self.process.stdout, selectors.EVENT_READ)
        match = BANNER.search(self.readUntil(BANNER.pattern))
        self.port = int(match.group(1))
        self.mode = match.group(2)

    def readUntil(self, pattern: str, deadline: float = DEADLINE) -> str:
        """
        Read standard output until C{pattern} matches it; all read so far.
        """
        end = time.monotonic() + deadline
        regex = re.compile(pattern)
        while not regex.search(self.output):
            left = end - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {pattern!r} within {deadline}s; printed:\n{self.output}")
            if self._selector.select(left):
                chunk = os.read(self.process.stdout.fileno(), 65536)
                if not chunk:
                    raise AssertionError(
                        f"the sink exited ({self.process.wait(5)}) before printing {pattern!r}:\n"
                        f"{self.output}\n{self.process.stderr.read().decode()}"
                    )
                self.output += chunk.decode("utf-8", "replace")
        return self.output

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        try:
            return self.process.wait(DEADLINE)
        finally:
            if self.process.poll() is None:
                self.process.kill()
            self.process.stdout.close()
            self.process.stderr.close()
            self._selector.close()


@pytest.fixture
def sinks():
    started: list[Sink] = []
    yield lambda *args: started.append(Sink(*args)) or started[-1]
    for sink in started:
        sink.stop()


def swaks(port: int, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [requireTool("swaks"), "--server", f"127.0.0.1:{port}", "--from", "alice@example.org", "--to", "bob@example.net", *args],
        capture_output=True, text=True, timeout=DEADLINE,
    )


def test_the_sink_prints_a_message_sent_with_swaks(sinks, tmp_path):
    sink = sinks()
    assert sink.mode == "plaintext"
    attachment = tmp_path / "report.csv"
    attachment.write_bytes(b"a,b\n1,2\n")
    sent = swaks(sink.port, "--header", "Subject: Hello from swaks", "--body", "The body, readable.", "--attach", str(attachment))
    assert sent.returncode == 0, sent.stdout + sent.stderr
    printed = sink.readUntil(r"\n={72}\n(?![\s\S]*listening)[\s\S]*\n={72}\n")
    block = printed[printed.index("=" * 72):]
    lines = block.splitlines()
    assert lines[1].startswith("Message 1 (from 127.0.0.1:")
    assert lines[2:4] == ["MAIL FROM: <alice@example.org>", "RCPT TO:   <bob@example.net>"]
    assert "Subject: Hello from swaks" in lines
    assert "The body, readable." in lines
    assert "[attachment: report.csv, application/octet-stream, 8 bytes]" in lines
    # No trace header of ours: what the application sent.
    assert not any(line.startswith("Received:") for line in lines)
    assert sink.stop() == 0


def test_the_sink_with_starttls_and_login(sinks):
    sink = sinks("--tls")
    assert sink.mode == "STARTTLS"
    ca = re.search(r"CA certificate \(for clients that verify\): (\S+)", sink.readUntil("CA certificate.*\n")).group(1)
    assert os.path.isfile(ca)
    sent = swaks(sink.port, "--tls", "--tls-verify", "--tls-ca-path", ca, "-au", "dev", "-ap", "anything", "--header", "Subject: over TLS")
    assert sent.returncode == 0, sent.stdout + sent.stderr
    printed = sink.readUntil(r"Subject: over TLS")
    assert re.search(r"Message 1 \(from 127\.0\.0\.1:\d+, TLSv1\.[23], user dev\)", printed), printed
    assert sink.stop() == 0
    # The throwaway CA goes with the sink.
    assert not os.path.exists(ca)


def test_the_sink_with_implicit_tls(sinks):
    sink = sinks("--implicit-tls")
    assert sink.mode == "implicit TLS"
    sent = swaks(sink.port, "--tls-on-connect", "--header", "Subject: smtps")
    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert "Subject: smtps" in sink.readUntil("Subject: smtps")


def test_help_and_a_port_in_use():
    shown = subprocess.run([sys.executable, "-m", "infsmtp", "--help"], cwd=REPO, env=childEnvironment(),
                           capture_output=True, text=True, timeout=DEADLINE)
    assert shown.returncode == 0
    for option in ("--host", "--port", "--tls", "--implicit-tls"):
        assert option in shown.stdout
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        refused = subprocess.run([sys.executable, "-m", "infsmtp", "--port", str(port)], cwd=REPO, env=childEnvironment(),
                                 capture_output=True, text=True, timeout=DEADLINE)
    assert refused.returncode == 1
    assert refused.stderr.startswith("python -m infsmtp: error: cannot listen") and "Traceback" not in refused.stderr


# What is printed -------------------------------------------------------------


def envelope(**extra):
    return {"number": 3, "client": "192.0.2.7:4242", "mailFrom": "a@example.org", "rcptTo": ["b@example.net", "c@example.net"], **extra}


def test_a_multipart_message_prints_its_plain_text_and_lists_its_attachments():
    message = EmailMessage()
    message["Subject"] = "Rapport trimestriel, très long sujet qui sera plié sur deux lignes par le client"
    message.set_content("Bonjour,\nle rapport est joint.\n")
    message.add_alternative("<p>Bonjour</p>", subtype="html")
    message.add_attachment(b"%PDF-1.4 fake", maintype="application", subtype="pdf", filename="q3.pdf")
    text = formatMessage(message, envelope(tls="TLSv1.3", user="alice"))
    lines = text.splitlines()
    assert lines[1] == "Message 3 (from 192.0.2.7:4242, TLSv1.3, user alice)"
    assert lines[3] == "RCPT TO:   <b@example.net>, <c@example.net>"
    assert "Subject: Rapport trimestriel, très long sujet qui sera plié sur deux lignes par le client" in lines
    assert lines[lines.index("Bonjour,") + 1] == "le rapport est joint."
    assert "<p>Bonjour</p>" not in text
    assert "[attachment: q3.pdf, application/pdf, 13 bytes]" in lines
    assert lines[-1] == "=" * 72


def test_an_html_only_message_says_so():
    message = EmailMessage()
    message.set_content("<p>Only HTML</p>", subtype="html")
    lines = formatMessage(message, envelope()).splitlines()
    assert lines[lines.index("[text/html only, shown as sent]") + 1] == "<p>Only HTML</p>"


def test_printdelivery_accepts_and_numbers_messages():
    out = io.StringIO()
    deliver = PrintDelivery(out)
    session = makeSession(mailFrom="a@example.org", rcptTo=["b@example.net"], message="Subject: one\n\nfirst\n")
    assert deliver(session) is True
    assert deliver(session) is True
    assert [line for line in out.getvalue().splitlines() if line.startswith("Message ")] == [
        "Message 1 (from 192.0.2.7:4242)",
        "Message 2 (from 192.0.2.7:4242)",
    ]


# twistd --print --------------------------------------------------------------


def test_twistd_print_prints_to_the_terminal(tmp_path):
    twistd = Twistd(["infsmtp", "--print", "--listen", "tcp:0:interface=127.0.0.1"], tmp_path)
    try:
        port = twistd.port
        sent = swaks(port, "--header", "Subject: via twistd")
        assert sent.returncode == 0, sent.stdout + sent.stderr
        printed = poll(lambda: "Subject: via twistd" in twistd.stdout() and twistd.stdout(), what="the printed message")
        assert "MAIL FROM: <alice@example.org>" in printed
        # Printed, not stored: no Maildir appears.
        assert not os.path.exists(tmp_path / "Maildir")
    finally:
        assert twistd.terminate() == 0


@pytest.mark.parametrize(
    "args, error",
    [
        (["--print", "--maildir", "m"], "--print and --maildir are exclusive: a message is either printed or delivered"),
        (["--print", "--relay", "smarthost.test:25"], "--print and --relay are exclusive: a message is either printed or delivered"),
    ],
)
def test_twistd_print_refuses_another_delivery(tmp_path, args, error):
    result = runTwistd(["infsmtp", *args], tmp_path)
    assert result.returncode == 1
    assert result.stderr == f"twistd infsmtp: error: {error}\n"


def test_twistd_print_refuses_a_daemon(tmp_path):
    result = runTwistd(["infsmtp", "--print"], tmp_path, pidfile=str(tmp_path / "pid"), daemon=True)
    assert result.returncode == 1
    assert result.stderr == "twistd infsmtp: error: --print writes to the terminal, which a daemon has not: add -n\n"


def test_twistd_print_refuses_an_onreceive_handler(tmp_path):
    handlers = tmp_path / "handlers.py"
    handlers.write_text("def onReceive(session):\n    return True\n")
    result = runTwistd(["infsmtp", "--print", "--handlers", str(handlers)], tmp_path)
    assert result.stderr == "twistd infsmtp: error: --print and an onReceive in --handlers are exclusive: choose one\n"

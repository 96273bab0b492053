"""
Each C{.tac} example in C{tac/} started with C{twistd -ny} on an ephemeral
port in a temporary folder, and sent a message.
"""

from __future__ import annotations

import os
import smtplib

import pytest
from twistdprocess import (
    EPHEMERAL,
    REPO,
    Twistd,
    childEnvironment,
    freePort,
    maildirFiles,
    runSmarthost,
)

#: The exit status of a .tac stopped by SIGTERM: 0, as for C{twistd
#: infsmtp} (a Server run by twistd stops gracefully on SIGTERM; under
#: Twisted's own handler it died of the signal, Popen's -15, which Docker
#: and supervisors report as a failure).  A crash while stopping (status 1)
#: or a hang (terminate() fails) is not this.
STOPPED_BY_SIGTERM = 0

MESSAGE = (
    b"From: Alice <alice@example.org>\r\n"
    b"To: Bob <bob@example.net>\r\n"
    b"Subject: through a tac\r\n"
    b"\r\n"
    b"Hello Bob.\r\n"
)


@pytest.fixture
def smarthost():
    """
    An aiosmtpd smarthost (see L{twistdprocess.Sink}).
    """
    yield from runSmarthost()


@pytest.fixture
def tac(tmp_path):
    """
    C{tac(name, **environment)} starts C{twistd -ny tac/NAME.tac} and waits
    until it listens.
    """
    children: list[Twistd] = []

    def start(name: str, **environment: str) -> Twistd:
        env = childEnvironment(INFSMTP_LISTEN=EPHEMERAL, **environment)
        child = Twistd(["-y", os.path.join(REPO, "tac", f"{name}.tac")], tmp_path, env=env)
        children.append(child)
        child.waitListening()
        return child

    yield start
    for child in children:
        child.kill()


def send(port: int, sender: str = "alice@example.org", recipients=("bob@example.net",), message: bytes = MESSAGE) -> dict:
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=10) as client:
        return client.sendmail(sender, list(recipients), message)


def test_maildirTac(tmp_path, tac):
    """
    maildir.tac stores the message in ./Maildir (one log line), and shuts
    down cleanly on SIGTERM.
    """
    child = tac("maildir")
    assert send(child.port) == {}
    [name] = maildirFiles(tmp_path / "Maildir")
    with open(tmp_path / "Maildir" / "new" / name, "rb") as f:
        assert f.read().endswith(MESSAGE.replace(b"\r\n", b"\n"))
    child.waitLog(r"stored in Maildir as " + name)
    # A clean shutdown is the exit status too, not just the last log line.
    assert child.terminate() == STOPPED_BY_SIGTERM, child.log()
    assert "Server Shut Down." in child.log()
    assert "Traceback" not in child.log()


def test_relayTac(tmp_path, tac, smarthost):
    """
    relay.tac forwards through AsyncClient: the smarthost has the message
    when the 250 comes; with the smarthost down the answer is 451.
    """
    child = tac("relay", INFSMTP_SMARTHOST=f"127.0.0.1:{smarthost.port}", INFSMTP_SMARTHOST_TLS="none")
    assert send(child.port, recipients=("bob@example.net", "carol@example.net")) == {}
    [(sender, recipients, content)] = smarthost.envelopes
    assert (sender, recipients) == ("alice@example.org", ["bob@example.net", "carol@example.net"])
    assert content.endswith(MESSAGE)
    with pytest.raises(smtplib.SMTPDataError) as refused:
        send(child.port, message=MESSAGE.replace(b"Subject: through a tac", b"Subject: reject"))
    assert refused.value.smtp_code == 554
    assert len(smarthost.envelopes) == 1
    assert child.terminate() == STOPPED_BY_SIGTERM, child.log()


def test_relayTacSmarthostDown(tmp_path, tac):
    """
    relay.tac with no smarthost listening: 451, so the sender retries.
    """
    child = tac("relay", INFSMTP_SMARTHOST=f"127.0.0.1:{freePort()}", INFSMTP_SMARTHOST_TLS="none")
    with pytest.raises(smtplib.SMTPDataError) as later:
        send(child.port)
    assert later.value.smtp_code == 451
    assert child.terminate() == STOPPED_BY_SIGTERM, child.log()


def test_policyTac(tmp_path, tac):
    """
    policy.tac: a sender outside the allow-list is refused (550); an allowed
    one is greylisted (451) on the first attempt and delivered on the retry.
    """
    child = tac("policy", INFSMTP_GREYLIST_DELAY="0")
    with pytest.raises(smtplib.SMTPSenderRefused) as refused:
        send(child.port, sender="mallory@spam.test")
    assert refused.value.smtp_code == 550

    with pytest.raises(smtplib.SMTPRecipientsRefused) as greylisted:
        send(child.port)
    assert greylisted.value.recipients == {"bob@example.net": (451, b"4.7.1 Greylisted, please try again later")}
    assert maildirFiles(tmp_path / "Maildir") == []

    assert send(child.port) == {}
    assert len(maildirFiles(tmp_path / "Maildir")) == 1
    # Bounces pass the allow-list, and are greylisted like anything new.
    with pytest.raises(smtplib.SMTPRecipientsRefused):
        send(child.port, sender="")
    assert send(child.port, sender="") == {}
    assert len(maildirFiles(tmp_path / "Maildir")) == 2
    assert child.terminate() == STOPPED_BY_SIGTERM, child.log()

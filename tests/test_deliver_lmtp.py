"""
Issue 14, item 4: ``twistd infsmtp --deliver lmtp:ENDPOINT`` in front of a
real Dovecot (started by the test, its own configuration, a unix socket in
a temp dir): the sender gets 250 only once Dovecot took the message, and
the mail is read back from Dovecot's Maildir.  Dovecot's refusals keep
their class: unknown users everywhere 550, the store unreachable 451.
"""

from __future__ import annotations

import smtplib

import pytest
import pytest_twisted
from mailservers import DovecotLMTP
from twistdprocess import EPHEMERAL, Twistd, runTwistd
from twisted.internet import reactor

from infsmtp import AsyncClient, LMTPDelivery, Server
from infsmtp._daemon.twistd import ConfigurationError, Options, _lmtpDelivery

#: Over bob's quota of 1 KiB (Dovecot refuses it after the data).
MESSAGE = b"From: ann@example.org\r\nSubject: to the store\r\n\r\n.a dot\r\n" + b"x" * 1500 + b"\r\n"


@pytest.fixture(scope="module")
def dovecot():
    server = DovecotLMTP()
    yield server
    server.stop()


@pytest.fixture
def daemon(tmp_path, dovecot):
    child = Twistd(
        ["-n", "infsmtp", "--listen", EPHEMERAL, "--deliver", f"lmtp:unix:{dovecot.socket}"], tmp_path
    )
    try:
        child.waitListening()
        yield child
        assert child.terminate() == 0
    finally:
        child.kill()


def send(port: int, recipients: list[str]) -> dict:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
        return smtp.sendmail("ann@example.org", recipients, MESSAGE)


def test_aMessageReachesTheStoreBeforeThe250(daemon, dovecot):
    before = len(dovecot.delivered("alice"))
    assert send(daemon.port, ["alice@example.org"]) == {}
    # Read back at once: the 250 came after Dovecot saved it.
    delivered = dovecot.delivered("alice")
    assert len(delivered) == before + 1
    assert delivered[-1].replace(b"\n", b"\r\n").endswith(MESSAGE.split(b"\r\n\r\n", 1)[1])


def test_recipientsTheStoreRefusesKeepTheirClass(daemon, dovecot):
    # Every recipient refused permanently (unknown; a full mailbox): 550.
    for nobody in (["carol@example.org"], ["bob@example.org"], ["bob@example.org", "carol@example.org"]):
        with pytest.raises(smtplib.SMTPDataError) as refused:
            send(daemon.port, nobody)
        assert refused.value.smtp_code == 550, nobody
    # Taken for one: 250, and the others are logged.
    before = len(dovecot.delivered("alice"))
    assert send(daemon.port, ["alice@example.org", "carol@example.org"]) == {}
    assert len(dovecot.delivered("alice")) == before + 1
    daemon.waitLog(r"refused <carol@example.org>: 550")


def test_anUnreachableStoreIs451(tmp_path):
    child = Twistd(
        ["-n", "infsmtp", "--listen", EPHEMERAL, "--deliver", f"lmtp:unix:{tmp_path}/no-such-socket"], tmp_path
    )
    try:
        child.waitListening()
        with pytest.raises(smtplib.SMTPDataError) as failed:
            send(child.port, ["alice@example.org"])
        assert failed.value.smtp_code == 451
        assert child.terminate() == 0
    finally:
        child.kill()


def deliverOptions(*args: str) -> Options:
    options = Options()
    options.parseOptions(list(args))
    return options


@pytest.mark.parametrize(
    "args, error",
    [
        (["--deliver", "smtp:tcp:127.0.0.1:25"], "--deliver smtp:tcp:127.0.0.1:25: expected lmtp:ENDPOINT"),
        (["--deliver", "lmtp:"], "expected lmtp:ENDPOINT"),
        (["--deliver", "lmtp:bogus:1"], "'bogus:1' is not a client endpoint"),
    ],
)
def test_aBadTargetRefusesToStart(args, error):
    with pytest.raises(ConfigurationError, match=error):
        _lmtpDelivery(deliverOptions(*args))


def test_deliverIsExclusiveWithOtherTargets(tmp_path):
    result = runTwistd(["infsmtp", "--listen", EPHEMERAL, "--deliver", "lmtp:unix:/x", "--maildir", "m"], tmp_path)
    assert result.returncode == 1
    assert "--deliver and --maildir are exclusive: a message goes one way" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_theStoresTimeForItsRepliesStaysUnderTheServers():
    delivery = _lmtpDelivery(deliverOptions("--deliver", "lmtp:unix:/x", "--receive-timeout", "100"))
    assert delivery.dataTimeout == 90000 and delivery.lmtp is True


@pytest_twisted.ensureDeferred
async def test_anLmtpServerPassesEachRecipientsFateOn(dovecot):
    """
    infsmtp speaking LMTP in front of Dovecot: each recipient's reply is
    Dovecot's (alice saved, carol unknown), not one for the message.
    """
    server = Server(port=0, interface="127.0.0.1", hostname="infsmtp.test", lmtp=True)
    delivery = LMTPDelivery(f"unix:{dovecot.socket}")
    server.onReceive = delivery
    await server.startListening().addTimeout(30, reactor)
    try:
        before = len(dovecot.delivered("alice"))
        async with AsyncClient(host="127.0.0.1", port=server.port, lmtp=True) as client:
            refused = await client.sendmail("ann@example.org", ["alice@example.org", "carol@example.org"], MESSAGE)
        assert list(refused) == ["carol@example.org"] and refused["carol@example.org"][0] == 550
        assert "carol" in refused["carol@example.org"][1]
        assert len(dovecot.delivered("alice")) == before + 1
    finally:
        await delivery.close()
        await server.stopListening().addTimeout(30, reactor)

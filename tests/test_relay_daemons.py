"""
The relay as deployed (issue 11, items 1 and 3): C{tac/relay.tac} under
C{twistd -ny} against an aiosmtpd smarthost keeps the smarthost's classes
of refusal and logs its failures; C{twistd infsmtp --relay-timeout} reaches
RelayDelivery and is refused when the server's own deadline would cut it.
"""

from __future__ import annotations

import os
import smtplib

import pytest
from test_relay_errors import Smarthost, smarthost  # noqa: F401 (a fixture)
from twistdprocess import EPHEMERAL, REPO, Twistd, childEnvironment, runTwistd

from infsmtp._daemon.twistd import ConfigurationError, Options, _relayDelivery

MESSAGE = b"From: alice@example.org\r\nTo: bob@example.net\r\nSubject: via the tac\r\n\r\nHi.\r\n"


@pytest.fixture
def relayTac(tmp_path, smarthost):  # noqa: F811
    child = Twistd(
        ["-y", os.path.join(REPO, "tac", "relay.tac")],
        tmp_path,
        env=childEnvironment(
            INFSMTP_LISTEN=EPHEMERAL, INFSMTP_SMARTHOST=f"127.0.0.1:{smarthost.port}", INFSMTP_SMARTHOST_TLS="none"
        ),
    )
    child.waitListening()
    yield child
    child.kill()


def send(port: int, recipient: str) -> dict:
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=10) as client:
        return client.sendmail("alice@example.org", [recipient], MESSAGE)


def test_relayTacKeepsTheSmarthostsClassOfRefusalAndLogsIt(relayTac, smarthost):  # noqa: F811
    """
    A 5xx from the smarthost stays permanent (the sender bounces), a 4xx is
    451 with the smarthost's reason (the sender retries); each is logged
    with the step that failed.  A good message goes through once.
    """
    with pytest.raises(smtplib.SMTPDataError) as bounced:
        send(relayTac.port, "550@example.net")
    assert bounced.value.smtp_code == 550
    with pytest.raises(smtplib.SMTPDataError) as later:
        send(relayTac.port, "452@example.net")
    assert later.value.smtp_code == 451 and b"4.3.1 mailbox full" in later.value.smtp_error
    relayTac.waitLog(r"sending the message to 127\.0\.0\.1:\d+ failed: .*452")
    assert send(relayTac.port, "bob@example.net") == {}
    assert len(smarthost.messages) == 1
    assert "Starting factory" not in relayTac.log()


def test_relayDaemonReusesItsSessionAndQuitsWhenStopped(tmp_path, smarthost):  # noqa: F811
    """
    C{twistd infsmtp --relay}: three messages reach the smarthost over one
    connection; SIGTERM ends it with QUIT once the server has stopped.
    """
    child = Twistd(
        ["-n", "infsmtp", "--listen", EPHEMERAL, "--relay", f"127.0.0.1:{smarthost.port}", "--relay-tls", "none"],
        tmp_path,
    )
    try:
        child.waitListening()
        for _ in range(3):
            assert send(child.port, "bob@example.net") == {}
        assert len(smarthost.messages) == 3
        [connection] = set(smarthost.peers)
        assert child.terminate() == 0
        assert smarthost.quits == [connection]
    finally:
        child.kill()


def relayOptions(*args: str) -> Options:
    options = Options()
    options.parseOptions(["--relay", "127.0.0.1:2525", *args])
    return options


def test_relayTimeoutReachesRelayDelivery():
    """
    --relay-timeout is the smarthost's time for its reply to the end of a
    message; by default the RFC's 600 s, kept under --receive-timeout.
    """
    assert _relayDelivery(relayOptions("--relay-timeout", "120")).dataTimeout == 120000
    assert _relayDelivery(relayOptions()).dataTimeout == 270000  # 90 % of the default 300 s
    assert _relayDelivery(relayOptions("--receive-timeout", "900")).dataTimeout == 600000
    with pytest.raises(ConfigurationError, match="--relay-timeout 400"):
        _relayDelivery(relayOptions("--relay-timeout", "400"))


def test_relayConnectionsReachRelayDelivery():
    assert _relayDelivery(relayOptions("--relay-connections", "2")).maxConnections == 2
    assert _relayDelivery(relayOptions()).maxConnections == 4
    with pytest.raises(ConfigurationError, match="--relay-connections 0: must be at least 1"):
        _relayDelivery(relayOptions("--relay-connections", "0"))


def test_relayTimeoutOverReceiveTimeoutIsOneLine(tmp_path):
    result = runTwistd(["infsmtp", "--listen", EPHEMERAL, "--relay", "127.0.0.1:2525", "--relay-timeout", "400"], tmp_path)
    assert result.returncode == 1
    assert "--relay-timeout 400: must be over 0 and under --receive-timeout (300)" in result.stderr

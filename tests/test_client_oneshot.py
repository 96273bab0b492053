"""
Issue 11, item 8, against aiosmtpd: the one-shot ``infsmtp.sendmail()``
(connect, authenticate, send, QUIT, free), ``async with AsyncClient(...)``
and the settings as keyword arguments of the constructors.
"""

from __future__ import annotations

import io
from email.message import EmailMessage

import pytest
import pytest_twisted
from aiosmtpd.smtp import AuthResult
from peertools import EphemeralController
from twisted.internet import reactor
from twisted.internet.defer import Deferred

import infsmtp
from infsmtp import AsyncClient, AuthMode, Client, SMTPAuthenticationError, SMTPConnectError, SMTPError, sendmail

MESSAGE = b"From: ann@example.org\r\nTo: bob@example.org\r\nSubject: one shot\r\n\r\nHello.\r\n"

#: Seconds: the bound on each wait below.
WAIT = 10


class Recorder:
    """
    An aiosmtpd handler keeping the envelopes, the commands that ended
    sessions, and the logins; ``secret`` is the only good password.
    """

    def __init__(self) -> None:
        self.envelopes: list[tuple[str, list[str], bytes]] = []
        self.quits = 0
        self.logins: list[tuple[str, bytes]] = []

    async def handle_DATA(self, server, session, envelope):
        self.envelopes.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content))
        return "250 2.0.0 OK"

    async def handle_QUIT(self, server, session, envelope):
        self.quits += 1
        return "221 Bye"

    def authenticate(self, server, session, envelope, mechanism, data):
        self.logins.append((mechanism, data.login))
        return AuthResult(success=data.password == b"secret", handled=False)




@pytest.fixture
def aiosmtpd():
    handler = Recorder()
    controller = EphemeralController(
        handler, hostname="127.0.0.1", port=0, authenticator=handler.authenticate, auth_require_tls=False
    )
    controller.start()
    handler.port = controller.port
    yield handler
    controller.stop()


def bounded(d: Deferred) -> Deferred:
    return d.addTimeout(WAIT, reactor)


def settings(server: Recorder) -> dict:
    return {"host": "127.0.0.1", "port": server.port, "timeout": WAIT * 1000}


def test_sendmailIsExported():
    assert infsmtp.sendmail is sendmail
    assert "sendmail" in infsmtp.__all__


@pytest.mark.parametrize("kind", ["bytes", "str", "file", "Message"])
@pytest_twisted.ensureDeferred
async def test_sendmailSendsAndQuits(aiosmtpd, kind):
    message = {
        "bytes": MESSAGE,
        "str": MESSAGE.decode("ascii"),
        "file": io.BytesIO(MESSAGE),
        "Message": EmailMessage(),
    }[kind]
    if kind == "Message":
        message["From"], message["To"], message["Subject"] = "ann@example.org", "bob@example.org", "one shot"
        message.set_content("Hello.")
    refused = await bounded(sendmail(message, **settings(aiosmtpd)))
    assert refused == {}
    [(sender, recipients, content)] = aiosmtpd.envelopes
    assert (sender, recipients) == ("ann@example.org", ["bob@example.org"])
    assert b"Subject: one shot" in content
    assert aiosmtpd.quits == 1
    assert aiosmtpd.logins == []


@pytest_twisted.ensureDeferred
async def test_sendmailEnvelopeGiven(aiosmtpd):
    refused = await bounded(sendmail(MESSAGE, "zed@example.org", ["cat@example.net"], **settings(aiosmtpd)))
    assert refused == {}
    [(sender, recipients, _)] = aiosmtpd.envelopes
    assert (sender, recipients) == ("zed@example.org", ["cat@example.net"])


@pytest_twisted.ensureDeferred
async def test_sendmailAuthenticatesWithAUsername(aiosmtpd):
    # No authMode: a username means AuthMode.default, PLAIN first.
    await bounded(sendmail(MESSAGE, username="ann", password="secret", **settings(aiosmtpd)))
    assert aiosmtpd.logins == [("PLAIN", b"ann")]
    assert len(aiosmtpd.envelopes) == 1
    assert aiosmtpd.quits == 1


@pytest_twisted.ensureDeferred
async def test_sendmailExplicitAuthModeWins(aiosmtpd):
    await bounded(sendmail(MESSAGE, username="ann", password="x", authMode=AuthMode.none, **settings(aiosmtpd)))
    assert aiosmtpd.logins == []
    assert len(aiosmtpd.envelopes) == 1


@pytest_twisted.ensureDeferred
async def test_sendmailRefusedCredentialsSendNothing(aiosmtpd):
    with pytest.raises(SMTPAuthenticationError) as caught:
        await bounded(sendmail(MESSAGE, username="ann", password="wrong", **settings(aiosmtpd)))
    assert caught.value.code == 535
    assert "wrong" not in str(caught.value)
    assert aiosmtpd.envelopes == []
    assert aiosmtpd.quits == 1


@pytest_twisted.ensureDeferred
async def test_sendmailConnectFailure(aiosmtpd):
    port = aiosmtpd.port
    with pytest.raises(SMTPConnectError):
        # Port 1 on loopback: nothing listens there.
        await bounded(sendmail(MESSAGE, host="127.0.0.1", port=1, timeout=WAIT * 1000))
    assert aiosmtpd.port == port and aiosmtpd.envelopes == []


def test_unknownSettingIsATypeError():
    with pytest.raises(TypeError, match="hots"):
        sendmail(MESSAGE, hots="127.0.0.1")
    with pytest.raises(TypeError, match="hots"):
        AsyncClient(hots="127.0.0.1")
    with pytest.raises(TypeError, match="hots"):
        Client(hots="127.0.0.1")


def test_constructorsTakeTheSettings():
    c = AsyncClient(host="mx.example.org", port=587, authMode=AuthMode.default, localHostname="me.test")
    assert (c.host, c.port, c.authMode, c.heloName) == ("mx.example.org", 587, AuthMode.default, "me.test")
    assert AsyncClient(None, timeout=5).timeout == 5
    b = Client(host="mx.example.org", port=587, username="ann")
    assert (b.host, b.port, b.username) == ("mx.example.org", 587, "ann")
    assert (b._client.host, b._client.port) == ("mx.example.org", 587)


@pytest_twisted.ensureDeferred
async def test_asyncWithConnectsThenQuitsAndFrees(aiosmtpd):
    client = AsyncClient(**settings(aiosmtpd))
    async with client as entered:
        assert entered is client
        assert client.connected
        assert await bounded(client.sendStream(io.BytesIO(MESSAGE))) == {}
    assert not client.connected
    assert aiosmtpd.quits == 1
    assert len(aiosmtpd.envelopes) == 1
    with pytest.raises(SMTPError, match="freed"):
        await bounded(client.connect())


@pytest_twisted.ensureDeferred
async def test_asyncWithQuitsAndFreesOnError(aiosmtpd):
    client = AsyncClient(**settings(aiosmtpd))
    with pytest.raises(ValueError, match="in the block"):
        async with client:
            raise ValueError("in the block")
    assert not client.connected
    assert aiosmtpd.quits == 1
    with pytest.raises(SMTPError, match="freed"):
        await bounded(client.connect())


@pytest_twisted.ensureDeferred
async def test_asyncWithFreesWhenTheConnectFails():
    client = AsyncClient(host="127.0.0.1", port=1, timeout=WAIT * 1000)
    with pytest.raises(SMTPConnectError):
        async with client:
            pytest.fail("entered without a connection")
    with pytest.raises(SMTPError, match="freed"):
        await bounded(client.connect())


@pytest_twisted.ensureDeferred
async def test_cancellingSendmailClosesAtOnce():
    from twisted.internet.defer import CancelledError
    from twisted.internet.protocol import Protocol, ServerFactory

    # A server that never greets: sendmail waits until cancelled.
    lost: Deferred = Deferred()
    connected: Deferred = Deferred()

    class Silent(Protocol):
        def connectionMade(self):
            connected.callback(None)

        def connectionLost(self, reason):
            lost.callback(None)

    port = reactor.listenTCP(0, ServerFactory.forProtocol(Silent), interface="127.0.0.1")
    try:
        # timeout far above the bound: only the cancel can end it in time.
        d = sendmail(MESSAGE, host="127.0.0.1", port=port.getHost().port, timeout=600000)
        await bounded(connected)
        d.cancel()
        with pytest.raises(CancelledError):
            await bounded(d)
        await bounded(lost)
    finally:
        await port.stopListening()

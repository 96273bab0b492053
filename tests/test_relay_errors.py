"""
RelayDelivery's failures against a real smarthost (aiosmtpd on loopback),
issue 11 items 1 and 3: what the sender is told (5xx stays 5xx, so it
bounces; 4xx and our own trouble are 451, so it retries), what the log
says (the step that failed), a slow smarthost within dataTimeout delivering
once, and no factory noise per message.
"""

from __future__ import annotations

import io
import threading

import pytest
import pytest_twisted
from aiosmtpd.smtp import AuthResult
from peertools import EphemeralController
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.logger import formatEvent

from infsmtp import AsyncClient, EncryptMode, RelayDelivery, Server, SMTPError

MESSAGE = b"From: ann@example.org\r\nTo: bob@example.org\r\nSubject: relayed\r\n\r\nHello.\r\n"
PASSWORD = "relay secret"


class Smarthost:
    """
    An aiosmtpd handler: C{452@} recipients get a 452 on DATA, C{550@} a
    550; C{slow} (a threading.Event) holds the reply to DATA until set,
    and C{reached} says the message arrived.
    """

    def __init__(self) -> None:
        self.messages: list[tuple[str, list[str], bytes]] = []
        # The relay's port for each message: one per connection.
        self.peers: list[int] = []
        self.quits: list[int] = []
        self.slow: threading.Event | None = None
        self.reached: Deferred[None] = Deferred()

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address.startswith("550@"):
            return "550 5.1.1 no such user"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):
        reactor.callFromThread(self.reached.callback, None)
        if any(r.startswith("452@") for r in envelope.rcpt_tos):
            return "452 4.3.1 mailbox full, later"
        if self.slow is not None:
            await server.loop.run_in_executor(None, self.slow.wait, 30)
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content))
        self.peers.append(session.peer[1])
        return "250 2.0.0 OK queued"

    async def handle_QUIT(self, server, session, envelope):
        self.quits.append(session.peer[1])
        return "221 Bye"

    def authenticator(self, server, session, envelope, mechanism, authData):
        return AuthResult(success=authData.password.decode() == PASSWORD, handled=False)




@pytest.fixture
def smarthost():
    handler = Smarthost()
    # No SMTPUTF8; AUTH without TLS (loopback tests).
    controller = EphemeralController(
        handler,
        hostname="127.0.0.1",
        port=0,
        enable_SMTPUTF8=False,
        authenticator=handler.authenticator,
        auth_require_tls=False,
    )
    controller.start()
    handler.port = controller.port
    yield handler
    if handler.slow is not None:
        handler.slow.set()
    controller.stop()


@pytest_twisted.async_yield_fixture
async def relay():
    """
    C{await start(smarthost, **RelayDeliveryKeywords)}: an infsmtp server on
    loopback relaying to the smarthost.
    """
    servers = []

    async def start(smarthost, **keywords):
        server = Server(port=0, interface="127.0.0.1", hostname="relay.test", receivedHeader=False)
        server.onReceive = RelayDelivery("127.0.0.1", smarthost.port, encryptMode=EncryptMode.none, **keywords)
        await server.startListening().addTimeout(10, reactor)
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.stopListening().addTimeout(10, reactor)
        await server.onReceive.close().addTimeout(10, reactor)


async def send(server, sender="ann@example.org", recipients=("bob@example.org",)):
    c = AsyncClient()
    c.host, c.port, c.timeout = "127.0.0.1", server.port, 10000
    await c.connect()
    try:
        return await c.sendStream(io.BytesIO(MESSAGE), sender, list(recipients))
    finally:
        await c.disconnect()


async def refusal(server, **keywords) -> SMTPError:
    with pytest.raises(SMTPError) as refused:
        await send(server, **keywords)
    return refused.value


def relayLog(events) -> list[str]:
    return [formatEvent(e) for e in events if e.get("log_namespace") == "infsmtp.relay"]


@pytest_twisted.ensureDeferred
async def test_nonAsciiSenderToSmarthostWithoutSmtputf8IsPermanent(smarthost, relay, logEvents):
    """
    The smarthost cannot take a non-ASCII envelope, today or tomorrow: 554
    5.6.7, so the sender bounces instead of retrying for days.
    """
    server = await relay(smarthost)
    error = await refusal(server, sender="jörg@example.org")
    assert error.code == 554 and "refused: 5.6.7 " in error.text, error
    assert smarthost.messages == []
    [line] = relayLog(logEvents)
    assert "<jörg@example.org>" in line and "sending the message to 127.0.0.1:" in line and "553 5.6.7" in line


@pytest_twisted.ensureDeferred
async def test_refusedCredentialsAreLoggedAsAuthentication(smarthost, relay, logEvents):
    """
    Our credentials refused: 451 (fix the configuration, the sender
    retries), and the log blames AUTH, not the message.
    """
    server = await relay(smarthost, username="relay", password="wrong")
    error = await refusal(server)
    assert error.code == 451
    [line] = relayLog(logEvents)
    assert "authenticating to 127.0.0.1:" in line and "failed" in line and "did not take the message" not in line
    assert smarthost.messages == []

    right = await relay(smarthost, username="relay", password=PASSWORD)
    assert await send(right) == {}
    assert len(smarthost.messages) == 1


@pytest_twisted.ensureDeferred
async def test_smarthostCodesKeepTheirClass(smarthost, relay, logEvents):
    """
    The smarthost's 4xx is a 451 with its reason; its 5xx for every
    recipient a 550; an unreachable smarthost a 451 logged as connecting.
    """
    server = await relay(smarthost)
    later = await refusal(server, recipients=["452@example.org"])
    assert later.code == 451 and "(452 " in later.text and "4.3.1 mailbox full" in later.text, later
    bounced = await refusal(server, recipients=["550@example.org"])
    assert bounced.code == 550, bounced
    assert smarthost.messages == []

    unreachable = await relay(type("Nowhere", (), {"port": 1})())
    down = await refusal(unreachable)
    assert down.code == 451
    assert any("connecting to 127.0.0.1:1 failed" in line for line in relayLog(logEvents))


@pytest_twisted.ensureDeferred
async def test_slowSmarthostWithinDataTimeoutDeliversOnce(smarthost, relay):
    """
    Issue 11's duplicate: the smarthost answers the final dot after the
    command timeout; within dataTimeout, the sender gets 250 and the
    smarthost has the message once.
    """
    smarthost.slow = threading.Event()
    server = await relay(smarthost, timeout=300, dataTimeout=20000)
    sent = Deferred.fromCoroutine(send(server))
    await smarthost.reached.addTimeout(10, reactor)
    # The scan outlasts `timeout`: the scenario, not a synchronisation.
    reactor.callLater(0.9, smarthost.slow.set)
    assert await sent == {}
    assert len(smarthost.messages) == 1


@pytest_twisted.ensureDeferred
async def test_noFactoryLinesPerRelayedMessage(smarthost, relay, logEvents):
    server = await relay(smarthost)
    for _ in range(2):
        assert await send(server) == {}
    lines = [formatEvent(e) for e in logEvents]
    assert len(smarthost.messages) == 2
    assert not [line for line in lines if "Starting factory" in line or "Stopping factory" in line]
    assert len([line for line in relayLog(logEvents) if "relayed to" in line]) == 2


@pytest_twisted.ensureDeferred
async def test_relayedMessagesShareSessionsToTheSmarthost(smarthost, relay):
    """
    Issue 11 item 10: four messages, two at a time, reach the smarthost
    over two connections (maxConnections=2), not four; close() says QUIT
    and a later message opens a new one.
    """
    server = await relay(smarthost, maxConnections=2)
    for _ in range(2):
        assert await gatherResults([Deferred.fromCoroutine(send(server)) for _ in range(2)]).addTimeout(10, reactor) == [{}, {}]
    assert len(smarthost.messages) == 4
    assert len(set(smarthost.peers)) == 2
    await server.onReceive.close().addTimeout(10, reactor)
    assert await send(server) == {}
    assert len(set(smarthost.peers)) == 3

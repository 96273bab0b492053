"""
Issue 11, item 9: the client in LMTP mode (``lmtp = True``, RFC 2033)
delivering into a real Dovecot started by the test: LHLO, and one reply
per accepted recipient after the message, so that a recipient refused
then (a full mailbox) is among the refused, and the others have the mail
in their Maildir.
"""

from __future__ import annotations

import pytest
import pytest_twisted
from mailservers import DovecotLMTP
from twisted.internet.threads import deferToThread

from infsmtp import AsyncClient, Client, SMTPConnectError, SMTPError, SMTPRecipientsRefused

#: Over bob's quota of 1 KiB, so he never takes it.
MESSAGE = (
    b"From: ann@example.org\r\nTo: alice\r\nSubject: into the store\r\n\r\n.dot\r\nHello.\r\n"
    + b"z" * 1500 + b"\r\n"
)
#: Bigger than bob's quota (1 KiB), and than what is read before sending.
LONG = b"From: ann@example.org\r\nSubject: long\r\n\r\n" + (b"y" * 78 + b"\r\n") * 2000


@pytest.fixture(scope="module")
def dovecot():
    server = DovecotLMTP()
    yield server
    server.stop()


def lmtpClient(dovecot: DovecotLMTP, **settings) -> AsyncClient:
    return AsyncClient(socketPath=dovecot.socket, lmtp=True, **settings)


@pytest.mark.parametrize("chunking", [True, False], ids=["BDAT", "DATA"])
@pytest_twisted.ensureDeferred
async def test_eachRecipientHasItsOwnAnswer(dovecot, chunking):
    before = len(dovecot.delivered("alice"))
    async with lmtpClient(dovecot, chunking=chunking) as c:
        # Dovecot announces CHUNKING: which command went is `chunking`'s.
        assert c.supportsExtension("CHUNKING")
        refused = await c.sendmail("ann@example.org", ["alice", "bob", "carol"], MESSAGE)
    # carol at RCPT; bob after the message (his mailbox is full).
    assert sorted(refused) == ["bob", "carol"]
    assert refused["carol"][0] == 550
    assert refused["bob"][0] == 552 and "Quota" in refused["bob"][1]
    delivered = dovecot.delivered("alice")
    assert len(delivered) == before + 1
    # Stored as sent (Dovecot adds Return-Path and Delivered-To first).
    assert delivered[-1].replace(b"\n", b"\r\n").endswith(MESSAGE)


@pytest.mark.parametrize("chunking", [True, False], ids=["BDAT", "DATA"])
@pytest_twisted.ensureDeferred
async def test_everyRecipientRefusedAfterTheMessage(dovecot, chunking):
    async with lmtpClient(dovecot, chunking=chunking) as c:
        with pytest.raises(SMTPRecipientsRefused) as raised:
            await c.sendmail("ann@example.org", ["bob"], MESSAGE)
        assert list(raised.value.refused) == ["bob"]
        assert raised.value.refused["bob"][0] == 552
        # The server did act on the message: not something to resend
        # blindly.
        assert raised.value.messageStarted
        # The session goes on.
        assert await c.sendmail("ann@example.org", ["alice"], MESSAGE) == {}


@pytest.mark.parametrize("chunking", [True, False], ids=["BDAT", "DATA"])
@pytest_twisted.ensureDeferred
async def test_aStreamedMessage(dovecot, tmp_path, chunking):
    path = tmp_path / "long.eml"
    path.write_bytes(LONG)
    before = len(dovecot.delivered("alice"))
    async with lmtpClient(dovecot, chunking=chunking) as c:
        refused = await c.sendFile(str(path), "ann@example.org", ["alice", "bob"])
    assert list(refused) == ["bob"] and refused["bob"][0] == 552
    delivered = dovecot.delivered("alice")
    assert len(delivered) == before + 1
    assert delivered[-1].replace(b"\n", b"\r\n").endswith(LONG)


@pytest_twisted.ensureDeferred
async def test_overTCPWithLHLO(dovecot):
    before = len(dovecot.delivered("alice"))
    async with AsyncClient(host="127.0.0.1", port=dovecot.port, lmtp=True) as c:
        assert await c.sendmail("ann@example.org", ["alice"], MESSAGE) == {}
    assert len(dovecot.delivered("alice")) == before + 1


@pytest_twisted.ensureDeferred
async def test_withoutLmtpAnLMTPServerRefusesTheSession(dovecot):
    # EHLO and HELO are not LMTP: Dovecot refuses both, and the client
    # says so rather than going on.
    c = AsyncClient(socketPath=dovecot.socket)
    with pytest.raises(SMTPConnectError):
        await c.connect()
    await c.free()


@pytest_twisted.ensureDeferred
async def test_theBlockingClient(dovecot):
    before = len(dovecot.delivered("alice"))

    def send() -> dict:
        with Client(socketPath=dovecot.socket, lmtp=True) as c:
            c.connect()
            return c.sendmail("ann@example.org", ["alice", "carol"], MESSAGE)

    refused = await deferToThread(send)
    assert list(refused) == ["carol"] and refused["carol"][0] == 550
    assert len(dovecot.delivered("alice")) == before + 1


@pytest_twisted.ensureDeferred
async def test_lmtpMustBeABool():
    c = AsyncClient(socketPath="/nonexistent", lmtp="yes")
    with pytest.raises(SMTPError, match="lmtp must be True or False"):
        await c.connect()
    await c.free()

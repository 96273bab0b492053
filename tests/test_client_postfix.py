"""
The client against a real Postfix smtpd started by the test (it offers
PIPELINING, CHUNKING, DSN and SMTPUTF8; smtp-sink offers neither CHUNKING
nor DSN).

- Issue 11, item 12: the client sends with BDAT (RFC 3030) when the server
  offers CHUNKING, and falls back to DATA otherwise.  Postfix's own log
  counts the commands of each session (``bdat=1``), so what went on the
  wire is Postfix's word.
- Issue 11, item 4: MAIL and RCPT options (DSN's ``RET``, ``ENVID``,
  ``NOTIFY``, ``ORCPT``) on every send form, per recipient when asked;
  Postfix's queue file says what it understood.
"""

from __future__ import annotations

import email
import email.policy
import io
import re

import pytest
import pytest_twisted
from mailservers import PostfixServer
from twisted.internet.defer import Deferred
from twisted.internet.testing import StringTransport

from infsmtp import AsyncClient, ClientPool, SMTPError, SMTPRecipientsRefused
from infsmtp._client.envelope import outgoingFromStream
from infsmtp._client.protocol import MAX_CHUNKS_UNANSWERED, ESMTPSessionClient

SENDER = "ann@example.org"

#: A message whose lines would need dot-stuffing in DATA, with bare LFs.
DOTTED = (
    b"From: ann@example.org\r\nTo: bob@example.net\r\nSubject: dots\r\n\r\n"
    b".a line starting with a dot\r\n..two dots\n.\nlast line without an end"
)
#: What the server must store: CRLF everywhere, no dot doubled or removed,
#: the last line ended.
DOTTED_CANONICAL = (
    b"From: ann@example.org\r\nTo: bob@example.net\r\nSubject: dots\r\n\r\n"
    b".a line starting with a dot\r\n..two dots\r\n.\r\nlast line without an end\r\n"
)


@pytest.fixture(scope="module")
def postfix():
    server = PostfixServer(
        message_size_limit="300000",
        # Refuse a sender at MAIL, not at the first RCPT.
        smtpd_delay_reject="no",
        smtpd_sender_restrictions="check_sender_access inline:{ {bad@example.org = REJECT} }",
        smtpd_recipient_restrictions="check_recipient_access inline:{ {nobody@example.net = REJECT} }",
    )
    yield server
    server.stop()


@pytest.fixture
def held(postfix):
    """
    The Postfix server with nothing held, and what its log said before.
    """
    postfix.clear()
    return postfix


def client(postfix: PostfixServer, **settings) -> AsyncClient:
    return AsyncClient(host="127.0.0.1", port=postfix.port, **settings)


def body(content: bytes) -> bytes:
    """
    The message as sent, from what Postfix holds (after its Received line).
    """
    received, _, rest = content.partition(b"\n")
    assert received.startswith(b"Received: ")
    # The Received field may be folded over several lines.
    while rest[:1] in (b" ", b"\t"):
        rest = rest.partition(b"\n")[2]
    return rest


def crlf(text: bytes) -> bytes:
    # postcat prints LF line endings.
    return text.replace(b"\r\n", b"\n")


class Unseekable(io.RawIOBase):
    """
    A stream of ``size`` bytes of message whose size cannot be known
    beforehand (no SIZE parameter), read in pieces.
    """

    def __init__(self, head: bytes, size: int) -> None:
        self._head, self._left = head, size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self._head:
            n = min(len(buffer), len(self._head))
            buffer[:n], self._head = self._head[:n], self._head[n:]
            return n
        n = min(len(buffer), self._left)
        line = b"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcd\r\n"
        data = (line * (n // len(line) + 1))[:n]
        buffer[:n] = data
        self._left -= n
        return n


@pytest_twisted.ensureDeferred
async def test_aSmallMessageGoesWithBDATAndIsStoredAsSent(held):
    before = len(held.sessions())
    async with client(held) as c:
        assert c.supportsExtension("CHUNKING")
        refused = await c.sendmail(SENDER, ["bob@example.net"], DOTTED)
    assert refused == {}
    [message] = held.held(1)
    assert (message.sender, message.recipients) == (SENDER, ["bob@example.net"])
    assert body(message.content) == crlf(DOTTED_CANONICAL)
    [session] = held.sessionsAfter(before)
    assert "bdat=1" in session and "data=" not in session, session


@pytest_twisted.ensureDeferred
async def test_withoutChunkingItIsDATA(held):
    before = len(held.sessions())
    async with client(held, chunking=False) as c:
        await c.sendmail(SENDER, ["bob@example.net"], DOTTED)
    [message] = held.held(1)
    assert body(message.content) == crlf(DOTTED_CANONICAL)
    [session] = held.sessionsAfter(before)
    assert "data=1" in session and "bdat=" not in session, session


@pytest_twisted.ensureDeferred
async def test_aLongMessageGoesInChunks(held, tmp_path):
    # Longer than what is read before sending: streamed, several chunks.
    line = b"x" * 70 + b"\n"
    content = b"From: ann@example.org\r\nSubject: long\r\n\r\n" + line * 3000 + b".\n"
    path = tmp_path / "long.eml"
    path.write_bytes(content)
    before = len(held.sessions())
    async with client(held) as c:
        await c.sendFile(str(path), SENDER, ["bob@example.net"])
        # The session goes on after a streamed message.
        await c.sendmail(SENDER, ["bob@example.net"], DOTTED)
    first, second = held.held(2)
    assert crlf(content) in crlf(first.content)
    assert crlf(DOTTED_CANONICAL) in crlf(second.content)
    [session] = held.sessionsAfter(before)
    counts = dict(part.split("=") for part in session.split() if "=" in part)
    assert int(counts["bdat"]) >= 3 and "data" not in counts, session


@pytest_twisted.ensureDeferred
async def test_aChunkOverTheSizeLimitStopsTheMessageNotTheSession(held):
    # No SIZE parameter (the size is unknown): Postfix refuses the chunk
    # that passes its limit; no other chunk goes, and the session goes on.
    before = len(held.sessions())
    async with client(held) as c:
        stream = io.BufferedReader(Unseekable(b"Subject: big\r\n\r\n", 2_000_000), 65536)
        with pytest.raises(SMTPError) as raised:
            await c.sendStream(stream, SENDER, ["bob@example.net"])
        assert raised.value.code == 552, raised.value
        assert raised.value.messageStarted
        # Not all of it was read: sending stopped at the refusal.
        assert stream.raw._left > 0
        assert await c.sendmail(SENDER, ["bob@example.net"], DOTTED) == {}
    [message] = held.held(1)
    assert crlf(DOTTED_CANONICAL) in crlf(message.content)
    [session] = held.sessionsAfter(before)
    assert "rset=1" in session, session
    # Postfix counts BDAT as taken/sent: after the refusal only the chunks
    # already on their way went, not the rest of the 2 MB.
    taken, sent = (int(n) for n in re.search(r"bdat=(\d+)/(\d+)", session).groups())
    assert sent - taken <= MAX_CHUNKS_UNANSWERED + 1, session


@pytest_twisted.ensureDeferred
async def test_refusedEnvelopesInOneFlight(held):
    async with client(held) as c:
        with pytest.raises(SMTPRecipientsRefused) as raised:
            await c.sendmail(SENDER, ["nobody@example.net"], DOTTED)
        assert list(raised.value.refused) == ["nobody@example.net"]
        assert raised.value.refused["nobody@example.net"][0] == 554
        # Nothing was delivered: the pool may send it again elsewhere.
        assert not raised.value.messageStarted
        with pytest.raises(SMTPError) as sender:
            await c.sendmail("bad@example.org", ["bob@example.net"], DOTTED)
        assert sender.value.code == 554 and "sender 'bad@example.org' refused" in str(sender.value)
        assert not sender.value.messageStarted
        refused = await c.sendmail(SENDER, ["nobody@example.net", "bob@example.net"], DOTTED)
        assert list(refused) == ["nobody@example.net"]
    [message] = held.held(1)
    assert message.recipients == ["bob@example.net"]


# ----------------------------------------------------------- on the wire


def chunkingSession(extensions: bytes = b"250-PIPELINING\r\n250 CHUNKING\r\n") -> tuple[ESMTPSessionClient, StringTransport]:
    protocol = ESMTPSessionClient("client.test", 30, 600)
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(b"220 mx.test ESMTP\r\n")
    Deferred.fromCoroutine(protocol.ehlo())
    protocol.dataReceived(b"250-mx.test\r\n" + extensions)
    transport.clear()
    return protocol, transport


def test_theEnvelopeAndTheMessageGoInOneWrite():
    protocol, transport = chunkingSession()
    message, sender, recipients = outgoingFromStream(io.BytesIO(DOTTED), SENDER, ["b@x.test", "c@x.test"])
    results = []
    protocol.sendMessage(sender, recipients, message).addBoth(results.append)
    written = transport.value()
    assert written == (
        b"MAIL FROM:<ann@example.org>\r\nRCPT TO:<b@x.test>\r\nRCPT TO:<c@x.test>\r\n"
        b"BDAT %d LAST\r\n" % len(DOTTED_CANONICAL) + DOTTED_CANONICAL
    )
    assert results == []
    protocol.dataReceived(b"250 ok\r\n250 ok\r\n550 no\r\n250 2.0.0 queued\r\n")
    assert results == [{"c@x.test": (550, "no")}]


def test_aLostConnectionBeforeTheRepliesMayHaveDelivered():
    protocol, transport = chunkingSession()
    message, sender, recipients = outgoingFromStream(io.BytesIO(DOTTED), SENDER, ["b@x.test"])
    results = []
    protocol.sendMessage(sender, recipients, message).addErrback(results.append)
    protocol.connectionLost(None)
    [failure] = results
    assert failure.value.messageStarted


def test_withoutPipeliningChunkingIsNotUsed():
    protocol, transport = chunkingSession(b"250 CHUNKING\r\n")
    message, sender, recipients = outgoingFromStream(io.BytesIO(DOTTED), SENDER, ["b@x.test"])
    protocol.sendMessage(sender, recipients, message)
    assert transport.value() == b"MAIL FROM:<ann@example.org>\r\n"


# ------------------------------------------------------ DSN and options


BOB, CARL = "bob@example.net", "carl@example.net"
PER_RECIPIENT = {BOB: ["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;bee@example.net"], CARL: ["NOTIFY=NEVER"]}


@pytest_twisted.ensureDeferred
async def test_dsnParametersEachRecipientItsOwn(held, tmp_path):
    # Postfix keeps DSN's parameters in its queue file: RET=HDRS is
    # ret_flags 2; NOTIFY=SUCCESS,FAILURE is notify_flags 2|4, NEVER is 1.
    path = tmp_path / "dsn.eml"
    path.write_bytes(DOTTED)
    async with client(held) as c:
        assert c.supportsExtension("DSN")
        await c.sendFile(
            str(path), SENDER, [BOB, CARL], mailOptions=["RET=HDRS", "ENVID=env42"], rcptOptions=PER_RECIPIENT
        )
    [message] = held.held(1)
    assert message.attributes["envelope_id"] == "env42"
    assert message.attributes["ret_flags"] == "2"
    assert message.recipientAttributes[BOB]["notify_flags"] == "6"
    assert message.recipientAttributes[BOB]["dsn_orig_rcpt"] == "rfc822;bee@example.net"
    assert message.recipientAttributes[CARL]["notify_flags"] == "1"


@pytest_twisted.ensureDeferred
async def test_optionsOnEverySendForm(held):
    parsed = email.message_from_bytes(DOTTED, policy=email.policy.SMTP)
    async with client(held) as c:
        await c.sendMail(parsed, SENDER, [BOB], rcptOptions=["NOTIFY=DELAY"])
        await c.sendStream(io.BytesIO(DOTTED), SENDER, [BOB], mailOptions=["RET=FULL"])
    async with ClientPool(host="127.0.0.1", port=held.port) as pool:
        await pool.sendMail(parsed, SENDER, [CARL], rcptOptions={CARL: ["NOTIFY=NEVER"]})
    viaMail, viaStream, viaPool = held.held(3)
    assert viaMail.recipientAttributes[BOB]["notify_flags"] == "8"
    assert viaStream.attributes["ret_flags"] == "1"
    assert viaPool.recipientAttributes[CARL]["notify_flags"] == "1"


def test_optionsForSomeoneElseAreRefusedBeforeSending():
    protocol, transport = chunkingSession()
    message, sender, recipients = outgoingFromStream(io.BytesIO(DOTTED), SENDER, [BOB])
    failures = []
    protocol.sendMessage(sender, recipients, message, (), {"bobby@example.net": ["NOTIFY=NEVER"]}).addErrback(
        failures.append
    )
    assert "'bobby@example.net', which is not a recipient" in str(failures[0].value)
    assert transport.value() == b""


@pytest.mark.parametrize(
    "extensions, why",
    [
        (b"250-PIPELINING\r\n250 CHUNKING\r\n", "does not offer REQUIRETLS"),
        (b"250-PIPELINING\r\n250 REQUIRETLS\r\n", "not encrypted"),
    ],
)
def test_requireTlsOnlyOverTlsToAServerThatOffersIt(extensions, why):
    protocol, transport = chunkingSession(extensions)
    message, sender, recipients = outgoingFromStream(io.BytesIO(DOTTED), SENDER, [BOB])
    failures = []
    protocol.sendMessage(sender, recipients, message, ["REQUIRETLS"]).addErrback(failures.append)
    [failure] = failures
    assert failure.value.code == 550 and "5.7.10" in failure.value.text and why in failure.value.text
    # RFC 8689: the message does not go at all.
    assert transport.value() == b""


def test_chunksAheadOfTheirRepliesStayFew():
    """
    However eagerly the transport asks for more, at most
    MAX_CHUNKS_UNANSWERED chunks go out before their replies; each reply
    lets one more go.
    """
    protocol, transport = chunkingSession()
    stream = io.BufferedReader(Unseekable(b"Subject: big\r\n\r\n", 5_000_000), 65536)
    message, sender, recipients = outgoingFromStream(stream, SENDER, [BOB])
    protocol.sendMessage(sender, recipients, message)
    protocol.dataReceived(b"250 ok\r\n250 ok\r\n")
    producer = transport.producer
    assert producer is not None

    def chunksSent() -> int:
        return transport.value().count(b"BDAT ")

    for _ in range(50):
        producer.resumeProducing()
    assert chunksSent() == MAX_CHUNKS_UNANSWERED
    protocol.dataReceived(b"250 2.0.0 chunk\r\n")
    for _ in range(50):
        producer.resumeProducing()
    assert chunksSent() == MAX_CHUNKS_UNANSWERED + 1

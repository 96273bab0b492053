"""
Unit tests of the client's pure parts (dot-stuffing, reply parsing, envelope
derivation, header stripping) and of its protocol driven over an in-memory
transport, byte by byte, with no sockets.
"""

from __future__ import annotations

import base64
import email
import email.policy
import hashlib
import hmac
import io
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from OpenSSL import SSL
from twisted.internet import task
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure

from infsmtp import (
    AsyncClient,
    AuthMode,
    Client,
    EncryptMode,
    SMTPAuthenticationError,
    SMTPConnectError,
    SMTPError,
    SMTPProtocolError,
    SMTPTimeoutError,
    SMTPTLSError,
)
from infsmtp._client.envelope import (
    envelopeFromHeaders,
    outgoingFromMessage,
    outgoingFromStream,
    stripHeaderFields,
)
from infsmtp._client.protocol import (
    MAX_QUOTED_TEXT,
    MAX_REPLY_LINE,
    MAX_REPLY_LINES,
    MAX_REPLY_SIZE,
    DotStuffer,
    ESMTPSessionClient,
    Reply,
    ReplyParser,
    XOAUTH2Authenticator,
    heloArgument,
    parseExtensions,
    quoteServerText,
    redact,
    sizeLimit,
)
from infsmtp._client.tls import (
    OP_ALLOW_UNSAFE_LEGACY_RENEGOTIATION,
    OP_LEGACY_SERVER_CONNECT,
    clientTLSOptions,
)
from infsmtp._errors import SMTPRecipientsRefused

# ---------------------------------------------------------------- DotStuffer


def expectedData(message: bytes) -> bytes:
    """
    What DATA must carry for ``message``, computed the obvious way on the
    whole message at once.
    """
    text = re.sub(rb"\r\n|\r|\n", b"\r\n", message)
    if text and not text.endswith(b"\r\n"):
        text += b"\r\n"
    lines = text.split(b"\r\n")[:-1] if text else []
    return b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines) + b".\r\n"


def stuffInChunks(message: bytes, cuts: list[int]) -> bytes:
    stuffer = DotStuffer()
    out = []
    start = 0
    for cut in sorted(set(c % (len(message) + 1) for c in cuts)) + [len(message)]:
        out.append(stuffer.feed(message[start:cut]))
        start = cut
    return b"".join(out) + stuffer.finish()


def unstuff(data: bytes) -> bytes:
    """
    What a receiver reconstructs from DATA bytes (RFC 5321 section 4.5.2).
    """
    assert data.endswith(b".\r\n")
    lines = data[:-3].split(b"\r\n")
    assert lines[-1] == b""
    return b"".join((line[1:] if line.startswith(b".") else line) + b"\r\n" for line in lines[:-1])


messages = st.binary(max_size=300) | st.lists(
    st.sampled_from([b".", b"..", b"\r", b"\n", b"\r\n", b"a", b"hello", b"\xff", b" "]),
    max_size=80,
).map(b"".join)


@settings(max_examples=400)
@given(messages, st.lists(st.integers(min_value=0, max_value=400), max_size=12))
def test_dotStufferMatchesWholeMessageRulesForAnyChunking(message, cuts):
    """
    However the message is cut into chunks, the DATA bytes are those the
    rules give for the whole message: CRLF line endings, leading dots
    doubled, the final dot on its own line.
    """
    data = stuffInChunks(message, cuts)
    assert data == expectedData(message)
    # No bare CR or LF and no lone dot line can reach the server.
    assert b"\r\n.\r\n" not in data[:-3] and not data[:-3].startswith(b".\r\n")
    assert data.count(b"\r") == data.count(b"\n") == data.count(b"\r\n")


@settings(max_examples=400)
@given(messages, st.lists(st.integers(min_value=0, max_value=400), max_size=12))
def test_dotStufferRoundTrips(message, cuts):
    """
    A receiver undoing the dot-stuffing gets the message back with its line
    endings normalised.
    """
    normalised = re.sub(rb"\r\n|\r|\n", b"\r\n", message)
    if normalised and not normalised.endswith(b"\r\n"):
        normalised += b"\r\n"
    assert unstuff(stuffInChunks(message, cuts)) == normalised


def test_dotStufferFixesTwistedTransformChunkFaults():
    """
    The cases Twisted's transformChunk gets wrong: CRLF input, a dot at the
    very start, a dot right after a 16 KiB chunk boundary.
    """
    assert stuffInChunks(b"a\r\nb\r\n", []) == b"a\r\nb\r\n.\r\n"
    assert stuffInChunks(b".start\n", []) == b"..start\r\n.\r\n"
    big = b"x" * 16383 + b"\n" + b".dot\n"
    assert stuffInChunks(big, [16384]) == b"x" * 16383 + b"\r\n..dot\r\n.\r\n"
    # A CRLF split across chunks is one line ending, not two.
    assert stuffInChunks(b"a\r\nb", [2]) == b"a\r\nb\r\n.\r\n"
    assert stuffInChunks(b"", []) == b".\r\n"


# --------------------------------------------------------------- ReplyParser

replies = st.builds(
    Reply,
    st.integers(200, 559).filter(lambda c: c % 100 < 60 and c % 10 <= 9),
    st.lists(st.text(st.characters(blacklist_characters="\r\n", blacklist_categories=("Cs",), min_codepoint=32), max_size=30), min_size=1, max_size=5).map(tuple),
)


@given(st.lists(replies, max_size=6))
def test_replyParserRoundTrips(sent):
    """
    Replies written on the wire come back out of the parser as they were.
    """
    parser = ReplyParser()
    got = []
    for reply in sent:
        for i, text in enumerate(reply.lines):
            separator = b" " if i == len(reply.lines) - 1 else b"-"
            result = parser.feed(b"%d%s%s" % (reply.code, separator, text.encode("utf-8")))
            if result is not None:
                got.append(result)
    assert got == sent


#: What a reply line is, written independently of the parser: a code of
#: three ASCII digits, 2yz to 5yz with y in 0-5, then a space, a hyphen
#: (not the last line) or the end of the line.
_REPLY_LINE = re.compile(rb"\A([2-5][0-5][0-9])(?:( .*)|(-.*)|)\Z", re.S)


@given(
    st.one_of(
        st.binary(max_size=20),
        # Junk after a plausible start, so well-formed lines come up too.
        st.builds(
            lambda head, rest: head + rest,
            st.sampled_from([b"250", b"250 ", b"250-", b"554 ", b"199 ", b"560-", b"2500", b"25", b"6", b"421"]),
            st.binary(max_size=12),
        ),
    )
)
def test_replyParserRejectsJunkWithSMTPError(line):
    """
    Any line given to a fresh parser is exactly one of: the end of a
    one-line reply (its code and text), the first line of a longer one
    (None), or an SMTPProtocolError.
    """
    match = _REPLY_LINE.match(line)
    if match is None:
        with pytest.raises(SMTPProtocolError, match="malformed reply line"):
            ReplyParser().feed(line)
    elif match.group(3) is not None:
        assert ReplyParser().feed(line) is None
    else:
        assert ReplyParser().feed(line) == Reply(int(match.group(1)), (line[4:].decode("utf-8", "replace"),))


@pytest.mark.parametrize(
    "line",
    [
        b"", b"25", b"abc hello", b"250x", b"650 no", b"2500 x", b"199 x", b"560 x", b"260 x",
        b" 250 x", b"+250 x", b"0250 x",
        # Unicode digits, which str.isdigit() and int() would take.
        "\N{SUPERSCRIPT TWO}50 x".encode(), "\uff12\uff15\uff10 x".encode(), "\u0662\u0665\u0660 x".encode(),
    ],
)
def test_replyParserRejectsMalformedLines(line):
    """
    A reply code is exactly three ASCII digits, 2yz to 5yz.
    """
    with pytest.raises(SMTPProtocolError):
        ReplyParser().feed(line)


def test_replyLimitsAreTheDocumentedOnes():
    assert (MAX_REPLY_LINE, MAX_REPLY_LINES, MAX_REPLY_SIZE) == (8192, 1000, 65536)


def feedReply(parser: ReplyParser, lines: list[bytes]) -> Reply | None:
    """
    Feed ``lines`` (texts) as one reply with code 250; return the result
    of the last line.
    """
    result = None
    for i, text in enumerate(lines):
        separator = b" " if i == len(lines) - 1 else b"-"
        result = parser.feed(b"250" + separator + text)
        if i < len(lines) - 1:
            assert result is None
    return result


@pytest.mark.parametrize("count", [MAX_REPLY_LINES - 1, MAX_REPLY_LINES])
def test_replyParserTakesUpToMaxReplyLines(count):
    reply = feedReply(ReplyParser(), [b"x"] * count)
    assert reply is not None and len(reply.lines) == count


def test_replyParserRefusesOneLineMoreThanMaxReplyLines():
    parser = ReplyParser()
    for _ in range(MAX_REPLY_LINES):
        assert parser.feed(b"250-x") is None
    with pytest.raises(SMTPProtocolError, match="more than %d lines" % MAX_REPLY_LINES):
        parser.feed(b"250 x")
    # What it held stays at the limit.
    assert len(parser._lines) == MAX_REPLY_LINES


def linesOfSize(total: int, count: int = 20) -> list[bytes]:
    """
    ``count`` reply line texts whose lines ("250-" + text + CRLF) add up to
    ``total`` bytes.
    """
    each, extra = divmod(total - count * 6, count)
    return [b"y" * (each + (extra if i == count - 1 else 0)) for i in range(count)]


@pytest.mark.parametrize("total", [MAX_REPLY_SIZE - 1, MAX_REPLY_SIZE])
def test_replyParserTakesUpToMaxReplySize(total):
    lines = linesOfSize(total)
    assert sum(len(b"250-" + line + b"\r\n") for line in lines) == total
    reply = feedReply(ReplyParser(), lines)
    assert reply is not None and len(reply.lines) == len(lines)


def test_replyParserRefusesOneByteMoreThanMaxReplySize():
    parser = ReplyParser()
    lines = linesOfSize(MAX_REPLY_SIZE + 1)
    with pytest.raises(SMTPProtocolError, match="longer than %d bytes" % MAX_REPLY_SIZE):
        feedReply(parser, lines)
    assert parser._size <= MAX_REPLY_SIZE


def test_replyParserLimitsHoldForEachReply():
    """
    Two replies each at the line limit, and together over the size limit,
    are two good replies: the counts start again with each reply.
    """
    parser = ReplyParser()
    text = b"z" * 40
    assert 2 * MAX_REPLY_LINES * (len(text) + 6) > MAX_REPLY_SIZE
    for _ in range(2):
        reply = feedReply(parser, [text] * MAX_REPLY_LINES)
        assert reply is not None and len(reply.lines) == MAX_REPLY_LINES


def test_replyParserMalformedLineIsQuotedRedactedAndCut():
    """
    A server that echoes the AUTH exchange in a malformed line does not put
    the credentials into the error, nor its control characters, nor all of
    a long line.
    """
    secrets: list[str] = []
    parser = ReplyParser(secrets)
    secrets.append("s3cret")  # Added after the parser was made.
    line = b"x" * (MAX_QUOTED_TEXT - 10) + b"s3cret\x1b" + b"y" * 3000
    with pytest.raises(SMTPProtocolError) as caught:
        parser.feed(line)
    text = str(caught.value)
    assert "s3c" not in text and "\x1b" not in text and "\\x1b" in text
    assert len(text) < MAX_QUOTED_TEXT + 100


def test_replyParserRejectsCodeChangeInsideReply():
    parser = ReplyParser()
    assert parser.feed(b"250-one") is None
    with pytest.raises(SMTPError):
        parser.feed(b"251 two")


def test_replyWithoutText():
    assert ReplyParser().feed(b"250") == Reply(250, ("",))


@pytest.mark.parametrize(
    "value, limit",
    [
        ("1000", 1000),
        ("0", None),  # RFC 1870: no fixed limit.
        ("", None),
        ("00000000000000000010", 10),  # 20 digits, the most RFC 1870 allows.
        ("000000000000000000010", None),  # 21.
        ("9" * 5000, None),  # More digits than int() takes.
        ("\N{SUPERSCRIPT TWO}", None),
        ("1\N{SUPERSCRIPT TWO}", None),
        ("\uff11\uff10", None),  # Fullwidth digits.
        ("\u0661\u0660", None),  # Arabic-Indic digits.
        ("-5", None),
        ("+5", None),
        ("1_000", None),
        ("10 20", None),
    ],
)
def test_sizeLimitTakesOnlyWhatRFC1870Allows(value, limit):
    assert sizeLimit({"SIZE": value}) == limit
    assert sizeLimit({}) is None


def test_parseExtensions():
    reply = Reply(
        250,
        ("mx.example.org", "PIPELINING", "size 1000", "AUTH=LOGIN", "AUTH PLAIN  CRAM-MD5", ""),
    )
    assert parseExtensions(reply) == {
        "PIPELINING": "",
        "SIZE": "1000",
        "AUTH": "LOGIN PLAIN CRAM-MD5",
    }


# ------------------------------------------------------------------ envelope


def test_envelopeFromFromToCcBcc():
    message = email.message_from_string(
        "From: Ann <ann@example.org>\nTo: bob@example.org, Cy <cy@example.org>\n"
        "Cc: dee@example.org\nBcc: eve@example.org, bob@example.org\n\nbody\n"
    )
    assert envelopeFromHeaders(message) == (
        "ann@example.org",
        ["bob@example.org", "cy@example.org", "dee@example.org", "eve@example.org"],
    )


def test_envelopeSenderFieldWinsOverFrom():
    message = email.message_from_string(
        "From: a@example.org\nSender: s@example.org\nTo: b@example.org\n\n"
    )
    assert envelopeFromHeaders(message)[0] == "s@example.org"


def test_envelopeUsesResentBlock():
    message = email.message_from_string(
        "From: a@example.org\nTo: b@example.org\nResent-Date: Mon, 1 Jan 2024 00:00:00 +0000\n"
        "Resent-From: r@example.org\nResent-To: t@example.org\nResent-Bcc: h@example.org\n\n"
    )
    assert envelopeFromHeaders(message) == ("r@example.org", ["t@example.org", "h@example.org"])


def test_envelopeRefusesSeveralResentBlocks():
    message = email.message_from_string(
        "From: a@example.org\nResent-Date: x\nResent-Date: y\nResent-To: b@example.org\n\n"
    )
    with pytest.raises(SMTPError):
        envelopeFromHeaders(message)


def test_envelopeSkipsEmptyGroups():
    message = email.message_from_string(
        "From: a@example.org\nTo: undisclosed-recipients:;\nBcc: b@example.org\n\n"
    )
    assert envelopeFromHeaders(message) == ("a@example.org", ["b@example.org"])


def test_stripHeaderFieldsKeepsEverythingElseByteForByte():
    block = (
        b"To: a@x\r\nBCC: b@x,\r\n\tc@x\r\nSubject: s\r\n continued\r\n"
        b"Resent-Bcc: d@x\nX-Bcc-Note: kept\r\n"
    )
    assert stripHeaderFields(block) == (
        b"To: a@x\r\nSubject: s\r\n continued\r\nX-Bcc-Note: kept\r\n"
    )


class Trickle(io.RawIOBase):
    """
    A stream that returns at most ``step`` bytes per read, to put the end of
    the header block across reads.
    """

    def __init__(self, data: bytes, step: int) -> None:
        self._data = io.BytesIO(data)
        self._step = step

    def readable(self):
        return True

    def read(self, size=-1):
        return self._data.read(min(self._step, size if size >= 0 else self._step))


@given(st.integers(1, 40))
def test_outgoingFromStreamFindsHeaderEndAcrossReads(step):
    """
    Bcc is stripped and the envelope derived wherever the reads cut the
    header block.
    """
    data = (
        b"From: a@example.org\nTo: b@example.org\nBcc: c@example.org\n\n"
        b"Bcc: this line is body\n"
    )
    stream = Trickle(data, step)
    import infsmtp._client.envelope as envelope

    old = envelope.READ_SIZE
    envelope.READ_SIZE = step
    try:
        message, sender, recipients = outgoingFromStream(stream, None, None)
    finally:
        envelope.READ_SIZE = old
    rest = b"".join(iter(lambda: message.rest.read(100), b"")) if message.rest else b""
    assert message.head + rest == (
        b"From: a@example.org\nTo: b@example.org\n\nBcc: this line is body\n"
    )
    assert (sender, recipients) == ("a@example.org", ["b@example.org", "c@example.org"])


def test_outgoingFromStreamSmallMessageIsReadOnce():
    message, _, _ = outgoingFromStream(io.BytesIO(b"From: a@x\r\nTo: b@x\r\n\r\nhi\r\n"), None, None)
    assert message.rest is None
    assert message.size == len(message.head) and message.eightBit is False


def test_outgoingFromStreamLargeMessageStreamsTheRest():
    body = b"line\n" * 50000
    stream = io.BytesIO(b"From: a@x\nTo: b@x\n\n" + body)
    message, _, _ = outgoingFromStream(stream, None, None)
    assert message.rest is stream
    assert message.size == 19 + len(body)
    # Only the head was looked at: whether the rest is 8-bit is unknown.
    assert message.eightBit is None


def test_outgoingFromTextStream():
    message, sender, _ = outgoingFromStream(io.StringIO("From: ä@x\nTo: b@x\n\nä\n"), None, None)
    assert message.head == "From: ä@x\nTo: b@x\n\nä\n".encode()
    assert sender == "ä@x" and message.eightBit is True


def test_outgoingFromStreamNeedsAnEnvelope():
    with pytest.raises(SMTPError, match="no sender"):
        outgoingFromStream(io.BytesIO(b"To: b@x\n\nhi\n"), None, None)
    with pytest.raises(SMTPError, match="no recipients"):
        outgoingFromStream(io.BytesIO(b"From: a@x\n\nhi\n"), None, None)
    message, sender, recipients = outgoingFromStream(io.BytesIO(b"hi\n"), "", "b@x")
    assert (sender, recipients) == ("", ["b@x"])


def test_outgoingFromMessageStripsBccAndLeavesTheOriginal():
    original = email.message_from_string(
        "From: a@example.org\nTo: b@example.org\nBcc: c@example.org\nSubject: s\n\nbody\n",
        policy=email.policy.default,
    )
    message, sender, recipients = outgoingFromMessage(original, None, None)
    assert b"Bcc" not in message.head and b"c@example.org" not in message.head
    assert message.head.endswith(b"\r\n\r\nbody\r\n")
    assert recipients == ["b@example.org", "c@example.org"]
    assert original["Bcc"] == "c@example.org"


# ------------------------------------------------------------------- credentials


def test_quoteServerTextEscapesControlsButKeepsLineBreaks():
    text = "a\x00b\rc\td\x1be\x7ff\x85g\u2028h\u2029i\x0bj\nk\N{SNOWMAN} \\\x1f\x80\x9f~\xa0"
    assert quoteServerText(text) == (
        "a\\x00b\\rc\\td\\x1be\\x7ff\\x85g\\u2028h\\u2029i\\x0bj\nk\N{SNOWMAN} \\\\x1f\\x80\\x9f~\xa0"
    )


@pytest.mark.parametrize("extra", [-1, 0])
def test_quoteServerTextKeepsUpToMaxQuotedText(extra):
    assert MAX_QUOTED_TEXT == 1000
    text = "w" * (MAX_QUOTED_TEXT + extra)
    assert quoteServerText(text) == text


def test_quoteServerTextCutsLongerText():
    quoted = quoteServerText("w" * (MAX_QUOTED_TEXT + 1))
    assert quoted == "w" * MAX_QUOTED_TEXT + "... (1 more characters)"


def test_quoteServerTextRedactsBeforeCuttingAndEscaping():
    # A secret across the cut, and one holding what escaping would change.
    text = "w" * (MAX_QUOTED_TEXT - 2) + "s3cret and p\tw"
    quoted = quoteServerText(text, [b"s3cret", "p\tw"])
    assert quoted == "w" * (MAX_QUOTED_TEXT - 2) + "**... (9 more characters)"
    assert quoteServerText("x p\tw", [b"s3cret", "p\tw"]) == "x ***"


def test_redact():
    assert redact("535 bad cGFzcw== for pass", [b"cGFzcw==", "pass", ""]) == "535 bad *** for ***"


def test_xoauth2InitialResponse():
    mechanism = XOAUTH2Authenticator(b"me@example.org")
    assert mechanism.challengeResponse(b"tok", b"") == (
        b"user=me@example.org\x01auth=Bearer tok\x01\x01"
    )
    # After an error challenge, the client answers with an empty line.
    assert mechanism.challengeResponse(b"tok", b'{"status":"401"}') == b""


# ------------------------------------------------------------------ settings


def test_defaultsAreTheSpecs():
    for client in (Client(), AsyncClient()):
        assert client.host == "localhost"
        assert client.port == 25
        assert client.encryptMode is EncryptMode.none
        assert client.authMode is AuthMode.none
        assert client.username == client.password == ""
        assert client.timeout == 30000
        assert client.verifyServerCertificate is True
        assert client.useLegacyServerConnect is False
        assert client.allowUnsafeLegacyRenegotiation is False
        assert client.caCertFile is None
        assert isinstance(client.heloName, str) and client.heloName
        assert tuple(client.saslMechanisms) == ("CRAM-MD5", "PLAIN", "LOGIN")


def test_referenceSpellingsOnTheClass():
    assert Client.encryptMode.sslTls is EncryptMode.sslTls
    assert Client.authMode.default is AuthMode.default
    client = Client()
    client.encryptMode = Client.encryptMode.startTls
    client.authMode = 2
    assert client.encryptMode is EncryptMode.startTls
    assert client.authMode is AuthMode.sasl
    assert client._client.encryptMode is EncryptMode.startTls
    with pytest.raises(ValueError):
        client.encryptMode = 7


def test_unconnectedClientFreesWithoutAReactor():
    """
    Freeing a client that never connected needs no reactor thread, and the
    client refuses work afterwards.
    """
    with Client() as client:
        pass
    assert client._client._freed
    failures = []
    client._client.verify("x").addErrback(failures.append)
    assert failures and failures[0].check(SMTPError)


# ------------------------------------------------------- protocol, in memory


class RecordingTransport(StringTransport):
    """
    An in-memory transport that remembers each write separately and reports
    an abort to the protocol, as a real transport would.
    """

    def __init__(self):
        super().__init__()
        self.writes: list[bytes] = []
        self.tlsStarted = None
        self.noDelay = False

    def write(self, data):
        self.writes.append(data)
        super().write(data)

    def setTcpNoDelay(self, enabled):
        self.noDelay = enabled

    def startTLS(self, creator):
        self.tlsStarted = creator

    def abortConnection(self):
        if not self.disconnected:
            super().abortConnection()
            self.protocol.connectionLost(Failure(ConnectionDone()))


def fromCoroutine(coroutine):
    return Deferred.fromCoroutine(coroutine)


def session(ehlo=b"250-mx\r\n250-PIPELINING\r\n250 SIZE 100\r\n", timeout=5.0, transportFactory=RecordingTransport):
    clock = task.Clock()
    protocol = ESMTPSessionClient("client.example.org", timeout)
    protocol.callLater = clock.callLater
    transport = transportFactory()
    transport.protocol = protocol
    protocol.makeConnection(transport)
    protocol.dataReceived(b"220 mx ready\r\n")
    greeted = fromCoroutine(protocol.whenGreeted())
    assert greeted.result.code == 220  # type: ignore[attr-defined]
    extensions = fromCoroutine(protocol.ehlo())
    protocol.dataReceived(ehlo)
    assert transport.writes[-1] == b"EHLO client.example.org\r\n"
    assert extensions.result is protocol.extensions
    transport.writes.clear()
    return protocol, transport, clock


def small(data=b"From: a@x\r\n\r\nhi\r\n"):
    return outgoingFromStream(io.BytesIO(data), "a@x", ["b@x"])[0]


def test_noDelayIsSet():
    _, transport, _ = session()
    assert transport.noDelay is True


def test_pipelinedTransactionCostsTwoWrites():
    """
    MAIL, RCPT and DATA go out in one write; the message and its final dot
    in another: two round trips per message.
    """
    protocol, transport, _ = session()
    result = protocol.sendMessage("a@x", ["b@x", "c@x"], small())
    assert transport.writes == [
        b"MAIL FROM:<a@x> SIZE=17\r\nRCPT TO:<b@x>\r\nRCPT TO:<c@x>\r\nDATA\r\n"
    ]
    protocol.dataReceived(b"250 ok\r\n250 ok\r\n550 no such user\r\n354 go\r\n")
    assert transport.writes[1:] == [b"From: a@x\r\n\r\nhi\r\n.\r\n"]
    protocol.dataReceived(b"250 queued\r\n")
    assert result.result == {"c@x": (550, "no such user")}


def test_sizeLimitRefusedLocally():
    protocol, transport, _ = session()
    result = protocol.sendMessage("a@x", ["b@x"], small(b"x" * 101))
    failure = result.result
    result.addErrback(lambda _: None)
    assert failure.check(SMTPError) and failure.value.code == 552
    assert transport.writes == []


def test_allRecipientsRefusedThenRSETBeforeNextMessage():
    protocol, transport, _ = session()
    result = protocol.sendMessage("a@x", ["b@x"], small())
    protocol.dataReceived(b"250 ok\r\n550 unknown\r\n554 no valid recipients\r\n")
    failure = result.result
    result.addErrback(lambda _: None)
    assert failure.check(SMTPRecipientsRefused)
    assert failure.value.refused == {"b@x": (550, "unknown")}
    transport.writes.clear()
    protocol.sendMessage("a@x", ["b@x"], small())
    assert transport.writes[0].startswith(b"RSET\r\nMAIL FROM:<a@x>")


def test_noPipeliningWithoutTheExtension():
    protocol, transport, _ = session(ehlo=b"250 mx\r\n")
    result = protocol.sendMessage("a@x", ["b@x"], small())
    assert transport.writes == [b"MAIL FROM:<a@x>\r\n"]
    protocol.dataReceived(b"250 ok\r\n")
    assert transport.writes[-1] == b"RCPT TO:<b@x>\r\n"
    protocol.dataReceived(b"250 ok\r\n")
    assert transport.writes[-1] == b"DATA\r\n"
    protocol.dataReceived(b"354 go\r\n250 ok\r\n")
    assert result.result == {}


def test_replyTimeoutAbortsWithSMTPTimeoutError():
    protocol, transport, clock = session(timeout=2.0)
    result = fromCoroutine(protocol.verify("someone"))
    clock.advance(1.9)
    assert not result.called
    clock.advance(0.2)
    failure = result.result
    result.addErrback(lambda _: None)
    assert failure.check(SMTPTimeoutError)
    assert transport.disconnected


def test_idleSessionHasNoTimer():
    """
    Parked after EHLO, the session waits for its user as long as it takes.
    """
    protocol, transport, clock = session(timeout=2.0)
    clock.advance(3600)
    assert not transport.disconnected and clock.getDelayedCalls() == []


def test_startTLSDiscardsBytesSentBeforeTheHandshake():
    """
    Lines that arrive with the 220 to STARTTLS were sent in plaintext and
    are dropped (the STARTTLS injection attack), as are the extensions.
    """
    protocol, transport, _ = session(ehlo=b"250-mx\r\n250 STARTTLS\r\n")
    creator = object()
    result = fromCoroutine(protocol.startTLS(creator))
    protocol.dataReceived(b"220 go ahead\r\n250-injected\r\n250 AUTH PLAIN\r\n")
    assert transport.tlsStarted is creator
    assert protocol.extensions == {}
    assert transport.writes[-1] == b"EHLO client.example.org\r\n"
    protocol.dataReceived(b"250-mx\r\n250 AUTH LOGIN\r\n")
    assert result.result == {"AUTH": "LOGIN"}


def test_commandInjectionRefused():
    protocol, transport, _ = session()
    result = protocol.sendMessage("a@x>\r\nRCPT TO:<evil@x", ["b@x"], small())
    failure = result.result
    result.addErrback(lambda _: None)
    assert failure.check(SMTPError) and transport.writes == []


def failureOf(d: Deferred) -> BaseException:
    """
    The exception ``d`` has already failed with.
    """
    failures: list[Failure] = []
    d.addErrback(failures.append)
    assert failures, f"expected a failure, got {d.result!r}"
    return failures[0].value


# Addresses that would put a parameter, a command or garbage on the wire,
# the first and last character of each refused range among them.
INJECTING_ADDRESSES = [
    "x@y.z> NOTIFY=SUCCESS",
    "x@y.z>",
    "<x@y.z",
    "a<b@x",
    "a b@x",
    "a@x\x00",
    "a\r\nRSET\r\n@x",
    "a\n@x",
    "a\x01@x",
    "a\t@x",
    "a\x1f@x",
    "a\x7f@x",
    "a\x80@x",
    "a\x9f@x",
    "a\xa0@x",  # No-break space.
    "a\u2028@x",
    "a\u3000@x",  # Ideographic space.
]


@pytest.mark.parametrize("address", INJECTING_ADDRESSES)
@pytest.mark.parametrize("role", ["sender", "recipient", "second recipient"])
def test_addressesThatWouldInjectAreRefusedBeforeAnythingIsSent(address, role):
    protocol, transport, _ = session(ehlo=b"250-mx\r\n250-PIPELINING\r\n250 SMTPUTF8\r\n")
    if role == "sender":
        result = protocol.sendMessage(address, ["b@x"], small())
    else:
        recipients = [address] if role == "recipient" else ["b@x", address]
        result = protocol.sendMessage("a@x", recipients, small())
    error = failureOf(result)
    assert type(error) is SMTPError
    what = "sender" if role == "sender" else "recipient"
    assert f"{what} address {address!r} contains" in str(error)
    assert transport.writes == []


@pytest.mark.parametrize(
    "address, path",
    [
        ("a!~@x", b"<a!~@x>"),
        ("<a@x>", b"<a@x>"),
        (" a@x ", b"<a@x>"),
        ("a+tag@[127.0.0.1]", b"<a+tag@[127.0.0.1]>"),
        ('"a.b"@x', b'<"a.b"@x>'),
        ("\xa1\xfc@x", "<\xa1\xfc@x>".encode()),
    ],
)
def test_addressesWithoutUnsafeCharactersGoOut(address, path):
    protocol, transport, _ = session(ehlo=b"250-mx\r\n250-PIPELINING\r\n250 SMTPUTF8\r\n")
    protocol.sendMessage(address, [address], small())
    commands = transport.writes[0].split(b"\r\n")
    assert commands[0].split(b" ")[1] == b"FROM:" + path
    assert commands[1] == b"RCPT TO:" + path


@pytest.mark.parametrize(
    "address, description",
    [
        ("a b@x", "a space"),
        ("x@y>", "'>'"),
        ("a<b@x", "'<'"),
        ("a\x00@x", "the control or space character U+0000"),
        ("a\u3000@x", "the control or space character U+3000"),
    ],
)
def test_refusalNamesTheCharacter(address, description):
    protocol, transport, _ = session()
    error = failureOf(protocol.sendMessage("a@x", [address], small()))
    assert str(error) == f"recipient address {address!r} contains {description}"


def test_refusalQuotesAtMost200CharactersOfTheAddress():
    protocol, transport, _ = session()
    address = "a" * 300 + " @x"
    error = failureOf(protocol.sendMessage(address, ["b@x"], small()))
    assert str(error) == f"sender address {repr(address)[:200]}... contains a space"


@pytest.mark.parametrize("sender", ["", "<>"])
def test_nullSenderIsAllowed(sender):
    protocol, transport, _ = session()
    protocol.sendMessage(sender, ["b@x"], small())
    assert transport.writes[0].startswith(b"MAIL FROM:<> SIZE=17\r\nRCPT TO:<b@x>\r\n")


@pytest.mark.parametrize("recipient", ["", "<>", " "])
def test_emptyRecipientRefused(recipient):
    protocol, transport, _ = session()
    error = failureOf(protocol.sendMessage("a@x", ["b@x", recipient], small()))
    assert type(error) is SMTPError and "recipient address is empty" in str(error)
    assert transport.writes == []


@pytest.mark.parametrize("argument", ["", "a b", "ann\r\nRSET", "ann\x00", "ann\x7f", "ann\u2028"])
def test_verifyRefusesArgumentsThatWouldInject(argument):
    protocol, transport, _ = session()
    error = failureOf(fromCoroutine(protocol.verify(argument)))
    assert type(error) is SMTPError
    assert (f"VRFY argument {argument!r} contains" if argument else "argument is empty") in str(error)
    assert transport.writes == []


def test_verifyTakesAnAddressInAngleBrackets():
    protocol, transport, _ = session()
    result = fromCoroutine(protocol.verify("<ann@x>"))
    assert transport.writes == [b"VRFY <ann@x>\r\n"]
    protocol.dataReceived(b"250 Ann <ann@x>\r\n")
    assert result.result == "Ann <ann@x>"


@pytest.mark.parametrize(
    "name", ["", "mx example", "mx\r\nRSET", "mx\x00", "mx\t", "mx\x1f", "mx\x7f", "mx\x80", "mx\x9f", "mx\xa0", "mx\u2029"]
)
def test_heloNameThatWouldInjectIsRefused(name):
    with pytest.raises(SMTPError, match="heloName"):
        heloArgument(name)
    with pytest.raises(SMTPError, match="heloName"):
        ESMTPSessionClient(name, 5)


@pytest.mark.parametrize("name", ["mx.example.org", "[127.0.0.1]", "[IPv6:::1]", "mx!~<>\xa1"])
def test_heloNameGoesOut(name):
    assert heloArgument(name) == name.encode()


def test_connectWithABadHeloNameFailsBeforeConnecting():
    reactor = MemoryReactorClock()
    client = AsyncClient(reactor)
    client.host = "127.0.0.1"
    client.heloName = "mx\r\nRSET"
    error = failureOf(client.connect())
    assert type(error) is SMTPError and "heloName 'mx\\r\\nRSET' contains" in str(error)
    assert reactor.tcpClients == []


@pytest.mark.parametrize(
    "mechanism, username, password, shown",
    [
        ("PLAIN", "me\x00admin", "pw", "username 'me\\x00admin'"),
        ("XOAUTH2", "me\x01auth=Bearer stolen", "token", "username 'me\\x01auth=Bearer stolen'"),
        ("LOGIN", "me\x7f", "pw", "username 'me\\x7f'"),
        ("LOGIN", "me\x9f", "pw", "username 'me\\x9f'"),
        ("LOGIN", "me\u2028", "pw", "username 'me\\u2028'"),
        ("LOGIN", "me\u2029", "pw", "username 'me\\u2029'"),
        ("LOGIN", "me\x80", "pw", "username 'me\\x80'"),
        ("PLAIN", "me", "s3cret\x00more", "the password"),
        ("XOAUTH2", "me", "t0ken\x01auth=Bearer other", "the password"),
        ("LOGIN", "me", "s3cret\n", "the password"),
        ("LOGIN", "me", "s3cret\x1f", "the password"),
    ],
)
def test_credentialsThatWouldChangeTheSASLMessageAreRefused(mechanism, username, password, shown):
    protocol, transport, _ = session(ehlo=b"250-mx\r\n250 AUTH PLAIN LOGIN XOAUTH2\r\n")
    error = failureOf(fromCoroutine(protocol.authenticate([mechanism], username, password)))
    assert isinstance(error, SMTPAuthenticationError) and str(error).startswith(shown)
    assert password.rstrip() not in str(error) and "more" not in str(error) and "other" not in str(error)
    assert transport.writes == []


def test_credentialsWithSpacesGoOut():
    protocol, transport, _ = session(ehlo=b"250-mx\r\n250 AUTH PLAIN\r\n")
    result = fromCoroutine(protocol.authenticate(["PLAIN"], "John Smith\xa0", "a pass~phrase"))
    assert transport.writes == [b"AUTH PLAIN " + base64.b64encode("\0John Smith\xa0\0a pass~phrase".encode()) + b"\r\n"]
    protocol.dataReceived(b"235 ok\r\n")
    assert result.result is True


def test_authFallsBackToNextMechanismAndStopsOn535():
    """
    A mechanism the server refuses (504) gives way to the next; bad
    credentials (535) end it, without retrying them under another mechanism.
    """
    protocol, transport, _ = session(ehlo=b"250-mx\r\n250 AUTH PLAIN LOGIN CRAM-MD5\r\n")
    result = fromCoroutine(protocol.authenticate(["CRAM-MD5", "PLAIN", "LOGIN"], "me", "pw"))
    assert transport.writes[-1] == b"AUTH CRAM-MD5\r\n"
    protocol.dataReceived(b"504 not today\r\n")
    blob = base64.b64encode(b"\0me\0pw")
    assert transport.writes[-1] == b"AUTH PLAIN " + blob + b"\r\n"
    protocol.dataReceived(b"535 5.7.8 bad credentials\r\n")
    assert result.result is False
    assert len(transport.writes) == 2


def test_authErrorNeverQuotesCredentials():
    """
    A server that echoes what it was sent cannot put a credential into an
    exception.
    """
    protocol, transport, _ = session(ehlo=b"250-mx\r\n250 AUTH PLAIN\r\n")
    result = fromCoroutine(protocol.authenticate(["PLAIN"], "me", "s3cret"))
    blob = base64.b64encode(b"\0me\0s3cret")
    protocol.dataReceived(b"454 cannot check " + blob + b" (s3cret)\r\n")
    failure = result.result
    result.addErrback(lambda _: None)
    assert failure.check(SMTPError) and failure.value.code == 454
    assert b"s3cret" not in str(failure.value).encode() and blob.decode() not in str(failure.value)


def test_loginAndCramMD5Exchanges():
    protocol, transport, _ = session(ehlo=b"250-mx\r\n250 AUTH LOGIN\r\n")
    result = fromCoroutine(protocol.authenticate(["LOGIN"], "me", "pw"))
    assert transport.writes[-1] == b"AUTH LOGIN\r\n"
    protocol.dataReceived(b"334 VXNlcm5hbWU6\r\n")
    assert transport.writes[-1] == base64.b64encode(b"me") + b"\r\n"
    protocol.dataReceived(b"334 UGFzc3dvcmQ6\r\n")
    assert transport.writes[-1] == base64.b64encode(b"pw") + b"\r\n"
    protocol.dataReceived(b"235 ok\r\n")
    assert result.result is True

    protocol, transport, _ = session(ehlo=b"250-mx\r\n250 AUTH CRAM-MD5\r\n")
    result = fromCoroutine(protocol.authenticate(["CRAM-MD5"], "me", "pw"))
    challenge = b"<1.2@mx>"
    protocol.dataReceived(b"334 " + base64.b64encode(challenge) + b"\r\n")
    digest = hmac.new(b"pw", challenge, hashlib.md5).hexdigest().encode()
    assert transport.writes[-1] == base64.b64encode(b"me " + digest) + b"\r\n"
    protocol.dataReceived(b"235 ok\r\n")
    assert result.result is True


# ------------------------------------------------ protocol, hostile server


@pytest.mark.parametrize("ending", [b"\r\n", b"\n"])
def test_replyLineOfMaxReplyLineBytesIsRead(ending):
    protocol, transport, _ = session()
    result = fromCoroutine(protocol.verify("ann"))
    line = b"250 " + b"v" * (MAX_REPLY_LINE - 4 - len(ending)) + ending
    assert len(line) == MAX_REPLY_LINE
    protocol.dataReceived(line)
    assert result.result == "v" * (MAX_REPLY_LINE - 4 - len(ending))


@pytest.mark.parametrize("ending", [b"\r\n", b"\n"])
def test_replyLineOneByteOverMaxReplyLineAborts(ending):
    protocol, transport, _ = session()
    result = fromCoroutine(protocol.verify("ann"))
    protocol.dataReceived(b"250-first\r\n250 " + b"v" * (MAX_REPLY_LINE - 3 - len(ending)) + ending)
    error = failureOf(result)
    assert isinstance(error, SMTPProtocolError)
    assert str(error) == f"the server sent a reply line longer than {MAX_REPLY_LINE} bytes"
    assert transport.disconnected


def test_unfinishedReplyLineIsHeldWhileItsLineFeedCanStillFit():
    protocol, transport, _ = session()
    result = fromCoroutine(protocol.verify("ann"))
    partial = b"250 " + b"v" * (MAX_REPLY_LINE - 5)
    protocol.dataReceived(partial[:100])
    protocol.dataReceived(partial[100:])
    assert not result.called and not transport.disconnected
    protocol.dataReceived(b"\n")
    assert result.result == "v" * (MAX_REPLY_LINE - 5)


def test_unfinishedReplyLineAbortsOnceItsLineFeedCannotFit():
    protocol, transport, _ = session()
    result = fromCoroutine(protocol.verify("ann"))
    protocol.dataReceived(b"250 " + b"v" * (MAX_REPLY_LINE - 5))
    assert not transport.disconnected
    protocol.dataReceived(b"v")
    assert isinstance(failureOf(result), SMTPProtocolError)
    # What is left of the line is dropped, not held until the close.
    assert transport.disconnected and protocol._buffer == b""


class TCPLikeTransport(RecordingTransport):
    """
    Reports an abort only when the test says, as TCP does on the reactor's
    next iteration.
    """

    def abortConnection(self):
        StringTransport.abortConnection(self)


def test_nothingIsReadAfterAnAbort():
    """
    Between the abort and the connection's end, what the transport still
    hands over answers nothing.
    """
    protocol, transport, _ = session(transportFactory=TCPLikeTransport)
    result = fromCoroutine(protocol.verify("ann"))
    protocol.dataReceived(b"junk\r\n")
    assert transport.disconnected and not result.called
    protocol.dataReceived(b"250 ann is here\r\n")
    assert not result.called
    protocol.connectionLost(Failure(ConnectionDone()))
    assert isinstance(failureOf(result), SMTPProtocolError)


def test_connectionIsClosedForWhoeverHearsOfItsLoss():
    """
    The failure's callbacks (the user's code) see ``connected`` false.
    """
    protocol, transport, _ = session()
    seen = []
    fromCoroutine(protocol.verify("ann")).addErrback(lambda _: seen.append(protocol.connected))
    protocol.connectionLost(Failure(ConnectionDone()))
    assert seen == [False]


@pytest.mark.parametrize("size", ["\N{SUPERSCRIPT TWO}".encode(), b"9" * 5000, b"000000000000000000010", b"-1", b"1e3"])
def test_malformedSizeIsIgnored(size):
    protocol, transport, _ = session(ehlo=b"250-mx\r\n250-PIPELINING\r\n250 SIZE " + size + b"\r\n")
    protocol.sendMessage("a@x", ["b@x"], small(b"x" * 101))
    assert transport.writes[0].startswith(b"MAIL FROM:<a@x> SIZE=101\r\nRCPT TO:<b@x>")


def test_messageOfExactlyTheSizeLimitGoesOut():
    protocol, transport, _ = session()
    protocol.sendMessage("a@x", ["b@x"], small(b"x" * 100))
    assert transport.writes[0].startswith(b"MAIL FROM:<a@x> SIZE=100\r\n")


def test_sizeLimitOfTwentyDigitsHolds():
    protocol, transport, _ = session(ehlo=b"250-mx\r\n250-PIPELINING\r\n250 SIZE 00000000000000000100\r\n")
    error = failureOf(protocol.sendMessage("a@x", ["b@x"], small(b"x" * 101)))
    assert isinstance(error, SMTPError) and error.code == 552
    assert transport.writes == []


@pytest.mark.parametrize("stray", [False, True])
@pytest.mark.parametrize("replies", [b"421 4.3.2 shutting down\r\n", b"250 ok\r\n421 4.3.2 shutting down\r\n"])
def test_pipelined421BeforeTheCloseIsReported(replies, stray):
    """
    A 421 among a pipelined group's replies, then the close: the 421 is
    the reason given, not "connection lost", and not an older stray reply.
    """
    protocol, transport, _ = session()
    if stray:
        protocol.dataReceived(b"250 stray\r\n")
    result = protocol.sendMessage("a@x", ["b@x"], small())
    protocol.dataReceived(replies)
    assert not result.called
    protocol.connectionLost(Failure(ConnectionDone()))
    error = failureOf(result)
    assert isinstance(error, SMTPConnectError) and error.code == 421
    assert error.text == "the server closed the connection: 4.3.2 shutting down"


def test_pipelinedReplyOtherThan421IsNotTakenForTheReasonOfTheClose():
    protocol, transport, _ = session()
    result = protocol.sendMessage("a@x", ["b@x"], small())
    protocol.dataReceived(b"451 4.3.0 try later\r\n")
    protocol.connectionLost(Failure(ConnectionDone()))
    error = failureOf(result)
    assert isinstance(error, SMTPConnectError) and error.code is None
    assert "connection to the server was lost" in str(error)


SECRET = "s3cret-pw"
SECRET_BLOB = base64.b64encode(b"\0me\0" + SECRET.encode()).decode()
HOSTILE = f"echo {SECRET} {SECRET_BLOB} \x1b[2J" + "y" * 2 * MAX_QUOTED_TEXT


def assertQuotedSafely(text: str) -> None:
    assert SECRET not in text and SECRET_BLOB not in text
    assert "\x1b" not in text and "\\x1b[2J" in text
    assert "y" * 100 in text and len(text) < MAX_QUOTED_TEXT + 100


def hostileLine(code: bytes) -> bytes:
    return code + b" " + HOSTILE.encode() + b"\r\n"


def authenticatedSession(ehlo=b"250-mx\r\n250-PIPELINING\r\n250-STARTTLS\r\n250 AUTH PLAIN\r\n"):
    protocol, transport, _ = session(ehlo=ehlo)
    result = fromCoroutine(protocol.authenticate(["PLAIN"], "me", SECRET))
    protocol.dataReceived(b"235 ok\r\n")
    assert result.result is True
    transport.writes.clear()
    return protocol


def senderRefused(protocol):
    d = protocol.sendMessage("a@x", ["b@x"], small())
    protocol.dataReceived(hostileLine(b"550") + b"503 no\r\n503 no\r\n")
    return failureOf(d).text


def allRecipientsRefused(protocol):
    d = protocol.sendMessage("a@x", ["b@x"], small())
    protocol.dataReceived(b"250 ok\r\n" + hostileLine(b"550") + b"554 no\r\n")
    error = failureOf(d)
    assert isinstance(error, SMTPRecipientsRefused)
    return error.refused["b@x"][1]


def someRecipientsRefused(protocol):
    d = protocol.sendMessage("a@x", ["b@x", "c@x"], small())
    protocol.dataReceived(b"250 ok\r\n250 ok\r\n" + hostileLine(b"550") + b"354 go\r\n250 ok\r\n")
    return d.result["c@x"][1]


def dataRefused(protocol):
    d = protocol.sendMessage("a@x", ["b@x"], small())
    protocol.dataReceived(b"250 ok\r\n250 ok\r\n" + hostileLine(b"554"))
    return failureOf(d).text


def messageRefused(protocol):
    d = protocol.sendMessage("a@x", ["b@x"], small())
    protocol.dataReceived(b"250 ok\r\n250 ok\r\n354 go\r\n" + hostileLine(b"554"))
    return failureOf(d).text


def messageRefusedWithoutPipelining(protocol):
    protocol.extensions.pop("PIPELINING")
    d = protocol.sendMessage("a@x", ["b@x"], small())
    for line in (b"250 ok\r\n", b"250 ok\r\n", b"354 go\r\n", hostileLine(b"554")):
        protocol.dataReceived(line)
    return failureOf(d).text


def verifyRefused(protocol):
    d = fromCoroutine(protocol.verify("ann"))
    protocol.dataReceived(hostileLine(b"550"))
    return failureOf(d).text


def ehloRefused(protocol):
    d = fromCoroutine(protocol.ehlo())
    protocol.dataReceived(hostileLine(b"554"))
    protocol.dataReceived(hostileLine(b"554"))
    error = failureOf(d)
    assert isinstance(error, SMTPConnectError)
    return error.text


def startTLSRefused(protocol):
    d = fromCoroutine(protocol.startTLS(object()))
    protocol.dataReceived(hostileLine(b"454"))
    error = failureOf(d)
    assert isinstance(error, SMTPTLSError)
    return error.text


def authRefused(protocol):
    protocol.authenticated = False
    d = fromCoroutine(protocol.authenticate(["PLAIN"], "me", SECRET))
    protocol.dataReceived(hostileLine(b"454"))
    error = failureOf(d)
    assert isinstance(error, SMTPAuthenticationError)
    return error.text


def malformedReply(protocol):
    d = fromCoroutine(protocol.verify("ann"))
    protocol.dataReceived(HOSTILE.encode() + b"\r\n")
    error = failureOf(d)
    assert isinstance(error, SMTPProtocolError)
    return error.text


def closedWhileIdle(protocol):
    protocol.dataReceived(hostileLine(b"421"))
    protocol.connectionLost(Failure(ConnectionDone()))
    error = failureOf(fromCoroutine(protocol.verify("ann")))
    assert isinstance(error, SMTPConnectError) and error.code == 421
    return error.text


def closedAfter421ToPipelinedMail(protocol):
    d = protocol.sendMessage("a@x", ["b@x"], small())
    protocol.dataReceived(hostileLine(b"421"))
    protocol.connectionLost(Failure(ConnectionDone()))
    return failureOf(d).text


def tlsFailed(protocol):
    d = fromCoroutine(protocol.verify("ann"))
    protocol.connectionLost(Failure(SSL.Error([("SSL routines", "", HOSTILE)])))
    error = failureOf(d)
    assert isinstance(error, SMTPTLSError)
    return error.text


@pytest.mark.parametrize(
    "scenario",
    [
        senderRefused,
        allRecipientsRefused,
        someRecipientsRefused,
        dataRefused,
        messageRefused,
        messageRefusedWithoutPipelining,
        verifyRefused,
        ehloRefused,
        startTLSRefused,
        authRefused,
        malformedReply,
        closedWhileIdle,
        tlsFailed,
    ],
)
def test_serverTextInErrorsIsRedactedEscapedAndCut(scenario):
    """
    Wherever the server's text reaches an error (or the refused recipients),
    the credentials it may echo are redacted, its control characters
    escaped, and its length bounded.
    """
    assertQuotedSafely(scenario(authenticatedSession()))


def test_421BeforeTheCloseIsRedactedEscapedAndCut():
    assertQuotedSafely(closedAfter421ToPipelinedMail(authenticatedSession()))


def test_malformedReplyAfterSTARTTLSIsRedactedToo():
    """
    The reply parser that STARTTLS starts afresh knows the secrets of an
    AUTH that follows.
    """
    protocol, transport, _ = session(ehlo=b"250-mx\r\n250 STARTTLS\r\n")
    started = fromCoroutine(protocol.startTLS(object()))
    protocol.dataReceived(b"220 go ahead\r\n")
    protocol.dataReceived(b"250-mx\r\n250 AUTH PLAIN\r\n")
    assert started.result == {"AUTH": "PLAIN"}
    result = fromCoroutine(protocol.authenticate(["PLAIN"], "me", SECRET))
    protocol.dataReceived(HOSTILE.encode() + b"\r\n")
    error = failureOf(result)
    assert isinstance(error, SMTPProtocolError)
    assertQuotedSafely(error.text)


def test_refusedGreetingIsEscapedAndCut():
    protocol = ESMTPSessionClient("client.example.org", 5)
    transport = RecordingTransport()
    transport.protocol = protocol
    protocol.makeConnection(transport)
    protocol.dataReceived(hostileLine(b"554"))
    error = failureOf(fromCoroutine(protocol.whenGreeted()))
    assert isinstance(error, SMTPConnectError)
    assert "\x1b" not in error.text and "\\x1b[2J" in error.text
    assert len(error.text) < MAX_QUOTED_TEXT + 100


# ----------------------------------------------------------------------- TLS


def tlsConnection(host, **keywords):
    creator = clientTLSOptions(host, **keywords)
    factory = TLSMemoryBIOFactory(creator, True, Factory.forProtocol(Protocol))
    return creator.clientConnectionForTLS(factory.buildProtocol(None))


def currentOptions(connection):
    # SSL_set_options returns the options in force after adding its argument.
    return connection.set_options(0)


def test_tlsVerifiesAndSendsServerNameByDefault(certificateAuthority):
    connection = tlsConnection("mx.example.org", caCertFile=certificateAuthority.certFile)
    assert connection.get_verify_mode() & SSL.VERIFY_PEER
    assert connection.get_servername() == b"mx.example.org"
    assert not currentOptions(connection) & (
        OP_LEGACY_SERVER_CONNECT | OP_ALLOW_UNSAFE_LEGACY_RENEGOTIATION
    )


def test_tlsVerificationOffOnlyWhenAskedStillSendsServerName():
    connection = tlsConnection("mx.example.org", verify=False)
    assert connection.get_verify_mode() == SSL.VERIFY_NONE
    assert connection.get_servername() == b"mx.example.org"
    # RFC 6066: no server name for a literal address.
    assert tlsConnection("127.0.0.1", verify=False).get_servername() is None


def test_tlsLegacyOptionsOnRequest(certificateAuthority):
    for verify in (True, False):
        connection = tlsConnection(
            "mx.example.org",
            verify=verify,
            caCertFile=certificateAuthority.certFile,
            legacyServerConnect=True,
            unsafeLegacyRenegotiation=True,
        )
        options = currentOptions(connection)
        assert options & OP_LEGACY_SERVER_CONNECT
        assert options & OP_ALLOW_UNSAFE_LEGACY_RENEGOTIATION == 0x00040000


def test_tlsUnusableCaCertFile(tmp_path):
    with pytest.raises(SMTPTLSError, match="cannot read"):
        clientTLSOptions("mx.example.org", caCertFile=str(tmp_path / "missing.pem"))
    empty = tmp_path / "empty.pem"
    empty.write_text("not a certificate\n")
    with pytest.raises(SMTPTLSError, match="no PEM certificate"):
        clientTLSOptions("mx.example.org", caCertFile=str(empty))
    broken = tmp_path / "broken.pem"
    broken.write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    with pytest.raises(SMTPTLSError, match="bad certificate"):
        clientTLSOptions("mx.example.org", caCertFile=str(broken))


def test_sessionAttributesStayInCPythonsSharedKeyDict():
    """
    The protocol's instance attributes stay within the 30 keys CPython
    (3.11+) shares between instances: one more and each instance gets a dict
    of its own, which made every attribute access on the send path slower
    (callgrind: +3 % instructions per message).  Merge state before adding
    an attribute.
    """
    from infsmtp._client.protocol import ESMTPSessionClient

    protocol = ESMTPSessionClient("client.test", 30, 600)
    protocol.makeConnection(StringTransport())
    protocol.dataReceived(b"220 mx.test ESMTP\r\n250-mx.test\r\n")
    assert len(vars(protocol)) <= 30, sorted(vars(protocol))
    # Stores are plain ones, not ESMTPClient's Python-level __setattr__;
    # Twisted's own flag lands on the property, which stays ours.
    assert type(protocol).__setattr__ is object.__setattr__
    assert protocol.connected is True and "connected" not in vars(protocol)

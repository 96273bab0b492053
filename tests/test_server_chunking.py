"""
Issue 14, items 1-3, driven in memory (infsmtp.testing's harness): the
server's CHUNKING (RFC 3030), DSN (RFC 3461) and LMTP (RFC 2033).  What
goes over real sockets and against Postfix is in test_server_postfix.py.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from infsmtp import SMTPError
from infsmtp.testing import ServerHarness


def received(**options):
    """
    A harness whose server keeps each message (without a Received: header)
    and the parameters its handlers saw.
    """
    seen: dict[str, list] = {"messages": [], "mail": [], "rcpt": [], "receive": []}

    def onMailFrom(session):
        seen["mail"].append(dict(session.mailParameters))

    def onRcptTo(session):
        seen["rcpt"].append((session.address, dict(session.parameters)))

    def onReceive(session):
        seen["messages"].append(session.msg)
        seen["receive"].append({a: dict(p) for a, p in session.rcptParameters.items()})

    options.setdefault("receivedHeader", False)
    h = ServerHarness(onMailFrom=onMailFrom, onRcptTo=onRcptTo, onReceive=onReceive, **options)
    h.take()
    h.send("EHLO client.test")
    return h, seen


def envelope(h):
    assert h.codes("MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\n") == [250, 250]


# ---------------------------------------------------------------- CHUNKING


def test_chunkingIsOffered():
    h, _ = received()
    assert b"250-CHUNKING" in h.send("EHLO again.test") or b"250 CHUNKING" in h.send("EHLO again.test")
    h, _ = received(chunking=False)
    assert not any(b"CHUNKING" in line for line in h.send("EHLO again.test"))


def test_envelopeAndMessageInOneFlight():
    h, seen = received()
    content = b".a line with a dot\r\n..two\r\n.\r\n"
    flight = b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nBDAT %d LAST\r\n" % len(content) + content
    lines = h.send(flight)
    assert [line[:3] for line in lines] == [b"250", b"250", b"250"]
    assert lines[-1].startswith(b"250 2.0.0 OK queued as ")
    # Counted, not dot-stuffed: kept exactly as sent.
    assert seen["messages"] == [content]


@settings(max_examples=50, deadline=None)
@given(st.binary(min_size=0, max_size=300), st.lists(st.integers(1, 40), max_size=20))
def test_chunksCutAnywhereGiveTheSameMessage(content, cuts):
    h, seen = received()
    envelope(h)
    half = len(content) // 2
    stream = b"BDAT %d\r\n" % half + content[:half] + b"BDAT %d LAST\r\n" % (len(content) - half) + content[half:]
    stream += b"NOOP\r\n"
    codes = []
    position = 0
    for cut in cuts:
        codes += [int(line[:3]) for line in h.send(stream[position : position + cut])]
        position += cut
    codes += [int(line[:3]) for line in h.send(stream[position:])]
    # Two chunks (an empty first one too) and the NOOP.
    assert codes == [250, 250, 250]
    assert seen["messages"] == [content]


def test_emptyLastChunk():
    h, seen = received()
    envelope(h)
    assert h.codes(b"BDAT 5\r\nhello") == [250]
    assert h.codes(b"BDAT 0 LAST\r\n") == [250]
    assert seen["messages"] == [b"hello"]


def test_aChunkWithoutATransactionIsReadNotRun():
    # The octets of a refused chunk are data, never commands: this chunk
    # holds a whole transaction, which must not happen.
    h, seen = received()
    smuggled = b"MAIL FROM:<evil@x.test>\r\nRCPT TO:<victim@y.test>\r\nDATA\r\n"
    lines = h.send(b"BDAT %d LAST\r\n" % len(smuggled) + smuggled + b"NOOP\r\n")
    assert [line[:3] for line in lines] == [b"503", b"250"]
    assert seen["mail"] == [] and seen["messages"] == []


def test_noRecipientsAndDisabledAreRefusedAfterTheOctets():
    h, seen = received()
    assert h.codes("MAIL FROM:<a@x.test>") == [250]
    assert h.codes(b"BDAT 4 LAST\r\nRSETNOOP\r\n") == [554, 250]
    h, seen = received(chunking=False)
    envelope(h)
    assert h.codes(b"BDAT 4 LAST\r\nQUITNOOP\r\n") == [502, 250]
    assert seen["messages"] == []


def test_overTheSizeLimitMidChunk():
    h, seen = received(maxMessageSize=100)
    envelope(h)
    assert h.codes(b"BDAT 60\r\n" + b"x" * 60) == [250]
    # The second chunk passes 100 bytes: 552 once it is read, nothing kept,
    # the transaction is over (a later chunk has no MAIL).
    assert h.codes(b"BDAT 60\r\n" + b"y" * 60) == [552]
    assert h.codes(b"BDAT 3 LAST\r\nabc") == [503]
    assert seen["messages"] == []
    assert h.protocol._sink is None
    envelope(h)
    assert h.codes(b"BDAT 3 LAST\r\nabc") == [250]
    assert seen["messages"] == [b"abc"]


def test_rsetBetweenChunksDropsTheMessage():
    h, seen = received()
    envelope(h)
    assert h.codes(b"BDAT 5\r\nhello") == [250]
    assert h.codes("RSET") == [250]
    assert h.protocol._sink is None
    assert h.codes(b"BDAT 3 LAST\r\nabc") == [503]
    assert seen["messages"] == []


def test_dataAfterAChunkIsRefused():
    h, seen = received()
    envelope(h)
    assert h.codes(b"BDAT 5\r\nhello") == [250]
    assert h.codes("DATA") == [503]
    assert h.codes(b"BDAT 1 LAST\r\n!") == [250]
    assert seen["messages"] == [b"hello!"]


@pytest.mark.parametrize("argument", [b"", b"x", b"-1", b"10 NOW", b"10 LAST MORE", b"\xc2\xb2"])
def test_aChunkOfUnknownSizeEndsTheSession(argument):
    h, _ = received()
    envelope(h)
    lines = h.send(b"BDAT " + argument + b"\r\nQUIT\r\n")
    assert [line[:3] for line in lines] == [b"501"]
    assert h.transport.disconnecting


# ---------------------------------------------------------------- DSN


def test_dsnParametersReachTheHandlers():
    h, seen = received()
    assert any(b"DSN" in line for line in h.send("EHLO again.test"))
    assert h.codes("MAIL FROM:<a@x.test> RET=hdrs ENVID=QQ+2B1") == [250]
    assert h.codes("RCPT TO:<b@y.test> NOTIFY=success,failure ORCPT=rfc822;b+2B1@y.test") == [250]
    assert h.codes("RCPT TO:<c@y.test>") == [250]
    assert h.codes(b"BDAT 2 LAST\r\nhi") == [250]
    # MAIL's parameters already in onMailFrom, decoded.
    assert seen["mail"] == [{"RET": "HDRS", "ENVID": "QQ+1"}]
    assert seen["rcpt"] == [
        ("b@y.test", {"NOTIFY": "SUCCESS,FAILURE", "ORCPT": "rfc822;b+1@y.test"}),
        ("c@y.test", {}),
    ]
    # A recipient without parameters is not listed.
    assert seen["receive"] == [{"b@y.test": {"NOTIFY": "SUCCESS,FAILURE", "ORCPT": "rfc822;b+1@y.test"}}]


@pytest.mark.parametrize(
    "command, code",
    [
        ("MAIL FROM:<a@x.test> RET=ALL", 501),
        ("MAIL FROM:<a@x.test> ENVID=a+0A", 501),
        ("RCPT TO:<b@y.test> NOTIFY=NEVER,DELAY", 501),
        ("RCPT TO:<b@y.test> ORCPT=b@y.test", 501),
        ("RCPT TO:<b@y.test> FOO=1", 555),
    ],
)
def test_badDsnParametersAre501(command, code):
    h, seen = received()
    if command.startswith("RCPT"):
        assert h.codes("MAIL FROM:<a@x.test>") == [250]
    assert h.codes(command) == [code]
    assert seen["rcpt"] == []


def test_withoutDsnItsParametersAreUnknown():
    h, seen = received(dsn=False)
    assert not any(b"DSN" in line for line in h.send("EHLO again.test"))
    assert h.codes("MAIL FROM:<a@x.test> RET=FULL") == [555]
    assert h.codes("MAIL FROM:<a@x.test>") == [250]
    assert h.codes("RCPT TO:<b@y.test> NOTIFY=NEVER") == [555]


def test_aRefusedSenderLeavesNoParameters():
    h = ServerHarness(onMailFrom=lambda s: s.address != "bad@x.test", receivedHeader=False)
    h.take()
    h.send("EHLO client.test")
    assert h.codes("MAIL FROM:<bad@x.test> RET=FULL SMTPUTF8") == [550]
    assert h.session.mailParameters == {}
    # Without SMTPUTF8 from an accepted MAIL, a non-ASCII recipient is 553.
    assert h.codes("MAIL FROM:<a@x.test>") == [250]
    assert h.codes("RCPT TO:<j\u00f6rg@y.test>") == [553]


# ---------------------------------------------------------------- LMTP


def lmtp(onReceive=None, **options):
    h = ServerHarness(lmtp=True, onReceive=onReceive, receivedHeader=False, **options)
    h.take()
    return h


def test_lhloNotEhlo():
    h = lmtp()
    assert h.codes("EHLO client.test") == [500]
    assert h.codes("HELO client.test") == [500]
    lines = h.send("LHLO client.test")
    assert lines[-1].startswith(b"250 ")
    smtp = ServerHarness(receivedHeader=False)
    smtp.take()
    assert smtp.codes("LHLO client.test") == [500]


def test_oneReplyPerRecipient():
    def onReceive(session):
        session.rcptResults = {"full@y.test": SMTPError(452, "4.2.2 Mailbox full"), "gone@y.test": False}

    h = lmtp(onReceive)
    h.send("LHLO client.test")
    assert h.codes("MAIL FROM:<a@x.test>\r\nRCPT TO:<ok@y.test>\r\nRCPT TO:<full@y.test>\r\nRCPT TO:<gone@y.test>") == [250] * 4
    lines = h.send(b"DATA\r\nSubject: x\r\n\r\nhi\r\n.\r\n")
    assert [line[:3] for line in lines] == [b"354", b"250", b"452", b"550"]
    assert b"<ok@y.test>" in lines[1] and lines[2] == b"452 4.2.2 <full@y.test> Mailbox full"
    assert b"<gone@y.test>" in lines[3]
    # BDAT too, and a single bool still decides for everyone.
    h = lmtp(lambda session: False)
    h.send("LHLO client.test")
    h.send("MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nRCPT TO:<c@y.test>")
    assert h.codes(b"BDAT 2 LAST\r\nhi") == [550, 550]


@pytest.mark.parametrize(
    "behaviour",
    ["raises", "bad-results", "bad-entry"],
)
def test_aFailingDecisionIsTemporaryForEachRecipient(behaviour):
    def onReceive(session):
        if behaviour == "raises":
            raise RuntimeError("store down")
        if behaviour == "bad-results":
            session.rcptResults = ["b@y.test"]
        else:
            session.rcptResults = {"c@y.test": "yes"}

    h = lmtp(onReceive)
    h.send("LHLO client.test")
    h.send("MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nRCPT TO:<c@y.test>")
    codes = h.codes(b"BDAT 2 LAST\r\nhi")
    if behaviour == "bad-entry":
        # b takes the message's decision (True); c's entry is no decision.
        assert codes == [250, 451]
    else:
        assert codes == [451, 451]


def test_pluginOptions():
    from infsmtp._daemon.twistd import Options, buildServer

    options = Options()
    options.parseOptions(["--lmtp", "--no-dsn", "--no-chunking"])
    server = buildServer(options)
    assert (server.lmtp, server.dsn, server.chunking) == (True, False, False)
    options = Options()
    options.parseOptions([])
    server = buildServer(options)
    assert (server.lmtp, server.dsn, server.chunking) == (False, True, True)


def test_chunkingWithdrawnByOnEhloIsRefused():
    def onEhlo(session):
        session.extensions.pop("CHUNKING")

    h = ServerHarness(onEhlo=onEhlo, receivedHeader=False)
    h.take()
    assert not any(b"CHUNKING" in line for line in h.send("EHLO client.test"))
    envelope(h)
    # Not offered, so refused (its octets read all the same).
    assert h.codes(b"BDAT 4 LAST\r\nQUITNOOP\r\n") == [502, 250]


def test_aChunkedMessageWithABareCRIsStoredExactly():
    """
    BDAT's octets may hold a bare CR (DATA's framer refuses one): the
    Maildir conversion keeps it, rather than dropping every CR as it may
    for DATA.
    """
    from infsmtp._daemon.maildir import localLineEndings

    stored = []

    def onReceive(session):
        stored.append(b"".join(localLineEndings(b"", session.msgFile, crlfOnly=session._crlfOnly)))

    h = ServerHarness(onReceive=onReceive, receivedHeader=False)
    h.take()
    h.send("EHLO client.test")
    envelope(h)
    content = b"Subject: cr\r\n\r\na\rb\r\n"
    assert h.codes(b"BDAT %d LAST\r\n" % len(content) + content) == [250]
    assert stored == [b"Subject: cr\n\na\rb\n"]

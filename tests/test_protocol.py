"""
The server protocol driven directly: bytes in through a StringTransport,
replies out, time from a fake clock.  No sockets (interop lives in
tests/interop).
"""

from __future__ import annotations

import base64
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, fail
from twisted.internet.testing import MemoryReactorClock

from infsmtp import Server, SMTPError
from infsmtp._enums import TLSVersion
from infsmtp._server.tls import serverTLSOptions
from infsmtp.testing import MemoryTransport, ServerHarness

REPLY = re.compile(rb"^\d{3}[ -].*$")


# The harness is public (infsmtp.testing); these names are the ones the
# protocol tests (and test_hardening.py) grew up with.
Transport = MemoryTransport
Harness = ServerHarness


def makeServer(**kw) -> Server:
    kw.setdefault("hostname", "mx.test")
    kw.setdefault("reactor", MemoryReactorClock())
    return Server(**kw)


@pytest.fixture
def server():
    return makeServer()


def session(server, ehlo=True, tls=None) -> Harness:
    h = Harness(server, tls)
    assert h.take() == [b"220 mx.test ESMTP infsmtp"]
    if ehlo:
        h.send(b"EHLO client.test\r\n")
    return h


def test_ehlo_lists_extensions_without_tls_or_auth(server):
    h = session(server, ehlo=False)
    lines = h.send(b"EHLO client.test\r\n")
    assert lines[0] == b"250-mx.test Hello 192.0.2.7"
    names = [line[4:] for line in lines[1:]]
    assert names == [
        b"PIPELINING", b"SIZE 33554432", b"8BITMIME", b"ENHANCEDSTATUSCODES", b"SMTPUTF8", b"DSN", b"CHUNKING"
    ]
    assert lines[-1].startswith(b"250 ")


def test_auth_offered_only_with_onLogin_and_insecure_allowed():
    server = makeServer(allowInsecureAuth=True)
    h = session(server, ehlo=False)
    assert not any(b"AUTH" in line for line in h.send(b"EHLO c\r\n"))
    server.onLogin = lambda s: True
    assert b"250 AUTH PLAIN LOGIN" in h.send(b"EHLO c\r\n")


def test_helo_is_plain(server):
    h = session(server, ehlo=False)
    assert h.send(b"HELO client\r\n") == [b"250 mx.test"]


def test_queue_ids_are_unique_across_sessions_and_messages(server):
    # Among them: session 0x1's message 0x11 and session 0x11's message 0x1.
    ids = []
    for h in [session(server) for _ in range(20)]:
        for _ in range(20):
            reply = h.send(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\nx\r\n.\r\n")[-1]
            assert reply.startswith(b"250 2.0.0 OK queued as "), reply
            ids.append(reply.rsplit(b" ", 1)[1])
    assert len(set(ids)) == 400


def test_full_transaction_and_session_fields(server):
    got = []
    server.onReceive = lambda s: got.append((s.mailFrom, list(s.rcptTo), s.msg, s.message["Subject"]))
    h = session(server)
    assert h.codes(b"MAIL FROM:<a@b.test>\r\n") == [250]
    assert h.codes(b"RCPT TO:<x@y.test>\r\nRCPT TO:<z@y.test>\r\n") == [250, 250]
    assert h.codes(b"DATA\r\n") == [354]
    replies = h.send(b"Subject: hi\r\n\r\n..dot\r\nbody\r\n.\r\n")
    assert replies[0].startswith(b"250 2.0.0 OK queued as ")
    (sender, rcpts, msg, subject), = got
    assert (sender, rcpts, subject) == ("a@b.test", ["x@y.test", "z@y.test"], "hi")
    header, _, body = msg.partition(b"\r\nSubject")
    assert header.startswith(b"Received: from client.test ([192.0.2.7])\r\n\tby mx.test (infsmtp) with ESMTP")
    assert body == b": hi\r\n\r\n.dot\r\nbody\r\n"
    # The envelope is forgotten after the message.
    assert h.codes(b"RCPT TO:<x@y.test>\r\n") == [503]


def test_null_sender_is_empty_string(server):
    seen = []
    server.onMailFrom = lambda s: seen.append(s.address)
    h = session(server)
    assert h.codes(b"MAIL FROM:<>\r\n") == [250]
    assert seen == [""]


def test_pipelined_batch_answered_in_one_write(server):
    h = session(server)
    h.transport.writes = 0
    replies = h.send(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\nx\r\n.\r\nQUIT\r\n")
    assert [r[:3] for r in replies] == [b"250", b"250", b"354", b"250", b"221"]
    assert h.transport.writes == 1


def test_batched_replies_go_out_together_when_the_iteration_ends():
    clock = MemoryReactorClock()
    factory = makeServer(reactor=clock).buildFactory()
    flushed = []

    class Session:
        def __init__(self, name, fails=False):
            self.name, self.fails = name, fails

        def flushNow(self):
            flushed.append(self.name)
            if self.fails:
                raise OSError("broken")

    for session in (Session("a"), Session("b", fails=True), Session("c")):
        factory.flushSoon(session)
    assert flushed == [] and len(clock.getDelayedCalls()) == 1  # one call per batch
    clock.advance(0)
    assert flushed == ["a", "b", "c"]  # in order, and b's failure does not hold c back
    factory.flushSoon(Session("d"))
    clock.advance(0)
    assert flushed[-1] == "d"


def test_pending_deferred_holds_later_commands_in_order(server):
    pending = Deferred()
    server.onMailFrom = lambda s: pending
    h = session(server)
    assert h.send(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\n") == []
    # Held, not acted upon; reading goes on (a client that leaves is
    # noticed) until a bound of held input, then pauses.
    assert h.transport.producerState == "producing"
    assert h.send(b"NOOP " + b"x" * 100 + b"\r\n") == []
    assert h.transport.producerState == "producing"
    h.send(b"NOOP\r\n" * 11000)
    assert h.transport.producerState == "paused"
    pending.callback(True)
    assert [r[:3] for r in h.take()] == [b"250", b"250", b"354"]
    assert h.transport.producerState == "producing"
    # The message body was not taken for commands: what was held is the
    # message, ended by the dot.
    assert h.codes(b".\r\nNOOP\r\n") == [250, 250]


def test_coroutine_handler_and_false_refuses(server):
    async def onRcptTo(s):
        return s.address.startswith("ok")

    server.onRcptTo = onRcptTo
    h = session(server)
    h.send(b"MAIL FROM:<a@b.test>\r\n")
    assert h.send(b"RCPT TO:<ok@d.test>\r\nRCPT TO:<no@d.test>\r\n") == [
        b"250 2.1.5 Recipient OK",
        b"550 5.7.1 Recipient address rejected",
    ]


def test_failing_handler_answers_451_and_session_goes_on(server):
    def onReceive(s):
        raise RuntimeError("bug")

    server.onReceive = onReceive
    h = session(server)
    replies = h.send(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\nx\r\n.\r\n")
    assert replies[-1] == b"451 4.3.0 Error processing message, try again later"
    assert h.codes(b"MAIL FROM:<a@b.test>\r\n") == [250]


def test_failed_deferred_answers_451(server):
    server.onMailFrom = lambda s: fail(ValueError("db down"))
    h = session(server)
    assert h.send(b"MAIL FROM:<a@b.test>\r\n") == [b"451 4.3.0 Temporary failure, try again later"]


def test_smtperror_chooses_reply(server):
    def onRcptTo(s):
        raise SMTPError(550, "5.1.1 No such user here")

    server.onRcptTo = onRcptTo
    h = session(server)
    h.send(b"MAIL FROM:<a@b.test>\r\n")
    assert h.send(b"RCPT TO:<c@d.test>\r\n") == [b"550 5.1.1 No such user here"]


def test_onConnect_refuses(server):
    server.onConnect = lambda s: False
    h = Harness(server)
    assert h.take() == [b"554 5.7.1 No SMTP service here"]
    assert h.transport.disconnecting


def test_onDisconnect_once():
    server = makeServer()
    calls = []
    server.onDisconnect = lambda s: calls.append(s.id)
    h = session(server)
    h.send(b"QUIT\r\n")
    h.lose()
    h.lose()
    assert len(calls) == 1


@pytest.mark.parametrize(
    "commands, expected",
    [
        (b"MAIL FROM:<a@b.test>\r\n", [503]),
        (b"RCPT TO:<a@b.test>\r\n", [503]),
        (b"DATA\r\n", [503]),
    ],
)
def test_order_before_helo(server, commands, expected):
    h = session(server, ehlo=False)
    assert h.codes(commands) == expected


def test_order_and_syntax(server):
    h = session(server)
    assert h.codes(b"RCPT TO:<a@b.test>\r\n") == [503]
    assert h.codes(b"MAIL FROM:a@b.test\r\n") == [501]
    assert h.codes(b"MAIL FROM:<a@b.test> FOO=1\r\n") == [555]
    assert h.codes(b"MAIL FROM:<a@b.test>\r\nMAIL FROM:<a@b.test>\r\n") == [250, 503]
    assert h.codes(b"DATA\r\n") == [554]  # no valid recipients
    assert h.codes(b"BOGUS\r\n\x00\xff\r\n") == [500, 500]
    assert h.codes(b"NOOP\r\nVRFY bob\r\nHELP\r\nEXPN x\r\nRSET\r\n") == [250, 252, 214, 502, 250]


def test_long_command_line(server):
    h = session(server)
    assert h.send(b"NOOP " + b"x" * 5000 + b"\r\nNOOP\r\n") == [b"500 5.5.2 Line too long", b"250 2.0.0 OK"]


def test_size_parameter_over_limit():
    server = makeServer(maxMessageSize=1000)
    h = session(server)
    assert h.send(b"MAIL FROM:<a@b.test> SIZE=1001\r\n") == [
        b"552 5.3.4 Message size exceeds fixed maximum message size"
    ]
    assert h.codes(b"MAIL FROM:<a@b.test> SIZE=1000\r\n") == [250]


def test_data_over_limit_is_discarded():
    server = makeServer(maxMessageSize=1000)
    got = []
    server.onReceive = lambda s: got.append(s)
    h = session(server)
    h.send(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\n")
    for _ in range(100):
        assert h.send(b"y" * 100 + b"\r\n") == []
    assert h.send(b".\r\n") == [b"552 5.3.4 Message size exceeds fixed maximum message size"]
    assert got == []
    assert h.codes(b"MAIL FROM:<a@b.test>\r\n") == [250]


def sizedMessage(size: int) -> tuple[bytes, bytes]:
    """
    A message of exactly C{size} bytes as the server counts them (after
    dot-unstuffing, CRLFs included, the terminator not): C{(wire, content)}.
    One line is dot-stuffed, so that a count of the wire bytes is one off.
    """
    stuffed = b".stuffed\r\n"  # "..stuffed" on the wire
    filler = size - len(stuffed)
    lines = [b"x" * 98 + b"\r\n"] * (filler // 100)
    rest = filler % 100
    if rest == 1:
        # No line is 1 byte long (its CRLF alone is 2): borrow one.
        lines[-1] = b"x" * 97 + b"\r\n"
        rest = 2
    if rest:
        lines.append(b"x" * (rest - 2) + b"\r\n")
    content = stuffed + b"".join(lines)
    assert len(content) == size
    return b"." + content + b".\r\n", content


@pytest.mark.parametrize("delta", [-1, 0, 1])
@pytest.mark.parametrize("pieces", [1, 7])
def test_data_size_boundary(delta, pieces):
    """
    maxMessageSize is the largest message accepted: exactly at it and one
    byte under are received whole (250), one byte over is refused 552 and
    never reaches onReceive, whether the message comes in one read or in
    pieces.
    """
    limit = 1000
    server = makeServer(maxMessageSize=limit, receivedHeader=False)
    got = []
    server.onReceive = lambda s: got.append(s.msg)
    h = session(server)
    assert h.codes(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\n") == [250, 250, 354]
    wire, content = sizedMessage(limit + delta)
    replies = []
    for i in range(0, len(wire), -(-len(wire) // pieces)):
        replies += h.send(wire[i : i + -(-len(wire) // pieces)])
    if delta <= 0:
        assert len(replies) == 1 and replies[0].startswith(b"250 2.0.0 OK queued as "), replies
        assert got == [content]
    else:
        assert replies == [b"552 5.3.4 Message size exceeds fixed maximum message size"]
        assert got == []
    # In step either way: the next transaction starts cleanly.
    assert h.codes(b"MAIL FROM:<a@b.test>\r\n") == [250]


def test_long_data_line_stays_in_data():
    server = makeServer(maxDataLineLength=1000)
    h = session(server)
    h.send(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\n")
    assert h.send(b"x" * 5000 + b"\r\nMAIL FROM:<evil@x.test>\r\n") == []
    assert h.send(b".\r\n") == [b"500 5.5.2 Line too long in message data"]


@pytest.mark.parametrize("smuggle", [b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r"])
def test_smuggling_gives_one_refused_message(server, smuggle):
    got = []
    server.onReceive = lambda s: got.append(s.msg)
    h = session(server)
    replies = h.send(
        b"MAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\nSubject: a\r\n\r\nhi"
        + smuggle
        + b"MAIL FROM:<evil@x.test>\r\nRCPT TO:<victim@y.test>\r\nDATA\r\nSubject: forged\r\n\r\n.\r\n"
    )
    assert [r[:3] for r in replies] == [b"250", b"250", b"354", b"550"]
    assert got == []


def test_too_many_recipients():
    server = makeServer(maxRecipients=2)
    h = session(server)
    h.send(b"MAIL FROM:<a@b.test>\r\n")
    assert h.codes(b"RCPT TO:<a@b.test>\r\nRCPT TO:<b@b.test>\r\nRCPT TO:<c@b.test>\r\n") == [250, 250, 452]


def test_too_many_errors_closes():
    server = makeServer(maxErrors=3)
    h = session(server)
    replies = h.send(b"X\r\nX\r\nX\r\nNOOP\r\n")
    assert replies[-1] == b"421 4.7.0 mx.test Too many errors, closing connection"
    assert h.transport.disconnecting


def test_idle_timeout():
    clock = MemoryReactorClock()
    server = makeServer(reactor=clock, timeout=300)
    h = session(server)
    clock.advance(299)
    assert h.take() == []
    h.send(b"NOOP\r\n")
    clock.advance(299)
    assert not h.transport.disconnecting
    clock.advance(2)
    assert h.take() == [b"421 4.4.2 mx.test Error: timeout exceeded"]
    assert h.transport.disconnecting


def test_max_connections():
    server = makeServer(maxConnections=1)
    first = session(server)
    second = Harness(server)
    assert second.take() == [b"421 4.7.0 mx.test Too many connections, try again later"]
    first.lose()
    third = Harness(server)
    assert third.take()[0].startswith(b"220")


def test_smtputf8():
    server = makeServer()
    got = []
    server.onReceive = lambda s: got.append(s.msg)
    h = session(server)
    assert h.codes("MAIL FROM:<jörg@exämple.test>\r\n".encode()) == [553]
    assert h.codes("MAIL FROM:<jörg@exämple.test> SMTPUTF8\r\n".encode()) == [250]
    assert h.codes("RCPT TO:<zoë@exämple.test>\r\nDATA\r\nx\r\n.\r\n".encode()) == [250, 354, 250]
    assert b"with UTF8SMTP" in got[0]


# AUTH -----------------------------------------------------------------------


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


@pytest.fixture
def authServer():
    # The tarpit (authFailureDelay) has tests of its own, in test_limits.
    server = makeServer(allowInsecureAuth=True, authFailureDelay=0)
    server.onLogin = lambda s: (s.username, s.password) == ("alice", "s3cret")
    return server


def test_auth_needs_tls_by_default():
    server = makeServer()
    server.onLogin = lambda s: True
    h = session(server)
    assert h.send(b"AUTH PLAIN " + b64(b"\0alice\0s3cret") + b"\r\n") == [
        b"538 5.7.11 Encryption required for requested authentication mechanism"
    ]


def test_auth_plain(authServer):
    h = session(authServer)
    assert h.codes(b"AUTH\r\n") == [501]
    assert h.codes(b"AUTH PLAIN !!!notbase64\r\n") == [501]
    assert h.codes(b"AUTH PLAIN " + b64(b"no-nuls") + b"\r\n") == [501]
    assert h.send(b"AUTH PLAIN\r\n") == [b"334 "]
    assert h.send(b64(b"\0alice\0s3cret") + b"\r\n") == [b"235 2.7.0 Authentication successful"]
    assert h.protocol.session.authenticated
    assert h.codes(b"AUTH PLAIN " + b64(b"\0alice\0s3cret") + b"\r\n") == [503]


def test_auth_login(authServer):
    h = session(authServer)
    assert h.send(b"AUTH LOGIN\r\n") == [b"334 VXNlcm5hbWU6"]
    assert h.send(b64(b"alice") + b"\r\n") == [b"334 UGFzc3dvcmQ6"]
    assert h.send(b64(b"s3cret") + b"\r\n") == [b"235 2.7.0 Authentication successful"]


def test_auth_cancel_and_unknown_mechanism(authServer):
    h = session(authServer)
    h.send(b"AUTH LOGIN\r\n")
    assert h.send(b"*\r\n") == [b"501 5.7.0 Authentication cancelled"]
    assert h.codes(b"AUTH CRAM-MD5\r\n") == [504]


def test_three_failures_close(authServer):
    h = session(authServer)
    bad = b"AUTH PLAIN " + b64(b"\0alice\0wrong") + b"\r\n"
    assert h.send(bad) == [b"535 5.7.8 Authentication credentials invalid"]
    assert h.codes(bad) == [535]
    assert h.send(bad) == [
        b"535 5.7.8 Authentication credentials invalid",
        b"421 4.7.0 mx.test Too many authentication failures",
    ]
    assert h.transport.disconnecting


def test_auth_handler_failure_is_454():
    server = makeServer(allowInsecureAuth=True)

    def onLogin(s):
        raise OSError("ldap down")

    server.onLogin = onLogin
    h = session(server)
    assert h.send(b"AUTH PLAIN " + b64(b"\0a\0b") + b"\r\n") == [b"454 4.7.0 Temporary authentication failure"]


def test_require_auth():
    server = makeServer(allowInsecureAuth=True, requireAuth=True)
    server.onLogin = lambda s: True
    h = session(server)
    assert h.codes(b"MAIL FROM:<a@b.test>\r\n") == [530]
    h.send(b"AUTH PLAIN " + b64(b"\0a\0b") + b"\r\n")
    assert h.codes(b"MAIL FROM:<a@b.test>\r\n") == [250]


# STARTTLS -------------------------------------------------------------------


def tlsOptions(authority):
    return serverTLSOptions(
        authority.localhost.certFile, authority.localhost.keyFile, None, False, TLSVersion.tls1_2, TLSVersion.tls1_3
    )


def test_starttls_forgets_injected_commands(server, certificateAuthority):
    options = tlsOptions(certificateAuthority)
    h = session(server, tls=options)
    assert any(b"STARTTLS" in line for line in h.send(b"EHLO c\r\n"))
    h.send(b"MAIL FROM:<a@b.test>\r\n")
    replies = h.send(b"STARTTLS\r\nRCPT TO:<injected@x.test>\r\n")
    assert replies == [b"220 2.0.0 Ready to start TLS"]
    assert h.transport.tlsStarted is options
    assert h.protocol.session.helo == ""
    assert h.protocol.session.mailFrom == ""
    # After the handshake the client must greet again.
    h.protocol.handshakeCompleted()
    assert h.codes(b"MAIL FROM:<a@b.test>\r\n") == [503]
    assert not any(b"STARTTLS" in line for line in h.send(b"EHLO c\r\n"))


def test_starttls_forgets_a_login(certificateAuthority):
    """
    RFC 3207 4.2: a login made in plaintext (insecure AUTH allowed) is
    forgotten by STARTTLS: session.authenticated is False, MAIL needs AUTH
    again (530), and AUTH is not "already authenticated" (503).
    """
    server = makeServer(allowInsecureAuth=True, requireAuth=True, authFailureDelay=0)
    server.onLogin = lambda s: (s.username, s.password) == ("alice", "s3cret")
    options = tlsOptions(certificateAuthority)
    h = session(server, tls=options)
    login = b"AUTH PLAIN " + b64(b"\0alice\0s3cret") + b"\r\n"
    assert h.send(login) == [b"235 2.7.0 Authentication successful"]
    assert h.protocol.session.authenticated is True
    assert h.send(b"STARTTLS\r\n") == [b"220 2.0.0 Ready to start TLS"]
    assert h.protocol.session.authenticated is False
    h.protocol.handshakeCompleted()
    assert h.codes(b"EHLO c\r\n") == [250]
    assert h.codes(b"MAIL FROM:<a@b.test>\r\n") == [530]
    assert h.send(login) == [b"235 2.7.0 Authentication successful"]
    assert h.codes(b"MAIL FROM:<a@b.test>\r\n") == [250]


def test_starttls_without_certificate(server):
    h = session(server)
    assert h.send(b"STARTTLS\r\n") == [b"454 4.7.0 TLS not available"]


# Robustness -----------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=8))
def test_garbage_never_crashes_and_replies_are_well_formed(chunks):
    server = makeServer(maxErrors=1000)
    h = session(server)
    for chunk in chunks:
        h.protocol.dataReceived(chunk)
    h.protocol.dataReceived(b"\r\n.\r\nRSET\r\n")
    for line in h.take():
        assert REPLY.match(line), line
    if not h.transport.disconnecting:
        assert h.codes(b"NOOP\r\n")[-1:] == [250]


_DIALOGUE_LINES = [
    b"EHLO client.test\r\n",
    b"HELO client.test\n",
    b"MAIL FROM:<a@b.test>\r\n",
    b"MAIL FROM:<a@b.test> SIZE=100\r\n",
    b"RCPT TO:<c@d.test>\r\n",
    b"RCPT TO:<refused@d.test>\r\n",
    b"DATA\r\n",
    b"Subject: x\r\n\r\nbody\r\n..stuffed\r\n.\r\n",
    b"RSET\r\n",
    b"NOOP\r\n",
    b"VRFY x\r\n",
    b"\r\n",
    b"x" * 3000 + b"\r\n",
    b"NOOP " + b"y" * 600,
    b"\xff\xfe garbage\r\n",
    b"rcpt to:<e@f.test>\r\n",
]


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.sampled_from(_DIALOGUE_LINES), max_size=14),
    st.lists(st.integers(min_value=1, max_value=40), max_size=30),
)
def test_replies_do_not_depend_on_how_input_is_cut(lines, cuts):
    """
    One line per read (the fast path for a lone command line), and the same
    bytes cut anywhere (the framer), give the same replies.
    """

    def replies(pieces):
        server = makeServer(maxErrors=1000, maxLineLength=512)
        server.onRcptTo = lambda s: not s.address.startswith("refused")
        h = session(server, ehlo=False)
        for piece in pieces:
            h.protocol.dataReceived(piece)
        # Each server has its own random queue-id prefix.
        return [re.sub(rb"queued as \S+", b"queued as ID", line) for line in h.take()]

    stream = b"".join(lines)
    pieces, start = [], 0
    for cut in cuts:
        if start >= len(stream):
            break
        pieces.append(stream[start : start + cut])
        start += cut
    pieces.append(stream[start:])
    assert replies(lines) == replies(pieces)


def test_large_message_spooled_to_a_file():
    server = makeServer(spoolThreshold=10_000)
    seen = {}

    def onReceive(s):
        f = s.msgFile
        seen["isMemory"] = type(f).__name__ == "BytesIO"
        seen["head"] = f.read(9)
        seen["loadedBefore"] = s._msg is not None
        seen["msg"] = s.msg
        seen["file"] = f

    server.onReceive = onReceive
    h = session(server)
    h.send(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\n")
    body = b"".join(b"line %06d\r\n" % i for i in range(5000))
    for i in range(0, len(body), 4096):
        assert h.send(body[i : i + 4096]) == []
    assert h.codes(b".\r\n") == [250]
    assert seen["isMemory"] is False and seen["loadedBefore"] is False
    assert seen["head"] == b"Received:"
    assert seen["msg"].endswith(body) and len(seen["msg"]) < len(body) + 300
    assert seen["file"].closed  # released once the transaction ends


def test_small_message_msgFile_is_a_view():
    server = makeServer()
    seen = []
    server.onReceive = lambda s: seen.append(s.msgFile.read() == s.msg)
    h = session(server)
    assert h.codes(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\nhi\r\n.\r\n") == [250, 250, 354, 250]
    assert seen == [True]


def test_disconnect_from_a_handler_answers_421_not_the_decision(server):
    server.onRcptTo = lambda s: s.disconnect()
    h = session(server)
    h.send(b"MAIL FROM:<a@b.test>\r\n")
    assert h.send(b"RCPT TO:<c@d.test>\r\nDATA\r\n") == [b"421 4.7.0 mx.test Closing connection"]
    assert h.transport.disconnecting


def test_disconnect_while_a_deferred_is_pending(server):
    pending = Deferred()

    def onMailFrom(s):
        s.disconnect()
        return pending

    server.onMailFrom = onMailFrom
    h = session(server)
    assert h.send(b"MAIL FROM:<a@b.test>\r\n") == []
    pending.callback(True)
    assert h.take() == [b"421 4.7.0 mx.test Closing connection"]


def test_closing_connection_is_cut_off_after_a_grace():
    clock = MemoryReactorClock()
    h = session(makeServer(reactor=clock))
    h.send(b"QUIT\r\n")
    assert h.transport.disconnecting and not h.transport.aborted
    clock.advance(9)
    assert not h.transport.aborted
    clock.advance(2)
    assert h.transport.aborted


def test_aSessionsAttributesFitOneDictTable():
    """
    A served session's protocol keeps at most 42 instance attributes, what
    CPython's 64-slot dict holds before it resizes: one more and every
    connection pays a resize (callgrind: about 1 % of a connection per
    message when Twisted's nine ESMTP attributes were still set).  Merge
    state before adding an attribute.
    """
    server = makeServer(receivedHeader=False)
    server.onReceive = lambda s: True
    h = session(server)
    h.send(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\nx\r\n.\r\n")
    assert len(vars(h.protocol)) <= 42, sorted(vars(h.protocol))
    assert "mode" not in vars(h.protocol) and "challengers" not in vars(h.protocol)

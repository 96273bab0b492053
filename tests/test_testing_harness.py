"""
The public handler harness (issue 13 item 2): ServerHarness and
makeSession, as a user testing a handler's policy meets them.  (The
protocol tests themselves run on the same harness: test_protocol.py.)
"""

from __future__ import annotations

from email.message import EmailMessage

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock

from infsmtp import Server, SMTPError
from infsmtp.testing import DetachedSession, MemoryTransport, ServerHarness, makeSession


def test_a_harness_made_from_options_and_handlers():
    seen = []
    h = ServerHarness(maxRecipients=1, onMailFrom=lambda s: seen.append(s.address))
    assert h.take() == [b"220 mx.test ESMTP infsmtp"]
    assert h.ehlo("client.test")[0] == b"250-mx.test Hello 192.0.2.7"
    assert h.session.helo == "client.test"
    assert h.reply("MAIL FROM:<a@b.test>") == (250, "2.1.0 Sender OK")
    assert seen == ["a@b.test"]
    assert h.codes(b"RCPT TO:<x@y.test>\r\nRCPT TO:<z@y.test>\r\n") == [250, 452]
    assert isinstance(h.transport, MemoryTransport) and h.transport.writes >= 4


def test_a_handler_answering_later_and_the_clock():
    answer = Deferred()
    h = ServerHarness(onRcptTo=lambda s: answer, handlerTimeout=10)
    h.ehlo()
    h.send("MAIL FROM:<a@b.test>")
    assert h.send("RCPT TO:<x@y.test>") == []  # still deciding
    with pytest.raises(AssertionError, match="no reply"):
        h.reply("NOOP")  # waits behind the RCPT
    answer.callback(False)
    assert h.take() == [b"550 5.7.1 Recipient address rejected", b"250 2.0.0 OK"]
    late = ServerHarness(onRcptTo=lambda s: Deferred(), handlerTimeout=10)
    late.ehlo()
    late.send("MAIL FROM:<a@b.test>")
    late.send("RCPT TO:<x@y.test>")
    late.clock.advance(10)
    assert late.take() == [b"451 4.3.0 Temporary failure, try again later"]


def test_reply_joins_a_multiline_reply():
    def onRcptTo(session):
        raise SMTPError(550, "5.1.1 No such user\n5.1.1 Try another")

    h = ServerHarness(onRcptTo=onRcptTo)
    h.ehlo()
    h.send("MAIL FROM:<a@b.test>")
    assert h.reply("RCPT TO:<x@y.test>") == (550, "5.1.1 No such user\n5.1.1 Try another")


def test_a_server_of_ones_own_and_a_peer():
    server = Server(hostname="mx.example", reactor=MemoryReactorClock())
    server.onConnect = lambda s: s.ip.startswith("2001:db8:")
    h = ServerHarness(server, peer=("2001:db8::7", 2525))
    assert h.take() == [b"220 mx.example ESMTP infsmtp"]
    assert (h.session.ip, h.session.port) == ("2001:db8::7", 2525)
    assert h.clock is server._reactor
    refused = ServerHarness(server)
    assert refused.take() == [b"554 5.7.1 No SMTP service here"]
    with pytest.raises(TypeError, match="either a server or the options"):
        ServerHarness(server, maxRecipients=3)


def test_lose_runs_ondisconnect():
    gone = []
    h = ServerHarness(onDisconnect=lambda s: gone.append(s.id))
    h.lose()
    assert gone == [h.session.id]


def test_makesession_fields_and_message_forms():
    session = makeSession(mailFrom="a@b.test", rcptTo=("x@y.test",), authenticated=True, username="u", secure=True)
    assert isinstance(session, DetachedSession)
    assert (session.mailFrom, session.rcptTo, session.authenticated, session.username) == ("a@b.test", ["x@y.test"], True, "u")
    assert (session.secure, session.tlsVersion, session.ip) == (True, "TLSv1.3", "192.0.2.7")
    assert makeSession(message="Subject: s\n\nbody\n").msg == b"Subject: s\r\n\r\nbody\r\n"
    assert makeSession(message=b"Subject: s\r\n\r\nb\r\n").message["Subject"] == "s"
    built = EmailMessage()
    built["Subject"] = "built"
    built.set_content("x")
    assert makeSession(message=built).message["Subject"] == "built"
    assert makeSession().msg == b""
    session.disconnect()
    assert session.disconnected is True
    with pytest.raises(AttributeError):
        session.accepted = False  # still a Session: a misspelt decision fails

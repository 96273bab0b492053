"""
The testing kit's recording server (issue 13 item 1), through the smtpd
fixture as a Twisted project's tests use it: this suite runs under
pytest-twisted, so the server runs in the test's own reactor and the
application under test (smtplib here, as most applications send) runs in a
thread (deferToThread).  The plain synchronous form, where crochet runs the
reactor, is exercised in separate pytest runs: test_testing_plugin.py.
"""

from __future__ import annotations

import smtplib
import ssl
import threading
import time

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.threads import deferToThread

from infsmtp import AsyncClient, AuthMode, EncryptMode
from infsmtp.testing import MessageWaitTimeout, ReceivedMessage, RecordingServer

WELCOME = b"From: app@example.org\r\nTo: alice@example.net\r\nSubject: Welcome\r\n\r\nHello Alice.\r\n"

#: Bound on each blocking client call (seconds).
BOUND = 10


def message(subject: str) -> bytes:
    return f"From: app@example.org\r\nSubject: {subject}\r\n\r\nbody of {subject}\r\n".encode()


def sendWith(smtpd, *, starttls=False, implicit=False, context=None, login=None, messages=(), ehlo="app.test"):
    """
    In a thread: one smtplib session sending C{messages} (sender,
    recipients, bytes) in order; what each sendmail returned or raised.
    """

    def run():
        outcomes = []
        factory = smtplib.SMTP_SSL if implicit else smtplib.SMTP
        kwargs = {"context": context} if implicit else {}
        with factory(smtpd.host, smtpd.port, local_hostname=ehlo, timeout=BOUND, **kwargs) as client:
            if starttls:
                client.starttls(context=context)
            if login:
                client.login(*login)
            for sender, recipients, data in messages:
                try:
                    outcomes.append(client.sendmail(sender, recipients, data))
                except (smtplib.SMTPException, OSError) as e:
                    outcomes.append(e)
                    if isinstance(e, smtplib.SMTPServerDisconnected):
                        break
        return outcomes

    return deferToThread(run)


def sendOne(smtpd, sender="app@example.org", recipients=("alice@example.net",), data=WELCOME, **kw):
    return sendWith(smtpd, messages=[(sender, list(recipients), data)], **kw)


# Plain ----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_plain_message_with_its_envelope(smtpd):
    assert smtpd.host == "127.0.0.1" and smtpd.port > 0
    assert await sendOne(smtpd, recipients=["alice@example.net", "Bob@Example.NET"]) == [{}]
    [received] = smtpd.messages
    assert isinstance(received, ReceivedMessage)
    assert received["Subject"] == "Welcome"
    assert received.get_content() == "Hello Alice.\n"
    assert received.mailFrom == "app@example.org"
    assert received.rcptTo == ["alice@example.net", "Bob@Example.NET"]
    assert received.peer[0] == "127.0.0.1" and received.peer[1] > 0
    assert received.helo == "app.test"
    assert received.tls is None and received.user is None
    # As sent: no trace header of ours in front.
    assert received.raw == WELCOME


@pytest_twisted.ensureDeferred
async def test_clear_forgets_the_messages_received(smtpd):
    await sendWith(smtpd, messages=[("a@example.org", ["b@example.net"], message(s)) for s in ("one", "two")])
    assert [m["Subject"] for m in smtpd.messages] == ["one", "two"]
    smtpd.clear()
    assert smtpd.messages == []
    await sendOne(smtpd, data=message("three"))
    assert [m["Subject"] for m in smtpd.messages] == ["three"]


@pytest_twisted.ensureDeferred
async def test_asyncclient_is_a_client_too(smtpd):
    client = AsyncClient(host=smtpd.host, port=smtpd.port)
    await client.connect()
    try:
        await client.sendmail("app@example.org", ["alice@example.net"], WELCOME)
    finally:
        await client.disconnect()
    assert [(m.mailFrom, m.rcptTo, m["Subject"]) for m in smtpd.messages] == [
        ("app@example.org", ["alice@example.net"], "Welcome")
    ]


@pytest.mark.smtpd(maxMessageSize=2000)
@pytest_twisted.ensureDeferred
async def test_size_limit(smtpd):
    [small] = await sendOne(smtpd, data=message("small"))
    [big] = await sendOne(smtpd, data=message("big") + b"x" * 2000 + b"\r\n")
    assert small == {}
    assert isinstance(big, smtplib.SMTPException) and big.smtp_code == 552
    assert [m["Subject"] for m in smtpd.messages] == ["small"]


# TLS ----------------------------------------------------------------------------


@pytest.mark.smtpd(tls="starttls")
@pytest_twisted.ensureDeferred
async def test_starttls_with_the_throwaway_ca(smtpd):
    with open(smtpd.caFile) as f:
        assert "BEGIN CERTIFICATE" in f.read()
    context = ssl.create_default_context(cafile=smtpd.caFile)
    assert await sendOne(smtpd, starttls=True, context=context) == [{}]
    assert smtpd.messages[0].tls in ("TLSv1.2", "TLSv1.3")
    # The CA is what makes it verify: the system's trust does not.
    with pytest.raises(ssl.SSLCertVerificationError):
        await sendOne(smtpd, starttls=True, context=ssl.create_default_context())
    assert len(smtpd.messages) == 1


@pytest.mark.smtpd(tls="implicit")
@pytest_twisted.ensureDeferred
async def test_implicit_tls(smtpd):
    assert await sendOne(smtpd, implicit=True, context=smtpd.sslContext()) == [{}]
    assert smtpd.messages[0].tls in ("TLSv1.2", "TLSv1.3")


@pytest_twisted.ensureDeferred
async def test_plaintext_server_has_no_ca(smtpd):
    assert smtpd.caFile is None
    with pytest.raises(ValueError, match="no TLS"):
        smtpd.sslContext()


# AUTH --------------------------------------------------------------------------


@pytest.mark.smtpd(users={"app": "secret"}, requireAuth=True)
@pytest_twisted.ensureDeferred
async def test_auth_with_given_users(smtpd):
    assert await sendOne(smtpd, login=("app", "secret")) == [{}]
    assert smtpd.messages[0].user == "app"
    with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
        await sendOne(smtpd, login=("app", "wrong"))
    assert refused.value.smtp_code == 535
    # requireAuth: no login, no mail.
    [outcome] = await sendOne(smtpd)
    assert isinstance(outcome, smtplib.SMTPSenderRefused) and outcome.smtp_code == 530
    assert len(smtpd.messages) == 1


@pytest.mark.smtpd(tls="starttls", users={"app": "secret"})
@pytest_twisted.ensureDeferred
async def test_auth_over_starttls_only_when_tls_is_on(smtpd):
    assert await sendOne(smtpd, starttls=True, context=smtpd.sslContext(), login=("app", "secret")) == [{}]
    assert (smtpd.messages[0].user, smtpd.messages[0].tls is not None) == ("app", True)
    with pytest.raises(smtplib.SMTPNotSupportedError):
        await sendOne(smtpd, login=("app", "secret"))


@pytest_twisted.ensureDeferred
async def test_asyncclient_login_and_starttls():
    smtpd = RecordingServer(tls="starttls", users={"u": "p"})
    await smtpd.startListening()
    try:
        client = AsyncClient(host=smtpd.host, port=smtpd.port, encryptMode=EncryptMode.startTls,
                             caCertFile=smtpd.caFile, authMode=AuthMode.default, username="u", password="p")
        await client.connect()
        assert await client.authenticate() is True
        await client.sendmail("app@example.org", ["alice@example.net"], WELCOME)
        await client.disconnect()
    finally:
        await smtpd.stopListening()
    assert smtpd.messages[0].user == "u" and smtpd.messages[0].tls is not None


# Handlers -----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_handler_set_on_smtpd_decides(smtpd):
    smtpd.onRcptTo = lambda session: session.address.endswith("@example.net")
    [refused] = await sendOne(smtpd, recipients=["alice@example.net", "eve@elsewhere.test"])
    assert refused == {"eve@elsewhere.test": (550, b"5.7.1 Recipient address rejected")}
    assert smtpd.messages[0].rcptTo == ["alice@example.net"]


@pytest_twisted.ensureDeferred
async def test_an_onreceive_refusal_is_not_recorded(smtpd):
    smtpd.onReceive = lambda session: b"spam" not in session.msg
    [accepted, refused] = await sendWith(
        smtpd, messages=[("a@example.org", ["b@example.net"], message("ham")), ("a@example.org", ["b@example.net"], message("spam"))]
    )
    assert accepted == {}
    assert isinstance(refused, smtplib.SMTPDataError) and refused.smtp_code == 554
    assert [m["Subject"] for m in smtpd.messages] == ["ham"]


# Faults on purpose ------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_fail_one_recipient(smtpd):
    smtpd.fail("RCPT", "X@y.test", 550)
    [refused] = await sendOne(smtpd, recipients=["x@Y.test", "alice@example.net"])
    assert refused == {"x@Y.test": (550, b"5.0.0 Deliberate failure of RCPT (infsmtp.testing)")}
    assert smtpd.messages[0].rcptTo == ["alice@example.net"]


@pytest_twisted.ensureDeferred
async def test_fail_data_twice_then_accept_for_a_retry(smtpd):
    smtpd.fail("DATA", code=451, text="4.3.0 Try later", times=2)
    outcomes = await sendWith(smtpd, messages=[("a@example.org", ["b@example.net"], message(s)) for s in "123"])
    assert [getattr(o, "smtp_code", o) for o in outcomes] == [451, 451, {}]
    assert outcomes[0].smtp_error == b"4.3.0 Try later"
    assert [m["Subject"] for m in smtpd.messages] == ["3"]


@pytest_twisted.ensureDeferred
async def test_fail_sender_only_for_that_address(smtpd):
    smtpd.fail("MAIL", "bounce@example.org", 553)
    outcomes = await sendWith(
        smtpd, messages=[("bounce@example.org", ["b@example.net"], message("x")), ("ok@example.org", ["b@example.net"], message("y"))]
    )
    assert [getattr(o, "smtp_code", o) for o in outcomes] == [553, {}]
    assert [m.mailFrom for m in smtpd.messages] == ["ok@example.org"]


@pytest_twisted.ensureDeferred
async def test_fail_connect_with_421(smtpd):
    smtpd.fail("CONNECT", code=421, times=1)
    with pytest.raises(smtplib.SMTPConnectError) as refused:
        await sendOne(smtpd)
    assert refused.value.smtp_code == 421
    assert await sendOne(smtpd) == [{}]


@pytest.mark.smtpd(users={"app": "secret"})
@pytest_twisted.ensureDeferred
async def test_fail_auth_temporarily(smtpd):
    smtpd.fail("AUTH", code=454)
    with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
        await sendOne(smtpd, login=("app", "secret"))
    assert refused.value.smtp_code == 454
    smtpd.clearFaults()
    assert await sendOne(smtpd, login=("app", "secret")) == [{}]


@pytest_twisted.ensureDeferred
async def test_fail_after_n_messages_per_session(smtpd):
    smtpd.failAfter(2)
    outcomes = await sendWith(smtpd, messages=[("a@example.org", ["b@example.net"], message(s)) for s in "1234"])
    # The third MAIL is answered 421 and the session closes, as a server
    # limiting messages per connection does.
    assert outcomes[:2] == [{}, {}]
    assert isinstance(outcomes[2], (smtplib.SMTPSenderRefused, smtplib.SMTPServerDisconnected))
    assert getattr(outcomes[2], "smtp_code", 421) == 421
    assert [m["Subject"] for m in smtpd.messages] == ["1", "2"]
    # A new session may send two more.
    assert await sendOne(smtpd, data=message("5")) == [{}]


@pytest_twisted.ensureDeferred
async def test_disconnect_in_the_middle_of_data(smtpd):
    smtpd.disconnectDuring("DATA", times=1)
    [cut] = await sendOne(smtpd, data=message("lost"))
    assert isinstance(cut, smtplib.SMTPServerDisconnected)
    assert smtpd.messages == []
    assert await sendOne(smtpd, data=message("retried")) == [{}]
    assert [m["Subject"] for m in smtpd.messages] == ["retried"]


@pytest_twisted.ensureDeferred
async def test_disconnect_at_a_command(smtpd):
    smtpd.disconnectDuring("RCPT", times=1)
    [cut] = await sendOne(smtpd)
    assert isinstance(cut, smtplib.SMTPServerDisconnected)
    assert smtpd.messages == []


@pytest_twisted.ensureDeferred
async def test_delay_answers_late(smtpd):
    smtpd.delay("RCPT", 0.4, times=1)
    began = time.monotonic()
    assert await sendOne(smtpd) == [{}]
    assert time.monotonic() - began >= 0.4
    began = time.monotonic()
    assert await sendOne(smtpd) == [{}]
    assert time.monotonic() - began < 0.4


@pytest.mark.smtpd(handlerTimeout=0.2)
@pytest_twisted.ensureDeferred
async def test_a_delay_past_the_handler_deadline_is_a_451(smtpd):
    smtpd.delay("MAIL", 30)
    [late] = await sendOne(smtpd)
    assert isinstance(late, smtplib.SMTPSenderRefused) and late.smtp_code == 451


def test_fault_arguments_are_checked():
    smtpd = RecordingServer()
    with pytest.raises(ValueError, match="command must be one of"):
        smtpd.fail("RCTP")
    with pytest.raises(ValueError, match="4xx or 5xx"):
        smtpd.fail("RCPT", code=250)
    with pytest.raises(ValueError, match="times"):
        smtpd.fail("RCPT", times=0)
    with pytest.raises(ValueError, match="AUTH is not offered"):
        smtpd.fail("AUTH")
    with pytest.raises(ValueError, match="seconds"):
        smtpd.delay("MAIL", -1)
    with pytest.raises(ValueError, match="tls must be"):
        RecordingServer(tls="yes")


# waitFor ---------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_waitfor_in_the_reactor_is_a_deferred(smtpd):
    sending = sendWith(smtpd, messages=[("a@example.org", ["b@example.net"], message(s)) for s in ("one", "two")])
    both = await smtpd.waitFor(2)
    assert [m["Subject"] for m in both] == ["one", "two"]
    two = await smtpd.waitFor(lambda m: m["Subject"] == "two")
    assert two is smtpd.messages[1]
    await sending


@pytest_twisted.ensureDeferred
async def test_waitfor_times_out_saying_what_arrived(smtpd):
    await sendOne(smtpd)
    with pytest.raises(MessageWaitTimeout) as timedOut:
        await smtpd.waitFor(2, timeout=0.2)
    assert str(timedOut.value) == (
        "waited 0.2 s for 2 messages; 1 arrived:\n  <app@example.org> -> <alice@example.net>: Welcome"
    )
    assert isinstance(timedOut.value, AssertionError)


@pytest_twisted.ensureDeferred
async def test_waitfor_blocks_in_a_thread(smtpd):
    """
    From a thread (a synchronous test's, or the application's), waitFor
    blocks until a message sent in the background arrives.
    """

    def application():
        background = threading.Thread(target=lambda: smtplib.SMTP(smtpd.host, smtpd.port, timeout=BOUND).sendmail(
            "a@example.org", ["b@example.net"], message("background")))
        background.start()
        try:
            return smtpd.waitFor(lambda m: m["Subject"] == "background", timeout=BOUND)
        finally:
            background.join(BOUND)

    found = await deferToThread(application)
    assert found.rcptTo == ["b@example.net"]

    def tooLate():
        began = time.monotonic()
        try:
            smtpd.waitFor(5, timeout=0.2)
        except MessageWaitTimeout as e:
            return str(e), time.monotonic() - began
        return None, 0

    text, waited = await deferToThread(tooLate)
    assert text.startswith("waited 0.2 s for 5 messages; 1 arrived:") and 0.2 <= waited < 5


@pytest_twisted.ensureDeferred
async def test_stopping_fails_a_waitfor_still_waiting():
    smtpd = RecordingServer()
    await smtpd.startListening()
    waiting = smtpd.waitFor(1, timeout=30)
    await smtpd.stopListening()
    with pytest.raises(MessageWaitTimeout, match="the server stopped while waiting for 1 message"):
        await waiting
    # Its timer went with it.
    assert [c for c in reactor.getDelayedCalls() if c.func == smtpd._waitExpired] == []

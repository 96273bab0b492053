"""
Issue 14, item 5 over real sockets with clients we did not write: smtplib
against requireStartTls and the banner, a raw socket that talks before the
greeting, swaks against an onEhlo that withdraws AUTH, smtplib's VRFY
against onVrfy.  (The timing logic itself is tested with a fake clock in
tests/test_policy.py.)
"""

from __future__ import annotations

import smtplib
import ssl

import pytest
import pytest_twisted
from conftest import RawClient, inThread
from peertools import requireTool
from test_tools import run

MESSAGE = b"From: a@example.org\r\nTo: b@example.net\r\nSubject: policy\r\n\r\nHello.\r\n"


@pytest_twisted.ensureDeferred
async def test_smtplib_mail_before_starttls_is_530_then_after_it_delivered(serve, recorder, certificateAuthority):
    server = await serve(tls=True, requireStartTls=True, banner="Submission only, TLS please")
    context = ssl.create_default_context(cafile=certificateAuthority.certFile)

    def client():
        with smtplib.SMTP(timeout=10) as smtp:
            greeting = smtp.connect("127.0.0.1", server.port)
            smtp._host = "localhost"  # the name STARTTLS verifies (connect() does not set it)
            smtp.ehlo("client.test")
            with pytest.raises(smtplib.SMTPSenderRefused) as refused:
                smtp.sendmail("a@example.org", ["b@example.net"], MESSAGE)
            smtp.starttls(context=context)
            smtp.ehlo("client.test")
            return greeting, refused.value, smtp.sendmail("a@example.org", ["b@example.net"], MESSAGE)

    greeting, refused, afterTls = await inThread(client)
    assert greeting == (220, b"mx.interop.test Submission only, TLS please")
    assert (refused.smtp_code, refused.smtp_error) == (530, b"5.7.0 Must issue a STARTTLS command first")
    assert afterTls == {}
    await recorder.waitReceived(1)
    assert [(m["mailFrom"], m["secure"]) for m in recorder.received] == [("a@example.org", True)]


@pytest_twisted.ensureDeferred
async def test_smtplib_over_implicit_tls_is_secure_already(serve, recorder, certificateAuthority):
    server = await serve(tls=True, implicitTls=True, requireStartTls=True)
    context = ssl.create_default_context(cafile=certificateAuthority.certFile)

    def client():
        with smtplib.SMTP_SSL("127.0.0.1", server.port, context=context, timeout=10) as smtp:
            return smtp.sendmail("a@example.org", ["b@example.net"], MESSAGE)

    assert await inThread(client) == {}
    await recorder.waitReceived(1)


@pytest_twisted.ensureDeferred
async def test_a_raw_client_that_talks_first_gets_554_and_the_close(serve, recorder):
    # The delay is long, and the test does not wait for it: the bytes are
    # on the wire long before the 220 could be.
    server = await serve(greetDelay=15)

    def talker():
        client = RawClient(server.port)
        try:
            client.send(b"EHLO bot.test\r\n")
            return client.repliesToEnd()
        finally:
            client.close()

    replies = await inThread(talker)
    assert [(r.code, r.text) for r in replies] == [(554, "5.5.1 Protocol error: talked before the greeting")]
    await recorder.waitDisconnects(1)
    assert recorder.connects == []
    assert server.sessionCount == 0


@pytest_twisted.ensureDeferred
async def test_a_raw_client_that_waits_is_greeted_and_served(serve, recorder):
    server = await serve(greetDelay=0.3)

    def waiter():
        client = RawClient(server.port)
        try:
            greeting = client.reply()
            client.expect("EHLO patient.test", 250)
            client.expect("QUIT", 221)
            return greeting
        finally:
            client.close()

    greeting = await inThread(waiter)
    assert (greeting.code, greeting.text) == (220, "mx.interop.test ESMTP infsmtp")
    await recorder.waitDisconnects(1)
    assert len(recorder.connects) == 1


def withdrawAuth(session):
    if session.helo.endswith(".untrusted.test"):
        del session.extensions["AUTH"]


def login(session):
    session.authenticated = (session.username, session.password) == ("tool-user", "tool-pass")


@pytest_twisted.ensureDeferred
async def test_swaks_onEhlo_withdraws_auth_from_one_client(serve, recorder):
    swaks = requireTool("swaks")
    server = await serve(allowInsecureAuth=True, authFailureDelay=0,
                         handlers={"onLogin": login, "onEhlo": withdrawAuth})
    base = [
        swaks, "--server", "127.0.0.1", "--port", str(server.port), "--from", "a@example.org",
        "--to", "b@example.net", "--auth", "PLAIN", "--auth-user", "tool-user", "--auth-password", "tool-pass",
    ]
    trusted = await run(base + ["--helo", "mua.trusted.test"])
    out = trusted.stdout.decode()
    assert trusted.returncode == 0, out
    assert "<-  250 AUTH PLAIN LOGIN" in out and "<-  235 2.7.0 Authentication successful" in out
    untrusted = await run(base + ["--helo", "bot.untrusted.test"])
    out = untrusted.stdout.decode()
    # swaks gives up before MAIL (its status 28: no AUTH offered).
    assert untrusted.returncode == 28, out
    assert "<-  250 CHUNKING" in out and "AUTH" not in out
    assert "Host did not advertise authentication" in untrusted.stderr.decode()
    assert len(recorder.received) == 1


@pytest_twisted.ensureDeferred
async def test_smtplib_vrfy_asks_onVrfy(serve):
    server = await serve(handlers={"onVrfy": lambda s: s.address == "ann@example.org"})

    def client():
        with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as smtp:
            return smtp.verify("ann@example.org"), smtp.verify("eve@example.org")

    known, unknown = await inThread(client)
    assert known == (250, b"2.1.5 <ann@example.org>")
    assert unknown == (550, b"5.1.1 <eve@example.org>: User unknown")


"""
Interop with Python's smtplib, a client we did not write: plain, STARTTLS,
implicit TLS, AUTH PLAIN and LOGIN, SMTPUTF8, SIZE, pipelined sessions.
"""

from __future__ import annotations

import email.message
import email.policy
import smtplib
import ssl

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.threads import deferToThread

HOSTNAME = "mx.interop.test"  # the serve fixture's default

MESSAGE = (
    b"From: Alice <alice@example.org>\r\n"
    b"To: Bob <bob@example.net>\r\n"
    b"Subject: smtplib\r\n"
    b"\r\n"
    b"Hello Bob.\r\n"
)


def inThread(fn, *args):
    return deferToThread(fn, *args).addTimeout(60, reactor)


def _context(certificateAuthority) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=certificateAuthority.certFile)


def _body(received: dict) -> bytes:
    """
    C{session.msg} without the one C{Received:} trace header in front.
    """
    msg = received["msg"]
    assert msg.startswith(b"Received: from ")
    end = msg.index(b"\r\n", msg.index(b"; "))
    return msg[end + 2 :]


@pytest_twisted.ensureDeferred
async def test_plain_sendmail_delivers_exact_bytes(serve, recorder):
    """
    A plain session: EHLO lists the extensions, and the message reaches
    onReceive dot-unstuffed, CRLF, after exactly one Received: header.
    """
    server = await serve()
    body = (
        b"From: alice@example.org\r\n"
        b"To: bob@example.net, carol@example.net\r\n"
        b"Subject: dots\r\n"
        b"\r\n"
        b".leading dot\r\n"
        b"..two dots\r\n"
        b".\r\n"
        b"last line\r\n"
    )

    def run():
        with smtplib.SMTP("127.0.0.1", server.port, local_hostname="client.test", timeout=10) as client:
            code, _ = client.ehlo()
            assert code == 250
            features = dict(client.esmtp_features)
            refused = client.sendmail("alice@example.org", ["bob@example.net", "carol@example.net"], body)
            return features, refused

    features, refused = await inThread(run)
    assert refused == {}
    for name in ("pipelining", "size", "8bitmime", "enhancedstatuscodes", "smtputf8"):
        assert name in features, features
    assert "starttls" not in features
    assert "auth" not in features
    assert features["size"] == str(server.maxMessageSize)
    assert len(recorder.received) == 1
    got = recorder.received[0]
    assert got["mailFrom"] == "alice@example.org"
    assert got["rcptTo"] == ["bob@example.net", "carol@example.net"]
    assert got["helo"] == "client.test"
    assert got["secure"] is False
    assert _body(got) == body
    assert got["msg"].count(b"Received: ") == 1
    assert f"by {HOSTNAME} (infsmtp) with ESMTP".encode() in got["msg"]


@pytest_twisted.ensureDeferred
async def test_several_messages_one_session_and_helo(serve, recorder):
    """
    Several transactions on one connection, RSET between them, and a HELO
    (not EHLO) client.
    """
    server = await serve()

    def run():
        with smtplib.SMTP("127.0.0.1", server.port, local_hostname="client.test", timeout=10) as client:
            for n in range(3):
                client.sendmail("a@example.org", [f"r{n}@example.net"], MESSAGE + b"n=%d\r\n" % n)
                assert client.rset()[0] == 250
            assert client.noop()[0] == 250
            assert client.verify("someone")[0] == 252
            assert b"Commands:" in client.help()
        with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
            assert client.helo("old.client.test")[0] == 250
            client.sendmail("a@example.org", ["helo@example.net"], MESSAGE)

    await inThread(run)
    assert [r["rcptTo"] for r in recorder.received] == [["r0@example.net"], ["r1@example.net"], ["r2@example.net"], ["helo@example.net"]]
    assert [_body(r).endswith(b"n=%d\r\n" % n) for n, r in enumerate(recorder.received[:3])] == [True] * 3
    assert len({r["id"] for r in recorder.received[:3]}) == 1
    assert b"with SMTP" in recorder.received[3]["msg"]


@pytest_twisted.ensureDeferred
async def test_starttls(serve, recorder, certificateAuthority):
    """
    STARTTLS with certificate verification; after it, EHLO no longer lists
    STARTTLS and the session is secure.
    """
    server = await serve(tls=True)

    def run():
        with smtplib.SMTP("127.0.0.1", server.port, local_hostname="client.test", timeout=10) as client:
            client.ehlo()
            assert client.has_extn("starttls")
            code, _ = client.starttls(context=_context(certificateAuthority))
            assert code == 220
            client.ehlo()
            after = dict(client.esmtp_features)
            client.sendmail("alice@example.org", ["bob@example.net"], MESSAGE)
            return after, client.sock.version()

    after, version = await inThread(run)
    assert "starttls" not in after
    assert version in ("TLSv1.2", "TLSv1.3")
    got = recorder.received[0]
    assert got["secure"] is True
    assert got["tlsVersion"] == version
    assert b"with ESMTPS" in got["msg"]


@pytest_twisted.ensureDeferred
async def test_implicit_tls(serve, recorder, certificateAuthority):
    server = await serve(tls=True, implicitTls=True)

    def run():
        with smtplib.SMTP_SSL(
            "127.0.0.1", server.port, local_hostname="client.test", timeout=10, context=_context(certificateAuthority)
        ) as client:
            client.ehlo()
            assert not client.has_extn("starttls")
            client.sendmail("alice@example.org", ["bob@example.net"], MESSAGE)

    await inThread(run)
    assert recorder.received[0]["secure"] is True
    assert recorder.received[0]["tlsVersion"].startswith("TLSv1.")


def _login(session):
    session.authenticated = session.username == "user@example.org" and session.password == "s3cret pass-word"


@pytest_twisted.ensureDeferred
async def test_auth_plain_and_login_after_starttls(serve, recorder, certificateAuthority):
    """
    AUTH is offered only after STARTTLS, and smtplib logs in with PLAIN and
    with LOGIN (with and without an initial response); a wrong password is
    535.
    """
    server = await serve(tls=True, handlers={"onLogin": _login})
    ctx = _context(certificateAuthority)

    def session(mechanism, initialResponse, password="s3cret pass-word"):
        with smtplib.SMTP("127.0.0.1", server.port, local_hostname="client.test", timeout=10) as client:
            client.ehlo()
            assert not client.has_extn("auth")
            client.starttls(context=ctx)
            client.ehlo()
            assert client.esmtp_features["auth"].split() == ["PLAIN", "LOGIN"]
            client.user, client.password = "user@example.org", password
            authobject = getattr(client, "auth_" + mechanism.lower())
            try:
                code, _ = client.auth(mechanism, authobject, initial_response_ok=initialResponse)
            except smtplib.SMTPAuthenticationError as e:
                return e.smtp_code, e.smtp_error
            client.sendmail("user@example.org", ["bob@example.net"], MESSAGE)
            return code, b""

    for mechanism in ("PLAIN", "LOGIN"):
        for initial in (True, False):
            code, _ = await inThread(session, mechanism, initial)
            assert code == 235, (mechanism, initial)
    code, text = await inThread(session, "PLAIN", True, "wrong")
    assert code == 535 and text.startswith(b"5.7.8"), text
    code, text = await inThread(session, "LOGIN", False, "wrong")
    assert code == 535 and text.startswith(b"5.7.8"), text
    assert len(recorder.received) == 4
    for got in recorder.received:
        assert got["authenticated"] is True
        assert got["username"] == "user@example.org"
        assert b"with ESMTPSA" in got["msg"]


@pytest_twisted.ensureDeferred
async def test_login_method_and_implicit_tls_auth(serve, recorder, certificateAuthority):
    """
    smtplib's own SMTP.login() (its mechanism choice) over implicit TLS.
    """
    server = await serve(tls=True, implicitTls=True, handlers={"onLogin": _login})

    def run():
        with smtplib.SMTP_SSL("127.0.0.1", server.port, timeout=10, context=_context(certificateAuthority)) as client:
            code, _ = client.login("user@example.org", "s3cret pass-word")
            client.sendmail("user@example.org", ["bob@example.net"], MESSAGE)
            return code

    assert await inThread(run) == 235
    assert recorder.received[0]["username"] == "user@example.org"


@pytest_twisted.ensureDeferred
async def test_smtputf8(serve, recorder):
    """
    send_message with internationalised addresses uses SMTPUTF8 and
    BODY=8BITMIME; the server takes the addresses as UTF-8 text.
    """
    server = await serve()
    message = email.message.EmailMessage(policy=email.policy.SMTPUTF8)
    message["From"] = "Jörg <jörg@exämple.test>"
    message["To"] = "Zoë <zoë@例え.jp>"
    message["Subject"] = "Grüße"
    message.set_content("Ünïcödé body\n", cte="8bit")

    def run():
        with smtplib.SMTP("127.0.0.1", server.port, local_hostname="client.test", timeout=10) as client:
            return client.send_message(message)

    assert await inThread(run) == {}
    got = recorder.received[0]
    assert got["mailFrom"] == "jörg@exämple.test"
    assert got["rcptTo"] == ["zoë@例え.jp"]
    assert "SMTPUTF8" in got["mailParameters"]
    assert got["mailParameters"].get("BODY", "").upper() == "8BITMIME"
    assert b"with UTF8SMTP" in got["msg"]
    body = _body(got)
    assert "Subject: Grüße".encode() in body
    assert "Ünïcödé body".encode() in body


@pytest_twisted.ensureDeferred
async def test_non_ascii_address_without_smtputf8_refused(serve, recorder):
    server = await serve()

    def run():
        with smtplib.SMTP("127.0.0.1", server.port, local_hostname="client.test", timeout=10) as client:
            client.ehlo()
            client.command_encoding = "utf-8"  # smtplib sends UTF-8 only with SMTPUTF8
            return client.docmd("MAIL", "FROM:<jörg@exämple.test>")

    code, text = await inThread(run)
    assert code == 553 and text.startswith(b"5.6.7")
    assert recorder.mailFroms == []


@pytest_twisted.ensureDeferred
async def test_size_parameter(serve, recorder):
    """
    smtplib sends SIZE= when offered: within the limit the message is
    taken, over it MAIL answers 552 5.3.4 and nothing is kept.
    """
    server = await serve(maxMessageSize=10_000)
    small = MESSAGE + b"x" * 1000 + b"\r\n"
    big = MESSAGE + (b"y" * 998 + b"\r\n") * 20

    def run():
        with smtplib.SMTP("127.0.0.1", server.port, local_hostname="client.test", timeout=10) as client:
            client.ehlo()
            assert client.esmtp_features["size"] == "10000"
            client.sendmail("a@example.org", ["b@example.net"], small, mail_options=["BODY=8BITMIME"])
            try:
                client.sendmail("a@example.org", ["b@example.net"], big)
            except smtplib.SMTPSenderRefused as e:
                return e.smtp_code, e.smtp_error
            return None

    code, text = await inThread(run)
    assert code == 552 and text.startswith(b"5.3.4"), text
    assert len(recorder.received) == 1
    assert recorder.received[0]["mailParameters"]["SIZE"] == str(len(small))


@pytest_twisted.ensureDeferred
async def test_refused_recipients_reported(serve, recorder):
    """
    onRcptTo refusing one recipient: smtplib reports it in the refused
    dict and the message goes to the others.
    """

    def onRcptTo(session):
        recorder.rcptTos.append(session.address)
        return not session.address.startswith("nobody@")

    server = await serve(handlers={"onRcptTo": onRcptTo})
    refused = await inThread(
        lambda: smtplib.SMTP("127.0.0.1", server.port, timeout=10).sendmail(
            "a@example.org", ["one@example.net", "nobody@example.net", "two@example.net"], MESSAGE
        )
    )
    assert refused == {"nobody@example.net": (550, b"5.7.1 Recipient address rejected")}
    assert recorder.received[0]["rcptTo"] == ["one@example.net", "two@example.net"]

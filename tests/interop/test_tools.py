"""
Interop with command-line clients we did not write: swaks (pipelining,
STARTTLS, AUTH), curl (SMTP upload), Postfix's smtp-source (load) and
openssl s_client (STARTTLS, implicit TLS, protocol versions).
"""

from __future__ import annotations

import subprocess

import pytest
import pytest_twisted
from peertools import requireTool
from twisted.internet import reactor
from twisted.internet.threads import deferToThread

from infsmtp import TLSVersion

SMTP_SOURCE = "/usr/sbin/smtp-source"


def run(argv: list[str], stdin: bytes = b"", timeout: float = 60) -> subprocess.CompletedProcess:
    """
    Run a tool off the reactor thread (bounded by C{timeout}).
    """
    return deferToThread(
        subprocess.run, argv, input=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout
    ).addTimeout(timeout + 10, reactor)


def need(tool: str) -> str:
    # Skipped on a machine without the peer, but a failure in CI.
    return requireTool(tool)


def login(session):
    session.authenticated = (session.username, session.password) == ("tool-user", "tool-pass")


# swaks ----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
async def test_swaks_pipelining_starttls_auth(serve, recorder, certificateAuthority, mechanism):
    """
    swaks with --pipeline, --tls (verifying the certificate) and AUTH: the
    envelope goes in one pipelined batch and the replies come in order.
    """
    swaks = need("swaks")
    server = await serve(tls=True, handlers={"onLogin": login})
    result = await run(
        [
            swaks, "--server", "127.0.0.1", "--port", str(server.port),
            "--helo", "swaks.client.test",
            "--from", "sender@example.org", "--to", "one@example.net,two@example.net",
            "--pipeline", "--tls", "--tls-verify", "--tls-ca-path", certificateAuthority.certFile,
            "--tls-sni", "localhost",
            "--auth", mechanism, "--auth-user", "tool-user", "--auth-password", "tool-pass",
            "--header", "Subject: swaks " + mechanism,
            "--body", "pipelined body\n.leading dot\n",
        ]
    )
    out = result.stdout.decode()
    assert result.returncode == 0, out + result.stderr.decode()
    assert "<~  235 2.7.0" in out
    # PIPELINING was used: MAIL, both RCPTs and DATA went before any reply.
    lines = [ln for ln in out.splitlines() if ln.startswith((" ~>", "<~"))]
    mail = next(i for i, ln in enumerate(lines) if ln.startswith(" ~> MAIL FROM:"))
    assert [ln.split()[1] for ln in lines[mail : mail + 4]] == ["MAIL", "RCPT", "RCPT", "DATA"]
    assert [ln.split()[1] for ln in lines[mail + 4 : mail + 8]] == ["250", "250", "250", "354"]
    assert "<~  250 2.0.0 OK queued as" in out
    assert len(recorder.received) == 1
    got = recorder.received[0]
    assert got["rcptTo"] == ["one@example.net", "two@example.net"]
    assert got["secure"] and got["authenticated"] and got["username"] == "tool-user"
    assert f"Subject: swaks {mechanism}\r\n".encode() in got["msg"]
    # Dot-unstuffed (swaks sends "..leading dot"); swaks adds blank lines.
    assert b"\r\n\r\npipelined body\r\n.leading dot\r\n" in got["msg"]


@pytest_twisted.ensureDeferred
async def test_swaks_implicit_tls_and_wrong_password(serve, recorder, certificateAuthority):
    swaks = need("swaks")
    server = await serve(tls=True, implicitTls=True, handlers={"onLogin": login})
    base = [
        swaks, "--server", "127.0.0.1", "--port", str(server.port), "--tls-on-connect",
        "--tls-verify", "--tls-ca-path", certificateAuthority.certFile, "--tls-sni", "localhost",
        "--from", "sender@example.org", "--to", "one@example.net", "--auth", "PLAIN", "--auth-user", "tool-user",
    ]
    bad = await run(base + ["--auth-password", "nope"])
    assert bad.returncode != 0
    assert "<~* 535 5.7.8" in bad.stdout.decode(), bad.stdout.decode()
    good = await run(base + ["--auth-password", "tool-pass"])
    assert good.returncode == 0, good.stdout.decode()
    assert len(recorder.received) == 1
    assert recorder.received[0]["secure"] is True


# curl -------------------------------------------------------------------------

CURL_MESSAGE = (
    b"From: curl@example.org\r\n"
    b"To: one@example.net\r\n"
    b"Subject: curl upload\r\n"
    b"\r\n"
    b".a line starting with a dot\r\n"
    b"..two dots\r\n"
    b"last line\r\n"
)


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("mode", ["plain", "starttls+auth", "smtps+auth"])
async def test_curl_upload(serve, recorder, certificateAuthority, tmp_path, mode):
    curl = need("curl")
    message = tmp_path / "message.eml"
    message.write_bytes(CURL_MESSAGE)
    argv = [
        curl, "-sS", "--max-time", "30",
        "--mail-from", "curl@example.org", "--mail-rcpt", "one@example.net", "--mail-rcpt", "two@example.net",
        "--upload-file", str(message),
    ]
    if mode == "plain":
        server = await serve()
        argv += ["--url", f"smtp://127.0.0.1:{server.port}"]
    elif mode == "starttls+auth":
        server = await serve(tls=True, handlers={"onLogin": login})
        argv += ["--url", f"smtp://127.0.0.1:{server.port}", "--ssl-reqd", "--cacert", certificateAuthority.certFile,
                 "--user", "tool-user:tool-pass"]
    else:
        server = await serve(tls=True, implicitTls=True, handlers={"onLogin": login})
        argv += ["--url", f"smtps://127.0.0.1:{server.port}", "--cacert", certificateAuthority.certFile,
                 "--user", "tool-user:tool-pass", "--login-options", "AUTH=LOGIN"]
    result = await run(argv)
    assert result.returncode == 0, result.stderr.decode()
    assert len(recorder.received) == 1
    got = recorder.received[0]
    assert got["mailFrom"] == "curl@example.org"
    assert got["rcptTo"] == ["one@example.net", "two@example.net"]
    assert got["msg"].endswith(CURL_MESSAGE)
    assert got["secure"] is (mode != "plain")
    assert got["authenticated"] is (mode != "plain")
    # The SIZE curl announced is what it sent.
    assert got["mailParameters"].get("SIZE") == str(len(CURL_MESSAGE))


# smtp-source -------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_smtp_source_2000_messages_over_20_sessions(serve, recorder):
    """
    Postfix's load generator: 2,000 messages over 20 concurrent sessions
    (-d: several messages per connection); exactly 2,000 reach onReceive,
    and every session ends with exactly one onDisconnect.
    """
    smtpSource = need(SMTP_SOURCE)
    server = await serve()
    result = await run(
        [smtpSource, "-s", "20", "-m", "2000", "-d", "-l", "1024", "-M", "source.client.test",
         "-f", "load@example.org", "-t", "sink@example.net", f"127.0.0.1:{server.port}"],
        timeout=60,
    )
    assert result.returncode == 0, result.stderr.decode()
    assert len(recorder.received) == 2000
    sessions = {r["id"] for r in recorder.received}
    assert len(sessions) == 20
    assert all(r["rcptTo"] == ["sink@example.net"] for r in recorder.received)
    assert all(len(r["msg"]) > 1024 for r in recorder.received)
    await recorder.waitDisconnects(20)
    assert set(recorder.disconnects) == sessions
    assert set(recorder.disconnects.values()) == {1}


# openssl s_client ------------------------------------------------------------------

S_CLIENT_DIALOGUE = (
    b"EHLO sclient.test\n"
    b"MAIL FROM:<ssl@example.org>\n"
    b"RCPT TO:<one@example.net>\n"
    b"DATA\n"
    b"Subject: s_client\n"
    b"\n"
    b"over TLS\n"
    b".\n"
    b"QUIT\n"
)


def sClient(certificateAuthority, port: int, *extra: str) -> list[str]:
    return [
        need("openssl"), "s_client", "-connect", f"127.0.0.1:{port}", "-CAfile", certificateAuthority.certFile,
        "-verify_return_error", "-verify_ip", "127.0.0.1", "-crlf", "-brief", "-ign_eof", *extra,
    ]


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("implicit", [False, True], ids=["starttls", "implicit"])
async def test_openssl_s_client(serve, recorder, certificateAuthority, implicit):
    server = await serve(tls=True, implicitTls=implicit)
    extra = () if implicit else ("-starttls", "smtp")
    result = await run(sClient(certificateAuthority, server.port, *extra), stdin=S_CLIENT_DIALOGUE)
    out, err = result.stdout.decode(), result.stderr.decode()
    assert result.returncode == 0, out + err
    assert "Verification: OK" in err
    replies = out.splitlines()
    if implicit:
        # s_client shows the greeting, which it consumes itself in STARTTLS mode.
        assert replies.pop(0).startswith("220 mx.interop.test")
    assert "250 STARTTLS" not in replies[:7]  # the EHLO after TLS
    assert [r[:3] for r in replies if not r.startswith("250-")] == ["250", "250", "250", "354", "250", "221"]
    assert len(recorder.received) == 1
    assert recorder.received[0]["secure"] is True
    assert recorder.received[0]["msg"].endswith(b"Subject: s_client\r\n\r\nover TLS\r\n")


@pytest_twisted.ensureDeferred
async def test_openssl_protocol_versions(serve, recorder, certificateAuthority):
    """
    minProtocol / maxProtocol are enforced on the wire.
    """
    only13 = await serve(tls=True, minProtocol=TLSVersion.tls1_3)
    only12 = await serve(tls=True, maxProtocol=TLSVersion.tls1_2)
    quit = b"EHLO sclient.test\nQUIT\n"

    refused = await run(sClient(certificateAuthority, only13.port, "-starttls", "smtp", "-tls1_2"), stdin=quit)
    assert refused.returncode != 0
    # Refused for its version (the server's protocol_version alert), not
    # for any other reason a handshake can fail.
    assert "alert protocol version" in refused.stderr.decode(), refused.stderr.decode()
    assert "Protocol version" not in refused.stderr.decode()

    tooNew = await run(sClient(certificateAuthority, only12.port, "-starttls", "smtp", "-tls1_3"), stdin=quit)
    assert tooNew.returncode != 0
    assert "alert protocol version" in tooNew.stderr.decode(), tooNew.stderr.decode()

    accepted = await run(sClient(certificateAuthority, only13.port, "-starttls", "smtp", "-tls1_3"), stdin=quit)
    assert accepted.returncode == 0, accepted.stderr.decode()
    assert "Protocol version: TLSv1.3" in accepted.stderr.decode()

    downgraded = await run(sClient(certificateAuthority, only12.port, "-starttls", "smtp"), stdin=quit)
    assert downgraded.returncode == 0, downgraded.stderr.decode()
    assert "Protocol version: TLSv1.2" in downgraded.stderr.decode()
    assert "221 2.0.0 Bye" in downgraded.stdout.decode()

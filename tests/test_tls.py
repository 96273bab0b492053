"""
Server TLS: certificates checked at load with clear errors, and the
protocol range enforced on real connections (Python's ssl module as the
peer).
"""

from __future__ import annotations

import smtplib
import socket
import ssl
import subprocess

import pytest
import pytest_twisted
from peertools import requireTool
from twisted.internet import reactor
from twisted.internet.threads import deferToThread

from infsmtp import Server, SMTPTLSError, TLSVersion
from infsmtp.testing import CertificateAuthority

#: The bound on every wait, in seconds.
WAIT = 20.0


def test_missing_files(tmp_path, certificateAuthority):
    server = Server(ssl=True)
    with pytest.raises(SMTPTLSError, match="cannot read certificate file .*nope.pem"):
        server.setCertificate(str(tmp_path / "nope.pem"), certificateAuthority.localhost.keyFile)
    with pytest.raises(SMTPTLSError, match="cannot read key file"):
        server.setCertificate(certificateAuthority.localhost.certFile, str(tmp_path / "nope.key"))


def test_not_pem(tmp_path, certificateAuthority):
    junk = tmp_path / "junk.pem"
    junk.write_text("hello")
    with pytest.raises(SMTPTLSError, match="holds no PEM certificate"):
        Server(ssl=True).setCertificate(str(junk), certificateAuthority.localhost.keyFile)
    with pytest.raises(SMTPTLSError, match="holds no usable PEM private key"):
        Server(ssl=True).setCertificate(certificateAuthority.localhost.certFile, str(junk))


def test_key_mismatch(tmp_path, certificateAuthority):
    other = certificateAuthority.issue("other.test")
    with pytest.raises(SMTPTLSError, match="does not match certificate"):
        Server(ssl=True).setCertificate(certificateAuthority.localhost.certFile, other.keyFile)


def test_verify_chain(tmp_path, certificateAuthority):
    leaf = certificateAuthority.localhost
    server = Server(ssl=True, verifyCertificate=True)
    # Without the root the chain leads nowhere the system trusts.
    with pytest.raises(SMTPTLSError, match="does not verify"):
        server.setCertificate(leaf.certFile, leaf.keyFile)
    server.setCertificate(leaf.certFile, leaf.keyFile, certificateAuthority.certFile)
    # A different CA's root does not verify it either.
    stranger = CertificateAuthority.create(str(tmp_path / "stranger"))
    with pytest.raises(SMTPTLSError, match="does not verify"):
        server.setCertificate(leaf.certFile, leaf.keyFile, stranger.certFile)
    # verify=False overrides the constructor's default.
    server.setCertificate(leaf.certFile, leaf.keyFile, stranger.certFile, verify=False)


def test_ssl_needs_certificate():
    server = Server(ssl=True, port=0, interface="127.0.0.1")
    with pytest.raises(SMTPTLSError, match="needs setCertificate"):
        server.buildFactory()


def test_implicit_rules():
    assert Server(ssl=True, port=465).implicit
    assert not Server(ssl=True, port=587).implicit
    assert Server(ssl=True, port=587, implicitTls=True).implicit
    assert not Server(ssl=True, port=465, implicitTls=False).implicit
    assert not Server(ssl=False, port=465).implicit


def test_reference_spelling():
    assert Server.protocol.tls1_2 is TLSVersion.tls1_2
    assert Server(minProtocol=TLSVersion.tls1_3).protocol is TLSVersion.tls1_3


async def startTLSServer(authority, **kw):
    server = Server(ssl=True, port=0, interface="127.0.0.1", hostname="localhost", implicitTls=True, **kw)
    server.setCertificate(authority.localhost.certFile, authority.localhost.keyFile)
    versions = []
    server.onReceive = lambda s: versions.append((s.secure, s.tlsVersion))
    await server.startListening().addTimeout(WAIT, reactor)
    return server, versions


def clientContext(authority, maximum=None, minimum=None):
    context = ssl.create_default_context(cafile=authority.certFile)
    if maximum:
        context.maximum_version = maximum
    if minimum:
        context.minimum_version = minimum
    return context


def sendOver(port, context):
    with smtplib.SMTP_SSL("localhost", port, context=context, timeout=10) as client:
        client.sendmail("a@b.test", ["c@d.test"], b"Subject: t\r\n\r\nx\r\n")


@pytest_twisted.ensureDeferred
async def test_implicit_tls_reports_version(certificateAuthority):
    server, versions = await startTLSServer(certificateAuthority, maxProtocol=TLSVersion.tls1_2)
    try:
        await deferToThread(sendOver, server.port, clientContext(certificateAuthority)).addTimeout(WAIT, reactor)
        assert versions == [(True, "TLSv1.2")]
    finally:
        await server.stopListening().addTimeout(WAIT, reactor)


@pytest_twisted.ensureDeferred
async def test_min_protocol_enforced(certificateAuthority):
    server, versions = await startTLSServer(certificateAuthority, minProtocol=TLSVersion.tls1_3)
    try:
        context = clientContext(certificateAuthority, maximum=ssl.TLSVersion.TLSv1_2)
        with pytest.raises(ssl.SSLError) as refused:
            await deferToThread(sendOver, server.port, context).addTimeout(WAIT, reactor)
        # Refused for its version, not for any other handshake failure.
        assert refused.value.reason == "TLSV1_ALERT_PROTOCOL_VERSION", refused.value
        await deferToThread(sendOver, server.port, clientContext(certificateAuthority)).addTimeout(WAIT, reactor)
        assert versions == [(True, "TLSv1.3")]
    finally:
        await server.stopListening().addTimeout(WAIT, reactor)


@pytest_twisted.ensureDeferred
async def test_max_protocol_enforced(certificateAuthority):
    """
    maxProtocol=tls1_2: a client that insists on TLS 1.3 is refused with a
    protocol_version alert, and any other client gets TLS 1.2.
    """
    server, versions = await startTLSServer(certificateAuthority, maxProtocol=TLSVersion.tls1_2)
    try:
        context = clientContext(certificateAuthority, minimum=ssl.TLSVersion.TLSv1_3)
        with pytest.raises(ssl.SSLError) as refused:
            await deferToThread(sendOver, server.port, context).addTimeout(WAIT, reactor)
        assert refused.value.reason == "TLSV1_ALERT_PROTOCOL_VERSION", refused.value
        await deferToThread(sendOver, server.port, clientContext(certificateAuthority)).addTimeout(WAIT, reactor)
        assert versions == [(True, "TLSv1.2")]
    finally:
        await server.stopListening().addTimeout(WAIT, reactor)


@pytest_twisted.ensureDeferred
async def test_starttls_then_auth(certificateAuthority):
    server = Server(ssl=True, port=0, interface="127.0.0.1", hostname="localhost")
    server.setCertificate(certificateAuthority.localhost.certFile, certificateAuthority.localhost.keyFile)
    seen = []
    server.onLogin = lambda s: s.password == "pw"
    server.onReceive = lambda s: seen.append((s.secure, s.authenticated, s.username, s.msg.split(b"\r\n")[1]))
    await server.startListening().addTimeout(WAIT, reactor)

    def run():
        with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
            client.ehlo()
            assert client.has_extn("starttls") and not client.has_extn("auth")
            client.starttls(context=clientContext(certificateAuthority))
            client.ehlo()
            assert not client.has_extn("starttls") and client.has_extn("auth")
            client.login("bob", "pw")
            client.sendmail("a@b.test", ["c@d.test"], b"Subject: t\r\n\r\nx\r\n")

    try:
        await deferToThread(run).addTimeout(WAIT, reactor)
        secure, authenticated, username, withLine = seen[0]
        assert (secure, authenticated, username) == (True, True, "bob")
        assert withLine.startswith(b"\tby localhost (infsmtp) with ESMTPSA (TLSv1.3)")
    finally:
        await server.stopListening().addTimeout(WAIT, reactor)


@pytest_twisted.ensureDeferred
async def test_pipelining_with_a_pending_handler_over_implicit_tls(certificateAuthority):
    from twisted.internet.task import deferLater

    server, _ = await startTLSServer(certificateAuthority)
    server.onMailFrom = lambda s: deferLater(reactor, 0.1, lambda: True)

    def run():
        raw = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        with clientContext(certificateAuthority).wrap_socket(raw, server_hostname="localhost") as tls:
            reader = tls.makefile("rb")
            assert reader.readline().startswith(b"220 ")
            tls.sendall(
                b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\n"
                b"Subject: p\r\n\r\nbody\r\n.\r\nQUIT\r\n"
            )
            codes = []
            while True:
                line = reader.readline()
                if not line:
                    break
                if line[3:4] == b" ":
                    codes.append(int(line[:3]))
            return codes

    try:
        assert await deferToThread(run).addTimeout(WAIT, reactor) == [250, 250, 250, 354, 250, 221]
    finally:
        await server.stopListening().addTimeout(WAIT, reactor)


# Session resumption (issue 15): tickets, for clients that offer them ------


def starttlsSession(port, context, session=None):
    """
    One STARTTLS session with Python's ssl, offering C{session} to resume:
    the session to offer next time, and whether this one was resumed.
    """
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    reader = raw.makefile("rb")
    assert reader.readline().startswith(b"220 ")
    raw.sendall(b"EHLO client.test\r\n")
    while reader.readline()[3:4] == b"-":
        pass
    raw.sendall(b"STARTTLS\r\n")
    assert reader.readline().startswith(b"220 ")
    with context.wrap_socket(raw, server_hostname="localhost", session=session) as tls:
        tls.sendall(b"EHLO client.test\r\nQUIT\r\n")
        # Read to the end: TLS 1.3 tickets come after the handshake.
        received = b""
        while chunk := tls.recv(4096):
            received += chunk
        assert b"\r\n221 " in received, received
        return tls.session, tls.session_reused


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=["tls1.2", "tls1.3"])
async def test_starttls_session_resumed(certificateAuthority, version):
    """
    A client that offers the session (ticket) of its last STARTTLS gets
    an abbreviated handshake, over TLS 1.2 and 1.3; one that offers none
    gets a full one.
    """
    server = Server(ssl=True, port=0, interface="127.0.0.1", hostname="localhost")
    server.setCertificate(certificateAuthority.localhost.certFile, certificateAuthority.localhost.keyFile)
    await server.startListening().addTimeout(WAIT, reactor)
    context = clientContext(certificateAuthority, maximum=version, minimum=version)

    def run():
        first, reused = starttlsSession(server.port, context)
        assert not reused and first is not None
        second, resumed = starttlsSession(server.port, context, first)
        fresh, freshReused = starttlsSession(server.port, context)
        return resumed, freshReused

    try:
        assert await deferToThread(run).addTimeout(WAIT, reactor) == (True, False)
    finally:
        await server.stopListening().addTimeout(WAIT, reactor)


def opensslStarttls(port, authority, sessionFile, resume: bool) -> str:
    """
    One STARTTLS session with openssl s_client, saving its session (and
    offering the saved one with C{resume}): what it says of the session.
    """
    openssl = requireTool("openssl")
    command = [
        openssl, "s_client", "-connect", f"127.0.0.1:{port}", "-starttls", "smtp",
        "-servername", "localhost", "-CAfile", authority.certFile, "-verify_return_error",
        "-ign_eof", "-sess_out", str(sessionFile),
    ]
    if resume:
        command += ["-sess_in", str(sessionFile)]
    # QUIT, then -ign_eof reads on to the server's close: TLS 1.3 tickets
    # arrive after the handshake.
    done = subprocess.run(command, input=b"QUIT\r\n", capture_output=True, timeout=WAIT)
    out = done.stdout.decode(errors="replace")
    assert done.returncode == 0 and "\n221 " in out, out[-2000:] + done.stderr.decode(errors="replace")
    [line] = [line for line in out.splitlines() if line.startswith(("New, ", "Reused, "))]
    return line


@pytest_twisted.ensureDeferred
async def test_openssl_client_resumes(certificateAuthority, tmp_path):
    """
    openssl s_client -sess_out / -sess_in (what an MTA's session cache
    does): the second STARTTLS is "Reused".
    """
    server = Server(ssl=True, port=0, interface="127.0.0.1", hostname="localhost")
    server.setCertificate(certificateAuthority.localhost.certFile, certificateAuthority.localhost.keyFile)
    await server.startListening().addTimeout(WAIT, reactor)
    sessionFile = tmp_path / "session.pem"

    def run():
        return (
            opensslStarttls(server.port, certificateAuthority, sessionFile, resume=False),
            opensslStarttls(server.port, certificateAuthority, sessionFile, resume=True),
        )

    try:
        first, second = await deferToThread(run).addTimeout(WAIT, reactor)
        assert first.startswith("New, TLSv1.3") and second.startswith("Reused, TLSv1.3"), (first, second)
    finally:
        await server.stopListening().addTimeout(WAIT, reactor)

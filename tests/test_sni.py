"""
Issue 14, item 5: a certificate per host name, chosen by SNI (RFC 6066):
``setCertificate(..., hostname=...)``.  Clients that verify (Python's ssl,
openssl s_client) ask for a name and must get a certificate valid for it;
every other client gets the default one.
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

from infsmtp import Server, SMTPTLSError

WAIT = 20


@pytest.fixture(scope="module")
def names(certificateAuthority):
    """
    Certificates: the default (localhost), one for mail.other.test, one for
    *.wild.test.
    """
    authority = certificateAuthority
    return {
        "default": authority.localhost,
        "mail.other.test": authority.issue("mail.other.test", prefix="other"),
        "*.wild.test": authority.issue("*.wild.test", prefix="wild"),
    }


async def startServer(names, implicit: bool) -> Server:
    server = Server(ssl=True, port=0, interface="127.0.0.1", hostname="localhost", implicitTls=implicit)
    server.setCertificate(names["default"].certFile, names["default"].keyFile)
    server.setCertificate(names["mail.other.test"].certFile, names["mail.other.test"].keyFile, hostname="Mail.Other.Test")
    server.onReceive = lambda session: True
    await server.startListening().addTimeout(WAIT, reactor)
    return server


def starttlsNames(port: int, cafile: str, serverName: str) -> list[str]:
    context = ssl.create_default_context(cafile=cafile)
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        # smtplib sends (and verifies) the name it connected to: connect by
        # address, then say which name is meant, as a relay with an MX does.
        client._host = serverName
        client.starttls(context=context)
        return [value for kind, value in client.sock.getpeercert()["subjectAltName"] if kind == "DNS"]


def implicitNames(port: int, cafile: str, serverName: str) -> list[str]:
    context = ssl.create_default_context(cafile=cafile)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname=serverName) as tls:
            return [value for kind, value in tls.getpeercert()["subjectAltName"] if kind == "DNS"]


@pytest_twisted.ensureDeferred
async def test_starttlsServesTheCertificateForTheNameAsked(names, certificateAuthority):
    server = await startServer(names, implicit=False)
    try:
        ca = certificateAuthority.certFile
        assert await deferToThread(starttlsNames, server.port, ca, "mail.other.test") == ["mail.other.test"]
        # Any other name, or none: the default.
        assert await deferToThread(starttlsNames, server.port, ca, "localhost") == ["localhost"]
    finally:
        await server.stopListening().addTimeout(WAIT, reactor)


@pytest_twisted.ensureDeferred
async def test_implicitTlsAndWildcardsAndALiveChange(names, certificateAuthority):
    server = await startServer(names, implicit=True)
    try:
        ca = certificateAuthority.certFile
        assert await deferToThread(implicitNames, server.port, ca, "mail.other.test") == ["mail.other.test"]
        # Not set yet: the default, which a verifying client refuses.
        with pytest.raises(ssl.SSLCertVerificationError):
            await deferToThread(implicitNames, server.port, ca, "mx.wild.test")
        # Set on the running server: the next connection has it.
        server.setCertificate(names["*.wild.test"].certFile, names["*.wild.test"].keyFile, hostname="*.wild.test")
        assert await deferToThread(implicitNames, server.port, ca, "mx.wild.test") == ["*.wild.test"]
    finally:
        await server.stopListening().addTimeout(WAIT, reactor)


@pytest_twisted.ensureDeferred
async def test_opensslAsksByName(names, certificateAuthority):
    openssl = requireTool("openssl")
    server = await startServer(names, implicit=False)
    try:

        def ask(name: str) -> str:
            result = subprocess.run(
                [openssl, "s_client", "-connect", f"127.0.0.1:{server.port}", "-starttls", "smtp",
                 "-servername", name, "-CAfile", certificateAuthority.certFile, "-verify_return_error",
                 "-verify_hostname", name],
                input=b"QUIT\r\n", capture_output=True, timeout=20,
            )
            return result.stdout.decode(errors="replace")

        out = await deferToThread(ask, "mail.other.test")
        assert "subject=CN = mail.other.test" in out and "Verify return code: 0 (ok)" in out, out[-800:]
    finally:
        await server.stopListening().addTimeout(WAIT, reactor)


def test_aCertificateNotValidForTheNameIsRefused(names):
    server = Server(ssl=True)
    with pytest.raises(SMTPTLSError, match="is not valid for mail.elsewhere.test"):
        server.setCertificate(names["mail.other.test"].certFile, names["mail.other.test"].keyFile, hostname="mail.elsewhere.test")
    with pytest.raises(SMTPTLSError, match="is not a host name"):
        server.setCertificate(names["mail.other.test"].certFile, names["mail.other.test"].keyFile, hostname="mail other")


def test_namedCertificatesNeedTheDefault(names):
    server = Server(ssl=True, port=0, interface="127.0.0.1")
    server.setCertificate(names["mail.other.test"].certFile, names["mail.other.test"].keyFile, hostname="mail.other.test")
    with pytest.raises(SMTPTLSError, match="without hostname"):
        server.buildFactory()


@pytest_twisted.ensureDeferred
async def test_aFirstNameOnARunningServerThatServedAlready(names, certificateAuthority):
    # No name at the start: the default context served a connection before
    # the choice by name was put on it.
    server = Server(ssl=True, port=0, interface="127.0.0.1", hostname="localhost", implicitTls=True)
    server.setCertificate(names["default"].certFile, names["default"].keyFile)
    await server.startListening().addTimeout(WAIT, reactor)
    try:
        ca = certificateAuthority.certFile
        assert await deferToThread(implicitNames, server.port, ca, "localhost") == ["localhost"]
        server.setCertificate(names["mail.other.test"].certFile, names["mail.other.test"].keyFile, hostname="mail.other.test")
        assert await deferToThread(implicitNames, server.port, ca, "mail.other.test") == ["mail.other.test"]
        assert await deferToThread(implicitNames, server.port, ca, "localhost") == ["localhost"]
    finally:
        await server.stopListening().addTimeout(WAIT, reactor)

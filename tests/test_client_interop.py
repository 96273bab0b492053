"""
The client against real peers over loopback: aiosmtpd (plain, STARTTLS with
AUTH, implicit TLS, bad certificates, a server without STARTTLS), a server
that never greets, Postfix's smtp-sink, and the blocking ``Client`` from a
worker thread, from the reactor thread and in a subprocess with crochet's
own reactor.
"""

from __future__ import annotations

import base64
import email
import email.policy
import hashlib
import hmac
import io
import os
import pathlib
import re
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

import pytest
import pytest_twisted
from aiosmtpd.smtp import AuthResult
from hypothesis import given, settings
from hypothesis import strategies as st
from peertools import EphemeralController, freePort, requireTool
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory
from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import formatEvent, globalLogPublisher
from twisted.protocols.basic import LineReceiver

from infsmtp import (
    AsyncClient,
    AuthMode,
    Client,
    EncryptMode,
    Server,
    SMTPConnectError,
    SMTPError,
    SMTPRecipientsRefused,
    SMTPTimeoutError,
    SMTPTLSError,
)
from infsmtp.testing import CertificateAuthority

SMTP_SINK = "/usr/sbin/smtp-sink"

#: The bound on a wait that the client's own timeout does not bound.
WAIT = 20.0

MESSAGE = (
    b"From: Ann <ann@example.org>\n"
    b"To: bob@example.org\n"
    b"Cc: Cy <cy@example.org>\n"
    b"Bcc: eve@example.org\n"
    b"Subject: hello\n"
    b"\n"
    b".a line that starts with a dot\n"
    b"..two dots\n"
    b".\n"
    b"last line without a newline"
)

# What a receiver must reconstruct: Bcc gone, CRLF, dots as they were.
RECEIVED = (
    b"From: Ann <ann@example.org>\r\n"
    b"To: bob@example.org\r\n"
    b"Cc: Cy <cy@example.org>\r\n"
    b"Subject: hello\r\n"
    b"\r\n"
    b".a line that starts with a dot\r\n"
    b"..two dots\r\n"
    b".\r\n"
    b"last line without a newline\r\n"
)

GOOD_PASSWORD = "correct horse battery staple"
GOOD_TOKEN = "ya29.good-token"


# ------------------------------------------------------------------ peers


class RecordingHandler:
    """
    An aiosmtpd handler that records what it receives and refuses what the
    tests ask it to: recipients starting with ``nobody``, messages holding
    ``REFUSE-ME``.  It also speaks CRAM-MD5 and XOAUTH2, which aiosmtpd
    does not have built in.
    """

    def __init__(self) -> None:
        self.messages: list[tuple[str, list[str], bytes, object]] = []
        self.mailOptions: list[list[str]] = []
        self.mechanisms: list[str] = []

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        self.mailOptions.append(list(mail_options))
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address.startswith("nobody"):
            return "550 5.1.1 no such user"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):
        content = envelope.original_content
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), content, session.peer))
        if b"REFUSE-ME" in content:
            return "554 5.6.0 content refused"
        return "250 2.0.0 OK"

    async def handle_VRFY(self, server, session, envelope, address):
        if address == "ann":
            return "250 2.1.5 Ann <ann@example.org>"
        return "550 5.1.1 unknown"

    def authenticator(self, server, session, envelope, mechanism, authData):
        self.mechanisms.append(mechanism)
        ok = authData.password.decode() == GOOD_PASSWORD
        return AuthResult(success=ok, handled=False)

    async def auth_CRAM__MD5(self, server, args):
        challenge = b"<1896.697170952@test.example>"
        response = await server.challenge_auth(challenge)
        user, _, digest = response.partition(b" ")
        expected = hmac.new(GOOD_PASSWORD.encode(), challenge, hashlib.md5).hexdigest()
        self.mechanisms.append("CRAM-MD5")
        return AuthResult(success=digest.decode() == expected, handled=False)

    async def auth_XOAUTH2(self, server, args):
        self.mechanisms.append("XOAUTH2")
        fields = base64.b64decode(args[1]).split(b"\x01")
        if fields[1] == b"auth=Bearer " + GOOD_TOKEN.encode():
            return AuthResult(success=True, handled=False)
        await server.challenge_auth('{"status":"401","schemes":"bearer"}')
        return AuthResult(success=False, handled=False)


class SilentAfterCredentials(LineReceiver):
    """
    A server that offers AUTH, takes the credentials (PLAIN's or XOAUTH2's
    initial response, LOGIN's password) and never answers: the client's
    timeout comes right after it sent a secret.  C{heard} keeps the line
    that carried each one.
    """

    heard: list[bytes] = []

    @classmethod
    def factory(cls) -> Factory:
        cls.heard = []
        return Factory.forProtocol(cls)

    def connectionMade(self) -> None:
        self.sendLine(b"220 silent.test ESMTP")

    def lineReceived(self, line: bytes) -> None:
        verb = line.split(b" ", 1)[0].upper()
        if verb == b"EHLO":
            self.sendLine(b"250-silent.test\r\n250 AUTH PLAIN LOGIN XOAUTH2")
        elif line.upper() == b"AUTH LOGIN":
            self.sendLine(b"334 VXNlcm5hbWU6")
        elif line == base64.b64encode(b"ann"):
            self.sendLine(b"334 UGFzc3dvcmQ6")
        elif verb in (b"QUIT", b"RSET"):
            self.sendLine(b"221 bye")
        else:
            self.heard.append(line)  # and say nothing




def serverContext(leaf) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(leaf.certFile, leaf.keyFile)
    return context


@pytest.fixture
def aiosmtpdServer():
    """
    A factory of running aiosmtpd servers: ``start(**SMTPkeywords)``.
    """
    controllers = []

    def start(**keywords):
        handler = RecordingHandler()
        keywords.setdefault("authenticator", handler.authenticator)
        keywords.setdefault("auth_require_tls", False)
        controller = EphemeralController(handler, hostname="127.0.0.1", port=0, **keywords)
        controller.start()
        controllers.append(controller)
        controller.handler = handler
        return controller

    yield start
    for controller in controllers:
        controller.stop()


def client(port: int, **settings) -> AsyncClient:
    c = AsyncClient()
    c.host = "127.0.0.1"
    c.port = port
    c.timeout = 5000
    for name, value in settings.items():
        setattr(c, name, value)
    return c


async def failure(d: Deferred) -> BaseException:
    """
    The exception ``d`` fails with (and a test failure if it succeeds).
    """
    try:
        result = await d
    except BaseException as e:
        return e
    raise AssertionError(f"expected a failure, got {result!r}")


def waitForPort(port: int, process: subprocess.Popen) -> None:
    """
    Wait until an external process accepts connections on ``port``: there is
    nothing to await for another program's readiness, so poll, bounded.
    """
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"smtp-sink exited with {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError("smtp-sink did not start listening")


@pytest.fixture
def smtpSink():
    """
    A factory of Postfix smtp-sink processes on free ports:
    ``start(dump=False, options=())`` returns ``(port, dumpFolder or
    None)``; with ``dump`` each message is written into the folder;
    ``options`` are smtp-sink's own (``("-Q", "MAIL")``).
    """
    # Through the one guard: skipped on a developer's machine without
    # Postfix, a failure in CI (which installs it).
    sink = requireTool(SMTP_SINK)
    processes, folders = [], []

    def start(dump: bool = False, options: tuple[str, ...] = ()):
        port = freePort()
        command = [sink, *options, "127.0.0.1:%d" % port, "100"]
        if os.getuid() == 0:
            command[1:1] = ["-u", "nobody"]
        folder = None
        if dump:
            # smtp-sink writes as "nobody": a folder it can reach.
            folder = pathlib.Path(tempfile.mkdtemp(prefix="infsmtp-sink-"))
            folder.chmod(0o777)
            folders.append(folder)
            command[1:1] = ["-d", f"{folder}/%M."]
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        processes.append(process)
        waitForPort(port, process)
        return port, folder

    yield start
    for process in processes:
        process.terminate()
        process.wait(5)
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)


@pytest_twisted.async_yield_fixture
async def ourServer(certificateAuthority):
    """
    A factory of running infsmtp servers on 127.0.0.1 and a free port:
    ``await start(tls=False, **ServerKeywords)``.  Each records
    ``(mailFrom, rcptTo, msg, sessionId, authenticated, username,
    mailParameters)`` in ``server.received``, and refuses recipients
    starting with ``nobody``.
    """
    servers = []

    async def start(tls: bool = False, **keywords):
        keywords.setdefault("port", 0)
        keywords.setdefault("interface", "127.0.0.1")
        keywords.setdefault("hostname", "mx.test")
        keywords.setdefault("receivedHeader", False)
        server = Server(ssl=tls, **keywords)
        if tls:
            leaf = certificateAuthority.localhost
            server.setCertificate(leaf.certFile, leaf.keyFile)
        server.received = []

        def onRcptTo(session):
            return not session.address.startswith("nobody")

        def onReceive(session):
            server.received.append(
                (session.mailFrom, list(session.rcptTo), session.msg, session.id,
                 session.authenticated, session.username, dict(session.mailParameters))
            )
            return b"REFUSE-ME" not in session.msg

        server.onRcptTo = onRcptTo
        server.onReceive = onReceive
        await server.startListening().addTimeout(10, reactor)
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.stopListening().addTimeout(10, reactor)


# ------------------------------------------------------------- plain SMTP


@pytest_twisted.ensureDeferred
async def test_plainSessionSendsManyMessagesOnOneConnection(aiosmtpdServer, tmp_path):
    """
    One connect, then sendFile, sendStream and sendMail on the same
    connection: envelopes from the headers, Bcc never transmitted, line
    endings and dots as the message had them.
    """
    server = aiosmtpdServer()
    eml = tmp_path / "mail.eml"
    eml.write_bytes(MESSAGE)
    c = client(server.port)
    await c.connect()
    assert await c.authenticate() is True  # AuthMode.none
    assert await c.sendFile(str(eml)) == {}
    assert await c.send(str(eml), "other@example.org", ["bob@example.org"]) == {}
    assert await c.sendStream(io.BytesIO(MESSAGE)) == {}
    parsed = email.message_from_bytes(MESSAGE, policy=email.policy.default)
    assert await c.sendMail(parsed) == {}
    await c.disconnect()
    assert not c.connected

    everyone = ["bob@example.org", "cy@example.org", "eve@example.org"]
    messages = server.handler.messages
    assert [(m[0], m[1]) for m in messages] == [
        ("ann@example.org", everyone),
        ("other@example.org", ["bob@example.org"]),
        ("ann@example.org", everyone),
        ("ann@example.org", everyone),
    ]
    assert [m[2] for m in messages[:3]] == [RECEIVED] * 3
    assert b"eve@example.org" not in messages[3][2] and b"Bcc" not in messages[3][2]
    assert len({m[3] for m in messages}) == 1, "all messages on one connection"


@pytest_twisted.ensureDeferred
async def test_refusedRecipientsAndMessages(aiosmtpdServer):
    server = aiosmtpdServer()
    c = client(server.port)
    await c.connect()
    refused = await c.sendStream(io.BytesIO(MESSAGE), None, ["bob@example.org", "nobody@example.org"])
    assert refused == {"nobody@example.org": (550, "5.1.1 no such user")}

    error = await failure(c.sendStream(io.BytesIO(MESSAGE), None, ["nobody1@x.org", "nobody2@x.org"]))
    assert isinstance(error, SMTPRecipientsRefused)
    assert set(error.refused) == {"nobody1@x.org", "nobody2@x.org"} and error.code == 550

    error = await failure(c.sendStream(io.BytesIO(MESSAGE + b"\nREFUSE-ME\n")))
    assert type(error) is SMTPError and error.code == 554

    # The session is still usable after each refusal.
    assert await c.sendStream(io.BytesIO(MESSAGE)) == {}
    await c.disconnect()
    assert len(server.handler.messages) == 3


@pytest_twisted.ensureDeferred
async def test_verify(aiosmtpdServer):
    server = aiosmtpdServer()
    c = client(server.port)
    await c.connect()
    assert await c.verify("ann") == "2.1.5 Ann <ann@example.org>"
    error = await failure(c.verify("zed"))
    assert isinstance(error, SMTPError) and error.code == 550
    await c.disconnect()


@pytest_twisted.ensureDeferred
async def test_mailParametersSizeEightBitAndSMTPUTF8(aiosmtpdServer):
    """
    SIZE= is declared, BODY=8BITMIME for 8-bit data, SMTPUTF8 for
    non-ASCII addresses; a message over the server's SIZE is refused before
    anything is sent.
    """
    server = aiosmtpdServer(data_size_limit=2000)
    c = client(server.port)
    await c.connect()
    await c.sendStream(io.BytesIO(b"From: a@example.org\nTo: b@example.org\n\nplain\n"))
    eightBit = "From: a@example.org\nTo: b@example.org\n\ncaf\u00e9\n".encode()
    await c.sendStream(io.BytesIO(eightBit))
    await c.sendStream(io.BytesIO(eightBit), "j\u00f6rg@example.org", ["b@example.org"])
    error = await failure(c.sendStream(io.BytesIO(b"From: a@x.org\nTo: b@x.org\n\n" + b"x" * 3000)))
    assert error.code == 552
    await c.disconnect()

    first, second, third = server.handler.mailOptions
    assert first == ["SIZE=45"]
    assert sorted(second) == ["BODY=8BITMIME", "SIZE=%d" % len(eightBit)]
    assert "SMTPUTF8" in third
    assert len(server.handler.mailOptions) == 3, "the oversized message sent no MAIL"
    assert server.handler.messages[2][0] == "j\u00f6rg@example.org"


# ------------------------------------------------------------------- TLS


@pytest_twisted.ensureDeferred
async def test_startTlsWithAuthentication(aiosmtpdServer, certificateAuthority):
    """
    STARTTLS with the CA given as trust root, then AUTH (offered only over
    TLS): PLAIN for AuthMode.default, False for a wrong password, and the
    message goes through the encrypted session.
    """
    server = aiosmtpdServer(
        tls_context=serverContext(certificateAuthority.localhost),
        require_starttls=True,
        auth_require_tls=True,
    )
    settings = dict(
        encryptMode=EncryptMode.startTls,
        caCertFile=certificateAuthority.certFile,
        authMode=AuthMode.default,
        username="ann",
    )
    c = client(server.port, password="wrong", **settings)
    await c.connect()
    assert await c.authenticate() is False
    await c.disconnect()

    c = client(server.port, password=GOOD_PASSWORD, **settings)
    await c.connect()
    assert await c.authenticate() is True
    assert await c.sendStream(io.BytesIO(MESSAGE)) == {}
    await c.disconnect()
    assert server.handler.mechanisms == ["PLAIN", "PLAIN"]
    assert server.handler.messages[0][2] == RECEIVED


@pytest_twisted.ensureDeferred
async def test_saslMechanismsInOrderOfPreference(aiosmtpdServer, certificateAuthority):
    """
    AuthMode.sasl takes the first of saslMechanisms the server offers:
    CRAM-MD5, XOAUTH2 with the password as bearer token, LOGIN when the
    preferred ones are not offered.
    """
    server = aiosmtpdServer(tls_context=serverContext(certificateAuthority.localhost))
    base = dict(
        encryptMode=EncryptMode.startTls,
        caCertFile=certificateAuthority.certFile,
        authMode=AuthMode.sasl,
        username="ann",
    )
    for mechanisms, password, expected in [
        (("CRAM-MD5", "PLAIN"), GOOD_PASSWORD, True),
        (("XOAUTH2", "PLAIN"), GOOD_TOKEN, True),
        (("XOAUTH2",), "expired-token", False),
        (("SCRAM-SHA-256", "LOGIN", "PLAIN"), GOOD_PASSWORD, True),
    ]:
        c = client(server.port, password=password, saslMechanisms=mechanisms, **base)
        await c.connect()
        assert await c.authenticate() is expected, mechanisms
        await c.disconnect()
    assert server.handler.mechanisms == ["CRAM-MD5", "XOAUTH2", "XOAUTH2", "LOGIN"]

    c = client(server.port, password="x", saslMechanisms=("SCRAM-SHA-256",), **base)
    await c.connect()
    error = await failure(c.authenticate())
    assert isinstance(error, SMTPError) and "no usable authentication mechanism" in str(error)
    await c.disconnect()


@pytest_twisted.ensureDeferred
async def test_credentialsNeverInErrorsOrLogs(aiosmtpdServer, certificateAuthority):
    """
    Failed logins leave no password, AUTH blob or token in an exception or
    a log line.
    """
    events = []
    globalLogPublisher.addObserver(events.append)
    server = aiosmtpdServer(tls_context=serverContext(certificateAuthority.localhost))
    secrets = ["Pa55-w0rd-xyzzy", "ya29.SECRET-TOKEN"]
    texts = []
    try:
        for mechanisms, password in [(("PLAIN",), secrets[0]), (("LOGIN",), secrets[0]), (("XOAUTH2",), secrets[1])]:
            c = client(
                server.port,
                encryptMode=EncryptMode.startTls,
                caCertFile=certificateAuthority.certFile,
                authMode=AuthMode.sasl,
                saslMechanisms=mechanisms,
                username="ann",
                password=password,
            )
            await c.connect()
            assert await c.authenticate() is False
            # After a failed AUTH, a send the server refuses.
            texts.append(str(await failure(c.verify("zed"))))
            await c.disconnect()
        c = client(freePort(), password=secrets[0], authMode=AuthMode.default, username="ann")
        texts.append(str(await failure(c.connect())))
        # A timeout with the credentials just sent: a server that takes
        # them and never answers.
        silent = reactor.listenTCP(0, SilentAfterCredentials.factory(), interface="127.0.0.1")
        try:
            for mechanisms, password in [(("PLAIN",), secrets[0]), (("LOGIN",), secrets[0]), (("XOAUTH2",), secrets[1])]:
                c = client(
                    silent.getHost().port,
                    authMode=AuthMode.sasl,
                    saslMechanisms=mechanisms,
                    username="ann",
                    password=password,
                    timeout=300,
                )
                await c.connect().addTimeout(WAIT, reactor)
                error = await failure(c.authenticate().addTimeout(WAIT, reactor))
                assert isinstance(error, SMTPTimeoutError), error
                texts.append(str(error))
                texts.append(repr(error))
                c.free()
        finally:
            await silent.stopListening()
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert SilentAfterCredentials.heard == [
        b"AUTH PLAIN " + base64.b64encode(b"\0ann\0" + secrets[0].encode()),
        base64.b64encode(secrets[0].encode()),
        b"AUTH XOAUTH2 " + base64.b64encode(b"user=ann\x01auth=Bearer " + secrets[1].encode() + b"\x01\x01"),
    ]
    texts += [formatEvent(e) for e in events] + [repr(e) for e in events]
    blobs = [
        base64.b64encode(b"\0ann\0" + secrets[0].encode()).decode(),
        base64.b64encode(secrets[0].encode()).decode(),
        # The encoded XOAUTH2 initial response, which carries the token.
        base64.b64encode(b"user=ann\x01auth=Bearer " + secrets[1].encode() + b"\x01\x01").decode(),
    ]
    for text in texts:
        for secret in secrets + blobs:
            assert secret not in text


@pytest_twisted.ensureDeferred
async def test_implicitTls(aiosmtpdServer, certificateAuthority):
    server = aiosmtpdServer(ssl_context=serverContext(certificateAuthority.localhost))
    c = client(server.port, encryptMode=EncryptMode.sslTls, caCertFile=certificateAuthority.certFile)
    await c.connect()
    assert await c.sendStream(io.BytesIO(MESSAGE)) == {}
    await c.disconnect()
    assert server.handler.messages[0][2] == RECEIVED


@pytest_twisted.ensureDeferred
async def test_untrustedCertificateAuthority(aiosmtpdServer, certificateAuthority, tmp_path):
    """
    A certificate from a CA the client does not trust fails promptly with
    SMTPTLSError, for implicit TLS and for STARTTLS; turning verification
    off explicitly lets it through.
    """
    stranger = CertificateAuthority.create(str(tmp_path / "stranger"), "stranger CA")
    leaf = stranger.issue("localhost", "127.0.0.1")
    implicit = aiosmtpdServer(ssl_context=serverContext(leaf))
    startTls = aiosmtpdServer(tls_context=serverContext(leaf))
    for server, mode in [(implicit, EncryptMode.sslTls), (startTls, EncryptMode.startTls)]:
        c = client(server.port, encryptMode=mode, caCertFile=certificateAuthority.certFile)
        started = time.monotonic()
        error = await failure(c.connect())
        assert isinstance(error, SMTPTLSError), error
        assert "certificate verify failed" in str(error)
        assert time.monotonic() - started < 3
        assert not c.connected

        c = client(server.port, encryptMode=mode, verifyServerCertificate=False)
        await c.connect()
        assert await c.sendStream(io.BytesIO(MESSAGE)) == {}
        await c.disconnect()


@pytest_twisted.ensureDeferred
async def test_certificateForAnotherHostName(aiosmtpdServer, certificateAuthority):
    """
    A trusted certificate that does not name the host: SMTPTLSError, not a
    hang (Twisted's endpoint-based sendmail never reports it).
    """
    leaf = certificateAuthority.issue("mail.elsewhere.example", prefix="elsewhere")
    implicit = aiosmtpdServer(ssl_context=serverContext(leaf))
    startTls = aiosmtpdServer(tls_context=serverContext(leaf))
    for server, mode in [(implicit, EncryptMode.sslTls), (startTls, EncryptMode.startTls)]:
        c = client(server.port, encryptMode=mode, caCertFile=certificateAuthority.certFile)
        c.host = "localhost"
        error = await failure(c.connect())
        assert isinstance(error, SMTPTLSError), error
        assert "host name" in str(error)
        assert not c.connected


@pytest_twisted.ensureDeferred
async def test_startTlsNotOfferedNeverFallsBackToPlaintext(aiosmtpdServer, certificateAuthority):
    server = aiosmtpdServer()
    c = client(server.port, encryptMode=EncryptMode.startTls, caCertFile=certificateAuthority.certFile)
    error = await failure(c.connect())
    assert isinstance(error, SMTPTLSError) and "STARTTLS" in str(error)
    assert not c.connected
    error = await failure(c.sendStream(io.BytesIO(MESSAGE)))
    assert "not connected" in str(error)
    assert server.handler.mailOptions == []


# ------------------------------------------------------ failures, promptly


@pytest_twisted.ensureDeferred
async def test_serverThatNeverGreetsTimesOut():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(5)  # The kernel accepts; nobody ever speaks.
        c = client(listener.getsockname()[1], timeout=300)
        started = time.monotonic()
        error = await failure(c.connect())
        assert isinstance(error, SMTPTimeoutError), error
        assert 0.25 < time.monotonic() - started < 2
        assert not c.connected


@pytest_twisted.ensureDeferred
async def test_connectionRefused():
    error = await failure(client(freePort()).connect())
    assert isinstance(error, SMTPConnectError) and "cannot connect" in str(error)


@pytest_twisted.ensureDeferred
async def test_callsBeforeConnectAndAfterFree(aiosmtpdServer):
    server = aiosmtpdServer()
    c = client(server.port)
    assert "not connected" in str(await failure(c.verify("ann")))
    await c.connect()
    await c.free()
    assert not c.connected
    assert "freed" in str(await failure(c.connect()))


# ---------------------------------------------------- random chunking


class Chunked(io.RawIOBase):
    """
    A stream whose reads return pieces of the sizes given, cycling.
    """

    def __init__(self, data: bytes, sizes: list[int]) -> None:
        self._data = data
        self._sizes = sizes
        self._at = 0
        self._reads = 0

    def readable(self):
        return True

    def read(self, size=-1):
        step = self._sizes[self._reads % len(self._sizes)]
        self._reads += 1
        piece = self._data[self._at : self._at + min(step, size if size >= 0 else step)]
        self._at += len(piece)
        return piece


bodies = st.lists(
    st.sampled_from([b".", b"..", b"\r", b"\n", b"\r\n", b"text", b" ", b"\xc3\xa9"]), max_size=60
).map(b"".join)


@pytest_twisted.ensureDeferred
async def test_streamedLineEndingCutInTwoDoesNotStall(aiosmtpdServer):
    """
    A CR and its LF read separately while streaming: the LF stuffs to
    nothing, which must not leave the transport waiting for a write that
    never comes.
    """
    import infsmtp._client.envelope as envelope
    import infsmtp._client.protocol as clientprotocol

    server = aiosmtpdServer()
    message = b"From: a@example.org\r\nTo: b@example.org\r\n\r\nbody\r\n"
    saved = envelope.READ_SIZE, clientprotocol.CHUNK_SIZE
    envelope.READ_SIZE = clientprotocol.CHUNK_SIZE = 1
    try:
        c = client(server.port, timeout=2000)
        await c.connect()
        assert await c.sendStream(Chunked(message, [1])) == {}
        await c.disconnect()
    finally:
        envelope.READ_SIZE, clientprotocol.CHUNK_SIZE = saved
    assert server.handler.messages[0][2] == message


@pytest.mark.parametrize("peer", ["aiosmtpd", "infsmtp"])
@pytest_twisted.ensureDeferred
async def test_randomChunkingReachesThePeerIntact(peer, aiosmtpdServer, ourServer):
    """
    Whatever the message and however its stream is cut, aiosmtpd and our
    own server receive it with CRLF line endings and its dots intact.
    Hypothesis drives the blocking Client from a worker thread (its
    examples cannot await).
    """
    import infsmtp._client.envelope as envelope
    import infsmtp._client.protocol as clientprotocol

    if peer == "aiosmtpd":
        server = aiosmtpdServer()
        port, lastMessage = server.port, lambda: server.handler.messages[-1][2]
    else:
        server = await ourServer()
        port, lastMessage = server.port, lambda: server.received[-1][2]

    @settings(max_examples=30, deadline=None, database=None)
    @given(bodies, st.lists(st.integers(1, 40), min_size=1, max_size=6))
    def check(body, sizes):
        message = b"From: a@example.org\r\nTo: b@example.org\r\n\r\n" + body
        expected = re.sub(rb"\r\n|\r|\n", b"\r\n", message)
        if not expected.endswith(b"\r\n"):
            expected += b"\r\n"
        with Client() as c:
            c.host, c.port, c.timeout = "127.0.0.1", port, 5000
            c.connect()
            c.sendStream(Chunked(message, sizes))
        assert lastMessage() == expected

    # Small reads, so that the streaming path (not only the one-write path)
    # meets the random cuts.
    saved = envelope.READ_SIZE, clientprotocol.CHUNK_SIZE
    envelope.READ_SIZE = clientprotocol.CHUNK_SIZE = 16
    try:
        await deferToThread(check)
    finally:
        envelope.READ_SIZE, clientprotocol.CHUNK_SIZE = saved


# ------------------------------------------------------ our own server


@pytest_twisted.ensureDeferred
async def test_ourServerManyMessagesOnOneConnection(ourServer, tmp_path):
    server = await ourServer()
    eml = tmp_path / "mail.eml"
    eml.write_bytes(MESSAGE)
    c = client(server.port)
    await c.connect()
    assert "PIPELINING" in c._protocol.extensions
    assert await c.sendFile(str(eml)) == {}
    refused = await c.sendStream(io.BytesIO(MESSAGE), None, ["bob@example.org", "nobody@example.org"])
    assert list(refused) == ["nobody@example.org"] and refused["nobody@example.org"][0] == 550
    error = await failure(c.sendStream(io.BytesIO(MESSAGE), None, ["nobody@example.org"]))
    assert isinstance(error, SMTPRecipientsRefused)
    error = await failure(c.sendStream(io.BytesIO(MESSAGE + b"\nREFUSE-ME\n")))
    assert error.code == 554
    eightBit = "From: a@example.org\nTo: b@example.org\n\ncaf\u00e9\n".encode()
    assert await c.sendStream(io.BytesIO(eightBit)) == {}
    await c.disconnect()

    first, second, refusedOne, third = server.received
    assert first[:3] == (
        "ann@example.org",
        ["bob@example.org", "cy@example.org", "eve@example.org"],
        RECEIVED,
    )
    assert second[1] == ["bob@example.org"] and second[2] == RECEIVED
    assert third[6].get("BODY") == "8BITMIME" and third[6].get("SIZE") == str(len(eightBit))
    assert len({r[3] for r in server.received}) == 1, "all messages on one connection"


@pytest_twisted.ensureDeferred
async def test_ourServerStartTlsAndAuthentication(ourServer, certificateAuthority):
    """
    STARTTLS, then AUTH, which our server offers only over TLS.
    """
    server = await ourServer(tls=True)

    def onLogin(session):
        return (session.username, session.password) == ("ann", GOOD_PASSWORD)

    server.onLogin = onLogin
    plain = client(server.port, authMode=AuthMode.default, username="ann", password=GOOD_PASSWORD)
    await plain.connect()
    assert "AUTH" not in plain._protocol.extensions
    error = await failure(plain.authenticate())
    assert "no usable authentication mechanism" in str(error)
    await plain.disconnect()

    settings = dict(
        encryptMode=EncryptMode.startTls,
        caCertFile=certificateAuthority.certFile,
        authMode=AuthMode.sasl,
        username="ann",
    )
    for mechanisms in (("CRAM-MD5", "PLAIN"), ("LOGIN",)):
        c = client(server.port, password="wrong", saslMechanisms=mechanisms, **settings)
        await c.connect()
        assert await c.authenticate() is False
        await c.disconnect()
        c = client(server.port, password=GOOD_PASSWORD, saslMechanisms=mechanisms, **settings)
        await c.connect()
        assert await c.authenticate() is True
        assert await c.sendStream(io.BytesIO(MESSAGE)) == {}
        await c.disconnect()
    assert [(r[2], r[4], r[5]) for r in server.received] == [(RECEIVED, True, "ann")] * 2


@pytest_twisted.ensureDeferred
async def test_serverClosingAnIdleSessionIsReportedWithItsReply(ourServer):
    """
    Parked after EHLO, the session may be closed by the server (421 on its
    idle timeout); the next call says so instead of a bare "not connected".
    """
    server = await ourServer(timeout=0.3)
    c = client(server.port)
    await c.connect()
    await c._protocol.whenLost().addTimeout(5, reactor)
    assert not c.connected
    error = await failure(c.sendStream(io.BytesIO(MESSAGE)))
    assert isinstance(error, SMTPConnectError) and error.code == 421
    assert "connect() again" in str(error)
    await c.connect()
    assert await c.sendStream(io.BytesIO(MESSAGE)) == {}
    await c.disconnect()


@pytest_twisted.ensureDeferred
async def test_ourServerImplicitTlsAndSizeLimit(ourServer, certificateAuthority):
    server = await ourServer(tls=True, implicitTls=True, maxMessageSize=1000)
    mailFroms = []
    server.onMailFrom = lambda session: mailFroms.append(session.address) or True
    c = client(server.port, encryptMode=EncryptMode.sslTls, caCertFile=certificateAuthority.certFile)
    await c.connect()
    assert await c.sendStream(io.BytesIO(MESSAGE)) == {}
    error = await failure(c.sendStream(io.BytesIO(MESSAGE + b"x" * 1000)))
    assert error.code == 552 and "size limit" in str(error)
    await c.disconnect()
    assert mailFroms == ["ann@example.org"], "the oversized message sent no MAIL"
    assert server.received[0][2] == RECEIVED


# ------------------------------------------------------------ smtp-sink


@pytest_twisted.ensureDeferred
async def test_smtpSinkManyMessagesOnOneConnection(smtpSink):
    """
    Postfix's smtp-sink (PIPELINING) takes 200 messages on one connection,
    each intact.
    """
    port, dumps = smtpSink(dump=True)
    c = client(port)
    await c.connect()
    for i in range(200):
        body = b"From: a@example.org\nTo: b@example.org\nBcc: c@example.org\n\n.dot %d\nend\n" % i
        assert await c.sendStream(io.BytesIO(body)) == {}
    await c.disconnect()
    texts = [p.read_bytes() for p in dumps.iterdir()]
    assert len(texts) == 200
    assert sorted(int(re.search(rb"\n\.dot (\d+)\n", t).group(1)) for t in texts) == list(range(200))
    assert all(b"X-Rcpt-Args: <c@example.org>" in t and b"Bcc:" not in t for t in texts)


# ------------------------------------------------------- blocking Client


def blockingSession(port: int, message: bytes) -> tuple[dict, str]:
    with Client() as c:
        c.host, c.port, c.timeout = "127.0.0.1", port, 5000
        c.connect()
        refused = c.sendStream(io.BytesIO(message))
        answer = c.verify("ann")
        c.disconnect()
    return refused, answer


@pytest_twisted.ensureDeferred
async def test_blockingClientFromWorkerThread(aiosmtpdServer):
    """
    Under a reactor the application runs (crochet.no_setup()), the blocking
    Client works from a worker thread.
    """
    server = aiosmtpdServer()
    refused, answer = await deferToThread(blockingSession, server.port, MESSAGE)
    assert refused == {} and answer == "2.1.5 Ann <ann@example.org>"
    assert server.handler.messages[0][2] == RECEIVED


@pytest_twisted.ensureDeferred
async def test_blockingCallInReactorThreadRaises(aiosmtpdServer):
    """
    In the reactor thread a blocking call would deadlock: it raises at once,
    pointing at AsyncClient, and nothing was scheduled.
    """
    server = aiosmtpdServer()
    c = Client()
    c.host, c.port = "127.0.0.1", server.port
    with pytest.raises(SMTPError, match="AsyncClient"):
        c.connect()
    assert not c.connected


SUBPROCESS_SCRIPT = textwrap.dedent(
    """
    import resource, sys
    from infsmtp import Client

    port, fileName = int(sys.argv[1]), sys.argv[2]
    client = Client()
    client.host, client.port, client.timeout = "127.0.0.1", port, 20000
    client.connect()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    refused = client.sendFile(fileName, "a@example.org", ["b@example.org"])
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    client.disconnect()
    client.free()
    print(refused, before, after)
    """
)


@pytest_twisted.ensureDeferred
async def test_blockingClientInSubprocessStreamsHundredMegabytes(smtpSink, tmp_path):
    """
    In a plain program the blocking Client starts crochet's reactor thread by
    itself; a 100 MB file goes out with memory staying flat.
    """
    port, _ = smtpSink()
    big = tmp_path / "big.eml"
    line = b"x" * 77 + b"\n"
    with open(big, "wb") as f:
        f.write(b"From: a@example.org\nTo: b@example.org\n\n")
        block = line * (1024 * 1024 // len(line))
        for _ in range(100):
            f.write(block)
    script = tmp_path / "send.py"
    script.write_text(SUBPROCESS_SCRIPT)
    out, err, code = await getProcessOutputAndValue(
        sys.executable,
        [str(script), str(port), str(big)],
        env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))},
        reactor=reactor,
    )
    assert code == 0, err.decode()
    refused, before, after = out.decode().split()
    assert refused == "{}"
    # ru_maxrss is in KiB: the peak grew by less than 30 MB for 100 MB sent.
    assert int(after) - int(before) < 30 * 1024, (before, after)


# ------------------------------------------------------- the blocking hop


@pytest_twisted.ensureDeferred
async def test_blockingCallTimeoutLeavesNoStrayWakeup():
    """
    A blocking call that times out is cancelled in the reactor, and the
    calls its thread makes next get their own results, not a late one.
    """
    from twisted.internet.defer import succeed

    from infsmtp._blocking import blockingCall

    cancelled = []

    def never():
        return Deferred(lambda d: cancelled.append(True))

    answered = threading.Event()

    def late():
        # Answers after the caller gave up (and its call was cancelled).
        d = Deferred()

        def answer():
            if not d.called:
                d.callback("late")
            answered.set()

        reactor.callLater(0.1, answer)
        return d

    def run():
        outcomes = []
        for function in (never, late):
            try:
                blockingCall("x()", "y()", function, timeout=0.02)
            except SMTPTimeoutError as e:
                outcomes.append(str(e))
        assert answered.wait(10)  # The late answer has come and gone.
        outcomes += [blockingCall("x()", "y()", succeed, n) for n in range(3)]
        return outcomes

    assert await deferToThread(run) == [
        "x() did not finish within 0.02 seconds",
        "x() did not finish within 0.02 seconds",
        0,
        1,
        2,
    ]
    assert cancelled == [True]


@pytest_twisted.ensureDeferred
async def test_blockingCallFailureRaisesInTheCallingThread():
    from infsmtp._blocking import blockingCall

    def broken():
        raise SMTPError(451, "broken")

    def run():
        with pytest.raises(SMTPError, match="broken") as info:
            blockingCall("x()", "y()", broken)
        return info.value.code

    assert await deferToThread(run) == 451


STOPPING_SCRIPT = textwrap.dedent(
    """
    import crochet
    crochet.no_setup()
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred
    from infsmtp._blocking import blockingCall

    outcomes = []

    def worker():
        for _ in range(2):
            try:
                blockingCall("x()", "y()", Deferred)
            except crochet.ReactorStopped:
                outcomes.append("ReactorStopped")

    # A thread of the reactor's pool, which the reactor joins as it stops.
    reactor.callWhenRunning(reactor.callInThread, worker)
    reactor.callLater(0.3, reactor.stop)
    reactor.run()
    print(outcomes)
    """
)


def test_blockingCallsFailWhenTheReactorStops(tmp_path):
    """
    A call waiting when the reactor stops raises crochet.ReactorStopped, as
    does one made afterwards, instead of waiting for ever.
    """
    script = tmp_path / "stopping.py"
    script.write_text(STOPPING_SCRIPT)
    result = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[0] == "['ReactorStopped', 'ReactorStopped']"

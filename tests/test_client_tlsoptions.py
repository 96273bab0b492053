"""
The client's TLS options (issue 11, item 6, and item 11's serverHostname)
against aiosmtpd over loopback: opportunistic STARTTLS, client
certificates, the protocol range, a connection creator of one's own, and
the name verified instead of the host connected to.

What the client sends before TLS is read on the wire itself, through a
recording proxy, so "nothing in plaintext" is checked, not assumed.
"""

from __future__ import annotations

import io
import re
import socket
import ssl
import threading

import pytest
import pytest_twisted
from peertools import EphemeralController, freePort
from test_client_interop import MESSAGE, RECEIVED, failure, serverContext
from test_client_unit import RecordingTransport, failureOf, fromCoroutine
from twisted.internet import reactor
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.protocol import Factory
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.threads import deferToThread
from twisted.protocols import portforward
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from zope.interface import directlyProvides

from infsmtp import AsyncClient, Client, EncryptMode, SMTPConnectError, SMTPError, SMTPTLSError, TLSVersion
from infsmtp._client.protocol import ESMTPSessionClient
from infsmtp.testing import CertificateAuthority

#: The bound on a wait that the client's own timeout does not bound.
WAIT = 20.0


class TLSRecorder:
    """
    An aiosmtpd handler keeping, per message, whether it came over TLS and
    the subject of the client's certificate, if any; and each MAIL.
    """

    def __init__(self) -> None:
        self.messages: list[tuple[bool, object, bytes]] = []
        self.mails: list[str] = []

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        self.mails.append(address)
        envelope.mail_from = address
        return "250 2.1.0 OK"

    async def handle_DATA(self, server, session, envelope):
        tls = session.ssl is not None
        peer = session.ssl["ssl_object"].getpeercert() if tls else None
        subject = dict(pair[0] for pair in peer["subject"]) if peer else None
        self.messages.append((tls, subject, envelope.original_content))
        return "250 2.0.0 OK"


@pytest.fixture
def aiosmtpd():
    """
    A factory of running aiosmtpd servers: ``start(**SMTPkeywords)``, each
    with its ``TLSRecorder`` as ``.handler``.
    """
    controllers = []

    def start(**keywords):
        handler = TLSRecorder()
        controller = EphemeralController(handler, hostname="127.0.0.1", port=0, **keywords)
        controller.start()
        controllers.append(controller)
        controller.handler = handler
        return controller

    yield start
    for controller in controllers:
        controller.stop()


class RecordingProxy(portforward.ProxyServer):
    def dataReceived(self, data: bytes) -> None:
        self.factory.sent.append(data)
        super().dataReceived(data)


@pytest.fixture
def recordingProxy():
    """
    ``start(port)``: a TCP proxy to 127.0.0.1:port on a port of its own,
    (its own in ``.listenPort``) whose ``.sent`` keeps every chunk the client sent, in order.
    """
    ports = []

    def start(port: int):
        factory = portforward.ProxyFactory("127.0.0.1", port)
        factory.protocol = RecordingProxy
        factory.noisy = False
        factory.sent = []
        listening = reactor.listenTCP(0, factory, interface="127.0.0.1")
        ports.append(listening)
        factory.listenPort = listening.getHost().port
        return factory

    yield start
    for port in ports:
        port.stopListening()


def client(port: int, **settings) -> AsyncClient:
    return AsyncClient(host="127.0.0.1", port=port, timeout=5000, heloName="client.test", **settings)


async def sendOne(c: AsyncClient) -> None:
    assert await c.sendStream(io.BytesIO(MESSAGE)) == {}


def clientContextFor(authority, leaf, **versions) -> ssl.SSLContext:
    """
    A server context that requires a client certificate from ``authority``.
    """
    context = serverContext(leaf)
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(authority.certFile)
    for name, value in versions.items():
        setattr(context, name, value)
    return context


# ------------------------------------------------------------ opportunistic


def test_opportunisticIsANewModeNeverTheDefault():
    assert EncryptMode.opportunistic == 3
    assert AsyncClient().encryptMode is EncryptMode.none
    assert Client.encryptMode.opportunistic is EncryptMode.opportunistic


@pytest_twisted.ensureDeferred
async def test_opportunisticPlaintextWhenStartTlsIsNotOffered(aiosmtpd, certificateAuthority):
    server = aiosmtpd()
    c = client(server.port, encryptMode=EncryptMode.opportunistic, caCertFile=certificateAuthority.certFile)
    assert (c.secure, c.tlsVersion) == (False, None)
    await c.connect()
    assert not c.supportsExtension("STARTTLS")
    assert (c.secure, c.tlsVersion) == (False, None)
    await sendOne(c)
    await c.disconnect()
    assert server.handler.messages == [(False, None, RECEIVED)]


@pytest_twisted.ensureDeferred
async def test_opportunisticEncryptsWhenStartTlsIsOffered(aiosmtpd, certificateAuthority, recordingProxy):
    server = aiosmtpd(tls_context=serverContext(certificateAuthority.localhost))
    proxy = recordingProxy(server.port)
    c = client(proxy.listenPort, encryptMode=EncryptMode.opportunistic, caCertFile=certificateAuthority.certFile)
    await c.connect()
    assert (c.secure, c.tlsVersion) == (True, "TLSv1.3")
    await sendOne(c)
    await c.disconnect()
    assert (c.secure, c.tlsVersion) == (False, None)
    assert server.handler.messages == [(True, None, RECEIVED)]
    # In plaintext only EHLO and STARTTLS; then a TLS handshake record.
    sent = b"".join(proxy.sent)
    assert sent.startswith(b"EHLO client.test\r\nSTARTTLS\r\n\x16\x03")
    assert b"MAIL" not in sent


@pytest_twisted.ensureDeferred
async def test_opportunisticNeverFallsBackAfterABadCertificate(aiosmtpd, certificateAuthority, recordingProxy, tmp_path):
    """
    A server that offers STARTTLS with a certificate that does not verify:
    SMTPTLSError, and nothing of the mail in plaintext.  Turning
    verification off (Postfix's "may") is an explicit choice that works.
    """
    stranger = CertificateAuthority.create(str(tmp_path / "stranger"), "stranger CA")
    server = aiosmtpd(tls_context=serverContext(stranger.issue("localhost", "127.0.0.1")))
    proxy = recordingProxy(server.port)
    c = client(proxy.listenPort, encryptMode=EncryptMode.opportunistic, caCertFile=certificateAuthority.certFile)
    error = await failure(c.connect())
    assert isinstance(error, SMTPTLSError) and "certificate verify failed" in str(error), error
    assert not c.connected and not c.secure
    error = await failure(sendOne(c))
    assert "not connected" in str(error)
    sent = b"".join(proxy.sent)
    assert sent.startswith(b"EHLO client.test\r\nSTARTTLS\r\n\x16\x03")
    assert b"MAIL" not in sent and server.handler.mails == []

    c = client(server.port, encryptMode=EncryptMode.opportunistic, verifyServerCertificate=False)
    await c.connect()
    assert c.secure
    await sendOne(c)
    await c.disconnect()
    assert server.handler.messages == [(True, None, RECEIVED)]


class RefusesStartTls(LineReceiver):
    """
    Offers STARTTLS and answers it 454; keeps every line it hears.
    """

    heard: list[bytes]

    def connectionMade(self) -> None:
        self.sendLine(b"220 refuses.test ESMTP")

    def lineReceived(self, line: bytes) -> None:
        self.factory.heard.append(line)
        verb = line.split(b" ", 1)[0].upper()
        if verb == b"EHLO":
            self.sendLine(b"250-refuses.test\r\n250 STARTTLS")
        elif verb == b"STARTTLS":
            self.sendLine(b"454 4.7.0 TLS not available due to temporary reason")
        elif verb == b"QUIT":
            self.sendLine(b"221 bye")
            self.transport.loseConnection()
        else:
            self.sendLine(b"250 OK")


@pytest_twisted.ensureDeferred
async def test_opportunisticRefusedStartTlsFailsClosed(certificateAuthority):
    factory = Factory.forProtocol(RefusesStartTls)
    factory.heard = []
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    try:
        c = client(port.getHost().port, encryptMode=EncryptMode.opportunistic, caCertFile=certificateAuthority.certFile)
        error = await failure(c.connect())
        assert isinstance(error, SMTPTLSError) and error.code == 454, error
        assert not c.connected
        assert factory.heard == [b"EHLO client.test", b"STARTTLS", b"QUIT"]
    finally:
        await port.stopListening()


def blockingOpportunistic(port: int, caCertFile: str) -> tuple[bool, str | None, bool]:
    with Client(host="127.0.0.1", port=port, timeout=5000, caCertFile=caCertFile) as c:
        c.encryptMode = Client.encryptMode.opportunistic
        c.connect()
        state = (c.secure, c.tlsVersion)
        c.disconnect()
        return (*state, c.secure)


@pytest_twisted.ensureDeferred
async def test_blockingClientTellsWhetherTheSessionIsEncrypted(aiosmtpd, certificateAuthority):
    withTls = aiosmtpd(tls_context=serverContext(certificateAuthority.localhost))
    plain = aiosmtpd()
    for server, expected in [(withTls, (True, "TLSv1.3", False)), (plain, (False, None, False))]:
        state = await deferToThread(blockingOpportunistic, server.port, certificateAuthority.certFile).addTimeout(
            WAIT, reactor
        )
        assert state == expected


# ------------------------------------------------------ client certificates


@pytest.fixture(scope="module")
def clientCertificate(certificateAuthority, tmp_path_factory):
    """
    A client certificate from the test CA: ``.certFile`` and ``.keyFile``
    apart, and ``.both`` with the key in the same file.
    """
    leaf = certificateAuthority.issue("client.test", client=True, prefix="client")
    both = tmp_path_factory.mktemp("client") / "both.pem"
    with open(leaf.certFile, "rb") as cert, open(leaf.keyFile, "rb") as key:
        both.write_bytes(cert.read() + key.read())
    leaf.both = str(both)
    return leaf


@pytest_twisted.ensureDeferred
async def test_clientCertificateIsWhatTheServerSees(aiosmtpd, certificateAuthority, clientCertificate):
    server = aiosmtpd(tls_context=clientContextFor(certificateAuthority, certificateAuthority.localhost))
    base = dict(encryptMode=EncryptMode.startTls, caCertFile=certificateAuthority.certFile)
    for files in [
        dict(certFile=clientCertificate.certFile, keyFile=clientCertificate.keyFile),
        dict(certFile=clientCertificate.both),
    ]:
        c = client(server.port, **base, **files)
        await c.connect()
        await sendOne(c)
        await c.disconnect()
    assert server.handler.messages == [(True, {"commonName": "client.test"}, RECEIVED)] * 2

    # Without one, this server ends the handshake (without an alert, so
    # the client can only tell that TLS did not come up).
    c = client(server.port, **base)
    error = await failure(c.connect())
    assert isinstance(error, SMTPTLSError) and "before TLS was up" in str(error), error
    assert len(server.handler.messages) == 2


@pytest_twisted.ensureDeferred
async def test_clientCertificateOverImplicitTls(certificateAuthority, clientCertificate):
    """
    sslTls shows the certificate in the first handshake (Python's ssl
    module as the server, which checks it).
    """
    context = clientContextFor(certificateAuthority, certificateAuthority.localhost)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(WAIT)
    seen = []

    def serve():
        raw, _ = listener.accept()
        raw.settimeout(WAIT)
        with context.wrap_socket(raw, server_side=True) as tls:
            seen.append(dict(pair[0] for pair in tls.getpeercert()["subject"]))
            reader = tls.makefile("rb")
            tls.sendall(b"220 tls.test ESMTP\r\n")
            reader.readline()  # EHLO
            tls.sendall(b"250 tls.test\r\n")
            reader.readline()  # QUIT
            tls.sendall(b"221 bye\r\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        c = client(
            listener.getsockname()[1],
            encryptMode=EncryptMode.sslTls,
            caCertFile=certificateAuthority.certFile,
            certFile=clientCertificate.both,
        )
        await c.connect()
        assert c.secure
        await c.disconnect()
        await deferToThread(thread.join, WAIT).addTimeout(WAIT, reactor)
        assert seen == [{"commonName": "client.test"}]
    finally:
        listener.close()


@pytest_twisted.ensureDeferred
async def test_unusableClientCertificateFailsBeforeConnecting(certificateAuthority, clientCertificate, tmp_path):
    """
    Nothing listens on the port: each error is SMTPTLSError, not
    SMTPConnectError, because the files are read before connecting.
    """
    junk = tmp_path / "junk.pem"
    junk.write_text("hello")
    other = certificateAuthority.issue("other.test", prefix="other")
    port = freePort()
    for files, expected in [
        (dict(certFile=str(tmp_path / "nope.pem")), "cannot read certFile .*nope.pem"),
        (dict(certFile=str(junk), keyFile=clientCertificate.keyFile), "certFile .*junk.pem holds no PEM certificate"),
        (dict(certFile=clientCertificate.certFile), "client.pem holds no usable PEM private key"),
        (dict(certFile=clientCertificate.certFile, keyFile=str(junk)), "junk.pem holds no usable PEM private key"),
        (dict(certFile=clientCertificate.certFile, keyFile=other.keyFile), "key .*other.key does not match certificate .*client.pem"),
        (dict(keyFile=clientCertificate.keyFile), "keyFile is set without certFile"),
    ]:
        for mode in (EncryptMode.sslTls, EncryptMode.startTls, EncryptMode.opportunistic):
            error = await failure(client(port, encryptMode=mode, **files).connect())
            assert isinstance(error, SMTPTLSError), (files, error)
            assert re.search(expected, str(error)), (expected, str(error))
    # The same settings with a plaintext session are never read: no TLS.
    error = await failure(client(port, certFile=str(junk)).connect())
    assert isinstance(error, SMTPConnectError), error


# ---------------------------------------------------------------- versions


@pytest_twisted.ensureDeferred
async def test_protocolRange(aiosmtpd, certificateAuthority):
    context = serverContext(certificateAuthority.localhost)
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    upTo12 = aiosmtpd(tls_context=context)
    modern = aiosmtpd(tls_context=serverContext(certificateAuthority.localhost))
    base = dict(encryptMode=EncryptMode.startTls, caCertFile=certificateAuthority.certFile)

    c = client(upTo12.port, minProtocol=TLSVersion.tls1_3, **base)
    error = await failure(c.connect())
    # aiosmtpd hangs up without an alert that would say why.
    assert isinstance(error, SMTPTLSError) and "before TLS was up" in str(error), error
    # The default range takes what this server has.
    c = client(upTo12.port, **base)
    await c.connect()
    assert c.tlsVersion == "TLSv1.2"
    await c.disconnect()

    for settings, version in [({}, "TLSv1.3"), ({"maxProtocol": TLSVersion.tls1_2}, "TLSv1.2")]:
        c = client(modern.port, **base, **settings)
        await c.connect()
        assert c.tlsVersion == version
        await sendOne(c)
        await c.disconnect()
    assert [tls for tls, _, _ in modern.handler.messages] == [True, True]


@pytest_twisted.ensureDeferred
async def test_protocolRangeUpsideDownFailsBeforeConnecting():
    c = client(freePort(), encryptMode=EncryptMode.startTls, minProtocol=TLSVersion.tls1_3, maxProtocol=4)
    assert c.maxProtocol is TLSVersion.tls1_2
    error = await failure(c.connect())
    assert isinstance(error, SMTPTLSError), error
    assert str(error) == "minProtocol tls1_3 is above maxProtocol tls1_2"
    assert Client.minProtocol.tls1_3 is TLSVersion.tls1_3
    assert (Client().minProtocol, Client().maxProtocol) == (TLSVersion.tls1_2, TLSVersion.tls1_3)


# --------------------------------------------------- a creator of one's own


def ownCreator(authority, name: str):
    with open(authority.certFile, "rb") as f:
        return optionsForClientTLS(name, trustRoot=Certificate.loadPEM(f.read()))


@pytest_twisted.ensureDeferred
async def test_ownConnectionCreatorIsUsedAsIs(aiosmtpd, certificateAuthority):
    """
    The certificate names only mail.example.test: the client's own checks
    would refuse it for 127.0.0.1, so success means the creator decided.
    """
    leaf = certificateAuthority.issue("mail.example.test", prefix="own")
    implicit = aiosmtpd(ssl_context=serverContext(leaf))
    startTls = aiosmtpd(tls_context=serverContext(leaf))
    for server, mode in [(implicit, EncryptMode.sslTls), (startTls, EncryptMode.startTls), (startTls, EncryptMode.opportunistic)]:
        c = client(server.port, encryptMode=mode, tlsConnectionCreator=ownCreator(certificateAuthority, "mail.example.test"))
        await c.connect()
        assert c.secure
        await sendOne(c)
        await c.disconnect()
        c = client(server.port, encryptMode=mode, caCertFile=certificateAuthority.certFile)
        error = await failure(c.connect())
        assert isinstance(error, SMTPTLSError) and "host name" in str(error), error
    assert len(implicit.handler.messages) == 1 and len(startTls.handler.messages) == 2


@pytest_twisted.ensureDeferred
async def test_ownConnectionCreatorWithOtherTlsSettingsIsRefused(certificateAuthority):
    creator = ownCreator(certificateAuthority, "localhost")
    port = freePort()
    for name, value in [
        ("caCertFile", certificateAuthority.certFile),
        ("certFile", certificateAuthority.localhost.certFile),
        ("keyFile", certificateAuthority.localhost.keyFile),
        ("verifyServerCertificate", False),
        ("minProtocol", TLSVersion.tls1_3),
        ("maxProtocol", TLSVersion.tls1_2),
        ("useLegacyServerConnect", True),
        ("allowUnsafeLegacyRenegotiation", True),
    ]:
        c = client(port, encryptMode=EncryptMode.startTls, tlsConnectionCreator=creator, **{name: value})
        error = await failure(c.connect())
        assert isinstance(error, SMTPTLSError), (name, error)
        assert f"cannot be combined with {name} " in str(error), error
    c = client(port, encryptMode=EncryptMode.sslTls, tlsConnectionCreator=object())
    error = await failure(c.connect())
    assert isinstance(error, SMTPError) and "must provide IOpenSSLClientConnectionCreator" in str(error), error


# ---------------------------------------------------------- serverHostname


@pytest_twisted.ensureDeferred
async def test_serverHostnameIsVerifiedAndSentBySni(aiosmtpd, certificateAuthority):
    leaf = certificateAuthority.issue("mail.example.test", prefix="byname")
    names = []
    contexts = []
    for _ in range(2):
        context = serverContext(leaf)
        context.sni_callback = lambda sslObject, name, context: names.append(name)
        contexts.append(context)
    implicit = aiosmtpd(ssl_context=contexts[0])
    startTls = aiosmtpd(tls_context=contexts[1])
    # The controller's own check that the implicit server is up.
    names.clear()
    for server, mode in [(implicit, EncryptMode.sslTls), (startTls, EncryptMode.startTls)]:
        c = client(server.port, encryptMode=mode, caCertFile=certificateAuthority.certFile)
        error = await failure(c.connect())
        assert isinstance(error, SMTPTLSError) and "host name" in str(error), error
        c.serverHostname = "mail.example.test"
        await c.connect()
        assert c.secure and c.host == "127.0.0.1"
        await sendOne(c)
        await c.disconnect()
    # None for the address (RFC 6066: no literal addresses in SNI).
    assert names == [None, "mail.example.test", None, "mail.example.test"], names


# ------------------------------------------- hang-ups during the handshake


def test_ourOwnAbortBeforeTlsIsUpIsNotCalledATlsFailure():
    """
    Over a TLS transport, a connection lost before the first reply is a
    TLS failure; our own abort (free() while connecting) stays what it is.
    """
    outcomes = []
    for end in ("peer", "us"):
        protocol = ESMTPSessionClient("client.test", 5)
        transport = RecordingTransport()
        directlyProvides(transport, ISSLTransport)
        transport.protocol = protocol
        protocol.makeConnection(transport)
        greeted = fromCoroutine(protocol.whenGreeted())
        if end == "peer":
            protocol.connectionLost(Failure(ConnectionLost("reset")))
        else:
            protocol.abort()
        error = failureOf(greeted)
        outcomes.append((type(error), error.text.split(",")[0]))
    assert outcomes == [
        (SMTPTLSError, "TLS failed: the connection to the server was lost (Connection to the other side was lost in a non-clean fashion: reset.)"),
        (SMTPConnectError, "the connection was closed by the client"),
    ]

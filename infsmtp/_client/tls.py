"""
The client's TLS settings: which certificates it trusts, which name it
checks, which certificate it shows, which protocol versions and legacy
OpenSSL behaviours it allows.

Used for ``sslTls`` (TLS from the first byte), ``startTls`` and
``opportunistic``.  Every file is read and every combination checked
before the client connects: a mistake in the settings never reaches the
wire, and never quietly weakens what was asked for.
"""

from __future__ import annotations

import re
from typing import Any

from OpenSSL import SSL, crypto
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, ISSLTransport
from twisted.internet.ssl import (
    Certificate,
    CertificateOptions,
    optionsForClientTLS,
    trustRootFromCertificates,
)
from zope.interface import implementer

from .._enums import TLSVersion
from .._errors import SMTPTLSError
from .._pem import loadKeyPair

#: OpenSSL's ``SSL_OP_LEGACY_SERVER_CONNECT``: talk to servers that do not
#: support secure renegotiation (RFC 5746).
OP_LEGACY_SERVER_CONNECT = getattr(SSL, "OP_LEGACY_SERVER_CONNECT", 0x00000004)

#: OpenSSL's ``SSL_OP_ALLOW_UNSAFE_LEGACY_RENEGOTIATION``.
OP_ALLOW_UNSAFE_LEGACY_RENEGOTIATION = 0x00040000

_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----", re.DOTALL
)


#: The client settings a ``tlsConnectionCreator`` of the user's own takes
#: the place of, with their defaults: one changed beside such a creator is
#: an error, since the creator would silently ignore it.
CREATOR_REPLACES: dict[str, object] = {
    "verifyServerCertificate": True,
    "caCertFile": None,
    "certFile": None,
    "keyFile": None,
    "minProtocol": TLSVersion.tls1_2,
    "maxProtocol": TLSVersion.tls1_3,
    "useLegacyServerConnect": False,
    "allowUnsafeLegacyRenegotiation": False,
}


def connectionCreatorFor(client: Any) -> IOpenSSLClientConnectionCreator:
    """
    The connection creator for a client's TLS settings, read by their
    attribute names (see :class:`infsmtp.AsyncClient`): its own
    ``tlsConnectionCreator`` as is, or one built by
    :func:`clientTLSOptions` for ``serverHostname`` (else ``host``).

    :raises SMTPTLSError: when ``tlsConnectionCreator`` does not provide
        ``IOpenSSLClientConnectionCreator`` or comes with a setting of
        :data:`CREATOR_REPLACES` changed; as :func:`clientTLSOptions` does.
    """
    own = client.tlsConnectionCreator
    if own is not None:
        if not IOpenSSLClientConnectionCreator.providedBy(own):
            raise SMTPTLSError(
                f"tlsConnectionCreator must provide IOpenSSLClientConnectionCreator "
                f"(optionsForClientTLS() makes one), not {type(own).__name__}"
            )
        changed = [name for name, default in CREATOR_REPLACES.items() if getattr(client, name) != default]
        if changed:
            raise SMTPTLSError(
                f"tlsConnectionCreator decides every TLS setting itself: it cannot be combined "
                f"with {', '.join(changed)} (set them on the creator instead)"
            )
        return own
    return clientTLSOptions(
        client.serverHostname or client.host,
        verify=client.verifyServerCertificate,
        caCertFile=client.caCertFile,
        certFile=client.certFile,
        keyFile=client.keyFile,
        minimumVersion=client.minProtocol,
        maximumVersion=client.maxProtocol,
        legacyServerConnect=client.useLegacyServerConnect,
        unsafeLegacyRenegotiation=client.allowUnsafeLegacyRenegotiation,
    )


def clientTLSOptions(
    host: str,
    *,
    verify: bool = True,
    caCertFile: str | None = None,
    certFile: str | None = None,
    keyFile: str | None = None,
    minimumVersion: TLSVersion = TLSVersion.tls1_2,
    maximumVersion: TLSVersion = TLSVersion.tls1_3,
    legacyServerConnect: bool = False,
    unsafeLegacyRenegotiation: bool = False,
) -> IOpenSSLClientConnectionCreator:
    """
    Build what Twisted needs to start TLS towards ``host``.

    With ``verify`` (the default) the server's chain must lead to a trusted
    root (``caCertFile``'s certificates when given, else the system's) and
    its certificate must name ``host`` (checked by ``service_identity``).
    Without it, any certificate is accepted: an explicit choice, never a
    fallback.  The server name is sent (SNI) whenever ``host`` is a DNS name.

    :param certFile: the client's certificate (PEM, leaf first, its chain
        after it), shown when the server asks for one.
    :param keyFile: its private key (PEM, unencrypted); ``None`` when it is
        in ``certFile``.
    :param minimumVersion: the oldest TLS version accepted.
    :param maximumVersion: the newest TLS version offered.
    :param legacyServerConnect: set ``SSL_OP_LEGACY_SERVER_CONNECT``.
    :param unsafeLegacyRenegotiation: set
        ``SSL_OP_ALLOW_UNSAFE_LEGACY_RENEGOTIATION``.
    :raises SMTPTLSError: when ``caCertFile`` cannot be read or holds no
        certificate; when ``certFile`` or ``keyFile`` cannot be read, holds
        no certificate or key, or the key does not match the certificate;
        when ``minimumVersion`` is above ``maximumVersion``.
    """
    minimumVersion, maximumVersion = TLSVersion(minimumVersion), TLSVersion(maximumVersion)
    if minimumVersion > maximumVersion:
        raise SMTPTLSError(
            f"minProtocol {minimumVersion.name} is above maxProtocol {maximumVersion.name}"
        )
    extra: dict[str, Any] = {
        # Exactly the range asked for: raiseMinimumTo would keep Twisted's
        # own minimum when it is higher.
        "insecurelyLowerMinimumTo": minimumVersion.twisted,
        "lowerMaximumSecurityTo": maximumVersion.twisted,
    }
    if certFile is not None or keyFile is not None:
        if not certFile:
            raise SMTPTLSError("keyFile is set without certFile")
        chain, key = loadKeyPair(certFile, keyFile or certFile, "certFile")
        # pyOpenSSL takes cryptography's objects directly.
        extra.update(privateKey=key, certificate=chain[0], extraCertChain=chain[1:])
    creator: IOpenSSLClientConnectionCreator
    if verify:
        trustRoot = _loadTrustRoot(caCertFile) if caCertFile else None
        creator = optionsForClientTLS(host, trustRoot, extraCertificateOptions=extra)
    else:
        creator = _ConnectionSettings(CertificateOptions(verify=False, **extra), serverName=host)
    options = (OP_LEGACY_SERVER_CONNECT if legacyServerConnect else 0) | (
        OP_ALLOW_UNSAFE_LEGACY_RENEGOTIATION if unsafeLegacyRenegotiation else 0
    )
    if options:
        creator = _ConnectionSettings(creator, options=options)
    return creator


def negotiatedVersion(transport: object) -> str | None:
    """
    The TLS version protecting ``transport`` (``"TLSv1.3"``), or ``None``
    when it is plaintext.
    """
    if not ISSLTransport.providedBy(transport):
        return None
    try:
        # Twisted's TLS transports, and a TCP one after startTLS, hand out
        # the SSL.Connection.
        return transport.getHandle().get_protocol_version_name()  # type: ignore[attr-defined]
    except Exception:
        return "TLS"


def _loadTrustRoot(caCertFile: str):
    try:
        with open(caCertFile, "rb") as f:
            pem = f.read()
    except OSError as e:
        raise SMTPTLSError(f"cannot read caCertFile {caCertFile!r}: {e.strerror}") from None
    blocks = _PEM_CERTIFICATE.findall(pem)
    if not blocks:
        raise SMTPTLSError(f"caCertFile {caCertFile!r} holds no PEM certificate")
    try:
        return trustRootFromCertificates([Certificate.loadPEM(b) for b in blocks])
    except crypto.Error as e:
        raise SMTPTLSError(f"caCertFile {caCertFile!r} holds a bad certificate: {e}") from None


@implementer(IOpenSSLClientConnectionCreator)
class _ConnectionSettings:
    """
    Wrap a connection creator to adjust each connection it makes: send a
    server name (SNI), or set OpenSSL options on that connection only.
    """

    def __init__(
        self, creator: object, *, serverName: str | None = None, options: int = 0
    ) -> None:
        self._creator = creator
        self._options = options
        self._serverName = None
        if serverName and not (isIPAddress(serverName) or isIPv6Address(serverName)):
            # RFC 6066 forbids literal addresses as server names.
            self._serverName = serverName.encode("idna")

    def clientConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        connection = self._creator.clientConnectionForTLS(tlsProtocol)  # type: ignore[attr-defined]
        if self._serverName is not None:
            connection.set_tlsext_host_name(self._serverName)
        if self._options:
            connection.set_options(self._options)
        return connection

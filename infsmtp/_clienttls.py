"""
The client's TLS settings: which certificates it trusts, which name it
checks, which protocol versions and legacy OpenSSL behaviours it allows.

Used for both ``sslTls`` (TLS from the first byte) and ``startTls``.
"""

from __future__ import annotations

import re

from OpenSSL import SSL, crypto
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.ssl import (
    Certificate,
    CertificateOptions,
    optionsForClientTLS,
    trustRootFromCertificates,
)
from zope.interface import implementer

from ._enums import TLSVersion
from ._errors import SMTPTLSError

#: OpenSSL's ``SSL_OP_LEGACY_SERVER_CONNECT``: talk to servers that do not
#: support secure renegotiation (RFC 5746).
OP_LEGACY_SERVER_CONNECT = getattr(SSL, "OP_LEGACY_SERVER_CONNECT", 0x00000004)

#: OpenSSL's ``SSL_OP_ALLOW_UNSAFE_LEGACY_RENEGOTIATION``.
OP_ALLOW_UNSAFE_LEGACY_RENEGOTIATION = 0x00040000

_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----", re.DOTALL
)


def clientTLSOptions(
    host: str,
    *,
    verify: bool = True,
    caCertFile: str | None = None,
    minimumVersion: TLSVersion = TLSVersion.tls1_2,
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

    :param minimumVersion: the oldest TLS version accepted.
    :param legacyServerConnect: set ``SSL_OP_LEGACY_SERVER_CONNECT``.
    :param unsafeLegacyRenegotiation: set
        ``SSL_OP_ALLOW_UNSAFE_LEGACY_RENEGOTIATION``.
    :raises SMTPTLSError: when ``caCertFile`` cannot be read or holds no
        certificate.
    """
    extra = {"raiseMinimumTo": minimumVersion.twisted}
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

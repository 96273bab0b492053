"""
Server TLS context building: PEM files in, Twisted's L{CertificateOptions}
out, with every problem reported at load time in one clear sentence.
"""

from __future__ import annotations

import ssl as _stdlibSSL
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL, crypto
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.internet.ssl import CertificateOptions
from zope.interface import implementer

from ._enums import TLSVersion
from ._errors import SMTPTLSError


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise SMTPTLSError(f"cannot read {what} {path}: {e.strerror}") from None


def loadCertificates(path: str, what: str = "certificate file") -> list[x509.Certificate]:
    """
    All certificates of a PEM file, in order (leaf first for a chain file).

    @raise SMTPTLSError: unreadable, or no certificate in it.
    """
    data = _read(path, what)
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError:
        certificates = []
    if not certificates:
        raise SMTPTLSError(f"{what} {path} holds no PEM certificate")
    return certificates


def loadKey(path: str):
    """
    The private key of a PEM file (unencrypted).

    @raise SMTPTLSError: unreadable, encrypted or not a key.
    """
    data = _read(path, "key file")
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise SMTPTLSError(f"key file {path} is encrypted; give an unencrypted key") from None
    except (ValueError, Exception):
        raise SMTPTLSError(f"key file {path} holds no usable PEM private key") from None


def _publicBytes(key) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def loadKeyPair(
    certFile: str, keyFile: str, what: str = "certificate file"
) -> tuple[list[x509.Certificate], Any]:
    """
    The certificates of C{certFile} (leaf first) and the private key of
    C{keyFile}, which may be the same file.  Used by the server's
    certificate and the client's.

    @raise SMTPTLSError: a file is unreadable or holds no certificate or no
        usable key, or the key does not match the leaf certificate.
    """
    chain = loadCertificates(certFile, what)
    key = loadKey(keyFile)
    if _publicBytes(key.public_key()) != _publicBytes(chain[0].public_key()):
        raise SMTPTLSError(f"key {keyFile} does not match certificate {certFile}")
    return chain, key


def verifyChain(
    chain: list[x509.Certificate], roots: list[x509.Certificate] | None, certFile: str
) -> None:
    """
    Check that C{chain} (leaf first) leads to a trusted root: C{roots} when
    given, else the system's trust store.  Dates are checked too.

    @raise SMTPTLSError: with OpenSSL's reason.
    """
    store = crypto.X509Store()
    if roots:
        for root in roots:
            store.add_cert(crypto.X509.from_cryptography(root))
    else:
        paths = _stdlibSSL.get_default_verify_paths()
        store.load_locations(paths.cafile, paths.capath)
    leaf = crypto.X509.from_cryptography(chain[0])
    intermediates = [crypto.X509.from_cryptography(c) for c in chain[1:]]
    try:
        crypto.X509StoreContext(store, leaf, chain=intermediates).verify_certificate()
    except crypto.X509StoreContextError as e:
        raise SMTPTLSError(f"certificate {certFile} does not verify: {e}") from None


def serverTLSOptions(
    certFile: str,
    keyFile: str,
    rootCertFile: str | None,
    verify: bool,
    minProtocol: TLSVersion,
    maxProtocol: TLSVersion,
) -> CertificateOptions:
    """
    Build the server's TLS options from PEM files.

    The certificate file may hold the chain after the leaf; C{rootCertFile}
    adds more chain certificates (and is the trust root for C{verify}).
    The key must always match the certificate: a mismatch can never serve a
    handshake, so it is reported here rather than at the first client.

    @raise SMTPTLSError: a file is missing or unusable, the key does not
        match, or (with C{verify}) the chain does not verify.
    """
    minProtocol, maxProtocol = TLSVersion(minProtocol), TLSVersion(maxProtocol)
    if minProtocol > maxProtocol:
        raise SMTPTLSError(
            f"minProtocol {minProtocol.name} is above maxProtocol {maxProtocol.name}"
        )
    chain, key = loadKeyPair(certFile, keyFile)
    roots = loadCertificates(rootCertFile, "root certificate file") if rootCertFile else []
    if verify:
        verifyChain(chain, roots or None, certFile)
    extra = chain[1:] + [r for r in roots if r != chain[0] and r not in chain]
    # pyOpenSSL takes cryptography's objects directly (its own are deprecated).
    return CertificateOptions(
        privateKey=key,
        certificate=chain[0],
        extraCertChain=extra,
        insecurelyLowerMinimumTo=minProtocol.twisted,
        lowerMaximumSecurityTo=maxProtocol.twisted,
        # Resumption for clients that offer it (Postfix's smtp client keeps
        # its sessions): an abbreviated handshake skips the certificate and
        # the signature, most of a STARTTLS's cost.  Tickets, not a session
        # cache: the server keeps nothing per client (the ticket is the
        # session, encrypted under a key of this context, which a renewed
        # certificate replaces), so memory stays flat.  Twisted leaves them
        # off for servers that mishandle an empty ticket extension in the
        # hello; that is a client-side worry, and OpenSSL's server is fine.
        enableSessionTickets=True,
    )


@implementer(IOpenSSLServerConnectionCreator)
class CurrentCertificate:
    """
    The TLS options a running server hands each new connection: whichever
    were set last, so that L{Server.setCertificate} on a running server (a
    renewed certificate) takes effect for the next connection without a
    restart, while connections already up keep theirs.

    @ivar options: the current L{CertificateOptions}, or L{None}.
    """

    def __init__(self, options: CertificateOptions | None = None) -> None:
        self.options = options

    def serverConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        # What Twisted does for a context factory, through public calls:
        # a connection on the current options' context.
        if self.options is None:
            raise SMTPTLSError("no certificate set")
        return SSL.Connection(self.options.getContext(), None)

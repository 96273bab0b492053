"""
Server TLS context building: PEM files in, Twisted's L{CertificateOptions}
out, with every problem reported at load time in one clear sentence.
"""

from __future__ import annotations

import re
import ssl as _stdlibSSL
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL, crypto
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.internet.ssl import CertificateOptions
from zope.interface import implementer

from .._enums import TLSVersion
from .._errors import SMTPTLSError


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


def certificateHostname(hostname: str) -> str:
    """
    C{hostname} as L{CurrentCertificate} keys it: lower case, IDNA
    (A-labels), a wildcard only as the whole first label.

    @raise SMTPTLSError: when it is no host name.
    """
    name = hostname.strip().rstrip(".").lower()
    wildcard = name.startswith("*.")
    labels = (name[2:] if wildcard else name).split(".")
    try:
        encoded = [label.encode("idna").decode("ascii") for label in labels]
    except UnicodeError:
        encoded = []
    if not encoded or not all(_LABEL.fullmatch(label) for label in encoded):
        raise SMTPTLSError(f"hostname {hostname!r} is not a host name (or *.domain)")
    return ("*." if wildcard else "") + ".".join(encoded)


def checkCertificateNames(certFile: str, hostname: str) -> None:
    """
    Check that the certificate in C{certFile} is valid for C{hostname}
    (as L{certificateHostname} gives it): a client asking for that name
    would otherwise refuse it, so it is an error now.

    @raise SMTPTLSError: when it names it not.
    """
    leaf = loadCertificates(certFile)[0]
    try:
        names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dnsNames = [n.lower() for n in names.get_values_for_type(x509.DNSName)]
    except x509.ExtensionNotFound:
        dnsNames = []
    if hostname.startswith("*."):
        ok = hostname in dnsNames
    else:
        parent = hostname.split(".", 1)[1] if "." in hostname else None
        ok = hostname in dnsNames or (parent is not None and "*." + parent in dnsNames)
    if not ok:
        raise SMTPTLSError(
            f"certificate {certFile} is not valid for {hostname} "
            f"(it names {', '.join(dnsNames) or 'no DNS name'})"
        )


_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


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
    )


@implementer(IOpenSSLServerConnectionCreator)
class CurrentCertificate:
    """
    The TLS options a running server hands each new connection: whichever
    were set last, so that L{Server.setCertificate} on a running server (a
    renewed certificate) takes effect for the next connection without a
    restart, while connections already up keep theirs.

    With certificates for host names (L{setNamed}), a client that asks for
    one of those names by SNI (RFC 6066) gets its certificate; any other
    client, the default one.

    @ivar options: the current default L{CertificateOptions}, or L{None}.
    """

    def __init__(self, options: CertificateOptions | None = None) -> None:
        self._options = options
        # Host name (lower case; "*.example.org" for a wildcard) -> options.
        self._byName: dict[str, CertificateOptions] = {}
        # The options whose context has the servername callback, and the
        # last ones a connection was made with (OpenSSL contexts cannot
        # change once used).
        self._choosing: CertificateOptions | None = None
        self._used: CertificateOptions | None = None
        self._install()

    @property
    def options(self) -> CertificateOptions | None:
        return self._options

    @options.setter
    def options(self, options: CertificateOptions | None) -> None:
        self._options = options
        self._install()

    def setNamed(self, hostname: str, options: CertificateOptions) -> None:
        """
        Serve C{options} to clients asking for C{hostname} (a lower-case
        name, or C{"*.example.org"} for any one label under it).
        """
        self._byName[hostname] = options
        self._install()

    @property
    def choosesByName(self) -> bool:
        """
        Whether every certificate set for a name is served: false when a
        name was added after the default context served a connection, which
        then needs fresh default options (L{Server.setCertificate} does it).
        """
        return not self._byName or self._choosing is self._options

    def _install(self) -> None:
        # The choice by name happens in OpenSSL's servername callback, set
        # on the default context once and only when there are names (no
        # cost per handshake otherwise): it moves a connection to the named
        # certificate's context.
        options = self._options
        if options is None or not self._byName or self._choosing is options or self._used is options:
            return
        options.getContext().set_tlsext_servername_callback(self._chooseByName)
        self._choosing = options

    def _chooseByName(self, connection: SSL.Connection) -> None:
        asked = connection.get_servername()
        if not asked:
            return
        name = asked.decode("ascii", "replace").lower().rstrip(".")
        options = self._byName.get(name)
        if options is None and "." in name:
            options = self._byName.get("*." + name.split(".", 1)[1])
        if options is not None:
            connection.set_context(options.getContext())

    def serverConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        # What Twisted does for a context factory, through public calls:
        # a connection on the current options' context.
        options = self._options
        if options is None:
            raise SMTPTLSError("no certificate set")
        self._used = options
        return SSL.Connection(options.getContext(), None)

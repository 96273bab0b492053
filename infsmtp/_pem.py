"""
Certificates and keys from PEM files, with every problem reported at load
time in one clear sentence; shared by the server's and the client's TLS.
"""

from __future__ import annotations

import ssl as _stdlibSSL
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import crypto

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

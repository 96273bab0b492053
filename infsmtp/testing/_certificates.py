"""
Helpers for testing code that uses infsmtp: a throwaway certificate
authority that issues certificates for loopback names.

    >>> authority = CertificateAuthority.create(tmpPath)
    >>> leaf = authority.issue("localhost")
    >>> server.setCertificate(leaf.certFile, leaf.keyFile, authority.certFile)

Uses ``cryptography``, which ``twisted[tls]`` already brings.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _writeKey(key: ec.EllipticCurvePrivateKey, path: str) -> None:
    with open(path, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )


def _writeCert(cert: x509.Certificate, path: str) -> None:
    with open(path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))


@dataclass
class IssuedCertificate:
    """
    PEM files of a leaf certificate and its key.
    """

    certFile: str
    keyFile: str


@dataclass
class CertificateAuthority:
    """
    A self-signed CA kept in a folder, able to issue server certificates.
    """

    directory: str
    certFile: str
    keyFile: str
    _key: ec.EllipticCurvePrivateKey
    _cert: x509.Certificate

    @classmethod
    def create(cls, directory: str, name: str = "infsmtp test CA") -> "CertificateAuthority":
        os.makedirs(directory, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        certFile = os.path.join(directory, "ca.pem")
        keyFile = os.path.join(directory, "ca.key")
        _writeCert(cert, certFile)
        _writeKey(key, keyFile)
        return cls(directory, certFile, keyFile, key, cert)

    def issue(self, *names: str, prefix: str | None = None, client: bool = False) -> IssuedCertificate:
        """
        Issue a server certificate for C{names} (DNS names or IP addresses);
        with C{client}, one that may also authenticate a TLS client (servers
        that check client certificates want the clientAuth key usage).
        """
        names = names or ("localhost", "127.0.0.1")
        key = ec.generate_private_key(ec.SECP256R1())
        sans: list[x509.GeneralName] = []
        for n in names:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(n)))
            except ValueError:
                sans.append(x509.DNSName(n))
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(self._cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH] + ([ExtendedKeyUsageOID.CLIENT_AUTH] if client else [])
                ),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
            .sign(self._key, hashes.SHA256())
        )
        stem = os.path.join(self.directory, prefix or names[0].replace(":", "_"))
        leaf = IssuedCertificate(stem + ".pem", stem + ".key")
        _writeCert(cert, leaf.certFile)
        _writeKey(key, leaf.keyFile)
        return leaf

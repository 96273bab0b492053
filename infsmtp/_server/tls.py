"""
Server TLS context building: PEM files in, the standard library's
C{ssl.SSLContext} out, with every problem reported at load time in one
clear sentence; and the choice of context per connection (renewal, SNI).
"""

from __future__ import annotations

import os
import re
import ssl
import tempfile
import warnings

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from .._enums import TLSVersion
from .._errors import SMTPTLSError
from .._pem import loadCertificates, loadKeyPair, verifyChain


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


#: The standard library's names for the versions.
_STDLIB_VERSION = {
    TLSVersion.tls1_0: ssl.TLSVersion.TLSv1,
    TLSVersion.tls1_1: ssl.TLSVersion.TLSv1_1,
    TLSVersion.tls1_2: ssl.TLSVersion.TLSv1_2,
    TLSVersion.tls1_3: ssl.TLSVersion.TLSv1_3,
}


def serverTLSOptions(
    certFile: str,
    keyFile: str,
    rootCertFile: str | None,
    verify: bool,
    minProtocol: TLSVersion,
    maxProtocol: TLSVersion,
) -> ssl.SSLContext:
    """
    Build the server's TLS context from PEM files.

    The certificate file may hold the chain after the leaf; C{rootCertFile}
    adds more chain certificates (and is the trust root for C{verify}).
    The key must always match the certificate: a mismatch can never serve a
    handshake, so it is reported here rather than at the first client.

    It is the standard library's context, for L{infsmtp._server.tlslayer}:
    its C{ssl.SSLObject} costs a fraction of pyOpenSSL's calls per
    handshake and per record (issue 15).

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
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with warnings.catch_warnings():
        # TLS 1.0 and 1.1 are deprecated; whoever sets them asked for them.
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = _STDLIB_VERSION[minProtocol]
        context.maximum_version = _STDLIB_VERSION[maxProtocol]
    if minProtocol < TLSVersion.tls1_2:
        # Asked for explicitly: OpenSSL's default security level refuses
        # TLS 1.0 and 1.1 (their SHA-1 signatures) whatever the versions
        # allow, and a setting that can never work is worse than none.
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
    # No client-initiated renegotiation (TLS 1.2): a handshake's CPU for the
    # price of a few bytes, which nothing in SMTP needs.
    context.options |= ssl.OP_NO_RENEGOTIATION
    # Resumption for clients that offer it (Postfix's smtp client keeps its
    # sessions): an abbreviated handshake skips the certificate and the
    # signature, most of a STARTTLS's cost.  Tickets (the standard
    # library's default), not a session cache: the server keeps nothing
    # per client (the ticket is the session, encrypted under a key of this
    # context, which a renewed certificate replaces), so memory stays flat.
    # One TLS 1.3 ticket rather than two: an SMTP client resumes its last
    # session, one connection at a time, and each resumption brings a new
    # ticket; the second cost ~15 us of every full handshake.
    context.num_tickets = 1
    # load_cert_chain reads files only: the leaf and the chain it is to
    # send, written to a private temporary file (certificates, no secret).
    pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in [chain[0], *extra])
    fd, path = tempfile.mkstemp(prefix="infsmtp-chain-", suffix=".pem")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        context.load_cert_chain(path, keyFile)
    except (OSError, ssl.SSLError) as e:
        raise SMTPTLSError(f"certificate {certFile} with key {keyFile} cannot serve TLS: {e}") from None
    finally:
        os.unlink(path)
    del key
    return context


class CurrentCertificate:
    """
    The TLS context a running server hands each new connection: whichever
    was set last, so that L{Server.setCertificate} on a running server (a
    renewed certificate) takes effect for the next connection without a
    restart, while connections already up keep theirs.

    With certificates for host names (L{setNamed}), a client that asks for
    one of those names by SNI (RFC 6066) gets its certificate; any other
    client, the default one.

    @ivar options: the current default C{ssl.SSLContext}, or L{None}.
    """

    def __init__(self, options: ssl.SSLContext | None = None) -> None:
        self._options = options
        # Host name (lower case; "*.example.org" for a wildcard) -> context.
        self._byName: dict[str, ssl.SSLContext] = {}
        self._install()

    @property
    def options(self) -> ssl.SSLContext | None:
        return self._options

    @options.setter
    def options(self, options: ssl.SSLContext | None) -> None:
        self._options = options
        self._install()

    def setNamed(self, hostname: str, options: ssl.SSLContext) -> None:
        """
        Serve C{options} to clients asking for C{hostname} (a lower-case
        name, or C{"*.example.org"} for any one label under it).
        """
        self._byName[hostname] = options
        self._install()

    def _install(self) -> None:
        # The choice by name happens in OpenSSL's servername callback, set
        # on the default context only when there are names (no cost per
        # handshake otherwise): it moves a connection to the named
        # certificate's context.  (The standard library's contexts take a
        # callback at any time, even once they have served connections.)
        options = self._options
        if options is not None and self._byName:
            options.sni_callback = self._chooseByName

    def _chooseByName(self, connection: ssl.SSLObject, asked: str | None, context: ssl.SSLContext) -> None:
        if not asked:
            return
        # An A-label already (the standard library hands IDNs that way).
        name = asked.lower().rstrip(".")
        options = self._byName.get(name)
        if options is None and "." in name:
            options = self._byName.get("*." + name.split(".", 1)[1])
        if options is not None:
            connection.context = options

    def serverSide(self, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO) -> ssl.SSLObject:
        """
        The server's side of a new TLS connection, on the current context,
        reading records from C{incoming} and writing them to C{outgoing}.
        """
        options = self._options
        if options is None:
            raise SMTPTLSError("no certificate set")
        return options.wrap_bio(incoming, outgoing, server_side=True)

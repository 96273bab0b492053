"""
Server TLS context building: PEM files in, Twisted's L{CertificateOptions}
out, with every problem reported at load time in one clear sentence.
"""

from __future__ import annotations

import re

from cryptography import x509
from OpenSSL import SSL
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.internet.ssl import CertificateOptions
from zope.interface import implementer

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

"""
The reference's enumerations: encryption and authentication modes of the
client, and the TLS protocol versions both sides accept.
"""

from __future__ import annotations

from enum import IntEnum

from twisted.internet.ssl import TLSVersion as _TwistedTLSVersion


class EncryptMode(IntEnum):
    """
    How the client protects its connection.

    - ``none``: plaintext.
    - ``sslTls``: TLS from the first byte (RFC 8314, usually port 465).
    - ``startTls``: plaintext, then ``STARTTLS``; never falls back to plaintext.
    - ``opportunistic``: ``STARTTLS`` when the server offers it, plaintext
      when it does not.  A STARTTLS that fails (refused, a failed handshake,
      a certificate that does not verify) is still an error: only a server
      that never offered TLS gets plaintext.  Never the default.
    """

    none = 0
    sslTls = 1
    startTls = 2
    opportunistic = 3


class AuthMode(IntEnum):
    """
    How the client authenticates.

    - ``none``: no authentication.
    - ``default``: username and password, PLAIN or else LOGIN.
    - ``sasl``: the first mechanism of ``saslMechanisms`` the server offers.
    """

    none = 0
    default = 1
    sasl = 2


class TLSVersion(IntEnum):
    """
    TLS protocol versions, numbered as the reference numbers them.

    >>> TLSVersion.tls1_2.twisted
    <TLSVersion.TLSv1_2>
    """

    tls1_0 = 2
    tls1_1 = 3
    tls1_2 = 4
    tls1_3 = 5

    @property
    def twisted(self) -> _TwistedTLSVersion:
        """
        The matching L{twisted.internet.ssl.TLSVersion}.
        """
        return _TWISTED[self]

    @classmethod
    def fromName(cls, name: str) -> "TLSVersion":
        """
        Parse ``'1.2'``, ``'tls1_2'``, ``'TLSv1.2'`` and the like.

        @raise ValueError: for an unknown version.
        """
        key = name.strip().lower().replace("tlsv", "").replace("tls", "")
        key = key.replace("_", ".").lstrip(".")
        for member in cls:
            if member.name.replace("tls", "").replace("_", ".") == key:
                return member
        raise ValueError(f"unknown TLS version {name!r} (use 1.0, 1.1, 1.2 or 1.3)")


_TWISTED = {
    TLSVersion.tls1_0: _TwistedTLSVersion.TLSv1_0,
    TLSVersion.tls1_1: _TwistedTLSVersion.TLSv1_1,
    TLSVersion.tls1_2: _TwistedTLSVersion.TLSv1_2,
    TLSVersion.tls1_3: _TwistedTLSVersion.TLSv1_3,
}


class EnumAttribute:
    """
    A data descriptor that makes the reference's spelling work both ways:
    ``Client.encryptMode.sslTls`` on the class yields the enumeration, while
    ``client.encryptMode`` on an instance yields that instance's setting.

    Setting a value coerces it through the enumeration, so ``1`` and
    ``EncryptMode.sslTls`` are the same setting and ``7`` is refused.
    """

    def __init__(self, enum: type[IntEnum], default: IntEnum) -> None:
        self.enum = enum
        self.default = default
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = "_" + name

    def __get__(self, instance: object, owner: type | None = None):
        if instance is None:
            return self.enum
        return instance.__dict__.get(self.name, self.default)

    def __set__(self, instance: object, value: object) -> None:
        instance.__dict__[self.name] = self.enum(value)

"""
The PROXY protocol (HAProxy's, versions 1 and 2) in front of the server, for
C{haproxy:} listeners.

Twisted ships a wrapper for it, but that one connects the wrapped protocol
at once, so an SMTP server would greet before it knows who the client is,
and it waits for the header forever.  This one:

- holds the SMTP session back until the header is in, so the greeting (and
  C{onConnect}) come after it and C{session.ip}/C{port} are the proxied
  client's;
- closes a connection that sends no complete header within a few seconds,
  or sends anything but a header first.

L{ProxyHeaderParser} is the sans-I/O part: bytes in, a L{ProxyHeader} out.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.interfaces import IAddress, IHandshakeListener, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from zope.interface import directlyProvides, implementer, providedBy

log = Logger(namespace="infsmtp.proxy")

V1_PREFIX = b"PROXY "
#: Version 1 headers are at most 107 bytes, CRLF included.
V1_MAX = 107
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V2_FIXED = struct.Struct("!BBH")  # version/command, family/transport, length


class ProxyHeaderError(ValueError):
    """
    What came first is not a valid PROXY protocol header.
    """


@dataclass(frozen=True)
class ProxyHeader:
    """
    A parsed PROXY header.

    @ivar source: the client's address as the proxy saw it, or L{None} when
        the header carries none (v1 C{UNKNOWN}, v2 C{LOCAL} or an
        unspecified family): the connection's own address stands then.
    @ivar destination: the address the client connected to, or L{None}.
    """

    source: IAddress | None
    destination: IAddress | None


def _port(text: bytes) -> int:
    if not text.isdigit() or len(text) > 5 or (len(text) > 1 and text.startswith(b"0")):
        raise ProxyHeaderError(f"bad port {text!r}")
    value = int(text)
    if value > 65535:
        raise ProxyHeaderError(f"bad port {text!r}")
    return value


def parseV1(line: bytes) -> ProxyHeader:
    """
    Parse a version 1 header line, CRLF excluded
    (C{PROXY TCP4 192.0.2.1 198.51.100.2 56324 25}).
    """
    parts = line.split(b" ")
    if parts[0] != b"PROXY" or len(parts) < 2:
        raise ProxyHeaderError("not a PROXY v1 header")
    family = parts[1]
    if family == b"UNKNOWN":
        return ProxyHeader(None, None)
    if family not in (b"TCP4", b"TCP6") or len(parts) != 6:
        raise ProxyHeaderError(f"bad PROXY v1 header {line[:V1_MAX]!r}")
    try:
        source = ipaddress.ip_address(parts[2].decode("ascii"))
        destination = ipaddress.ip_address(parts[3].decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise ProxyHeaderError(f"bad address in PROXY v1 header {line!r}") from None
    version = 4 if family == b"TCP4" else 6
    if source.version != version or destination.version != version:
        raise ProxyHeaderError(f"{family.decode()} with an IPv{source.version} address")
    address = IPv4Address if version == 4 else IPv6Address
    return ProxyHeader(
        address("TCP", str(source), _port(parts[4])),
        address("TCP", str(destination), _port(parts[5])),
    )


def parseV2(command: int, family: int, body: bytes) -> ProxyHeader:
    """
    Parse the address block of a version 2 header (TLVs after it are
    ignored).

    @param command: the low nibble of byte 13 (0 LOCAL, 1 PROXY).
    @param family: byte 14 (address family and transport).
    """
    if command == 0:
        return ProxyHeader(None, None)  # LOCAL: the proxy's own health check
    if command != 1:
        raise ProxyHeaderError(f"unknown PROXY v2 command {command}")
    addressFamily, transport = family >> 4, family & 0x0F
    if addressFamily == 0:
        return ProxyHeader(None, None)
    if transport != 1:
        raise ProxyHeaderError("PROXY v2 header for a non-stream transport")
    if addressFamily == 1:
        if len(body) < 12:
            raise ProxyHeaderError("short PROXY v2 IPv4 address block")
        src, dst, sport, dport = struct.unpack("!4s4sHH", body[:12])
        return ProxyHeader(
            IPv4Address("TCP", str(ipaddress.IPv4Address(src)), sport),
            IPv4Address("TCP", str(ipaddress.IPv4Address(dst)), dport),
        )
    if addressFamily == 2:
        if len(body) < 36:
            raise ProxyHeaderError("short PROXY v2 IPv6 address block")
        src, dst, sport, dport = struct.unpack("!16s16sHH", body[:36])
        return ProxyHeader(
            IPv6Address("TCP", str(ipaddress.IPv6Address(src)), sport),
            IPv6Address("TCP", str(ipaddress.IPv6Address(dst)), dport),
        )
    if addressFamily == 3:
        if len(body) < 216:
            raise ProxyHeaderError("short PROXY v2 UNIX address block")
        src, dst = body[:108].split(b"\0", 1)[0], body[108:216].split(b"\0", 1)[0]
        return ProxyHeader(UNIXAddress(src), UNIXAddress(dst))
    raise ProxyHeaderError(f"unknown PROXY v2 address family {addressFamily}")


class ProxyHeaderParser:
    """
    Finds the PROXY header at the start of a connection, whichever version,
    however the bytes are split.

        >>> parser = ProxyHeaderParser()
        >>> parser.feed(b"PROXY TCP4 192.0.2.1 192.0.2.2 4000 25\\r\\nEHLO")
        (ProxyHeader(source=IPv4Address(...), ...), b'EHLO')

    The buffer is bounded: a v1 header is at most 107 bytes, a v2 header
    says its own length.
    """

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> tuple[ProxyHeader, bytes] | None:
        """
        Add bytes.

        @return: L{None} while the header is incomplete; then the header and
            the bytes that followed it.
        @raise ProxyHeaderError: the connection does not start with a
            valid header.
        """
        buffer = self._buffer = self._buffer + data
        if buffer.startswith(V2_SIGNATURE[:1]) and V2_SIGNATURE.startswith(buffer[:12]):
            return self._v2(buffer)
        if V1_PREFIX.startswith(buffer[:6]):
            return self._v1(buffer)
        raise ProxyHeaderError("the connection did not start with a PROXY header")

    def _v1(self, buffer: bytes) -> tuple[ProxyHeader, bytes] | None:
        end = buffer.find(b"\r\n", 0, V1_MAX)
        if end < 0:
            if len(buffer) >= V1_MAX:
                raise ProxyHeaderError("PROXY v1 header longer than 107 bytes")
            return None
        return parseV1(buffer[:end]), buffer[end + 2 :]

    def _v2(self, buffer: bytes) -> tuple[ProxyHeader, bytes] | None:
        fixed = len(V2_SIGNATURE) + _V2_FIXED.size
        if len(buffer) < fixed:
            return None
        versionCommand, family, length = _V2_FIXED.unpack_from(buffer, len(V2_SIGNATURE))
        if versionCommand >> 4 != 2:
            raise ProxyHeaderError(f"unknown PROXY protocol version {versionCommand >> 4}")
        if len(buffer) < fixed + length:
            return None
        header = parseV2(versionCommand & 0x0F, family, buffer[fixed : fixed + length])
        return header, buffer[fixed + length :]


@implementer(IHandshakeListener)
class ProxyProtocolWrapper(ProtocolWrapper):
    """
    Reads the PROXY header, then connects the wrapped protocol with the
    proxied addresses as its peer and host.
    """

    factory: ProxyProtocolFactory
    _header: ProxyHeader | None = None
    _timer: Any = None

    def makeConnection(self, transport: Any) -> None:
        # ProtocolWrapper's, except that the wrapped protocol is connected
        # only once the header is in (see dataReceived).
        directlyProvides(self, providedBy(transport))
        Protocol.makeConnection(self, transport)
        self.factory.registerProtocol(self)

    def connectionMade(self) -> None:
        self._parser = ProxyHeaderParser()
        self._timer = self.factory.clock.callLater(self.factory.headerTimeout, self._timedOut)

    def _timedOut(self) -> None:
        self._timer = None
        log.info(
            "closing {peer}: no PROXY header within {timeout:g} seconds",
            peer=self.transport.getPeer(),
            timeout=self.factory.headerTimeout,
        )
        self.transport.loseConnection()

    def _cancelTimer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def dataReceived(self, data: bytes) -> None:
        if self._header is not None:
            self.wrappedProtocol.dataReceived(data)
            return
        if self._timer is None:
            return  # timed out or refused; the connection is going away
        try:
            parsed = self._parser.feed(data)
        except ProxyHeaderError as e:
            self._cancelTimer()
            log.info("closing {peer}: {error}", peer=self.transport.getPeer(), error=str(e))
            self.transport.loseConnection()
            return
        if parsed is None:
            return
        self._cancelTimer()
        self._header, rest = parsed
        del self._parser
        self.wrappedProtocol.makeConnection(self)
        if rest and not self.disconnecting:
            self.wrappedProtocol.dataReceived(rest)

    def connectionLost(self, reason: Any) -> None:
        self._cancelTimer()
        if self._header is not None:
            super().connectionLost(reason)
        else:
            self.factory.unregisterProtocol(self)

    def getPeer(self) -> IAddress:
        if self._header is not None and self._header.source is not None:
            return self._header.source
        return self.transport.getPeer()

    def getHost(self) -> IAddress:
        if self._header is not None and self._header.destination is not None:
            return self._header.destination
        return self.transport.getHost()

    def handshakeCompleted(self) -> None:
        # STARTTLS puts TLS under this wrapper; pass its news on.
        if IHandshakeListener.providedBy(self.wrappedProtocol):
            self.wrappedProtocol.handshakeCompleted()


class ProxyProtocolFactory(WrappingFactory):
    """
    Wraps a server factory so that each connection starts with a PROXY
    header (v1 or v2).

    @param wrappedFactory: the factory of the protocol behind the header.
    @param headerTimeout: seconds to wait for the complete header.
    @param clock: the L{IReactorTime} for that timeout.
    """

    protocol = ProxyProtocolWrapper  # type: ignore[assignment]
    noisy = False

    def __init__(self, wrappedFactory: Any, headerTimeout: float = 5.0, clock: IReactorTime | None = None) -> None:
        super().__init__(wrappedFactory)
        if clock is None:
            from twisted.internet import reactor as clock  # type: ignore[assignment]
        self.clock = clock
        self.headerTimeout = headerTimeout

    def logPrefix(self) -> str:
        return "PROXY"

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

The header is peer-supplied text that ends up in the EHLO reply, the
C{Received:} header and the log, so it is checked field by field against
the grammar of HAProxy's C{proxy-protocol.txt} and nothing else passes:
addresses made only of the characters their textual form allows (no scope
ids, no whitespace, no control characters), ports in ASCII decimal without
leading zeros, single spaces, CRLF and never a bare CR or LF.  Version 2
TLVs must fit in the header and UNIX paths must be printable.  Error
messages quote the peer's bytes with C{repr}, cut short.
"""

from __future__ import annotations

import ipaddress
import re
import struct
from dataclasses import dataclass
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from zope.interface import directlyProvides, providedBy

log = Logger(namespace="infsmtp.proxy")

V1_PREFIX = b"PROXY "
#: Version 1 headers are at most 107 bytes, CRLF included.
V1_MAX = 107
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V2_FIXED = struct.Struct("!BBH")  # version/command, family/transport, length
_V2_TLV = struct.Struct("!BH")  # type, length of the value
#: The address block of each v2 family: 2 addresses (+ 2 ports for IP).
_V2_ADDRESS_SIZE = {1: 12, 2: 36, 3: 216}

# A v1 line is US-ASCII text; printable bytes only, so that a bare CR or
# LF, a NUL or an ESC is refused wherever it appears.
_V1_FORBIDDEN = re.compile(rb"[^\x20-\x7e]")
# What the textual forms may contain, checked before ipaddress sees them:
# ipaddress accepts an IPv6 scope id ("%" and then anything, LF included).
_ADDRESS_TEXT = {
    4: re.compile(rb"[0-9.]{7,15}"),
    6: re.compile(rb"[0-9A-Fa-f:.]{2,45}"),
}
_PORT_TEXT = re.compile(rb"0|[1-9][0-9]{0,4}")
# UNIX paths are shown in logs and replies: printable ASCII, no spaces.
_UNIX_PATH = re.compile(rb"[\x21-\x7e]*")
#: How much of a peer's bytes an error message quotes.
QUOTE_MAX = 40


def _quote(text: bytes) -> str:
    """
    C{text} as an error message may show it: escaped by C{repr} (no line
    breaks or control characters reach the log) and cut to L{QUOTE_MAX}
    bytes.
    """
    if len(text) > QUOTE_MAX:
        return f"{bytes(text[:QUOTE_MAX])!r}..."
    return repr(bytes(text))


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
    # Decimal, no leading zeros (the spec forbids them: octal confusion).
    if _PORT_TEXT.fullmatch(text) is None or int(text) > 65535:
        raise ProxyHeaderError(f"bad port {_quote(text)}")
    return int(text)


def _address(text: bytes, version: int) -> str:
    """
    The address C{text} of IP C{version} in its canonical form.
    """
    if _ADDRESS_TEXT[version].fullmatch(text) is None:
        raise ProxyHeaderError(f"bad IPv{version} address {_quote(text)}")
    # ipaddress refuses leading zeros in a dotted quad (octal confusion)
    # since Python 3.9.5, as the spec does.
    factory = ipaddress.IPv4Address if version == 4 else ipaddress.IPv6Address
    try:
        return str(factory(text.decode("ascii")))
    except ValueError:
        raise ProxyHeaderError(f"bad IPv{version} address {_quote(text)}") from None


def _refuseByte(line: bytes, position: int) -> None:
    raise ProxyHeaderError(f"byte {_quote(line[position : position + 1])} in PROXY v1 header {_quote(line)}")


def parseV1(line: bytes) -> ProxyHeader:
    """
    Parse a version 1 header line, CRLF excluded
    (C{PROXY TCP4 192.0.2.1 198.51.100.2 56324 25}).

    C{PROXY UNKNOWN} may be followed by anything printable, which the spec
    says to ignore; C{TCP4} and C{TCP6} lines must match the grammar
    exactly.
    """
    forbidden = _V1_FORBIDDEN.search(line)
    if forbidden is not None:
        _refuseByte(line, forbidden.start())
    parts = line.split(b" ")
    if parts[0] != b"PROXY" or len(parts) < 2:
        raise ProxyHeaderError(f"not a PROXY v1 header: {_quote(line)}")
    family = parts[1]
    if family == b"UNKNOWN":
        return ProxyHeader(None, None)
    if family not in (b"TCP4", b"TCP6") or len(parts) != 6:
        raise ProxyHeaderError(f"bad PROXY v1 header {_quote(line)}")
    version = 4 if family == b"TCP4" else 6
    address = IPv4Address if version == 4 else IPv6Address
    return ProxyHeader(
        address("TCP", _address(parts[2], version), _port(parts[4])),
        address("TCP", _address(parts[3], version), _port(parts[5])),
    )


def _checkTLVs(data: bytes) -> None:
    # The values are ignored, but a header whose TLVs do not add up to its
    # length is not one the proxy wrote.
    offset = 0
    while offset < len(data):
        if len(data) - offset < _V2_TLV.size:
            raise ProxyHeaderError("truncated TLV in PROXY v2 header")
        _, length = _V2_TLV.unpack_from(data, offset)
        offset += _V2_TLV.size + length
        if offset > len(data):
            raise ProxyHeaderError("TLV runs past the end of the PROXY v2 header")


def _unixPath(field: bytes) -> bytes:
    # NUL-terminated and NUL-padded; what follows the first NUL (padding,
    # or the name of an abstract socket) is ignored.
    path = field.split(b"\0", 1)[0]
    if _UNIX_PATH.fullmatch(path) is None:
        raise ProxyHeaderError(f"bad UNIX path in PROXY v2 header {_quote(path)}")
    return path


def parseV2(command: int, family: int, body: bytes) -> ProxyHeader:
    """
    Parse the address block of a version 2 header and check the framing of
    the TLVs after it (their values are ignored).

    @param command: the low nibble of byte 13 (0 LOCAL, 1 PROXY).
    @param family: byte 14 (address family and transport).
    @param body: the C{length} bytes after the fixed part.
    """
    if command == 0:
        return ProxyHeader(None, None)  # LOCAL: the proxy's own health check
    if command != 1:
        raise ProxyHeaderError(f"unknown PROXY v2 command {command}")
    addressFamily, transport = family >> 4, family & 0x0F
    if addressFamily > 3 or transport > 2:
        raise ProxyHeaderError(f"unknown PROXY v2 address family/transport 0x{family:02x}")
    if addressFamily == 0:
        # UNSPEC: the spec says to ignore the block, whose layout it leaves
        # open; the connection's own addresses stand.
        return ProxyHeader(None, None)
    if transport != 1:
        raise ProxyHeaderError("PROXY v2 header for a non-stream transport")
    size = _V2_ADDRESS_SIZE[addressFamily]
    if len(body) < size:
        raise ProxyHeaderError(f"short PROXY v2 address block ({len(body)} bytes, family 0x{family:02x})")
    _checkTLVs(body[size:])
    if addressFamily == 1:
        src, dst, sport, dport = struct.unpack_from("!4s4sHH", body)
        return ProxyHeader(
            IPv4Address("TCP", str(ipaddress.IPv4Address(src)), sport),
            IPv4Address("TCP", str(ipaddress.IPv4Address(dst)), dport),
        )
    if addressFamily == 2:
        src, dst, sport, dport = struct.unpack_from("!16s16sHH", body)
        return ProxyHeader(
            IPv6Address("TCP", str(ipaddress.IPv6Address(src)), sport),
            IPv6Address("TCP", str(ipaddress.IPv6Address(dst)), dport),
        )
    return ProxyHeader(UNIXAddress(_unixPath(body[:108])), UNIXAddress(_unixPath(body[108:216])))


class ProxyHeaderParser:
    """
    Finds the PROXY header at the start of a connection, whichever version,
    however the bytes are split.

        >>> parser = ProxyHeaderParser()
        >>> parser.feed(b"PROXY TCP4 192.0.2.1 192.0.2.2 4000 25\\r\\nEHLO")
        (ProxyHeader(source=IPv4Address(...), ...), b'EHLO')

    The buffer is bounded: a v1 header is at most 107 bytes, a v2 header
    says its own length (at most 64 KiB), and it grows in place so that a
    header sent a byte at a time costs O(bytes), not a copy per byte.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> tuple[ProxyHeader, bytes] | None:
        """
        Add bytes.

        @return: L{None} while the header is incomplete; then the header and
            the bytes that followed it.
        @raise ProxyHeaderError: the connection does not start with a
            valid header.
        """
        buffer = self._buffer
        buffer += data
        if buffer.startswith(V2_SIGNATURE[:1]) and V2_SIGNATURE.startswith(buffer[:12]):
            return self._v2(buffer)
        if V1_PREFIX.startswith(buffer[:6]):
            return self._v1(buffer)
        raise ProxyHeaderError(f"the connection did not start with a PROXY header: {_quote(buffer)}")

    def _v1(self, buffer: bytearray) -> tuple[ProxyHeader, bytes] | None:
        end = buffer.find(b"\r\n", 0, V1_MAX)
        if end >= 0:
            return parseV1(bytes(buffer[:end])), bytes(buffer[end + 2 :])
        if len(buffer) >= V1_MAX:
            raise ProxyHeaderError(f"PROXY v1 header longer than {V1_MAX} bytes: {_quote(buffer)}")
        # The spec asks to abort as soon as possible: a bare LF (or any
        # other byte no header holds) is refused now rather than after the
        # timeout.  Only a CR that may be the start of the CRLF can wait.
        forbidden = _V1_FORBIDDEN.search(buffer)
        if forbidden is not None and not (forbidden.start() == len(buffer) - 1 and buffer.endswith(b"\r")):
            _refuseByte(bytes(buffer), forbidden.start())
        return None

    def _v2(self, buffer: bytearray) -> tuple[ProxyHeader, bytes] | None:
        fixed = len(V2_SIGNATURE) + _V2_FIXED.size
        if len(buffer) < fixed:
            return None
        versionCommand, family, length = _V2_FIXED.unpack_from(buffer, len(V2_SIGNATURE))
        if versionCommand >> 4 != 2:
            raise ProxyHeaderError(f"unknown PROXY protocol version {versionCommand >> 4}")
        if len(buffer) < fixed + length:
            return None
        header = parseV2(versionCommand & 0x0F, family, bytes(buffer[fixed : fixed + length]))
        return header, bytes(buffer[fixed + length :])


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

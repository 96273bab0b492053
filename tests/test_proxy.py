"""
The PROXY protocol reader behind C{haproxy:} listeners: the sans-I/O header
parser byte by byte (and hammered by hypothesis: whatever the bytes, a
clean header or L{ProxyHeaderError}), and the wrapper's hold-back and
timeout on a deterministic clock.  Real sockets: a refused injection here,
the whole plugin in C{test_twistd.test_haproxyListener}.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import struct

import pytest
import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent

from infsmtp._server.proxy import (
    V2_SIGNATURE,
    ProxyHeader,
    ProxyHeaderError,
    ProxyHeaderParser,
    ProxyProtocolFactory,
)

WAIT = 20.0
V1 = b"PROXY TCP4 203.0.113.7 192.0.2.25 40000 25\r\n"


def v2(command: int, family: int, body: bytes) -> bytes:
    return V2_SIGNATURE + bytes([0x20 | command, family]) + struct.pack("!H", len(body)) + body


V2_IPV6 = v2(
    1,
    0x21,
    socket.inet_pton(socket.AF_INET6, "2001:db8::9")
    + socket.inet_pton(socket.AF_INET6, "2001:db8::1")
    + struct.pack("!HH", 50000, 587)
    + b"\x04\x00\x01X",  # a TLV, ignored
)


def feedInPieces(data: bytes, cuts: list[int]):
    parser = ProxyHeaderParser()
    result = None
    start = 0
    for cut in sorted(set(cuts)) + [len(data)]:
        piece, start = data[start:cut], max(start, cut)
        if result is None:
            result = parser.feed(piece)
        else:
            result = (result[0], result[1] + piece)
    return result


@given(st.lists(st.integers(0, len(V1) + 9)))
def test_v1AnySplit(cuts):
    header, rest = feedInPieces(V1 + b"EHLO x\r\n", cuts)
    assert header == ProxyHeader(IPv4Address("TCP", "203.0.113.7", 40000), IPv4Address("TCP", "192.0.2.25", 25))
    assert rest == b"EHLO x\r\n"


@given(st.lists(st.integers(0, len(V2_IPV6) + 5)))
def test_v2AnySplit(cuts):
    header, rest = feedInPieces(V2_IPV6 + b"EHLO", cuts)
    assert header.source == IPv6Address("TCP", "2001:db8::9", 50000)
    assert header.destination == IPv6Address("TCP", "2001:db8::1", 587)
    assert rest == b"EHLO"


@pytest.mark.parametrize(
    "data, source",
    [
        (b"PROXY TCP6 2001:db8::9 2001:db8::1 1 2\r\n", IPv6Address("TCP", "2001:db8::9", 1)),
        (b"PROXY UNKNOWN\r\n", None),
        (b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n", None),
        (v2(0, 0x00, b""), None),  # LOCAL: the balancer's own health check
        (v2(1, 0x00, b""), None),
        (v2(1, 0x11, socket.inet_aton("198.51.100.1") + socket.inet_aton("192.0.2.1") + struct.pack("!HH", 9, 25)),
         IPv4Address("TCP", "198.51.100.1", 9)),
        (v2(1, 0x31, b"/run/a".ljust(108, b"\0") + b"/run/b".ljust(108, b"\0")), UNIXAddress(b"/run/a")),
    ],
)
def test_validHeaders(data, source):
    header, rest = ProxyHeaderParser().feed(data)
    assert header.source == source and rest == b""


@pytest.mark.parametrize(
    "data",
    [
        b"EHLO client\r\n",
        b"GET / HTTP/1.1\r\n",
        b"PROXY TCP4 203.0.113.7 192.0.2.25 40000\r\n",
        b"PROXY TCP4 2001:db8::1 192.0.2.25 1 2\r\n",
        b"PROXY TCP4 203.0.113.7 192.0.2.25 70000 25\r\n",
        b"PROXY TCP4 203.0.113.7 192.0.2.25 040 25\r\n",
        b"PROXY TCP5 a b 1 2\r\n",
        b"PROXY TCP4 " + b"1" * 120,
        V2_SIGNATURE + b"\x11\x11\x00\x00",  # version 1 in a v2 frame
        v2(1, 0x12, b"\0" * 12),  # datagram
        v2(1, 0x11, b"\0" * 4),  # short address block
        v2(5, 0x11, b"\0" * 12),
    ],
)
def test_invalidHeaders(data):
    with pytest.raises(ProxyHeaderError):
        ProxyHeaderParser().feed(data)


@given(st.binary(min_size=1, max_size=200))
def test_arbitraryInputNeverCrashes(data):
    try:
        result = ProxyHeaderParser().feed(data)
    except ProxyHeaderError:
        return
    assert result is None or isinstance(result[0], ProxyHeader)


class Greeter(Protocol):
    """
    A protocol that greets on connection and records what it sees.
    """

    def connectionMade(self):
        self.peer = self.transport.getPeer()
        self.received = b""
        self.transport.write(b"220 hello\r\n")

    def dataReceived(self, data):
        self.received += data


def connect(clock: Clock, timeout: float = 5):
    factory = ProxyProtocolFactory(Factory.forProtocol(Greeter), timeout, clock)
    wrapper = factory.buildProtocol(IPv4Address("TCP", "10.0.0.1", 1234))
    transport = StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.1", 1234))
    wrapper.makeConnection(transport)
    return wrapper, transport


def test_greetsOnlyAfterTheHeader():
    clock = Clock()
    wrapper, transport = connect(clock)
    wrapper.dataReceived(V1[:10])
    assert transport.value() == b""
    wrapper.dataReceived(V1[10:] + b"EHLO x\r\n")
    assert transport.value() == b"220 hello\r\n"
    greeter = wrapper.wrappedProtocol
    assert greeter.peer == IPv4Address("TCP", "203.0.113.7", 40000)
    assert greeter.received == b"EHLO x\r\n"
    clock.advance(10)
    assert not transport.disconnecting  # the timer is gone once the header is in


def test_silentConnectionClosed():
    clock = Clock()
    wrapper, transport = connect(clock, timeout=3)
    clock.advance(2.9)
    assert not transport.disconnecting
    wrapper.dataReceived(b"PROXY TCP4")
    clock.advance(0.2)
    assert transport.disconnecting
    assert transport.value() == b""


def test_garbageClosedAtOnce():
    clock = Clock()
    wrapper, transport = connect(clock)
    wrapper.dataReceived(b"EHLO sneaky\r\n")
    assert transport.disconnecting and transport.value() == b""
    assert clock.getDelayedCalls() == []


# Strict v1 grammar (issue 9, item 8) ---------------------------------------

INJECTED = b"PROXY TCP6 fe80::1%x\nX-Injected:\tyes ::1 1234 25\r\n"


@pytest.mark.parametrize(
    "data",
    [
        INJECTED,
        b"PROXY TCP6 fe80::1%eth0 ::1 1234 25\r\n",  # any scope id
        b"PROXY TCP6 fe80::1%25 ::1 1234 25\r\n",
        b"PROXY TCP4 203.0.113.7\t192.0.2.25 40000 25\r\n",
        b"PROXY TCP4 203.0.113.7  192.0.2.25 40000 25\r\n",
        b"PROXY  TCP4 203.0.113.7 192.0.2.25 40000 25\r\n",
        b"PROXY TCP4 203.0.113.7 192.0.2.25 40000 25 \r\n",
        b" PROXY TCP4 203.0.113.7 192.0.2.25 40000 25\r\n",
        b"PROXY TCP4 203.0.113.7 192.0.2.25 40000 25 26\r\n",
        b"PROXY TCP4 203.0.113.7 192.0.2.25 40000 25\n",  # bare LF
        b"PROXY TCP4 203.0.113.7 192.0.2.25 40000 25\rX\r\n",  # bare CR
        b"PROXY TCP4 203.0.113.7 192.0.2.25 40000 25\n\r\n",
        b"PROXY TCP4 203.0.113.7\x00 192.0.2.25 40000 25\r\n",
        b"PROXY TCP4 203.0.113.7 192.0.2.25 4\x0000 25\r\n",
        b"PROXY TCP4 203.0.113.07 192.0.2.25 40000 25\r\n",  # octal confusion
        b"PROXY TCP4 203.0.113 192.0.2.25 40000 25\r\n",
        b"PROXY TCP4 0x7f.0.0.1 192.0.2.25 40000 25\r\n",
        "PROXY TCP4 ٢03.0.113.7 192.0.2.25 40000 25\r\n".encode(),  # Arabic-Indic digit
        "PROXY TCP4 203.0.113.7 192.0.2.25 4000² 25\r\n".encode(),
        "PROXY TCP4 203.0.113.7 192.0.2.25 ① 25\r\n".encode(),
        b"PROXY TCP4 203.0.113.7 192.0.2.25 +4000 25\r\n",
        b"PROXY TCP4 203.0.113.7 192.0.2.25 -1 25\r\n",
        b"PROXY TCP4 203.0.113.7 192.0.2.25 65536 25\r\n",
        b"PROXY TCP4 203.0.113.7 192.0.2.25 00 25\r\n",
        b"PROXY TCP4 203.0.113.7 192.0.2.25 40000 025\r\n",
        b"PROXY TCP4 203.0.113.7 192.0.2.25  25\r\n",
        b"PROXY TCP6 ::ffff:203.0.113.07 ::1 1 2\r\n",
        b"PROXY TCP6 203.0.113.7 ::1 1 2\r\n",  # family mismatch
        b"PROXY TCP6 ::1 [::1] 1 2\r\n",
        b"PROXY TCP6 ::1 ::g 1 2\r\n",
        b"PROXY TCP6 1::2::3 ::1 1 2\r\n",
        b"PROXY tcp4 203.0.113.7 192.0.2.25 40000 25\r\n",
        b"PROXY UNKNOWN\x1b[31m\r\n",  # ignored, but still only printable text
        b"PROXY UNKNOWN\x7f\r\n",
        b"PROXY UNKNOWN \xff\r\n",
        b"PROXY UNKNOWN\n",
    ],
)
def test_v1StrictGrammar(data):
    """
    Anything but the exact grammar of proxy-protocol.txt is refused: scope
    ids, tabs, doubled or trailing spaces, bare CR or LF, control bytes,
    non-ASCII digits, signs, leading zeros, out-of-range ports.
    """
    with pytest.raises(ProxyHeaderError):
        ProxyHeaderParser().feed(data)


@pytest.mark.parametrize(
    "line, source, destination",
    [
        (b"PROXY TCP4 0.0.0.0 255.255.255.255 0 65535", IPv4Address("TCP", "0.0.0.0", 0),
         IPv4Address("TCP", "255.255.255.255", 65535)),
        (b"PROXY TCP6 2001:DB8:0:0:0:0:0:9 ::ffff:192.0.2.1 10 20", IPv6Address("TCP", "2001:db8::9", 10),
         IPv6Address("TCP", "::ffff:c000:201", 20)),
        (b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff :: 65535 0",
         IPv6Address("TCP", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535), IPv6Address("TCP", "::", 0)),
        (b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535",
         None, None),
    ],
)
def test_v1GrammarEdges(line, source, destination):
    """
    What the grammar allows passes: any spelling of an IPv6 address
    (upper case, uncompressed, an embedded dotted quad), ports 0 and 65535,
    and the spec's 107-byte worst case.
    """
    header, rest = ProxyHeaderParser().feed(line + b"\r\nQUIT\r\n")
    assert header == ProxyHeader(source, destination)
    assert rest == b"QUIT\r\n"


@pytest.mark.parametrize("bad", [b"\n", b"\x00", b"\t", b"\x1b", b"\rX", b"\r\r"])
def test_v1BareLineEndRefusedAtOnce(bad):
    """
    A byte no header holds is refused as soon as it arrives (the spec asks
    to abort as soon as possible), not after the header timeout; only a
    final CR waits for its LF.
    """
    parser = ProxyHeaderParser()
    assert parser.feed(b"PROXY TCP4 203.0.113.7 192.0.2.25 40000 25") is None
    with pytest.raises(ProxyHeaderError):
        parser.feed(bad)


def test_v1CarriageReturnWaitsForLineFeed():
    parser = ProxyHeaderParser()
    assert parser.feed(b"PROXY TCP4 203.0.113.7 192.0.2.25 40000 25\r") is None
    header, rest = parser.feed(b"\nEHLO")
    assert header.source == IPv4Address("TCP", "203.0.113.7", 40000) and rest == b"EHLO"


def test_errorQuotesPeerTextEscapedAndShort():
    """
    The reason quotes the peer's bytes with repr, cut short: no line break,
    tab or escape of theirs reaches the log.
    """
    with pytest.raises(ProxyHeaderError) as caught:
        ProxyHeaderParser().feed(b"PROXY UNKNOWN \x1b[2J" + b"A" * 80 + b"\r\n")
    reason = str(caught.value)
    assert "\\x1b" in reason and "\x1b" not in reason
    assert reason.endswith("...") and "A" * 60 not in reason  # cut short
    with pytest.raises(ProxyHeaderError) as caught:
        ProxyHeaderParser().feed(INJECTED)
    assert "\n" not in str(caught.value) and "\t" not in str(caught.value)


# v2: lengths, TLVs, UNIX paths ----------------------------------------------

IPV4_BLOCK = socket.inet_aton("198.51.100.1") + socket.inet_aton("192.0.2.1") + struct.pack("!HH", 9, 25)


def tlv(kind: int, value: bytes) -> bytes:
    return struct.pack("!BH", kind, len(value)) + value


def unixBlock(src: bytes, dst: bytes = b"/run/b") -> bytes:
    return src.ljust(108, b"\0") + dst.ljust(108, b"\0")


@pytest.mark.parametrize(
    "data",
    [
        v2(1, 0x11, IPV4_BLOCK + tlv(1, b"h2")),
        v2(1, 0x11, IPV4_BLOCK + tlv(1, b"h2") + tlv(4, b"")),
        v2(1, 0x11, IPV4_BLOCK + tlv(0x20, b"\x01" + b"\0" * 4 + tlv(0x21, b"TLSv1.3"))),
        v2(1, 0x21, V2_IPV6[16:16 + 36] + tlv(4, b"x" * 300)),
        v2(1, 0x31, unixBlock(b"\0abstract")),  # an abstract socket: no path to show
        v2(0, 0x11, b"anything at all"),  # LOCAL: the block is to be ignored
        v2(1, 0x01, b"\xff\xff"),  # UNSPEC: likewise
    ],
)
def test_v2WellFormed(data):
    header, rest = ProxyHeaderParser().feed(data + b"EHLO")
    assert rest == b"EHLO"


@pytest.mark.parametrize(
    "data",
    [
        v2(1, 0x11, IPV4_BLOCK + tlv(1, b"h2")[:-1]),  # the TLV runs past the header
        v2(1, 0x11, IPV4_BLOCK + struct.pack("!BH", 4, 0xFFFF)),
        v2(1, 0x11, IPV4_BLOCK + b"\x04\x00"),  # a truncated TLV header
        v2(1, 0x11, IPV4_BLOCK + b"\x04"),
        v2(1, 0x11, IPV4_BLOCK + tlv(4, b"") + b"\x01"),
        v2(1, 0x21, IPV4_BLOCK),  # an IPv4 block for IPv6
        v2(1, 0x31, IPV4_BLOCK),
        v2(1, 0x41, IPV4_BLOCK),  # family 4 does not exist
        v2(1, 0x13, IPV4_BLOCK),  # transport 3 does not exist
        v2(1, 0x03, b""),
        v2(1, 0x10, IPV4_BLOCK),  # IPv4 with no transport
        v2(1, 0x31, unixBlock(b"/run/a\nX-Injected: yes")),
        v2(1, 0x31, unixBlock(b"/run/a\x1b[2J")),
        v2(1, 0x31, unixBlock(b"/run/my socket")),
        v2(1, 0x31, unixBlock(b"/run/\xc2\x85")),
        v2(1, 0x31, unixBlock(b"/run/a", b"/run/\x7f")),
    ],
)
def test_v2Malformed(data):
    """
    TLVs that do not add up to the header's length, address blocks too
    short for their family, families and transports the spec does not
    define, and UNIX paths with control bytes, spaces or non-ASCII are
    refused.
    """
    with pytest.raises(ProxyHeaderError):
        ProxyHeaderParser().feed(data)


def test_v2TrickleCostsLinearTime():
    """
    A 64 KiB header sent a byte at a time is parsed (the buffer grows in
    place rather than being copied for each byte).
    """
    data = v2(1, 0x11, IPV4_BLOCK + tlv(4, b"x" * (0xFFFF - 12 - 3)))
    parser = ProxyHeaderParser()
    for i in range(len(data) - 1):
        assert parser.feed(data[i : i + 1]) is None
    header, rest = parser.feed(data[-1:] + b"EHLO")
    assert header.source == IPv4Address("TCP", "198.51.100.1", 9) and rest == b"EHLO"


# Properties: whatever the bytes, a safe header or ProxyHeaderError ----------

SAFE_IP = re.compile(r"[0-9a-f:.]+")


def assertSafe(header: ProxyHeader) -> None:
    """
    Every address in C{header} is printable, without whitespace, and
    round-trips through ipaddress; ports are in range.
    """
    for address in (header.source, header.destination):
        if address is None:
            continue
        if isinstance(address, UNIXAddress):
            assert re.fullmatch(rb"[\x21-\x7e]*", address.name)
            continue
        assert SAFE_IP.fullmatch(address.host), address.host
        parsed = ipaddress.ip_address(address.host)
        assert str(parsed) == address.host
        assert parsed.version == (4 if isinstance(address, IPv4Address) else 6)
        assert 0 <= address.port <= 65535


def outcome(data: bytes, cuts: list[int] = ()):
    """
    Feed C{data} (split at C{cuts}): the result, or C{"refused"}.  Any
    other exception fails the test.
    """
    parser = ProxyHeaderParser()
    start = 0
    try:
        for cut in sorted(set(cuts)) + [len(data)]:
            result = parser.feed(data[start:cut])
            start = max(start, cut)
            if result is not None:
                return result[0], result[1] + data[start:]
    except ProxyHeaderError:
        return "refused"
    return None


NASTY = [b"%", b"%eth0", b"\n", b"\r", b"\r\n", b"\t", b" ", b"\x00", b"\x1b", b"\x7f", "\x85".encode(),
         "²".encode(), "١".encode(), b"0", b"+", b"-", b":", b"::", b".", b"[", b"]", b"/", b"\xff"]


@st.composite
def field(draw, valid):
    """
    A v1 field: valid, or spoilt by an inserted nasty byte, or random.
    Returns (bytes, whether it is known valid).
    """
    data = draw(valid)
    how = draw(st.sampled_from(["valid", "valid", "insert", "random"]))
    if how == "valid":
        return data, True
    if how == "insert":
        at = draw(st.integers(0, len(data)))
        return data[:at] + draw(st.sampled_from(NASTY)) + data[at:], False
    return draw(st.binary(max_size=45)), False


def ipv6Spellings(address: ipaddress.IPv6Address) -> st.SearchStrategy[bytes]:
    spellings = [address.compressed, address.exploded, address.exploded.upper()]
    if address.ipv4_mapped is not None:
        spellings.append(f"::ffff:{address.ipv4_mapped}")
    return st.sampled_from(spellings).map(str.encode)


V4_TEXT = st.ip_addresses(v=4).map(lambda a: str(a).encode())
V6_TEXT = st.one_of(st.ip_addresses(v=6), st.ip_addresses(v=4).map(lambda a: ipaddress.IPv6Address(f"::ffff:{a}")))
V6_TEXT = V6_TEXT.flatmap(ipv6Spellings)
PORT_TEXT = st.integers(0, 65535).map(lambda n: str(n).encode())


@st.composite
def v1Lines(draw):
    """
    A v1 header, with each part valid or spoilt; returns it and the header
    it must parse to when nothing was spoilt (else None).
    """
    version = draw(st.sampled_from([4, 6]))
    family, address = (b"TCP4", V4_TEXT) if version == 4 else (b"TCP6", V6_TEXT)
    parts = [draw(field(st.just(family)))] + [draw(field(address)) for _ in range(2)]
    parts += [draw(field(PORT_TEXT)) for _ in range(2)]
    separator, separatorValid = draw(field(st.just(b" ")))
    end, endValid = draw(field(st.just(b"\r\n")))
    line = b"PROXY " + separator.join(text for text, _ in parts) + end
    if not (separatorValid and endValid and all(valid for _, valid in parts)):
        return line, None
    kind = IPv4Address if version == 4 else IPv6Address
    (src, _), (dst, _), (sport, _), (dport, _) = parts[1:]
    return line, ProxyHeader(
        kind("TCP", str(ipaddress.ip_address(src.decode())), int(sport)),
        kind("TCP", str(ipaddress.ip_address(dst.decode())), int(dport)),
    )


@settings(max_examples=500)
@given(v1Lines(), st.lists(st.integers(0, 120), max_size=5))
def test_v1PropertySafeOrRefused(lineAndExpected, cuts):
    """
    A v1 line with any of its parts spoilt is refused or yields a header
    whose addresses are clean; an unspoilt one yields exactly its
    addresses; and how the bytes are split changes nothing.
    """
    line, expected = lineAndExpected
    result = outcome(line + b"NEXT", cuts)
    assert result == outcome(line + b"NEXT")
    if expected is not None:
        assert result == (expected, b"NEXT")
    elif result not in ("refused", None):
        assertSafe(result[0])


@st.composite
def v2Headers(draw):
    """
    A v2 header: random command and family bytes, an address block of the
    family's size (random bytes, UNIX paths sometimes printable), TLVs that
    may or may not fit.
    """
    command = draw(st.one_of(st.just(1), st.integers(0, 15)))
    family = draw(st.one_of(st.sampled_from([0x00, 0x11, 0x21, 0x31, 0x12]), st.integers(0, 255)))
    size = {1: 12, 2: 36, 3: 216}.get(family >> 4, draw(st.integers(0, 40)))
    if family >> 4 == 3 and draw(st.booleans()):
        path = st.binary(max_size=107).map(lambda b: bytes(0x21 + c % 94 for c in b))
        block = draw(path).ljust(108, b"\0") + draw(path).ljust(108, b"\0")
    else:
        block = draw(st.binary(min_size=size, max_size=size))
    tlvs = b"".join(draw(st.lists(st.builds(tlv, st.integers(0, 255), st.binary(max_size=20)), max_size=4)))
    tail = draw(st.one_of(st.just(b""), st.binary(max_size=4)))
    body = draw(st.sampled_from([block + tlvs + tail, block[: draw(st.integers(0, size))], b""]))
    return v2(command, family, body)


@settings(max_examples=500)
@given(v2Headers(), st.lists(st.integers(0, 300), max_size=5))
def test_v2PropertySafeOrRefused(data, cuts):
    result = outcome(data + b"NEXT", cuts)
    assert result == outcome(data + b"NEXT")
    if result not in ("refused", None):
        assertSafe(result[0])
        assert result[1] == b"NEXT"


@settings(max_examples=500)
@given(st.one_of(st.binary(max_size=120), st.binary(max_size=110).map(lambda b: b"PROXY " + b),
                 st.binary(max_size=300).map(lambda b: V2_SIGNATURE + b"\x21" + b)))
def test_anyBytesSafeOrRefused(data):
    """
    Any bytes at all: incomplete, refused, or a clean header; never another
    exception.
    """
    result = outcome(data)
    if result not in ("refused", None):
        assertSafe(result[0])


# The wrapper: refusal, log line, and over a real socket ----------------------


def test_injectionClosedAndLoggedEscaped(logEvents):
    """
    The injected header closes the connection before any greeting; one log
    line says why, with the peer's bytes escaped.
    """
    clock = Clock()
    wrapper, transport = connect(clock)
    wrapper.dataReceived(INJECTED + b"EHLO x\r\n")
    assert transport.disconnecting and transport.value() == b""
    assert clock.getDelayedCalls() == []
    [event] = [e for e in logEvents if e.get("log_namespace") == "infsmtp.proxy"]
    text = formatEvent(event)
    assert text.startswith("closing IPv4Address(type='TCP', host='10.0.0.1', port=1234): ")
    assert "\\n" in text and "%x" in text
    assert text.isprintable() and len(text) < 250


def exchange(port: int, data: bytes) -> bytes:
    """
    Connect, send C{data}, and read until the server closes or has said
    one line.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
        sock.sendall(data)
        received = b""
        while b"\n" not in received:
            piece = sock.recv(1024)
            if not piece:
                break
            received += piece
        return received


@pytest_twisted.ensureDeferred
async def test_injectionRefusedOverSocket():
    """
    Over loopback: the injected header gets the connection closed without
    a greeting; a clean one gets the greeting.  (The protocol behind is a
    stand-in: nothing of it may run before the header is accepted.)
    """
    factory = ProxyProtocolFactory(Factory.forProtocol(Greeter), WAIT, reactor)
    listening = reactor.listenTCP(0, factory, interface="127.0.0.1")
    try:
        port = listening.getHost().port
        for refused in (INJECTED + b"EHLO x\r\n", b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", V1[:-2] + b"\n"):
            assert await deferToThread(exchange, port, refused).addTimeout(WAIT, reactor) == b""
        assert await deferToThread(exchange, port, V1).addTimeout(WAIT, reactor) == b"220 hello\r\n"
    finally:
        await listening.stopListening()

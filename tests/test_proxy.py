"""
The PROXY protocol reader behind C{haproxy:} listeners: the sans-I/O header
parser byte by byte, and the wrapper's hold-back and timeout on a
deterministic clock.  (Real sockets: C{test_twistd.test_haproxyListener}.)
"""

from __future__ import annotations

import socket
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from infsmtp._proxy import (
    V2_SIGNATURE,
    ProxyHeader,
    ProxyHeaderError,
    ProxyHeaderParser,
    ProxyProtocolFactory,
)

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

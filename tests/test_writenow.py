"""
L{infsmtp._writenow.writeNow} over real loopback TCP: bytes arrive whole and
in order whether they go straight to the socket, partly, or behind data
Twisted already buffered.
"""

import contextlib

import pytest_twisted
from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.testing import StringTransport

from infsmtp._writenow import writeNow

#: The bound on every wait, in seconds.
WAIT = 20.0


class Collect(protocol.Protocol):
    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.received = bytearray()
        self.complete: defer.Deferred = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if len(self.received) >= self.expected and not self.complete.called:
            self.complete.callback(bytes(self.received))

    async def arrived(self) -> bytes:
        """
        Everything expected, or a failure saying how much came (a lost
        byte must fail the test, not hang it).
        """
        try:
            return await self.complete.addTimeout(WAIT, reactor)
        except defer.TimeoutError:
            raise AssertionError(
                f"{len(self.received)} of {self.expected} bytes arrived within {WAIT:g} s"
            ) from None


@contextlib.asynccontextmanager
async def connectedPair(expected: int):
    """
    A listening Collect expecting C{expected} bytes, and a connected client
    protocol whose transport is a plain C{tcp.Client}; both closed after.
    """
    collector = Collect(expected)
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        protocol.Factory.forProtocol(lambda: collector)
    ).addTimeout(WAIT, reactor)
    client = await TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port).connect(
        protocol.Factory.forProtocol(protocol.Protocol)
    ).addTimeout(WAIT, reactor)
    try:
        yield collector, client.transport
    finally:
        client.transport.loseConnection()
        await defer.maybeDeferred(port.stopListening).addTimeout(WAIT, reactor)


def queued(transport) -> int:
    return len(transport.dataBuffer) - transport.offset + transport._tempDataLen


@pytest_twisted.ensureDeferred
async def test_small_write_goes_out_without_buffering():
    async with connectedPair(5) as (collector, transport):
        writeNow(transport, b"hello")
        assert queued(transport) == 0
        assert await collector.arrived() == b"hello"


@pytest_twisted.ensureDeferred
async def test_write_behind_buffered_data_keeps_order():
    async with connectedPair(10) as (collector, transport):
        transport.write(b"first")  # buffered by Twisted until the reactor runs
        writeNow(transport, b"after")
        assert await collector.arrived() == b"firstafter"


@pytest_twisted.ensureDeferred
async def test_more_than_the_socket_takes_is_sent_in_part_and_the_rest_buffered():
    size = 32 * 1024 * 1024
    data = bytes(range(256)) * (size // 256)
    async with connectedPair(size + 4) as (collector, transport):
        writeNow(transport, data)
        assert 0 < queued(transport) < size  # some went at once, the rest waits
        writeNow(transport, b"tail")  # must queue behind the remainder
        assert await collector.arrived() == data + b"tail"


def test_other_transports_get_a_plain_write():
    transport = StringTransport()
    writeNow(transport, b"data")
    assert transport.value() == b"data"

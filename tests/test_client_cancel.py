"""
Cancelling a call closes the connection at once (issue 11, item 2): no QUIT
that waits for replies which may never come.  The server (a scripted Twisted
peer on loopback, which can fall silent at any step) must see the close well
within the client's 30-second timeout.
"""

from __future__ import annotations

import io
import time

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.protocol import Factory
from twisted.protocols.basic import LineReceiver

from infsmtp import AsyncClient

#: How soon the server must see the close after the cancel (the client's
#: timeout is 30 s).
PROMPT = 2.0

MESSAGE = b"From: ann@example.org\r\nTo: bob@example.org\r\n\r\nHello.\r\n"


class Scripted(LineReceiver):
    """
    A small ESMTP server with PIPELINING that falls silent, for good, at the
    first line starting with C{factory.silentAt} (C{b"."} is the end of the
    message; L{None} never; C{b""} before the greeting).
    """

    def connectionMade(self) -> None:
        self.inData = False
        self.silent = False
        self.factory.connected.callback(None)
        self.factory.connected = Deferred()
        self._check(b"")
        if not self.silent:
            self.sendLine(b"220 scripted.test ESMTP")

    def _check(self, line: bytes) -> None:
        silentAt = self.factory.silentAt
        if not self.silent and silentAt is not None and line.upper().startswith(silentAt) and (line or not silentAt):
            self.silent = True
            self.factory.reached.callback(None)

    def lineReceived(self, line: bytes) -> None:
        if self.inData:
            if line == b".":
                self.inData = False
                self._check(b".")
                if not self.silent:
                    self.factory.messages += 1
                    self.sendLine(b"250 2.0.0 queued")
            return
        self._check(line)
        if self.silent:
            return
        verb = line.split(b" ", 1)[0].upper()
        if verb == b"EHLO":
            self.sendLine(b"250-scripted.test\r\n250 PIPELINING")
        elif verb == b"DATA":
            self.inData = True
            self.sendLine(b"354 go on")
        elif verb == b"QUIT":
            self.sendLine(b"221 bye")
            self.transport.loseConnection()
        else:
            self.sendLine(b"250 OK")

    def connectionLost(self, reason=None) -> None:
        self.factory.lost.callback(time.monotonic())
        self.factory.lost = Deferred()


@pytest_twisted.async_yield_fixture
async def scripted():
    factory = Factory.forProtocol(Scripted)
    factory.silentAt = None
    factory.messages = 0
    factory.connected, factory.reached, factory.lost = Deferred(), Deferred(), Deferred()
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    factory.port = port.getHost().port
    yield factory
    await port.stopListening()


def client(port: int) -> AsyncClient:
    c = AsyncClient()
    c.host, c.port, c.timeout = "127.0.0.1", port, 30000
    return c


async def closedPromptly(server, cancelledAt: float) -> None:
    """
    The server sees the connection close within L{PROMPT} of the cancel.
    """
    closedAt = await server.lost.addTimeout(PROMPT, reactor)
    assert closedAt - cancelledAt < PROMPT


@pytest.mark.parametrize("silentAt", [b"", b"EHLO"], ids=["no greeting", "no EHLO reply"])
@pytest_twisted.ensureDeferred
async def test_cancelledConnectClosesAtOnce(scripted, silentAt):
    scripted.silentAt = silentAt
    c = client(scripted.port)
    d = c.connect()
    await scripted.reached.addTimeout(10, reactor)
    lost = scripted.lost
    d.cancel()
    cancelledAt = time.monotonic()
    with pytest.raises(CancelledError):
        await d
    scripted.lost = lost
    await closedPromptly(scripted, cancelledAt)
    assert not c.connected


@pytest_twisted.ensureDeferred
async def test_connectUnderAddTimeoutClosesAtOnce(scripted):
    """
    C{addTimeout(0.5)} with the client's own timeout at 30 s: the
    TimeoutError comes after half a second, and so does the close.
    """
    scripted.silentAt = b""
    c = client(scripted.port)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await c.connect().addTimeout(0.5, reactor)
    assert time.monotonic() - started < PROMPT
    await closedPromptly(scripted, started)


@pytest.mark.parametrize("silentAt", [b"MAIL", b"."], ids=["envelope", "end of message"])
@pytest_twisted.ensureDeferred
async def test_cancelledSendClosesAtOnce(scripted, silentAt):
    """
    A send cancelled while the server is silent (on the pipelined envelope,
    or after the final dot) closes the connection at once; the client can
    connect again.
    """
    c = client(scripted.port)
    await c.connect()
    scripted.silentAt = silentAt
    sent = c.sendStream(io.BytesIO(MESSAGE))
    await scripted.reached.addTimeout(10, reactor)
    sent.cancel()
    cancelledAt = time.monotonic()
    with pytest.raises(CancelledError):
        await sent
    await closedPromptly(scripted, cancelledAt)
    assert not c.connected

    scripted.silentAt = None
    await c.connect()
    assert await c.sendStream(io.BytesIO(MESSAGE)) == {}
    await c.disconnect()


@pytest_twisted.ensureDeferred
async def test_cancellingAQueuedCallLeavesTheSessionAlone(scripted):
    """
    A call cancelled before its turn sent nothing: the one in flight
    completes and the session goes on.
    """
    c = client(scripted.port)
    await c.connect()
    first = c.sendStream(io.BytesIO(MESSAGE))
    second = c.sendStream(io.BytesIO(MESSAGE))
    second.cancel()
    assert await first == {}
    with pytest.raises(CancelledError):
        await second
    assert c.connected
    assert await c.noop() == "OK"
    assert scripted.messages == 1
    await c.disconnect()

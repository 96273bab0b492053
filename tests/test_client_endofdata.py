"""
The reply to the end of a message has its own timeout (issue 11, item 1):
``dataTimeout``, 10 minutes by default as RFC 5321 4.5.3.2.6 says, because
the server may be scanning the message.  Bounding that wait by the command
``timeout`` made a client give up on a message the server then stored, so
the sender retried and the recipient got it twice.

The peers hold their answer until the test releases it: aiosmtpd (no
PIPELINING: the client's step-by-step path) and infsmtp's own server (with
PIPELINING: the path where the message follows the envelope's replies).
"""

from __future__ import annotations

import io
import threading
import time

import pytest
import pytest_twisted
from peertools import EphemeralController
from twisted.internet import reactor
from twisted.internet.defer import Deferred

from infsmtp import AsyncClient, Server, SMTPTimeoutError

HEAD = b"From: ann@example.org\r\nTo: bob@example.org\r\nSubject: slow scan\r\n\r\n"

#: A message sent in one write after DATA, and one streamed in pieces
#: (over the 64 KiB the client reads ahead): the two paths to the final dot.
MESSAGES = {
    "whole": HEAD + b"Hello.\r\n",
    "streamed": HEAD + (b"y" * 78 + b"\r\n") * 3000,
}


class SlowScanner:
    """
    An aiosmtpd handler whose C{handle_DATA} waits for C{release} before it
    answers 250; C{reached} (a Deferred, fired in the reactor thread) says
    the whole message has arrived.
    """

    def __init__(self) -> None:
        self.release = threading.Event()
        self.reached: Deferred[None] = Deferred()
        self.messages: list[bytes] = []

    async def handle_DATA(self, server, session, envelope):
        reactor.callFromThread(self.reached.callback, None)
        # In a worker thread: aiosmtpd's loop keeps serving meanwhile.  Bounded,
        # should the test fail before it releases.
        await server.loop.run_in_executor(None, self.release.wait, 30)
        self.messages.append(envelope.original_content)
        return "250 2.0.0 scanned and queued"




@pytest.fixture
def slowServer():
    handler = SlowScanner()
    controller = EphemeralController(handler, hostname="127.0.0.1", port=0)
    controller.start()
    yield controller, handler
    handler.release.set()
    controller.stop()


@pytest_twisted.async_yield_fixture(params=["aiosmtpd", "infsmtp"])
async def slowPeer(request):
    """
    Each peer in turn (see L{slowServer} and L{slowInfsmtp}).
    """
    if request.param == "aiosmtpd":
        yield request.getfixturevalue("slowServer")
        return
    async for peer in slowInfsmtp():
        yield peer


async def slowInfsmtp():
    """
    infsmtp's server whose C{onReceive} answers once C{release} fires.
    """
    handler = SlowScanner()
    release: Deferred[None] = Deferred()
    handler.release = release

    def onReceive(session):
        handler.messages.append(session.msg)
        handler.reached.callback(None)
        return release.addCallback(lambda _: True)

    server = Server(port=0, interface="127.0.0.1", hostname="mx.test", receivedHeader=False)
    server.onReceive = onReceive
    await server.startListening().addTimeout(10, reactor)
    yield server, handler
    if not release.called:
        release.callback(None)
    await server.stopListening().addTimeout(10, reactor)


def release(handler) -> None:
    if isinstance(handler.release, Deferred):
        handler.release.callback(None)
    else:
        handler.release.set()


def client(port: int, **settings) -> AsyncClient:
    c = AsyncClient()
    c.host, c.port = "127.0.0.1", port
    for name, value in settings.items():
        setattr(c, name, value)
    return c


@pytest.mark.parametrize("shape", sorted(MESSAGES))
@pytest_twisted.ensureDeferred
async def test_finalReplyLaterThanTimeoutWithinDataTimeoutIsDeliveredOnce(slowPeer, shape):
    """
    The server answers the final dot three command timeouts late but within
    dataTimeout: the send succeeds, and the server has the message once.
    """
    server, handler = slowPeer
    c = client(server.port, timeout=300, dataTimeout=20000)
    assert c.supportsExtension("PIPELINING") is False  # not connected yet
    await c.connect()
    # aiosmtpd: step by step; infsmtp: pipelined.
    assert c.supportsExtension("pipelining") == isinstance(server, Server)
    sent = c.sendStream(io.BytesIO(MESSAGES[shape]), "ann@example.org", ["bob@example.org"])
    await handler.reached.addTimeout(10, reactor)
    # The scan takes longer than `timeout`: that is the case under test, not
    # a wait for something to happen.
    reactor.callLater(0.9, release, handler)
    started = time.monotonic()
    assert await sent == {}
    assert time.monotonic() - started > 0.3 * 2
    assert len(handler.messages) == 1 and handler.messages[0].endswith(MESSAGES[shape][-200:])
    # The session goes on with the command timeout again.
    assert c.supportsExtension("SIZE")
    await c.noop()
    await c.disconnect()
    assert len(handler.messages) == 1


@pytest_twisted.ensureDeferred
async def test_dataTimeoutLapsesWithATimeoutErrorThatSaysSo(slowServer):
    """
    Past dataTimeout (and well before the command timeout) the send fails
    with SMTPTimeoutError, which warns that the message may have arrived.
    """
    controller, handler = slowServer
    c = client(controller.port, timeout=20000, dataTimeout=300)
    await c.connect()
    started = time.monotonic()
    with pytest.raises(SMTPTimeoutError) as timedOut:
        await c.sendStream(io.BytesIO(MESSAGES["whole"]), "ann@example.org", ["bob@example.org"])
    assert time.monotonic() - started < 5
    assert "end of the message" in str(timedOut.value) and "may have been delivered" in str(timedOut.value)
    assert not c.connected
    await c.free()


def test_defaults():
    """
    RFC 5321's 10 minutes for the final reply; the command timeout stays 30 s.
    """
    from infsmtp import Client

    assert (AsyncClient.timeout, AsyncClient.dataTimeout) == (30000, 600000)
    blocking = Client()
    blocking.dataTimeout = 1234
    assert blocking._client.dataTimeout == 1234

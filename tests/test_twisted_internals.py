"""
infsmtp's two uses of Twisted internals each have a feature check and a
public fallback, and each fallback is forced here and run for real:

- ``_writenow``: the private write buffer of ``tcp.Server`` / ``tcp.Client``
  is probed at import; a class that fails the probe, or a transport that
  loses an attribute later, gets plain ``transport.write`` and
  ``closesAtOnce() == False``.  Over loopback the server's replies still
  arrive byte-exact and in order, and QUIT still closes.
"""

from __future__ import annotations

import re

import pytest
import pytest_twisted
from twisted.internet import defer, protocol, reactor, tcp
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.logger import globalLogPublisher

from infsmtp import Server, _writenow

# ------------------------------------------------------------ _writenow


def hiding(name: str) -> type:
    """
    A C{tcp.Server} whose instances do not have attribute C{name}, as on a
    Twisted that renamed it.
    """

    class Hiding(tcp.Server):
        def __getattribute__(self, attribute):
            if attribute == name:
                raise AttributeError(attribute)
            return super().__getattribute__(attribute)

    return Hiding


class BufferElsewhere(tcp.Server):
    """
    A transport that still has every attribute, but queues writes somewhere
    else: reading the old attributes would let a reply overtake another.
    """

    def write(self, data: bytes) -> None:
        self.elsewhere = getattr(self, "elsewhere", b"") + data


class RecordingTransport:
    """
    A transport with none of Twisted's private attributes: only C{write}.
    """

    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)


class IdleWithoutSocket(RecordingTransport):
    """
    A transport that looks idle but has no C{socket} to send on.
    """

    connected, disconnecting, _writeDisconnected, TLS = True, False, False, False
    dataBuffer, offset, _tempDataLen = b"", 0, 0


def test_theInstalledTwistedPassesTheProbe():
    assert _writenow._probe(tcp.Server) is None
    assert _writenow._probe(tcp.Client) is None
    assert _writenow._FAST == (tcp.Server, tcp.Client)


@pytest.mark.parametrize("name", sorted(_writenow._SHAPE))
def test_aTransportClassMissingAnAttributeFailsTheProbe(name):
    problem = _writenow._probe(hiding(name))
    assert problem is not None and name in problem


def test_anAttributeOfAnotherTypeFailsTheProbe():
    class TextBuffer(tcp.Server):
        dataBuffer = ""

    assert _writenow._probe(TextBuffer) == "its 'dataBuffer' is a str"


def test_attributesThatNoLongerHoldTheQueueFailTheProbe():
    assert _writenow._probe(BufferElsewhere) == "what write() queues is not where it is looked for"


def test_aClassThatFailsTheProbeIsLeftOnTheBufferedPathAndSaysWhy(monkeypatch):
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        monkeypatch.setattr(_writenow, "_PLAIN_TCP", (tcp.Server, hiding("_tempDataLen")))
        fast = _writenow._fastClasses()
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert fast == (tcp.Server,)
    warnings = [e for e in events if e.get("log_namespace") == "infsmtp._writenow"]
    assert len(warnings) == 1 and "_tempDataLen" in warnings[0]["problem"]


@pytest.mark.parametrize("transportClass", [RecordingTransport, IdleWithoutSocket])
def test_anAttributeLostAtRunTimeSwitchesTheShortcutOffOnce(monkeypatch, transportClass):
    """
    A transport of a class that passed the probe but has lost an attribute
    since gets a plain write, never an exception; the shortcut is then off
    for every transport, and the log says so once.
    """
    monkeypatch.setattr(_writenow, "_FAST", (tcp.Server, transportClass))
    transport = transportClass()
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        _writenow.writeNow(transport, b"250 OK\r\n")
        _writenow.writeNow(transport, b"221 Bye\r\n")
        assert _writenow.closesAtOnce(transport) is False
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert transport.written == [b"250 OK\r\n", b"221 Bye\r\n"]
    assert _writenow._FAST == ()
    assert len([e for e in events if e.get("log_namespace") == "infsmtp._writenow"]) == 1


class Transcript(protocol.Protocol):
    """
    Sends C{script} at once (pipelined), records every byte the server
    sends, and fires C{closed} with them when the server closes.
    """

    def __init__(self, script: bytes) -> None:
        self.script = script
        self.received = bytearray()
        self.closed: defer.Deferred[bytes] = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.script)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason) -> None:
        self.closed.callback(bytes(self.received))


SCRIPT = (
    b"EHLO client.test\r\n"
    b"MAIL FROM:<ann@example.org>\r\n"
    b"RCPT TO:<bob@example.org>\r\n"
    b"RCPT TO:<nobody@example.org>\r\n"
    b"DATA\r\n"
    b"Subject: hi\r\n\r\nbody\r\n.\r\n"
    b"NOOP\r\n"
    b"QUIT\r\n"
)


async def serverTranscript() -> bytes:
    """
    What our Server sends over loopback to L{SCRIPT}, up to its close.
    """
    received = []
    server = Server(port=0, interface="127.0.0.1", hostname="mx.test", receivedHeader=False)
    server.onRcptTo = lambda session: not session.address.startswith("nobody")
    server.onReceive = lambda session: received.append(session.msg) or True
    await server.startListening().addTimeout(10, reactor)
    try:
        client = Transcript(SCRIPT)
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", server.port)
        await endpoint.connect(protocol.Factory.forProtocol(lambda: client)).addTimeout(10, reactor)
        # Well under the server's close grace (10 s): the close must
        # complete by itself, not by the timer that forces it.
        transcript = await client.closed.addTimeout(5, reactor)
    finally:
        await server.stopListening().addTimeout(10, reactor)
    assert received == [b"Subject: hi\r\n\r\nbody\r\n"]
    return transcript


def replyCodes(transcript: bytes) -> list[bytes]:
    return [line[:3] for line in transcript.split(b"\r\n") if line[3:4] == b" "]


def withoutQueueId(transcript: bytes) -> bytes:
    """
    C{transcript} with the one part that differs between sessions masked.
    """
    masked, count = re.subn(rb"queued as [0-9A-Za-z]+\r\n", b"queued as ID\r\n", transcript)
    assert count == 1
    return masked


@pytest_twisted.ensureDeferred
async def test_serverRepliesAreTheSameOnTheBufferedPath(monkeypatch):
    """
    With the shortcut off, a pipelined session's replies arrive byte for
    byte as with it, in order, and QUIT still closes the connection.
    """
    fast = await serverTranscript()
    assert replyCodes(fast) == [b"220", b"250", b"250", b"250", b"550", b"354", b"250", b"250", b"221"]
    monkeypatch.setattr(_writenow, "_FAST", ())
    buffered = await serverTranscript()
    assert withoutQueueId(buffered) == withoutQueueId(fast)


@pytest_twisted.ensureDeferred
async def test_writeNowOnTheBufferedPathQueuesAndDelivers(monkeypatch):
    """
    With the shortcut off, C{writeNow} on a real C{tcp.Client} leaves its
    bytes to Twisted's buffer (not the socket) and they arrive in order.
    """
    monkeypatch.setattr(_writenow, "_FAST", ())
    collected = Transcript(b"")
    listening = await protocol_listen(collected)
    try:
        sender = await TCP4ClientEndpoint(reactor, "127.0.0.1", listening.getHost().port).connect(
            protocol.Factory.forProtocol(protocol.Protocol)
        )
        transport = sender.transport
        assert _writenow.closesAtOnce(transport) is False  # unsure, though idle
        _writenow.writeNow(transport, b"first ")
        assert transport._tempDataLen == len(b"first ")
        _writenow.writeNow(transport, b"second")
        transport.loseConnection()
        assert await collected.closed.addTimeout(10, reactor) == b"first second"
    finally:
        await listening.stopListening()


async def protocol_listen(receiver: protocol.Protocol):
    """
    A port on 127.0.0.1 whose one connection is handled by C{receiver}.
    """
    return reactor.listenTCP(0, protocol.Factory.forProtocol(lambda: receiver), interface="127.0.0.1")

"""
What smtplib and aiosmtplib users reach for (issue 11, items 5 and 7), by
example against peers we did not write: the source address the server
sees, a unix socket (by path and as an endpoint string), ``localHostname``,
``noop()``, ``rset()``, ``esmtpFeatures`` and ``supportsExtension()``.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tempfile

import pytest
import pytest_twisted
from aiosmtpd.controller import UnixSocketController
from peertools import EphemeralController, freePort, requireTool
from test_client_interop import waitForPort

from infsmtp import AsyncClient, Client, SMTPError

MESSAGE = b"From: ann@example.org\r\nTo: bob@example.org\r\nSubject: features\r\n\r\nHello.\r\n"


class Recorder:
    """
    An aiosmtpd handler keeping, per message, the peer address, the EHLO
    name and the content.
    """

    def __init__(self) -> None:
        self.messages: list[tuple[object, str, bytes]] = []

    async def handle_DATA(self, server, session, envelope):
        self.messages.append((session.peer, session.host_name, envelope.original_content))
        return "250 2.0.0 OK"




@pytest.fixture
def aiosmtpd():
    handler = Recorder()
    controller = EphemeralController(handler, hostname="127.0.0.1", port=0)
    controller.start()
    handler.port = controller.port
    yield handler
    controller.stop()


@pytest.fixture
def aiosmtpdOnUnixSocket():
    handler = Recorder()
    # A short path: sun_path holds about 100 bytes.
    folder = tempfile.mkdtemp(prefix="infsmtp-")
    handler.path = os.path.join(folder, "smtp.sock")
    controller = UnixSocketController(handler, unix_socket=handler.path)
    controller.start()
    yield handler
    controller.stop()
    shutil.rmtree(folder, ignore_errors=True)


def client(**settings) -> AsyncClient:
    c = AsyncClient()
    c.timeout = 10000
    for name, value in settings.items():
        setattr(c, name, value)
    return c


async def sendOne(c: AsyncClient) -> None:
    await c.connect()
    assert await c.sendStream(io.BytesIO(MESSAGE), "ann@example.org", ["bob@example.org"]) == {}
    await c.disconnect()


@pytest.mark.parametrize("source", ["127.0.0.5", ("127.0.0.5", 0)], ids=["host", "host and port"])
@pytest_twisted.ensureDeferred
async def test_sourceAddressIsWhatTheServerSees(aiosmtpd, source):
    await sendOne(client(host="127.0.0.1", port=aiosmtpd.port, sourceAddress=source))
    [(peer, _, _)] = aiosmtpd.messages
    assert peer[0] == "127.0.0.5"


@pytest.mark.parametrize("how", ["socketPath", "endpoint"])
@pytest_twisted.ensureDeferred
async def test_unixSocket(aiosmtpdOnUnixSocket, how):
    path = aiosmtpdOnUnixSocket.path
    value = path if how == "socketPath" else f"unix:path={path}"
    await sendOne(client(**{how: value}))
    [(_, _, content)] = aiosmtpdOnUnixSocket.messages
    assert content == MESSAGE


@pytest_twisted.ensureDeferred
async def test_localHostnameIsHeloName(aiosmtpd):
    c = client(host="127.0.0.1", port=aiosmtpd.port, localHostname="alias.test")
    assert c.heloName == "alias.test"
    await sendOne(c)
    [(_, heloName, _)] = aiosmtpd.messages
    assert heloName == "alias.test"


@pytest_twisted.ensureDeferred
async def test_sourceAddressWithAnEndpointIsRefused():
    with pytest.raises(SMTPError, match="bindAddress"):
        await client(endpoint="tcp:host=127.0.0.1:port=25", sourceAddress="127.0.0.5").connect()
    with pytest.raises(SMTPError, match="not a client endpoint string"):
        await client(endpoint="nonsense:what=ever").connect()


@pytest.fixture
def smtpSink():
    sink = requireTool("/usr/sbin/smtp-sink")
    port = freePort()
    command = [sink, f"127.0.0.1:{port}", "10"]
    if os.getuid() == 0:
        command[1:1] = ["-u", "nobody"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    waitForPort(port, process)
    yield port
    process.terminate()
    process.wait(5)


@pytest_twisted.ensureDeferred
async def test_noopRsetAndFeaturesAgainstSmtpSink(smtpSink):
    c = client(host="127.0.0.1", port=smtpSink)
    assert dict(c.esmtpFeatures) == {} and not c.supportsExtension("PIPELINING")
    await c.connect()
    features = c.esmtpFeatures
    assert "PIPELINING" in features and "8BITMIME" in features
    assert c.supportsExtension("pipelining") and c.supportsExtension("8bitmime")
    assert not c.supportsExtension("CHUNKING")
    with pytest.raises(TypeError):
        features["CHUNKING"] = ""  # type: ignore[index]
    assert not c.supportsExtension("CHUNKING")
    assert isinstance(await c.noop(), str)
    await c.rset()
    assert await c.sendStream(io.BytesIO(MESSAGE), "ann@example.org", ["bob@example.org"]) == {}
    await c.rset()
    await c.disconnect()
    assert dict(c.esmtpFeatures) == {}
    with pytest.raises(SMTPError, match="not connected"):
        await c.noop()


def test_blockingClientForwardsTheNewSettings():
    c = Client()
    c.localHostname = "alias.test"
    c.sourceAddress = "127.0.0.5"
    c.socketPath = "/run/smtp.sock"
    c.dataTimeout = 1000
    assert (c.heloName, c._client.heloName, c._client.sourceAddress, c._client.socketPath) == (
        "alias.test",
        "alias.test",
        "127.0.0.5",
        "/run/smtp.sock",
    )
    assert dict(c.esmtpFeatures) == {} and not c.supportsExtension("SIZE")

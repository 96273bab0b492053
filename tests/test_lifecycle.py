"""
Starting and stopping the server: the blocking API (from a worker thread
under this test process's reactor, and in a subprocess where crochet runs
the reactor), the Deferred API, and composition into a MultiService.
"""

from __future__ import annotations

import smtplib
import socket
import subprocess
import sys
import textwrap

import pytest
import pytest_twisted
from twisted.application.service import MultiService
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread

from infsmtp import Server, SMTPError

#: The bound on every wait, in seconds.
WAIT = 20.0


def bounded(d: Deferred) -> Deferred:
    return d.addTimeout(WAIT, reactor)


def sendOne(port: int) -> dict:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        return client.sendmail("a@b.test", ["c@d.test"], b"Subject: x\r\n\r\nhello\r\n")


def test_blocking_api_in_a_plain_program(tmp_path):
    """
    No reactor anywhere: start() runs one in a background thread.
    """
    script = tmp_path / "program.py"
    script.write_text(
        textwrap.dedent(
            """
            import smtplib
            from infsmtp import Server
            received = []
            server = Server(port=0, interface="127.0.0.1")
            server.onReceive = lambda s: received.append(s.message["Subject"])
            server.start()
            with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as c:
                c.sendmail("a@b.test", ["c@d.test"], b"Subject: plain\\r\\n\\r\\nx\\r\\n")
            server.stop()
            print("received", received)
            """
        )
    )
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "received ['plain']" in result.stdout


@pytest_twisted.ensureDeferred
async def test_blocking_api_from_a_worker_thread():
    server = Server(port=0, interface="127.0.0.1")
    got = []
    server.onReceive = lambda s: got.append(s.rcptTo)
    await deferToThread(server.start).addTimeout(WAIT, reactor)
    try:
        assert server.port != 0
        assert await deferToThread(sendOne, server.port).addTimeout(WAIT, reactor) == {}
        assert got == [["c@d.test"]]
    finally:
        await deferToThread(server.stop).addTimeout(WAIT, reactor)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", server.port), timeout=2).close()


def test_blocking_call_in_reactor_thread_refused():
    # pytest-twisted runs the reactor in this (main) thread.
    with pytest.raises(SMTPError, match="startListening"):
        Server(port=0, interface="127.0.0.1").start()


@pytest_twisted.ensureDeferred
async def test_multiservice_composition():
    parent = MultiService()
    server = Server(port=0, interface="127.0.0.1")
    server.setServiceParent(parent)
    parent.startService()
    try:
        assert server.running and server.port != 0
        assert await deferToThread(sendOne, server.port).addTimeout(WAIT, reactor) == {}
    finally:
        await parent.stopService().addTimeout(WAIT, reactor)
    assert not server.running


@pytest_twisted.ensureDeferred
async def test_port_in_use_is_a_clear_error():
    first = Server(port=0, interface="127.0.0.1")
    await first.startListening().addTimeout(WAIT, reactor)
    try:
        second = Server(port=first.port, interface="127.0.0.1")
        with pytest.raises(SMTPError, match="cannot listen"):
            await second.startListening().addTimeout(WAIT, reactor)
        parent = MultiService()
        second.setServiceParent(parent)
        with pytest.raises(SMTPError, match="cannot listen"):
            parent.startService()
    finally:
        await first.stopListening().addTimeout(WAIT, reactor)


@pytest_twisted.ensureDeferred
async def test_stop_ends_sessions_and_calls_onDisconnect():
    server = Server(port=0, interface="127.0.0.1")
    ended = Deferred()
    server.onDisconnect = lambda s: ended.callback(s.id)
    await server.startListening().addTimeout(WAIT, reactor)

    def idleClient():
        c = smtplib.SMTP("127.0.0.1", server.port, timeout=10)
        c.ehlo()
        return c

    client = await deferToThread(idleClient).addTimeout(WAIT, reactor)
    assert server.sessionCount == 1
    await server.stopListening(grace=5).addTimeout(WAIT, reactor)
    assert await bounded(ended) == 1
    # The idle session was told why before the close: smtplib reads that
    # 421 as the answer to its next command.
    code, text = await deferToThread(client.noop).addTimeout(WAIT, reactor)
    assert (code, text) == (421, b"4.3.2 " + server.hostname.encode() + b" Service shutting down")


@pytest_twisted.ensureDeferred
async def test_stop_waits_for_an_asynchronous_onDisconnect():
    from twisted.internet.task import deferLater

    server = Server(port=0, interface="127.0.0.1")
    finished = []

    async def onDisconnect(session):
        await deferLater(reactor, 0.2, lambda: None)
        finished.append(session.id)

    server.onDisconnect = onDisconnect
    await server.startListening().addTimeout(WAIT, reactor)
    client = await deferToThread(lambda: smtplib.SMTP("127.0.0.1", server.port, timeout=10)).addTimeout(WAIT, reactor)
    await server.stopListening().addTimeout(WAIT, reactor)
    assert finished == [1]
    client.close()


def test_tcp_endpoint_strings_get_a_large_backlog():
    from infsmtp._server.server import listenEndpoint

    assert listenEndpoint(reactor, "tcp:2525:interface=127.0.0.1")._backlog == 1024
    assert listenEndpoint(reactor, "tcp:2525:backlog=7")._backlog == 7
    assert listenEndpoint(reactor, "tcp6:2525", backlog=2048)._backlog == 2048

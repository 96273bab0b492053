"""
The server's own TLS layer (C{infsmtp/_server/tlslayer.py}, issue 15): the
close, a failed or stalled handshake, versions below TLS 1.2 when asked,
and that a TLS session lets go of its protocol without the garbage
collector.  Python's ssl and openssl s_client are the peers, over
loopback.
"""

from __future__ import annotations

import gc
import socket
import ssl
import weakref

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.logger import globalLogPublisher

from infsmtp import Server, TLSVersion

#: The bound on every wait, in seconds.
WAIT = 20.0


async def started(authority, implicit=False, **kw):
    server = Server(
        ssl=True, port=0, interface="127.0.0.1", hostname="localhost", implicitTls=implicit, **kw
    )
    server.setCertificate(authority.localhost.certFile, authority.localhost.keyFile)
    await server.startListening().addTimeout(WAIT, reactor)
    return server


def clientContext(authority):
    return ssl.create_default_context(cafile=authority.certFile)


def readReply(reader):
    lines = []
    while True:
        line = reader.readline()
        if not line:
            raise ConnectionError(f"closed after {lines!r}")
        lines.append(line)
        if line[3:4] != b"-":
            return lines


def plainToStartTLS(port):
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    reader = raw.makefile("rb")
    readReply(reader)
    raw.sendall(b"EHLO client.test\r\n")
    readReply(reader)
    raw.sendall(b"STARTTLS\r\n")
    assert readReply(reader)[0].startswith(b"220 ")
    return raw


@pytest_twisted.ensureDeferred
async def test_quit_ends_with_close_notify(certificateAuthority):
    """
    After 221 the server sends close_notify: a client that refuses ragged
    EOFs reads a clean end of TLS, not an error.
    """
    server = await started(certificateAuthority)

    def run():
        raw = plainToStartTLS(server.port)
        tls = clientContext(certificateAuthority).wrap_socket(
            raw, server_hostname="localhost", suppress_ragged_eofs=False
        )
        with tls:
            tls.sendall(b"EHLO client.test\r\nQUIT\r\n")
            received = b""
            while chunk := tls.recv(4096):  # SSLEOFError without close_notify
                received += chunk
            return received

    try:
        received = await deferToThread(run).addTimeout(WAIT, reactor)
        assert received.endswith(b"221 2.0.0 Bye\r\n"), received
    finally:
        await server.stopListening().addTimeout(WAIT, reactor)


@pytest_twisted.ensureDeferred
async def test_client_close_notify_gets_the_replies_first(certificateAuthority):
    """
    A client that pipelines a whole transaction and then its close_notify
    still gets every reply, and the message is delivered.
    """
    server = await started(certificateAuthority)
    received = []
    server.onReceive = lambda s: received.append(s.message)

    def run():
        raw = plainToStartTLS(server.port)
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = clientContext(certificateAuthority).wrap_bio(incoming, outgoing, server_hostname="localhost")
        raw.settimeout(10)

        def pump():
            if outgoing.pending:
                raw.sendall(outgoing.read())

        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                pump()
                incoming.write(raw.recv(65536))
        pump()
        tls.write(
            b"EHLO client.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\n"
            b"Subject: t\r\n\r\nbody\r\n.\r\n"
        )
        try:
            tls.unwrap()  # close_notify, in the same flight
        except ssl.SSLWantReadError:
            pass
        pump()
        plaintext = b""
        while chunk := raw.recv(65536):
            incoming.write(chunk)
            try:
                while True:
                    plaintext += tls.read(65536)
            except (ssl.SSLWantReadError, ssl.SSLZeroReturnError):
                pass
        return plaintext

    try:
        plaintext = await deferToThread(run).addTimeout(WAIT, reactor)
        codes = [line[:4] for line in plaintext.split(b"\r\n") if line[3:4] == b" "]
        assert codes == [b"250 ", b"250 ", b"250 ", b"354 ", b"250 "], plaintext
        assert received and "body" in received[0].get_payload()
    finally:
        await server.stopListening().addTimeout(WAIT, reactor)


@pytest_twisted.ensureDeferred
async def test_garbage_instead_of_a_client_hello(certificateAuthority):
    """
    A TLS record whose ClientHello is garbage after STARTTLS: an alert,
    the connection closed, one log line; the next client is served.
    """
    server = await started(certificateAuthority)
    seen = []

    def observe(event):
        if "TLS with" in str(event.get("log_format", "")):
            seen.append(event)

    globalLogPublisher.addObserver(observe)

    def garbage():
        raw = plainToStartTLS(server.port)
        # A handshake record holding a ClientHello of 7 bytes of nonsense.
        raw.sendall(b"\x16\x03\x01\x00\x0b" + b"\x01\x00\x00\x07" + b"\xff" * 7)
        received = b""
        while chunk := raw.recv(4096):
            received += chunk
        raw.close()
        return received

    def goodClient():
        raw = plainToStartTLS(server.port)
        with clientContext(certificateAuthority).wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(b"EHLO client.test\r\n")
            return readReply(tls.makefile("rb"))[0]

    try:
        received = await deferToThread(garbage).addTimeout(WAIT, reactor)
        # A TLS alert record (content type 21), then the end.
        assert received[:1] == b"\x15", received
        assert (await deferToThread(goodClient).addTimeout(WAIT, reactor)).startswith(b"250-")
        assert len(seen) == 1 and seen[0]["ip"] == "127.0.0.1"
    finally:
        globalLogPublisher.removeObserver(observe)
        await server.stopListening().addTimeout(WAIT, reactor)


@pytest_twisted.ensureDeferred
async def test_a_stalled_handshake_is_cut_off(certificateAuthority):
    """
    A client that says STARTTLS and then nothing holds its connection no
    longer than the idle timeout plus the close's grace.
    """
    server = await started(certificateAuthority, timeout=1)

    def stall():
        raw = plainToStartTLS(server.port)
        raw.settimeout(10)
        try:
            return raw.recv(4096)
        except ConnectionResetError:
            return b""

    try:
        assert await deferToThread(stall).addTimeout(WAIT, reactor) == b""
    finally:
        await server.stopListening().addTimeout(WAIT, reactor)


@pytest_twisted.ensureDeferred
async def test_a_refusal_at_connect_goes_out_over_implicit_tls(certificateAuthority):
    """
    Over maxConnections with implicit TLS: the 421 is written once the
    handshake is done, and the connection is closed after it.
    """
    server = await started(certificateAuthority, implicit=True, maxConnections=1)

    def run():
        first = clientContext(certificateAuthority).wrap_socket(
            socket.create_connection(("127.0.0.1", server.port), timeout=10), server_hostname="localhost"
        )
        assert readReply(first.makefile("rb"))[0].startswith(b"220 ")
        with clientContext(certificateAuthority).wrap_socket(
            socket.create_connection(("127.0.0.1", server.port), timeout=10), server_hostname="localhost"
        ) as second:
            reader = second.makefile("rb")
            reply = reader.readline()
            rest = reader.read()
        first.close()
        return reply, rest

    try:
        reply, rest = await deferToThread(run).addTimeout(WAIT, reactor)
        assert reply.startswith(b"421 4.7.0 "), reply
        assert rest == b""
    finally:
        await server.stopListening().addTimeout(WAIT, reactor)


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion:DeprecationWarning")
@pytest.mark.parametrize("version", ["TLSv1", "TLSv1_1"])
@pytest_twisted.ensureDeferred
async def test_old_versions_only_when_asked(certificateAuthority, version):
    """
    TLS 1.0 and 1.1 are refused by default, and work when minProtocol asks
    for them (OpenSSL's security level would refuse them otherwise).
    """
    wanted = getattr(ssl.TLSVersion, version)

    def handshake(port):
        context = clientContext(certificateAuthority)
        context.minimum_version = context.maximum_version = wanted
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            return tls.version()

    default = await started(certificateAuthority, implicit=True)
    old = await started(certificateAuthority, implicit=True, minProtocol=TLSVersion.tls1_0)
    try:
        with pytest.raises(ssl.SSLError):
            await deferToThread(handshake, default.port).addTimeout(WAIT, reactor)
        expected = {"TLSv1": "TLSv1", "TLSv1_1": "TLSv1.1"}[version]
        assert await deferToThread(handshake, old.port).addTimeout(WAIT, reactor) == expected
    finally:
        await default.stopListening().addTimeout(WAIT, reactor)
        await old.stopListening().addTimeout(WAIT, reactor)


@pytest_twisted.ensureDeferred
async def test_a_tls_session_is_freed_without_the_collector(certificateAuthority):
    """
    The layer and the protocol refer to each other while TLS is on; when
    the connection goes, that is undone at once.
    """
    server = await started(certificateAuthority)
    factory = server._factory
    refs = []
    build = factory.buildProtocol

    def buildProtocol(addr):
        protocol = build(addr)
        refs.append(weakref.ref(protocol))
        return protocol

    factory.buildProtocol = buildProtocol

    def run():
        raw = plainToStartTLS(server.port)
        with clientContext(certificateAuthority).wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(b"EHLO client.test\r\nMAIL FROM:<a@b.test>\r\n")
            reader = tls.makefile("rb")
            readReply(reader)
            readReply(reader)

    gc.collect()
    gc.disable()
    try:
        await deferToThread(run).addTimeout(WAIT, reactor)
        await factory.whenAllGone().addTimeout(WAIT, reactor)
        # The last release happens inside connectionLost: one more turn lets
        # Twisted drop the transport's own references.
        await deferLater(reactor, 0, lambda: None)
        assert refs and all(ref() is None for ref in refs)
    finally:
        gc.enable()
        await server.stopListening().addTimeout(WAIT, reactor)


@pytest.mark.parametrize("implicit", [False, True])
@pytest_twisted.ensureDeferred
async def test_tls_behind_a_proxy_header(certificateAuthority, implicit):
    """
    Behind HAProxy (a PROXY header first), STARTTLS and implicit TLS both
    work, and the session has the proxied client's address.
    """
    server = Server(
        endpoint="haproxy:tcp:0:interface=127.0.0.1", ssl=True, hostname="localhost", implicitTls=implicit
    )
    server.setCertificate(certificateAuthority.localhost.certFile, certificateAuthority.localhost.keyFile)
    seen = []
    server.onReceive = lambda s: seen.append((s.ip, s.secure, s.tlsVersion))
    await server.startListening().addTimeout(WAIT, reactor)

    def run():
        raw = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        raw.sendall(b"PROXY TCP4 192.0.2.9 192.0.2.1 40000 25\r\n")
        if not implicit:
            reader = raw.makefile("rb")
            readReply(reader)
            raw.sendall(b"EHLO client.test\r\n")
            readReply(reader)
            raw.sendall(b"STARTTLS\r\n")
            assert readReply(reader)[0].startswith(b"220 ")
        with clientContext(certificateAuthority).wrap_socket(raw, server_hostname="localhost") as tls:
            reader = tls.makefile("rb")
            if implicit:
                readReply(reader)
            tls.sendall(
                b"EHLO client.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\n"
                b"Subject: t\r\n\r\nbody\r\n.\r\nQUIT\r\n"
            )
            return [readReply(reader)[-1][:3] for _ in range(6)]

    try:
        assert await deferToThread(run).addTimeout(WAIT, reactor) == [b"250", b"250", b"250", b"354", b"250", b"221"]
        assert seen == [("192.0.2.9", True, "TLSv1.3")]
    finally:
        await server.stopListening().addTimeout(WAIT, reactor)


@pytest.mark.parametrize("maximum", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_the_server_keeps_no_session_per_client(certificateAuthority, maximum):
    """
    Resumption is by ticket only: however many clients came, the context
    holds no session of theirs (memory stays flat), and a client offering
    its ticket still resumes.
    """
    from infsmtp._server.tls import serverTLSOptions

    leaf = certificateAuthority.localhost
    server = serverTLSOptions(leaf.certFile, leaf.keyFile, None, False, TLSVersion.tls1_2, TLSVersion.tls1_3)
    client = clientContext(certificateAuthority)
    client.maximum_version = maximum

    def handshake(session=None):
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        ours = client.wrap_bio(incoming, outgoing, server_hostname="localhost", session=session)
        serverIn, serverOut = ssl.MemoryBIO(), ssl.MemoryBIO()
        theirs = server.wrap_bio(serverIn, serverOut, server_side=True)
        done = set()
        for _ in range(10):
            for name, side, source, sink in (("c", ours, outgoing, serverIn), ("s", theirs, serverOut, incoming)):
                try:
                    side.do_handshake()
                    done.add(name)
                except ssl.SSLWantReadError:
                    pass
                sink.write(source.read())
            if done == {"c", "s"}:
                break
        # TLS 1.3's ticket comes after the handshake, with the next read.
        try:
            ours.read(1)
        except ssl.SSLWantReadError:
            pass
        return ours

    last = None
    for _ in range(200):
        last = handshake()
    assert server.session_stats()["number"] == 0
    assert handshake(last.session).session_reused

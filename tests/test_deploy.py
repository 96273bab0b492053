"""
Issue 10: the deployment paths an operator takes, each either working or
refusing to start in one line.  Real sockets on loopback, real twistd
children (tests/twistdprocess.py); HAProxy itself is in test_haproxy.py.
"""

from __future__ import annotations

import os
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess

import pytest
import pytest_twisted
from twistdprocess import REPO, TWISTD, Twistd, childEnvironment, maildirFiles, poll
from twisted.internet import reactor
from twisted.internet.threads import deferToThread

from infsmtp import Server, SMTPError
from infsmtp._daemon.twistd import ConfigurationError, Options, buildServer

WAIT = 20


def inThread(fn, *args):
    return deferToThread(fn, *args).addTimeout(60, reactor)


def bounded(d):
    return d.addTimeout(WAIT, reactor)


# 2. Binding before privileges drop ------------------------------------------


@pytest_twisted.ensureDeferred
async def test_server_binds_in_privilegedStartService():
    server = Server(port=0, interface="127.0.0.1", hostname="mx.test")
    server.privilegedStartService()
    try:
        assert server.port > 0 and server._listening is not None
        listening = server._listening
        server.startService()
        assert server._listening is listening  # not bound twice
    finally:
        await bounded(server.stopService())


def freePrivilegedPort() -> int:
    for port in range(700, 1000):
        probe = socket.socket()
        try:
            probe.bind(("127.0.0.1", port))
            return port
        except OSError:
            continue
        finally:
            probe.close()
    pytest.fail("no free port below 1024")


@pytest.mark.skipif(os.geteuid() != 0, reason="binding a port below 1024 then dropping privileges needs root")
def test_tac_listens_on_a_privileged_port_with_uid(tmp_path):
    # (The .tac needs no folder of its own once running: it stores nothing.)
    port = freePrivilegedPort()
    (tmp_path / "low.tac").write_text(
        "from twisted.application import service\n"
        "from infsmtp import Server\n"
        "application = service.Application('low')\n"
        f"server = Server(port={port}, interface='127.0.0.1', hostname='mx.test')\n"
        "server.onReceive = lambda session: open('/dev/null', 'wb').write(session.msg) >= 0\n"
        "server.setServiceParent(application)\n"
    )
    os.chmod(tmp_path, 0o755)
    child = Twistd(["--uid", "nobody", "--gid", "nogroup", "-y", "low.tac"], tmp_path)
    try:
        child.waitLog(r"infsmtp listening on")
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            assert client.sendmail("a@b.test", ["c@d.test"], b"Subject: low\r\n\r\nx\r\n") == {}
        # It really runs as nobody.
        with open(f"/proc/{child.process.pid}/status") as f:
            uids = [line.split()[1:] for line in f if line.startswith("Uid:")][0]
        assert set(uids) == {str(__import__("pwd").getpwnam("nobody").pw_uid)}
    finally:
        assert child.terminate() in (0, -signal.SIGTERM, 128 + signal.SIGTERM)


# 3. haproxy: in the API is our reader ------------------------------------------


@pytest_twisted.ensureDeferred
async def test_server_haproxy_endpoint_waits_for_the_header_and_uses_its_address():
    seen = []
    server = Server(endpoint="haproxy:tcp:0:interface=127.0.0.1", hostname="mx.test", proxyTimeout=5)
    server.onConnect = lambda s: seen.append((s.ip, s.port))
    await bounded(server.startListening())

    def run():
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.settimeout(0.5)
            try:
                early = sock.recv(100)
            except TimeoutError:
                early = b""
            sock.settimeout(10)
            sock.sendall(b"PROXY TCP4 192.0.2.9 192.0.2.1 40000 25\r\n")
            greeting = sock.recv(100)
            sock.sendall(b"EHLO c.test\r\n")
            ehlo = sock.recv(1000)
            return early, greeting, ehlo

    try:
        early, greeting, ehlo = await inThread(run)
    finally:
        await bounded(server.stopListening())
    # Twisted's wrapper greeted before the header and saw 127.0.0.1.
    assert early == b""
    assert greeting.startswith(b"220 mx.test")
    assert b"Hello 192.0.2.9" in ehlo
    assert seen == [("192.0.2.9", 40000)]


@pytest_twisted.ensureDeferred
async def test_server_haproxy_endpoint_refuses_a_connection_without_header():
    server = Server(endpoint="haproxy:tcp:0:interface=127.0.0.1", hostname="mx.test")
    await bounded(server.startListening())

    def run():
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(b"EHLO x\r\n")
            return sock.recv(100)

    try:
        assert await inThread(run) == b""
    finally:
        await bounded(server.stopListening())


# 4. AUTH that could never be offered -------------------------------------------


def options(*args: str) -> Options:
    parsed = Options()
    parsed.parseOptions(list(args))
    return parsed


def test_auth_without_tls_refuses_to_start(tmp_path):
    with pytest.raises(ConfigurationError) as caught:
        buildServer(options("--auth", "memory:alice:pw", "--maildir", str(tmp_path / "m")))
    assert caught.value.text == (
        "--auth needs TLS: add --cert and --key (AUTH is offered only over TLS), "
        "or --allow-insecure-auth on a trusted network"
    )
    handlers = tmp_path / "login.py"
    handlers.write_text("def onLogin(session):\n    return False\n")
    with pytest.raises(ConfigurationError, match="an onLogin in --handlers needs TLS"):
        buildServer(options("--handlers", str(handlers), "--maildir", str(tmp_path / "m")))
    # Either remedy makes it a working configuration.
    buildServer(options("--auth", "memory:alice:pw", "--allow-insecure-auth", "--maildir", str(tmp_path / "m")))


def test_auth_with_tls_starts(tmp_path, certificateAuthority):
    leaf = certificateAuthority.localhost
    server = buildServer(
        options("--auth", "memory:alice:pw", "--cert", leaf.certFile, "--key", leaf.keyFile,
                "--maildir", str(tmp_path / "m"))
    )
    assert server.onLogin is not None and server.ssl


# 5. Certificates renewed without a restart ----------------------------------------


def peerName(port: int, cafile: str) -> str:
    context = ssl.create_default_context(cafile=cafile)
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.starttls(context=context)
        certificate = client.sock.getpeercert()
        return dict(pair[0] for pair in certificate["subject"])["commonName"]


@pytest_twisted.ensureDeferred
async def test_setCertificate_on_a_running_server_serves_new_connections(certificateAuthority):
    first = certificateAuthority.issue("localhost", "127.0.0.1", prefix="first")
    second = certificateAuthority.issue("127.0.0.1", "localhost", prefix="second")
    server = Server(ssl=True, port=0, interface="127.0.0.1", hostname="mx.test")
    server.setCertificate(first.certFile, first.keyFile)
    await bounded(server.startListening())
    try:
        before = await inThread(peerName, server.port, certificateAuthority.certFile)
        server.setCertificate(second.certFile, second.keyFile)
        after = await inThread(peerName, server.port, certificateAuthority.certFile)
        # A pair that does not load changes nothing.
        with pytest.raises(SMTPError, match="does not match"):
            server.setCertificate(first.certFile, second.keyFile)
        still = await inThread(peerName, server.port, certificateAuthority.certFile)
    finally:
        await bounded(server.stopListening())
    assert (before, after, still) == ("localhost", "127.0.0.1", "127.0.0.1")


def test_sighup_reloads_the_certificate(tmp_path, certificateAuthority):
    first = certificateAuthority.issue("localhost", "127.0.0.1", prefix="hupfirst")
    second = certificateAuthority.issue("127.0.0.1", "localhost", prefix="hupsecond")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    shutil.copy(first.certFile, cert)
    shutil.copy(first.keyFile, key)
    child = Twistd(
        ["infsmtp", "--listen", "tcp:0:interface=127.0.0.1", "--cert", str(cert), "--key", str(key),
         "--maildir", str(tmp_path / "Maildir")],
        tmp_path,
    )
    try:
        port = child.waitListening()[0][1]
        assert peerName(port, certificateAuthority.certFile) == "localhost"
        # A renewal as certbot does it: new files, then SIGHUP.
        shutil.copy(second.certFile, cert)
        shutil.copy(second.keyFile, key)
        child.process.send_signal(signal.SIGHUP)
        child.waitLog(r"SIGHUP: reloaded certificate")
        assert peerName(port, certificateAuthority.certFile) == "127.0.0.1"
        # A half-copied renewal (key of the other pair): the old one stays.
        shutil.copy(first.certFile, cert)
        child.process.send_signal(signal.SIGHUP)
        child.waitLog(r"SIGHUP: kept the certificate in use: key .* does not match certificate")
        assert peerName(port, certificateAuthority.certFile) == "127.0.0.1"
    finally:
        assert child.terminate() == 0


# 7. Peer addresses ------------------------------------------------------------------


def dualStack() -> bool:
    try:
        probe = socket.socket(socket.AF_INET6)
    except OSError:
        return False
    try:
        probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        probe.bind(("::", 0))
        return True
    except OSError:
        return False
    finally:
        probe.close()


@pytest.mark.skipif(not dualStack(), reason="no dual-stack IPv6 socket here")
@pytest_twisted.ensureDeferred
async def test_ipv4_client_of_a_dual_stack_listener_is_ipv4():
    seen = []
    server = Server(port=0, interface="::", hostname="mx.test")
    server.onConnect = lambda s: seen.append(s.ip)
    received = []
    server.onReceive = lambda s: received.append(s.msg)
    await bounded(server.startListening())

    def run():
        with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
            client.sendmail("a@b.test", ["c@d.test"], b"Subject: v4\r\n\r\nx\r\n")

    try:
        await inThread(run)
    finally:
        await bounded(server.stopListening())
    assert seen == ["127.0.0.1"]
    assert b"([127.0.0.1])" in received[0]


@pytest_twisted.ensureDeferred
async def test_unix_socket_client_has_no_fake_address(tmp_path):
    path = str(tmp_path / "smtp.sock")
    seen = []
    server = Server(endpoint=f"unix:{path}", hostname="mx.test", maxConnectionsPerClient=1)
    server.onConnect = lambda s: seen.append(s.ip)
    received = []
    server.onReceive = lambda s: received.append(s.msg)
    await bounded(server.startListening())

    def run():
        replies = []
        for _ in range(2):  # two at once: not "one client" to the limits
            sock = socket.socket(socket.AF_UNIX)
            sock.settimeout(10)
            sock.connect(path)
            replies.append(sock)
        with replies[0] as a, replies[1] as b:
            assert a.recv(100).startswith(b"220") and b.recv(100).startswith(b"220")
            a.sendall(b"EHLO c\r\n")
            ehlo = a.recv(1000)
            a.sendall(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\n")
            data = b""
            while data.count(b"\r\n") < 3:
                data += a.recv(1000)
            a.sendall(b"Subject: unix\r\n\r\nx\r\n.\r\nQUIT\r\n")
            while b"221" not in data:
                data += a.recv(1000)
            return ehlo

    try:
        ehlo = await inThread(run)
    finally:
        await bounded(server.stopListening())
    assert seen == ["", ""]
    assert b"Hello unix socket" in ehlo
    assert received[0].startswith(b"Received: from c (unix socket)\r\n")
    assert b"UNIXAddress" not in received[0]


# 9. Options ---------------------------------------------------------------------------


def test_version_is_infsmtps():
    import infsmtp
    from twisted import version

    result = subprocess.run(
        [TWISTD, "infsmtp", "--version"], capture_output=True, text=True, timeout=60, env=childEnvironment(), cwd=REPO
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"infsmtp {infsmtp.__version__} (Twisted {version.short()})"


def test_internal_option_is_not_in_help():
    usage = str(Options())
    assert "--inherit-fd" not in usage
    assert "--max-connections-per-client" in usage and "--trusted" in usage


@pytest.mark.parametrize("option", ["--proxy-timeout", "--grace", "--timeout"])
def test_negative_times_refuse_to_start(tmp_path, option):
    with pytest.raises(ConfigurationError, match=f"^{option} must be"):
        buildServer(options(option, "-1", "--maildir", str(tmp_path / "m")))


def test_size_suffixes(tmp_path):
    server = buildServer(options("--max-message-size", "10M", "--message-memory", "1G", "--maildir", str(tmp_path / "m")))
    assert server.maxMessageSize == 10 * 1024**2 and server.messageMemoryLimit == 1024**3


def test_maildir_listed_is_created(tmp_path):
    # (Sanity for the helpers above: the plugin's default path works.)
    child = Twistd(["infsmtp", "--listen", "tcp:0:interface=127.0.0.1", "--maildir", str(tmp_path / "box")], tmp_path)
    try:
        port = child.waitListening()[0][1]
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            client.sendmail("a@b.test", ["c@d.test"], b"Subject: m\r\n\r\nx\r\n")
        poll(lambda: maildirFiles(str(tmp_path / "box")), what="the message")
    finally:
        assert child.terminate() == 0



# 1 and 8. The Maildir, created by the user that delivers, once listening worked ----------


def nobody() -> tuple[int, int]:
    import grp
    import pwd

    return pwd.getpwnam("nobody").pw_uid, grp.getgrnam("nogroup").gr_gid


@pytest.fixture
def openPath():
    """
    A temporary folder another user can reach (pytest's are under a 0700
    folder of root's).
    """
    import pathlib
    import tempfile

    path = tempfile.mkdtemp(prefix="infsmtp-deploy-")
    os.chmod(path, 0o755)
    yield pathlib.Path(path)
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="--uid needs root")
def test_maildir_belongs_to_the_uid_twistd_drops_to(openPath):
    tmp_path = openPath
    uid, gid = nobody()
    home = tmp_path / "spool"
    home.mkdir()
    os.chown(home, uid, gid)
    maildir = home / "Maildir"
    child = Twistd(
        ["--uid", str(uid), "--gid", str(gid), "infsmtp", "--listen", "tcp:0:interface=127.0.0.1",
         "--maildir", str(maildir)],
        tmp_path,
    )
    try:
        port = child.waitListening()[0][1]
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            # Before: 451 4.3.0 for every message (a root-owned 0700 Maildir).
            assert client.sendmail("a@b.test", ["c@d.test"], b"Subject: uid\r\n\r\nx\r\n") == {}
        assert len(maildirFiles(str(maildir))) == 1
        assert {os.stat(maildir / sub).st_uid for sub in ("", "tmp", "new", "cur")} == {uid}
    finally:
        assert child.terminate() == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="--uid needs root")
def test_maildir_the_uid_cannot_write_refuses_to_start(openPath):
    tmp_path = openPath
    uid, gid = nobody()
    maildir = tmp_path / "Maildir"
    for sub in ("", "tmp", "new", "cur"):
        (maildir / sub).mkdir(mode=0o755)
    result = subprocess.run(
        [TWISTD, "-n", "--pidfile=", "--logfile", str(tmp_path / "log"), "--uid", str(uid), "--gid", str(gid),
         "infsmtp", "--listen", "tcp:0:interface=127.0.0.1", "--maildir", str(maildir)],
        capture_output=True, text=True, timeout=60, env=childEnvironment(), cwd=tmp_path,
    )
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"twistd infsmtp: error: Maildir {maildir}: {maildir}/tmp is not writable by uid {uid}"
    ]


def test_maildir_is_not_created_when_listening_fails(tmp_path):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        result = subprocess.run(
            [TWISTD, "-n", "--pidfile=", "--logfile", str(tmp_path / "log"), "infsmtp",
             "--listen", f"tcp:{busy.getsockname()[1]}:interface=127.0.0.1", "--maildir", str(tmp_path / "box")],
            capture_output=True, text=True, timeout=60, env=childEnvironment(), cwd=tmp_path,
        )
    finally:
        busy.close()
    assert result.returncode == 1 and "Address already in use" in result.stderr
    assert not (tmp_path / "box").exists()


# 6. Handler paths, as a Twisted user expects them ----------------------------------------


def test_tac_script_handler_resolves_beside_the_tac(tmp_path):
    conf = tmp_path / "conf"
    (conf / "handlers").mkdir(parents=True)
    (conf / "handlers" / "receive.py").write_text("open(session.data['out'], 'ab').write(session.msg)\n")
    out = tmp_path / "out.eml"
    (conf / "scripted.tac").write_text(
        "from twisted.application import service\n"
        "from infsmtp import Server\n"
        "application = service.Application('scripted')\n"
        "server = Server(port=0, interface='127.0.0.1', hostname='mx.test')\n"
        f"server.onConnect = lambda session: session.data.update(out={str(out)!r})\n"
        "server.onReceive = 'handlers/receive.py'\n"
        "server.setServiceParent(application)\n"
    )
    # Started from another folder: the path is the .tac's, not twistd's
    # (the executable's folder) nor the working directory.
    child = Twistd(["-y", "conf/scripted.tac"], tmp_path)
    try:
        port = child.waitListening()[0][1]
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            assert client.sendmail("a@b.test", ["c@d.test"], b"Subject: tac\r\n\r\nx\r\n") == {}
        assert b"Subject: tac" in out.read_bytes()
    finally:
        child.terminate()


def test_tac_path_on_the_command_line():
    from infsmtp._server.handlers import _tacPath

    assert _tacPath(["twistd", "-n", "-y", "a/b.tac"]) == "a/b.tac"
    assert _tacPath(["twistd", "--python=c.tac"]) == "c.tac"
    assert _tacPath(["twistd", "-yd.tac"]) == "d.tac"
    assert _tacPath(["twistd", "infsmtp"]) is None


def test_handlers_file_imports_its_neighbours(tmp_path):
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "allowlist_for_test_deploy.py").write_text("ALLOWED = {'c@d.test'}\n")
    (lib / "pol.py").write_text(
        "import allowlist_for_test_deploy\n"
        "def onRcptTo(session):\n"
        "    return session.address in allowlist_for_test_deploy.ALLOWED\n"
    )
    child = Twistd(
        ["infsmtp", "--listen", "tcp:0:interface=127.0.0.1", "--handlers", "lib/pol.py", "--maildir", "box"], tmp_path
    )
    try:
        port = child.waitListening()[0][1]
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            client.ehlo()
            client.mail("a@b.test")
            assert client.rcpt("c@d.test")[0] == 250
            assert client.rcpt("x@d.test")[0] == 550
    finally:
        assert child.terminate() == 0


def test_handlers_module_in_the_working_directory(tmp_path):
    (tmp_path / "policy_for_test_deploy.py").write_text("def onMailFrom(session):\n    return False\n")
    child = Twistd(
        ["infsmtp", "--listen", "tcp:0:interface=127.0.0.1", "--handlers", "policy_for_test_deploy",
         "--maildir", "box"],
        tmp_path,
    )
    try:
        port = child.waitListening()[0][1]
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            client.ehlo()
            assert client.mail("a@b.test")[0] == 550
    finally:
        assert child.terminate() == 0


def test_handlers_module_that_is_nowhere_says_where_it_looked(tmp_path):
    result = subprocess.run(
        [TWISTD, "-n", "--pidfile=", "--logfile", str(tmp_path / "log"), "infsmtp",
         "--listen", "tcp:0:interface=127.0.0.1", "--handlers", "nosuchpolicy"],
        capture_output=True, text=True, timeout=60, env=childEnvironment(), cwd=tmp_path,
    )
    assert result.returncode == 1
    (line,) = result.stderr.splitlines()
    assert line.startswith("twistd infsmtp: error: --handlers nosuchpolicy: cannot import: No module named")
    assert f"looked in the working directory {tmp_path}" in line
    assert "give its path: --handlers ./file.py" in line


# 8. A daemon's startup error is one readable line too ------------------------------------


def test_daemon_with_a_port_in_use_says_so_in_one_line(tmp_path):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    try:
        result = subprocess.run(
            [TWISTD, "--pidfile", str(tmp_path / "twistd.pid"), "--logfile", str(tmp_path / "log"), "infsmtp",
             "--listen", f"tcp:{port}:interface=127.0.0.1", "--maildir", str(tmp_path / "box")],
            capture_output=True, text=True, timeout=60, env=childEnvironment(), cwd=tmp_path,
        )
    finally:
        busy.close()
    # Before: "An error has occurred: b'...Couldn't liste'" (twistd's
    # 100-byte status pipe), and a Maildir left behind.
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"twistd infsmtp: error: cannot listen on tcp:{port}:interface=127.0.0.1: Address already in use"
    ]
    assert not (tmp_path / "box").exists() and not (tmp_path / "twistd.pid").exists()

"""
C{twistd -n infsmtp} as users run it: a subprocess on an ephemeral port in
a temporary folder, driven by smtplib, swaks, smtp-source, raw sockets and
an aiosmtpd smarthost.  Each test asserts on what the peers saw and on
what is in the Maildir.
"""

from __future__ import annotations

import email
import email.policy
import os
import re
import smtplib
import socket
import ssl
import struct
import subprocess
import time

import pytest
from peertools import requireTool
from twistdprocess import (
    EPHEMERAL,
    TWISTD,
    Twistd,
    childEnvironment,
    freePort,
    maildirFiles,
    poll,
    runSmarthost,
    runTwistd,
)

from infsmtp._daemon.twistd import DEFAULT_LISTEN, Options

SMTP_SOURCE = "/usr/sbin/smtp-source"


@pytest.fixture
def needsSwaks() -> str:
    # Through the one guard: skipped on a developer's machine without
    # swaks, a failure in CI (which installs it).
    return requireTool("swaks")


@pytest.fixture
def needsSmtpSource() -> str:
    return requireTool(SMTP_SOURCE)

MESSAGE = (
    b"From: Alice <alice@example.org>\r\n"
    b"To: Bob <bob@example.net>\r\n"
    b"Subject: through twistd\r\n"
    b"\r\n"
    b"Hello Bob.\r\n"
)


@pytest.fixture
def twistd(tmp_path):
    """
    C{twistd(*infsmtpArgs, cwd=None)} starts C{twistd -n infsmtp ...} and
    waits until it listens; every child is killed at teardown.
    """
    children: list[Twistd] = []

    def start(*args: str, cwd=None, listeners: int = 1) -> Twistd:
        args = list(args)
        if "--listen" not in args:
            args = ["--listen", EPHEMERAL, *args]
        child = Twistd(["infsmtp", *args], cwd or tmp_path)
        children.append(child)
        child.waitListening(listeners)
        return child

    yield start
    for child in children:
        child.kill()


def storedMessages(maildir) -> list[bytes]:
    out = []
    for name in maildirFiles(maildir):
        with open(os.path.join(str(maildir), "new", name), "rb") as f:
            out.append(f.read())
    return out


def smtplibSend(port: int, message: bytes = MESSAGE, recipients=("bob@example.net",), **kw) -> dict:
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=10) as client:
        return client.sendmail("alice@example.org", list(recipients), message, **kw)


def swaks(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [requireTool("swaks"), "--from", "alice@example.org", "--to", "bob@example.net", "--helo", "swaks.test", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
    )


# The plugin and its options ------------------------------------------------


def test_twistdListsThePlugin(tmp_path):
    """
    C{twistd --help} lists infsmtp among Twisted's own commands, and
    C{twistd infsmtp --help} documents every option.
    """

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [TWISTD, *args], check=False, capture_output=True, text=True, env=childEnvironment(), cwd=tmp_path, timeout=30
        )

    listing = run("--help")
    assert re.search(r"^\s+infsmtp\s+\S", listing.stdout, re.MULTILINE), listing.stdout
    assert re.search(r"^\s+web\s+", listing.stdout, re.MULTILINE)  # Twisted's own plugins still there

    usage = run("infsmtp", "--help")
    assert usage.returncode == 0
    for option in (
        "--listen", "--hostname", "--maildir", "--handlers", "--cert", "--key", "--root", "--implicit-tls",
        "--min-tls", "--max-tls", "--auth", "--max-connections", "--max-message-size", "--max-recipients",
        "--timeout", "--pool-size", "--relay", "--grace", "--proxy-timeout",
    ):
        assert re.search(rf"^\s+(-\w, )?{option}=?\s+[A-Z]", usage.stdout, re.MULTILINE), option
    assert "haproxy:" in usage.stdout


def test_defaults():
    """
    Without options: the loopback port 2525 and ./Maildir.
    """
    options = Options()
    options.parseOptions([])
    assert options["listen"] == [DEFAULT_LISTEN] == ["tcp:2525:interface=127.0.0.1"]
    assert options["maildir"] is None  # ./Maildir unless --relay
    options = Options()
    options.parseOptions(["--listen", "tcp:1", "-l", "unix:/x", "--max-message-size", "10M"])
    assert options["listen"] == ["tcp:1", "unix:/x"]
    assert options["max-message-size"] == 10 * 1024 * 1024


# Delivery ---------------------------------------------------------------------


@pytest.mark.usefixtures("needsSwaks")
def test_defaultMaildirDelivery(tmp_path, twistd):
    """
    With no --maildir, a message sent with swaks lands in ./Maildir/new,
    complete, and one log line names it.
    """
    child = twistd()
    result = swaks("--server", f"127.0.0.1:{child.port}", "--header", "Subject: from swaks", "--body", "swaks body")
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"<- +250 2\.0\.0 OK queued as \w+", result.stdout)
    [stored] = storedMessages(tmp_path / "Maildir")
    message = email.message_from_bytes(stored, policy=email.policy.default)
    assert message["Return-Path"] == "<alice@example.org>"
    assert message["Subject"] == "from swaks"
    assert "swaks body" in message.get_content()
    [name] = maildirFiles(tmp_path / "Maildir")
    line = child.waitLog(rf"session \d+ from 127\.0\.0\.1:\d+: <alice@example\.org> -> <bob@example\.net>, \d+ bytes, TLS no, stored in Maildir as {re.escape(name)}")
    assert "\n" not in line.group(0)
    assert maildirFiles(tmp_path / "Maildir", "tmp") == []


def test_limitsAndHostname(tmp_path, twistd):
    """
    --hostname, --max-message-size and --max-recipients reach the server.
    """
    child = twistd("--hostname", "mx.twistd.test", "--max-message-size", "2K", "--max-recipients", "2", "--maildir", "box")
    with smtplib.SMTP("127.0.0.1", child.port, timeout=10) as client:
        code, banner = client.ehlo("client.test")
        assert code == 250 and banner.startswith(b"mx.twistd.test")
        assert client.esmtp_features["size"] == "2048"
        client.mail("alice@example.org")
        assert client.rcpt("a@example.net")[0] == 250
        assert client.rcpt("b@example.net")[0] == 250
        assert client.rcpt("c@example.net")[0] == 452
        client.rset()
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            client.sendmail("alice@example.org", ["a@example.net"], MESSAGE + b"x" * 4096)
        assert refused.value.smtp_code == 552
    assert smtplibSend(child.port) == {}
    assert len(storedMessages(tmp_path / "box")) == 1


def test_maxConnections(tmp_path, twistd):
    """
    --max-connections: one more client than allowed is told 421 at once.
    """
    child = twistd("--max-connections", "1")
    first = smtplib.SMTP("127.0.0.1", child.port, timeout=10)
    assert first.noop()[0] == 250
    with pytest.raises(smtplib.SMTPConnectError) as second:
        smtplib.SMTP("127.0.0.1", child.port, timeout=10)
    assert second.value.smtp_code == 421
    assert first.docmd("QUIT")[0] == 221
    # The server's end closes as its session ends; a client reconnecting
    # before that may still find the one slot taken (and be told 421).
    assert first.sock.recv(1) == b""
    first.close()
    assert smtplibSend(child.port) == {}  # the slot is free again


def test_noOptionsAtAll(tmp_path):
    """
    The embedded default, exactly as a newcomer runs it: 127.0.0.1:2525 and
    ./Maildir.  (Skipped when something else holds port 2525.)
    """
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", 2525))
        except OSError:
            pytest.skip("port 2525 is in use")
    child = Twistd(["infsmtp"], tmp_path)
    try:
        assert child.waitListening() == [("127.0.0.1", 2525)]
        assert smtplibSend(2525) == {}
        assert len(storedMessages(tmp_path / "Maildir")) == 1
        assert child.terminate() == 0
    finally:
        child.kill()


@pytest.mark.usefixtures("needsSwaks")
def test_severalListenersAndUnixSocket(tmp_path, twistd):
    """
    --listen is repeatable; a unix: listener works like a TCP one.
    """
    sock = str(tmp_path / "smtp.sock")
    child = twistd("--listen", EPHEMERAL, "--listen", EPHEMERAL, "--listen", f"unix:{sock}", listeners=2)
    child.waitLog(r"infsmtp listening on unix:" + re.escape(sock))
    ports = [port for _, port in child.waitListening(2)]
    assert len(set(ports)) == 2
    for port in ports:
        assert smtplibSend(port) == {}
    result = swaks("--socket", sock)
    assert result.returncode == 0, result.stdout
    assert len(storedMessages(tmp_path / "Maildir")) == 3


# TLS and AUTH -----------------------------------------------------------------


def tlsContext(certificateAuthority) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=certificateAuthority.certFile)


def test_starttlsAndAuthFromFile(tmp_path, twistd, certificateAuthority):
    """
    --cert/--key offer STARTTLS; --auth file: offers AUTH only after it,
    accepts the right password, refuses a wrong one (535), and the stored
    message says it came over TLS.
    """
    (tmp_path / "users.txt").write_text("alice:s3cret\nbob:other\n")
    leaf = certificateAuthority.localhost
    child = twistd("--cert", leaf.certFile, "--key", leaf.keyFile, "--auth", "file:users.txt", "--require-auth")
    with smtplib.SMTP("127.0.0.1", child.port, timeout=10) as client:
        client.ehlo("client.test")
        assert client.has_extn("starttls")
        assert not client.has_extn("auth")
        assert client.mail("alice@example.org")[0] == 530
        client.starttls(context=tlsContext(certificateAuthority))
        client.ehlo("client.test")
        assert "PLAIN" in client.esmtp_features["auth"]
        with pytest.raises(smtplib.SMTPAuthenticationError) as wrong:
            client.login("alice", "wrong")
        assert wrong.value.smtp_code == 535
        assert client.login("alice", "s3cret")[0] == 235
        assert client.sendmail("alice@example.org", ["bob@example.net"], MESSAGE) == {}
    [stored] = storedMessages(tmp_path / "Maildir")
    assert re.search(rb"with ESMTPSA \(TLSv1\.[23]\)", stored)
    child.waitLog(r"<alice@example\.org> -> <bob@example\.net>, \d+ bytes, TLS yes, stored")


@pytest.mark.usefixtures("needsSwaks")
def test_swaksStarttlsVerifiedAndMemoryAuth(tmp_path, twistd, certificateAuthority):
    """
    swaks verifies our certificate over STARTTLS and logs in with a
    memory: checker.
    """
    leaf = certificateAuthority.localhost
    child = twistd("--cert", leaf.certFile, "--key", leaf.keyFile, "--auth", "memory:carol:pa55")
    common = ("--server", f"127.0.0.1:{child.port}", "--tls", "--tls-verify", "--tls-ca-path", certificateAuthority.certFile)
    ok = swaks(*common, "--auth", "PLAIN", "--auth-user", "carol", "--auth-password", "pa55")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "235 2.7.0" in ok.stdout
    bad = swaks(*common, "--auth", "LOGIN", "--auth-user", "carol", "--auth-password", "nope")
    assert bad.returncode != 0
    assert "535 5.7.8" in bad.stdout
    assert len(storedMessages(tmp_path / "Maildir")) == 1


def test_implicitTls(tmp_path, twistd, certificateAuthority):
    """
    --implicit-tls: TLS from the first byte, within --min-tls/--max-tls.
    """
    leaf = certificateAuthority.localhost
    child = twistd("--cert", leaf.certFile, "--key", leaf.keyFile, "--implicit-tls", "--min-tls", "1.3")
    child.waitLog(r"listening on 127\.0\.0\.1:\d+ \(implicit TLS\)")
    with smtplib.SMTP_SSL("127.0.0.1", child.port, timeout=10, context=tlsContext(certificateAuthority)) as client:
        assert client.sock.version() == "TLSv1.3"
        assert client.sendmail("alice@example.org", ["bob@example.net"], MESSAGE) == {}
    context = tlsContext(certificateAuthority)
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises(ssl.SSLError) as refused:
        smtplib.SMTP_SSL("127.0.0.1", child.port, timeout=10, context=context)
    # Refused for its version, not for any other handshake failure.
    assert refused.value.reason == "TLSV1_ALERT_PROTOCOL_VERSION", refused.value
    assert len(storedMessages(tmp_path / "Maildir")) == 1

    # --max-tls: a second daemon that stops at TLS 1.2 refuses a client
    # that insists on 1.3, and serves any other client over 1.2.
    (tmp_path / "capped").mkdir()  # its own pid file and log
    capped = twistd(
        "--cert", leaf.certFile, "--key", leaf.keyFile, "--implicit-tls", "--max-tls", "1.2",
        cwd=tmp_path / "capped",
    )
    capped.waitLog(r"listening on 127\.0\.0\.1:\d+ \(implicit TLS\)")
    context = tlsContext(certificateAuthority)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    with pytest.raises(ssl.SSLError) as refused:
        smtplib.SMTP_SSL("127.0.0.1", capped.port, timeout=10, context=context)
    assert refused.value.reason == "TLSV1_ALERT_PROTOCOL_VERSION", refused.value
    with smtplib.SMTP_SSL("127.0.0.1", capped.port, timeout=10, context=tlsContext(certificateAuthority)) as client:
        assert client.sock.version() == "TLSv1.2"
        assert client.sendmail("alice@example.org", ["bob@example.net"], MESSAGE) == {}
    assert len(storedMessages(tmp_path / "capped" / "Maildir")) == 1


# Handlers ---------------------------------------------------------------------

HANDLERS = '''
import json, os
from twisted.internet import reactor, task
from infsmtp import SMTPError

def onConnect(session):
    session.data["greeted"] = True

def onRcptTo(session):
    # A Deferred, as a lookup in a database would give.
    if session.address.startswith("nobody@"):
        return task.deferLater(reactor, 0, lambda: False)
    if session.address.startswith("full@"):
        raise SMTPError(452, "4.2.2 Mailbox full")
    return task.deferLater(reactor, 0, lambda: True)

def onReceive(session):
    record = {"from": session.mailFrom, "to": session.rcptTo, "subject": session.message["Subject"],
              "greeted": session.data.get("greeted")}
    with open(os.path.join(os.path.dirname(__file__), "received.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\\n")
    return True
'''


def test_handlersScript(tmp_path, twistd):
    """
    --handlers FILE: its functions decide (Deferreds included), and its
    onReceive replaces the Maildir, which is not even created.
    """
    (tmp_path / "policy").mkdir()
    (tmp_path / "policy" / "handlers.py").write_text(HANDLERS)
    child = twistd("--handlers", "policy/handlers.py")
    refused = smtplibSend(child.port, recipients=("bob@example.net", "nobody@example.net", "full@example.net"))
    assert refused == {
        "nobody@example.net": (550, b"5.7.1 Recipient address rejected"),
        "full@example.net": (452, b"4.2.2 Mailbox full"),
    }
    import json

    lines = (tmp_path / "policy" / "received.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"from": "alice@example.org", "to": ["bob@example.net"], "subject": "through twistd", "greeted": True}
    ]
    assert not (tmp_path / "Maildir").exists()


def test_handlersModule(tmp_path, twistd, monkeypatch):
    """
    --handlers MODULE: an importable module works the same way; without an
    onReceive the Maildir still stores the message.
    """
    (tmp_path / "mypolicy.py").write_text("def onMailFrom(session):\n    return session.address != 'spam@example.org'\n")
    child = Twistd(["infsmtp", "--listen", EPHEMERAL, "--handlers", "mypolicy"], tmp_path,
                   env=childEnvironment(PYTHONPATH=f"{tmp_path}{os.pathsep}{childEnvironment()['PYTHONPATH']}"))
    try:
        port = child.port
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            with pytest.raises(smtplib.SMTPSenderRefused) as refused:
                client.sendmail("spam@example.org", ["bob@example.net"], MESSAGE)
            assert refused.value.smtp_code == 550
        assert smtplibSend(port) == {}
        assert len(storedMessages(tmp_path / "Maildir")) == 1
    finally:
        child.kill()


# Relay ------------------------------------------------------------------------


@pytest.fixture
def smarthost():
    """
    An aiosmtpd smarthost (see L{twistdprocess.Sink}).
    """
    yield from runSmarthost()


def test_relayIntoAiosmtpd(tmp_path, twistd, smarthost):
    """
    --relay forwards through AsyncClient: the 250 means the smarthost has
    the message; its permanent refusal comes back as 5xx; a smarthost that
    is down gives 451 and nothing is stored anywhere.
    """
    child = twistd("--relay", f"127.0.0.1:{smarthost.port}", "--relay-tls", "none")
    assert smtplibSend(child.port, recipients=("bob@example.net", "carol@example.net")) == {}
    assert len(smarthost.envelopes) == 1  # there when the 250 came
    sender, recipients, content = smarthost.envelopes[0]
    assert (sender, recipients) == ("alice@example.org", ["bob@example.net", "carol@example.net"])
    assert content.endswith(MESSAGE)
    assert content.startswith(b"Received: from client.test ([127.0.0.1])")

    with pytest.raises(smtplib.SMTPDataError) as rejected:
        smtplibSend(child.port, message=MESSAGE.replace(b"Subject: through twistd", b"Subject: reject"))
    assert rejected.value.smtp_code == 554
    assert b"Rejected by the sink" in rejected.value.smtp_error
    with pytest.raises(smtplib.SMTPDataError) as refused:
        smtplibSend(child.port, recipients=("refuse@example.net",))
    assert refused.value.smtp_code == 550
    assert len(smarthost.envelopes) == 1
    child.waitLog(r"relayed to 127\.0\.0\.1:\d+")

    # Some recipients refused by the smarthost: the others have the message,
    # so it is acknowledged (a 451 would duplicate it), and the refusal logged.
    assert smtplibSend(child.port, recipients=("dave@example.net", "refuse@example.net")) == {}
    assert smarthost.envelopes[-1][1] == ["dave@example.net"]
    child.waitLog(r"refused <refuse@example\.net>: 550 ")

    (tmp_path / "down").mkdir()
    down = twistd("--relay", f"127.0.0.1:{freePort()}", "--relay-tls", "none", cwd=tmp_path / "down")
    with pytest.raises(smtplib.SMTPDataError) as later:
        smtplibSend(down.port)
    assert later.value.smtp_code == 451
    assert not (tmp_path / "Maildir").exists()



def test_relayWithStarttlsAndAuth(tmp_path, twistd, certificateAuthority):
    """
    --relay-tls starttls with --relay-ca, --relay-user and
    --relay-password-file: the smarthost (which insists on both) verifies
    our login over TLS; a wrong password is a 451, not a lost message.
    """
    from aiosmtpd.smtp import AuthResult

    leaf = certificateAuthority.localhost
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(leaf.certFile, leaf.keyFile)
    logins = []

    def authenticator(server, session, envelope, mechanism, data):
        logins.append((data.login, session.ssl is not None))
        # handled=False: aiosmtpd then answers a refusal with 535 itself.
        return AuthResult(success=(data.login, data.password) == (b"relayuser", b"relay pass"), handled=False)

    smarthost = runSmarthost(
        tls_context=context, require_starttls=True, authenticator=authenticator, auth_require_tls=True
    )
    sink = next(smarthost)
    try:
        (tmp_path / "password").write_text("relay pass\n")
        (tmp_path / "wrong").write_text("guess\n")
        relay = ["--relay", f"127.0.0.1:{sink.port}", "--relay-ca", certificateAuthority.certFile, "--relay-user", "relayuser"]
        child = twistd(*relay, "--relay-password-file", "password")
        assert smtplibSend(child.port) == {}
        assert len(sink.envelopes) == 1 and logins == [(b"relayuser", True)]

        (tmp_path / "wrong-password").mkdir()
        wrong = twistd(*relay, "--relay-password-file", str(tmp_path / "wrong"), cwd=tmp_path / "wrong-password")
        with pytest.raises(smtplib.SMTPDataError) as refused:
            smtplibSend(wrong.port)
        assert refused.value.smtp_code == 451
        assert len(sink.envelopes) == 1
    finally:
        smarthost.close()


# PROXY protocol ----------------------------------------------------------------


def readReply(sock: socket.socket) -> bytes:
    data = b""
    while not re.search(rb"(^|\r\n)\d{3} [^\r\n]*\r\n$", data):
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def readToEnd(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    return data


def test_haproxyListener(tmp_path, twistd):
    """
    haproxy: listeners greet only after the PROXY header (v1 or v2), the
    session sees the proxied client, and a silent connection is closed.
    """
    child = twistd("--listen", "haproxy:" + EPHEMERAL, "--proxy-timeout", "1")
    child.waitLog(r"listening on 127\.0\.0\.1:\d+ \(plaintext, PROXY protocol\)")
    port = child.port

    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.settimeout(0.3)
        with pytest.raises(socket.timeout):
            sock.recv(100)  # no greeting before the header
        sock.settimeout(10)
        sock.sendall(b"PROXY TCP4 203.0.113.7 192.0.2.25 40000 25\r\n")
        assert readReply(sock).startswith(b"220 ")
        for line in (b"EHLO proxied.test", b"MAIL FROM:<alice@example.org>", b"RCPT TO:<bob@example.net>", b"DATA"):
            sock.sendall(line + b"\r\n")
            assert readReply(sock)[:1] in (b"2", b"3")
        sock.sendall(MESSAGE + b".\r\n")
        assert readReply(sock).startswith(b"250 ")

    v2 = b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x21, 0x21]) + struct.pack("!H", 36)
    v2 += socket.inet_pton(socket.AF_INET6, "2001:db8::9") + socket.inet_pton(socket.AF_INET6, "2001:db8::1")
    v2 += struct.pack("!HH", 50000, 25)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(v2 + b"EHLO v2.test\r\n")  # the command may ride with the header
        replies = readReply(sock)
        while b"250 " not in replies:
            replies += readReply(sock)
        assert replies.startswith(b"220 ") and b"Hello 2001:db8::9" in replies

    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        assert sock.recv(100) == b""  # closed, without a greeting
    assert time.monotonic() - started < 8
    child.waitLog(r"no PROXY header within 1 seconds")

    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"EHLO not-a-proxy\r\n")
        assert sock.recv(100) == b""

    [stored] = storedMessages(tmp_path / "Maildir")
    assert b"Received: from proxied.test ([203.0.113.7])" in stored
    child.waitLog(r"session \d+ from 203\.0\.113\.7:40000: <alice@example\.org>")



def proxiedSmtplib(port: int, header: bytes, context: ssl.SSLContext | None = None) -> smtplib.SMTP:
    """
    An smtplib client on a connection that starts with a PROXY header (and
    TLS right after it when C{context} is given).
    """
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(header)
    if context is not None:
        sock = context.wrap_socket(sock, server_hostname="localhost")
    client = smtplib.SMTP(local_hostname="client.test", timeout=10)
    client.sock = sock
    client._host = "localhost"  # the name STARTTLS verifies (connect() would set it)
    code, _ = client.getreply()
    assert code == 220
    return client


def test_haproxyWithTls(tmp_path, twistd, certificateAuthority):
    """
    Behind a PROXY header, STARTTLS works (the handshake news reaches the
    session through the PROXY reader) and so does implicit TLS.
    """
    leaf = certificateAuthority.localhost
    header = b"PROXY TCP4 198.51.100.4 192.0.2.25 41000 587\r\n"
    (tmp_path / "starttls").mkdir()
    starttls = twistd("--listen", "haproxy:" + EPHEMERAL, "--cert", leaf.certFile, "--key", leaf.keyFile, cwd=tmp_path / "starttls")
    with proxiedSmtplib(starttls.port, header) as client:
        client.starttls(context=tlsContext(certificateAuthority))
        assert client.sendmail("alice@example.org", ["bob@example.net"], MESSAGE) == {}
    [stored] = storedMessages(tmp_path / "starttls" / "Maildir")
    assert re.search(rb"from client\.test \(\[198\.51\.100\.4\]\)\n\tby \S+ \(infsmtp\) with ESMTPS \(TLSv1\.3\)", stored)

    (tmp_path / "implicit").mkdir()
    implicit = twistd("--listen", "haproxy:" + EPHEMERAL, "--cert", leaf.certFile, "--key", leaf.keyFile,
                      "--implicit-tls", cwd=tmp_path / "implicit")
    with proxiedSmtplib(implicit.port, header, tlsContext(certificateAuthority)) as client:
        assert client.sendmail("alice@example.org", ["bob@example.net"], MESSAGE) == {}
    [stored] = storedMessages(tmp_path / "implicit" / "Maildir")
    assert b"([198.51.100.4])" in stored and b"with ESMTPS" in stored


# Graceful stop ----------------------------------------------------------------


def refused(port: int) -> bool:
    """
    Whether connecting is refused.  (The listening socket closes one
    reactor turn after listening stops; a client that slips in between is
    reset without a greeting.)
    """
    try:
        socket.create_connection(("127.0.0.1", port), timeout=10).close()
    except ConnectionRefusedError:
        return True
    return False


def test_sigtermLetsTransactionInFlightFinish(tmp_path, twistd):
    """
    On SIGTERM: listening stops at once, an idle session is told 421 4.3.2,
    a message half sent is finished and acknowledged (and stored), then
    the process exits 0.
    """
    child = twistd("--grace", "20")
    port = child.port
    busy = socket.create_connection(("127.0.0.1", port), timeout=10)
    idle = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        assert readReply(busy).startswith(b"220")
        for line in (b"EHLO busy.test", b"MAIL FROM:<alice@example.org>", b"RCPT TO:<bob@example.net>", b"DATA"):
            busy.sendall(line + b"\r\n")
            assert readReply(busy)[:1] in (b"2", b"3")
        busy.sendall(MESSAGE[:40])
        assert readReply(idle).startswith(b"220")
        idle.sendall(b"EHLO idle.test\r\n")
        assert readReply(idle).startswith(b"250")

        child.process.send_signal(15)
        child.waitLog(r"SIGTERM: stopping")
        assert readReply(idle).startswith(b"421 4.3.2")
        assert idle.recv(100) == b""
        poll(lambda: refused(port), deadline=5, what="the listening socket to close")

        busy.sendall(MESSAGE[40:] + b".\r\n")
        assert re.fullmatch(rb"250 2\.0\.0 [^\r\n]*\r\n421 4\.3\.2 [^\r\n]*\r\n", readToEnd(busy))
        assert child.process.wait(20) == 0
    finally:
        busy.close()
        idle.close()
    [stored] = storedMessages(tmp_path / "Maildir")
    assert stored.endswith(MESSAGE.replace(b"\r\n", b"\n"))


@pytest.mark.usefixtures("needsSmtpSource")
def test_sigtermDuring500MessageRun(tmp_path, twistd):
    """
    SIGTERM in the middle of a 500-message smtp-source run: every message
    smtp-source saw acknowledged ("250 ... queued as ID") is in the Maildir
    (its Received header carries the ID), nothing is left in tmp/, every
    stored file is whole, and twistd exits 0.
    """
    child = twistd("--grace", "20")
    maildir = tmp_path / "Maildir"
    with open(tmp_path / "smtp-source.out", "wb") as out:
        source = subprocess.Popen(
            [SMTP_SOURCE, "-v", "-s", "10", "-m", "500", "-l", "4000", "-f", "alice@example.org",
             "-t", "bob@example.net", f"127.0.0.1:{child.port}"],
            stdout=out, stderr=subprocess.STDOUT,
        )
        try:
            poll(lambda: len(maildirFiles(maildir)) >= 60, what="60 messages stored")
            assert child.terminate() == 0, child.log()
            source.wait(30)
        finally:
            if source.poll() is None:
                source.kill()
    transcript = (tmp_path / "smtp-source.out").read_text(errors="replace")
    acknowledged = set(re.findall(r"<<< 250 2\.0\.0 OK queued as (\w+)", transcript))
    # smtp-source gives up at the first refused connection, so it may not
    # read the last few 250s: what it read is the client-side count.
    assert 0 < len(acknowledged) < 500, f"SIGTERM should land in the middle of the run ({len(acknowledged)} acknowledged)"

    storedIds = {}
    sizes = set()
    for data in storedMessages(maildir):
        match = re.search(rb"\n\tid (\w+)", data)
        assert match, data[:300]
        storedIds[match.group(1).decode()] = data
        _, _, body = data.partition(b"\n\n")
        sizes.add(len(body))
    missing = acknowledged - set(storedIds)
    assert not missing, f"{len(missing)} acknowledged messages are not in the Maildir"
    assert len(sizes) == 1, "every stored message has the whole body"
    assert maildirFiles(maildir, "tmp") == []
    assert "infsmtp listening" in child.log() and "SIGTERM: stopping" in child.log()


# Wrong configuration ------------------------------------------------------------


def wrongConfigurations(tmp_path, certificateAuthority):
    leaf = certificateAuthority.localhost
    other = certificateAuthority.issue("other.test", prefix="other")
    (tmp_path / "not-a-folder").write_text("x")
    (tmp_path / "keydir").mkdir()
    (tmp_path / "broken.py").write_text("def onReceive(session)\n    pass\n")
    (tmp_path / "receive.py").write_text("def onReceive(session):\n    pass\n")
    return {
        "missing certificate": (["--cert", "missing.pem", "--key", leaf.keyFile], "cannot read certificate file missing.pem"),
        "unreadable key": (["--cert", leaf.certFile, "--key", str(tmp_path / "keydir")], "cannot read key file"),
        "key not matching": (["--cert", leaf.certFile, "--key", other.keyFile], "does not match certificate"),
        "unknown auth": (["--auth", "bogus:x"], "--auth bogus:x: Auth plugin not recognized"),
        "missing users file": (["--auth", "file:nobody.txt"], "nobody.txt is not a readable file"),
        "maildir is a file": (["--maildir", "not-a-folder"], "not-a-folder is a file, not a folder"),
        "bad endpoint": (["--listen", "carrier-pigeon:1"], "--listen carrier-pigeon:1: Unknown endpoint type"),
        "broken handlers": (["--handlers", "broken.py"], "--handlers broken.py: syntax error line 1"),
        "implicit tls alone": (["--implicit-tls"], "--implicit-tls needs --cert"),
        "two deliveries": (["--handlers", str(tmp_path / "receive.py"), "--maildir", "box"],
                           "--maildir and an onReceive in --handlers are exclusive"),
        "negative per-client limit": (["--max-connections-per-client", "-1"],
                                      "--max-connections-per-client must be an integer of at least 0, not -1"),
        "zero timeout": (["--timeout", "0"], "--timeout must be a positive number of seconds, not 0.0"),
        "bad trusted network": (["--trusted", "10.0.0.0/33"], "--trusted '10.0.0.0/33'"),
        "negative memory budget": (["--message-memory", "-5"], "--message-memory -5: a size cannot be negative"),
        "count not a number": (["--max-connections", "many"], "--max-connections many: invalid literal for int()"),
        "no handler time": (["--receive-timeout", "0"], "--receive-timeout must be a positive number of seconds"),
        "starttls required without tls": (["--require-starttls"], "--require-starttls needs --cert and --key"),
        "greeting later than the timeout": (["--greet-delay", "400"],
                                            "--greet-delay must be shorter than timeout (300 s), not 400.0"),
        "banner not ascii": (["--banner", "caf\u00e9"], "--banner must be one line of printable ASCII"),
    }


CASES = [
    "missing certificate", "unreadable key", "key not matching", "unknown auth", "missing users file",
    "maildir is a file", "bad endpoint", "broken handlers", "implicit tls alone", "two deliveries", "port in use",
    "negative per-client limit", "zero timeout", "bad trusted network", "negative memory budget", "count not a number", "no handler time",
    "starttls required without tls", "greeting later than the timeout", "banner not ascii",
]


@pytest.mark.parametrize("case", CASES)
def test_wrongConfigurationIsOneLine(tmp_path, certificateAuthority, case):
    """
    Each wrong configuration: exit status 1, one line on standard error
    saying what is wrong, no traceback anywhere.
    """
    if case == "port in use":
        busy = socket.socket()
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        args, expected = ["--listen", f"tcp:{port}:interface=127.0.0.1"], "Address already in use"
    else:
        busy = None
        args, expected = wrongConfigurations(tmp_path, certificateAuthority)[case]
        if "--listen" not in args:
            args = ["--listen", EPHEMERAL, *args]
    try:
        result = runTwistd(["infsmtp", *args], tmp_path, pidfile="twistd.pid")
    finally:
        if busy is not None:
            busy.close()
    assert not (tmp_path / "twistd.pid").exists()
    lines = result.stderr.splitlines()
    assert result.returncode == 1, result
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("twistd infsmtp: error: ")
    assert expected in lines[0]
    log = (tmp_path / "twistd.log").read_text() if (tmp_path / "twistd.log").exists() else ""
    assert "Traceback" not in result.stderr + result.stdout + log


def test_daemonMode(tmp_path):
    """
    Without -n: the daemon delivers into ./Maildir of the folder it was
    started in and stops on SIGTERM; a port in use makes the waiting parent
    exit 1 with twistd's message instead of hanging.
    """
    pidfile = tmp_path / "twistd.pid"
    started = runTwistd(["infsmtp", "--listen", EPHEMERAL], tmp_path, pidfile=str(pidfile), daemon=True)
    assert started.returncode == 0, started.stderr
    pid = int(poll(lambda: pidfile.exists() and pidfile.read_text().strip(), what="the pid file"))
    try:
        log = poll(lambda: re.search(r"infsmtp listening on 127\.0\.0\.1:(\d+)", (tmp_path / "twistd.log").read_text()),
                   what="the listening line")
        port = int(log.group(1))
        assert smtplibSend(port) == {}
        assert len(storedMessages(tmp_path / "Maildir")) == 1

        (tmp_path / "second").mkdir()
        busy = runTwistd(["infsmtp", "--listen", f"tcp:{port}:interface=127.0.0.1"], tmp_path / "second",
                         pidfile="other.pid", daemon=True)
        assert busy.returncode == 1
        # One readable line, said before daemonizing (not twistd's 100-byte
        # repr from the daemon's status pipe).
        assert busy.stderr.splitlines() == [
            f"twistd infsmtp: error: cannot listen on tcp:{port}:interface=127.0.0.1: Address already in use"
        ]
    finally:
        os.kill(pid, 15)

    def gone() -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False

    poll(gone, what="the daemon to exit")
    assert not pidfile.exists()

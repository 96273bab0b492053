"""
L{MaildirDelivery}: the Maildir rules, the reply only after the file is on
disk, 451 on a write failure, and no stall of other sessions while a disk
is slow.  A real L{Server} on loopback, smtplib in worker threads, and the
stdlib's C{mailbox.Maildir} as the independent reader.
"""

from __future__ import annotations

import io
import mailbox
import os
import smtplib
import stat
import tempfile
import threading

import pytest
import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer, reactor
from twisted.internet.threads import deferToThread
from twisted.logger import globalLogPublisher

from infsmtp import Server, Session, SMTPError
from infsmtp._maildir import MaildirDelivery, localLineEndings, prepareMaildir

WAIT = 20.0

MESSAGE = (
    b"From: Alice <alice@example.org>\r\n"
    b"To: Bob <bob@example.net>\r\n"
    b"Subject: to the Maildir\r\n"
    b"\r\n"
    b"Line one.\r\n"
    b".A line that starts with a dot.\r\n"
    b"Last line.\r\n"
)


def inThread(fn, *args, **kwargs) -> defer.Deferred:
    return deferToThread(fn, *args, **kwargs).addTimeout(WAIT, reactor)


def send(port: int, message: bytes = MESSAGE, recipients=("bob@example.net",)) -> dict:
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=10) as client:
        return client.sendmail("alice@example.org", list(recipients), message)


def sendExpectingError(port: int, message: bytes = MESSAGE) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=10) as client:
        try:
            client.sendmail("alice@example.org", ["bob@example.net"], message)
        except smtplib.SMTPDataError as e:
            return e.smtp_code, e.smtp_error
    raise AssertionError("the message was accepted")


@pytest.fixture
def logEvents():
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


@pytest_twisted.async_yield_fixture
async def serveMaildir(tmp_path):
    servers: list[Server] = []

    async def start(delivery: MaildirDelivery) -> Server:
        server = Server(port=0, interface="127.0.0.1", hostname="mx.maildir.test")
        server.onReceive = delivery
        await server.startListening().addTimeout(WAIT, reactor)
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.stopListening().addTimeout(WAIT, reactor)


def test_prepareCreatesPrivateMaildir(tmp_path):
    """
    A missing Maildir is created with tmp/, new/ and cur/, readable by the
    owner only.
    """
    path = prepareMaildir(str(tmp_path / "deep" / "Maildir"))
    for sub in ("tmp", "new", "cur"):
        folder = os.path.join(path, sub)
        assert os.path.isdir(folder)
        assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700


def test_pathThatIsAFile(tmp_path):
    """
    A file in the way is a clear error at construction, naming it.
    """
    (tmp_path / "Maildir").write_text("not a folder")
    with pytest.raises(SMTPError, match="is a file, not a folder"):
        MaildirDelivery(str(tmp_path / "Maildir"))
    (tmp_path / "M2").mkdir()
    (tmp_path / "M2" / "new").write_text("not a folder")
    with pytest.raises(SMTPError, match=r"M2/new is a file"):
        MaildirDelivery(str(tmp_path / "M2"))


def test_deliverFollowsMaildirRules(tmp_path):
    """
    deliver() leaves the message in new/ under its key, nothing in tmp/,
    and mailbox.Maildir reads it back byte for byte.
    """
    delivery = MaildirDelivery(str(tmp_path / "Maildir"))
    key = delivery.deliver(b"Subject: hi\n\nbody\n")
    assert os.listdir(tmp_path / "Maildir" / "new") == [key]
    assert os.listdir(tmp_path / "Maildir" / "tmp") == []
    box = mailbox.Maildir(str(tmp_path / "Maildir"), factory=None, create=False)
    assert box.get_bytes(key) == b"Subject: hi\n\nbody\n"
    assert ":" not in key and "/" not in key


def test_uniqueNamesAcrossThreads(tmp_path):
    """
    Deliveries from many threads at once never collide: every message is
    there, each under its own name.
    """
    delivery = MaildirDelivery(str(tmp_path / "Maildir"))
    keys: list[str] = []
    lock = threading.Lock()

    def work(n: int) -> None:
        for i in range(25):
            key = delivery.deliver(f"Subject: {n}-{i}\n\n".encode())
            with lock:
                keys.append(key)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert len(keys) == len(set(keys)) == 200
    assert sorted(os.listdir(tmp_path / "Maildir" / "new")) == sorted(keys)


@pytest_twisted.ensureDeferred
async def test_handlerStoresSessionMessage(tmp_path):
    """
    Called with a session, the handler stores the message with a
    Return-Path and LF line endings, and fires True (250).
    """
    delivery = MaildirDelivery(str(tmp_path / "Maildir"))
    session = Session(7, "192.0.2.1", 4000, lambda: None)
    session.mailFrom = ""
    session.rcptTo = ["bob@example.net"]
    session._setMessage(b"Subject: bounce\r\n\r\nbody\r\n")
    result = await delivery(session).addTimeout(WAIT, reactor)
    assert result is True
    [key] = os.listdir(tmp_path / "Maildir" / "new")
    stored = (tmp_path / "Maildir" / "new" / key).read_bytes()
    assert stored == b"Return-Path: <>\nSubject: bounce\n\nbody\n"


@pytest_twisted.ensureDeferred
async def test_smtpDeliveryAndLogLine(tmp_path, serveMaildir, logEvents):
    """
    A message sent with smtplib is in the Maildir when the 250 arrives,
    dot-unstuffed, with our Received header, and one log line names the
    session, client, sender, recipients, size, TLS and key.
    """
    server = await serveMaildir(MaildirDelivery(str(tmp_path / "Maildir")))
    refused = await inThread(send, server.port, recipients=("bob@example.net", "carol@example.net"))
    assert refused == {}
    # The 250 came after the write: the file is there now, no waiting.
    box = mailbox.Maildir(str(tmp_path / "Maildir"), factory=None, create=False)
    [key] = box.keys()
    stored = box.get_bytes(key)
    assert stored.startswith(b"Return-Path: <alice@example.org>\nReceived: from client.test ([127.0.0.1])\n")
    assert stored.endswith(MESSAGE.replace(b"\r\n", b"\n"))
    assert b"\r" not in stored
    assert os.listdir(tmp_path / "Maildir" / "tmp") == []

    lines = [e for e in logEvents if e.get("log_namespace") == "infsmtp.maildir"]
    assert len(lines) == 1
    event = lines[0]
    assert event["key"] == key
    assert event["sender"] == "alice@example.org"
    assert event["recipients"] == "<bob@example.net>,<carol@example.net>"
    assert event["tls"] == "no"
    assert event["client"].startswith("127.0.0.1:")
    asReceived = stored[len(b"Return-Path: <alice@example.org>\n") :].replace(b"\n", b"\r\n")
    assert event["size"] == len(asReceived)
    from twisted.logger import formatEvent

    text = formatEvent(event)
    assert "\n" not in text
    for part in (f"session {event['sessionId']}", "127.0.0.1:", "<alice@example.org>", "TLS no", key):
        assert part in text


def obstruct(folder) -> None:
    """
    Put a file where a Maildir folder should be, so nothing can be written
    into it.
    """
    os.rmdir(folder)
    folder.write_text("in the way")


@pytest_twisted.ensureDeferred
async def test_writeFailureAnswers451(tmp_path, serveMaildir):
    """
    When tmp/ cannot be written the client gets 451 (so it keeps the
    message); once the Maildir is repaired the retry is stored.
    """
    maildir = tmp_path / "Maildir"
    server = await serveMaildir(MaildirDelivery(str(maildir)))
    obstruct(maildir / "tmp")
    code, _ = await inThread(sendExpectingError, server.port)
    assert code == 451
    assert os.listdir(maildir / "new") == []

    os.unlink(maildir / "tmp")
    os.mkdir(maildir / "tmp")
    assert await inThread(send, server.port) == {}
    assert len(os.listdir(maildir / "new")) == 1


@pytest_twisted.ensureDeferred
async def test_failedLinkLeavesNothingBehind(tmp_path, serveMaildir):
    """
    When the message cannot get into new/, the client gets 451 and the
    half-delivered file in tmp/ is removed.
    """
    maildir = tmp_path / "Maildir"
    server = await serveMaildir(MaildirDelivery(str(maildir)))
    obstruct(maildir / "new")
    code, _ = await inThread(sendExpectingError, server.port)
    assert code == 451
    assert os.listdir(maildir / "tmp") == []


class SlowDisk(MaildirDelivery):
    """
    A Maildir on a disk that stalls until told to go on.
    """

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.entered = threading.Event()
        self.proceed = threading.Event()

    def deliver(self, content: bytes) -> str:
        self.entered.set()
        assert self.proceed.wait(WAIT), "the test never released the disk"
        return super().deliver(content)


@pytest_twisted.ensureDeferred
async def test_slowDiskDoesNotStallOtherSessions(tmp_path, serveMaildir):
    """
    While one message waits for the disk, another session is served, and
    the first client gets its 250 only once the write is done.
    """
    delivery = SlowDisk(str(tmp_path / "Maildir"))
    server = await serveMaildir(delivery)
    first = inThread(send, server.port)
    await inThread(delivery.entered.wait, WAIT)

    def otherSession() -> tuple[int, bytes]:
        with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
            client.ehlo("other.test")
            return client.noop()

    code, _ = await inThread(otherSession)
    assert code == 250
    assert not first.called
    assert os.listdir(tmp_path / "Maildir" / "new") == []
    delivery.proceed.set()
    assert await first == {}
    assert len(os.listdir(tmp_path / "Maildir" / "new")) == 1


# Large messages stream from the spool file ---------------------------------

@settings(max_examples=200)
@given(st.lists(st.binary(max_size=30).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")), max_size=20), st.integers(1, 17))
def test_line_endings_converted_whatever_the_piece_size(lines, size):
    content = b"".join(line + b"\r\n" for line in lines)
    out = b"".join(localLineEndings(b"H\n", io.BytesIO(content), size))
    assert out == b"H\n" + content.replace(b"\r\n", b"\n")


def test_spooled_message_delivered_without_loading(tmp_path):
    body = b"".join(b"line %06d\r\n" % i for i in range(50_000))
    spool = tempfile_with(body)
    session = Session(7, "127.0.0.1", 1234, lambda: None)
    session.mailFrom, session.rcptTo = "a@b.test", ["c@d.test"]
    session._setMessage(None, spool)
    delivery = MaildirDelivery(str(tmp_path / "Maildir"))
    key = delivery.deliver(localLineEndings(b"Return-Path: <a@b.test>\n", session.msgFile))
    assert session._msg is None  # never loaded whole
    assert session.msgSize == len(body)
    with open(tmp_path / "Maildir" / "new" / key, "rb") as f:
        assert f.read() == b"Return-Path: <a@b.test>\n" + body.replace(b"\r\n", b"\n")


def tempfile_with(data: bytes):
    f = tempfile.TemporaryFile()
    f.write(data)
    f.seek(0)
    return f

"""
L{MaildirDelivery}: the Maildir rules, the reply only after the file is on
disk, 451 and one log line on a write failure (a full disk, made to fail
for real by L{FullDisk}) with nothing left behind, stale C{tmp/} files
removed at startup (on a L{Clock}), and no stall of other sessions while
a disk is slow.  A real L{Server} on loopback, smtplib in worker threads, and the
stdlib's C{mailbox.Maildir} as the independent reader.
"""

from __future__ import annotations

import errno
import io
import mailbox
import os
import signal
import smtplib
import stat
import subprocess
import sys
import tempfile
import threading

import pytest
import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.logger import LogLevel, formatEvent

from infsmtp import Server, Session, SMTPError
from infsmtp._daemon import maildir as _maildir
from infsmtp._daemon.maildir import MaildirDelivery, localLineEndings, prepareMaildir

_O_TMPFILE = getattr(os, "O_TMPFILE", -1)

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


@pytest.fixture(scope="session")
def unnamedFiles(tmp_path_factory) -> bool:
    """
    Whether files with no name (O_TMPFILE) work where the tests write,
    found out here, not by the code under test.
    """
    folder = tmp_path_factory.mktemp("probe")
    try:
        fd = os.open(folder, os.O_WRONLY | os.O_TMPFILE)
    except (AttributeError, OSError):
        return False
    directory = os.open(folder, os.O_RDONLY)
    try:
        os.link(f"/proc/self/fd/{fd}", "named", dst_dir_fd=directory)
    except OSError:
        return False
    finally:
        os.close(fd)
        os.close(directory)
    return os.path.isfile(folder / "named")


@pytest.fixture(params=["unnamed", "tmp"])
def naming(request, monkeypatch, unnamedFiles) -> str:
    """
    Each of the two ways a message gets its name in new/: written as a file
    with no name and named there (O_TMPFILE), or written in tmp/ and linked.
    """
    if request.param == "unnamed" and not unnamedFiles:
        pytest.skip("no O_TMPFILE here")
    monkeypatch.setattr(MaildirDelivery, "_tryUnnamed", lambda self: request.param == "unnamed")
    return request.param


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


def test_deliverFollowsMaildirRules(tmp_path, naming):
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
async def test_writeFailureAnswers451(tmp_path, serveMaildir, naming):
    """
    When the folder the message is written in (tmp/, or new/ for a file
    with no name) cannot be written the client gets 451 (so it keeps the
    message); once the Maildir is repaired the retry is stored.
    """
    maildir = tmp_path / "Maildir"
    server = await serveMaildir(MaildirDelivery(str(maildir)))
    folder = maildir / ("tmp" if naming == "tmp" else "new")
    obstruct(folder)
    code, _ = await inThread(sendExpectingError, server.port)
    assert code == 451
    assert os.path.isfile(folder) and os.listdir(maildir / ("new" if naming == "tmp" else "tmp")) == []

    os.unlink(folder)
    os.mkdir(folder)
    assert await inThread(send, server.port) == {}
    assert len(os.listdir(maildir / "new")) == 1


@pytest_twisted.ensureDeferred
async def test_failedLinkLeavesNothingBehind(tmp_path, serveMaildir, naming):
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


class DiskJournal:
    """
    A recorded fake of the file-system calls that make a delivery durable:
    C{os.open}, C{os.fsync}, C{os.link} and C{os.rename} still do their
    work, and each one on a path in the Maildir is written down in order,
    as C{(call, path relative to the Maildir)}; the files with no name
    opened in C{new/} are C{new/#1}, C{new/#2}... C{os.link} can be made to fail
    as on a file system without hard links.
    """

    def __init__(self, monkeypatch, maildir, noHardLinks: bool = False) -> None:
        self.root = str(maildir) + os.sep
        self.calls: list[tuple[str, ...]] = []
        self._paths: dict[int, str] = {}
        #: Files with no name opened so far, per folder.
        self.unnamed: dict[str, int] = {}
        realOpen, realFsync, realLink, realRename = os.open, os.fsync, os.link, os.rename

        def open_(path, flags, *args, **kwargs):
            fd = realOpen(path, flags, *args, **kwargs)
            folder = kwargs.get("dir_fd")
            if folder in self._paths and flags & _O_TMPFILE == _O_TMPFILE:
                where = self._paths[folder]
                self.unnamed[where] = self.unnamed.get(where, 0) + 1
                self._paths[fd] = f"{where}/#{self.unnamed[where]}"
            elif str(path).startswith(self.root):
                self._paths[fd] = self.relative(path)
            return fd

        def fsync(fd):
            realFsync(fd)
            if fd in self._paths:
                self.calls.append(("fsync", self._paths[fd]))

        def link(source, target, *args, **kwargs):
            if noHardLinks:
                raise OSError(errno.EPERM, os.strerror(errno.EPERM))
            realLink(source, target, *args, **kwargs)
            folder = kwargs.get("dst_dir_fd")
            if folder is not None:
                # A file with no name, named through /proc/self/fd/N.
                source = self._paths[int(str(source).rsplit("/", 1)[1])]
                target = f"{self._paths[folder]}/{target}"
            self.calls.append(("link", self.relative(source), self.relative(target)))

        def rename(source, target, *args, **kwargs):
            realRename(source, target, *args, **kwargs)
            self.calls.append(("rename", self.relative(source), self.relative(target)))

        monkeypatch.setattr(os, "open", open_)
        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "link", link)
        monkeypatch.setattr(os, "rename", rename)

    def relative(self, path) -> str:
        path = str(path)
        return path[len(self.root) :] if path.startswith(self.root) else path

    def written(self, key: str) -> str:
        """
        What became C{new/key}: C{tmp/key}, or C{new/#n}, the n-th file
        with no name.
        """
        [source] = [call[1] for call in self.calls if call[0] in ("link", "rename") and call[2] == f"new/{key}"]
        return source


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("how", ["unnamed", "link", "rename"])
async def test_durableBeforeTheAnswer(tmp_path, monkeypatch, how, unnamedFiles):
    """
    The 250 means the message is on disk: the handler answers only after
    the message file is flushed, then named in new/ (a file with no name
    given its name; or linked, or renamed, from tmp/), then new/ itself
    flushed, in that order.
    """
    maildir = tmp_path / "Maildir"
    delivery = MaildirDelivery(str(maildir))
    delivery._unnamed = how == "unnamed"
    if how == "unnamed" and not unnamedFiles:
        pytest.skip("no O_TMPFILE here")
    journal = DiskJournal(monkeypatch, maildir, noHardLinks=how == "rename")
    answer = delivery(storingSession())
    answer.addCallback(lambda result: journal.calls.append(("answered", result)))
    await answer.addTimeout(WAIT, reactor)
    [key] = os.listdir(maildir / "new")
    written = "new/#1" if how == "unnamed" else f"tmp/{key}"
    assert journal.calls == [
        ("fsync", written),
        ("rename" if how == "rename" else "link", written, f"new/{key}"),
        ("fsync", "new"),
        ("answered", True),
    ]
    assert os.listdir(maildir / "tmp") == []


class HeldFirstFlush:
    """
    Concurrent deliveries, made to overlap for certain: the first flush of
    C{new/} is held (inside C{fsync}) until every delivery has linked its
    file, so that the others gather while it runs.  Each flush's start
    and end, each link and each delivery's return are written down in
    order in C{journal.calls}.  With C{failSecond}, the second flush of
    C{new/} fails with EIO.
    """

    def __init__(self, monkeypatch, maildir, count: int, failSecond: bool = False) -> None:
        self.journal = DiskJournal(monkeypatch, maildir)
        self.count = count
        self.linked = threading.Condition()
        self.flushesOfNew = 0
        journalFsync, journalLink = os.fsync, os.link

        def link(source, target, *args, **kwargs):
            journalLink(source, target, *args, **kwargs)
            with self.linked:
                self.linked.notify_all()

        def fsync(fd):
            if self.journal._paths.get(fd) != "new":
                return journalFsync(fd)
            self.flushesOfNew += 1
            self.journal.calls.append(("flush new begins",))
            if self.flushesOfNew == 1:
                with self.linked:
                    assert self.linked.wait_for(self.allLinked, WAIT), "the deliveries never all linked"
            elif failSecond and self.flushesOfNew == 2:
                self.journal.calls.append(("flush new fails",))
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            return journalFsync(fd)

        monkeypatch.setattr(os, "link", link)
        monkeypatch.setattr(os, "fsync", fsync)

    def allLinked(self) -> bool:
        return sum(1 for call in self.journal.calls if call[0] == "link") == self.count

    def run(self, delivery: MaildirDelivery) -> list[str | OSError]:
        results: list[str | OSError] = [None] * self.count  # type: ignore[list-item]

        def one(n: int) -> None:
            try:
                key = delivery.deliver(f"Subject: {n}\n\n".encode())
            except OSError as e:
                results[n] = e
                self.journal.calls.append(("failed", n))
            else:
                results[n] = key
                self.journal.calls.append(("answered", key))

        threads = [threading.Thread(target=one, args=(n,)) for n in range(self.count)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT)
        assert not any(t.is_alive() for t in threads)
        return results


def test_concurrentDeliveriesShareTheFlushOfNew(tmp_path, monkeypatch, naming):
    """
    Deliveries that link while a flush of new/ runs share the next one
    (group commit: 6 messages, 2 flushes of new/), and each still returns
    only after its own file was flushed, then linked, and then a flush of
    new/ that began after its link had ended.
    """
    maildir = tmp_path / "Maildir"
    delivery = MaildirDelivery(str(maildir))
    held = HeldFirstFlush(monkeypatch, maildir, count=6)
    keys = held.run(delivery)
    calls = held.journal.calls
    assert sorted(os.listdir(maildir / "new")) == sorted(keys)
    assert held.flushesOfNew == 2 and delivery._flushNew.flushes == 2
    begins = [i for i, call in enumerate(calls) if call == ("flush new begins",)]
    ends = [i for i, call in enumerate(calls) if call == ("fsync", "new")]
    for key in keys:
        written = held.journal.written(key)
        fileFlushed = calls.index(("fsync", written))
        linked = calls.index(("link", written, f"new/{key}"))
        answered = calls.index(("answered", key))
        assert fileFlushed < linked < answered
        assert any(linked < begin and end < answered for begin, end in zip(begins, ends, strict=True)), (key, calls)


def test_failedSharedFlushFailsItsWholeRound(tmp_path, monkeypatch, naming):
    """
    When a shared flush of new/ fails, every delivery of that round gets
    the OSError (its client a 451) and its file is taken out of new/ again;
    the delivery of the round before, whose flush worked, stays stored.
    """
    maildir = tmp_path / "Maildir"
    delivery = MaildirDelivery(str(maildir))
    held = HeldFirstFlush(monkeypatch, maildir, count=4, failSecond=True)
    results = held.run(delivery)
    stored = [r for r in results if isinstance(r, str)]
    failed = [r for r in results if isinstance(r, OSError)]
    assert len(stored) == 1 and len(failed) == 3
    assert all(e.errno == errno.EIO for e in failed)
    assert len({id(e) for e in failed}) == 3  # one exception per thread
    assert os.listdir(maildir / "new") == stored
    assert os.listdir(maildir / "tmp") == []


class SlowDisk(MaildirDelivery):
    """
    A Maildir on a disk that stalls until told to go on.
    """

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.entered = threading.Event()
        self.proceed = threading.Event()

    def _store(self, content):
        self.entered.set()
        assert self.proceed.wait(WAIT), "the test never released the disk"
        return super()._store(content)


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


# Writers: a few threads, each storing what waited for it -------------------


class HeldStores(MaildirDelivery):
    """
    A Maildir whose writers stop before each message until the test lets
    them go on; it counts the writers storing at once, and a message whose
    body is C{fail} meets a full disk.
    """

    def __init__(self, path: str, writers: int) -> None:
        super().__init__(path, writers=writers)
        self.gate = threading.Semaphore(0)
        self.lock = threading.Lock()
        self.busy = self.mostBusy = 0
        self.entered = threading.Condition()
        self.stores = 0

    def _store(self, content):
        content = b"".join(content)
        with self.lock:
            self.busy += 1
            self.mostBusy = max(self.mostBusy, self.busy)
        with self.entered:
            self.stores += 1
            self.entered.notify_all()
        try:
            assert self.gate.acquire(timeout=WAIT), "the test never let the writers go on"
            if content.endswith(b"fail\n"):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return super()._store(content)
        finally:
            with self.lock:
                self.busy -= 1

    def waitStores(self, count: int) -> None:
        with self.entered:
            assert self.entered.wait_for(lambda: self.stores >= count, WAIT), f"fewer than {count} stores began"


def sessionWith(body: bytes) -> Session:
    session = storingSession()
    session._setMessage(b"Subject: hi\r\n\r\n" + body + b"\r\n")
    return session


@pytest_twisted.ensureDeferred
async def test_messagesWaitingForAWriterAreStoredTogether(tmp_path):
    """
    Messages that arrive while the one writer stores a message wait, then
    are stored by it in one go: one flush of new/ for them all, and each
    answered with its own key.
    """
    delivery = HeldStores(str(tmp_path / "Maildir"), writers=1)
    first = delivery(sessionWith(b"0"))
    await inThread(delivery.waitStores, 1)
    rest = [delivery(sessionWith(str(n).encode())) for n in range(1, 5)]
    for _ in range(5):
        delivery.gate.release()
    results = await defer.gatherResults([first, *rest]).addTimeout(WAIT, reactor)
    assert results == [True] * 5
    assert delivery.mostBusy == 1
    assert delivery._flushNew.flushes == 2
    box = mailbox.Maildir(str(tmp_path / "Maildir"), factory=None, create=False)
    assert sorted(box.get_bytes(key).rsplit(b"\n", 2)[-2] for key in box.keys()) == [b"0", b"1", b"2", b"3", b"4"]


@pytest_twisted.ensureDeferred
async def test_atMostWritersThreadsWrite(tmp_path):
    """
    A message that arrives while C{writers} threads are busy storing does
    not start another: it waits for the first of them to be free.
    """
    delivery = HeldStores(str(tmp_path / "Maildir"), writers=2)
    started = []
    write = delivery._write
    delivery._write = lambda: (started.append(1), write())[1]
    answers = [delivery(sessionWith(b"0"))]
    await inThread(delivery.waitStores, 1)
    answers.append(delivery(sessionWith(b"1")))
    await inThread(delivery.waitStores, 2)
    answers.append(delivery(sessionWith(b"2")))
    for _ in range(3):
        delivery.gate.release()
    assert await defer.gatherResults(answers).addTimeout(WAIT, reactor) == [True] * 3
    assert (len(started), delivery.mostBusy) == (2, 2)
    assert len(os.listdir(tmp_path / "Maildir" / "new")) == 3


@pytest_twisted.ensureDeferred
async def test_oneFailedMessageOfABatchFailsAlone(tmp_path):
    """
    A message the disk refuses in the middle of a writer's batch is
    answered 451; the messages before and after it are stored.
    """
    delivery = HeldStores(str(tmp_path / "Maildir"), writers=1)
    first = delivery(sessionWith(b"0"))
    await inThread(delivery.waitStores, 1)
    rest = [delivery(sessionWith(body)) for body in (b"1", b"fail", b"3")]
    for _ in range(4):
        delivery.gate.release()
    outcomes = await defer.DeferredList([first, *rest], consumeErrors=True).addTimeout(WAIT, reactor)
    assert [ok for ok, _ in outcomes] == [True, True, False, True]
    assert outcomes[2][1].value.code == 451
    assert len(os.listdir(tmp_path / "Maildir" / "new")) == 3


@pytest_twisted.ensureDeferred
async def test_failedFlushFailsTheWholeBatch(tmp_path, monkeypatch):
    """
    When the flush of new/ shared by a writer's batch fails, every message
    of the batch is answered 451 and taken out of new/ again; the message
    stored before, whose flush worked, stays.
    """
    delivery = HeldStores(str(tmp_path / "Maildir"), writers=1)
    flushes = []

    def flush(path):
        flushes.append(path)
        if len(flushes) == 2:
            raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(_maildir, "_fsyncDirectory", flush)
    first = delivery(sessionWith(b"0"))
    await inThread(delivery.waitStores, 1)
    rest = [delivery(sessionWith(str(n).encode())) for n in range(1, 4)]
    for _ in range(4):
        delivery.gate.release()
    outcomes = await defer.DeferredList([first, *rest], consumeErrors=True).addTimeout(WAIT, reactor)
    assert [ok for ok, _ in outcomes] == [True, False, False, False]
    assert all(result.value.code == 451 for _, result in outcomes[1:])
    assert len(os.listdir(tmp_path / "Maildir" / "new")) == 1


@pytest_twisted.ensureDeferred
async def test_aWriterOutlivesABugOfOurs(tmp_path, monkeypatch):
    """
    Should storing raise something unforeseen, the batch gets that
    failure (the server answers 4xx and logs it) and the writer goes on:
    the next message is stored.
    """
    delivery = MaildirDelivery(str(tmp_path / "Maildir"), writers=1)
    storeAll = delivery._storeAll

    def bugOnce(contents):
        monkeypatch.setattr(delivery, "_storeAll", storeAll)
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(delivery, "_storeAll", bugOnce)
    with pytest.raises(ZeroDivisionError):
        await delivery(storingSession()).addTimeout(WAIT, reactor)
    assert await delivery(storingSession()).addTimeout(WAIT, reactor) is True
    assert len(os.listdir(tmp_path / "Maildir" / "new")) == 1


@pytest.mark.parametrize("writers", [0, -1, 1.5, True, "2"])
def test_writersMustBeAPositiveWholeNumber(tmp_path, writers):
    with pytest.raises(ValueError, match="writers must be a whole number of threads, at least 1"):
        MaildirDelivery(str(tmp_path / "Maildir"), writers=writers)


# Large messages stream from the spool file ---------------------------------

@settings(max_examples=200)
@given(
    st.lists(st.binary(max_size=30).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")), max_size=20),
    st.integers(1, 17),
    st.booleans(),
    st.booleans(),
)
def test_line_endings_converted_whatever_the_piece_size(lines, size, crlfOnly, spooled):
    content = b"".join(line + b"\r\n" for line in lines)
    source = tempfile_with(content) if spooled else io.BytesIO(content)
    out = b"".join(localLineEndings(b"H\n", source, size, crlfOnly=crlfOnly))
    assert out == b"H\n" + content.replace(b"\r\n", b"\n")


@settings(max_examples=100)
@given(st.binary(max_size=60), st.integers(1, 17))
def test_bare_cr_kept_unless_vouched_for(content, size):
    """
    Without crlfOnly the conversion is exact for any bytes: only CRLF
    becomes LF, a bare CR stays, whatever the piece size.
    """
    out = b"".join(localLineEndings(b"", io.BytesIO(content), size))
    assert out == content.replace(b"\r\n", b"\n")


@pytest_twisted.ensureDeferred
async def test_handler_set_message_stored_exactly(tmp_path):
    """
    A message a handler put in session.msg may hold a bare CR (the
    server's framer refuses them, a handler does not): it is stored as
    it is, only its CRLFs turned into LF.  The server's own message
    takes the fast path, which deletes every CR.
    """
    delivery = MaildirDelivery(str(tmp_path / "Maildir"))
    session = storingSession()
    assert session._crlfOnly
    session.msg = b"Subject: rewritten\r\n\r\nold\rnew\r\n"
    assert await delivery(session).addTimeout(WAIT, reactor) is True
    [key] = os.listdir(tmp_path / "Maildir" / "new")
    stored = (tmp_path / "Maildir" / "new" / key).read_bytes()
    assert stored == b"Return-Path: <a@b.test>\nSubject: rewritten\n\nold\rnew\n"
    session._setMessage(b"Subject: framed\r\n\r\nbody\r\n")
    assert session._crlfOnly


def test_short_writes_resumed(tmp_path, monkeypatch, naming):
    """
    A kernel that takes a few bytes per writev (a signal, a pipe, a
    nearly full disk) still gets every byte, in order.
    """
    delivery = MaildirDelivery(str(tmp_path / "Maildir"))
    realWritev = os.writev
    calls = []

    def stingy(fd, buffers):
        calls.append(len(buffers))
        return realWritev(fd, [bytes(b"".join(buffers))[:3]])

    monkeypatch.setattr(os, "writev", stingy)
    pieces = [b"Return-Path: <>\n", b"", b"Subject: pieces\n\n", b"x" * 10]
    key = delivery.deliver(iter(pieces))
    assert (tmp_path / "Maildir" / "new" / key).read_bytes() == b"".join(pieces)
    assert calls[0] == 3  # gathered: one writev for every piece at first


@pytest_twisted.ensureDeferred
async def test_spooled_message_delivered_without_loading(tmp_path):
    """
    The real handler, given a message spooled to a file (as the server
    does over spoolThreshold), copies it from session.msgFile in pieces:
    session.msg is never materialised, and the stored copy is exact.
    """
    body = b"".join(b"line %06d\r\n" % i for i in range(50_000))
    spool = tempfile_with(body)
    session = Session(7, "127.0.0.1", 1234, lambda: None)
    session.mailFrom, session.rcptTo = "a@b.test", ["c@d.test"]
    session._setMessage(None, spool)
    delivery = MaildirDelivery(str(tmp_path / "Maildir"))
    assert await delivery(session).addTimeout(WAIT, reactor) is True
    assert session._msg is None  # never loaded whole
    assert session.msgSize == len(body)
    [key] = os.listdir(tmp_path / "Maildir" / "new")
    with open(tmp_path / "Maildir" / "new" / key, "rb") as f:
        assert f.read() == b"Return-Path: <a@b.test>\n" + body.replace(b"\r\n", b"\n")


@pytest_twisted.ensureDeferred
async def test_server_spools_and_the_handler_streams(tmp_path, monkeypatch):
    """
    End to end: a message over the server's spoolThreshold reaches the
    real Maildir handler as a file, and the handler never reads it whole.
    """
    seen = []
    delivery = MaildirDelivery(str(tmp_path / "Maildir"))

    def onReceive(session):
        d = delivery(session)
        d.addCallback(lambda result: seen.append((session._msg, result)) or result)
        return d

    server = Server(port=0, interface="127.0.0.1", hostname="mx.maildir.test", spoolThreshold=64 * 1024)
    server.onReceive = onReceive
    await server.startListening().addTimeout(WAIT, reactor)
    try:
        body = b"Subject: big\r\n\r\n" + b"".join(b"line %06d\r\n" % i for i in range(20_000))
        assert await inThread(send, server.port, body) == {}
    finally:
        await server.stopListening().addTimeout(WAIT, reactor)
    assert seen == [(None, True)]
    [key] = os.listdir(tmp_path / "Maildir" / "new")
    assert (tmp_path / "Maildir" / "new" / key).read_bytes().endswith(body.replace(b"\r\n", b"\n"))


def tempfile_with(data: bytes):
    f = tempfile.TemporaryFile()
    f.write(data)
    f.seek(0)
    return f


# A full disk: one line per message, 451, nothing left behind ----------------


class FullDisk:
    """
    Make the writes into a Maildir's tmp/ fail with ENOSPC once C{allow}
    bytes went in, the way a disk that fills up mid-message does: the
    write that crosses the limit is short, the next one fails.  Both
    C{os.write} and C{os.writev} are covered.  Only descriptors opened
    under C{tmp/} fail: the reactor's own writes (its waker pipe) go on.
    """

    def __init__(self, monkeypatch, maildir, allow: int = 1) -> None:
        self.tmp = os.path.join(str(maildir), "tmp") + os.sep
        self.allow = allow
        self.fds: set[int] = set()
        self.partial: list[str] = []
        realOpen, realWrite = os.open, os.write

        def open_(path, flags, *args, **kwargs):
            fd = realOpen(path, flags, *args, **kwargs)
            if str(path).startswith(self.tmp) or flags & _O_TMPFILE == _O_TMPFILE:
                self.fds.add(fd)
                self.partial.append(str(path))
            return fd

        def write(fd, data):
            if fd in self.fds:
                if self.allow <= 0:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                data = bytes(data)[: self.allow]
                self.allow -= len(data)
            return realWrite(fd, data)

        def writev(fd, buffers):
            return write(fd, b"".join(buffers)) if fd in self.fds else realWritev(fd, buffers)

        realWritev = os.writev
        monkeypatch.setattr(os, "open", open_)
        monkeypatch.setattr(os, "write", write)
        monkeypatch.setattr(os, "writev", writev)


def problems(events: list[dict]) -> list[dict]:
    """
    The events worth an operator's attention: warnings and worse, and
    anything with a traceback.
    """
    return [e for e in events if e.get("log_failure") is not None or e.get("log_level", LogLevel.info) >= LogLevel.warn]


@pytest_twisted.ensureDeferred
async def test_fullDiskOneLinePerMessage(tmp_path, serveMaildir, logEvents, monkeypatch, naming):
    """
    A disk that fills up mid-message: each failed message is answered 451
    4.3.0 and logged once, in one line naming the session, the queue id and
    the error (no traceback); its partial file is gone from tmp/ and
    nothing reached new/.  Once there is room again the retry is stored.
    """
    maildir = tmp_path / "Maildir"
    delivery = MaildirDelivery(str(maildir))
    queueIds: list[str] = []

    def recordingDelivery(session):
        queueIds.append(session.queueId)
        return delivery(session)

    server = await serveMaildir(recordingDelivery)
    disk = FullDisk(monkeypatch, maildir, allow=20)  # part of the Return-Path goes in, no more
    del logEvents[:]
    for _ in range(3):
        code, text = await inThread(sendExpectingError, server.port)
        assert (code, text[:5]) == (451, b"4.3.0")
    assert len(disk.partial) == 3  # a file was started each time...
    assert os.listdir(maildir / "tmp") == [] and os.listdir(maildir / "new") == []  # ...and removed

    # The session log's reject line for each 451 (tests/test_observe.py)
    # carries the same queue id; the Maildir's own line says why.
    rejects = [e for e in problems(logEvents) if e["log_namespace"] == "infsmtp.session"]
    assert [(e["event"], e["code"], e["queue"], e["handler"]) for e in rejects] == [
        ("reject", 451, queueId, "onReceive") for queueId in queueIds
    ]
    lines = [e for e in problems(logEvents) if e["log_namespace"] != "infsmtp.session"]
    assert len(lines) == 3, [formatEvent(e) for e in lines]
    for event, queueId in zip(lines, queueIds, strict=True):
        assert event["log_namespace"] == "infsmtp.maildir"
        text = formatEvent(event)
        assert "\n" not in text
        assert queueId and f"message {queueId} " in text
        assert f"session {event['sessionId']} from 127.0.0.1:" in text
        assert "No space left on device" in text and "<alice@example.org> -> <bob@example.net>" in text

    disk.allow = 10**9
    assert await inThread(send, server.port) == {}
    assert len(os.listdir(maildir / "new")) == 1


@pytest.mark.parametrize("where", ["fsync", "link"])
def test_diskFailureLeavesNothingBehind(tmp_path, monkeypatch, where, naming):
    """
    Wherever the disk fails (the file's fsync, the link into new/) the
    OSError comes out of deliver() and neither tmp/ nor new/ keeps a copy.
    """
    delivery = MaildirDelivery(str(tmp_path / "Maildir"))

    def refuse(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, where, refuse)
    with pytest.raises(OSError, match="No space left"):
        delivery.deliver(b"Subject: hi\n\nbody\n")
    assert os.listdir(tmp_path / "Maildir" / "tmp") == []
    assert os.listdir(tmp_path / "Maildir" / "new") == []


def test_nameCollisionKeepsTheOtherMessage(tmp_path, monkeypatch, naming):
    """
    Should a name already be in new/, the link fails and the message there
    stays as it was: only our own tmp/ file is removed.
    """
    delivery = MaildirDelivery(str(tmp_path / "Maildir"))
    (tmp_path / "Maildir" / "new" / "taken").write_bytes(b"Subject: first\n")
    monkeypatch.setattr(delivery, "uniqueName", lambda: "taken")
    with pytest.raises(FileExistsError):
        delivery.deliver(b"Subject: second\n")
    assert (tmp_path / "Maildir" / "new" / "taken").read_bytes() == b"Subject: first\n"
    assert os.listdir(tmp_path / "Maildir" / "tmp") == []


def test_unsyncedNewEntryRemoved(tmp_path, monkeypatch, naming):
    """
    When the new/ directory cannot be flushed, the client will be told to
    retry, so the message is taken out of new/ again: no duplicate.
    """
    delivery = MaildirDelivery(str(tmp_path / "Maildir"))

    def refuse(path):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(_maildir, "_fsyncDirectory", refuse)
    with pytest.raises(OSError, match="Input/output error"):
        delivery.deliver(b"Subject: hi\n\nbody\n")
    assert os.listdir(tmp_path / "Maildir" / "tmp") == []
    assert os.listdir(tmp_path / "Maildir" / "new") == []


# Files with no name (O_TMPFILE) -------------------------------------------


def test_unnamedFileWhereTheSystemHasThem(tmp_path, monkeypatch, unnamedFiles):
    """
    Where O_TMPFILE works (as on the disk the tests write to) the message
    is written as a file with no name in new/, given its name there once
    flushed, and tmp/ is never used: trying it out left nothing there.
    """
    if not unnamedFiles:
        pytest.skip("no O_TMPFILE here")
    maildir = tmp_path / "Maildir"
    delivery = MaildirDelivery(str(maildir))
    journal = DiskJournal(monkeypatch, maildir)
    keys = [delivery.deliver(b"Subject: hi\n\nbody\n") for _ in range(2)]
    assert [journal.written(key) for key in keys] == ["new/#1", "new/#2"]
    assert [call for call in journal.calls if call[0] != "link" and "tmp" in "".join(call)] == []
    assert os.listdir(maildir / "tmp") == []
    assert sorted(os.listdir(maildir / "new")) == sorted(keys)


def refusingUnnamed(monkeypatch, code: int) -> list[int]:
    """
    Make opening a file with no name fail with C{code}; the list counts
    the attempts.
    """
    attempts: list[int] = []
    realOpen = os.open

    def open_(path, flags, *args, **kwargs):
        if flags & _O_TMPFILE == _O_TMPFILE:
            attempts.append(flags)
            raise OSError(code, os.strerror(code))
        return realOpen(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_)
    return attempts


def test_tmpNamesWhereTheSystemHasNoUnnamedFiles(tmp_path, monkeypatch):
    """
    Where files with no name are refused (a file system without them, an
    older kernel) the message goes through tmp/ as the Maildir rules
    have it, and the first delivery alone finds that out.
    """
    maildir = tmp_path / "Maildir"
    delivery = MaildirDelivery(str(maildir))
    attempts = refusingUnnamed(monkeypatch, errno.EOPNOTSUPP)
    journal = DiskJournal(monkeypatch, maildir)
    keys = [delivery.deliver(b"Subject: hi\n\nbody\n") for _ in range(3)]
    assert [journal.written(key) for key in keys] == [f"tmp/{key}" for key in keys]
    assert len(attempts) <= 1
    assert os.listdir(maildir / "tmp") == []
    assert sorted(os.listdir(maildir / "new")) == sorted(keys)


def test_diskRefusingTheTrialFailsThatDelivery(tmp_path, monkeypatch, unnamedFiles):
    """
    A full disk while finding out whether files with no name work is the
    delivery's failure (451, the client retries), not a verdict on the
    file system: the next delivery asks again.
    """
    if not unnamedFiles:
        pytest.skip("no O_TMPFILE here")
    maildir = tmp_path / "Maildir"
    delivery = MaildirDelivery(str(maildir))
    with monkeypatch.context() as patch:
        refusingUnnamed(patch, errno.ENOSPC)
        with pytest.raises(OSError, match="No space left"):
            delivery.deliver(b"Subject: hi\n\nbody\n")
    assert os.listdir(maildir / "tmp") == [] and os.listdir(maildir / "new") == []
    journal = DiskJournal(monkeypatch, maildir)
    key = delivery.deliver(b"Subject: hi\n\nbody\n")
    assert journal.written(key) == "new/#1"


_CRASH = """
import os, signal, sys
sys.path[:0] = [sys.argv[3]]
from infsmtp._daemon.maildir import MaildirDelivery
delivery = MaildirDelivery(sys.argv[1])
delivery._unnamed = sys.argv[2] == "unnamed"
os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)
delivery.deliver(b"Subject: half\\n\\n" + b"x" * 100000)
"""


@pytest.mark.parametrize("how", ["unnamed", "tmp"])
def test_crashWhileWriting(tmp_path, how, unnamedFiles):
    """
    A process killed in the middle of a delivery leaves nothing in new/;
    a file with no name leaves nothing at all (the kernel frees it), a
    tmp/ file stays for the removal of stale files.
    """
    if how == "unnamed" and not unnamedFiles:
        pytest.skip("no O_TMPFILE here")
    maildir = str(tmp_path / "Maildir")
    prepareMaildir(maildir)
    root = os.path.dirname(os.path.dirname(os.path.abspath(_maildir.__file__)))
    child = subprocess.run([sys.executable, "-c", _CRASH, maildir, how, root], timeout=60, capture_output=True)
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert os.listdir(os.path.join(maildir, "new")) == []
    assert len(os.listdir(os.path.join(maildir, "tmp"))) == (0 if how == "unnamed" else 1)


def test_tmpNameLeftOnceStoredIsNoFailure(tmp_path, monkeypatch):
    """
    Once the message is in new/ and flushed, failing to remove its tmp/
    name is not a failure: a 451 would have the client send it twice.
    """
    delivery = MaildirDelivery(str(tmp_path / "Maildir"))
    realUnlink = os.unlink

    def unlink(path, *args, **kwargs):
        if os.sep + "tmp" + os.sep in str(path):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return realUnlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", unlink)
    key = delivery.deliver(b"Subject: hi\n\nbody\n")
    assert os.listdir(tmp_path / "Maildir" / "new") == [key]


def storingSession() -> Session:
    session = Session(7, "192.0.2.1", 4000, lambda: None)
    session.mailFrom, session.rcptTo = "a@b.test", ["c@d.test"]
    session._setMessage(b"Subject: hi\r\n\r\nbody\r\n")
    return session


@pytest_twisted.ensureDeferred
async def test_handlerTurnsOSErrorInto451(tmp_path, monkeypatch, logEvents):
    """
    The handler answers an OSError itself (451 4.3.0, one line logged)
    and passes any other exception on as it is: that is a bug, which the
    server logs with its traceback.
    """
    delivery = MaildirDelivery(str(tmp_path / "Maildir"))

    def noRoom(content):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(delivery, "_store", noRoom)
    del logEvents[:]
    with pytest.raises(SMTPError) as caught:
        await delivery(storingSession()).addTimeout(WAIT, reactor)
    assert (caught.value.code, caught.value.text) == (451, "4.3.0 Error processing message, try again later")
    assert len(problems(logEvents)) == 1

    def bug(content):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(delivery, "_store", bug)
    del logEvents[:]
    with pytest.raises(ZeroDivisionError):
        await delivery(storingSession()).addTimeout(WAIT, reactor)
    assert problems(logEvents) == []  # the server's traceback is the one line


# Stale files in tmp/ ----------------------------------------------------------


HOUR = 3600


def changed(path) -> float:
    # The time removeStaleFiles dates a file by.
    info = os.stat(path)
    return max(info.st_mtime, info.st_ctime)


def test_staleTmpFilesRemovedAtStartup(tmp_path, logEvents):
    """
    Creating the delivery removes tmp/ files last changed more than 36
    hours ago, exactly: at 35h59m they stay, at 36h01m they go, with one
    log line giving the count.  new/ and cur/ are never touched, nor a
    folder in tmp/.
    """
    maildir = tmp_path / "Maildir"
    prepareMaildir(str(maildir))
    crashed = [maildir / "tmp" / f"123.M1P{n}.host" for n in range(3)]
    delivered = [maildir / "new" / "100.M1P1.host", maildir / "cur" / "100.M1P2.host:2,S"]
    for path in crashed + delivered:
        path.write_bytes(b"Subject: half\n")
    (maildir / "tmp" / "folder").mkdir()
    everything = crashed + delivered + [maildir / "tmp" / "folder"]
    clock = Clock()

    clock.rightNow = max(changed(p) for p in everything) + 35 * HOUR + 59 * 60
    del logEvents[:]
    assert MaildirDelivery(str(maildir), reactor=clock)
    assert all(p.exists() for p in everything)
    assert [e for e in logEvents if e.get("log_namespace") == "infsmtp.maildir"] == []  # nothing to say

    clock.rightNow = min(changed(p) for p in everything) + 36 * HOUR + 60
    MaildirDelivery(str(maildir), reactor=clock)
    assert not any(p.exists() for p in crashed)
    assert all(p.exists() for p in delivered) and (maildir / "tmp" / "folder").is_dir()
    [event] = [e for e in logEvents if e.get("log_namespace") == "infsmtp.maildir"]
    assert event["removed"] == 3
    assert formatEvent(event) == f"Maildir {maildir}: removed 3 files left in tmp/ for over 36 hours"


def test_staleAgeCountsTheChangeTime(tmp_path):
    """
    A file whose mtime was set back (tools date a message before moving it
    into new/) but that was changed recently is not stale.
    """
    maildir = tmp_path / "Maildir"
    prepareMaildir(str(maildir))
    dated = maildir / "tmp" / "dated"
    dated.write_bytes(b"Subject: from 2001\n")
    os.utime(dated, (1e9, 1e9))
    clock = Clock()
    clock.rightNow = os.stat(dated).st_ctime + 35 * HOUR + 59 * 60
    MaildirDelivery(str(maildir), reactor=clock)
    assert dated.exists()


def test_staleFileThatCannotBeRemoved(tmp_path, monkeypatch, logEvents):
    """
    A stale file that cannot be removed is counted in the one log line,
    one that another process removed first is not counted at all, and the
    delivery is created all the same.
    """
    maildir = tmp_path / "Maildir"
    prepareMaildir(str(maildir))
    for name in ("stuck", "gone", "raced"):
        (maildir / "tmp" / name).write_bytes(b"x")
    realUnlink = os.unlink

    def unlink(path, *args, **kwargs):
        if str(path).endswith("stuck"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        if str(path).endswith("raced"):
            realUnlink(path)
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT))
        return realUnlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", unlink)
    clock = Clock()
    clock.rightNow = changed(maildir / "tmp" / "stuck") + 37 * HOUR
    del logEvents[:]
    delivery = MaildirDelivery(str(maildir), reactor=clock)
    assert os.listdir(maildir / "tmp") == ["stuck"]
    [event] = [e for e in logEvents if e.get("log_namespace") == "infsmtp.maildir"]
    assert formatEvent(event).endswith("removed 1 files left in tmp/ for over 36 hours (1 could not be removed: Permission denied)")
    assert event["log_level"] == LogLevel.warn
    assert delivery.removeStaleFiles() == 0


def test_unreadableTmpIsLoggedNotFatal(tmp_path, monkeypatch, logEvents):
    """
    When tmp/ cannot be listed the delivery is created all the same (the
    first message will say what is wrong), with one error line.
    """
    def refuse(path):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)

    monkeypatch.setattr(os, "scandir", refuse)
    del logEvents[:]
    MaildirDelivery(str(tmp_path / "Maildir"))
    [event] = [e for e in logEvents if e.get("log_namespace") == "infsmtp.maildir"]
    assert event["log_level"] == LogLevel.error
    assert "cannot look for stale files in tmp/: [Errno 13] Permission denied" in formatEvent(event)

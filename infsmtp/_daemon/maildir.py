"""
L{MaildirDelivery}: an C{onReceive} handler that stores every message in a
Maildir, the default delivery of C{twistd infsmtp}.

Delivery follows the Maildir rules (U{https://cr.yp.to/proto/maildir.html}):
the message is written under a unique name in C{tmp/}, flushed to disk,
hard-linked into C{new/} (renamed where the file system has no hard links),
and the C{tmp/} name removed.  A reader never sees a partial file in
C{new/}, and C{mailbox.Maildir} (or any MUA) reads the result.

Where the system allows (Linux's C{O_TMPFILE} on ext4, XFS, btrfs or
tmpfs, with C{/proc}), the same is done without the C{tmp/} name: the
message is written into a file with no name in C{new/}, flushed, then
given its name there.  A reader still never sees it partial; a failure,
or a crash, leaves nothing at all (the kernel frees a file that never got
a name); and each message costs two changes of folders fewer, about a
tenth of the server's CPU per durable message.

The handler answers only once the file and the C{new/} directory entry
are on disk (C{fsync}), so the C{250} the client gets means the message
survives a crash.  When the disk refuses (full, read-only, gone: any
L{OSError}) the client is answered C{451 4.3.0}, keeps the message and
retries; nothing is left in C{tmp/} or C{new/}, and one line is logged,
not a traceback: a full disk fails every message the same way.  Any
other exception is a bug, and the server logs it with its traceback.

Without C{O_TMPFILE}, a crash between the write and the link leaves a
file in C{tmp/}; as the Maildir rules say, such files are removed once
they are 36 hours old, here when the delivery is created (that is, at
startup).

Messages delivered at the same time share the flush of C{new/} (a group
commit): each delivery still flushes its own file before naming it in
C{new/}, and answers only after a flush of C{new/} that began after its
own link, so every C{250} still means "on disk"; but twenty concurrent
sessions cost a handful of directory flushes instead of twenty.  Two
threads write (C{writers}): each takes every message waiting when it is
free, stores them one after the other, flushes C{new/} once for them (or
shares a flush with the other writer, L{GroupFlush}) and answers them
together.  A thread per message, as before, spent more CPU handing the
GIL and the reactor back and forth than the disk took.
"""

from __future__ import annotations

import errno
import io
import itertools
import os
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from .._errors import SMTPError
from .._server.session import Session

log = Logger(namespace="infsmtp.maildir")

_SUBFOLDERS = ("tmp", "new", "cur")
#: Files in C{tmp/} older than this (seconds) are a crashed delivery's.
STALE_AFTER = 36 * 3600
#: The reply to a message the disk would not take.
_DISK_REFUSED = (451, "4.3.0 Error processing message, try again later")


def _safeHostname(name: str) -> str:
    # The Maildir rules: '/' and ':' may not appear in the host part.
    return name.replace("/", r"\057").replace(":", r"\072")


def _fsyncDirectory(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Round:
    """
    One flush of a L{GroupFlush} and the deliveries waiting on it.
    """

    __slots__ = ("done", "error")

    def __init__(self) -> None:
        self.done = False
        self.error: BaseException | None = None


class GroupFlush:
    """
    Share one blocking flush among the threads that ask for it at the same
    time (a group commit), without ever letting a thread return before a
    flush that I{began after it asked} has finished.

    A thread calling L{flush} joins the next round.  When no flush is
    running, one member of that round (whichever gets the lock first) runs
    C{flush()} for all of it; the others wait.  While a flush runs, new
    callers gather in the next round, which starts as soon as the running
    one ends: under load each flush covers every caller that arrived during
    the previous one.  A flush that fails fails every member of its round
    (each gets its own L{OSError}), and no other.

    @param flush: the blocking call to share (here: C{fsync} of C{new/}).
    """

    def __init__(self, flush: Callable[[], None]) -> None:
        self._flush = flush
        self._changed = threading.Condition(threading.Lock())
        self._running: _Round | None = None
        self._next: _Round | None = None
        #: Flushes run so far (for tests and benchmarks).
        self.flushes = 0

    def flush(self) -> None:
        """
        Return once a flush begun after this call has completed; raise
        what it raised (an L{OSError} is re-created per caller).
        """
        with self._changed:
            round = self._next
            if round is None:
                round = self._next = _Round()
            while not round.done:
                if self._running is None:
                    # Nothing running: this round starts now, led by us.
                    self._running, self._next = round, None
                    break
                self._changed.wait()
            else:
                return self._outcome(round)
        try:
            self._flush()
        except BaseException as e:
            round.error = e
        with self._changed:
            self.flushes += 1
            round.done = True
            self._running = None
            self._changed.notify_all()
        return self._outcome(round)

    @staticmethod
    def _outcome(round: _Round) -> None:
        error = round.error
        if error is None:
            return
        if isinstance(error, OSError):
            # One exception object raised in many threads would share (and
            # garble) its traceback.
            raise OSError(error.errno, error.strerror, error.filename)
        raise error


def checkMaildirPath(path: str) -> str:
    """
    Check, without creating anything, that C{path} can be a Maildir: no
    file where one of its folders goes.

    @return: the absolute path.
    @raise SMTPError: with one sentence saying why it cannot be used.
    """
    path = os.path.abspath(path)
    for folder in (path,) + tuple(os.path.join(path, sub) for sub in _SUBFOLDERS):
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise SMTPError(f"Maildir {path}: {folder} is a file, not a folder")
    return path


def prepareMaildir(path: str) -> str:
    """
    Make sure C{path} is a Maildir that this process can deliver into
    (creating it and its C{tmp/}, C{new/} and C{cur/} folders, mode 0700,
    when missing).

    @return: the absolute path.
    @raise SMTPError: with one sentence saying why it cannot be used (a
        file is in the way, no permission, ...).
    """
    path = checkMaildirPath(path)
    for folder in (path,) + tuple(os.path.join(path, sub) for sub in _SUBFOLDERS):
        try:
            os.makedirs(folder, mode=0o700, exist_ok=True)
        except OSError as e:
            raise SMTPError(f"Maildir {path}: cannot create {folder}: {e.strerror}") from None
    for sub in ("tmp", "new"):
        # Checked now, as the user this process runs as: otherwise every
        # message would be answered 451 (a Maildir created by root before
        # twistd --uid dropped to another user).
        folder = os.path.join(path, sub)
        if not os.access(folder, os.W_OK | os.X_OK):
            raise SMTPError(f"Maildir {path}: {folder} is not writable by uid {os.getuid()}")
    return path


def localLineEndings(
    head: bytes, source: IO[bytes], size: int = 1 << 20, *, crlfOnly: bool = False
) -> Iterator[bytes]:
    """
    C{head}, then C{source} read in pieces with CRLF turned into LF (the
    local line ending Maildir readers expect).

    With C{crlfOnly} the caller vouches that every CR in C{source} begins
    a CRLF (a message as the server framed it: DATA with a bare CR or LF
    is refused), so every CR is simply deleted: C{bytes.translate}, about
    3x faster than C{replace} on short lines, and blind to how the pieces
    are cut.  Otherwise a CR that ends one piece waits for the LF that
    starts the next, and a bare CR stays as it is.
    """
    yield head
    if crlfOnly:
        if isinstance(source, io.BytesIO):
            # A message held in memory: read whole, which hands back the
            # bytes themselves, uncopied.
            size = -1
        while piece := source.read(size):
            yield piece.translate(None, b"\r")
        return
    carry = b""
    while piece := source.read(size):
        piece = carry + piece
        carry = b"\r" if piece.endswith(b"\r") else b""
        yield piece[: len(piece) - len(carry)].replace(b"\r\n", b"\n")
    if carry:
        yield carry


def _writeAll(fd: int, pieces: list[bytes]) -> None:
    """
    Write C{pieces} to C{fd} with as few system calls as the kernel
    allows (one C{writev} each time, resumed after a short write).
    """
    views = [memoryview(piece) for piece in pieces if piece]
    while views:
        written = os.writev(fd, views)
        while views and written >= len(views[0]):
            written -= len(views[0])
            del views[0]
        if written:
            views[0] = views[0][written:]


#: Bytes of message gathered before one C{writev}.
_WRITE_BATCH = 4 << 20
#: How many threads of the pool a delivery writes with, at most.
WRITERS = 2


def _writeDurably(fd: int, content: bytes | Iterable[bytes]) -> None:
    """
    Write C{content} (bytes, or an iterable of byte pieces) to C{fd} and
    flush it to disk.
    """
    # Gathered into few writev calls: each system call lets go of the GIL,
    # and getting it back costs a hand-over.
    pending: list[bytes] = []
    gathered = 0
    for piece in [content] if isinstance(content, bytes) else content:
        pending.append(piece)
        gathered += len(piece)
        if gathered >= _WRITE_BATCH:
            _writeAll(fd, pending)
            pending, gathered = [], 0
    _writeAll(fd, pending)
    os.fsync(fd)


#: Linux's flag for a file with no name in a folder (0 elsewhere).
_O_TMPFILE = getattr(os, "O_TMPFILE", 0)
#: What trying a file with no name raises where the system cannot: a
#: file system without O_TMPFILE (NFS, most FUSE), a kernel before 3.11,
#: no /proc (a chroot), a link refused.  Then C{tmp/} names are used.
_NO_UNNAMED_FILES = frozenset(
    {errno.EOPNOTSUPP, errno.ENOTSUP, errno.EISDIR, errno.EINVAL, errno.ENOENT, errno.EXDEV, errno.EPERM, errno.EACCES}
)


def _writeUnnamed(path: str, name: str, content: bytes | Iterable[bytes] | None) -> None:
    """
    Write C{content} into a file with no name in the folder C{path}, flush
    it, then give it the name C{name} there (C{content} L{None}: an empty
    file, not flushed).  Nothing is left when this fails.
    """
    folder = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fd = os.open(".", os.O_WRONLY | _O_TMPFILE, 0o600, dir_fd=folder)
        try:
            if content is not None:
                _writeDurably(fd, content)
            # linkat(AT_SYMLINK_FOLLOW) of the descriptor's /proc link, the
            # way open(2) documents without CAP_DAC_READ_SEARCH; os.link
            # calls linkat, following the link, when given a folder's
            # descriptor.
            os.link(f"/proc/self/fd/{fd}", name, dst_dir_fd=folder)
        finally:
            os.close(fd)
    finally:
        os.close(folder)


class MaildirDelivery:
    """
    Store each received message in a Maildir; use it as a server's
    C{onReceive} handler::

        server = Server(port=2525)
        server.onReceive = MaildirDelivery("Maildir")

    Each message gets a C{Return-Path:} header with the envelope sender and
    is stored with the local line ending (LF), as Maildir readers expect.
    One line is logged per message through L{twisted.logger}.

    The blocking file work runs in a thread pool (the reactor's unless one
    is given) so that a slow disk does not hold up other sessions; at most
    C{writers} of its threads at once, each storing the messages that
    waited for it in one go.

    Creating it removes what crashed deliveries left in C{tmp/} (see
    L{removeStaleFiles}).

    @param path: the Maildir folder; created (with C{tmp/}, C{new/},
        C{cur/}) when missing.
    @param create: C{False} only checks C{path} now and leaves creating it
        to L{open}.
    @param threadPool: the pool the writes run in (default: the reactor's).
    @param writers: how many of its threads may write at once.  Each
        takes all the messages waiting when it starts, stores them one
        after the other, flushes C{new/} once for them all and answers
        them together: under load a few threads store many messages each,
        where a thread per message would spend more on handing the GIL
        and the reactor back and forth than on the disk.
    @param reactor: the reactor (default: the global one); its
        C{seconds()} is the clock that dates C{tmp/} files.
    @raise SMTPError: when C{path} cannot be a Maildir (e.g. it is a file).
    """

    def __init__(
        self,
        path: str,
        *,
        threadPool: ThreadPool | None = None,
        reactor: Any = None,
        create: bool = True,
        writers: int = WRITERS,
    ) -> None:
        if not isinstance(writers, int) or isinstance(writers, bool) or writers < 1:
            raise ValueError(f"writers must be a whole number of threads, at least 1, not {writers!r}")
        self.path = prepareMaildir(path) if create else checkMaildirPath(path)
        if reactor is None:
            from twisted.internet import reactor
        self._reactor = reactor
        self._threadPool = threadPool
        self._maxWriters = writers
        # The messages waiting for a writer, and how many writers run:
        # both changed by the reactor's thread and the writers', under the
        # lock.
        self._lock = threading.Lock()
        self._waiting: list[tuple[Iterable[bytes], Deferred]] = []
        self._writers = 0
        self._hostname = _safeHostname(socket.gethostname())
        # next() on a count is atomic under the GIL: no two deliveries of
        # this process share a sequence number, whichever thread runs them.
        self._sequence = itertools.count(1)
        #: Whether messages are written as files with no name in C{new/}
        #: (L{None}: not found out yet).
        self._unnamed: bool | None = None
        newFolder = os.path.join(self.path, "new")
        # The module's function looked up at each call: tests replace it.
        self._flushNew = GroupFlush(lambda: _fsyncDirectory(newFolder))
        # Here rather than at the first message: twistd and .tac files both
        # create the delivery once, at startup, which is when the Maildir
        # rules ask for it, and no message pays for it.
        if create:
            self.removeStaleFiles()

    def open(self) -> None:
        """
        What the constructor does with C{create=False} left undone: create
        the Maildir (as the user this process runs as now) and check that
        it can be written, then remove stale files.  C{twistd infsmtp} calls
        it once listening has worked and privileges have been dropped.

        @raise SMTPError: when it cannot be used.
        """
        prepareMaildir(self.path)
        self.removeStaleFiles()

    def removeStaleFiles(self) -> int:
        """
        Remove the files in C{tmp/} that were last changed more than 36
        hours ago: deliveries that crashed before the link into C{new/}
        (the Maildir rules).  C{new/} and C{cur/} are never touched.
        Blocking; one line is logged when anything was removed or could
        not be.

        @return: how many files were removed.
        """
        tmp = os.path.join(self.path, "tmp")
        cutoff = self._reactor.seconds() - STALE_AFTER
        removed = 0
        failed: list[str] = []
        try:
            entries = list(os.scandir(tmp))
        except OSError as e:
            log.error("Maildir {maildir}: cannot look for stale files in tmp/: {error}", maildir=self.path, error=e)
            return 0
        for entry in entries:
            try:
                info = entry.stat(follow_symlinks=False)
                # The change time too: a tool may set a file's mtime back
                # (to the message's date) before moving it into new/, but
                # nothing sets the ctime back.
                if not stat.S_ISREG(info.st_mode) or max(info.st_mtime, info.st_ctime) >= cutoff:
                    continue
                os.unlink(entry.path)
            except FileNotFoundError:
                continue  # another process's delivery finished or cleaned it
            except OSError as e:
                failed.append(e.strerror or str(e))
                continue
            removed += 1
        if removed or failed:
            # A file we may not remove is worth an operator's look.
            (log.warn if failed else log.info)(
                "Maildir {maildir}: removed {removed} files left in tmp/ for over 36 hours{problem}",
                maildir=self.path,
                removed=removed,
                problem=f" ({len(failed)} could not be removed: {failed[0]})" if failed else "",
            )
        return removed

    def healthProblem(self) -> str | None:
        """
        For C{/healthz}: why the Maildir cannot take a message now (its
        C{tmp/} or C{new/} missing or not writable), or L{None}.
        """
        for sub in ("tmp", "new"):
            folder = os.path.join(self.path, sub)
            if not os.access(folder, os.W_OK | os.X_OK):
                return f"Maildir {self.path}: {folder} is not writable"
        return None

    def __call__(self, session: Session) -> Deferred:
        """
        Deliver C{session.msg}; the Deferred fires with C{True} (250) once
        the message is on disk, or fails (451).
        """
        # msgFile: a large message stays in its spool file and is copied in
        # pieces, never loaded whole (msgFile is valid until we answer).
        content = localLineEndings(
            f"Return-Path: <{session.mailFrom}>\n".encode(), session.msgFile, crlfOnly=session._crlfOnly
        )
        facts = session.deliveryFacts()
        queueId = session.queueId
        d: Deferred = Deferred()
        with self._lock:
            self._waiting.append((content, d))
            start = self._writers < self._maxWriters
            if start:
                self._writers += 1
        if start:
            (self._threadPool or self._reactor.getThreadPool()).callInThread(self._write)

        def delivered(key: str) -> bool:
            log.info(
                "session {sessionId} from {client}: <{sender}> -> {recipients}, "
                "{size} bytes, TLS {tls}, stored in Maildir as {key}, queue {queueId}",
                key=key,
                maildir=self.path,
                queueId=queueId,
                **facts,
            )
            return True

        def failed(failure: Any) -> Any:
            if not failure.check(OSError):
                return failure  # a bug: the server logs it, traceback and all
            # The disk said no: one line, and a reply of our own, so that
            # the server does not log a traceback for each message a full
            # disk refuses.
            log.error(
                "session {sessionId} from {client}: cannot store message {queueId} "
                "(<{sender}> -> {recipients}, {size} bytes) in Maildir {maildir}: {error}",
                maildir=self.path,
                queueId=queueId,
                error=str(failure.value),
                **facts,
            )
            raise SMTPError(*_DISK_REFUSED)

        return d.addCallbacks(delivered, failed)

    def uniqueName(self) -> str:
        """
        A name no other delivery uses: seconds, then microseconds, process,
        sequence and random bits, then the host (the Maildir rules).
        """
        now = time.time()
        seconds = int(now)
        micro = int((now - seconds) * 1_000_000)
        return (
            f"{seconds}.M{micro}P{os.getpid()}Q{next(self._sequence)}"
            f"R{os.urandom(4).hex()}.{self._hostname}"
        )

    def deliver(self, content: bytes | Iterable[bytes]) -> str:
        """
        Write C{content} (bytes, or an iterable of byte pieces) into the
        Maildir, durably; blocking.

        @return: the message's key (its file name in C{new/}).
        @raise OSError: when it could not be stored; nothing is left in
            C{tmp/} or C{new/} then.
        """
        name, tmpPath = self._store(content)
        self._flushed([(name, tmpPath)])
        return name

    def _write(self) -> None:
        """
        A writer, in a pool thread: store the messages waiting, answer
        them in the reactor's thread; again until none waits.
        """
        while True:
            with self._lock:
                batch, self._waiting = self._waiting, []
                if not batch:
                    self._writers -= 1
                    return
            try:
                results = self._storeAll([content for content, _ in batch])
            except BaseException:
                # A bug of ours: the batch is answered (the server logs it,
                # the clients retry), and this writer goes on.
                failure = Failure()
                results = [failure] * len(batch)
            self._reactor.callFromThread(self._answer, [d for _, d in batch], results)

    def _storeAll(self, contents: list[Iterable[bytes]]) -> list[Any]:
        """
        Store C{contents} one after the other and flush C{new/} once for
        them; blocking.

        @return: for each, its key or the L{Failure} that stopped it.
        """
        outcomes: list[Any] = []
        stored: list[tuple[str, str | None]] = []
        for content in contents:
            try:
                stored.append(self._store(content))
            except BaseException:
                outcomes.append(Failure())
            else:
                outcomes.append(None)
        if stored:
            try:
                self._flushed(stored)
            except BaseException:
                failure = Failure()
                outcomes = [failure if outcome is None else outcome for outcome in outcomes]
        names = iter(stored)
        return [next(names)[0] if outcome is None else outcome for outcome in outcomes]

    @staticmethod
    def _answer(deferreds: list[Deferred], results: list[Any]) -> None:
        # In the reactor's thread: a Failure errs back, a key calls back.
        for d, result in zip(deferreds, results):
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(result)

    def _flushed(self, stored: list[tuple[str, str | None]]) -> None:
        """
        Flush C{new/} for the messages C{stored} there (their names, and
        the C{tmp/} path each leaves behind), then remove those C{tmp/}
        names.  When the flush fails, the messages are taken out of
        C{new/} again (their entries are not known to be on disk, and the
        clients are told to retry: a copy would be delivered twice).
        """
        try:
            # Shared with the deliveries named at the same time, but begun
            # after our names: the entries are on disk when this returns.
            self._flushNew.flush()
        except BaseException:
            for name, tmpPath in stored:
                for leftover in (os.path.join(self.path, "new", name), tmpPath):
                    if leftover is not None:
                        try:
                            os.unlink(leftover)
                        except OSError:
                            pass
            raise
        for _, tmpPath in stored:
            if tmpPath is not None:
                try:
                    os.unlink(tmpPath)
                except OSError:
                    # Renamed; or the message is safely in new/ and the
                    # client must not be told to send it again: the removal
                    # of stale tmp/ files takes the name away later.
                    pass

    def _store(self, content: bytes | Iterable[bytes]) -> tuple[str, str | None]:
        """
        Write C{content} and name it in C{new/}, flushed but for the entry
        in C{new/} (see L{_flushed}); blocking.

        @return: its name, and the C{tmp/} path to remove once C{new/} is
            flushed (L{None} for a file written with no name).
        @raise OSError: nothing is left in C{tmp/} or C{new/} then.
        """
        name = self.uniqueName()
        newPath = os.path.join(self.path, "new", name)
        if self._canNameDescriptors():
            _writeUnnamed(os.path.dirname(newPath), name, content)
            return name, None
        tmpPath = os.path.join(self.path, "tmp", name)
        fd = os.open(tmpPath, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            try:
                _writeDurably(fd, content)
            finally:
                os.close(fd)
            try:
                os.link(tmpPath, newPath)
            except FileExistsError:
                raise
            except OSError as e:
                if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS):
                    raise
                # No hard links here (some network and FUSE file systems):
                # rename is atomic too, it just cannot refuse to overwrite.
                os.rename(tmpPath, newPath)
        except BaseException:
            try:
                os.unlink(tmpPath)
            except OSError:
                pass
            raise
        return name, tmpPath

    def _canNameDescriptors(self) -> bool:
        """
        Whether this Maildir takes files with no name (C{O_TMPFILE}), named
        afterwards through C{/proc/self/fd}; found out once, by trying it
        in C{tmp/}, in the thread and as the user that deliver messages.
        """
        if self._unnamed is None:
            self._unnamed = self._tryUnnamed()
        return self._unnamed

    def _tryUnnamed(self) -> bool:
        if not _O_TMPFILE:
            return False
        tmp = os.path.join(self.path, "tmp")
        name = self.uniqueName()
        try:
            _writeUnnamed(tmp, name, None)
        except OSError as e:
            if e.errno in _NO_UNNAMED_FILES:
                return False
            raise  # the disk refusing (full, read-only): ask again next time
        try:
            os.unlink(os.path.join(tmp, name))
        except OSError:
            pass  # an empty file in tmp/: the removal of stale files takes it
        return True

    def __repr__(self) -> str:
        return f"<MaildirDelivery {self.path}>"

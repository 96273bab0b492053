"""
L{MaildirDelivery}: an C{onReceive} handler that stores every message in a
Maildir, the default delivery of C{twistd infsmtp}.

Delivery follows the Maildir rules (U{https://cr.yp.to/proto/maildir.html}):
the message is written under a unique name in C{tmp/}, flushed to disk,
hard-linked into C{new/} (renamed where the file system has no hard links),
and the C{tmp/} name removed.  A reader never sees a partial file in
C{new/}, and C{mailbox.Maildir} (or any MUA) reads the result.

The handler answers only once the file and the C{new/} directory entry
are on disk (C{fsync}), so the C{250} the client gets means the message
survives a crash.  Any failure fails the handler, which the server answers
with a temporary C{451}: the client keeps the message and retries.
"""

from __future__ import annotations

import errno
import itertools
import os
import socket
import time
from collections.abc import Iterable, Iterator
from typing import IO, Any

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from ._errors import SMTPError
from ._session import Session

log = Logger(namespace="infsmtp.maildir")

_SUBFOLDERS = ("tmp", "new", "cur")


def _safeHostname(name: str) -> str:
    # The Maildir rules: '/' and ':' may not appear in the host part.
    return name.replace("/", r"\057").replace(":", r"\072")


def _fsyncDirectory(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def prepareMaildir(path: str) -> str:
    """
    Make sure C{path} is a Maildir (creating it and its C{tmp/}, C{new/}
    and C{cur/} folders, mode 0700, when missing).

    @return: the absolute path.
    @raise SMTPError: with one sentence saying why it cannot be used (a
        file is in the way, no permission, ...).
    """
    path = os.path.abspath(path)
    for folder in (path,) + tuple(os.path.join(path, sub) for sub in _SUBFOLDERS):
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise SMTPError(f"Maildir {path}: {folder} is a file, not a folder")
        try:
            os.makedirs(folder, mode=0o700, exist_ok=True)
        except OSError as e:
            raise SMTPError(f"Maildir {path}: cannot create {folder}: {e.strerror}") from None
    return path


def localLineEndings(head: bytes, source: IO[bytes], size: int = 1 << 20) -> Iterator[bytes]:
    """
    C{head}, then C{source} read in pieces with CRLF turned into LF (the
    local line ending Maildir readers expect).  The server refuses bare CR
    and LF in DATA, so every line ends in CRLF and the conversion is exact;
    a CR that ends one piece waits for the LF that starts the next.
    """
    yield head
    carry = b""
    while piece := source.read(size):
        piece = carry + piece
        carry = b"\r" if piece.endswith(b"\r") else b""
        yield piece[: len(piece) - len(carry)].replace(b"\r\n", b"\n")
    if carry:
        yield carry


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
    is given) so that a slow disk does not hold up other sessions.

    @param path: the Maildir folder; created (with C{tmp/}, C{new/},
        C{cur/}) when missing.
    @param threadPool: the pool the writes run in (default: the reactor's).
    @param reactor: the reactor (default: the global one).
    @raise SMTPError: when C{path} cannot be a Maildir (e.g. it is a file).
    """

    def __init__(self, path: str, *, threadPool: ThreadPool | None = None, reactor: Any = None) -> None:
        self.path = prepareMaildir(path)
        if reactor is None:
            from twisted.internet import reactor
        self._reactor = reactor
        self._threadPool = threadPool
        self._hostname = _safeHostname(socket.gethostname())
        # next() on a count is atomic under the GIL: no two deliveries of
        # this process share a sequence number, whichever thread runs them.
        self._sequence = itertools.count(1)

    def __call__(self, session: Session) -> Deferred:
        """
        Deliver C{session.msg}; the Deferred fires with C{True} (250) once
        the message is on disk, or fails (451).
        """
        # msgFile: a large message stays in its spool file and is copied in
        # pieces, never loaded whole (msgFile is valid until we answer).
        content = localLineEndings(f"Return-Path: <{session.mailFrom}>\n".encode(), session.msgFile)
        facts = session.deliveryFacts()
        pool = self._threadPool or self._reactor.getThreadPool()
        d = deferToThreadPool(self._reactor, pool, self.deliver, content)

        def delivered(key: str) -> bool:
            log.info(
                "session {sessionId} from {client}: <{sender}> -> {recipients}, "
                "{size} bytes, TLS {tls}, stored in Maildir as {key}",
                key=key,
                maildir=self.path,
                **facts,
            )
            return True

        def failed(failure: Any) -> Any:
            log.error(
                "session {sessionId} from {client}: cannot store the message in {maildir}: {error}",
                maildir=self.path,
                error=failure.getErrorMessage(),
                **facts,
            )
            return failure

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
            C{tmp/} then.
        """
        name = self.uniqueName()
        tmpPath = os.path.join(self.path, "tmp", name)
        newPath = os.path.join(self.path, "new", name)
        fd = os.open(tmpPath, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            try:
                for piece in [content] if isinstance(content, bytes) else content:
                    view = memoryview(piece)
                    while view:
                        written = os.write(fd, view)
                        view = view[written:]
                os.fsync(fd)
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
        try:
            os.unlink(tmpPath)
        except FileNotFoundError:
            pass  # renamed
        _fsyncDirectory(os.path.join(self.path, "new"))
        return name

    def __repr__(self) -> str:
        return f"<MaildirDelivery {self.path}>"

"""
Handlers for ``twistd infsmtp --handlers bench/sinks/maildir_nosync.py``
(the Maildir in ``$INFSMTP_BENCH_MAILDIR``): each message stored as a file
in ``new/`` the way ``--maildir`` stores it (a file with no name, written,
then named), but with no fsync at all and in the reactor's thread, so no
thread hand-off either.

Not a delivery anyone should run: a 250 from it does not mean "on disk".
bench/durable.py runs it as ``infsmtp-nosync`` to measure the ceiling of
a file per message: what the server's CPU allows once the waits for the
disk and the thread pool are taken away.
"""

import itertools
import os

MAILDIR = os.environ["INFSMTP_BENCH_MAILDIR"]
NEW = os.path.join(MAILDIR, "new")
_names = itertools.count()


def onReceive(session):
    content = f"Return-Path: <{session.mailFrom}>\n".encode() + session.msg.replace(b"\r\n", b"\n")
    name = f"{os.getpid()}.{next(_names)}.nosync"
    folder = os.open(NEW, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fd = os.open(".", os.O_WRONLY | os.O_TMPFILE, 0o600, dir_fd=folder)
        try:
            os.write(fd, content)
            os.link(f"/proc/self/fd/{fd}", name, dst_dir_fd=folder)
        finally:
            os.close(fd)
    finally:
        os.close(folder)
    return True

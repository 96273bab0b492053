"""
Real mail servers for the tests, each a private instance with its own
configuration in a temporary folder, listening on loopback only:

- :class:`PostfixServer`: Postfix's smtpd (PIPELINING, CHUNKING, DSN,
  SMTPUTF8), holding every message it accepts in its queue;
- :class:`DovecotLMTP`: Dovecot's LMTP server delivering into Maildirs,
  with a user who exists, one whose quota is full, and no others.

Both need root (Postfix's master and Dovecot drop privileges to their own
users) and Debian's packages (``postfix``, ``dovecot-lmtpd``), which
``.ci/run`` installs.
"""

from __future__ import annotations

import os
import pathlib
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass

import pytest
from peertools import freePort, requireTool

POSTFIX = "/usr/sbin/postfix"
POSTCAT = "/usr/sbin/postcat"
DOVECOT = "/usr/sbin/dovecot"


def requireRoot(what: str) -> None:
    """
    Skip unless running as root, which ``what`` needs to start.
    """
    if os.getuid() != 0:
        pytest.skip(f"{what} starts only as root")


def waitUntil(ready, what: str, log: pathlib.Path | None = None, seconds: float = 20) -> None:
    """
    Poll ``ready()`` (another program's readiness gives nothing to await),
    bounded; on timeout, fail with the end of ``log``.
    """
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(0.05)
    tail = log.read_text(errors="replace")[-2000:] if log is not None and log.exists() else ""
    raise RuntimeError(f"{what} did not start within {seconds:g} s\n{tail}")


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), 0.2).close()
        return True
    except OSError:
        return False


@dataclass
class HeldMessage:
    """
    A message Postfix accepted and holds: its envelope and its content
    (the headers Postfix added included).
    """

    sender: str
    recipients: list[str]
    content: bytes
    #: Postfix's named attributes of the message (``envelope_id``,
    #: ``ret_flags``), and of each recipient (``notify_flags``,
    #: ``dsn_orig_rcpt``).
    attributes: dict[str, str]
    recipientAttributes: dict[str, dict[str, str]]


class PostfixServer:
    """
    A private Postfix on ``127.0.0.1:port`` that accepts mail from loopback
    for anyone and holds it (``check_client_access static:HOLD``): nothing
    is ever delivered, everything can be read back with :meth:`held`.

    :ivar log: Postfix's own log file (``maillog_file``), where smtpd's
        ``disconnect`` lines count the commands of each session (``bdat=2``).
    """

    def __init__(self, **settings: str) -> None:
        requireTool(POSTFIX)
        requireRoot("Postfix")
        self.port = freePort()
        self.root = pathlib.Path(tempfile.mkdtemp(prefix="infsmtp-postfix-"))
        self.root.chmod(0o755)
        self.config = self.root / "etc"
        self.queue = self.root / "queue"
        self.log = self.root / "maillog"
        data = self.root / "data"
        for folder in (self.config, self.queue, data):
            folder.mkdir()
        postfixUser = pwd.getpwnam("postfix")
        os.chown(data, postfixUser.pw_uid, postfixUser.pw_gid)
        main = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue),
            "data_directory": str(data),
            "mail_owner": "postfix",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "myhostname": "postfix.test",
            "mydestination": "",
            "mynetworks": "127.0.0.0/8",
            # Hold what was accepted (at the end of the data, which BDAT
            # LAST is too, whatever the other restrictions say), and never
            # try to deliver anything.
            "smtpd_end_of_data_restrictions": "check_client_access static:HOLD",
            "defer_transports": "smtp, local, virtual, relay, error",
            "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
            # Leave the message as sent: no Date, Message-Id or From added.
            "local_header_rewrite_clients": "",
            "always_add_missing_headers": "no",
            "maillog_file": str(self.log),
            "maillog_file_prefixes": str(self.root),
            "syslog_name": "postfix-infsmtp-test",
            # No DNS: the tests are offline.
            "smtpd_peername_lookup": "no",
        }
        main.update(settings)
        (self.config / "main.cf").write_text("".join(f"{k} = {v}\n" for k, v in main.items()))
        master = pathlib.Path("/etc/postfix/master.cf").read_text()
        master, found = re.subn(
            r"^smtp\s+inet\s.*$",
            f"127.0.0.1:{self.port} inet n - n - - smtpd",
            master,
            count=1,
            flags=re.M,
        )
        assert found, "no smtp inet line in /etc/postfix/master.cf"
        (self.config / "master.cf").write_text(master)
        self._postfix("start")
        waitUntil(lambda: _accepts(self.port), "Postfix", self.log)

    def _postfix(self, command: str) -> None:
        completed = subprocess.run(
            [POSTFIX, "-c", str(self.config), command],
            capture_output=True,
            timeout=60,
        )
        if completed.returncode != 0:
            tail = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"postfix {command} failed ({completed.returncode})\n{tail}")

    def clear(self) -> None:
        """
        Delete every held message.
        """
        subprocess.run(
            ["/usr/sbin/postsuper", "-c", str(self.config), "-d", "ALL"], capture_output=True, timeout=30, check=True
        )

    def stop(self) -> None:
        try:
            self._postfix("stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def sessions(self) -> list[str]:
        """
        smtpd's ``disconnect`` lines so far, one per session that said
        EHLO, with their command counts (``ehlo=1 mail=1 rcpt=1 bdat=1
        quit=1 commands=5``).  (Readiness probes say nothing.)
        """
        if not self.log.exists():
            return []
        return [
            line.split("disconnect from ", 1)[1]
            for line in self.log.read_text(errors="replace").splitlines()
            if "smtpd[" in line and "disconnect from " in line and " ehlo=" in line
        ]

    def sessionsAfter(self, before: int, count: int = 1) -> list[str]:
        """
        The ``count`` sessions logged after the first ``before``, once
        smtpd has logged them (it does after the client left), bounded.
        """
        waitUntil(lambda: len(self.sessions()) >= before + count, f"{count} sessions logged", self.log)
        return self.sessions()[before:]

    def held(self, count: int, seconds: float = 20) -> list[HeldMessage]:
        """
        The ``count`` messages held in the queue (waiting, bounded, for the
        cleanup daemon to finish them), oldest first.
        """
        hold = self.queue / "hold"

        def complete() -> list[pathlib.Path]:
            files = sorted(hold.glob("*"), key=lambda p: p.stat().st_mtime) if hold.exists() else []
            # A file being written has its owner-execute bit off.
            return [f for f in files if f.stat().st_mode & 0o100]

        waitUntil(lambda: len(complete()) >= count, f"{count} held messages", self.log, seconds)
        return [self._read(f) for f in complete()]

    def _read(self, path: pathlib.Path) -> HeldMessage:
        envelope = subprocess.run(
            [POSTCAT, "-c", str(self.config), "-e", str(path)], capture_output=True, timeout=30, check=True
        ).stdout.decode("utf-8", "replace")
        content = subprocess.run(
            [POSTCAT, "-c", str(self.config), "-bh", str(path)], capture_output=True, timeout=30, check=True
        ).stdout
        sender, recipients = "", []
        attributes: dict[str, str] = {}
        recipientAttributes: dict[str, dict[str, str]] = {}
        # A recipient's attributes come just before it.
        pending: dict[str, str] = {}
        for line in envelope.splitlines():
            name, _, value = line.partition(": ")
            if name == "named_attribute":
                key, _, value = value.partition("=")
                pending[key] = value
            elif name == "sender":
                sender = value
                attributes.update(pending)
                pending = {}
            elif name == "recipient":
                recipients.append(value)
                recipientAttributes[value] = pending
                pending = {}
        return HeldMessage(sender, recipients, content, attributes, recipientAttributes)


class DovecotLMTP:
    """
    A private Dovecot speaking LMTP on a unix socket (:attr:`socket`) and on
    ``127.0.0.1:port``, delivering into ``<root>/mail/<user>/Maildir``.

    Users: ``alice`` (delivers), ``bob`` (quota of 1 KiB: refuses after the
    data with 552), in any domain (``alice@example.org`` is ``alice``).
    Anyone else is refused at RCPT (550 5.1.1).
    """

    def __init__(self) -> None:
        requireTool(DOVECOT)
        requireRoot("Dovecot")
        self.port = freePort()
        self.root = pathlib.Path(tempfile.mkdtemp(prefix="infsmtp-dovecot-"))
        self.root.chmod(0o755)
        self.socket = str(self.root / "lmtp")
        self.log = self.root / "log"
        for name in ("run", "state", "mail"):
            (self.root / name).mkdir()
        nobody = pwd.getpwnam("nobody")
        self._uid, self._gid = nobody.pw_uid, nobody.pw_gid
        os.chown(self.root / "mail", self._uid, self._gid)
        users = self.root / "users"
        users.write_text("alice:::::::\nbob:::::::userdb_quota_rule=*:storage=1\n")
        config = self.root / "dovecot.conf"
        config.write_text(
            f"""\
base_dir = {self.root}/run
state_dir = {self.root}/state
log_path = {self.log}
info_log_path = {self.log}
protocols = lmtp
ssl = no
listen = 127.0.0.1
default_internal_user = dovecot
default_login_user = dovenull
mail_location = maildir:~/Maildir
mail_plugins = quota
first_valid_uid = 1
# alice@example.org is alice.
auth_username_format = %Ln
passdb {{
  driver = passwd-file
  args = {users}
}}
userdb {{
  driver = passwd-file
  args = {users}
  default_fields = uid={self._uid} gid={self._gid} home={self.root}/mail/%n
}}
plugin {{
  quota = maildir:User quota
}}
service lmtp {{
  unix_listener {self.socket} {{
    mode = 0666
  }}
  inet_listener lmtp {{
    address = 127.0.0.1
    port = {self.port}
  }}
}}
service anvil {{
  chroot =
}}
"""
        )
        self._process = subprocess.Popen(
            [DOVECOT, "-F", "-c", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        waitUntil(lambda: self._process.poll() is not None or _accepts(self.port), "Dovecot", self.log)
        if self._process.poll() is not None:
            raise RuntimeError(f"dovecot exited: {self._process.stderr.read().decode(errors='replace')}")
        waitUntil(lambda: os.path.exists(self.socket), "Dovecot's LMTP socket", self.log)

    def stop(self) -> None:
        self._process.terminate()
        try:
            self._process.wait(10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(10)
        shutil.rmtree(self.root, ignore_errors=True)

    def delivered(self, user: str) -> list[bytes]:
        """
        The messages in ``user``'s INBOX (``new/``), oldest first.
        """
        new = self.root / "mail" / user / "Maildir" / "new"
        files = sorted(new.iterdir(), key=lambda p: p.stat().st_mtime) if new.exists() else []
        return [f.read_bytes() for f in files]

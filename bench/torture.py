"""
Torture: ``twistd infsmtp`` (and aiosmtpd beside it) under attack and under
faults, on loopback only, every scenario bounded in count and in time.

    python bench/torture.py                                   # everything, ~10 min on 2 cores
    python bench/torture.py --scale 0.01                      # a quick look
    python bench/torture.py --scenarios burst,auth-one --servers infsmtp

Each scenario starts a fresh server process (a Maildir of its own), samples
its RSS and open descriptors from ``/proc``, runs the attack from this
process (asyncio, sources on 127.0.0.1 unless said otherwise) while a
well-behaved ``smtplib`` client in a process of its own sends messages from
127.0.0.2 and notes what it saw, then checks that every message that got a
250 is in the Maildir.  One table comes out: scenario, server, load held,
server RSS, descriptors, what the normal client saw, messages lost.

``--scale`` multiplies counts (100,000 soak messages and RCPTs at 1); the
hold times shrink with it down to a fifth.  ``--commit`` runs a snapshot
of a commit rather than the working tree.  The Maildirs go to /dev/shm
unless ``--workdir`` says otherwise (see L{memoryFolder}).  Options that
``twistd infsmtp --help`` does not list are reported as "option missing"
on the rows of the scenarios they defend, never passed.  See
bench/README.md and docs/RELIABILITY.rst.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import random
import re
import resource
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
#: The checkout whose infsmtp twistd runs (--repo): this one by default.
REPO = os.path.dirname(HERE)
PYTHON = sys.executable
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")

ATTACKER = "127.0.0.1"
#: The normal client's source: loopback too, but another "client" for the
#: per-client limits.
NORMAL_SOURCE = "127.0.0.2"
USER, PASSWORD = "victim", "correct-horse-battery"
MB = 1024 * 1024


# Messages -------------------------------------------------------------------

FILLER = b"The quick brown fox jumps over the lazy dog; 0123456789 ABCDEFGHIJKLMN\r\n"


def message(token: str, lines: int = 12) -> bytes:
    """
    A message whose Message-ID is C{<token@torture.test>} and whose body is
    C{token begin}, C{lines} filler lines and C{token end}: a file cut
    anywhere short is told from the whole one by L{expectedBody}.
    """
    head = (
        f"From: <torture@torture.test>\r\nTo: <sink@torture.test>\r\n"
        f"Subject: {token}\r\nMessage-ID: <{token}@torture.test>\r\n\r\n"
    ).encode()
    return head + f"{token} begin\r\n".encode() + FILLER * lines + f"{token} end\r\n".encode()


def expectedBody(token: str, lines: int) -> bytes:
    """
    The body of L{message} as a Maildir stores it (LF line endings).
    """
    return (f"{token} begin\r\n".encode() + FILLER * lines + f"{token} end\r\n".encode()).replace(b"\r\n", b"\n")


_MESSAGE_ID = re.compile(rb"^message-id:[ \t]*<([^>\r\n]+)@torture\.test>", re.IGNORECASE | re.MULTILINE)


@dataclass
class MaildirContents:
    """
    What a Maildir holds: Message-ID tokens (with their count), files whose
    body is not the one sent (partial), and what is left in C{tmp/}.
    """

    found: Counter = field(default_factory=Counter)
    partial: list[str] = field(default_factory=list)
    files: int = 0
    leftInTmp: int = 0


def scanMaildir(path: str, checkBodies: bool = False) -> MaildirContents:
    """
    Read every file in C{new/} and C{cur/}.  With C{checkBodies}, each
    body is compared with the one its token says was sent (tokens end in
    C{.LINES}); a file without a token, or with another body, is partial.
    """
    contents = MaildirContents()
    for sub in ("new", "cur"):
        folder = os.path.join(path, sub)
        if not os.path.isdir(folder):
            continue
        for name in os.listdir(folder):
            contents.files += 1
            with open(os.path.join(folder, name), "rb") as f:
                data = f.read() if checkBodies else f.read(8192)
            match = _MESSAGE_ID.search(data.split(b"\n\n", 1)[0] if checkBodies else data)
            if match is None:
                contents.partial.append(name)
                continue
            token = match.group(1).decode()
            contents.found[token] += 1
            if checkBodies:
                body = data.replace(b"\r\n", b"\n").split(b"\n\n", 1)[-1]
                lines = int(token.rsplit(".", 1)[1])
                if body.rstrip(b"\n") != expectedBody(token, lines).rstrip(b"\n"):
                    contents.partial.append(name)
    tmp = os.path.join(path, "tmp")
    contents.leftInTmp = len(os.listdir(tmp)) if os.path.isdir(tmp) else 0
    return contents


# The server process ---------------------------------------------------------


def memoryFolder() -> str | None:
    """
    /dev/shm when it has room, else the system's temporary folder.

    On this machine's disk, removing 100,000 files that were fsync'ed takes
    minutes, longer than the soak itself; on tmpfs fsync costs nothing and
    neither does the removal.  No check here needs the disk: kill -9 and
    SIGTERM leave the page cache to the kernel either way.
    """
    try:
        stats = os.statvfs("/dev/shm")
    except OSError:
        return None
    return "/dev/shm" if stats.f_bavail * stats.f_frsize > 4 * 1024**3 else None


def freePort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def childEnvironment() -> dict[str, str]:
    """
    The servers' environment: C{REPO} first on the path, so that twistd
    finds that checkout's package and plugin whatever is installed.
    """
    return dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONUNBUFFERED="1")


def waitFor(condition: Callable[[], Any], deadline: float, what: str) -> Any:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        result = condition()
        if result:
            return result
        time.sleep(0.05)
    raise RuntimeError(f"timed out after {deadline:g} s waiting for {what}")


class ServerUnderTest:
    """
    One server process in its own folder; subclasses say how to start it.
    """

    name = ""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.maildir = os.path.join(folder, "Maildir")
        self.port = freePort()
        self.process: subprocess.Popen | None = None

    def command(self, options: list[str]) -> list[str]:
        raise NotImplementedError

    def ready(self) -> bool:
        raise NotImplementedError

    def start(self, options: list[str]) -> None:
        self.stdoutPath = os.path.join(self.folder, "server.stdout")
        env = childEnvironment()
        with open(self.stdoutPath, "wb") as out:
            self.process = subprocess.Popen(
                self.command(options), cwd=self.folder, stdout=out, stderr=subprocess.STDOUT, env=env
            )

        def up() -> bool:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}: {self.output()[-2000:]}")
            return self.ready()

        waitFor(up, 30, f"{self.name} to listen")

    def output(self) -> str:
        with open(self.stdoutPath, encoding="utf-8", errors="replace") as f:
            return f.read()

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, deadline: float = 30) -> int | None:
        """
        SIGTERM, then SIGKILL after C{deadline} seconds; the exit status.
        """
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(deadline)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return self.process.returncode


class InfsmtpServer(ServerUnderTest):
    name = "infsmtp"
    #: The options ``twistd infsmtp --help`` lists, read once.
    known: set[str] | None = None

    @classmethod
    def knownOptions(cls) -> set[str]:
        if cls.known is None:
            text = subprocess.run(
                [TWISTD, "infsmtp", "--help"], capture_output=True, text=True, env=childEnvironment(), cwd=REPO, timeout=60
            ).stdout
            cls.known = set(re.findall(r"(--[a-z][a-z0-9-]+)", text))
        return cls.known

    def command(self, options: list[str]) -> list[str]:
        self.logPath = os.path.join(self.folder, "twistd.log")
        return [
            TWISTD, "-n", "--pidfile=", "--logfile", self.logPath, "infsmtp",
            "--listen", f"tcp:{self.port}:interface=127.0.0.1", "--maildir", self.maildir,
            "--hostname", "torture.test", *options,
        ]

    def ready(self) -> bool:
        try:
            with open(self.logPath, encoding="utf-8", errors="replace") as f:
                return "infsmtp listening on" in f.read()
        except FileNotFoundError:
            return False

    def log(self) -> str:
        """
        The whole log, twistd's rotated pieces (C{twistd.log.N}, 1 MB each)
        included, oldest first.
        """
        names = [n for n in os.listdir(self.folder) if n.startswith("twistd.log")]
        names.sort(key=lambda n: -int(n.rsplit(".", 1)[1]) if n[-1].isdigit() else 0)
        text = []
        for name in names:
            with open(os.path.join(self.folder, name), encoding="utf-8", errors="replace") as f:
                text.append(f.read())
        return "".join(text)


class AiosmtpdServer(ServerUnderTest):
    name = "aiosmtpd"

    def command(self, options: list[str]) -> list[str]:
        return [
            PYTHON, os.path.join(HERE, "sinks", "aiosmtpd_maildir.py"),
            "--port", str(self.port), "--maildir", self.maildir, *options,
        ]

    def ready(self) -> bool:
        return "ready" in self.output()

    def log(self) -> str:
        return self.output()


SERVERS = {"infsmtp": InfsmtpServer, "aiosmtpd": AiosmtpdServer}


class Sampler(threading.Thread):
    """
    Samples a process's RSS, peak RSS and open descriptors every
    C{interval} seconds until stopped or the process is gone.
    """

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.samples: list[tuple[float, int, int]] = []
        self.peakRss = 0
        self.peakFds = 0
        self._finished = threading.Event()
        self.startRss, self.startFds = self.sample() or (0, 0)

    def sample(self) -> tuple[int, int] | None:
        """
        (RSS in bytes, descriptors) now, or None once the process is gone;
        the peaks are updated on the way.
        """
        try:
            with open(f"/proc/{self.pid}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
            rss = int(fields["VmRSS"].split()[0]) * 1024
            hwm = int(fields["VmHWM"].split()[0]) * 1024
            fds = len(os.listdir(f"/proc/{self.pid}/fd"))
        except (OSError, KeyError, ValueError):
            return None
        self.peakRss = max(self.peakRss, hwm, rss)
        self.peakFds = max(self.peakFds, fds)
        self.samples.append((time.monotonic(), rss, fds))
        return rss, fds

    def run(self) -> None:
        while not self._finished.wait(self.interval):
            if self.sample() is None:
                return

    def stop(self) -> None:
        self.sample()
        self._finished.set()
        self.join(5)


# The normal client (runs in a process of its own) ---------------------------


def normalClientMain(options: argparse.Namespace) -> None:
    """
    A well-behaved client: smtplib from C{NORMAL_SOURCE}, one connection
    renewed every C{--renew} seconds (well under any per-client rate
    limit), a message at a time as fast as the server answers, until the
    stop file appears.  Writes what it saw as JSON.
    """
    import smtplib

    start = time.monotonic()
    end = start + options.max_time
    acked: list[str] = []
    latencies: list[float] = []
    connectLatencies: list[float] = []
    errors: Counter = Counter()
    lastAck, maxGap = start, 0.0
    client: smtplib.SMTP | None = None
    connectedAt = 0.0
    number = 0

    def drop() -> None:
        nonlocal client
        if client is not None:
            try:
                client.close()
            except Exception:  # noqa: BLE001 (closing what is already broken)
                pass
        client = None

    while time.monotonic() < end and not os.path.exists(options.stop):
        try:
            if client is not None and time.monotonic() - connectedAt > options.renew:
                try:
                    client.quit()
                except smtplib.SMTPException:
                    pass
                drop()
            if client is None:
                began = time.monotonic()
                client = smtplib.SMTP(timeout=10, source_address=(options.source, 0))
                client.connect("127.0.0.1", options.port)
                client.ehlo("normal.torture.test")
                if options.login:
                    user, _, password = options.login.partition(":")
                    client.login(user, password)
                connectedAt = time.monotonic()
                connectLatencies.append(connectedAt - began)
            number += 1
            token = f"normal.{options.tag}.{number}.12"
            began = time.monotonic()
            client.sendmail("normal@torture.test", ["sink@torture.test"], message(token))
            now = time.monotonic()
            latencies.append(now - began)
            acked.append(token)
            maxGap = max(maxGap, now - lastAck)
            lastAck = now
        except smtplib.SMTPConnectError as e:
            errors[f"connect {e.smtp_code}"] += 1
        except smtplib.SMTPServerDisconnected:
            errors["disconnected"] += 1
        except smtplib.SMTPRecipientsRefused as e:
            codes = {code for code, _ in e.recipients.values()}
            errors[f"rcpt {'/'.join(map(str, sorted(codes)))}"] += 1
        except smtplib.SMTPResponseException as e:
            errors[str(e.smtp_code)] += 1
        except (TimeoutError, socket.timeout):
            errors["timeout"] += 1
        except ConnectionRefusedError:
            errors["refused"] += 1
        except ConnectionResetError:
            errors["reset"] += 1
        except (OSError, smtplib.SMTPException) as e:
            errors[type(e).__name__] += 1
        else:
            continue
        drop()
        time.sleep(0.2)
    drop()
    stopped = time.monotonic()
    maxGap = max(maxGap, stopped - lastAck)
    with open(options.out, "w") as f:
        json.dump(
            {
                "acked": acked,
                "latencies": latencies,
                "connectLatencies": connectLatencies,
                "errors": dict(errors),
                "duration": stopped - start,
                "maxGap": maxGap,
            },
            f,
        )


class NormalClient:
    """
    The orchestrator's handle on a normal client process.
    """

    def __init__(self, folder: str, port: int, tag: str, login: str | None, maxTime: float) -> None:
        self.stopPath = os.path.join(folder, "normal.stop")
        self.outPath = os.path.join(folder, "normal.json")
        command = [
            PYTHON, os.path.abspath(__file__), "--normal-client", "--port", str(port),
            "--source", NORMAL_SOURCE, "--stop", self.stopPath, "--out", self.outPath,
            "--tag", tag, "--max-time", str(maxTime),
        ]
        if login:
            command += ["--login", login]
        self.process = subprocess.Popen(command, cwd=folder)

    def finish(self) -> dict[str, Any] | None:
        with open(self.stopPath, "w"):
            pass
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
            return None
        try:
            with open(self.outPath) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None


def percentile(values: list[float], fraction: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def describeNormal(result: dict[str, Any] | None, idleRate: float | None) -> str:
    """
    The normal client's experience in one cell.
    """
    if result is None:
        return "normal client: no result"
    rate = len(result["acked"]) / result["duration"] if result["duration"] else 0
    parts = [f"{rate:,.0f} msg/s" + (f" ({rate / idleRate:.2f}x idle)" if idleRate else "")]
    if result["latencies"]:
        p50 = percentile(result["latencies"], 0.5) * 1000
        p99 = percentile(result["latencies"], 0.99) * 1000
        parts.append(f"p50 {p50:.1f} ms, p99 {p99:.1f} ms")
    parts.append(f"longest wait {result['maxGap']:.1f} s")
    errors = result["errors"]
    if errors:
        kinds = ", ".join(f"{kind} x{count}" for kind, count in sorted(errors.items(), key=lambda kv: -kv[1]))
        parts.append(f"{sum(errors.values())} errors ({kinds})")
    else:
        parts.append("0 errors")
    return "; ".join(parts)


# A minimal asyncio SMTP client for the attackers ----------------------------


class Wire:
    """
    One raw SMTP connection: write lines, read whole replies.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int, source: str = ATTACKER, timeout: float = 10) -> "Wire":
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0)), timeout
        )
        return cls(reader, writer)

    async def reply(self, timeout: float = 30) -> tuple[int, str]:
        """
        The next whole reply: (code, its last line).  EOF raises
        C{ConnectionError}.
        """
        while True:
            line = await asyncio.wait_for(self.reader.readline(), timeout)
            if not line:
                raise ConnectionError("closed by the server")
            if line[3:4] != b"-":
                text = line.decode("ascii", "replace").rstrip()
                try:
                    return int(line[:3]), text
                except ValueError:
                    return 0, text

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def command(self, line: str, timeout: float = 30) -> tuple[int, str]:
        self.writer.write(line.encode() + b"\r\n")
        return await self.reply(timeout)

    async def greet(self, timeout: float = 30) -> tuple[int, str]:
        """
        The greeting, and EHLO when it is 220.
        """
        code, text = await self.reply(timeout)
        if code == 220:
            code, text = await self.command("EHLO attacker.torture.test", timeout)
        return code, text

    async def sendMessage(self, token: str, lines: int, timeout: float = 60) -> int:
        """
        MAIL, RCPT and DATA pipelined, then the message: the final code.
        """
        self.send(b"MAIL FROM:<torture@torture.test>\r\nRCPT TO:<sink@torture.test>\r\nDATA\r\n")
        codes = [(await self.reply(timeout))[0] for _ in range(3)]
        if codes[2] != 354:
            return codes[2] if codes[0] == 250 else codes[0]
        self.send(message(token, lines) + b".\r\n")
        await self.writer.drain()
        return (await self.reply(timeout))[0]

    def close(self) -> None:
        try:
            self.writer.transport.abort()
        except Exception:  # noqa: BLE001 (closing what is already broken)
            pass


# Scenarios --------------------------------------------------------------------


@dataclass
class Context:
    """
    What a scenario works with, and what it hands back.
    """

    server: ServerUnderTest
    scale: float
    timeScale: float
    sampler: Sampler
    #: Tokens of the messages that got a 250 (the normal client's aside).
    acked: set[str] = field(default_factory=set)
    #: "load held", filled by the scenario.
    load: str = ""
    #: Replaces the normal client's cell when the scenario is its own client.
    client: str = ""
    #: Compare every stored body with what was sent (kill -9, SIGTERM).
    checkBodies: bool = False
    #: Extra remarks for the row.
    notes: list[str] = field(default_factory=list)

    @property
    def port(self) -> int:
        return self.server.port

    def count(self, base: int, least: int = 1) -> int:
        return max(least, int(base * self.scale))

    def seconds(self, base: float) -> float:
        return base * self.timeScale


@dataclass
class Scenario:
    name: str
    title: str
    run: Callable[[Context], Awaitable[None]]
    #: Seconds at scale 1 after which the scenario is cut off, whatever it does.
    limit: float
    normalClient: bool = True
    #: Options for each server, by server name.
    options: dict[str, list[str]] = field(default_factory=dict)
    #: infsmtp options that defend against it; reported when missing.
    defences: tuple[str, ...] = ()
    login: bool = False


def latencyText(latencies: list[float]) -> str:
    if not latencies:
        return "no message acknowledged"
    return f"p50 {percentile(latencies, 0.5) * 1000:.1f} ms, p99 {percentile(latencies, 0.99) * 1000:.1f} ms"


async def baseline(ctx: Context) -> None:
    """
    The normal client alone: the rate the others are compared with.
    """
    await asyncio.sleep(ctx.seconds(10))
    ctx.load = "none (the normal client alone)"


async def soak(ctx: Context) -> None:
    """
    Many 1 KiB messages on 8 reused connections, RSS and descriptors noted
    at 10 % and at the end; sending stops after 150 s (aiosmtpd's Mailbox
    handler stores about 300 a second on this machine).
    """
    total = ctx.count(100_000, 100)
    deadline = time.monotonic() + ctx.seconds(150)
    connections = 8
    numbers = iter(range(total))
    latencies: list[float] = []
    errors: Counter = Counter()
    marks: dict[int, tuple[int, int]] = {}
    began = time.monotonic()

    async def sender(index: int) -> None:
        wire: Wire | None = None
        for number in numbers:
            if time.monotonic() > deadline:
                if 100 not in marks:
                    marks[100] = ctx.sampler.sample() or (0, 0)
                break
            token = f"soak.{number}.12"
            for _attempt in range(3):
                try:
                    if wire is None:
                        wire = await Wire.open(ctx.port)
                        code, text = await wire.greet()
                        if code != 250:
                            raise ConnectionError(f"greeting {text}")
                    sent = time.monotonic()
                    code = await wire.sendMessage(token, 12)
                    if code == 250:
                        latencies.append(time.monotonic() - sent)
                        ctx.acked.add(token)
                        if len(ctx.acked) == total // 10:
                            marks[10] = ctx.sampler.sample() or (0, 0)
                        elif len(ctx.acked) == total:
                            # While the connections are still open.
                            marks[100] = ctx.sampler.sample() or (0, 0)
                        break
                    errors[str(code)] += 1
                except (OSError, asyncio.TimeoutError) as e:
                    errors[type(e).__name__] += 1
                    if wire is not None:
                        wire.close()
                    wire = None
                    await asyncio.sleep(0.2)
        if wire is not None:
            try:
                await wire.command("QUIT", 5)
            except (OSError, asyncio.TimeoutError):
                pass
            wire.close()

    await asyncio.gather(*(sender(i) for i in range(connections)))
    marks.setdefault(100, ctx.sampler.sample() or (0, 0))
    elapsed = time.monotonic() - began
    await asyncio.sleep(1)
    after = ctx.sampler.sample() or (0, 0)
    first = marks.get(10, (0, 0))
    last = marks.get(100, (0, 0))
    sent = len(ctx.acked)
    ctx.load = (
        f"{sent:,} x 1 KiB on {connections} reused connections from {ATTACKER} in {elapsed:.0f} s"
        + (f" (of {total:,}: the time limit came first)" if sent < total else "")
    )
    ctx.client = (
        f"the soak's senders: {len(ctx.acked) / elapsed:,.0f} msg/s; {latencyText(latencies)}; "
        f"{sum(errors.values())} errors{' (' + ', '.join(f'{k} x{v}' for k, v in errors.items()) + ')' if errors else ''}"
    )
    ctx.notes.append(
        f"RSS {first[0] / MB:.1f} MB at 10 % of {total:,}, {last[0] / MB:.1f} MB at the last message, "
        f"{after[0] / MB:.1f} MB after; descriptors {first[1]}, {last[1]}, {after[1]}"
    )


async def slow(ctx: Context) -> None:
    """
    1,000 connections from one address that trickle a byte every 2 s, half
    inside a command line, half inside DATA; a connection that is closed
    or refused comes back after 2 s, as a slowloris tool does.
    """
    target = ctx.count(1000, 20)
    end = time.monotonic() + ctx.seconds(30)
    stats: Counter = Counter()
    openNow = 0
    maxOpen = 0
    #: How long the server kept each slow session, by what it trickled.
    lifetimes: dict[str, list[float]] = {"command line": [], "DATA": []}

    async def one(index: int) -> None:
        nonlocal openNow, maxOpen
        await asyncio.sleep(index * 5.0 / target)
        first = True
        while time.monotonic() < end:
            if not first:
                await asyncio.sleep(2)
            first = False
            try:
                wire = await Wire.open(ctx.port)
            except (OSError, asyncio.TimeoutError):
                stats["connect failed"] += 1
                continue
            stats["connections"] += 1
            opened = time.monotonic()
            counted = False
            try:
                code, text = await wire.reply(15)
                if code != 220:
                    stats[f"refused {code}"] += 1
                    continue
                openNow += 1
                counted = True
                maxOpen = max(maxOpen, openNow)
                if index % 2:
                    await wire.command("EHLO slow.torture.test")
                    wire.send(b"MAIL FROM:<slow@torture.test>\r\nRCPT TO:<sink@torture.test>\r\nDATA\r\n")
                    for _ in range(3):
                        await wire.reply()
                    trickle = b"Subject: slow\r\n\r\n" + FILLER * 1000
                else:
                    trickle = b"EHLO " + b"s" * 2000
                for byte in trickle:
                    if time.monotonic() >= end:
                        break
                    wire.send(bytes([byte]))
                    try:
                        line = await asyncio.wait_for(wire.reader.readline(), 2)
                    except asyncio.TimeoutError:
                        continue
                    if not line:
                        raise ConnectionError("closed by the server")
                    stats[f"got {line[:3].decode('ascii', 'replace')} while trickling"] += 1
            except (OSError, asyncio.TimeoutError):
                stats["cut by the server"] += 1
                lifetimes["DATA" if index % 2 else "command line"].append(time.monotonic() - opened)
            finally:
                if counted:
                    openNow -= 1
                wire.close()

    await asyncio.gather(*(one(i) for i in range(target)))
    refused = sum(v for k, v in stats.items() if k.startswith("refused"))
    cut = stats["cut by the server"]
    ctx.load = (
        f"{target:,} slow clients from {ATTACKER} for {ctx.seconds(30):.0f} s: at most {maxOpen} open at once; "
        f"{stats['connections']:,} connections, {refused:,} refused at connect"
        + (f", {cut:,} cut by the server" if cut else ", none cut")
        + "".join(
            f"; {kind} tricklers cut after {statistics.median(times):.0f} s (median)"
            for kind, times in lifetimes.items()
            if times
        )
    )
    others = {k: v for k, v in stats.items() if k.startswith("got") or k == "connect failed"}
    if others:
        ctx.notes.append(", ".join(f"{k}: {v}" for k, v in others.items()))
    refusals = ", ".join(f"{k}: {v}" for k, v in stats.items() if k.startswith("refused"))
    if refusals:
        ctx.notes.append(refusals)


async def burst(ctx: Context) -> None:
    """
    10,000 connections opened at once from one address, each holding its
    slot until all have had an answer and 5 s more.
    """
    total = ctx.count(10_000, 100)
    released = asyncio.Event()
    outcomes: Counter = Counter()
    greeted = 0
    maxGreeted = 0
    began = time.monotonic()

    async def one() -> None:
        nonlocal greeted, maxGreeted
        try:
            wire = await Wire.open(ctx.port, timeout=30)
        except (OSError, asyncio.TimeoutError) as e:
            outcomes[f"connect {type(e).__name__}"] += 1
            return
        try:
            code, _ = await wire.reply(30)
            outcomes[f"answered {code}"] += 1
            if code == 220:
                greeted += 1
                maxGreeted = max(maxGreeted, greeted)
                await released.wait()
                greeted -= 1
                wire.send(b"QUIT\r\n")
        except (OSError, asyncio.TimeoutError) as e:
            outcomes[f"no reply ({type(e).__name__})"] += 1
        finally:
            wire.close()

    tasks = [asyncio.ensure_future(one()) for _ in range(total)]
    deadline = time.monotonic() + ctx.seconds(60)
    while sum(outcomes.values()) + greeted < total and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    answered = time.monotonic() - began
    await asyncio.sleep(5)
    released.set()
    await asyncio.gather(*tasks)
    refused = {k: v for k, v in outcomes.items() if k != "answered 220"}
    ctx.load = (
        f"{total:,} connections at once from {ATTACKER}: {outcomes['answered 220']:,} greeted "
        f"(at most {maxGreeted:,} open), "
        + (", ".join(f"{v:,} {k}" for k, v in sorted(refused.items(), key=lambda kv: -kv[1])) or "none refused")
        + f"; all answered in {answered:.1f} s"
    )


async def sendLongLine(ctx: Context, kind: str, size: int) -> str:
    """
    One connection sending a line of C{size} bytes (a command line, or a
    line inside DATA) while its replies are read; what happened, in words.
    """
    wire = await Wire.open(ctx.port)
    replies: list[str] = []

    async def read() -> None:
        try:
            while True:
                replies.append((await wire.reply(60))[1])
        except (OSError, asyncio.TimeoutError):
            replies.append("(closed)")

    sent = 0
    began = time.monotonic()
    try:
        code, text = await wire.greet()
        reader = asyncio.ensure_future(read())
        token = f"longline.{ctx.server.name}.0"
        if kind == "DATA":
            wire.send(b"MAIL FROM:<long@torture.test>\r\nRCPT TO:<sink@torture.test>\r\nDATA\r\n")
            wire.send(f"Message-ID: <{token}@torture.test>\r\nSubject: long\r\n\r\n".encode())
        else:
            wire.send(b"EHLO ")
        chunk = b"a" * MB
        try:
            while sent < size:
                wire.send(chunk)
                await asyncio.wait_for(wire.writer.drain(), 30)
                sent += len(chunk)
            wire.send(b"\r\n.\r\nQUIT\r\n" if kind == "DATA" else b"\r\nQUIT\r\n")
            await asyncio.wait_for(wire.writer.drain(), 30)
        except (OSError, asyncio.TimeoutError) as e:
            replies.append(f"(sending stopped: {type(e).__name__})")
        try:
            await asyncio.wait_for(reader, 30)
        except asyncio.TimeoutError:
            replies.append("(no end within 30 s)")
        if kind == "DATA":
            # MAIL, RCPT, DATA, then the message's own reply: 250 means stored.
            codes = [r for r in replies if r[:1].isdigit()]
            if len(codes) >= 4 and codes[3].startswith("250"):
                ctx.acked.add(token)
    finally:
        wire.close()
    shown = "; ".join(r[:60] for r in replies)
    return f"{kind} line: {sent / MB:.0f} MB sent in {time.monotonic() - began:.1f} s, replies: {shown}"


async def longLine(ctx: Context) -> None:
    """
    A 50 MB command line, then a 50 MB line inside DATA.
    """
    size = ctx.count(50 * MB, MB)
    for kind in ("command", "DATA"):
        ctx.notes.append(await sendLongLine(ctx, kind, size))
    ctx.load = f"a {size / MB:.0f} MB command line, then a {size / MB:.0f} MB line in DATA"


async def rcpts(ctx: Context) -> None:
    """
    One transaction with 100,000 RCPT commands pipelined (written while the
    replies are read), then DATA.
    """
    total = ctx.count(100_000, 1000)
    wire = await Wire.open(ctx.port)
    codes: Counter = Counter()
    token = f"rcpts.{ctx.server.name}.12"
    began = time.monotonic()
    try:
        code, text = await wire.greet()
        if code != 250:
            ctx.load = f"greeting refused: {text}"
            return
        code, text = await wire.command("MAIL FROM:<rcpts@torture.test>")
        if code != 250:
            ctx.load = f"MAIL refused: {text}"
            return

        async def read() -> None:
            for _ in range(total):
                codes[(await wire.reply(60))[0]] += 1

        reader = asyncio.ensure_future(read())
        batch = 1000
        try:
            for start in range(0, total, batch):
                wire.send(b"".join(b"RCPT TO:<r%d@torture.test>\r\n" % n for n in range(start, min(total, start + batch))))
                await asyncio.wait_for(wire.writer.drain(), 60)
            await reader
            written = time.monotonic() - began
            code, text = await wire.command("DATA", 60)
            final = text
            if code == 354:
                wire.send(message(token) + b".\r\n")
                # Bounded: aiosmtpd's Mailbox handler spends minutes on a
                # 100,000-recipient header, with its event loop blocked.
                try:
                    code, final = await wire.reply(ctx.seconds(60))
                except asyncio.TimeoutError:
                    code, final = 0, f"(no reply within {ctx.seconds(60):.0f} s)"
                if code == 250:
                    ctx.acked.add(token)
        except (OSError, asyncio.TimeoutError) as e:
            reader.cancel()
            written = time.monotonic() - began
            final = f"(connection: {type(e).__name__})"
    finally:
        wire.close()
    summary = ", ".join(f"{v:,} x {k}" for k, v in sorted(codes.items()))
    ctx.load = (
        f"{total:,} RCPTs pipelined in one transaction: replies {summary or 'none'} in {written:.1f} s; "
        f"the message: {final[:50]}"
    )


def tcpState(sock: socket.socket) -> int:
    """
    The kernel's TCP state of C{sock} (1 established, 7 closed, 8
    close-wait: the peer has closed), from C{TCP_INFO}.
    """
    return struct.unpack("B", sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1))[0]


async def noRead(ctx: Context) -> None:
    """
    A client that pipelines NOOPs and never reads a reply, with a small
    receive buffer: how much does the server take, and does it let go?
    The servers run with a 20 s timeout so that letting go fits in the
    hold (45 s).
    """
    total = ctx.count(60 * MB, MB)
    hold = ctx.seconds(45)
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.bind((ATTACKER, 0))
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", ctx.port))
    chunk = b"NOOP\r\n" * (64 * 1024 // 6)
    sent = 0
    began = time.monotonic()
    lastProgress = began
    try:
        while sent < total:
            try:
                await asyncio.wait_for(loop.sock_sendall(sock, chunk), 5)
            except asyncio.TimeoutError:
                stopped = f"the server stopped reading after {sent / MB:.1f} MB ({lastProgress - began:.1f} s)"
                break
            except OSError as e:
                stopped = f"the server closed after {sent / MB:.1f} MB ({type(e).__name__})"
                break
            sent += len(chunk)
            lastProgress = time.monotonic()
        else:
            stopped = f"the server read all {sent / MB:.0f} MB in {lastProgress - began:.1f} s"
        closedAfter = None
        end = time.monotonic() + hold
        while time.monotonic() < end:
            if tcpState(sock) != 1:
                closedAfter = time.monotonic() - began
                break
            await asyncio.sleep(0.5)
    finally:
        sock.close()
    ctx.load = (
        f"{total / MB:.0f} MB of NOOP offered, no reply read: {stopped}; "
        + (f"closed us after {closedAfter:.0f} s" if closedAfter is not None else f"still open after {time.monotonic() - began:.0f} s")
    )


async def stalled(ctx: Context) -> None:
    """
    60 sessions (10 from each of 6 addresses, so that the per-client limit
    is not what holds them) each send 8 MB of DATA and stall.
    """
    sessions = max(6, int(60 * min(1.0, ctx.scale * 10)))
    size = 8_000_000
    hold = ctx.seconds(30)
    body = FILLER * (size // len(FILLER))
    outcomes: Counter = Counter()
    sentBytes: list[int] = []
    cutAfter: list[float] = []
    allSent = asyncio.Event()
    pending = sessions

    def doneSending() -> None:
        nonlocal pending
        pending -= 1
        if pending == 0:
            allSent.set()

    async def one(index: int) -> None:
        sent = 0
        sending = True
        began = time.monotonic()
        try:
            wire = await Wire.open(ctx.port, source=f"127.0.1.{index % 6 + 1}")
        except (OSError, asyncio.TimeoutError):
            outcomes["connect failed"] += 1
            doneSending()
            return
        try:
            code, text = await wire.greet()
            if code != 250:
                outcomes[f"refused {code}"] += 1
                return
            wire.send(b"MAIL FROM:<stall@torture.test>\r\nRCPT TO:<sink@torture.test>\r\nDATA\r\n")
            for _ in range(3):
                code, text = await wire.reply()
            if code != 354:
                outcomes[f"DATA refused {code}"] += 1
                return
            wire.send(b"Subject: stalled\r\n\r\n")
            piece = 256 * 1024
            try:
                for offset in range(0, len(body), piece):
                    wire.send(body[offset : offset + piece])
                    await asyncio.wait_for(wire.writer.drain(), 10)
                    sent += len(body[offset : offset + piece])
                outcomes["sent 8 MB"] += 1
            except asyncio.TimeoutError:
                outcomes["the server stopped reading"] += 1
            sending = False
            doneSending()
            # Stall: wait until the server gives up on us or the hold ends.
            data = await asyncio.wait_for(wire.reader.read(1000), hold + 60)
            if data:
                outcomes[f"answered {data[:3].decode('ascii', 'replace')}"] += 1
            cutAfter.append(time.monotonic() - began)
        except (OSError, asyncio.TimeoutError):
            if sending:
                outcomes["cut while sending"] += 1
            cutAfter.append(time.monotonic() - began)
        finally:
            if sending:
                doneSending()
            sentBytes.append(sent)
            wire.close()

    tasks = [asyncio.ensure_future(one(i)) for i in range(sessions)]
    try:
        await asyncio.wait_for(allSent.wait(), 60)
    except asyncio.TimeoutError:
        pass
    await asyncio.sleep(hold)
    heldAtEnd = sum(1 for t in tasks if not t.done())
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    ctx.load = (
        f"{sessions} sessions x 8 MB of DATA then silence, from 6 addresses, held {hold:.0f} s: "
        f"{sum(sentBytes) / MB:,.0f} MB taken, "
        + ", ".join(f"{v} {k}" for k, v in outcomes.items())
        + f"; {heldAtEnd} still open at the end"
        + (f" (the others cut after {statistics.median(cutAfter):.0f} s)" if cutAfter else "")
    )


def authPlain(password: str) -> str:
    return "AUTH PLAIN " + base64.b64encode(f"\0{USER}\0{password}".encode()).decode()


async def guessing(ctx: Context, connections: int) -> None:
    """
    C{connections} loops from one address, each guessing passwords with
    AUTH PLAIN on a connection until the server closes it, then
    reconnecting, for 20 s.
    """
    end = time.monotonic() + ctx.seconds(20)
    replies: Counter = Counter()
    latencies: list[float] = []
    connects = 0
    guesses = 0

    async def loop(index: int) -> None:
        nonlocal connects, guesses
        while time.monotonic() < end:
            try:
                wire = await Wire.open(ctx.port)
            except (OSError, asyncio.TimeoutError):
                replies["connect failed"] += 1
                await asyncio.sleep(1)
                continue
            connects += 1
            try:
                code, text = await wire.greet(15)
                if code != 250:
                    replies[f"refused at connect with {code}"] += 1
                    await asyncio.sleep(1)
                    continue
                while time.monotonic() < end:
                    guesses += 1
                    began = time.monotonic()
                    code, text = await wire.command(authPlain(f"guess-{index}-{guesses}"), max(1.0, end - began + 5))
                    latencies.append(time.monotonic() - began)
                    replies[str(code) if code == 535 else f"AUTH answered {code}"] += 1
                    if code == 235:
                        replies["GUESSED"] += 1
                    if code == 421:
                        break
            except asyncio.TimeoutError:
                replies["no reply before the end"] += 1
            except OSError:
                replies["closed without a reply"] += 1
            finally:
                wire.close()

    await asyncio.gather(*(loop(i) for i in range(connections)))
    seconds = ctx.seconds(20)
    failures = replies["535"]
    ctx.load = (
        f"{connections} guessing connection{'s' if connections > 1 else ''} from {ATTACKER} for {seconds:.0f} s: "
        f"{failures:,} guesses answered 535 ({failures / seconds:,.1f}/s) on {connects:,} connection{'s' if connects != 1 else ''}"
        + "".join(f"; {k}: {v:,}" for k, v in replies.items() if k != "535")
        + (f"; reply time p50 {percentile(latencies, 0.5):.2f} s, max {max(latencies):.1f} s" if latencies else "")
    )


async def authOne(ctx: Context) -> None:
    await guessing(ctx, 1)


async def authMany(ctx: Context) -> None:
    await guessing(ctx, 100)


async def deliveryLoad(ctx: Context, senders: int, until: Callable[[], bool], deadline: float) -> tuple[Counter, list[float]]:
    """
    C{senders} connections sending messages of 1 KiB to 4 MiB (one in five
    large) until C{until()} or the server is gone.
    """
    errors: Counter = Counter()
    latencies: list[float] = []
    end = time.monotonic() + deadline
    rng = random.Random(9)

    async def sender(index: int) -> None:
        number = 0
        while time.monotonic() < end and not until():
            try:
                wire = await Wire.open(ctx.port)
                code, text = await wire.greet()
                if code != 250:
                    errors[f"greeting {code}"] += 1
                    wire.close()
                    await asyncio.sleep(0.1)
                    continue
            except (OSError, asyncio.TimeoutError) as e:
                errors[f"connect {type(e).__name__}"] += 1
                await asyncio.sleep(0.1)
                continue
            try:
                while time.monotonic() < end and not until():
                    number += 1
                    lines = rng.choice([12, 12, 12, 12, rng.randint(10_000, 57_000)])
                    token = f"load.{ctx.server.name}.{index}.{number}.{lines}"
                    began = time.monotonic()
                    code = await wire.sendMessage(token, lines)
                    if code == 250:
                        ctx.acked.add(token)
                        latencies.append(time.monotonic() - began)
                    else:
                        errors[str(code)] += 1
                        if code == 421:
                            break
            except (OSError, asyncio.TimeoutError) as e:
                errors[type(e).__name__] += 1
            finally:
                wire.close()

    await asyncio.gather(*(sender(i) for i in range(senders)))
    return errors, latencies


async def kill9(ctx: Context) -> None:
    """
    20 senders; SIGKILL once 200 messages are acknowledged (or after 10 s),
    while deliveries are in flight.  Every file in new/ must be whole.
    """
    ctx.checkBodies = True
    senders = 20
    killed: list[float] = []
    began = time.monotonic()
    target = ctx.count(200, 50)

    async def killer() -> None:
        while len(ctx.acked) < target and time.monotonic() - began < 10:
            await asyncio.sleep(0.01)
        ctx.sampler.sample()
        os.kill(ctx.server.pid, signal.SIGKILL)
        killed.append(time.monotonic())

    killTask = asyncio.ensure_future(killer())
    errors, latencies = await deliveryLoad(ctx, senders, lambda: bool(killed), 30)
    await killTask
    ctx.server.process.wait(10)
    ctx.load = (
        f"{senders} senders (1 KiB-4 MiB messages) from {ATTACKER}; kill -9 after "
        f"{killed[0] - began:.1f} s with {len(ctx.acked)} acknowledged"
    )
    ctx.client = f"the senders: {len(ctx.acked)} acknowledged; {latencyText(latencies)}; errors {dict(errors)}"


async def sigterm(ctx: Context) -> None:
    """
    20 senders; SIGTERM after 200 acknowledgements (or 10 s); the senders go
    on until the server has gone.  Every acknowledged message must be there.
    """
    ctx.checkBodies = True
    senders = 20
    termed: list[float] = []
    began = time.monotonic()
    target = ctx.count(200, 50)
    process = ctx.server.process

    async def terminator() -> None:
        while len(ctx.acked) < target and time.monotonic() - began < 10:
            await asyncio.sleep(0.01)
        ctx.sampler.sample()
        ackedBefore.append(len(ctx.acked))
        process.send_signal(signal.SIGTERM)
        termed.append(time.monotonic())
        while process.poll() is None and time.monotonic() - termed[0] < 40:
            await asyncio.sleep(0.05)
        termed.append(time.monotonic())

    ackedBefore: list[int] = []
    task = asyncio.ensure_future(terminator())
    errors, latencies = await deliveryLoad(ctx, senders, lambda: len(termed) == 2, 60)
    await task
    status = process.poll()
    ctx.load = (
        f"{senders} senders (1 KiB-4 MiB messages) from {ATTACKER}; SIGTERM after {termed[0] - began:.1f} s "
        f"with {ackedBefore[0]} acknowledged; "
        + (f"exited {status} after {termed[1] - termed[0]:.1f} s" if status is not None else "still running after 40 s")
        + f", {len(ctx.acked) - ackedBefore[0]} more acknowledged meanwhile"
    )
    ctx.client = f"the senders: {len(ctx.acked)} acknowledged; {latencyText(latencies)}; errors {dict(errors)}"


#: The per-client and memory limits of issue 9, as twistd options.
LANDING_OPTIONS = (
    "--max-connections-per-client", "--max-connection-rate", "--max-auth-failures-per-client",
    "--auth-failure-delay", "--trusted", "--min-data-rate", "--handler-timeout", "--receive-timeout",
    "--message-memory",
)

AUTH_OPTIONS = {
    "infsmtp": ["--auth", f"memory:{USER}:{PASSWORD}", "--allow-insecure-auth"],
    "aiosmtpd": ["--auth", f"{USER}:{PASSWORD}"],
}

SCENARIOS = [
    Scenario("baseline", "the normal client alone", baseline, 30),
    Scenario("soak", "100,000-message soak", soak, 600, normalClient=False),
    Scenario(
        "slow", "1,000 slow connections", slow, 120,
        options={"infsmtp": ["--timeout", "10"], "aiosmtpd": ["--timeout", "10"]},
        defences=("--max-connections-per-client", "--min-data-rate"),
    ),
    Scenario("burst", "10,000-connection burst", burst, 180, defences=("--max-connections-per-client", "--max-connection-rate")),
    Scenario("longline", "a 50 MB line", longLine, 180),
    Scenario("rcpts", "100,000 pipelined RCPTs", rcpts, 300),
    Scenario(
        "noread", "a client that never reads", noRead, 120,
        options={"infsmtp": ["--timeout", "20"], "aiosmtpd": ["--timeout", "20"]},
    ),
    Scenario("stalled", "60 stalled DATA sessions", stalled, 180, defences=("--message-memory", "--min-data-rate")),
    Scenario(
        "auth-one", "AUTH guessing, one connection", authOne, 90, options=AUTH_OPTIONS, login=True,
        defences=("--max-auth-failures-per-client", "--auth-failure-delay"),
    ),
    Scenario(
        "auth-many", "AUTH guessing, 100 connections", authMany, 90, options=AUTH_OPTIONS, login=True,
        defences=("--max-auth-failures-per-client", "--auth-failure-delay", "--max-connections-per-client"),
    ),
    Scenario("kill9", "kill -9 mid-delivery", kill9, 90, normalClient=False),
    Scenario("sigterm", "SIGTERM under load", sigterm, 120, normalClient=False),
]


# The run ----------------------------------------------------------------------


@dataclass
class Row:
    scenario: Scenario
    server: str
    load: str = ""
    rss: str = ""
    fds: str = ""
    client: str = ""
    lost: str = ""
    notes: list[str] = field(default_factory=list)
    normalRate: float | None = None
    #: Seconds each phase took, for the progress lines.
    timings: dict[str, float] = field(default_factory=dict)


def runScenario(scenario: Scenario, serverClass: type[ServerUnderTest], options: argparse.Namespace, idleRates: dict[str, float]) -> Row:
    row = Row(scenario, serverClass.name)
    folder = tempfile.mkdtemp(prefix=f"{scenario.name}-{serverClass.name}-", dir=options.workdir)
    server = serverClass(folder)
    serverOptions = list(scenario.options.get(server.name, []))
    if isinstance(server, InfsmtpServer):
        known = server.knownOptions()
        missing = [o for o in serverOptions if o.startswith("--") and o not in known]
        missing += [d for d in scenario.defences if d not in known]
        if missing:
            row.notes.append("option missing: " + ", ".join(dict.fromkeys(missing)))
        # Never pass an option the server does not know (with its value).
        kept: list[str] = []
        skip = False
        for i, item in enumerate(serverOptions):
            if skip:
                skip = False
                continue
            if item.startswith("--") and item not in known:
                skip = i + 1 < len(serverOptions) and not serverOptions[i + 1].startswith("--")
                continue
            kept.append(item)
        serverOptions = kept
    if serverOptions:
        row.notes.append("server options: " + " ".join(o for o in serverOptions if "memory:" not in o))
    timeScale = min(1.0, max(0.2, options.scale))
    normal: NormalClient | None = None
    sampler: Sampler | None = None
    normalResult = None
    try:
        phase = time.monotonic()
        server.start(serverOptions)
        row.timings["start"] = time.monotonic() - phase
        sampler = Sampler(server.pid)
        sampler.start()
        ctx = Context(server, options.scale, timeScale, sampler)
        if scenario.normalClient:
            login = f"{USER}:{PASSWORD}" if scenario.login else None
            normal = NormalClient(folder, server.port, scenario.name, login, scenario.limit + 60)
            time.sleep(0.5)
        limit = scenario.limit * max(timeScale, options.scale if scenario.name in ("soak", "rcpts") else 0)
        phase = time.monotonic()
        try:
            asyncio.run(asyncio.wait_for(scenario.run(ctx), max(limit, 30)))
        except asyncio.TimeoutError:
            ctx.load = f"CUT at the time limit ({max(limit, 30):.0f} s) " + ctx.load
        except Exception as e:  # noqa: BLE001 (one scenario's failure is a row, not the end of the run)
            ctx.load = f"ERROR {type(e).__name__}: {e} " + ctx.load
        row.timings["attack"] = time.monotonic() - phase
        phase = time.monotonic()
        if normal is not None:
            normalResult = normal.finish()
            normal = None
            row.timings["normal client"] = time.monotonic() - phase
        sampler.stop()
        row.load = ctx.load
        row.notes.extend(ctx.notes)
        row.rss = f"{sampler.startRss / MB:.0f} -> {sampler.peakRss / MB:.0f} MB"
        row.fds = f"{sampler.startFds} -> {sampler.peakFds}"
        if scenario.normalClient:
            row.client = describeNormal(normalResult, idleRates.get(server.name))
            if normalResult and normalResult["duration"]:
                row.normalRate = len(normalResult["acked"]) / normalResult["duration"]
        else:
            row.client = ctx.client
        if server.alive():
            phase = time.monotonic()
            status = server.stop()
            row.timings["stop"] = stopped = time.monotonic() - phase
            if stopped > 3:
                row.notes.append(f"SIGTERM took {stopped:.1f} s to stop the server, its clients all gone")
            # aiosmtpd leaves SIGTERM to Python's default: death by the signal.
            if status not in (0, None) and not (server.name == "aiosmtpd" and status == -signal.SIGTERM):
                row.notes.append(f"exit status {status} on SIGTERM")
        # What got a 250 must be in the Maildir, whole.
        phase = time.monotonic()
        contents = scanMaildir(server.maildir, ctx.checkBodies)
        row.timings["check"] = time.monotonic() - phase
        acked = set(ctx.acked)
        if normalResult:
            acked.update(normalResult["acked"])
        lost = [token for token in acked if token not in contents.found]
        row.lost = f"{len(lost)} of {len(acked):,}"
        if lost:
            row.notes.append(f"LOST: {sorted(lost)[:5]}")
        if contents.partial:
            row.lost += f", {len(contents.partial)} PARTIAL in new/"
            row.notes.append(f"partial files: {contents.partial[:5]}")
        if ctx.checkBodies:
            row.notes.append(
                f"{contents.files} files in new/, all whole" if not contents.partial else f"{contents.files} files in new/"
            )
            row.notes.append(f"{contents.leftInTmp} left in tmp/")
        duplicates = sum(n - 1 for n in contents.found.values() if n > 1)
        if duplicates:
            row.notes.append(f"{duplicates} stored twice")
        phase = time.monotonic()
        crashes = server.log().count("Traceback")
        row.timings["log"] = time.monotonic() - phase
        if crashes:
            row.notes.append(f"{crashes} tracebacks in the server's log")
    except Exception as e:  # noqa: BLE001 (as above)
        row.load = f"ERROR {type(e).__name__}: {e}"
    finally:
        if normal is not None:
            normal.finish()
        if sampler is not None and sampler.is_alive():
            sampler.stop()
        if server.alive():
            server.stop()
        if options.keep:
            print(f"  kept {folder}", file=sys.stderr)
        else:
            phase = time.monotonic()
            shutil.rmtree(folder, ignore_errors=True)
            row.timings["cleanup"] = time.monotonic() - phase
    return row


def printTable(rows: list[Row]) -> None:
    """
    One table, a row per scenario and server, its remarks indented below.
    """
    print()
    print("scenario | server | load held | server RSS start -> peak | descriptors start -> peak | what the normal client saw | messages lost")
    for row in rows:
        print(" | ".join([row.scenario.name, row.server, row.load, row.rss, row.fds, row.client, row.lost]))
        for note in row.notes:
            print(f"    - {note}")
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--scenarios",
        default=",".join(s.name for s in SCENARIOS),
        help="comma-separated, from: " + "; ".join(f"{s.name} ({s.title})" for s in SCENARIOS),
    )
    parser.add_argument("--servers", default="infsmtp,aiosmtpd")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the counts (hold times down to 1/5)")
    parser.add_argument(
        "--workdir", default=None, help="where the scenario folders (Maildirs) go [a new folder in /dev/shm]"
    )
    parser.add_argument("--keep", action="store_true", help="keep each scenario's folder (Maildir, server log)")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    parser.add_argument(
        "--commit", default=None, help="run infsmtp as of this commit (a git archive of it) [the working tree]"
    )
    # The normal client's own process.
    parser.add_argument("--normal-client", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--source", default=NORMAL_SOURCE, help=argparse.SUPPRESS)
    parser.add_argument("--stop", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--tag", default="", help=argparse.SUPPRESS)
    parser.add_argument("--login", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--max-time", type=float, default=600, help=argparse.SUPPRESS)
    parser.add_argument("--renew", type=float, default=5, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.normal_client:
        normalClientMain(options)
        return

    global REPO
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    byName = {s.name: s for s in SCENARIOS}
    chosen = [byName[name] for name in options.scenarios.split(",")]
    servers = [SERVERS[name] for name in options.servers.split(",")]
    ownWorkdir = options.workdir is None
    if ownWorkdir:
        options.workdir = tempfile.mkdtemp(prefix="torture-", dir=memoryFolder())
    import aiosmtpd

    import twisted

    if options.commit:
        # A snapshot of the commit, so that edits in the working tree while
        # the run goes on do not change what runs.
        commit = subprocess.run(
            ["git", "-C", REPO, "rev-parse", "--short", options.commit], capture_output=True, text=True, check=True
        ).stdout.strip()
        snapshot = os.path.join(options.workdir, f"infsmtp-{commit}")
        os.makedirs(snapshot, exist_ok=True)
        archive = subprocess.Popen(["git", "-C", REPO, "archive", commit], stdout=subprocess.PIPE)
        subprocess.run(["tar", "-x", "-C", snapshot], stdin=archive.stdout, check=True)
        archive.wait()
        REPO = snapshot
    else:
        commit = subprocess.run(
            ["git", "-C", REPO, "describe", "--always", "--dirty"], capture_output=True, text=True
        ).stdout.strip()
    print(
        f"torture: {os.cpu_count()} cores, Python {sys.version.split()[0]}, Twisted {twisted.__version__}, "
        f"aiosmtpd {aiosmtpd.__version__}, Maildirs in {options.workdir}, "
        f"scale {options.scale:g}, descriptors {hard}, infsmtp from {REPO} {commit}",
        file=sys.stderr,
    )
    if InfsmtpServer in servers:
        known = InfsmtpServer.knownOptions()
        present = [o for o in LANDING_OPTIONS if o in known]
        absent = [o for o in LANDING_OPTIONS if o not in known]
        print(f"infsmtp limits present: {' '.join(present) or 'none'}; missing: {' '.join(absent) or 'none'}", file=sys.stderr)
    rows: list[Row] = []
    idleRates: dict[str, float] = {}
    began = time.monotonic()
    try:
        for scenario in chosen:
            for serverClass in servers:
                started = time.monotonic()
                row = runScenario(scenario, serverClass, options, idleRates)
                if scenario.name == "baseline" and row.normalRate:
                    idleRates[row.server] = row.normalRate
                rows.append(row)
                phases = ", ".join(f"{k} {v:.0f} s" for k, v in row.timings.items())
                print(
                    f"{scenario.name:10} {row.server:9} {time.monotonic() - started:5.0f} s ({phases})  lost {row.lost}  {row.load}",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        if ownWorkdir and not options.keep:
            shutil.rmtree(options.workdir, ignore_errors=True)
    printTable(rows)
    print(f"total {time.monotonic() - began:.0f} s", file=sys.stderr)
    if options.json:
        with open(options.json, "w") as f:
            json.dump(
                [
                    {
                        "scenario": r.scenario.name, "server": r.server, "load": r.load, "rss": r.rss,
                        "fds": r.fds, "client": r.client, "lost": r.lost, "notes": r.notes,
                    }
                    for r in rows
                ],
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()

"""
STARTTLS benchmark: server CPU per message over TLS for Twisted's raw
ESMTP, aiosmtpd and infsmtp (the sinks of C{server.py}, given the same
ECDSA P-256 certificate), driven by C{--clients} processes of Python's
C{ssl} verifying the certificate.  Rounds are interleaved as in
C{server.py}; the figure that matters is server CPU (utime + stime from
C{/proc}) per message, since the generator shares the machine.

    python bench/tls.py                          # 3 rounds, every case
    python bench/tls.py --cases conn,resume --servers infsmtp --profile

Cases: C{conn} (a connection and a full handshake per 1 KiB message),
C{resume} (the same, each connection offering the session of the client's
previous one, as Postfix's smtp client does with its session cache),
C{reuse} (one TLS session per client, 1 KiB messages), C{1m} (1 MiB
messages on one TLS session per client) and C{plain} (C{reuse} without
STARTTLS, the reference for C{reuse}).  C{--profile} runs py-spy on
infsmtp for each case and prints the heaviest own-time lines.

The clients speak SMTP with plain sends and reads (no smtplib), so that
the generator stays light next to the servers.
"""

from __future__ import annotations

import argparse
import collections
import multiprocessing
import os
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from server import Peer, freePort  # noqa: E402


@dataclass
class Case:
    name: str
    messages: int  # per client
    length: int
    tls: bool
    perConnection: bool
    resume: bool = False


CASES = {
    "conn": Case("STARTTLS, a connection per 1 KiB message", 60, 1024, True, True),
    "resume": Case("STARTTLS resuming the last session, a connection per 1 KiB message", 60, 1024, True, True, True),
    "reuse": Case("one TLS session per client, 1 KiB messages", 1000, 1024, True, False),
    "plain": Case("one plaintext connection per client, 1 KiB messages", 1000, 1024, False, False),
    "1m": Case("one TLS session per client, 1 MiB messages", 8, 1024 * 1024, True, False),
}


class Conversation:
    """
    One client connection, speaking just enough SMTP.
    """

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.buffer = b""
        self.expect(b"220")

    def reply(self) -> bytes:
        while True:
            end = self.buffer.find(b"\r\n")
            while end >= 0:
                line, self.buffer = self.buffer[:end], self.buffer[end + 2 :]
                if line[3:4] != b"-":
                    return line
                end = self.buffer.find(b"\r\n")
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            self.buffer += chunk

    def expect(self, code: bytes) -> None:
        line = self.reply()
        if not line.startswith(code):
            raise RuntimeError(f"expected {code!r}, got {line!r}")

    def command(self, line: bytes, code: bytes) -> None:
        self.sock.sendall(line + b"\r\n")
        self.expect(code)

    def starttls(self, context: ssl.SSLContext, session: ssl.SSLSession | None) -> None:
        self.command(b"EHLO client.test", b"250")
        self.command(b"STARTTLS", b"220")
        self.sock = context.wrap_socket(self.sock, server_hostname="localhost", session=session)

    def send(self, message: bytes) -> None:
        # Pipelined, as smtp-source does: MAIL, RCPT, DATA in one write.
        self.sock.sendall(b"MAIL FROM:<a@client.test>\r\nRCPT TO:<b@sink.test>\r\nDATA\r\n")
        self.expect(b"250")
        self.expect(b"250")
        self.expect(b"354")
        self.sock.sendall(message)
        self.expect(b"250")

    def quit(self) -> None:
        self.sock.sendall(b"QUIT\r\n")
        self.expect(b"221")
        self.sock.close()


def message(length: int) -> bytes:
    line = b"X" * 76 + b"\r\n"
    body = line * max(1, length // len(line))
    return b"Subject: bench\r\n\r\n" + body + b".\r\n"


def client(port: int, case: Case, caFile: str, results: multiprocessing.Queue) -> None:
    context = ssl.create_default_context(cafile=caFile)
    data = message(case.length)
    session = None
    resumed = 0
    if case.perConnection:
        for _ in range(case.messages):
            c = Conversation(port)
            c.starttls(context, session if case.resume else None)
            c.command(b"EHLO client.test", b"250")
            c.send(data)
            # Read before QUIT closes it; TLS 1.3 tickets came with the replies.
            resumed += c.sock.session_reused
            session = c.sock.session
            c.quit()
    else:
        c = Conversation(port)
        if case.tls:
            c.starttls(context, None)
        c.command(b"EHLO client.test", b"250")
        for _ in range(case.messages):
            c.send(data)
        c.quit()
    results.put(resumed)


def drive(peer: Peer, case: Case, clients: int, caFile: str) -> tuple[float, float, float]:
    """
    One run: messages per second, server CPU us per message, and the share
    of connections that resumed a session.
    """
    results: multiprocessing.Queue = multiprocessing.Queue()
    workers = [multiprocessing.Process(target=client, args=(peer.port, case, caFile, results)) for _ in range(clients)]
    cpu = peer.cpuSeconds()
    start = time.perf_counter()
    for w in workers:
        w.start()
    resumed = sum(results.get(timeout=600) for _ in workers)
    for w in workers:
        w.join(60)
        if w.exitcode != 0:
            raise RuntimeError(f"a client of {peer.name} failed")
    elapsed = time.perf_counter() - start
    cpu = peer.cpuSeconds() - cpu
    total = case.messages * clients
    return total / elapsed, cpu / total * 1e6, resumed / total


def profile(peer: Peer, case: Case, clients: int, caFile: str) -> None:
    """
    py-spy on the server for one run of C{case}: the heaviest lines by
    own time (native frames included, time idle in epoll left out).
    """
    pyspy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    out = tempfile.mktemp(suffix=".txt")
    spy = subprocess.Popen(
        [pyspy, "record", "-r", "1000", "-p", str(peer.process.pid), "-o", out, "-f", "raw", "--native"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(1)  # py-spy attaches
    drive(peer, case, clients, caFile)
    spy.send_signal(2)
    spy.wait(30)
    own: collections.Counter = collections.Counter()
    under: collections.Counter = collections.Counter()
    total = 0
    with open(out) as f:
        for line in f:
            stack, _, n = line.rstrip().rpartition(" ")
            frames = stack.split(";")
            if "epoll_wait" in frames[-1] or "doPoll (twisted/internet/epollreactor.py:244)" in frames[-1]:
                continue  # idle, waiting for the clients
            total += int(n)
            own[frames[-1]] += int(n)
            for frame in set(frames):
                under[frame.split(" (")[0]] += int(n)
    os.unlink(out)
    print(f"\npy-spy, {peer.name}, {case.name}: {total} samples (native frames included, idle left out); own time:")
    for frame, n in own.most_common(15):
        print(f"  {100 * n / total:5.1f} %  {frame}")
    print("  including callees:")
    for frame, n in under.most_common(25):
        print(f"  {100 * n / total:5.1f} %  {frame}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--servers", default="twisted,aiosmtpd,infsmtp")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply message counts")
    parser.add_argument("--profile", action="store_true", help="py-spy on infsmtp, each case once")
    options = parser.parse_args()
    cases = {k: CASES[k] for k in options.cases.split(",")}
    for case in cases.values():
        case.messages = max(1, int(case.messages * options.scale))
    workdir = tempfile.mkdtemp(prefix="infsmtp-tls-bench-")
    sys.path.insert(0, os.path.dirname(HERE))
    from infsmtp.testing import CertificateAuthority

    authority = CertificateAuthority.create(workdir)
    leaf = authority.issue("localhost", "127.0.0.1")
    python = sys.executable
    env = dict(os.environ, PYTHONPATH=os.path.dirname(HERE))
    running = []
    for name in options.servers.split(","):
        port = freePort()
        sink = {"twisted": "twisted_sink.py", "aiosmtpd": "aiosmtpd_sink.py", "infsmtp": "infsmtp_sink.py"}[name]
        running.append(Peer(name, [python, f"sinks/{sink}", str(port), leaf.certFile, leaf.keyFile], port))
    rates: dict[tuple[str, str], list[float]] = {}
    cpus: dict[tuple[str, str], list[float]] = {}
    reused: dict[tuple[str, str], list[float]] = {}
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = env["PYTHONPATH"]  # the sinks import this checkout's infsmtp
    try:
        for peer in running:
            peer.start()
        if options.profile:
            for peer in running:
                if peer.name == "infsmtp":
                    for case in cases.values():
                        profile(peer, case, options.clients, authority.certFile)
        for round in range(options.rounds):
            for key, case in cases.items():
                for peer in running:
                    rate, cpu, share = drive(peer, case, options.clients, authority.certFile)
                    for table, value in ((rates, rate), (cpus, cpu), (reused, share)):
                        table.setdefault((key, peer.name), []).append(value)
                    print(
                        f"round {round + 1} {key:7} {peer.name:9} {rate:8.0f} msg/s {cpu:7.0f} us CPU/msg"
                        f"  resumed {100 * share:3.0f} %",
                        file=sys.stderr,
                        flush=True,
                    )
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old
        for peer in running:
            peer.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    names = [p.name for p in running]
    others = [n for n in names if n != "infsmtp"] if "infsmtp" in names else []
    print(f"\nserver CPU per message, us (medians of {options.rounds} interleaved rounds, {options.clients} clients)")
    print(f"{'case':8}" + "".join(f"{n:>10}" for n in names) + "".join(f"{'inf/' + n:>14}" for n in others) + "   resumed")
    for key in cases:
        medians = {n: statistics.median(cpus[(key, n)]) for n in names}
        row = f"{key:8}" + "".join(f"{medians[n]:10.0f}" for n in names)
        row += "".join(f"{medians['infsmtp'] / medians[n]:14.2f}" for n in others)
        row += "   " + " ".join(f"{n}:{100 * statistics.median(reused[(key, n)]):.0f}%" for n in names)
        print(row)
    if "infsmtp" in names and "reuse" in cases and "plain" in cases:
        ratio = statistics.median(cpus[("reuse", "infsmtp")]) / statistics.median(cpus[("plain", "infsmtp")])
        print(f"\ninfsmtp TLS records: reuse / plain CPU = {ratio:.2f}")


if __name__ == "__main__":
    main()

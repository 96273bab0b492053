"""
Server benchmark: Postfix's smtp-sink (C), Twisted's raw ESMTP, aiosmtpd and
infsmtp, each accepting and discarding on a loopback port, driven in turn by
Postfix's smtp-source.  Rounds are interleaved (every server once per case
per round) so drift on the machine hits all of them alike; the table gives
medians and the ratios that matter.

    python bench/server.py                 # 3 rounds, every case
    python bench/server.py --rounds 5 --cases 1k-reuse,1m

Needs /usr/sbin/smtp-source and /usr/sbin/smtp-sink (Debian's postfix) and
aiosmtpd in the Python running it.  See bench/README.md.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = "/usr/sbin/smtp-source"
SINK = "/usr/sbin/smtp-sink"


@dataclass
class Case:
    name: str
    sessions: int
    messages: int
    length: int
    reuse: bool

    @property
    def args(self) -> list[str]:
        args = ["-s", str(self.sessions), "-m", str(self.messages), "-l", str(self.length)]
        return args + (["-d"] if self.reuse else [])


CASES = {
    "1k-conn": Case("1 KiB, a connection per message, 20 sessions", 20, 4000, 1024, False),
    "1k-reuse": Case("1 KiB, connections reused, 20 sessions", 20, 10000, 1024, True),
    "1m": Case("1 MiB messages, 4 sessions", 4, 200, 1024 * 1024, True),
    "500": Case("500 sessions, a connection per message", 500, 5000, 1024, False),
}


def freePort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def waitListening(port: int, process: subprocess.Popen, deadline: float = 15) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if process.poll() is not None:
            raise RuntimeError(f"server on {port} exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.recv(100)
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"server on {port} did not listen")


class Peer:
    def __init__(self, name: str, command: list[str], port: int) -> None:
        self.name, self.command, self.port = name, command, port
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            self.command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=HERE
        )
        waitListening(self.port, self.process)

    def cpuSeconds(self) -> float:
        """
        CPU time of the server and its descendants (--workers children).
        """
        stats = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        fields = f.read().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                stats[int(entry)] = (int(fields[1]), int(fields[11]) + int(fields[12]))
        total, todo = 0, [self.process.pid]
        while todo:
            pid = todo.pop()
            total += stats.get(pid, (0, 0))[1]
            todo += [child for child, (parent, _) in stats.items() if parent == pid]
        return total / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()


def twistdInfsmtp(port: int, workers: int, sockets: str = "shared") -> list[str]:
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    return [
        twistd, "-n", "--pidfile=", "--logfile=-", "infsmtp",
        "--listen", f"tcp:{port}:interface=127.0.0.1", "--handlers", "sinks/accept.py",
        "--max-connections", "5000", "--workers", str(workers), "--workers-sockets", sockets,
        # On, but never reached by smtp-source (one client), as in sinks/.
        "--max-connections-per-client", "1000000", "--max-connection-rate", "1000000000",
    ]


def peers(names: list[str]) -> list[Peer]:
    python = sys.executable
    makers = {
        "smtp-sink": lambda p: [SINK, "-u", "nobody", "-m", "1024", f"127.0.0.1:{p}", "1024"]
        if os.geteuid() == 0
        else [SINK, "-m", "1024", f"127.0.0.1:{p}", "1024"],
        "twisted": lambda p: [python, "sinks/twisted_sink.py", str(p)],
        "aiosmtpd": lambda p: [python, "sinks/aiosmtpd_sink.py", str(p)],
        "infsmtp": lambda p: [python, "sinks/infsmtp_sink.py", str(p)],
        # A Twisted protocol doing no SMTP work: the reactor's floor.
        "floor": lambda p: [python, "sinks/floor_sink.py", str(p)],
        # twistd infsmtp with one process, and with --workers 2.
        "twistd-w1": lambda p: twistdInfsmtp(p, 1),
        "twistd-w2": lambda p: twistdInfsmtp(p, 2),
        # --workers 2 with a SO_REUSEPORT socket each.
        "twistd-w2r": lambda p: twistdInfsmtp(p, 2, "reuseport"),
    }
    result = []
    for name in names:
        port = freePort()
        result.append(Peer(name, makers[name](port), port))
    return result


def drive(peer: Peer, case: Case, timeout: float) -> tuple[float, float]:
    """
    One smtp-source run: (messages per second, server CPU us per message).
    """
    cpu = peer.cpuSeconds()
    start = time.perf_counter()
    subprocess.run(
        [SOURCE, *case.args, f"127.0.0.1:{peer.port}"],
        check=True,
        timeout=timeout,
        stdout=subprocess.DEVNULL,
    )
    elapsed = time.perf_counter() - start
    cpu = peer.cpuSeconds() - cpu
    return case.messages / elapsed, cpu / case.messages * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--servers", default="smtp-sink,twisted,aiosmtpd,infsmtp,floor")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply message counts")
    parser.add_argument("--timeout", type=float, default=600)
    options = parser.parse_args()
    cases = {k: CASES[k] for k in options.cases.split(",")}
    for case in cases.values():
        case.messages = max(1, int(case.messages * options.scale))
    running = peers(options.servers.split(","))
    rates: dict[tuple[str, str], list[float]] = {}
    cpus: dict[tuple[str, str], list[float]] = {}
    try:
        for peer in running:
            peer.start()
        for round in range(options.rounds):
            for key, case in cases.items():
                for peer in running:
                    rate, cpu = drive(peer, case, options.timeout)
                    rates.setdefault((key, peer.name), []).append(rate)
                    cpus.setdefault((key, peer.name), []).append(cpu)
                    print(f"round {round + 1} {key:9} {peer.name:10} {rate:9.0f} msg/s  {cpu:6.0f} us CPU/msg", file=sys.stderr, flush=True)
    finally:
        for peer in running:
            peer.stop()
    names = [p.name for p in running]
    print(f"\nmedians of {options.rounds} interleaved rounds, {os.cpu_count()} cores, {sys.version.split()[0]}")
    header = f"{'case':10}" + "".join(f"{n:>12}" for n in names)
    print(header + "".join(f"{'inf/' + n:>14}" for n in names if n != "infsmtp" and "infsmtp" in names))
    for key, case in cases.items():
        medians = {n: statistics.median(rates[(key, n)]) for n in names}
        unit = 1.0
        label = key
        if case.length >= 1024 * 1024:
            unit = case.length / 1e6  # MB/s
            label = key + " MB/s"
        row = f"{label:10}" + "".join(f"{medians[n] * unit:12.0f}" for n in names)
        if "infsmtp" in medians:
            row += "".join(f"{medians['infsmtp'] / medians[n]:14.2f}" for n in names if n != "infsmtp")
        for two in ("twistd-w2", "twistd-w2r"):
            if "twistd-w1" in medians and two in medians:
                row += f"   {two}/w1: {medians[two] / medians['twistd-w1']:.2f}"
        print(row)
    print("\nserver CPU per message (us, median)")
    for key in cases:
        print(f"{key:10}" + "".join(f"{statistics.median(cpus[(key, n)]):12.0f}" for n in names))


if __name__ == "__main__":
    main()

"""
Durable delivery benchmark: a 250 that means "on disk".  Postfix (the real
MTA, Debian's package: smtpd -> cleanup -> a queue file fsync'ed before the
250, every message held, never delivered), C{twistd -n infsmtp --maildir}
(file and directory fsync'ed before the 250) and, for reference, aiosmtpd's
stock C{Mailbox} handler (a Maildir without any fsync), each driven in turn
by Postfix's smtp-source.  Rounds are interleaved as in C{server.py}; the
stores are emptied between runs, outside the timing, so that every run
starts from the same directory sizes.

    python bench/durable.py                       # 3 rounds, every case
    python bench/durable.py --rounds 5 --cases 1m --servers postfix,infsmtp
    python bench/durable.py --servers postfix,infsmtp-base,infsmtp --baseline /tmp/base

(C{infsmtp-base}: the same server from another checkout, e.g. a
C{git archive} of the commit before a change.  C{infsmtp-w2} and
C{infsmtp-w2r}: C{--workers 2}, with the shared socket and with
C{--workers-sockets reuseport}: a process per core, as Postfix runs an
smtpd per session and a cleanup beside them.  C{infsmtp-nosync}: not a
durable server but a ceiling, a file per message written with no fsync
and no thread pool, C{sinks/maildir_nosync.py}.)  The infsmtp measured is
the one of this checkout, whatever the Python running it has installed.

Needs root (Postfix's master drops privileges), Debian's postfix and
aiosmtpd.  The stores live under C{--workdir} (default: the system's
temporary folder, which must be a real disk for the fsyncs to mean
anything).  See bench/README.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(os.path.dirname(HERE), "tests")]

from server import Case, Peer, drive, freePort, waitListening  # noqa: E402

CASES = {
    "1k-conn": Case("1 KiB, a connection per message, 20 sessions", 20, 2000, 1024, False),
    "1k-reuse": Case("1 KiB, connections reused, 20 sessions", 20, 4000, 1024, True),
    "1m": Case("1 MiB messages, 4 sessions", 4, 100, 1024 * 1024, True),
}


class MaildirPeer(Peer):
    """
    A server storing into C{maildir}, emptied by L{clear}.
    """

    def __init__(self, name: str, command: list[str], port: int, maildir: str, root: str) -> None:
        super().__init__(name, command, port)
        self.maildir = maildir
        self.root = root

    def start(self) -> None:
        # The infsmtp of the checkout measured, whatever the venv has.
        env = dict(os.environ, PYTHONPATH=self.root, INFSMTP_BENCH_MAILDIR=self.maildir)
        self.process = subprocess.Popen(
            self.command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=HERE, env=env
        )
        waitListening(self.port, self.process)

    def clear(self) -> None:
        for sub in ("new", "cur", "tmp"):
            folder = os.path.join(self.maildir, sub)
            for entry in os.scandir(folder) if os.path.isdir(folder) else ():
                os.unlink(entry.path)

    def stored(self) -> int:
        return len(os.listdir(os.path.join(self.maildir, "new")))


class PostfixPeer(Peer):
    """
    tests/mailservers.PostfixServer as a benchmark peer: CPU is the master's
    and its children's (smtpd, cleanup, qmgr, ...).
    """

    def __init__(self) -> None:
        super().__init__("postfix", [], 0)
        self.server = None

    def start(self) -> None:
        from mailservers import PostfixServer

        self.server = PostfixServer(
            # As many smtpd as smtp-source has sessions, and no anvil rate
            # limit against one client that connects thousands of times.
            default_process_limit="200",
            smtpd_client_connection_count_limit="0",
            smtpd_client_connection_rate_limit="0",
            smtpd_client_message_rate_limit="0",
        )
        self.port = self.server.port
        with open(self.server.queue / "pid" / "master.pid") as f:
            pid = int(f.read().strip())

        class Master:  # what Peer.cpuSeconds needs of a Popen
            pass

        self.process = Master()  # type: ignore[assignment]
        self.process.pid = pid  # type: ignore[attr-defined]

    def cpuSeconds(self) -> float:
        # smtpd and cleanup processes come and go: what the exited ones
        # used is in the master's children's time once it reaped them.
        with open(f"/proc/{self.process.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        reaped = (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")
        return super().cpuSeconds() + reaped

    def clear(self) -> None:
        self.server.clear()

    def stored(self) -> int:
        hold = self.server.queue / "hold"
        return len(list(hold.iterdir())) if hold.exists() else 0

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()


def makePeers(names: list[str], workdir: str, baseline: str | None) -> list[Peer]:
    python = sys.executable
    twistd = os.path.join(os.path.dirname(python), "twistd")
    result: list[Peer] = []
    for name in names:
        if name == "postfix":
            result.append(PostfixPeer())
            continue
        root = os.path.dirname(HERE)
        if name == "infsmtp-base":
            if baseline is None:
                raise SystemExit("infsmtp-base needs --baseline CHECKOUT")
            root = os.path.abspath(baseline)
        port = freePort()
        maildir = os.path.join(workdir, name)
        os.makedirs(os.path.join(maildir, "tmp"))
        os.makedirs(os.path.join(maildir, "new"))
        os.makedirs(os.path.join(maildir, "cur"))
        command = {
            "infsmtp": twistdMaildir(twistd, port, maildir),
            "infsmtp-base": twistdMaildir(twistd, port, maildir),
            "infsmtp-w2": twistdMaildir(twistd, port, maildir) + ["--workers", "2"],
            "infsmtp-w2r": twistdMaildir(twistd, port, maildir) + ["--workers", "2", "--workers-sockets", "reuseport"],
            # The ceiling of a file per message: no fsync, no thread pool.
            "infsmtp-nosync": twistdMaildir(twistd, port, None) + ["--handlers", "sinks/maildir_nosync.py"],
            "aiosmtpd": [python, "sinks/aiosmtpd_maildir.py", "--port", str(port), "--maildir", maildir],
        }[name]
        result.append(MaildirPeer(name, command, port, maildir, root))
    return result


def twistdMaildir(twistd: str, port: int, maildir: str | None) -> list[str]:
    return [
                twistd, "-n", "--pidfile=", "--logfile=-", "infsmtp",
                "--listen", f"tcp:{port}:interface=127.0.0.1", *(["--maildir", maildir] if maildir else []),
                "--max-connections", "5000",
                "--max-connections-per-client", "1000000", "--max-connection-rate", "1000000000",
            ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--servers", default="aiosmtpd,postfix,infsmtp")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply message counts")
    parser.add_argument("--workdir", default=None, help="where the Maildirs go (a real disk)")
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--baseline", default=None, help="another checkout, measured as the server infsmtp-base")
    options = parser.parse_args()
    cases = {k: CASES[k] for k in options.cases.split(",")}
    for case in cases.values():
        case.messages = max(1, int(case.messages * options.scale))
    workdir = tempfile.mkdtemp(prefix="infsmtp-durable-", dir=options.workdir)
    running = makePeers(options.servers.split(","), workdir, options.baseline)
    rates: dict[tuple[str, str], list[float]] = {}
    cpus: dict[tuple[str, str], list[float]] = {}
    try:
        for peer in running:
            peer.start()
        for round in range(options.rounds):
            # The order turns every round: a server that always ran just
            # after another's thousands of fsyncs (or its own clearing)
            # would carry that disk's backlog in every run.
            order = running[round % len(running) :] + running[: round % len(running)]
            for key, case in cases.items():
                for peer in order:
                    peer.clear()
                    # Outside the timing: the previous run's writes (and
                    # this clearing) must not land on the next server's.
                    os.sync()
                    rate, cpu = drive(peer, case, options.timeout)
                    if peer.stored() != case.messages:
                        # A 4xx or a lost message would flatter the rate.
                        raise SystemExit(f"{peer.name}: {peer.stored()} stored of {case.messages} sent")
                    rates.setdefault((key, peer.name), []).append(rate)
                    cpus.setdefault((key, peer.name), []).append(cpu)
                    print(
                        f"round {round + 1} {key:9} {peer.name:10} {rate:9.0f} msg/s  {cpu:6.0f} us CPU/msg",
                        file=sys.stderr,
                        flush=True,
                    )
    finally:
        for peer in running:
            peer.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    names = [p.name for p in running]
    print(f"\nmedians of {options.rounds} interleaved rounds, {os.cpu_count()} cores, {sys.version.split()[0]}")
    # Every infsmtp variant (infsmtp-w2: --workers 2, ...) over every peer.
    ours = [n for n in names if n.startswith("infsmtp")]
    peers = [n for n in names if not n.startswith("infsmtp")]
    pairs = [(o, p) for o in ours for p in peers]
    width = max([14] + [len(f"{o}/{p}") + 2 for o, p in pairs])
    print(f"{'case':12}" + "".join(f"{n:>13}" for n in names) + "".join(f"{o + '/' + p:>{width}}" for o, p in pairs))
    for key, case in cases.items():
        medians = {n: statistics.median(rates[(key, n)]) for n in names}
        unit, label = 1.0, key
        if case.length >= 1024 * 1024:
            unit, label = case.length / 1e6, key + " MB/s"
        row = f"{label:12}" + "".join(f"{medians[n] * unit:13.0f}" for n in names)
        row += "".join(f"{medians[o] / medians[p]:{width}.2f}" for o, p in pairs)
        print(row)
    print("\nserver CPU per message (us, median)")
    for key in cases:
        print(f"{key:12}" + "".join(f"{statistics.median(cpus[(key, n)]):13.0f}" for n in names))


if __name__ == "__main__":
    main()

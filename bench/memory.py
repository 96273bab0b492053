"""
Memory benchmark.

1. RSS per idle session: open N connections (greeting and EHLO done) to each
   server and divide the RSS growth by N.
2. A 100 MB message through infsmtp (the handler reads session.msgFile):
   peak RSS growth of the server process, and the time for 1 MB vs 50 MB
   messages (linear cost means a ratio near 50).
3. A 100 MB file sent by the blocking Client (sendFile) to smtp-sink: peak
   RSS growth of the client process, and the same time ratio.

    python bench/memory.py [--sessions 1000] [--big 100]
"""

from __future__ import annotations

import argparse
import os
import resource
import smtplib
import socket
import subprocess
import sys
import tempfile
import textwrap
import time

from server import Peer, freePort, peers  # noqa: E402  (bench/ is the cwd's sibling)

HERE_PEERS = ("twisted", "aiosmtpd", "infsmtp")


def raiseFileLimit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def status(peer: Peer, field: str) -> int:
    with open(f"/proc/{peer.process.pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def idleSessions(peer: Peer, count: int) -> float:
    base = status(peer, "VmRSS")
    sockets = []
    try:
        for _ in range(count):
            s = socket.create_connection(("127.0.0.1", peer.port), timeout=30)
            s.recv(1000)
            s.sendall(b"EHLO bench.test\r\n")
            sockets.append(s)
        for s in sockets:
            data = b""
            while not data.endswith(b"\r\n") or b"250 " not in data:
                data += s.recv(4096)
        grown = status(peer, "VmRSS") - base
    finally:
        for s in sockets:
            s.close()
    return grown / count


def sendBig(port: int, size: int) -> float:
    line = b"x" * 76 + b"\r\n"
    body = b"Subject: big\r\n\r\n" + line * (size // len(line))
    start = time.perf_counter()
    with smtplib.SMTP("127.0.0.1", port, timeout=600) as client:
        client.sendmail("a@b.test", ["c@d.test"], body)
    return time.perf_counter() - start


# Runs in a fresh interpreter: its peak RSS is the client's alone.
CLIENT_SCRIPT = textwrap.dedent(
    """
    import resource, sys, time
    from infsmtp import Client

    port, files = int(sys.argv[1]), sys.argv[2:]
    client = Client()
    client.host, client.port, client.timeout = "127.0.0.1", port, 600
    client.connect()
    for name in files:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        start = time.perf_counter()
        client.sendFile(name, "a@b.test", ["c@d.test"])
        elapsed = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(elapsed, after * 1024)
    client.disconnect()
    client.free()
    """
)


def clientBig(port: int, megabytes: list[int]) -> list[tuple[float, int]]:
    """
    (seconds, peak RSS in bytes after it) for each file size, sent in turn
    by the blocking Client on one connection.
    """
    line = b"x" * 76 + b"\r\n"
    with tempfile.TemporaryDirectory() as folder:
        files = []
        for size in megabytes:
            name = os.path.join(folder, f"{size}.eml")
            with open(name, "wb") as f:
                f.write(b"Subject: big\r\n\r\n")
                block = line * ((1 << 20) // len(line))
                for _ in range(size):
                    f.write(block)
            files.append(name)
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        out = subprocess.run(
            [sys.executable, "-c", CLIENT_SCRIPT, str(port), *files],
            check=True, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": root},
        ).stdout
    return [(float(t), int(g)) for t, g in (row.split() for row in out.splitlines())]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--big", type=int, default=100, help="MB for the large message")
    options = parser.parse_args()
    raiseFileLimit()

    print(f"RSS per idle session ({options.sessions} sessions)")
    for peer in peers(list(HERE_PEERS)):
        peer.start()
        try:
            per = idleSessions(peer, options.sessions)
        finally:
            peer.stop()
        print(f"  {peer.name:10} {per / 1024:8.1f} KiB")

    port = freePort()
    peer = Peer("infsmtp-file", [sys.executable, "sinks/infsmtp_file_sink.py", str(port)], port)
    peer.start()
    try:
        base = status(peer, "VmRSS")
        sendBig(port, 1 << 20)  # warm up
        small = min(sendBig(port, 1 << 20) for _ in range(5))
        fifty = min(sendBig(port, 50 << 20) for _ in range(2))
        sendBig(port, options.big << 20)
        peak = status(peer, "VmHWM") - base
    finally:
        peer.stop()
    print(f"{options.big} MB message through infsmtp (msgFile): peak RSS growth {peak / 1e6:.1f} MB")
    print(f"time 50 MB / 1 MB: {fifty / small:.1f} (linear: about 50)")

    [sink] = peers(["smtp-sink"])
    sink.start()
    try:
        # 1 MB to warm up, 1 MB five times, 50 MB twice, then the big one.
        sent = clientBig(sink.port, [1] * 6 + [50, 50, options.big])
    finally:
        sink.stop()
    small = min(t for t, _ in sent[1:6])
    fifty = min(t for t, _ in sent[6:8])
    # Growth of the peak over all the large sends, from before the first.
    peak = sent[-1][1] - sent[5][1]
    print(f"{options.big} MB file through the blocking Client (sendFile): peak RSS growth {peak / 1e6:.1f} MB")
    print(f"time 50 MB / 1 MB: {fifty / small:.1f} (linear: about 50)")


if __name__ == "__main__":
    main()

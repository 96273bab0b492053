"""
Memory benchmark.

1. RSS per idle session: open N connections (greeting and EHLO done) to each
   server and divide the RSS growth by N.
2. A 100 MB message through infsmtp (the handler reads session.msgFile):
   peak RSS growth of the server process, and the time for 1 MB vs 50 MB
   messages (linear cost means a ratio near 50).

    python bench/memory.py [--sessions 1000] [--big 100]
"""

from __future__ import annotations

import argparse
import resource
import smtplib
import socket
import sys
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
        small = min(sendBig(port, 1 << 20) for _ in range(3))
        fifty = sendBig(port, 50 << 20)
        sendBig(port, options.big << 20)
        peak = status(peer, "VmHWM") - base
    finally:
        peer.stop()
    print(f"{options.big} MB message through infsmtp (msgFile): peak RSS growth {peak / 1e6:.1f} MB")
    print(f"time 50 MB / 1 MB: {fifty / small:.1f} (linear: about 50)")


if __name__ == "__main__":
    main()

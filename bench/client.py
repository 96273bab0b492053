"""
Client benchmark against Postfix's smtp-sink (C, accepts and discards):

- one connection: the blocking ``infsmtp.Client`` vs ``smtplib.SMTP``, each
  sending every message in turn;
- the same with ``infsmtp.AsyncClient`` called from the reactor's own
  thread: the difference to ``Client`` is what the blocking facade's
  thread hop (crochet) costs;
- 20 connections: ``infsmtp.AsyncClient`` vs ``aiosmtplib.SMTP``, twenty
  connections at once, each sending its share in turn.

With ``--chunking`` the server is instead the floor sink offering CHUNKING
(``sinks/floor_sink.py --chunking``; smtp-sink does not offer it), and the
contenders are ``Client`` sending with BDAT, ``Client`` with
``chunking=False`` (DATA) and smtplib (DATA), one connection each.

Each measurement runs in a fresh interpreter (so no reactor, event loop or
warm cache is shared); rounds are interleaved (every contender once per
round) so that drift on the machine hits all of them alike.  The table
gives median messages per second and the ratios that matter.

    python bench/client.py                   # 5 rounds, 2000 messages of 1 KiB
    python bench/client.py --rounds 9 --messages 5000 --size 10240
    python bench/client.py --chunking

Needs /usr/sbin/smtp-sink (Debian's postfix) and aiosmtplib.  Not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import socket
import statistics
import subprocess
import sys
import time

SINK = "/usr/sbin/smtp-sink"
SENDER = "bench@example.org"
RECIPIENTS = ["rcpt@example.org"]
CONNECTIONS = 20


def message(size: int) -> bytes:
    head = b"From: bench@example.org\r\nTo: rcpt@example.org\r\nSubject: bench\r\n\r\n"
    line = b"The quick brown fox jumps over the lazy dog, again and again.\r\n"
    body = (line * (size // len(line) + 1))[: max(0, size - len(head) - 2)]
    return head + body + b"\r\n"


# Contenders: each connects to 127.0.0.1:port, sends `warmup` messages, then
# `count` more, and returns the seconds those `count` took.  The warm-up
# keeps cold starts (first connections, caches, the CPU clock) out of the
# figures, for every contender alike.


def runClient(port: int, warmup: int, count: int, data: bytes, chunking: bool = True) -> float:
    from infsmtp import Client

    client = Client(chunking=chunking)
    client.host, client.port = "127.0.0.1", port
    client.connect()
    for _ in range(warmup):
        client.sendStream(io.BytesIO(data), SENDER, RECIPIENTS)
    started = time.perf_counter()
    for _ in range(count):
        client.sendStream(io.BytesIO(data), SENDER, RECIPIENTS)
    elapsed = time.perf_counter() - started
    client.disconnect()
    client.free()
    return elapsed


def runSmtplib(port: int, warmup: int, count: int, data: bytes) -> float:
    import smtplib

    with smtplib.SMTP("127.0.0.1", port) as smtp:
        for _ in range(warmup):
            smtp.sendmail(SENDER, RECIPIENTS, data)
        started = time.perf_counter()
        for _ in range(count):
            smtp.sendmail(SENDER, RECIPIENTS, data)
        return time.perf_counter() - started


def runAsyncClient(port: int, warmup: int, count: int, data: bytes, connections: int = CONNECTIONS) -> float:
    from twisted.internet import defer, reactor

    from infsmtp import AsyncClient

    async def send(client: AsyncClient, share: int) -> None:
        for _ in range(share):
            await client.sendStream(io.BytesIO(data), SENDER, RECIPIENTS)

    async def main() -> float:
        clients = [AsyncClient() for _ in range(connections)]
        for client in clients:
            client.host, client.port = "127.0.0.1", port
        await defer.gatherResults([c.connect() for c in clients], consumeErrors=True)
        await everyone(send(c, n) for c, n in zip(clients, shares(warmup, connections)))
        started = time.perf_counter()
        await everyone(send(c, n) for c, n in zip(clients, shares(count, connections)))
        elapsed = time.perf_counter() - started
        await defer.gatherResults([c.disconnect() for c in clients], consumeErrors=True)
        return elapsed

    def everyone(coroutines) -> defer.Deferred:
        return defer.gatherResults(
            [defer.Deferred.fromCoroutine(c) for c in coroutines], consumeErrors=True
        )

    outcome: list = []
    defer.Deferred.fromCoroutine(main()).addBoth(outcome.append).addBoth(lambda _: reactor.stop())
    reactor.run()
    if hasattr(outcome[0], "raiseException"):
        outcome[0].raiseException()
    return outcome[0]


def runAiosmtplib(port: int, warmup: int, count: int, data: bytes) -> float:
    import aiosmtplib

    async def send(smtp: aiosmtplib.SMTP, share: int) -> None:
        for _ in range(share):
            await smtp.sendmail(SENDER, RECIPIENTS, data)

    async def main() -> float:
        clients = [
            aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False)
            for _ in range(CONNECTIONS)
        ]
        await asyncio.gather(*(c.connect() for c in clients))
        await asyncio.gather(*(send(c, n) for c, n in zip(clients, shares(warmup))))
        started = time.perf_counter()
        await asyncio.gather(*(send(c, n) for c, n in zip(clients, shares(count))))
        elapsed = time.perf_counter() - started
        await asyncio.gather(*(c.quit() for c in clients))
        return elapsed

    return asyncio.run(main())


def shares(count: int, connections: int = CONNECTIONS) -> list[int]:
    return [count // connections + (i < count % connections) for i in range(connections)]


CONTENDERS = {
    "Client": runClient,
    "smtplib": runSmtplib,
    # The same connection and sends as Client, from the reactor's own
    # thread: what the blocking facade's thread hop costs.
    "AsyncClient x1": lambda *a: runAsyncClient(*a, connections=1),
    "AsyncClient x20": runAsyncClient,
    "aiosmtplib x20": runAiosmtplib,
}
CASES = {
    "one connection": ("Client", "smtplib"),
    "one connection, no thread hop": ("AsyncClient x1", "smtplib"),
    "20 connections": ("AsyncClient x20", "aiosmtplib x20"),
}

# --chunking: against a server that offers CHUNKING.
CHUNKING_CONTENDERS = {
    "Client": runClient,
    "Client DATA": lambda *a: runClient(*a, chunking=False),
    "smtplib": runSmtplib,
    # BDAT from the reactor's own thread: Client without its thread hop,
    # the ceiling of a blocking facade over AsyncClient.
    "AsyncClient BDAT x1": lambda *a: runAsyncClient(*a, connections=1),
}
CHUNKING_CASES = {
    "one connection, BDAT": ("Client", "smtplib"),
    "one connection, DATA": ("Client DATA", "smtplib"),
    "BDAT against DATA": ("Client", "Client DATA"),
    "one connection, BDAT, no thread hop": ("AsyncClient BDAT x1", "smtplib"),
}
ALL_CONTENDERS = {**CONTENDERS, **CHUNKING_CONTENDERS}


def worker(name: str, port: int, count: int, size: int) -> None:
    print(ALL_CONTENDERS[name](port, count // 5, count, message(size)))


def pinTo(cpus: set[int]):
    """
    A preexec_fn pinning a child to ``cpus``: with the sink on one CPU and
    the clients on the others, the scheduler cannot put them together in one
    run and apart in the next, which on a small VM changes loopback round
    trips several-fold.
    """
    if len(os.sched_getaffinity(0)) < 2:
        return None
    return lambda: os.sched_setaffinity(0, cpus)


CPUS = sorted(os.sched_getaffinity(0))
SINK_CPUS, CLIENT_CPUS = {CPUS[0]}, set(CPUS[1:]) or {CPUS[0]}


def measure(name: str, port: int, count: int, size: int) -> float:
    out = subprocess.run(
        [
            sys.executable,
            os.path.abspath(__file__),
            "--worker", name,
            "--port", str(port),
            "--messages", str(count),
            "--size", str(size),
        ],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))},
        preexec_fn=pinTo(CLIENT_CPUS),
    ).stdout
    return count / float(out.split()[-1])


def startSink(chunking: bool = False) -> tuple[subprocess.Popen, int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    if chunking:
        floor = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sinks", "floor_sink.py")
        command = [sys.executable, floor, str(port), "--chunking"]
    else:
        command = [SINK, "-m", "1000", "127.0.0.1:%d" % port, "1000"]
        if os.getuid() == 0:
            command[1:1] = ["-u", "nobody"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, preexec_fn=pinTo(SINK_CPUS))
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return process, port
        except OSError:
            # Another program's readiness: nothing to wait on but its port.
            if time.monotonic() > deadline or process.poll() is not None:
                raise SystemExit(f"{command[0]} did not start") from None
            time.sleep(0.02)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--size", type=int, default=1024, help="message size in bytes")
    parser.add_argument("--chunking", action="store_true", help="against a sink offering CHUNKING")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.worker:
        worker(options.worker, options.port, options.messages, options.size)
        return

    contenders, cases = (CHUNKING_CONTENDERS, CHUNKING_CASES) if options.chunking else (CONTENDERS, CASES)
    sink, port = startSink(options.chunking)
    rates: dict[str, list[float]] = {name: [] for name in contenders}
    try:
        for round in range(options.rounds):
            for name in contenders:
                rates[name].append(measure(name, port, options.messages, options.size))
            print(f"round {round + 1}/{options.rounds} done", file=sys.stderr)
    finally:
        sink.terminate()
        sink.wait()

    server = "the floor sink with CHUNKING" if options.chunking else "smtp-sink"
    print(f"{options.messages} messages of {options.size} bytes to {server}, "
          f"medians of {options.rounds} interleaved rounds")
    print(f"{'contender':<18}{'msg/s':>10}")
    median = {name: statistics.median(r) for name, r in rates.items()}
    for name, value in median.items():
        print(f"{name:<18}{value:>10.0f}")
    for case, (ours, theirs) in cases.items():
        print(f"{case}: {ours} / {theirs} = {median[ours] / median[theirs]:.2f}x")


if __name__ == "__main__":
    main()

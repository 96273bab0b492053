"""
The protocols' own Python, without sockets: infsmtp's server protocol and
Twisted's raw ESMTP, each fed the dialogue smtp-source sends over a
``StringTransport``, in two cases:

- ``reuse``: one connection, MAIL / RCPT / DATA / body per message;
- ``conn``: a connection per message (connect, greeting, EHLO, the message,
  QUIT, connection lost).

``--pending N`` keeps N other timers in the reactor's heap, as N open
sessions would (each has an idle timeout), and lets the reactor move new
timers into it after every connection, as its loop does.  That is how the
linear search Twisted makes to move a timer *sooner* was found (see
bench/README.md): a connection cost 104 us with 500 pending against 61 with
20.

    python bench/protocol.py                 # both cases, 20 pending timers
    python bench/protocol.py --pending 500 --messages 20000
    python bench/protocol.py --profile conn  # cProfile of infsmtp, one case

Figures are microseconds per message, the best of --repeat runs.  They
leave out the kernel and the reactor's dispatch, which bench/server.py
includes.  Not a test.
"""

from __future__ import annotations

import argparse
import cProfile
import inspect
import os
import pstats
import sys
import time

from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "sinks"))

PEER = IPv4Address("TCP", "127.0.0.1", 40000)
HOST = IPv4Address("TCP", "127.0.0.1", 25)
BODY = (
    b"From: <bench@example.org>\r\nTo: <rcpt@example.org>\r\nSubject: bench\r\n\r\n"
    + b"The quick brown fox jumps over the lazy dog, again and again.\r\n" * 15
    + b".\r\n"
)
MESSAGE = [b"MAIL FROM:<bench@example.org>\r\n", b"RCPT TO:<rcpt@example.org>\r\n", b"DATA\r\n", BODY]


def infsmtpFactory():
    from infsmtp import Server

    # The per-client limits on, as in a real deployment, but set so high
    # that one loopback client is never refused: their bookkeeping counts.
    limits = {"maxConnectionsPerClient": 1_000_000, "maxConnectionRate": 1_000_000_000}
    if "maxConnectionRate" not in inspect.signature(Server).parameters:
        limits = {}  # an older infsmtp, measured for a before/after
    server = Server(port=0, interface="127.0.0.1", hostname="sink.test", **limits)
    server.onReceive = lambda session: True
    return server.buildFactory()


def twistedFactory():
    from twisted_sink import Factory

    return Factory()


def connect(factory):
    protocol = factory.buildProtocol(PEER)
    transport = StringTransport(peerAddress=PEER, hostAddress=HOST)
    protocol.makeConnection(transport)
    protocol.dataReceived(b"EHLO bench.test\r\n")
    return protocol, transport


def runReuse(factory, count: int) -> float:
    protocol, transport = connect(factory)
    started = time.perf_counter()
    for _ in range(count):
        for data in MESSAGE:
            protocol.dataReceived(data)
        transport.clear()
    return time.perf_counter() - started


def runConn(factory, count: int) -> float:
    done = Failure(ConnectionDone())
    started = time.perf_counter()
    for _ in range(count):
        protocol, transport = connect(factory)
        for data in MESSAGE:
            protocol.dataReceived(data)
        protocol.dataReceived(b"QUIT\r\n")
        protocol.connectionLost(done)
        # What every reactor iteration does: new timers join the heap.
        reactor.runUntilCurrent()
    return time.perf_counter() - started


CASES = {"reuse": runReuse, "conn": runConn}
SERVERS = {"infsmtp": infsmtpFactory, "twisted": twistedFactory}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=10000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--pending", type=int, default=20, help="other sessions' timers in the heap")
    parser.add_argument("--profile", choices=sorted(CASES), help="cProfile infsmtp in this case instead")
    parser.add_argument("--once", choices=sorted(CASES),
                        help="run infsmtp in this case once, untimed (for valgrind, see bench/README.md)")
    options = parser.parse_args()

    # Timers far in the future, like other sessions' idle timeouts.
    for i in range(options.pending):
        reactor.callLater(3600 + i / 1000, lambda: None)
    reactor.runUntilCurrent()

    if options.once:
        factory = infsmtpFactory()
        if options.messages:
            CASES[options.once](factory, options.messages)
        return

    if options.profile:
        factory = infsmtpFactory()
        CASES[options.profile](factory, options.messages // 10)
        profiler = cProfile.Profile()
        profiler.runcall(CASES[options.profile], factory, options.messages)
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
        return

    print(f"us per message over StringTransport, best of {options.repeat}, "
          f"{options.pending} other timers pending")
    print(f"{'case':<8}" + "".join(f"{name:>10}" for name in SERVERS) + f"{'ratio':>10}")
    for case, run in CASES.items():
        figures = []
        for makeFactory in SERVERS.values():
            factory = makeFactory()
            run(factory, options.messages // 10)  # warm-up
            best = min(run(factory, options.messages) for _ in range(options.repeat))
            figures.append(best / options.messages * 1e6)
        print(f"{case:<8}" + "".join(f"{f:>10.1f}" for f in figures) + f"{figures[1] / figures[0]:>9.2f}x")


if __name__ == "__main__":
    main()

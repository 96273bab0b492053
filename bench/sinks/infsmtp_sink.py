"""
infsmtp on its full path: a Session per connection and an onReceive
callable that accepts every message.

    python infsmtp_sink.py PORT
"""

import sys

from twisted.internet import reactor

from infsmtp import Server

# The per-client limits stay on (their bookkeeping is part of the path) but
# so high that smtp-source, one client on loopback, is never refused.
server = Server(
    port=int(sys.argv[1]),
    interface="127.0.0.1",
    hostname="sink.test",
    maxConnections=5000,
    maxConnectionsPerClient=1_000_000,
    maxConnectionRate=1_000_000_000,
)
server.onReceive = lambda session: True


def ready(_):
    print("ready", flush=True)


reactor.callWhenRunning(lambda: server.startListening().addCallback(ready))
reactor.run()

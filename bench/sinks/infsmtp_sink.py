"""
infsmtp on its full path: a Session per connection and an onReceive
callable that accepts every message.

    python infsmtp_sink.py PORT [CERT KEY]

With CERT and KEY (PEM), STARTTLS is offered (bench/tls.py).
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
    ssl=len(sys.argv) > 3,
    maxConnectionsPerClient=1_000_000,
    maxConnectionRate=1_000_000_000,
)
server.onReceive = lambda session: True
if len(sys.argv) > 3:
    server.setCertificate(sys.argv[2], sys.argv[3])


def ready(_):
    print("ready", flush=True)


reactor.callWhenRunning(lambda: server.startListening().addCallback(ready))
reactor.run()

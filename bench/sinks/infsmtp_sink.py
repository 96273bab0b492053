"""
infsmtp on its full path: a Session per connection and an onReceive
callable that accepts every message.

    python infsmtp_sink.py PORT
"""

import sys

from twisted.internet import reactor

from infsmtp import Server

server = Server(port=int(sys.argv[1]), interface="127.0.0.1", hostname="sink.test", maxConnections=5000)
server.onReceive = lambda session: True


def ready(_):
    print("ready", flush=True)


reactor.callWhenRunning(lambda: server.startListening().addCallback(ready))
reactor.run()

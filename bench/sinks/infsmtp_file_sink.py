"""
infsmtp with an onReceive that reads the message through session.msgFile in
1 MiB pieces (hashing it), as a handler that stores or forwards a large
message would: the message never has to be in memory whole.

    python infsmtp_file_sink.py PORT
"""

import hashlib
import sys

from twisted.internet import reactor

from infsmtp import Server

server = Server(
    port=int(sys.argv[1]), interface="127.0.0.1", hostname="sink.test", maxMessageSize=0, maxConnections=5000
)


def onReceive(session):
    digest = hashlib.sha256()
    f = session.msgFile
    while piece := f.read(1 << 20):
        digest.update(piece)
    return True


server.onReceive = onReceive
reactor.callWhenRunning(lambda: server.startListening().addCallback(lambda _: print("ready", flush=True)))
reactor.run()

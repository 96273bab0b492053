"""
Twisted's own ESMTP server accepting and discarding every message (what
infsmtp is built on).

    python twisted_sink.py PORT
"""

import sys

from twisted.internet import defer, reactor
from twisted.mail import smtp
from zope.interface import implementer


@implementer(smtp.IMessage)
class Discard:
    def lineReceived(self, line):
        pass

    def eomReceived(self):
        return defer.succeed(None)

    def connectionLost(self):
        pass


@implementer(smtp.IMessageDelivery)
class Delivery:
    def receivedHeader(self, helo, origin, recipients):
        return b"Received: from sink"

    def validateFrom(self, helo, origin):
        return origin

    def validateTo(self, user):
        return Discard


class Factory(smtp.SMTPFactory):
    protocol = smtp.ESMTP

    def buildProtocol(self, addr):
        p = smtp.SMTPFactory.buildProtocol(self, addr)
        p.delivery = Delivery()
        return p


if __name__ == "__main__":
    reactor.listenTCP(int(sys.argv[1]), Factory(), backlog=1024, interface="127.0.0.1")
    reactor.callWhenRunning(print, "ready", flush=True)
    reactor.run()

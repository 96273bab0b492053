"""
Twisted's own ESMTP server accepting and discarding every message (what
infsmtp is built on).

    python twisted_sink.py PORT [CERT KEY]

With CERT and KEY (PEM), STARTTLS is offered (bench/tls.py) with
Twisted's default CertificateOptions.
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
    tlsOptions = None

    def buildProtocol(self, addr):
        p = smtp.SMTPFactory.buildProtocol(self, addr)
        p.delivery = Delivery()
        p.ctx = self.tlsOptions
        return p


if __name__ == "__main__":
    factory = Factory()
    if len(sys.argv) > 3:
        from twisted.internet import ssl

        with open(sys.argv[2]) as cert, open(sys.argv[3]) as key:
            factory.tlsOptions = ssl.PrivateCertificate.loadPEM(cert.read() + key.read()).options()
    reactor.listenTCP(int(sys.argv[1]), factory, backlog=1024, interface="127.0.0.1")
    reactor.callWhenRunning(print, "ready", flush=True)
    reactor.run()

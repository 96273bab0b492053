# Policy in handlers that return Deferreds, as lookups in a database or a
# directory would: a sender allow-list and greylisting.  Accepted mail goes
# to ./Maildir.
#
#     twistd -ny tac/policy.tac
#
# INFSMTP_ALLOWED_DOMAINS (comma-separated sender domains) and
# INFSMTP_GREYLIST_DELAY (seconds before a retry passes) tune it.

import os

from twisted.application import service
from twisted.internet import reactor, task

from infsmtp import MaildirDelivery, Server, SMTPError

ALLOWED_DOMAINS = set(os.environ.get("INFSMTP_ALLOWED_DOMAINS", "example.org,example.com").split(","))


def onMailFrom(session):
    """
    Senders from the allowed domains only (False: 550).  The null sender is
    let through: bounces must be accepted (RFC 5321 4.5.5).
    """
    domain = session.address.rpartition("@")[2].lower()
    # deferLater stands in for an asynchronous directory lookup.
    return task.deferLater(reactor, 0, lambda: session.address == "" or domain in ALLOWED_DOMAINS)


class Greylist:
    """
    The first attempt for a (client address, sender, recipient) triplet is
    answered 451; the sender's retry after C{delay} seconds passes.  Real
    senders retry; most spam software does not.  (A real one keeps the
    triplets in a database and forgets old ones.)
    """

    def __init__(self, delay, clock=reactor):
        self.delay = delay
        self.clock = clock
        self.firstSeen = {}

    def onRcptTo(self, session):
        triplet = (session.ip, session.mailFrom, session.address)
        # deferLater stands in for an asynchronous database query.
        return task.deferLater(self.clock, 0, self._decide, triplet)

    def _decide(self, triplet):
        now = self.clock.seconds()
        first = self.firstSeen.get(triplet)
        if first is None:
            self.firstSeen[triplet] = now
            raise SMTPError(451, "4.7.1 Greylisted, please try again later")
        if now - first < self.delay:
            raise SMTPError(451, "4.7.1 Greylisted, please try again later")
        return True


application = service.Application("infsmtp-policy")

server = Server(endpoint=os.environ.get("INFSMTP_LISTEN", "tcp:2525:interface=127.0.0.1"))
server.onMailFrom = onMailFrom
server.onRcptTo = Greylist(float(os.environ.get("INFSMTP_GREYLIST_DELAY", "60"))).onRcptTo
server.onReceive = MaildirDelivery(os.environ.get("INFSMTP_MAILDIR", "Maildir"))
server.setServiceParent(application)

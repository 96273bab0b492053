# The server `twistd -n infsmtp` runs, built by hand: accept every message
# and store it in ./Maildir, one log line per message.
#
#     twistd -ny tac/maildir.tac
#
# INFSMTP_LISTEN (an endpoint string) and INFSMTP_MAILDIR change where it
# listens and stores.

import os

from twisted.application import service

from infsmtp import MaildirDelivery, Server

application = service.Application("infsmtp-maildir")

server = Server(endpoint=os.environ.get("INFSMTP_LISTEN", "tcp:2525:interface=127.0.0.1"))
server.onReceive = MaildirDelivery(os.environ.get("INFSMTP_MAILDIR", "Maildir"))
server.setServiceParent(application)

# Receive, then forward every message to a smarthost with RelayDelivery (built
# on ClientPool: at most INFSMTP_SMARTHOST_CONNECTIONS sessions, default 4,
# each reused for message after message): the client gets its 250 only once
# the smarthost has taken the message.
#
#     INFSMTP_SMARTHOST=smtp.example.org:587 twistd -ny tac/relay.tac
#
# INFSMTP_SMARTHOST_TLS is an EncryptMode name: startTls (the default),
# sslTls or none.  INFSMTP_SMARTHOST_TIMEOUT: seconds for the smarthost's
# reply to the end of a message (default 240, under the server's
# receiveTimeout of 300: past it the client would get 451 and retry while
# the smarthost may still take the message).
#
# The smarthost's permanent refusals stay permanent (554, or 550 when every
# recipient was refused) so the sender bounces; temporary ones and failures
# to reach it are answered 451, so the sender retries.  Every failure is
# logged with the step that failed.  `twistd infsmtp --relay HOST:PORT` does
# the same with more options.

import os

from twisted.application import service
from twisted.internet import reactor

from infsmtp import EncryptMode, RelayDelivery, Server

host, _, port = os.environ.get("INFSMTP_SMARTHOST", "localhost:25").rpartition(":")
encryptMode = EncryptMode[os.environ.get("INFSMTP_SMARTHOST_TLS", "startTls")]
dataTimeout = float(os.environ.get("INFSMTP_SMARTHOST_TIMEOUT", "240"))
connections = int(os.environ.get("INFSMTP_SMARTHOST_CONNECTIONS", "4"))

application = service.Application("infsmtp-relay")

server = Server(endpoint=os.environ.get("INFSMTP_LISTEN", "tcp:2525:interface=127.0.0.1"), receiveTimeout=300)
relay = RelayDelivery(
    host, int(port), encryptMode=encryptMode, dataTimeout=round(dataTimeout * 1000), maxConnections=connections
)
server.onReceive = relay
server.setServiceParent(application)
# Say QUIT to the smarthost when stopping (messages being forwarded finish first).
reactor.addSystemEventTrigger("before", "shutdown", relay.close)

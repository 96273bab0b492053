# Receive, then forward every message to a smarthost with AsyncClient; the
# client gets its 250 only once the smarthost has taken the message.
#
#     INFSMTP_SMARTHOST=smtp.example.org:587 twistd -ny tac/relay.tac
#
# INFSMTP_SMARTHOST_TLS is an EncryptMode name: startTls (the default),
# sslTls or none.  `twistd infsmtp --relay HOST:PORT` does the same with
# logging and more options (infsmtp._relay.RelayDelivery).

import io
import os

from twisted.application import service

from infsmtp import AsyncClient, EncryptMode, Server, SMTPError

host, _, port = os.environ.get("INFSMTP_SMARTHOST", "localhost:25").rpartition(":")
encryptMode = EncryptMode[os.environ.get("INFSMTP_SMARTHOST_TLS", "startTls")]


async def onReceive(session):
    client = AsyncClient()
    client.host, client.port, client.encryptMode = host, int(port), encryptMode
    try:
        await client.connect()
        await client.sendStream(io.BytesIO(session.msg), session.mailFrom, session.rcptTo)
        await client.disconnect()
    except SMTPError as e:
        # A permanent refusal bounces at once; anything else (the smarthost
        # is down, busy, ...) is answered 451, and the sender retries.
        if e.code is not None and 500 <= e.code < 600:
            raise SMTPError(554, f"Refused by the smarthost: {e.text}") from None
        raise SMTPError(451, "Cannot forward the message now, try again later") from None
    finally:
        await client.free()


application = service.Application("infsmtp-relay")

server = Server(endpoint=os.environ.get("INFSMTP_LISTEN", "tcp:2525:interface=127.0.0.1"))
server.onReceive = onReceive
server.setServiceParent(application)

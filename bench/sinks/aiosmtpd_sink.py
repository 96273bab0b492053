"""
aiosmtpd accepting and discarding every message (the peer to beat).

    python aiosmtpd_sink.py PORT [CERT KEY]

With CERT and KEY (PEM), STARTTLS is offered (bench/tls.py).
"""

import asyncio
import sys

from aiosmtpd.smtp import SMTP


class Accept:
    async def handle_DATA(self, server, session, envelope):
        return "250 OK"


async def main(port: int) -> None:
    loop = asyncio.get_running_loop()
    tls = {}
    if len(sys.argv) > 3:
        import ssl

        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(sys.argv[2], sys.argv[3])
        tls = {"tls_context": context}
    server = await loop.create_server(
        lambda: SMTP(Accept(), hostname="sink.test", **tls), "127.0.0.1", port, backlog=1024
    )
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


asyncio.run(main(int(sys.argv[1])))

"""
aiosmtpd accepting and discarding every message (the peer to beat).

    python aiosmtpd_sink.py PORT
"""

import asyncio
import sys

from aiosmtpd.smtp import SMTP


class Accept:
    async def handle_DATA(self, server, session, envelope):
        return "250 OK"


async def main(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(Accept(), hostname="sink.test"), "127.0.0.1", port, backlog=1024
    )
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


asyncio.run(main(int(sys.argv[1])))

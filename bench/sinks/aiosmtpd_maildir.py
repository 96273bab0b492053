"""
aiosmtpd storing every message in a Maildir with its stock ``Mailbox``
handler: the peer that ``bench/torture.py`` sets beside ``twistd infsmtp``.

    python aiosmtpd_maildir.py --port PORT --maildir DIR [--auth USER:PASSWORD] [--timeout S]

Everything is aiosmtpd's default except what the comparison needs: a
listen backlog of 1024 (as infsmtp's), AUTH over plain TCP when ``--auth``
is given (loopback only), and the idle timeout when ``--timeout`` is.
SIGTERM is left to Python's default (the process dies at once), as with
``python -m aiosmtpd``.
"""

import argparse
import asyncio

from aiosmtpd.handlers import Mailbox
from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword


def authenticator(user: bytes, password: bytes):
    def check(server, session, envelope, mechanism, data):
        ok = isinstance(data, LoginPassword) and (data.login, data.password) == (user, password)
        return AuthResult(success=ok, handled=False)

    return check


async def main(options: argparse.Namespace) -> None:
    handler = Mailbox(options.maildir)
    extra = {}
    if options.auth:
        user, _, password = options.auth.partition(":")
        extra = {"authenticator": authenticator(user.encode(), password.encode()), "auth_require_tls": False}
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(handler, hostname="torture.test", timeout=options.timeout, **extra),
        "127.0.0.1",
        options.port,
        backlog=1024,
    )
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--maildir", required=True)
    parser.add_argument("--auth", default=None)
    parser.add_argument("--timeout", type=float, default=300)
    asyncio.run(main(parser.parse_args()))

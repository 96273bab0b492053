"""
C{python -m infsmtp}: a development sink.  It accepts every message and
prints it (envelope, headers, readable body) instead of delivering it, so
that an application under development can be pointed at it::

    python -m infsmtp                  # 127.0.0.1:8025, plaintext
    python -m infsmtp --port 2525 --tls

Any AUTH login is accepted (and shown), so an application configured with
credentials works unchanged.  C{--tls} offers STARTTLS and C{--implicit-tls}
speaks TLS from the first byte (SMTPS), both with a certificate for
localhost and 127.0.0.1 from a throwaway CA made at startup; the banner
says where the CA's certificate is, for an application that verifies.
Ctrl-C stops it.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from typing import Any, Sequence

DESCRIPTION = "A development SMTP sink: accept every message and print it instead of delivering it."


def parseArguments(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m infsmtp", description=DESCRIPTION)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on [default: %(default)s]")
    parser.add_argument("--port", type=int, default=8025, help="port to listen on; 0 picks a free one [default: %(default)s]")
    tls = parser.add_mutually_exclusive_group()
    tls.add_argument("--tls", action="store_true", help="offer STARTTLS, with a throwaway certificate")
    tls.add_argument("--implicit-tls", action="store_true", help="TLS from the first byte (SMTPS), with a throwaway certificate")
    parser.add_argument(
        "--max-message-size", type=int, default=32 * 1024 * 1024, help="largest message accepted, in bytes [default: %(default)s]"
    )
    arguments = parser.parse_args(argv)
    if not 0 <= arguments.port <= 65535:
        parser.error(f"--port {arguments.port}: not a port number")
    return arguments


def buildSink(arguments: argparse.Namespace, stream: Any = None) -> tuple[Any, str | None]:
    """
    The sink's L{Server} (not listening yet) and the folder holding its
    throwaway CA (L{None} without TLS).
    """
    from ._daemon.printer import PrintDelivery
    from ._server.server import Server
    from .testing._certificates import CertificateAuthority

    secure = arguments.tls or arguments.implicit_tls
    server = Server(
        ssl=secure,
        implicitTls=arguments.implicit_tls,
        port=arguments.port,
        interface=arguments.host,
        hostname="localhost",
        maxMessageSize=arguments.max_message_size,
        # What the application sent, as it sent it.
        receivedHeader=False,
        allowInsecureAuth=True,
        # A developer's application may send in bursts from one address.
        maxConnectionsPerClient=0,
        maxConnectionRate=0,
        maxAuthFailuresPerClient=0,
        authFailureDelay=0,
        shutdownGrace=0,
    )
    folder = None
    if secure:
        folder = tempfile.mkdtemp(prefix="infsmtp-sink-")
        authority = CertificateAuthority.create(folder)
        leaf = authority.issue("localhost", "127.0.0.1")
        server.setCertificate(leaf.certFile, leaf.keyFile)
    server.onLogin = lambda session: True
    server.onReceive = PrintDelivery(stream)
    return server, folder


def main(argv: Sequence[str] | None = None) -> int:
    arguments = parseArguments(argv)
    from twisted.internet import reactor
    from twisted.logger import (
        FilteringLogObserver,
        LogLevel,
        LogLevelFilterPredicate,
        globalLogBeginner,
        textFileLogObserver,
    )

    from ._errors import SMTPError

    # Warnings and errors (a client cut off, a message refused) on standard
    # error; the messages themselves go to standard output.
    globalLogBeginner.beginLoggingTo(
        [FilteringLogObserver(textFileLogObserver(sys.stderr), [LogLevelFilterPredicate(LogLevel.warn)])],
        redirectStandardIO=False,
    )
    server, folder = buildSink(arguments)
    outcome: list[Any] = []
    server.startListening().addBoth(outcome.append)
    try:
        if outcome and not isinstance(outcome[0], int):
            error = outcome[0].value
            text = str(error) if isinstance(error, SMTPError) else repr(error)
            sys.stderr.write(f"python -m infsmtp: error: {text}\n")
            return 1
        mode = "STARTTLS" if arguments.tls else ("implicit TLS" if arguments.implicit_tls else "plaintext")
        banner = f"infsmtp sink listening on {arguments.host}:{server.port} ({mode}); Ctrl-C to stop"
        if folder is not None:
            banner += f"\nCA certificate (for clients that verify): {folder}/ca.pem"
        print(banner, flush=True)
        reactor.run()  # type: ignore[attr-defined]
        return 0
    finally:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

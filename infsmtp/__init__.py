"""
infsmtp: an ESMTP server whose policy lives in handler callbacks, a twistd
plugin that runs it, and an SMTP client with a Deferred API and a blocking
facade.  A port of the ``infinity.smtp`` module, the Twisted way.

This module only re-exports the public names; the machinery lives in the
private modules beside it.  The names are imported on first use (PEP 562):
``import infsmtp`` alone imports no Twisted module, so it installs no
reactor.  That matters to the pytest plugin in L{infsmtp.testing}, which
pytest imports at startup in every project that has infsmtp installed,
before pytest-twisted (or the program) chooses its reactor.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._lazy import lazyNames

__version__ = "0.1.0"

#: Public name -> the private module defining it.
_PUBLIC = {
    "AuthMode": "_enums",
    "EncryptMode": "_enums",
    "TLSVersion": "_enums",
    "AsyncClient": "_client.client",
    "Client": "_client.client",
    "sendmail": "_client.client",
    "ClientPool": "_client.pool",
    "BlockingClientPool": "_client.pool",
    "Server": "_server.server",
    "Session": "_server.session",
    "MaildirDelivery": "_daemon.maildir",
    "RelayDelivery": "_daemon.relay",
    "LMTPDelivery": "_daemon.relay",
    "SMTPError": "_errors",
    "SMTPConnectError": "_errors",
    "SMTPTimeoutError": "_errors",
    "SMTPTLSError": "_errors",
    "SMTPAuthenticationError": "_errors",
    "SMTPProtocolError": "_errors",
    "SMTPRecipientsRefused": "_errors",
}

__all__ = list(_PUBLIC)


__getattr__, __dir__ = lazyNames(__name__, _PUBLIC, globals())


if TYPE_CHECKING:
    from ._client.client import AsyncClient, Client, sendmail
    from ._client.pool import BlockingClientPool, ClientPool
    from ._daemon.maildir import MaildirDelivery
    from ._daemon.relay import LMTPDelivery, RelayDelivery
    from ._enums import AuthMode, EncryptMode, TLSVersion
    from ._errors import (
        SMTPAuthenticationError,
        SMTPConnectError,
        SMTPError,
        SMTPProtocolError,
        SMTPRecipientsRefused,
        SMTPTimeoutError,
        SMTPTLSError,
    )
    from ._server.server import Server
    from ._server.session import Session

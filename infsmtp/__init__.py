"""
infsmtp: an ESMTP server whose policy lives in handler callbacks, a twistd
plugin that runs it, and an SMTP client with a Deferred API and a blocking
facade.  A port of the ``infinity.smtp`` module, the Twisted way.

This module only re-exports the public names; the machinery lives in the
private modules beside it.
"""

from ._client import AsyncClient, Client, sendmail
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
from ._maildir import MaildirDelivery
from ._pool import BlockingClientPool, ClientPool
from ._relay import RelayDelivery
from ._server import Server
from ._session import Session

__version__ = "0.1.0"

__all__ = [
    "AuthMode",
    "EncryptMode",
    "TLSVersion",
    "AsyncClient",
    "Client",
    "sendmail",
    "ClientPool",
    "BlockingClientPool",
    "Server",
    "Session",
    "MaildirDelivery",
    "RelayDelivery",
    "SMTPError",
    "SMTPConnectError",
    "SMTPTimeoutError",
    "SMTPTLSError",
    "SMTPAuthenticationError",
    "SMTPProtocolError",
    "SMTPRecipientsRefused",
]

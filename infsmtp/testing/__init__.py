"""
A testing kit for code that sends mail and for server handlers.

- L{RecordingServer}: a real L{infsmtp.Server} on a loopback port that
  keeps what it receives (L{ReceivedMessage}: an C{EmailMessage} with its
  envelope) and fails on purpose when told to; the pytest fixture C{smtpd}
  (C{infsmtp.testing.pytest_plugin}, registered as the C{infsmtp} plugin)
  is one of these.
- L{ServerHarness} and L{makeSession}: a handler's policy tested without
  sockets, through the real protocol over an in-memory transport, or by
  calling the handler with a L{Session} made to order.
- L{CertificateAuthority}: throwaway certificates for TLS tests.

See docs/TESTING-KIT.rst.  Names are imported on first use, so that pytest
loading the plugin imports neither Twisted nor ``cryptography``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazyNames

_PUBLIC = {
    "CertificateAuthority": "_certificates",
    "IssuedCertificate": "_certificates",
    "ServerHarness": "_harness",
    "MemoryTransport": "_harness",
    "DetachedSession": "_harness",
    "makeSession": "_harness",
    "RecordingServer": "_recording",
    "ReceivedMessage": "_recording",
    "MessageWaitTimeout": "_recording",
}

__all__ = list(_PUBLIC)


__getattr__, __dir__ = lazyNames(__name__, _PUBLIC, globals())


if TYPE_CHECKING:
    from ._certificates import CertificateAuthority, IssuedCertificate
    from ._harness import DetachedSession, MemoryTransport, ServerHarness, makeSession
    from ._recording import MessageWaitTimeout, ReceivedMessage, RecordingServer

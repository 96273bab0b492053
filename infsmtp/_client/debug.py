"""
The client's debug transcript (C{AsyncClient.debug = True}, like
smtplib's C{set_debuglevel}): every line to and from the server, logged at
the debug level under C{infsmtp.client}, with AUTH secrets replaced by
C{***}.

It is a protocol wrapper put between the transport and the session's
protocol only when debug is on, so the protocol itself is unchanged and a
client without debug pays nothing.  What is redacted: the argument of an
C{AUTH} command after its mechanism (an initial response holds the
password or token), every line sent after a C{334} challenge, and any of
the session's secrets wherever they appear.  Message data is logged as its
size, not its content.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory

from .._events import escape

log = Logger(namespace="infsmtp.client")

#: A write with more lines than this, or more bytes, is message data.
_COMMAND_LINES = 16
_COMMAND_BYTES = 2048


class TranscriptProtocol(ProtocolWrapper):
    """
    Logs what passes, then passes it on unchanged.
    """

    _challenged = False

    def _log(self, direction: str, line: str) -> None:
        secrets = getattr(self.wrappedProtocol, "_secrets", ())
        for secret in secrets:
            if secret and secret in line:
                line = line.replace(secret, "***")
        log.debug("{direction} {line}", direction=direction, line=escape(line, 400), peer=self.factory.where)

    def write(self, data: bytes) -> None:
        self._logOut(data)
        super().write(data)

    def writeSequence(self, data: Any) -> None:
        self._logOut(b"".join(data))
        super().writeSequence(data)

    def _logOut(self, data: bytes) -> None:
        lines = data.split(b"\r\n")
        if lines and not lines[-1]:
            lines.pop()
        if len(lines) > _COMMAND_LINES or len(data) > _COMMAND_BYTES or (lines and not data.endswith(b"\r\n")):
            self._log(">", f"({len(data)} bytes of message data)")
            return
        for raw in lines:
            text = raw.decode("utf-8", "replace")
            if self._challenged:
                # The answer to a 334 challenge: a SASL response.
                self._challenged = False
                text = "***"
            elif text[:5].upper() == "AUTH ":
                parts = text.split(None, 2)
                text = " ".join(parts[:2]) + (" ***" if len(parts) > 2 else "")
            self._log(">", text)

    def dataReceived(self, data: bytes) -> None:
        for raw in data.split(b"\r\n"):
            if raw:
                text = raw.decode("utf-8", "replace")
                if text.startswith("334"):
                    self._challenged = True
                self._log("<", text)
        super().dataReceived(data)


class TranscriptFactory(WrappingFactory):
    """
    Wraps the session's protocol in a L{TranscriptProtocol}.
    """

    protocol = TranscriptProtocol
    noisy = False

    def __init__(self, wrappedFactory: Any, where: str) -> None:
        super().__init__(wrappedFactory)
        self.where = where

"""
The server's SASL room: AUTH (RFC 4954) with PLAIN and LOGIN, the
responses read line by line, the decision of C{onLogin} turned into 235 or
535, and the tarpit after a failure.

A mixin of L{infsmtp._server.protocol.ServerProtocol}.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from .._wire import formatReply, hasControl

_AUTH_REFUSED = formatReply(535, "Authentication credentials invalid", "5.7.8")


class SASLExchange:
    """
    AUTH and its exchange of responses.
    """

    def do_AUTH(self, argument: bytes) -> None:
        if self.factory.settings.requireStartTls and not self.session.secure:
            self._reply(530, "Must issue a STARTTLS command first", "5.7.0", reason="requireStartTls")
            return
        if self._handlers["onLogin"] is None:
            self._error(502, "AUTH not available", "5.5.1")
            return
        if self._withdrawnBy("AUTH"):
            # onEhlo removed it for this client (Postfix's reply).
            self._error(503, "Error: authentication not enabled", "5.5.1")
            return
        if not self.session.secure and not self.factory.settings.allowInsecureAuth:
            self._reply(538, "Encryption required for requested authentication mechanism", "5.7.11", reason="authNeedsTls")
            return
        if not self._ehlo:
            self._error(503, "Error: send EHLO first", "5.5.1")
            return
        if self.session.authenticated:
            self._error(503, "Error: already authenticated", "5.5.1")
            return
        if self._mailStarted:
            self._error(503, "Error: AUTH not permitted during a mail transaction", "5.5.1")
            return
        if self.factory.limits.authBlocked(self.session.ip):
            self._reply(
                421,
                f"{self.factory.settings.hostname} Too many authentication failures from {self.session.ip}, "
                "try again later",
                "4.7.0",
                varies=True,
                reason="maxAuthFailuresPerClient",
            )
            self._close()
            return
        parts = argument.split()
        if not parts or len(parts) > 2:
            self._error(501, "Syntax: AUTH mechanism [initial-response]", "5.5.4")
            return
        mechanism = parts[0].upper()
        initial = parts[1] if len(parts) == 2 else None
        self._mechanism = mechanism.decode("ascii", "replace")
        if mechanism == b"PLAIN":
            if initial is None:
                self._reply(334, "")
                self._lineHandler = self._authPlain
            else:
                self._authPlain(initial)
        elif mechanism == b"LOGIN":
            if initial is None:
                self._reply(334, "VXNlcm5hbWU6")  # "Username:"
                self._lineHandler = self._authLoginUsername
            else:
                self._authLoginUsername(initial)
        else:
            self._error(504, "Unrecognized authentication type", "5.5.4")

    def _decodeResponse(self, line: bytes) -> bytes | None:
        """
        Decode a base64 SASL response, answering the client when it is a
        cancel (C{*}) or not base64.
        """
        if line == b"*":
            self._error(501, "Authentication cancelled", "5.7.0")
            return None
        if line == b"=":
            return b""
        try:
            return base64.b64decode(line, validate=True)
        except (binascii.Error, ValueError):
            self._error(501, "Cannot decode response", "5.5.2")
            return None

    def _authPlain(self, line: bytes) -> None:
        decoded = self._decodeResponse(line)
        if decoded is None:
            return
        parts = decoded.split(b"\0")
        if len(parts) != 3 or not parts[1]:
            self._error(501, "Malformed PLAIN response", "5.5.2")
            return
        self._authDecoded(parts[1], parts[2])

    def _authLoginUsername(self, line: bytes) -> None:
        decoded = self._decodeResponse(line)
        if decoded is None:
            return
        self._reply(334, "UGFzc3dvcmQ6")  # "Password:"
        self._lineHandler = lambda line: self._authLoginPassword(decoded, line)

    def _authLoginPassword(self, username: bytes, line: bytes) -> None:
        decoded = self._decodeResponse(line)
        if decoded is None:
            return
        self._authDecoded(username, decoded)

    def _authDecoded(self, username: bytes, password: bytes) -> None:
        try:
            user, secret = username.decode("utf-8"), password.decode("utf-8")
        except UnicodeDecodeError:
            self._error(501, "Credentials are not UTF-8", "5.5.2")
            return
        if hasControl(user):
            self._error(501, "Control character in user name", "5.5.2")
            return
        session = self.session
        session.username, session.password = user, secret
        session.authenticated = False
        self._decide(
            "onLogin", self._loginDecided, (454, "4.7.0", "Temporary authentication failure"), self._forgetPassword
        )

    def _loginDecided(self, result: Any) -> None:
        session = self.session
        if isinstance(result, bool):
            session.authenticated = result
        if session.authenticated:
            self._reply(235, "Authentication successful", "2.7.0")
            self._events.authenticated(self, self._mechanism, True)
            return
        self._authFailures += 1
        delay = self.factory.limits.authFailed(session.ip)
        if delay <= 0:
            self._loginRefused()
            return
        # A tarpit: the 535 waits, longer with each failure of this client
        # (across its connections), and so does everything pipelined after.
        self._busy = True
        self._delayed = self._clock.callLater(delay, self._loginRefusedLater)

    def _loginRefusedLater(self) -> None:
        self._delayed = None
        self._busy = False
        if self._dropRequested:
            self._drop()
            return
        self._loginRefused()
        self._wake()

    def _loginRefused(self) -> None:
        # An AUTH failure line (what fail2ban reads), not a reject line.
        self._out.append(_AUTH_REFUSED)
        self._rejects += 1
        self._events.authenticated(self, self._mechanism, False)
        if self._authFailures >= self.factory.settings.maxAuthFailures:
            self._reply(
                421, f"{self.factory.settings.hostname} Too many authentication failures", "4.7.0", reason="maxAuthFailures"
            )
            self._close()

    def _forgetPassword(self) -> None:
        # The password is for onLogin only.
        self.session.password = ""

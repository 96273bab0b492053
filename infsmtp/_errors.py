"""
The exceptions infsmtp raises, and that server handlers raise to choose a
reply.
"""

from __future__ import annotations


class SMTPError(Exception):
    """
    Base of every error infsmtp raises.

    A server handler raises it to choose the reply sent to the client::

        def onRcptTo(session):
            if session.address.endswith("@example.org"):
                raise SMTPError(550, "5.1.1 No such user here")

    @ivar code: the SMTP reply code, or L{None} when no reply was involved.
    @ivar text: the reply text, or a description of the failure.
    @ivar messageStarted: set by the client when a send failed after the
        message itself began to go out (after DATA's 354): the server may
        have it, so sending it again may deliver it twice.  L{False} when
        the failure came earlier (in the envelope), or had nothing to do
        with a message.
    @ivar step: for a send through L{ClientPool}, the step that failed:
        C{"connect"}, C{"authenticate"} or C{"send"}; L{None} otherwise.
    """

    messageStarted: bool = False
    step: str | None = None

    def __init__(self, code: int | str | None = None, text: str = "") -> None:
        if isinstance(code, str) and not text and not (code.isascii() and code.isdigit()):
            # SMTPError("what happened") without a code.  (isdigit alone
            # takes "²", which int() refuses.)
            code, text = None, code
        if code is not None:
            if isinstance(code, bool) or not isinstance(code, (int, str)) or (
                isinstance(code, str) and not (code.isascii() and code.isdigit() and len(code) == 3)
            ):
                raise TypeError(f"an SMTP reply code is three digits, not {code!r}")
            code = int(code)
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        self.code = code
        self.text = text
        super().__init__(code, text)

    def __str__(self) -> str:
        if self.code is None:
            return self.text
        return f"{self.code} {self.text}".rstrip()


class SMTPConnectError(SMTPError):
    """
    The connection could not be made or the server refused the session.
    """


class SMTPTimeoutError(SMTPError):
    """
    The connection or a reply took longer than the timeout.
    """


class SMTPTLSError(SMTPError):
    """
    TLS could not be set up: bad certificate, no STARTTLS offered, a failed
    handshake.
    """


class SMTPAuthenticationError(SMTPError):
    """
    Authentication failed for a reason other than refused credentials.
    """


class SMTPProtocolError(SMTPError):
    """
    The server broke the protocol: a malformed reply, or one over the
    client's limits on reply lines and reply size.  The connection is closed.
    """


class SMTPRecipientsRefused(SMTPError):
    """
    The server refused every recipient.

    @ivar refused: address -> (code, text) for each refused recipient.
    """

    def __init__(
        self, refused: dict[str, tuple[int, str]], text: str = "all recipients refused"
    ) -> None:
        codes = {code for code, _ in refused.values()}
        super().__init__(codes.pop() if len(codes) == 1 else None, text)
        self.refused = dict(refused)

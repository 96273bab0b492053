"""
L{PrintDelivery}: a delivery that prints each message to a terminal
instead of storing it, for developers looking at what their application
sends (C{python -m infsmtp}, C{twistd -n infsmtp --print}).

Like every delivery it is just an C{onReceive} handler.  What it prints is
meant to be read: the envelope, the headers decoded, the text body decoded
(the plain alternative when there is one), and one line per attachment.
"""

from __future__ import annotations

import itertools
import sys
from email.message import EmailMessage
from typing import IO, Any

#: The line between two messages.
RULE = "=" * 72


def _text(part: EmailMessage) -> str:
    """
    A text part's content decoded, whatever its charset claims.
    """
    try:
        return str(part.get_content())
    except (LookupError, UnicodeError, KeyError):
        payload = part.get_payload(decode=True) or b""
        return payload.decode("utf-8", "replace")


def _size(part: EmailMessage) -> int:
    payload = part.get_payload(decode=True)
    return len(payload) if isinstance(payload, bytes) else 0


def formatMessage(message: EmailMessage, envelope: dict[str, Any]) -> str:
    """
    The text printed for one message.

    @param envelope: C{number}, C{client} (C{ip:port}), C{mailFrom},
        C{rcptTo} (a list), and optionally C{tls} (a version) and C{user}.
    """
    how = [f"from {envelope['client']}"]
    if envelope.get("tls"):
        how.append(envelope["tls"])
    if envelope.get("user"):
        how.append(f"user {envelope['user']}")
    lines = [
        RULE,
        f"Message {envelope['number']} ({', '.join(how)})",
        f"MAIL FROM: <{envelope['mailFrom']}>",
        f"RCPT TO:   {', '.join(f'<{r}>' for r in envelope['rcptTo'])}",
        "-" * 72,
    ]
    for name, value in message.items():
        # Folded headers on one line (a folding's CRLF and tab say nothing).
        lines.append(f"{name}: {' '.join(str(value).split())}")
    lines.append("")
    body = message.get_body(preferencelist=("plain", "html")) if not message.is_attachment() else None
    if body is not None:
        if body.get_content_type() == "text/html":
            lines.append("[text/html only, shown as sent]")
        lines.append(_text(body).rstrip())
    attachments = [part for part in message.walk() if part is not body and _isAttachment(part)]
    if attachments:
        lines.append("")
        for part in attachments:
            name = part.get_filename() or "(no name)"
            lines.append(f"[attachment: {name}, {part.get_content_type()}, {_size(part)} bytes]")
    lines.append(RULE)
    return "\n".join(lines) + "\n"


def _isAttachment(part: EmailMessage) -> bool:
    if part.is_multipart():
        return False
    return part.is_attachment() or part.get_content_maintype() not in ("text",)


class PrintDelivery:
    """
    An C{onReceive} handler printing each message (see L{formatMessage}).

    @param stream: where to print; L{None}: C{sys.stdout} at the time of
        each message.
    """

    def __init__(self, stream: IO[str] | None = None) -> None:
        self.stream = stream
        self._numbers = itertools.count(1)

    def __call__(self, session: Any) -> bool:
        envelope = {
            "number": next(self._numbers),
            "client": f"{session.ip}:{session.port}",
            "mailFrom": session.mailFrom,
            "rcptTo": list(session.rcptTo),
            "tls": (session.tlsVersion or "TLS") if session.secure else None,
            "user": session.username if session.authenticated else None,
        }
        text = formatMessage(session.message, envelope)
        stream = self.stream if self.stream is not None else sys.stdout
        encoding = getattr(stream, "encoding", None) or "utf-8"
        # A terminal that cannot show a character gets a ?, not a crash.
        stream.write(text.encode(encoding, "replace").decode(encoding))
        stream.flush()
        return True

    def __repr__(self) -> str:
        return "<PrintDelivery>"

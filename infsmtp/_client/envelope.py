"""
What the client transmits, and to whom.

- :func:`envelopeFromHeaders` derives the envelope (sender and recipients)
  from a message's headers, as :meth:`smtplib.SMTP.send_message` does.
- :func:`stripHeaderFields` removes header fields (``Bcc``) from a raw header
  block without re-serialising the others.
- :func:`outgoingFromStream` and :func:`outgoingFromMessage` turn a stream or an
  :class:`email.message.Message` into an :class:`OutgoingMessage`: the bytes
  to transmit (with ``Bcc`` removed), of which only the header block is read
  ahead so that a large file is streamed rather than loaded.
"""

from __future__ import annotations

import copy
import email.generator
import email.parser
import email.policy
import email.utils
import io
import re
from dataclasses import dataclass
from email.message import Message
from typing import IO, Iterable, Sequence

from .._errors import SMTPError

#: Header fields that name recipients but are never transmitted.
HIDDEN_FIELDS = ("bcc", "resent-bcc")

#: How much is read at a time while looking for the end of the header block.
READ_SIZE = 65536

#: Give up looking for the end of the header block after this many bytes: a
#: file without one is body text, and its envelope has to be given.
MAX_HEADER_BLOCK = 1024 * 1024

_HEADER_END = re.compile(rb"\r?\n\r?\n")
_LINE = re.compile(rb"[^\n]*\n|[^\n]+")


def envelopeFromHeaders(headers: Message) -> tuple[str | None, list[str]]:
    """
    The envelope sender and recipients a message's headers name.

    The sender is the address of ``Sender`` when present, else of ``From``;
    the recipients are the addresses of every ``To``, ``Cc`` and ``Bcc``
    field, in order and without duplicates.  When the message carries one
    ``Resent-`` block (one ``Resent-Date``), the ``Resent-`` fields are used
    instead, as RFC 5322 section 3.6.6 intends.

    >>> from email import message_from_string
    >>> envelopeFromHeaders(message_from_string(
    ...     "From: Ann <ann@example.org>\\nTo: bob@example.org\\n"
    ...     "Bcc: eve@example.org\\n\\nhi\\n"))
    ('ann@example.org', ['bob@example.org', 'eve@example.org'])

    :param headers: the message (only its headers are looked at).
    :returns: ``(sender, recipients)``; ``sender`` is ``None`` when no field
        names one.
    :raises SMTPError: when the message has several ``Resent-`` blocks, so
        that which one is current is ambiguous.
    """
    resent = headers.get_all("Resent-Date") or []
    if len(resent) > 1:
        raise SMTPError(
            "the message has more than one Resent- header block; "
            "give sender and recipients explicitly"
        )
    prefix = "Resent-" if resent else ""
    senderFields = headers.get_all(prefix + "Sender") or headers.get_all(prefix + "From") or []
    senders = _addresses(senderFields[:1])
    recipientFields: list[str] = []
    for name in ("To", "Cc", "Bcc"):
        recipientFields.extend(headers.get_all(prefix + name) or [])
    return (senders[0] if senders else None), _addresses(recipientFields)


def _addresses(fields: Iterable[str]) -> list[str]:
    found: list[str] = []
    for _, address in email.utils.getaddresses([str(f) for f in fields]):
        # Groups such as "undisclosed-recipients:;" yield empty addresses.
        if address and address not in found:
            found.append(address)
    return found


def stripHeaderFields(block: bytes, names: Sequence[str] = HIDDEN_FIELDS) -> bytes:
    """
    Remove the fields called ``names`` (case-insensitive), continuation lines
    included, from a raw header block; every other byte is kept as it was.

    >>> stripHeaderFields(b"To: a@x\\r\\nBcc: b@x,\\r\\n c@x\\r\\nSubject: s\\r\\n")
    b'To: a@x\\r\\nSubject: s\\r\\n'
    """
    wanted = {n.lower().encode("ascii") for n in names}
    lowered = block.lower()
    if not any(name in lowered for name in wanted):
        # No field can have one of those names: nothing to remove.
        return block
    kept: list[bytes] = []
    dropping = False
    for line in _LINE.findall(block):
        if line[:1] in (b" ", b"\t") and line.strip():
            # A continuation line belongs to the field above it.
            if not dropping:
                kept.append(line)
            continue
        name, colon, _ = line.partition(b":")
        dropping = bool(colon) and name.strip().lower() in wanted
        if not dropping:
            kept.append(line)
    return b"".join(kept)


@dataclass
class OutgoingMessage:
    """
    A message ready for DATA: ``head`` (already read, ``Bcc`` removed)
    followed by whatever ``rest`` still yields.

    :ivar head: the first bytes of the message, its header block included.
    :ivar rest: a binary stream with the remainder, or ``None`` when ``head``
        is the whole message.
    :ivar size: the size in bytes for the ``SIZE`` parameter, or ``None`` when
        it cannot be known without reading everything.
    :ivar eightBit: whether the message has bytes over 127: ``None`` when
        unknown (only ``head`` has been looked at).
    """

    head: bytes
    rest: IO[bytes] | None
    size: int | None
    eightBit: bool | None
    #: ``head`` as sent after DATA (dot-stuffed, with the final dot), when
    #: ``rest`` is ``None``; the protocol fills it in.
    stuffed: bytes = b""


def outgoingFromStream(
    stream: IO[bytes] | IO[str], sender: str | None, recipients: Sequence[str] | str | None
) -> tuple[OutgoingMessage, str, list[str]]:
    """
    Read a stream's header block and prepare the message for DATA.

    Text streams are encoded as UTF-8.  The envelope comes from the headers
    for whichever of ``sender`` and ``recipients`` is ``None``.

    :raises SMTPError: when the envelope cannot be derived.
    """
    source = _binary(stream)
    buffered = bytearray()
    headerEnd = None
    eof = False
    # Read until the header block has ended and a full chunk is in hand, so
    # that a small message is read whole (and sent in one write).
    while len(buffered) < (MAX_HEADER_BLOCK if headerEnd is None else READ_SIZE):
        chunk = source.read(READ_SIZE)
        if not chunk:
            eof = True
            break
        # Resume the search a few bytes back: the blank line may straddle reads.
        start = max(0, len(buffered) - 3)
        buffered += chunk
        if headerEnd is None:
            headerEnd = _headerEnd(buffered, start)
    if headerEnd is None:
        # A header block that the whole message is, or no header block at all.
        headerEnd = len(buffered) if eof else 0
    block = bytes(buffered[:headerEnd])
    head = stripHeaderFields(block) + bytes(buffered[headerEnd:])

    if sender is None or recipients is None:
        parsed = email.parser.HeaderParser(policy=email.policy.compat32).parsestr(
            block.decode("utf-8", "surrogateescape")
        )
        sender, recipients = _completeEnvelope(parsed, sender, recipients)
    else:
        recipients = _recipientList(recipients)

    if eof:
        message = OutgoingMessage(head, None, len(head), _hasEightBit(head))
    else:
        message = OutgoingMessage(
            head,
            source,
            _remaining(source, len(head)),
            True if _hasEightBit(head) else None,
        )
    return message, sender, recipients


def outgoingFromMessage(
    message: Message, sender: str | None, recipients: Sequence[str] | str | None
) -> tuple[OutgoingMessage, str, list[str]]:
    """
    Flatten an :class:`email.message.Message` for DATA, without its ``Bcc``
    and ``Resent-Bcc`` fields, and derive the envelope from its headers for
    whichever of ``sender`` and ``recipients`` is ``None``.
    """
    sender, recipients = _completeEnvelope(message, sender, recipients)
    policy = message.policy
    if not all(a.isascii() for a in [sender, *recipients]):
        # Non-ASCII addresses go out with SMTPUTF8: headers may stay UTF-8.
        policy = policy.clone(utf8=True)
    # A shallow copy is enough: deleting a field rebinds the copy's header
    # list and leaves the caller's message as it was.
    transmitted = copy.copy(message)
    for name in HIDDEN_FIELDS:
        del transmitted[name]
    out = io.BytesIO()
    email.generator.BytesGenerator(out, mangle_from_=False, policy=policy).flatten(
        transmitted, linesep="\r\n"
    )
    data = out.getvalue()
    return OutgoingMessage(data, None, len(data), _hasEightBit(data)), sender, recipients


def _completeEnvelope(
    headers: Message, sender: str | None, recipients: Sequence[str] | str | None
) -> tuple[str, list[str]]:
    if sender is None or recipients is None:
        derivedSender, derivedRecipients = envelopeFromHeaders(headers)
        if sender is None:
            if derivedSender is None:
                raise SMTPError("no sender: the message has no From or Sender field; pass sender=")
            sender = derivedSender
        if recipients is None:
            recipients = derivedRecipients
    recipients = _recipientList(recipients)
    if not recipients:
        raise SMTPError("no recipients: the message has no To, Cc or Bcc field; pass recipients=")
    return sender, recipients


def _recipientList(recipients: Sequence[str] | str) -> list[str]:
    if isinstance(recipients, str):
        return [recipients]
    return list(recipients)


def _headerEnd(buffered: bytearray, start: int) -> int | None:
    """
    Where the header block ends (after its last line ending), or ``None``.
    """
    if start == 0 and buffered[:1] in (b"\n", b"\r"):
        # No header fields at all: the message starts with the blank line.
        return 0
    match = _HEADER_END.search(buffered, start)
    if match is None:
        return None
    # Keep the header block's own last line ending; the blank line is body.
    return match.start() + (2 if buffered[match.start() : match.start() + 1] == b"\r" else 1)


def _hasEightBit(data: bytes) -> bool:
    return not data.isascii()


def _remaining(stream: IO[bytes], already: int) -> int | None:
    try:
        here = stream.tell()
        end = stream.seek(0, io.SEEK_END)
        stream.seek(here)
    except (AttributeError, OSError, ValueError):
        return None
    return already + (end - here)


class _EncodingReader(io.RawIOBase):
    """
    A text stream read as UTF-8 bytes.
    """

    def __init__(self, text: IO[str]) -> None:
        self._text = text

    def read(self, size: int = -1) -> bytes:  # type: ignore[override]
        return self._text.read(size).encode("utf-8")

    def readable(self) -> bool:
        return True


def _binary(stream: IO[bytes] | IO[str]) -> IO[bytes]:
    if isinstance(stream, io.TextIOBase):
        return _EncodingReader(stream)  # type: ignore[return-value]
    return stream  # type: ignore[return-value]

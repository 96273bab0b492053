"""
The server's sans-I/O core: bytes in, events out, no sockets.

- L{CommandLineFramer} cuts the command stream into lines, never holding more
  than the line limit.
- L{DataFramer} reads a DATA stream to its C{CRLF.CRLF} end, undoing
  dot-stuffing with bytes operations over whole buffers.
- L{parseCommand}, L{parseMailArguments} and L{parsePath} read commands.
- L{formatReply} writes replies.

Every function here is pure and every class is a small state machine fed
bytes, so hypothesis can hammer them (see C{tests/test_wire.py}).
"""

from __future__ import annotations

import functools
import re
import tempfile
from dataclasses import dataclass, field
from typing import IO, Any, Protocol

CRLF = b"\r\n"


class LineTooLong:
    """
    The event L{CommandLineFramer} yields for a line over the limit (whose
    bytes were discarded as they came).
    """

    def __repr__(self) -> str:
        return "LINE_TOO_LONG"


LINE_TOO_LONG = LineTooLong()


class CommandLineFramer:
    """
    Split the command stream into lines.

    A line ends with LF (a CR before it is dropped): clients that end
    commands with a bare LF are common and harmless in command mode.  The
    buffer never grows past C{maxLength}: a longer line is discarded as it
    arrives and reported once, as L{LINE_TOO_LONG}, when its end comes.

    Searching resumes where the previous search stopped, so a line that
    trickles in byte by byte costs O(bytes) in all.
    """

    def __init__(self, maxLength: int = 2048) -> None:
        self.maxLength = maxLength
        self._buffer = bytearray()
        self._searched = 0
        self._discarding = False
        #: Lines (long ones included) taken so far: the protocol's per-line
        #: deadline restarts when this moves.
        self.lines = 0

    def feed(self, data: bytes) -> None:
        """
        Add bytes from the wire.
        """
        if self._discarding:
            end = data.find(b"\n")
            if end < 0:
                return
            # Keep only the newline so that next() reports the long line.
            data = data[end:]
        self._buffer += data

    def next(self) -> bytes | LineTooLong | None:
        """
        The next complete line without its line ending, L{LINE_TOO_LONG}, or
        L{None} when no complete line is buffered.
        """
        buf = self._buffer
        end = buf.find(b"\n", self._searched)
        if end < 0:
            # maxLength counts the line ending: a line already this long
            # without its LF is too long.
            if len(buf) >= self.maxLength:
                del buf[:]
                self._discarding = True
            self._searched = len(buf)
            return None
        self._searched = 0
        self.lines += 1
        if self._discarding or end >= self.maxLength:
            self._discarding = False
            del buf[: end + 1]
            return LINE_TOO_LONG
        line = bytes(buf[:end])
        del buf[: end + 1]
        if line.endswith(b"\r"):
            line = line[:-1]
        return line

    def takeRemainder(self) -> bytes:
        """
        Remove and return everything buffered (the start of a DATA stream
        pipelined after its command).
        """
        data = bytes(self._buffer)
        del self._buffer[:]
        self._searched = 0
        self._discarding = False
        return data

    def clear(self) -> None:
        """
        Forget everything buffered (STARTTLS: nothing sent in plaintext
        after it may be acted upon once TLS is up).
        """
        self.takeRemainder()

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    @property
    def empty(self) -> bool:
        """
        Nothing buffered and no long line being discarded: the next bytes
        start a new line.
        """
        return not self._buffer and not self._discarding


class MessageSink(Protocol):
    """
    Where L{DataFramer} writes the message's bytes.
    """

    def write(self, data: bytes) -> None: ...


#: Bytes a L{SpoolSink} takes from its budget at a time.
BUDGET_BLOCK = 16384


class SpoolSink:
    """
    A L{MessageSink} that keeps a message in memory up to C{threshold}
    bytes (no limit when L{None}) and moves it to an anonymous temporary
    file beyond, so that a 100 MB message costs disk, not memory.

    With a C{budget} (see L{infsmtp._server.limits.MemoryBudget}: C{take(n)} and
    C{give(n)}), the bytes held in memory are also taken from it, and the
    message moves to a file as soon as the budget is spent: the memory of
    all sessions' messages together stays bounded.  L{release} gives the
    bytes back; call it when the message is no longer held.
    """

    def __init__(self, threshold: int | None, budget: Any = None) -> None:
        self.threshold = threshold
        self.size = 0
        self._chunks: list[bytes] = []
        self._file: IO[bytes] | None = None
        self._budget = budget
        self._held = 0

    def write(self, data: bytes) -> None:
        size = self.size = self.size + len(data)
        if self._file is not None:
            self._file.write(data)
            return
        if size > self._held and self._budget is not None:
            # Taken in blocks, so that a small message asks the budget once.
            more = size - self._held
            if more < BUDGET_BLOCK:
                more = BUDGET_BLOCK
            if not self._budget.take(more):
                self._spool()
                self._file.write(data)  # type: ignore[union-attr]
                return
            self._held += more
        self._chunks.append(data)
        if self.threshold is not None and size > self.threshold:
            self._spool()

    def _spool(self) -> None:
        self._file = tempfile.TemporaryFile(prefix="infsmtp-")
        self._file.writelines(self._chunks)
        self._chunks = []
        self.release()

    def release(self) -> None:
        """
        Give the memory held back to the budget (the bytes themselves go
        when the last reference to them does).
        """
        if self._held:
            self._budget.give(self._held)
            self._held = 0

    @property
    def spooled(self) -> bool:
        return self._file is not None

    def getvalue(self) -> bytes:
        """
        The message as bytes (read back from the file when spooled).
        """
        if self._file is not None:
            self._file.seek(0)
            return self._file.read()
        if len(self._chunks) != 1:
            self._chunks = [b"".join(self._chunks)]
        return self._chunks[0]

    def file(self) -> IO[bytes] | None:
        """
        The spool file, rewound, or L{None} when the message is in memory.
        """
        if self._file is not None:
            self._file.flush()
            self._file.seek(0)
        return self._file


#: Message faults found by L{DataFramer}; the first one wins.
BARE_NEWLINE = "bare-newline"
LINE_TOO_LONG_IN_DATA = "line-too-long"
TOO_BIG = "too-big"


def _scanDots(data: bytes | bytearray, start: int) -> tuple[int, int]:
    """
    One pass over C{data} from C{start} for every C{CRLF .}: the end of
    data is one of them (C{CRLF . CRLF}), and the others are the
    dot-stuffed lines to undo, so finding both costs one search (CPython
    searches for a short needle a few bytes at a time, so each pass over a
    message counts).

    @return: the index of the end's CRLF (or -1), and of the first other
        C{CRLF .} before it (or -1; one cut short at the end of C{data},
        which may yet be the end, counts as one).
    """
    dot = -1
    found = data.find(b"\r\n.", start)
    while found >= 0:
        if data[found + 3 : found + 5] == CRLF:
            return found, dot
        if dot < 0:
            dot = found
        found = data.find(b"\r\n.", found + 3)
    return -1, dot


class DataFramer:
    """
    Read one DATA stream: find its end, undo dot-stuffing, check it.

    Only C{<CR><LF>.<CR><LF>} ends the message (the CRLF of the DATA command
    counts as the first CRLF, so C{.<CR><LF>} at once is an empty message).
    A bare CR or LF anywhere in the data is never a terminator: it marks the
    message as faulty (L{BARE_NEWLINE}), which closes the SMTP-smuggling
    hole (CVE-2023-51764 and kin) without guessing what the client meant.

    The framer works on whole buffers: it passes every complete line it has
    to the sink at once, with one search for C{CRLF .} (the end of data and
    the dot-stuffed lines alike), one C{replace} to undo dot-stuffing when
    there is any, and a split to spot bare CR/LF; only a partial last line
    stays buffered,
    and not more than C{maxLineLength} of it.  Once the message is faulty
    (too big, a line too long, a bare newline) nothing more is kept; the
    stream is read to its end all the same, so the session stays in step.

    @ivar fault: L{None}, L{TOO_BIG}, L{LINE_TOO_LONG_IN_DATA} or
        L{BARE_NEWLINE}.
    @ivar size: bytes of message content (after unstuffing) seen so far.
    @ivar done: whether the end of data was seen.
    """

    def __init__(
        self,
        sink: MessageSink,
        maxSize: int | None = None,
        maxLineLength: int | None = None,
    ) -> None:
        self.sink = sink
        self.maxSize = maxSize
        self.maxLineLength = maxLineLength
        self.fault: str | None = None
        self.size = 0
        self.done = False
        self._buffer = bytearray()
        self._atLineStart = True
        self._searched = 0
        # How long the current partial line has been, in bytes already
        # flushed: lines may be longer than what is buffered.
        self._partialLength = 0

    def feed(self, data: bytes) -> bytes | None:
        """
        Add bytes from the wire.

        @return: L{None} while the message goes on; once its end is seen,
            the bytes that came after it (the next pipelined commands).
        """
        if self.done:
            raise RuntimeError("DataFramer fed after the end of data")
        buf = self._buffer
        if not buf:
            # Nothing held back from earlier reads (so no terminator can
            # straddle into this one): a message that ends in this read is
            # framed on the bytes as they came, without copying them in.
            if self._atLineStart and data[:3] == b".\r\n":
                self.done = True
                return data[3:]
            end, dot = _scanDots(data, 0)
            if end >= 0:
                self._emit(data[: end + 2], True, 0 <= dot < end)
                self.done = True
                return data[end + 5 :]
            # No end in it: buffered, already scanned.
            buf += data
        else:
            buf += data
            if self._atLineStart and buf[:3] == b".\r\n":
                return self._finish(0, 3, False)
            # What was held back holds no CRLF (every complete line was
            # passed on), so a CRLF . can only begin in its last bytes.
            end, dot = _scanDots(buf, max(self._searched - 4, 0))
            if end >= 0:
                return self._finish(end + 2, end + 5, 0 <= dot < end)
        last = buf.rfind(CRLF)
        if last >= 0:
            self._emit(bytes(memoryview(buf)[: last + 2]), True, 0 <= dot < last)
            del buf[: last + 2]
            self._atLineStart = True
        limit = self.maxLineLength or 65536
        if len(buf) > limit:
            # A long partial line: pass it on, but keep a trailing CR, which
            # may begin the CRLF that ends it.
            keep = 1 if buf.endswith(b"\r") else 0
            self._emit(bytes(memoryview(buf)[: len(buf) - keep]), False, False)
            del buf[: len(buf) - keep]
            self._atLineStart = False
        self._searched = len(buf)
        return None

    def _finish(self, contentEnd: int, terminatorEnd: int, dots: bool) -> bytes:
        buf = self._buffer
        if contentEnd:
            self._emit(bytes(memoryview(buf)[:contentEnd]), True, dots)
        rest = bytes(memoryview(buf)[terminatorEnd:])
        del buf[:]
        self.done = True
        return rest

    def _fail(self, fault: str) -> None:
        if self.fault is None:
            self.fault = fault

    def _linesFit(self, chunk: bytes, limit: int) -> bool:
        """
        Whether every line of C{chunk} (complete lines, the first one
        continuing the C{_partialLength} bytes passed on before) is at
        most C{limit} bytes, its line ending included.
        """
        first = chunk.find(b"\n")
        if self._partialLength + first + 1 > limit:
            return False
        # From each line's start, the last LF within limit bytes ends the
        # lines that fit; none there means a line too long.  A jump is
        # nearly limit bytes, so a MiB takes a few hundred finds, not one
        # step per line.
        start = first + 1
        end = len(chunk)
        while end - start > limit:
            last = chunk.rfind(b"\n", start, start + limit)
            if last < 0:
                return False
            start = last + 1
        return True

    def _emit(self, chunk: bytes, endsLine: bool, dots: bool) -> None:
        """
        Check C{chunk} (complete lines when C{endsLine}, else a piece of a
        line) and pass it, unstuffed, to the sink.  C{dots}: whether a line
        after the first may begin with a dot (L{_scanDots} found a
        C{CRLF .} in it); when not, the chunk is not searched again.
        """
        limit = self.maxLineLength
        if not endsLine:
            # A piece of one long line: no CRLF in it, so any CR or LF is bare.
            if b"\r" in chunk or b"\n" in chunk:
                self._fail(BARE_NEWLINE)
            self._partialLength += len(chunk)
            if limit is not None and self._partialLength > limit:
                self._fail(LINE_TOO_LONG_IN_DATA)
        elif self.fault is None:
            # The lines joined again hold a CR or LF only where one was
            # bare (found with memchr): cheaper than counting CR, LF and
            # CRLF, which CPython does a byte at a time.
            joined = b"".join(chunk.split(CRLF))
            if b"\r" in joined or b"\n" in joined:
                self._fail(BARE_NEWLINE)
            if limit is not None and not self._linesFit(chunk, limit):
                self._fail(LINE_TOO_LONG_IN_DATA)
            self._partialLength = 0
        else:
            # Already faulty: nothing is kept, nothing more to check.
            self._partialLength = 0
            return
        if self._atLineStart and chunk[:1] == b".":
            chunk = chunk[1:]
        if dots:
            chunk = chunk.replace(b"\r\n.", CRLF)
        self.size += len(chunk)
        if self.maxSize is not None and self.size > self.maxSize:
            self._fail(TOO_BIG)
        if self.fault is None:
            self.sink.write(chunk)


class ChunkFramer:
    """
    Read one BDAT chunk (RFC 3030): exactly C{size} bytes, counted, not
    ended by a dot and not dot-stuffed, passed to the sink as they come.

    Once the message (C{already} bytes from its earlier chunks, plus this
    one's) passes C{maxSize}, nothing more is kept (L{TOO_BIG}); the chunk
    is read to its end all the same, so the session stays in step.  With
    no sink the chunk is read and dropped (a refused BDAT, whose octets the
    server must still consume).

    @ivar size: bytes of the message so far, this chunk's included.
    @ivar last: whether this is the last chunk (C{BDAT n LAST}).
    @ivar fault: L{None} or L{TOO_BIG}.
    """

    def __init__(
        self, sink: MessageSink | None, size: int, last: bool, maxSize: int | None = None, already: int = 0
    ) -> None:
        self.sink = sink
        self.remaining = size
        self.last = last
        self.maxSize = maxSize
        self.size = already
        self.fault: str | None = None

    def feed(self, data: bytes) -> bytes | None:
        """
        Add bytes from the wire.

        @return: L{None} while the chunk goes on; once it is complete, the
            bytes that came after it (the next commands).
        """
        need = self.remaining
        if len(data) < need:
            piece, rest = data, None
        else:
            piece, rest = data[:need], data[need:]
        self.remaining = need - len(piece)
        if piece and self.sink is not None and self.fault is None:
            self.size += len(piece)
            if self.maxSize is not None and self.size > self.maxSize:
                self.fault = TOO_BIG
            else:
                self.sink.write(piece)
        return rest


def parseCommand(line: bytes) -> tuple[bytes, bytes]:
    """
    Split a command line into its upper-cased verb and its argument.

    >>> parseCommand(b"mail FROM:<a@b>")
    (b'MAIL', b'FROM:<a@b>')

    A verb that is not 1-20 letters comes back as C{b""} (the caller
    answers 500).
    """
    line = line.strip(b" \t")
    verb, _, rest = line.partition(b" ")
    # bytes.isalpha() is ASCII letters only, and False when empty.
    if not verb.isalpha() or len(verb) > 20:
        return b"", line
    return verb.upper(), rest.strip(b" \t")


class PathSyntaxError(ValueError):
    """
    A reverse-path or forward-path that does not parse.
    """


@dataclass
class MailArguments:
    """
    A parsed C{MAIL FROM:<path> params} or C{RCPT TO:<path> params}.
    """

    address: str
    parameters: dict[str, str | None] = field(default_factory=dict)


_ATEXT = rb"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\x80-\xff-]"
_DOT_ATOM = rb"%s+(?:\.%s+)*" % (_ATEXT, _ATEXT)
_QUOTED = rb'"(?:[\x20\x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\x20-\x7e])*"'
_LOCAL = rb"(?:%s|%s)" % (_DOT_ATOM, _QUOTED)
_LABEL = rb"[A-Za-z0-9\x80-\xff](?:[A-Za-z0-9\x80-\xff-]*[A-Za-z0-9\x80-\xff])?"
# A domain literal holds RFC 5321's dcontent only: printable ASCII but
# brackets and backslash, so no control character (NUL, ESC, DEL) or space.
_DOMAIN = rb"(?:%s(?:\.%s)*|\[[\x21-\x5a\x5e-\x7e]+\])" % (_LABEL, _LABEL)
_MAILBOX = re.compile(rb"(%s)@(%s)" % (_LOCAL, _DOMAIN))
_SOURCE_ROUTE = re.compile(rb"@%s(?:,@%s)*:" % (_DOMAIN, _DOMAIN))

#: RFC 5321 4.5.3.1.3: a path is at most 256 octets including the brackets.
MAX_PATH = 256

#: C0 and C1 control characters and DEL, in decoded text: never part of an
#: address, a name or a parameter (they would reach handlers, headers and
#: logs as terminal escapes or line breaks).
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


def hasControl(text: str) -> bool:
    """
    Whether C{text} holds a control character (C0, DEL or C1).
    """
    return _CONTROL.search(text) is not None


def decodeText(raw: bytes) -> str | None:
    """
    C{raw} as UTF-8 text without control characters, or L{None} when it is
    not valid UTF-8 or holds one.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if _CONTROL.search(text) is not None:
        return None
    return text


#: The longest number the server reads from the wire (SIZE: 20 digits hold
#: any 64-bit count).
MAX_NUMBER_DIGITS = 20


def parseNumber(text: str | None) -> int | None:
    """
    A count from the wire: 1 to L{MAX_NUMBER_DIGITS} ASCII digits, else
    L{None}.  (C{str.isdigit} alone accepts C{"²"}, which C{int} refuses.)

    >>> parseNumber("1024"), parseNumber("²"), parseNumber("")
    (1024, None, None)
    """
    if text is None or not (0 < len(text) <= MAX_NUMBER_DIGITS) or not text.isascii() or not text.isdigit():
        return None
    return int(text)


def parsePath(text: bytes, allowEmpty: bool, allowPostmaster: bool = False) -> str:
    """
    Parse C{<mailbox>} (with an optional, ignored source route) into the
    mailbox as text.  C{<>} gives C{""} when C{allowEmpty}; C{<postmaster>}
    (any case) is accepted when C{allowPostmaster}.

    Non-ASCII octets must be UTF-8; whether they are allowed (SMTPUTF8) is
    the caller's decision.

    @raise PathSyntaxError: the path does not parse.
    """
    if len(text) > MAX_PATH:
        raise PathSyntaxError("path too long")
    if not (text.startswith(b"<") and text.endswith(b">")):
        raise PathSyntaxError("path must be enclosed in <>")
    inner = text[1:-1]
    if not inner:
        if allowEmpty:
            return ""
        raise PathSyntaxError("empty path")
    route = _SOURCE_ROUTE.match(inner)
    if route:
        inner = inner[route.end() :]
    if allowPostmaster and inner.lower() == b"postmaster":
        return inner.decode("ascii")
    if not _MAILBOX.fullmatch(inner):
        raise PathSyntaxError("bad mailbox syntax")
    try:
        address = inner.decode("utf-8")
    except UnicodeDecodeError:
        raise PathSyntaxError("mailbox is not UTF-8") from None
    if not inner.isascii() and _CONTROL.search(address) is not None:
        # The byte patterns keep C0 and DEL out; UTF-8 can still spell C1.
        raise PathSyntaxError("control character in mailbox")
    return address


def _splitPath(argument: bytes) -> tuple[bytes, bytes]:
    """
    Split C{<path> params} at the bracket closing the path, respecting a
    quoted local part (which may hold C{>}).
    """
    if not argument.startswith(b"<"):
        raise PathSyntaxError("path must be enclosed in <>")
    if b'"' not in argument:
        # No quoted local part: the first > closes the path.
        end = argument.find(b">")
        if end < 0:
            raise PathSyntaxError("path not closed by >")
        return argument[: end + 1], argument[end + 1 :]
    quoted = escaped = False
    for index in range(1, len(argument)):
        byte = argument[index]
        if escaped:
            escaped = False
        elif quoted and byte == 0x5C:  # backslash
            escaped = True
        elif byte == 0x22:  # double quote
            quoted = not quoted
        elif byte == 0x3E and not quoted:  # >
            return argument[: index + 1], argument[index + 1 :]
    raise PathSyntaxError("path not closed by >")


_KEYWORD = re.compile(rb"[A-Za-z0-9][A-Za-z0-9-]*")
#: RFC 5321 esmtp-value (printable ASCII but "=" and space), plus UTF-8
#: octets (RFC 6531).
_VALUE = re.compile(rb"[\x21-\x3c\x3e-\x7e\x80-\xff]+")


def parseMailArguments(
    argument: bytes, prefix: bytes, allowEmpty: bool, allowPostmaster: bool = False
) -> MailArguments:
    """
    Parse the argument of MAIL (C{prefix=b"FROM:"}) or RCPT (C{b"TO:"}).

    Be liberal where it is harmless: the prefix in any case, spaces after
    the colon.  Parameter keywords come back upper-cased.

    >>> parseMailArguments(b"FROM:<a@b> SIZE=10 BODY=8bitmime", b"FROM:", True)
    MailArguments(address='a@b', parameters={'SIZE': '10', 'BODY': '8bitmime'})

    @raise PathSyntaxError: bad syntax.
    """
    if argument[: len(prefix)].upper() != prefix:
        raise PathSyntaxError(f"expected {prefix.decode()}<address>")
    path, rest = _splitPath(argument[len(prefix) :].lstrip(b" "))
    address = parsePath(path, allowEmpty, allowPostmaster)
    if rest and not rest.startswith(b" "):
        raise PathSyntaxError("parameters must follow the path after a space")
    parameters: dict[str, str | None] = {}
    # Split on spaces only: a tab, NUL or any other control character is
    # not a separator, so it lands in a keyword or value and is refused.
    for item in rest.split(b" ") if rest else ():
        if not item:
            continue
        keyword, eq, value = item.partition(b"=")
        if not _KEYWORD.fullmatch(keyword) or (eq and not _VALUE.fullmatch(value)):
            raise PathSyntaxError("bad parameter syntax")
        if eq:
            text = decodeText(value)
            if text is None:
                raise PathSyntaxError("parameter value is not UTF-8 text")
            parameters[keyword.decode("ascii").upper()] = text
        else:
            parameters[keyword.decode("ascii").upper()] = None
    return MailArguments(address, parameters)


_ENHANCED = re.compile(r"[245]\.\d{1,3}\.\d{1,3}(?: |$)")


def splitEnhancedCode(text: str) -> tuple[str | None, str]:
    """
    An RFC 2034 code at the start of C{text}, and the rest.

    >>> splitEnhancedCode("4.2.2 Mailbox full"), splitEnhancedCode("Full")
    (('4.2.2', 'Mailbox full'), (None, 'Full'))
    """
    match = _ENHANCED.match(text)
    if match is None:
        return None, text
    return match.group().strip(), text[match.end() :]


def formatReply(code: int, text: str, enhanced: str | None = None) -> bytes:
    """
    Format a reply, multi-line when C{text} has several lines.

    C{enhanced} (RFC 2034, e.g. C{"2.0.0"}) is put before each line's text
    unless the text already starts with an enhanced code.

    >>> formatReply(250, "OK", "2.0.0")
    b'250 2.0.0 OK\\r\\n'

    See L{cachedReply} for replies whose text does not vary.
    """
    lines = text.splitlines() or [""]
    if enhanced and _ENHANCED.match(lines[0]):
        enhanced = None
    out = []
    last = len(lines) - 1
    for index, line in enumerate(lines):
        separator = " " if index == last else "-"
        if enhanced:
            line = f"{enhanced} {line}" if line else enhanced
        out.append(f"{code}{separator}{line}".encode("utf-8") + CRLF)
    return b"".join(out)


#: L{formatReply} for the few constant replies that make up most of a
#: session.  Texts that vary (a queue id, a client's address) go to
#: L{formatReply} itself, so they never push the constant ones out.
cachedReply = functools.lru_cache(maxsize=256)(formatReply)


def defaultEnhancedCode(code: int) -> str | None:
    """
    A generic enhanced status code for a reply code: C{250} -> C{"2.0.0"}.
    The greeting (220), AUTH challenges (334) and 354 carry none.
    """
    if code in (220, 334, 354):
        return None
    klass = code // 100
    if klass in (2, 4, 5):
        return f"{klass}.0.0"
    return None

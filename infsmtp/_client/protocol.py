"""
The client's protocol: one SMTP session, driven command by command.

- :class:`ReplyParser` turns reply lines into :class:`Reply` values.
- :func:`parseExtensions` reads the EHLO reply.
- :class:`DotStuffer` turns message bytes into DATA bytes: CRLF line endings,
  leading dots doubled, the final ``.``, whatever the chunk boundaries.
- :class:`ESMTPSessionClient` is the protocol: a Twisted ``ESMTPClient`` whose
  one-message state machine is replaced by methods returning Deferreds, so a
  session parks after EHLO and goes on as long as its user wants.

Replies are matched to commands in order, which is what makes pipelining
(RFC 2920) simple: a group of commands goes out in one write, and the group's
replies fill the Deferreds queued for them.

The server is not trusted: its replies are bounded (:data:`MAX_REPLY_LINE`,
:data:`MAX_REPLY_LINES`, :data:`MAX_REPLY_SIZE`), the numbers it gives are
read only when they are what RFC 5321 and RFC 1870 allow, and its text
reaches an error message only redacted, escaped and cut
(:func:`quoteServerText`).  What the client sends is checked the same way:
an address, a name or a credential that could put a parameter, a command or
a SASL field of its own on the wire is refused before anything is sent.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections import deque
from dataclasses import dataclass
from typing import IO, Any, Callable, Iterable, Mapping, Sequence

from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IPullProducer, ISSLTransport
from twisted.mail.interfaces import IClientAuthentication
from twisted.mail.smtp import ESMTPClient, PLAINAuthenticator
from twisted.python.failure import Failure
from zope.interface import implementer

from .._errors import (
    SMTPAuthenticationError,
    SMTPConnectError,
    SMTPError,
    SMTPProtocolError,
    SMTPRecipientsRefused,
    SMTPTimeoutError,
    SMTPTLSError,
)
from .._writenow import writeNow
from .envelope import OutgoingMessage
from .oauth import BEARER_MECHANISMS, BearerTokens, saslName
from .tls import negotiatedVersion

CRLF = b"\r\n"

#: Bytes read from a message file per write while streaming DATA.
CHUNK_SIZE = 65536

#: BDAT chunks sent ahead of their replies, at most: CHUNK_SIZE bytes
#: each, what is in flight on a high-latency path.
MAX_CHUNKS_UNANSWERED = 8

#: Give up a SASL exchange that asks for more rounds than any mechanism we
#: speak needs.
MAX_SASL_ROUNDS = 5

#: The longest reply line accepted, in bytes, its line ending included.
#: RFC 5321 (4.5.3.1.5) sets 512; smtplib's and aiosmtplib's 8192 leaves
#: room for servers that ignore it and still bounds what a broken one can
#: make us hold.
MAX_REPLY_LINE = 8192

#: The most lines one reply may have.  An EHLO reply, the longest in
#: practice, has a few dozen; a server sending ``250-`` lines forever is cut
#: off here instead of filling the client's memory.
MAX_REPLY_LINES = 1000

#: The most bytes one reply may have, each line counted with a CRLF:
#: bounds a reply of long lines, which :data:`MAX_REPLY_LINES` alone would let
#: reach 8 MB.
MAX_REPLY_SIZE = 65536

#: The most characters of a server's text quoted in an error message.
MAX_QUOTED_TEXT = 1000

#: RFC 1870: the SIZE limit is at most 20 digits.
MAX_SIZE_DIGITS = 20

#: Why calls fail after :meth:`ESMTPSessionClient.abort`.
CLOSED_BY_CLIENT = "the connection was closed by the client"


@dataclass(frozen=True)
class Reply:
    """
    A server reply: its code and the text of each of its lines.
    """

    code: int
    lines: tuple[str, ...]

    @property
    def text(self) -> str:
        """
        The reply's lines joined with newlines.
        """
        return "\n".join(self.lines)

    @property
    def positive(self) -> bool:
        """
        Whether the code is 2yz (done) or 3yz (go on).
        """
        return 200 <= self.code < 400


class ReplyParser:
    """
    Gather reply lines (without their line ending) into :class:`Reply` values.

    >>> parser = ReplyParser()
    >>> parser.feed(b"250-mx.example.org"), parser.feed(b"250 SIZE 1000")
    (None, Reply(code=250, lines=('mx.example.org', 'SIZE 1000')))

    :meth:`feed` raises :class:`SMTPProtocolError` for a line that is not a
    reply line, whose code differs from the previous lines of its reply, or
    that makes its reply longer than :data:`MAX_REPLY_LINES` lines or
    :data:`MAX_REPLY_SIZE` bytes.  The length of each line is the framing's
    business (:data:`MAX_REPLY_LINE`).

    :param secrets: what to keep out of error messages that quote the
        server (a list the owner may add to later, see :func:`redact`).
    """

    def __init__(self, secrets: Sequence[str] = ()) -> None:
        self._secrets = secrets
        self._code: int | None = None
        self._lines: list[str] = []
        # The bytes of the reply so far, each line counted with a CRLF.
        self._size = 0

    def feed(self, line: bytes) -> Reply | None:
        """
        Add one line; return the reply it completes, if any.
        """
        # One look-up checks the code's digits and the separator after it:
        # a code is exactly three ASCII digits, never anything int() takes.
        kind = _REPLY_PREFIXES.get(line[:4])
        if kind is None:
            quoted = quoteServerText(line.decode("utf-8", "replace"), self._secrets)
            raise SMTPProtocolError(f'malformed reply line from the server: "{quoted}"')
        code, last = kind
        text = line[4:].decode("utf-8", "replace")
        if self._code is None:
            if last:
                # A one-line reply, the usual case: bounded by the line limit.
                return Reply(code, (text,))
        elif code != self._code:
            raise SMTPProtocolError(
                f"reply line with code {code} inside a reply with code {self._code}"
            )
        # Checked before the line is kept: never more than the limits held.
        lines = self._lines
        if len(lines) >= MAX_REPLY_LINES:
            raise SMTPProtocolError(f"the server's reply has more than {MAX_REPLY_LINES} lines")
        size = self._size + len(line) + 2
        if size > MAX_REPLY_SIZE:
            raise SMTPProtocolError(f"the server's reply is longer than {MAX_REPLY_SIZE} bytes")
        lines.append(text)
        self._size = size
        if not last:
            self._code = code
            return None
        reply = Reply(code, tuple(lines))
        self._code = None
        self._lines = []
        self._size = 0
        return reply


def _replyPrefixes() -> dict[bytes, tuple[int, bool]]:
    # The first bytes of every well-formed reply line -> (code, whether the
    # line ends its reply): "250 " and a bare "250" end it, "250-" does not.
    prefixes = {}
    for code in range(200, 560):
        digits = b"%d" % code
        if digits[1:2] in b"012345":
            prefixes[digits] = prefixes[digits + b" "] = (code, True)
            prefixes[digits + b"-"] = (code, False)
    return prefixes


_REPLY_PREFIXES = _replyPrefixes()


def parseExtensions(reply: Reply) -> dict[str, str]:
    """
    The service extensions an EHLO reply announces: keyword (upper case) ->
    parameters.  The obsolete ``AUTH=PLAIN LOGIN`` form counts as ``AUTH``.

    >>> parseExtensions(Reply(250, ("mx", "SIZE 1000", "AUTH=LOGIN", "AUTH PLAIN")))
    {'SIZE': '1000', 'AUTH': 'LOGIN PLAIN'}
    """
    extensions: dict[str, str] = {}
    for line in reply.lines[1:]:
        keyword, _, parameters = line.strip().partition(" ")
        keyword = keyword.upper()
        if keyword.startswith("AUTH="):
            keyword, parameters = "AUTH", keyword[5:] + " " + parameters
        if not keyword:
            continue
        if keyword == "AUTH" and keyword in extensions:
            parameters = extensions[keyword] + " " + parameters
        extensions[keyword] = " ".join(parameters.split())
    return extensions


def sizeLimit(extensions: dict[str, str]) -> int | None:
    """
    The message size limit that the SIZE extension announces, or ``None``
    when there is none: no SIZE, ``SIZE`` without a number or with 0 (RFC
    1870: no fixed limit), or a value that is not 1 to 20 ASCII digits.  A
    malformed value is a limit the client cannot know, not an error: the
    server still refuses what is too big for it.

    >>> sizeLimit({"SIZE": "1000"}), sizeLimit({"SIZE": "\N{SUPERSCRIPT TWO}"})
    (1000, None)
    """
    value = extensions.get("SIZE")
    # isdigit() alone takes "\N{SUPERSCRIPT TWO}", which int() refuses, and
    # int() refuses more than 4300 digits: check length and ASCII first.
    if value and len(value) <= MAX_SIZE_DIGITS and value.isascii() and value.isdigit():
        return int(value) or None
    return None


class DotStuffer:
    """
    Turn a message, fed in chunks of any size, into the bytes sent after
    DATA (RFC 5321 section 4.5.2).

    Every line ending (CRLF, a lone LF or a lone CR) becomes CRLF, a dot
    that starts a line is doubled, and :meth:`finish` ends the last line if
    needed and adds the terminating ``.``.  The state carried from one chunk
    to the next is two flags, so chunk boundaries anywhere (inside a CRLF,
    right before a dot) change nothing, and each chunk costs a few passes of
    C-speed ``bytes`` operations.

    >>> stuffer = DotStuffer()
    >>> stuffer.feed(b".hi\\r") + stuffer.feed(b"\\n.") + stuffer.finish()
    b'..hi\\r\\n..\\r\\n.\\r\\n'

    With ``dots=False`` it only makes the line endings CRLF and ends the
    last line, which is what BDAT sends (RFC 3030: counted, not stuffed):

    >>> lines = DotStuffer(dots=False)
    >>> lines.feed(b".hi\\n.") + lines.finish()
    b'.hi\\r\\n.\\r\\n'
    """

    def __init__(self, dots: bool = True) -> None:
        # Whether dots are doubled and the terminating "." added (DATA).
        self._dots = dots
        # Whether the next byte starts a line (true before the first one).
        self._atLineStart = True
        # Whether the previous chunk ended with CR, already sent as CRLF, so
        # that an LF starting this chunk completes that line ending.
        self._afterCR = False

    def feed(self, chunk: bytes) -> bytes:
        """
        Return the DATA bytes for the next chunk of the message.
        """
        if not chunk:
            return b""
        if self._afterCR and chunk[:1] == b"\n":
            chunk = chunk[1:]
            self._afterCR = False
            if not chunk:
                return b""
        self._afterCR = chunk[-1:] == b"\r"
        lineFeeds = chunk.count(b"\n")
        if chunk.count(b"\r") != lineFeeds or chunk.count(CRLF) != lineFeeds:
            # Not every line ends with CRLF already.
            if b"\r" in chunk:
                chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
            chunk = chunk.replace(b"\n", CRLF)
        if self._dots:
            if b"\n." in chunk:
                chunk = chunk.replace(b"\n.", b"\n..")
            if self._atLineStart and chunk[:1] == b".":
                chunk = b"." + chunk
        self._atLineStart = chunk[-1:] == b"\n"
        return chunk

    def finish(self) -> bytes:
        """
        Return the bytes that end DATA (with ``dots=False``: that end the
        last line, if it needs it).
        """
        if self._dots:
            return b".\r\n" if self._atLineStart else b"\r\n.\r\n"
        return b"" if self._atLineStart else CRLF


@implementer(IClientAuthentication)
class XOAUTH2Authenticator:
    """
    The ``XOAUTH2`` SASL mechanism of Google and Microsoft: the secret is an
    OAuth 2.0 bearer token.  A server that refuses the token sends a 334
    challenge with details in JSON, which is answered with an empty line.
    """

    def __init__(self, user: bytes) -> None:
        self.user = user
        self._sent = False

    def getName(self) -> bytes:
        return b"XOAUTH2"

    def challengeResponse(self, secret: bytes, chal: bytes) -> bytes:
        if self._sent:
            return b""
        self._sent = True
        return b"user=" + self.user + b"\x01auth=Bearer " + secret + b"\x01\x01"


@implementer(IClientAuthentication)
class OAUTHBEARERAuthenticator:
    """
    ``OAUTHBEARER`` (RFC 7628): a GS2 header naming the user, the host and
    port connected to, and the OAuth 2.0 bearer token.  A server that
    refuses the token sends a 334 challenge with details in JSON, which is
    answered with a lone ^A (3.2.3); it then sends its failure reply.

    :raises SMTPAuthenticationError: when ``host`` holds a control
        character, which would add a field of its own.
    """

    def __init__(self, user: bytes, host: str | None = None, port: int | None = None) -> None:
        if host is not None:
            bad = _CONTROL.search(host)
            if bad is not None:
                raise SMTPAuthenticationError(
                    f"the host name sent by OAUTHBEARER {_shown(host)} contains "
                    f"{_describeCharacter(bad.group())}"
                )
        self.user = user
        self.host = host
        self.port = port
        self._sent = False

    def getName(self) -> bytes:
        return b"OAUTHBEARER"

    def challengeResponse(self, secret: bytes, chal: bytes) -> bytes:
        if self._sent:
            return b"\x01"
        self._sent = True
        user = self.user.decode("utf-8")
        header = b"n," + (b"a=" + saslName(user).encode("utf-8") if user else b"") + b",\x01"
        fields = b""
        if self.host:
            fields += b"host=" + self.host.encode("utf-8") + b"\x01"
        if self.port is not None:
            fields += b"port=%d\x01" % self.port
        return header + fields + b"auth=Bearer " + secret + b"\x01\x01"


class _EmptyAuthzPLAIN(PLAINAuthenticator):
    """
    PLAIN with an empty authorization identity.  Twisted's authenticator
    sends ``user\\0user\\0secret`` on its first try, which some servers
    refuse; the empty form means "act as the user who authenticates".
    """

    def challengeResponse(self, secret: bytes, chal: object = None) -> bytes:
        return super().challengeResponse(secret, 2)


@implementer(IClientAuthentication)
class CramMD5Authenticator:
    """
    ``CRAM-MD5`` (RFC 2195): the answer to the challenge is the user name, a
    space, and the HMAC-MD5 of the challenge keyed with the secret, in
    lowercase hex.
    """

    def __init__(self, user: bytes) -> None:
        self.user = user

    def getName(self) -> bytes:
        return b"CRAM-MD5"

    def challengeResponse(self, secret: bytes, chal: bytes) -> bytes:
        digest = hmac.new(secret, chal, hashlib.md5).hexdigest()
        return self.user + b" " + digest.encode("ascii")


@implementer(IClientAuthentication)
class LoginAuthenticator:
    """
    ``LOGIN`` (draft-murchison-sasl-login): the first challenge is answered
    with the user name and every later one with the secret, whatever the
    prompts say (servers word them differently).
    """

    def __init__(self, user: bytes) -> None:
        self.user = user
        self._userSent = False

    def getName(self) -> bytes:
        return b"LOGIN"

    def challengeResponse(self, secret: bytes, chal: bytes) -> bytes:
        if self._userSent:
            return secret
        self._userSent = True
        return self.user


def _answersLikeTheRFCs(cramMD5: Callable[[bytes], Any], login: Callable[[bytes], Any]) -> bool:
    """
    Whether these CRAM-MD5 and LOGIN authenticator factories give the
    answers of RFC 2195's example and of a LOGIN exchange.
    """
    try:
        cram = cramMD5(b"tim")
        loginUser = login(b"user")
        return (
            IClientAuthentication.providedBy(cram)
            and IClientAuthentication.providedBy(loginUser)
            and cram.getName() == b"CRAM-MD5"
            and cram.challengeResponse(b"tanstaaftanstaaf", b"<1896.697170952@postoffice.reston.mci.net>")
            == b"tim b913a602c7eda7a495b4e6e7334d3890"
            and loginUser.getName() == b"LOGIN"
            and loginUser.challengeResponse(b"secret", b"Username:") == b"user"
            and loginUser.challengeResponse(b"secret", b"Password:") == b"secret"
        )
    except Exception:
        return False


def _saslAuthenticators() -> tuple[Callable[[bytes], Any], Callable[[bytes], Any]]:
    """
    The CRAM-MD5 and LOGIN authenticator factories: Twisted's, which live in
    its private ``twisted.mail._cred``, while they are there and answer as
    the RFCs say; ours otherwise, so that a Twisted release that moves or
    changes them cannot break AUTH.
    """
    try:
        from twisted.mail._cred import CramMD5ClientAuthenticator, LOGINAuthenticator
    except ImportError:
        return CramMD5Authenticator, LoginAuthenticator
    if _answersLikeTheRFCs(CramMD5ClientAuthenticator, LOGINAuthenticator):
        return CramMD5ClientAuthenticator, LOGINAuthenticator
    return CramMD5Authenticator, LoginAuthenticator


CramMD5ClientAuthenticator, LOGINAuthenticator = _saslAuthenticators()

#: Mechanism name -> (authenticator factory, sends an initial response).
MECHANISMS: dict[str, tuple[Callable[[bytes], IClientAuthentication], bool]] = {
    "CRAM-MD5": (CramMD5ClientAuthenticator, False),
    "PLAIN": (_EmptyAuthzPLAIN, True),
    "LOGIN": (LOGINAuthenticator, False),
    "XOAUTH2": (XOAUTH2Authenticator, True),
    "OAUTHBEARER": (OAUTHBEARERAuthenticator, True),
}


def redact(text: str, secrets: Iterable[bytes | str]) -> str:
    """
    ``text`` with every non-empty secret replaced by ``***``, for errors that
    quote a server which echoes what it was sent.
    """
    for secret in secrets:
        if isinstance(secret, bytes):
            secret = secret.decode("utf-8", "replace")
        if secret:
            text = text.replace(secret, "***")
    return text


# Characters that would let server text rewrite a log or a terminal: C0
# (but LF, which joins the lines of a reply), DEL, C1, and the Unicode line
# and paragraph separators.
_UNSAFE_TEXT = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029]")


def quoteServerText(text: str, secrets: Iterable[bytes | str] = ()) -> str:
    """
    A server's ``text`` made fit for an error message: the ``secrets`` it
    echoes replaced by ``***`` (:func:`redact`), control characters escaped
    as Python would show them, and cut to :data:`MAX_QUOTED_TEXT` characters.

    >>> quoteServerText("535 no\\x1b[2J for me:s3cret", [b"s3cret"])
    '535 no\\\\x1b[2J for me:***'
    """
    # Redacted first, so that neither escaping nor the cut can leave part
    # of a secret behind.
    text = redact(text, secrets)
    if _UNSAFE_TEXT.search(text) is not None:
        text = _UNSAFE_TEXT.sub(_escape, text)
    if len(text) > MAX_QUOTED_TEXT:
        text = text[:MAX_QUOTED_TEXT] + f"... ({len(text) - MAX_QUOTED_TEXT} more characters)"
    return text


def _escape(match: re.Match[str]) -> str:
    return match.group().encode("unicode_escape").decode("ascii")


# What may not appear in an argument of a command: a control character
# (NUL, CR and LF included) or a space would end the argument early and
# smuggle in a parameter, a command, or garbage; Unicode spaces and line
# separators (all in \s) are refused alike, for servers that split
# decoded text.
_SPACE_OR_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\s]")

# In a path, angle brackets as well: "x@y.z> NOTIFY=SUCCESS" would close the
# path and add a parameter.  This refuses quoted local parts with spaces,
# which RFC 5321 (4.1.2) advises against.
_UNSAFE_IN_PATH = re.compile(r"[\x00-\x1f<>\x7f-\x9f\s]")

# In credentials, which go out base64-encoded, spaces are harmless; a NUL
# would add a PLAIN field and a ^A an XOAUTH2 one.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


# Bound once: on the path of every command, an attribute look-up costs
# as much as the search of a short address.
_findSpaceOrControl = _SPACE_OR_CONTROL.search
_findUnsafeInPath = _UNSAFE_IN_PATH.search


def _checkArgument(
    value: str, what: str, findUnsafe: Callable[[str], re.Match[str] | None] = _findSpaceOrControl
) -> bytes:
    """
    ``value`` encoded for the wire, or an :class:`SMTPError` naming it when
    ``findUnsafe`` finds a character in it.
    """
    bad = findUnsafe(value)
    if bad is not None:
        raise _unsafeArgument(value, what, bad)
    return value.encode("utf-8")


def _unsafeArgument(value: str, what: str, bad: re.Match[str]) -> SMTPError:
    return SMTPError(f"{what} {_shown(value)} contains {_describeCharacter(bad.group())}")


def _shown(value: str) -> str:
    # An address may come from a message's headers: do not quote a huge one.
    shown = repr(value)
    return shown if len(shown) <= 200 else shown[:200] + "..."


def _describeCharacter(character: str) -> str:
    if character == " ":
        return "a space"
    if character in "<>":
        return repr(character)
    return f"the control or space character U+{ord(character):04X}"


def _path(address: str, what: str) -> bytes:
    """
    ``<address>`` for MAIL FROM and RCPT TO; ``address`` may already have
    its angle brackets.  ``what`` names it in errors.
    """
    address = address.strip()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1]
    bad = _findUnsafeInPath(address)
    if bad is not None:
        raise _unsafeArgument(address, what, bad)
    return b"<" + address.encode("utf-8") + b">"


#: RFC 5321 4.1.2's esmtp-param: a keyword, and a value of printable ASCII
#: but "="; "<" and ">" are refused too, so that no option can close or
#: open a path.
_ESMTP_PARAMETER = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*(?:=[\x21-\x3b\x3f-\x7e]+)?", re.ASCII)


def esmtpParameters(options: Sequence[str] | str, what: str) -> tuple[bytes, list[str]]:
    """
    ``options`` (``"NOTIFY=SUCCESS,FAILURE"``, ...) as the bytes to append
    to MAIL or RCPT (each after a space), and their keywords in upper case.

    :raises SMTPError: when an option is not ``KEYWORD`` or
        ``KEYWORD=VALUE`` (RFC 5321 4.1.2): a space, a control character,
        ``<``, ``>`` or a second ``=`` would inject parameters or commands.
    """
    if isinstance(options, str):
        options = [options]
    encoded, keywords = [], []
    for option in options:
        if not isinstance(option, str) or _ESMTP_PARAMETER.fullmatch(option) is None:
            raise SMTPError(
                f"{what} {_shown(option)} is not KEYWORD or KEYWORD=VALUE (printable ASCII; "
                "no space, '<', '>' or second '=')"
            )
        encoded.append(b" " + option.encode("ascii"))
        keywords.append(option.partition("=")[0].upper())
    return b"".join(encoded), keywords


def _withRcptOptions(
    rcpts: list[bytes], recipients: Sequence[str], rcptOptions: Sequence[str] | Mapping[str, Sequence[str]]
) -> list[bytes]:
    """
    The RCPT commands ``rcpts`` (one per recipient) with their options:
    the same for every one, or from a mapping of recipient -> options.

    :raises SMTPError: when an option is malformed, or the mapping names an
        address that is not a recipient (a typo would otherwise drop the
        options silently).
    """
    if not isinstance(rcptOptions, Mapping):
        extra = esmtpParameters(rcptOptions, "RCPT option")[0]
        return [line + extra for line in rcpts]
    unknown = [address for address in rcptOptions if address not in recipients]
    if unknown:
        raise SMTPError(f"rcptOptions names {_shown(str(unknown[0]))}, which is not a recipient")
    return [
        line + esmtpParameters(rcptOptions.get(recipient, ()), "RCPT option")[0]
        for line, recipient in zip(rcpts, recipients)  # noqa: B905
    ]


def heloArgument(heloName: str) -> bytes:
    """
    ``heloName`` as sent after EHLO or HELO.

    :raises SMTPError: when it is empty or holds a space or a control
        character.
    """
    if not heloName:
        raise SMTPError("heloName is empty")
    return _checkArgument(heloName, "heloName")


def checkCredentials(username: str, password: str) -> None:
    """
    Refuse credentials that would change the SASL message they go into.

    :raises SMTPAuthenticationError: when the username or the password holds
        a control character (a NUL adds a PLAIN field, a ^A an XOAUTH2 one,
        and a password read from a file may end with its newline).  The
        password is never quoted.
    """
    bad = _CONTROL.search(username)
    if bad is not None:
        raise SMTPAuthenticationError(f"username {_shown(username)} contains {_describeCharacter(bad.group())}")
    bad = _CONTROL.search(password)
    if bad is not None:
        raise SMTPAuthenticationError(f"the password contains {_describeCharacter(bad.group())}")


class ESMTPSessionClient(ESMTPClient):
    """
    One SMTP session, driven by its user through methods that return
    Deferreds: :meth:`whenGreeted`, :meth:`ehlo`, :meth:`startTLS`,
    :meth:`authenticate`, :meth:`sendMessage`, :meth:`verify` and
    :meth:`quit`.  Between them the session is idle: the reply timer, if it
    still runs, lapses without effect.

    Twisted's ``ESMTPClient`` provides the protocol plumbing; its state
    machine (the ``smtpState_*`` methods, which send one message and quit)
    and its line-by-line framing are not used: replies are parsed straight
    from each received chunk, and a pipelined group's replies go to one
    waiter together.  Nothing sent is recorded (Twisted's debug log would
    keep ``AUTH`` lines), and every failure surfaces as an
    :class:`SMTPError` on whatever waits for replies, through
    ``connectionLost``, which every transport calls, endpoints included.

    :ivar extensions: what the last EHLO reply announced (empty after HELO).
    :ivar timeout: seconds the server has for each reply.
    :ivar dataTimeout: seconds it has for its reply to the end of a message
        (RFC 5321 4.5.3.2.6 says 10 minutes: it may be scanning the message,
        and giving up earlier risks a second delivery when the sender
        retries).
    """

    # Twisted's SMTPClient logs every line when debug is on: never do that.
    debug = False

    # ESMTPClient's __setattr__ is Python code (for its tlsMode, deprecated
    # since Twisted 13, which nothing here uses): it made every attribute
    # store on the send path a function call.  Plain stores instead.
    __setattr__ = object.__setattr__

    #: The longest reply line, its line ending included.
    MAX_LENGTH = MAX_REPLY_LINE

    def __init__(
        self,
        heloName: str,
        timeout: float,
        dataTimeout: float | None = None,
        *,
        lmtp: bool = False,
        chunking: bool = True,
    ) -> None:
        # Not ESMTPClient.__init__: of the ten attributes it and
        # SMTPClient.__init__ set, only `identity` serves here (the others
        # feed their state machine and line log, which are not used), and
        # each one more in the instance's dict costs every attribute access
        # on the send path (see the comment on `_atEndOfMessage`).
        self.identity = heloArgument(heloName)
        # RFC 2033: LHLO, and one reply per accepted recipient after the data.
        self._lmtp = lmtp
        # Whether to send the message with BDAT when the server offers
        # CHUNKING (RFC 3030).
        self._chunking = chunking
        self.timeout = timeout
        self.dataTimeout = timeout if dataTimeout is None else dataTimeout
        # Whether the reply awaited is the one to the end of a message, which
        # gets `dataTimeout`.  (No attribute more than needed: past 30, an
        # instance's attributes leave CPython's shared-key dict and every
        # access on the hot path gets slower; see test_client_unit.)
        self._atEndOfMessage = False
        self.extensions: dict[str, str] = {}
        # What the SIZE of `extensions` allows, when it is readable.
        self._sizeLimit: int | None = None
        self.authenticated = False
        # The credentials sent in this session, and their encodings: kept
        # out of every error message that quotes the server.
        self._secrets: list[str] = []
        self._parser = ReplyParser(self._secrets)
        # What waits for replies, in the order of the commands sent: (how
        # many replies, called with the reply or with the list of them when
        # several, called with an SMTPError if the session fails first).
        self._waiting: deque[tuple[int, Callable[[Any], object], Callable[[SMTPError], object]]] = deque()
        # The replies received so far for the first waiter, when it wants several.
        self._gathered: list[Reply] = []
        # Runs while replies are awaited; once nothing is, it lapses harmlessly.
        self._timer: IDelayedCall | None = None
        self._greeting: Deferred[Reply] = Deferred()
        self._waiting.append((1, self._greeting.callback, self._greeting.errback))
        # Deferreds waiting for the connection to close; None once closed.
        self._lostWatchers: list[Deferred[None]] | None = []
        self._failure: SMTPError | None = None
        self._unsolicited: Reply | None = None
        # Whether a mail transaction is open (MAIL accepted, no final reply).
        self._inTransaction = False

    # Transport events

    def connectionMade(self) -> None:
        # Not ESMTPClient's, which starts its state machine: the greeting
        # is already awaited.
        self._armTimer()
        noDelay = getattr(self.transport, "setTcpNoDelay", None)
        if noDelay is not None:
            try:
                # Each write is a complete group of commands or the end of a
                # message: Nagle's algorithm would only hold it back until
                # the server's delayed ACK.
                noDelay(True)
            except OSError:
                pass

    def dataReceived(self, data: bytes) -> None:
        if self._failure is not None:
            # Aborted: a TLS transport may still hand over what it had
            # decrypted, which nothing would read.
            return
        if self._buffer:
            data = self._buffer + data
        lines = data.split(b"\n")
        # Stored first, so that STARTTLS can drop it (clearLineBuffer).
        self._buffer = rest = lines.pop()
        parser, waiting, limit = self._parser, self._waiting, self.MAX_LENGTH
        progress = False
        for line in lines:
            # `line` lacks its LF: with it, at most `limit` bytes.
            if len(line) >= limit:
                self.lineLengthExceeded(line)
                return
            if line[-1:] == b"\r":
                line = line[:-1]
            try:
                reply = parser.feed(line)
            except SMTPError as e:
                self._abort(e)
                return
            if reply is None:
                continue
            if not waiting:
                # Typically 421 before the server closes an idle session.
                self._unsolicited = reply
                continue
            progress = True
            wanted, onReply, _ = waiting[0]
            if wanted > 1:
                gathered = self._gathered
                gathered.append(reply)
                if len(gathered) < wanted:
                    continue
                self._gathered = []
                reply = gathered  # type: ignore[assignment]
            waiting.popleft()
            onReply(reply)
            if self._parser is not parser or self._failure is not None:
                # After STARTTLS's 220 whatever follows came in plaintext
                # and is dropped; after a failure nothing matters.
                return
        if len(rest) >= limit:
            # No LF yet, and one would make the line too long: no need to
            # hold more of it.
            self.lineLengthExceeded(rest)
        elif progress and waiting:
            self._armTimer()

    def lineLengthExceeded(self, line: bytes) -> None:
        # What is left of the line is never read: do not hold it either.
        self._buffer = b""
        self._abort(
            SMTPProtocolError(f"the server sent a reply line longer than {self.MAX_LENGTH} bytes")
        )

    def _armTimer(self) -> None:
        """
        Give the server :attr:`timeout` seconds from now for its next reply
        (:attr:`dataTimeout` for the reply to the end of a message).
        """
        seconds = self.dataTimeout if self._atEndOfMessage else self.timeout
        timer = self._timer
        if timer is not None and timer.active():
            timer.reset(seconds)
        else:
            self._timer = self.callLater(seconds, self.timeoutConnection)

    def _endOfMessage(self, sent: bool) -> None:
        """
        Switch the reply timer to :attr:`dataTimeout` when the final dot is
        about to go (``sent``), back to :attr:`timeout` once it is answered.
        The pipelined path of :meth:`sendMessage` does the same inline.
        """
        self._atEndOfMessage = sent

    def _stopTimer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def timeoutConnection(self) -> None:
        self._timer = None
        if self._waiting:
            if self._atEndOfMessage:
                # The server may have the message: saying so tells the
                # caller that a retry may deliver it twice.
                what = f"to the end of the message within {self.dataTimeout:g} seconds (it may have been delivered)"
            else:
                what = f"within {self.timeout:g} seconds"
            self._abort(SMTPTimeoutError(f"no reply from the server {what}"))

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self._stopTimer()
        super().connectionLost(reason)
        error = self._failure = self._failure or self._lostError(reason)
        if self._atEndOfMessage:
            # The end of the message went out (or was going): the server may
            # have it, so whoever retries must know.
            _messageStarted(error)
        waiting, self._waiting = self._waiting, deque()
        self._gathered = []
        # Closed before anyone hears of it: what a failure's callbacks do
        # (the user's included) sees `connected` false.
        watchers, self._lostWatchers = self._lostWatchers or [], None
        for _, _, onFailure in waiting:
            onFailure(error)
        for watcher in watchers:
            watcher.callback(None)

    def _lostError(self, reason: Failure | None) -> SMTPError:
        if reason is not None and reason.check(SSL.Error, VerificationError):
            return SMTPTLSError(f"TLS failed: {self._quote(_describeTLSFailure(reason.value))}")
        # The server's reason for closing: a 421 among the replies of a
        # pipelined group cut short, else a reply sent while none was awaited.
        closing = next((r for r in self._gathered if r.code == 421), self._unsolicited)
        if closing is not None:
            return SMTPConnectError(
                closing.code, "the server closed the connection: " + self._quote(closing.text)
            )
        detail = reason.getErrorMessage() if reason is not None else "closed"
        return SMTPConnectError(f"the connection to the server was lost ({detail})")

    def _quote(self, text: str) -> str:
        """
        Server ``text`` for an error message (:func:`quoteServerText`).
        """
        return quoteServerText(text, self._secrets)

    def _abort(self, error: SMTPError) -> None:
        if self._failure is None:
            self._failure = error
        self._stopTimer()
        self.transport.abortConnection()

    # Sending commands

    @property
    def connected(self) -> bool:
        """
        Whether the connection is still open.
        """
        return self._lostWatchers is not None

    @connected.setter
    def connected(self, value: object) -> None:
        # Twisted's BaseProtocol keeps its own flag (makeConnection,
        # connectionLost); ours is read from the session's state above.
        pass

    @property
    def closeReason(self) -> SMTPError | None:
        """
        Why the connection closed (or is closing), or ``None`` while open.
        """
        return self._failure

    def whenLost(self) -> Deferred[None]:
        """
        A Deferred that fires once the connection is closed.
        """
        if self._lostWatchers is None:
            return succeed(None)
        watcher: Deferred[None] = Deferred()
        self._lostWatchers.append(watcher)
        return watcher

    def _await(
        self, count: int, onReply: Callable[[Any], object], onFailure: Callable[[SMTPError], object]
    ) -> None:
        """
        Have the next ``count`` replies not yet claimed handed to
        ``onReply`` (the reply itself when ``count`` is 1, else their list),
        or the session's failure to ``onFailure``.
        """
        if self._failure is not None:
            onFailure(self._failure)
            return
        if not self._waiting:
            self._armTimer()
        self._waiting.append((count, onReply, onFailure))

    def _expect(self) -> Deferred[Reply]:
        """
        A Deferred for the next reply not yet claimed.
        """
        waiter: Deferred[Reply] = Deferred()
        self._await(1, waiter.callback, waiter.errback)
        return waiter

    def _write(self, data: bytes) -> None:
        if self._failure is None:
            writeNow(self.transport, data)

    def command(self, line: bytes) -> Deferred[Reply]:
        """
        Send one command; the Deferred fires with its reply, whatever the code.
        """
        self._write(line + CRLF)
        return self._expect()

    # The session

    async def whenGreeted(self) -> Reply:
        """
        Wait for the greeting.

        :raises SMTPConnectError: when the server refuses the session.
        """
        try:
            greeting = await self._greeting
        except SMTPConnectError as e:
            raise self._lostBeforeTLS(e) from None
        if greeting.code != 220:
            raise SMTPConnectError(greeting.code, self._quote(greeting.text))
        return greeting

    async def ehlo(self) -> dict[str, str]:
        """
        Send EHLO, or HELO when the server does not know EHLO, and remember
        the extensions announced; LHLO in LMTP (RFC 2033), which has no
        fallback.
        """
        if self._lmtp:
            reply = await self.command(b"LHLO " + self.identity)
            if reply.code == 250:
                self._announced(parseExtensions(reply))
                return self.extensions
            raise SMTPConnectError(reply.code, self._quote(reply.text))
        reply = await self.command(b"EHLO " + self.identity)
        if reply.code == 250:
            self._announced(parseExtensions(reply))
            return self.extensions
        if reply.code >= 500:
            reply = await self.command(b"HELO " + self.identity)
            if reply.code == 250:
                self._announced({})
                return self.extensions
        raise SMTPConnectError(reply.code, self._quote(reply.text))

    def _announced(self, extensions: dict[str, str]) -> None:
        # The size limit is read once, not for every message.
        self.extensions = extensions
        self._sizeLimit = sizeLimit(extensions)

    async def startTLS(self, creator: object) -> dict[str, str]:
        """
        Send STARTTLS, start TLS with ``creator`` and send EHLO again.

        :raises SMTPTLSError: when the server does not offer or refuses
            STARTTLS; a failed handshake fails the EHLO that follows.
        """
        if "STARTTLS" not in self.extensions:
            raise SMTPTLSError("the server does not offer STARTTLS")
        waiter = self.command(b"STARTTLS")
        # Runs inside dataReceived, before any byte after the 220 is parsed.
        waiter.addCallback(self._switchToTLS, creator)
        await waiter
        try:
            return await self.ehlo()
        except SMTPConnectError as e:
            raise self._lostBeforeTLS(e) from None

    def _lostBeforeTLS(self, error: SMTPConnectError) -> SMTPError:
        """
        ``error``, or an :class:`SMTPTLSError` when the connection was lost
        (no reply) over TLS before the first reply, or the first after
        STARTTLS: a server that refuses a handshake may hang up without the
        alert that would say why (a protocol version it does not take, a
        client certificate it wants), and the caller must know TLS failed.
        """
        if error.code is not None or error.text == CLOSED_BY_CLIENT or not ISSLTransport.providedBy(self.transport):
            # A reply, or our own abort (free() while connecting).
            return error
        return SMTPTLSError(
            f"TLS failed: {error.text}, before TLS was up (the server may refuse "
            "the TLS versions offered, or want a client certificate)"
        )

    def _switchToTLS(self, reply: Reply, creator: object) -> Reply:
        if reply.code != 220:
            raise SMTPTLSError(reply.code, self._quote(reply.text))
        # Whatever came with the 220 was sent before TLS and may have been
        # injected by someone on the path (the STARTTLS injection attack).
        self.clearLineBuffer()
        self._parser = ReplyParser(self._secrets)
        self._announced({})
        self.transport.startTLS(creator)
        return reply

    async def authenticate(
        self,
        mechanisms: Sequence[str],
        username: str,
        password: str,
        tokens: BearerTokens | None = None,
    ) -> bool:
        """
        Authenticate with the first of ``mechanisms`` the server offers that
        works, falling back to the next on any refusal other than 535.

        ``XOAUTH2`` and ``OAUTHBEARER`` send the bearer token of ``tokens``
        (by default ``password``); when the server refuses a token that
        ``tokens`` can refresh, a fresh one is asked for and tried once
        more.

        :returns: ``True`` when the server accepted the credentials, ``False``
            when it answered 535 (bad credentials).
        :raises SMTPAuthenticationError: when the server offers none of
            ``mechanisms``, or every one failed for another reason; before
            anything is sent, when a credential holds a control character
            (:func:`checkCredentials`); when ``tokens`` fails to give one.
        """
        if self.authenticated:
            return True
        checkCredentials(username, password)
        offered = set(self.extensions.get("AUTH", "").upper().split())
        usable = [m.upper() for m in mechanisms if m.upper() in offered and m.upper() in MECHANISMS]
        if not usable:
            raise SMTPAuthenticationError(
                f"the server offers no usable authentication mechanism "
                f"(it offers {' '.join(sorted(offered)) or 'none'}; "
                f"tried {', '.join(mechanisms) or 'none'})"
            )
        user = username.encode("utf-8")
        secret = password.encode("utf-8")
        self._secrets.append(password)
        last: Reply | None = None
        for name in usable:
            if name in BEARER_MECHANISMS:
                last = await self._bearerExchange(name, user, tokens or BearerTokens(username, password))
            else:
                factory, initial = MECHANISMS[name]
                last = await self._saslExchange(factory(user), secret, initial, self._secrets)
            if last.code == 235:
                self.authenticated = True
                return True
            if last.code == 535:
                return False
        assert last is not None
        raise SMTPAuthenticationError(last.code, self._quote(last.text))

    async def _bearerExchange(self, name: str, user: bytes, tokens: BearerTokens) -> Reply:
        """
        ``XOAUTH2`` or ``OAUTHBEARER`` with the token of ``tokens``; after a
        535, once, with a refreshed one (an expired token is the usual
        reason).
        """
        refresh = False
        while True:
            token = await tokens.token(refresh)
            # Before it is sent: a server that echoes it is redacted too.
            self._secrets.append(token)
            if name == "OAUTHBEARER":
                port = getattr(self.transport.getPeer(), "port", None)
                mechanism: IClientAuthentication = OAUTHBEARERAuthenticator(user, tokens.host, port)
            else:
                mechanism = XOAUTH2Authenticator(user)
            reply = await self._saslExchange(mechanism, token.encode("utf-8"), True, self._secrets)
            if reply.code != 535 or refresh or not tokens.refreshable:
                return reply
            refresh = True

    async def _saslExchange(
        self,
        mechanism: IClientAuthentication,
        secret: bytes,
        initial: bool,
        sent: list[str],
    ) -> Reply:
        command = b"AUTH " + mechanism.getName()
        if initial:
            response = base64.b64encode(mechanism.challengeResponse(secret, b""))
            sent.append(response.decode("ascii"))
            # RFC 4954: "=" stands for an empty initial response.
            command += b" " + (response or b"=")
        reply = await self.command(command)
        rounds = 0
        while reply.code == 334:
            rounds += 1
            try:
                challenge = base64.b64decode(reply.text.strip(), validate=True)
            except ValueError:  # binascii.Error, or non-ASCII text
                challenge = None
            if challenge is None or rounds > MAX_SASL_ROUNDS:
                # "*" cancels the exchange (RFC 4954); the server answers 501.
                await self.command(b"*")
                return Reply(501, ("the server sent a malformed or endless SASL challenge",))
            response = base64.b64encode(mechanism.challengeResponse(secret, challenge))
            sent.append(response.decode("ascii"))
            reply = await self.command(response)
        return reply

    def sendMessage(
        self,
        sender: str,
        recipients: Sequence[str],
        message: OutgoingMessage,
        mailOptions: Sequence[str] = (),
        rcptOptions: Sequence[str] = (),
    ) -> Deferred[dict[str, tuple[int, str]]]:
        """
        Run one mail transaction: MAIL, RCPT for each recipient, then the
        message.  With PIPELINING the commands go out as one group.  When
        the server offers CHUNKING too, the message goes with BDAT (RFC
        3030): a message read whole goes in the same write as the envelope
        (``BDAT n LAST``: one round trip), a longer one in counted chunks
        after the envelope was answered; otherwise with DATA.

        In LMTP (RFC 2033) the server answers the end of the message once
        per accepted recipient: those it refuses then are among the refused.

        ``mailOptions`` are ESMTP parameters for MAIL (``"RET=HDRS"``),
        replacing the client's own ``SIZE``, ``BODY`` or ``SMTPUTF8`` when
        they name one; ``REQUIRETLS`` (RFC 8689) only goes over TLS to a
        server that offers it.  ``rcptOptions`` go on every RCPT
        (``"NOTIFY=SUCCESS,FAILURE"``), or, a mapping, on each recipient's
        own (``{"bob@example.org": ["NOTIFY=NEVER"]}``).

        :returns: a Deferred firing with the refused recipients, address ->
            (code, text).
        :raises SMTPRecipientsRefused: when every recipient was refused (in
            LMTP, also after the message).
        :raises SMTPError: when the sender, DATA or the message was refused;
            before sending anything, when the message is over the server's
            SIZE limit or an address could inject (a space, ``<``, ``>`` or
            a control character; an empty recipient).
        """
        try:
            if not recipients:
                raise SMTPError("no recipients")
            mail = b"MAIL FROM:" + (_path(sender, "sender address") if sender else b"<>")
            rcpts = [b"RCPT TO:" + _path(r, "recipient address") for r in recipients]
            if b"RCPT TO:<>" in rcpts:
                # The null path is a sender's only.
                raise SMTPError("a recipient address is empty")
            if mailOptions or rcptOptions:
                extra, given = esmtpParameters(mailOptions, "MAIL option")
                if "REQUIRETLS" in given:
                    self._checkRequireTLS()
                mail += self._mailParameters(sender, recipients, message, given) + extra
                if rcptOptions:
                    rcpts = _withRcptOptions(rcpts, recipients, rcptOptions)
            else:
                mail += self._mailParameters(sender, recipients, message)
        except SMTPError as e:
            return _failed(e)
        extensions = self.extensions
        if "PIPELINING" not in extensions:
            # (BDAT too only with PIPELINING: a server that wants each
            # command answered before the next would make a round trip of
            # every chunk.)
            return Deferred.fromCoroutine(
                self._sendStepByStep(sender, recipients, message, mail, rcpts)
            )
        result: Deferred[dict[str, tuple[int, str]]] = Deferred()
        if self._chunking and "CHUNKING" in extensions:
            self._sendChunked(result, sender, recipients, message, mail, rcpts)
            return result
        # One write, one waiter for the group's replies, and when all went
        # well one more write and one more waiter: no Deferred but the
        # caller's, and no coroutine.
        commands = [b"RSET", mail, *rcpts, b"DATA"] if self._inTransaction else [mail, *rcpts, b"DATA"]
        skip = len(commands) - len(rcpts) - 2

        def answered(replies: list[Reply]) -> None:
            try:
                self._envelopeAnswered(result, replies[skip:], sender, recipients, message)
            except BaseException:
                result.errback()

        self._write(CRLF.join(commands) + CRLF)
        self._await(len(commands), answered, result.errback)
        if message.rest is None:
            # While the server answers: what goes out after its 354.
            stuffer = DotStuffer()
            message.stuffed = stuffer.feed(message.head) + stuffer.finish()
        return result

    def _envelopeAnswered(
        self,
        result: Deferred[dict[str, tuple[int, str]]],
        replies: list[Reply],
        sender: str,
        recipients: Sequence[str],
        message: OutgoingMessage,
    ) -> None:
        mailReply, rcptReplies, dataReply = replies[0], replies[1:-1], replies[-1]
        if mailReply.code == 250 and dataReply.code == 354 and message.rest is None:
            refused = self._refused(recipients, rcptReplies)
            if len(refused) < len(recipients):
                self._inTransaction = True
                count = self._finalCount(rcptReplies)

                def final(reply: Reply | list[Reply]) -> None:
                    self._inTransaction = self._atEndOfMessage = False
                    if count == 1 and reply.code == 250:  # type: ignore[union-attr]
                        result.callback(refused)
                        return
                    try:
                        finals = reply if count > 1 else [reply]
                        result.callback(self._delivered(recipients, rcptReplies, refused, finals))  # type: ignore[arg-type]
                    except SMTPError as e:
                        result.errback(e)

                # The whole message and its end in one write: one round trip.
                # Its reply gets dataTimeout (set here, so that _await arms
                # the timer with it).
                self._atEndOfMessage = True
                self._await(count, final, result.errback)
                self._write(message.stuffed)
                return
        Deferred.fromCoroutine(
            self._afterEnvelope(mailReply, rcptReplies, dataReply, sender, recipients, message)
        ).chainDeferred(result)

    def _sendChunked(
        self,
        result: Deferred[dict[str, tuple[int, str]]],
        sender: str,
        recipients: Sequence[str],
        message: OutgoingMessage,
        mail: bytes,
        rcpts: list[bytes],
    ) -> None:
        """
        The envelope and, when the message was read whole, ``BDAT n LAST``
        with it, in one write; a longer message is streamed in chunks once
        the envelope was answered.
        """
        commands = [b"RSET", mail, *rcpts] if self._inTransaction else [mail, *rcpts]
        skip = len(commands) - len(rcpts) - 1
        if message.rest is not None:

            def answeredFirst(replies: list[Reply]) -> None:
                mailReply, rcptReplies = replies[skip], replies[skip + 1 :]
                Deferred.fromCoroutine(
                    self._afterEnvelope(mailReply, rcptReplies, None, sender, recipients, message, chunked=True)
                ).chainDeferred(result)

            self._write(CRLF.join(commands) + CRLF)
            self._await(len(commands), answeredFirst, result.errback)
            return

        lines = DotStuffer(dots=False)
        content = lines.feed(message.head) + lines.finish()

        def answered(replies: list[Reply]) -> None:
            mailReply, rcptReplies = replies[skip], replies[skip + 1 :]
            refused = self._refused(recipients, rcptReplies)
            # The transaction is open until the reply to BDAT LAST.
            self._inTransaction = mailReply.code == 250
            if mailReply.code != 250 or len(refused) == len(recipients):
                # BDAT LAST gets one reply (503 or 554): the server read the
                # chunk and dropped it.  The envelope's refusal is the news,
                # and the message cannot have been delivered, whatever
                # happens to that reply.
                envelopeError = (
                    SMTPError(mailReply.code, f"sender {sender!r} refused: {self._quote(mailReply.text)}")
                    if mailReply.code != 250
                    else SMTPRecipientsRefused(refused)
                )
                self._await(1, lambda _: result.errback(envelopeError), lambda _: result.errback(envelopeError))
                return
            count = self._finalCount(rcptReplies)

            def final(reply: Reply | list[Reply]) -> None:
                self._atEndOfMessage = False
                finals = reply if count > 1 else [reply]
                # A refused BDAT leaves the transaction to an RSET (RFC 3030
                # does not say the server ends it).
                self._inTransaction = finals[0].code != 250 and not self._lmtp  # type: ignore[union-attr]
                try:
                    result.callback(self._delivered(recipients, rcptReplies, refused, finals))  # type: ignore[arg-type]
                except SMTPError as e:
                    result.errback(e)

            self._atEndOfMessage = True
            self._await(count, final, result.errback)

        self._write(CRLF.join(commands) + CRLF + b"BDAT %d LAST\r\n" % len(content) + content)
        # The message went out with the envelope: a failure before the
        # replies (a lost connection, a timeout) may come after the server
        # took it.
        self._await(len(commands), answered, lambda e: result.errback(_messageStarted(e)))

    def _checkRequireTLS(self) -> None:
        """
        RFC 8689: a message sent with REQUIRETLS goes only over TLS, to a
        server that offers REQUIRETLS; else it is not sent at all.
        """
        if "REQUIRETLS" not in self.extensions:
            raise SMTPError(550, "5.7.10 REQUIRETLS: the server does not offer REQUIRETLS, so the message must not go")
        if negotiatedVersion(self.transport) is None:
            raise SMTPError(550, "5.7.10 REQUIRETLS: the session is not encrypted, so the message must not go")

    def _finalCount(self, rcptReplies: list[Reply]) -> int:
        """
        How many replies the end of the message gets: one, or in LMTP one
        per accepted recipient.
        """
        if not self._lmtp:
            return 1
        return sum(1 for reply in rcptReplies if reply.code in (250, 251))

    def _delivered(
        self,
        recipients: Sequence[str],
        rcptReplies: list[Reply],
        refused: dict[str, tuple[int, str]],
        finals: list[Reply],
    ) -> dict[str, tuple[int, str]]:
        """
        The refused recipients once the end of the message was answered.

        :raises SMTPError: when the message was refused.
        :raises SMTPRecipientsRefused: when, in LMTP, every recipient was
            refused, before or after the message.
        """
        if not self._lmtp:
            final = finals[0]
            if final.code != 250:
                raise _messageStarted(SMTPError(final.code, f"message refused: {self._quote(final.text)}"))
            return refused
        accepted = [r for r, reply in zip(recipients, rcptReplies) if reply.code in (250, 251)]  # noqa: B905
        refused = dict(refused)
        for recipient, reply in zip(accepted, finals):  # noqa: B905
            if reply.code != 250:
                refused[recipient] = (reply.code, self._quote(reply.text))
        if all(reply.code != 250 for reply in finals):
            raise _messageStarted(SMTPRecipientsRefused(refused))
        return refused

    async def _sendStepByStep(
        self,
        sender: str,
        recipients: Sequence[str],
        message: OutgoingMessage,
        mail: bytes,
        rcpts: list[bytes],
    ) -> dict[str, tuple[int, str]]:
        # Without PIPELINING: each command waits for the previous reply.
        if self._inTransaction:
            await self.command(b"RSET")
        mailReply, rcptReplies = await self.command(mail), []
        if mailReply.code == 250:
            for line in rcpts:
                rcptReplies.append(await self.command(line))
        return await self._afterEnvelope(mailReply, rcptReplies, None, sender, recipients, message)

    async def _afterEnvelope(
        self,
        mailReply: Reply,
        rcptReplies: list[Reply],
        dataReply: Reply | None,
        sender: str,
        recipients: Sequence[str],
        message: OutgoingMessage,
        chunked: bool = False,
    ) -> dict[str, tuple[int, str]]:
        # Every case but the pipelined ones where all went well at once.
        self._inTransaction = mailReply.code == 250
        if mailReply.code != 250:
            if dataReply is not None and dataReply.code == 354:
                await self._endData(b".\r\n")
            raise SMTPError(mailReply.code, f"sender {sender!r} refused: {self._quote(mailReply.text)}")
        refused = self._refused(recipients, rcptReplies)
        if len(refused) == len(recipients):
            if dataReply is not None and dataReply.code == 354:
                # A server that let DATA through anyway gets an empty message
                # for nobody, which ends the transaction.
                await self._endData(b".\r\n")
            raise SMTPRecipientsRefused(refused)

        count = self._finalCount(rcptReplies)
        if not chunked:
            if dataReply is None:
                dataReply = await self.command(b"DATA")
            if dataReply.code != 354:
                raise SMTPError(dataReply.code, f"DATA refused: {self._quote(dataReply.text)}")
        try:
            finals = await (self._transmitChunked(message, count) if chunked else self._transmit(message, count))
        except SMTPError as e:
            # Some of the message went out: it cannot simply go again.
            _messageStarted(e)
            raise
        return self._delivered(recipients, rcptReplies, refused, finals)

    def _refused(self, recipients: Sequence[str], replies: list[Reply]) -> dict[str, tuple[int, str]]:
        """
        The refused recipients, address -> (code, reply text), from the
        replies to RCPT, one per command sent.
        """
        quote = self._quote
        # One reply per RCPT sent; never raise here over a count (no strict=).
        return {r: (reply.code, quote(reply.text)) for r, reply in zip(recipients, replies) if reply.code not in (250, 251)}  # noqa: B905

    def _mailParameters(
        self, sender: str, recipients: Sequence[str], message: OutgoingMessage, given: Sequence[str] = ()
    ) -> bytes:
        extensions = self.extensions
        parameters = []
        if given:
            # The caller's own SIZE, SMTPUTF8 or BODY replaces the client's
            # (the checks still run).
            parameters = _Without(given)
        if "SIZE" in extensions and message.size is not None:
            limit = self._sizeLimit
            if limit is not None and limit < message.size:
                raise SMTPError(
                    552,
                    f"the message ({message.size} bytes) is over the server's "
                    f"size limit of {limit} bytes",
                )
            parameters.append(b" SIZE=%d" % message.size)
        international = not all(a.isascii() for a in [sender, *recipients])
        if international:
            if "SMTPUTF8" not in extensions:
                # A permanent failure (RFC 6531 3.6.2's 553 5.6.7): the same
                # server will not take this envelope tomorrow either, and a
                # relay must bounce it rather than have the sender retry.
                raise SMTPError(
                    553, "5.6.7 the server does not offer SMTPUTF8, which non-ASCII addresses need"
                )
            parameters.append(b" SMTPUTF8")
        if "8BITMIME" in extensions and (message.eightBit is not False or international):
            # Declared whenever the body may hold 8-bit bytes: when only the
            # head was read, it may, and saying so to a server that offers
            # 8BITMIME costs nothing.
            parameters.append(b" BODY=8BITMIME")
        return b"".join(parameters)

    def _expectReplies(self, count: int) -> Deferred[list[Reply]]:
        """
        A Deferred for the list of the next ``count`` replies not yet
        claimed.
        """
        waiter: Deferred[list[Reply]] = Deferred()
        if count == 1:
            self._await(1, lambda reply: waiter.callback([reply]), waiter.errback)
        else:
            self._await(count, waiter.callback, waiter.errback)
        return waiter

    async def _endData(self, data: bytes, count: int = 1) -> list[Reply]:
        self._endOfMessage(True)
        finals = self._expectReplies(count)
        self._write(data)
        replies = await finals
        self._endOfMessage(False)
        self._inTransaction = False
        return replies

    async def _transmit(self, message: OutgoingMessage, count: int = 1) -> list[Reply]:
        """
        Send the message after DATA's 354; its ``count`` final replies.
        """
        stuffer = DotStuffer()
        if message.rest is None:
            # One write for the whole message and its end: one round trip.
            return await self._endData(stuffer.feed(message.head) + stuffer.finish(), count)
        # The reply to the message is awaited while it streams, so that the
        # timer runs (reset at each chunk) and a lost connection fails it.
        finals = self._expectReplies(count)
        self._write(stuffer.feed(message.head))
        try:
            await _BodyProducer(message.rest, stuffer, self).start()
        except _ReadError as e:
            # Nothing can be sent to cancel DATA: the connection has to go.
            self._abort(SMTPError(f"reading the message failed: {e.reason}"))
        except _Stopped:
            pass  # The connection was lost: `finals` says why.
        replies = await finals
        self._endOfMessage(False)
        self._inTransaction = False
        return replies

    async def _transmitChunked(self, message: OutgoingMessage, count: int) -> list[Reply]:
        """
        Send the message in BDAT chunks after the envelope was accepted; the
        ``count`` replies to the last one.

        Unlike DATA, BDAT can be given up between chunks: a stream that
        fails to read, or a chunk the server refuses, ends the message
        without a last chunk, and the session goes on (the next transaction
        starts with RSET).
        """
        lines = DotStuffer(dots=False)
        producer = _ChunkProducer(message.rest, lines, self, count)  # type: ignore[arg-type]
        producer.chunk(lines.feed(message.head))
        try:
            await producer.start()
        except _ReadError as e:
            raise SMTPError(f"reading the message failed: {e.reason}") from None
        except _ChunkRefused as e:
            # The transaction is over, but only RSET says so for sure.
            self._inTransaction = True
            reply = e.reply
            raise SMTPError(reply.code, f"message refused: {self._quote(reply.text)}") from None
        except _Stopped:
            # The connection was lost: say why.
            raise self._failure or SMTPConnectError("the connection was lost") from None
        assert producer.finals is not None
        replies = await producer.finals
        self._endOfMessage(False)
        if producer.refusal is not None:
            # Refused after the last chunk went: that refusal is the reason
            # (the reply to the last chunk is only a 503 that follows it).
            self._inTransaction = True
            reply = producer.refusal
            raise SMTPError(reply.code, f"message refused: {self._quote(reply.text)}")
        # A refused last chunk leaves the transaction to an RSET.
        self._inTransaction = replies[0].code != 250 and not self._lmtp
        return replies

    async def verify(self, address: str) -> str:
        """
        Send VRFY.

        :returns: the reply text for 250, 251 and 252.
        :raises SMTPError: for any other reply; before anything is sent, when
            ``address`` is empty or holds a space or a control character.
        """
        if not address:
            raise SMTPError("nothing to verify: the argument is empty")
        argument = _checkArgument(address, "VRFY argument")
        if not address.isascii() and "SMTPUTF8" in self.extensions:
            argument += b" SMTPUTF8"
        reply = await self.command(b"VRFY " + argument)
        if reply.code in (250, 251, 252):
            return reply.text
        raise SMTPError(reply.code, self._quote(reply.text))

    async def noop(self) -> str:
        """
        Send NOOP: checks that the session is alive, and resets the server's
        idle timer.

        :returns: the reply text for 250.
        :raises SMTPError: for any other reply.
        """
        reply = await self.command(b"NOOP")
        if reply.code == 250:
            return reply.text
        raise SMTPError(reply.code, self._quote(reply.text))

    async def rset(self) -> None:
        """
        Send RSET: abandon the mail transaction, if any.

        :raises SMTPError: for a reply other than 250.
        """
        reply = await self.command(b"RSET")
        if reply.code != 250:
            raise SMTPError(reply.code, self._quote(reply.text))
        self._inTransaction = False

    def quit(self) -> Deferred[None]:
        """
        Send QUIT and close the connection, whatever the reply (or its
        absence, within the timeout).  Fires once the connection is closed.
        """
        if self.connected:
            self.command(b"QUIT").addBoth(lambda _: self.transport.loseConnection())
        return self.whenLost()

    def abort(self) -> Deferred[None]:
        """
        Close the connection at once; fires once it is closed.
        """
        if self.connected:
            self._abort(SMTPConnectError(CLOSED_BY_CLIENT))
        return self.whenLost()


class _Without(list):  # type: ignore[type-arg]
    """
    A list of MAIL parameters (``b" SIZE=123"``) that leaves out those whose
    keyword is one of ``keywords`` (upper case).
    """

    def __init__(self, keywords: Sequence[str]) -> None:
        super().__init__()
        self.keywords = frozenset(keywords)

    def append(self, parameter: bytes) -> None:
        if parameter[1:].partition(b"=")[0].decode("ascii") not in self.keywords:
            super().append(parameter)


class _ReadError(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Stopped(Exception):
    pass


@implementer(IPullProducer)
class _BodyProducer:
    """
    Stream the rest of a message into the transport, one chunk each time the
    transport asks for more, so memory stays flat however large the file.
    """

    def __init__(self, source: IO[bytes], stuffer: DotStuffer, protocol: ESMTPSessionClient) -> None:
        self._source = source
        self._stuffer = stuffer
        self._protocol = protocol
        self._done: Deferred[None] = Deferred()

    def start(self) -> Deferred[None]:
        self._protocol.transport.registerProducer(self, False)
        return self._done

    def resumeProducing(self) -> None:
        transport = self._protocol.transport
        data = b""
        # Writing nothing would never make the transport ask for more (the
        # LF of a CRLF cut in two stuffs to nothing): read on until there is
        # something to write, or the end.
        while not data:
            try:
                chunk = self._source.read(CHUNK_SIZE)
            except Exception as e:  # Any failure of the user's stream.
                transport.unregisterProducer()
                self._finish(Failure(_ReadError(str(e) or type(e).__name__)))
                return
            if not chunk:
                transport.unregisterProducer()
                self._end()
                self._finish(None)
                return
            data = self._stuffer.feed(chunk)
        self._send(data)

    def _send(self, data: bytes) -> None:
        """
        Send the next piece of the message.
        """
        self._protocol._armTimer()
        self._protocol.transport.write(data)

    def _end(self) -> None:
        """
        Send the end of the message.
        """
        protocol = self._protocol
        protocol._endOfMessage(True)
        protocol._armTimer()
        protocol.transport.write(self._stuffer.finish())

    def stopProducing(self) -> None:
        self._finish(Failure(_Stopped()))

    def _finish(self, result: Failure | None) -> None:
        if self._done.called:
            return
        if result is None:
            self._done.callback(None)
        else:
            self._done.errback(result)


class _ChunkRefused(Exception):
    def __init__(self, reply: Reply) -> None:
        super().__init__(reply)
        self.reply = reply


class _ChunkProducer(_BodyProducer):
    """
    Stream the rest of a message as BDAT chunks (RFC 3030), one per piece
    read, each chunk's reply awaited on the side; the end is ``BDAT n
    LAST``.  Once the server refuses a chunk no other one is sent (RFC
    3030 section 2 says the sender MUST NOT).

    :ivar finals: once the last chunk went, a Deferred of the ``count``
        replies to it.
    """

    def __init__(
        self, source: IO[bytes], lines: DotStuffer, protocol: ESMTPSessionClient, count: int
    ) -> None:
        super().__init__(source, lines, protocol)
        self._count = count
        self.refusal: Reply | None = None
        self.finals: Deferred[list[Reply]] | None = None
        # Chunks sent and not yet answered, and whether the next one waits
        # for an answer (the transport, asked for nothing, asks no more).
        self._unanswered = 0
        self._stalled = False

    def chunk(self, data: bytes) -> None:
        """
        Send ``data`` (canonical, CRLF lines) as one chunk.
        """
        if not data:
            return
        protocol = self._protocol
        self._unanswered += 1
        protocol._await(1, self._answered, _ignore)
        protocol._armTimer()
        protocol.transport.write(b"BDAT %d\r\n" % len(data))
        protocol.transport.write(data)

    def _answered(self, reply: Reply) -> None:
        self._unanswered -= 1
        if reply.code != 250 and self.refusal is None:
            self.refusal = reply
        if self._stalled:
            self._stalled = False
            self.resumeProducing()

    def resumeProducing(self) -> None:
        if self._done.called:
            return
        if self.refusal is not None:
            self._protocol.transport.unregisterProducer()
            self._finish(Failure(_ChunkRefused(self.refusal)))
            return
        if self._unanswered >= MAX_CHUNKS_UNANSWERED:
            # A refusal must stop the chunks soon after it (and a server
            # counts every chunk it refuses as an error: Postfix hangs up
            # after 20), and the replies awaited stay few.
            self._stalled = True
            return
        super().resumeProducing()

    _send = chunk

    def _end(self) -> None:
        protocol = self._protocol
        tail = self._stuffer.finish()
        protocol._endOfMessage(True)
        self.finals = protocol._expectReplies(self._count)
        protocol.transport.write(b"BDAT %d LAST\r\n" % len(tail) + tail)


def _ignore(failure: object) -> None:
    """
    For a chunk's reply lost with the connection: what waits for the last
    chunk's reply says so.
    """


def _messageStarted(error: SMTPError) -> SMTPError:
    """
    ``error``, marked as a failure that came after the message itself began
    to go out (:attr:`SMTPError.messageStarted`).  Only failures are marked,
    never the path of a message that goes well.
    """
    error.messageStarted = True
    return error


def _failed(error: Exception) -> Deferred:
    d: Deferred = Deferred()
    d.errback(error)
    return d


def _describeTLSFailure(error: BaseException) -> str:
    if isinstance(error, VerificationError):
        mismatches = getattr(error, "errors", None) or []
        names = ", ".join(str(getattr(m, "mismatched_id", m)) for m in mismatches)
        return "the server's certificate does not match the host name" + (
            f" ({names})" if names else ""
        )
    reasons = error.args[0] if error.args else []
    if isinstance(reasons, list) and reasons:
        return "; ".join(str(r[-1]) for r in reasons if isinstance(r, tuple)) or str(error)
    return str(error) or type(error).__name__

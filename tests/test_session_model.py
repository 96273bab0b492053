"""
The server session against a small model of what it must answer.

A hypothesis state machine drives a real ``ServerProtocol`` (built by
``Server.buildFactory()``, fed through a ``StringTransport``, timed by a
``task.Clock``) with random commands, valid and hostile: greetings with good,
odd and control-laden names; MAIL and RCPT with good and broken paths,
source routes, quoted and non-ASCII local parts, domain literals, and ESMTP
parameters (SIZE in ASCII, Unicode and 25-digit forms among them); DATA with
dot-stuffed lines, bare CR and LF, long lines and bodies around the size
limit; RSET, NOOP, VRFY, QUIT, unknown verbs, junk bytes and lines around the
length limit.  Each write is cut at random points into several
``dataReceived`` calls, several commands are often pipelined in one write,
and whole transactions are sent either way.  Handlers accept, refuse, fail,
answer late (a Deferred the clock fires), return a string, raise a 2xx
``SMTPError`` or call ``session.disconnect()``, as the address or the
message asks.  Time passes: idle, and between the pieces of a line.

The model knows the session's state (greeted? sender? recipients? closed?)
and, for each command, which reply codes are right and what each does to the
state.  Where the protocol leaves a choice (a command with two faults, a
greeting name that is not a domain but has no control character) the model
accepts each right answer and follows the one the server chose; it never
accepts a reply class the protocol rules out.

After every step: every reply line is well-formed and printable UTF-8, there
is exactly one final reply per command, in order, and none after the session
closed; the transport is closing exactly when the model says (after QUIT, a
timeout or a handler's ``session.disconnect()``) and reading unless it is;
nothing raised and nothing was logged as a failure except the handler
crashes the test asks for; and ``onReceive`` saw exactly the messages the
model expects, with their envelope and their dot-unstuffed body (after a
well-formed ``Received:`` header when there is one).

The long run of the same machine is ``fuzz/run_session_model.py`` (see
``fuzz/README.md``).
"""

from __future__ import annotations

import collections
import functools
import itertools
import re
from dataclasses import dataclass, field, replace
from typing import Callable

from hypothesis import HealthCheck, Phase, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from twisted.internet import task
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.python import threadable

from infsmtp import Server, SMTPError

# The server under test ---------------------------------------------------------
#
# Limits small enough that random input reaches them often.

HOSTNAME = "mx.test"
PEER = IPv4Address("TCP", "192.0.2.7", 4242)
MAX_LINE = 512  # RFC 5321 4.5.3.1.4, CRLF included
MAX_DATA_LINE = 1000  # RFC 5321 4.5.3.1.6, CRLF included
MAX_SIZE = 6000
MAX_RECIPIENTS = 4
TIMEOUT = 300.0
# How long a "slow" handler takes to answer (a Deferred fired by the clock).
HANDLER_DELAY = 0.01
# How long the server waits for a handler that does not answer ("hang").
HANDLER_TIMEOUT = 20.0
RECEIVE_TIMEOUT = 40.0


# Handlers ----------------------------------------------------------------------
#
# A handler's decision is chosen by the test through the address (its local
# part starts with the verdict's name) or the message (an ``X-Verdict:``
# line), so the model knows it in advance.

#: verdict -> what the handler does.
VERDICTS = ("refuse", "tempfail", "crash", "odd", "slow", "fwd", "drop", "bye", "hang")


class DeliberateFault(Exception):
    """
    The exception a "crash" handler raises: logged by the server, and the
    only failure this test expects in the log.
    """


def addressVerdict(address: str) -> str:
    """
    The verdict that the handlers apply to ``address``.
    """
    lowered = address.lower()
    for verdict in VERDICTS:
        if lowered.startswith(verdict):
            return verdict
    return "accept"


def messageVerdict(message: bytes) -> str:
    """
    The verdict that ``onReceive`` applies to ``message``.
    """
    for verdict in VERDICTS:
        if b"X-Verdict: %s\r\n" % verdict.encode() in message:
            return verdict
    return "accept"


#: What each verdict answers: (MAIL, RCPT, end of DATA).
VERDICT_CODES = {
    "accept": (250, 250, 250),
    "slow": (250, 250, 250),
    # A 2xx SMTPError is an acceptance with that text (issue 9, defect 3).
    "fwd": (250, 251, 250),
    "refuse": (550, 550, 554),
    "tempfail": (450, 450, 450),
    # An exception, and a result that is neither None nor a bool (issue 9,
    # defect 2: fail closed), answer 451.
    "crash": (451, 451, 451),
    "odd": (451, 451, 451),
    # session.disconnect(), or a 421 SMTPError: 421, and the session ends.
    "drop": (421, 421, 421),
    "bye": (421, 421, 421),
    # No answer within the handler's deadline (issue 9, defect 11): 451,
    # and the session goes on.
    "hang": (451, 451, 451),
}
ACCEPTING = ("accept", "slow", "fwd")
CLOSING = ("drop", "bye")


#: How often each (command, reply code) was seen, across runs: the long run
#: prints it, to show what the random sessions reached.
OUTCOMES: collections.Counter[str] = collections.Counter()


def note(label: str) -> None:
    event(label)
    OUTCOMES[label] += 1


# Replies -----------------------------------------------------------------------

REPLY_LINE = re.compile(rb"([2-5][0-9][0-9])([ -])([^\r\n]*)")
# C0 controls and DEL have no place in reply text (peer text is echoed
# escaped, never raw).
CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def parseReplies(data: bytes) -> list[int]:
    """
    The codes of the complete replies in ``data``, checking that every line
    is well-formed: ``NNN-`` or ``NNN `` then printable UTF-8, CRLF-ended,
    the same code on every line of a multi-line reply.

    :raises AssertionError: a malformed line or an unfinished reply.
    """
    assert not data or data.endswith(b"\r\n"), f"reply not ended by CRLF: {data[-80:]!r}"
    codes = []
    current = None
    for line in data.split(b"\r\n")[:-1]:
        match = REPLY_LINE.fullmatch(line)
        assert match is not None, f"malformed reply line {line!r}"
        text = match.group(3).decode("utf-8")  # raises on non-UTF-8
        assert not CONTROL.search(text), f"control character in reply {line!r}"
        code = int(match.group(1))
        assert current is None or code == current, f"code changes inside a multi-line reply: {line!r}"
        if match.group(2) == b" ":
            codes.append(code)
            current = None
        else:
            current = code
    assert current is None, f"unfinished multi-line reply: {data[-200:]!r}"
    return codes


# The model ---------------------------------------------------------------------


@dataclass
class Model:
    """
    What the session should be, as far as replies show it.
    """

    greeted: bool = False
    extended: bool = False
    mail: bool = False
    utf8: bool = False
    sender: str = ""
    recipients: list[str] = field(default_factory=list)
    closed: bool = False
    #: The (sender, recipients, body, protocol) that onReceive must have
    #: seen, ``protocol`` as the Received header names it.
    received: list[tuple[str, list[str], bytes, str]] = field(default_factory=list)

    def simulation(self) -> "Model":
        """
        A copy to try commands on (without the messages received so far).
        """
        return replace(self, recipients=list(self.recipients), received=[])

    def resetTransaction(self) -> None:
        self.mail = False
        self.utf8 = False
        self.sender = ""
        self.recipients = []


#: A reply code -> what it does to the model.
Expectation = dict[int, Callable[[Model], None]]


def unchanged(model: Model) -> None:
    pass


def closes(model: Model) -> None:
    model.resetTransaction()
    model.closed = True


def only(codes: set[int] | frozenset[int]) -> Expectation:
    """
    Any of ``codes``, none of which changes the state.
    """
    return {code: unchanged for code in codes}


class Command:
    """
    One command line: its bytes, and what the model expects of it.

    :ivar line: the line without its end.
    :ivar end: ``b"\\r\\n"``, or a bare ``b"\\n"`` (which ends a command
        line too: clients that send it are common and harmless).
    """

    line: bytes
    end: bytes = b"\r\n"

    @property
    def wire(self) -> bytes:
        return self.line + self.end

    def expect(self, model: Model) -> Expectation:
        # maxLineLength counts the line end.  The server takes one byte more
        # (its framer measures up to the LF): allowed, and reported.
        length = len(self.line) + len(self.end)
        if length > MAX_LINE + 1:
            return only({500})
        expected = self.expectLine(model)
        if length == MAX_LINE + 1:
            expected.setdefault(500, unchanged)
        return expected

    def expectLine(self, model: Model) -> Expectation:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.wire!r})"


@dataclass(repr=False)
class Fixed(Command):
    """
    A command whose answer does not depend on the state (NOOP, VRFY, junk,
    unknown verbs...), or changes it in a fixed way (RSET, QUIT).
    """

    line: bytes
    codes: frozenset[int]
    effect: Callable[[Model], None] = unchanged
    end: bytes = b"\r\n"

    def expectLine(self, model: Model) -> Expectation:
        return {code: self.effect for code in self.codes}


def resets(model: Model) -> None:
    model.resetTransaction()


@dataclass(repr=False)
class Greeting(Command):
    """
    HELO or EHLO.  ``kind``: ``"good"`` (a domain or an address literal:
    250), ``"odd"`` (printable but not a domain, or not ASCII: 250 or 501),
    ``"bad"`` (empty, or with a control character: 501).
    """

    line: bytes
    extended: bool
    kind: str
    end: bytes = b"\r\n"

    def expectLine(self, model: Model) -> Expectation:
        def greets(model: Model) -> None:
            model.resetTransaction()
            model.greeted = True
            model.extended = self.extended

        if self.kind == "good":
            return {250: greets}
        if self.kind == "odd":
            return {250: greets, 501: unchanged}
        return only({501})


@dataclass
class Path:
    """
    A reverse- or forward-path as sent.

    :ivar address: the mailbox the server must decode it to (``""`` for
        ``<>``), when it parses.
    :ivar faults: ``"syntax"`` (501), ``"control"`` (a control character:
        501 or 553), ``"nonascii"`` (553 without SMTPUTF8), ``"empty"``
        (``<>``: a syntax error for RCPT only), ``"postmaster"`` (a syntax
        error for MAIL only).
    """

    wire: bytes
    address: str = ""
    faults: frozenset[str] = frozenset()


@dataclass
class Parameter:
    """
    An ESMTP parameter as sent, and the codes it calls for on MAIL and on
    RCPT (an empty set: fine).
    """

    wire: bytes
    keyword: str
    mailCodes: frozenset[int] = frozenset()
    rcptCodes: frozenset[int] = frozenset({555})


def pathCodes(path: Path, command: str, utf8: bool) -> set[int]:
    """
    The codes that ``path``'s faults call for in MAIL or RCPT.
    """
    codes = set()
    faults = path.faults
    if "syntax" in faults:
        codes.add(501)
    if "control" in faults:
        # Issue 9, defect 9: refused, as bad syntax or as a bad mailbox.
        codes |= {501, 553}
    if "empty" in faults and command == "RCPT":
        codes.add(501)
    if "postmaster" in faults and command == "MAIL":
        codes.add(501)
    if "nonascii" in faults and not utf8:
        codes.add(553)
    return codes


@dataclass(repr=False)
class Mail(Command):
    """
    ``MAIL FROM:<path> params``.  ``prefixOk``: the ``FROM:`` part is right.
    """

    line: bytes
    path: Path
    parameters: list[Parameter]
    prefixOk: bool
    end: bytes = b"\r\n"

    def expectLine(self, model: Model) -> Expectation:
        if not model.greeted or model.mail:
            return only({503})
        keywords = {p.keyword for p in self.parameters if not p.mailCodes}
        utf8 = "SMTPUTF8" in keywords
        codes = pathCodes(self.path, "MAIL", utf8)
        if not self.prefixOk:
            codes.add(501)
        for parameter in self.parameters:
            codes |= parameter.mailCodes
        if codes:
            return only(codes)
        verdict = addressVerdict(self.path.address)
        code = VERDICT_CODES[verdict][0]
        if verdict in CLOSING:
            return {code: closes}
        if verdict not in ACCEPTING:
            return only({code})

        def starts(model: Model) -> None:
            model.mail = True
            model.utf8 = utf8
            model.sender = self.path.address
            model.recipients = []

        return {code: starts}


@dataclass(repr=False)
class Rcpt(Command):
    """
    ``RCPT TO:<path> params``.  ``prefixOk``: the ``TO:`` part is right.
    """

    line: bytes
    path: Path
    parameters: list[Parameter]
    prefixOk: bool
    end: bytes = b"\r\n"

    def expectLine(self, model: Model) -> Expectation:
        if not model.mail:
            return only({503})
        full = len(model.recipients) >= MAX_RECIPIENTS
        codes = pathCodes(self.path, "RCPT", model.utf8)
        if not self.prefixOk:
            codes.add(501)
        for parameter in self.parameters:
            codes |= parameter.rcptCodes
        if codes:
            # Which of a syntax fault and a full envelope is reported first
            # is the server's choice.
            return only(codes | ({452} if full else set()))
        if full:
            return only({452})
        verdict = addressVerdict(self.path.address)
        code = VERDICT_CODES[verdict][1]
        if verdict in CLOSING:
            return {code: closes}
        if verdict not in ACCEPTING:
            return only({code})

        def adds(model: Model) -> None:
            model.recipients.append(self.path.address)

        return {code: adds}


@dataclass
class Body:
    """
    A message after its DATA command: ``lines`` as the client means them
    (no line end, not dot-stuffed), then ``filler`` lines of 98 bytes (to
    reach the size limit); ``wire`` stuffs them and ends the data.
    """

    lines: list[bytes]
    filler: int = 0

    def allLines(self) -> list[bytes]:
        return self.lines + [b"y" * 98] * self.filler

    @property
    def content(self) -> bytes:
        """
        What ``session.msg`` must hold (after any ``Received:`` header).
        """
        return b"".join(line + b"\r\n" for line in self.allLines())

    @property
    def wire(self) -> bytes:
        stuffed = (b"." + line if line.startswith(b".") else line for line in self.allLines())
        return b"".join(line + b"\r\n" for line in stuffed) + b".\r\n"

    def faults(self) -> set[int]:
        codes = set()
        if len(self.content) > MAX_SIZE:
            codes.add(552)
        # maxDataLineLength counts the CRLF and the stuffing dot.
        if any(len(line) + (line[:1] == b".") + 2 > MAX_DATA_LINE for line in self.allLines()):
            codes.add(500)
        if any(b"\r" in line or b"\n" in line for line in self.allLines()):
            codes.add(550)  # bare CR or LF: refused (SMTP smuggling)
        return codes

    def expect(self, model: Model) -> Expectation:
        faults = self.faults()
        if faults:
            return {code: resets for code in faults}
        # RFC 3848's protocol name for the Received header.
        protocol = "UTF8SMTP" if model.utf8 else "ESMTP" if model.extended else "SMTP"
        message = (model.sender, list(model.recipients), self.content, protocol)
        verdict = messageVerdict(self.content)
        code = VERDICT_CODES[verdict][2]

        def done(model: Model) -> None:
            model.received.append(message)
            if verdict in CLOSING:
                closes(model)
            else:
                model.resetTransaction()

        return {code: done}


@dataclass(repr=False)
class Data(Command):
    """
    ``DATA`` (with an argument when ``line`` has one), and the message sent
    after it when the model expects 354.
    """

    line: bytes
    body: Body
    end: bytes = b"\r\n"

    def expectLine(self, model: Model) -> Expectation:
        argument = self.line[4:].strip(b" \t")
        if not model.mail:
            state = 503
        elif not model.recipients:
            state = 554
        else:
            state = 354
        if argument:
            # Two faults (an argument, and maybe the state): either may be
            # reported.
            return only({501} | ({state} if state != 354 else set()))
        return {state: unchanged}

    def __repr__(self) -> str:
        return f"Data({self.wire!r}, {self.body!r})"


# Strategies --------------------------------------------------------------------

ATEXT = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+/=?^_`{|}~-"
# C0 controls but LF (which ends the line) and DEL.
PATH_CONTROLS = [bytes([c]) for c in range(0x20) if c != 0x0A] + [b"\x7f"]
# Tab is whitespace as well as a control: a greeting name holding one may be
# refused or not.
NAME_CONTROLS = [c for c in PATH_CONTROLS if c != b"\t"]
UTF8_WORDS = ["jörg", "zoë", "пример", "用户", "exämple", "ñandú"]
UNICODE_DIGITS = ["²", "①", "١٢٣", "１０", "߂", "৩", "𝟙", "٣٣٣"]

letters = st.text("abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=8)
alnum = st.text("abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=4)
labels = st.one_of(alnum, st.tuples(alnum, alnum).map("-".join))
domains = st.lists(labels, min_size=1, max_size=3).map(lambda parts: ".".join(parts + ["test"]))
ipv4 = st.tuples(*[st.integers(0, 255)] * 4).map(lambda t: ".".join(map(str, t)))
literals = st.one_of(ipv4.map(lambda a: f"[{a}]"), st.just("[IPv6:2001:db8::1]"))
atoms = st.text(ATEXT, min_size=1, max_size=8)
dotAtoms = st.lists(atoms, min_size=1, max_size=3).map(".".join)
quotedLocals = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0x7E, exclude_characters='"\\'), max_size=8
).map(lambda s: f'"{s}"')
routes = st.one_of(
    st.just(""),
    st.lists(domains, min_size=1, max_size=2).map(lambda ds: ",".join("@" + d for d in ds) + ":"),
)


@functools.lru_cache(maxsize=None)
def _sampled(options: tuple) -> st.SearchStrategy:
    return st.sampled_from(options)


@functools.lru_cache(maxsize=None)
def _integers(low: int, high: int) -> st.SearchStrategy:
    return st.integers(low, high)


# Strategies built once: hypothesis validates each new strategy object on
# its first draw, which cost more than the session itself.


def pick(draw, options) -> object:
    """
    One of ``options`` (a few fixed choices: each set is cached for good).
    """
    return draw(_sampled(tuple(options)))


def number(draw, low: int, high: int) -> int:
    return draw(_integers(low, high))


def insertAt(draw, text: bytes, piece: bytes, lowest: int = 0) -> bytes:
    index = number(draw, lowest, len(text))
    return text[:index] + piece + text[index:]


locals_ = st.one_of(dotAtoms, dotAtoms, quotedLocals)
mailDomains = st.one_of(domains, domains, literals)


@st.composite
def goodPaths(draw, verdicts=("", "", "", "", "", *VERDICTS)) -> Path:
    """
    ``<local@domain>``, maybe routed; the local part may carry a verdict.
    """
    verdict = pick(draw, verdicts)
    local = draw(locals_)
    if not local.startswith('"'):
        local = verdict + local
    domain = draw(mailDomains)
    mailbox = f"{local}@{domain}"
    route = draw(routes)
    return Path(f"<{route}{mailbox}>".encode(), mailbox)


@st.composite
def nonAsciiPaths(draw) -> Path:
    word = pick(draw, UTF8_WORDS)
    mailbox = pick(draw, [f"{word}@example.test", f"a@{word}.test", f"{word}@{word}.test"])
    return Path(f"<{mailbox}>".encode(), mailbox, frozenset({"nonascii"}))


@st.composite
def controlPaths(draw) -> Path:
    """
    A control character in the local part, a label, or a domain literal
    (``[1.2.3.4\\x1b]``, which the mailbox grammar let through).
    """
    control = pick(draw, PATH_CONTROLS)
    where = pick(draw, ["local", "domain", "literal"])
    local, domain = b"user", b"example.test"
    if where == "local":
        local = insertAt(draw, local, control)
    elif where == "domain":
        domain = insertAt(draw, domain, control)
    else:
        literal = draw(ipv4).encode()
        domain = b"[" + insertAt(draw, literal, control) + b"]"
    return Path(b"<" + local + b"@" + domain + b">", "", frozenset({"control"}))


@st.composite
def longPaths(draw) -> Path:
    """
    Paths around RFC 5321's 256-octet limit (brackets included).
    """
    size = pick(draw, [254, 255, 256, 257, 258, 300])
    local = "l" * (size - len("<@x.test>"))
    mailbox = f"{local}@x.test"
    return Path(f"<{mailbox}>".encode(), mailbox, frozenset() if size <= 256 else frozenset({"syntax"}))


brokenPaths = st.sampled_from(
    [
        b"a@b.test",
        b"<a@b.test",
        b"a@b.test>",
        b"<@b.test>",
        b"<a@>",
        b"<a>",
        b"<a..b@c.test>",
        b"<.a@c.test>",
        b"<a.@c.test>",
        b"<a@-b.test>",
        b"<a@b-.test>",
        b"<a@b..test>",
        b"<a b@c.test>",
        b"<a@b@c.test>",
        b"<a@[]>",
        b'<"a@b.test>',
        b"<\xff@b.test>",
        b"<a@b.test\xc3>",
        b"<<a@b.test>>",
        b"<@b.test:>",
        b"",
    ]
).map(lambda wire: Path(wire, "", frozenset({"syntax"})))

specialPaths = st.sampled_from(
    [
        Path(b"<>", "", frozenset({"empty"})),
        Path(b"<postmaster>", "postmaster", frozenset({"postmaster"})),
        Path(b"<PostMaster>", "PostMaster", frozenset({"postmaster"})),
        Path(b"<@relay.test:postmaster>", "postmaster", frozenset({"postmaster"})),
    ]
)

paths = st.one_of(
    goodPaths(), goodPaths(), goodPaths(), nonAsciiPaths(), controlPaths(), longPaths(), brokenPaths, specialPaths
)


def caseOf(draw, keyword: str) -> str:
    return pick(draw, [keyword, keyword.lower(), keyword.capitalize()])


badSizes = st.one_of(
    st.sampled_from(UNICODE_DIGITS),
    st.text("0123456789", min_size=21, max_size=25),
    st.sampled_from(["-1", "+5", "0x10", "1e3", "1.5", "١0", "12a"]),
)


@st.composite
def sizeParameters(draw) -> Parameter:
    keyword = caseOf(draw, "SIZE")
    good = draw(st.booleans())
    if good:
        digits = draw(st.text("0123456789", min_size=1, max_size=20))
        tooBig = int(digits) > MAX_SIZE
        return Parameter(f"{keyword}={digits}".encode(), "SIZE", frozenset({552} if tooBig else ()))
    value = draw(badSizes)
    # Issue 9, defect 1: anything but 1-20 ASCII digits is a syntax error.
    return Parameter(f"{keyword}={value}".encode(), "SIZE", frozenset({501}))


@st.composite
def otherParameters(draw) -> Parameter:
    choice = pick(draw, ["body", "badBody", "utf8", "badUtf8", "auth", "badAuth", "unknown", "bare"])
    if choice == "body":
        value = caseOf(draw, pick(draw, ["7BIT", "8BITMIME"]))
        return Parameter(f"{caseOf(draw, 'BODY')}={value}".encode(), "BODY")
    if choice == "badBody":
        value = pick(draw, ["=BINARYMIME", "=x", ""])
        return Parameter(f"BODY{value}".encode(), "BODY", frozenset({501}))
    if choice == "utf8":
        return Parameter(caseOf(draw, "SMTPUTF8").encode(), "SMTPUTF8")
    if choice == "badUtf8":
        return Parameter(b"SMTPUTF8=yes", "SMTPUTF8", frozenset({501}))
    if choice == "auth":
        value = pick(draw, ["<>", "alice", "bob@example.test"])
        return Parameter(f"AUTH={value}".encode(), "AUTH")
    if choice == "badAuth":
        control = pick(draw, [c for c in NAME_CONTROLS if c != b"\r"] + [b"\r"])
        value = insertAt(draw, b"alice", control, 1)
        # Issue 9, defect 9: a control character in a parameter value.
        return Parameter(b"AUTH=" + value, "AUTH", frozenset({501, 553}), frozenset({501, 553, 555}))
    if choice == "unknown":
        keyword = pick(draw, ["FOO", "XYZZY", "X-TEST"])
        value = pick(draw, ["", "=1", "=é"])
        return Parameter(f"{keyword}{value}".encode(), keyword, frozenset({555}))
    wire = pick(draw, [b"=1", b"-X=1", b"K_Y=1", b"SIZE=", b"FOO=\xff"])
    # Bad parameter syntax: 501 (or 555 for a keyword that is also unknown).
    return Parameter(wire, wire.decode("latin-1"), frozenset({501, 555}), frozenset({501, 555}))


parameterLists = st.lists(
    st.one_of(sizeParameters(), otherParameters()), max_size=3, unique_by=lambda p: p.keyword.upper()
)
goodParameterLists = st.lists(
    st.one_of(
        st.integers(0, MAX_SIZE).map(lambda n: Parameter(b"SIZE=%d" % n, "SIZE")),
        st.sampled_from(
            [Parameter(b"BODY=8BITMIME", "BODY"), Parameter(b"SMTPUTF8", "SMTPUTF8"), Parameter(b"AUTH=<>", "AUTH")]
        ),
    ),
    max_size=3,
    unique_by=lambda p: p.keyword,
)
ends = st.sampled_from([b"\r\n", b"\r\n", b"\r\n", b"\n"])


anyParameters = st.one_of(st.just([]), parameterLists)
mostlyGoodPaths = st.one_of(goodPaths(), goodPaths(), goodPaths(), paths)


@st.composite
def mailCommands(draw, paths=paths, parameters=anyParameters, hostile=True) -> Mail:
    """
    MAIL commands; ``hostile``: with broken ``FROM:`` parts too.
    """
    path = draw(paths)
    chosen = draw(parameters)
    if "nonascii" in path.faults and not hostile and all(p.keyword != "SMTPUTF8" for p in chosen):
        chosen = [*chosen, Parameter(b"SMTPUTF8", "SMTPUTF8")]
    prefixes = [b"FROM:", b"FROM:", b"from:", b"From: ", b"FROM:  "]
    prefix = pick(draw, prefixes + ([b"FROM", b"TO:", b"FROM ;"] if hostile else []))
    prefixOk = prefix.rstrip(b" ").upper() == b"FROM:"
    verb = caseOf(draw, "MAIL").encode()
    line = verb + b" " + prefix + path.wire + b"".join(b" " + p.wire for p in chosen)
    return Mail(line, path, chosen, prefixOk, draw(ends))


@st.composite
def rcptCommands(draw, paths=mostlyGoodPaths, hostile=True) -> Rcpt:
    """
    RCPT commands; ``hostile``: with parameters and broken ``TO:`` parts
    too.
    """
    path = draw(paths)
    chosen = draw(st.one_of(st.just([]), st.just([]), parameterLists)) if hostile else []
    prefix = pick(draw, [b"TO:", b"TO:", b"to:", b"To: "] + ([b"TO", b"FROM:"] if hostile else []))
    prefixOk = prefix.rstrip(b" ").upper() == b"TO:"
    verb = caseOf(draw, "RCPT").encode()
    line = verb + b" " + prefix + path.wire + b"".join(b" " + p.wire for p in chosen)
    return Rcpt(line, path, chosen, prefixOk, draw(ends))




heloNames = st.one_of(domains, literals, st.just("localhost"))
# Printable but not a domain, or not ASCII: a server may take them or not.
oddHeloNames = st.one_of(
    st.sampled_from([b"!!!", b"a b", b"-", b"under_score.test", b"x" * 300, b"a\tb"]),
    st.sampled_from(UTF8_WORDS).map(lambda w: w.encode() + b".test"),
    st.sampled_from([b"\xff\xfe.test", b"caf\xe9.test"]),
)


@st.composite
def greetings(draw, kinds=("good", "good", "odd", "bad")) -> Greeting:
    extended = draw(st.booleans())
    verb = caseOf(draw, "EHLO" if extended else "HELO").encode()
    kind = pick(draw, kinds)
    if kind == "good":
        name = draw(heloNames).encode()
    elif kind == "odd":
        name = draw(oddHeloNames)
    else:
        control = pick(draw, NAME_CONTROLS)
        name = draw(heloNames).encode()
        # Not last: a CR before the line's LF would be part of the line end.
        name = insertAt(draw, name[:-1], control) + name[-1:] if draw(st.booleans()) else b""
    return Greeting(verb + b" " + name if name else verb, extended, kind, draw(ends))


text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60).map(str.encode)


CLEAN_LINES = ("text", "text", "dot", "dots", "binary")
HOSTILE_LINES = (*CLEAN_LINES, "long", "bare", "verdict")


@st.composite
def bodyLines(draw, kinds=HOSTILE_LINES) -> bytes:
    kind = pick(draw, kinds)
    if kind == "text":
        return draw(text)
    if kind == "dot":
        return b"." + draw(text)
    if kind == "dots":
        return pick(draw, [b".", b"..", b". ", b".\x00"])
    if kind == "binary":
        return draw(st.binary(max_size=80)).replace(b"\r", b"").replace(b"\n", b"")
    if kind == "long":
        size = pick(draw, [MAX_DATA_LINE - 3, MAX_DATA_LINE - 2, MAX_DATA_LINE - 1, 2 * MAX_DATA_LINE + 7])
        return pick(draw, [b"", b"."]) + b"L" * size
    if kind == "verdict":
        return b"X-Verdict: " + pick(draw, VERDICTS).encode()
    line = draw(text)
    for _ in range(number(draw, 1, 3)):
        line = insertAt(draw, line, pick(draw, [b"\r", b"\n", b"\n.\n", b"\r.\r", b"\n.", b"\r\r"]))
    # No CRLF inside a line: that would end it (and maybe the data).
    line = line.replace(b"\r\n", b"\r \n")
    assert b"\r\n" not in line
    return line


cleanBodyLines = st.lists(bodyLines(CLEAN_LINES), max_size=10)
hostileBodyLines = st.lists(bodyLines(), max_size=10)


@st.composite
def bodies(draw) -> Body:
    # Half the messages are clean, so that a fault does not hide what the
    # message's size or content must give.
    lines = draw(st.one_of(cleanBodyLines, hostileBodyLines))
    filler = 0
    size = number(draw, 0, 5)
    if size == 0:
        # Around the size limit.
        filler = number(draw, MAX_SIZE // 100 - 2, MAX_SIZE // 100 + 2)
    elif size == 1:
        # On it, to the byte.
        remaining = MAX_SIZE + number(draw, -1, 1) - sum(len(line) + 2 for line in lines)
        if remaining >= 102:
            filler = remaining // 100 - 1
            lines = [*lines, b"p" * (remaining - filler * 100 - 2)]
    return Body(lines, filler)


@st.composite
def dataCommands(draw) -> Data:
    line = pick(draw, [b"DATA", b"DATA", b"data", b"DATA x", b"DATA "])
    return Data(line, draw(bodies()), draw(ends))


@st.composite
def fixedCommands(draw) -> Fixed:
    kind = pick(
        draw,
        ["noop", "rset", "badRset", "vrfy", "badVrfy", "expn", "help", "quit", "starttls", "auth", "verb",
         "longVerb", "junk", "empty", "long"],
    )
    end = draw(ends)

    def fixed(line: bytes, codes: set[int], effect: Callable[[Model], None] = unchanged) -> Fixed:
        return Fixed(line, frozenset(codes), effect, end)

    if kind == "noop":
        return fixed(pick(draw, [b"NOOP", b"noop", b"NOOP x", b" NOOP"]), {250})
    if kind == "rset":
        return fixed(pick(draw, [b"RSET", b"rset", b"RSET "]), {250}, resets)
    if kind == "badRset":
        return fixed(b"RSET now", {501})
    if kind == "vrfy":
        return fixed(b"VRFY " + draw(letters).encode(), {252})
    if kind == "badVrfy":
        return fixed(b"VRFY", {501})
    if kind == "expn":
        return fixed(b"EXPN staff", {502})
    if kind == "help":
        return fixed(pick(draw, [b"HELP", b"HELP MAIL"]), {214})
    if kind == "quit":
        return fixed(pick(draw, [b"QUIT", b"quit"]), {221}, closes)
    if kind == "starttls":
        # No certificate: STARTTLS is not available.
        return fixed(b"STARTTLS", {454})
    if kind == "auth":
        # No onLogin: AUTH is not available.
        return fixed(pick(draw, [b"AUTH PLAIN", b"AUTH", b"AUTH LOGIN dXNlcg=="]), {502})
    if kind == "verb":
        verb = draw(st.text("abcdefghijklmnopqrstuvwxyzXYZ", min_size=1, max_size=20))
        known = {"HELO", "EHLO", "MAIL", "RCPT", "DATA", "RSET", "NOOP", "QUIT", "VRFY", "EXPN", "HELP",
                 "STARTTLS", "AUTH", "BDAT", "LHLO", "ETRN", "TURN", "ATRN", "XCLIENT", "XFORWARD"}
        verb = "XX" + verb[:18] if verb.upper() in known else verb
        return fixed(verb.encode() + pick(draw, [b"", b" arg"]), {500})
    if kind == "longVerb":
        return fixed(b"NOOP" * number(draw, 6, 10), {500})
    if kind == "junk":
        first = pick(draw, [bytes([c]) for c in b"0123456789<>:.@\x00\x01\x1b\x7f\x80\xff\r"])
        return fixed(first + draw(st.binary(max_size=60)).replace(b"\n", b""), {500})
    if kind == "empty":
        return fixed(pick(draw, [b"", b" ", b"\t"]), {500})
    # Around the command line limit, and far beyond it.
    length = pick(draw, [MAX_LINE - 2, MAX_LINE - 1, MAX_LINE, MAX_LINE + 1, MAX_LINE + 2, 4 * MAX_LINE])
    line = b"NOOP " + b"x" * max(0, length - len(end) - 5)
    return fixed(line, {250})


RSET = Fixed(b"RSET", frozenset({250}), resets)

commands = st.one_of(
    greetings(),
    mailCommands(),
    mailCommands(),
    rcptCommands(),
    rcptCommands(),
    rcptCommands(),
    dataCommands(),
    dataCommands(),
    fixedCommands(),
    fixedCommands(),
    st.just(RSET),
)


transactionStarts = st.one_of(st.just([]), st.just([RSET]), greetings(kinds=("good",)).map(lambda g: [g]))
# Mostly accepted: a transaction should reach its DATA often.
_kindPaths = goodPaths(("", "", "", "", "", "", "slow", "fwd", "refuse", "hang", "crash"))
transactionSenders = st.one_of(
    mailCommands(st.one_of(_kindPaths, _kindPaths, nonAsciiPaths(), st.just(Path(b"<>", ""))), goodParameterLists,
                 hostile=False),
    mailCommands(),
)
_recipient = rcptCommands(st.one_of(_kindPaths, _kindPaths, nonAsciiPaths()), hostile=False)
transactionRecipients = st.lists(st.one_of(_recipient, _recipient, _recipient, rcptCommands()), min_size=1, max_size=6)


@st.composite
def transactions(draw) -> list[Command]:
    """
    What a client sends for one message (maybe greeting or RSET first): a
    MAIL and RCPTs that are mostly right, then DATA and the message, or
    (the client gave up) RSET.
    """
    start = draw(transactionStarts)
    mail = draw(transactionSenders)
    recipients = draw(transactionRecipients)
    end = RSET if number(draw, 0, 4) == 0 else Data(b"DATA", draw(bodies()), draw(ends))
    return [*start, mail, *recipients, end]


# Single lines (no message after them), for the trickle rule.
lineCommands = st.one_of(greetings(), mailCommands(), rcptCommands(), fixedCommands(), st.just(RSET))


# The machine -------------------------------------------------------------------


class SessionMachine(RuleBasedStateMachine):
    """
    One server, one session at a time (a new one after each close).
    """

    def __init__(self) -> None:
        super().__init__()
        self.clock = task.Clock()
        self.model = Model()
        #: (mailFrom, rcptTo, msg) as onReceive saw them.
        self.received: list[tuple[str, list[str], bytes]] = []
        #: Slow handlers not answered yet, and hanging ones not cancelled.
        self.pending = 0
        self.hanging = 0
        self.disconnects = 0
        self.sessions = 0
        self.unexpectedLogs: list[str] = []
        self.protocol = None
        globalLogPublisher.addObserver(self.observe)

    def observe(self, event: dict) -> None:
        failure = event.get("log_failure")
        if failure is not None and not failure.check(DeliberateFault):
            self.unexpectedLogs.append(failure.getTraceback())

    # Handlers --------------------------------------------------------------

    def decide(self, verdict: str, session, acceptCode: int):
        """
        Carry out ``verdict`` as a handler would.
        """
        if verdict == "refuse":
            return False
        if verdict == "tempfail":
            raise SMTPError(450, "4.2.0 Try again later")
        if verdict == "crash":
            raise DeliberateFault(verdict)
        if verdict == "odd":
            # aiosmtpd's style: a reply string.  Not an acceptance.
            return "550 5.1.1 No such user"
        if verdict == "fwd":
            raise SMTPError(acceptCode, "2.1.5 Will forward")
        if verdict == "drop":
            session.disconnect()
            return None
        if verdict == "bye":
            raise SMTPError(421, "4.3.2 Shutting down")
        if verdict == "hang":
            self.hanging += 1

            def cancelled(d: Deferred) -> None:
                self.hanging -= 1

            return Deferred(cancelled)
        if verdict == "slow":
            self.pending += 1

            def answer() -> bool:
                self.pending -= 1
                return True

            return task.deferLater(self.clock, HANDLER_DELAY, answer)
        return True

    def onMailFrom(self, session):
        return self.decide(addressVerdict(session.address), session, 250)

    def onRcptTo(self, session):
        return self.decide(addressVerdict(session.address), session, 251)

    def onReceive(self, session):
        msg = session.msg
        self.received.append((session.mailFrom, list(session.rcptTo), msg))
        return self.decide(messageVerdict(msg), session, 250)

    def onDisconnect(self, session) -> None:
        self.disconnects += 1

    # Connection ------------------------------------------------------------

    @initialize(receivedHeader=st.booleans())
    def start(self, receivedHeader: bool) -> None:
        # session.disconnect() hands over to the reactor thread unless it is
        # called in it; the fake clock's thread is the only one here.
        if not threadable.isInIOThread():
            threadable.registerAsIOThread()
        self.receivedHeader = receivedHeader
        self.server = Server(
            hostname=HOSTNAME,
            reactor=self.clock,
            maxLineLength=MAX_LINE,
            maxDataLineLength=MAX_DATA_LINE,
            maxMessageSize=MAX_SIZE,
            maxRecipients=MAX_RECIPIENTS,
            # Error counting is not modelled.
            maxErrors=100_000,
            timeout=TIMEOUT,
            handlerTimeout=HANDLER_TIMEOUT,
            receiveTimeout=RECEIVE_TIMEOUT,
            receivedHeader=receivedHeader,
        )
        self.server.onMailFrom = self.onMailFrom
        self.server.onRcptTo = self.onRcptTo
        self.server.onReceive = self.onReceive
        self.server.onDisconnect = self.onDisconnect
        self.factory = self.server.buildFactory()
        self.connect()

    def connect(self) -> None:
        self.sessions += 1
        self.model = Model(received=self.model.received)
        self.transport = StringTransport(peerAddress=PEER, lenient=True)
        self.protocol = self.factory.buildProtocol(PEER)
        self.protocol.makeConnection(self.transport)
        self.clock.advance(0)
        assert self.takeReplies() == [220]
        self.lastInput = self.clock.seconds()

    def takeReplies(self) -> list[int]:
        data = self.transport.value()
        self.transport.clear()
        return parseReplies(data)

    def settle(self) -> None:
        """
        Let slow handlers answer, and hanging ones time out.
        """
        self.clock.advance(0)
        for _ in range(10_000):
            if not (self.pending or self.hanging):
                break
            self.clock.advance(self.nextCall())
        assert not (self.pending or self.hanging), "a handler's answer never came"

    def nextCall(self) -> float:
        """
        The time to the clock's next call.
        """
        calls = self.clock.getDelayedCalls()
        assert calls, "a handler has not answered, and nothing is scheduled to end the wait"
        return max(0.0, min(call.getTime() for call in calls) - self.clock.seconds())

    # Rules -----------------------------------------------------------------
    #
    # No preconditions: a rule that finds the session closed checks that the
    # closed session ignores input, then connects anew.

    @rule(command=commands, data=st.data())
    def send(self, command, data) -> None:
        self.exchange([command], data)

    @rule(batch=st.lists(commands, min_size=2, max_size=6), data=st.data())
    def pipeline(self, batch, data) -> None:
        self.exchange(batch, data)

    @rule(transaction=transactions(), pipelined=st.booleans(), data=st.data())
    def transact(self, transaction, pipelined, data) -> None:
        if pipelined:
            self.exchange(transaction, data)
        else:
            for command in transaction:
                self.exchange([command], data)

    @rule(seconds=st.sampled_from([0, 1, 29.5, 120, 120, 250, 250, TIMEOUT + 10]))
    def wait(self, seconds: float) -> None:
        """
        Stay idle: nothing happens before the timeout; after it, 421 and
        the session closes.
        """
        self.reopenIfClosed()
        if seconds > TIMEOUT:
            # Past the timeout however it is counted (from the last byte
            # received, or from the last reply, which is later).
            self.clock.advance(seconds)
            assert self.takeReplies() == [421]
            closes(self.model)
            note("timeout 421")
        else:
            # Near the boundary the model does not say which side it is.
            self.clock.advance(min(seconds, self.quietTime()))
            assert self.takeReplies() == []

    def quietTime(self) -> float:
        """
        How long the session may stay idle from now and surely not time
        out, however the timeout is counted.
        """
        return max(0.0, TIMEOUT - 10 - (self.clock.seconds() - self.lastInput))

    @rule(command=lineCommands, expire=st.sampled_from([False, False, False, False, False, True]), data=st.data())
    def trickle(self, command: Command, expire: bool, data) -> None:
        """
        Send one command line in pieces with time between them: within the
        timeout it is answered as if sent at once; a line still incomplete
        a timeout after it began gets 421 and the session closes.
        """
        self.reopenIfClosed()
        wire = command.wire
        if len(wire) < 2:
            return
        cuts = sorted(data.draw(st.lists(st.integers(1, len(wire) - 1), min_size=1, max_size=4, unique=True)))
        pieces = [wire[start:stop] for start, stop in itertools.pairwise([0, *cuts, len(wire)])]
        if expire:
            self.protocol.dataReceived(pieces[0])
            self.clock.advance(TIMEOUT + 10)
            assert self.takeReplies() == [421]
            closes(self.model)
            note("trickle 421")
            for piece in pieces[1:]:
                self.protocol.dataReceived(piece)
            self.settle()
            assert self.takeReplies() == []
            return
        # Gaps that end the line well within the timeout, counted from the
        # last byte before it (whether the deadline counts from there, from
        # the last reply or from the line's first byte, the line is in
        # time).
        budget = self.quietTime()
        for index, piece in enumerate(pieces):
            if index:
                gap = min(budget, data.draw(st.sampled_from([0, 0.5, 30, 100]), label="gap"))
                budget -= gap
                self.clock.advance(gap)
                assert self.takeReplies() == []
            self.protocol.dataReceived(piece)
        self.lastInput = self.clock.seconds()
        self.settle()
        self.checkReplies([command])
        note("trickle in time")

    def reopenIfClosed(self) -> None:
        """
        After a close: input is ignored, and the next client connects.
        """
        if not self.model.closed:
            return
        self.protocol.dataReceived(b"NOOP\r\nQUIT\r\n")
        self.settle()
        assert self.takeReplies() == []
        self.protocol.connectionLost(None)
        self.connect()

    def plan(self, batch: list[Command]) -> list[Command | Body]:
        """
        What to send for ``batch``: each DATA the model answers 354 is
        followed by its message.  After a command whose outcome the model
        leaves open, what follows could not be written for sure (a message,
        or commands that would land in one): the batch stops there.
        """
        planned: list[Command | Body] = []
        simulated = self.model.simulation()
        for command in batch:
            items: list[Command | Body] = [command]
            for item in items:
                planned.append(item)
                if simulated.closed:
                    continue  # sent all the same: the server must ignore it
                expected = item.expect(simulated)
                effects = set(expected.values())
                if len(effects) > 1:
                    return planned
                effects.pop()(simulated)
                if isinstance(item, Data) and set(expected) == {354}:
                    items.append(item.body)
        return planned

    def exchange(self, batch: list[Command], data) -> None:
        """
        Send ``batch`` in one write cut at random points, then check the
        replies against the model, command by command.
        """
        self.reopenIfClosed()
        planned = self.plan(batch)
        self.deliver(b"".join(item.wire for item in planned), data)
        self.checkReplies(planned)

    def checkReplies(self, planned: list[Command | Body]) -> None:
        """
        Match the replies to what was sent, one final reply per command in
        order and none once the session closed, and move the model along.
        """
        replies = self.takeReplies()
        seen = list(replies)
        for item in planned:
            if self.model.closed:
                break
            expected = item.expect(self.model)
            assert replies, f"no reply to {item!r} (expected {sorted(expected)}); replies {seen}"
            code = replies.pop(0)
            assert code in expected, f"{item!r}: got {code}, expected {sorted(expected)}; replies {seen}"
            expected[code](self.model)
            note(f"{type(item).__name__} {code}")
        assert not replies, f"replies after the session closed, or to no command: {replies} (all: {seen})"

    def deliver(self, wire: bytes, data) -> None:
        """
        Feed ``wire`` in pieces; between two, the clock may move enough for
        a slow handler to answer.
        """
        if len(wire) > 1:
            cuts = data.draw(
                st.one_of(
                    st.lists(st.integers(1, len(wire) - 1), max_size=8, unique=True),
                    st.just(list(range(1, len(wire)))) if len(wire) <= 80 else st.just([]),
                ),
                label="cuts",
            )
        else:
            cuts = []
        bounds = [0, *sorted(cuts), len(wire)]
        for start, stop in itertools.pairwise(bounds):
            self.protocol.dataReceived(wire[start:stop])
            self.lastInput = self.clock.seconds()
            if (self.pending or self.hanging) and data.draw(st.booleans(), label="let handlers answer"):
                self.clock.advance(self.nextCall())
        self.settle()

    # Invariants ------------------------------------------------------------

    @invariant()
    def nothingLogged(self) -> None:
        assert not self.unexpectedLogs, self.unexpectedLogs[0]

    @invariant()
    def closingOnlyWhenClosed(self) -> None:
        if self.protocol is not None:
            assert bool(self.transport.disconnecting) == self.model.closed

    @invariant()
    def readingWhenIdle(self) -> None:
        # Input is paused only while a handler has not answered.
        if self.protocol is not None and not self.model.closed:
            assert self.transport.producerState == "producing"

    @invariant()
    def receivedWhatWasSent(self) -> None:
        assert len(self.received) == len(self.model.received), (self.received, self.model.received)
        for (sender, recipients, msg), (expectedSender, expectedRecipients, body, protocol) in zip(
            self.received, self.model.received, strict=True
        ):
            assert (sender, recipients) == (expectedSender, expectedRecipients)
            if self.receivedHeader:
                match = RECEIVED.match(msg)
                assert match is not None, f"bad Received header: {msg[:300]!r}"
                assert match.group(1).decode() == protocol, (match.group(0), protocol)
                msg = msg[match.end() :]
            assert msg == body, (msg, body)

    def teardown(self) -> None:
        globalLogPublisher.removeObserver(self.observe)
        if self.protocol is None:
            return
        self.protocol.connectionLost(None)
        self.clock.advance(0)
        assert self.transport.value() == b""
        assert self.disconnects == self.sessions
        # Nothing of the session is left to run.
        assert self.clock.getDelayedCalls() == [], self.clock.getDelayedCalls()


#: Our trace header: well-formed, no control character from the peer.
RECEIVED = re.compile(
    rb"Received: from [\x21-\x7e]+ \(\[192\.0\.2\.7\]\)\r\n"
    rb"\tby mx\.test \(infsmtp\) with ([A-Z0-9]+)\r\n"
    rb"\tid [0-9A-Za-z]+(?:\r\n\tfor <[^\x00-\x1f\x7f]*>)?; [^\x00-\x1f\x7f]+\r\n"
)


#: The CI run: reproducible (derandomized, no example database) and well
#: under a minute.  fuzz/run_session_model.py runs the same machine longer.
CI_SETTINGS = settings(
    max_examples=200,
    stateful_step_count=30,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    # The first defect found, shrunk, is the clearest report; explaining it
    # (another phase) takes minutes.
    report_multiple_bugs=False,
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
)

TestSessionModel = SessionMachine.TestCase
TestSessionModel.settings = CI_SETTINGS

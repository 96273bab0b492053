"""
The sans-I/O core, driven directly: no sockets, hypothesis for the framers
and parsers.
"""

import re

import hypothesis
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from infsmtp._wire import (
    BARE_NEWLINE,
    LINE_TOO_LONG,
    LINE_TOO_LONG_IN_DATA,
    TOO_BIG,
    CommandLineFramer,
    DataFramer,
    MailArguments,
    PathSyntaxError,
    SpoolSink,
    formatReply,
    parseCommand,
    parseMailArguments,
    parsePath,
)

#: Dot-atom addresses (RFC 5321 Mailbox without quoting).
_atom = st.text("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+/=?^_`{|}~-", min_size=1, max_size=8)
addresses = st.builds(
    lambda local, domain: ".".join(local) + "@" + ".".join(domain),
    st.lists(_atom, min_size=1, max_size=3),
    st.lists(st.text("abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=8), min_size=1, max_size=3),
)
#: ESMTP parameter keywords and values (RFC 5321 esmtp-keyword, esmtp-value).
keywords = st.from_regex(rb"\A[A-Za-z0-9][A-Za-z0-9-]{0,10}\Z")
values = st.binary(min_size=1, max_size=12).map(lambda b: bytes(0x21 + c % 94 for c in b).replace(b"=", b"x"))


def serialise(parsed: MailArguments) -> bytes:
    """
    MAIL arguments written back as a client would send them.
    """
    return b"FROM:<" + parsed.address.encode() + b">" + b"".join(
        b" " + keyword.encode() + (b"" if value is None else b"=" + value.encode())
        for keyword, value in parsed.parameters.items()
    )


def splitAt(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, start = [], 0
    for p in points:
        pieces.append(data[start:p])
        start = p
    pieces.append(data[start:])
    return pieces


def frame(stream: bytes, pieces: list[bytes] | None = None, **kw):
    sink = SpoolSink(None)
    framer = DataFramer(sink, **kw)
    rest = None
    for piece in pieces if pieces is not None else [stream]:
        if framer.done:
            rest += piece
            continue
        rest = framer.feed(piece)
    return framer, sink.getvalue(), rest


def stuff(message: bytes) -> bytes:
    """The client side: dot-stuff CRLF lines and terminate."""
    lines = message.split(b"\r\n")
    assert lines[-1] == b""
    stuffed = [b"." + ln if ln.startswith(b".") else ln for ln in lines[:-1]]
    return b"".join(ln + b"\r\n" for ln in stuffed) + b".\r\n"


lineText = st.binary(max_size=40).map(
    lambda b: b.replace(b"\r", b"").replace(b"\n", b"")
)
messages = st.lists(st.one_of(lineText, st.sampled_from([b".", b"..", b".x", b""])), max_size=30).map(
    lambda lines: b"".join(ln + b"\r\n" for ln in lines)
)


class TestDataFramer:
    def test_empty_message(self):
        framer, body, rest = frame(b".\r\nQUIT\r\n")
        assert (framer.done, body, rest, framer.fault) == (True, b"", b"QUIT\r\n", None)

    def test_unstuffs_leading_dots(self):
        framer, body, rest = frame(b"..a\r\nb\r\n...\r\n.\r\n")
        assert body == b".a\r\nb\r\n..\r\n"
        assert rest == b""

    @settings(max_examples=300)
    @given(messages, st.lists(st.integers(min_value=0), max_size=12), st.binary(max_size=20))
    def test_any_chunking_gives_the_same_message(self, message, cuts, after):
        stream = stuff(message) + after
        framer, body, rest = frame(stream, splitAt(stream, cuts))
        assert framer.done and framer.fault is None
        assert body == message
        assert rest == after

    @settings(max_examples=200)
    @given(messages, st.lists(st.integers(min_value=0), max_size=12))
    def test_max_line_length_chunking(self, message, cuts):
        stream = stuff(message)
        limit = 20
        # The limit is on the line as transmitted, that is after stuffing.
        wire = [b"." + ln if ln.startswith(b".") else ln for ln in message.split(b"\r\n")[:-1]]
        expected = any(len(ln) + 2 > limit for ln in wire)
        framer, body, _ = frame(stream, splitAt(stream, cuts), maxLineLength=limit)
        assert framer.done
        assert (framer.fault == LINE_TOO_LONG_IN_DATA) == expected
        if not expected:
            assert body == message

    @pytest.mark.parametrize(
        "smuggle",
        [b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r", b"\r.\r\n", b"\n.\r"],
    )
    def test_smuggling_sequences_do_not_end_data(self, smuggle):
        stream = b"Subject: x\r\n\r\nhi" + smuggle + b"MAIL FROM:<evil@x>\r\n" + b"\r\n.\r\nNOOP\r\n"
        framer, body, rest = frame(stream)
        assert framer.done
        assert framer.fault == BARE_NEWLINE
        assert rest == b"NOOP\r\n"
        assert body == b""  # nothing of a faulty message is kept

    @given(st.lists(st.integers(min_value=0), max_size=12))
    def test_smuggling_any_chunking(self, cuts):
        stream = b"a\r\nb\n.\r\nMAIL FROM:<e@x>\r\n.\r\nQUIT\r\n"
        framer, _, rest = frame(stream, splitAt(stream, cuts))
        assert framer.fault == BARE_NEWLINE
        assert rest == b"QUIT\r\n"

    @settings(max_examples=400)
    @given(
        st.lists(st.sampled_from([b"a", b"\r", b"\n", b".", b"\r\n", b"xyz"]), max_size=60),
        st.lists(st.integers(min_value=0), max_size=8),
    )
    def test_bare_newline_found_wherever_it_is(self, parts, cuts):
        """
        A CR not followed by LF, or an LF not after a CR, anywhere in the
        message and however the stream is cut, marks it faulty; a message
        of CRLF lines only is not.
        """
        content = b"".join(parts)
        stream = content + b"\r\n.\r\n"
        hypothesis.assume(stream.find(b"\r\n.\r\n") == len(content) and not stream.startswith(b".\r\n"))
        body = content + b"\r\n"
        bare = re.search(rb"\r(?!\n)|(?<!\r)\n", body) is not None
        framer, _, rest = frame(stream + b"NOOP\r\n", splitAt(stream + b"NOOP\r\n", cuts))
        assert framer.done and rest == b"NOOP\r\n"
        assert (framer.fault == BARE_NEWLINE) == bare

    @pytest.mark.parametrize("partial", [0, 15, 16, 30])
    def test_first_line_counts_what_came_before_it(self, partial):
        """
        A line read in two pieces is measured whole: its first piece (a
        partial line passed on) plus the rest, line ending included.
        """
        limit = 20
        framer = DataFramer(SpoolSink(None), maxLineLength=limit)
        framer._partialLength = partial
        framer._emit(b"abc\r\n" + b"y" * 10 + b"\r\n", True, False)
        # partial + len("abc") + 2 against the limit.
        assert (framer.fault == LINE_TOO_LONG_IN_DATA) == (partial + 5 > limit)

    @pytest.mark.parametrize("where", [0, 1, 5, 40])
    def test_a_long_line_among_many_short_ones(self, where):
        """
        One line over the limit anywhere among many short lines, read in
        one piece, is found; the same lines without it pass.
        """
        limit = 20
        short = [b"a" * 10] * 50
        lines = short[:where] + [b"b" * 30] + short[where:]
        stream = b"".join(line + b"\r\n" for line in lines) + b".\r\n"
        framer, _, _ = frame(stream, maxLineLength=limit)
        assert framer.fault == LINE_TOO_LONG_IN_DATA
        fits = b"".join(line + b"\r\n" for line in short + [b"c" * 18]) + b".\r\n"
        framer, _, _ = frame(fits, maxLineLength=limit)
        assert framer.fault is None

    def test_too_big_reads_to_end_and_keeps_nothing(self):
        chunk = b"x" * 70 + b"\r\n"
        framer = DataFramer(SpoolSink(None), maxSize=1000)
        sink = framer.sink
        for _ in range(1000):
            assert framer.feed(chunk) is None
        assert framer.fault == TOO_BIG
        assert len(sink.getvalue()) <= 1000
        assert framer.feed(b".\r\nRSET\r\n") == b"RSET\r\n"

    def test_long_line_without_newline_is_not_buffered(self):
        framer = DataFramer(SpoolSink(None), maxLineLength=1000)
        for _ in range(1000):
            framer.feed(b"y" * 1024)
            assert len(framer._buffer) <= 1000
        assert framer.feed(b"\r\n.\r\n") == b""
        assert framer.fault == LINE_TOO_LONG_IN_DATA

    def test_long_line_allowed_without_limit(self):
        line = b"z" * 200_000
        framer, body, _ = frame(line + b"\r\n.\r\n", [line[:70000], line[70000:] + b"\r", b"\n.\r\n"])
        assert framer.fault is None
        assert body == line + b"\r\n"


class TestCommandLineFramer:
    def test_lines_and_remainder(self):
        framer = CommandLineFramer()
        framer.feed(b"EHLO x\r\nMAIL FROM:<a@b>\nDATA\r\nSubject")
        assert framer.next() == b"EHLO x"
        assert framer.next() == b"MAIL FROM:<a@b>"
        assert framer.next() == b"DATA"
        assert framer.next() is None
        assert framer.takeRemainder() == b"Subject"

    def test_long_line_reported_once_and_never_buffered(self):
        framer = CommandLineFramer(maxLength=100)
        for _ in range(1000):
            framer.feed(b"A" * 1000)
            assert framer.next() is None
            assert framer.buffered <= 1100
        framer.feed(b"AAA\r\nNOOP\r\n")
        assert framer.next() is LINE_TOO_LONG
        assert framer.next() == b"NOOP"
        assert framer.next() is None

    def test_complete_long_line(self):
        framer = CommandLineFramer(maxLength=10)
        framer.feed(b"x" * 50 + b"\r\nQUIT\r\n")
        assert framer.next() is LINE_TOO_LONG
        assert framer.next() == b"QUIT"

    @given(st.lists(lineText.filter(lambda ln: len(ln) < 50), max_size=10), st.lists(st.integers(min_value=0), max_size=10))
    def test_any_chunking(self, lines, cuts):
        stream = b"".join(ln + b"\r\n" for ln in lines)
        framer = CommandLineFramer(maxLength=100)
        got = []
        for piece in splitAt(stream, cuts):
            framer.feed(piece)
            while (line := framer.next()) is not None:
                got.append(line)
        assert got == lines


class TestParsing:
    def test_parse_command(self):
        assert parseCommand(b"ehlo  client.example ") == (b"EHLO", b"client.example")
        assert parseCommand(b"QUIT") == (b"QUIT", b"")
        assert parseCommand(b"\x00\xff garbage")[0] == b""
        assert parseCommand(b"")[0] == b""

    @given(st.binary(max_size=40))
    def test_parse_command_verb_is_one_to_twenty_letters_or_nothing(self, line):
        verb, argument = parseCommand(line)
        stripped = line.strip(b" \t")
        head, _, rest = stripped.partition(b" ")
        if re.fullmatch(rb"[A-Za-z]{1,20}", head):
            assert (verb, argument) == (head.upper(), rest.strip(b" \t"))
        else:
            assert (verb, argument) == (b"", stripped)

    def test_mail_arguments(self):
        parsed = parseMailArguments(b"from: <a@b.example> size=100 BODY=8BITMIME SMTPUTF8", b"FROM:", True)
        assert parsed.address == "a@b.example"
        assert parsed.parameters == {"SIZE": "100", "BODY": "8BITMIME", "SMTPUTF8": None}

    def test_null_sender_and_postmaster(self):
        assert parseMailArguments(b"FROM:<>", b"FROM:", True).address == ""
        with pytest.raises(PathSyntaxError):
            parseMailArguments(b"TO:<>", b"TO:", False)
        assert parseMailArguments(b"TO:<Postmaster>", b"TO:", False, True).address == "Postmaster"

    def test_source_route_and_quoted(self):
        assert parsePath(b"<@relay.example,@b.example:u@c.example>", False) == "u@c.example"
        assert parseMailArguments(b'TO:<"odd>name"@x.example>', b"TO:", False).address == '"odd>name"@x.example'

    def test_utf8_address(self):
        assert parsePath("<jörg@exämple.de>".encode(), False) == "jörg@exämple.de"

    @pytest.mark.parametrize(
        "bad",
        [b"FROM:a@b", b"FROM:<a@b", b"FROM:<a b@c>", b"FROM:<a@b>SIZE=1", b"FROM:<a@b> SIZE=", b"TO:<a@b>", b"FROM:<@>", b"FROM:<a@>", b"FROM:<" + b"a" * 300 + b"@b>"],
    )
    def test_bad_syntax(self, bad):
        with pytest.raises(PathSyntaxError):
            parseMailArguments(bad, b"FROM:", True)

    @given(st.binary(max_size=300))
    def test_parser_gives_arguments_or_PathSyntaxError(self, data):
        """
        Any bytes give parsed arguments or PathSyntaxError, nothing else;
        what is given back came from the input (the prefix was there, the
        keywords are ESMTP keywords) and parses again to itself.
        """
        try:
            parsed = parseMailArguments(data, b"FROM:", True)
        except PathSyntaxError:
            return
        assert type(parsed) is MailArguments
        assert data[:5].upper() == b"FROM:"
        assert all(re.fullmatch(r"[A-Z0-9][A-Z0-9-]*", keyword) for keyword in parsed.parameters)
        assert parseMailArguments(serialise(parsed), b"FROM:", True) == parsed

    @given(
        st.sampled_from([b"FROM:", b"from:", b"From:", b"fRoM:"]),
        st.sampled_from([b"", b" ", b"   "]),
        addresses,
        st.lists(st.tuples(keywords, st.one_of(st.none(), values)), max_size=4, unique_by=lambda kv: kv[0].upper()),
    )
    def test_well_formed_arguments_parse_exactly(self, prefix, spaces, address, parameters):
        """
        MAIL arguments built from valid parts come back exactly: the
        address, and every parameter with its keyword upper-cased.
        """
        argument = prefix + spaces + b"<" + address.encode() + b">" + b"".join(
            b" " + keyword + (b"" if value is None else b"=" + value) for keyword, value in parameters
        )
        assert parseMailArguments(argument, b"FROM:", True) == MailArguments(
            address,
            {keyword.decode().upper(): None if value is None else value.decode() for keyword, value in parameters},
        )

    @given(st.binary(max_size=40).filter(lambda b: b[:5].upper() != b"FROM:"), addresses)
    def test_without_the_prefix_is_a_syntax_error(self, junk, address):
        with pytest.raises(PathSyntaxError, match="expected FROM:<address>"):
            parseMailArguments(junk + b"<" + address.encode() + b">", b"FROM:", True)

    def test_format_reply(self):
        assert formatReply(250, "OK", "2.0.0") == b"250 2.0.0 OK\r\n"
        assert formatReply(250, "a\nb", None) == b"250-a\r\n250 b\r\n"
        assert formatReply(550, "5.7.1 no", "5.0.0") == b"550 5.7.1 no\r\n"

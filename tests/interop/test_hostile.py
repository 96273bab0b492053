"""
Hostile input over a real socket: garbage, NUL bytes, endless lines,
pipelining, wrong order, vanishing clients, STARTTLS injection
(CVE-2011-0411), SMTP smuggling (CVE-2023-51764 class), every limit, and
AUTH abuse.  After each case a well-behaved client must still be served,
and nothing may have been logged as an internal failure.
"""

from __future__ import annotations

import base64
import random

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.threads import deferToThread

import infsmtp._server.transaction
from infsmtp._server.protocol import ServerProtocol


def inThread(fn, *args):
    return deferToThread(fn, *args).addTimeout(60, reactor)


def noFailures(loggedFailures):
    assert loggedFailures == [], [e.get("log_format") for e in loggedFailures]


def envelope(client, sender="sender@example.org", recipient="rcpt@example.net"):
    """
    Greeting, EHLO, MAIL, RCPT, DATA, one step at a time.
    """
    assert client.reply().code == 220
    client.expect("EHLO hostile.test", 250)
    client.expect(f"MAIL FROM:<{sender}>", 250)
    client.expect(f"RCPT TO:<{recipient}>", 250)
    client.expect("DATA", 354)


@pytest.fixture
def bufferHighWater(monkeypatch):
    """
    The most bytes a session held in its command or DATA buffer after any
    dataReceived (what "never holds more than the limit" means).
    """
    high = {"command": 0, "data": 0}
    original = ServerProtocol.dataReceived

    def spy(self, data):
        original(self, data)
        high["command"] = max(high["command"], self._framer.buffered)
        if self._dataFramer is not None:
            high["data"] = max(high["data"], len(self._dataFramer._buffer))

    monkeypatch.setattr(ServerProtocol, "dataReceived", spy)
    return high


@pytest.fixture
def sinkWrites(monkeypatch):
    """
    The total bytes each message's sink was given, whatever the sink (what
    "nothing kept" means); the Received: header counts too.
    """
    totals: list[int] = []
    original = infsmtp._server.transaction.DataFramer

    class CountingFramer(original):
        def __init__(self, sink, *args, **kwargs):
            index = len(totals)
            totals.append(0)
            write = sink.write

            def counted(data):
                totals[index] += len(data)
                write(data)

            sink.write = counted
            super().__init__(sink, *args, **kwargs)

    monkeypatch.setattr(infsmtp._server.transaction, "DataFramer", CountingFramer)
    return totals


#: Room for the Received: header the server writes to the sink itself.
HEADER_ROOM = 1024


# Garbage ---------------------------------------------------------------------


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("seed", [1, 2, 3, 4])
async def test_random_garbage(serve, raw, recorder, assertServed, loggedFailures, seed):
    """
    Random bytes (random line lengths, some over the limit): every line
    gets exactly one well-formed error reply, then QUIT still works.
    """
    server = await serve(maxErrors=100_000)
    rng = random.Random(seed)
    garbage = bytearray()
    for _ in range(60):
        garbage += rng.randbytes(rng.choice([0, 1, 5, 40, 300, 3000])).replace(b"\n", b"")
        garbage += rng.choice([b"\n", b"\r\n", b"\r\r\n"])
    garbage = bytes(garbage)
    lines = garbage.count(b"\n")

    def run():
        client = raw(server.port)
        assert client.reply().code == 220
        client.send(garbage + b"QUIT\r\n")
        return client.repliesToEnd()

    replies = await inThread(run)
    assert len(replies) == lines + 1
    assert replies[-1].code == 221
    assert {r.code for r in replies[:-1]} <= {500, 501, 502}
    assert all(r.text.startswith("5.5.") for r in replies[:-1])
    assert recorder.received == []
    noFailures(loggedFailures)
    await assertServed(server)


@pytest_twisted.ensureDeferred
async def test_nul_bytes(serve, raw, recorder, assertServed, loggedFailures):
    server = await serve()

    def run():
        client = raw(server.port)
        assert client.reply().code == 220
        codes = [
            client.command(b"\0\0\0").code,
            client.command(b"NOOP\0").code,
            client.command(b"\0EHLO x").code,
        ]
        # Issue 9: a control character in the HELO name is refused, not
        # carried into handlers, the Received: header and the log.
        codes.append(client.command(b"EHLO nul\0host").code)
        client.expect(b"EHLO nulhost", 250)
        codes.append(client.command(b"MAIL FROM:<nul\0@example.org>").code)
        client.expect(b"MAIL FROM:<a@example.org>", 250)
        codes.append(client.command(b"RCPT TO:<b\0@example.net>").code)
        client.expect(b"RCPT TO:<b@example.net>", 250)
        client.expect(b"DATA", 354)
        final = client.command(b"Subject: nul\r\n\r\nbinary \0 body \0\0\r\n.")
        client.expect(b"QUIT", 221)
        return codes, final

    codes, final = await inThread(run)
    assert codes == [500, 500, 500, 501, 501, 501]
    # A NUL in the body is data (8BITMIME and binary-ish mail carry it):
    # kept exactly, never truncated at the NUL nor refused.
    assert final.code == 250, final
    [received] = recorder.received
    assert received["msg"].endswith(b"\r\n\r\nbinary \0 body \0\0\r\n")
    assert received["helo"] == "nulhost"
    noFailures(loggedFailures)
    await assertServed(server)


@pytest_twisted.ensureDeferred
async def test_megabyte_without_newline(serve, raw, assertServed, loggedFailures, bufferHighWater):
    """
    1 MB with no newline in command mode: never buffered beyond the line
    limit, answered 500 5.5.2 once its line ends, and the session goes on.
    """
    server = await serve()

    def run():
        client = raw(server.port)
        assert client.reply().code == 220
        for _ in range(16):
            client.send(b"A" * 65536)
        tooLong = client.command(b"")
        client.expect("EHLO after.test", 250)
        client.expect("NOOP", 250)
        client.expect("QUIT", 221)
        return tooLong

    tooLong = await inThread(run)
    assert tooLong.code == 500 and tooLong.text.startswith("5.5.2")
    assert bufferHighWater["command"] <= server.maxLineLength
    noFailures(loggedFailures)
    await assertServed(server)


# Pipelining and order ------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_pipelined_commands_in_one_write(serve, raw, recorder, assertServed, loggedFailures):
    """
    Two whole transactions and QUIT in a single write: the replies come in
    order, one per command, and exactly two messages arrive.
    """
    server = await serve()
    batch = (
        b"EHLO pipe.test\r\n"
        b"MAIL FROM:<a@example.org>\r\n"
        b"RCPT TO:<one@example.net>\r\n"
        b"RCPT TO:bad-syntax\r\n"
        b"RCPT TO:<two@example.net>\r\n"
        b"DATA\r\n"
        b"Subject: first\r\n\r\nQUIT\r\n..MAIL FROM:<not-a-command@example.org>\r\n.\r\n"
        b"MAIL FROM:<b@example.org>\r\n"
        b"RCPT TO:<three@example.net>\r\n"
        b"DATA\r\n"
        b"Subject: second\r\n\r\nbody\r\n.\r\n"
        b"NOOP\r\n"
        b"QUIT\r\n"
    )

    replies = await inThread(lambda: raw(server.port).exchange(batch))
    assert [r.code for r in replies] == [250, 250, 250, 501, 250, 354, 250, 250, 250, 354, 250, 250, 221]
    assert [r["rcptTo"] for r in recorder.received] == [["one@example.net", "two@example.net"], ["three@example.net"]]
    assert recorder.received[0]["msg"].endswith(b"Subject: first\r\n\r\nQUIT\r\n.MAIL FROM:<not-a-command@example.org>\r\n")
    assert recorder.mailFroms == ["a@example.org", "b@example.org"]
    noFailures(loggedFailures)
    await assertServed(server)


@pytest_twisted.ensureDeferred
async def test_commands_out_of_order(serve, raw, recorder, assertServed, loggedFailures):
    server = await serve()

    def run():
        client = raw(server.port)
        assert client.reply().code == 220
        out = [
            client.command("MAIL FROM:<a@example.org>"),  # before EHLO
            client.command("EHLO order.test"),
            client.command("RCPT TO:<b@example.net>"),  # before MAIL
            client.command("DATA"),  # before MAIL
            client.command("MAIL FROM:<a@example.org>"),
            client.command("MAIL FROM:<a@example.org>"),  # nested
            client.command("DATA"),  # no recipient yet
            client.command("RCPT TO:<b@example.net>"),
            client.command("DATA"),
        ]
        out.append(client.command("Subject: order\r\n\r\nok\r\n."))
        client.expect("QUIT", 221)
        return out

    replies = await inThread(run)
    assert [r.code for r in replies] == [503, 250, 503, 503, 250, 503, 554, 250, 354, 250]
    for r in (replies[0], replies[2], replies[3], replies[5]):
        assert r.text.startswith("5.5.1")
    assert len(recorder.received) == 1
    noFailures(loggedFailures)
    await assertServed(server)


# Vanishing clients ---------------------------------------------------------------


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("how", ["reset", "close"])
async def test_client_vanishes_mid_data(serve, raw, recorder, assertServed, loggedFailures, how):
    server = await serve()

    def run():
        client = raw(server.port)
        envelope(client)
        client.send(b"Subject: half\r\n\r\n" + b"x" * 100_000 + b"\r\nno end")
        client.abort() if how == "reset" else client.close()

    await inThread(run)
    await recorder.waitDisconnects(1)
    assert recorder.received == []
    assert list(recorder.disconnects.values()) == [1]
    assert server.sessionCount == 0
    noFailures(loggedFailures)
    await assertServed(server)


# STARTTLS injection (CVE-2011-0411) -------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_starttls_command_injection(serve, raw, recorder, assertServed, loggedFailures, certificateAuthority):
    """
    Commands sent in the same packet as STARTTLS are plaintext the attacker
    may have injected: they must never be executed, neither before nor
    after the handshake.
    """
    server = await serve(tls=True)

    def run():
        client = raw(server.port, ehlo="victim.test")
        client.send(b"STARTTLS\r\nEHLO evil.test\r\nMAIL FROM:<evil@attacker.test>\r\nRSET\r\n")
        ready = client.reply()
        client.startTLS(certificateAuthority.certFile)
        # The first reply over TLS answers our first command over TLS.
        first = client.command("RCPT TO:<victim@example.net>")
        noHelo = client.command("MAIL FROM:<sender@example.org>")
        ehlo = client.expect("EHLO victim.test", 250)
        client.expect("MAIL FROM:<sender@example.org>", 250)
        client.expect("RCPT TO:<victim@example.net>", 250)
        client.expect("DATA", 354)
        client.expect("Subject: after TLS\r\n\r\nsafe\r\n.", 250)
        client.expect("QUIT", 221)
        return ready, first, noHelo, ehlo

    ready, first, noHelo, ehlo = await inThread(run)
    assert ready.code == 220
    assert first.code == 503  # no MAIL was ever accepted
    assert noHelo.code == 503  # EHLO was forgotten with STARTTLS, the injected one too
    assert "STARTTLS" not in ehlo.lines
    assert "evil@attacker.test" not in recorder.mailFroms
    assert recorder.mailFroms == ["sender@example.org"]
    got = recorder.received[0]
    assert got["secure"] is True and got["helo"] == "victim.test"
    assert got["mailFrom"] == "sender@example.org"
    noFailures(loggedFailures)
    await assertServed(server)


# SMTP smuggling (CVE-2023-51764 class) --------------------------------------------------

SMUGGLING = {
    "LF.LF": b"\n.\n",
    "LF.CRLF": b"\n.\r\n",
    "CRLF.LF": b"\r\n.\n",
    "CR.CR": b"\r.\r",
    "CR.CRLF": b"\r.\r\n",
    "CRLF.CR": b"\r\n.\r",
    "CR.LF": b"\r.\n",
    "LF.CR": b"\n.\r",
}


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("sequence", list(SMUGGLING.values()), ids=list(SMUGGLING))
async def test_smtp_smuggling(serve, raw, recorder, assertServed, loggedFailures, sequence):
    """
    A message holding a false end-of-data followed by a smuggled
    transaction: a bare CR or LF is never an end of data, and marks the
    whole message as refused (550 5.5.2, as Postfix's smtpd_forbid_bare_newline
    does), so neither the message nor the smuggled one is delivered, and
    the smuggled MAIL FROM is never a command.
    """
    server = await serve()
    payload = (
        b"From: sender@example.org\r\nSubject: first\r\n\r\nfirst body"
        + sequence
        + b"MAIL FROM:<smuggled@attacker.test>\r\n"
        b"RCPT TO:<victim@example.net>\r\n"
        b"DATA\r\n"
        b"From: ceo@example.org\r\nSubject: smuggled\r\n\r\nsmuggled body\r\n"
        b".\r\n"
        b"QUIT\r\n"
    )

    def run():
        client = raw(server.port)
        envelope(client)
        client.send(payload)
        return client.repliesToEnd()

    replies = await inThread(run)
    assert len(replies) == 2, replies
    final, bye = replies
    assert bye.code == 221
    assert (final.code, final.text) == (550, "5.5.2 Message contains bare CR or LF; use CRLF line endings")
    assert recorder.mailFroms == ["sender@example.org"]
    assert recorder.received == []
    noFailures(loggedFailures)
    await assertServed(server)


# Limits --------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("length", [5000, 1 << 20], ids=["5KB", "1MB"])
async def test_long_line_in_data(serve, raw, recorder, assertServed, loggedFailures, bufferHighWater, sinkWrites, length):
    """
    A line over the limit inside DATA: the server stays in DATA (the lines
    after it are message text, not commands), answers 5xx at the end of
    data, keeps nothing, and the next commands work.
    """
    server = await serve()
    body = (
        b"Subject: long\r\n\r\n"
        + b"L" * length
        + b"\r\nMAIL FROM:<evil@attacker.test>\r\nRSET\r\nQUIT\r\n.\r\n"
    )

    def run():
        client = raw(server.port)
        envelope(client)
        client.send(body)
        end = client.reply()
        client.expect("MAIL FROM:<again@example.org>", 250)
        client.expect("RCPT TO:<rcpt@example.net>", 250)
        client.expect("DATA", 354)
        client.expect("Subject: fine\r\n\r\nshort lines\r\n.", 250)
        client.expect("QUIT", 221)
        return end

    end = await inThread(run)
    assert 500 <= end.code < 600 and end.text.startswith("5."), end
    assert "evil@attacker.test" not in recorder.mailFroms
    assert [r["mailFrom"] for r in recorder.received] == ["again@example.org"]
    assert bufferHighWater["command"] <= server.maxLineLength
    assert bufferHighWater["data"] <= server.maxDataLineLength
    assert sinkWrites[0] <= server.maxDataLineLength + HEADER_ROOM
    noFailures(loggedFailures)
    await assertServed(server)


@pytest_twisted.ensureDeferred
async def test_size_over_limit_at_mail(serve, raw, recorder, assertServed, loggedFailures):
    server = await serve(maxMessageSize=10_000)

    def run():
        client = raw(server.port)
        assert client.reply().code == 220
        ehlo = client.expect("EHLO size.test", 250)
        over = client.command("MAIL FROM:<a@example.org> SIZE=10001")
        bad = client.command("MAIL FROM:<a@example.org> SIZE=lots")
        client.expect("MAIL FROM:<a@example.org> SIZE=10000", 250)
        client.expect("QUIT", 221)
        return ehlo, over, bad

    ehlo, over, bad = await inThread(run)
    assert "SIZE 10000" in ehlo.lines
    assert over.code == 552 and over.text.startswith("5.3.4")
    assert bad.code == 501
    assert recorder.mailFroms == ["a@example.org"]
    noFailures(loggedFailures)
    await assertServed(server)


@pytest_twisted.ensureDeferred
async def test_data_over_max_message_size(serve, raw, recorder, assertServed, loggedFailures, sinkWrites):
    """
    A DATA stream growing over maxMessageSize (no SIZE= given) is read to
    its end, answered 552 5.3.4, and not kept; the session goes on.
    """
    server = await serve(maxMessageSize=10_000)
    line = b"z" * 998 + b"\r\n"

    def run():
        client = raw(server.port)
        envelope(client)
        client.send(b"Subject: big\r\n\r\n" + line * 200 + b"RSET\r\n.\r\n")
        over = client.reply()
        client.expect("MAIL FROM:<small@example.org>", 250)
        client.expect("RCPT TO:<rcpt@example.net>", 250)
        client.expect("DATA", 354)
        client.expect(b"Subject: small\r\n\r\n" + line * 9 + b".", 250)
        client.expect("QUIT", 221)
        return over

    over = await inThread(run)
    assert over.code == 552 and over.text.startswith("5.3.4"), over
    assert [r["mailFrom"] for r in recorder.received] == ["small@example.org"]
    assert sinkWrites[0] <= server.maxMessageSize + HEADER_ROOM
    noFailures(loggedFailures)
    await assertServed(server)


@pytest_twisted.ensureDeferred
async def test_too_many_recipients(serve, raw, recorder, assertServed, loggedFailures):
    server = await serve(maxRecipients=3)

    def run():
        client = raw(server.port, ehlo="rcpt.test")
        client.expect("MAIL FROM:<a@example.org>", 250)
        codes = [client.command(f"RCPT TO:<r{n}@example.net>") for n in range(5)]
        client.expect("DATA", 354)
        client.expect("Subject: three\r\n\r\nx\r\n.", 250)
        client.expect("QUIT", 221)
        return codes

    replies = await inThread(run)
    assert [r.code for r in replies] == [250, 250, 250, 452, 452]
    assert replies[3].text.startswith("4.5.3")
    assert recorder.received[0]["rcptTo"] == ["r0@example.net", "r1@example.net", "r2@example.net"]
    noFailures(loggedFailures)
    await assertServed(server)


@pytest_twisted.ensureDeferred
async def test_too_many_errors(serve, raw, recorder, assertServed, loggedFailures):
    server = await serve(maxErrors=5)

    def run():
        client = raw(server.port)
        assert client.reply().code == 220
        client.send(b"BOGUS\r\n" * 5)
        return client.repliesToEnd()

    replies = await inThread(run)
    assert [r.code for r in replies] == [500] * 5 + [421]
    assert replies[-1].text.startswith("4.7.0")
    await recorder.waitDisconnects(1)
    assert server.sessionCount == 0
    noFailures(loggedFailures)
    await assertServed(server)


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("where", ["command", "data"])
async def test_idle_timeout(serve, raw, recorder, assertServed, loggedFailures, where):
    """
    An idle client is told 421 4.4.2 and disconnected (waiting on the close,
    not sleeping); mid-DATA, nothing is delivered.
    """
    server = await serve(timeout=0.5)

    def run():
        client = raw(server.port)
        if where == "data":
            envelope(client)
            client.send(b"Subject: stalled\r\n\r\npartial")
        else:
            assert client.reply().code == 220
        return client.repliesToEnd()

    replies = await inThread(run)
    assert [r.code for r in replies] == [421]
    assert replies[0].text.startswith("4.4.2")
    await recorder.waitDisconnects(1)
    assert recorder.received == []
    noFailures(loggedFailures)
    await assertServed(server)


@pytest_twisted.ensureDeferred
async def test_max_connections(serve, raw, recorder, assertServed, loggedFailures):
    server = await serve(maxConnections=2)

    def fill():
        first, second = raw(server.port), raw(server.port)
        assert first.reply().code == 220 and second.reply().code == 220
        third = raw(server.port)
        refused = third.repliesToEnd()
        return first, second, refused

    first, second, refused = await inThread(fill)
    assert [r.code for r in refused] == [421]
    assert refused[0].text.startswith("4.7.0")
    assert server.sessionCount == 2
    first.close()
    await recorder.waitDisconnects(1)
    await assertServed(server)
    second.close()
    await recorder.waitDisconnects(3)
    # The refused connection was never a session.
    assert len(recorder.connects) == 3 and len(recorder.disconnects) == 3
    noFailures(loggedFailures)


@pytest_twisted.ensureDeferred
async def test_max_connections_implicit_tls(serve, raw, recorder, loggedFailures, certificateAuthority):
    """
    Over implicit TLS the 421 comes through the TLS layer, and the refused
    client's TCP connection is closed.
    """
    server = await serve(tls=True, implicitTls=True, maxConnections=1)

    def run():
        first = raw(server.port)
        first.startTLS(certificateAuthority.certFile)
        assert first.reply().code == 220
        second = raw(server.port)
        second.startTLS(certificateAuthority.certFile)
        refused = second.repliesToEnd()
        second.close()
        first.expect("QUIT", 221)
        first.close()
        return refused

    refused = await inThread(run)
    assert [r.code for r in refused] == [421]
    assert refused[0].text.startswith("4.7.0")
    await recorder.waitDisconnects(1)
    assert len(recorder.connects) == 1
    noFailures(loggedFailures)


# AUTH abuse ------------------------------------------------------------------------


def plain(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


def login(session):
    session.authenticated = (session.username, session.password) == ("user", "right")


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("tls", [True, False], ids=["starttls-offered", "no-tls"])
async def test_auth_in_plaintext(serve, raw, recorder, assertServed, loggedFailures, tls):
    server = await serve(tls=tls, handlers={"onLogin": login})

    def run():
        client = raw(server.port)
        assert client.reply().code == 220
        ehlo = client.expect("EHLO plain.test", 250)
        refused = client.command("AUTH PLAIN " + plain("user", "right"))
        refusedLogin = client.command("AUTH LOGIN")
        client.expect("QUIT", 221)
        return ehlo, refused, refusedLogin

    ehlo, refused, refusedLogin = await inThread(run)
    assert not any(line.startswith("AUTH") for line in ehlo.lines)
    for r in (refused, refusedLogin):
        assert r.code == 538 and r.text.startswith("5.7.11"), r
    noFailures(loggedFailures)
    await assertServed(server)


@pytest_twisted.ensureDeferred
async def test_auth_malformed(serve, raw, recorder, assertServed, loggedFailures):
    server = await serve(allowInsecureAuth=True, handlers={"onLogin": login})

    def run():
        client = raw(server.port)
        assert client.reply().code == 220
        ehlo = client.expect("EHLO auth.test", 250)
        out = {
            "bare": client.command("AUTH"),
            "unknown": client.command("AUTH CRAM-SHA9"),
            "badInitial": client.command("AUTH PLAIN !!!not-base64!!!"),
            "noNuls": client.command("AUTH PLAIN " + base64.b64encode(b"just a string").decode()),
        }
        client.expect("AUTH PLAIN", 334)
        out["badContinuation"] = client.command("%%%")
        client.expect("AUTH LOGIN", 334)
        out["badUsername"] = client.command("not base64 at all")
        client.expect("AUTH LOGIN", 334)
        client.expect(base64.b64encode(b"user").decode(), 334)
        out["badPassword"] = client.command("====")
        client.expect("AUTH PLAIN", 334)
        out["cancel"] = client.command("*")
        out["good"] = client.command("AUTH PLAIN " + plain("user", "right"))
        client.expect("QUIT", 221)
        return ehlo, out

    ehlo, out = await inThread(run)
    assert "AUTH PLAIN LOGIN" in ehlo.lines
    assert out["bare"].code == 501
    assert out["unknown"].code == 504
    for key in ("badInitial", "noNuls", "badContinuation", "badUsername", "badPassword"):
        assert out[key].code == 501 and out[key].text.startswith("5.5.2"), (key, out[key])
    assert out["cancel"].code == 501
    assert out["good"].code == 235
    noFailures(loggedFailures)
    await assertServed(server)


@pytest_twisted.ensureDeferred
async def test_three_failed_logins(serve, raw, recorder, assertServed, loggedFailures, certificateAuthority):
    server = await serve(tls=True, handlers={"onLogin": login})

    def run():
        client = raw(server.port, ehlo="guess.test")
        client.expect("STARTTLS", 220)
        client.startTLS(certificateAuthority.certFile)
        client.expect("EHLO guess.test", 250)
        failures = [client.command("AUTH PLAIN " + plain("user", f"guess{n}")) for n in range(2)]
        client.expect("AUTH LOGIN", 334)
        client.expect(base64.b64encode(b"user").decode(), 334)
        client.send(base64.b64encode(b"guess3") + b"\r\n")
        replies = failures + client.repliesToEnd()
        client.close()
        return replies

    replies = await inThread(run)
    assert [r.code for r in replies] == [535, 535, 535, 421]
    assert all(r.text.startswith("5.7.8") for r in replies[:3])
    assert replies[3].text.startswith("4.7.0")
    await recorder.waitDisconnects(1)
    noFailures(loggedFailures)
    await assertServed(server)


# Closing ---------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("ending", ["QUIT", "auth-failures"])
async def test_tls_client_that_never_closes_is_cut_off(serve, raw, recorder, assertServed, loggedFailures, certificateAuthority, ending):
    """
    Over TLS, closing waits for the client's close_notify.  A client that
    reads our last reply and then neither answers nor closes must not hold
    its session (and a maxConnections slot) forever: it is cut off after
    the idle timeout.
    """
    server = await serve(tls=True, timeout=0.5, maxConnections=1, maxAuthFailures=1, handlers={"onLogin": login})

    def run():
        client = raw(server.port, ehlo="holder.test")
        client.expect("STARTTLS", 220)
        client.startTLS(certificateAuthority.certFile)
        client.expect("EHLO holder.test", 250)
        if ending == "QUIT":
            client.send(b"QUIT\r\n")
        else:
            client.send(b"AUTH PLAIN " + plain("user", "wrong").encode() + b"\r\n")
        return client, client.repliesToEnd()

    client, replies = await inThread(run)
    assert [r.code for r in replies] == ([221] if ending == "QUIT" else [535, 421])
    # The client keeps its socket open; the server must end the session.
    await recorder.waitDisconnects(1, 10)
    assert server.sessionCount == 0
    await assertServed(server)
    client.close()
    noFailures(loggedFailures)


# Garbage where TLS is expected ----------------------------------------------------------


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("where", ["after-starttls", "implicit-tls"])
async def test_garbage_instead_of_tls_handshake(serve, raw, recorder, certificateAuthority, where):
    """
    Plaintext SMTP or random bytes where a TLS ClientHello belongs: the
    connection is closed, onDisconnect runs once, nothing is delivered, and
    the next client (over TLS) is served.
    """
    implicit = where == "implicit-tls"
    server = await serve(tls=True, implicitTls=implicit)

    def run():
        client = raw(server.port)
        if not implicit:
            assert client.reply().code == 220
            client.expect("EHLO tls.test", 250)
            client.expect("STARTTLS", 220)
        client.send(b"EHLO plaintext.test\r\nMAIL FROM:<evil@attacker.test>\r\n" + random.Random(7).randbytes(4000))
        try:
            data = client.readToEnd()
        except ConnectionResetError:
            data = b""
        client.close()
        return data

    data = await inThread(run)
    assert b"250" not in data  # no SMTP reply, in plaintext at least
    await recorder.waitDisconnects(1)
    assert list(recorder.disconnects.values()) == [1]
    assert recorder.mailFroms == [] and recorder.received == []

    def wellBehaved():
        import smtplib
        import ssl

        context = ssl.create_default_context(cafile=certificateAuthority.certFile)
        if implicit:
            with smtplib.SMTP_SSL("127.0.0.1", server.port, timeout=10, context=context) as client:
                return client.sendmail("a@example.org", ["b@example.net"], b"Subject: ok\r\n\r\nok\r\n")
        with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
            client.starttls(context=context)
            return client.sendmail("a@example.org", ["b@example.net"], b"Subject: ok\r\n\r\nok\r\n")

    assert await inThread(wellBehaved) == {}
    assert len(recorder.received) == 1 and recorder.received[0]["secure"] is True


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("where", ["implicit-tls", "after-starttls"])
async def test_silent_client_during_tls_handshake_is_cut_off(serve, raw, recorder, certificateAuthority, where):
    """
    A client that never sends its ClientHello: the idle timeout still ends
    the session (its 421 cannot go out before a handshake, so the
    connection is cut), and onDisconnect runs once.
    """
    server = await serve(tls=True, implicitTls=where == "implicit-tls", timeout=0.5)

    def run():
        client = raw(server.port)
        if where == "after-starttls":
            assert client.reply().code == 220
            client.expect("EHLO silent.test", 250)
            client.expect("STARTTLS", 220)
        try:
            data = client.readToEnd()
        except ConnectionResetError:
            data = b""
        client.close()
        return data

    data = await inThread(run)
    assert b"421" not in data  # never in plaintext
    await recorder.waitDisconnects(1)
    assert list(recorder.disconnects.values()) == [1]
    assert server.sessionCount == 0

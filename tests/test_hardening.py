"""
Issue 9, sans sockets: the server fails closed and stays bounded.  Each test
drives the real protocol through a StringTransport with a fake clock (see
test_protocol.py's harness); the socket-level cases live in
tests/interop/test_attack.py.
"""

from __future__ import annotations

import asyncio
import base64
import math

import pytest
from test_protocol import Harness, Transport, makeServer, session
from twisted.internet.defer import Deferred, succeed
from twisted.internet.testing import MemoryReactorClock

from infsmtp import Server, SMTPError
from infsmtp._server.limits import AUTH_FAILURE_WINDOW, MAX_AUTH_DELAY, ClientLimits, MemoryBudget, clientKey
from infsmtp._wire import SpoolSink, parseMailArguments, parseNumber


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


@pytest.fixture(name="server")
def serverFixture():
    return makeServer()


def texts(logEvents: list[dict]) -> list[str]:
    """
    The server's own log lines (not the session log's, which
    tests/test_observe.py checks).
    """
    from twisted.logger import formatEvent

    return [
        formatEvent(e)
        for e in logEvents
        if e.get("log_namespace", "").startswith("infsmtp") and e.get("log_namespace") != "infsmtp.session"
    ]


ENVELOPE = b"MAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\n"


# 1. Numbers from the wire --------------------------------------------------


@pytest.mark.parametrize("value", ["\u00b2", "\u2460", "\u0663", "1" * 21, "-1", "1e3", "0x10", " 1", "１"])
def test_size_that_is_not_ascii_digits_is_501_and_the_session_goes_on(server, value):
    h = session(server)
    # Pipelined: the NOOP before it and the MAIL after it are answered too.
    replies = h.codes(b"NOOP\r\nMAIL FROM:<a@b.test> SIZE=" + value.encode() + b"\r\nMAIL FROM:<a@b.test>\r\n")
    assert replies == [250, 501, 250]
    assert not h.transport.disconnecting


def test_size_of_twenty_digits_is_read_as_a_number(server):
    h = session(server)
    assert h.codes(b"MAIL FROM:<a@b.test> SIZE=" + b"9" * 20 + b"\r\n") == [552]
    assert h.codes(b"MAIL FROM:<a@b.test> SIZE=" + b"0" * 19 + b"1\r\n") == [250]


def test_parse_number():
    assert parseNumber("0") == 0
    assert parseNumber("9" * 20) == int("9" * 20)
    for bad in (None, "", "9" * 21, "\u00b2", "1 ", "+1", "１"):
        assert parseNumber(bad) is None


# 2. Handlers that fail closed ---------------------------------------------


BAD_RESULTS = ["550 5.1.1 no such user", "", 0, 1, 250, [], object()]


def _replies(h: Harness) -> list[bytes]:
    return h.take()


@pytest.mark.parametrize("result", BAD_RESULTS, ids=repr)
@pytest.mark.parametrize("name", ["onMailFrom", "onRcptTo"])
def test_address_handler_result_that_is_not_a_bool_is_451(name, result, logEvents):
    server = makeServer()
    received = []
    setattr(server, name, lambda s: result)
    server.onReceive = lambda s: received.append(s.rcptTo)
    h = session(server)
    if name == "onMailFrom":
        assert h.send(b"MAIL FROM:<a@b.test>\r\n") == [b"451 4.3.0 Temporary failure, try again later"]
        assert h.codes(b"RCPT TO:<c@d.test>\r\n") == [503]
    else:
        h.send(b"MAIL FROM:<a@b.test>\r\n")
        assert h.send(b"RCPT TO:<c@d.test>\r\n") == [b"451 4.3.0 Temporary failure, try again later"]
        assert h.protocol.session.rcptTo == []
        assert h.codes(b"DATA\r\n") == [554]
    assert received == []
    lines = [t for t in texts(logEvents) if name in t]
    assert len(lines) == 1, lines
    assert "not None, True or False" in lines[0] and "answered 451" in lines[0]
    assert not any(e.get("log_failure") for e in logEvents)  # one line, no traceback


@pytest.mark.parametrize("result", BAD_RESULTS, ids=repr)
def test_receive_handler_result_that_is_not_a_bool_is_451(result):
    server = makeServer()
    server.onReceive = lambda s: result
    h = session(server)
    assert h.send(ENVELOPE + b"DATA\r\nx\r\n.\r\n")[-1] == b"451 4.3.0 Error processing message, try again later"


def test_connect_handler_result_that_is_not_a_bool_is_421_and_close():
    server = makeServer()
    server.onConnect = lambda s: "ok"
    h = Harness(server)
    assert h.take() == [b"421 4.3.0 Temporary failure, try again later"]
    assert h.transport.disconnecting


def test_login_handler_result_that_is_not_a_bool_is_454():
    server = makeServer(allowInsecureAuth=True, authFailureDelay=0)
    server.onLogin = lambda s: "yes"
    h = session(server)
    assert h.send(b"AUTH PLAIN " + b64(b"\0u\0p") + b"\r\n") == [b"454 4.7.0 Temporary authentication failure"]
    assert not h.protocol.session.authenticated


def test_deferred_result_that_is_not_a_bool_is_451():
    server = makeServer()
    d = Deferred()
    server.onRcptTo = lambda s: d
    h = session(server)
    assert h.send(ENVELOPE) == [b"250 2.1.0 Sender OK"]
    d.callback("250 OK")
    assert h.take() == [b"451 4.3.0 Temporary failure, try again later"]
    assert h.protocol.session.rcptTo == []


def test_coroutine_result_that_is_not_a_bool_is_451():
    server = makeServer()

    async def onRcptTo(session):
        return 1

    server.onRcptTo = onRcptTo
    h = session(server)
    assert h.codes(ENVELOPE) == [250, 451]


def test_misspelt_decision_raises_and_answers_451(logEvents):
    server = makeServer()

    def onRcptTo(session):
        session.accepted = False  # a typo for accept

    server.onRcptTo = onRcptTo
    h = session(server)
    assert h.codes(ENVELOPE) == [250, 451]
    assert h.protocol.session.rcptTo == []
    failures = [e for e in logEvents if e.get("log_failure")]
    assert len(failures) == 1 and failures[0]["log_failure"].check(AttributeError)


@pytest.mark.parametrize("value", ["no", 0, None, 1])
def test_decision_field_that_is_not_a_bool_is_451(value):
    server = makeServer()

    def onRcptTo(session):
        session.accept = value

    server.onRcptTo = onRcptTo
    h = session(server)
    assert h.codes(ENVELOPE) == [250, 451]
    assert h.protocol.session.rcptTo == []


def test_session_data_is_for_the_handlers_state():
    server = makeServer()

    def onRcptTo(session):
        session.data["seen"] = session.data.get("seen", 0) + 1

    server.onRcptTo = onRcptTo
    h = session(server)
    assert h.codes(ENVELOPE + b"RCPT TO:<e@d.test>\r\n") == [250, 250, 250]
    assert h.protocol.session.data == {"seen": 2}


def test_session_has_no_dict():
    s = makeServer()
    h = session(s)
    with pytest.raises(AttributeError):
        h.protocol.session.recieved = False  # noqa: B018 (the point)


# 3. A 2xx SMTPError accepts ------------------------------------------------


def test_2xx_from_onRcptTo_adds_the_recipient_with_its_text():
    server = makeServer()
    got = []

    def onRcptTo(session):
        if session.address == "fwd@d.test":
            session.accept = False  # overridden: raising 2xx accepts
            raise SMTPError(251, "2.1.5 will forward")

    server.onRcptTo = onRcptTo
    server.onReceive = lambda s: got.append(list(s.rcptTo))
    h = session(server)
    h.send(b"MAIL FROM:<a@b.test>\r\n")
    assert h.send(b"RCPT TO:<fwd@d.test>\r\n") == [b"251 2.1.5 will forward"]
    assert h.send(b"RCPT TO:<c@d.test>\r\n") == [b"250 2.1.5 Recipient OK"]
    assert h.codes(b"DATA\r\nx\r\n.\r\n") == [354, 250]
    assert got == [["fwd@d.test", "c@d.test"]]


def test_2xx_from_every_handler_is_an_acceptance():
    server = makeServer(allowInsecureAuth=True)
    got = []

    def raise_(code, text):
        def handler(session):
            raise SMTPError(code, text)

        return handler

    server.onConnect = raise_(220, "mx.test welcome")
    server.onLogin = raise_(235, "2.7.0 welcome back")
    server.onMailFrom = raise_(250, "2.1.0 sender fine")
    server.onReceive = lambda s: (got.append(s.mailFrom), raise_(250, "2.0.0 stored as 42")(s))
    h = Harness(server)
    assert h.take() == [b"220 mx.test welcome"]
    h.send(b"EHLO c\r\n")
    assert h.send(b"AUTH PLAIN " + b64(b"\0u\0p") + b"\r\n") == [b"235 2.7.0 welcome back"]
    assert h.protocol.session.authenticated
    assert h.send(b"MAIL FROM:<a@b.test>\r\n") == [b"250 2.1.0 sender fine"]
    assert h.send(b"RCPT TO:<c@d.test>\r\nDATA\r\nx\r\n.\r\n")[-1] == b"250 2.0.0 stored as 42"
    assert got == ["a@b.test"]


@pytest.mark.parametrize("code", [354, 334, 600, 199, 100])
def test_smtperror_with_a_code_that_is_no_answer_is_451(code):
    server = makeServer()

    def onRcptTo(session):
        raise SMTPError(code, "odd")

    server.onRcptTo = onRcptTo
    h = session(server)
    assert h.codes(ENVELOPE) == [250, 451]


def test_421_from_a_handler_closes():
    server = makeServer()

    def onRcptTo(session):
        raise SMTPError(421, "4.7.0 go away")

    server.onRcptTo = onRcptTo
    h = session(server)
    assert h.send(ENVELOPE + b"NOOP\r\n") == [b"250 2.1.0 Sender OK", b"421 4.7.0 go away"]
    assert h.transport.disconnecting


def test_5xx_from_onConnect_closes():
    server = makeServer()

    def onConnect(session):
        raise SMTPError(554, "5.7.1 not you")

    server.onConnect = onConnect
    h = Harness(server)
    assert h.take() == [b"554 5.7.1 not you"]
    assert h.transport.disconnecting


# 4. Per-client limits --------------------------------------------------------


def limits(clock, **kw) -> ClientLimits:
    settings = {"maxSessions": 0, "maxRate": 0, "maxAuthFailures": 0, "authDelay": 0.0, "trusted": ()}
    settings.update(kw)
    return ClientLimits(clock=clock, **settings)


def test_concurrent_sessions_per_client():
    table = limits(MemoryReactorClock(), maxSessions=50)
    assert [table.connect("192.0.2.1") for _ in range(50)] == [None] * 50
    assert table.connect("192.0.2.1") == "too many concurrent connections from 192.0.2.1"
    assert table.connect("192.0.2.2") is None  # another client
    table.disconnect("192.0.2.1")
    assert table.connect("192.0.2.1") is None
    assert table.sessionsOf("192.0.2.1") == 50


def test_connection_rate_per_client():
    clock = MemoryReactorClock()
    table = limits(clock, maxRate=600)
    for _ in range(600):
        assert table.connect("192.0.2.1") is None
        table.disconnect("192.0.2.1")
    assert table.connect("192.0.2.1") == "too many connections from 192.0.2.1, slow down"
    # Refused attempts count: hammering keeps it refused.
    clock.advance(0.05)
    assert table.connect("192.0.2.1") is not None
    # 600 a minute is one every 0.1 s.
    clock.advance(0.1)
    assert table.connect("192.0.2.1") is None
    assert table.connect("192.0.2.1") is not None
    assert table.connect("192.0.2.9") is None


def test_ipv6_clients_are_counted_by_their_64():
    table = limits(MemoryReactorClock(), maxSessions=2)
    assert table.connect("2001:db8:1:2::1") is None
    assert table.connect("2001:db8:1:2:ffff::9") is None
    assert table.connect("2001:db8:1:2::3") is not None
    assert table.connect("2001:db8:1:3::1") is None
    assert clientKey("::ffff:192.0.2.1") == "192.0.2.1"
    assert clientKey("192.0.2.1") == "192.0.2.1"
    assert clientKey("2001:db8:1:2:3:4:5:6") == "2001:db8:1:2::/64"


def test_trusted_networks_are_not_limited():
    table = limits(MemoryReactorClock(), maxSessions=1, maxRate=1, trusted=[__import__("ipaddress").ip_network("10.0.0.0/8")])
    assert all(table.connect("10.1.2.3") is None for _ in range(10))
    assert table.connect("192.0.2.1") is None
    assert table.connect("192.0.2.1") is not None
    assert table.isTrusted("::ffff:10.0.0.1")
    assert not table.isTrusted("127.0.0.1")  # loopback only when listed


def test_auth_failures_wait_longer_each_time_and_block():
    clock = MemoryReactorClock()
    table = limits(clock, maxAuthFailures=5, authDelay=1.0)
    assert [table.authFailed("192.0.2.1") for _ in range(5)] == [1.0, 2.0, 4.0, 8.0, 16.0]
    assert table.authBlocked("192.0.2.1")
    assert not table.authBlocked("192.0.2.2")
    assert table.authFailed("192.0.2.1") == 30.0 == MAX_AUTH_DELAY
    # The bucket drains: five failures' worth in a window.
    clock.advance(AUTH_FAILURE_WINDOW * 2 / 5)
    assert not table.authBlocked("192.0.2.1")
    clock.advance(AUTH_FAILURE_WINDOW)
    assert table.authFailed("192.0.2.1") == 1.0


def test_forgotten_clients_keep_the_table_bounded(monkeypatch):
    import infsmtp._server.limits as limitsModule

    monkeypatch.setattr(limitsModule, "MAX_TRACKED", 100)
    clock = MemoryReactorClock()
    table = limits(clock, maxRate=10)
    for i in range(1000):
        ip = f"198.51.{i // 256}.{i % 256}"
        assert table.connect(ip) is None
        table.disconnect(ip)
        assert table.tracked <= 100
    # Once their buckets are full again, the sweep forgets them all.
    clock.advance(120)
    table.connect("192.0.2.1")
    assert table.tracked == 1


def test_server_refuses_a_client_over_its_share():
    server = makeServer(maxConnectionsPerClient=2)
    first, second = session(server), session(server)
    third = Harness(server)
    assert third.take() == [b"421 4.7.0 mx.test too many concurrent connections from 192.0.2.7"]
    assert third.transport.disconnecting
    third.lose()
    first.lose()
    assert Harness(server).take() == [b"220 mx.test ESMTP infsmtp"]
    assert second.codes(b"NOOP\r\n") == [250]


def test_server_connection_rate():
    server = makeServer(maxConnectionRate=3)
    for _ in range(3):
        h = Harness(server)
        assert h.take() == [b"220 mx.test ESMTP infsmtp"]
        h.lose()
    assert Harness(server).take() == [b"421 4.7.0 mx.test too many connections from 192.0.2.7, slow down"]


def test_total_limit_does_not_leak_a_client_slot():
    server = makeServer(maxConnections=1, maxConnectionsPerClient=5)
    h = session(server)
    for _ in range(10):
        refused = Harness(server)
        assert refused.take() == [b"421 4.7.0 mx.test Too many connections, try again later"]
        refused.lose()
    assert h.factory.limits.sessionsOf("192.0.2.7") == 1
    h.lose()
    assert h.factory.limits.sessionsOf("192.0.2.7") == 0


def test_failed_login_is_answered_after_a_growing_delay():
    clock = MemoryReactorClock()
    server = makeServer(reactor=clock, allowInsecureAuth=True, maxAuthFailures=10, authFailureDelay=1.0)
    server.onLogin = lambda s: False
    h = session(server)
    bad = b"AUTH PLAIN " + b64(b"\0u\0p") + b"\r\n"
    assert h.send(bad + b"NOOP\r\n") == []
    clock.advance(0.99)
    assert h.take() == []
    clock.advance(0.01)
    assert h.take() == [b"535 5.7.8 Authentication credentials invalid", b"250 2.0.0 OK"]
    # The next failure, from another connection of the same client, waits 2 s.
    other = session(server)
    assert other.send(bad) == []
    clock.advance(1.99)
    assert other.take() == []
    clock.advance(0.01)
    assert other.take() == [b"535 5.7.8 Authentication credentials invalid"]


def test_client_with_too_many_failed_logins_is_refused_auth():
    clock = MemoryReactorClock()
    server = makeServer(reactor=clock, allowInsecureAuth=True, maxAuthFailuresPerClient=2, authFailureDelay=0)
    server.onLogin = lambda s: (s.username, s.password) == ("u", "right")
    bad = b"AUTH PLAIN " + b64(b"\0u\0wrong") + b"\r\n"
    h = session(server)
    assert h.codes(bad + bad) == [535, 535]
    # Even the right password, from this client, for now.
    other = session(server)
    assert other.send(b"AUTH PLAIN " + b64(b"\0u\0right") + b"\r\n") == [
        b"421 4.7.0 mx.test Too many authentication failures from 192.0.2.7, try again later"
    ]
    assert other.transport.disconnecting
    clock.advance(AUTH_FAILURE_WINDOW)
    assert session(server).codes(b"AUTH PLAIN " + b64(b"\0u\0right") + b"\r\n") == [235]


# 5. Deadlines per line and in DATA ------------------------------------------------


def test_a_command_line_must_complete_within_the_timeout():
    clock = MemoryReactorClock()
    server = makeServer(reactor=clock, timeout=5)
    h = session(server)
    for byte in b"NOOP":  # a byte every second, never a whole line
        clock.advance(1)
        assert h.send(bytes([byte])) == []
    clock.advance(0.99)
    assert h.take() == []
    clock.advance(0.01)
    assert h.take() == [b"421 4.4.2 mx.test Error: timeout exceeded"]
    assert h.transport.disconnecting


def test_complete_commands_keep_the_session():
    clock = MemoryReactorClock()
    server = makeServer(reactor=clock, timeout=5)
    h = session(server)
    for _ in range(10):
        clock.advance(4)
        assert h.codes(b"NO") == []
        clock.advance(0.5)
        assert h.codes(b"OP\r\n") == [250]
    assert not h.transport.disconnecting


def test_data_below_the_minimum_rate_runs_out_of_time():
    clock = MemoryReactorClock()
    server = makeServer(reactor=clock, timeout=5, minDataRate=500)
    h = session(server)
    h.send(ENVELOPE + b"DATA\r\n")
    h.take()
    # 100 bytes a second buys 0.2 s of each second: five sends move the
    # deadline from t=5 to t=6.
    for _ in range(5):
        clock.advance(1)
        h.send(b"x" * 98 + b"\r\n")
    clock.advance(0.99)
    assert h.take() == []
    clock.advance(0.01)
    assert h.take() == [b"421 4.4.2 mx.test Error: timeout exceeded"]


def test_data_at_the_minimum_rate_goes_on():
    clock = MemoryReactorClock()
    server = makeServer(reactor=clock, timeout=5, minDataRate=500)
    h = session(server)
    h.send(ENVELOPE + b"DATA\r\n")
    h.take()
    for _ in range(60):  # a minute at 2 KB/s
        clock.advance(1)
        h.send(b"x" * 998 + b"\r\n" + b"y" * 998 + b"\r\n")
    assert h.take() == []
    assert h.send(b".\r\n") == [b"250 2.0.0 OK queued as " + h.protocol._queueId.encode()]
    assert not h.transport.disconnecting


def test_a_slow_handler_does_not_count_against_the_client():
    clock = MemoryReactorClock()
    server = makeServer(reactor=clock, timeout=5, receiveTimeout=30)
    d = Deferred()
    server.onReceive = lambda s: d
    h = session(server)
    h.send(ENVELOPE + b"DATA\r\nx\r\n.\r\n")
    clock.advance(20)
    assert not h.transport.disconnecting
    d.callback(True)
    assert h.take()[-1].startswith(b"250 2.0.0 OK queued as")
    clock.advance(4.9)
    assert h.codes(b"NOOP\r\n") == [250]


# 6. Backpressure ---------------------------------------------------------------


class SlowReader(Transport):
    """
    A transport whose peer does not read: past C{limit} bytes written, it
    pauses its producer, as Twisted's does past its buffer size.
    """

    limit = 4096
    paused = False

    def write(self, data):
        super().write(data)
        if len(self.value()) > self.limit and not self.paused and self.producer is not None:
            self.paused = True
            self.producer.pauseProducing()

    def drain(self):
        data = self.value()
        self.clear()
        if self.paused:
            self.paused = False
            self.producer.resumeProducing()
        return data


def test_a_client_that_does_not_read_is_not_read_from():
    server = makeServer(maxErrors=100_000)
    h = Harness.__new__(Harness)
    h.server = server
    h.factory = server.buildFactory()
    h.protocol = h.factory.buildProtocol(None)
    h.transport = SlowReader()
    h.protocol.makeConnection(h.transport)
    assert h.transport.producer is h.protocol
    h.transport.drain()
    flood = b"NOOP\r\n" * 100_000
    h.protocol.dataReceived(flood)
    # Stopped after about limit bytes of replies (plus one batch), not
    # 100,000 replies; and reading stopped.
    written = h.transport.value()
    assert 4096 < len(written) < 4096 + 70 * 16
    assert h.transport.producerState == "paused"
    # Draining lets it go on, a buffer's worth at a time, to the end.
    total = 0
    for _ in range(1000):
        total += h.transport.drain().count(b"\r\n")
        if total == 100_000:
            break
    assert total == 100_000
    assert h.transport.producerState == "producing"


def test_pipelined_replies_are_sent_in_bounded_batches(server):
    h = session(server)
    before = h.transport.writes
    h.send(b"NOOP\r\n" * 1000)
    assert h.transport.writes - before >= 1000 // 64


# 7. The memory budget --------------------------------------------------------


def test_messages_spool_once_the_memory_budget_is_spent():
    server = makeServer(messageMemoryLimit=100_000, spoolThreshold=8 * 1024 * 1024)
    got = []
    server.onReceive = lambda s: got.append((s._msgFile is not None, s.msgFile.read()))
    a, b = session(server), session(server)
    budget = a.factory.memoryBudget
    a.send(ENVELOPE + b"DATA\r\n" + b"a" * 78 + b"\r\n")
    for _ in range(1000):  # 80 KB
        a.send(b"a" * 78 + b"\r\n")
    assert budget.used <= 100_000
    b.send(ENVELOPE + b"DATA\r\n" + b"b" * 78 + b"\r\n")
    for _ in range(1000):
        b.send(b"b" * 78 + b"\r\n")
        assert budget.used <= 100_000
    a.send(b".\r\n")
    b.send(b".\r\n")
    assert [spooled for spooled, _ in got] == [False, True]
    assert [msg.count(b"a" * 78) for _, msg in got] == [1001, 0]
    assert got[1][1].count(b"b" * 78) == 1001
    assert budget.used == 0


def test_budget_is_given_back_when_the_client_leaves_mid_data():
    server = makeServer()
    h = session(server)
    h.send(ENVELOPE + b"DATA\r\n" + b"x" * 1000 + b"\r\n")
    assert h.factory.memoryBudget.used > 0
    h.lose()
    assert h.factory.memoryBudget.used == 0


def test_spool_sink_budget():
    budget = MemoryBudget(40_000)
    sink = SpoolSink(None, budget)
    sink.write(b"x" * 30_000)
    assert not sink.spooled and budget.used >= 30_000
    sink.write(b"x" * 20_000)
    assert sink.spooled and budget.used == 0
    assert sink.getvalue() == b"x" * 50_000
    other = SpoolSink(None, budget)
    other.write(b"y")
    other.release()
    other.release()
    assert budget.used == 0


# 9. Control characters ----------------------------------------------------------


@pytest.mark.parametrize(
    "line",
    [
        b"MAIL FROM:<a@[192.0.2.1\x1b]>",
        b"MAIL FROM:<a@[192.0.2.1\x00]>",
        b"MAIL FROM:<a@[192.0.2.1\x7f]>",
        b"MAIL FROM:<a@[192.0.2 .1]>",
        b"MAIL FROM:<a@b.test> AUTH=x\x1by",
        b"MAIL FROM:<a@b.test> AUTH=x\x00",
        b"MAIL FROM:<a@b.test>\tSIZE=10",
        b"MAIL FROM:<a\xc2\x85b@b.test> SMTPUTF8",
        b"MAIL FROM:<a@b.test> AUTH=\xc2\x9b",
    ],
)
def test_control_characters_in_mail_are_refused(server, line):
    h = session(server)
    assert h.codes(line + b"\r\n") == [501]


@pytest.mark.parametrize("name", [b"a\x1b[31mb", b"a\x7fb", b"host\x00", b"a\xc2\x9bb", b"\xff\xfe"])
def test_control_characters_in_helo_are_refused(server, name):
    h = session(server, ehlo=False)
    assert h.codes(b"EHLO " + name + b"\r\n") == [501]
    assert h.protocol.session.helo == ""
    assert h.codes(b"HELO " + name + b"\r\n") == [501]


def test_utf8_helo_and_address_still_work(server):
    h = session(server, ehlo=False)
    assert h.codes("EHLO bücher.test\r\n".encode()) == [250]
    assert h.codes("MAIL FROM:<jürgen@bücher.test> SMTPUTF8\r\n".encode()) == [250]
    assert h.codes(b"RCPT TO:<a@[192.0.2.1]>\r\n") == [250]


def test_control_characters_in_user_name_are_refused():
    server = makeServer(allowInsecureAuth=True)
    seen = []
    server.onLogin = lambda s: seen.append(s.username)
    h = session(server)
    assert h.codes(b"AUTH PLAIN " + b64(b"\0us\x1ber\0p") + b"\r\n") == [501]
    assert seen == []


def test_parameters_split_on_spaces_only():
    assert parseMailArguments(b"FROM:<a@b>  SIZE=10 BODY=8BITMIME", b"FROM:", True).parameters == {
        "SIZE": "10",
        "BODY": "8BITMIME",
    }


# 10. The password is for onLogin only ----------------------------------------------


def test_password_is_cleared_after_onLogin():
    server = makeServer(allowInsecureAuth=True)
    seen = []
    server.onLogin = lambda s: (seen.append(("login", s.password)), True)[1]
    server.onMailFrom = lambda s: seen.append(("mail", s.password, s.username))
    h = session(server)
    assert h.codes(b"AUTH PLAIN " + b64(b"\0u\0s3cret") + b"\r\n") == [235]
    assert h.codes(b"MAIL FROM:<a@b.test>\r\n") == [250]
    assert seen == [("login", "s3cret"), ("mail", "", "u")]


def test_password_is_cleared_when_onLogin_fails():
    server = makeServer(allowInsecureAuth=True)

    def onLogin(session):
        raise OSError("directory down")

    server.onLogin = onLogin
    h = session(server)
    assert h.codes(b"AUTH PLAIN " + b64(b"\0u\0s3cret") + b"\r\n") == [454]
    assert h.protocol.session.password == ""


# 11. Handler deadlines ---------------------------------------------------------------


def test_a_handler_that_never_answers_gets_451_at_its_deadline(logEvents):
    clock = MemoryReactorClock()
    server = makeServer(reactor=clock, timeout=300, handlerTimeout=60)
    late = Deferred()
    server.onRcptTo = lambda s: late
    h = session(server)
    assert h.codes(ENVELOPE + b"NOOP\r\n") == [250]
    clock.advance(59.9)
    assert h.take() == []
    clock.advance(0.1)
    assert h.take() == [b"451 4.3.0 Temporary failure, try again later", b"250 2.0.0 OK"]
    assert [t for t in texts(logEvents) if "did not answer" in t] == [
        "onRcptTo handler did not answer within 60 seconds (session 1): answered 451"
    ]
    # Told so (cancelled), and nothing it might still do is acted upon.
    assert late.called
    assert h.codes(b"NOOP\r\n") == [250]
    assert h.protocol.session.rcptTo == []


def test_onReceive_has_its_own_deadline():
    clock = MemoryReactorClock()
    server = makeServer(reactor=clock, receiveTimeout=300, handlerTimeout=60)
    server.onReceive = lambda s: Deferred()
    h = session(server)
    h.send(ENVELOPE + b"DATA\r\nx\r\n.\r\n")
    h.take()
    clock.advance(299)
    assert h.take() == []
    clock.advance(1)
    assert h.take() == [b"451 4.3.0 Error processing message, try again later"]
    assert h.protocol.session.rcptTo == [] and not h.protocol._mailStarted


def test_a_coroutine_past_its_deadline_is_cancelled():
    clock = MemoryReactorClock()
    server = makeServer(reactor=clock, handlerTimeout=5)
    outcome = []

    async def onMailFrom(session):
        try:
            await Deferred()
        except BaseException as e:
            outcome.append(type(e).__name__)
            raise

    server.onMailFrom = onMailFrom
    h = session(server)
    h.send(b"MAIL FROM:<a@b.test>\r\n")
    clock.advance(5)
    assert h.take() == [b"451 4.3.0 Temporary failure, try again later"]
    assert outcome in (["CancelledError"], [asyncio.CancelledError.__name__])


def test_onConnect_past_its_deadline_is_421():
    clock = MemoryReactorClock()
    server = makeServer(reactor=clock, handlerTimeout=10)
    server.onConnect = lambda s: Deferred()
    h = Harness(server)
    clock.advance(10)
    assert h.take() == [b"421 4.3.0 Temporary failure, try again later"]
    assert h.transport.disconnecting


def test_onDisconnect_past_its_deadline_releases_the_session(logEvents):
    clock = MemoryReactorClock()
    server = makeServer(reactor=clock, handlerTimeout=10)
    server.onDisconnect = lambda s: Deferred()
    h = session(server)
    h.lose()
    assert server.sessionCount == 1
    clock.advance(10)
    assert server.sessionCount == 0
    assert any("onDisconnect handler did not finish within 10 seconds" in t for t in texts(logEvents))


def test_an_answer_in_time_cancels_the_deadline():
    clock = MemoryReactorClock()
    server = makeServer(reactor=clock, handlerTimeout=60)
    server.onRcptTo = lambda s: succeed(True)
    h = session(server)
    pending = len(clock.getDelayedCalls())
    assert h.codes(ENVELOPE) == [250, 250]
    assert len(clock.getDelayedCalls()) == pending


# 12. Settings are checked ---------------------------------------------------------------


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"maxDataLineLength": 1}, "maxDataLineLength must be an integer of at least 1000 or None, not 1"),
        ({"maxLineLength": 100}, "maxLineLength must be an integer of at least 512, not 100"),
        ({"maxConnections": 0}, "maxConnections must be an integer of at least 1, not 0"),
        ({"maxConnections": True}, "maxConnections must be an integer of at least 1, not True"),
        ({"maxRecipients": 2.5}, "maxRecipients must be an integer of at least 1, not 2.5"),
        ({"port": 70000}, "port must be an integer from 0 to 65535, not 70000"),
        ({"timeout": 0}, "timeout must be a positive number of seconds, not 0"),
        ({"timeout": -1}, "timeout must be a positive number of seconds, not -1"),
        ({"timeout": math.nan}, "timeout must be a positive number of seconds, not nan"),
        ({"timeout": "300"}, "timeout must be a positive number of seconds, not '300'"),
        ({"handlerTimeout": math.inf}, "handlerTimeout must be a positive number of seconds, not inf"),
        ({"shutdownGrace": -1}, "shutdownGrace must be a number of seconds, 0 or more, not -1"),
        ({"spoolThreshold": -1}, "spoolThreshold must be an integer of at least 0 or None, not -1"),
        ({"maxConnectionsPerClient": -1}, "maxConnectionsPerClient must be an integer of at least 0, not -1"),
        ({"minDataRate": 0.5}, "minDataRate must be an integer of at least 0, not 0.5"),
        ({"trustedNetworks": "10.0.0.0/8"}, "trusted networks must be a list of CIDR strings"),
        ({"trustedNetworks": ["10.0.0.0/33"]}, "trusted network '10.0.0.0/33'"),
        ({"hostname": "mx test"}, "hostname must be a name without spaces or control characters"),
        ({"hostname": "mx\r\n250-injected"}, "hostname must be a name without spaces or control characters"),
        ({"minProtocol": 5, "maxProtocol": 4}, "minProtocol tls1_3 is above maxProtocol tls1_2"),
    ],
)
def test_settings_that_cannot_work_are_refused_at_construction(settings, message):
    settings.setdefault("hostname", "mx.test")
    with pytest.raises(ValueError) as caught:
        Server(**settings)
    assert str(caught.value).startswith(message)


def test_settings_are_checked_again_when_listening_starts():
    server = makeServer()
    server.maxDataLineLength = 10
    with pytest.raises(ValueError, match="maxDataLineLength"):
        server.buildFactory()


def test_the_smallest_allowed_data_line_still_finds_the_end_of_data():
    server = makeServer(maxDataLineLength=1000, maxLineLength=512)
    got = []
    server.onReceive = lambda s: got.append(s.msg)
    h = session(server)
    assert h.codes(ENVELOPE + b"DATA\r\n" + b"x" * 998 + b"\r\n.\r\n") == [250, 250, 354, 250]
    assert got[0].endswith(b"x" * 998 + b"\r\n")


def test_unix_socket_clients_are_not_one_client():
    from twisted.internet.address import UNIXAddress

    class UnixTransport(Transport):
        def __init__(self):
            super().__init__()
            self.peerAddr = UNIXAddress(None)

    server = makeServer(maxConnectionsPerClient=1, maxConnectionRate=1)
    factory = server.buildFactory()
    for _ in range(3):
        protocol = factory.buildProtocol(None)
        transport = UnixTransport()
        protocol.makeConnection(transport)
        assert transport.value().startswith(b"220 ")
    assert factory.limits.tracked == 0


def test_smtperror_codes_are_checked():
    assert SMTPError("\u00b2").code is None and SMTPError("\u00b2").text == "\u00b2"
    assert SMTPError("550", "no").code == 550
    assert SMTPError(421, "x").code == 421
    for bad in (True, 4.5, "55", "5500", "\u0665\u0665\u0665"):
        with pytest.raises(TypeError):
            SMTPError(bad, "text")


@pytest.mark.parametrize("ending", [b"\r\n", b"\n"])
def test_command_line_limit_counts_the_line_ending(ending):
    server = makeServer(maxLineLength=512)
    h = session(server)
    at = b"NOOP " + b"x" * (512 - 5 - len(ending)) + ending
    assert len(at) == 512
    over = b"NOOP " + b"x" * (513 - 5 - len(ending)) + ending
    # Alone (the lock-step path) and after another line (the framer).
    assert h.codes(at) == [250]
    assert h.codes(over) == [500]
    assert h.codes(b"NOOP\r\n" + at + b"NOOP\r\n" + over) == [250, 250, 250, 500]
    # In pieces, the partial line is dropped as soon as it cannot fit.
    assert h.codes(over[:-1]) == []
    assert h.protocol._framer.buffered == 0
    assert h.codes(b"\n") == [500]
    assert h.codes(at[:-1]) == []
    assert h.protocol._framer.buffered == 511
    assert h.codes(b"\n") == [250]

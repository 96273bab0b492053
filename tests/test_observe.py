"""
Issue 12: the session log, the debug transcripts, the metrics, the health
check and the sessions view.

The log is checked as structured events (their fields, through the
C{logEvents} fixture), never by a regex over text; the text and JSON lines
are checked once each for their form (escaping, one line per event, a
list stays a list).  Metrics are scraped over HTTP from a real listener
after a known workload, and compared exactly.
"""

from __future__ import annotations

import base64
import json
import smtplib
import urllib.error
import urllib.request

import pytest
import pytest_twisted
from test_protocol import Harness, makeServer, session
from twisted.internet import defer, reactor
from twisted.internet.testing import MemoryReactorClock
from twisted.internet.threads import deferToThread
from twisted.logger import LogLevel, formatEvent

from infsmtp import AsyncClient, AuthMode, Server, SMTPError
from infsmtp._events import LogFileObserver, escape, formatLine

WAIT = 20.0

PASSWORD = "s3cret-Pa55"


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def sessionEvents(logEvents: list[dict], name: str | None = None) -> list[dict]:
    return [
        e
        for e in logEvents
        if e.get("log_namespace") == "infsmtp.session" and (name is None or e["event"] == name)
    ]


def fields(event: dict, *names: str) -> tuple:
    return tuple(event[n] for n in names)


ENVELOPE = b"MAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\n"


# Every reject path, structured ----------------------------------------------


def _refuseOnReceive(session):
    raise SMTPError(554, "5.7.1 Spam, go away")


def _failOnRcpt(session):
    raise RuntimeError("bug")


# (name, Server keywords, handlers, input after EHLO, the reject's fields:
# code, command, handler, reason, sender, recipients, queue?)
REJECTS = [
    ("unknown command", {}, {}, b"FOO bar\r\n", (500, "FOO bar", None, "protocol", None, [], False)),
    ("nested MAIL", {}, {}, b"MAIL FROM:<a@b.test>\r\nMAIL FROM:<x@b.test>\r\n",
     (503, "MAIL FROM:<x@b.test>", None, "protocol", "a@b.test", [], False)),
    ("requireAuth", {"requireAuth": True}, {}, b"MAIL FROM:<a@b.test>\r\n",
     (530, "MAIL FROM:<a@b.test>", None, "requireAuth", None, [], False)),
    ("SIZE over the limit", {"maxMessageSize": 100}, {}, b"MAIL FROM:<a@b.test> SIZE=101\r\n",
     (552, "MAIL FROM:<a@b.test> SIZE=101", None, "maxMessageSize", None, [], False)),
    ("sender refused", {}, {"onMailFrom": lambda s: False}, b"MAIL FROM:<spam@b.test>\r\n",
     (550, "MAIL FROM:<spam@b.test>", "onMailFrom", "onMailFrom", "spam@b.test", [], False)),
    ("recipient refused", {}, {"onRcptTo": lambda s: s.address != "no@d.test"},
     b"MAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nRCPT TO:<no@d.test>\r\n",
     (550, "RCPT TO:<no@d.test>", "onRcptTo", "onRcptTo", "a@b.test", ["no@d.test"], False)),
    ("recipient handler fails", {}, {"onRcptTo": _failOnRcpt}, ENVELOPE,
     (451, "RCPT TO:<c@d.test>", "onRcptTo", "onRcptTo", "a@b.test", ["c@d.test"], False)),
    ("too many recipients", {"maxRecipients": 1}, {}, ENVELOPE + b"RCPT TO:<e@d.test>\r\n",
     (452, "RCPT TO:<e@d.test>", None, "maxRecipients", "a@b.test", [], False)),
    ("non-ASCII without SMTPUTF8", {}, {}, "MAIL FROM:<jörg@b.test>\r\n".encode(),
     (553, "MAIL FROM:<jörg@b.test>", None, "smtputf8", None, [], False)),
    ("message refused by onReceive", {}, {"onReceive": _refuseOnReceive}, ENVELOPE + b"DATA\r\nx\r\n.\r\n",
     (554, "DATA", "onReceive", "onReceive", "a@b.test", ["c@d.test"], True)),
    ("bare LF in DATA", {}, {}, ENVELOPE + b"DATA\r\nx\ny\r\n.\r\n",
     (550, "DATA", None, "bareNewline", "a@b.test", ["c@d.test"], True)),
    ("message too big", {"maxMessageSize": 1000}, {}, ENVELOPE + b"DATA\r\n" + b"x" * 998 + b"\r\n" * 2 + b".\r\n",
     (552, "DATA", None, "maxMessageSize", "a@b.test", ["c@d.test"], True)),
    ("data line too long", {"maxDataLineLength": 1000}, {}, ENVELOPE + b"DATA\r\n" + b"x" * 1001 + b"\r\n.\r\n",
     (500, "DATA", None, "maxDataLineLength", "a@b.test", ["c@d.test"], True)),
    ("command line too long", {}, {}, b"NOOP " + b"x" * 3000 + b"\r\n", (500, "", None, "maxLineLength", None, [], False)),
    ("STARTTLS without TLS", {}, {}, b"STARTTLS\r\n", (454, "STARTTLS", None, "tlsUnavailable", None, [], False)),
    ("AUTH without TLS", {}, {"onLogin": lambda s: True}, b"AUTH PLAIN " + b64(b"\0u\0" + PASSWORD.encode()) + b"\r\n",
     (538, "AUTH PLAIN", None, "authNeedsTls", None, [], False)),
]


@pytest.mark.parametrize("name, settings, handlers, data, expected", REJECTS, ids=[r[0] for r in REJECTS])
def test_every_reject_is_one_event_with_who_what_why(logEvents, name, settings, handlers, data, expected):
    server = makeServer(**settings)
    for handler, value in handlers.items():
        setattr(server, handler, value)
    h = session(server)
    replies = h.send(data)
    rejects = sessionEvents(logEvents, "reject")
    assert len(rejects) == 1, [formatEvent(e) for e in rejects]
    [event] = rejects
    code, command, handler, reason, sender, recipients, hasQueue = expected
    assert fields(event, "code", "command", "handler", "reason", "sender", "recipients") == (
        code, command, handler, reason, sender, recipients,
    )
    # The reply logged is the one sent.
    assert any(line.decode("utf-8") == f"{code} {event['reply']}" for line in replies), (replies, event["reply"])
    assert fields(event, "ip", "port", "session", "helo") == ("192.0.2.7", 4242, h.protocol.session.id, "client.test")
    assert event["log_level"] == LogLevel.warn
    if hasQueue:
        assert event["queue"] and event["queue"].startswith(h.factory.queuePrefix)
    else:
        assert event["queue"] is None
    text = formatEvent(event)
    assert "\n" not in text and text.startswith(f"session={h.protocol.session.id} ")
    assert PASSWORD not in repr(event) and b64(b"\0u\0" + PASSWORD.encode()).decode() not in repr(event)


def test_session_limits_and_timeouts_are_rejects_with_their_reason(logEvents):
    clock = MemoryReactorClock()
    server = makeServer(reactor=clock, maxConnections=1, timeout=30, maxErrors=2)
    h = session(server)
    # The total limit: no session, so session 0.
    refused = Harness(server)
    assert refused.take() == [b"421 4.7.0 mx.test Too many connections, try again later"]
    # Too many errors, then (another session) a timeout after MAIL.
    h.send(b"BAD\r\nWORSE\r\n")
    h.lose()
    refused.lose()
    late = session(server)
    late.send(b"MAIL FROM:<a@b.test>\r\n")
    clock.advance(31)
    assert late.take() == [b"421 4.4.2 mx.test Error: timeout exceeded"]
    got = [fields(e, "session", "code", "verb", "reason") for e in sessionEvents(logEvents, "reject")]
    assert got == [
        (0, 421, "CONNECT", "maxConnections"),
        (1, 500, "BAD", "protocol"),
        (1, 500, "WORSE", "protocol"),
        (1, 421, "WORSE", "maxErrors"),
        (2, 421, "MAIL", "timeout"),
    ]


def test_per_client_limit_and_shutdown_are_logged(logEvents):
    server = makeServer(maxConnectionsPerClient=1)
    h = session(server)
    Harness(server).lose()
    h.protocol.shutdown()
    got = [fields(e, "code", "reason") for e in sessionEvents(logEvents, "reject")]
    assert got == [(421, "maxConnectionsPerClient"), (421, "shutdown")]


def test_auth_failure_and_success_are_events_without_the_password(logEvents):
    server = makeServer(allowInsecureAuth=True, authFailureDelay=0, maxAuthFailures=2)
    server.onLogin = lambda s: s.password == PASSWORD
    h = session(server)
    wrong = b"AUTH PLAIN " + b64(b"\0bob\0wrong-guess") + b"\r\n"
    assert h.codes(wrong) == [535]
    assert h.codes(b"AUTH LOGIN\r\n" + b64(b"bob") + b"\r\n" + b64(PASSWORD.encode()) + b"\r\n")[-1] == 235
    other = session(server)
    assert other.codes(wrong + wrong) == [535, 535, 421]
    auths = [fields(e, "success", "mechanism", "username", "ip", "log_level") for e in sessionEvents(logEvents, "auth")]
    assert auths == [
        (False, "PLAIN", "bob", "192.0.2.7", LogLevel.warn),
        (True, "LOGIN", "bob", "192.0.2.7", LogLevel.info),
        (False, "PLAIN", "bob", "192.0.2.7", LogLevel.warn),
        (False, "PLAIN", "bob", "192.0.2.7", LogLevel.warn),
    ]
    # The 535s are AUTH failures, not reject lines; the 421 after them is.
    assert [fields(e, "code", "reason") for e in sessionEvents(logEvents, "reject")] == [(421, "maxAuthFailures")]
    everything = repr(logEvents)
    for secret in ("wrong-guess", PASSWORD, b64(PASSWORD.encode()).decode()):
        assert secret not in everything


def test_an_onLogin_refusing_with_its_own_5xx_is_an_auth_failure(logEvents):
    server = makeServer(allowInsecureAuth=True, authFailureDelay=0)

    def onLogin(session):
        raise SMTPError(535, "5.7.8 Go away")

    server.onLogin = onLogin
    h = session(server)
    assert h.codes(b"AUTH PLAIN " + b64(b"\0eve\0x") + b"\r\n") == [535]
    assert [fields(e, "success", "username") for e in sessionEvents(logEvents, "auth")] == [(False, "eve")]
    assert sessionEvents(logEvents, "reject") == []


# The success path: only with sessionLog (or metrics) ----------------------


def test_success_events_are_built_only_when_asked_for(logEvents):
    h = session(makeServer())
    h.send(ENVELOPE + b"DATA\r\nx\r\n.\r\nQUIT\r\n")
    h.lose()
    assert sessionEvents(logEvents) == []


def test_a_session_from_connect_to_disconnect(logEvents):
    clock = MemoryReactorClock()
    server = makeServer(reactor=clock, sessionLog=True)
    seen = []
    server.onReceive = lambda s: seen.append(s.queueId)
    h = session(server)
    clock.advance(2.5)
    data = ENVELOPE + b"RCPT TO:<e@d.test>\r\nDATA\r\nSubject: hi\r\n\r\nbody\r\n.\r\nQUIT\r\n"
    replies = h.send(data)
    h.lose()
    queued = [r for r in replies if r.startswith(b"250 2.0.0 OK queued as ")]
    [queueId] = [r.rsplit(b" ", 1)[1].decode() for r in queued]
    assert seen == [queueId]  # session.queueId, as told to the client
    names = [e["event"] for e in sessionEvents(logEvents)]
    assert names == ["connect", "accepted", "disconnect"]
    connect, accepted, disconnect = sessionEvents(logEvents)
    assert fields(connect, "ip", "port", "tls", "queue") == ("192.0.2.7", 4242, False, None)
    assert fields(accepted, "queue", "sender", "recipients") == (queueId, "a@b.test", ["c@d.test", "e@d.test"])
    assert accepted["size"] > len(b"Subject: hi\r\n\r\nbody\r\n")  # with our Received: header
    # EHLO, MAIL, 2 RCPT, DATA, QUIT; every byte the client sent.
    assert fields(disconnect, "commands", "messages", "rejects", "bytes", "duration") == (
        6, 1, 0, len(b"EHLO client.test\r\n") + len(data), 2.5,
    )
    assert formatEvent(accepted) == (
        f"session=1 queue={queueId} accepted from [192.0.2.7]:4242: from=<a@b.test> "
        f"to=<c@d.test>,<e@d.test> size={accepted['size']}"
    )


def test_worker_sessions_have_their_own_ids_and_say_which_worker(logEvents):
    server = makeServer(sessionLog=True)
    server.setWorker(1, 3)
    ids = [session(server).protocol.session.id for _ in range(3)]
    assert ids == [2, 5, 8]
    connects = sessionEvents(logEvents, "connect")
    assert [e["worker"] for e in connects] == [1, 1, 1]
    assert formatEvent(connects[0]).startswith("worker=1 session=2 connect from [192.0.2.7]:4242")
    with pytest.raises(ValueError):
        server.setWorker(3, 3)


# Text and JSON lines ---------------------------------------------------------


def test_values_from_the_wire_are_escaped_and_cut():
    assert escape("a\r\nb\x1b[31m") == "a\\r\\nb\\x1b[31m"
    assert escape("é ok") == "é ok"
    assert len(escape("x" * 1000)) == 200


def test_a_forged_line_stays_one_line(logEvents):
    h = session(makeServer())
    h.send(b"MAIL FROM:<a@b.test>\r\nXX\x1b[2J\rforged: reject\r\n")
    [event] = sessionEvents(logEvents, "reject")
    text = formatLine(event)
    assert "\r" not in text and "\x1b" not in text and "\\r" in text


def test_the_json_format_is_one_object_a_line(logEvents, tmp_path):
    server = makeServer(sessionLog=True)
    server.onRcptTo = lambda s: s.address != "no@d.test"
    h = session(server)
    h.send(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nRCPT TO:<e@d.test>\r\nRCPT TO:<no@d.test>\r\n"
           b"DATA\r\nx\r\n.\r\n")
    path = tmp_path / "log.json"
    with open(path, "w", encoding="utf-8") as out:
        observer = LogFileObserver(out, "json", worker=0)
        for event in logEvents:
            observer(event)
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    ours = [r for r in records if r["namespace"] == "infsmtp.session"]
    assert [r["event"] for r in ours] == ["connect", "reject", "accepted"]
    reject, accepted = ours[1], ours[2]
    assert (reject["level"], reject["code"], reject["recipients"], reject["handler"]) == (
        "warn", 550, ["no@d.test"], "onRcptTo",
    )
    assert accepted["recipients"] == ["c@d.test", "e@d.test"] and accepted["worker"] == 0
    assert accepted["message"].startswith("session=1 queue=")


def test_the_text_format_is_twisteds_classic_line(logEvents, tmp_path):
    h = session(makeServer())
    h.send(b"RCPT TO:<x@y.test>\r\n")
    path = tmp_path / "log.txt"
    with open(path, "wb") as out:
        observer = LogFileObserver(out, "text")
        for event in sessionEvents(logEvents):
            observer(event)
    [line] = path.read_text(encoding="utf-8").splitlines()
    stamp, rest = line.split(" ", 1)
    assert len(stamp) == len("2026-11-30T10:00:00+0000")
    assert rest == (
        "[infsmtp.session#warn] session=1 reject: RCPT TO:<x@y.test> from [192.0.2.7]:4242: "
        "503 5.5.1 Error: need MAIL command; helo=<client.test> reason=protocol"
    )


# The debug transcripts -----------------------------------------------------


def test_server_debug_transcript_both_ways_with_secrets_redacted(logEvents):
    server = makeServer(debug=True, allowInsecureAuth=True, authFailureDelay=0)
    server.onLogin = lambda s: True
    h = session(server)
    h.send(b"AUTH PLAIN " + b64(b"\0bob\0" + PASSWORD.encode()) + b"\r\n")
    h.send(ENVELOPE + b"DATA\r\nhello\r\n.\r\n")
    other = session(server)
    other.send(b"AUTH LOGIN\r\n")
    other.send(b64(b"bob") + b"\r\n")
    lines = [(e["direction"], e["line"]) for e in sessionEvents(logEvents, "transcript")]
    assert lines[:4] == [(">", "220 mx.test ESMTP infsmtp"), ("<", "EHLO client.test"), (">", "250-mx.test Hello 192.0.2.7"), (">", "250-PIPELINING")]
    assert ("<", "AUTH PLAIN ***") in lines and (">", "235 2.7.0 Authentication successful") in lines
    assert ("<", "AUTH LOGIN") in lines and ("<", "***") in lines
    assert ("<", "MAIL FROM:<a@b.test>") in lines and ("<", "(10 bytes of message data)") in lines
    assert all(e["log_level"] == LogLevel.debug for e in sessionEvents(logEvents, "transcript"))
    everything = repr(logEvents)
    assert PASSWORD not in everything and b64(b"\0bob\0" + PASSWORD.encode()).decode() not in everything
    assert b64(b"bob").decode() not in everything


@pytest_twisted.ensureDeferred
async def test_client_debug_transcript_with_secrets_redacted(logEvents):
    server = Server(port=0, interface="127.0.0.1", hostname="mx.test", allowInsecureAuth=True)
    server.onLogin = lambda s: s.password == PASSWORD
    await server.startListening()
    try:
        client = AsyncClient(
            host="127.0.0.1", port=server.port, username="bob", password=PASSWORD, authMode=AuthMode.default, debug=True
        )
        await client.connect()
        assert await client.authenticate()
        await client.sendmail("a@b.test", ["c@d.test"], b"Subject: x\r\n\r\nhello\r\n")
        await client.disconnect()
    finally:
        await server.stopListening()
    lines = [(e["direction"], e["line"]) for e in logEvents if e.get("log_namespace") == "infsmtp.client"]
    assert ("<", "220 mx.test ESMTP infsmtp") in lines
    assert any(d == ">" and line.startswith("EHLO ") for d, line in lines)
    assert (">", "AUTH PLAIN ***") in lines and ("<", "235 2.7.0 Authentication successful") in lines, lines
    # Message data is its content for a small message, its size beyond.
    assert (">", "hello") in lines
    assert (">", "QUIT") in lines and ("<", "221 2.0.0 Bye") in lines
    everything = repr([e for e in logEvents if e.get("log_namespace") == "infsmtp.client"])
    assert PASSWORD not in everything and b64(b"\0bob\0" + PASSWORD.encode()).decode() not in everything


@pytest_twisted.ensureDeferred
async def test_client_without_debug_logs_no_transcript(logEvents):
    server = Server(port=0, interface="127.0.0.1", hostname="mx.test")
    await server.startListening()
    try:
        client = AsyncClient(host="127.0.0.1", port=server.port)
        await client.connect()
        assert type(client._protocol).__name__ == "ESMTPSessionClient"
        await client.disconnect()
    finally:
        await server.stopListening()
    assert [e for e in logEvents if e.get("log_namespace") == "infsmtp.client"] == []


# The sessions view -----------------------------------------------------------


def test_sessions_view():
    clock = MemoryReactorClock()
    server = makeServer(reactor=clock)
    first = session(server)
    clock.advance(3)
    second = session(server)
    second.send(b"MAIL FROM:<a@b.test>\r\n")
    view = server.sessions
    assert [(s.id, s.peer, s.state, s.age) for s in view] == [
        (1, "[192.0.2.7]:4242", "greeted", 3.0),
        (2, "[192.0.2.7]:4242", "mail", 0.0),
    ]
    assert view[1].bytes == len(b"EHLO client.test\r\nMAIL FROM:<a@b.test>\r\n")
    with pytest.raises(AttributeError):
        view[0].state = "x"
    first.lose()
    assert [s.id for s in server.sessions] == [2]


# Metrics, over HTTP ------------------------------------------------------


def _scrape(port: int, path: str = "/metrics") -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, response.read().decode("utf-8")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode("utf-8")


def _samples(text: str) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _workload(port: int) -> None:
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=10) as client:
        for _ in range(3):
            client.sendmail("a@b.test", ["c@d.test"], b"Subject: x\r\n\r\n" + b"y" * 100 + b"\r\n")
        refused = None
        try:
            client.sendmail("a@b.test", ["no@d.test", "c@d.test"], b"Subject: x\r\n\r\nz\r\n")
        except smtplib.SMTPRecipientsRefused as e:
            refused = e
        assert refused is None  # one refused of two: sendmail goes on
        try:
            client.login("bob", "wrong")
        except smtplib.SMTPAuthenticationError:
            pass
        client.login("bob", PASSWORD)


def inThread(fn, *args):
    return deferToThread(fn, *args).addTimeout(WAIT, reactor)


@pytest_twisted.ensureDeferred
async def test_metrics_after_a_known_workload(tmp_path):
    pytest.importorskip("prometheus_client")
    from infsmtp._server.metrics import listenMetrics

    clock = []
    server = Server(port=0, interface="127.0.0.1", hostname="mx.test", allowInsecureAuth=True, authFailureDelay=0)
    server.onRcptTo = lambda s: s.address != "no@d.test"
    server.onLogin = lambda s: s.password == PASSWORD
    server.onReceive = lambda s: clock.append(s.msgSize)
    metricsPort = await listenMetrics(reactor, "tcp:0:interface=127.0.0.1", server)
    await server.startListening()
    try:
        await inThread(_workload, server.port)
        status, text = await inThread(_scrape, metricsPort.getHost().port)
    finally:
        await server.stopListening()
        await metricsPort.stopListening()
    assert status == 200
    got = _samples(text)
    assert got[("infsmtp_sessions_total", ())] == 1
    assert got[("infsmtp_sessions_open", ())] == 0  # smtplib has quit
    assert got[("infsmtp_messages_accepted_total", ())] == 4
    assert got[("infsmtp_received_bytes_total", ())] == sum(clock)
    assert got[("infsmtp_messages_rejected_total", (("reason", "onRcptTo"),))] == 1
    assert got[("infsmtp_rejects_total", (("code", "550"), ("command", "RCPT"), ("reason", "onRcptTo")))] == 1
    # smtplib tries PLAIN, then LOGIN, with the wrong password.
    assert got[("infsmtp_auth_total", (("mechanism", "PLAIN"), ("result", "failure")))] == 1
    assert got[("infsmtp_auth_total", (("mechanism", "LOGIN"), ("result", "failure")))] == 1
    assert got[("infsmtp_auth_total", (("mechanism", "PLAIN"), ("result", "success")))] == 1
    assert got[("infsmtp_handler_seconds_count", (("handler", "onRcptTo"),))] == 5
    assert got[("infsmtp_handler_seconds_count", (("handler", "onReceive"),))] == 4
    assert got[("infsmtp_handler_seconds_count", (("handler", "onLogin"),))] == 3
    assert not any(name.startswith("infsmtp_tls_sessions_total") for name, _ in got)


def test_handler_latency_is_measured_on_the_servers_clock():
    pytest.importorskip("prometheus_client")
    clock = MemoryReactorClock()
    server = makeServer(reactor=clock)
    metrics = server.enableMetrics()
    waiting = defer.Deferred()
    server.onReceive = lambda s: waiting
    h = session(server)
    h.send(ENVELOPE + b"DATA\r\nx\r\n.\r\n")
    clock.advance(0.3)
    waiting.callback(True)
    assert h.take()[-1].startswith(b"250 2.0.0 OK queued as")
    got = _samples(metrics.exposition().decode())
    assert got[("infsmtp_handler_seconds_bucket", (("handler", "onReceive"), ("le", "0.25")))] == 0
    assert got[("infsmtp_handler_seconds_bucket", (("handler", "onReceive"), ("le", "0.5")))] == 1


def test_two_servers_have_their_own_metrics():
    pytest.importorskip("prometheus_client")
    one, two = makeServer(), makeServer()
    first, second = one.enableMetrics(), two.enableMetrics()
    session(one).send(ENVELOPE + b"DATA\r\nx\r\n.\r\n")
    assert _samples(first.exposition().decode())[("infsmtp_messages_accepted_total", ())] == 1
    assert _samples(second.exposition().decode())[("infsmtp_messages_accepted_total", ())] == 0


def test_metrics_without_prometheus_client_is_one_clear_error(monkeypatch):
    import sys

    from infsmtp._server.metrics import MetricsUnavailable

    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    with pytest.raises(MetricsUnavailable, match=r"pip install 'infsmtp\[metrics\]'"):
        makeServer().enableMetrics()


@pytest_twisted.ensureDeferred
async def test_healthz(tmp_path):
    pytest.importorskip("prometheus_client")
    from infsmtp import MaildirDelivery
    from infsmtp._server.metrics import listenMetrics

    delivery = MaildirDelivery(str(tmp_path / "Maildir"))
    server = Server(port=0, interface="127.0.0.1", hostname="mx.test", shutdownGrace=10)
    server.onReceive = delivery
    server.healthChecks.append(delivery.healthProblem)
    metricsPort = await listenMetrics(reactor, "tcp:0:interface=127.0.0.1", server)
    port = metricsPort.getHost().port
    try:
        assert await inThread(_scrape, port, "/healthz") == (503, "not listening\n")
        await server.startListening()
        assert await inThread(_scrape, port, "/healthz") == (200, "ok\n")
        (tmp_path / "Maildir" / "new").rename(tmp_path / "elsewhere")
        status, text = await inThread(_scrape, port, "/healthz")
        assert status == 503 and "new is not writable" in text
        (tmp_path / "elsewhere").rename(tmp_path / "Maildir" / "new")
        # A transaction in flight keeps the server stopping: 503 meanwhile.
        client = await inThread(smtplib.SMTP, "127.0.0.1", server.port, "client.test", 10)
        await inThread(client.ehlo)
        assert (await inThread(client.mail, "a@b.test"))[0] == 250
        stopped = server.stopListening(grace=10)
        assert await inThread(_scrape, port, "/healthz") == (503, "shutting down\n")
        await inThread(client.close)
        await stopped
        assert await inThread(_scrape, port, "/healthz") == (503, "not listening\n")
    finally:
        await metricsPort.stopListening()


def test_client_transcript_redaction_each_way(logEvents):
    """
    Each of the client transcript's redactions alone: the AUTH line, the
    answer to a 334 challenge, and a secret of the session's wherever it is.
    """
    from twisted.internet.protocol import Factory, Protocol
    from twisted.internet.testing import StringTransport

    from infsmtp._client.debug import TranscriptFactory

    inner = Protocol()
    inner._secrets = ["hunter2"]
    factory = TranscriptFactory(Factory.forProtocol(lambda: inner), "mx.test:25")
    wrapper = factory.buildProtocol(None)
    wrapper.makeConnection(StringTransport())
    wrapper.write(b"AUTH PLAIN AGJvYgBub3RpbnNlY3JldHM=\r\n")
    wrapper.dataReceived(b"334 VXNlcm5hbWU6\r\n")
    wrapper.write(b"Ym9i\r\n")
    wrapper.write(b"XSECRET hunter2 here\r\n")
    wrapper.write(b"NOOP\r\n")
    lines = [(e["direction"], e["line"]) for e in logEvents if e.get("log_namespace") == "infsmtp.client"]
    assert lines == [
        (">", "AUTH PLAIN ***"),
        ("<", "334 VXNlcm5hbWU6"),
        (">", "***"),
        (">", "XSECRET *** here"),
        (">", "NOOP"),
    ]


def test_theLogFileWritesInfoLinesOncePerReactorTurn():
    """
    With a reactor, info lines wait for the end of the turn and go out in
    one write; a warning goes at once, after them (order kept); what waits
    when the reactor stops is written then.
    """
    import io

    from twisted.internet.testing import MemoryReactorClock
    from twisted.logger import LogLevel

    class CountingFile(io.StringIO):
        writes = 0

        def write(self, text):
            self.writes += 1
            return super().write(text)

    def event(level, text):
        return {"log_level": level, "log_namespace": "x", "log_format": text, "log_time": 0.0}

    out = CountingFile()
    reactor = MemoryReactorClock()
    observer = LogFileObserver(out, "text", reactor=reactor)
    observer(event(LogLevel.info, "one"))
    observer(event(LogLevel.info, "two"))
    assert out.getvalue() == ""
    reactor.advance(0)
    assert [line.split(" ", 1)[1] for line in out.getvalue().splitlines()] == ["[x#info] one", "[x#info] two"]
    assert out.writes == 1
    observer(event(LogLevel.info, "three"))
    observer(event(LogLevel.warn, "four"))
    assert [line.split(" ", 1)[1] for line in out.getvalue().splitlines()][2:] == ["[x#info] three", "[x#warn] four"]
    observer(event(LogLevel.info, "five"))
    # MemoryReactor keeps the triggers: run what the stop would.
    for call, args, kwargs in reactor.triggers["after"]["shutdown"]:
        call(*args, **kwargs)
    assert out.getvalue().splitlines()[-1].endswith("[x#info] five")

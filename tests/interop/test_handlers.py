"""
Handler semantics end to end, over a socket: failures answer 4xx and are
logged, SMTPError chooses the reply, Deferreds and coroutines keep pipelined
replies in order, onDisconnect runs exactly once whatever ends a session,
onConnect refuses, script paths run in the thread pool, and
'package.module:function' strings are resolved.
"""

from __future__ import annotations

import base64
import os

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent

from infsmtp import SMTPError

HANDLERS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "handlers")


def inThread(fn, *args):
    return deferToThread(fn, *args).addTimeout(60, reactor)


def transaction(client, rcpt="rcpt@example.net", subject="handlers"):
    """
    MAIL, RCPT, DATA and a message after EHLO; the replies, in order.
    """
    out = [client.command("MAIL FROM:<sender@example.org>"), client.command(f"RCPT TO:<{rcpt}>")]
    data = client.command("DATA")
    out.append(data)
    if data.code == 354:
        out.append(client.command(f"Subject: {subject}\r\n\r\nbody\r\n."))
    return out


def codes(replies):
    return [r.code for r in replies]


def failuresFrom(loggedFailures, exceptionType):
    return [e for e in loggedFailures if e["log_failure"].check(exceptionType)]


# Failures ---------------------------------------------------------------------


class Boom(Exception):
    pass


def failOnce(kind, then):
    """
    A handler failing its first call (raising, or with a failed Deferred,
    or from a coroutine), then handing over to C{then}.
    """
    calls = []

    def handler(session):
        calls.append(session.id)
        if len(calls) > 1:
            return then(session)
        if kind == "raise":
            raise Boom("handler bug")
        if kind == "deferred":
            return task.deferLater(reactor, 0, lambda: (_ for _ in ()).throw(Boom("late bug")))

        async def coroutine():
            await task.deferLater(reactor, 0, lambda: None)
            raise Boom("coroutine bug")

        return coroutine()

    return handler


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("kind", ["raise", "deferred", "coroutine"])
@pytest.mark.parametrize(
    "name, expected",
    [("onMailFrom", [451, 250, 250, 354, 250]), ("onRcptTo", [250, 451, 250, 354, 250]), ("onReceive", [250, 250, 354, 451])],
)
async def test_failing_handler_answers_451_and_session_goes_on(serve, raw, recorder, loggedFailures, name, expected, kind):
    """
    A handler bug never answers 5xx (the mail would bounce): 451 4.3.0,
    logged with its traceback, and the session goes on.
    """
    server = await serve(handlers={name: failOnce(kind, getattr(recorder, name))})

    def run():
        client = raw(server.port, ehlo="fail.test")
        if name == "onMailFrom":
            first = [client.command("MAIL FROM:<sender@example.org>")] + transaction(client)
        elif name == "onRcptTo":
            first = [client.command("MAIL FROM:<sender@example.org>"), client.command("RCPT TO:<first@example.net>")]
            first += [client.command("RCPT TO:<again@example.net>"), client.command("DATA")]
            first.append(client.command("Subject: retried\r\n\r\nbody\r\n."))
        else:
            first = transaction(client)
        second = transaction(client)
        client.expect("QUIT", 221)
        return first, second

    first, second = await inThread(run)
    assert codes(first) == expected, first
    failed = next(r for r in first if r.code == 451)
    assert failed.text.startswith("4.3.0"), failed
    assert codes(second) == [250, 250, 354, 250]
    assert len(recorder.received) == (1 if name == "onReceive" else 2)
    assert recorder.received[-1]["msg"].endswith(b"\r\n\r\nbody\r\n")
    logged = failuresFrom(loggedFailures, Boom)
    assert len(logged) == 1
    assert name in formatEvent(logged[0])


@pytest_twisted.ensureDeferred
async def test_failing_onlogin_answers_454(serve, raw, loggedFailures):
    def onLogin(session):
        raise Boom("login bug")

    server = await serve(allowInsecureAuth=True, handlers={"onLogin": onLogin})

    def run():
        client = raw(server.port, ehlo="login.test")
        failed = client.command("AUTH PLAIN " + base64.b64encode(b"\0user\0pw").decode())
        noop = client.command("NOOP")
        client.expect("QUIT", 221)
        return failed, noop

    failed, noop = await inThread(run)
    assert failed.code == 454 and failed.text.startswith("4.7.0")
    assert noop.code == 250
    assert len(failuresFrom(loggedFailures, Boom)) == 1


# SMTPError chooses the reply ---------------------------------------------------------


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("kind", ["raise", "deferred", "coroutine"])
async def test_smtperror_sets_the_reply(serve, raw, recorder, loggedFailures, kind):
    def refuse():
        raise SMTPError(550, "5.1.1 No such user")

    def onRcptTo(session):
        if not session.address.startswith("nobody@"):
            return True
        if kind == "raise":
            refuse()
        if kind == "deferred":
            return task.deferLater(reactor, 0, refuse)

        async def coroutine():
            await task.deferLater(reactor, 0, lambda: None)
            refuse()

        return coroutine()

    def onReceive(session):
        raise SMTPError(552, "5.2.2 Mailbox full")

    server = await serve(handlers={"onRcptTo": onRcptTo, "onReceive": onReceive})

    def run():
        client = raw(server.port, ehlo="err.test")
        client.expect("MAIL FROM:<a@example.org>", 250)
        refused = client.command("RCPT TO:<nobody@example.net>")
        client.expect("RCPT TO:<somebody@example.net>", 250)
        client.expect("DATA", 354)
        full = client.command("Subject: x\r\n\r\nx\r\n.")
        client.expect("QUIT", 221)
        return refused, full

    refused, full = await inThread(run)
    assert (refused.code, refused.text) == (550, "5.1.1 No such user")
    assert (full.code, full.text) == (552, "5.2.2 Mailbox full")
    assert loggedFailures == []


@pytest_twisted.ensureDeferred
async def test_decisions_by_return_value_and_by_attribute(serve, raw, recorder):
    """
    A handler decides by returning a bool (plain, Deferred, coroutine) or
    by setting session.accept / session.received.
    """

    def onMailFrom(session):
        recorder.mailFroms.append(session.address)
        return defer.succeed(not session.address.startswith("deny@"))

    async def onRcptTo(session):
        await task.deferLater(reactor, 0, lambda: None)
        if session.address.startswith("attr@"):
            session.accept = False
            return None
        return not session.address.startswith("deny@")

    def onReceive(session):
        recorder.onReceive(session)
        session.received = session.message["Subject"] != "unwanted"

    server = await serve(handlers={"onMailFrom": onMailFrom, "onRcptTo": onRcptTo, "onReceive": onReceive})

    def run():
        client = raw(server.port, ehlo="decide.test")
        out = [
            client.command("MAIL FROM:<deny@example.org>"),
            client.command("MAIL FROM:<>"),
            client.command("RCPT TO:<deny@example.net>"),
            client.command("RCPT TO:<attr@example.net>"),
            client.command("RCPT TO:<ok@example.net>"),
            client.command("DATA"),
            client.command("Subject: unwanted\r\n\r\nx\r\n."),
        ]
        client.expect("QUIT", 221)
        return out

    replies = await inThread(run)
    assert codes(replies) == [550, 250, 550, 550, 250, 354, 554]
    assert replies[-1].text.startswith("5.7.1")
    assert recorder.mailFroms == ["deny@example.org", ""]
    assert recorder.received[0]["mailFrom"] == "" and recorder.received[0]["rcptTo"] == ["ok@example.net"]


# Deferreds and pipelining --------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_pending_deferred_holds_pipelined_commands(serve, raw, recorder, readDone):
    """
    twisted#8126: while onRcptTo's Deferred is pending, the commands
    pipelined behind it (and the message after DATA) wait; when it fires,
    every reply comes in order and the message lines are never run as
    commands.
    """
    gate: defer.Deferred = defer.Deferred()
    called: defer.Deferred = defer.Deferred()
    seen = []

    def onRcptTo(session):
        seen.append(session.address)
        if session.address == "slow@example.net":
            called.callback(None)
            return gate
        return not session.address.startswith("no@")

    server = await serve(handlers={"onRcptTo": onRcptTo})
    batch = (
        b"EHLO pipe.test\r\n"
        b"MAIL FROM:<a@example.org>\r\n"
        b"RCPT TO:<slow@example.net>\r\n"
        b"RCPT TO:<no@example.net>\r\n"
        b"RCPT TO:<fast@example.net>\r\n"
        b"DATA\r\n"
        b"Subject: held\r\n\r\nRSET\r\nMAIL FROM:<inside@example.org>\r\nQUIT\r\n.\r\n"
        b"NOOP\r\n"
        b"QUIT\r\n"
    )

    replies = inThread(lambda: raw(server.port).exchange(batch))
    await called.addTimeout(20, reactor)
    # The server has acted on everything it read: a wrongly eager one
    # would have run ahead by now.
    await readDone()
    assert seen == ["slow@example.net"]
    assert recorder.received == []
    gate.callback(True)
    replies = await replies
    assert codes(replies) == [250, 250, 250, 550, 250, 354, 250, 250, 221]
    assert seen == ["slow@example.net", "no@example.net", "fast@example.net"]
    assert recorder.mailFroms == ["a@example.org"]
    got = recorder.received[0]
    assert got["rcptTo"] == ["slow@example.net", "fast@example.net"]
    assert got["msg"].endswith(b"Subject: held\r\n\r\nRSET\r\nMAIL FROM:<inside@example.org>\r\nQUIT\r\n")


@pytest_twisted.ensureDeferred
async def test_slow_onreceive_with_pipelined_transaction_behind(serve, raw, recorder, readDone):
    """
    A slow onReceive with the next whole transaction pipelined behind the
    message: the second transaction is answered only after the first
    message's reply, in order.
    """
    gates = [defer.Deferred(), defer.Deferred()]
    entered = [defer.Deferred(), defer.Deferred()]
    subjects = []

    def onReceive(session):
        n = len(subjects)
        subjects.append(session.message["Subject"])
        entered[n].callback(None)
        return gates[n]

    server = await serve(handlers={"onReceive": onReceive})
    batch = b"EHLO slow.test\r\n" + b"".join(
        b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\nSubject: m%d\r\n\r\nx\r\n.\r\n" % n
        for n in range(2)
    ) + b"QUIT\r\n"

    replies = inThread(lambda: raw(server.port).exchange(batch))
    await entered[0].addTimeout(20, reactor)
    await readDone()
    assert subjects == ["m0"]
    gates[0].callback(False)
    await entered[1].addTimeout(20, reactor)
    assert subjects == ["m0", "m1"]
    gates[1].callback(True)
    replies = await replies
    assert codes(replies) == [250, 250, 250, 354, 554, 250, 250, 354, 250, 221]


# onDisconnect exactly once -----------------------------------------------------------


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("ending", ["quit", "vanish", "timeout", "errors", "refused", "handler-disconnect"])
async def test_ondisconnect_exactly_once(serve, raw, recorder, loggedFailures, ending):
    handlers = {}
    if ending == "refused":
        handlers["onConnect"] = lambda session: (recorder.onConnect(session), False)[1]
    if ending == "handler-disconnect":
        handlers["onRcptTo"] = lambda session: session.disconnect()
    server = await serve(timeout=0.5 if ending == "timeout" else 300, maxErrors=3, handlers=handlers)

    def run():
        client = raw(server.port)
        greeting = client.reply()
        if ending == "refused":
            return [greeting] + client.repliesToEnd()
        client.expect("EHLO bye.test", 250)
        if ending == "quit":
            client.send(b"QUIT\r\n")
        elif ending == "vanish":
            client.expect("MAIL FROM:<a@example.org>", 250)
            client.expect("RCPT TO:<b@example.net>", 250)
            client.expect("DATA", 354)
            client.send(b"Subject: gone\r\n\r\nhalf a mess")
            client.abort()
            return []
        elif ending == "errors":
            client.send(b"X\r\nY\r\nZ\r\n")
        elif ending == "handler-disconnect":
            client.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\nSubject: x\r\n\r\nx\r\n.\r\n")
        out = client.repliesToEnd()
        client.close()
        return out

    replies = await inThread(run)
    await recorder.waitDisconnects(1)
    if ending == "refused":
        assert codes(replies) == [554]
        assert replies[0].text.startswith("5.7.1")
    elif ending == "quit":
        assert codes(replies) == [221]
    elif ending == "timeout":
        assert codes(replies) == [421] and replies[0].text.startswith("4.4.2")
    elif ending == "errors":
        assert codes(replies) == [500, 500, 500, 421]
    elif ending == "handler-disconnect":
        # The MAIL's 250, then the 421 the handler's disconnect() sends
        # instead of the RCPT's reply; nothing after it.
        assert codes(replies) == [250, 421], replies
        assert replies[1].text == f"4.7.0 {server.hostname} Closing connection"
    assert recorder.received == []
    # Once: stop the server (every session over, every onDisconnect
    # called), then count again.
    await server.stopListening().addTimeout(20, reactor)
    assert list(recorder.disconnects.values()) == [1]
    assert list(recorder.disconnects) == recorder.connects
    assert loggedFailures == []


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("state", ["idle", "mid-data", "implicit-tls"])
async def test_ondisconnect_once_on_server_stop(serve, raw, recorder, certificateAuthority, state):
    server = await serve(tls=state == "implicit-tls", implicitTls=state == "implicit-tls")

    def start():
        client = raw(server.port)
        if state == "implicit-tls":
            client.startTLS(certificateAuthority.certFile)
        assert client.reply().code == 220
        client.expect("EHLO stop.test", 250)
        if state == "mid-data":
            client.expect("MAIL FROM:<a@example.org>", 250)
            client.expect("RCPT TO:<b@example.net>", 250)
            client.expect("DATA", 354)
            client.send(b"Subject: cut\r\n\r\nnot finished")
        return client

    client = await inThread(start)
    assert server.sessionCount == 1
    await server.stopListening().addTimeout(20, reactor)
    assert server.sessionCount == 0
    assert list(recorder.disconnects.values()) == [1]
    assert recorder.received == []
    client.close()


@pytest_twisted.ensureDeferred
async def test_onconnect_refuses_by_attribute(serve, raw, recorder, assertServed):
    def onConnect(session):
        recorder.onConnect(session)
        session.accept = len(recorder.connects) > 1

    server = await serve(handlers={"onConnect": onConnect})

    def run():
        client = raw(server.port)
        return client.repliesToEnd()

    replies = await inThread(run)
    assert codes(replies) == [554] and replies[0].text.startswith("5.7.1")
    await assertServed(server)


# Script handlers and 'package.module:function' --------------------------------------------


@pytest_twisted.ensureDeferred
async def test_script_handlers_run_in_the_thread_pool(serve, raw, recorder, loggedFailures):
    seen = {}

    def onDisconnect(session):
        seen.update(session.data)
        recorder.onDisconnect(session)

    server = await serve(
        poolSize=2,
        handlers={
            "onRcptTo": os.path.join(HANDLERS, "rcpt_policy.py"),
            "onReceive": os.path.join(HANDLERS, "receive_policy.py"),
            "onDisconnect": onDisconnect,
        },
    )
    assert server.onRcptTo == os.path.join(HANDLERS, "rcpt_policy.py")

    def run():
        client = raw(server.port, ehlo="script.test")
        client.expect("MAIL FROM:<a@example.org>", 250)
        out = [client.command(f"RCPT TO:<{r}>") for r in ("one@allowed.test", "x@other.test", "nobody@allowed.test", "crash@allowed.test", "two@allowed.test")]
        out.append(client.command("DATA"))
        out.append(client.command("Subject: please reject\r\n\r\nx\r\n."))
        client.expect("MAIL FROM:<a@example.org>", 250)
        client.expect("RCPT TO:<three@allowed.test>", 250)
        client.expect("DATA", 354)
        out.append(client.command("Subject: fine\r\n\r\nx\r\n."))
        client.expect("QUIT", 221)
        return out

    replies = await inThread(run)
    assert codes(replies) == [250, 550, 550, 451, 250, 354, 554, 250]
    assert replies[2].text == "5.1.1 No such user"
    assert replies[3].text.startswith("4.3.0")
    assert len(failuresFrom(loggedFailures, RuntimeError)) == 1
    await recorder.waitDisconnects(1)
    threads = seen["threads"]
    assert len(threads) == 6
    assert all("infsmtp-handlers" in t for t in threads), threads
    assert "infsmtp-handlers" in seen["receiveThread"]
    assert seen["seen"][:3] == ("fine", "a@example.org", ["three@allowed.test"])


@pytest_twisted.ensureDeferred
async def test_package_module_function_handlers(serve, raw, recorder, monkeypatch):
    monkeypatch.syspath_prepend(HANDLERS)
    import infsmtp_interop_policy.rules as rules

    rules.calls.clear()
    server = await serve(
        handlers={
            "onMailFrom": "infsmtp_interop_policy.rules:onMailFrom",
            "onRcptTo": "infsmtp_interop_policy.rules:onRcptTo",
            "onReceive": "infsmtp_interop_policy.rules:Receiver.onReceive",
        }
    )
    assert server.onRcptTo == "infsmtp_interop_policy.rules:onRcptTo"

    def run():
        client = raw(server.port, ehlo="module.test")
        out = [
            client.command("MAIL FROM:<spammer@example.org>"),
            client.command("MAIL FROM:<a@example.org>"),
            client.command("RCPT TO:<full@example.net>"),
            client.command("RCPT TO:<x@other.test>"),
            client.command("RCPT TO:<b@example.net>"),
            client.command("DATA"),
            client.command("Subject: refuse me\r\n\r\nx\r\n."),
        ]
        client.expect("QUIT", 221)
        return out

    replies = await inThread(run)
    assert codes(replies) == [550, 250, 452, 550, 250, 354, 554]
    assert replies[2].text == "4.2.2 Mailbox full"
    assert rules.calls == [
        ("mail", "spammer@example.org"),
        ("mail", "a@example.org"),
        ("rcpt", "full@example.net"),
        ("rcpt", "x@other.test"),
        ("rcpt", "b@example.net"),
        ("receive", "refuse me"),
    ]


def test_bad_handler_strings_fail_when_set(tmp_path, monkeypatch):
    from infsmtp import Server

    monkeypatch.syspath_prepend(HANDLERS)
    server = Server(port=0, interface="127.0.0.1")
    for spec in (
        "infsmtp_interop_policy.rules:nothingHere",
        "no_such_package_anywhere.module:function",
        str(tmp_path / "missing.py"),
    ):
        with pytest.raises(ValueError):
            server.onReceive = spec
    broken = tmp_path / "broken.py"
    broken.write_text("session.accept = (\n")
    with pytest.raises(ValueError, match="syntax"):
        server.onRcptTo = str(broken)
    assert server.onReceive is None and server.onRcptTo is None

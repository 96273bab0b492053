"""
Issue 14, item 5: policy controls, driven through the public harness with a
fake clock: requireStartTls, the banner, pregreet detection (the greeting
delay), the onEhlo and onVrfy hooks, and what the session log says of each.
Real clients over sockets are in tests/interop/test_policy_clients.py.
"""

from __future__ import annotations

import pytest
from test_protocol import b64, tlsOptions
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock

from infsmtp import Server, SMTPError
from infsmtp._daemon.twistd import ConfigurationError, Options, buildServer, loadHandlers
from infsmtp._server.policy import extensionLines
from infsmtp.testing import ServerHarness

GREETING = b"220 mx.test ESMTP infsmtp"
MUST_STARTTLS = b"530 5.7.0 Must issue a STARTTLS command first"
PREGREET = b"554 5.5.1 Protocol error: talked before the greeting"


def rejects(logEvents: list[dict]) -> list[tuple]:
    return [
        (e["code"], e["command"], e["handler"], e["reason"])
        for e in logEvents
        if e.get("log_namespace") == "infsmtp.session" and e["event"] == "reject"
    ]


def tlsServer(certificateAuthority, **kw) -> Server:
    kw.setdefault("hostname", "mx.test")
    kw.setdefault("reactor", MemoryReactorClock())
    server = Server(ssl=True, **kw)
    leaf = certificateAuthority.localhost
    server.setCertificate(leaf.certFile, leaf.keyFile)
    return server


# requireStartTls ------------------------------------------------------------


def test_requireStartTls_refuses_mail_auth_and_vrfy_before_starttls(certificateAuthority, logEvents):
    server = tlsServer(certificateAuthority, requireStartTls=True, allowInsecureAuth=True, authFailureDelay=0)
    server.onLogin = lambda s: s.password == "pw"
    h = ServerHarness(server, tlsOptions(certificateAuthority))
    assert h.take() == [GREETING]
    listed = [line[4:] for line in h.ehlo()]
    # STARTTLS offered; AUTH not before TLS, even with allowInsecureAuth.
    assert b"STARTTLS" in listed and not any(name.startswith(b"AUTH") for name in listed)
    assert h.send("MAIL FROM:<a@b.test>") == [MUST_STARTTLS]
    assert h.send(b"AUTH PLAIN " + b64(b"\0u\0pw") + b"\r\n") == [MUST_STARTTLS]
    assert h.send("VRFY postmaster") == [MUST_STARTTLS]
    # RCPT and DATA follow from MAIL: there is none.
    assert h.codes("RCPT TO:<c@d.test>\r\nDATA") == [503, 503]
    assert h.codes("NOOP\r\nRSET") == [250, 250]
    assert h.send("STARTTLS") == [b"220 2.0.0 Ready to start TLS"]
    h.protocol.handshakeCompleted()
    listed = [line[4:] for line in h.ehlo()]
    assert b"AUTH PLAIN LOGIN" in listed and b"STARTTLS" not in listed
    assert h.send(b"AUTH PLAIN " + b64(b"\0u\0pw") + b"\r\n") == [b"235 2.7.0 Authentication successful"]
    assert h.codes("MAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\nhi\r\n.") == [250, 250, 354, 250]
    assert rejects(logEvents)[:3] == [
        (530, "MAIL FROM:<a@b.test>", None, "requireStartTls"),
        (530, "AUTH PLAIN", None, "requireStartTls"),
        (530, "VRFY postmaster", None, "requireStartTls"),
    ]


def test_without_requireStartTls_mail_before_starttls_is_fine(certificateAuthority):
    h = ServerHarness(tlsServer(certificateAuthority), tlsOptions(certificateAuthority))
    h.ehlo()
    assert h.send("MAIL FROM:<a@b.test>") == [b"250 2.1.0 Sender OK"]


def test_requireStartTls_without_tls_is_refused_at_construction():
    with pytest.raises(ValueError, match=r"^requireStartTls needs ssl=True and a certificate"):
        Server(requireStartTls=True)


def test_requireStartTls_plugin_option(certificateAuthority):
    leaf = certificateAuthority.localhost
    options = Options()
    options.parseOptions(["--require-starttls", "--maildir", "/nonexistent/box"])
    with pytest.raises(ConfigurationError, match=r"^--require-starttls needs --cert and --key"):
        buildServer(options)
    options = Options()
    options.parseOptions(
        ["--require-starttls", "--cert", leaf.certFile, "--key", leaf.keyFile, "--banner", "Hi there",
         "--greet-delay", "2.5", "--print"]
    )
    server = buildServer(options)
    assert (server.requireStartTls, server.banner, server.greetDelay) == (True, "Hi there", 2.5)


# The banner -----------------------------------------------------------------


@pytest.mark.parametrize(
    "banner, greeting",
    [("ESMTP infsmtp", GREETING), ("Postfix (Debian/GNU)", b"220 mx.test Postfix (Debian/GNU)"), ("", b"220 mx.test")],
)
def test_banner(banner, greeting):
    h = ServerHarness(banner=banner)
    assert h.take() == [greeting]


@pytest.mark.parametrize("banner", ["two\r\nlines", "bare\nLF", "tab\there", "bell\x07", "caf\u00e9", "x" * 201, b"bytes", None])
def test_a_wrong_banner_is_refused_at_construction(banner):
    with pytest.raises(ValueError, match=r"^banner must be one line of printable ASCII"):
        Server(banner=banner)


# Pregreet detection ---------------------------------------------------------


def delayed(**kw) -> tuple[ServerHarness, list]:
    calls: list = []
    kw.setdefault("greetDelay", 5)

    def onConnect(session):
        calls.append(("connect", session.id))

    def onDisconnect(session):
        calls.append(("disconnect", session.id))

    return ServerHarness(onConnect=onConnect, onDisconnect=onDisconnect, **kw), calls


def test_a_client_that_waits_is_greeted_after_the_delay():
    h, calls = delayed()
    h.clock.advance(4.9)
    assert h.take() == [] and calls == []
    h.clock.advance(0.1)
    assert h.take() == [GREETING]
    assert calls == [("connect", 1)]
    assert h.codes("EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\nx\r\n.") == [250, 250, 250, 354, 250]


def test_a_client_that_talks_first_gets_554_and_is_closed(logEvents):
    h, calls = delayed()
    h.clock.advance(4.9)
    assert h.send("EHLO bot.test\r\nMAIL FROM:<spam@x.test>") == [PREGREET]
    assert h.transport.disconnecting
    # onConnect never ran; nothing more is said when the delay would end.
    h.clock.advance(10)
    assert h.take() == [] and calls == []
    assert rejects(logEvents) == [(554, "EHLO bot.test", None, "pregreet")]
    h.lose()
    assert calls == [("disconnect", 1)]


def test_talking_while_onConnect_decides_is_pregreet_too():
    cancelled: list = []
    pending: Deferred = Deferred(lambda d: cancelled.append(d))
    h = ServerHarness(greetDelay=1, onConnect=lambda s: pending)
    h.clock.advance(1)
    assert h.send("EHLO early") == [PREGREET]
    # Its decision no longer matters: the handler is told (a coroutine
    # gets CancelledError), and the session no longer waits for it.
    assert cancelled == [pending]
    assert h.protocol.describe().state == "closing"
    assert h.take() == []


def test_without_a_delay_early_input_waits_for_the_greeting_as_before():
    h = ServerHarness()
    assert h.take() == [GREETING]
    assert h.codes("EHLO c\r\nNOOP") == [250, 250]


def test_a_client_leaving_during_the_delay_frees_its_slot():
    h, calls = delayed(maxConnections=1)
    # Its slot is held while it waits...
    assert ServerHarness(h.server).take() == [b"421 4.7.0 mx.test Too many connections, try again later"]
    h.lose()
    assert calls == [("disconnect", 1)]
    assert h.factory.sessions == set() and h.factory.limits.sessionsOf("192.0.2.7") == 0
    h.clock.advance(10)
    assert h.take() == []
    # ...and free once it left.
    nextOne = ServerHarness(h.server)
    h.clock.advance(5)
    assert nextOne.take() == [GREETING]


def test_the_idle_deadline_counts_from_the_greeting():
    h, _ = delayed(timeout=30)
    h.clock.advance(5)
    assert h.take() == [GREETING]
    h.clock.advance(29.5)
    assert h.take() == []
    h.clock.advance(1)
    assert h.take() == [b"421 4.4.2 mx.test Error: timeout exceeded"]


def test_shutdown_during_the_delay_says_421():
    h, _ = delayed()
    h.protocol.shutdown()
    assert h.take() == [b"421 4.3.2 mx.test Service shutting down"]


@pytest.mark.parametrize(
    "delay, message",
    [(-1, "greetDelay must be a number of seconds, 0 or more"), (300, "greetDelay must be shorter than timeout (300 s)"),
     (float("nan"), "greetDelay must be a number"), ("5", "greetDelay must be a number")],
)
def test_a_wrong_greetDelay_is_refused(delay, message):
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        Server(greetDelay=delay)


# onEhlo -------------------------------------------------------------------------


def test_onEhlo_sees_the_list_and_may_withdraw_auth_for_a_client():
    seen = []

    def onEhlo(session):
        seen.append((session.helo, dict(session.extensions)))
        if session.helo.endswith(".untrusted.test"):
            del session.extensions["AUTH"]
        session.extensions["X-POLICY"] = "one two"

    server = Server(hostname="mx.test", reactor=MemoryReactorClock(), allowInsecureAuth=True, authFailureDelay=0)
    server.onLogin = lambda s: True
    server.onEhlo = onEhlo
    trusted = ServerHarness(server)
    assert trusted.ehlo("a.trusted.test") == [
        b"250-mx.test Hello 192.0.2.7", b"250-PIPELINING", b"250-SIZE 33554432", b"250-8BITMIME",
        b"250-ENHANCEDSTATUSCODES", b"250-SMTPUTF8", b"250-DSN", b"250-CHUNKING", b"250-AUTH PLAIN LOGIN",
        b"250 X-POLICY one two",
    ]
    assert seen[0] == ("a.trusted.test", {
        "PIPELINING": None, "SIZE": "33554432", "8BITMIME": None, "ENHANCEDSTATUSCODES": None, "SMTPUTF8": None,
        "DSN": None, "CHUNKING": None, "AUTH": "PLAIN LOGIN",
    })
    assert trusted.send(b"AUTH PLAIN " + b64(b"\0u\0p") + b"\r\n") == [b"235 2.7.0 Authentication successful"]
    untrusted = ServerHarness(server)
    assert b"250-AUTH PLAIN LOGIN" not in untrusted.ehlo("bot.untrusted.test")
    # Not offered is not available: AUTH sent anyway is refused.
    assert untrusted.send(b"AUTH PLAIN " + b64(b"\0u\0p") + b"\r\n") == [b"503 5.5.1 Error: authentication not enabled"]
    # The default path stays cached per factory; the hook's lists are not.
    assert server._factory.extensionReplies == {}


def test_onEhlo_may_withdraw_starttls(certificateAuthority):
    def onEhlo(session):
        del session.extensions["STARTTLS"]

    server = tlsServer(certificateAuthority)
    server.onEhlo = onEhlo
    h = ServerHarness(server, tlsOptions(certificateAuthority))
    assert not any(b"STARTTLS" in line for line in h.ehlo())
    assert h.send("STARTTLS") == [b"502 5.5.1 Error: command not implemented"]
    assert h.transport.tlsStarted is None


def test_onEhlo_is_not_asked_about_helo():
    calls = []
    h = ServerHarness(onEhlo=calls.append)
    assert h.send("HELO c.test")[-1] == b"250 mx.test"
    assert calls == []


@pytest.mark.parametrize(
    "refuse, reply",
    [(lambda s: False, b"550 5.7.1 EHLO rejected"),
     (lambda s: setattr(s, "accept", False), b"550 5.7.1 EHLO rejected"),
     (lambda s: (_ for _ in ()).throw(SMTPError(501, "5.5.2 Bad HELO name")), b"501 5.5.2 Bad HELO name")],
    ids=["False", "accept=False", "SMTPError"],
)
def test_onEhlo_may_refuse_and_the_client_has_not_greeted(refuse, reply, logEvents):
    h = ServerHarness(onEhlo=refuse)
    assert h.ehlo("bad name") == [reply]
    assert h.session.helo == ""
    assert h.send("MAIL FROM:<a@b.test>") == [b"503 5.5.1 Error: send HELO/EHLO first"]
    assert not h.transport.disconnecting
    assert rejects(logEvents)[0] == (int(reply[:3]), "EHLO bad name", "onEhlo", "onEhlo")


def _crash(session):
    raise RuntimeError("bug")


@pytest.mark.parametrize(
    "edit",
    [
        lambda s: s.extensions.__setitem__("X-EVIL", "x\r\n250 AUTH PLAIN"),
        lambda s: s.extensions.__setitem__("BAD KEYWORD", None),
        lambda s: s.extensions.__setitem__("-LEADING", None),
        lambda s: s.extensions.__setitem__(b"BYTES", None),
        lambda s: s.extensions.__setitem__("SIZE", 10),
        lambda s: s.extensions.__setitem__("pipelining", None),
        lambda s: s.extensions.update({f"X{i}": None for i in range(64)}),
        lambda s: setattr(s, "extensions", ["PIPELINING"]),
        lambda s: "yes",
        _crash,
    ],
    ids=["CRLF in params", "space in keyword", "leading hyphen", "bytes keyword", "int params", "duplicate",
         "too many", "a list", "returned a string", "raised"],
)
def test_a_wrong_onEhlo_is_421_never_a_broken_list(edit, logEvents):
    h = ServerHarness(onEhlo=edit)
    assert h.ehlo() == [b"421 4.3.0 Temporary failure, try again later"]
    assert h.transport.disconnecting
    assert h.session.helo == ""
    assert rejects(logEvents) == [(421, "EHLO client.test", "onEhlo", "onEhlo")]


def test_a_late_onEhlo_holds_pipelined_commands_in_order():
    pending: Deferred = Deferred()
    h = ServerHarness(onEhlo=lambda s: pending)
    h.take()
    assert h.send("EHLO c\r\nMAIL FROM:<a@b.test>") == []
    pending.callback(None)
    lines = h.take()
    assert lines[0] == b"250-mx.test Hello 192.0.2.7" and lines[-1] == b"250 2.1.0 Sender OK"


def test_extension_lines_accept_exactly_keywords_and_printable_params():
    assert extensionLines({"A-1": None, "SIZE": "100", "AUTH": "PLAIN LOGIN", "E": ""}) == (
        ["A-1", "SIZE 100", "AUTH PLAIN LOGIN", "E"], None
    )
    for wrong in ({"X": "a  b"}, {"X": " a"}, {"X": "a\x7f"}, {"X": "\u00e9"}, {"": None}, {"X": "y" * 401}):
        assert extensionLines(wrong)[1] is not None, wrong


# onVrfy ---------------------------------------------------------------------------


def onVrfy(session):
    if session.address == "ambiguous":
        raise SMTPError(553, "5.1.4 Ambiguous address")
    if session.address == "ask-later":
        return None
    return session.address in ("ann@example.org", "bob")


@pytest.mark.parametrize(
    "argument, reply",
    [("<ann@example.org>", b"250 2.1.5 <ann@example.org>"), ("bob", b"250 2.1.5 <bob>"),
     ("<eve@example.org>", b"550 5.1.1 <eve@example.org>: User unknown"),
     ("ambiguous", b"553 5.1.4 Ambiguous address"),
     ("ask-later", b"252 2.5.0 Cannot VRFY user, but will accept message and attempt delivery")],
)
def test_onVrfy_decides(argument, reply):
    h = ServerHarness(onVrfy=onVrfy)
    h.ehlo()
    assert h.send(f"VRFY {argument}") == [reply]
    # VRFY's decision is not MAIL's.
    assert h.send("MAIL FROM:<a@b.test>") == [b"250 2.1.0 Sender OK"]


def test_vrfy_without_handler_is_252():
    h = ServerHarness()
    assert h.send("VRFY ann") == [GREETING, b"252 2.5.0 Cannot VRFY user, but will accept message and attempt delivery"]


@pytest.mark.parametrize(
    "handler", [lambda s: "yes", lambda s: setattr(s, "accept", 1), _crash], ids=["string", "accept=1", "raised"]
)
def test_a_wrong_onVrfy_is_451(handler, logEvents):
    h = ServerHarness(onVrfy=handler)
    h.ehlo()
    assert h.send("VRFY ann") == [b"451 4.3.0 Temporary failure, try again later"]
    assert not h.transport.disconnecting
    assert rejects(logEvents) == [(451, "VRFY ann", "onVrfy", "onVrfy")]


def test_onVrfy_refusal_is_logged_with_its_reason(logEvents):
    h = ServerHarness(onVrfy=lambda s: False)
    h.ehlo()
    h.send("VRFY eve")
    assert rejects(logEvents) == [(550, "VRFY eve", "onVrfy", "onVrfy")]


@pytest.mark.parametrize("argument", [b"a\x01b", b"\xff\xfe", b"x" * 257, b"<>"])
def test_a_vrfy_argument_that_is_not_a_short_line_of_text_is_501(argument):
    calls = []
    h = ServerHarness(onVrfy=calls.append)
    h.ehlo()
    assert h.codes(b"VRFY " + argument + b"\r\n") == [501]
    assert calls == []


# Handler adaptation -------------------------------------------------------------


def test_handlers_files_may_define_onEhlo_and_onVrfy(tmp_path):
    path = tmp_path / "policy.py"
    path.write_text("def onEhlo(session):\n    pass\n\ndef onVrfy(session):\n    return False\n")
    assert sorted(loadHandlers(str(path))) == ["onEhlo", "onVrfy"]


def test_a_script_onVrfy_decides_through_session_accept(tmp_path):
    script = tmp_path / "vrfy.py"
    script.write_text("session.accept = session.address == 'ann'\n")
    server = Server(hostname="mx.test", reactor=MemoryReactorClock())
    server.onVrfy = str(script)
    assert server.onVrfy == str(script)
    assert type(server._handlers["onVrfy"]).__name__ == "ScriptHandler"


def test_leaving_before_the_greeting_restores_the_class_dataReceived():
    # No cycle through the instance's bound method is left behind.
    for advance in (0, 5):
        pending: Deferred = Deferred()
        h = ServerHarness(greetDelay=5, onConnect=lambda s, pending=pending: pending)
        h.clock.advance(advance)
        assert "dataReceived" in vars(h.protocol)
        h.lose()
        assert "dataReceived" not in vars(h.protocol)

"""
infsmtp's two uses of Twisted internals each have a feature check and a
public fallback, and each fallback is forced here and run for real:

- ``_writenow``: the private write buffer of ``tcp.Server`` / ``tcp.Client``
  is probed at import; a class that fails the probe, or a transport that
  loses an attribute later, gets plain ``transport.write`` and
  ``closesAtOnce() == False``.  Over loopback the server's replies still
  arrive byte-exact and in order, and QUIT still closes.
- ``_clientprotocol``: CRAM-MD5 and LOGIN come from Twisted's private
  ``twisted.mail._cred`` while it is there and answers as the RFCs say;
  otherwise from infsmtp, which a subprocess with the module hidden uses
  for a real AUTH against aiosmtpd.

And what infsmtp imports is declared: directly, or by what it declares
(``twisted[tls]`` brings pyOpenSSL, not a promise of ``cryptography``).
"""

from __future__ import annotations

import ast
import configparser
import hashlib
import hmac
import importlib.metadata
import os
import pathlib
import re
import subprocess
import sys
import textwrap
import types

import pytest
import pytest_twisted
from aiosmtpd.smtp import AuthResult
from peertools import EphemeralController
from twisted.internet import defer, protocol, reactor, tcp
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.logger import globalLogPublisher

from infsmtp import Server, _writenow
from infsmtp._client import protocol as _clientprotocol

# ------------------------------------------------------------ _writenow


def hiding(name: str) -> type:
    """
    A C{tcp.Server} whose instances do not have attribute C{name}, as on a
    Twisted that renamed it.
    """

    class Hiding(tcp.Server):
        def __getattribute__(self, attribute):
            if attribute == name:
                raise AttributeError(attribute)
            return super().__getattribute__(attribute)

    return Hiding


class BufferElsewhere(tcp.Server):
    """
    A transport that still has every attribute, but queues writes somewhere
    else: reading the old attributes would let a reply overtake another.
    """

    def write(self, data: bytes) -> None:
        self.elsewhere = getattr(self, "elsewhere", b"") + data


class RecordingTransport:
    """
    A transport with none of Twisted's private attributes: only C{write}.
    """

    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)


class IdleWithoutSocket(RecordingTransport):
    """
    A transport that looks idle but has no C{socket} to send on.
    """

    connected, disconnecting, _writeDisconnected, TLS = True, False, False, False
    dataBuffer, offset, _tempDataLen = b"", 0, 0


def test_theInstalledTwistedPassesTheProbe():
    assert _writenow._probe(tcp.Server) is None
    assert _writenow._probe(tcp.Client) is None
    assert _writenow._FAST == (tcp.Server, tcp.Client)


@pytest.mark.parametrize("name", sorted(_writenow._SHAPE))
def test_aTransportClassMissingAnAttributeFailsTheProbe(name):
    problem = _writenow._probe(hiding(name))
    assert problem is not None and name in problem


def test_anAttributeOfAnotherTypeFailsTheProbe():
    class TextBuffer(tcp.Server):
        dataBuffer = ""

    assert _writenow._probe(TextBuffer) == "its 'dataBuffer' is a str"


def test_attributesThatNoLongerHoldTheQueueFailTheProbe():
    assert _writenow._probe(BufferElsewhere) == "what write() queues is not where it is looked for"


def test_aClassThatFailsTheProbeIsLeftOnTheBufferedPathAndSaysWhy(monkeypatch):
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        monkeypatch.setattr(_writenow, "_PLAIN_TCP", (tcp.Server, hiding("_tempDataLen")))
        fast = _writenow._fastClasses()
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert fast == (tcp.Server,)
    warnings = [e for e in events if e.get("log_namespace") == "infsmtp._writenow"]
    assert len(warnings) == 1 and "_tempDataLen" in warnings[0]["problem"]


@pytest.mark.parametrize("transportClass", [RecordingTransport, IdleWithoutSocket])
def test_anAttributeLostAtRunTimeSwitchesTheShortcutOffOnce(monkeypatch, transportClass):
    """
    A transport of a class that passed the probe but has lost an attribute
    since gets a plain write, never an exception; the shortcut is then off
    for every transport, and the log says so once.
    """
    monkeypatch.setattr(_writenow, "_FAST", (tcp.Server, transportClass))
    transport = transportClass()
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        _writenow.writeNow(transport, b"250 OK\r\n")
        _writenow.writeNow(transport, b"221 Bye\r\n")
        assert _writenow.closesAtOnce(transport) is False
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert transport.written == [b"250 OK\r\n", b"221 Bye\r\n"]
    assert _writenow._FAST == ()
    assert len([e for e in events if e.get("log_namespace") == "infsmtp._writenow"]) == 1


class Transcript(protocol.Protocol):
    """
    Sends C{script} at once (pipelined), records every byte the server
    sends, and fires C{closed} with them when the server closes.
    """

    def __init__(self, script: bytes) -> None:
        self.script = script
        self.received = bytearray()
        self.closed: defer.Deferred[bytes] = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.script)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason) -> None:
        self.closed.callback(bytes(self.received))


SCRIPT = (
    b"EHLO client.test\r\n"
    b"MAIL FROM:<ann@example.org>\r\n"
    b"RCPT TO:<bob@example.org>\r\n"
    b"RCPT TO:<nobody@example.org>\r\n"
    b"DATA\r\n"
    b"Subject: hi\r\n\r\nbody\r\n.\r\n"
    b"NOOP\r\n"
    b"QUIT\r\n"
)


async def serverTranscript() -> bytes:
    """
    What our Server sends over loopback to L{SCRIPT}, up to its close.
    """
    received = []
    server = Server(port=0, interface="127.0.0.1", hostname="mx.test", receivedHeader=False)
    server.onRcptTo = lambda session: not session.address.startswith("nobody")
    server.onReceive = lambda session: received.append(session.msg) or True
    await server.startListening().addTimeout(10, reactor)
    try:
        client = Transcript(SCRIPT)
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", server.port)
        await endpoint.connect(protocol.Factory.forProtocol(lambda: client)).addTimeout(10, reactor)
        # Well under the server's close grace (10 s): the close must
        # complete by itself, not by the timer that forces it.
        transcript = await client.closed.addTimeout(5, reactor)
    finally:
        await server.stopListening().addTimeout(10, reactor)
    assert received == [b"Subject: hi\r\n\r\nbody\r\n"]
    return transcript


def replyCodes(transcript: bytes) -> list[bytes]:
    return [line[:3] for line in transcript.split(b"\r\n") if line[3:4] == b" "]


def withoutQueueId(transcript: bytes) -> bytes:
    """
    C{transcript} with the one part that differs between sessions masked.
    """
    masked, count = re.subn(rb"queued as [0-9A-Za-z]+\r\n", b"queued as ID\r\n", transcript)
    assert count == 1
    return masked


@pytest_twisted.ensureDeferred
async def test_serverRepliesAreTheSameOnTheBufferedPath(monkeypatch):
    """
    With the shortcut off, a pipelined session's replies arrive byte for
    byte as with it, in order, and QUIT still closes the connection.
    """
    fast = await serverTranscript()
    assert replyCodes(fast) == [b"220", b"250", b"250", b"250", b"550", b"354", b"250", b"250", b"221"]
    monkeypatch.setattr(_writenow, "_FAST", ())
    buffered = await serverTranscript()
    assert withoutQueueId(buffered) == withoutQueueId(fast)


@pytest_twisted.ensureDeferred
async def test_writeNowOnTheBufferedPathQueuesAndDelivers(monkeypatch):
    """
    With the shortcut off, C{writeNow} on a real C{tcp.Client} leaves its
    bytes to Twisted's buffer (not the socket) and they arrive in order.
    """
    monkeypatch.setattr(_writenow, "_FAST", ())
    collected = Transcript(b"")
    listening = await protocol_listen(collected)
    try:
        sender = await TCP4ClientEndpoint(reactor, "127.0.0.1", listening.getHost().port).connect(
            protocol.Factory.forProtocol(protocol.Protocol)
        )
        transport = sender.transport
        assert _writenow.closesAtOnce(transport) is False  # unsure, though idle
        _writenow.writeNow(transport, b"first ")
        assert transport._tempDataLen == len(b"first ")
        _writenow.writeNow(transport, b"second")
        transport.loseConnection()
        assert await collected.closed.addTimeout(10, reactor) == b"first second"
    finally:
        await listening.stopListening()


async def protocol_listen(receiver: protocol.Protocol):
    """
    A port on 127.0.0.1 whose one connection is handled by C{receiver}.
    """
    return reactor.listenTCP(0, protocol.Factory.forProtocol(lambda: receiver), interface="127.0.0.1")


# --------------------------------------------------- SASL authenticators

PASSWORD = b"correct horse"


def test_ourAuthenticatorsAnswerLikeTheRFCs():
    assert _clientprotocol._answersLikeTheRFCs(_clientprotocol.CramMD5Authenticator, _clientprotocol.LoginAuthenticator)
    login = _clientprotocol.LoginAuthenticator(b"ann")
    # Whatever the prompts: the user name first, then the secret, again.
    assert [login.challengeResponse(PASSWORD, c) for c in (b"", b"", b"")] == [b"ann", PASSWORD, PASSWORD]


def test_wrongAnswersFailTheFeatureCheck():
    class Uppercase(_clientprotocol.CramMD5Authenticator):
        def challengeResponse(self, secret, chal):
            return super().challengeResponse(secret, chal).upper()

    class PasswordFirst(_clientprotocol.LoginAuthenticator):
        def challengeResponse(self, secret, chal):
            return secret

    login = _clientprotocol.LoginAuthenticator
    cram = _clientprotocol.CramMD5Authenticator
    assert not _clientprotocol._answersLikeTheRFCs(Uppercase, login)
    assert not _clientprotocol._answersLikeTheRFCs(cram, PasswordFirst)
    assert not _clientprotocol._answersLikeTheRFCs(cram, lambda user: object())


def test_twistedsAuthenticatorsAreUsedWhileTheyAnswerLikeTheRFCs():
    from twisted.mail import _cred

    assert _clientprotocol._saslAuthenticators() == (_cred.CramMD5ClientAuthenticator, _cred.LOGINAuthenticator)


def test_oursAreUsedWhenTwistedsModuleIsGone(monkeypatch):
    monkeypatch.setitem(sys.modules, "twisted.mail._cred", None)
    assert _clientprotocol._saslAuthenticators() == (
        _clientprotocol.CramMD5Authenticator,
        _clientprotocol.LoginAuthenticator,
    )


def test_oursAreUsedWhenTwistedsAnswerDifferently(monkeypatch):
    class Changed:
        def __init__(self, user):
            pass

        def getName(self):
            return b"CRAM-MD5"

        def challengeResponse(self, secret, chal):
            return b""

    changed = types.ModuleType("twisted.mail._cred")
    changed.CramMD5ClientAuthenticator = Changed
    changed.LOGINAuthenticator = _clientprotocol.LoginAuthenticator
    monkeypatch.setitem(sys.modules, "twisted.mail._cred", changed)
    assert _clientprotocol._saslAuthenticators() == (
        _clientprotocol.CramMD5Authenticator,
        _clientprotocol.LoginAuthenticator,
    )


class CheckingHandler:
    """
    An aiosmtpd handler that checks LOGIN (built into aiosmtpd) and CRAM-MD5
    (which aiosmtpd lacks; written here from RFC 2195), and records which
    mechanism each success used.
    """

    CHALLENGE = b"<4711.1700000000@aiosmtpd.test>"

    def __init__(self) -> None:
        self.succeeded: list[str] = []

    def authenticator(self, server, session, envelope, mechanism, authData):
        ok = (authData.login, authData.password) == (b"ann", PASSWORD)
        if ok:
            self.succeeded.append(mechanism)
        return AuthResult(success=ok, handled=False)

    async def auth_CRAM__MD5(self, server, args):
        response = await server.challenge_auth(self.CHALLENGE)
        expected = b"ann " + hmac.new(PASSWORD, self.CHALLENGE, hashlib.md5).hexdigest().encode()
        ok = response == expected
        if ok:
            self.succeeded.append("CRAM-MD5")
        return AuthResult(success=ok, handled=False)




# Runs in a fresh interpreter: Twisted's SMTP module loads first (it needs
# twisted.mail._cred itself), then the private module is hidden, as on a
# Twisted that no longer has it, and only then is infsmtp imported.
HIDDEN_CRED_CLIENT = textwrap.dedent(
    """
    import sys

    import twisted.mail.smtp

    sys.modules["twisted.mail._cred"] = None

    from infsmtp import AuthMode, Client
    from infsmtp._client import protocol as _clientprotocol

    print(_clientprotocol.MECHANISMS["CRAM-MD5"][0].__module__, _clientprotocol.MECHANISMS["LOGIN"][0].__module__)
    port = int(sys.argv[1])
    for mechanism, password in [
        ("CRAM-MD5", "wrong"),
        ("CRAM-MD5", "correct horse"),
        ("LOGIN", "wrong"),
        ("LOGIN", "correct horse"),
    ]:
        with Client() as client:
            client.host, client.port, client.timeout = "127.0.0.1", port, 10000
            client.authMode, client.saslMechanisms = AuthMode.sasl, (mechanism,)
            client.username, client.password = "ann", password
            client.connect()
            print(mechanism, client.authenticate())
            client.disconnect()
    """
)


def test_realAuthWithTwistedsPrivateModuleHidden():
    handler = CheckingHandler()
    controller = EphemeralController(
        handler, hostname="127.0.0.1", port=0, authenticator=handler.authenticator, auth_require_tls=False
    )
    controller.start()
    try:
        result = subprocess.run(
            [sys.executable, "-c", HIDDEN_CRED_CLIENT, str(controller.port)],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "PYTHONHASHSEED": "0"},
        )
    finally:
        controller.stop()
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "infsmtp._client.protocol infsmtp._client.protocol",
        "CRAM-MD5 False",
        "CRAM-MD5 True",
        "LOGIN False",
        "LOGIN True",
    ]
    assert handler.succeeded == ["CRAM-MD5", "LOGIN"]


# ------------------------------------------------- declared dependencies

REPO = pathlib.Path(__file__).resolve().parent.parent


def normalised(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement(line: str) -> tuple[str, set[str]]:
    """
    The distribution a requirement line names, and the extras it asks for.
    """
    match = re.match(r"\s*([A-Za-z0-9._-]+)\s*(?:\[([^\]]*)\])?", line)
    extras = {normalised(e) for e in (match.group(2) or "").split(",") if e.strip()}
    return normalised(match.group(1)), extras


def declaredDistributions() -> set[str]:
    """
    What setup.cfg's install_requires names, and what those require in turn
    (unconditionally or for an extra asked for): one step, no further, as a
    requirement's own requirements are its business and may change.
    """
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    lines = [x for x in config["options"]["install_requires"].splitlines() if x.strip()]
    declared = set()
    for line in lines:
        name, extras = requirement(line)
        declared.add(name)
        for theirs in importlib.metadata.requires(name) or []:
            theirName, _ = requirement(theirs)
            marker = theirs.partition(";")[2].strip()
            extra = re.fullmatch(r"extra\s*==\s*[\'\"]([^\'\"]+)[\'\"]", marker)
            if not marker or (extra and normalised(extra.group(1)) in extras):
                declared.add(theirName)
    return declared


def runtimeModules() -> list:
    """
    infsmtp's own modules, its subpackages included, but not the testing
    kit (which a test run brings pytest for).
    """
    return [p for p in (REPO / "infsmtp").rglob("*.py") if "testing" not in p.relative_to(REPO / "infsmtp").parts]


def importedDistributions() -> set[str]:
    """
    The distributions whose modules infsmtp's own code imports.
    """
    modules = set()
    for path in runtimeModules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    owners = importlib.metadata.packages_distributions()
    distributions = set()
    for module in modules - set(sys.stdlib_module_names) - {"infsmtp", "__future__"}:
        # "twisted" is also the folder of infsmtp's plugin: Twisted is meant.
        names = {normalised(d) for d in owners[module]} - {"infsmtp"}
        assert len(names) == 1, (module, names)
        distributions |= names
    return distributions


def optionalDistributions() -> set[str]:
    """
    What setup.cfg's extras (but ``test``) name: ``pip install
    infsmtp[metrics]``.
    """
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    extras = config["options.extras_require"]
    return {
        requirement(line)[0]
        for name in extras
        if name != "test"
        for line in extras[name].splitlines()
        if line.strip()
    }


def test_everyImportedDistributionIsDeclared():
    imported = importedDistributions()
    assert {"cryptography", "twisted", "pyopenssl"} <= imported
    assert imported - declaredDistributions() - optionalDistributions() == set()


def test_optionalDistributionsAreImportedOnlyWhenUsed():
    """
    An extra's modules are imported inside the function that needs them,
    never when infsmtp is: the package works without the extra.
    """
    optional = {normalised(name) for name in optionalDistributions()}
    assert optional == {"prometheus-client"}
    owners = importlib.metadata.packages_distributions()
    for path in runtimeModules():
        for node in ast.parse(path.read_text()).body:
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module.split(".")[0]]
            for module in names:
                assert not {normalised(d) for d in owners.get(module, [])} & optional, (path.name, module)

"""
OAuth 2.0 for the client (issue 11, item 11): XOAUTH2 and OAUTHBEARER
(RFC 7628) with a token provider asked again, once, when the server refuses
a token, against aiosmtpd with the two mechanisms written as its handler's
``auth_`` methods (a server that takes only the current token and answers a
stale one as Google and RFC 7628 do: a 334 JSON status, then 535).
"""

from __future__ import annotations

import base64
import io
import json

import pytest
import pytest_twisted
from aiosmtpd.smtp import AuthResult
from peertools import EphemeralController
from test_client_interop import MESSAGE, RECEIVED, failure
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.logger import formatEvent

from infsmtp import AsyncClient, AuthMode, Client, SMTPAuthenticationError, sendmail
from infsmtp._client.oauth import saslName

CURRENT = "ya29.current-Token_0~+/=="


class OAuthServer:
    """
    An aiosmtpd handler speaking XOAUTH2 and OAUTHBEARER that accepts only
    ``current``.  ``attempts`` keeps (mechanism, token, fields) per AUTH,
    ``answers`` what the client sent back to the error challenge.  With
    ``echo``, a wrong token is answered 454 with the token and the whole
    response in the text, as a careless server might.
    """

    def __init__(self) -> None:
        self.current = CURRENT
        self.echo = False
        self.attempts: list[tuple[str, str, dict[str, str]]] = []
        self.answers: list[bytes] = []
        self.messages: list[tuple[str, bytes]] = []

    async def handle_DATA(self, server, session, envelope):
        self.messages.append((session.login_data, envelope.original_content))
        return "250 2.0.0 OK"

    async def auth_XOAUTH2(self, server, args):
        blob = base64.b64decode(args[1])
        fields = dict(f.split("=", 1) for f in blob.decode().split("\x01") if f)
        return await self._check(server, "XOAUTH2", fields["user"], fields, args[1], '{"status":"401","schemes":"bearer"}')

    async def auth_OAUTHBEARER(self, server, args):
        blob = base64.b64decode(args[1]).decode()
        header, _, rest = blob.partition("\x01")
        fields = dict(f.split("=", 1) for f in rest.split("\x01") if f)
        fields["gs2"] = header
        error = json.dumps({"status": "invalid_token", "scope": "mail", "openid-configuration": "https://x.test/o"})
        return await self._check(server, "OAUTHBEARER", header, fields, args[1], error)

    async def _check(self, server, mechanism, login, fields, blob, error):
        scheme, _, token = fields["auth"].partition(" ")
        self.attempts.append((mechanism, token, fields))
        if scheme == "Bearer" and token == self.current:
            return AuthResult(success=True, handled=False, auth_data=_Login(login))
        if self.echo:
            return AuthResult(success=False, handled=False, message=f"454 4.7.0 not now for {token} ({blob})")
        self.answers.append(await server.challenge_auth(error))
        return AuthResult(success=False, handled=False)


class _Login:
    def __init__(self, login: str) -> None:
        self.login = login


def refuseEveryPassword(server, session, envelope, mechanism, authData):
    return AuthResult(success=False, handled=False)


@pytest.fixture
def oauthServer():
    handler = OAuthServer()
    controller = EphemeralController(
        handler, hostname="127.0.0.1", port=0, auth_require_tls=False, authenticator=refuseEveryPassword
    )
    controller.start()
    handler.port = controller.port
    yield handler
    controller.stop()


def client(port: int, mechanism: str, **settings) -> AsyncClient:
    chosen = dict(
        host="127.0.0.1",
        port=port,
        timeout=5000,
        authMode=AuthMode.sasl,
        saslMechanisms=(mechanism,),
        username="ann@example.org",
    )
    return AsyncClient(**{**chosen, **settings})


class Provider:
    """
    A token provider keeping its calls: ``tokens[refresh]`` is what it
    gives.
    """

    def __init__(self, stale: str, fresh: str) -> None:
        self.tokens = {False: stale, True: fresh}
        self.calls: list[tuple[str, bool]] = []

    def __call__(self, username: str, refresh: bool) -> str:
        self.calls.append((username, refresh))
        return self.tokens[refresh]


MECHANISMS = ["XOAUTH2", "OAUTHBEARER"]

#: What the client answers the error challenge with (RFC 7628 3.2.3 for
#: OAUTHBEARER: a lone ^A; an empty line for XOAUTH2).
ANSWERS = {"XOAUTH2": b"", "OAUTHBEARER": b"\x01"}


@pytest.mark.parametrize("mechanism", MECHANISMS)
@pytest_twisted.ensureDeferred
async def test_staleTokenIsRefreshedAndTriedOnceMore(oauthServer, mechanism):
    provider = Provider("ya29.expired", CURRENT)
    c = client(oauthServer.port, mechanism, tokenProvider=provider)
    await c.connect()
    assert await c.authenticate() is True
    assert await c.sendStream(io.BytesIO(MESSAGE)) == {}
    await c.disconnect()
    assert provider.calls == [("ann@example.org", False), ("ann@example.org", True)]
    assert [(m, t) for m, t, _ in oauthServer.attempts] == [(mechanism, "ya29.expired"), (mechanism, CURRENT)]
    assert oauthServer.answers == [ANSWERS[mechanism]]
    assert oauthServer.messages[0][1] == RECEIVED


@pytest.mark.parametrize("mechanism", MECHANISMS)
@pytest_twisted.ensureDeferred
async def test_tokensStillRefusedAfterOneRefreshIsFalse(oauthServer, mechanism):
    provider = Provider("ya29.expired", "ya29.revoked")
    c = client(oauthServer.port, mechanism, tokenProvider=provider)
    await c.connect()
    assert await c.authenticate() is False
    assert provider.calls == [("ann@example.org", False), ("ann@example.org", True)]
    assert [t for _, t, _ in oauthServer.attempts] == ["ya29.expired", "ya29.revoked"]
    assert oauthServer.answers == [ANSWERS[mechanism]] * 2
    # The session goes on: the next call asks the provider afresh.
    provider.tokens[False] = CURRENT
    assert await c.authenticate() is True
    assert provider.calls[2:] == [("ann@example.org", False)]
    await c.disconnect()


@pytest.mark.parametrize("mechanism", MECHANISMS)
@pytest_twisted.ensureDeferred
async def test_withoutProviderThePasswordIsTheTokenAndIsNotRetried(oauthServer, mechanism):
    c = client(oauthServer.port, mechanism, password="ya29.expired")
    await c.connect()
    assert await c.authenticate() is False
    await c.disconnect()
    c = client(oauthServer.port, mechanism, password=CURRENT)
    await c.connect()
    assert await c.authenticate() is True
    await c.disconnect()
    assert [t for _, t, _ in oauthServer.attempts] == ["ya29.expired", CURRENT]


@pytest_twisted.ensureDeferred
async def test_providerMayReturnADeferredOrACoroutine(oauthServer):
    calls = []

    def deferred(username, refresh):
        calls.append(("deferred", refresh))
        return deferLater(reactor, 0, lambda: "ya29.expired" if not refresh else CURRENT)

    async def coroutine(username, refresh):
        calls.append(("coroutine", refresh))
        await deferLater(reactor, 0, lambda: None)
        return CURRENT

    for mechanism, provider in [("XOAUTH2", deferred), ("OAUTHBEARER", coroutine)]:
        c = client(oauthServer.port, mechanism, tokenProvider=provider)
        await c.connect()
        assert await c.authenticate() is True
        await c.disconnect()
    assert calls == [("deferred", False), ("deferred", True), ("coroutine", False)]


@pytest_twisted.ensureDeferred
async def test_oauthbearerSendsTheGs2HeaderHostAndPort(oauthServer):
    """
    RFC 7628 3.1 and RFC 5801's escaping of the authorization identity;
    ``host`` is serverHostname when set (the host connected to otherwise).
    """
    user = "a,b=c@example.org"
    for settings, host in [({}, "127.0.0.1"), ({"serverHostname": "mail.example.test"}, "mail.example.test")]:
        c = client(oauthServer.port, "OAUTHBEARER", username=user, password=CURRENT, **settings)
        await c.connect()
        assert await c.authenticate() is True
        await c.disconnect()
        fields = oauthServer.attempts[-1][2]
        assert fields == {
            "gs2": "n,a=a=2Cb=3Dc@example.org,",
            "host": host,
            "port": str(oauthServer.port),
            "auth": "Bearer " + CURRENT,
        }
    assert saslName("=,x") == "=3D=2Cx"


@pytest_twisted.ensureDeferred
async def test_bearerMechanismsInSaslOrder(oauthServer):
    """
    Both offered: the first of saslMechanisms wins; a provider is only
    asked when a bearer mechanism is used.
    """
    provider = Provider(CURRENT, CURRENT)
    c = client(oauthServer.port, "OAUTHBEARER", tokenProvider=provider, saslMechanisms=("OAUTHBEARER", "XOAUTH2"))
    await c.connect()
    assert await c.authenticate() is True
    await c.disconnect()
    assert [m for m, _, _ in oauthServer.attempts] == ["OAUTHBEARER"]
    assert provider.calls == [("ann@example.org", False)]


@pytest_twisted.ensureDeferred
async def test_providerThatFailsIsAClearErrorBeforeAnythingIsSent(oauthServer):
    def raises(username, refresh):
        raise ValueError("the refresh token was revoked")

    def failsLater(username, refresh):
        return deferLater(reactor, 0, lambda: 1 / 0)

    cases = [
        (raises, "the tokenProvider failed: ValueError: the refresh token was revoked"),
        (failsLater, "the tokenProvider failed: ZeroDivisionError: division by zero"),
        (lambda u, r: b"ya29.bytes", "the tokenProvider returned bytes, not a str token"),
        (lambda u, r: None, "the tokenProvider returned NoneType, not a str token"),
        (lambda u, r: "", "the tokenProvider returned an empty token"),
        (lambda u, r: "ya29.a\x01auth=Bearer x", "the tokenProvider returned a token with a character"),
        (lambda u, r: "ya29 spaced", "the tokenProvider returned a token with a character"),
    ]
    for provider, expected in cases:
        c = client(oauthServer.port, "XOAUTH2", tokenProvider=provider)
        await c.connect()
        error = await failure(c.authenticate())
        assert isinstance(error, SMTPAuthenticationError), error
        assert str(error).startswith(expected), error
        assert "ya29" not in str(error)
        await c.disconnect()
    assert oauthServer.attempts == []


@pytest_twisted.ensureDeferred
async def test_providerWithoutABearerMechanismIsAnError(oauthServer):
    provider = Provider(CURRENT, CURRENT)
    for settings in [dict(authMode=AuthMode.default), dict(saslMechanisms=("PLAIN", "LOGIN"))]:
        c = client(oauthServer.port, "XOAUTH2", password="pw", tokenProvider=provider, **settings)
        await c.connect()
        error = await failure(c.authenticate())
        assert isinstance(error, SMTPAuthenticationError) and "XOAUTH2 and OAUTHBEARER only" in str(error), error
        await c.disconnect()
    c = client(oauthServer.port, "XOAUTH2", tokenProvider="ya29.not-callable")
    await c.connect()
    error = await failure(c.authenticate())
    assert "tokenProvider must be a callable" in str(error) and "ya29" not in str(error), error
    await c.disconnect()
    assert provider.calls == [] and oauthServer.attempts == []


@pytest.mark.parametrize("mechanism", MECHANISMS)
@pytest_twisted.ensureDeferred
async def test_tokenNeverInErrorsOrLogs(oauthServer, mechanism, logEvents):
    """
    A server that quotes the token and the response carrying it: the
    error says ``***`` instead; nothing logged holds either.
    """
    oauthServer.echo = True
    secret = "ya29.SECRET-token"
    c = client(oauthServer.port, mechanism, tokenProvider=lambda u, r: secret)
    await c.connect()
    error = await failure(c.authenticate())
    await c.disconnect()
    assert isinstance(error, SMTPAuthenticationError) and error.code == 454, error
    [(_, token, _)] = oauthServer.attempts
    assert token == secret
    texts = [str(error), repr(error)] + [formatEvent(e) for e in logEvents] + [repr(e) for e in logEvents]
    assert "not now for *** (***)" in str(error)
    for text in texts:
        assert secret not in text and "SECRET" not in text
        assert "U0VDUkVU" not in text  # no base64 of it either


@pytest_twisted.ensureDeferred
async def test_oneShotSendmailWithATokenProvider(oauthServer):
    provider = Provider("ya29.expired", CURRENT)
    refused = await sendmail(
        MESSAGE,
        host="127.0.0.1",
        port=oauthServer.port,
        timeout=5000,
        authMode=AuthMode.sasl,
        saslMechanisms=("OAUTHBEARER",),
        username="ann@example.org",
        tokenProvider=provider,
    ).addTimeout(20, reactor)
    assert refused == {}
    assert provider.calls == [("ann@example.org", False), ("ann@example.org", True)]
    assert oauthServer.messages == [("n,a=ann@example.org,", RECEIVED)]


def test_blockingClientForwardsTheNewSettings():
    provider = Provider(CURRENT, CURRENT)
    c = Client(tokenProvider=provider, serverHostname="mail.example.test", certFile="c.pem", keyFile="k.pem")
    assert c._client.tokenProvider is provider and c.tokenProvider is provider
    assert (c._client.serverHostname, c._client.certFile, c._client.keyFile) == ("mail.example.test", "c.pem", "k.pem")
    c.tlsConnectionCreator = creator = object()
    assert c._client.tlsConnectionCreator is creator
    assert (c.secure, c.tlsVersion) == (False, None)

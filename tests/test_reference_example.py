"""
The reference's client example (``examples/reference_example.py``) runs as
written, in a program of its own, against a local server that looks like the
reference's: implicit TLS, AUTH, the reference's account and password.
"""

from __future__ import annotations

import os
import sys

import pytest_twisted
from aiosmtpd.smtp import AuthResult
from test_client_interop import aiosmtpdServer, serverContext  # noqa: F401  (a fixture)
from twisted.internet import reactor
from twisted.internet.utils import getProcessOutputAndValue

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "reference_example.py")


@pytest_twisted.ensureDeferred
async def test_referenceExampleSendsMailEml(aiosmtpdServer, certificateAuthority):  # noqa: F811
    logins = []

    def authenticator(server, session, envelope, mechanism, authData):
        logins.append((mechanism, authData.login, authData.password))
        ok = (authData.login, authData.password) == (b"youraccount@gmail.com", b"yourpassword")
        return AuthResult(success=ok, handled=False)

    server = aiosmtpdServer(
        ssl_context=serverContext(certificateAuthority.localhost),
        authenticator=authenticator,
    )
    out, err, code = await getProcessOutputAndValue(
        sys.executable,
        [EXAMPLE, "localhost", str(server.port), "--ca-file", certificateAuthority.certFile],
        env={**os.environ, "PYTHONPATH": ROOT},
        reactor=reactor,
    )
    assert code == 0, err.decode()
    assert b"sent mail.eml" in out
    assert logins == [("PLAIN", b"youraccount@gmail.com", b"yourpassword")]
    [(sender, recipients, content, _)] = server.handler.messages
    assert (sender, recipients) == ("youraccount@gmail.com", ["recipientName@domain.com"])
    assert content.endswith(b"Content-Transfer-Encoding: 7bit\r\n\r\nMailbody text\r\n")


@pytest_twisted.ensureDeferred
async def test_referenceExampleReportsARefusedLogin(aiosmtpdServer, certificateAuthority):  # noqa: F811
    server = aiosmtpdServer(ssl_context=serverContext(certificateAuthority.localhost))
    out, err, code = await getProcessOutputAndValue(
        sys.executable,
        [EXAMPLE, "localhost", str(server.port), "--ca-file", certificateAuthority.certFile],
        env={**os.environ, "PYTHONPATH": ROOT},
        reactor=reactor,
    )
    assert code == 1 and b"refused the username or password" in err
    assert server.handler.messages == []

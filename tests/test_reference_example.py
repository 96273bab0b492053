"""
The reference's client example (``examples/reference_example.py``) runs as
written, in a program of its own, against a local server that looks like the
reference's: implicit TLS, AUTH, the reference's account and password.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest_twisted
from aiosmtpd.smtp import AuthResult
from test_client_interop import aiosmtpdServer, serverContext  # noqa: F401  (a fixture)
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "reference_example.py")


def runExample(port: int, certificateAuthority) -> Deferred:
    """
    The example as a program of its own, bounded: killed after 60 s, and
    the wait for it failed after 90.  Fires with (stdout, stderr, status).
    """
    run = deferToThread(
        subprocess.run,
        [sys.executable, EXAMPLE, "localhost", str(port), "--ca-file", certificateAuthority.certFile],
        env={**os.environ, "PYTHONPATH": ROOT},
        capture_output=True,
        timeout=60,
    )
    return run.addCallback(lambda done: (done.stdout, done.stderr, done.returncode)).addTimeout(90, reactor)


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
    out, err, code = await runExample(server.port, certificateAuthority)
    assert code == 0, err.decode()
    assert b"sent mail.eml" in out
    assert logins == [("PLAIN", b"youraccount@gmail.com", b"yourpassword")]
    [(sender, recipients, content, _)] = server.handler.messages
    assert (sender, recipients) == ("youraccount@gmail.com", ["recipientName@domain.com"])
    assert content.endswith(b"Content-Transfer-Encoding: 7bit\r\n\r\nMailbody text\r\n")


@pytest_twisted.ensureDeferred
async def test_referenceExampleReportsARefusedLogin(aiosmtpdServer, certificateAuthority):  # noqa: F811
    server = aiosmtpdServer(ssl_context=serverContext(certificateAuthority.localhost))
    out, err, code = await runExample(server.port, certificateAuthority)
    assert code == 1 and b"refused the username or password" in err
    assert server.handler.messages == []

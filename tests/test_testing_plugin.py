"""
The pytest plugin as a user's project meets it: a test file written into a
fresh folder, run by a separate pytest (pytester's subprocess run) with the
plugin loaded as its entry point loads it.

The entry point itself (installed, no C{-p}) is run in
test_packaging.py; here the plugin is named with C{-p}, after blocking the
entry point's name so that an install of this package in the test
environment cannot register it twice.
"""

from __future__ import annotations

import configparser
import os
import subprocess
import sys

import pytest

pytest_plugins = ["pytester"]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: The plugin as the entry point would load it, and a plain project's
#: runner: no pytest-twisted.
PLUGIN = ("-p", "no:infsmtp", "-p", "infsmtp.testing.pytest_plugin", "-p", "no:cacheprovider")
PLAIN = (*PLUGIN, "-p", "no:twisted")

#: Bound on each pytest run (seconds).
BOUND = 120


@pytest.fixture
def project(pytester, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", REPO)
    return pytester


def run(project, *args):
    return project.runpytest_subprocess(*args, timeout=BOUND)


def test_signup_passes_and_a_wrong_subject_fails(project):
    """
    Issue 13's "done when", in a project without pytest-twisted.
    """
    project.makepyfile(
        test_signup="""
        import smtplib
        from email.message import EmailMessage

        def signup(address, host, port):
            message = EmailMessage()
            message["From"] = "app@example.org"
            message["To"] = address
            message["Subject"] = "Welcome"
            message.set_content("Hello.")
            with smtplib.SMTP(host, port) as client:
                client.send_message(message)

        def test_signup(smtpd):
            signup("alice@example.net", smtpd.host, smtpd.port)
            assert smtpd.messages[0]["Subject"] == "Welcome"
            assert smtpd.messages[0].rcptTo == ["alice@example.net"]

        def test_wrong_subject(smtpd):
            signup("alice@example.net", smtpd.host, smtpd.port)
            assert smtpd.messages[0]["Subject"] == "Goodbye"

        def test_each_test_has_its_own_server(smtpd):
            assert smtpd.messages == []
        """
    )
    result = run(project, *PLAIN)
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(["*assert 'Welcome' == 'Goodbye'*", "FAILED test_signup.py::test_wrong_subject*"])


def test_synchronous_options_faults_and_waitfor(project):
    project.makepyfile(
        test_options="""
        import smtplib, threading
        import pytest

        MESSAGE = b"Subject: hi\\r\\n\\r\\nbody\\r\\n"

        @pytest.mark.smtpd(tls="starttls", users={"app": "secret"}, requireAuth=True)
        def test_starttls_and_auth(smtpd):
            with smtplib.SMTP(smtpd.host, smtpd.port, timeout=10) as client:
                client.starttls(context=smtpd.sslContext())
                client.login("app", "secret")
                client.sendmail("a@example.org", ["b@example.net"], MESSAGE)
            assert smtpd.messages[0].user == "app"
            assert smtpd.messages[0].tls.startswith("TLSv1.")

        @pytest.mark.smtpd(tls="implicit")
        def test_implicit_tls(smtpd):
            with smtplib.SMTP_SSL(smtpd.host, smtpd.port, context=smtpd.sslContext(), timeout=10) as client:
                client.sendmail("a@example.org", ["b@example.net"], MESSAGE)
            assert smtpd.messages[0].tls.startswith("TLSv1.")

        def test_fail_then_retry(smtpd):
            smtpd.fail("RCPT", "b@example.net", 450, times=1)
            with smtplib.SMTP(smtpd.host, smtpd.port, timeout=10) as client:
                with pytest.raises(smtplib.SMTPRecipientsRefused):
                    client.sendmail("a@example.org", ["b@example.net"], MESSAGE)
                client.sendmail("a@example.org", ["b@example.net"], MESSAGE)
            assert len(smtpd.messages) == 1

        def test_waitfor_blocks_for_a_background_send(smtpd):
            def send():
                with smtplib.SMTP(smtpd.host, smtpd.port, timeout=10) as client:
                    client.sendmail("a@example.org", ["b@example.net"], MESSAGE)
            threading.Thread(target=send).start()
            [message] = smtpd.waitFor(1, timeout=10)
            assert message["Subject"] == "hi"
        """
    )
    result = run(project, *PLAIN, "-v")
    result.assert_outcomes(passed=4)


def test_under_pytest_twisted_an_async_test_works_and_a_sync_one_is_told_why_not(project):
    project.makepyfile(
        test_twisted="""
        import pytest_twisted
        from infsmtp import AsyncClient

        @pytest_twisted.ensureDeferred
        async def test_async(smtpd):
            client = AsyncClient(host=smtpd.host, port=smtpd.port)
            await client.connect()
            await client.sendmail("a@example.org", ["b@example.net"], b"Subject: async\\r\\n\\r\\nx\\r\\n")
            await client.disconnect()
            [message] = await smtpd.waitFor(1)
            assert message["Subject"] == "async"

        def test_sync(smtpd):
            import smtplib
            smtplib.SMTP(smtpd.host, smtpd.port, timeout=3)  # would hang: never reached
        """
    )
    result = run(project, *PLUGIN)
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*pytest-twisted runs this test inside the reactor*-p no:twisted*"])


def test_asyncio_reactor_under_pytest_twisted(project):
    """
    Loading the plugin installs no reactor: pytest-twisted can still
    install the one asked for.
    """
    project.makepyfile(
        test_asyncio="""
        import pytest_twisted, smtplib
        from twisted.internet import reactor
        from twisted.internet.threads import deferToThread

        @pytest_twisted.ensureDeferred
        async def test_asyncio(smtpd):
            assert type(reactor).__name__ == "AsyncioSelectorReactor"
            await deferToThread(lambda: smtplib.SMTP(smtpd.host, smtpd.port, timeout=10).sendmail(
                "a@example.org", ["b@example.net"], b"Subject: on asyncio\\r\\n\\r\\nx\\r\\n"))
            assert smtpd.messages[0]["Subject"] == "on asyncio"
        """
    )
    run(project, *PLUGIN, "--reactor=asyncio").assert_outcomes(passed=1)


def test_the_plugin_does_nothing_until_asked(project):
    project.makepyfile(
        test_quiet="""
        import sys

        def test_no_twisted_no_crochet():
            assert "twisted.internet.reactor" not in sys.modules
            assert not any(name.startswith("crochet") for name in sys.modules)
        """
    )
    run(project, *PLAIN).assert_outcomes(passed=1)
    imported = subprocess.run(
        [sys.executable, "-c", "import sys, infsmtp.testing.pytest_plugin; print(sorted(m for m in sys.modules if m.startswith(('twisted', 'crochet', 'cryptography'))))"],
        cwd=REPO, capture_output=True, text=True, timeout=BOUND, check=True,
    )
    assert imported.stdout.strip() == "[]"


def test_marker_takes_keywords_only(project):
    project.makepyfile(
        test_marker="""
        import pytest

        @pytest.mark.smtpd("starttls")
        def test_positional(smtpd):
            pass
        """
    )
    result = run(project, *PLAIN)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*@pytest.mark.smtpd takes keyword options only*"])


def test_the_entry_point_is_declared():
    config = configparser.ConfigParser()
    config.read(os.path.join(REPO, "setup.cfg"))
    points = config["options.entry_points"]["pytest11"].split("\n")
    assert [p.strip() for p in points if p.strip()] == ["infsmtp = infsmtp.testing.pytest_plugin"]


def test_marker_is_registered(project):
    result = run(project, *PLAIN, "--markers")
    result.stdout.fnmatch_lines(["@pytest.mark.smtpd(**options): options of the smtpd fixture*"])

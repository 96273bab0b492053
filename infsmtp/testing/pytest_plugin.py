"""
The pytest plugin of infsmtp's testing kit: the C{smtpd} fixture.

Installed with the package as the C{infsmtp} plugin (a C{pytest11} entry
point), so a test only names the fixture::

    def test_signup(smtpd):
        signup("alice@example.org", smtpHost=smtpd.host, smtpPort=smtpd.port)
        assert smtpd.messages[0]["Subject"] == "Welcome"

C{smtpd} is a L{RecordingServer} listening on an ephemeral 127.0.0.1 port,
started before the test and stopped after it.  Its options come from the
C{smtpd} marker::

    @pytest.mark.smtpd(tls="starttls", users={"app": "secret"}, maxMessageSize=1024)
    def test_login(smtpd): ...

Which thread runs the server follows the test runner:

- plain pytest: the reactor runs in a background thread (crochet), so a
  synchronous test may use any blocking client (C{smtplib}, Django's or
  Flask's mail backends), and C{smtpd.waitFor()} blocks;
- under pytest-twisted (installed and not disabled with C{-p no:twisted}):
  the server runs in pytest-twisted's reactor, which also runs the test,
  so the test must be asynchronous (C{@pytest_twisted.ensureDeferred
  async def}, or C{@pytest_twisted.inlineCallbacks}); it sends with
  L{infsmtp.AsyncClient} or runs blocking code in a thread
  (C{deferToThread}), and C{await smtpd.waitFor()}.  A synchronous test
  there fails at once with an explanation, rather than hang.

This module imports nothing from Twisted until a test asks for C{smtpd}:
pytest loads it in every project that has infsmtp installed.
"""

from __future__ import annotations

import inspect
from typing import Any, Iterator

import pytest

#: The names pytest-twisted registers under (its entry point, or -p).
_PYTEST_TWISTED = ("twisted", "pytest_twisted")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "smtpd(**options): options of the smtpd fixture's RecordingServer "
        "(tls='starttls'|'implicit', users={name: password}, requireAuth, maxMessageSize, "
        "and any infsmtp.Server keyword)",
    )


def _underPytestTwisted(config: pytest.Config) -> bool:
    return any(config.pluginmanager.has_plugin(name) for name in _PYTEST_TWISTED)


def _isAsynchronousTest(function: Any) -> bool:
    """
    Whether pytest-twisted runs C{function} as an asynchronous test (it
    marks those it wraps), or it is a coroutine function.
    """
    import pytest_twisted

    markName = getattr(pytest_twisted, "_mark_attribute_name", "_pytest_twisted_mark")
    seen = function
    while seen is not None:
        if inspect.iscoroutinefunction(seen) or getattr(seen, markName, None) in ("async_test", "inline_callbacks_test"):
            return True
        seen = getattr(seen, "__wrapped__", None)
    return False


SYNCHRONOUS_UNDER_PYTEST_TWISTED = (
    "smtpd: pytest-twisted runs this test inside the reactor that also runs the SMTP server, "
    "so a blocking client (smtplib, a Django or Flask mail backend) would wait forever. "
    "Either make the test asynchronous (@pytest_twisted.ensureDeferred async def, sending with "
    "infsmtp.AsyncClient or deferToThread, and await smtpd.waitFor(...)), "
    "or run pytest with -p no:twisted to use smtpd from plain synchronous tests."
)


@pytest.fixture
def smtpd(request: pytest.FixtureRequest) -> Iterator[Any]:
    """
    A running L{infsmtp.testing.RecordingServer}: C{.host}, C{.port},
    C{.messages}, C{.clear()}, C{.waitFor()}, the faults (C{.fail()},
    C{.failAfter()}, C{.delay()}, C{.disconnectDuring()}), C{.caFile}.
    Configured with C{@pytest.mark.smtpd(...)}.
    """
    from ._recording import RecordingServer

    marker = request.node.get_closest_marker("smtpd")
    if marker is not None and marker.args:
        raise TypeError(f"@pytest.mark.smtpd takes keyword options only, not {marker.args!r}")
    server = RecordingServer(**(marker.kwargs if marker is not None else {}))
    if _underPytestTwisted(request.config):
        if not _isAsynchronousTest(request.function):
            pytest.fail(SYNCHRONOUS_UNDER_PYTEST_TWISTED, pytrace=False)
        import pytest_twisted

        pytest_twisted.blockon(server.startListening())
        try:
            yield server
        finally:
            pytest_twisted.blockon(server.stopListening())
    else:
        server.start()
        try:
            yield server
        finally:
            server.stop()

"""
The test process runs the reactor under pytest-twisted (in the main thread),
so crochet must not start its own: the blocking APIs are exercised from
worker threads (deferToThread) or in subprocesses.  Every asynchronous
test is bounded as a whole (see L{ASYNC_TEST_BOUND}).
"""

import functools

import crochet
import pytest
import pytest_twisted
from twisted.internet import defer

from infsmtp.testing import CertificateAuthority

crochet.no_setup()


@pytest.fixture(scope="session")
def certificateAuthority(tmp_path_factory):
    """
    A throwaway CA with a certificate for localhost / 127.0.0.1.
    """
    authority = CertificateAuthority.create(str(tmp_path_factory.mktemp("ca")))
    authority.localhost = authority.issue("localhost", "127.0.0.1")
    return authority


# Every wait bounded ------------------------------------------------------------

#: The bound on a whole asynchronous test (seconds), unless it carries
#: C{@pytest.mark.bound(N)}.  Each wait inside has its own, shorter bound
#: where the test gives one (C{addTimeout}); this one catches the rest.  It
#: runs on the reactor, so the test fails with a message and the run goes
#: on.  A test that blocks the reactor itself, or any other test that
#: hangs, is stopped by pytest-timeout (C{timeout} in setup.cfg, longer),
#: which ends the run with every thread's stack.
ASYNC_TEST_BOUND = 90.0


#: Where pytest-twisted marks an C{@ensureDeferred} test (not public: should
#: it move, every test is collected with this error, not silently unbounded).
_MARK = getattr(pytest_twisted, "_mark_attribute_name", None)
if _MARK is None or getattr(pytest_twisted.ensureDeferred(lambda: None), _MARK, None) != "async_test":
    raise ImportError("pytest-twisted no longer marks async tests as tests/conftest.py expects: update the bound")


def _bounded(test, seconds: float):
    """
    C{test} (an C{async def} test), cancelled with C{TimeoutError} after
    C{seconds}: a hang fails the test instead of the run.
    """

    @functools.wraps(test)
    def run(**kwargs):
        from twisted.internet import reactor

        return defer.ensureDeferred(test(**kwargs)).addTimeout(seconds, reactor)

    # pytest-twisted waits on what an unmarked test returns.
    del run.__dict__[_MARK]
    return run


def pytest_configure(config):
    config.addinivalue_line("markers", "bound(seconds): the bound on this asynchronous test, instead of ASYNC_TEST_BOUND")
    # The testing kit's plugin (the smtpd fixture), as the package's pytest11
    # entry point registers it once installed: from this checkout, unless an
    # install already did (registering the module twice is an error).
    import infsmtp.testing.pytest_plugin as kit

    if not config.pluginmanager.is_registered(kit):
        config.pluginmanager.register(kit, "infsmtp")


def pytest_collection_modifyitems(items):
    for item in items:
        test = getattr(item, "obj", None)
        if getattr(test, _MARK, None) != "async_test" or hasattr(test, "hypothesis"):
            continue
        marker = item.get_closest_marker("bound")
        seconds = marker.args[0] if marker and marker.args else ASYNC_TEST_BOUND
        item.obj = _bounded(test, seconds)


@pytest.fixture
def logEvents():
    """
    Every log event (C{twisted.logger}) emitted during the test, in order.
    """
    from twisted.logger import globalLogPublisher

    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)

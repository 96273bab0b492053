"""
The test process runs the reactor under pytest-twisted (in the main thread),
so crochet must not start its own: the blocking APIs are exercised from
worker threads (deferToThread) or in subprocesses.
"""

import crochet
import pytest

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


def requireTool(path: str) -> str:
    """
    The path of an external peer (swaks, smtp-source, ...).  Missing, the
    test is skipped on a developer's machine but fails in CI, where
    .ci/run installs every peer: a green CI never hides a missing peer.
    """
    import os
    import shutil

    found = shutil.which(path) or (path if os.access(path, os.X_OK) else None)
    if found:
        return found
    message = f"{path} is not installed (apt-get install swaks postfix curl openssl)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)

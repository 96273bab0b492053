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


"""
The twistd plugin is found after ``pip install .`` and after
``pip install -e .``, without shadowing Twisted's own package; so is the
pytest plugin (a project's test names the smtpd fixture, nothing more).

Each install goes into a bare venv that borrows this test environment's
dependencies (twisted, crochet, ...) through a ``.pth`` line: paths listed
there are not scanned for further ``.pth`` files, so this checkout's own
editable install stays out, and nothing is fetched from the network.
"""

from __future__ import annotations

import os
import site
import subprocess
import sys
import sysconfig

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bareVenv(path) -> tuple[str, str]:
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, timeout=60)
    python = os.path.join(str(path), "bin", "python")
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True, timeout=60,
    ).stdout.strip()
    ours = [p for p in site.getsitepackages() + [sysconfig.get_paths()["purelib"]] if os.path.isdir(p)]
    with open(os.path.join(purelib, "borrowed-dependencies.pth"), "w") as f:
        f.write("\n".join(dict.fromkeys(ours)) + "\n")
    return python, purelib


def pipInstall(python: str, purelib: str, editable: bool) -> None:
    target = ["-e", REPO] if editable else [REPO]
    # The test environment's pip, installing into the bare venv.
    subprocess.run(
        # --ignore-installed: otherwise pip uninstalls the test environment's
        # own infsmtp before installing into the bare venv.
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
         "--no-index", "--ignore-installed", "--prefix", os.path.dirname(os.path.dirname(os.path.dirname(purelib))), *target],
        check=True, timeout=300, cwd=os.path.dirname(REPO),
    )


def installedHere() -> str:
    """
    Where the test environment imports infsmtp from, asked from a neutral
    folder (the checkout itself, on this process's path, would hide a
    missing install).
    """
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(
        [sys.executable, "-c", "import infsmtp; print(infsmtp.__file__)"],
        cwd=os.path.dirname(sys.executable), env=env, capture_output=True, text=True, timeout=60,
    ).stdout.strip()


@pytest.mark.parametrize("editable", [False, True], ids=["install", "editable"])
def test_twistd_lists_the_plugin(tmp_path, editable):
    before = installedHere()
    python, purelib = bareVenv(tmp_path / "venv")
    pipInstall(python, purelib, editable)
    assert installedHere() == before  # the test environment is left alone
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    listing = subprocess.run(
        [python, "-c", "from twisted.scripts.twistd import run; run()", "--help"],
        cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120,
    )
    assert "infsmtp" in listing.stdout, listing.stdout + listing.stderr
    assert "web" in listing.stdout  # Twisted's own plugins are still there
    where = subprocess.run(
        [python, "-c", "import twisted, infsmtp; print(twisted.__file__); print(infsmtp.__file__)"],
        cwd=elsewhere, env=env, capture_output=True, text=True, timeout=60, check=True,
    ).stdout.split()
    # Twisted is not shadowed by the checkout's twisted/plugins folder.
    assert not where[0].startswith(os.path.join(REPO, "twisted") + os.sep)
    assert where[1].startswith(os.path.join(REPO, "infsmtp") + os.sep) == editable
    # The pytest11 entry point: a fresh project's test gets smtpd by name
    # (without pytest-twisted, as such a project has it).
    (elsewhere / "test_signup.py").write_text(SIGNUP_TEST)
    tested = subprocess.run(
        [python, "-m", "pytest", "-q", "-p", "no:twisted", "-p", "no:cacheprovider", "test_signup.py"],
        cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120,
    )
    assert tested.returncode == 0 and "1 passed" in tested.stdout, tested.stdout + tested.stderr


SIGNUP_TEST = """
import smtplib


def test_signup(smtpd):
    with smtplib.SMTP(smtpd.host, smtpd.port, timeout=10) as client:
        client.sendmail("app@example.org", ["alice@example.net"], b"Subject: Welcome\\r\\n\\r\\nHello.\\r\\n")
    assert smtpd.messages[0]["Subject"] == "Welcome"
"""

"""
docs/TESTING-KIT.rst's examples, run as the files they are named after
(``.. example: NAME`` before each code block): the synchronous pytest ones
in a project without pytest-twisted, the pytest-twisted one with it, the
trial one with trial.  The harness's and the recording server's docstring
examples run too.
"""

from __future__ import annotations

import doctest
import os
import re
import subprocess
import sys
import textwrap

import pytest

pytest_plugins = ["pytester"]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(REPO, "docs", "TESTING-KIT.rst")
PLUGIN = ("-p", "no:infsmtp", "-p", "infsmtp.testing.pytest_plugin", "-p", "no:cacheprovider")
BOUND = 120

_EXAMPLE = re.compile(r"^\.\. example: (\S+)\n\n\.\. code-block:: python\n\n((?:    .*\n|\n)+)", re.M)


def examples() -> dict[str, str]:
    with open(DOC, encoding="utf-8") as f:
        text = f.read()
    return {name: textwrap.dedent(code) for name, code in _EXAMPLE.findall(text)}


def test_the_page_has_the_examples_the_issue_asks_for():
    assert sorted(examples()) == ["test_backend.py", "test_policy.py", "test_signup.py", "test_twisted.py"]


@pytest.fixture
def project(pytester, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", REPO)
    return pytester


@pytest.mark.parametrize("name, passed", [("test_signup.py", 1), ("test_backend.py", 3)])
def test_synchronous_examples(project, name, passed):
    project.makepyfile(**{name[:-3]: examples()[name]})
    result = project.runpytest_subprocess(*PLUGIN, "-p", "no:twisted", timeout=BOUND)
    result.assert_outcomes(passed=passed)


def test_pytest_twisted_example(project):
    project.makepyfile(test_twisted=examples()["test_twisted.py"])
    project.runpytest_subprocess(*PLUGIN, timeout=BOUND).assert_outcomes(passed=1)


def test_trial_example(tmp_path):
    (tmp_path / "test_policy.py").write_text(examples()["test_policy.py"])
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + str(tmp_path))
    result = subprocess.run(
        [sys.executable, "-m", "twisted.trial", "test_policy"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=BOUND,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Ran 3 tests" in result.stdout and "PASSED (successes=3)" in result.stdout


def test_docstring_examples():
    from infsmtp.testing import _harness

    assert doctest.testmod(_harness).failed == 0
    assert doctest.testmod(_harness).attempted >= 8

"""
The package's layout holds (docs: LAYOUT.md): the server and the client
stand side by side and never import each other or the daemon; the floor
(infsmtp's top-level private modules) imports none of them.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "infsmtp"

#: Room -> the rooms it must not import.
FORBIDDEN = {
    "_server": {"_client", "_daemon", "testing"},
    "_client": {"_server", "_daemon", "testing"},
    "floor": {"_server", "_client", "_daemon", "testing"},
}


def room(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE).parts
    if len(parts) == 1:
        return "floor" if parts[0] not in ("__init__.py", "__main__.py") else "top"
    return parts[0]


def importedRooms(path: pathlib.Path) -> set[str]:
    """
    The rooms of infsmtp that the module at ``path`` imports, lazily or not.
    """
    here = path.relative_to(PACKAGE).parts[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(here[: len(here) - (node.level - 1)])
                target = base + (node.module.split(".") if node.module else [])
            elif node.module and node.module.split(".")[0] == "infsmtp":
                target = node.module.split(".")[1:]
            else:
                continue
            if target:
                found.add(target[0])
            else:
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "infsmtp" and len(parts) > 1:
                    found.add(parts[1])
    return found


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if room(p) in FORBIDDEN)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_noArrowRunsUpwardOrSideways(path):
    assert not importedRooms(path) & FORBIDDEN[room(path)]


def test_theCheckSeesArrows():
    # The check itself sees relative imports across rooms (the daemon's
    # relay stands on both) and to the floor (the client's TLS on _pem).
    assert importedRooms(PACKAGE / "_daemon" / "relay.py") >= {"_client", "_server"}
    assert "_pem" in importedRooms(PACKAGE / "_client" / "tls.py")

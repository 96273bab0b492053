"""
Public names imported on first use (PEP 562), for C{infsmtp} and
C{infsmtp.testing}: importing either imports no Twisted module, so it
installs no reactor (pytest imports the testing plugin at startup, before
pytest-twisted or the program chooses one).
"""

from __future__ import annotations

import importlib
from typing import Any, Callable


def lazyNames(package: str, public: dict[str, str], namespace: dict[str, Any]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """
    The C{__getattr__} and C{__dir__} of C{package} whose names (C{public}:
    name -> the module, relative to the package, defining it) are imported
    on first use and then kept in C{namespace} (the package's globals), so
    that later lookups do not come here.
    """

    def __getattr__(name: str) -> Any:
        module = public.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{module}", package), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(public))

    return __getattr__, __dir__

"""Lazy package namespaces (PEP 562): ``import tttlm`` (and the command line's ``--help``)
without importing torch.

A package lists its public names and the modules that define them; a name's module is imported
the first time the name is looked up (``tttlm.TTTConfig``, ``from tttlm import TTTConfig``).
Each package also imports the same names under ``if TYPE_CHECKING:`` so that type checkers and
IDEs see them.
"""

from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Callable, Mapping
from typing import Any


class _LazyPackage(types.ModuleType):
    """A package whose public names may share their module's name (``tttlm.data.prepare`` the
    function, from ``tttlm.data.prepare`` the module): when the import system binds such a
    submodule on the package, the function is bound instead, as an eager
    ``from .prepare import prepare`` in ``__init__`` would have left it."""

    def __setattr__(self, name: str, value: Any) -> None:
        exports = self.__dict__.get("_lazy_exports", {})
        if (isinstance(value, types.ModuleType) and exports.get(name) == value.__name__
                and value.__name__ == f"{self.__name__}.{name}" and hasattr(value, name)):
            value = getattr(value, name)
        super().__setattr__(name, value)


def lazy_exports(package: str, exports: Mapping[str, str]
                 ) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for PACKAGE, whose public name ``n`` lives in module
    ``exports[n]``. Use as ``__getattr__, __dir__ = lazy_exports(__name__, {...})``."""
    module = sys.modules[package]
    table = dict(exports)
    module.__dict__["_lazy_exports"] = table
    module.__class__ = _LazyPackage

    def __getattr__(name: str) -> Any:
        where = table.get(name)
        if where is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(where), name)
        module.__dict__[name] = value  # looked up once
        return value

    def __dir__() -> list[str]:
        return sorted({*module.__dict__, *table})

    return __getattr__, __dir__

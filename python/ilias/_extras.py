"""Optional dependencies: imported where used, or an ImportError that names the extra installing them."""

from __future__ import annotations

import importlib


def require(module: str, purpose: str, extra: str, what: str | None = None):
    """`module`, imported; if it is missing, `{purpose} needs {what}: pip install 'ilias-core[{extra}]'`."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"{purpose} needs {what or module}: pip install 'ilias-core[{extra}]'") from None

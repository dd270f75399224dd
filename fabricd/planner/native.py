"""The planner's hot loops in C (``_native.c``), when they were built.

``module`` is the extension module, or None: then ``fabricd.planner.balance`` runs its numpy
definitions. Both give the same plans, bit for bit (``tests/unit/test_planner_native.py``), so
daemons with and without it agree on every step; the C loops are several times faster at DP
sizes in the thousands. pip builds the module with the package where a C compiler is found
(``setup.py``; optional, so an install without one still succeeds). ``FABRICD_NATIVE=0`` in the
environment turns it off.
"""

from __future__ import annotations

import os
from types import ModuleType

__all__ = ["ENV", "module", "describe"]

ENV = "FABRICD_NATIVE"


def _load() -> tuple[ModuleType | None, str]:
    if os.environ.get(ENV, "").strip() == "0":
        return None, f"numpy ({ENV}=0)"
    try:
        from fabricd.planner import _native
    except ImportError as e:
        return None, f"numpy (the C loops are not built: {e}; reinstall fabricd where a C compiler is found)"
    return _native, "c"


module, _how = _load()


def describe() -> str:
    """How the planner's hot loops run: ``"c"``, or ``"numpy (why)"``."""
    return "c" if module is not None else (_how if _how != "c" else "numpy")

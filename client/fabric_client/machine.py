"""Which machine a process runs on, as the fabric compares trainers and data constructors.

A constructor sends a batch uncompressed to a trainer on its own machine (``compression =
"auto"``): between two processes of one kernel the bytes only cross memory, and compressing
them costs CPU on both sides for nothing. Two processes are on one machine when they share a
kernel boot (``/proc/sys/kernel/random/boot_id``; containers of one host do too); where that
file is missing, the host name stands in. An unknown identity (``""``, an older trainer)
counts as another machine: compression is the safe side.
"""

from __future__ import annotations

import functools
import socket
from pathlib import Path

from .limits import MAX_NAME_CHARS

__all__ = ["machine_id"]

_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


@functools.cache
def machine_id() -> str:
    """This machine's identity: ``boot:<kernel boot id>``, else ``host:<host name>``."""
    try:
        boot = _BOOT_ID.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        boot = ""
    ident = f"boot:{boot}" if boot else f"host:{socket.gethostname()}"
    return ident[:MAX_NAME_CHARS]

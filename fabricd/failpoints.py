"""Named crash points for chaos tests.

Code that must survive a crash at an exact instant calls ``failpoint("some.name")`` there. The
call is a no-op (one dict lookup) unless the environment variable ``FABRICD_FAILPOINTS``, read
once at import, names that point. Its value is a comma-separated list of ``name=action[@n]``:

- ``log.after_fsync=kill``     SIGKILL this process (no cleanup, no atexit: a real crash)
- ``log.after_fsync=raise``    raise :class:`FailpointHit` (for unit tests in one process)
- ``log.after_fsync=kill@3``   the same, but only from the 3rd time the point is reached on
- ``loader.before_load=sleep(50)``  sleep 50 ms there (a slow disk or object store, simulated)
- ``loader.transient_error=fail@5``  the 5th hit only fails (once); see :func:`fails`
- ``loader.transient_error=fail(web:17*2)``  the first 2 hits whose subject is ``web:17`` fail

Without ``@n`` the action fires on every hit (``@1``); ``fail`` fires once, at hit ``n``, and
``fail(SUBJECT[*TIMES])`` the first TIMES (default 1) times the caller names that subject (``@n``
is refused with it). ``fail`` is for points the caller asks with :func:`fails` ("should this
operation fail now?"), never with :func:`failpoint`. An invalid value is refused at import
with the bad entry quoted, so a typo cannot silently disable a chaos test.

Tests in one process use :func:`configure` instead of the environment. Role processes do not
inherit the daemon's ``FABRICD_FAILPOINTS``; ``FABRICD_ROLE_FAILPOINTS`` in the daemon's
environment is every role process's ``FABRICD_FAILPOINTS`` instead (restarts included, so it
suits ``sleep``; a ``kill`` there would crash every restart again).

A running process arms failpoints without a restart when ``FABRICD_FAILPOINTS_FILE`` names a
file: on SIGUSR1 it replaces its failpoints with that file's contents (same syntax; an empty
file disarms them). Daemons and role processes install the handler at start
(:func:`arm_on_signal`), so a chaos test can make one serving constructor crash at its next
sends. Only that process is armed: the supervisor restarts it clean.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import time

__all__ = ["ENV_VAR", "FILE_ENV", "ROLE_ENV", "ACTIONS", "POINTS", "arm_on_signal", "FailpointError", "FailpointHit",
           "active", "configure", "failpoint", "fails", "hits"]

log = logging.getLogger(__name__)

ENV_VAR = "FABRICD_FAILPOINTS"
FILE_ENV = "FABRICD_FAILPOINTS_FILE"
ROLE_ENV = "FABRICD_ROLE_FAILPOINTS"
ACTIONS = ("kill", "raise", "sleep(MS)", "fail", "fail(SUBJECT[*TIMES])")
_SLEEP = re.compile(r"sleep\((\d{1,6})\)")
_FAIL = re.compile(r"fail\(([^,*()]{1,300})(?:\*(\d{1,6}))?\)")

#: Every failpoint in the code, with where it is. A name not listed is refused, so a typo
#: cannot silently disarm a chaos test.
POINTS = {
    "log.after_write_before_fsync": "checkpoint log: records written, not yet fsync'd",
    "log.after_fsync": "checkpoint log: records fsync'd, not yet acknowledged or applied",
    "log.snapshot_before_rename": "checkpoint log: snapshot written to its temp file, not yet renamed",
    "delivery.after_send": "constructor: one micro-batch sent to one trainer, the rest of the step "
                           "and the other model-parallel ranks' copies not yet (mid-batch)",
    "loader.before_load": "source loader: a load request received, its samples not yet read",
    "loader.transient_error": "source loader: one unit about to be read (subject SOURCE:SAMPLE_ID); ``fail`` "
                              "makes that read fail like an NFS hiccup or an object store's 503",
}


class FailpointError(ValueError):
    """A failpoint specification that cannot be parsed. Quotes the bad entry."""


class FailpointHit(Exception):
    """Raised by a failpoint whose action is ``raise``."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"failpoint {name!r} hit")


# name -> (action, fire from this hit on, sleep seconds or fail times, fail subject); hit counters
# only for active points (per subject for ``fail(SUBJECT)``).
_ACTIVE: dict[str, tuple[str, int, float, str]] = {}
_SPECS: dict[str, str] = {}
_HITS: dict[str, int] = {}


def _parse(spec: str) -> tuple[dict[str, tuple[str, int, float, str]], dict[str, str]]:
    points: dict[str, tuple[str, int, float, str]] = {}
    texts: dict[str, str] = {}
    for entry in spec.split(","):
        entry = entry.strip()
        if not entry:
            continue
        name, sep, action = entry.partition("=")
        name, action = name.strip(), action.strip()
        if not sep or not name:
            raise FailpointError(f"{ENV_VAR}: entry {entry!r}: expected name=action[@n]")
        if name not in POINTS:
            raise FailpointError(f"{ENV_VAR}: entry {entry!r}: no failpoint named {name!r} "
                                 f"(known: {', '.join(sorted(POINTS))})")
        nth = 1
        if "@" in action:
            action, _, count = action.partition("@")
            try:
                nth = int(count)
            except ValueError:
                raise FailpointError(f"{ENV_VAR}: entry {entry!r}: @{count!r} is not an integer") from None
            if nth < 1:
                raise FailpointError(f"{ENV_VAR}: entry {entry!r}: @{nth} must be >= 1")
        sleep, fail = _SLEEP.fullmatch(action), _FAIL.fullmatch(action)
        if action not in ("kill", "raise", "fail") and not sleep and not fail:
            raise FailpointError(f"{ENV_VAR}: entry {entry!r}: action {action!r} is not one of {ACTIONS}")
        if fail and nth != 1:
            raise FailpointError(f"{ENV_VAR}: entry {entry!r}: fail(SUBJECT) takes no @n")
        if fail:
            times = int(fail.group(2) or 1)
            if times < 1:
                raise FailpointError(f"{ENV_VAR}: entry {entry!r}: *{times} must be >= 1")
            points[name] = ("fail_subject", 1, float(times), fail.group(1).strip())
        elif sleep:
            points[name] = ("sleep", nth, int(sleep.group(1)) / 1000, "")
        else:
            points[name] = (action, nth, 0.0, "")
        texts[name] = action if nth == 1 else f"{action}@{nth}"
    return points, texts


def configure(spec: str | None) -> None:
    """Replace the active failpoints with ``spec`` (same syntax as the environment variable).

    ``None`` or ``""`` disables them all. Hit counters restart from zero.
    """
    points, texts = _parse(spec or "")
    _ACTIVE.clear()
    _ACTIVE.update(points)
    _SPECS.clear()
    _SPECS.update(texts)
    _HITS.clear()
    if points:
        log.warning("failpoints active: %s", ", ".join(f"{k}={v}" for k, v in sorted(texts.items())))


def active() -> dict[str, str]:
    """The active failpoints, ``name -> "action"`` or ``"action@n"``."""
    return dict(_SPECS)


def hits(name: str) -> int:
    """How many times an active failpoint has been reached (0 for an inactive one)."""
    return _HITS.get(name, 0)


def failpoint(name: str) -> None:
    """Crash (or sleep) here if the failpoint ``name`` is active and due; otherwise return at once.

    A ``fail`` action is not for this call (nothing here can fail an operation): it is ignored."""
    point = _ACTIVE.get(name)
    if point is None:
        return
    action, nth, seconds, _ = point
    count = _HITS.get(name, 0) + 1
    _HITS[name] = count
    if count < nth or action in ("fail", "fail_subject"):
        return
    if action == "sleep":
        time.sleep(seconds)
        return
    if action == "kill":
        log.critical("failpoint %s: SIGKILL (hit %d)", name, count)
        os.kill(os.getpid(), signal.SIGKILL)
    raise FailpointHit(name)


def fails(name: str, subject: str = "") -> bool:
    """Whether the operation on ``subject`` at failpoint ``name`` must fail now (the caller fails it).

    False at once for an inactive point. ``fail`` is due at exactly hit ``n``; ``fail(S*k)`` for
    the first ``k`` calls with ``subject == S`` (calls with other subjects are not counted). Any
    other action behaves as in :func:`failpoint` and then answers False.
    """
    point = _ACTIVE.get(name)
    if point is None:
        return False
    action, nth, times, wanted = point
    if action == "fail_subject":
        if subject != wanted:
            return False
        count = _HITS.get(name, 0) + 1
        _HITS[name] = count
        if count <= times:
            log.warning("failpoint %s: %s fails (%d of %d)", name, subject, count, int(times))
            return True
        return False
    if action == "fail":
        count = _HITS.get(name, 0) + 1
        _HITS[name] = count
        if count == nth:
            log.warning("failpoint %s: %s fails (hit %d)", name, subject, count)
        return count == nth
    failpoint(name)
    return False


configure(os.environ.get(ENV_VAR))


def arm_on_signal(sig: int = signal.SIGUSR1) -> bool:
    """Re-read the failpoints from ``$FABRICD_FAILPOINTS_FILE`` whenever ``sig`` arrives.

    Returns False (and installs nothing) when the variable is not set. A file that cannot be
    read or parsed is logged and changes nothing.
    """
    path = os.environ.get(FILE_ENV)
    if not path:
        return False

    def rearm(*_: object) -> None:
        try:
            with open(path, encoding="utf-8") as f:
                configure(f.read().strip())
        except (OSError, FailpointError) as e:
            log.error("failpoints not re-armed from %s: %s", path, e)

    signal.signal(sig, rearm)
    return True

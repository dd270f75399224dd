"""Named crash points: inert unless configured, exact about when they fire."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest

from fabricd import failpoints
from fabricd.failpoints import FailpointError, FailpointHit, active, configure, failpoint, hits

pytestmark = [pytest.mark.unit, pytest.mark.timeout(30)]


@pytest.fixture(autouse=True)
def _reset() -> Iterator[None]:
    configure(None)
    yield
    configure(None)


def test_inactive_failpoint_is_a_no_op() -> None:
    failpoint("log.after_fsync")
    assert active() == {}
    assert hits("log.after_fsync") == 0


def test_raise_fires_on_every_hit() -> None:
    configure("log.after_fsync=raise")
    assert active() == {"log.after_fsync": "raise"}
    for _ in range(3):
        with pytest.raises(FailpointHit) as exc:
            failpoint("log.after_fsync")
        assert exc.value.name == "log.after_fsync"
    failpoint("log.other")  # other names stay inert


def test_at_n_fires_from_the_nth_hit() -> None:
    configure("a=raise@3, b=raise")
    assert active() == {"a": "raise@3", "b": "raise"}
    failpoint("a")
    failpoint("a")
    with pytest.raises(FailpointHit):
        failpoint("a")
    assert hits("a") == 3


@pytest.mark.parametrize("spec", ["a", "=raise", "a=explode", "a=raise@x", "a=raise@0"])
def test_invalid_spec_is_refused_and_quoted(spec: str) -> None:
    with pytest.raises(FailpointError, match="FABRICD_FAILPOINTS"):
        configure(spec)


def test_environment_is_read_at_import_and_kill_is_sigkill() -> None:
    code = ("from fabricd.failpoints import failpoint, active\n"
            "print(active(), flush=True)\n"
            "failpoint('x.y'); print('first', flush=True)\n"
            "failpoint('x.y'); print('second', flush=True)\n")
    env = {**os.environ, failpoints.ENV_VAR: "x.y=kill@2"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=20)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert proc.stdout.splitlines() == ["{'x.y': 'kill@2'}", "first"]

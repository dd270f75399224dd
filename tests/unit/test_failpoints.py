"""Named crash points: inert unless configured, exact about when they fire."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from types import SimpleNamespace

import pytest

from fabricd import failpoints
from fabricd.failpoints import FailpointError, FailpointHit, active, configure, failpoint, fails, hits

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
    failpoint("log.after_write_before_fsync")  # other names stay inert


def test_at_n_fires_from_the_nth_hit() -> None:
    a, b = "delivery.after_send", "log.after_fsync"
    configure(f"{a}=raise@3, {b}=raise")
    assert active() == {a: "raise@3", b: "raise"}
    failpoint(a)
    failpoint(a)
    with pytest.raises(FailpointHit):
        failpoint(a)
    assert hits(a) == 3


@pytest.mark.parametrize("spec", ["log.after_fsync", "=raise", "log.after_fsync=explode", "log.after_fsync=raise@x",
                                  "log.after_fsync=raise@0", "log.after_fsynk=raise"])
def test_invalid_spec_is_refused_and_quoted(spec: str) -> None:
    with pytest.raises(FailpointError, match="FABRICD_FAILPOINTS"):
        configure(spec)


def test_environment_is_read_at_import_and_kill_is_sigkill() -> None:
    code = ("from fabricd.failpoints import failpoint, active\n"
            "print(active(), flush=True)\n"
            "failpoint('log.after_fsync'); print('first', flush=True)\n"
            "failpoint('log.after_fsync'); print('second', flush=True)\n")
    env = {**os.environ, failpoints.ENV_VAR: "log.after_fsync=kill@2"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=20)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert proc.stdout.splitlines() == ["{'log.after_fsync': 'kill@2'}", "first"]


def test_every_failpoint_in_the_code_is_registered_and_every_registered_one_is_in_the_code() -> None:
    import re
    from pathlib import Path

    root = Path(failpoints.__file__).parent
    used = set()
    for path in root.rglob("*.py"):
        if path.name != "failpoints.py":  # its docstring shows the syntax with a made-up name
            used |= set(re.findall(r"(?:failpoint|fails)\(\"([a-z_.]+)\"[,)]", path.read_text()))
    assert used == set(failpoints.POINTS)


def test_sigusr1_arms_a_running_process_from_the_file(tmp_path) -> None:
    armed = tmp_path / "fp"
    code = ("import os, signal, sys\n"
            "from fabricd.failpoints import arm_on_signal, failpoint, active\n"
            "assert arm_on_signal()\n"
            "failpoint('delivery.after_send'); print('unarmed', flush=True)\n"
            "os.kill(os.getpid(), signal.SIGUSR1)\n"
            "print(active(), flush=True)\n"
            "failpoint('delivery.after_send'); print('survived', flush=True)\n")
    armed.write_text("delivery.after_send=kill\n")
    env = {**os.environ, failpoints.FILE_ENV: str(armed)}
    env.pop(failpoints.ENV_VAR, None)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=20)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert proc.stdout.splitlines() == ["unarmed", "{'delivery.after_send': 'kill'}"]


def test_bad_file_changes_nothing_and_no_file_env_installs_nothing(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv(failpoints.FILE_ENV, raising=False)
    assert not failpoints.arm_on_signal()
    armed = tmp_path / "fp"
    armed.write_text("log.after_fsynk=kill")
    monkeypatch.setenv(failpoints.FILE_ENV, str(armed))
    previous = signal.getsignal(signal.SIGUSR1)
    try:
        configure("log.after_fsync=raise")
        assert failpoints.arm_on_signal()
        signal.raise_signal(signal.SIGUSR1)
        assert active() == {"log.after_fsync": "raise"}, "a typo in the file must not disarm anything"
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_sleep_action_waits_and_is_parsed_strictly(monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []
    # record the sleeps instead of timing them (the module's only use of ``time``)
    monkeypatch.setattr(failpoints, "time", SimpleNamespace(sleep=slept.append))
    configure("loader.before_load=sleep(30)@2")
    assert active() == {"loader.before_load": "sleep(30)@2"}
    failpoint("loader.before_load")  # the first hit is before @2: no sleep
    assert slept == []
    failpoint("loader.before_load")
    assert slept == [0.03]
    for bad in ("loader.before_load=sleep(x)", "loader.before_load=sleep()", "loader.before_load=sleep(1234567)"):
        with pytest.raises(FailpointError, match="not one of"):
            configure(bad)


def test_fail_at_n_fails_exactly_the_nth_operation_once() -> None:
    configure("loader.transient_error=fail@3")
    got = [fails("loader.transient_error", f"web:{i}") for i in range(6)]
    assert got == [False, False, True, False, False, False]
    failpoint("loader.transient_error")  # a fail action never raises through failpoint()
    assert not fails("log.after_fsync", "x")  # an inactive point never fails


def test_fail_subject_fails_that_subject_the_given_number_of_times() -> None:
    configure("loader.transient_error=fail(web:17*2)")
    assert active() == {"loader.transient_error": "fail(web:17*2)"}
    seen = [fails("loader.transient_error", s) for s in ("web:16", "web:17", "code:17", "web:17", "web:17")]
    assert seen == [False, True, False, True, False]
    assert hits("loader.transient_error") == 3  # only calls naming the subject count
    configure("loader.transient_error=fail(web:17)")
    assert [fails("loader.transient_error", "web:17") for _ in range(2)] == [True, False]


@pytest.mark.parametrize("spec", ["loader.transient_error=fail(web:1)@2", "loader.transient_error=fail()",
                                  "loader.transient_error=fail(web:1*0)", "loader.transient_error=fail(a*b)"])
def test_bad_fail_specs_are_refused(spec: str) -> None:
    with pytest.raises(FailpointError, match="FABRICD_FAILPOINTS"):
        configure(spec)

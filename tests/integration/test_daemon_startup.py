"""``fabricd run`` on a machine it cannot run on: one line on stderr naming the key, exit 1, no
traceback (port in use, state dir that is a file, term file unreadable or corrupt)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from fabricd.localnode import KEYS_DIR_ENV, ensure_keys

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


def _run(tmp_path: Path, control: str, state_dir: Path) -> subprocess.CompletedProcess:
    keys = ensure_keys(os.environ[KEYS_DIR_ENV], ["a"])
    cfg = tmp_path / "fabricd.toml"
    cfg.write_text(f'[node]\nid = "a"\ncontrol = "{control}"\nstate_dir = "{state_dir}"\n\n'
                   f'[security]\nkeys_dir = "{keys}"\n')
    return subprocess.run([sys.executable, "-m", "fabricd", "run", "--config", str(cfg)], capture_output=True,
                          text=True, timeout=45, stdin=subprocess.DEVNULL)


def _one_line(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_control_port_in_use(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        control = f"tcp://127.0.0.1:{busy.getsockname()[1]}"
        line = _one_line(_run(tmp_path, control, tmp_path / "st"), "node.control", control, "in use")
    assert str(tmp_path / "fabricd.toml") in line


def test_state_dir_is_a_file(tmp_path):
    (tmp_path / "st").write_text("x")
    _one_line(_run(tmp_path, "tcp://127.0.0.1:0", tmp_path / "st"), "node.state_dir", str(tmp_path / "st"))


@pytest.mark.parametrize("kind", ["directory", "corrupt"])
def test_term_file_unreadable_or_corrupt(tmp_path, kind):
    state = tmp_path / "st"
    state.mkdir()
    if kind == "directory":
        (state / "term.json").mkdir()  # unreadable as a file, even for root
    else:
        (state / "term.json").write_text("{not json")
    _one_line(_run(tmp_path, "tcp://127.0.0.1:0", state), "term store", str(state / "term.json"))


def test_missing_keys_are_one_line_naming_the_key_and_how_to_make_it(tmp_path):
    cfg = tmp_path / "fabricd.toml"
    cfg.write_text(f'[node]\nid = "a"\ncontrol = "tcp://127.0.0.1:0"\nstate_dir = "{tmp_path / "st"}"\n\n'
                   f'[security]\nkeys_dir = "{tmp_path / "nokeys"}"\n')
    proc = subprocess.run([sys.executable, "-m", "fabricd", "run", "--config", str(cfg)], capture_output=True,
                          text=True, timeout=45, stdin=subprocess.DEVNULL)
    _one_line(proc, "security.keys_dir", str(tmp_path / "nokeys"), "does not exist", "fabricctl keys generate",
              "insecure = true")


@pytest.mark.parametrize("value", ["0", "many"])
def test_bad_plan_threads_in_the_environment(tmp_path, monkeypatch, value):
    monkeypatch.setenv("FABRICD_PLAN_THREADS", value)
    _one_line(_run(tmp_path, "tcp://127.0.0.1:0", tmp_path / "st"), "cannot start", "FABRICD_PLAN_THREADS",
              repr(value))

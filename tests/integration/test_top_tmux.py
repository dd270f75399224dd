"""``fabricctl top`` in a real terminal: tmux runs it against a real daemon (secure control
socket, operator key) serving a job to a real trainer; the pane must show the leader, the term
and the trainer's step, say "unreachable since" once the daemon is gone (and keep running), show
the daemon again once it is back, and q must end it with status 0.

The tmux server has its own socket (``-L``), so the test neither sees nor disturbs another
server, and it is killed by that socket at the end whatever happened.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fabric_client import Loader

from ..conftest import ROOT, one_source_job
from .test_data_path import submit
from .test_minimal_spec import write_books

TMUX = shutil.which("tmux")

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60),
              pytest.mark.skipif(TMUX is None, reason="tmux is not installed: fabricctl top is tested in a tmux pane")]

WAIT_S = 25.0  # upper bound on any one wait below; never asserted as a speed


@pytest.fixture
def tmux() -> Iterator[Callable[..., str]]:
    """``tmux(*args)``: run a tmux command on a server of this test's own; killed at the end."""
    sock = f"fabricd-top-{os.getpid()}-{uuid.uuid4().hex[:8]}"

    def run(*args: str) -> str:
        out = subprocess.run([TMUX, "-L", sock, *args], capture_output=True, text=True, timeout=10)
        if out.returncode != 0:
            raise RuntimeError(f"tmux {' '.join(args)}: {out.stderr.strip()}")
        return out.stdout

    try:
        yield run
    finally:
        subprocess.run([TMUX, "-L", sock, "kill-server"], capture_output=True, timeout=10)


def wait_for_pane(tmux: Callable[..., str], what: str, cond: Callable[[str], object]) -> str:
    end = time.monotonic() + WAIT_S
    pane = ""
    while time.monotonic() < end:
        try:
            pane = tmux("capture-pane", "-p", "-t", "top")
        except RuntimeError:  # the session ended: top exited
            break
        if cond(pane):
            return pane
        time.sleep(0.2)
    raise AssertionError(f"the pane never showed {what}:\n{pane}")


def settled_step(daemon) -> tuple[dict, int]:
    """The status, and the step of the job's one trainer once its constructor reports it and it
    no longer moves (the trainer stopped consuming: its constructor stops at its credit window)."""
    end = time.monotonic() + WAIT_S
    last = None
    while time.monotonic() < end:
        status = daemon.status()
        (constructor,) = [r for r in status["jobs"]["topjob"]["roles"] if r["kind"] == "constructor"]
        subs = constructor.get("stats", {}).get("subscriptions", [])
        step = subs[0]["next_step"] if subs else None
        if step is not None and step == last:
            return status, step
        last = step
        time.sleep(0.5)
    raise AssertionError(f"the trainer's step did not settle: {last}")


def trainer_step(pane: str, rank: str = "0/0") -> int | None:
    """The step the pane's trainers table shows for ``rank`` (the row: rank, step, wait s, wait %)."""
    m = re.search(rf"(?<![\d/]){re.escape(rank)}\s+(\d+)\s+\d+\.\d\s", pane)
    return int(m.group(1)) if m else None


def test_top_in_tmux_shows_leader_term_and_trainer_step_outlives_a_daemon_restart_and_quits_on_q(
        tmp_path, local_daemon, tmux) -> None:
    write_books(tmp_path / "books", n=24)
    job_file = tmp_path / "job.toml"
    job_file.write_text(one_source_job(tmp_path / "books", name="topjob"))
    submit(local_daemon, job_file)
    loader = Loader(local_daemon.address, job="topjob", dp_rank=0, dp_size=1, max_steps=4, deadline_s=WAIT_S,
                    keys=local_daemon.trainer_keys)
    for _ in loader:  # 4 steps consumed; the loader stays subscribed, so its constructor stops at its window
        pass

    run = TopRun(tmux, tmp_path, "--address", local_daemon.address, "top", "--interval", "0.5",
                 env=local_daemon.client_env())
    try:
        status, step = settled_step(local_daemon)
        assert step >= 4
        pane = wait_for_pane(tmux, f"trainer 0/0 at step {step}", lambda p: trainer_step(p) == step)
        assert f"leader {status['leader']}" in pane and status["leader"] == "test"
        assert re.search(rf"\bterm {status['term']}\b", pane), pane
        assert re.search(r"\bs\s+1/1\s+\d+\s+\d+", pane), pane  # the pool of source "s": its one worker up
    finally:
        loader.close()

    local_daemon.stop()
    pane = wait_for_pane(tmux, "that the daemon is unreachable", lambda p: "unreachable since" in p)
    assert "showing the last answer" in pane and trainer_step(pane) == step
    assert not run.rc_file.exists(), f"top exited when the daemon went away: {run.err_file.read_text()}"
    local_daemon.port = int(local_daemon.address.rsplit(":", 1)[1])  # restarted where top looks for it
    local_daemon.start()
    wait_for_pane(tmux, "the restarted daemon", lambda p: "unreachable" not in p and "leader test" in p)

    tmux("send-keys", "-t", "top", "q")
    run.assert_exited_cleanly()


def test_ctrl_c_ends_top_while_nothing_answers_and_restores_the_terminal(tmp_path, tmux) -> None:
    from fabricd.localnode import free_port

    run = TopRun(tmux, tmp_path, "--address", f"tcp://127.0.0.1:{free_port()}", "--timeout", "0.3", "top",
                 "--interval", "0.3")
    wait_for_pane(tmux, "that nothing answers", lambda p: "unreachable since" in p and "no status yet" in p)
    tmux("send-keys", "-t", "top", "C-c")
    run.assert_exited_cleanly()


class TopRun:
    """``fabricctl ARGS`` in the tmux session ``top`` (160x50), by a script that then records its
    exit status and the terminal's settings (``stty -a``) in files of ``tmp_path``."""

    def __init__(self, tmux: Callable[..., str], tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.tmux = tmux
        self.rc_file, self.err_file, self.stty_file = tmp_path / "top.rc", tmp_path / "top.err", tmp_path / "stty"
        cmd = [sys.executable, "-c", "from fabricd.cli import fabricctl_main; fabricctl_main()", *args]
        env = {**(env or {}), "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "client"),
                                                             os.environ.get("PYTHONPATH", "")])}
        q = lambda p: shlex.quote(str(p))  # noqa: E731
        script = tmp_path / "top.sh"
        # COLUMNS/LINES would override the pane's size for rich (a tmux server started from pytest has 80x24 there)
        # the script itself outlives a Ctrl-C meant for top (a trap is reset to the default in top)
        script.write_text("trap : INT\nunset COLUMNS LINES\n" + "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items())
                          + f"{shlex.join(cmd)} 2>{q(self.err_file)}\necho $? >{q(self.rc_file)}\n"
                          + f"stty -a >{q(self.stty_file)}.part && mv {q(self.stty_file)}.part {q(self.stty_file)}\n")
        tmux("new-session", "-d", "-s", "top", "-x", "160", "-y", "50", f"sh {q(script)}")

    def assert_exited_cleanly(self) -> None:
        """Status 0, no traceback, the terminal back in line mode with echo, the session gone."""
        end = time.monotonic() + WAIT_S
        while not self.stty_file.exists():
            assert time.monotonic() < end, f"top did not exit: {self.err_file.read_text()}"
            time.sleep(0.1)
        err = self.err_file.read_text()
        assert self.rc_file.read_text().strip() == "0" and "Traceback" not in err, err
        modes = self.stty_file.read_text().split()
        assert "icanon" in modes and "echo" in modes, f"the terminal was left in cbreak mode: {modes}"
        while "top" in sessions(self.tmux):
            assert time.monotonic() < end, "the tmux session outlived top"
            time.sleep(0.1)


def sessions(tmux: Callable[..., str]) -> list[str]:
    """The server's session names ([] once its last session ended and it exited)."""
    try:
        return tmux("list-sessions", "-F", "#{session_name}").split()
    except RuntimeError:
        return []


def test_top_once_prints_one_frame_and_fails_when_no_daemon_answers(tmp_path) -> None:
    """``--once`` (for scripts): one frame on stdout; exit status 1 when nothing answered."""
    from fabricd.localnode import free_port

    out = subprocess.run([sys.executable, "-c", "from fabricd.cli import fabricctl_main; fabricctl_main()",
                          "--address", f"tcp://127.0.0.1:{free_port()}", "--timeout", "0.3", "top", "--once",
                          "--interval", "0.1"], capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
                         env={**os.environ, "COLUMNS": "160"})
    assert out.returncode == 1, out.stderr
    assert "unreachable since" in out.stdout and "no status yet" in out.stdout

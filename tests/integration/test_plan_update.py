"""Plan changes through a real daemon: a composed two-source job, consumed for a few steps, gets a
mixture change at a step past its frontier (one at or before the frontier is refused, naming it);
the trainers consume past the change, and every delivered batch equals what ``fabricctl expect
--log`` computes from the spec and the log's change, which differs from the unchanged plan."""

from __future__ import annotations

import collections
import json
import re
import time

import pytest

from fabricd.config import load_job_spec
from fabricd.expect import expected_batches

from ..ranks import receive_ranks
from .test_minimal_spec import books_and_code_spec, fabricctl, write_books

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

SPEC = books_and_code_spec("mix", 5, weights="books = 0.8, code = 0.2",
                           batch='compose = "outliers"\nmax_delay_steps = 3\n')


def wait_progress(daemon, job: str, step: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if daemon.status()["jobs"][job].get("progress_floor", 0) >= step:
            return
        time.sleep(0.2)
    raise AssertionError(f"progress of {job} never reached {step}")


def test_plan_update_changes_the_mix_at_exactly_its_step(tmp_path, local_daemon):
    write_books(tmp_path / "data" / "books", n=120)
    write_books(tmp_path / "data" / "code", n=90)
    job_file = tmp_path / "mix.toml"
    job_file.write_text(SPEC)
    spec = load_job_spec(job_file)
    r = fabricctl(local_daemon.address, "submit", "--wait", "--wait-timeout", "90", str(job_file))
    assert r.returncode == 0, r.stderr + local_daemon.tail()

    first = receive_ranks(local_daemon.address, "mix", 2, 0, 6)
    wait_progress(local_daemon, "mix", 6)

    # too late: the trainers are at step 6 and constructors build prefetch (2) ahead; windows of 4.
    # While the leader still measures them moving (its rate window), the frontier also keeps
    # clear of the steps they could cover before a change is in effect everywhere; once they are
    # seen standing, it settles at 12, and a change past it must be accepted
    deadline = time.monotonic() + 30
    while True:
        refused = fabricctl(local_daemon.address, "plan", "update", "mix", "--at-step", "7", "--set",
                            "mixture.weights.code=0.7")
        assert refused.returncode != 0
        m = re.search(r"step 7 is already planned or delivered; the first step still changeable is (\d+)",
                      refused.stderr)
        assert m, refused.stderr
        frontier = int(m.group(1))
        assert frontier >= 6 + 2 + 1 and frontier % 4 == 0, frontier
        if frontier == 12 or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    bad = fabricctl(local_daemon.address, "plan", "update", "mix", "--at-step", str(frontier + 1), "--set",
                    "mixture.weights.nope=0.5")
    assert bad.returncode != 0 and "mixture.weights.nope = 0.5: not a source of this job" in bad.stderr, bad.stderr

    at = frontier + 1  # inside a window of the old grid: the old segment's last window is cut short
    preview = fabricctl(local_daemon.address, "plan", "show", "mix", "--steps", f"{at}:{at + 4}", "--at-step",
                        str(at), "--set", "mixture.weights.code=0.7", "--json")
    assert preview.returncode == 0, preview.stderr
    rows = [json.loads(x) for x in preview.stdout.splitlines()]
    assert [x["step"] for x in rows] == list(range(at, at + 4))
    assert sum(x["mix"]["code"] for x in rows) / 4 == pytest.approx(0.7, abs=0.05)
    assert all(x["balance"] >= x["bound"] >= 1.0 for x in rows)

    ok = fabricctl(local_daemon.address, "plan", "update", "mix", "--at-step", str(at), "--set",
                   "mixture.weights.code=0.7")
    assert ok.returncode == 0, ok.stderr + local_daemon.tail()
    assert f"in effect from step {at} for every rank" in ok.stderr
    # a second change: a shorter context from a later step (new units for both sources, loaded
    # under the new context by the source loaders)
    at2 = at + 4
    ok2 = fabricctl(local_daemon.address, "plan", "update", "mix", "--at-step", str(at2), "--set",
                    "buckets.default.max_seq_len=256")
    assert ok2.returncode == 0, ok2.stderr + local_daemon.tail()
    status = local_daemon.status()["jobs"]["mix"]
    assert [c["at_step"] for c in status["plan_changes"]] == [at, at2]
    assert status["plan_changes"][0]["origin"].startswith("operator")

    shown = fabricctl(local_daemon.address, "plan", "show", "mix", "--steps", f"{at - 2}:{at + 4}")
    assert shown.returncode == 0, shown.stderr
    assert f"at step {at}: mixture.weights.code = 0.7" in shown.stdout and "total" in shown.stdout

    end = at2 + 5
    second = receive_ranks(local_daemon.address, "mix", 2, 6, end)
    local_daemon.stop()

    from click.testing import CliRunner

    from fabricd.cli import fabricctl_main

    result = CliRunner().invoke(fabricctl_main, ["expect", str(job_file), "--steps", f"0:{end}",
                                                 "--log", str(local_daemon.workdir / "state" / "log")])
    assert result.exit_code == 0, result.output
    want = {(b["step"], b["dp_rank"], b["micro_batch"]): b["checksum"] for b in map(json.loads, result.output.splitlines())}
    got = {**first, **second}
    assert sorted(got) == sorted(want), "lost, repeated or extra batches"
    assert all(got[k][0] == want[k] for k in want), "delivered content differs from fabricctl expect --log"
    plain = {b.key(): b.checksum for b in expected_batches(spec, range(end))}
    assert all(plain[k] == want[k] for k in want if k[0] < frontier), "steps before the change changed"
    assert any(plain[k] != want[k] for k in want if k[0] >= at), "the change changed nothing"
    # the mix follows the change from its step on; no unit of a source repeats (few draws, big sources)
    code = collections.Counter()
    per_source = collections.defaultdict(list)
    for (step, _r, _m), (_c, units) in got.items():
        for u in units:
            if step < at2:  # from at2 the units are others (pieces of 256 tokens): a fresh shuffle
                per_source[u[0]].append(u)
            if at <= step < at2:
                code[u[0]] += 1
    assert code[1] / (code[0] + code[1]) == pytest.approx(0.7, abs=0.05)
    assert all(len(set(v)) == len(v) for v in per_source.values()), "a unit was repeated"
    short = [u for (step, _r, _m), (_c, units) in got.items() if step >= at2 for u in units]
    assert max(p for _s, _i, p in short) >= 4, "no piece of the 256-token context was delivered"

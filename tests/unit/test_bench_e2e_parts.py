"""The pieces of the end-to-end benchmark (``scripts/bench/e2e*.py``) that its numbers rest on:
the baseline's greedy packing (per rank, and vectorized for the simulation), and the simulated
compute: the cost model evaluated on a delivered batch must be the planner's cost of its units."""

from __future__ import annotations

import multiprocessing
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts" / "bench"))

from e2e_rank import batch_cost, use_platform_start_method  # noqa: E402
from e2e_sampler import RankStream, mean_step_tokens  # noqa: E402
from e2e_sim import pack_greedy, simulate, synthetic_demo  # noqa: E402

pytestmark = [pytest.mark.unit, pytest.mark.timeout(120)]


def naive_greedy(tokens: list[int], budget: int, steps: int) -> list[list[int]]:
    """Batches of indices into ``tokens``, packed one unit at a time."""
    out, cur, used = [], [], 0
    for i, t in enumerate(tokens):
        if cur and used + t > budget:
            out.append(cur)
            if len(out) == steps:
                return out
            cur, used = [], 0
        cur.append(i)
        used += t
    raise AssertionError("stream too short")


def test_vectorized_packing_is_the_greedy_packing_of_each_row():
    rng = np.random.default_rng(5)
    budget, steps = 1000, 12
    tokens = rng.integers(1, 400, (7, 200))
    tokens[3, 10] = 1500  # a unit over budget goes alone
    costs = rng.random((7, 200))
    got_c, got_t = pack_greedy(tokens, costs, budget, steps)
    for r in range(7):
        for s, idx in enumerate(naive_greedy(tokens[r].tolist(), budget, steps)):
            assert got_t[r, s] == tokens[r, idx].sum()
            assert got_c[r, s] == pytest.approx(costs[r, idx].sum())
    assert (got_t <= budget).sum() == got_t.size - 1  # only the lone over-budget unit exceeds it


def test_vectorized_packing_refuses_to_run_off_the_end_of_a_stream():
    with pytest.raises(RuntimeError):
        pack_greedy(np.full((2, 10), 300), np.ones((2, 10)), 1000, 5)


def test_rank_stream_packs_greedily_deterministically_and_follows_the_weights_of_each_step():
    sizes = [50, 80, 30]
    rng = np.random.default_rng(1)
    tokens = [rng.integers(10, 300, n) for n in sizes]
    a, b = np.array([0.8, 0.2, 0.0]), np.array([0.0, 0.0, 1.0])
    stream = RankStream(tokens, 1024, seed=3, rank=2, weights_at=lambda s: a if s < 40 else b)
    batches = [stream.batch(s) for s in range(80)]
    again = RankStream(tokens, 1024, seed=3, rank=2, weights_at=lambda s: a if s < 40 else b)
    assert [again.batch(s) for s in range(80)] == batches
    other = RankStream(tokens, 1024, seed=3, rank=5, weights_at=lambda s: a)
    assert [other.batch(s) for s in range(3)] != batches[:3]
    for s in range(79):  # each batch fits; its successor's first unit would not have
        used = sum(int(tokens[j][k]) for j, k in batches[s])
        nxt = batches[s + 1][0]
        assert used <= 1024 < used + int(tokens[nxt[0]][nxt[1]])
    first = [j for bt in batches[1:40] for j, _ in bt]
    after = [j for bt in batches[41:] for j, _ in bt]
    assert 2 not in first and set(after) == {2}           # the carried unit aside, the weights of the step
    assert abs(np.mean(np.array(first) == 0) - 0.8) < 0.08
    assert all(0 <= k < sizes[j] for bt in batches for j, k in bt)


def test_mean_step_tokens_is_the_mean_of_the_packed_batches():
    tokens = [np.full(100, 100), np.full(100, 300)]
    w = np.array([0.5, 0.5])
    got = mean_step_tokens(tokens, 1000, w, ranks=3, steps=50, seed=0)
    assert 3 * 700 <= got <= 3 * 1000  # each batch is within budget and at least budget - longest unit


def test_batch_cost_is_the_cost_model_of_each_packed_sequence_and_image():
    from fabricd.images import ImageSpec
    from fabricd.pack import pack_micro_batch
    from fabricd.planner import CostModel
    from fabricd.sources.transform import SampleData

    images = ImageSpec(mode="native", patch_size=2, merge_size=1, min_pixels=4, max_pixels=10_000)
    pd = images.patch_dim

    def sample(n_tok: int, grids: list[tuple[int, int]]) -> SampleData:
        starts, lengths, ids = [], [], np.arange(n_tok, dtype=np.int32) + 10
        for k, (h, w) in enumerate(grids):
            starts.append(2 + 3 * k)
            lengths.append(1)
        px = np.zeros((sum(h * w for h, w in grids), pd), np.uint8)
        return SampleData(input_ids=ids, image_starts=np.array(starts, np.int32), pixels=px,
                          image_lengths=np.array(lengths, np.int32),
                          image_grid=np.array([(1, h, w) for h, w in grids], np.int32).reshape(-1, 3))

    samples = [sample(20, [(3, 4), (2, 2)]), sample(7, []), sample(12, [(5, 1)])]
    arrays = pack_micro_batch(samples, source_ids=np.zeros(3), sample_ids=np.arange(3), pieces=np.zeros(3),
                              images=images)
    cost = CostModel(attention=1.0, linear=100.0, per_image=7.0, vision_attention=2.0, vision_linear=3.0)
    expect = (20**2 + 100 * 20 + 2 * 7 + 2 * (12**2 + 4**2) + 3 * (12 + 4)
              + 7**2 + 100 * 7
              + 12**2 + 100 * 12 + 7 + 2 * 5**2 + 3 * 5)
    assert batch_cost(arrays, cost) == pytest.approx(expect)
    assert batch_cost({**arrays, "cu_seqlens": np.zeros(1, np.int32)}, cost) == 0.0


def test_batch_cost_of_delivered_batches_is_the_planners_cost_of_their_units(tmp_path, tiny_corpus):
    from e2e_setup import BenchConfig, Mixture, bench_sources, fabric_job_toml, job_cost, job_spec

    from fabricd.assemble import assemble_micro_batch
    from fabricd.job import build_planner, job_tokenizer, open_sources, transform_spec
    from fabricd.sources.transform import SampleData, SampleLoader

    cfg = BenchConfig(ranks=2, workers=1, rank_tokens=2048)
    sources = bench_sources(tiny_corpus, 5)
    path = tmp_path / "job.toml"
    path.write_text(fabric_job_toml(cfg, tiny_corpus, sources, Mixture({s.name: s.weight for s in sources}),
                                    tokens_per_step=6000))
    spec = job_spec(path)
    assert spec.images.mode == "native" and spec.tokenizer.kind == "hf"  # the demo job's, as the bench says
    assert (spec.batch.tokens_per_step, spec.batch.compose) == (6000, "outliers")  # composed, in tokens
    tok = job_tokenizer(spec)
    indexes = open_sources(spec, tokenizer=tok)
    planner = build_planner(spec, indexes)
    loaders = [SampleLoader(indexes[s.name], transform_spec(spec, s.name), tokenizer=tok) for s in spec.sources]
    cost = job_cost(spec)
    compared = 0
    for step in range(3):
        plan = planner.plan(step, cfg.ranks)
        for rank in range(cfg.ranks):
            for rows in plan.micro_batches(rank):
                units = [loaders[int(plan.source[i])].load(plan.sample_id[i:i + 1], plan.piece[i:i + 1])[0]
                         for i in rows.tolist()]
                ok = [isinstance(u, SampleData) for u in units]
                mb = assemble_micro_batch([u if k else "failed" for u, k in zip(units, ok)],
                                          source_ids=plan.source[rows], sample_ids=plan.sample_id[rows],
                                          pieces=plan.piece[rows], images=spec.images)
                exact = all(ok) and all(len(u.input_ids) == plan.tokens[i] for u, i in zip(units, rows.tolist()))
                if exact:  # the planner's lengths are the delivered ones: so must the costs be
                    assert batch_cost(mb.arrays, cost) == pytest.approx(float(plan.cost[rows].sum()), rel=1e-9)
                    compared += 1
    assert compared >= 6


def test_simulated_fabric_plans_the_baselines_tokens_per_step_composed_below_the_largest_unit_bound():
    """The simulation's fabric side is the benchmark's: as many tokens per step as the baseline's
    (the comparison's terms), composed, so its steps sit near the mean rank cost, where the
    baseline's per-rank draws do not."""
    units, weights, cost, budget = synthetic_demo(seed=3, samples=4000)
    window = 16
    got = simulate(units, weights, rank_tokens=budget, cost=cost, dps=(64,), steps=window, seed=3)
    d = got["detail"]["64"]
    base, fab = d["tokens_per_step"]["baseline"], d["tokens_per_step"]["fabric"]
    assert abs(fab / base - 1) < 0.03
    # uncomposed, the largest units bound a DP-64 step at ~1.9× the mean (README, balance.py)
    assert d["fabric_bound_over_mean"] <= d["fabric_max_over_mean"] < 1.1 < d["baseline_max_over_mean"]
    assert got["ratio"]["64"] > 1.3


def test_settle_steps_counts_the_steps_until_waits_beyond_the_pre_shift_ones_stop():
    from e2e_rank import FIELDS
    from e2e_run import Phase, settle_steps

    ranks, steps = 3, 30
    stats = np.zeros((ranks, steps, len(FIELDS)))
    stats[..., FIELDS.index("cost")] = 1e8                  # ideal step: 1e8 × 1e-8 = 1 s
    before, shift = Phase("2x", 0, 12, 1e-8, warm=2), Phase("shift", 12, 18, 1e-8)
    wait = FIELDS.index("wait")
    stats[1, 5, wait] = 0.3                                 # noise before the shift: a 0.3 s hiccup
    got = settle_steps(shift, before, stats)
    assert (got["settle_steps"], got["stalled_steps"], got["longest_wait_before_s"]) == (0, 0, 0.3)
    stats[2, 12:16, wait] = 0.5                             # the shift: 4 steps wait longer than any before
    stats[0, 20, wait] = 0.25                               # within the noise: not a stall
    got = settle_steps(shift, before, stats)
    assert (got["settle_steps"], got["stalled_steps"]) == (4, 4)
    stats[1, 28, wait] = 0.9                                # still stalling at the end: not settled
    assert settle_steps(shift, before, stats)["settle_steps"] is None
    stats[1, 5, wait] = 0.0                                 # no noise before: 10% of the ideal step is the bar
    stats[1, 28, wait] = 0.0
    assert settle_steps(shift, before, stats)["settle_steps"] == 9  # the 0.25 s wait at step 20 now counts


def _wait(cond, deadline: float, what: str) -> None:
    """Poll ``cond()`` until it is true; fail with ``what`` past ``deadline`` (monotonic)."""
    import time

    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def test_a_role_forked_before_it_names_itself_is_counted_in_its_kinds_group_once_named(tmp_path):
    """A role forked from the template is still ``fd-template`` for a moment: the harness must not
    leave its CPU and memory under ``roles_other`` for the rest of the run."""
    import subprocess
    import time

    import psutil
    from e2e_run import LoadingProcesses

    from fabricd.localnode import kill_processes

    go = tmp_path / "go"
    script = (
        "import os, sys, time\n"
        "from fabricd.roles.base import set_process_name\n"
        "if os.fork() == 0:\n"
        "    set_process_name('fd-template')\n"
        f"    while not os.path.exists({str(go)!r}): time.sleep(0.01)\n"
        "    set_process_name('fd-loader')\n"
        "    time.sleep(60); os._exit(0)\n"
        "time.sleep(60)\n"
    )
    root = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.DEVNULL)
    parent = psutil.Process(root.pid)
    try:
        deadline = time.monotonic() + 30
        _wait(lambda: [c for c in parent.children() if c.name() == "fd-template"], deadline,
              "the forked child did not name itself")
        (child,) = parent.children()
        lp = LoadingProcesses([], [root.pid])  # sees it first under its template name
        assert lp.groups[child.pid] == "roles_other"
        go.write_text("")
        _wait(lambda: child.name() == "fd-loader", deadline, "the child did not rename itself")
        lp.refresh()
        assert lp.groups[child.pid] == "source_loaders"
    finally:
        kill_processes(parent.children(recursive=True) + [parent], timeout=10)
        root.wait(timeout=10)


def _start_methods(q) -> None:
    before = multiprocessing.get_start_method()
    q.put((before, use_platform_start_method(), multiprocessing.get_start_method()))


def test_a_spawned_rank_gives_its_dataloader_workers_the_interpreters_default_start_method():
    # the harness spawns its ranks; without the reset their DataLoader workers would be spawned too
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_start_methods, args=(q,))
    p.start()
    try:
        before, chosen, after = q.get(timeout=60)
    finally:
        p.join(30)
        if p.is_alive():
            p.kill()
            p.join()
    default = multiprocessing.get_all_start_methods()[0]
    assert before == "spawn"  # what a spawned process inherits: the bug this guards against
    assert chosen == after == default


def test_constructor_cpu_counts_its_main_thread_apart_from_its_other_threads(tmp_path):
    """``LoadingProcesses.constructor_cpu``: a constructor's CPU per step, and the part its main
    thread spent (what bounds the steps/s one constructor builds; ZeroMQ's I/O thread runs beside
    it). A process named like a constructor burns ~0.3 s on a second thread, then ~0.3 s on its
    main thread."""
    import subprocess
    import time

    import psutil
    from e2e_run import LoadingProcesses

    from fabricd.localnode import kill_processes

    go, done = tmp_path / "go", tmp_path / "done"
    script = (
        "import os, threading, time\n"
        "from fabricd.roles.base import set_process_name\n"
        "set_process_name('fd-constructor')\n"
        "def burn(s):\n"
        "    end = time.thread_time() + s\n"
        "    while time.thread_time() < end: pass\n"
        f"while not os.path.exists({str(go)!r}): time.sleep(0.01)\n"
        "t = threading.Thread(target=burn, args=(0.3,)); t.start(); t.join()\n"
        "burn(0.3)\n"
        f"open({str(done)!r}, 'w').close()\n"
        "time.sleep(60)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; "
                               f"p = subprocess.Popen([sys.executable, '-c', {script!r}]); time.sleep(60)"],
                              stdin=subprocess.DEVNULL)
    root = psutil.Process(parent.pid)
    try:
        deadline = time.monotonic() + 30
        _wait(lambda: [c for c in root.children() if c.name() == "fd-constructor"], deadline,
              "the child did not name itself")
        lp = LoadingProcesses([], [parent.pid])
        assert lp.constructor_cpu(10)["constructors"] == 1
        go.write_text("")
        _wait(done.exists, deadline, "the child did not burn its CPU")
        lp.cpu()
        got = lp.constructor_cpu(10)  # ms per step over 10 steps
        assert 45 <= got["process_ms_per_step"] <= 90, got
        assert 20 <= got["main_thread_ms_per_step"] <= 45, got
        assert got["main_thread_ms_per_step"] < got["process_ms_per_step"] - 20, got
        assert lp.constructor_cpu(0) is None
        assert LoadingProcesses([], []).constructor_cpu(10) is None
    finally:
        kill_processes(root.children(recursive=True) + [root], timeout=10)
        parent.wait(timeout=10)

"""A simulated DP rank of the end-to-end benchmark (either side), and the state it shares with
the harness.

Each step the rank takes its batch (every micro-batch of the step, one after the other),
"computes" for ``cost × scale`` seconds per micro-batch (a sleep: it uses no CPU, so all of it is
left to loading), then waits at a barrier for every rank, as an all-reduce does. The cost is the
job's cost model evaluated on what arrived: per packed sequence (``cu_seqlens``) ``a·L² + b·L``
plus ``per_image`` per image, and per image its vision term from its patch grid
(``image_grid_thw``) — the planner's formula, applied to the delivered batch. ``scale`` (seconds
per unit of cost) comes per step from the harness (:class:`Control`), which decides each phase's
calibration; the time blocked fetching a batch is the rank's data wait.
"""

from __future__ import annotations

import gc
import importlib
import json
import math
import multiprocessing
import os
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import psutil

__all__ = ["FIELDS", "PLATFORM_START_METHOD", "RankArgs", "Control", "batch_cost", "rank_main",
           "use_platform_start_method"]

#: per (rank, step), in Control.stats
FIELDS = ("wait", "compute", "cost", "tokens", "samples", "micro")
#: the interpreter's default start method (fork on Linux up to Python 3.13): a baseline rank's
#: DataLoader workers start with it, as under torchrun (see use_platform_start_method)
PLATFORM_START_METHOD = multiprocessing.get_all_start_methods()[0]
BARRIER_TIMEOUT_S = 300.0
START_TIMEOUT_S = 300.0
RELEASE_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class RankArgs:
    side: str                      # "baseline" | "fabric"
    rank: int
    ranks: int
    steps: int                     # most steps the run can have (Control.end_step says when it stops)
    spec_path: str
    out_dir: str
    seed: int
    rank_tokens: int
    workers: int
    prefetch_factor: int
    base_weights: tuple[float, ...]
    shifted_weights: tuple[float, ...] | None = None
    addresses: tuple[str, ...] = ()
    keys: str | None = None
    job: str = "e2e"


class Control:
    """What the harness and its ranks share (made with the harness's multiprocessing context,
    handed to each rank at its start)."""

    def __init__(self, ctx: Any, ranks: int, steps: int) -> None:
        self.ranks, self.steps = ranks, steps
        self.barrier = ctx.Barrier(ranks)
        self.started = ctx.Barrier(ranks + 1)   # every rank is up (the harness is a party)
        self.measured = ctx.Barrier(ranks + 1)  # every rank measured its memory before loading
        self.release = ctx.Event()              # the harness measured memory at the end: ranks may exit
        self.abort = ctx.Event()
        self.scale = ctx.Array("d", [math.nan] * steps, lock=False)   # seconds per unit cost, per step
        self.step_end = ctx.Array("d", steps, lock=False)             # monotonic time all ranks left step s
        self.progress = ctx.Value("i", 0, lock=False)                 # steps completed by every rank
        self.end_step = ctx.Value("i", steps, lock=False)             # the run stops before this step
        self.shift_step = ctx.Value("q", 2**62, lock=False)           # baseline: mixture shift from this step
        self.pss_before = ctx.Array("d", ranks, lock=False)
        self.stats = ctx.Array("d", ranks * steps * len(FIELDS), lock=False)

    def stat_array(self) -> np.ndarray:
        """stats as float[ranks, steps, FIELDS] (a copy)."""
        return np.frombuffer(self.stats, dtype=np.float64).reshape(self.ranks, self.steps, len(FIELDS)).copy()


def batch_cost(mb: dict, cost: Any) -> float:
    """The cost model on one delivered micro-batch (see the module docstring)."""
    cu = np.asarray(mb["cu_seqlens"], np.int64)
    lengths = np.diff(cu)
    n = lengths.shape[0]
    if n == 0:
        return 0.0
    offsets = np.asarray(mb["image_token_offsets"], np.int64)
    owner = np.searchsorted(cu, offsets, side="right") - 1  # the sequence each image sits in
    images = np.bincount(owner, minlength=n)
    patches = patches_sq = None
    if "image_grid_thw" in mb and len(offsets):
        p = np.prod(np.asarray(mb["image_grid_thw"], np.float64), axis=1)
        patches, patches_sq = np.bincount(owner, p, minlength=n), np.bincount(owner, p * p, minlength=n)
    elif "image_grid_thw" in mb:
        patches = patches_sq = np.zeros(n)
    return float(cost(lengths, images, patches, patches_sq).sum())


def _pss() -> float:
    return float(psutil.Process().memory_full_info().pss)


def _fabric_fetch(args: RankArgs) -> tuple[Callable[[], tuple[dict, bool]], Callable[[], None], Callable[[], dict]]:
    from fabric_client import Loader

    loader = Loader(list(args.addresses), job=args.job, dp_rank=args.rank, dp_size=args.ranks, max_steps=args.steps,
                    keys=args.keys, deadline_s=120.0)  # numpy arrays: this trainer has no model to feed
    it = iter(loader)

    def fetch() -> tuple[dict, bool]:
        b = next(it)
        return b, b.micro_batch + 1 == b.num_micro_batches

    return fetch, loader.close, lambda: {k: v for k, v in loader.stats.items() if isinstance(v, (int, float, str))}


def use_platform_start_method() -> str:
    """Make this process's default start method the interpreter's own default, and return it.

    The harness spawns its ranks, and a spawned process inherits "spawn" as its default start
    method, which a DataLoader's workers would then use: every worker would import torch and the
    dataset afresh and share no page with its rank (a minute to the first step, twice the
    memory). A rank that torchrun launched has the interpreter's default (fork on Linux up to
    Python 3.13), and so does a rank of this benchmark."""
    multiprocessing.set_start_method(PLATFORM_START_METHOD, force=True)
    return PLATFORM_START_METHOD


def _baseline_fetch(args: RankArgs, ctl: Control) -> tuple[Callable[[], tuple[dict, bool]], Callable[[], None],
                                                           Callable[[], dict]]:
    from e2e_baseline import baseline_loader

    use_platform_start_method()
    base = np.asarray(args.base_weights)
    shifted = np.asarray(args.shifted_weights) if args.shifted_weights is not None else base

    def weights_at(step: int) -> np.ndarray:
        return shifted if step >= ctl.shift_step.value else base

    it: Iterator | None = baseline_loader(args.spec_path, rank=args.rank, seed=args.seed, budget=args.rank_tokens,
                                          workers=args.workers, prefetch_factor=args.prefetch_factor,
                                          weights_at=weights_at)

    def fetch() -> tuple[dict, bool]:
        return next(it), True

    def close() -> None:
        nonlocal it
        it = None  # the iterator's finalizer shuts its persistent workers down

    return fetch, close, dict


def rank_main(args: RankArgs, ctl: Control) -> None:
    """Process target: run the rank until ``ctl.end_step`` (or an abort); errors go to
    ``rank-<r>.err`` in ``out_dir`` and abort the run."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # torch warns that 4 workers a rank exceed this machine's cores: the configuration is the point
    warnings.filterwarnings("ignore", message="This DataLoader will create")
    close: Callable[[], None] = lambda: None  # noqa: E731
    try:
        from pathlib import Path

        from e2e_setup import job_cost, job_spec

        # every module the rank's loading needs, imported before its memory is measured
        importlib.import_module("fabric_client" if args.side == "fabric" else "e2e_baseline")
        cost_model = job_cost(job_spec(Path(args.spec_path)))
        ctl.started.wait(START_TIMEOUT_S)
        gc.collect()  # a full pass copies the pages of the forked heap now: they are not loading's growth
        ctl.pss_before[args.rank] = _pss()
        ctl.measured.wait(START_TIMEOUT_S)
        fetch, close, stats = (_fabric_fetch(args) if args.side == "fabric" else _baseline_fetch(args, ctl))
        view = np.frombuffer(ctl.stats, dtype=np.float64).reshape(ctl.ranks, ctl.steps, len(FIELDS))
        step = 0
        while step < ctl.end_step.value:
            while math.isnan(ctl.scale[step]):  # the harness has not decided this step's calibration yet
                if ctl.abort.is_set():
                    return
                time.sleep(0.002)
            scale = ctl.scale[step]
            wait = compute = cost = 0.0
            tokens = samples = micro = 0
            while True:
                t0 = time.perf_counter()
                mb, last = fetch()
                t1 = time.perf_counter()
                c = batch_cost(mb, cost_model)
                if c * scale > 0:
                    time.sleep(c * scale)
                wait += t1 - t0
                compute += time.perf_counter() - t1
                cost += c
                tokens += int(mb["input_ids"].shape[0])
                samples += int(mb["sample_ids"].shape[0])
                micro += 1
                if last:
                    break
            view[args.rank, step] = (wait, compute, cost, tokens, samples, micro)
            ctl.barrier.wait(BARRIER_TIMEOUT_S)
            if args.rank == 0:
                ctl.step_end[step] = time.monotonic()
                ctl.progress.value = step + 1
            step += 1
        with open(os.path.join(args.out_dir, f"rank-{args.rank}.json"), "w") as f:
            json.dump({"args": asdict(args), "stats": stats()}, f)
        ctl.release.wait(RELEASE_TIMEOUT_S)
        close()
        # done: skip the interpreter's teardown, where a DataLoader whose workers are exiting can
        # still report one of them as killed (its SIGCHLD handler), which would only be noise
        os._exit(0)
    except BaseException as e:  # noqa: BLE001 - handed to the harness, which stops the run
        if not ctl.abort.is_set():
            with open(os.path.join(args.out_dir, f"rank-{args.rank}.err"), "w") as f:
                f.write(f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
            ctl.abort.set()
        try:
            ctl.barrier.abort()
        except Exception:  # noqa: BLE001
            pass
        raise SystemExit(1)
    finally:
        try:
            close()
        except Exception:  # noqa: BLE001 - exiting anyway
            pass

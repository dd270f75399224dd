"""Simulated at scale: the step time of both sides' plans at DP 1024 and 4096 under the cost
model, with no processes (``simulated_throughput_ratio`` of ``scripts/bench/e2e.py``).

A step takes as long as its most expensive rank (the others wait at the all-reduce); loading is
assumed to keep up on both sides, so this is the compute-bound limit. The baseline's plan: every
rank draws its own units from the mixture and packs them greedily to the token budget (the
sampler of :mod:`e2e_sampler`, vectorized over ranks). The fabric's plan: ``Planner.plan`` with
``tokens_per_step`` the baseline's mean tokens per step and step composition on
(:func:`fabric_planner`). The ratio is tokens/s, fabric over baseline: Σ tokens / Σ step time of
each side. Composition works over windows of MAX_DELAY_STEPS + 1 steps (the first step of each
composes the whole window), so the fabric's figure is only representative over whole windows:
``steps`` should be a multiple of the window.

Lengths: by default the synthetic demo distribution of ``scripts/bench/balance.py`` (its Pareto
long documents reach 32k tokens, which the generated demo corpus at its default size does not)
with its cost model and the demo job's 32,768-token budget; :func:`simulate` takes any units.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from balance import DEMO_COST, DEMO_SHAPES, DEMO_WEIGHTS, IMAGE_TOKENS, synthetic_lengths
from e2e_setup import MAX_DELAY_STEPS
from fabricd.planner import CostModel, MixtureSchedule, Planner, SourceUnits, build_units
from fabricd.planner.plan import draws_for_tokens

__all__ = ["fabric_planner", "pack_greedy", "baseline_steps", "simulate", "synthetic_demo"]

DEMO_RANK_TOKENS = 32768  # config/jobs/demo.toml: micro_batch_tokens


def fabric_planner(units: Sequence[SourceUnits], weights: np.ndarray, *, rank_tokens: int, tokens_per_step: int,
                   cost: CostModel, seed: int, dp: int) -> Planner:
    """THE fabric planner of the simulation, as ``fabricd.job`` builds it for the benchmark's job
    spec: a global batch of ``tokens_per_step`` tokens (the baseline's mean; the units drawn per
    step derived from the mixture's mean unit length) with step composition
    (``compose = "outliers"``, windows of MAX_DELAY_STEPS + 1 steps, composed for ``dp``)."""
    names = [u.name for u in units]
    schedule = MixtureSchedule("constant", [(0, dict(zip(names, map(float, weights))))], names)
    draws = max(draws_for_tokens(tokens_per_step, schedule, units), dp)
    return Planner(seed=seed, samples_per_step=draws, micro_batch_tokens=rank_tokens, schedule=schedule, cost=cost,
                   method="lpt", sources=units, compose="outliers", max_delay_steps=MAX_DELAY_STEPS,
                   size_by_tokens=True, dp_history=((0, dp),))


def _unit_costs(units: Sequence[SourceUnits], cost: CostModel) -> list[np.ndarray]:
    return [cost(u.tokens, u.images, u.patches, u.patches_sq) for u in units]


def pack_greedy(tokens: np.ndarray, costs: np.ndarray, budget: int, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Greedy packing of each row's unit stream (``tokens``/``costs``: int/float[rows, k]): a batch
    takes units while they fit in ``budget`` (a unit over budget goes alone) and the first that
    does not fit opens the next batch. Returns (cost, tokens) of the first ``steps`` batches of
    every row, float[rows, steps]. Vectorized over rows; raises when a row runs out of units."""
    n, k = tokens.shape
    t_pre = np.zeros((n, k + 1), np.int64)
    np.cumsum(tokens, axis=1, out=t_pre[:, 1:])
    c_pre = np.zeros((n, k + 1))
    np.cumsum(costs, axis=1, out=c_pre[:, 1:])
    big = int(t_pre[:, -1].max()) + budget + 1
    flat = (t_pre + np.arange(n, dtype=np.int64)[:, None] * big).ravel()  # rows side by side, still sorted
    base = np.arange(n, dtype=np.int64) * (k + 1)
    r = np.arange(n)
    b = np.zeros(n, np.int64)
    out_c, out_t = np.zeros((n, steps)), np.zeros((n, steps))
    for s in range(steps):
        e = np.searchsorted(flat, flat[base + b] + budget, side="right") - 1 - base  # the last prefix within budget
        e = np.maximum(e, b + 1)
        if int(e.max()) >= k:  # the row's last batch may be cut short by its end: not a packed batch
            raise RuntimeError("too few units drawn for the steps asked")
        out_c[:, s], out_t[:, s] = c_pre[r, e] - c_pre[r, b], t_pre[r, e] - t_pre[r, b]
        b = e
    return out_c, out_t


def baseline_steps(units: Sequence[SourceUnits], weights: np.ndarray, *, dp: int, rank_tokens: int, steps: int,
                   cost: CostModel, seed: int, chunk: int = 256) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per step: (max rank cost, mean rank cost, tokens) of ``dp`` baseline ranks, each drawing
    its own units (a source by weight, a unit of it uniformly) and packing greedily to
    ``rank_tokens``."""
    w = np.asarray(weights, np.float64)
    sizes = np.array([len(u) for u in units], np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    tok_all = np.concatenate([u.tokens for u in units]).astype(np.int64)
    cost_all = np.concatenate(_unit_costs(units, cost))
    mean_tok = float(sum(w[j] * units[j].tokens.mean() for j in range(len(units))))
    k = steps * int(np.ceil(rank_tokens / mean_tok * 1.5)) + 64
    max_c, sum_c, tokens = np.zeros(steps), np.zeros(steps), np.zeros(steps)
    for lo in range(0, dp, chunk):
        n = min(chunk, dp - lo)
        rng = np.random.default_rng([seed, lo, 0xBA5E])
        src = rng.choice(len(units), size=(n, k), p=w)
        row = offsets[src] + (rng.random((n, k)) * sizes[src]).astype(np.int64)
        c, t = pack_greedy(tok_all[row], cost_all[row], rank_tokens, steps)
        max_c = np.maximum(max_c, c.max(axis=0))
        sum_c += c.sum(axis=0)
        tokens += t.sum(axis=0)
    return max_c, sum_c / dp, tokens


def simulate(units: Sequence[SourceUnits], weights: np.ndarray, *, rank_tokens: int, cost: CostModel,
             dps: Sequence[int] = (1024, 4096), steps: int = 20, seed: int = 0) -> dict:
    """``{"ratio": {dp: tokens/s fabric over baseline}, "detail": {dp: {...}}}``."""
    w = np.asarray(weights, np.float64)
    ratio, detail = {}, {}
    for dp in dps:
        t0 = time.perf_counter()
        b_max, b_mean, b_tok = baseline_steps(units, w, dp=dp, rank_tokens=rank_tokens, steps=steps, cost=cost,
                                              seed=seed)
        planner = fabric_planner(units, w, rank_tokens=rank_tokens, tokens_per_step=int(round(b_tok.mean())),
                                 cost=cost, seed=seed, dp=dp)
        f_max, f_mean, f_tok, bound = np.zeros(steps), np.zeros(steps), np.zeros(steps), np.zeros(steps)
        for s in range(steps):
            plan = planner.plan(s, dp)
            rc = plan.rank_costs()
            f_max[s], f_mean[s], f_tok[s] = rc.max(), rc.mean(), plan.tokens.sum()
            bound[s] = max(rc.mean(), float(plan.cost.max()))
        r = (f_tok.sum() / f_max.sum()) / (b_tok.sum() / b_max.sum())
        ratio[str(dp)] = round(float(r), 3)
        detail[str(dp)] = {
            "baseline_max_over_mean": round(float(b_max.sum() / b_mean.sum()), 3),
            "fabric_max_over_mean": round(float(f_max.sum() / f_mean.sum()), 3),
            "fabric_bound_over_mean": round(float(bound.sum() / f_mean.sum()), 3),  # largest unit or the mean
            "tokens_per_step": {"baseline": round(float(b_tok.mean())), "fabric": round(float(f_tok.mean()))},
            "fabric_samples_per_step": planner.samples_per_step, "steps": steps, "seconds": round(time.perf_counter() - t0, 1),
        }
    return {"ratio": ratio, "detail": detail}


def synthetic_demo(seed: int = 0, samples: int = 20000) -> tuple[list[SourceUnits], np.ndarray, CostModel, int]:
    """The synthetic demo sources of ``balance.py`` as units, their weights, its cost model and
    the demo job's per-rank token budget."""
    rng = np.random.default_rng(seed)
    units = []
    for name in DEMO_WEIGHTS:
        text, images = synthetic_lengths(name, samples, rng)
        msl, policy = DEMO_SHAPES[name]
        units.append(build_units(name, text, images, max_seq_len=msl, long_samples=policy, image_tokens=IMAGE_TOKENS))
    return units, np.array(list(DEMO_WEIGHTS.values())), DEMO_COST, DEMO_RANK_TOKENS

"""Units (THE RULE) and the global unit sequence (counts, cursors, per-epoch bijections)."""

from __future__ import annotations

import numpy as np
import pytest

from fabricd.errors import PlanError
from fabricd.planner.mixture import MixtureSchedule
from fabricd.planner.sequence import GlobalSequence, build_units, feistel_permute


# --------------------------------------------------------------------------- build_units


@pytest.mark.unit
def test_split_gives_exact_piece_lengths() -> None:
    u = build_units("t", np.array([10, 8, 3, 17]), np.zeros(4, dtype=np.int32), max_seq_len=4, long_samples="split", image_tokens=64)
    assert u.sample_id.tolist() == [0, 0, 0, 1, 1, 2, 3, 3, 3, 3, 3]
    assert u.piece.tolist() == [0, 1, 2, 0, 1, 0, 0, 1, 2, 3, 4]
    assert u.tokens.tolist() == [4, 4, 2, 4, 4, 3, 4, 4, 4, 4, 1]
    assert u.images.tolist() == [0] * 11
    assert len(u) == 11
    assert (u.sample_id.dtype, u.piece.dtype, u.tokens.dtype, u.images.dtype) == (np.int64, np.int32, np.int32, np.int32)


@pytest.mark.unit
def test_truncate_gives_one_unit_per_sample() -> None:
    u = build_units("t", np.array([10, 3]), np.array([0, 0]), max_seq_len=4, long_samples="truncate", image_tokens=64)
    assert u.sample_id.tolist() == [0, 1]
    assert u.piece.tolist() == [0, 0]
    assert u.tokens.tolist() == [4, 3]


@pytest.mark.unit
def test_images_force_truncate_and_count_image_tokens() -> None:
    # sample 0: 5 + 2*10 = 25 > 8 with images -> one unit of 8, 2 images; sample 1: text-only split
    u = build_units("v", np.array([5, 9, 2]), np.array([2, 0, 1]), max_seq_len=8, long_samples="split", image_tokens=10)
    assert u.sample_id.tolist() == [0, 1, 1, 2]
    assert u.piece.tolist() == [0, 0, 1, 0]
    assert u.tokens.tolist() == [8, 8, 1, 8]
    assert u.images.tolist() == [2, 0, 0, 1]
    short = build_units("v", np.array([5]), np.array([1]), max_seq_len=8, long_samples="split", image_tokens=2)
    assert short.tokens.tolist() == [7]


@pytest.mark.unit
@pytest.mark.parametrize(
    ("kwargs", "quoted"),
    [
        ({"text_tokens": np.array([4, 0, 2])}, "0"),
        ({"text_tokens": np.array([4, -7])}, "-7"),
        ({"long_samples": "chop"}, "'chop'"),
        ({"max_seq_len": 0}, "0"),
        ({"num_images": np.array([0, -1])}, "-1"),
    ],
)
def test_build_units_rejects_bad_inputs(kwargs: dict, quoted: str) -> None:
    args = {"text_tokens": np.array([4, 5]), "num_images": np.array([0, 0]), "max_seq_len": 4, "long_samples": "split", "image_tokens": 1}
    if "text_tokens" in kwargs and "num_images" not in kwargs:
        args["num_images"] = np.zeros(len(kwargs["text_tokens"]), dtype=np.int32)
    args.update(kwargs)
    with pytest.raises(ValueError) as err:
        build_units("src", args.pop("text_tokens"), args.pop("num_images"), **args)
    assert quoted in str(err.value)


# --------------------------------------------------------------------------- permutation


@pytest.mark.unit
@pytest.mark.parametrize("n", [1, 2, 3, 7, 1000003])
def test_feistel_is_a_bijection_for_awkward_sizes(n: int) -> None:
    p = feistel_permute(np.arange(n), n, seed=11, source=2, epoch=5)
    assert p.min() >= 0 and p.max() < n
    assert np.unique(p).size == n


@pytest.mark.unit
def test_feistel_depends_on_epoch_source_and_seed() -> None:
    x = np.arange(1000)
    base = feistel_permute(x, 1000, seed=1, source=0, epoch=0)
    assert not np.array_equal(base, feistel_permute(x, 1000, seed=1, source=0, epoch=1))
    assert not np.array_equal(base, feistel_permute(x, 1000, seed=1, source=1, epoch=0))
    assert not np.array_equal(base, feistel_permute(x, 1000, seed=2, source=0, epoch=0))
    assert np.array_equal(base, feistel_permute(x, 1000, seed=1, source=0, epoch=0))
    # not the identity, and element-wise evaluation equals batch evaluation
    assert (base != x).mean() > 0.9
    assert all(int(feistel_permute(np.array([i]), 1000, seed=1, source=0, epoch=0)[0]) == base[i] for i in range(0, 1000, 97))


# --------------------------------------------------------------------------- global sequence


def _seq(seed: int = 7, B: int = 32, sizes=(50, 13, 200), weights=None) -> GlobalSequence:
    w = weights or {"a": 0.5, "b": 0.2, "c": 0.3}
    sched = MixtureSchedule("constant", [(0, w)], ["a", "b", "c"])
    return GlobalSequence(seed=seed, samples_per_step=B, schedule=sched, source_sizes=list(sizes))


@pytest.mark.unit
def test_counts_sum_to_batch_and_long_run_frequency_matches_weights() -> None:
    seq = _seq(B=10, weights={"a": 0.61, "b": 0.07, "c": 0.32})
    steps = 4000
    total = np.zeros(3, dtype=np.int64)
    for s in range(steps):
        n = seq.counts(s)
        assert n.sum() == 10 and n.min() >= 0
        total += n
    # cumulative rounding: the long-run error is bounded (depth 2 tree: < 3 draws), not a random walk
    assert np.abs(total - 10 * steps * np.array([0.61, 0.07, 0.32])).max() < 3
    # source a is split off at the root: each step's count is floor or ceil of its expectation
    n = np.array([seq.counts(s) for s in range(500)])
    assert set(np.unique(n[:, 0]).tolist()) <= {6, 7}
    assert set(np.unique(n[:, 1]).tolist()) <= {0, 1, 2}


@pytest.mark.unit
def test_zero_weight_source_is_never_drawn_and_weighted_empty_source_is_refused() -> None:
    seq = _seq(weights={"a": 0.5, "b": 0.0, "c": 0.5}, sizes=(10, 0, 10))
    assert all(seq.counts(s)[1] == 0 for s in range(300))
    with pytest.raises(PlanError, match="'b'"):
        _seq(weights={"a": 0.5, "b": 0.1, "c": 0.4}, sizes=(10, 0, 10))


@pytest.mark.unit
def test_cursor_equals_naive_prefix_in_any_access_order() -> None:
    seq = _seq()
    counts = np.array([seq.counts(s) for s in range(70)])
    prefix = np.vstack([np.zeros(3, dtype=np.int64), np.cumsum(counts, axis=0)])
    fresh = _seq()
    for s in [69, 0, 15, 16, 17, 33, 48, 47, 5, 64, 70]:  # random access order, forwards and backwards
        assert np.array_equal(fresh.cursor(s), prefix[s]), s
    for s in range(71):  # sequential access
        assert np.array_equal(seq.cursor(s), prefix[s]), s


@pytest.mark.unit
def test_epoch_draws_each_unit_exactly_once_and_epochs_reshuffle() -> None:
    sizes = (50, 13, 200)
    seq = _seq(sizes=sizes)
    draws: list[list[int]] = [[], [], []]
    steps = 0
    while min(len(d) // n for d, n in zip(draws, sizes)) < 2:
        src, unit = seq.step_units(steps)
        assert src.size == unit.size == 32
        for j in range(3):
            draws[j].extend(unit[src == j].tolist())
        steps += 1
    for j, n in enumerate(sizes):
        d = np.array(draws[j])
        e0, e1 = d[:n], d[n : 2 * n]
        assert sorted(e0.tolist()) == list(range(n))
        assert sorted(e1.tolist()) == list(range(n))
        assert not np.array_equal(e0, e1)
    assert np.array_equal(seq.epoch(steps), seq.cursor(steps) // np.array(sizes))
    assert (seq.epoch(steps) >= 2).all() and seq.epoch(0).tolist() == [0, 0, 0]


@pytest.mark.unit
def test_same_inputs_give_identical_output_in_a_fresh_object() -> None:
    a, b = _seq(), _seq()
    for s in [1000, 3, 3, 200]:
        sa, ua = a.step_units(s)
        sb, ub = b.step_units(s)
        assert np.array_equal(sa, sb) and np.array_equal(ua, ub)
    c = _seq(seed=8)
    assert any(not np.array_equal(a.step_units(s)[1], c.step_units(s)[1]) for s in range(5))


@pytest.mark.unit
def test_random_access_far_step_costs_bounded_work() -> None:
    seq = _seq(B=4096)
    before = seq.work
    cur = seq.cursor(10**6)
    assert cur.sum() == 4096 * 10**6
    seq.step_units(10**6 - 3)
    seq.step_units(2**40)  # MAX_STEP itself
    assert seq.work - before <= 4 * 8, "a cursor evaluates a handful of tree nodes, never a step at a time"


@pytest.mark.unit
def test_counts_sum_exactly_even_when_weights_do_not_sum_to_one_in_floats() -> None:
    # 19 equal weights: their float cumsum ends at 1 - 4.4e-16, so an unguarded last edge would
    # fall one short of B (for u < 5e-4 at this B) in a handful of these steps.
    names = [f"s{i}" for i in range(19)]
    sched = MixtureSchedule("constant", [(0, {n: 1.0 for n in names})], names)
    B = 2**40
    seq = GlobalSequence(seed=1, samples_per_step=B, schedule=sched, source_sizes=[5] * 19)
    assert int(seq.cursor(20000).sum()) == B * 20000
    assert all(int(seq.counts(s).sum()) == B for s in range(50))


@pytest.mark.unit
def test_feistel_blocks_and_epoch_calls_change_no_unit(monkeypatch) -> None:
    """The Feistel network runs in cache-sized blocks and a step calls it once per epoch its
    draws span: the units are those of the definition, draw k of source j being
    perm_{j, k // N_j}(k mod N_j), whatever the block size."""
    import fabricd.planner.sequence as sequence

    sched = MixtureSchedule("constant", [(0, {"a": 0.7, "b": 0.3})], ["a", "b"])
    seq = GlobalSequence(seed=5, samples_per_step=1000, schedule=sched, source_sizes=[130, 4099])
    src, unit = seq.step_units(3)  # source a: ~700 draws of 130 units, six epochs in one step
    start = seq.cursor(3)
    for j, size in enumerate((130, 4099)):
        draws = int(start[j]) + np.arange(int(np.count_nonzero(src == j)))
        want = feistel_permute(draws % size, size, seed=5, source=j, epoch=draws // size)
        assert np.array_equal(unit[src == j], want)
    monkeypatch.setattr(sequence, "_BLOCK", 3)
    assert np.array_equal(seq.step_units(3)[1], unit)

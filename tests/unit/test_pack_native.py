"""``pack_micro_batch`` with native-resolution images, and how labels come from targets and
image blocks (``image_lengths``). Expected arrays are written out by hand or built by slow loops."""

from __future__ import annotations

import numpy as np
import pytest

from fabricd.images import ImageSpec
from fabricd.pack import IGNORE_INDEX, IMAGE_ID, NATIVE_FIELDS, PACKED_FIELDS, pack_micro_batch
from fabricd.sources.transform import SampleData

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]

X = IGNORE_INDEX
# p = 2, m = 2: patch rows of 12 values
SPEC = ImageSpec(mode="native", patch_size=2, merge_size=2, min_pixels=16, max_pixels=4096)
PD = SPEC.patch_dim


def _patches(rows: int, fill: int) -> np.ndarray:
    px = np.full((rows, PD), fill, np.uint8)
    px[:, 0] = np.arange(rows) % 256  # row number in the first value
    return px


def _unit(ids: list[int], starts: list[int], grids: list[tuple[int, int, int]], fill: int = 0, *,
          lengths: list[int] | None = None, targets: list[int] | None = None) -> SampleData:
    rows = sum(t * h * w for t, h, w in grids)
    return SampleData(
        input_ids=np.array(ids, np.int32),
        image_starts=np.array(starts, np.int32),
        pixels=_patches(rows, fill),
        image_lengths=None if lengths is None else np.array(lengths, np.int32),
        image_grid=np.array(grids, np.int32).reshape(-1, 3),
        targets=None if targets is None else np.array(targets, np.int32),
    )


def _pack(samples: list, images: ImageSpec = SPEC, **kw) -> dict[str, np.ndarray]:
    n = len(samples)
    return pack_micro_batch(samples, source_ids=kw.get("source_ids", np.zeros(n)),
                            sample_ids=kw.get("sample_ids", np.arange(n)), pieces=kw.get("pieces", np.zeros(n)),
                            images=images)


def test_native_fields_order() -> None:
    assert NATIVE_FIELDS == ("input_ids", "labels", "position_ids", "cu_seqlens", "pixel_values", "image_grid_thw",
                             "image_token_offsets", "source_ids", "sample_ids", "pieces")
    assert set(NATIVE_FIELDS) - set(PACKED_FIELDS) == {"image_grid_thw"}


def test_native_hand_computed_example() -> None:
    # a: text only ; b: image of grid (1,2,4) = 8 patches = 2 tokens at offset 1 ;
    # c: images (1,2,2) = 1 token at 0 and (1,4,2) = 2 tokens at 2
    a = _unit([10, 11, 12], [], [])
    b = _unit([20, 7, 7, 21, 22], [1], [(1, 2, 4)], fill=100, lengths=[2])
    c = _unit([7, 30, 7, 7, 31], [0, 2], [(1, 2, 2), (1, 4, 2)], fill=200, lengths=[1, 2])
    out = _pack([a, b, c], source_ids=np.array([0, 1, 2]), sample_ids=np.array([5, 6, 7]),
                pieces=np.array([0, 0, 1]))
    assert tuple(out) == NATIVE_FIELDS
    np.testing.assert_array_equal(out["input_ids"], [10, 11, 12, 20, 7, 7, 21, 22, 7, 30, 7, 7, 31])
    # targets: a = [10 11 12], b = [20 X X 21 22], c = [X 30 X X 31]; labels = targets shifted by one
    # within each sequence, X at each sequence's end
    np.testing.assert_array_equal(out["labels"], [11, 12, X, X, X, 21, 22, X, 30, X, X, 31, X])
    np.testing.assert_array_equal(out["position_ids"], [0, 1, 2, 0, 1, 2, 3, 4, 0, 1, 2, 3, 4])
    np.testing.assert_array_equal(out["cu_seqlens"], [0, 3, 8, 13])
    np.testing.assert_array_equal(out["image_token_offsets"], [4, 8, 10])
    np.testing.assert_array_equal(out["image_grid_thw"], [[1, 2, 4], [1, 2, 2], [1, 4, 2]])
    assert out["pixel_values"].shape == (8 + 4 + 8, PD)
    np.testing.assert_array_equal(out["pixel_values"][:8, 1], [100] * 8)
    np.testing.assert_array_equal(out["pixel_values"][8:, 1], [200] * 12)
    np.testing.assert_array_equal(out["pixel_values"][:, 0], list(range(8)) + list(range(12)))
    np.testing.assert_array_equal(out["source_ids"], [0, 1, 2])
    np.testing.assert_array_equal(out["sample_ids"], [5, 6, 7])
    np.testing.assert_array_equal(out["pieces"], [0, 0, 1])
    dtypes = {"input_ids": np.int32, "labels": np.int32, "position_ids": np.int32, "cu_seqlens": np.int32,
              "pixel_values": np.uint8, "image_grid_thw": np.int32, "image_token_offsets": np.int32,
              "source_ids": np.int32, "sample_ids": np.int64, "pieces": np.int32}
    for name, arr in out.items():
        assert arr.dtype == dtypes[name], name
        assert arr.flags.c_contiguous, name


def test_empty_micro_batch_native() -> None:
    out = _pack([])
    assert tuple(out) == NATIVE_FIELDS
    shapes = {"input_ids": (0,), "labels": (0,), "position_ids": (0,), "cu_seqlens": (1,),
              "pixel_values": (0, PD), "image_grid_thw": (0, 3), "image_token_offsets": (0,),
              "source_ids": (0,), "sample_ids": (0,), "pieces": (0,)}
    for name, arr in out.items():
        assert arr.shape == shapes[name], name
        assert arr.flags.c_contiguous
    assert out["cu_seqlens"].tolist() == [0]
    assert out["image_grid_thw"].dtype == np.int32 and out["pixel_values"].dtype == np.uint8


def test_native_micro_batch_without_images() -> None:
    out = _pack([_unit([5, 6], [], []), _unit([7], [], [])])
    assert tuple(out) == NATIVE_FIELDS
    assert out["pixel_values"].shape == (0, PD) and out["image_grid_thw"].shape == (0, 3)
    assert out["image_token_offsets"].shape == (0,)
    np.testing.assert_array_equal(out["labels"], [6, X, X])


def test_fixed_micro_batch_has_no_grid() -> None:
    fixed = ImageSpec(mode="fixed", image_size=2, image_tokens=2)
    s = SampleData(np.array([3, 2, 2, 4], np.int32), np.array([1], np.int32), np.zeros((1, 2, 2, 3), np.uint8),
                   image_lengths=np.array([2], np.int32), image_grid=np.array([[1, 2, 2]], np.int32))
    out = _pack([s], images=fixed)
    assert tuple(out) == PACKED_FIELDS
    assert _pack([], images=fixed)["pixel_values"].shape == (0, 2, 2, 3)


@pytest.mark.parametrize("bad", [
    "patch_dim", "pixels_3d", "grid_product", "grid_count_low", "grid_count_high", "start_outside", "no_grid",
])
def test_native_shapes_validated(bad: str) -> None:
    good = _unit([1, 7, 7, 3], [1], [(1, 2, 4)], lengths=[2])
    s = {
        "patch_dim": SampleData(good.input_ids, good.image_starts, np.zeros((8, PD + 1), np.uint8),
                                good.image_lengths, good.image_grid),
        "pixels_3d": SampleData(good.input_ids, good.image_starts, np.zeros((8, 3, 4), np.uint8),
                                good.image_lengths, good.image_grid),
        "grid_product": SampleData(good.input_ids, good.image_starts, np.zeros((7, PD), np.uint8),
                                   good.image_lengths, good.image_grid),
        "grid_count_low": SampleData(good.input_ids, good.image_starts, np.zeros((0, PD), np.uint8),
                                     good.image_lengths, np.zeros((0, 3), np.int32)),
        "grid_count_high": SampleData(good.input_ids, good.image_starts, np.zeros((16, PD), np.uint8),
                                      good.image_lengths, np.array([[1, 2, 4], [1, 2, 4]], np.int32)),
        "start_outside": SampleData(good.input_ids, np.array([4], np.int32), good.pixels, good.image_lengths,
                                    good.image_grid),
        "no_grid": SampleData(good.input_ids, good.image_starts, good.pixels, good.image_lengths, None),
    }[bad]
    _pack([good])  # the baseline packs
    with pytest.raises(ValueError, match="sample 1"):
        _pack([good, s], sample_ids=np.array([10, 11]))


def test_native_geometry_must_match_the_spec() -> None:
    s = _unit([1, 7, 7, 3], [1], [(1, 2, 4)], lengths=[2])
    other = ImageSpec(mode="native", patch_size=14, merge_size=2)
    with pytest.raises(ValueError):
        _pack([s], images=other)


def test_meta_lengths_validated() -> None:
    s = _unit([1, 2], [], [])
    with pytest.raises(ValueError, match="source_ids"):
        pack_micro_batch([s], source_ids=np.zeros(2), sample_ids=np.zeros(1), pieces=np.zeros(1), images=SPEC)
    with pytest.raises(ValueError):
        pack_micro_batch([s], source_ids=np.zeros(1), sample_ids=np.zeros(1), pieces=np.zeros(1))
    with pytest.raises(ValueError):
        pack_micro_batch([s], source_ids=np.zeros(1), sample_ids=np.zeros(1), pieces=np.zeros(1), image_size=0)


# ------------------------------------------------------------------------------------------
# labels from targets and image blocks


def test_block_of_three_at_offset_two() -> None:
    """ids t0 t1 I I I t5 t6: targets t0 t1 X X X t5 t6, labels = targets shifted left by one,
    X at the end. t1 (predicting an image token) and the block's first two tokens get X; the
    block's last token predicts t5."""
    ids = [40, 41, 9, 9, 9, 45, 46]
    s = _unit(ids, [2], [(1, 2, 6)], lengths=[3])       # 12 patches = 3 tokens
    out = _pack([s])
    np.testing.assert_array_equal(out["labels"], [41, X, X, X, 45, 46, X])
    # image token id 9 is not pack.IMAGE_ID: only image_lengths says where the block is
    assert IMAGE_ID != 9


def test_image_lengths_win_over_the_image_id() -> None:
    """With image_lengths, a text token that happens to equal IMAGE_ID (an HF vocabulary's
    ``</s>`` is id 2) is trained on; without them, the run of IMAGE_ID tokens is the block."""
    ids = [30, 31, IMAGE_ID]                    # ends in an EOS whose id is 2
    with_lengths = SampleData(np.array(ids, np.int32), np.zeros(0, np.int32), np.zeros((0, PD), np.uint8),
                              image_lengths=np.zeros(0, np.int32), image_grid=np.zeros((0, 3), np.int32))
    np.testing.assert_array_equal(_pack([with_lengths])["labels"], [31, IMAGE_ID, X])
    without = SampleData(np.array(ids, np.int32), np.zeros(0, np.int32), np.zeros((0, PD), np.uint8),
                         image_lengths=None, image_grid=np.zeros((0, 3), np.int32))
    np.testing.assert_array_equal(_pack([without])["labels"], [31, X, X])


def test_targets_become_shifted_labels() -> None:
    # a pre-tokenized sample: targets in the HF convention (X = no loss there)
    a = _unit([50, 51, 52, 53, 54], [], [], targets=[X, X, 52, 53, X])
    b = _unit([60, 61, 62], [], [], targets=[60, 61, 62])
    c = _unit([70, 9, 71], [1], [(1, 2, 2)], lengths=[1])   # no targets, one image token
    out = _pack([a, b, c])
    np.testing.assert_array_equal(out["labels"], [X, 52, 53, X, X,  61, 62, X,  X, 71, X])


def test_targets_length_must_match() -> None:
    a = _unit([50, 51, 52], [], [], targets=[1, 2])
    with pytest.raises(ValueError, match="targets"):
        _pack([a])


def _reference_labels(samples: list[SampleData]) -> list[int]:
    out: list[int] = []
    for s in samples:
        ids = s.input_ids.tolist()
        if s.targets is not None:
            tg = s.targets.tolist()
        else:
            tg = list(ids)
            for st, ln in zip(s.image_starts.tolist(), s.image_lengths.tolist()):
                for j in range(st, st + ln):
                    tg[j] = X
        for i in range(len(ids)):
            out.append(tg[i + 1] if i + 1 < len(ids) else X)
    return out


def test_random_micro_batches_against_a_slow_reference() -> None:
    rng = np.random.default_rng(0)
    for _ in range(60):
        samples = []
        for _ in range(int(rng.integers(0, 6))):
            grids, starts, lengths, ids = [], [], [], []
            for _ in range(int(rng.integers(0, 4))):
                ids += rng.integers(3, 1000, int(rng.integers(0, 4))).tolist()
                gh, gw = 2 * int(rng.integers(1, 4)), 2 * int(rng.integers(1, 4))
                starts.append(len(ids))
                lengths.append(gh * gw // 4)
                grids.append((1, gh, gw))
                ids += [int(rng.integers(0, 5))] * lengths[-1]   # any id: image_lengths say it
            ids += rng.integers(0, 1000, int(rng.integers(1 if not ids else 0, 5))).tolist()
            targets = None
            if not grids and rng.random() < 0.5:
                targets = np.where(rng.random(len(ids)) < 0.4, X, rng.integers(0, 1000, len(ids))).tolist()
            samples.append(_unit(ids, starts, grids, fill=int(rng.integers(0, 256)), lengths=lengths,
                                 targets=targets))
        out = _pack(samples)
        assert tuple(out) == NATIVE_FIELDS
        np.testing.assert_array_equal(out["input_ids"], [i for s in samples for i in s.input_ids.tolist()])
        np.testing.assert_array_equal(out["labels"], _reference_labels(samples))
        base, offsets, grids, rows = 0, [], [], []
        for s in samples:
            offsets += [base + st for st in s.image_starts.tolist()]
            grids += s.image_grid.tolist()
            rows += s.pixels.tolist()
            base += len(s.input_ids)
        np.testing.assert_array_equal(out["image_token_offsets"], np.array(offsets, np.int32))
        np.testing.assert_array_equal(out["image_grid_thw"], np.array(grids, np.int32).reshape(-1, 3))
        np.testing.assert_array_equal(out["pixel_values"], np.array(rows, np.uint8).reshape(-1, PD))
        assert out["pixel_values"].shape[0] == int(np.prod(out["image_grid_thw"], axis=1).sum())
        np.testing.assert_array_equal(out["cu_seqlens"], np.cumsum([0] + [len(s.input_ids) for s in samples]))

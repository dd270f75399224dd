"""``transform`` / ``SampleLoader`` with native-resolution images, on a real Parquet source
written here: image blocks sized by the resize rule, where ``image_starts`` says, filled with
the tokenizer's image id; the length rule's cut (a block straddling ``max_seq_len`` is dropped
whole) equal to :func:`truncated_lengths`, with the byte tokenizer and a BOS-adding BPE.

Expected units are built by a slow reference written from the module docstrings."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from fabricd.errors import SampleError
from fabricd.images import ImageSpec, decode_native
from fabricd.sources import SampleData, SampleLoader, TransformSpec, open_index, transform
from fabricd.sources.formats.base import RawSample
from fabricd.sources.transform import image_tokens_per_sample, truncated_lengths
from fabricd.text import TokenizerSpec, load_tokenizer
from fabricd.text.train import train_bpe

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]

# p = 2, m = 2 (f = 4), pixels in [64, 2048]
SPEC = ImageSpec(mode="native", patch_size=2, merge_size=2, min_pixels=64, max_pixels=2048)
PH = "<image>"


def _ref_hw(h: int, w: int, spec: ImageSpec = SPEC) -> tuple[int, int]:
    """The module docstring's resize rule, scalar."""
    f = spec.patch_size * spec.merge_size
    H, W = max(f, round(h / f) * f), max(f, round(w / f) * f)
    if H * W > spec.max_pixels:
        b = math.sqrt(h * w / spec.max_pixels)
        H, W = max(f, math.floor(h / b / f) * f), max(f, math.floor(w / b / f) * f)
    elif H * W < spec.min_pixels:
        b = math.sqrt(spec.min_pixels / (h * w))
        H, W = math.ceil(h * b / f) * f, math.ceil(w * b / f) * f
    return H, W


def _ref_tokens(h: int, w: int) -> int:
    H, W = _ref_hw(h, w)
    return (H // 2) * (W // 2) // 4


def test_reference_tokens_by_hand() -> None:
    # (8,12): aligned -> grid 4x6 -> 6 tokens; (10,10): 8x8 -> grid 4x4 -> 4;
    # (3,5): 4x4 = 16 < 64 -> b = sqrt(64/15) = 2.066, 4*ceil(1.55) x 4*ceil(2.58) = 8x12 -> 6;
    # (60,40): 2400 > 2048 -> b = sqrt(2400/2048) = 1.0825, 4*floor(13.86) x 4*floor(9.24) = 52x36 -> 117
    assert [_ref_tokens(*hw) for hw in [(8, 12), (10, 10), (3, 5), (60, 40)]] == [6, 4, 6, 117]
    h, w = np.array([8, 10, 3, 60]), np.array([12, 10, 5, 40])
    np.testing.assert_array_equal(SPEC.tokens(h, w), [6, 4, 6, 117])


def _png(h: int, w: int, seed: int, fmt: str = "PNG") -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (h, w, 3)).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


# (text, image sizes (h, w)); a sample's image i has seed 100 * sample + i
SAMPLES: list[tuple[str, list[tuple[int, int]]]] = [
    ("a cat <image> sits on the mat.", [(8, 12)]),
    (f"{PH}{PH} two in a row", [(10, 10), (3, 5)]),
    ("no placeholder: both images go first", [(8, 12), (60, 40)]),
    (f"x{PH}y{PH}z{PH}w", [(3, 5), (10, 10)]),                # one placeholder too many: removed
    ("plain text, no image at all", []),
    ("L" * 60 + PH + " tail", [(60, 40)]),                     # block 60..177: straddles 100
    ("M" * 97 + PH + " tail", [(8, 12)]),                      # block 97..103: straddles 100
    ("N" * 94 + PH + " tail", [(8, 12)]),                      # block 94..100: fits exactly, text cut
    ("O" * 94 + PH, [(8, 12)]),                                # block fits exactly, EOS cut
    (PH + " rest", [(60, 40)]),                                # 117-token block at 0: empty unit
    ("lead image then " + "long text " * 12, [(10, 10)]),      # cut in the text after a lead block
    (f"pre {PH} mid {PH}" + " end" * 20, [(8, 12), (60, 40)]),  # block 4..10 kept, block 15..132 straddles
    (f"a{PH}b{PH}c", [(3, 5), (8, 12)]),                        # short, fits
]
M = 100


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("native_src")
    texts = [t for t, _ in SAMPLES]
    images = [[_png(h, w, 100 * k + i, "JPEG" if (k, i) == (2, 1) else "PNG") for i, (h, w) in enumerate(hws)]
              for k, (_, hws) in enumerate(SAMPLES)]
    table = pa.table({"text": pa.array(texts), "images": pa.array(images, type=pa.list_(pa.binary()))})
    pq.write_table(table, d / "part-00000.parquet", row_group_size=4)
    return d


@pytest.fixture(scope="module")
def raw_images(source: Path) -> list[list[bytes]]:
    return pq.read_table(source / "part-00000.parquet").column("images").to_pylist()


@pytest.fixture(scope="module")
def bpe(tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("bpe")
    corpus = [t.replace(PH, " ") for t, _ in SAMPLES] * 5 + ["the quick brown fox jumps over the lazy dog"] * 5
    path = train_bpe(corpus, d, vocab_size=320)
    return load_tokenizer(TokenizerSpec(kind="hf", path=path, bos="<s>"), parallel=False)


def _encode(tok, text: str) -> list[int]:
    if tok.kind == "bytes":
        return [b + 3 for b in text.encode("utf-8")]
    return tok.encode_texts([text])[0].tolist()


def _expected(tok, text: str, hws: list[tuple[int, int]], m: int):
    """(ids, [(start, image index)]) of the unit, or None for an empty unit: the length rule."""
    n = len(hws)
    parts = text.split(PH)
    if len(parts) - 1 > n:
        parts = parts[:n] + ["".join(parts[n:])]
    holders = len(parts) - 1
    segs: list[tuple[str, object]] = []
    if tok.bos_id is not None:
        segs.append(("t", [tok.bos_id]))
    segs += [("i", i) for i in range(holders, n)]
    for k, part in enumerate(parts):
        if k:
            segs.append(("i", k - 1))
        segs.append(("t", _encode(tok, part)))
    segs.append(("t", [tok.eos_id]))
    out: list[int] = []
    blocks: list[tuple[int, int]] = []
    for kind, val in segs:
        if kind == "i":
            ln = _ref_tokens(*hws[val])
            if len(out) + ln > m:
                break
            blocks.append((len(out), val))
            out += [tok.image_id] * ln
        else:
            room = m - len(out)
            out += val[:room]
            if len(val) > room:
                break
    return (out, blocks) if out else None


def _check_unit(unit: SampleData, want, hws: list[tuple[int, int]], images: list[bytes], tok) -> None:
    ids, blocks = want
    assert isinstance(unit, SampleData)
    np.testing.assert_array_equal(unit.input_ids, ids)
    assert unit.input_ids.dtype == np.int32
    np.testing.assert_array_equal(unit.image_starts, [s for s, _ in blocks])
    lengths = [_ref_tokens(*hws[i]) for _, i in blocks]
    np.testing.assert_array_equal(unit.image_lengths, lengths)
    grids = [(1, _ref_hw(*hws[i])[0] // 2, _ref_hw(*hws[i])[1] // 2) for _, i in blocks]
    np.testing.assert_array_equal(unit.image_grid, np.array(grids, np.int32).reshape(-1, 3))
    for st, ln in zip(unit.image_starts.tolist(), unit.image_lengths.tolist()):
        assert np.all(unit.input_ids[st:st + ln] == tok.image_id)
    # every image-id token of the unit is inside a block
    inside = np.zeros(len(ids), bool)
    for st, ln in zip(unit.image_starts.tolist(), lengths):
        inside[st:st + ln] = True
    np.testing.assert_array_equal(unit.input_ids == tok.image_id, inside)
    assert unit.pixels.dtype == np.uint8 and unit.pixels.shape == (sum(g[1] * g[2] for g in grids), SPEC.patch_dim)
    if blocks:
        want_px = np.concatenate([decode_native(images[i], SPEC, hws[i])[0] for _, i in blocks])
        np.testing.assert_array_equal(unit.pixels, want_px)
    assert unit.targets is None


def _loader(source: Path, tok, m: int) -> SampleLoader:
    index = open_index("native", source, tokenizer=tok)
    return SampleLoader(index, TransformSpec(max_seq_len=m, long_samples="truncate", images=SPEC), tokenizer=tok)


def _check_all(source: Path, raw_images: list[list[bytes]], tok, ms: list[int]) -> dict[int, list]:
    index = open_index("native", source, tokenizer=tok)
    assert index.num_samples == len(SAMPLES)
    np.testing.assert_array_equal(index.image_h, [h for _, hws in SAMPLES for h, _ in hws])
    np.testing.assert_array_equal(index.image_w, [w for _, hws in SAMPLES for _, w in hws])
    seen = {}
    for m in ms:
        loader = _loader(source, tok, m)
        try:
            units = loader.load(np.arange(len(SAMPLES)), np.zeros(len(SAMPLES), np.int64))
        finally:
            loader.close()
        cut = truncated_lengths(index, SPEC, m)
        assert cut.dtype == np.int64 and cut.shape == (len(SAMPLES),)
        for k, ((text, hws), unit) in enumerate(zip(SAMPLES, units)):
            want = _expected(tok, text, hws, m)
            if want is None:
                assert isinstance(unit, SampleError), (m, k)
                assert "empty unit" in unit.reason
                assert cut[k] == -1, (m, k)
                continue
            _check_unit(unit, want, hws, raw_images[k], tok)
            assert cut[k] == (len(want[0]) if hws else -1), (m, k, cut[k], len(want[0]))
        seen[m] = units
    return seen


def test_bytes_tokenizer_units_at_m100(source: Path, raw_images) -> None:
    tok = load_tokenizer(None)
    units = _check_all(source, raw_images, tok, [M])[M]
    cut = truncated_lengths(open_index("native", source, tokenizer=tok), SPEC, M)
    # the deliberate cases, by hand
    assert len(units[5].input_ids) == 60 and units[5].image_starts.size == 0 and cut[5] == 60   # straddles: dropped
    assert len(units[6].input_ids) == 97 and units[6].image_starts.size == 0 and cut[6] == 97
    assert len(units[7].input_ids) == 100 and units[7].image_starts.tolist() == [94] and cut[7] == 100
    assert units[7].input_ids[-1] == 2 and units[7].input_ids[93] == ord("N") + 3
    assert len(units[8].input_ids) == 100 and units[8].input_ids[-1] == 2 and cut[8] == 100  # no EOS
    assert isinstance(units[9], SampleError) and cut[9] == -1                                 # 117 > 100 at 0
    assert cut[4] == -1                                                                       # no images
    assert units[0].image_starts.tolist() == [6] and units[0].image_lengths.tolist() == [6]
    assert units[1].image_starts.tolist() == [0, 4] and units[1].image_lengths.tolist() == [4, 6]
    # lead images in list order: (8,12) 6 tokens then (60,40) 117 tokens: the second straddles
    assert units[2].image_starts.tolist() == [0] and len(units[2].input_ids) == 6
    assert units[3].image_starts.tolist() == [1, 8]
    assert bytes(b - 3 for b in units[3].input_ids[-3:-1].tolist()) == b"zw"   # extra placeholder removed
    assert units[11].image_starts.tolist() == [4] and len(units[11].input_ids) == 15 and cut[11] == 15


def test_bytes_tokenizer_sweep_of_context_lengths(source: Path, raw_images) -> None:
    """Around every block boundary, the loaded unit is the reference's and its length is
    truncated_lengths'."""
    tok = load_tokenizer(None)
    ms = sorted({1, 2, 5, 6, 7, 30, 59, 60, 61, 93, 94, 95, 96, 97, 98, 99, 100, 101, 102, 103, 104, 116, 117,
                 118, 119, 130, 176, 177, 178, 179, 200, 400})
    _check_all(source, raw_images, tok, ms)


def test_image_tokens_per_sample(source: Path) -> None:
    index = open_index("native", source, tokenizer=load_tokenizer(None))
    total, p1, p2 = image_tokens_per_sample(index, SPEC)
    for k, (_, hws) in enumerate(SAMPLES):
        pt = [(_ref_hw(*hw)[0] // 2) * (_ref_hw(*hw)[1] // 2) for hw in hws]
        assert total[k] == sum(_ref_tokens(*hw) for hw in hws)
        assert p1[k] == sum(pt) and p2[k] == sum(x * x for x in pt)
    assert total.dtype == np.int64


def test_bpe_with_bos(source: Path, raw_images, bpe) -> None:
    tok = bpe
    assert tok.bos_id is not None and tok.image_id != tok.bos_id
    units = _check_all(source, raw_images, tok, [M])[M]
    assert all(u.input_ids[0] == tok.bos_id for u in units if isinstance(u, SampleData))
    # a lead image follows BOS
    assert units[1].image_starts.tolist()[0] == 1 and units[2].image_starts.tolist() == [1]
    # the 117-token block right after BOS straddles 100: a unit of BOS alone, like the planner says
    index = open_index("native", source, tokenizer=tok)
    assert units[9].input_ids.tolist() == [tok.bos_id]
    assert truncated_lengths(index, SPEC, M)[9] == 1


def test_bpe_with_bos_straddling_cut_built_deliberately(source: Path, raw_images, bpe) -> None:
    tok = bpe
    index = open_index("native", source, tokenizer=tok)
    # sample 6: BOS + tokens("M" * 97) + 6-token block: pick contexts around that block
    before = 1 + len(_encode(tok, "M" * 97))
    tail = len(_encode(tok, " tail"))
    ms = sorted({before - 1, before, before + 1, before + 3, before + 5, before + 6, before + 7,
                 before + 6 + tail, before + 6 + tail + 1, before + 6 + tail + 2})
    for m in ms:
        cut = truncated_lengths(index, SPEC, m)
        loader = _loader(source, tok, m)
        try:
            (unit,) = loader.load(np.array([6]), np.array([0]))
        finally:
            loader.close()
        if before < m < before + 6:          # the block straddles the boundary: the unit ends at its start
            assert len(unit.input_ids) == before and unit.image_starts.size == 0
        elif m >= before + 6:
            assert unit.image_starts.tolist() == [before] and len(unit.input_ids) == min(m, before + 6 + tail + 1)
        assert cut[6] == len(unit.input_ids), (m, cut[6], len(unit.input_ids))
    _check_all(source, raw_images, tok, ms)


def test_bpe_sweep_of_context_lengths(source: Path, raw_images, bpe) -> None:
    _check_all(source, raw_images, bpe, [1, 2, 3, 7, 8, 20, 50, 99, 101, 117, 118, 119, 150, 300])


def test_transform_direct_native_with_and_without_index_dims() -> None:
    imgs = (_png(8, 12, 1), _png(3, 5, 2))
    raw = RawSample(text=f"ab{PH}cd", images=imgs)
    spec = TransformSpec(max_seq_len=50, long_samples="truncate", images=SPEC)
    from_header = transform(raw, 0, spec)
    from_index = transform(raw, 0, spec, image_hw=np.array([[8, 12], [3, 5]]))
    for u in (from_header, from_index):
        # image 1 has no placeholder: it goes first; then "ab", image 0, "cd", EOS
        assert u.input_ids.tolist() == [2] * 6 + [ord("a") + 3, ord("b") + 3] + [2] * 6 + [ord("c") + 3,
                                                                                       ord("d") + 3, 1]
        assert u.image_starts.tolist() == [0, 8] and u.image_lengths.tolist() == [6, 6]
        assert u.image_grid.tolist() == [[1, 4, 6], [1, 4, 6]]
        np.testing.assert_array_equal(u.pixels, np.concatenate([decode_native(imgs[1], SPEC, (3, 5))[0],
                                                                decode_native(imgs[0], SPEC, (8, 12))[0]]))
    # dims that no longer match the image: a SampleError naming it, not a crash
    with pytest.raises(SampleError, match="image 0"):
        transform(raw, 0, spec, source="s", sample_id=3, image_hw=np.array([[12, 8], [3, 5]]))
    with pytest.raises(SampleError):
        transform(raw, 1, spec)   # a sample with images has one piece
    # an undecodable image is a SampleError too
    bad = RawSample(text=f"x{PH}", images=(b"garbage",))
    with pytest.raises(SampleError):
        transform(bad, 0, spec, image_hw=np.array([[8, 12]]))


def test_loader_text_only_pieces_with_split(source: Path) -> None:
    tok = load_tokenizer(None)
    index = open_index("native", source, tokenizer=tok)
    loader = SampleLoader(index, TransformSpec(max_seq_len=10, long_samples="split", images=SPEC), tokenizer=tok)
    try:
        text = SAMPLES[4][0]
        full = [b + 3 for b in text.encode()] + [1]
        pieces = -(-len(full) // 10)
        units = loader.load(np.full(pieces + 1, 4), np.arange(pieces + 1))
    finally:
        loader.close()
    for j in range(pieces):
        assert units[j].input_ids.tolist() == full[j * 10:(j + 1) * 10]
        assert units[j].pixels.shape == (0, SPEC.patch_dim) and units[j].image_grid.shape == (0, 3)
    assert isinstance(units[pieces], SampleError)
    assert truncated_lengths(index, SPEC, 10)[4] == -1

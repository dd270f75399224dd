"""Unit tests of the transform: the length rule, placeholder semantics, images, SampleLoader."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fabricd.corpus import make_dataset
from fabricd.errors import SampleError
from fabricd.sources import (
    RawSample,
    SampleData,
    SampleLoader,
    SourceReader,
    TransformSpec,
    num_pieces,
    open_index,
    transform,
    unit_lengths,
)
from fabricd.tokenizer import EOS_ID, IMAGE_ID, IMAGE_PLACEHOLDER

pytestmark = pytest.mark.unit

SOURCES = ("captions", "interleaved", "longdocs", "code", "ocr")



@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("corpus")
    make_dataset(out, 40, seed=11, progress=False)
    return out


def _png(color: tuple[int, int, int], size: tuple[int, int] = (20, 12), mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).convert(mode).save(buf, format="PNG")
    return buf.getvalue()


def _reference(raw: RawSample, t: int) -> tuple[list[int], list[tuple[int, int]]]:
    """The full token sequence and its (block start, image index), written the slow, obvious way."""
    parts = raw.text.split(IMAGE_PLACEHOLDER)
    n = len(raw.images)
    if len(parts) - 1 > n:
        parts = parts[:n] + ["".join(parts[n:])]
    holders = len(parts) - 1
    seq: list[int] = []
    blocks: list[tuple[int, int]] = []
    for i in range(holders, n):
        blocks.append((len(seq), i))
        seq += [IMAGE_ID] * t
    for k, part in enumerate(parts):
        if k:
            blocks.append((len(seq), k - 1))
            seq += [IMAGE_ID] * t
        seq += [b + 3 for b in part.encode("utf-8")]
    return seq + [EOS_ID], blocks


def _expected(raw: RawSample, piece: int, spec: TransformSpec) -> tuple[list[int], list[tuple[int, int]]]:
    seq, blocks = _reference(raw, spec.image_tokens)
    m = spec.max_seq_len
    if not raw.images and spec.long_samples == "split":
        return seq[piece * m:(piece + 1) * m], []
    cut = m
    for start, _ in blocks:
        if start < m < start + spec.image_tokens:
            cut = start
    return seq[:cut], [b for b in blocks if b[0] + spec.image_tokens <= cut]


SPECS = [
    TransformSpec(max_seq_len=256, long_samples="split", image_tokens=16, image_size=8),
    TransformSpec(max_seq_len=300, long_samples="truncate", image_tokens=64, image_size=8),
    TransformSpec(max_seq_len=1000, long_samples="split", image_tokens=100, image_size=8),
    TransformSpec(max_seq_len=4096, long_samples="truncate", image_tokens=32, image_size=8),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.long_samples}-{s.max_seq_len}-{s.image_tokens}")
def test_length_rule_on_generated_corpus(corpus: Path, spec: TransformSpec) -> None:
    cut_seen = 0
    for source in SOURCES:
        idx = open_index(source, corpus / source)
        pieces = num_pieces(idx.num_images, idx.text_tokens, spec)
        raws = SourceReader(idx).read(np.arange(idx.num_samples))
        ids = np.repeat(np.arange(idx.num_samples), pieces)
        pcs = np.concatenate([np.arange(p) for p in pieces])
        lengths = unit_lengths(idx.num_images[ids], idx.text_tokens[ids], pcs, spec)
        units = SampleLoader(idx, spec).load(ids, pcs)
        for sid, piece, bound, unit in zip(ids, pcs, lengths, units):
            assert isinstance(unit, SampleData), unit
            raw = raws[sid]
            want, blocks = _expected(raw, int(piece), spec)
            assert unit.input_ids.dtype == np.int32 and unit.input_ids.tolist() == want
            assert unit.image_starts.tolist() == [s for s, _ in blocks]
            assert unit.pixels.shape == (len(blocks), 8, 8, 3) and unit.pixels.dtype == np.uint8
            if len(want) == bound:
                continue
            cut_seen += 1  # only a cut image block may make a unit shorter than the rule's bound
            assert len(want) < bound and idx.num_images[sid] > 0
            assert unit.input_ids.shape[0] + spec.image_tokens > spec.max_seq_len
        with pytest.raises(SampleError, match="out of range"):
            transform(raws[0], int(pieces[0]), spec, source=source, sample_id=0)
    if spec.long_samples == "truncate" and spec.max_seq_len == 300:
        assert cut_seen > 0, "the corpus should exercise the image-cut case"


def test_split_pieces_reassemble() -> None:
    text = "é" * 700 + "<image>" + "z" * 33
    raw = RawSample(text, ())
    spec = TransformSpec(max_seq_len=128, long_samples="split", image_tokens=4, image_size=4)
    n = int(num_pieces(np.array([0]), np.array([1400 + 33 + 1]), spec)[0])
    assert n == 12
    parts = [transform(raw, j, spec).input_ids for j in range(n)]
    assert [len(p) for p in parts] == [128] * 11 + [1434 - 11 * 128]
    assert np.concatenate(parts).tolist() == _reference(raw, 4)[0]
    trunc = TransformSpec(max_seq_len=128, long_samples="truncate", image_tokens=4, image_size=4)
    assert transform(raw, 0, trunc).input_ids.tolist() == _reference(raw, 4)[0][:128]
    with pytest.raises(SampleError):
        transform(raw, 1, trunc)
    with pytest.raises(SampleError):
        transform(raw, -1, spec)


RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def test_placeholders_and_images_first() -> None:
    spec = TransformSpec(max_seq_len=1000, long_samples="split", image_tokens=3, image_size=6)
    raw = RawSample("a<image>b<image>c", (_png(RED), _png(GREEN), _png(BLUE, mode="L")))
    out = transform(raw, 0, spec)
    # image 2 has no placeholder: it goes first; placeholders take images 0 and 1 in order
    b = lambda s: [x + 3 for x in s.encode()]  # noqa: E731
    assert out.input_ids.tolist() == [2, 2, 2] + b("a") + [2, 2, 2] + b("b") + [2, 2, 2] + b("c") + [EOS_ID]
    assert out.image_starts.tolist() == [0, 4, 8]
    assert out.pixels.shape == (3, 6, 6, 3)
    gray_blue = Image.new("RGB", (1, 1), BLUE).convert("L").getpixel((0, 0))
    assert out.pixels[0].reshape(-1, 3)[0].tolist() == [gray_blue] * 3
    assert out.pixels[1].reshape(-1, 3)[0].tolist() == list(RED)
    assert out.pixels[2].reshape(-1, 3)[0].tolist() == list(GREEN)


def test_extra_placeholders_removed() -> None:
    spec = TransformSpec(max_seq_len=100, long_samples="truncate", image_tokens=2, image_size=4)
    out = transform(RawSample("x<image>y<image>z", (_png(RED),)), 0, spec)
    assert out.input_ids.tolist() == [ord("x") + 3, 2, 2, ord("y") + 3, ord("z") + 3, EOS_ID]
    text_only = transform(RawSample("<image>p<image>", ()), 0, spec)
    assert text_only.input_ids.tolist() == [ord("p") + 3, EOS_ID] and text_only.pixels.shape == (0, 4, 4, 3)
    caption = transform(RawSample("hi", (_png(RED), _png(GREEN))), 0, spec)
    assert caption.image_starts.tolist() == [0, 2]
    assert caption.pixels[:, 0, 0].tolist() == [list(RED), list(GREEN)]


def test_image_cut_by_truncation_is_dropped_and_not_decoded() -> None:
    corrupt = b"\x89PNG\r\n\x1a\n" + b"\x00" * 50
    raw = RawSample("ab<image>cd<image>ef", (_png(RED), corrupt))
    spec = TransformSpec(max_seq_len=8, long_samples="split", image_tokens=4, image_size=5)
    out = transform(raw, 0, spec)  # a b [4] c d | second block would end at 12 > 8: dropped
    assert out.input_ids.tolist() == [ord("a") + 3, ord("b") + 3, 2, 2, 2, 2, ord("c") + 3, ord("d") + 3]
    assert out.image_starts.tolist() == [2] and out.pixels.shape == (1, 5, 5, 3)
    spec7 = TransformSpec(max_seq_len=5, long_samples="truncate", image_tokens=4, image_size=5)
    short = transform(raw, 0, spec7)  # the first block (2..6) is cut: the unit ends at 2
    assert short.input_ids.tolist() == [ord("a") + 3, ord("b") + 3] and short.pixels.shape[0] == 0
    with pytest.raises(SampleError, match="empty unit"):
        transform(RawSample("x", (_png(RED),)), 0,
                  TransformSpec(max_seq_len=3, long_samples="truncate", image_tokens=4, image_size=5))
    with pytest.raises(SampleError, match="image 1"):
        transform(raw, 0, TransformSpec(max_seq_len=100, long_samples="truncate", image_tokens=4, image_size=5),
                  source="s", sample_id=9)


@pytest.mark.parametrize("data", [
    b"",
    b"not an image at all",
    _png(RED, size=(64, 64))[:60],
    b"\xff\xd8\xff\xe0" + b"\x00" * 200,
])
def test_corrupt_image_is_sample_error(data: bytes) -> None:
    spec = TransformSpec(max_seq_len=100, long_samples="split", image_tokens=2, image_size=4)
    with pytest.raises(SampleError) as err:
        transform(RawSample("<image> x", (data,)), 0, spec, source="src", sample_id=42)
    assert err.value.source == "src" and err.value.sample_id == 42


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_decompression_bomb_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    spec = TransformSpec(max_seq_len=100, long_samples="split", image_tokens=2, image_size=4)
    for size in [(40, 40), (64, 64)]:  # above the warning limit, above Pillow's own error limit
        with pytest.raises(SampleError, match="(?i)decompression"):
            transform(RawSample("x", (_png(RED, size=size),)), 0, spec)
    assert transform(RawSample("x", (_png(RED, size=(30, 30)),)), 0, spec).pixels.shape == (1, 4, 4, 3)


def test_spec_validation() -> None:
    with pytest.raises(ValueError, match="long_samples"):
        TransformSpec(max_seq_len=10, long_samples="drop", image_tokens=1, image_size=1)
    with pytest.raises(ValueError, match="max_seq_len"):
        TransformSpec(max_seq_len=0, long_samples="split", image_tokens=1, image_size=1)


def test_loader_with_corrupt_corpus(tmp_path: Path) -> None:
    counts = make_dataset(tmp_path, 30, seed=2, corrupt_fraction=0.2, progress=False)
    spec = TransformSpec(max_seq_len=2048, long_samples="truncate", image_tokens=16, image_size=16)
    idx = open_index("captions", tmp_path / "captions")
    loader = SampleLoader(idx, spec)
    out = loader.load(np.arange(idx.num_samples), np.zeros(idx.num_samples, np.int64))
    errors = [o for o in out if isinstance(o, SampleError)]
    assert len(errors) == counts["captions"]["corrupt_images"] > 0
    assert all(e.source == "captions" and "decode" in e.reason for e in errors)
    good = [o for o in out if isinstance(o, SampleData)]
    assert all(o.pixels.shape == (1, 16, 16, 3) for o in good)
    with pytest.raises(ValueError):
        loader.load(np.arange(3), np.zeros(2))
    loader.close()

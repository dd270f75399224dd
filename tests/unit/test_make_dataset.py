"""Unit tests of the dataset generator: deterministic, realistic, corruptible on purpose."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from fabricd.corpus import main, make_dataset
from fabricd.errors import SampleError
from fabricd.sources import SampleLoader, TransformSpec, open_index

pytestmark = pytest.mark.unit


def _checksums(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and ".fabricd-index" not in p.as_posix()}


def test_deterministic_for_a_seed(tmp_path: Path) -> None:
    a = make_dataset(tmp_path / "a", 12, seed=7, progress=False, corrupt_fraction=0.1)
    b = make_dataset(tmp_path / "b", 12, seed=7, progress=False, corrupt_fraction=0.1, workers=2)
    make_dataset(tmp_path / "c", 12, seed=8, progress=False, corrupt_fraction=0.1)
    assert a == b
    assert _checksums(tmp_path / "a") == _checksums(tmp_path / "b")
    sums_c = _checksums(tmp_path / "c")
    assert sums_c.keys() == _checksums(tmp_path / "a").keys() and sums_c != _checksums(tmp_path / "a")


def test_corpus_shape(tmp_path: Path) -> None:
    counts = make_dataset(tmp_path, 40, seed=1, progress=False, rows_per_group=16)
    assert set(counts) == {"captions", "interleaved", "longdocs", "code", "ocr"}
    for name, c in counts.items():
        assert c["samples"] == 40 and c["files"] >= 2 and c["bytes"] > 0
        idx = open_index(name, tmp_path / name)
        assert idx.num_samples == 40 and idx.rows_skipped == 0 and idx.files_skipped == ()
        assert idx.num_images.sum() == c["images"]
    cap = pq.ParquetFile(tmp_path / "captions" / "part-00000.parquet")
    assert cap.metadata.num_row_groups > 1 and cap.metadata.row_group(0).num_rows == 16
    rows = cap.read().to_pylist()
    sizes = set()
    for row in rows:
        (img,) = row["images"]
        with Image.open(io.BytesIO(img)) as im:
            assert im.format == "JPEG"
            im.load()
            sizes.add(im.size)
            assert all(96 <= s <= 512 for s in im.size)
        assert 10 <= len(row["text"].replace("<image>", "").split()) <= 61
    assert len(sizes) > 10  # varied sizes
    inter = open_index("interleaved", tmp_path / "interleaved")
    assert inter.num_images.min() >= 1 and inter.num_images.max() <= 6
    docs = open_index("longdocs", tmp_path / "longdocs")
    assert docs.text_tokens.min() >= 400 and docs.text_tokens.max() <= 32768
    code = pq.read_table(tmp_path / "code").column("text").to_pylist()
    assert all(100 <= len(t.encode()) <= 8000 for t in code) and any("{" in t and "    " in t for t in code)
    line = (tmp_path / "ocr" / "part-00000.jsonl").read_text().splitlines()[0]
    page = json.loads(line)
    with Image.open(tmp_path / "ocr" / page["images"][0]) as im:
        assert im.format == "PNG"
    assert 480 <= len(page["text"].encode()) <= 4000


def test_corrupt_fraction_gives_sample_errors(tmp_path: Path) -> None:
    counts = make_dataset(tmp_path, 40, seed=4, corrupt_fraction=0.1, progress=False,
                                               image_format="png")
    spec = TransformSpec(max_seq_len=1 << 16, long_samples="truncate", image_tokens=8, image_size=8)
    for name in ("captions", "interleaved", "ocr"):
        idx = open_index(name, tmp_path / name)
        out = SampleLoader(idx, spec).load(np.arange(idx.num_samples), np.zeros(idx.num_samples, np.int64))
        errors = sum(isinstance(o, SampleError) for o in out)
        assert counts[name]["corrupt_images"] == round(0.1 * counts[name]["images"])
        assert 0 < errors <= counts[name]["corrupt_images"]
        if name != "interleaved":  # one image per sample: one error per corrupt image
            assert errors == counts[name]["corrupt_images"]
    ocr = open_index("ocr", tmp_path / "ocr")
    assert ocr.rows_skipped == counts["ocr"]["malformed_lines"] == 4
    assert counts["longdocs"]["corrupt_images"] == 0


def test_cli_and_refusal(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["--out", str(tmp_path), "--samples", "3", "--workers", "1"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert main(["--out", str(tmp_path), "--samples", "3"]) == 2  # not empty
    assert "exists" in capsys.readouterr().err
    assert main(["--out", str(tmp_path), "--samples", "3", "--workers", "1", "--overwrite"]) == 0
    with pytest.raises(ValueError):
        make_dataset(tmp_path / "x", 3, seed=0, corrupt_fraction=2.0, progress=False)

"""Unit tests of SourceReader: random access equals sequential, bounded cache, never raises."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fabricd.corpus import make_dataset
from fabricd.errors import SampleError, SourceError
from fabricd.sources import RawSample, SourceReader, open_index

pytestmark = pytest.mark.unit



@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("corpus")
    make_dataset(out, 40, seed=5, progress=False, rows_per_group=8)
    return out


def _expected_parquet(idx) -> list[RawSample]:
    out = []
    for fi, row in zip(idx.file_idx, idx.row):
        t = pq.read_table(idx.file_path(int(fi))).slice(int(row), 1).to_pylist()[0]
        out.append(RawSample(t["text"], tuple(t.get("images") or ())))
    return out


@pytest.mark.parametrize("source", ["captions", "interleaved", "longdocs", "ocr"])
def test_random_order_equals_sequential(corpus: Path, source: str) -> None:
    idx = open_index(source, corpus / source)
    seq = SourceReader(idx).read(np.arange(idx.num_samples))
    assert all(isinstance(s, RawSample) for s in seq)
    perm = np.random.default_rng(0).permutation(idx.num_samples)
    with SourceReader(idx, cache_bytes=1 << 16) as reader:
        rnd = reader.read(perm)
        assert [rnd[k] for k in np.argsort(perm)] == seq
        dup = reader.read(np.array([3, 3, 0, 3]))
        assert dup == [seq[3], seq[3], seq[0], seq[3]]
    if idx.format == "parquet":
        assert seq == _expected_parquet(idx)
    else:
        first = json.loads((corpus / source / idx.files[0]).read_text().splitlines()[0])
        assert seq[0].text == first["text"]
        assert seq[0].images[0] == (corpus / source / first["images"][0]).read_bytes()


def test_reads_each_row_group_once_and_cache_is_bounded(corpus: Path) -> None:
    idx = open_index("interleaved", corpus / "interleaved")
    reader = SourceReader(idx, cache_bytes=1 << 40)
    reader.read(np.arange(idx.num_samples)[::-1])
    groups = sum(pq.ParquetFile(idx.file_path(i)).num_row_groups for i in range(len(idx.files)))
    assert reader.cache_misses == groups and reader.cache_hits == 0
    reader.read(np.arange(idx.num_samples))
    assert reader.cache_misses == groups and reader.cache_nbytes > 0
    biggest = reader.cache_nbytes
    bound = 3 * biggest // groups
    small = SourceReader(idx, cache_bytes=bound)
    rng = np.random.default_rng(1)
    for _ in range(20):
        out = small.read(rng.integers(0, idx.num_samples, 7))
        assert all(isinstance(o, RawSample) for o in out)
        assert 0 < small.cache_nbytes <= bound
    assert small.cache_misses > groups  # it had to evict and re-read
    none = SourceReader(idx, cache_bytes=0)
    assert all(isinstance(o, RawSample) for o in none.read(np.arange(5)))
    assert none.cache_nbytes == 0


def test_out_of_range_ids_are_sample_errors(corpus: Path) -> None:
    idx = open_index("code", corpus / "code")
    out = SourceReader(idx).read(np.array([0, -1, idx.num_samples, 10**12, 1]))
    assert isinstance(out[0], RawSample) and isinstance(out[4], RawSample)
    for k in (1, 2, 3):
        assert isinstance(out[k], SampleError) and "out of range" in out[k].reason
        assert out[k].source == "code"
    assert out[2].sample_id == idx.num_samples
    assert SourceReader(idx).read(np.array([], dtype=np.int64)) == []


def test_changed_source_detected(tmp_path: Path) -> None:
    src = tmp_path / "s"
    src.mkdir()
    pq.write_table(pa.table({"text": ["a", "b"]}), src / "a.parquet")
    idx = open_index("s", src)
    SourceReader(idx)  # fine while unchanged
    pq.write_table(pa.table({"text": ["a", "b", "c"]}), src / "a.parquet")
    with pytest.raises(SourceError, match="re-index"):
        SourceReader(idx)
    assert SourceReader(open_index("s", src)).read(np.array([2]))[0].text == "c"


def test_bad_files_and_images_never_raise(tmp_path: Path) -> None:
    src = tmp_path / "j"
    src.mkdir()
    (src / "ok.png").write_bytes(b"png-bytes")
    lines = [{"text": "a", "images": ["ok.png"]}, {"text": "b", "images": ["gone.png"]}, {"text": "c"}]
    (src / "x.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    idx = open_index("j", src)
    out = SourceReader(idx).read(np.arange(3))
    assert out[0] == RawSample("a", (b"png-bytes",))
    assert isinstance(out[1], SampleError) and "gone.png" in out[1].reason
    assert out[2] == RawSample("c", ())

    psrc = tmp_path / "p"
    psrc.mkdir()
    pq.write_table(pa.table({"text": ["a", "b"]}), psrc / "a.parquet")
    pq.write_table(pa.table({"text": ["c"]}), psrc / "b.parquet")
    pidx = open_index("p", psrc)
    reader = SourceReader(pidx)
    st = (psrc / "b.parquet").stat()
    (psrc / "b.parquet").write_bytes(b"garbage")  # broken after the reader was made
    os.utime(psrc / "b.parquet", ns=(st.st_atime_ns, st.st_mtime_ns))
    out = reader.read(np.array([2, 0]))
    assert isinstance(out[0], SampleError) and "b.parquet" in out[0].reason
    assert out[1] == RawSample("a", ())

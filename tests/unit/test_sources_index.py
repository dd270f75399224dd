"""Unit tests of the source index: build, reuse, rebuild, skips, fallback location."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fabricd.corpus import make_dataset
from fabricd.errors import SourceError
from fabricd.sources import index as index_mod
from fabricd.sources import open_index, source_fingerprint
from fabricd.tokenizer import text_token_counts

pytestmark = pytest.mark.unit

LOGGER = "fabricd.sources.index"



@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("corpus")
    counts = make_dataset(out, 40, seed=3, progress=False, rows_per_group=16)
    return out, counts


def _write(path: Path, table: pa.Table, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, **kw)
    return path


def _builds(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and "building index" in r.getMessage()]


def test_index_matches_data(corpus: tuple[Path, dict]) -> None:
    out, counts = corpus
    idx = open_index("interleaved", out / "interleaved")
    assert idx.format == "parquet" and idx.num_samples == counts["interleaved"]["samples"]
    assert idx.files == ("part-00000.parquet", "part-00001.parquet")
    table = pa.concat_tables(pq.read_table(out / "interleaved" / f) for f in idx.files)
    np.testing.assert_array_equal(idx.text_tokens, text_token_counts(table.column("text")))
    nimg = [len(x) for x in table.column("images").to_pylist()]
    nbytes = [sum(map(len, x)) for x in table.column("images").to_pylist()]
    assert idx.num_images.tolist() == nimg and idx.image_bytes.tolist() == nbytes
    assert idx.num_images.sum() == counts["interleaved"]["images"]
    assert idx.file_idx.dtype == np.int32 and idx.row.dtype == np.int64
    assert idx.text_tokens.dtype == np.int32 and idx.image_bytes.dtype == np.int64
    assert idx.files_skipped == () and idx.rows_skipped == 0


def test_build_then_reuse(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    src = tmp_path / "src"
    _write(src / "a.parquet", pa.table({"text": ["one", "two <image>"]}))
    caplog.set_level(logging.INFO, logger=LOGGER)
    first = open_index("s", src)
    assert len(_builds(caplog)) == 1 and "no index" in _builds(caplog)[0]
    (path,) = (src / ".fabricd-index").glob("index-*.parquet")
    assert path.name == f"index-{first.fingerprint[:16]}.parquet"
    mtime = path.stat().st_mtime_ns
    second = open_index("s", src)
    assert len(_builds(caplog)) == 1, "second open must reuse the index"
    assert path.stat().st_mtime_ns == mtime
    np.testing.assert_array_equal(first.text_tokens, second.text_tokens)
    assert second.files == first.files and second.fingerprint == first.fingerprint
    open_index("s", src, rebuild=True)
    assert len(_builds(caplog)) == 2


def test_rebuild_after_change_removes_stale(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    src = tmp_path / "src"
    f = _write(src / "a.parquet", pa.table({"text": ["one", "two"]}))
    first = open_index("s", src)
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))  # touched
    caplog.set_level(logging.INFO, logger=LOGGER)
    second = open_index("s", src)
    assert second.fingerprint != first.fingerprint
    assert any("source changed" in m for m in _builds(caplog))
    assert [p.name for p in (src / ".fabricd-index").glob("index-*.parquet")] == [
        f"index-{second.fingerprint[:16]}.parquet"
    ]
    _write(src / "sub" / "b.parquet", pa.table({"text": ["three"]}))  # a new file is a change too
    third = open_index("s", src)
    assert third.files == ("a.parquet", "sub/b.parquet") and third.num_samples == 3


def test_version_change_rebuilds(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "src"
    _write(src / "a.parquet", pa.table({"text": ["one"]}))
    open_index("s", src)
    monkeypatch.setattr(index_mod, "INDEX_VERSION", index_mod.INDEX_VERSION + 1)
    caplog.set_level(logging.INFO, logger=LOGGER)
    open_index("s", src)
    assert any("index version" in m for m in _builds(caplog))
    assert len(list((src / ".fabricd-index").glob("index-*.parquet"))) == 1


def test_corrupt_file_skipped_and_listed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    src = tmp_path / "src"
    _write(src / "a.parquet", pa.table({"text": ["one", "two"]}))
    (src / "b.parquet").write_bytes(b"PAR1 this is not parquet at all PAR1")
    _write(src / "c.parquet", pa.table({"body": ["no text column"]}))
    good = _write(tmp_path / "tmp.parquet", pa.table({"text": ["x"] * 1000}))
    (src / "d.parquet").write_bytes(good.read_bytes()[: good.stat().st_size // 2])  # truncated
    caplog.set_level(logging.WARNING, logger=LOGGER)
    idx = open_index("s", src)
    assert idx.num_samples == 2 and set(idx.file_idx.tolist()) == {0}
    skipped = dict(idx.files_skipped)
    assert set(skipped) == {"b.parquet", "c.parquet", "d.parquet"}
    assert "text" in skipped["c.parquet"]
    assert sum("skipping unreadable file" in r.getMessage() for r in caplog.records) == 3
    again = open_index("s", src)  # the skip list survives persistence
    assert dict(again.files_skipped) == skipped


def test_null_text_skipped_extra_columns_ignored(tmp_path: Path) -> None:
    images = pa.array([[b"abc"], None, [b"de", b"f"], []], type=pa.list_(pa.binary()))
    table = pa.table({
        "id": [1, 2, 3, 4],
        "text": ["a", None, "<image><image>bc", "d"],
        "images": images,
        "meta": [{"k": 1}, {"k": 2}, {"k": 3}, {"k": 4}],
    })
    src = _write(tmp_path / "one.parquet", table, row_group_size=2)
    idx = open_index("s", src)
    assert idx.files == ("one.parquet",)
    assert idx.row.tolist() == [0, 2, 3] and idx.rows_skipped == 1
    assert idx.text_tokens.tolist() == [2, 3, 2]
    assert idx.num_images.tolist() == [1, 2, 0] and idx.image_bytes.tolist() == [3, 3, 0]
    assert (tmp_path / "one.parquet.fabricd-index.parquet").is_file()
    # a directory source over the same folder does not take the index file for data
    assert open_index("d", tmp_path).files == ("one.parquet",)


def test_huggingface_struct_images_accepted(tmp_path: Path) -> None:
    typ = pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    images = pa.array([[{"bytes": b"1234", "path": "a.jpg"}], [{"bytes": b"12", "path": None}] * 2], type=typ)
    src = _write(tmp_path / "hf.parquet", pa.table({"text": ["a", "b"], "images": images}))
    idx = open_index("s", src)
    assert idx.num_images.tolist() == [1, 2] and idx.image_bytes.tolist() == [4, 4]


def test_jsonl_malformed_lines_skipped(tmp_path: Path) -> None:
    src = tmp_path / "j"
    (src / "img").mkdir(parents=True)
    (src / "img" / "a.png").write_bytes(b"x" * 10)
    lines = [
        json.dumps({"text": "hello <image>", "images": ["img/a.png"], "other": 1}),
        "",
        "{bad json",
        json.dumps({"images": []}),
        json.dumps({"text": 5}),
        json.dumps(["list"]),
        json.dumps({"text": "x", "images": "img/a.png"}),
        json.dumps({"text": "two", "images": ["img/a.png", "img/missing.png"]}),
        "   ",
        json.dumps({"text": "no images", "images": None}),
    ]
    data = ("\n".join(lines) + "\n").encode()
    (src / "part.jsonl").write_bytes(data)
    idx = open_index("j", src)
    assert idx.format == "jsonl" and idx.num_samples == 3 and idx.rows_skipped == 5
    assert idx.text_tokens.tolist() == [7, 4, 10]
    assert idx.num_images.tolist() == [1, 2, 0] and idx.image_bytes.tolist() == [10, 10, 0]
    for off in idx.row:  # offsets point at line starts
        assert json.loads(data[off:].split(b"\n", 1)[0])["text"]


def test_missing_empty_mixed_unknown(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="nope"):
        open_index("s", tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="empty"):
        open_index("s", tmp_path / "empty")
    mixed = tmp_path / "mixed"
    _write(mixed / "a.parquet", pa.table({"text": ["a"]}))
    (mixed / "b.jsonl").write_text('{"text": "b"}\n')
    with pytest.raises(SourceError, match="mixed"):
        open_index("s", mixed)
    assert open_index("s", mixed, format="jsonl").num_samples == 1
    with pytest.raises(SourceError, match="'csv'"):
        open_index("s", mixed, format="csv")
    (tmp_path / "hidden" / ".cache").mkdir(parents=True)
    _write(tmp_path / "hidden" / ".cache" / "x.parquet", pa.table({"text": ["a"]}))
    with pytest.raises(SourceError, match="no data files"):
        open_index("s", tmp_path / "hidden")


def _chmod_is_effective(d: Path) -> bool:
    probe = d / "probe"
    try:
        probe.write_text("x")
    except OSError:
        return True
    probe.unlink()
    return False


def test_unwritable_source_falls_back_to_index_dir(tmp_path: Path) -> None:
    src = tmp_path / "ro"
    _write(src / "a.parquet", pa.table({"text": ["a", "b"]}))
    os.chmod(src, 0o555)
    try:
        if not _chmod_is_effective(src):
            pytest.skip("chmod does not stop writes here (running as root)")
        with pytest.raises(SourceError, match=str(src)):
            open_index("s", src)
        idx = open_index("s", src, index_dir=tmp_path / "idx")
        assert idx.num_samples == 2
        assert len(list((tmp_path / "idx").rglob("index-*.parquet"))) == 1
    finally:
        os.chmod(src, 0o755)


def test_fallback_when_primary_write_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           caplog: pytest.LogCaptureFixture) -> None:
    """Same as above, simulated so it runs as root too."""
    src = tmp_path / "ro"
    _write(src / "a.parquet", pa.table({"text": ["a", "b"]}))
    real_write = index_mod._write

    def write(index, path):
        if str(path).startswith(str(src)):
            raise PermissionError(13, "Permission denied", str(path))
        real_write(index, path)

    monkeypatch.setattr(index_mod, "_write", write)
    (tmp_path / "also-bad").write_text("a file, not a directory")
    with pytest.raises(SourceError) as err:
        open_index("s", src, index_dir=tmp_path / "also-bad")
    assert str(src) in str(err.value) and "also-bad" in str(err.value)
    caplog.set_level(logging.INFO, logger=LOGGER)
    idx = open_index("s", src, index_dir=tmp_path / "idx")
    assert idx.num_samples == 2 and not (src / ".fabricd-index").exists()
    assert len(list((tmp_path / "idx").rglob("index-*.parquet"))) == 1
    open_index("s", src, index_dir=tmp_path / "idx")  # reused from the fallback
    assert len(_builds(caplog)) == 1


def test_fingerprint_cheap_and_sensitive(tmp_path: Path) -> None:
    src = tmp_path / "src"
    f = _write(src / "a.parquet", pa.table({"text": ["a"]}))
    fp = source_fingerprint(src, "parquet")
    assert fp == source_fingerprint(src, "parquet") and len(fp) == 64
    f.write_bytes(f.read_bytes() + b"")
    os.utime(f, ns=(0, 12345))
    assert source_fingerprint(src, "parquet") != fp


def test_progress_bar_and_speed(tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    n = 60_000
    words = np.array(["alpha", "beta", "<image>", "δέλτα", "x"], dtype=object)
    texts = [" ".join(words[rng.integers(0, 5, 8)]) for _ in range(n)]
    imgs = pa.array([[b"ab" * int(k)] * int(k % 3) for k in rng.integers(0, 50, n)], type=pa.list_(pa.binary()))
    src = _write(tmp_path / "big" / "a.parquet", pa.table({"text": texts, "images": imgs}), row_group_size=256)
    from fabricd.sources.formats.base import IndexContext

    batches: list[int] = []  # count the work instead of timing it: whole batches, not row by row
    real = IndexContext.count_layout
    monkeypatch.setattr(IndexContext, "count_layout",
                        lambda self, texts, nimg: batches.append(len(texts)) or real(self, texts, nimg))
    idx = open_index("big", src.parent, progress=True)
    assert idx.num_samples == n
    assert sum(batches) == n and len(batches) <= -(-n // 256), f"{len(batches)} token-count calls for {n} rows"
    assert "indexing big" in capsys.readouterr().err


def test_long_documents_are_indexed_a_few_rows_at_a_time_and_progress_adds_up(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from fabricd.sources.formats import base, parquet

    monkeypatch.setattr(parquet, "_BATCH_BYTES", 1 << 20)  # 1 MiB batches
    docs = [("word " * 100_000)[: 400_000 + k] for k in range(12)]  # 12 documents of ~400 KB
    src = _write(tmp_path / "long" / "a.parquet", pa.table({"text": docs}), row_group_size=12)
    batches: list[int] = []
    real = base.IndexContext.count_layout
    monkeypatch.setattr(base.IndexContext, "count_layout",
                        lambda self, texts, nimg: batches.append(len(texts)) or real(self, texts, nimg))
    reported: list[int] = []
    ctx = base.IndexContext(index_mod.load_tokenizer(None), src.parent, reported.append)
    got = parquet.ParquetText().index_file(src, ctx)
    assert got.text_tokens.tolist() == [len(d) + 1 for d in docs]
    assert max(batches) <= 3 and sum(batches) == 12  # never the whole file's 4.8 MB at once
    assert sum(reported) == src.stat().st_size and len(reported) >= 4  # the file's size, bit by bit


def test_indexes_of_two_tokenizers_live_side_by_side_and_old_versions_go(tmp_path: Path) -> None:
    from fabricd.text import TokenizerSpec, load_tokenizer
    from fabricd.text.train import train_bpe

    src = _write(tmp_path / "src" / "a.parquet", pa.table({"text": ["a cat sat", "on the mat", "a dog"]}))
    stale = src.parent / ".fabricd-index" / "index-0123456789abcdef.parquet"
    stale.parent.mkdir()
    pq.write_table(pa.table({"x": [1]}).replace_schema_metadata(
        {b"fabricd.index": json.dumps({"version": 1, "tokenizer": "bytes-v1"}).encode()}), stale)
    bpe = load_tokenizer(TokenizerSpec(kind="hf", path=train_bpe(["a cat sat on the mat"] * 30, tmp_path / "tok")))
    by_bytes = open_index("s", src.parent)
    by_bpe = open_index("s", src.parent, tokenizer=bpe)
    assert not stale.exists()  # an older version's index is replaced
    assert by_bytes.fingerprint != by_bpe.fingerprint and by_bytes.tokenizer != by_bpe.tokenizer
    assert by_bytes.text_tokens.tolist() == [10, 11, 6] and by_bpe.text_tokens.tolist() != [10, 11, 6]
    assert len(list((src.parent / ".fabricd-index").glob("index-*.parquet"))) == 2  # both kept
    again = open_index("s", src.parent)  # reused, not rebuilt, and the BPE one still there
    assert again.text_tokens.tolist() == [10, 11, 6]
    assert len(list((src.parent / ".fabricd-index").glob("index-*.parquet"))) == 2

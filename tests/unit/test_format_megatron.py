"""Unit tests of the Megatron-LM indexed dataset format (``PREFIX.idx`` + ``PREFIX.bin``).

Fixtures are written by a small writer of the documented layout (below), independent of the
format's code; samples read back are compared with the token ids that were written.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
import pytest

from fabricd.sources.formats import BY_EXTENSION, REGISTRY, IndexContext, RawSample, ReadRequest
from fabricd.sources.formats import megatron as megatron_mod
from fabricd.text import load_tokenizer

pytestmark = pytest.mark.unit

FMT = REGISTRY["megatron"]
CODES = {np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5, np.float64: 6, np.float32: 7, np.uint16: 8}


def write_megatron(prefix: Path, docs: list[list[list[int]]], dtype=np.int32, *, modes: bool = False) -> Path:
    """Write ``docs`` (each a list of sequences of ids) as Megatron's ``PREFIX.idx``/``PREFIX.bin``:
    magic, version 1, dtype code, sequence count, document-index count (documents + 1), int32
    lengths, int64 byte pointers, int64 document indices starting at 0. Returns the .idx path."""
    itemsize = np.dtype(dtype).itemsize
    lengths, pointers, doc_idx = [], [], [0]
    cursor = 0
    with open(f"{prefix}.bin", "wb") as f:
        for doc in docs:
            for seq in doc:
                f.write(np.asarray(seq, dtype=dtype).tobytes())
                lengths.append(len(seq))
                pointers.append(cursor)
                cursor += len(seq) * itemsize
            doc_idx.append(len(lengths))
    with open(f"{prefix}.idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00")
        f.write(struct.pack("<Q", 1))
        f.write(struct.pack("<B", CODES[dtype]))
        f.write(struct.pack("<Q", len(lengths)))
        f.write(struct.pack("<Q", len(doc_idx)))
        f.write(np.asarray(lengths, "<i4").tobytes())
        f.write(np.asarray(pointers, "<i8").tobytes())
        f.write(np.asarray(doc_idx, "<i8").tobytes())
        if modes:
            f.write(np.zeros(len(lengths), np.int8).tobytes())
    return Path(f"{prefix}.idx")


def _ctx(source_dir: Path, progress: list[int] | None = None) -> IndexContext:
    sink = progress.append if progress is not None else (lambda n: None)
    return IndexContext(tokenizer=load_tokenizer(None), source_dir=source_dir.resolve(), on_bytes=sink)


def _reader(paths: list[Path], source_dir: Path, opened: list[int] | None = None):
    def open_path(fi: int) -> Path:
        if opened is not None:
            opened.append(fi)
        return paths[fi]

    return FMT.reader(paths, open_path, cache_bytes=1 << 20, source_dir=source_dir.resolve())


def _request(index, order: np.ndarray) -> ReadRequest:
    return ReadRequest(rows=index.row[order], extents=index.extent[order], images=[[] for _ in order])


def _random_docs(rng: np.random.Generator, n: int, high: int) -> list[list[list[int]]]:
    docs = []
    for _ in range(n):
        nseq = int(rng.integers(0, 4))   # 0 sequences: an empty document
        docs.append([rng.integers(0, high, int(rng.integers(0, 9))).tolist() for _ in range(nseq)])
    return docs


@pytest.mark.parametrize("dtype", [np.int32, np.uint16])
def test_index_and_read_back_every_document(tmp_path: Path, dtype) -> None:
    high = 2**31 - 1 if dtype is np.int32 else 2**16 - 1
    docs = [
        [[5, 6, 7]],                        # one sequence
        [[1, 2], [3], [4, 4, 4, 4]],        # three sequences: one sample of their concatenation
        [],                                 # no sequence at all: skipped
        [[9, high]],                        # the largest id of the dtype
        [[], []],                           # sequences of 0 tokens: skipped
        [[0]],                              # id 0 is a valid id
        [[], [8, 8]],                       # an empty sequence then a real one
    ]
    idx_path = write_megatron(tmp_path / "corpus_text_document", docs, dtype)
    progress: list[int] = []
    index = FMT.index_file(idx_path, _ctx(tmp_path, progress))
    expected = {d: np.concatenate([np.asarray(s, np.int64) for s in doc]) for d, doc in enumerate(docs)
                if sum(len(s) for s in doc)}
    assert index.row.tolist() == sorted(expected)
    assert index.text_tokens.tolist() == [len(expected[d]) for d in sorted(expected)]
    assert index.skipped == 2
    assert index.num_images.tolist() == [0] * len(expected) and index.image_len.shape == (0,)
    assert sum(progress) == FMT.data_size(idx_path) == os.path.getsize(idx_path) + os.path.getsize(
        tmp_path / "corpus_text_document.bin")

    reader = _reader([idx_path], tmp_path)
    order = np.arange(index.row.shape[0])
    seq = reader.read(0, _request(index, order))
    for sample, d in zip(seq, index.row.tolist()):
        assert isinstance(sample, RawSample) and sample.text is None and sample.images == ()
        assert sample.input_ids.dtype == np.int32 and sample.targets is None
        assert sample.input_ids.tolist() == expected[d].tolist()
    perm = np.random.default_rng(0).permutation(order.shape[0])
    rnd = reader.read(0, _request(index, perm))
    assert [rnd[k] for k in np.argsort(perm)] == seq
    dup = reader.read(0, _request(index, np.array([1, 1, 0])))
    assert dup == [seq[1], seq[1], seq[0]]
    reader.close()


def test_many_documents_in_small_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Indexing walks the .idx in chunks of documents; chunk edges change nothing."""
    rng = np.random.default_rng(7)
    docs = _random_docs(rng, 500, 50_000)
    idx_path = write_megatron(tmp_path / "big", docs, np.int32)
    whole = FMT.index_file(idx_path, _ctx(tmp_path))
    monkeypatch.setattr(megatron_mod, "_CHUNK_DOCS", 7)
    progress: list[int] = []
    chunked = FMT.index_file(idx_path, _ctx(tmp_path, progress))
    assert len(progress) > 50 and sum(progress) == FMT.data_size(idx_path)
    for name in ("row", "text_tokens", "extent"):
        assert np.array_equal(getattr(whole, name), getattr(chunked, name))
    lengths = [sum(len(s) for s in doc) for doc in docs]
    assert chunked.row.tolist() == [d for d, n in enumerate(lengths) if n]
    assert chunked.text_tokens.tolist() == [n for n in lengths if n]
    assert chunked.skipped == lengths.count(0)
    reader = _reader([idx_path], tmp_path)
    perm = np.random.default_rng(1).permutation(chunked.row.shape[0])
    out = reader.read(0, _request(chunked, perm))
    for sample, d in zip(out, chunked.row[perm].tolist()):
        assert sample.input_ids.tolist() == [t for s in docs[d] for t in s]


def test_reader_maps_the_bin_once_and_copies_only_the_sample(tmp_path: Path) -> None:
    docs = [[[1, 2, 3]], [[4, 5], [6]], [[7]]]
    paths = [write_megatron(tmp_path / "a", docs, np.uint16), write_megatron(tmp_path / "b", docs[::-1], np.int32)]
    indexes = [FMT.index_file(p, _ctx(tmp_path)) for p in paths]
    opened: list[int] = []
    reader = _reader(paths, tmp_path, opened)
    for _ in range(3):
        for fi, index in enumerate(indexes):
            out = reader.read(fi, _request(index, np.arange(3)))
            assert [s.input_ids.tolist() for s in out] == ([[1, 2, 3], [4, 5, 6], [7]] if fi == 0
                                                           else [[7], [4, 5, 6], [1, 2, 3]])
    assert sorted(opened) == [0, 1]   # each file opened (and mapped) once for all those reads
    state = reader._files[0]
    assert isinstance(state.bin, np.memmap) and Path(state.bin.filename) == (tmp_path / "a.bin").resolve()
    sample = reader.read(0, _request(indexes[0], np.array([1])))[0]
    assert not np.shares_memory(sample.input_ids, state.bin)  # the int32 conversion is the one copy
    reader.close()
    assert reader._files == {}


def test_bad_ids_fail_their_sample_only(tmp_path: Path) -> None:
    idx_path = write_megatron(tmp_path / "wide", [[[1, 2]], [[3, -4]], [[2**31]], [[2**31 - 1, 0]]], np.int64)
    index = FMT.index_file(idx_path, _ctx(tmp_path))
    assert index.text_tokens.tolist() == [2, 2, 1, 2]  # ids are not read at indexing
    out = _reader([idx_path], tmp_path).read(0, _request(index, np.arange(4)))
    assert out[0].input_ids.tolist() == [1, 2] and out[3].input_ids.tolist() == [2**31 - 1, 0]
    for bad in (out[1], out[2]):
        assert isinstance(bad, str) and "outside [0, 2**31)" in bad and "wide.idx" in bad
    neg = write_megatron(tmp_path / "small", [[[-1, 3]], [[4]]], np.int8)
    index = FMT.index_file(neg, _ctx(tmp_path))
    out = _reader([neg], tmp_path).read(0, _request(index, np.arange(2)))
    assert isinstance(out[0], str) and out[1].input_ids.tolist() == [4]


def test_a_request_the_file_cannot_serve_is_a_string(tmp_path: Path) -> None:
    idx_path = write_megatron(tmp_path / "c", [[[1, 2]], [[3]]], np.int32)
    index = FMT.index_file(idx_path, _ctx(tmp_path))
    reader = _reader([idx_path], tmp_path)
    out = reader.read(0, ReadRequest(rows=np.array([0, 5, -1, 1]), extents=np.array([0, 0, 0, 99])))
    assert isinstance(out[0], RawSample)
    assert "beyond" in out[1] and "beyond" in out[2]
    assert "changed since it was indexed" in out[3]
    # the files replaced after indexing: another layout under the same name
    reader.close()
    write_megatron(tmp_path / "c", [[[9, 9, 9, 9]], [[1]]], np.int32)
    out = _reader([idx_path], tmp_path).read(0, _request(index, np.arange(2)))
    assert isinstance(out[0], RawSample) and out[0].input_ids.tolist() == [9, 9, 9, 9]
    assert isinstance(out[1], str) and "changed since it was indexed" in out[1]
    # a .bin gone: every slot says why, nothing raises
    os.remove(tmp_path / "c.bin")
    out = _reader([idx_path], tmp_path).read(0, _request(index, np.arange(2)))
    assert all(isinstance(o, str) and "cannot open" in o for o in out)

    def refuse(fi: int) -> Path:
        raise PermissionError("outside the data roots")

    out = FMT.reader([idx_path], refuse, cache_bytes=0, source_dir=tmp_path).read(0, _request(index, np.arange(1)))
    assert "outside the data roots" in out[0]


def _corrupt(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


@pytest.mark.parametrize("case, match", [
    ("missing_bin", r"c\.bin is missing"),
    ("truncated_bin", r"truncated or does not belong"),
    ("bad_magic", r"not a Megatron index \(magic bytes"),
    ("bad_version", r"version 2 is not supported"),
    ("float_dtype", r"dtype code 7 \(float32\) holds no token ids"),
    ("unknown_dtype", r"unknown Megatron dtype code 9"),
    ("truncated_idx", r"truncated or not a Megatron index"),
    ("short_idx", r"shorter than its 34-byte header"),
    ("modes", r"sequence modes"),
    ("doc_end", r"document indices run from 0 to 2, expected 0 to 3"),
    ("negative_length", r"sequence 1 has a negative length"),
    ("gap", r"sequence 2 starts at byte 0, not right after"),
])
def test_bad_files_raise_clearly(tmp_path: Path, case: str, match: str) -> None:
    docs = [[[1, 2]], [[3, 4, 5], [6]]]
    idx_path = write_megatron(tmp_path / "c", docs, np.int32, modes=case == "modes")
    bin_path = tmp_path / "c.bin"
    seqs_at, docs_at = 34, 34 + 12 * 3           # the int32 lengths, the int64 document indices
    if case == "missing_bin":
        bin_path.unlink()
    elif case == "truncated_bin":
        bin_path.write_bytes(bin_path.read_bytes()[:-4])
    elif case == "bad_magic":
        _corrupt(idx_path, 0, b"MMIDIDY")
    elif case == "bad_version":
        _corrupt(idx_path, 9, struct.pack("<Q", 2))
    elif case == "float_dtype":
        _corrupt(idx_path, 17, bytes([7]))
    elif case == "unknown_dtype":
        _corrupt(idx_path, 17, bytes([9]))
    elif case == "truncated_idx":
        idx_path.write_bytes(idx_path.read_bytes()[:-3])
    elif case == "short_idx":
        idx_path.write_bytes(idx_path.read_bytes()[:20])
    elif case == "doc_end":
        _corrupt(idx_path, docs_at + 16, struct.pack("<q", 2))
    elif case == "negative_length":
        _corrupt(idx_path, seqs_at + 4, struct.pack("<i", -3))
    elif case == "gap":
        _corrupt(idx_path, seqs_at + 12 + 16, struct.pack("<q", 0))  # inside .bin, not after [3, 4, 5]
    with pytest.raises(ValueError, match=match):
        FMT.index_file(idx_path, _ctx(tmp_path))


def test_decreasing_document_indices(tmp_path: Path) -> None:
    idx_path = write_megatron(tmp_path / "d", [[[1]], [[2]], [[3]]], np.int32)
    docs_at = 34 + 12 * 3
    with open(idx_path, "r+b") as f:
        f.seek(docs_at)
        f.write(np.asarray([0, 2, 1, 3], "<i8").tobytes())
    with pytest.raises(ValueError, match=r"document indices decrease at document 1 \(2 then 1\)"):
        FMT.index_file(idx_path, _ctx(tmp_path))


def test_sniff_companions_and_registry(tmp_path: Path) -> None:
    idx_path = write_megatron(tmp_path / "s", [[[1]]], np.int32)
    assert FMT.sniff(idx_path) is None
    assert FMT.companions("sub/dir/s.idx") == ["sub/dir/s.bin"]
    assert FMT.tokenized and FMT.extensions == (".idx",) and BY_EXTENSION[".idx"] == "megatron"
    (tmp_path / "s.bin").unlink()
    assert "s.bin is missing" in FMT.sniff(idx_path)
    other = tmp_path / "x.idx"
    other.write_bytes(b"PAR1" + bytes(40))
    assert "not a Megatron index" in FMT.sniff(other)
    assert "cannot read" in FMT.sniff(tmp_path / "nope.idx")


def test_a_bin_leading_outside_the_source_is_refused(tmp_path: Path) -> None:
    src, elsewhere = tmp_path / "src", tmp_path / "elsewhere"
    src.mkdir()
    elsewhere.mkdir()
    write_megatron(elsewhere / "e", [[[1, 2]]], np.int32)
    (src / "e.idx").write_bytes((elsewhere / "e.idx").read_bytes())
    (src / "e.bin").symlink_to(elsewhere / "e.bin")
    with pytest.raises(ValueError, match="outside the source directory"):
        FMT.index_file(src / "e.idx", _ctx(src))
    index = FMT.index_file(src / "e.idx", _ctx(tmp_path))  # inside when the source is tmp_path
    out = _reader([src / "e.idx"], src).read(0, _request(index, np.arange(1)))
    assert isinstance(out[0], str) and "outside the source directory" in out[0]


def test_an_all_empty_dataset(tmp_path: Path) -> None:
    idx_path = write_megatron(tmp_path / "e", [[], [[]]], np.int32)
    assert os.path.getsize(tmp_path / "e.bin") == 0
    index = FMT.index_file(idx_path, _ctx(tmp_path))
    assert index.row.shape == (0,) and index.skipped == 2
    out = _reader([idx_path], tmp_path).read(0, ReadRequest(rows=np.array([0]), extents=np.array([0])))
    assert isinstance(out[0], str)


@pytest.mark.parametrize("which", ["bin", "idx"])
def test_a_file_truncated_under_an_open_reader_fails_samples_not_the_process(tmp_path: Path, which: str) -> None:
    """Touching a mapped page past the end of a truncated file would be SIGBUS: checked first."""
    docs = [[list(range(1, 3000))], [list(range(5, 4000))]]   # a few pages of .bin
    idx_path = write_megatron(tmp_path / "t", docs, np.int32)
    index = FMT.index_file(idx_path, _ctx(tmp_path))
    opened: list[int] = []
    reader = _reader([idx_path], tmp_path, opened)
    first = reader.read(0, _request(index, np.arange(2)))
    assert [s.input_ids.tolist() for s in first] == [docs[0][0], docs[1][0]]
    os.truncate(tmp_path / f"t.{which}", 40)
    out = reader.read(0, _request(index, np.arange(2)))
    assert all(isinstance(o, str) and f".{which} shrank since it was opened" in o for o in out)
    write_megatron(tmp_path / "t", docs, np.int32)   # restored: the next read maps it again
    assert reader.read(0, _request(index, np.arange(2))) == first and opened == [0, 0]

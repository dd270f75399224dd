"""Unit tests of the WebDataset tar shard format.

Shards are written here with ``tarfile`` (GNU and pax, long names included) from a list of
samples; what indexing and reading give back is compared with what was written.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fabricd.sources.formats import BY_EXTENSION, REGISTRY, IndexContext, RawSample, ReadRequest
from fabricd.sources.formats import webdataset as wds_mod
from fabricd.sources.formats import base as base_mod
from fabricd.sources.formats.base import IMAGE_PLACEHOLDER, text_parts
from fabricd.text import TokenizerSpec, load_tokenizer

pytestmark = pytest.mark.unit

FMT = REGISTRY["webdataset"]
LONG_DIR = "shard-dir-" + "d" * 90 + "/nested"


def image(kind: str, w: int, h: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format={"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}[kind])
    return buf.getvalue()


@dataclass
class Case:
    """One sample's members as written, and what reading it must give (None: skipped)."""

    members: list[tuple[str, bytes]]
    text: str | None = None
    images: list[bytes] = field(default_factory=list)


def cases() -> list[Case]:
    png, jpg, webp = image("png", 3, 5, 0), image("jpg", 7, 4, 1), image("webp", 6, 2, 2)
    png2, jpeg = image("png", 9, 1, 3), image("jpeg", 2, 8, 4)
    return [
        Case([("s000.txt", "a caption".encode()), ("s000.jpg", jpg)], "a caption", [jpg]),
        # indexed images after the plain one, by index, whatever the tar order
        Case([("dir/s001.json", json.dumps({"text": "interleaved <image> then <image>"}).encode()),
              ("dir/s001.1.webp", webp), ("dir/s001.png", png), ("dir/s001.0.png", png2)],
             "interleaved <image> then <image>", [png, png2, webp]),
        Case([("s002.json", json.dumps({"caption": "from caption", "url": "x"}).encode()), ("s002.jpeg", jpeg)],
             "from caption", [jpeg]),
        Case([("s003.json", json.dumps({"txt": "from txt", "text": None}).encode())], "from txt"),
        # txt wins over json (which is not even read: malformed here)
        Case([("s004.txt", "the txt <image>".encode()), ("s004.json", b"{not json"), ("s004.PNG", png)],
             "the txt <image>", [png]),
        Case([("s005.png", png), ("s005.cls", b"3")], "", [png]),                    # images only
        Case([("s006.json", json.dumps({"url": "no text here"}).encode()), ("s006.jpg", jpg)], "", [jpg]),
        Case([(f"{LONG_DIR}/{'k' * 120}.txt", "long name ✓ 東京".encode())], "long name ✓ 東京"),
        Case([("s008.txt", "too many <image> <image> <image>".encode()), ("s008.webp", webp)],
             "too many <image> <image> <image>", [webp]),
        # skipped and counted
        Case([("bad000.txt", b"\xff\xfe not utf-8"), ("bad000.jpg", jpg)]),
        Case([("bad001.json", b"{oops"), ("bad001.jpg", jpg)]),
        Case([("bad002.json", b"[1, 2]")]),
        Case([("bad003.json", json.dumps({"text": 7}).encode()), ("bad003.png", png)]),
        Case([("bad004.cls", b"1")]),                                              # neither text nor image
        Case([("bad005.txt", b"a"), ("bad005.jpg", jpg), ("bad005.JPG", jpg)]),    # the same extension twice
        Case([("bad006.txt", b"")]),                                               # empty text, no image
        Case([("bad007.json", b'{"text": "\\ud800"}')]),                           # a lone surrogate
        Case([("s009.txt", b"again")], "again"),
        # a key seen again later (not consecutively): another sample
        Case([("s000.txt", b"same key, later")], "same key, later"),
    ]


def write_shard(path: Path, samples: list[Case], fmt: int = tarfile.GNU_FORMAT, *, noise: bool = True) -> Path:
    with tarfile.open(path, "w", format=fmt) as tf:
        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))

        if noise:
            add("__meta__", b"ignored")                  # WebDataset metadata: ignored
            add("README", b"no extension: belongs to no sample")
            d = tarfile.TarInfo("dir")
            d.type = tarfile.DIRTYPE
            tf.addfile(d)
        for k, case in enumerate(samples):
            for name, data in case.members:
                add(name, data)
            if noise and k == 2:
                link = tarfile.TarInfo("s002.link.jpg")    # not a regular member: ignored
                link.type = tarfile.SYMTYPE
                link.linkname = "s002.jpeg"
                tf.addfile(link)
    return path


def _ctx(source_dir: Path, tokenizer=None, progress: list[int] | None = None) -> IndexContext:
    sink = progress.append if progress is not None else (lambda n: None)
    return IndexContext(tokenizer=tokenizer or load_tokenizer(None), source_dir=source_dir.resolve(), on_bytes=sink)


def _request(index, order) -> ReadRequest:
    order = np.asarray(list(order), np.int64)
    starts = np.concatenate([[0], np.cumsum(index.num_images)])
    images = [list(zip(index.image_loc[starts[k]:starts[k + 1]].tolist(),
                       index.image_len[starts[k]:starts[k + 1]].tolist())) for k in order]
    return ReadRequest(rows=index.row[order], extents=index.extent[order], images=images)


def _reader(paths: list[Path], source_dir: Path, opened: list[int] | None = None):
    def open_path(fi: int) -> Path:
        if opened is not None:
            opened.append(fi)
        return paths[fi]

    return FMT.reader(paths, open_path, cache_bytes=1 << 20, source_dir=source_dir.resolve())


def _byte_count(text: str, tok) -> int:
    """Independent count for the byte tokenizer: UTF-8 bytes without the placeholders, + EOS."""
    return len(text.replace(IMAGE_PLACEHOLDER, "").encode()) + tok.specials


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_index_and_read_back(tmp_path: Path, fmt: int) -> None:
    samples = cases()
    shard = write_shard(tmp_path / "shard-000.tar", samples, fmt)
    good = [c for c in samples if c.text is not None]
    progress: list[int] = []
    ctx = _ctx(tmp_path, progress=progress)
    index = FMT.index_file(shard, ctx)
    assert index.row.shape[0] == len(good)
    assert index.skipped == len(samples) - len(good)
    assert sum(progress) == os.path.getsize(shard) == FMT.data_size(shard)
    assert index.num_images.tolist() == [len(c.images) for c in good]
    assert index.text_tokens.tolist() == [_byte_count(c.text, ctx.tokenizer) for c in good]
    assert np.array_equal(index.text_tokens, ctx.count_samples([c.text for c in good], [len(c.images) for c in good]))
    # images: where they are and their header dimensions
    flat = [img for c in good for img in c.images]
    assert index.image_len.tolist() == [len(b) for b in flat]
    raw = shard.read_bytes()
    assert [raw[lo:lo + n] for lo, n in zip(index.image_loc.tolist(), index.image_len.tolist())] == flat
    dims = [Image.open(io.BytesIO(b)).size for b in flat]
    assert index.image_h.tolist() == [h for w, h in dims] and index.image_w.tolist() == [w for w, h in dims]
    # text locators: the sample without text has none
    assert [int(r) for r, c in zip(index.row, good) if not c.text] == [-1, -1]

    reader = _reader([shard], tmp_path)
    n = len(good)
    seq = reader.read(0, _request(index, range(n)))
    assert seq == [RawSample(text=c.text, images=tuple(c.images)) for c in good]
    perm = np.random.default_rng(0).permutation(n)
    rnd = reader.read(0, _request(index, perm))
    assert [rnd[k] for k in np.argsort(perm)] == seq
    assert reader.read(0, _request(index, [3, 3, 0])) == [seq[3], seq[3], seq[0]]
    reader.close()


def _train_bpe(path: Path, corpus: list[str]) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>", "<image>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    tok.save(str(path))
    return path


def test_token_counts_with_a_bpe_tokenizer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tokenizers import Tokenizer as HF

    samples = cases()
    good = [c for c in samples if c.text is not None]
    tok_path = _train_bpe(tmp_path / "tokenizer.json", [c.text for c in good] * 20 + ["the quick brown fox"] * 20)
    tok = load_tokenizer(TokenizerSpec(kind="hf", path=tok_path, bos="<s>"))
    shard = write_shard(tmp_path / "s.tar", samples)
    monkeypatch.setattr(wds_mod, "_BATCH_CHARS", 20)  # several tokenizer batches within one shard
    ctx = _ctx(tmp_path, tok)
    batches: list[int] = []
    count = ctx.count_layout
    ctx.count_layout = lambda texts, nimg: (batches.append(len(texts)), count(texts, nimg))[1]  # type: ignore
    index = FMT.index_file(shard, ctx)
    assert len(batches) > 3 and sum(batches) == len(good)
    # independently: each part of the layout encoded by the raw tokenizer, + BOS and EOS
    raw = HF.from_file(str(tok_path))
    expected = [sum(len(raw.encode(p, add_special_tokens=False).ids) for p in text_parts(c.text, len(c.images))[1])
                + 2 for c in good]
    assert index.text_tokens.tolist() == expected
    assert np.array_equal(index.text_tokens, count([c.text for c in good], [len(c.images) for c in good])[0])
    assert index.text_tokens.tolist() != [_byte_count(c.text, tok) for c in good]  # BPE merged something


def test_bounded_open_files_and_reopen_through_open_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(base_mod, "MAX_OPEN_FILES", 2)
    shards, indexes, expect = [], [], []
    for k in range(4):
        case = [Case([(f"k{k}.txt", f"shard {k}".encode()), (f"k{k}.png", image("png", k + 1, 2, k))],
                     f"shard {k}", [image("png", k + 1, 2, k)])]
        shards.append(write_shard(tmp_path / f"{k}.tar", case, noise=False))
        indexes.append(FMT.index_file(shards[-1], _ctx(tmp_path)))
        expect.append(RawSample(text=f"shard {k}", images=tuple(case[0].images)))
    opened: list[int] = []
    reader = _reader(shards, tmp_path, opened)
    for _ in range(2):
        for k in range(4):
            assert reader.read(k, _request(indexes[k], [0])) == [expect[k]]
            assert len(reader._files) <= 2
    assert opened == [0, 1, 2, 3, 0, 1, 2, 3]  # every (re)open went through open_path
    assert reader.read(3, _request(indexes[3], [0])) == [expect[3]] and len(opened) == 8  # still open
    reader.close()


def test_reads_that_fail_are_strings(tmp_path: Path) -> None:
    samples = cases()
    shard = write_shard(tmp_path / "s.tar", samples)
    index = FMT.index_file(shard, _ctx(tmp_path))
    n = index.row.shape[0]
    reader = _reader([shard], tmp_path)
    assert all(isinstance(s, RawSample) for s in reader.read(0, _request(index, range(n))))
    # the text of sample 0 overwritten with bad UTF-8 of the same length
    raw = bytearray(shard.read_bytes())
    lo, size = int(index.row[0]), int(index.extent[0])
    raw[lo:lo + size] = b"\xff" * size
    shard.write_bytes(bytes(raw))
    out = reader.read(0, _request(index, [0, 1]))
    assert "not valid UTF-8" in out[0] and isinstance(out[1], RawSample)
    # json text member corrupted: the reason says so
    lo, ext = int(index.row[1]), int(index.extent[1])
    assert ext < 0 and raw[lo:lo + ~ext].startswith(b"{")
    raw[lo:lo + 1] = b"["
    shard.write_bytes(bytes(raw))
    assert "malformed JSON" in _reader([shard], tmp_path).read(0, _request(index, [1]))[0]
    # the shard truncated inside sample 3's text: samples from there on fail, earlier ones still read
    assert 0 < int(index.row[3]) and int(index.image_loc[4]) < int(index.row[3])
    shard.write_bytes(bytes(raw[:int(index.row[3]) + 2]))
    out = _reader([shard], tmp_path).read(0, _request(index, [2, 3, n - 1]))
    assert isinstance(out[0], RawSample)
    assert all(isinstance(o, str) and "the file shrank" in o for o in out[1:])
    shard.unlink()
    out = _reader([shard], tmp_path).read(0, _request(index, [2]))
    assert "cannot read" in out[0] and "s.tar" in out[0]

    def refuse(fi: int) -> Path:
        raise PermissionError("outside the data roots")

    out = FMT.reader([shard], refuse, cache_bytes=0, source_dir=tmp_path).read(0, _request(index, [0, 2]))
    assert all("outside the data roots" in o for o in out)


def test_bad_shards_raise(tmp_path: Path) -> None:
    shard = write_shard(tmp_path / "s.tar", cases())
    data = shard.read_bytes()
    gz = tmp_path / "gz.tar"
    gz.write_bytes(gzip.compress(data))
    with pytest.raises(ValueError, match="gzip-compressed"):
        FMT.index_file(gz, _ctx(tmp_path))
    index = FMT.index_file(shard, _ctx(tmp_path))
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[:int(index.image_loc[2]) + 5])  # inside an image member's data
    with pytest.raises(ValueError, match="corrupt or truncated"):
        FMT.index_file(cut, _ctx(tmp_path))
    junk = tmp_path / "junk.tar"
    junk.write_bytes(bytes(range(256)) * 16)
    with pytest.raises(ValueError, match="not a readable tar"):
        FMT.index_file(junk, _ctx(tmp_path))
    empty = tmp_path / "empty.tar"
    with tarfile.open(empty, "w"):
        pass
    index = FMT.index_file(empty, _ctx(tmp_path))
    assert index.row.shape == (0,) and index.skipped == 0


def test_sniff_and_registry(tmp_path: Path) -> None:
    assert FMT.extensions == (".tar",) and BY_EXTENSION[".tar"] == "webdataset" and not FMT.tokenized
    shard = write_shard(tmp_path / "s.tar", cases()[:2])
    assert FMT.sniff(shard) is None
    v7 = tmp_path / "v7.tar"
    with tarfile.open(v7, "w", format=tarfile.USTAR_FORMAT) as tf:
        info = tarfile.TarInfo("a.txt")
        info.size = 1
        tf.addfile(info, io.BytesIO(b"x"))
    raw = bytearray(v7.read_bytes())
    raw[257:265] = bytes(8)                   # a pre-POSIX header: no magic; fix its checksum
    raw[148:156] = b" " * 8
    raw[148:156] = b"%06o\x00 " % sum(raw[:512])
    v7.write_bytes(bytes(raw))
    assert FMT.sniff(v7) is None
    empty = tmp_path / "empty.tar"
    with tarfile.open(empty, "w"):
        pass
    assert FMT.sniff(empty) is None
    gz = tmp_path / "gz.tar"
    gz.write_bytes(gzip.compress(shard.read_bytes()))
    assert "gzip-compressed" in FMT.sniff(gz)
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"x" * 1024)
    assert "not a tar file" in FMT.sniff(junk)
    short = tmp_path / "short.tar"
    short.write_bytes(b"abc")
    assert "shorter than one 512-byte header" in FMT.sniff(short)
    assert "cannot read" in FMT.sniff(tmp_path / "missing.tar")


def test_split_key_follows_webdataset() -> None:
    assert wds_mod.split_key("a/b/x.y.jpg") == ("a/b/x", "y.jpg")
    assert wds_mod.split_key("dir.v2/sample.txt") == ("dir.v2/sample", "txt")
    assert wds_mod.split_key("README") is None and wds_mod.split_key(".hidden") is None
    assert wds_mod.split_key("d/.hidden") == ("d/", "hidden")  # WebDataset's regex does the same
    assert wds_mod.split_key("d.x/README") is None


def test_oversized_members_are_skipped_unread_and_big_images_need_only_their_header(tmp_path: Path,
                                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wds_mod, "MAX_TEXT_BYTES", 1000)
    monkeypatch.setattr(wds_mod, "_HEADER_BYTES", 64)  # a PNG's IHDR is in its first 33 bytes
    pic = image("png", 300, 200, 1)
    samples = [Case([("a.txt", b"short")], text="short"), Case([("b.txt", b"x" * 5000)]),
               Case([("c.txt", b"pic"), ("c.png", pic)], text="pic", images=[pic])]
    shard = write_shard(tmp_path / "s.tar", samples, noise=False)
    index = FMT.index_file(shard, _ctx(tmp_path))
    assert index.skipped == 1 and index.num_images.tolist() == [0, 1]
    assert (int(index.image_h[0]), int(index.image_w[0])) == (200, 300)  # from 64 bytes of a larger file
    assert int(index.image_len[0]) > 64

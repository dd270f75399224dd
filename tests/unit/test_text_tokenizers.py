"""Unit tests of fabricd.text: the chunk rule, the three tokenizer kinds, special tokens by name,
loading rules, identities, and the trainers of fabricd.text.train.

Expected values come from the libraries themselves (``tokenizers``, ``sentencepiece``) called
directly, or from the UTF-8 bytes of the text, never from fabricd.text's own code path.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import fabricd.text as text_mod
from fabricd.text import (
    CHUNK_CHARS,
    TokenizerError,
    TokenizerSpec,
    chunk_bounds,
    load_tokenizer,
)
from fabricd.text.train import SPECIAL_TOKENS, train_bpe, train_sentencepiece

pytestmark = [pytest.mark.unit, pytest.mark.timeout(120)]

KINDS = ("bytes", "hf", "sentencepiece")


# --------------------------------------------------------------------------- generated text


def _words(seed: int, size: int = 800) -> np.ndarray:
    rng = np.random.default_rng(seed)
    onsets = ["", "b", "d", "f", "k", "l", "m", "n", "p", "r", "s", "t", "st", "ch", "th"]
    vowels = ["a", "e", "i", "o", "u", "ai", "ou"]
    out = {"".join(onsets[rng.integers(len(onsets))] + vowels[rng.integers(len(vowels))]
                   for _ in range(int(rng.integers(1, 4)))) for _ in range(3 * size)}
    words = sorted(out)[:size] + ["café", "東京", "naïve", "größe", "αβγ", "the", "of", "and", "def", "return"]
    return np.array(words, dtype=object)


def prose(rng: np.random.Generator, n_chars: int, words: np.ndarray) -> str:
    """About ``n_chars`` of sentences in paragraphs separated by blank lines."""
    n = max(2, n_chars // 5)
    w = words[np.minimum(rng.zipf(1.3, n) - 1, len(words) - 1)].tolist()
    for k in range(0, n, 14):
        w[k] = w[k] + "."
    for k in range(60, n, 120):
        w[k] = w[k] + "\n\n"
    return " ".join(w).replace("\n\n ", "\n\n")[:n_chars]


def code(rng: np.random.Generator, lines: int, words: np.ndarray) -> str:
    out = []
    for k in range(lines):
        depth = int(rng.integers(0, 4))
        a, b = words[rng.integers(0, len(words), 2)]
        out.append("    " * depth + f"{a}_{b} = {a}({b}, {int(rng.integers(0, 999))})  # {b}")
    return "\n".join(out)


@pytest.fixture(scope="session")
def corpus_texts() -> list[str]:
    rng = np.random.default_rng(11)
    words = _words(3)
    texts = [prose(rng, int(rng.integers(200, 4000)), words) for _ in range(150)]
    texts += [code(rng, int(rng.integers(5, 80)), words) for _ in range(60)]
    return texts


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory, corpus_texts: list[str]) -> dict[str, Path]:
    """The two trained tokenizer files (small vocabularies: seconds)."""
    d = tmp_path_factory.mktemp("tokenizers")
    return {"hf": train_bpe(corpus_texts, d, vocab_size=600),
            "sentencepiece": train_sentencepiece(corpus_texts, d, vocab_size=700)}


def spec_for(kind: str, trained: dict[str, Path], **names: str) -> TokenizerSpec:
    return TokenizerSpec(kind=kind, path=trained.get(kind), **names)


def raw_encoder(kind: str, path: Path):
    """``encode(text) -> list[int]`` straight from the library (no chunking, no specials)."""
    if kind == "hf":
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(path))
        tok.encode_special_tokens = True  # fabricd's: a literal "</s>" in a document is text
        return lambda t: tok.encode(t, add_special_tokens=False).ids
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(path))
    return lambda t: sp.encode(t, out_type=int, add_bos=False, add_eos=False)


@pytest.fixture(scope="session")
def varied_texts() -> list[str]:
    rng = np.random.default_rng(5)
    words = _words(3)
    long_doc = prose(rng, 3 * CHUNK_CHARS + 12345, words)             # several chunks, cut at breaks
    return [
        "",
        "hello",
        " ",
        "   \n\n\t  ",
        "café 東京 naïve ü 🙂 ẞ ж \u200b",
        "<image>",
        "a<image>b <image> c",
        "\x00\x01 control\r\n",
        "x" * (CHUNK_CHARS + 777),                                       # no break at all: cut at the limit
        long_doc,
        code(rng, 4000, words),                                          # > CHUNK_CHARS, many newlines
        prose(rng, CHUNK_CHARS, words),                                  # exactly one chunk
    ]


# --------------------------------------------------------------------------- chunk_bounds


def _check_cover(text: str, bounds: list[tuple[int, int]], limit: int) -> None:
    assert bounds[0][0] == 0 and bounds[-1][1] == len(text)
    for (a, b), (c, _) in zip(bounds, bounds[1:]):
        assert b == c
    assert all(0 < b - a <= limit for a, b in bounds) or (len(text) == 0 and bounds == [(0, 0)])
    assert "".join(text[a:b] for a, b in bounds) == text


def _expected_cut(text: str, start: int, limit: int) -> int:
    """The documented rule, written as a scan: before the last single space between two
    non-space characters in the chunk's second half, else after its last newline there, else at
    the limit."""
    end, half = start + limit, start + limit // 2
    window = range(end - 1, half - 1, -1)
    for i in window:
        if (text[i] == " " and i > start and i + 1 < len(text) and not text[i - 1].isspace()
                and not text[i + 1].isspace()):
            return i
    for i in window:
        if text[i] == "\n":
            return i + 1
    return end


@pytest.mark.parametrize("text,limit,expected", [
    ("", 16, [(0, 0)]),
    ("short", 16, [(0, 5)]),
    ("a" * 16, 16, [(0, 16)]),
    ("a" * 10 + "\n" + "b" * 10, 16, [(0, 11), (11, 21)]),              # after the newline
    ("a" * 3 + "\n" + "b" * 20, 16, [(0, 16), (16, 24)]),               # newline in the first half: ignored
    ("a" * 12 + " " + "b" * 12, 16, [(0, 12), (12, 25)]),               # before the space
    ("a" * 9 + "\n" + "bb cc dd", 16, [(0, 15), (15, 18)]),             # a word gap wins over a newline
    ("a" * 9 + "\n" + "bb  cc\ndd e", 16, [(0, 10), (10, 21)]),         # a double space is no gap: the newline
    ("a" * 12 + "\n" + " bbbbbbbbbbbb", 16, [(0, 13), (13, 26)]),       # a space after a newline is no gap
    ("x" * 40, 16, [(0, 16), (16, 32), (32, 40)]),                      # no break: at the limit
])
def test_chunk_bounds_cases(text: str, limit: int, expected: list[tuple[int, int]]) -> None:
    assert chunk_bounds(text, limit) == expected


def test_chunk_bounds_random_texts_follow_the_rule() -> None:
    rng = np.random.default_rng(0)
    alphabet = np.array(list("abcdé東 \n"), dtype=object)
    for trial in range(300):
        limit = int(rng.integers(2, 40))
        p = rng.dirichlet(np.ones(len(alphabet)) * (0.3 if trial % 2 else 3.0))
        text = "".join(rng.choice(alphabet, size=int(rng.integers(0, 400)), p=p).tolist())
        bounds = chunk_bounds(text, limit)
        _check_cover(text, bounds, limit)
        for a, b in bounds[:-1]:
            assert b == _expected_cut(text, a, limit), (text, limit, a)
        assert chunk_bounds(text, limit) == bounds


def test_chunk_bounds_two_million_characters() -> None:
    rng = np.random.default_rng(1)
    doc = prose(rng, 2_000_000, _words(1))
    assert len(doc) == 2_000_000
    bounds = chunk_bounds(doc)
    _check_cover(doc, bounds, CHUNK_CHARS)
    assert len(bounds) >= -(-len(doc) // CHUNK_CHARS)
    for a, b in bounds[:-1]:
        # prose has a word gap in every half chunk: every cut is before a space between words
        assert doc[b] == " " and not doc[b - 1].isspace() and not doc[b + 1].isspace() and b - a > CHUNK_CHARS // 2
        assert b == _expected_cut(doc, a, CHUNK_CHARS)
    assert chunk_bounds(doc) == bounds
    # the cut points depend on the text alone: the same text built again cuts the same way
    assert chunk_bounds("".join(list(doc))) == bounds


# --------------------------------------------------------------------------- encoding rule


@pytest.mark.parametrize("kind", KINDS)
def test_encode_and_count_agree(kind: str, trained: dict[str, Path], varied_texts: list[str],
                                monkeypatch: pytest.MonkeyPatch) -> None:
    tok = load_tokenizer(spec_for(kind, trained))
    ids = tok.encode_texts(varied_texts)
    assert len(ids) == len(varied_texts)
    assert all(a.dtype == np.int32 and a.ndim == 1 for a in ids)
    lengths = [len(a) for a in ids]
    assert tok.count_texts(varied_texts).tolist() == lengths
    assert tok.count_texts(varied_texts).dtype == np.int64
    # one text at a time, and in batches split small (several count calls per text), agree too
    assert [int(tok.count_texts([t])[0]) for t in varied_texts] == lengths
    assert [tok.encode_texts([t])[0].tolist() for t in varied_texts] == [a.tolist() for a in ids]
    monkeypatch.setattr(text_mod, "BATCH_CHARS", 5000)
    assert tok.count_texts(varied_texts).tolist() == lengths
    assert lengths[0] == 0 and all(n > 0 for n in lengths[1:])
    assert all(0 <= int(a.min()) and int(a.max()) < tok.vocab_size for a in ids if len(a))
    if kind == "bytes":  # independent expectation: one token per UTF-8 byte
        assert lengths == [len(t.encode("utf-8")) for t in varied_texts]
    else:  # a text within one chunk encodes exactly as the library encodes it
        raw = raw_encoder(kind, trained[kind])
        for t, a in zip(varied_texts, ids):
            if len(t) <= CHUNK_CHARS:
                assert a.tolist() == raw(t), t[:40]
        # it never encodes to fewer tokens than... one per character would bound from above
        assert sum(lengths) < sum(len(t.encode("utf-8")) for t in varied_texts)


@pytest.mark.parametrize("kind", ("hf", "sentencepiece"))
def test_long_document_is_its_chunks_concatenated(kind: str, trained: dict[str, Path],
                                                  varied_texts: list[str]) -> None:
    tok = load_tokenizer(spec_for(kind, trained))
    raw = raw_encoder(kind, trained[kind])
    long_docs = [t for t in varied_texts if len(t) > CHUNK_CHARS]
    assert len(long_docs) == 3
    for doc, ids in zip(long_docs, tok.encode_texts(long_docs)):
        bounds = chunk_bounds(doc)
        assert len(bounds) >= 2
        expected = [i for a, b in bounds for i in raw(doc[a:b])]
        assert ids.tolist() == expected
    # cuts after a newline change nothing for these tokenizers: prose encodes as if whole
    prose_doc = long_docs[1]
    assert tok.encode_texts([prose_doc])[0].tolist() == raw(prose_doc)


@pytest.mark.parametrize("kind", ("hf", "sentencepiece"))
def test_trained_tokenizers_are_lossless(kind: str, trained: dict[str, Path], varied_texts: list[str]) -> None:
    """Byte-level BPE and byte fallback: any text encodes without an unknown token and decodes back."""
    if kind == "hf":
        from tokenizers import Tokenizer

        lib = Tokenizer.from_file(str(trained[kind]))
        decode = lambda ids: lib.decode(ids, skip_special_tokens=False)  # noqa: E731
        unk = None
    else:
        import sentencepiece as spm

        lib = spm.SentencePieceProcessor(model_file=str(trained[kind]))
        decode = lambda ids: lib.decode(ids)  # noqa: E731
        unk = lib.unk_id()
    tok = load_tokenizer(spec_for(kind, trained))
    for t in varied_texts[:9]:
        (ids,) = tok.encode_texts([t])
        assert unk not in ids.tolist()
        assert decode(ids.tolist()) == t


# --------------------------------------------------------------------------- special tokens


@pytest.mark.parametrize("kind", ("hf", "sentencepiece"))
def test_special_tokens_by_name(kind: str, trained: dict[str, Path]) -> None:
    if kind == "hf":
        from tokenizers import Tokenizer

        lookup = Tokenizer.from_file(str(trained[kind])).token_to_id
    else:
        import sentencepiece as spm

        lookup = spm.SentencePieceProcessor(model_file=str(trained[kind])).piece_to_id
    tok = load_tokenizer(spec_for(kind, trained))
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.image_id) == (None, lookup("</s>"), lookup("<pad>"),
                                                                    lookup("<image>"))
    assert tok.specials == 1 and tok.pad_id == 0
    with_bos = load_tokenizer(spec_for(kind, trained, bos="<s>"))
    assert with_bos.bos_id == lookup("<s>") and with_bos.specials == 2
    assert with_bos.identity != tok.identity
    swapped = load_tokenizer(spec_for(kind, trained, eos="<pad>", pad="</s>"))
    assert (swapped.eos_id, swapped.pad_id) == (tok.pad_id, tok.eos_id)


@pytest.mark.parametrize("kind", ("hf", "sentencepiece"))
@pytest.mark.parametrize("role", ("bos", "eos", "pad", "image"))
def test_missing_special_token_is_refused_with_the_list(kind: str, role: str, trained: dict[str, Path]) -> None:
    with pytest.raises(TokenizerError) as e:
        load_tokenizer(spec_for(kind, trained, **{role: "<|endoftext|>"}))
    msg = str(e.value)
    assert "'<|endoftext|>'" in msg and role in msg and str(trained[kind]) in msg
    for name in SPECIAL_TOKENS:
        assert repr(name) in msg


# --------------------------------------------------------------------------- loading


@pytest.mark.parametrize("kind", ("hf", "sentencepiece"))
def test_load_refuses_missing_outside_and_unreadable(kind: str, trained: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="no such file"):
        load_tokenizer(TokenizerSpec(kind=kind, path=tmp_path / "nope" / trained[kind].name))
    with pytest.raises(TokenizerError, match="needs a file"):
        load_tokenizer(TokenizerSpec(kind=kind, path=None))
    root = tmp_path / "root"
    root.mkdir()
    inside = root / trained[kind].name
    shutil.copy(trained[kind], inside)
    assert load_tokenizer(TokenizerSpec(kind=kind, path=inside), roots=[root]).kind == kind
    with pytest.raises(TokenizerError) as e:  # the trained file lives outside ``root``
        load_tokenizer(spec_for(kind, trained), roots=[root])
    assert str(trained[kind]) in str(e.value)
    link = root / "link"  # a symlink inside the root leading out of it
    link.symlink_to(trained[kind])
    with pytest.raises(TokenizerError):
        load_tokenizer(TokenizerSpec(kind=kind, path=link), roots=[root])
    garbage = root / ("bad.json" if kind == "hf" else "bad.model")
    garbage.write_bytes(b"\x00\x01 not a tokenizer {")
    with pytest.raises(TokenizerError, match="cannot load"):
        load_tokenizer(TokenizerSpec(kind=kind, path=garbage))


def test_unknown_kind_is_refused() -> None:
    with pytest.raises(TokenizerError, match="unknown tokenizer kind 'tiktoken'"):
        load_tokenizer(TokenizerSpec(kind="tiktoken", path=Path("/x")))
    assert load_tokenizer(None).kind == "bytes"


@pytest.mark.parametrize("kind", ("hf", "sentencepiece"))
def test_identity_follows_the_file(kind: str, trained: dict[str, Path], corpus_texts: list[str],
                                   tmp_path: Path) -> None:
    path = tmp_path / trained[kind].name
    shutil.copy(trained[kind], path)
    first = load_tokenizer(TokenizerSpec(kind=kind, path=path)).identity
    assert load_tokenizer(TokenizerSpec(kind=kind, path=path)).identity == first
    assert load_tokenizer(spec_for(kind, trained)).identity == first  # same bytes elsewhere: same identity
    if kind == "hf":
        path.write_text(path.read_text() + "\n")  # still the same tokenizer, but not the same file
    else:
        train_sentencepiece(corpus_texts, path, vocab_size=650)
    second = load_tokenizer(TokenizerSpec(kind=kind, path=path)).identity
    assert second != first
    assert len({first, second, load_tokenizer(None).identity}) == 3
    assert str(CHUNK_CHARS) in first


def test_hf_truncation_and_padding_in_the_file_are_ignored(trained: dict[str, Path], varied_texts: list[str],
                                                            tmp_path: Path) -> None:
    from tokenizers import Tokenizer

    lib = Tokenizer.from_file(str(trained["hf"]))
    lib.enable_truncation(max_length=8)
    lib.enable_padding(length=64, pad_id=0, pad_token="<pad>")
    path = tmp_path / "tokenizer.json"
    lib.save(str(path))
    assert json.loads(path.read_text())["truncation"]["max_length"] == 8
    plain = load_tokenizer(spec_for("hf", trained))
    tok = load_tokenizer(TokenizerSpec(kind="hf", path=path))
    texts = varied_texts[1:]
    got = tok.encode_texts(texts)
    assert [a.tolist() for a in got] == [a.tolist() for a in plain.encode_texts(texts)]
    assert tok.count_texts(texts).tolist() == [len(a) for a in got]
    assert max(len(a) for a in got) > 10_000
    assert tok.pad_id not in got[-1].tolist()


@pytest.mark.parametrize("kind", ("hf", "sentencepiece"))
def test_serial_encoding_equals_parallel(kind: str, trained: dict[str, Path], varied_texts: list[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)  # restored after the test
    par = load_tokenizer(spec_for(kind, trained), parallel=True)
    ser = load_tokenizer(spec_for(kind, trained), parallel=False)
    assert ser.identity == par.identity
    assert [a.tolist() for a in ser.encode_texts(varied_texts)] == [a.tolist() for a in par.encode_texts(varied_texts)]


# --------------------------------------------------------------------------- trainers


def test_train_bpe_file_and_vocabulary(corpus_texts: list[str], tmp_path: Path) -> None:
    from tokenizers import Tokenizer

    a = train_bpe(corpus_texts, tmp_path / "a", vocab_size=500)
    b = train_bpe(iter(corpus_texts), tmp_path / "b" / "named.json", vocab_size=500)
    assert a == tmp_path / "a" / "tokenizer.json" and b == tmp_path / "b" / "named.json"
    assert a.read_bytes() == b.read_bytes()  # same texts: same file
    lib = Tokenizer.from_file(str(a))
    assert [lib.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
    assert lib.get_vocab_size() == 500
    assert lib.encode("东京 🙂", add_special_tokens=False).ids  # bytes never seen in training
    assert not list(tmp_path.rglob("*.tmp"))
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe(corpus_texts, tmp_path / "c", vocab_size=100)


def test_train_sentencepiece_file_and_vocabulary(corpus_texts: list[str], tmp_path: Path) -> None:
    import sentencepiece as spm

    a = train_sentencepiece(corpus_texts, tmp_path / "a", vocab_size=700)
    b = train_sentencepiece(list(corpus_texts), tmp_path / "b" / "m.model", vocab_size=700)
    assert a == tmp_path / "a" / "spm.model" and b == tmp_path / "b" / "m.model"
    assert a.read_bytes() == b.read_bytes()
    sp = spm.SentencePieceProcessor(model_file=str(a))
    assert [sp.piece_to_id(t) for t in SPECIAL_TOKENS] == [0, 2, 3, 4]
    assert sp.unk_id() == 1 and sp.get_piece_size() == 700
    assert sp.is_control(0) and sp.is_control(3) and not sp.is_control(4)
    # the image token is one piece even inside text; control tokens are not matched in text
    assert sp.encode("a<image>b").count(4) == 1 and 3 not in sp.encode("a</s>b")
    # a tiny text cannot fill the vocabulary: a smaller model, not an error
    small = train_sentencepiece(["just a few words here"], tmp_path / "s", vocab_size=2048)
    assert 261 < spm.SentencePieceProcessor(model_file=str(small)).get_piece_size() < 2048
    # only max_chars of the texts are read
    capped = train_sentencepiece(corpus_texts, tmp_path / "cap", vocab_size=700, max_chars=2000)
    assert capped.read_bytes() != a.read_bytes()
    with pytest.raises(ValueError, match="no non-blank line"):
        train_sentencepiece(["", "  \n\n"], tmp_path / "e")
    with pytest.raises(ValueError, match="vocab_size"):
        train_sentencepiece(corpus_texts, tmp_path / "e", vocab_size=200)

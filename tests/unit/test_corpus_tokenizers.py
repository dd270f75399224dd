"""The demo corpus trains its two tokenizers, and job_toml selects one of them by name."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from fabricd.corpus import SOURCES, job_toml, main, make_dataset, tokenizer_paths
from fabricd.text import TokenizerSpec, load_tokenizer

pytestmark = [pytest.mark.unit, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("corpus")
    make_dataset(out, 24, seed=2, progress=False)
    return out


def test_corpus_tokenizers_are_trained_and_usable(corpus: Path) -> None:
    paths = tokenizer_paths(corpus)
    assert paths == {"hf": corpus / "tokenizer" / "tokenizer.json",
                     "sentencepiece": corpus / "tokenizer" / "spm.model"}
    texts = pq.read_table(corpus / "longdocs").column("text").to_pylist()
    nbytes = sum(len(t.encode()) for t in texts)
    for kind, path in paths.items():
        assert path.is_file()
        tok = load_tokenizer(TokenizerSpec(kind=kind, path=path))  # the default special-token names
        assert tok.bos_id is None and len({tok.eos_id, tok.pad_id, tok.image_id}) == 3
        counts = tok.count_texts(texts)
        assert counts.tolist() == [len(a) for a in tok.encode_texts(texts)]
        # trained on this corpus's words: far fewer tokens than bytes
        assert 0 < counts.sum() < 0.45 * nbytes, (kind, counts.sum(), nbytes)


def test_job_toml_tokenizer_table(corpus: Path) -> None:
    plain = job_toml(corpus, name="j", seed=1, dp_size=2, samples_per_step=4, prefetch=2)
    assert "[tokenizer]" not in plain
    assert plain == job_toml(corpus, name="j", seed=1, dp_size=2, samples_per_step=4, prefetch=2, tokenizer="bytes")
    spec = tomllib.loads(plain)
    for kind, key in (("hf", "path"), ("sentencepiece", "model")):
        text = job_toml(corpus, name="j", seed=1, dp_size=2, samples_per_step=4, prefetch=2, tokenizer=kind)
        parsed = tomllib.loads(text)
        assert parsed["tokenizer"] == {"kind": kind, key: str(tokenizer_paths(corpus)[kind]),
                                       "eos": "</s>", "pad": "<pad>", "image": "<image>"}
        assert Path(parsed["tokenizer"][key]).is_absolute() and Path(parsed["tokenizer"][key]).is_file()
        parsed.pop("tokenizer")
        assert parsed == spec  # nothing else changes
    with pytest.raises(ValueError, match="'tiktoken'"):
        job_toml(corpus, name="j", seed=1, dp_size=2, samples_per_step=4, prefetch=2, tokenizer="tiktoken")


def test_no_tokenizers_and_refusal(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["--out", str(tmp_path / "a"), "--samples", "3", "--workers", "1", "--no-tokenizers"]) == 0
    assert not (tmp_path / "a" / "tokenizer").exists() and "tokenizer.json" not in capsys.readouterr().out
    assert main(["--out", str(tmp_path / "b"), "--samples", "3", "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert all(str(p) in out for p in tokenizer_paths(tmp_path / "b").values())
    # a corpus dir whose only content is a tokenizer directory is refused like a source directory
    for name in SOURCES:
        for p in sorted((tmp_path / "b" / name).rglob("*"), reverse=True):
            p.unlink() if p.is_file() else p.rmdir()
        (tmp_path / "b" / name).rmdir()
    with pytest.raises(FileExistsError, match="tokenizer"):
        make_dataset(tmp_path / "b", 3, seed=0, progress=False)
    make_dataset(tmp_path / "b", 3, seed=0, progress=False, tokenizers=False)  # not touched: fine
    make_dataset(tmp_path / "b", 3, seed=0, progress=False, overwrite=True)
    assert all(p.is_file() for p in tokenizer_paths(tmp_path / "b").values())

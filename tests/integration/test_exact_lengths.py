"""The length of every unit the loader makes equals the planner's length from the index.

Over the whole demo corpus (five sources, Parquet and JSONL, with images), and the same content
exported as WebDataset shards, a Megatron indexed dataset and pre-tokenized Parquet; for every
tokenizer kind (bytes, the corpus's BPE, its SentencePiece model), fixed and native images, and
a truncating and a splitting context — so truncated samples cut inside an image block, and long
documents split into pieces, are all covered.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fabricd.corpus import SOURCES, make_dataset, tokenizer_paths
from fabricd.corpus_export import write_megatron, write_token_parquet, write_webdataset
from fabricd.images import ImageSpec
from fabricd.job import source_units
from fabricd.sources import RawSample, SampleData, SampleLoader, SourceReader, TransformSpec, open_index
from fabricd.sources.transform import full_sequence
from fabricd.text import TokenizerSpec, load_tokenizer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

GEOMETRIES = {
    "fixed": ImageSpec(mode="fixed", image_tokens=24, image_size=16),
    # small pixel bounds so that images take tens to a few hundred tokens, like a real VLM's
    "native": ImageSpec(mode="native", patch_size=14, merge_size=2, min_pixels=28 * 28, max_pixels=28 * 28 * 160),
}
CONTEXTS = [(192, "truncate"), (384, "split")]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("corpus")
    make_dataset(out, 30, seed=21, progress=False, corrupt_fraction=0.0)
    return out


def _tokenizer(corpus: Path, kind: str):
    if kind == "bytes":
        return load_tokenizer(None)
    return load_tokenizer(TokenizerSpec(kind=kind, path=tokenizer_paths(corpus)[kind]))


def _raw_samples(corpus: Path, source: str) -> list[RawSample]:
    idx = open_index(source, corpus / source)
    with SourceReader(idx) as reader:
        return [s for s in reader.read(np.arange(idx.num_samples)) if isinstance(s, RawSample)]


def _exports(corpus: Path, kind: str, tok, out: Path) -> dict[str, Path]:
    """The corpus's content in the other formats: images and text as WebDataset, the text-only
    sources' full token sequences (under ``tok``) as Megatron and pre-tokenized Parquet."""
    paths = {}
    mm = [s for src in ("interleaved", "captions") for s in _raw_samples(corpus, src)]
    write_webdataset(out / "wds", [(s.text, s.images) for s in mm], per_shard=25)
    paths["wds"] = out / "wds"
    docs = [full_sequence(s, tok)[0] for src in ("longdocs", "code") for s in _raw_samples(corpus, src)]
    write_megatron(out / "megatron" / "docs", docs, dtype=np.uint16 if tok.vocab_size < 65536 else np.int32)
    paths["megatron"] = out / "megatron"
    masks = [np.arange(len(d)) % 3 != 0 for d in docs]
    write_token_parquet(out / "tokens" / "part-0.parquet", docs, masks)
    paths["tokens"] = out / "tokens"
    return paths


@pytest.mark.parametrize("kind", ["bytes", "hf", "sentencepiece"])
def test_every_unit_has_the_planned_length(corpus: Path, tmp_path: Path, kind: str) -> None:
    tok = _tokenizer(corpus, kind)
    sources = {name: corpus / name for name in SOURCES}
    sources.update(_exports(corpus, kind, tok, tmp_path))
    seen = {"units": 0, "pieces_of_split_docs": 0, "cut_inside_an_image": 0, "images": 0}
    for name, path in sources.items():
        idx = open_index(name, path, tokenizer=tok)
        assert idx.num_samples > 0 and not idx.files_skipped, (name, idx.files_skipped)
        for geo_name, geo in GEOMETRIES.items():
            if geo_name == "native" and not idx.num_images.any():
                continue  # the same units as fixed
            for m, policy in CONTEXTS:
                units = source_units(name, idx, geo, max_seq_len=m, long_samples=policy)
                loader = SampleLoader(idx, TransformSpec(max_seq_len=m, long_samples=policy, images=geo), tokenizer=tok)
                got = loader.load(units.sample_id, units.piece)
                loader.close()
                for k, unit in enumerate(got):
                    where = (kind, name, geo_name, m, policy, int(units.sample_id[k]), int(units.piece[k]))
                    assert isinstance(unit, SampleData), (where, unit)
                    assert len(unit.input_ids) == int(units.tokens[k]), where
                    assert int(unit.input_ids.max()) < tok.vocab_size, where
                    if len(unit.image_starts):
                        assert np.all(unit.input_ids[unit.image_starts] == tok.image_id), where
                    seen["images"] += len(unit.image_starts)
                seen["units"] += len(got)
                seen["pieces_of_split_docs"] += int((units.piece > 0).sum())
                if policy == "truncate" and idx.num_images.any():
                    full = idx.text_tokens[units.sample_id] + _image_total(idx, geo)[units.sample_id]
                    seen["cut_inside_an_image"] += int(((units.tokens < np.minimum(full, m)) & (units.images > 0)).sum())
    # the hard cases really happened
    assert seen["pieces_of_split_docs"] > 20 and seen["cut_inside_an_image"] > 5 and seen["images"] > 100, seen


def _image_total(idx, geo: ImageSpec) -> np.ndarray:
    from fabricd.sources.transform import image_tokens_per_sample

    return image_tokens_per_sample(idx, geo)[0]


def test_bos_is_counted_and_placed(corpus: Path, tmp_path: Path) -> None:
    """A tokenizer that adds BOS: every unit 0 starts with it and lengths still agree."""
    tok = load_tokenizer(TokenizerSpec(kind="hf", path=tokenizer_paths(corpus)["hf"], bos="<s>"))
    for name in ("interleaved", "longdocs"):
        idx = open_index(name, corpus / name, tokenizer=tok)
        units = source_units(name, idx, GEOMETRIES["native"], max_seq_len=256, long_samples="split")
        loader = SampleLoader(idx, TransformSpec(max_seq_len=256, long_samples="split", images=GEOMETRIES["native"]),
                              tokenizer=tok)
        for k, unit in enumerate(loader.load(units.sample_id, units.piece)):
            assert len(unit.input_ids) == int(units.tokens[k])
            if units.piece[k] == 0:
                assert int(unit.input_ids[0]) == tok.bos_id


@pytest.mark.parametrize("kind", ["hf", "sentencepiece"])
@pytest.mark.parametrize("bos", ["", "<s>"])
def test_pieces_of_long_documents_are_encoded_chunk_by_chunk_exactly(corpus: Path, kind: str, bos: str,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Documents of many chunks (the limit lowered so the demo's long documents have dozens): a
    loader encodes only the chunks a piece covers, and the piece is exactly the slice of the whole
    sequence the length rule names, with the planner's length."""
    import fabricd.text as text_mod

    monkeypatch.setattr(text_mod, "CHUNK_CHARS", 300)
    tok = load_tokenizer(TokenizerSpec(kind=kind, path=tokenizer_paths(corpus)[kind], bos=bos))
    calls: list[int] = []
    real = type(tok).encode_chunks
    monkeypatch.setattr(type(tok), "encode_chunks", lambda self, chunks: calls.append(len(chunks)) or real(self, chunks))
    idx = open_index("longdocs", corpus / "longdocs", tokenizer=tok, rebuild=True)
    assert int(idx.num_chunks.max()) > 10  # long documents really are many chunks now
    raws = {i: r for i, r in enumerate(_raw_samples(corpus, "longdocs"))}
    for m, policy in [(256, "split"), (96, "split"), (512, "truncate")]:
        units = source_units("longdocs", idx, GEOMETRIES["fixed"], max_seq_len=m, long_samples=policy)
        loader = SampleLoader(idx, TransformSpec(max_seq_len=m, long_samples=policy), tokenizer=tok)
        calls.clear()
        got = loader.load(units.sample_id, units.piece)
        assert calls and max(calls) <= -(-m // 20) + 2, calls  # a few chunks a piece, never a whole document
        for k, unit in enumerate(got):
            sid, piece = int(units.sample_id[k]), int(units.piece[k])
            whole = full_sequence(raws[sid], tok)[0]
            assert unit.input_ids.tolist() == whole[piece * m:(piece + 1) * m].tolist(), (sid, piece)
            assert len(unit.input_ids) == int(units.tokens[k])

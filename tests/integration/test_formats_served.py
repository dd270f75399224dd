"""WebDataset, Megatron-LM and pre-tokenized Parquet sources serving one job through a real daemon,
with the corpus's BPE tokenizer and native-resolution images: what the trainers receive equals
the offline expectation (``fabricctl expect``'s computation), batch for batch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fabricd.corpus import tokenizer_paths
from fabricd.corpus_export import write_megatron, write_token_parquet, write_webdataset
from fabricd.sources import RawSample, SourceReader, open_index
from fabricd.sources.transform import full_sequence
from fabricd.text import TokenizerSpec, load_tokenizer

from .test_data_path import assert_exact, expected, run_ranks, submit

pytestmark = [pytest.mark.integration]


def _samples(corpus: Path, source: str) -> list[RawSample]:
    idx = open_index(source, corpus / source)
    with SourceReader(idx) as reader:
        return [s for s in reader.read(np.arange(idx.num_samples)) if isinstance(s, RawSample)]


@pytest.mark.timeout(240)
def test_webdataset_megatron_and_token_parquet_serve_a_job_exactly(tmp_path, tiny_corpus, local_daemon):
    tok_file = tokenizer_paths(tiny_corpus)["hf"]
    tok = load_tokenizer(TokenizerSpec(kind="hf", path=tok_file))
    data = tmp_path / "data"
    write_webdataset(data / "wds", [(s.text, s.images) for src in ("interleaved", "captions")
                                    for s in _samples(tiny_corpus, src)], per_shard=20)
    docs = [full_sequence(s, tok)[0] for src in ("longdocs", "code") for s in _samples(tiny_corpus, src)]
    write_megatron(data / "megatron" / "corpus_text_document", docs, dtype=np.uint16)
    write_token_parquet(data / "tokens" / "part-0.parquet", docs[::-1], [np.arange(len(d)) % 4 != 0 for d in docs[::-1]])
    job_file = tmp_path / "job.toml"
    job_file.write_text(f"""
[job]
name = "formats"
seed = 5
[topology]
dp_size = 2
ranks_per_constructor = 1
[batch]
samples_per_step = 12
micro_batch_tokens = 4096
prefetch = 2
[tokenizer]
kind = "hf"
path = "{tok_file}"
[images]
mode = "native"
patch_size = 14
merge_size = 2
min_pixels = 3136
max_pixels = 100352
[cost]
vision_attention = 1.0
vision_linear = 4096.0
[[buckets]]
name = "short"
max_seq_len = 1024
long_samples = "truncate"
[[buckets]]
name = "long"
max_seq_len = 2048
long_samples = "split"
[[sources]]
name = "wds"
path = "{data / 'wds'}"
bucket = "short"
[[sources]]
name = "megatron"
path = "{data / 'megatron'}"
bucket = "long"
[[sources]]
name = "tokens"
path = "{data / 'tokens'}"
format = "parquet-tokens"
bucket = "long"
[mixture]
[[mixture.points]]
step = 0
weights = {{ wds = 0.5, megatron = 0.3, tokens = 0.2 }}
""")
    submit(local_daemon, job_file)
    status = local_daemon.status()["jobs"]["formats"]
    assert {n: s["samples"] for n, s in status["sources"].items()} == {
        "wds": sum(len(_samples(tiny_corpus, s)) for s in ("interleaved", "captions")),
        "megatron": len(docs), "tokens": len(docs)}
    assert {n: s["format"] for n, s in status["sources"].items()} == {
        "wds": "webdataset", "megatron": "megatron", "tokens": "parquet-tokens"}
    assert status["sources"]["megatron"]["tokens"] == sum(len(d) for d in docs) == status["sources"]["tokens"]["tokens"]
    assert (status["tokenizer"], status["images"]) == ("hf", "native")
    steps = 5
    got = run_ranks(local_daemon.address, "formats", 2, 1, steps)
    want = expected(job_file, range(steps))
    for (d, _), records in got.items():
        assert_exact(records, want, d)
    served = {src for records in got.values() for _, _, units, _ in records for src, _, _ in units}
    assert served == {0, 1, 2}, f"every source should serve in {steps} steps, got {served}"

"""Pre-tokenized sources against the job's vocabulary: ids outside it never reach a trainer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fabricd.corpus_export import write_megatron, write_token_parquet
from fabricd.errors import SampleError, SourceError
from fabricd.job import check_vocabulary
from fabricd.sources import SampleData, SampleLoader, TransformSpec, open_index
from fabricd.text import load_tokenizer

pytestmark = pytest.mark.unit


def test_the_index_knows_a_token_parquet_sources_largest_id(tmp_path: Path) -> None:
    write_token_parquet(tmp_path / "t" / "a.parquet", [np.array([5, 9, 7]), np.array([300, 2])])
    write_token_parquet(tmp_path / "t" / "b.parquet", [np.array([1, 1])])
    idx = open_index("t", tmp_path / "t")
    assert idx.format == "parquet-tokens" and idx.max_token_id == 300
    assert open_index("t", tmp_path / "t").max_token_id == 300  # persisted with the index
    with pytest.raises(SourceError, match=r"token id 300, outside the job tokenizer's vocabulary of 259"):
        check_vocabulary({"t": idx}, load_tokenizer(None))


def test_a_megatron_sample_outside_the_vocabulary_is_a_sample_error_naming_the_id(tmp_path: Path) -> None:
    write_megatron(tmp_path / "m" / "docs", [np.array([3, 4, 5]), np.array([3, 1000, 4]), np.array([258])])
    idx = open_index("m", tmp_path / "m")
    assert idx.max_token_id == -1  # not known without reading the whole .bin
    check_vocabulary({"m": idx}, load_tokenizer(None))  # nothing to say at indexing
    loader = SampleLoader(idx, TransformSpec(max_seq_len=16, long_samples="split"))
    got = loader.load(np.arange(3), np.zeros(3, np.int64))
    assert isinstance(got[0], SampleData) and got[0].input_ids.tolist() == [3, 4, 5]
    assert isinstance(got[1], SampleError) and "token id 1000" in got[1].reason and "259" in got[1].reason
    assert isinstance(got[2], SampleData) and got[2].input_ids.tolist() == [258]

"""Submit-time checks (fabricd.admission) and the reasons a source with no usable sample fails with."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fabricd.admission import check_data_file, check_roles, check_sources, check_tokenizer, is_retry
from fabricd.config import load_node_config, parse_job_spec
from fabricd.errors import ConfigError, SourceError
from fabricd.sources.index import open_index, require_samples, skip_reasons
from fabricd.spec_bounds import MAX_ROLES_PER_DAEMON

pytestmark = [pytest.mark.unit, pytest.mark.timeout(30)]


def job_text(path: str, *, dp_size: int = 1, rpc: int = 1, fmt: str = "auto", workers: int = 0) -> str:
    return f"""
[job]
name = "j"
[topology]
dp_size = {dp_size}
ranks_per_constructor = {rpc}
[batch]
samples_per_step = {max(dp_size, 4)}
micro_batch_tokens = 4096
[[buckets]]
name = "short"
max_seq_len = 1024
[[sources]]
name = "s"
path = "{path}"
format = "{fmt}"
workers = {workers}
[mixture]
[[mixture.points]]
step = 0
weights = {{ s = 1.0 }}
"""


def write_parquet(path: Path, text) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"text": text}), path)
    return path


def node_cfg(tmp_path: Path, peers: int = 1, loader_workers: int = 1):
    body = f'[node]\nid = "n0"\ncontrol = "tcp://127.0.0.1:7000"\nstate_dir = "{tmp_path / "st"}"\n'
    body += f"[roles]\nloader_workers = {loader_workers}\n"
    body += "".join(f'[[cluster.peers]]\nid = "n{i}"\ncontrol = "tcp://127.0.0.1:{7000 + i}"\n' for i in range(peers))
    p = tmp_path / "node.toml"
    p.write_text(body)
    return load_node_config(p)


def spec(tmp_path: Path, path, **kw):
    return parse_job_spec(job_text(str(path), **kw), tmp_path / "job.toml")


# --- formats -------------------------------------------------------------------------------------

def test_check_data_file(tmp_path):
    good = write_parquet(tmp_path / "a.parquet", ["x"])
    assert check_data_file(good, "parquet") is None
    fake = tmp_path / "b.parquet"
    fake.write_text('{"text": "I am JSON"}\n')
    assert "not a Parquet file" in check_data_file(fake, "parquet")
    (tmp_path / "tiny.parquet").write_bytes(b"PAR1")
    assert "not a Parquet file" in check_data_file(tmp_path / "tiny.parquet", "parquet")
    jl = tmp_path / "a.jsonl"
    jl.write_text('\n{"text": "hi"}\nnot json\n')  # only the first non-blank line is judged
    assert check_data_file(jl, "jsonl") is None
    jl.write_bytes(good.read_bytes())
    assert "not a JSONL file" in check_data_file(jl, "jsonl")
    jl.write_text("[1, 2]\n")
    assert "of objects" in check_data_file(jl, "jsonl")


@pytest.mark.parametrize("setup, fragment", [
    (lambda d: d / "missing", "no such file or directory"),
    (lambda d: (d / "empty").mkdir() or d / "empty", "no data files of a known format (.idx, .jsonl, .parquet, .tar)"),
    (lambda d: (write_parquet(d / "m" / "a.parquet", ["x"]), (d / "m" / "b.jsonl").write_text('{"text":"x"}\n'),
                d / "m")[-1], "mixed formats"),
    (lambda d: (write_parquet(d / "p" / "a.parquet", ["x"]), (d / "p" / "z.parquet").write_text("text,csv\n"),
                d / "p")[-1], "z.parquet: not a Parquet file"),
    (lambda d: ((d / "f.parquet").write_text("hello"), d / "f.parquet")[-1], "not a Parquet file"),
    (lambda d: ((d / "f.csv").write_text("hello"), d / "f.csv")[-1], "cannot tell the format"),
])
def test_check_sources_refuses_naming_the_path(tmp_path, setup, fragment):
    path = setup(tmp_path)
    with pytest.raises(ConfigError) as info:
        check_sources(spec(tmp_path, path))
    err = info.value
    assert err.key == "sources[0].path" and err.value == str(path) and err.file == str(tmp_path / "job.toml")
    assert fragment in str(err)


def test_check_sources_accepts_good_sources_and_skips_hidden_files(tmp_path):
    d = tmp_path / "ok"
    write_parquet(d / "a.parquet", ["x", "y"])
    (d / ".hidden.parquet").write_text("junk")
    (d / "_SUCCESS.parquet").write_text("junk")
    check_sources(spec(tmp_path, d))
    check_sources(spec(tmp_path, d, fmt="parquet"))
    check_sources(spec(tmp_path, d / "a.parquet"))


def test_check_sources_opens_a_bounded_number_of_files(tmp_path):
    d = tmp_path / "many"
    for i in range(16):  # a source's share of SUBMIT_CHECKED_FILES
        write_parquet(d / f"{i:04d}.parquet", ["x"])
    (d / "9999.parquet").write_text("not parquet, but past what admission opens")
    check_sources(spec(tmp_path, d))  # indexing will skip it, with its reason


# --- roles per daemon ----------------------------------------------------------------------------

def test_check_roles_bound(tmp_path):
    data = write_parquet(tmp_path / "a.parquet", ["x"])
    one = node_cfg(tmp_path, peers=1, loader_workers=1)
    limit = MAX_ROLES_PER_DAEMON - 1  # constructors; + 1 loader worker
    check_roles(spec(tmp_path, data, dp_size=limit), one)
    with pytest.raises(ConfigError) as info:
        check_roles(spec(tmp_path, data, dp_size=limit + 1), one)
    assert info.value.key == "topology.dp_size" and f"MAX_ROLES_PER_DAEMON ({MAX_ROLES_PER_DAEMON})" in str(info.value)
    three = node_cfg(tmp_path, peers=3, loader_workers=1)  # constructors have standbys: 2 roles each
    per = (3 * MAX_ROLES_PER_DAEMON - 1) // 2
    check_roles(spec(tmp_path, data, dp_size=per), three)
    with pytest.raises(ConfigError):
        check_roles(spec(tmp_path, data, dp_size=per + 1), three)
    check_roles(spec(tmp_path, data, dp_size=4096, rpc=64), three)  # a big job with sane grouping


def test_check_roles_counts_a_slot_per_core_on_daemons_that_report_more_cores(tmp_path):
    data = write_parquet(tmp_path / "a.parquet", ["x"])
    one = node_cfg(tmp_path, peers=1, loader_workers=1)
    node = one.cluster.peers[0].node_id
    big = spec(tmp_path, data, dp_size=150)  # 150 constructors and a loader: more than 64 slots
    with pytest.raises(ConfigError):
        check_roles(big, one)  # no cores known: MAX_ROLES_PER_DAEMON
    with pytest.raises(ConfigError):
        check_roles(big, one, {node: 16})  # fewer cores than the fixed bound
    check_roles(big, one, {node: 192})  # a 192-core node: 192 slots
    with pytest.raises(ConfigError) as info:
        check_roles(big, one, {node: 128})
    assert "(128 in all)" in str(info.value)
    with pytest.raises(ConfigError):
        check_roles(big, one, {"another-node": 192})  # cores of a daemon outside this cluster count for nothing


def test_is_retry():
    assert is_retry("failed")
    assert not is_retry("indexing") and not is_retry("ready") and not is_retry(None)


# --- why a source has no usable sample ----------------------------------------------------------

@pytest.mark.parametrize("table, fragment", [
    (pa.table({"text": pa.array([1, 2], pa.int64())}), "text column must be a string column, got int64"),
    (pa.table({"body": ["a", "b"]}), "no 'text' column"),
    (pa.table({"text": ["a"], "images": pa.array([[1]], pa.list_(pa.int32()))}), "images column must be list<binary>"),
])
def test_empty_source_error_quotes_file_and_reason(tmp_path, table, fragment):
    d = tmp_path / "src"
    d.mkdir()
    pq.write_table(table, d / "part-0.parquet")
    index = open_index("s", d, index_dir=tmp_path / "idx")
    assert index.num_samples == 0
    assert skip_reasons(index)[0].startswith("part-0.parquet: ")
    with pytest.raises(SourceError) as info:
        require_samples(index)
    msg = str(info.value)
    assert "source 's'" in msg and "part-0.parquet" in msg and fragment in msg and "1 of 1 files skipped" in msg


def test_empty_source_error_for_null_rows_and_healthy_source(tmp_path):
    d = tmp_path / "nulls"
    write_parquet(d / "a.parquet", pa.array([None, None], pa.string()))
    with pytest.raises(SourceError, match="2 rows skipped"):
        require_samples(open_index("s", d, index_dir=tmp_path / "idx"))
    ok = open_index("t", write_parquet(tmp_path / "ok" / "a.parquet", ["x"]).parent, index_dir=tmp_path / "idx")
    require_samples(ok)


def test_skip_reasons_are_bounded(tmp_path):
    d = tmp_path / "bad"
    for i in range(8):
        write_parquet(d / f"{i}.parquet", pa.array([i], pa.int64()))
    reasons = skip_reasons(open_index("s", d, index_dir=tmp_path / "idx"))
    assert len(reasons) == 6 and reasons[-1] == "... and 3 more files"


# --- tokenizer -----------------------------------------------------------------------------------

def test_check_tokenizer_refuses_a_missing_file_or_one_outside_the_roots(tmp_path):
    data = tmp_path / "data"
    src = write_parquet(data / "s" / "a.parquet", ["x"])
    tok_file = data / "tok" / "tokenizer.json"
    text = job_text(str(src.parent)) + f'[tokenizer]\nkind = "hf"\npath = "{tok_file}"\n'
    job = parse_job_spec(text, tmp_path / "job.toml")
    with pytest.raises(ConfigError) as info:
        check_tokenizer(job, roots=[data])
    assert info.value.key == "tokenizer.path" and "no such file" in str(info.value)
    tok_file.parent.mkdir()
    tok_file.write_text("{}")
    check_tokenizer(job, roots=[data])  # exists, inside: loading it is indexing's business
    with pytest.raises(ConfigError, match="tokenizer.*outside"):
        check_tokenizer(job, roots=[data / "s"])
    spm = parse_job_spec(job_text(str(src.parent)) + f'[tokenizer]\nkind = "sentencepiece"\nmodel = "{tmp_path / "no.model"}"\n',
                         tmp_path / "job.toml")
    with pytest.raises(ConfigError) as info:
        check_tokenizer(spm)
    assert info.value.key == "tokenizer.model"
    check_tokenizer(parse_job_spec(job_text(str(src.parent)), tmp_path / "job.toml"))  # bytes: nothing to check

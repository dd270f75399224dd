"""A job whose data is wrong fails with the real reason (file, column, type) where the user looks —
``fabricctl submit --wait`` and ``fabricctl status`` — and resubmitting it after the data is fixed
runs it again; a source that is not its format is refused at submit."""

from __future__ import annotations

import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ..conftest import one_source_job

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

def spec(path) -> str:
    return one_source_job(path, name="wrongdata", bucket="short", max_seq_len=1024, micro_batch_tokens=2048)


def fabricctl(address: str, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from fabricd.cli import fabricctl_main; fabricctl_main()",
                           "--address", address, *args], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def test_wrong_typed_text_column_is_reported_and_a_fixed_resubmission_runs(tmp_path, local_daemon):
    data = tmp_path / "data"
    data.mkdir()
    pq.write_table(pa.table({"text": pa.array([1, 2, 3, 4], pa.int64())}), data / "part-0.parquet")
    job = tmp_path / "job.toml"
    job.write_text(spec(data))
    address = local_daemon.address

    first = fabricctl(address, "submit", "--wait", "--wait-timeout", "60", str(job))
    assert first.returncode != 0
    assert "part-0.parquet" in first.stderr and "text column must be a string column, got int64" in first.stderr
    assert "0 units" not in first.stderr and "Traceback" not in first.stderr
    status = fabricctl(address, "status")
    assert status.returncode == 0 and "got int64" in status.stdout and "part-0.parquet" in status.stdout

    # the identical spec, data unchanged: retried, and fails again for the same reason (not a stale answer)
    again = fabricctl(address, "submit", "--wait", "--wait-timeout", "60", str(job))
    assert again.returncode != 0 and "got int64" in again.stderr
    assert "resubmitted after it failed" in local_daemon.log_path.read_text()

    time.sleep(0.01)  # a new mtime for the rewritten file
    pq.write_table(pa.table({"text": ["a cat", "a dog", "a bird", "a fish"]}), data / "part-0.parquet")
    fixed = fabricctl(address, "submit", "--wait", "--wait-timeout", "90", str(job))
    assert fixed.returncode == 0, fixed.stderr + local_daemon.tail()
    assert "serving" in fixed.stdout
    assert local_daemon.status()["jobs"]["wrongdata"]["error"] is None


def test_not_parquet_is_refused_at_submit_and_no_wait_says_how_to_follow(tmp_path, local_daemon):
    data = tmp_path / "data"
    data.mkdir()
    (data / "part-0.parquet").write_text("text\nnot parquet at all\n")
    job = tmp_path / "job.toml"
    job.write_text(spec(data))
    refused = fabricctl(local_daemon.address, "submit", str(job))
    assert refused.returncode != 0
    assert "sources[0].path" in refused.stderr and "part-0.parquet: not a Parquet file" in refused.stderr
    assert "wrongdata" not in local_daemon.status()["jobs"]

    pq.write_table(pa.table({"text": ["a", "b", "c", "d"]}), data / "part-0.parquet")
    ok = fabricctl(local_daemon.address, "submit", str(job))
    assert ok.returncode == 0, ok.stderr
    assert "fabricctl status" in ok.stderr and "--wait" in ok.stderr


def test_a_tokenizer_without_the_named_special_token_fails_the_job_saying_so(tmp_path, local_daemon):
    from fabricd.text.train import train_bpe

    data = tmp_path / "data"
    data.mkdir()
    pq.write_table(pa.table({"text": ["a cat", "a dog", "a bird", "a fish"]}), data / "part-0.parquet")
    tok = train_bpe(["a cat sat on a mat"] * 50, tmp_path / "data" / "tok")
    job = tmp_path / "job.toml"
    job.write_text(spec(data) + f'[tokenizer]\nkind = "hf"\npath = "{tok}"\neos = "<|endoftext|>"\n')
    out = fabricctl(local_daemon.address, "submit", "--wait", "--wait-timeout", "60", str(job))
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "has no token '<|endoftext|>'" in out.stderr and "'</s>'" in out.stderr, out.stderr  # its specials listed
    missing = tmp_path / "job2.toml"
    missing.write_text(spec(data).replace('name = "wrongdata"', 'name = "notok"')
                       + f'[tokenizer]\nkind = "hf"\npath = "{data / "nope.json"}"\n')
    refused = fabricctl(local_daemon.address, "submit", str(missing))
    assert refused.returncode != 0 and "tokenizer.path" in refused.stderr and "no such file" in refused.stderr

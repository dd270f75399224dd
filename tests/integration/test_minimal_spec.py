"""A user's first job: the minimal spec (a name and one source) runs end to end through a real
daemon and a real trainer, and what the trainer receives is what the defaults say it should be
(``fabricd.expect``, computed offline from the spec alone), batch for batch."""

from __future__ import annotations

import random
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fabric_client import Loader
from fabricd.config import load_job_spec
from fabricd.expect import expected_batches

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

MINIMAL = """
[job]
name = "first"

[[sources]]
name = "books"
path = "data/books"
"""

STEPS = 3


def fabricctl(address: str, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from fabricd.cli import fabricctl_main; fabricctl_main()",
                           "--address", address, *args], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def write_books(directory, n: int = 48) -> None:
    """``n`` texts of 20 to 9,000 characters: a few are longer than the default bucket (4,096
    tokens under the bytes tokenizer) and are split into pieces."""
    rng = random.Random(7)
    words = ["the", "cat", "sat", "on", "a", "mat", "while", "rain", "fell", "softly", "over", "hills"]
    texts = []
    for i in range(n):
        length = 9000 if i % 12 == 5 else rng.randint(20, 1500)
        text = f"book {i}:"
        while len(text) < length:
            text += " " + rng.choice(words)
        texts.append(text[:length])
    directory.mkdir(parents=True)
    pq.write_table(pa.table({"text": texts}), directory / "part-0.parquet")


def books_and_code_spec(name: str, seed: int, *, weights: str, batch: str = "", mixture: str = "") -> str:
    """A two-source job over ``data/books`` and ``data/code`` (``write_books`` corpora): 2 DP
    ranks of one constructor each, 16 units a step, a constant mixture of ``weights``; ``batch``
    and ``mixture``: extra lines of those tables."""
    return f"""
[job]
name = "{name}"
seed = {seed}

[topology]
dp_size = 2
ranks_per_constructor = 1

[batch]
samples_per_step = 16
micro_batch_tokens = 4096
{batch}prefetch = 2

[[buckets]]
name = "default"
max_seq_len = 1024
long_samples = "split"

[[sources]]
name = "books"
path = "data/books"

[[sources]]
name = "code"
path = "data/code"

[mixture]
kind = "constant"
{mixture}
[[mixture.points]]
step = 0
weights = {{ {weights} }}
"""


def test_minimal_spec_runs_end_to_end_with_its_defaults(tmp_path, local_daemon):
    write_books(tmp_path / "data" / "books")
    job_file = tmp_path / "job.toml"
    job_file.write_text(MINIMAL)
    spec = load_job_spec(job_file)
    assert spec.batch.samples_per_step == 64 and spec.buckets[0].long_samples == "split"

    submitted = fabricctl(local_daemon.address, "submit", "--wait", "--wait-timeout", "90", str(job_file))
    assert submitted.returncode == 0, submitted.stderr + local_daemon.tail()
    assert "job first: defaults applied: topology.dp_size = 1, batch.samples_per_step = 64" in submitted.stderr
    assert "serving" in submitted.stdout
    log_text = local_daemon.log_path.read_text()
    assert "INFO" in log_text and "job first: defaults applied: topology.dp_size = 1" in log_text
    assert local_daemon.status()["jobs"]["first"]["defaults_applied"] == list(spec.defaults_applied)
    status = fabricctl(local_daemon.address, "status")
    assert status.returncode == 0 and "defaults applied: topology.dp_size = 1" in status.stdout

    received = []
    with Loader(local_daemon.address, job="first", dp_rank=0, dp_size=1, max_steps=STEPS, deadline_s=60.0) as loader:
        for batch in loader:
            received.append(((batch.step, batch.dp_rank, batch.micro_batch), batch.checksum,
                             batch["pieces"].tolist()))

    want = {b.key(): b for b in expected_batches(spec, range(STEPS))}
    assert [k for k, *_ in received] == sorted(want), "lost, repeated or out-of-order batches"
    assert [c for _, c, _ in received] == [want[k].checksum for k, *_ in received], "batch content differs"
    for step in range(STEPS):  # the default global batch: 64 units a step, every one delivered
        assert sum(want[k].samples for k in want if k[0] == step) == 64
        assert sum(len(p) for k, _, p in received if k[0] == step) == 64
    assert any(p > 0 for *_, pieces in received for p in pieces), "no long book was split into pieces"

"""Job-spec defaults: a spec with one source and a name is a valid job; the defaults it takes are
the documented ones, logged in one line and recorded on the spec, and they decide the same batch
content as the explicit spec that spells them out. Tables that are given are validated as before."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from fabricd.config import (BucketSpec, MixtureSpec, describe_defaults, load_job_spec,
                            parse_job_spec)
from fabricd.errors import ConfigError

from ..conftest import one_source_job, write_job

pytestmark = [pytest.mark.unit, pytest.mark.timeout(30)]

MINIMAL = """
[job]
name = "first"

[[sources]]
name = "books"
path = "data/books"
"""

# the same job with every default the minimal spec takes written out
EXPLICIT = """
[job]
name = "first"
seed = 0

[topology]
dp_size = 1
mp_size = 1
ranks_per_constructor = 8

[batch]
samples_per_step = 64
micro_batch_tokens = 8192
prefetch = 4
compression = "auto"

[[buckets]]
name = "default"
max_seq_len = 4096
long_samples = "split"

[[sources]]
name = "books"
path = "data/books"
bucket = "default"

[mixture]
kind = "constant"
[[mixture.points]]
step = 0
weights = { books = 1.0 }
"""

MINIMAL_DEFAULTS = (
    "topology.dp_size = 1",
    "batch.samples_per_step = 64",
    "batch.micro_batch_tokens = 8192",
    'buckets = [{name = "default", max_seq_len = 4096, long_samples = "split"}]',
    "mixture = constant, equal weights (1.0) over the 1 source",
)


def _load(tmp_path: Path, text: str, name: str = "job.toml"):
    p = tmp_path / name
    p.write_text(text)
    return load_job_spec(p)


def test_minimal_spec_parses_with_the_documented_defaults(tmp_path):
    spec = _load(tmp_path, MINIMAL)
    assert spec.name == "first" and spec.seed == 0
    assert (spec.topology.dp_size, spec.topology.mp_size, spec.topology.ranks_per_constructor) == (1, 1, 8)
    assert (spec.batch.samples_per_step, spec.batch.micro_batch_tokens) == (64, 8192)
    assert (spec.batch.prefetch, spec.batch.compression) == (4, "auto")  # lz4 only to trainers on another machine
    assert spec.buckets == (BucketSpec(name="default", max_seq_len=4096, long_samples="split"),)
    assert [(s.name, s.bucket, s.format, s.workers) for s in spec.sources] == [("books", "default", None, None)]
    assert spec.sources[0].path == (tmp_path / "data" / "books").resolve()
    assert spec.mixture == MixtureSpec(kind="constant", points=((0, (("books", 1.0),)),))
    assert spec.balance == "lpt" and spec.tokenizer.kind == "bytes" and spec.images.mode == "fixed"
    assert spec.defaults_applied == MINIMAL_DEFAULTS


def test_minimal_spec_logs_every_default_in_one_info_line(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="fabricd.config")
    _load(tmp_path, MINIMAL)
    lines = [r for r in caplog.records if "defaults applied" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.INFO
    assert lines[0].getMessage() == "job first: defaults applied: " + ", ".join(MINIMAL_DEFAULTS)


def test_a_spec_that_spells_everything_out_takes_and_logs_no_default(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="fabricd.config")
    spec = _load(tmp_path, EXPLICIT)
    assert spec.defaults_applied == ()
    assert not [r for r in caplog.records if "defaults applied" in r.getMessage()]
    assert describe_defaults(spec) == "job first: defaults applied: none"
    demo = load_job_spec(Path(__file__).resolve().parents[2] / "config" / "jobs" / "demo.toml")
    assert demo.defaults_applied == ()


def test_minimal_and_explicit_specs_have_the_same_content_key_and_fingerprint(tmp_path):
    minimal = _load(tmp_path, MINIMAL, "minimal.toml")
    explicit = _load(tmp_path, EXPLICIT, "explicit.toml")
    assert minimal.content_key() == explicit.content_key()
    fps = {"books": "0123abcd"}
    assert minimal.fingerprint(fps) == explicit.fingerprint(fps)
    # and it is a real content key: changing one defaulted value changes it
    other = _load(tmp_path, EXPLICIT.replace("samples_per_step = 64", "samples_per_step = 65"), "other.toml")
    assert other.content_key() != minimal.content_key()
    other = _load(tmp_path, EXPLICIT.replace('long_samples = "split"', 'long_samples = "truncate"'), "other2.toml")
    assert other.fingerprint(fps) != minimal.fingerprint(fps)


def test_parse_job_spec_takes_the_same_defaults_without_logging(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="fabricd.config")
    spec = parse_job_spec(MINIMAL, tmp_path / "job.toml")
    assert spec.defaults_applied == MINIMAL_DEFAULTS
    assert spec.content_key() == _load(tmp_path, EXPLICIT).content_key()
    assert not [r for r in caplog.records if "defaults applied" in r.getMessage()]


def test_buckets_without_mixture_get_equal_weights_over_all_sources(tmp_path):
    text = """
[job]
name = "two"
[[buckets]]
name = "short"
max_seq_len = 1024
[[buckets]]
name = "long"
max_seq_len = 16384
long_samples = "split"
[[sources]]
name = "a"
path = "a"
[[sources]]
name = "b"
path = "b"
bucket = "long"
[[sources]]
name = "c"
path = "c"
"""
    spec = _load(tmp_path, text)
    assert spec.mixture == MixtureSpec(kind="constant", points=((0, (("a", 1.0), ("b", 1.0), ("c", 1.0))),))
    # a source naming no bucket takes the first one, as before
    assert [s.bucket for s in spec.sources] == ["short", "long", "short"]
    assert [b.name for b in spec.buckets] == ["short", "long"]
    # the default micro-batch budget grows to fit the longest bucket
    assert (spec.batch.samples_per_step, spec.batch.micro_batch_tokens) == (64, 16384)
    assert spec.defaults_applied == ("topology.dp_size = 1", "batch.samples_per_step = 64",
                                     "batch.micro_batch_tokens = 16384",
                                     "mixture = constant, equal weights (1.0) over all 3 sources")


def test_default_batch_follows_a_given_topology(tmp_path):
    spec = _load(tmp_path, MINIMAL + "[topology]\ndp_size = 128\nmp_size = 2\n")
    assert (spec.topology.dp_size, spec.topology.mp_size) == (128, 2)
    assert spec.batch.samples_per_step == 128  # at least one unit per rank
    assert spec.defaults_applied[0] == "batch.samples_per_step = 128"
    assert not any(d.startswith("topology") for d in spec.defaults_applied)
    small = _load(tmp_path, MINIMAL + "[topology]\ndp_size = 8\n", "small.toml")
    assert small.batch.samples_per_step == 64


def test_given_batch_and_default_bucket(tmp_path):
    spec = _load(tmp_path, MINIMAL + "[batch]\nsamples_per_step = 8\nmicro_batch_tokens = 6000\n")
    assert (spec.batch.samples_per_step, spec.batch.micro_batch_tokens) == (8, 6000)
    assert spec.buckets == (BucketSpec(name="default", max_seq_len=4096, long_samples="split"),)
    assert not any(d.startswith("batch") for d in spec.defaults_applied)
    # a micro-batch budget below the default bucket's length shortens the bucket: a unit must fit
    small = _load(tmp_path, MINIMAL + "[batch]\nsamples_per_step = 8\nmicro_batch_tokens = 2048\n", "small.toml")
    assert small.buckets == (BucketSpec(name="default", max_seq_len=2048, long_samples="split"),)
    assert 'buckets = [{name = "default", max_seq_len = 2048, long_samples = "split"}]' in small.defaults_applied


def _error(tmp_path: Path, text: str) -> ConfigError:
    p = tmp_path / "bad.toml"
    p.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_job_spec(p)
    return info.value


@pytest.mark.parametrize(
    "extra, key, value",
    [
        # a given table keeps its required keys and its bounds
        ("[topology]\nmp_size = 2\n", "topology.dp_size", None),
        ("[topology]\ndp_size = 0\n", "topology.dp_size", 0),
        ("[batch]\nprefetch = 2\n", "batch.samples_per_step", None),
        ("[batch]\nsamples_per_step = 64\n", "batch.micro_batch_tokens", None),
        ("[batch]\nsamples_per_step = 64\nmicro_batch_tokens = 8\n", "batch.micro_batch_tokens", 8),
        ("[topology]\ndp_size = 4\n[batch]\nsamples_per_step = 2\nmicro_batch_tokens = 8192\n",
         "batch.samples_per_step", 2),
        ("[mixture]\nkind = \"constant\"\n", "mixture.points", None),
        ("[mixture]\n[[mixture.points]]\nstep = 0\nweights = { novels = 1.0 }\n", "mixture.points[0].weights.novels", 1.0),
        ("[mixture]\nkind = \"cosine\"\n", "mixture.kind", "cosine"),
        ("buckets = []\n", "buckets", []),
        ("[[buckets]]\nname = \"b\"\n", "buckets[0].max_seq_len", None),
        ("[[buckets]]\nname = \"b\"\nmax_seq_len = 1\n", "buckets[0].max_seq_len", 1),
        ("[topology]\ndp_size = 1\ndp_sise = 2\n", "topology.dp_sise", 2),
    ],
)
def test_bad_values_in_given_tables_still_raise(tmp_path, extra, key, value):
    err = _error(tmp_path, _with(extra))
    assert (err.key, err.value) == (key, value)


def _with(extra: str) -> str:
    """The minimal spec with ``extra`` TOML added: top-level keys before any table, tables after."""
    if not extra.startswith("["):
        return extra + MINIMAL
    return MINIMAL + extra


def test_job_name_and_a_source_stay_required(tmp_path):
    err = _error(tmp_path, '[[sources]]\nname = "books"\npath = "data/books"\n')
    assert err.key == "job"
    err = _error(tmp_path, '[job]\nseed = 3\n[[sources]]\nname = "books"\npath = "data/books"\n')
    assert err.key == "job.name"
    err = _error(tmp_path, '[job]\nname = "first"\n')
    assert err.key == "sources"


def test_existing_full_specs_are_unchanged(tmp_path):
    spec = load_job_spec(write_job(tmp_path / "full.toml", tmp_path))
    assert spec.defaults_applied == ()
    spec = load_job_spec(_write(tmp_path / "one.toml", one_source_job(tmp_path / "s")))
    assert spec.defaults_applied == ()
    assert spec.batch.samples_per_step == 4 and spec.buckets[0].max_seq_len == 512


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path

"""Config loading: valid files load; every invalid one is refused naming file, key and value."""

from __future__ import annotations

from pathlib import Path

import pytest

from fabricd.config import load_job_spec, load_node_config, parse_job_spec
from fabricd.errors import ConfigError

from ..conftest import write_job

pytestmark = [pytest.mark.unit, pytest.mark.timeout(30)]

ROOT = Path(__file__).resolve().parents[2]


def test_shipped_configs_load():
    spec = load_job_spec(ROOT / "config" / "jobs" / "demo.toml")
    assert spec.name == "demo" and len(spec.sources) == 5
    assert spec.sources[0].path.is_absolute()
    node = load_node_config(ROOT / "config" / "fabricd.toml")
    assert node.node_id == "node-a" and node.loader_workers == 2


def test_relative_source_paths_resolve_against_the_spec_file(tmp_path):
    spec = parse_job_spec(write_job(tmp_path / "j.toml", Path("data")).read_text(), tmp_path / "j.toml")
    assert spec.sources[0].path == (tmp_path / "data" / "captions").resolve()


@pytest.mark.parametrize(
    "old, new, key, value",
    [
        ("dp_size = 2", "dp_size = 0", "topology.dp_size", 0),
        ("dp_size = 2", 'dp_size = "2"', "topology.dp_size", "2"),
        ('compression = "lz4"', 'compression = "zstd9"', "batch.compression", "zstd9"),
        ("seed = 11", "seed = 11\nsede = 3", "job.sede", 3),
        ("max_seq_len = 8192", "max_seq_len = 99999", "buckets[1].max_seq_len", 99999),
        ('bucket = "long"', 'bucket = "huge"', "sources[2].bucket", "huge"),
        ("captions = 0.3", "captiones = 0.3", "mixture.points[0].weights.captiones", 0.3),
        ("captions = 0.3", "captions = -0.3", "mixture.points[0].weights.captions", -0.3),
        ("step = 4", "step = 0", "mixture.points[1].step", 0),
        ('kind = "linear"', 'kind = "cosine"', "mixture.kind", "cosine"),
        ("samples_per_step = 16", "samples_per_step = 1", "batch.samples_per_step", 1),
        ("seed = 11", "seed = 11\n[autoscale]\nenabled = 1", "autoscale.enabled", 1),
        ("seed = 11", "seed = 11\n[autoscale]\ntarget_utilization = 1.5", "autoscale.target_utilization", 1.5),
        ("seed = 11", "seed = 11\n[autoscale]\nmax_worker = 3", "autoscale.max_worker", 3),
    ],
)
def test_invalid_job_names_file_key_and_value(tmp_path, old, new, key, value):
    text = write_job(tmp_path / "j.toml", tmp_path).read_text()
    assert old in text
    bad = tmp_path / "bad.toml"
    bad.write_text(text.replace(old, new, 1))
    with pytest.raises(ConfigError) as info:
        load_job_spec(bad)
    err = info.value
    assert (err.file, err.key, err.value) == (str(bad), key, value)
    assert str(bad) in str(err) and key in str(err) and repr(value) in str(err)


def test_missing_section_and_bad_toml(tmp_path):
    p = tmp_path / "j.toml"
    p.write_text("[job]\nname = 'x'\n")
    with pytest.raises(ConfigError, match="topology"):
        load_job_spec(p)
    p.write_text("[job\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_job_spec(p)
    with pytest.raises(ConfigError, match="cannot read"):
        load_job_spec(tmp_path / "missing.toml")


def test_node_config_errors(tmp_path):
    p = tmp_path / "n.toml"
    p.write_text('[node]\nid = "a"\ncontrol = "http://x"\n')
    with pytest.raises(ConfigError, match="node.control"):
        load_node_config(p)
    p.write_text('[node]\nid = "a"\n[roles]\nloader_workers = 0\n')
    with pytest.raises(ConfigError, match="roles.loader_workers"):
        load_node_config(p)
    p.write_text('[node]\nid = "a"\nstate_dir = "st"\n')
    assert load_node_config(p).state_dir == (tmp_path / "st").resolve()


def test_fingerprint_ignores_dp_size_but_not_content(tmp_path):
    a = load_job_spec(write_job(tmp_path / "a.toml", tmp_path, dp_size=2))
    b = load_job_spec(write_job(tmp_path / "b.toml", tmp_path, dp_size=4))
    c = load_job_spec(write_job(tmp_path / "c.toml", tmp_path, samples_per_step=32))
    fps = {"captions": "x"}
    assert a.fingerprint(fps) == b.fingerprint(fps)
    assert a.fingerprint(fps) != c.fingerprint(fps)
    assert a.fingerprint(fps) != a.fingerprint({"captions": "y"})

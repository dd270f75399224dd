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
    with pytest.raises(ConfigError, match="sources"):  # the other tables have defaults
        load_job_spec(p)
    p.write_text("[job\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_job_spec(p)
    with pytest.raises(ConfigError, match="cannot read"):
        load_job_spec(tmp_path / "missing.toml")


@pytest.mark.parametrize("toml, match", [
    ('[node]\nid = "a"\ncontrol = "http://x"\n', "node.control"),
    ('[node]\nid = "a"\n[roles]\nloader_workers = 0\n', "roles.loader_workers"),
    ('[node]\nid = "a"\n[security]\ntrainer_group = "no-such-group-here"\n', "security.trainer_group.*no such group"),
    ('[node]\nid = "a"\n[security]\ntrainer_group = "nogroup"\ntrainer_socket_dir = "run/x"\n',
     "security.trainer_socket_dir.*absolute"),
])
def test_node_config_errors(tmp_path, toml, match):
    p = tmp_path / "n.toml"
    p.write_text(toml)
    with pytest.raises(ConfigError, match=match):
        load_node_config(p)


def test_node_config_state_dir_is_relative_to_the_file(tmp_path):
    p = tmp_path / "n.toml"
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


# --- upper bounds (fabricd.spec_bounds) -------------------------------------------------------

from fabricd import spec_bounds as B  # noqa: E402


def _spec_text(tmp_path, **kw) -> str:
    return write_job(tmp_path / "j.toml", tmp_path, **kw).read_text()


def _points(n: int) -> str:
    pts = "".join(f"\n[[mixture.points]]\nstep = {5 + i}\nweights = {{ captions = 1.0 }}\n" for i in range(n - 2))
    return pts


# (bound name, bound, key, text edit making the value `v`); each case runs at v = bound and bound + 1
BOUND_CASES = [
    ("MAX_DP_SIZE", B.MAX_DP_SIZE, "topology.dp_size",
     lambda t, v: t.replace("dp_size = 2", f"dp_size = {v}").replace("samples_per_step = 16", f"samples_per_step = {v}")),
    ("MAX_MP_SIZE", B.MAX_MP_SIZE, "topology.mp_size", lambda t, v: t.replace("mp_size = 1", f"mp_size = {v}")),
    ("MAX_DP_SIZE", B.MAX_DP_SIZE, "topology.ranks_per_constructor",
     lambda t, v: t.replace("ranks_per_constructor = 1", f"ranks_per_constructor = {v}")),
    ("MAX_SAMPLES_PER_STEP", B.MAX_SAMPLES_PER_STEP, "batch.samples_per_step",
     lambda t, v: t.replace("samples_per_step = 16", f"samples_per_step = {v}")),
    ("MAX_MICRO_BATCH_TOKENS", B.MAX_MICRO_BATCH_TOKENS, "batch.micro_batch_tokens",
     lambda t, v: t.replace("micro_batch_tokens = 8192", f"micro_batch_tokens = {v}")),
    ("MAX_SEQ_LEN", B.MAX_SEQ_LEN, "buckets[1].max_seq_len",
     lambda t, v: t.replace("micro_batch_tokens = 8192", f"micro_batch_tokens = {B.MAX_MICRO_BATCH_TOKENS}")
                   .replace("max_seq_len = 8192", f"max_seq_len = {v}")),
    ("MAX_PREFETCH", B.MAX_PREFETCH, "batch.prefetch", lambda t, v: t.replace("prefetch = 2", f"prefetch = {v}")),
    ("MAX_WORKERS_PER_SOURCE", B.MAX_WORKERS_PER_SOURCE, "sources[0].workers",
     lambda t, v: t.replace('name = "captions"', f'name = "captions"\nworkers = {v}')),
    ("MAX_WORKERS_PER_SOURCE", B.MAX_WORKERS_PER_SOURCE, "autoscale.max_workers",
     lambda t, v: t + f"\n[autoscale]\nmax_workers = {v}\n"),
    ("MAX_STEP", B.MAX_STEP, "mixture.points[1].step", lambda t, v: t.replace("step = 4", f"step = {v}")),
    ("MAX_MIXTURE_POINTS", B.MAX_MIXTURE_POINTS, "mixture.points", lambda t, v: t + _points(v)),
    ("MAX_SOURCES", B.MAX_SOURCES, "sources",
     lambda t, v: t + "".join(f'\n[[sources]]\nname = "x{i}"\npath = "x"\n' for i in range(v - 5))),
    ("MAX_BUCKETS", B.MAX_BUCKETS, "buckets",
     lambda t, v: t + "".join(f'\n[[buckets]]\nname = "b{i}"\nmax_seq_len = 64\n' for i in range(v - 2))),
    ("MAX_CONSTRUCTOR_NODES", B.MAX_CONSTRUCTOR_NODES, "topology.constructor_nodes",
     lambda t, v: t.replace("ranks_per_constructor = 1", f"ranks_per_constructor = 1\nconstructor_nodes = {['n'] * v}")),
]


@pytest.mark.parametrize("bound_name, bound, key, edit", BOUND_CASES, ids=[f"{c[0]}-{c[2]}" for c in BOUND_CASES])
def test_each_bound_accepts_its_value_and_refuses_one_more(tmp_path, bound_name, bound, key, edit):
    text = _spec_text(tmp_path)
    ok = edit(text, bound)
    assert ok != text
    parse_job_spec(ok, tmp_path / "j.toml")  # just under (at) the bound: accepted
    with pytest.raises(ConfigError) as info:
        parse_job_spec(edit(text, bound + 1), tmp_path / "j.toml")
    err = info.value
    assert err.key == key and err.file == str(tmp_path / "j.toml")
    assert f"{bound_name} ({bound})" in str(err)
    assert str(err).count("\n") == 0 and len(str(err)) < 2000  # one readable line, not the whole list


def test_spec_text_size_bound(tmp_path):
    text = _spec_text(tmp_path)
    pad = B.MAX_SPEC_BYTES - len(text.encode())
    parse_job_spec(text + "#" * (pad - 1) + "\n", tmp_path / "j.toml")
    with pytest.raises(ConfigError, match=r"MAX_SPEC_BYTES \(1048576\)") as info:
        parse_job_spec(text + "#" * pad + "\n", tmp_path / "j.toml")
    assert info.value.key == "<file>"
    big = tmp_path / "big.toml"
    big.write_text(text + "#" * pad + "\n")
    with pytest.raises(ConfigError, match="MAX_SPEC_BYTES"):
        load_job_spec(big)


@pytest.mark.parametrize("edit, key", [
    (lambda t: t.replace("samples_per_step = 16", "samples_per_step = 1000000000000"), "batch.samples_per_step"),
    (lambda t: t.replace("micro_batch_tokens = 8192", f"micro_batch_tokens = {2**62}"), "batch.micro_batch_tokens"),
    (lambda t: t.replace("dp_size = 2", f"dp_size = {2**20}"), "topology.dp_size"),
])
def test_reported_fork_bombs_are_refused(tmp_path, edit, key):
    with pytest.raises(ConfigError) as info:
        parse_job_spec(edit(_spec_text(tmp_path)), tmp_path / "j.toml")
    assert info.value.key == key and "MAX_" in info.value.reason


def test_roles_needed_counts_constructors_standbys_and_loaders():
    assert B.roles_needed(dp_size=10, ranks_per_constructor=4, loader_workers=[1, 2], standby=False) == 3 + 3
    assert B.roles_needed(dp_size=10, ranks_per_constructor=4, loader_workers=[1, 2], standby=True) == 6 + 3


def test_the_trainer_group_resolves_to_its_gid(tmp_path):
    p = tmp_path / "n.toml"
    p.write_text('[node]\nid = "a"\n')
    sec = load_node_config(p).security
    assert sec.trainer_group is None and sec.trainer_gid is None and sec.trainer_socket_dir is None
    p.write_text('[node]\nid = "a"\n[security]\ntrainer_group = "nogroup"\ntrainer_socket_dir = "/run/x"\n')
    sec = load_node_config(p).security
    assert sec.trainer_group == "nogroup" and sec.trainer_gid == 65534 and sec.trainer_socket_dir == Path("/run/x")

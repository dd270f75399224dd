"""Confined reads: sources only from the node's data_roots, JSONL images only from their source's directory."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from fabricd import admission
from fabricd.admission import check_sources, check_submission
from fabricd.config import load_job_spec, load_node_config, parse_job_spec
from fabricd.errors import ConfigError, SampleError, SourceError
from fabricd.expect import BatchOracle
from fabricd.job import JobRuntime
from fabricd.sources import SampleLoader, SourceReader, TransformSpec, open_index
from fabricd.sources.roots import DEFAULT_DATA_ROOTS, MAX_DATA_ROOTS, outside_roots

from ..conftest import one_source_job

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]


def job_text(path: Path | str, *, name: str = "j") -> str:
    return one_source_job(path, name=name)


def spec_for(tmp_path: Path, path: Path | str):
    return parse_job_spec(job_text(path), tmp_path / "job.toml")


def write_parquet(path: Path, n: int = 3) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"text": [f"doc {i}" for i in range(n)]}), path)
    return path


def png(path: Path, color=(200, 10, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="PNG")
    path.write_bytes(buf.getvalue())
    return path


def node_cfg(tmp_path: Path, roots_line: str):
    p = tmp_path / "node.toml"
    p.write_text(f'[node]\nid = "a"\nstate_dir = "{tmp_path / "st"}"\n{roots_line}\n')
    return load_node_config(p)


# --- node config -------------------------------------------------------------------------------

def test_node_config_data_roots_are_resolved_and_default_is_documented(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    cfg = node_cfg(tmp_path, f'data_roots = ["{tmp_path / "link"}", "/srv/not-yet-mounted"]')
    assert cfg.data_roots == (real.resolve(), Path("/srv/not-yet-mounted"))
    assert node_cfg(tmp_path, "").data_roots == DEFAULT_DATA_ROOTS == (Path("/var/lib/fabricd/data"),)


@pytest.mark.parametrize("line, value, fragment", [
    ('data_roots = ["data"]', "data", "absolute directory path"),
    ('data_roots = "/data"', "/data", "non-empty list"),
    ("data_roots = []", [], "non-empty list"),
    ("data_roots = [3]", 3, "absolute directory path"),
    (f"data_roots = {json.dumps(['/d'] * (MAX_DATA_ROOTS + 1))}", f"{MAX_DATA_ROOTS + 1} entries", "MAX_DATA_ROOTS"),
])
def test_node_config_bad_data_roots_name_file_key_value(tmp_path, line, value, fragment):
    with pytest.raises(ConfigError) as info:
        node_cfg(tmp_path, line)
    e = info.value
    assert e.file == str(tmp_path / "node.toml") and e.key == "node.data_roots" and e.value == value
    assert fragment in e.reason


def test_node_config_root_that_is_a_file_is_refused(tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    with pytest.raises(ConfigError, match="not a directory"):
        node_cfg(tmp_path, f'data_roots = ["{f}"]')


# --- admission ---------------------------------------------------------------------------------

def test_source_outside_roots_is_refused_before_it_is_walked(tmp_path, monkeypatch):
    root = tmp_path / "data"
    root.mkdir()
    walked = []
    monkeypatch.setattr(admission, "_source_problem", lambda *a, **k: walked.append(a))
    with pytest.raises(ConfigError) as info:
        check_sources(spec_for(tmp_path, "/usr"), roots=(root,))
    assert walked == []  # /usr was never looked into
    e = info.value
    assert e.key == "sources[0].path" and e.value == "/usr"
    assert "/usr" in e.reason and f"[{root}]" in e.reason and "data_roots" in e.reason


@pytest.mark.parametrize("how", ["dotdot", "symlinked_dir", "relative_to_spec"])
def test_escapes_from_a_root_are_refused(tmp_path, how):
    root = tmp_path / "data"
    outside = tmp_path / "secret"
    write_parquet(outside / "a.parquet")
    root.mkdir()
    if how == "dotdot":
        path = f"{root}/../secret"
    elif how == "symlinked_dir":
        (root / "innocent").symlink_to(outside)
        path = str(root / "innocent")
    else:
        path = "secret"  # relative to the spec file in tmp_path, which is not a root
    with pytest.raises(ConfigError) as info:
        check_sources(spec_for(tmp_path, path), roots=(root,))
    assert str(outside) in str(info.value) and str(root) in str(info.value)


def test_a_data_file_symlinked_out_of_the_roots_is_refused_unopened(tmp_path, monkeypatch):
    root = tmp_path / "data"
    write_parquet(root / "src" / "a.parquet")
    secret = write_parquet(tmp_path / "secret" / "b.parquet")
    (root / "src" / "b.parquet").symlink_to(secret)
    opened = []
    real = admission.check_data_file
    monkeypatch.setattr(admission, "check_data_file", lambda p, f: opened.append(Path(p).name) or real(p, f))
    with pytest.raises(ConfigError) as info:
        check_sources(spec_for(tmp_path, root / "src"), roots=(root,))
    assert "b.parquet" in str(info.value) and str(secret) in str(info.value) and str(root) in str(info.value)
    assert opened == ["a.parquet"]


def test_sources_inside_roots_are_accepted_even_through_symlinks_within_them(tmp_path):
    root = tmp_path / "data"
    blob = write_parquet(root / "blobs" / "x.parquet")
    snap = root / "snapshots" / "rev"
    snap.mkdir(parents=True)
    (snap / "train.parquet").symlink_to(blob)  # the Hugging Face hub cache layout
    check_sources(spec_for(tmp_path, snap), roots=(root,))
    assert open_index("s", snap, roots=(root,)).num_samples == 3


def test_check_submission_uses_the_node_roots(tmp_path):
    root = tmp_path / "data"
    write_parquet(root / "src" / "a.parquet")
    write_parquet(tmp_path / "other" / "a.parquet")
    cfg = node_cfg(tmp_path, f'data_roots = ["{root}"]')
    check_submission(spec_for(tmp_path, root / "src"), cfg)
    with pytest.raises(ConfigError, match="outside the node's data_roots"):
        check_submission(spec_for(tmp_path, tmp_path / "other"), cfg)


# --- opening a source on a node (defense behind submit) ----------------------------------------

def test_open_index_refuses_outside_roots_without_looking(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    with pytest.raises(SourceError, match="outside the node's data_roots") as info:
        open_index("s", tmp_path / "does-not-exist", roots=(root,))
    assert str(root) in str(info.value)  # not "no such file": existence outside the roots is not told
    src = tmp_path / "other"
    write_parquet(src / "a.parquet")
    with pytest.raises(SourceError, match="outside the node's data_roots"):
        open_index("s", src, roots=(root,))
    assert not (src / ".fabricd-index").exists()  # nothing was indexed or written


def test_open_index_refuses_a_data_file_symlinked_out(tmp_path):
    root = tmp_path / "data"
    write_parquet(root / "src" / "a.parquet")
    secret = write_parquet(tmp_path / "secret.parquet")
    (root / "src" / "z.parquet").symlink_to(secret)
    with pytest.raises(SourceError) as info:
        open_index("s", root / "src", roots=(root,))
    assert "z.parquet" in str(info.value) and str(secret) in str(info.value)
    assert open_index("s", root / "src").num_samples == 6  # offline, unconfined: the caller's own rights


def test_job_runtime_fails_a_source_outside_the_node_roots(tmp_path):
    from tests.unit.test_planner_worker import NoRoles

    src = tmp_path / "other"
    write_parquet(src / "a.parquet")
    job = JobRuntime(spec_for(tmp_path, src), index_dir=tmp_path / "idx", directory=NoRoles(),
                     data_roots=(tmp_path / "data",))
    job._thread.join(30)
    assert job.state == "failed" and "outside the node's data_roots" in job.error and str(src) in job.error


def test_reader_rechecks_data_files_against_the_roots_when_opening(tmp_path):
    src = tmp_path / "src"
    write_parquet(src / "a.parquet")
    idx = open_index("s", src)
    out = SourceReader(idx, roots=(tmp_path / "elsewhere",)).read(np.arange(3))
    assert all(isinstance(o, SampleError) and "outside the node's data_roots" in o.reason for o in out)
    assert [o.text for o in SourceReader(idx, roots=(tmp_path,)).read(np.arange(3))] == ["doc 0", "doc 1", "doc 2"]


# --- JSONL images stay in their source's directory ---------------------------------------------

@pytest.fixture
def jsonl_source(tmp_path: Path) -> tuple[Path, dict[int, str]]:
    """A JSONL source in ``tmp_path/data/src`` whose lines 1, 3, 5 reach images outside it."""
    src = tmp_path / "data" / "src"
    png(src / "imgs" / "ok.png")
    png(tmp_path / "data" / "neighbour.png")        # inside the roots, outside the source
    secret = png(tmp_path / "secret.png")
    (src / "imgs" / "link.png").symlink_to(secret)
    lines = [
        {"text": "<image> fine", "images": ["imgs/ok.png"]},
        {"text": "<image> absolute", "images": [str(secret)]},
        {"text": "<image> nested ok", "images": ["../imgs/ok.png"]},   # from sub/: still inside src
        {"text": "<image> climbs", "images": ["../../neighbour.png"]},
        {"text": "no images"},
        {"text": "<image> link", "images": ["imgs/link.png"]},
    ]
    (src / "sub").mkdir()
    (src / "a.jsonl").write_text("".join(json.dumps(x) + "\n" for i, x in enumerate(lines) if i != 2 and i != 3))
    (src / "sub" / "b.jsonl").write_text(json.dumps(lines[2]) + "\n" + json.dumps(lines[3]) + "\n")
    # sample ids follow (file, line): a.jsonl lines 0,1,4,5 -> 0..3; sub/b.jsonl lines 2,3 -> 4,5
    bad = {1: str(secret), 3: str(secret), 5: str(tmp_path / "data" / "neighbour.png")}
    return src, bad


def test_jsonl_images_escaping_the_source_directory_are_sample_errors(jsonl_source, tmp_path):
    src, bad = jsonl_source
    idx = open_index("s", src, roots=(tmp_path / "data",))
    assert idx.num_samples == 6 and list(idx.num_images) == [1, 1, 0, 1, 1, 1]
    assert [int(b) for b in idx.image_bytes[[1, 3, 5]]] == [0, 0, 0]  # never stat'ed outside the source
    for roots in ((tmp_path / "data",), None):  # online (the node's roots) and offline: the same
        out = SourceReader(idx, roots=roots).read(np.arange(6))
        errors = {i: o for i, o in enumerate(out) if isinstance(o, SampleError)}
        assert sorted(errors) == sorted(bad)
        for i, target in bad.items():
            assert f"resolves to {target}, outside the source directory {src}" in errors[i].reason
        assert out[0].images == out[4].images == ((src / "imgs" / "ok.png").read_bytes(),)
        assert out[2].images == ()


def test_escaping_images_are_skipped_identically_online_and_offline(jsonl_source, tmp_path):
    src, bad = jsonl_source
    job = tmp_path / "job.toml"
    job.write_text(job_text(src))
    spec = load_job_spec(job)
    tspec = TransformSpec(max_seq_len=512, long_samples="truncate", image_tokens=64, image_size=224)
    idx = open_index("s", src, roots=(tmp_path / "data",))
    online = SampleLoader(idx, tspec, roots=(tmp_path / "data",)).load(np.arange(6), np.zeros(6))
    offline = SampleLoader(open_index("s", src), tspec).load(np.arange(6), np.zeros(6))
    assert [type(u) for u in online] == [type(u) for u in offline]
    assert {i for i, u in enumerate(online) if isinstance(u, SampleError)} == set(bad)
    for a, b in zip(online, offline):
        if not isinstance(a, SampleError):
            assert np.array_equal(a.input_ids, b.input_ids) and np.array_equal(a.pixels, b.pixels)
    oracle = BatchOracle(spec)  # fabricctl expect: the same loader, the same skip rule
    for step in range(4):
        plan = oracle.planner.plan(step, 1)
        want = sum(int(s) in bad for s in plan.sample_id)
        assert sum(b.skipped for b in oracle.step(step)) == want


def test_outside_roots_message_names_path_target_and_roots(tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "l").symlink_to("/etc")
    why = outside_roots(tmp_path / "r" / "l", (tmp_path / "r",))
    assert why.startswith(f"{tmp_path / 'r' / 'l'} (it resolves to /etc) is outside the node's data_roots [{tmp_path / 'r'}]")
    assert outside_roots(tmp_path / "r" / "x", (tmp_path / "r",)) is None


def test_a_nul_byte_in_a_source_path_is_refused_not_raised(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    with pytest.raises(ConfigError, match="NUL"):
        check_sources(spec_for(tmp_path, f"{root}/a\\u0000b"), roots=(root,))


def test_a_nul_byte_in_a_jsonl_image_path_is_a_sample_error(tmp_path):
    src = tmp_path / "src"
    png(src / "ok.png")
    (src / "a.jsonl").write_text('{"text": "x", "images": ["ok.png"]}\n{"text": "y", "images": ["o\\u0000k.png"]}\n')
    idx = open_index("s", src)
    assert idx.num_samples == 2 and not idx.files_skipped
    ok, bad = SourceReader(idx, roots=(tmp_path,)).read(np.arange(2))
    assert ok.images == ((src / "ok.png").read_bytes(),) and isinstance(bad, SampleError)


def test_an_index_dir_symlinked_out_of_the_roots_is_neither_read_nor_written(tmp_path):
    root = tmp_path / "data"
    write_parquet(root / "src" / "a.parquet")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (root / "src" / ".fabricd-index").symlink_to(elsewhere)
    idx = open_index("s", root / "src", roots=(root,), index_dir=tmp_path / "node-idx")
    assert idx.num_samples == 3 and list(elsewhere.iterdir()) == []
    assert list((tmp_path / "node-idx").rglob("index-*.parquet"))
    with pytest.raises(SourceError, match="index location"):
        open_index("s", root / "src", roots=(root,))

"""Confined reads against a real daemon: a source outside the node's data_roots is refused at
submit, and a JSONL image escaping its source's directory is skipped exactly as offline."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
from PIL import Image

from fabric_client import protocol
from fabric_client.errors import RemoteError
from fabricd.localnode import LocalDaemon
from fabricd.spec_bounds import role_slots

from ..conftest import one_source_job

from .test_data_path import assert_exact, consume, expected, submit

pytestmark = [pytest.mark.integration]


def job_text(path: Path, name: str) -> str:
    return one_source_job(path, name=name, source="pages")


def png(path: Path, shade: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (shade, 255 - shade, 40)).save(buf, format="PNG")
    path.write_bytes(buf.getvalue())
    return path


def jsonl_source(src: Path, secret: Path, n: int = 24) -> set[int]:
    """``n`` lines; every 4th names an image outside ``src`` (alternately absolute, ``..`` and a
    symlink leading out). Returns the sample ids that must be skipped."""
    (src / "img").mkdir(parents=True, exist_ok=True)
    (src / "img" / "out.png").symlink_to(secret)
    lines, bad = [], set()
    for i in range(n):
        if i % 4 == 3:
            image = [str(secret), "../../secret.png", "img/out.png"][(i // 4) % 3]
            bad.add(i)
        else:
            image = f"img/{i}.png"
            png(src / image, shade=(i * 37) % 256)
        lines.append(json.dumps({"text": f"<image> page {i} " + "words " * (i % 7), "images": [image]}))
    (src / "pages.jsonl").write_text("\n".join(lines) + "\n")
    return bad


@pytest.mark.timeout(180)
def test_submit_outside_data_roots_is_refused_and_escaping_images_are_skipped(tmp_path):
    roots = tmp_path / "data"
    secret = png(tmp_path / "secret.png", shade=7)
    bad = jsonl_source(roots / "pages", secret)
    outside = tmp_path / "elsewhere" / "pages"
    jsonl_source(outside, secret)
    refused = tmp_path / "refused.toml"
    refused.write_text(job_text(outside, "refused"))
    allowed = tmp_path / "allowed.toml"
    allowed.write_text(job_text(roots / "pages", "allowed"))

    with LocalDaemon(tmp_path / "node", node_id="roots", data_roots=[roots]) as daemon:
        for path in (outside, Path("/usr")):
            text = refused.read_text().replace(f'path = "{outside}"', f'path = "{path}"')
            with daemon.client() as client, pytest.raises(RemoteError) as info:
                client.request(protocol.SubmitJob(spec_toml=text, spec_path=str(refused)))
            assert info.value.code == "invalid_spec"
            assert "sources[0].path" in info.value.reason and str(path) in info.value.reason
            assert f"data_roots [{roots}]" in info.value.reason
        assert "refused" not in daemon.status()["jobs"]

        submit(daemon, allowed)
        records, _ = consume(daemon.address, "allowed", 0, 1, steps=6)
    want = expected(allowed, range(6))  # offline, unconfined: the same samples fail and are skipped
    assert_exact(records, want, 0)
    delivered = {sid for _, _, units, _ in records for _, sid, _ in units}
    assert delivered and not delivered & bad
    assert sum(b.skipped for b in want.values()) > 0


@pytest.mark.timeout(120)
def test_a_job_needing_more_roles_than_the_daemon_has_slots_is_refused(tmp_path):
    """The leader counts its own reported cores: 64 slots here, or one per core on a bigger node."""
    roots = tmp_path / "data"
    jsonl_source(roots / "pages", png(tmp_path / "secret.png", shade=7))
    slots = role_slots(os.cpu_count() or 0)
    text = job_text(roots / "pages", "wide").replace("dp_size = 1", f"dp_size = {slots}") \
        .replace("samples_per_step = 4", f"samples_per_step = {slots}")  # slots constructors and a loader
    with LocalDaemon(tmp_path / "node", node_id="wide", data_roots=[roots]) as daemon:
        with daemon.client() as client, pytest.raises(RemoteError) as info:
            client.request(protocol.SubmitJob(spec_toml=text, spec_path=str(tmp_path / "wide.toml")))
        assert info.value.code == "invalid_spec"
        assert f"the job needs {slots + 1} role processes" in info.value.reason
        assert f"({slots} in all)" in info.value.reason
        assert "wide" not in daemon.status()["jobs"]

"""scripts/install.sh into a staging root (``--root``): the user, the unit and its drop-ins, the
config and the keys land where the unit expects them, with modes that keep the secret key
root-only (systemd hands it to the daemon through LoadCredential=), and a second run keeps an
edited config. The package step (a virtualenv and pip) is skipped with ``--no-package``."""

from __future__ import annotations

import shutil
import stat
import subprocess
from pathlib import Path

import pytest

pytestmark = [pytest.mark.unit, pytest.mark.timeout(90)]

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "install.sh"


def _install(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=80,
                          stdin=subprocess.DEVNULL)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def keys(tmp_path) -> Path:
    import zmq.auth

    d = tmp_path / "keys"
    (d / "allowed").mkdir(parents=True)
    zmq.auth.create_certificates(d, "fabricd")
    zmq.auth.create_certificates(d / "allowed", "trainer-host-1")
    (d / "allowed" / "trainer-host-1.key_secret").unlink()  # only public keys are allowed-lists
    return d


def test_staged_install(tmp_path, keys):
    if shutil.which("systemd-sysusers") is None:
        pytest.skip("systemd-sysusers is not installed")
    root = tmp_path / "root"
    node_cfg = tmp_path / "node-a.toml"
    node_cfg.write_text('[node]\nid = "node-a"\n')
    proc = _install("--root", str(root), "--no-package", "--config", str(node_cfg), "--keys", str(keys),
                    "--datasets", "/data/corpus", "--datasets", "/mnt/shared/images", "--prefix", "/srv/fabricd")
    assert proc.returncode == 0, proc.stdout + proc.stderr

    assert "fabricd:" in (root / "etc/passwd").read_text()
    etc = root / "etc/fabricd"
    assert (etc / "fabricd.toml").read_text() == node_cfg.read_text()
    assert _mode(etc) == 0o750 and _mode(etc / "fabricd.toml") == 0o640
    secret = etc / "keys/fabricd.key_secret"
    assert secret.read_text() == (keys / "fabricd.key_secret").read_text()
    assert _mode(secret) == 0o600                           # only root (systemd) reads it
    assert _mode(etc / "keys/fabricd.key") == 0o640
    assert [p.name for p in (etc / "keys/allowed").iterdir()] == ["trainer-host-1.key"]

    unit_dir = root / "etc/systemd/system"
    assert (unit_dir / "fabricd.service").read_text() == (ROOT / "systemd/fabricd.service").read_text()
    datasets = (unit_dir / "fabricd.service.d/datasets.conf").read_text()
    assert "ReadOnlyPaths=/data/corpus /mnt/shared/images" in datasets
    prefix = (unit_dir / "fabricd.service.d/prefix.conf").read_text()
    assert "ExecStart=\nExecStart=/srv/fabricd/bin/fabricd run --config /etc/fabricd/fabricd.toml" in prefix
    assert (root / "usr/lib/sysusers.d/fabricd.conf").exists()

    # again, without --config or --keys: the edited config and the installed keys stay; the
    # default prefix and no datasets remove the drop-ins
    (etc / "fabricd.toml").write_text('[node]\nid = "edited"\n')
    proc = _install("--root", str(root), "--no-package")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (etc / "fabricd.toml").read_text() == '[node]\nid = "edited"\n'
    assert secret.read_text() == (keys / "fabricd.key_secret").read_text()
    assert not (unit_dir / "fabricd.service.d").exists()


def test_refuses_bad_arguments(tmp_path):
    root = str(tmp_path / "root")
    for args, needle in [(["--config", str(tmp_path / "missing.toml")], "no such file"),
                         (["--keys", str(tmp_path)], "fabricd.key_secret"),
                         (["--datasets", "relative/dir"], "absolute path"),
                         (["--prefix", "opt/x"], "absolute path"),
                         (["--bogus"], "unknown option")]:
        proc = _install("--root", root, "--no-package", *args)
        assert proc.returncode != 0 and needle in proc.stderr, (args, proc.stderr)

"""scripts/install.sh into a staging root (``--root``): the user, the unit and its drop-ins, the
config and the keys land where the unit expects them. ``--keys DIR`` takes a fabric keys directory
(``fabric_client.keys`` layout) and installs the server key, this node's secret as
``node.key_secret`` (both secrets root-only: systemd hands them to the daemon through
LoadCredential=) and the public keys of every node, trainer and operator, never a trainer's or an
operator's secret. Without ``--keys`` and no keys installed, it generates a fabric of one node; a
second run keeps an edited config and the installed keys. The package step (a virtualenv and pip)
is skipped with ``--no-package``; ``--python`` is this checkout's interpreter (it imports
``fabric_client`` to check and make keys)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from fabric_client.keys import KeyPair, KeyRing, generate
from fabricd.planner import native

from ..conftest import make_fabric_keys

pytestmark = [pytest.mark.unit, pytest.mark.timeout(90)]

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "install.sh"


def _install(*args: str, package: bool = False, python: str = sys.executable) -> subprocess.CompletedProcess:
    # the system's python3 (not this checkout's) is the fallback the script finds on PATH
    return subprocess.run(["bash", str(SCRIPT), *([] if package else ["--no-package"]), "--python", python, *args],
                          capture_output=True, text=True, timeout=80, stdin=subprocess.DEVNULL,
                          env={**os.environ, "PATH": _system_path()})


def _system_path() -> str:
    """PATH without this checkout's virtualenv."""
    return os.pathsep.join(d for d in os.environ.get("PATH", "").split(os.pathsep)
                           if Path(d).resolve() != Path(sys.executable).parent.resolve())


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _files(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())


def _need_sysusers() -> None:
    if shutil.which("systemd-sysusers") is None:
        pytest.skip("systemd-sysusers is not installed")


@pytest.fixture
def keys(tmp_path) -> Path:
    """A fabric keys directory as `fabricctl keys generate` makes it, every secret included."""
    return make_fabric_keys(tmp_path / "fabric-keys", trainer="trainer-1")


def _config(tmp_path: Path, node_id: str) -> Path:
    cfg = tmp_path / f"{node_id}.toml"
    cfg.write_text(f'[node]\nid = "{node_id}"\n')
    return cfg


def test_staged_install(tmp_path, keys):
    _need_sysusers()
    root = tmp_path / "root"
    node_cfg = _config(tmp_path, "node-a")
    proc = _install("--root", str(root), "--config", str(node_cfg), "--keys", str(keys),
                    "--datasets", "/data/corpus", "--datasets", "/mnt/shared/images", "--prefix", "/srv/fabricd",
                    "--trainer-group", "ml-trainers")
    assert proc.returncode == 0, proc.stdout + proc.stderr

    assert "fabricd:" in (root / "etc/passwd").read_text()
    etc = root / "etc/fabricd"
    assert (etc / "fabricd.toml").read_text() == node_cfg.read_text()
    assert _mode(etc) == 0o750 and _mode(etc / "fabricd.toml") == 0o640
    k = etc / "keys"
    assert _files(k) == ["node.key_secret", "nodes/node-a.key", "nodes/node-b.key", "operators/alice.key",
                         "server.key", "server.key_secret", "trainers/trainer-1.key"]  # no other secret
    assert (k / "node.key_secret").read_bytes() == (keys / "nodes/node-a.key_secret").read_bytes()
    assert (k / "server.key_secret").read_bytes() == (keys / "server.key_secret").read_bytes()
    for secret in ("node.key_secret", "server.key_secret"):
        assert _mode(k / secret) == 0o600                       # only root (systemd) reads them
    for public in ("server.key", "nodes/node-a.key", "nodes/node-b.key", "trainers/trainer-1.key",
                   "operators/alice.key"):
        assert _mode(k / public) == 0o640
        assert (k / public).read_bytes() == (keys / public).read_bytes()
    for d in (k, k / "nodes", k / "trainers", k / "operators"):
        assert _mode(d) == 0o750
    # the daemon's view: the secrets as systemd credentials, the allow-lists from the keys dir
    ring = KeyRing(k, "node-a", credentials=k)
    assert ring.node == KeyPair.load(keys / "nodes/node-a.key_secret")
    assert ring.names == {"node:node-a", "node:node-b", "trainer:trainer-1", "operator:alice"}

    unit_dir = root / "etc/systemd/system"
    assert (unit_dir / "fabricd.service").read_text() == (ROOT / "systemd/fabricd.service").read_text()
    datasets = (unit_dir / "fabricd.service.d/datasets.conf").read_text()
    assert "ReadOnlyPaths=/data/corpus /mnt/shared/images" in datasets
    assert (unit_dir / "fabricd.service.d/trainers.conf").read_text() == (
        "[Service]\nSupplementaryGroups=ml-trainers\n"
        "ExecStartPre=+/usr/bin/install -d -m 2750 -o fabricd -g ml-trainers /run/fabricd/trainers\n")
    prefix = (unit_dir / "fabricd.service.d/prefix.conf").read_text()
    assert "ExecStart=\nExecStart=/srv/fabricd/bin/fabricd run --config /etc/fabricd/fabricd.toml" in prefix
    assert (root / "usr/lib/sysusers.d/fabricd.conf").exists()

    # again, without --config or --keys: the edited config and the installed keys stay; the
    # default prefix and no datasets remove the drop-ins
    before = {f: (k / f).read_bytes() for f in _files(k)}
    edited = '[node]\nid = "node-a"\nlog_level = "DEBUG"\n'
    (etc / "fabricd.toml").write_text(edited)
    proc = _install("--root", str(root))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "keys kept" in proc.stdout
    assert (etc / "fabricd.toml").read_text() == edited
    assert {f: (k / f).read_bytes() for f in _files(k)} == before
    assert not (unit_dir / "fabricd.service.d").exists()

    # --keys again, with a trainer removed and one added: the allow-lists are replaced wholesale
    (keys / "trainers/trainer-1.key").unlink()
    generate(keys, "trainer", "trainer-2")
    proc = _install("--root", str(root), "--keys", str(keys))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(p.name for p in (k / "trainers").iterdir()) == ["trainer-2.key"]
    assert not (etc / "keys.new").exists() and not (etc / "keys.old").exists()


def test_node_option_picks_the_key(tmp_path, keys):
    _need_sysusers()
    root = tmp_path / "root"
    proc = _install("--root", str(root), "--config", str(_config(tmp_path, "node-b")), "--keys", str(keys))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    k = root / "etc/fabricd/keys"
    assert (k / "node.key_secret").read_bytes() == (keys / "nodes/node-b.key_secret").read_bytes()
    # --node overrides the config's node.id (with a warning: the daemon reads the config)
    proc = _install("--root", str(root), "--keys", str(keys), "--node", "node-a")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "--node node-a" in proc.stdout and 'node.id = "node-b"' in proc.stdout
    assert (k / "node.key_secret").read_bytes() == (keys / "nodes/node-a.key_secret").read_bytes()


def test_refuses_keys_without_this_nodes_secret(tmp_path, keys):
    _need_sysusers()
    root = tmp_path / "root"
    proc = _install("--root", str(root), "--config", str(_config(tmp_path, "node-c")), "--keys", str(keys))
    assert proc.returncode != 0
    assert "no nodes/node-c.key_secret" in proc.stderr and "keys generate" in proc.stderr, proc.stderr
    assert not (root / "etc/fabricd").exists()                  # refused before installing anything
    # a node's public key alone (another node's keys directory) is refused the same way
    (keys / "nodes/node-a.key_secret").unlink()
    proc = _install("--root", str(root), "--config", str(_config(tmp_path, "node-a")), "--keys", str(keys))
    assert proc.returncode != 0 and "no nodes/node-a.key_secret" in proc.stderr, proc.stderr
    # no server key pair: not a fabric keys directory
    proc = _install("--root", str(root), "--config", str(_config(tmp_path, "node-b")), "--keys", str(keys / "nodes"))
    assert proc.returncode != 0 and "no server.key" in proc.stderr, proc.stderr


def test_generates_a_fabric_of_one_node(tmp_path):
    _need_sysusers()
    root = tmp_path / "root"
    proc = _install("--root", str(root), "--config", str(_config(tmp_path, "solo")))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    k = root / "etc/fabricd/keys"
    assert _files(k) == ["node.key_secret", "nodes/solo.key", "server.key", "server.key_secret"]
    assert _mode(k / "node.key_secret") == 0o600 and _mode(k / "server.key_secret") == 0o600
    assert _mode(k / "server.key") == 0o640 and _mode(k / "nodes/solo.key") == 0o640
    assert _mode(k / "trainers") == 0o750 and _mode(k / "operators") == 0o750
    assert "fabricctl keys generate --dir /etc/fabricd/keys trainer NAME" in proc.stdout
    ring = KeyRing(k, "solo", credentials=k)
    assert ring.names == {"node:solo"}
    # a rerun keeps them; a config of another node is refused (these keys are not its keys)
    before = {f: (k / f).read_bytes() for f in _files(k)}
    proc = _install("--root", str(root))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert {f: (k / f).read_bytes() for f in _files(k)} == before
    proc = _install("--root", str(root), "--config", str(_config(tmp_path, "other")))
    assert proc.returncode != 0 and "no nodes/other.key" in proc.stderr, proc.stderr


def test_first_install_generates_keys_with_the_new_virtualenv(tmp_path):
    """With the package step, the virtualenv does not exist when the script starts; the keys are
    made once it does. A stand-in for the base Python: ``-m venv DIR`` makes a virtualenv whose
    python is this checkout's (so imports fabric_client) and whose pip does nothing; anything else
    runs this Python without its site-packages (-S: tomllib, but no fabric_client)."""
    _need_sysusers()
    base = tmp_path / "base-python"
    base.write_text(f"""#!/bin/bash
if [ "$1" = -m ] && [ "$2" = venv ]; then
    mkdir -p "$3/bin"
    printf '#!/bin/sh\\nexec {sys.executable} "$@"\\n' > "$3/bin/python"
    printf '#!/bin/sh\\nexit 0\\n' > "$3/bin/pip"
    chmod +x "$3/bin/python" "$3/bin/pip"
    exit 0
fi
exec {sys.executable} -S "$@"
""")
    base.chmod(0o755)
    root = tmp_path / "root"
    proc = _install("--root", str(root), "--config", str(_config(tmp_path, "first")), package=True,
                    python=str(base))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "package installed" in proc.stdout and "generated a fabric of one node" in proc.stdout
    assert f"(planner: {native.describe()})" in proc.stdout
    k = root / "etc/fabricd/keys"
    assert KeyRing(k, "first", credentials=k).names == {"node:first"}
    # without the package step nothing here can make keys: refused, before anything is installed
    for name in ("python3.11", "python3"):
        exe = shutil.which(name, path=_system_path())
        if exe and subprocess.run([exe, "-c", "import fabric_client.keys"], capture_output=True).returncode == 0:
            return  # this machine's own python3 can make keys: nothing to refuse
    proc = _install("--root", str(tmp_path / "root2"), "--config", str(_config(tmp_path, "first")),
                    python=str(base))
    assert proc.returncode != 0 and "imports fabric_client" in proc.stderr, proc.stderr
    assert not (tmp_path / "root2/etc/fabricd").exists()


def test_template_config_waits_for_a_node_id(tmp_path):
    _need_sysusers()
    root = tmp_path / "root"
    proc = _install("--root", str(root))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "set node.id" in proc.stdout
    assert not (root / "etc/fabricd/keys").exists()


def test_refuses_bad_arguments(tmp_path):
    root = str(tmp_path / "root")
    for args, needle in [(["--config", str(tmp_path / "missing.toml")], "no such file"),
                         (["--keys", str(tmp_path / "missing")], "no such directory"),
                         (["--keys", str(tmp_path)], "which node?"),
                         (["--keys", str(tmp_path), "--node", "../x"], "node id"),
                         (["--datasets", "relative/dir"], "absolute path"),
                         (["--prefix", "opt/x"], "absolute path"),
                         (["--trainer-group", "a b"], "not a group name"),
                         (["--bogus"], "unknown option")]:
        proc = _install("--root", root, *args)
        assert proc.returncode != 0 and needle in proc.stderr, (args, proc.stderr)

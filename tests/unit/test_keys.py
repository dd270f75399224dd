"""fabric_client.keys: the keys directory as ``fabricctl keys generate`` makes it and a node's
``KeyRing`` reads it: secrets from systemd's credentials directory (``LoadCredential=``, what
scripts/install.sh and systemd/fabricd.service set up) or from the keys directory, the allow-lists
re-read by ``reload``, and every bad file refused with an error naming it."""

from __future__ import annotations

import re
import shutil
import stat
from pathlib import Path

import pytest
from fabric_client.keys import ClientKeys, KeyPair, KeyRing, KeysError, generate, list_keys

from ..conftest import make_fabric_keys

pytestmark = [pytest.mark.unit, pytest.mark.timeout(30)]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(autouse=True)
def _no_systemd_credentials(monkeypatch):
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)


@pytest.fixture
def fabric(tmp_path) -> Path:
    """A fabric keys directory: server, nodes node-a and node-b, a trainer and an operator."""
    return make_fabric_keys(tmp_path / "keys", trainer="t1")


def _public_only(src: Path, dst: Path) -> Path:
    """A copy of the keys directory without any secret (what a node's allow-lists are)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.key_secret"))
    return dst


def test_generate_refuses_to_overwrite(fabric):
    before = (fabric / "nodes/node-a.key_secret").read_bytes()
    with pytest.raises(KeysError, match=r"node-a\.key.* exists already"):
        generate(fabric, "node", "node-a")
    with pytest.raises(KeysError, match=r"server\.key.* exists already"):
        generate(fabric, "server")
    assert (fabric / "nodes/node-a.key_secret").read_bytes() == before
    # a public key left behind alone still blocks a new pair under its name
    (fabric / "trainers/t1.key_secret").unlink()
    with pytest.raises(KeysError, match="exists already"):
        generate(fabric, "trainer", "t1")


def test_generate_refuses_bad_kinds_and_names(fabric):
    with pytest.raises(KeysError, match="key kind 'admin'"):
        generate(fabric, "admin", "x")
    for name in ("../escape", "", "-dash", "a b"):
        with pytest.raises(KeysError, match="key name"):
            generate(fabric, "trainer", name)
    assert not (fabric.parent / "escape.key").exists()


def test_secret_files_are_0600_and_public_files_0644(fabric):
    secrets = sorted(fabric.rglob("*.key_secret"))
    publics = sorted(fabric.rglob("*.key"))
    assert len(secrets) == len(publics) == 5
    assert all(_mode(p) == 0o600 for p in secrets)
    assert all(_mode(p) == 0o644 for p in publics)
    pair = KeyPair.load(fabric / "nodes/node-b.key_secret")
    assert len(pair.public) == 40 and len(pair.secret) == 40 and pair.public != pair.secret
    assert b"secret-key" not in (fabric / "nodes/node-b.key").read_bytes()


def test_list_keys_shows_kinds_names_and_secrets(fabric):
    (fabric / "nodes/node-b.key_secret").unlink()
    listed = list_keys(fabric)
    assert [(k["kind"], k["name"], k["secret"]) for k in listed] == [
        ("server", "server", "yes"), ("node", "node-a", "yes"), ("node", "node-b", "no"),
        ("trainer", "t1", "yes"), ("operator", "alice", "yes")]
    node_a = KeyPair.load(fabric / "nodes/node-a.key_secret")
    assert listed[1]["public_key"] == node_a.public.decode()
    assert listed[1]["file"] == str(fabric / "nodes/node-a.key")
    assert list_keys(fabric.parent / "empty") == []


def test_a_malformed_key_file_is_an_error_naming_it(fabric):
    bad = fabric / "trainers/broken.key"
    bad.write_text("metadata\ncurve\n    public-key = \"too-short\"\n")
    with pytest.raises(KeysError, match=re.escape(str(bad))):
        list_keys(fabric)
    with pytest.raises(KeysError, match=re.escape(str(bad))):
        KeyRing(fabric, "node-a")
    bad.write_bytes(b"\xff\xfe not a certificate")
    with pytest.raises(KeysError, match=re.escape(str(bad))):
        list_keys(fabric)
    # a public key where a key pair is needed
    with pytest.raises(KeysError, match=r"node-a\.key: not a CURVE key pair"):
        KeyPair.load(fabric / "nodes/node-a.key")


def test_keyring_reads_both_secrets_from_the_credentials_directory(fabric, tmp_path, monkeypatch):
    keys_dir = _public_only(fabric, tmp_path / "etc-keys")
    creds = tmp_path / "credentials"
    creds.mkdir()
    shutil.copy(fabric / "server.key_secret", creds / "server.key_secret")
    shutil.copy(fabric / "nodes/node-a.key_secret", creds / "node.key_secret")
    server, node_a = KeyPair.load(fabric / "server.key_secret"), KeyPair.load(fabric / "nodes/node-a.key_secret")

    ring = KeyRing(keys_dir, "node-a", credentials=creds)
    assert ring.server == server and ring.node == node_a and ring.server_public == server.public
    assert ring.names == {"node:node-a", "node:node-b", "trainer:t1", "operator:alice"}
    assert ring.client() == ClientKeys(node_a, server.public)
    # as systemd provides them: $CREDENTIALS_DIRECTORY
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    ring = KeyRing(keys_dir, "node-a")
    assert ring.server == server and ring.node == node_a
    # without them, the keys directory alone has no secret to serve with
    monkeypatch.delenv("CREDENTIALS_DIRECTORY")
    with pytest.raises(KeysError, match=r"server\.key_secret"):
        KeyRing(keys_dir, "node-a")


def test_keyring_reads_secrets_from_the_keys_directory(fabric):
    ring = KeyRing(fabric, "node-b")  # server.key_secret and nodes/node-b.key_secret
    assert ring.node == KeyPair.load(fabric / "nodes/node-b.key_secret")
    assert ring.who(ring.node.public) == "node:node-b"
    # node.key_secret (the installed layout) comes before nodes/ID.key_secret
    shutil.copy(fabric / "nodes/node-a.key_secret", fabric / "node.key_secret")
    assert KeyRing(fabric, "node-a").node == KeyPair.load(fabric / "nodes/node-a.key_secret")
    with pytest.raises(KeysError, match="does not exist"):
        KeyRing(fabric / "missing", "node-a")


def test_reload_picks_up_added_keys_and_drops_removed_ones(fabric):
    ring = KeyRing(fabric, "node-a")
    alice = KeyPair.load(fabric / "operators/alice.key_secret").public
    assert ring.who(alice) == "operator:alice"
    public, _ = generate(fabric, "trainer", "t2")
    (fabric / "operators/alice.key").unlink()
    t2 = KeyPair.load(public.with_suffix(".key_secret")).public
    assert ring.who(t2) is None                                 # not before a reload
    assert ring.reload() == {"node": 2, "trainer": 2, "operator": 0}
    assert ring.who(t2) == "trainer:t2" and ring.who(alice) is None
    assert ring.names == {"node:node-a", "node:node-b", "trainer:t1", "trainer:t2"}


def test_a_failed_reload_keeps_the_previous_allow_lists(fabric):
    ring = KeyRing(fabric, "node-a")
    names = ring.names
    shutil.copy(fabric / "trainers/t1.key", fabric / "operators/t1-again.key")  # one key, two names
    with pytest.raises(KeysError, match="also trainer:t1"):
        ring.reload()
    assert ring.names == names


def test_keyring_refuses_a_node_key_that_does_not_match_its_secret(fabric, tmp_path):
    other, _ = generate(tmp_path / "elsewhere", "node", "node-a")
    shutil.copy(other, fabric / "nodes/node-a.key")  # node-a's public key is another key's
    with pytest.raises(KeysError, match=r"nodes/node-a\.key: missing, or not the public key"):
        KeyRing(fabric, "node-a")
    (fabric / "nodes/node-a.key").unlink()
    with pytest.raises(KeysError, match=r"nodes/node-a\.key: missing"):
        KeyRing(fabric, "node-a")
    with pytest.raises(KeysError, match="key name"):
        KeyRing(fabric, "../node-a")

"""Shared fixtures: a tiny generated corpus, job specs pointing at it, and local daemons.

Every daemon a test starts is stopped at teardown together with every process it spawned
(by pid), and the teardown fails the test if any of them outlived the stop.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session", autouse=True)
def fabric_keys(tmp_path_factory) -> Iterator[Path]:
    """Every test runs secure, as a real fabric does: one keys directory per test worker (the
    local daemons add their node keys to it), and the environment that points the Loader
    (``FABRIC_KEY``) and control clients (``FABRICCTL_KEY``) at its trainer and operator keys."""
    import os

    from fabricd.localnode import KEYS_DIR_ENV, OPERATOR_KEY, TRAINER_KEY, ensure_keys

    keys = ensure_keys(tmp_path_factory.mktemp("keys"), [])
    env = {KEYS_DIR_ENV: str(keys), "FABRIC_KEY": str(keys / TRAINER_KEY), "FABRICCTL_KEY": str(keys / OPERATOR_KEY)}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield keys
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session", autouse=True)
def local_data_roots(tmp_path_factory) -> Iterator[None]:
    """Local daemons started by tests read data from anywhere under this session's temp dir
    (corpora are made by session fixtures, beside each test's own tmp_path)."""
    import os

    from fabricd.localnode import DATA_ROOTS_ENV

    old = os.environ.get(DATA_ROOTS_ENV)
    os.environ[DATA_ROOTS_ENV] = str(tmp_path_factory.getbasetemp())
    yield
    if old is None:
        os.environ.pop(DATA_ROOTS_ENV, None)
    else:
        os.environ[DATA_ROOTS_ENV] = old


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    """A small 5-source corpus (with a few corrupt samples), built once per test worker."""
    from fabricd.corpus import make_dataset

    out = tmp_path_factory.mktemp("corpus")
    make_dataset(out, samples_per_source=48, seed=3, corrupt_fraction=0.03, progress=False)
    return out


def make_fabric_keys(d: Path, *, trainer: str, operator: str = "alice", nodes: tuple[str, ...] = ("node-a", "node-b")) -> Path:
    """A fabric keys directory as `fabricctl keys generate` makes it, every secret included: the
    server key, ``nodes``, one trainer and one operator."""
    from fabric_client.keys import generate

    generate(d, "server")
    for kind, name in [*(("node", n) for n in nodes), ("trainer", trainer), ("operator", operator)]:
        generate(d, kind, name)
    return d


def one_source_job(path: Path | str, *, name: str = "j", source: str = "s", bucket: str = "b",
                   max_seq_len: int = 512, micro_batch_tokens: int = 4096) -> str:
    """The text of a minimal job spec over one source at ``path`` (one rank, 4 samples a step)."""
    return f"""
[job]
name = "{name}"
[topology]
dp_size = 1
ranks_per_constructor = 1
[batch]
samples_per_step = 4
micro_batch_tokens = {micro_batch_tokens}
prefetch = 2
[[buckets]]
name = "{bucket}"
max_seq_len = {max_seq_len}
[[sources]]
name = "{source}"
path = "{path}"
[mixture]
[[mixture.points]]
step = 0
weights = {{ {source} = 1.0 }}
"""


def write_job(path: Path, corpus: Path, *, name: str = "t", dp_size: int = 2, mp_size: int = 1,
              ranks_per_constructor: int = 1, samples_per_step: int = 16, prefetch: int = 2,
              compression: str = "lz4", extra: str = "") -> Path:
    """Write a job spec over the tiny corpus: all five sources, a linear curriculum."""
    path.write_text(f"""
[job]
name = "{name}"
seed = 11

[topology]
dp_size = {dp_size}
mp_size = {mp_size}
ranks_per_constructor = {ranks_per_constructor}

[batch]
samples_per_step = {samples_per_step}
micro_batch_tokens = 8192
prefetch = {prefetch}
compression = "{compression}"

[tokens]
image_tokens = 16
image_size = 32

[cost]
attention = 1.0
linear = 4096.0
per_image = 1024.0

[[buckets]]
name = "short"
max_seq_len = 2048
long_samples = "truncate"

[[buckets]]
name = "long"
max_seq_len = 8192
long_samples = "split"

[[sources]]
name = "captions"
path = "{corpus / 'captions'}"

[[sources]]
name = "interleaved"
path = "{corpus / 'interleaved'}"

[[sources]]
name = "longdocs"
path = "{corpus / 'longdocs'}"
bucket = "long"

[[sources]]
name = "code"
path = "{corpus / 'code'}"

[[sources]]
name = "ocr"
path = "{corpus / 'ocr'}"

[mixture]
kind = "linear"

[[mixture.points]]
step = 0
weights = {{ captions = 0.3, interleaved = 0.2, longdocs = 0.1, code = 0.2, ocr = 0.2 }}

[[mixture.points]]
step = 4
weights = {{ captions = 0.2, interleaved = 0.2, longdocs = 0.3, code = 0.2, ocr = 0.1 }}
{extra}
""")
    return path


@pytest.fixture
def local_daemon(tmp_path) -> Iterator:
    """A running daemon in its own temp dir; stopped (and checked for leftovers) at teardown."""
    from fabricd.localnode import LocalDaemon

    daemon = LocalDaemon(tmp_path / "node", node_id="test")
    daemon.start()
    pids = [daemon.proc.pid]
    try:
        yield daemon
    finally:
        pids += [p.pid for p in daemon.descendants()]
        daemon.stop()
        alive = [pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
        assert not alive, f"processes outlived the daemon: {alive}"


def keyed_dealer(kind: str, node: str | None = None, *, hwm: int = 1000):
    """A DEALER authenticated with this worker's test keys: ``trainer``, ``operator``, or
    ``node`` (the key of daemon ``node``: what its role processes and peers use)."""
    import os

    import zmq

    from fabric_client.keys import ClientKeys
    from fabric_client.sockets import SocketFactory
    from fabricd.localnode import KEYS_DIR_ENV, OPERATOR_KEY, TRAINER_KEY

    keys = Path(os.environ[KEYS_DIR_ENV])
    path = {"trainer": keys / TRAINER_KEY, "operator": keys / OPERATOR_KEY, "node": keys / f"nodes/{node}.key_secret"}[kind]
    return SocketFactory(zmq.Context.instance(), keys=ClientKeys.load(path)).dealer(hwm=hwm)


@pytest.fixture(scope="session")
def etcd_server(tmp_path_factory) -> Iterator:
    """A real etcd (Debian's etcd-server) on free ports, one per test worker; skips, saying why,
    where there is no etcd binary. Tests keep apart by using their own key prefix."""
    from .etcd_server import EtcdServer, etcd_missing

    missing = etcd_missing()
    if missing:
        pytest.skip(missing)
    with EtcdServer(tmp_path_factory.mktemp("etcd")) as server:
        yield server


def in_forked_child(target: Callable[..., None], *args: Any, timeout: float) -> Any:
    """Run ``target(*args, out)`` in a forked child (say, one that drops to another user) and
    return what it put on ``out``; the child is joined, or killed if it does not end."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    out = ctx.Queue()
    child = ctx.Process(target=target, args=(*args, out))
    child.start()
    try:
        return out.get(timeout=timeout)
    finally:
        child.join(10)
        if child.is_alive():
            child.kill()
            child.join(5)

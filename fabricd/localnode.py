"""A fabricd daemon as a local child process: for the demo, benchmarks, tests and trying things.

``LocalDaemon`` writes a node config into a work directory, starts ``python -m fabricd run``,
waits for its control endpoint, and on exit stops it and every process it started, by pid
(SIGTERM, then SIGKILL after a grace period), so nothing is left running.

They run secure, as a real fabric does: a keys directory (``keys_dir``, else ``$FABRICD_KEYS_DIR``,
else ``WORKDIR/keys``) gets a server key, a key per node, a trainer key (``trainers/trainer``) and an
operator key (``operators/operator``) if it lacks them (:func:`ensure_keys`); ``client()`` uses the
operator key and ``trainer_keys`` is what a ``Loader`` needs. ``insecure=True`` runs plaintext.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path

import psutil

from fabric_client import protocol
from fabric_client.keys import ClientKeys, KeysError, generate

from . import local_ipc
from .ctl import ControlClient
from .netns import NetnsLab

__all__ = ["LocalDaemon", "LocalCluster", "DATA_ROOTS_ENV", "default_data_roots", "ensure_keys", "free_port"]

#: Environment variable naming the data roots of local daemons started without ``data_roots``.
DATA_ROOTS_ENV = "FABRICD_LOCAL_DATA_ROOTS"
#: a keys directory shared by the local daemons of this process (tests set it per worker)
KEYS_DIR_ENV = "FABRICD_KEYS_DIR"
#: the local trainer's and operator's key files, in a keys directory
TRAINER_KEY, OPERATOR_KEY = "trainers/trainer.key_secret", "operators/operator.key_secret"


def ensure_keys(keys_dir: str | Path, node_ids: list[str]) -> Path:
    """Make the keys a local fabric needs in ``keys_dir`` (those it already has are kept): the
    server key, one per node of ``node_ids``, ``trainers/trainer`` and ``operators/operator``."""
    keys_dir = Path(keys_dir)
    wanted = [("server", "server", keys_dir / "server.key"), ("trainer", "trainer", keys_dir / TRAINER_KEY),
              ("operator", "operator", keys_dir / OPERATOR_KEY)]
    wanted += [("node", n, keys_dir / f"nodes/{n}.key") for n in node_ids]
    for kind, name, public in wanted:
        public = public.with_suffix(".key")
        if not public.exists():
            try:
                generate(keys_dir, kind, name)
            except KeysError:
                if not public.exists():  # not a concurrent maker of the same key: a real problem
                    raise
    return keys_dir


class LocalDaemon:
    """One daemon process with its config, state and log under ``workdir``.

    ``data_roots`` go to its config's ``[node] data_roots`` (the directories jobs may read data
    from). By default: the directories in ``$FABRICD_LOCAL_DATA_ROOTS`` (separated by ``:``) when
    it is set (the test suite sets it to its temporary directory), else the directory holding
    ``workdir``, where benchmarks and chaos runs keep their corpora next to the daemons.
    """

    def __init__(self, workdir: str | Path, *, node_id: str = "local", loader_workers: int = 1,
                 log_level: str = "INFO", extra_env: dict[str, str] | None = None, port: int = 0,
                 cluster_toml: str = "", heartbeat_s: float = 0.5, host: str = "127.0.0.1",
                 wrap: list[str] | None = None, data_roots: Sequence[str | Path] | None = None,
                 keys_dir: str | Path | None = None, insecure: bool = False, metrics: bool = True,
                 local_ipc: bool = True, trainer_group: str | None = None, nice: int = 0) -> None:
        self.workdir = Path(workdir).absolute()
        self.data_roots = [Path(p).absolute() for p in data_roots or default_data_roots(self.workdir)]
        self.insecure = insecure
        self.local_ipc = local_ipc  # same-node links over private Unix sockets (fabricd.local_ipc)
        self.trainer_group = trainer_group  # [security] trainer_group: trainer sockets shared with it
        self.metrics = metrics    # serve /metrics on a free loopback port (see metrics_url)
        self.keys_dir = Path(keys_dir or os.environ.get(KEYS_DIR_ENV) or self.workdir / "keys").absolute()
        self.node_id = node_id
        self.loader_workers = loader_workers
        self.log_level = log_level
        self.extra_env = extra_env or {}
        self.port = port
        self.cluster_toml = cluster_toml
        self.heartbeat_s = heartbeat_s
        self.host = host          # the address it binds and advertises
        self.wrap = wrap or []    # a command prefix, e.g. ip netns exec NS
        self.nice = nice          # the daemon's (and so its roles') niceness; the packaged unit's is 5
        self.proc: subprocess.Popen | None = None
        self.address: str | None = None
        self.config_path = self.workdir / "fabricd.toml"
        self.log_path = self.workdir / "fabricd.log"
        self._log_file = None
        self._orphans: list[psutil.Process] = []

    def start(self, timeout: float = 30.0) -> str:
        """Start the daemon; return its control endpoint once it answers."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        state = self.workdir / "state"
        endpoint_file = state / "control.endpoint"
        endpoint_file.unlink(missing_ok=True)
        self.config_path.write_text(
            f'[node]\nid = "{self.node_id}"\ncontrol = "tcp://{self.host}:{self.port}"\nadvertise_host = "{self.host}"\n'
            f'state_dir = "{state}"\nlog_level = "{self.log_level}"\n'
            f"data_roots = {json.dumps([str(p) for p in self.data_roots])}\n\n"
            f"[roles]\nloader_workers = {self.loader_workers}\nrestart_backoff_s = 0.2\n"
            f"restart_backoff_max_s = 2.0\nheartbeat_s = {self.heartbeat_s}\n\n"
            f'[security]\nkeys_dir = "{self.keys_dir}"\ninsecure = {"true" if self.insecure else "false"}\n'
            f'local_ipc = {"true" if self.local_ipc else "false"}\n'
            + (f"trainer_group = {json.dumps(self.trainer_group)}\n" if self.trainer_group else "") + "\n"
            f'[metrics]\nenabled = {"true" if self.metrics else "false"}\nbind = "{self.host}"\nport = 0\n\n'
            f"{self.cluster_toml}"
        )
        if not self.insecure:
            ensure_keys(self.keys_dir, [self.node_id])
        self._log_file = open(self.log_path, "ab")
        env = {**os.environ, **self.extra_env}
        niced = ["nice", "-n", str(self.nice)] if self.nice else []
        self.proc = subprocess.Popen([*self.wrap, *niced, sys.executable, "-m", "fabricd", "run", "--config",
                                      str(self.config_path)],
                                     stdout=self._log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"fabricd exited with {self.proc.returncode}; see {self.log_path}:\n{self.tail()}")
            if endpoint_file.exists():
                self.address = endpoint_file.read_text().strip()
                with ControlClient(self.address, timeout_s=2.0, retries=0, keys=self.operator_keys) as client:
                    try:
                        client.request(protocol.Hello(protocol=protocol.PROTOCOL_VERSION, peer="ctl"))
                        return self.address
                    except Exception:  # not answering yet
                        pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"fabricd did not come up within {timeout:.0f}s; see {self.log_path}:\n{self.tail()}")

    @cached_property
    def operator_keys(self) -> ClientKeys | None:
        """The local operator's keys (None when insecure)."""
        return None if self.insecure else ClientKeys.load(self.keys_dir / OPERATOR_KEY)

    @cached_property
    def trainer_keys(self) -> ClientKeys | None:
        """The local trainer's keys, for a ``Loader`` (None when insecure)."""
        return None if self.insecure else ClientKeys.load(self.keys_dir / TRAINER_KEY)

    def client_env(self) -> dict[str, str]:
        """Environment for a trainer or fabricctl subprocess of this fabric (its key files)."""
        if self.insecure:
            return {}
        return {"FABRIC_KEY": str(self.keys_dir / TRAINER_KEY), "FABRICCTL_KEY": str(self.keys_dir / OPERATOR_KEY)}

    def client(self, timeout_s: float = 10.0) -> ControlClient:
        if self.address is None:
            raise RuntimeError("daemon not started")
        return ControlClient(self.address, timeout_s=timeout_s, keys=self.operator_keys)

    def status(self) -> dict:
        with self.client() as c:
            reply, _ = c.request(protocol.StatusRequest())
        return reply.status

    def metrics_url(self) -> str | None:
        """The daemon's ``/metrics`` URL (from ``state/metrics.endpoint``), or None if it has none."""
        try:
            return (self.workdir / "state" / "metrics.endpoint").read_text().strip() or None
        except OSError:
            return None

    def descendants(self) -> list[psutil.Process]:
        if self.proc is None:
            return []
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the daemon, remembering its children so ``stop`` can reap any survivor."""
        if self.proc is not None and self.proc.poll() is None:
            self._orphans += self.descendants()
            try:
                self.proc.send_signal(sig)
            except ProcessLookupError:  # it died on its own meanwhile; stop() reaps it
                pass

    def stop(self, timeout: float = 15.0) -> None:
        """Stop the daemon (SIGTERM → SIGKILL) and kill any descendant that outlived it."""
        if self.proc is None:
            return
        children = self.descendants() + self._orphans
        self._orphans = []
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        kill_processes(children, timeout=5)
        for record in ("ipc_dir", "trainer_ipc_dir"):  # a killed daemon could not
            local_ipc.remove_recorded(self.workdir / "state" / record)
        if self._log_file is not None:
            self._log_file.close()
        self.proc = None

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def __enter__(self) -> LocalDaemon:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()


def default_data_roots(workdir: Path) -> list[Path]:
    """Where local daemons read data from unless told: ``$FABRICD_LOCAL_DATA_ROOTS`` (``:``-separated
    absolute directories) when set, else the directory holding ``workdir``."""
    env = os.environ.get(DATA_ROOTS_ENV, "")
    return [Path(p) for p in env.split(os.pathsep) if p] or [Path(workdir).absolute().parent]


def kill_processes(procs: list[psutil.Process], *, timeout: float) -> None:
    """SIGKILL every process of ``procs`` still running (by pid) and reap them."""
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=timeout)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing uses right now (for configs that need one up front).

    Picked below the kernel's ephemeral range when there is room: a port from that range (what
    binding port 0 gives) can be taken in the meantime as the local port of any outgoing
    connection, and a daemon killed and restarted on its port then fails with "address already
    in use" (seen in the failover tests). ZeroMQ's random binds (49152 and up) stay clear too."""
    low, _ = _ephemeral_range()
    if low > _FIXED_PORTS_FROM + 1000:
        for port in random.sample(range(_FIXED_PORTS_FROM, low), 200):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    with socket.socket() as s:  # no room (or nothing free) below the range: any port the kernel gives
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: Where :func:`free_port` starts looking (above the registered ports most services use).
_FIXED_PORTS_FROM = 20000


def _ephemeral_range() -> tuple[int, int]:
    """The kernel's range for outgoing connections' local ports (Linux's default elsewhere)."""
    try:
        low, high = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


class LocalCluster:
    """``nodes`` daemons on this machine forming one fabric (peers on 127.0.0.1), for trying things.

    Peers must know each other's endpoints before they start, so ports are picked up front.
    Every daemon reads data from ``data_roots`` (default: :func:`default_data_roots`).
    """

    def __init__(self, workdir: str | Path, *, nodes: int = 3, loader_workers: int = 1, log_level: str = "INFO",
                 lease_duration_s: float = 2.0, renew_deadline_s: float = 1.3, retry_period_s: float = 0.3,
                 heartbeat_s: float = 0.3, missed_beats: int = 3, extra_env: dict[str, str] | None = None,
                 lab: NetnsLab | None = None, data_roots: Sequence[str | Path] | None = None,
                 keys_dir: str | Path | None = None, insecure: bool = False, metrics: bool = True,
                 cluster_extra: str = "", local_ipc: bool = True, nice: int = 0) -> None:
        """``cluster_extra``: more ``[cluster]`` keys, as TOML lines (say, the lease backend)."""
        self.workdir = Path(workdir).absolute()
        roots = list(data_roots or default_data_roots(self.workdir))
        keys_dir = Path(keys_dir or os.environ.get(KEYS_DIR_ENV) or self.workdir / "keys")
        self.lab = lab
        ids = [f"node-{chr(ord('a') + i)}" for i in range(nodes)]
        # on loopback every daemon needs its own port; in namespaces each has its own address
        hosts = dict(zip(ids, lab.addresses)) if lab else dict.fromkeys(ids, "127.0.0.1")
        ports = dict.fromkeys(ids, 7700) if lab else {n: free_port() for n in ids}
        peers = "".join(f'[[cluster.peers]]\nid = "{n}"\ncontrol = "tcp://{hosts[n]}:{p}"\n\n' for n, p in ports.items())
        cluster = (f"[cluster]\nlease_duration_s = {lease_duration_s}\nrenew_deadline_s = {renew_deadline_s}\n"
                   f"retry_period_s = {retry_period_s}\nmissed_beats = {missed_beats}\n{cluster_extra}\n{peers}")
        self.daemons = {n: LocalDaemon(self.workdir / n, node_id=n, loader_workers=loader_workers,
                                       log_level=log_level, extra_env=extra_env, port=ports[n], cluster_toml=cluster,
                                       heartbeat_s=heartbeat_s, host=hosts[n],
                                       wrap=lab.command(i, []) if lab else None, data_roots=roots,
                                       keys_dir=keys_dir, insecure=insecure, metrics=metrics, local_ipc=local_ipc,
                                       nice=nice)
                        for i, n in enumerate(ids)}
        if not insecure:  # every node's key is in the allow-lists before the first daemon reads them
            ensure_keys(keys_dir, ids)
        first = next(iter(self.daemons.values()))
        self.trainer_keys, self.operator_keys = first.trainer_keys, first.operator_keys
        self.client_env = first.client_env
        self.addresses = [f"tcp://{hosts[n]}:{ports[n]}" for n in ids]
        self.leftovers: list[int] = []

    def node_keys(self, node: str) -> ClientKeys | None:
        """The keys of ``node`` as a client (what its role processes use; None when insecure)."""
        d = self.daemons[node]
        return None if d.insecure else ClientKeys.load(d.keys_dir / f"nodes/{node}.key_secret")

    def start(self, timeout: float = 30.0) -> list[str]:
        try:
            for d in self.daemons.values():
                d.start(timeout)
        except Exception:
            self.stop()
            raise
        return self.addresses

    def status(self, node: str) -> dict | None:
        d = self.daemons[node]
        if d.proc is None or d.proc.poll() is not None:
            return None
        try:
            with d.client(timeout_s=2.0) as c:
                c.retries = 0
                reply, _ = c.request(protocol.StatusRequest())
            return reply.status
        except Exception:
            return None

    def leader(self, timeout: float = 30.0, exclude: tuple[str, ...] = ()) -> str:
        """The node that holds the lease (other than ``exclude``), waiting for one to be elected."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for n in self.daemons:
                if n in exclude:
                    continue
                st = self.status(n)
                if st is not None and st["is_leader"]:
                    return n
            time.sleep(0.1)
        raise RuntimeError(f"no leader elected within {timeout:.0f}s")

    def kill(self, node: str, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to a daemon (its role processes die with it on SIGKILL)."""
        self.daemons[node].signal(sig)

    def partition(self, node: str) -> None:
        """Cut ``node`` off the network (needs a NetnsLab)."""
        self.lab.partition(list(self.daemons).index(node))

    def heal(self, node: str) -> None:
        self.lab.heal(list(self.daemons).index(node))

    def restart(self, node: str) -> None:
        d = self.daemons[node]
        d.stop()
        d.start()

    def stop(self) -> None:
        """Stop every daemon; then reap any process of this cluster that outlived its daemon.

        Such a process is a bug (roles must die with their daemon); its pid lands in ``leftovers``.
        """
        for d in self.daemons.values():
            d.stop()
        mine = str(self.workdir)
        deadline = time.monotonic() + 3.0
        while True:
            left = [p for p in psutil.process_iter(["cmdline"]) if mine in " ".join(p.info["cmdline"] or ())]
            if not left or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        for p in left:
            self.leftovers.append(p.pid)
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

"""Node configs and job specs: TOML loaded once into frozen dataclasses, validated, passed explicitly.

Every error is a :class:`ConfigError` naming the file, the key (dotted path) and the bad value.
Unknown keys are errors: a typo must not silently fall back to a default.
"""

from __future__ import annotations

import grp
import hashlib
import json
import logging
import math
import tomllib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from fabric_client.limits import MAX_NAME_CHARS

from . import spec_bounds as B
from .cluster.etcd_gateway import url_problem
from .errors import ConfigError
from .images import IMAGE_MODES, ImageSpec
from .planner.compose import COMPOSE_MODES, MAX_DELAY_STEPS
from .planner.online import ONLINE_POLICIES
from .text import TOKENIZER_KINDS, TokenizerSpec
from .node_checks import endpoint_problem, valid_host
from .sources.roots import DEFAULT_DATA_ROOTS, MAX_DATA_ROOTS, resolve_roots

__all__ = [
    "NodeConfig",
    "ClusterConfig",
    "MetricsConfig",
    "PeerSpec",
    "JobSpec",
    "AutoscaleSpec",
    "Topology",
    "BatchShape",
    "ImageSpec",
    "TokenizerSpec",
    "CostSpec",
    "BucketSpec",
    "SourceSpec",
    "MixtureSpec",
    "load_node_config",
    "load_job_spec",
    "parse_job_spec",
    "describe_defaults",
]

log = logging.getLogger(__name__)

_JOB_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")
COMPRESSIONS = ("auto", "lz4", "none")
BALANCE_METHODS = ("lpt", "kk")
SCHEDULE_KINDS = ("constant", "piecewise", "linear")
LONG_SAMPLE_POLICIES = ("split", "truncate")
#: every format of fabricd.sources.formats.REGISTRY (a unit test keeps the two equal)
SOURCE_FORMATS = ("parquet", "parquet-tokens", "jsonl", "megatron", "webdataset")


class _Table:
    """One TOML table being validated: typed getters that record which keys were used."""

    def __init__(self, file: str, prefix: str, data: Any) -> None:
        if not isinstance(data, Mapping):
            raise ConfigError(file, prefix or "<root>", data, "expected a table")
        self.file = file
        self.prefix = prefix
        self.data = data
        self.used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def error(self, name: str, value: Any, reason: str) -> ConfigError:
        return ConfigError(self.file, self.key(name), value, reason)

    def _get(self, name: str, default: Any, required: bool) -> Any:
        self.used.add(name)
        if name in self.data:
            return self.data[name]
        if required:
            raise self.error(name, None, "required key is missing")
        return default

    def str(self, name: str, default: str | None = None, *, required: bool = False,
            choices: tuple[str, ...] | None = None) -> str:
        value = self._get(name, default, required)
        if not isinstance(value, str) or not value:
            raise self.error(name, value, "expected a non-empty string")
        if choices is not None and value not in choices:
            raise self.error(name, value, f"expected one of {', '.join(choices)}")
        return value

    def int(self, name: str, default: int | None = None, *, required: bool = False,
            min: int | None = None, max: int | None = None, bound: str | None = None) -> int:
        """An integer in ``[min, max]``; ``bound`` names the constant ``max`` comes from."""
        value = self._get(name, default, required)
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.error(name, value, "expected an integer")
        if min is not None and value < min:
            raise self.error(name, value, f"must be >= {min}")
        if max is not None and value > max:
            raise self.error(name, value, f"must be <= {bound} ({max})" if bound else f"must be <= {max}")
        return value

    def float(self, name: str, default: float | None = None, *, required: bool = False,
              min: float | None = None, positive: bool = False, max: float | None = None) -> float:
        value = self._get(name, default, required)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise self.error(name, value, "expected a finite number")
        if min is not None and value < min:
            raise self.error(name, value, f"must be >= {min}")
        if positive and value <= 0:
            raise self.error(name, value, "must be > 0")
        if max is not None and value > max:
            raise self.error(name, value, f"must be <= {max}")
        return float(value)

    def bool(self, name: str, default: bool) -> bool:
        value = self._get(name, default, False)
        if not isinstance(value, bool):
            raise self.error(name, value, "expected true or false")
        return value

    def table(self, name: str, *, required: bool = False) -> _Table:
        value = self._get(name, {}, required)
        return _Table(self.file, self.key(name), value)

    def tables(self, name: str, *, required: bool = False, max: int | None = None,
               bound: str | None = None) -> list[_Table]:
        """An array of tables of at most ``max`` entries (``bound`` names that constant)."""
        value = self._get(name, [], required)
        if not isinstance(value, list) or not all(isinstance(v, Mapping) for v in value):
            raise self.error(name, value, "expected an array of tables ([[" + self.key(name) + "]])")
        if required and not value:
            raise self.error(name, value, "at least one entry is required")
        if max is not None and len(value) > max:
            raise self.error(name, f"{len(value)} entries", f"at most {bound} ({max}) entries are allowed")
        return [_Table(self.file, f"{self.key(name)}[{i}]", v) for i, v in enumerate(value)]

    def done(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise self.error(unknown[0], self.data[unknown[0]], "unknown key")


def _str_list(t: _Table, name: str, *, max: int, bound: str) -> tuple[str, ...]:
    value = t._get(name, [], False)
    if not isinstance(value, list):
        raise t.error(name, value, "expected a list of non-empty strings")
    if len(value) > max:
        raise t.error(name, f"{len(value)} entries", f"at most {bound} ({max}) entries are allowed")
    if not all(isinstance(v, str) and 0 < len(v) <= MAX_NAME_CHARS for v in value):
        raise t.error(name, value, f"expected a list of non-empty strings of at most {MAX_NAME_CHARS} characters")
    return tuple(value)


def _read_toml(path: Path) -> tuple[str, dict]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(str(path), "<file>", str(path), f"cannot read: {e.strerror or e}") from e
    return text, _parse_toml(text, str(path))


def _parse_toml(text: str, file: str) -> dict:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(file, "<syntax>", None, f"invalid TOML: {e}") from e


# --------------------------------------------------------------------------------------------
# Node config


#: Lease backends: the daemons' own majority election, or a lease in etcd v3 (see README).
LEASE_BACKENDS = ("builtin", "etcd")
DEFAULT_ETCD_PREFIX = "/fabricd/"
MAX_ETCD_ENDPOINTS = 16
MAX_ETCD_PREFIX_CHARS = 200


@dataclass(frozen=True)
class PeerSpec:
    node_id: str
    control: str           # the peer's control endpoint, as this node reaches it


@dataclass(frozen=True)
class SecurityConfig:
    """CurveZMQ on every socket (see ``fabric_client.keys``); plaintext only with ``insecure``."""

    keys_dir: Path        # server.key_secret, nodes/<id>.key_secret, and the allow-lists
    insecure: bool        # plaintext, no authentication: warned at every start, shown in status
    local_ipc: bool = True  # same-node links (loaders, same-user trainers) over private Unix sockets (fabricd.local_ipc)
    # a group whose members' trainers stream from this node's constructors over Unix sockets shared
    # with it (fabricd.local_ipc; None: only the daemon's user's), and where those sockets go (None:
    # $RUNTIME_DIRECTORY/trainers under systemd, else the temp directory)
    trainer_group: str | None = None
    trainer_gid: int | None = None
    trainer_socket_dir: Path | None = None


@dataclass(frozen=True)
class MetricsConfig:
    """``[metrics]``: the daemon's Prometheus endpoint (``fabricd.metrics``). Port 0 picks a free
    port and writes ``http://HOST:PORT/metrics`` to ``<state_dir>/metrics.endpoint``."""

    enabled: bool = True
    bind: str = "127.0.0.1"   # an address of this node (0.0.0.0 or :: for every interface)
    port: int = 9464


@dataclass(frozen=True)
class ClusterConfig:
    """The fabric's daemons. A node with no ``[cluster]`` table is a cluster of one."""

    peers: tuple[PeerSpec, ...]   # every daemon, this one included
    voters: tuple[str, ...]       # daemons whose majority grants the lease
    required_acks: int            # shadows that must hold a log record before it is committed
    lease_duration_s: float
    renew_deadline_s: float
    retry_period_s: float
    missed_beats: int             # heartbeats missed before a member is declared dead
    lease_backend: str = "builtin"  # who grants the lease: LEASE_BACKENDS
    etcd_endpoints: tuple[str, ...] = ()  # lease_backend = "etcd": the etcd gateway URLs (http://host:port)
    etcd_prefix: str = DEFAULT_ETCD_PREFIX  # lease_backend = "etcd": the keys of this cluster start with it

    def peer(self, node_id: str) -> PeerSpec:
        for p in self.peers:
            if p.node_id == node_id:
                return p
        raise KeyError(node_id)


@dataclass(frozen=True)
class NodeConfig:
    """One daemon's settings (``/etc/fabricd/fabricd.toml``)."""

    file: str
    node_id: str
    control: str           # endpoint the daemon binds; port 0 picks a free port
    advertise_host: str    # how trainers and peers reach this node's role endpoints
    state_dir: Path
    log_level: str
    loader_workers: int    # source-loader processes per source (a job may override per source)
    restart_backoff_s: float
    restart_backoff_max_s: float
    heartbeat_s: float
    max_message_bytes: int
    cluster: ClusterConfig
    security: SecurityConfig
    # directories (resolved) datasets may be read from; see fabricd.sources.roots
    data_roots: tuple[Path, ...] = DEFAULT_DATA_ROOTS
    metrics: MetricsConfig = MetricsConfig()

    @property
    def endpoint_file(self) -> Path:
        """Where the daemon writes the control endpoint it actually bound (for port 0)."""
        return self.state_dir / "control.endpoint"

    @property
    def metrics_endpoint_file(self) -> Path:
        """Where the daemon writes the metrics URL it actually bound (for ``[metrics] port = 0``)."""
        return self.state_dir / "metrics.endpoint"


def load_node_config(path: str | Path) -> NodeConfig:
    """Load and validate a node config file."""
    path = Path(path)
    _, data = _read_toml(path)
    file = str(path)
    root = _Table(file, "", data)
    node = root.table("node", required=True)
    roles = root.table("roles")
    limits = root.table("limits")
    cluster_t = root.table("cluster")
    security_t = root.table("security")
    metrics_t = root.table("metrics")
    control = _endpoint(node, "control", node.str("control", "tcp://127.0.0.1:7700"), bind=True)
    advertise_host = node.str("advertise_host", "127.0.0.1")
    if not valid_host(advertise_host) or advertise_host in ("*", "0.0.0.0", "::"):
        raise node.error("advertise_host", advertise_host,
                         "expected a host name or an IP address of this node (not a wildcard)")
    state_dir = Path(node.str("state_dir", "/var/lib/fabricd"))
    if not state_dir.is_absolute():
        state_dir = (path.parent / state_dir).resolve()
    backoff = roles.float("restart_backoff_s", 0.2, min=B.MIN_PERIOD_S, max=B.MAX_PERIOD_S)
    backoff_max = roles.float("restart_backoff_max_s", 10.0, min=B.MIN_PERIOD_S, max=B.MAX_PERIOD_S)
    if backoff_max < backoff:
        raise roles.error("restart_backoff_max_s", backoff_max, f"must be >= restart_backoff_s ({backoff})")
    node_id = node.str("id", required=True)
    cluster = _cluster_config(cluster_t, node_id, control)
    cfg = NodeConfig(
        file=file,
        node_id=node_id,
        control=control,
        advertise_host=advertise_host,
        state_dir=state_dir,
        log_level=node.str("log_level", "INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR")),
        loader_workers=roles.int("loader_workers", 1, min=1, max=256),
        restart_backoff_s=backoff,
        restart_backoff_max_s=backoff_max,
        heartbeat_s=roles.float("heartbeat_s", 1.0, min=B.MIN_PERIOD_S, max=B.MAX_PERIOD_S),
        max_message_bytes=limits.int("max_message_bytes", 256 << 20, min=1 << 16),
        cluster=cluster,
        security=_security_config(security_t, path),
        data_roots=_data_roots(node),
        metrics=_metrics_config(metrics_t),
    )
    for table in (node, roles, limits, cluster_t, security_t, metrics_t, root):
        table.done()
    return cfg


def _security_config(t: _Table, path: Path) -> SecurityConfig:
    keys_dir = Path(t.str("keys_dir", "/etc/fabricd/keys"))
    if not keys_dir.is_absolute():
        keys_dir = (path.parent / keys_dir).resolve()
    group = t.str("trainer_group") if "trainer_group" in t.data else None
    gid = None
    if group is not None:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise t.error("trainer_group", group, "no such group on this node") from None
    where = Path(t.str("trainer_socket_dir")) if "trainer_socket_dir" in t.data else None
    if where is not None and not where.is_absolute():
        raise t.error("trainer_socket_dir", str(where), "expected an absolute path")
    return SecurityConfig(keys_dir=keys_dir, insecure=t.bool("insecure", False), local_ipc=t.bool("local_ipc", True),
                          trainer_group=group, trainer_gid=gid, trainer_socket_dir=where)


def _metrics_config(t: _Table) -> MetricsConfig:
    """``[metrics]``: ``enabled``, ``bind`` (an address or host name to listen on; ``0.0.0.0`` or
    ``::`` for every interface, not ``*``) and ``port`` (0: any free port)."""
    default = MetricsConfig()
    bind = t.str("bind", default.bind)
    if bind == "*" or not valid_host(bind.strip("[]")):
        raise t.error("bind", bind, "expected an IP address or host name to listen on "
                                    "(0.0.0.0 or :: for every interface)")
    return MetricsConfig(enabled=t.bool("enabled", default.enabled), bind=bind.strip("[]"),
                         port=t.int("port", default.port, min=0, max=65535))


def _data_roots(t: _Table) -> tuple[Path, ...]:
    """``[node] data_roots``: absolute directories, at most MAX_DATA_ROOTS, resolved (symlinks
    followed); absent means DEFAULT_DATA_ROOTS, logged so the choice is visible."""
    if "data_roots" not in t.data:
        t.used.add("data_roots")
        log.info("%s: no [node] data_roots; sources may only be read below %s", t.file,
                 ", ".join(map(str, DEFAULT_DATA_ROOTS)))
        return resolve_roots(DEFAULT_DATA_ROOTS)
    value = t._get("data_roots", None, False)
    if not isinstance(value, list) or not value:
        raise t.error("data_roots", value, "expected a non-empty list of absolute directory paths")
    if len(value) > MAX_DATA_ROOTS:
        raise t.error("data_roots", f"{len(value)} entries", f"at most MAX_DATA_ROOTS ({MAX_DATA_ROOTS}) entries are allowed")
    for v in value:
        if not isinstance(v, str) or not v or "\0" in v or not Path(v).is_absolute():
            raise t.error("data_roots", v, "expected an absolute directory path (like \"/data/corpora\")")
        if Path(v).exists() and not Path(v).is_dir():
            raise t.error("data_roots", v, "not a directory")
    return resolve_roots(value)


def _endpoint(t: _Table, key: str, value: str, *, bind: bool) -> str:
    problem = endpoint_problem(value, bind=bind)
    if problem:
        raise t.error(key, value, problem)
    return value


def _cluster_config(t: _Table, node_id: str, control: str) -> ClusterConfig:
    peers = []
    for p in t.tables("peers"):
        peer = PeerSpec(node_id=p.str("id", required=True),
                        control=_endpoint(p, "control", p.str("control", required=True), bind=False))
        if any(o.node_id == peer.node_id for o in peers):
            raise p.error("id", peer.node_id, "duplicate peer id")
        p.done()
        peers.append(peer)
    if not peers:
        peers = [PeerSpec(node_id=node_id, control=control.replace("0.0.0.0", "127.0.0.1"))]
    ids = tuple(p.node_id for p in peers)
    if node_id not in ids:
        raise t.error("peers", list(ids), f"must include this node ({node_id!r})")
    voters = t._get("voters", list(ids), False)
    if not isinstance(voters, list) or not voters or any(v not in ids for v in voters) or len(set(voters)) != len(voters):
        raise t.error("voters", voters, f"expected a non-empty list of distinct peer ids ({', '.join(ids)})")
    lease = t.float("lease_duration_s", 2.0, min=B.MIN_PERIOD_S, max=B.MAX_PERIOD_S)
    renew = t.float("renew_deadline_s", 1.3, min=B.MIN_PERIOD_S, max=B.MAX_PERIOD_S)
    retry = t.float("retry_period_s", 0.3, min=B.MIN_PERIOD_S, max=B.MAX_PERIOD_S)
    if not retry < renew < lease:
        raise t.error("renew_deadline_s", renew,
                      f"need retry_period_s ({retry}) < renew_deadline_s ({renew}) < lease_duration_s ({lease})")
    return ClusterConfig(
        peers=tuple(peers),
        voters=tuple(voters),
        # default: leader + required_acks shadows form a majority of the voters
        required_acks=t.int("required_acks", len(voters) // 2, min=0, max=max(0, len(peers) - 1)),
        lease_duration_s=lease,
        renew_deadline_s=renew,
        retry_period_s=retry,
        missed_beats=t.int("missed_beats", 3, min=1, max=100),
        **_lease_backend(t),
    )


def _lease_backend(t: _Table) -> dict[str, Any]:
    """``lease_backend`` and, for etcd, ``etcd_endpoints`` / ``etcd_prefix`` (refused otherwise)."""
    backend = t.str("lease_backend", "builtin", choices=LEASE_BACKENDS)
    if backend != "etcd":
        for key in ("etcd_endpoints", "etcd_prefix"):
            if key in t.data:
                raise t.error(key, t.data[key], f"only used with lease_backend = \"etcd\" (it is {backend!r})")
        return {"lease_backend": backend}
    endpoints = _str_list(t, "etcd_endpoints", max=MAX_ETCD_ENDPOINTS, bound="MAX_ETCD_ENDPOINTS")
    if not endpoints:
        raise t.error("etcd_endpoints", list(endpoints),
                      'lease_backend = "etcd" needs at least one endpoint, like ["http://127.0.0.1:2379"]')
    for url in endpoints:
        problem = url_problem(url)
        if problem:
            raise t.error("etcd_endpoints", url, problem)
    prefix = t.str("etcd_prefix", DEFAULT_ETCD_PREFIX)
    if not prefix.startswith("/") or not prefix.endswith("/") or len(prefix) > MAX_ETCD_PREFIX_CHARS \
            or not prefix.isprintable() or not prefix.isascii():
        raise t.error("etcd_prefix", prefix,
                      f"expected printable ASCII starting and ending with '/', at most {MAX_ETCD_PREFIX_CHARS} "
                      'characters, like "/fabricd/<cluster>/"')
    if "etcd_prefix" not in t.data:
        log.info("%s: no [cluster] etcd_prefix; the lease keys are under %s (clusters sharing an etcd need "
                 "their own prefix)", t.file, prefix)
    return {"lease_backend": backend, "etcd_endpoints": endpoints, "etcd_prefix": prefix}


# --------------------------------------------------------------------------------------------
# Job spec


@dataclass(frozen=True)
class Topology:
    dp_size: int
    mp_size: int                # trainer ranks per DP rank (TP × PP × CP) that receive the same batch
    ranks_per_constructor: int  # DP ranks served by one data constructor
    constructor_nodes: tuple[str, ...] = ()  # daemons on the trainers' hosts, for constructor placement

    def groups(self) -> list[list[int]]:
        """DP ranks of each data constructor: contiguous groups of ``ranks_per_constructor``."""
        return [list(range(lo, min(self.dp_size, lo + self.ranks_per_constructor)))
                for lo in range(0, self.dp_size, self.ranks_per_constructor)]


@dataclass(frozen=True)
class BatchShape:
    samples_per_step: int       # global batch in units; independent of dp_size (0: set by tokens_per_step)
    micro_batch_tokens: int     # packing budget of one micro-batch
    prefetch: int               # unconsumed batches a trainer may hold
    compression: str
    tokens_per_step: int = 0    # global batch in tokens (draws per step derived from the index); 0: unset
    compose: str = "none"       # step composition: "none" or "outliers" (fabricd.planner.compose)
    max_delay_steps: int = 0    # composition window - 1: the most steps a unit may wait


@dataclass(frozen=True)
class CostSpec:
    attention: float
    linear: float
    per_image: float
    vision_attention: float = 0.0
    vision_linear: float = 0.0


@dataclass(frozen=True)
class BucketSpec:
    name: str
    max_seq_len: int
    long_samples: str


#: what a spec that leaves out ``[topology]``, ``[batch]``, ``[[buckets]]`` or ``[mixture]`` gets
#: (README "Your first job" lists every default of a job spec); a table that is given is validated
#: as it always was, its required keys included.
DEFAULT_DP_SIZE = 1                  # a single trainer rank
DEFAULT_SAMPLES_PER_STEP = 64        # raised to topology.dp_size when that is larger
DEFAULT_MICRO_BATCH_TOKENS = 8192    # raised to the longest bucket's max_seq_len when that is larger
DEFAULT_BUCKET = BucketSpec(name="default", max_seq_len=4096, long_samples="split")  # at most micro_batch_tokens
DEFAULT_MIXTURE_WEIGHT = 1.0         # every source, constant: equal weights
DEFAULT_MAX_DELAY_STEPS = 15         # compose = "outliers": windows of 16 steps


@dataclass(frozen=True)
class SourceSpec:
    name: str
    path: Path                  # resolved against the spec file's directory
    format: str | None
    bucket: str
    workers: int | None         # source-loader processes; None = node default


@dataclass(frozen=True)
class MixtureSpec:
    kind: str
    points: tuple[tuple[int, tuple[tuple[str, float], ...]], ...]

    def as_points(self) -> list[tuple[int, dict[str, float]]]:
        return [(step, dict(weights)) for step, weights in self.points]


@dataclass(frozen=True)
class OnlineMixingSpec:
    """``[mixture] online``: a policy that turns the trainers' per-source losses into weight
    changes at future steps (each a logged plan change; see ``planner.online``). Not part of the
    fingerprint: what it changes is in the log, and a replay reads the log."""

    policy: str = "none"      # ONLINE_POLICIES
    every_steps: int = 20     # one policy round each time the slowest trainer passes this many steps
    alpha: float = 0.9        # ODM's reward smoothing
    lead_steps: int = 0       # the change lands this many steps past the first step still changeable

    @property
    def enabled(self) -> bool:
        return self.policy != "none"


@dataclass(frozen=True)
class AutoscaleSpec:
    """How the leader resizes source-loader pools (``[autoscale]``; never part of batch content)."""

    enabled: bool = True
    max_workers: int = 0              # per source; 0 = 4 × the base pool size, or the cluster's cores when more
    target_utilization: float = 0.7   # busy fraction a pool is sized for
    lookahead_steps: int = 200        # the mixture schedule is read this far ahead of the trainers
    cpu_guard_percent: float = 90.0   # no growth while every daemon's CPU is above this (0: no CPU guard)


@dataclass(frozen=True)
class JobSpec:
    """A training run's data spec. ``fingerprint`` covers everything that decides batch content."""

    file: str
    text: str
    name: str
    seed: int
    topology: Topology
    batch: BatchShape
    images: ImageSpec
    cost: CostSpec
    balance: str
    buckets: tuple[BucketSpec, ...]
    sources: tuple[SourceSpec, ...]
    mixture: MixtureSpec
    autoscale: AutoscaleSpec = AutoscaleSpec()
    online: OnlineMixingSpec = OnlineMixingSpec()
    #: trainer keys (names under ``keys/trainers/``) that may locate and stream this job's data;
    #: empty: any trainer key of the fabric (access, not content: outside the fingerprint)
    trainers: tuple[str, ...] = ()
    tokenizer: TokenizerSpec = TokenizerSpec()
    #: the defaults this spec took for the tables it left out (``topology.dp_size = 1``, ...), for
    #: logs and ``fabricctl``; what they decide is in the fields above (outside the fingerprint)
    defaults_applied: tuple[str, ...] = ()

    def trainer_allowed(self, who: str | None) -> bool:
        """Whether the authenticated caller ``who`` (``kind:name``; None on an insecure node) may
        locate and stream this job's data."""
        return who is None or not self.trainers or who in {f"trainer:{n}" for n in self.trainers}

    def bucket(self, name: str) -> BucketSpec:
        for b in self.buckets:
            if b.name == name:
                return b
        raise KeyError(name)

    def content_key(self) -> dict:
        """Everything that decides what a batch contains (not dp_size, not prefetch, not placement)."""
        return {
            "seed": self.seed,
            "samples_per_step": self.batch.samples_per_step,
            # only when set, so specs written before they existed keep their fingerprints
            **({"tokens_per_step": self.batch.tokens_per_step} if self.batch.tokens_per_step else {}),
            **({"compose": [self.batch.compose, self.batch.max_delay_steps]} if self.batch.compose != "none" else {}),
            "micro_batch_tokens": self.batch.micro_batch_tokens,
            "images": asdict(self.images),
            "tokenizer": [self.tokenizer.kind, str(self.tokenizer.path), self.tokenizer.bos, self.tokenizer.eos,
                          self.tokenizer.pad, self.tokenizer.image],
            "cost": asdict(self.cost),
            "balance": self.balance,
            "buckets": [asdict(b) for b in self.buckets],
            "sources": [[s.name, str(s.path), s.format, s.bucket] for s in self.sources],
            "mixture": [self.mixture.kind, [[st, list(map(list, w))] for st, w in self.mixture.points]],
        }

    def fingerprint(self, source_fingerprints: Mapping[str, str]) -> str:
        """Content fingerprint of the job given its sources' index fingerprints."""
        key = {"spec": self.content_key(), "sources": dict(sorted(source_fingerprints.items()))}
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


def describe_defaults(spec: JobSpec) -> str:
    """One line naming the job and every default it took (``job first: defaults applied: ...``)."""
    return f"job {spec.name}: defaults applied: {', '.join(spec.defaults_applied) or 'none'}"


def load_job_spec(path: str | Path) -> JobSpec:
    """Load and validate a job spec file; relative source paths are relative to the file.

    The defaults it applied are logged at INFO (one line). :func:`parse_job_spec` does not log
    them: the daemon and its roles re-parse recorded specs, and the daemon logs them once, when
    the job is submitted."""
    path = Path(path).absolute()
    try:
        size = path.stat().st_size
    except OSError:
        size = 0  # _read_toml names the problem
    if size > B.MAX_SPEC_BYTES:
        raise ConfigError(str(path), "<file>", f"{size} bytes", f"a job spec is at most MAX_SPEC_BYTES ({B.MAX_SPEC_BYTES}) bytes")
    text, data = _read_toml(path)
    spec = _build_job(text, data, path)
    if spec.defaults_applied:
        log.info("%s", describe_defaults(spec))
    return spec


def parse_job_spec(text: str, origin: str | Path) -> JobSpec:
    """Validate a job spec given as text; ``origin`` is the file it came from (anchors paths)."""
    origin = Path(origin).absolute()
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > B.MAX_SPEC_BYTES:
        raise ConfigError(str(origin), "<file>", f"{size} bytes", f"a job spec is at most MAX_SPEC_BYTES ({B.MAX_SPEC_BYTES}) bytes")
    return _build_job(text, _parse_toml(text, str(origin)), origin)


def _tokenizer_spec(t: _Table, spec_path: Path) -> TokenizerSpec:
    """``[tokenizer]``: kind, its file (``path`` for hf, ``model`` for sentencepiece, relative to
    the spec file) and the names of its special tokens."""
    kind = t.str("kind", "bytes", choices=TOKENIZER_KINDS)
    file_key = {"hf": "path", "sentencepiece": "model"}.get(kind)
    for key in ("path", "model"):
        if key in t.data and key != file_key:
            raise t.error(key, t.data[key], f"not a key of tokenizer kind {kind!r}"
                          + (f" (it takes {file_key!r})" if file_key else " (it needs no file)"))
    file = None
    if file_key is not None:
        raw = t.str(file_key, required=True)
        file = Path(raw).expanduser()
        if not file.is_absolute():
            file = (spec_path.parent / file).resolve()
    names = {}
    defaults = TokenizerSpec()
    for role in ("bos", "eos", "pad", "image"):
        value = t._get(role, getattr(defaults, role), False)
        if not isinstance(value, str):
            raise t.error(role, value, "expected a string (a token's name)")
        if kind == "bytes" and role in t.data:
            raise t.error(role, value, "the bytes tokenizer's special tokens are fixed (PAD 0, EOS 1, image 2)")
        if role != "bos" and not value:
            raise t.error(role, value, "must name a token of the tokenizer")
        if len(value) > 256:
            raise t.error(role, value, "at most 256 characters")
        names[role] = value
    t.done()
    return TokenizerSpec(kind=kind, path=file, **names)


def _name(t: _Table, key: str) -> str:
    value = t.str(key, required=True)
    if len(value) > MAX_NAME_CHARS:
        raise t.error(key, value, f"at most MAX_NAME_CHARS ({MAX_NAME_CHARS}) characters")
    return value


def _build_job(text: str, data: dict, path: Path) -> JobSpec:
    file = str(path)
    root = _Table(file, "", data)
    job = root.table("job", required=True)
    name = job.str("name", required=True)
    if not set(name) <= _JOB_NAME_CHARS or len(name) > 128:
        raise job.error("name", name, "use at most 128 letters, digits, '-', '_' or '.'")
    seed = job.int("seed", 0, min=0, max=2**63 - 1)
    trainers = _str_list(job, "trainers", max=B.MAX_JOB_TRAINER_KEYS, bound="MAX_JOB_TRAINER_KEYS")

    defaults: list[str] = []   # what the spec left out and got (JobSpec.defaults_applied)
    topo_given = "topology" in data
    topo_t = root.table("topology")
    topology = Topology(
        dp_size=topo_t.int("dp_size", DEFAULT_DP_SIZE, required=topo_given, min=1, max=B.MAX_DP_SIZE,
                           bound="MAX_DP_SIZE"),
        mp_size=topo_t.int("mp_size", 1, min=1, max=B.MAX_MP_SIZE, bound="MAX_MP_SIZE"),
        ranks_per_constructor=topo_t.int("ranks_per_constructor", 8, min=1, max=B.MAX_DP_SIZE, bound="MAX_DP_SIZE"),
        constructor_nodes=_str_list(topo_t, "constructor_nodes", max=B.MAX_CONSTRUCTOR_NODES,
                                    bound="MAX_CONSTRUCTOR_NODES"),
    )

    if not topo_given:
        defaults.append(f"topology.dp_size = {topology.dp_size}")

    batch_t = root.table("batch")
    # a given [batch] is read here, as it always was; a missing one once the buckets are known
    batch = _batch_shape(batch_t, topology, given=True) if "batch" in data else None

    tok_t = root.table("tokens")   # the older spelling of [images] image_tokens / image_size (fixed mode)
    img_t = root.table("images")
    if tok_t.data and img_t.data:
        raise tok_t.error("image_tokens", tok_t.data, "set image geometry in [images] only ([tokens] is its older name)")
    geo_t = img_t if img_t.data or not tok_t.data else tok_t
    mode = img_t.str("mode", "fixed", choices=IMAGE_MODES)
    try:
        images = ImageSpec(
            mode=mode,
            image_tokens=geo_t.int("image_tokens", 64, min=1, max=1 << 16),
            image_size=geo_t.int("image_size", 224, min=8, max=4096),
            patch_size=img_t.int("patch_size", 14, min=1, max=1024),
            merge_size=img_t.int("merge_size", 2, min=1, max=16),
            min_pixels=img_t.int("min_pixels", 56 * 56, min=1, max=1 << 40),
            max_pixels=img_t.int("max_pixels", 28 * 28 * 1280, min=1, max=1 << 40),
        )
    except ValueError as e:
        raise img_t.error("max_pixels", img_t.data.get("max_pixels"), str(e)) from None
    tokenizer = _tokenizer_spec(root.table("tokenizer"), path)
    cost_t = root.table("cost")
    cost = CostSpec(
        attention=cost_t.float("attention", 1.0, min=0.0),
        linear=cost_t.float("linear", 8192.0, min=0.0),
        per_image=cost_t.float("per_image", 0.0, min=0.0),
        vision_attention=cost_t.float("vision_attention", 0.0, min=0.0),
        vision_linear=cost_t.float("vision_linear", 0.0, min=0.0),
    )
    if cost.attention == 0 and cost.linear == 0:
        raise cost_t.error("linear", cost.linear, "attention and linear cannot both be 0")
    bal_t = root.table("balance")
    balance = bal_t.str("method", "lpt", choices=BALANCE_METHODS)

    buckets = []
    for t in root.tables("buckets", required=True, max=B.MAX_BUCKETS, bound="MAX_BUCKETS") if "buckets" in data else ():
        b = BucketSpec(
            name=_name(t, "name"),
            max_seq_len=t.int("max_seq_len", required=True, min=2, max=B.MAX_SEQ_LEN, bound="MAX_SEQ_LEN"),
            long_samples=t.str("long_samples", "truncate", choices=LONG_SAMPLE_POLICIES),
        )
        if batch is not None and b.max_seq_len > batch.micro_batch_tokens:
            raise t.error("max_seq_len", b.max_seq_len,
                          f"exceeds batch.micro_batch_tokens ({batch.micro_batch_tokens}): a unit must fit a micro-batch")
        if any(o.name == b.name for o in buckets):
            raise t.error("name", b.name, "duplicate bucket name")
        t.done()
        buckets.append(b)
    default_buckets = not buckets
    if default_buckets:  # shortened to a given micro-batch budget below its max_seq_len
        b = DEFAULT_BUCKET
        if batch is not None and batch.micro_batch_tokens < b.max_seq_len:
            b = replace(b, max_seq_len=batch.micro_batch_tokens)
        buckets.append(b)
    if batch is None:
        batch = _batch_shape(batch_t, topology, given=False,
                             micro_default=max(DEFAULT_MICRO_BATCH_TOKENS, *(b.max_seq_len for b in buckets)))
        defaults += [f"batch.samples_per_step = {batch.samples_per_step}",
                     f"batch.micro_batch_tokens = {batch.micro_batch_tokens}"]
    if default_buckets:
        b = buckets[0]
        defaults.append(f'buckets = [{{name = "{b.name}", max_seq_len = {b.max_seq_len}, '
                        f'long_samples = "{b.long_samples}"}}]')
    bucket_names = tuple(b.name for b in buckets)

    sources = []
    for t in root.tables("sources", required=True, max=B.MAX_SOURCES, bound="MAX_SOURCES"):
        sname = _name(t, "name")
        if any(o.name == sname for o in sources):
            raise t.error("name", sname, "duplicate source name")
        raw_path = t.str("path", required=True)
        spath = Path(raw_path).expanduser()
        if not spath.is_absolute():
            spath = (path.parent / spath).resolve()
        fmt = t.str("format", "auto", choices=(*SOURCE_FORMATS, "auto"))
        workers = t.int("workers", 0, min=0, max=B.MAX_WORKERS_PER_SOURCE, bound="MAX_WORKERS_PER_SOURCE")
        sources.append(SourceSpec(
            name=sname,
            path=spath,
            format=None if fmt == "auto" else fmt,
            bucket=t.str("bucket", bucket_names[0], choices=bucket_names),
            workers=workers or None,
        ))
        t.done()
    source_names = tuple(s.name for s in sources)

    mix_given = "mixture" in data
    mix_t = root.table("mixture")
    kind = mix_t.str("kind", "constant", choices=SCHEDULE_KINDS)
    points = []
    for t in (mix_t.tables("points", required=True, max=B.MAX_MIXTURE_POINTS, bound="MAX_MIXTURE_POINTS")
              if mix_given else ()):
        step = t.int("step", required=True, min=0, max=B.MAX_STEP, bound="MAX_STEP")
        weights_t = t.table("weights", required=True)
        weights = []
        for sname in weights_t.data:
            if sname not in source_names:
                raise weights_t.error(sname, weights_t.data[sname],
                                      f"not a source of this job (sources: {', '.join(source_names)})")
            weights.append((sname, weights_t.float(sname, min=0.0)))
        if sum(w for _, w in weights) <= 0:
            raise t.error("weights", dict(weights), "weights must not all be 0")
        if points and step <= points[-1][0]:
            raise t.error("step", step, f"steps must increase (previous point is at {points[-1][0]})")
        if not points and step != 0:
            raise t.error("step", step, "the first point must be at step 0")
        weights_t.done()
        t.done()
        points.append((step, tuple(weights)))
    if not mix_given:
        points.append((0, tuple((n, DEFAULT_MIXTURE_WEIGHT) for n in source_names)))
        defaults.append(f"mixture = constant, equal weights ({DEFAULT_MIXTURE_WEIGHT}) over "
                        f"{'the 1 source' if len(source_names) == 1 else f'all {len(source_names)} sources'}")
    if kind == "constant" and len(points) != 1:
        raise mix_t.error("points", len(points), "a constant mixture has exactly one point")
    mixture = MixtureSpec(kind=kind, points=tuple(points))
    online = _online_mixing(mix_t)

    auto_t = root.table("autoscale")
    autoscale = AutoscaleSpec(
        enabled=auto_t.bool("enabled", True),
        max_workers=auto_t.int("max_workers", 0, min=0, max=B.MAX_WORKERS_PER_SOURCE, bound="MAX_WORKERS_PER_SOURCE"),
        target_utilization=auto_t.float("target_utilization", 0.7, positive=True),
        lookahead_steps=auto_t.int("lookahead_steps", 200, min=0, max=1 << 30),
        cpu_guard_percent=auto_t.float("cpu_guard_percent", 90.0, min=0.0),
    )
    if autoscale.cpu_guard_percent > 100:
        raise auto_t.error("cpu_guard_percent", autoscale.cpu_guard_percent, "must be <= 100 (0 turns the guard off)")
    if autoscale.target_utilization >= 1.0:
        raise auto_t.error("target_utilization", autoscale.target_utilization, "must be < 1 (a busy fraction)")

    for table in (job, topo_t, batch_t, tok_t, img_t, cost_t, bal_t, mix_t, auto_t, root):
        table.done()
    return JobSpec(
        file=file, text=text, name=name, seed=seed, topology=topology, batch=batch,
        images=images, cost=cost, tokenizer=tokenizer, balance=balance, buckets=tuple(buckets), sources=tuple(sources),
        mixture=mixture, autoscale=autoscale, online=online, trainers=trainers, defaults_applied=tuple(defaults),
    )


def _online_mixing(t: _Table) -> OnlineMixingSpec:
    """``[mixture]``'s ``online``, ``online_every_steps``, ``online_alpha`` and ``online_lead_steps``."""
    alpha = t.float("online_alpha", 0.9, min=0.0)
    if alpha >= 1.0:
        raise t.error("online_alpha", alpha, "must be in [0, 1): the weight of the old reward estimate")
    return OnlineMixingSpec(
        policy=t.str("online", "none", choices=ONLINE_POLICIES),
        every_steps=t.int("online_every_steps", 20, min=1, max=B.MAX_STEP, bound="MAX_STEP"),
        alpha=alpha,
        lead_steps=t.int("online_lead_steps", 0, min=0, max=B.MAX_STEP, bound="MAX_STEP"),
    )


def _batch_shape(t: _Table, topology: Topology, *, given: bool, micro_default: int | None = None) -> BatchShape:
    """``[batch]``: ``samples_per_step`` and ``micro_batch_tokens`` are required in a given table;
    a missing table gets DEFAULT_SAMPLES_PER_STEP (at least dp_size) and ``micro_default``."""
    by_tokens = "tokens_per_step" in t.data
    if by_tokens and "samples_per_step" in t.data:
        raise t.error("tokens_per_step", t.data["tokens_per_step"],
                      "set either samples_per_step (a global batch in units) or tokens_per_step, not both")
    compose = t.str("compose", "none", choices=COMPOSE_MODES)
    if compose == "none" and "max_delay_steps" in t.data:
        raise t.error("max_delay_steps", t.data["max_delay_steps"], 'applies only with compose = "outliers"')
    batch = BatchShape(
        samples_per_step=0 if by_tokens else t.int(
            "samples_per_step", max(DEFAULT_SAMPLES_PER_STEP, topology.dp_size), required=given,
            min=1, max=B.MAX_SAMPLES_PER_STEP, bound="MAX_SAMPLES_PER_STEP"),
        tokens_per_step=t.int("tokens_per_step", min=1, max=B.MAX_TOKENS_PER_STEP,
                              bound="MAX_TOKENS_PER_STEP") if by_tokens else 0,
        compose=compose,
        max_delay_steps=t.int("max_delay_steps", DEFAULT_MAX_DELAY_STEPS, min=1, max=MAX_DELAY_STEPS,
                              bound="MAX_DELAY_STEPS") if compose != "none" else 0,
        micro_batch_tokens=t.int("micro_batch_tokens", micro_default, required=given, min=16,
                                 max=B.MAX_MICRO_BATCH_TOKENS, bound="MAX_MICRO_BATCH_TOKENS"),
        prefetch=t.int("prefetch", 4, min=1, max=B.MAX_PREFETCH, bound="MAX_PREFETCH"),
        compression=t.str("compression", "auto", choices=COMPRESSIONS),
    )
    if by_tokens and batch.tokens_per_step < topology.dp_size:
        raise t.error("tokens_per_step", batch.tokens_per_step,
                      f"must be >= topology.dp_size ({topology.dp_size}) so every rank gets data")
    if not by_tokens and batch.samples_per_step < topology.dp_size:
        raise t.error("samples_per_step", batch.samples_per_step,
                      f"must be >= topology.dp_size ({topology.dp_size}) so every rank gets data")
    return batch

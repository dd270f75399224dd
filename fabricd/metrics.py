"""The daemon's Prometheus metrics: every metric declared once, typed counters, and the endpoint.

Operators run fabricd next to node_exporter and Prometheus; each daemon serves its own
``/metrics`` (``[metrics]`` in the node config, :class:`~fabricd.config.MetricsConfig`) from a
per-daemon :class:`~prometheus_client.CollectorRegistry`, never the process-global one, on
prometheus_client's HTTP server thread.

How the numbers get there, and why they cannot disagree with ``fabricctl status``:

- Every metric is a :class:`MetricSpec` in :data:`CATALOGUE` (name, help, kind, labels), declared
  here and nowhere else; names follow Prometheus conventions (``fabricd_`` prefix, units in the
  name, counters end in ``_total`` on the wire).
- Events the daemon counts itself live in typed registries: :class:`DroppedMessages` (every
  message dropped or refused, per socket and reason) and :class:`DaemonEvents`. The status
  document's ``counters`` and ``dropped`` are read from them (same keys as before).
- Cumulative counters that role processes report (units loaded, batches sent to each trainer,
  the trainers' data wait, skipped units, malformed messages) become daemon-level counters
  through :class:`CounterFeed`, which survives role restarts (a new process counts from zero).
- Everything else (roles, pools, lease, log, balance, per-role CPU and memory) is read from the
  component that owns it when a snapshot is taken (:mod:`fabricd.metrics_reading`).

The daemon's loop builds a snapshot (:meth:`FabricMetrics.refresh`) at most every
:data:`REFRESH_S`; the HTTP thread only ever reads the last finished snapshot (one reference,
swapped whole), so a scrape never walks state the loop is changing.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import start_http_server

from .config import MetricsConfig

__all__ = [
    "CATALOGUE", "COUNTER", "GAUGE", "REFRESH_S", "MetricSpec", "Readings",
    "DroppedMessages", "DaemonEvents", "CounterFeed", "FabricMetrics", "MetricsServer",
]

log = logging.getLogger(__name__)

COUNTER, GAUGE = "counter", "gauge"
#: Most often the loop rebuilds the snapshot a scrape reads (seconds).
REFRESH_S = 1.0


@dataclass(frozen=True)
class MetricSpec:
    """One metric: its name (a counter's without ``_total``), help text, kind and label names."""

    name: str
    help: str
    kind: str
    labels: tuple[str, ...] = ()

    def family(self) -> Metric:
        cls = CounterMetricFamily if self.kind == COUNTER else GaugeMetricFamily
        return cls(self.name, self.help, labels=self.labels)


def _spec(name: str, help: str, kind: str, *labels: str) -> MetricSpec:
    return MetricSpec(name, help, kind, labels)


# -- the catalogue: every metric a daemon exports --------------------------------------------

NODE_INFO = _spec("fabricd_node_info", "Always 1; labels name the node and the fabricd version.", GAUGE,
                  "node", "version")
# roles and pools
ROLES = _spec("fabricd_roles", "Roles assigned in the cluster (replicated state), by job and kind.", GAUGE,
              "job", "kind")
LOCAL_ROLES_UP = _spec("fabricd_role_up", "1 while a role process this daemon runs is alive, else 0.", GAUGE,
                       "job", "role", "kind")
ROLE_RESTARTS = _spec("fabricd_role_restarts", "Restarts of a role process this daemon runs.", COUNTER,
                      "job", "role", "kind")
POOL_WORKERS = _spec("fabricd_pool_workers", "Source-loader workers assigned to a source's pool.", GAUGE,
                     "job", "source")
POOL_TARGET = _spec("fabricd_pool_target_workers",
                    "Pool size of a source: the leader's last resize, else the configured size.", GAUGE,
                    "job", "source")
# sources
SOURCE_QUEUED = _spec("fabricd_source_load_requests_queued",
                      "Load requests this daemon's constructors hold for a source, waiting for a free worker.",
                      GAUGE, "job", "source")
SOURCE_IN_FLIGHT = _spec("fabricd_source_load_requests_in_flight",
                         "Load requests this daemon's constructors have sent to a source's workers, unanswered.",
                         GAUGE, "job", "source")
SOURCE_UNITS = _spec("fabricd_source_units_loaded",
                     "Units read and transformed by this daemon's source loaders (rate() gives units/s).",
                     COUNTER, "job", "source")
SOURCE_FAILED = _spec("fabricd_source_units_failed", "Units this daemon's source loaders failed to read or decode.",
                      COUNTER, "job", "source")
SOURCE_BUSY = _spec("fabricd_source_busy_seconds", "Seconds this daemon's source loaders spent serving requests.",
                    COUNTER, "job", "source")
CONSTRUCTOR_BUSY = _spec("fabricd_constructor_busy_seconds",
                        "Seconds a data constructor of this daemon spent working, not waiting on its sockets "
                        "(rate() near 1: its one thread is the limit; lower ranks_per_constructor).",
                        COUNTER, "job", "role")
# trainers
TRAINER_BATCHES = _spec("fabricd_trainer_batches_delivered",
                        "Micro-batches this daemon's constructors sent to a trainer (trainer = dpD/mpM).",
                        COUNTER, "job", "trainer")
TRAINER_WAIT = _spec("fabricd_trainer_data_wait_seconds",
                     "Seconds a trainer waited for data in its loader, as it reported to this daemon's "
                     "constructors.", COUNTER, "job", "trainer")
PROGRESS_FLOOR = _spec("fabricd_job_progress_floor_step", "A step every trainer rank of the job has reached.",
                       GAUGE, "job")
# planning
PLAN_STEP = _spec("fabricd_plan_latest_step", "The highest step planned on this daemon (its balance is below).",
                  GAUGE, "job")
BALANCE = _spec("fabricd_plan_balance_max_over_mean",
                "Max over mean of the DP ranks' estimated cost at the latest planned step.", GAUGE, "job")
PLAN_CACHE = _spec("fabricd_plan_cache_bytes", "Bytes of plans the job's plan worker keeps for the constructors' "
                   "requests (at most fabricd.job.PLAN_CACHE_BYTES).", GAUGE, "job")
BALANCE_BOUND = _spec("fabricd_plan_balance_lower_bound",
                      "What no balancer can beat at that step: max(largest unit, mean share) over the mean.",
                      GAUGE, "job")
# skips
SKIPPED_UNITS = _spec("fabricd_skipped_units", "Units this daemon's constructors dropped as skipped.", COUNTER,
                      "job")
SKIPS_RECORDED = _spec("fabricd_skipped_units_recorded", "Skip records of the job in the checkpoint log.", GAUGE,
                       "job")
SKIP_REPORTS = _spec("fabricd_skip_reports", "Skip reports this daemon handled as leader, by outcome.", COUNTER,
                     "outcome")
# lease and log
LEASE_TERM = _spec("fabricd_lease_term", "The lease term (fencing token) this daemon is in.", GAUGE)
IS_LEADER = _spec("fabricd_is_leader", "1 while this daemon provably holds the lease.", GAUGE)
IN_TOUCH = _spec("fabricd_in_touch", "1 while this daemon's copy of the state is current enough to answer from.",
                 GAUGE)
LEADER_CHANGES = _spec("fabricd_leader_changes", "Times this daemon saw the leader change.", COUNTER)
LEASE_EVENTS = _spec("fabricd_lease_events", "Elections this daemon won and times it stepped down.", COUNTER,
                     "event")
LOG_LAST = _spec("fabricd_log_last_seq", "Sequence number of the last record in this daemon's log.", GAUGE)
LOG_COMMIT = _spec("fabricd_log_commit_seq", "Highest log record this daemon knows to be committed.", GAUGE)
REPLICA_LAG = _spec("fabricd_replica_lag_records",
                    "Records a shadow has not acknowledged yet (exported by the leader).", GAUGE, "replica")
# messages
CONTROL_MESSAGES = _spec("fabricd_control_messages", "Messages received on the control socket.", COUNTER)
DROPPED = _spec("fabricd_dropped_messages",
                "Messages dropped or refused, by socket (control, peer, stream, loader) and reason.", COUNTER,
                "socket", "reason")
STALE_REFUSED = _spec("fabricd_stale_refused",
                      "Requests refused while this daemon was not in touch with the leader.", COUNTER)
PROPOSALS_REFUSED = _spec("fabricd_proposals_refused", "Decisions the replicated state refused to record.",
                          COUNTER)
# resources
ROLE_CPU = _spec("fabricd_role_cpu_seconds", "CPU seconds (user + system) of a process: a role, or the daemon.",
                 COUNTER, "job", "role", "kind")
ROLE_RSS = _spec("fabricd_role_resident_memory_bytes", "Resident memory of a process: a role, or the daemon.",
                 GAUGE, "job", "role", "kind")
ROLE_PSS = _spec("fabricd_role_proportional_memory_bytes",
                 "Proportional set size of a process (its private pages plus its share of pages shared with "
                 "others, e.g. the role template's): what sums to the node's real use; RSS counts shared pages "
                 "once per process.", GAUGE, "job", "role", "kind")

#: every metric a daemon exports, in exposition order
CATALOGUE: tuple[MetricSpec, ...] = tuple(v for v in list(globals().values()) if isinstance(v, MetricSpec))

#: one snapshot's values: metric → label values → value
Readings = dict[MetricSpec, dict[tuple[str, ...], float]]


class DroppedMessages:
    """Messages dropped or refused, per ``(socket, reason)``. The one place the daemon counts them:
    the status document's ``dropped`` is the control socket's share."""

    def __init__(self) -> None:
        self._counts: dict[tuple[str, str], int] = {}

    def add(self, socket: str, reason: str, n: int = 1) -> int:
        """Count ``n`` more; returns the new count of ``(socket, reason)``."""
        key = (socket, reason)
        self._counts[key] = count = self._counts.get(key, 0) + n
        return count

    def count(self, socket: str, reason: str | None = None) -> int:
        """Dropped on ``socket`` for ``reason`` (all reasons when None)."""
        return sum(v for (s, r), v in self._counts.items() if s == socket and reason in (None, r))

    def by_reason(self, socket: str, *, exclude: Iterable[str] = ()) -> dict[str, int]:
        skip = set(exclude)
        return {r: v for (s, r), v in self._counts.items() if s == socket and r not in skip}

    def items(self) -> list[tuple[tuple[str, str], int]]:
        return list(self._counts.items())


#: reasons of the daemon's own drops that are not malformed or refused requests
UNROUTABLE_REPLY, SEND_QUEUE_FULL, STALE_TERM = "unroutable_reply", "send_queue_full", "stale_term"


class DaemonEvents:
    """The daemon's own event counters (besides drops), typed."""

    __slots__ = ("requests", "stale_refused", "proposals_refused")

    def __init__(self) -> None:
        self.requests = 0           # messages received on the control socket
        self.stale_refused = 0      # requests refused while not in touch with the leader
        self.proposals_refused = 0  # records the state refused


class CounterFeed:
    """Monotonic totals per label set, fed with cumulative readings from processes that restart.

    ``feed(source, labels, value)`` takes a counter a process reports as a running total (its
    ``source`` names the process, e.g. ``(role_id, pid)``); the total of ``labels`` grows by what
    the reading adds to the previous one from the same source. A reading lower than the last one
    means the source started over, and counts in full.
    """

    def __init__(self) -> None:
        self._last: dict[tuple[Hashable, tuple[str, ...]], float] = {}
        self.totals: dict[tuple[str, ...], float] = {}

    def feed(self, source: Hashable, labels: tuple[str, ...], value: float) -> None:
        key = (source, labels)
        last = self._last.get(key, 0.0)
        self._last[key] = value
        self.totals[labels] = self.totals.get(labels, 0.0) + (value - last if value >= last else value)

    def forget(self, keep: Callable[[Hashable], bool]) -> None:
        """Drop the last readings of sources ``keep`` rejects (processes gone): memory stays
        bounded by the live processes; the totals stay."""
        for key in [k for k in self._last if not keep(k[0])]:
            del self._last[key]


class FabricMetrics:
    """One daemon's metrics: the typed registries, the counter feeds, and the snapshot served.

    ``registry`` is this daemon's own :class:`CollectorRegistry`; besides the catalogue it holds
    prometheus_client's ``process_*`` collector for the daemon process.
    """

    def __init__(self, node_id: str, version: str) -> None:
        self.node_id, self.version = node_id, version
        self.dropped = DroppedMessages()
        self.events = DaemonEvents()
        self.feeds: dict[MetricSpec, CounterFeed] = {spec: CounterFeed() for spec in CATALOGUE
                                                     if spec.kind == COUNTER}
        self.registry = CollectorRegistry(auto_describe=True)
        self._snapshot: list[Metric] = []
        self._next_refresh = 0.0
        self.refresh({})  # every family is there from the first scrape on
        self.registry.register(self)  # collect(): the last snapshot
        ProcessCollector(registry=self.registry)

    # -- what the daemon's status reads ----------------------------------------------------

    def status_counters(self) -> dict[str, int]:
        """The status document's ``counters`` (the keys it always had)."""
        return {"malformed_dropped": self.dropped.count("control") - self.dropped.count("control", UNROUTABLE_REPLY),
                "requests": self.events.requests,
                "unroutable_replies": self.dropped.count("control", UNROUTABLE_REPLY),
                "peer_sends_dropped": self.dropped.count("peer", SEND_QUEUE_FULL),
                "proposals_refused": self.events.proposals_refused,
                "stale_refused": self.events.stale_refused}

    def status_dropped(self) -> dict[str, int]:
        """The status document's ``dropped``: malformed or refused control messages by reason."""
        return self.dropped.by_reason("control", exclude=(UNROUTABLE_REPLY,))

    # -- feeding and snapshots ----------------------------------------------------------------

    def feed(self, spec: MetricSpec, source: Hashable, labels: tuple[str, ...], value: float) -> None:
        """A cumulative reading of counter ``spec`` from ``source`` (see :class:`CounterFeed`)."""
        self.feeds[spec].feed(source, labels, value)

    def due(self, now: float) -> bool:
        """Whether a new snapshot is due at monotonic ``now`` (then the next is REFRESH_S later)."""
        if now < self._next_refresh:
            return False
        self._next_refresh = now + REFRESH_S
        return True

    def refresh(self, readings: Readings) -> None:
        """Publish a snapshot: the gauges and counters read now (``readings``), the daemon's
        own counters and the fed totals. Called on the daemon's loop; scrapes read it whole."""
        values: Readings = {spec: dict(readings.get(spec, {})) for spec in CATALOGUE}
        values[NODE_INFO][(self.node_id, self.version)] = 1.0
        values[CONTROL_MESSAGES][()] = self.events.requests
        values[STALE_REFUSED][()] = self.events.stale_refused
        values[PROPOSALS_REFUSED][()] = self.events.proposals_refused
        for (socket, reason), n in self.dropped.items():
            values[DROPPED][(socket, reason)] = values[DROPPED].get((socket, reason), 0) + n
        for spec, feed in self.feeds.items():
            for labels, total in feed.totals.items():
                values[spec][labels] = values[spec].get(labels, 0) + total
        families = []
        for spec in CATALOGUE:
            family = spec.family()
            for labels, value in sorted(values[spec].items()):
                family.add_metric(list(labels), float(value))
            families.append(family)
        self._snapshot = families  # one reference swap: a scrape sees the old or the new, whole

    def collect(self) -> list[Metric]:
        """The last snapshot (prometheus_client's Collector interface; called on the HTTP thread)."""
        return self._snapshot

    def describe(self) -> list[Metric]:
        return [spec.family() for spec in CATALOGUE]


class MetricsServer:
    """The ``/metrics`` HTTP endpoint of one daemon: prometheus_client's server on a daemon
    thread, serving ``registry``. ``url`` is what it bound (also written to ``endpoint_file``
    for port 0); ``error`` says why it is not serving, if it could not bind."""

    def __init__(self, cfg: MetricsConfig, registry: CollectorRegistry, endpoint_file: Path) -> None:
        self.url: str | None = None
        self.error: str | None = None
        self._server: Any = None
        self._thread: threading.Thread | None = None
        if not cfg.enabled:
            endpoint_file.unlink(missing_ok=True)
            return
        try:
            self._server, self._thread = start_http_server(cfg.port, addr=cfg.bind, registry=registry)
        except OSError as e:  # the data path does not depend on metrics: serve on, say why loudly
            self.error = f"[metrics] cannot listen on {cfg.bind}:{cfg.port}: {e.strerror or e}"
            log.error("%s; serving without metrics", self.error)
            endpoint_file.unlink(missing_ok=True)
            return
        host = cfg.bind if cfg.bind not in ("0.0.0.0", "::") else "127.0.0.1"
        host = f"[{host}]" if ":" in host else host
        self.url = f"http://{host}:{self._server.server_port}/metrics"
        endpoint_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = endpoint_file.with_suffix(".tmp")
        tmp.write_text(self.url + "\n")
        os.replace(tmp, endpoint_file)
        log.info("metrics on %s", self.url)

    def status(self) -> dict[str, str | None]:
        return {"url": self.url, "error": self.error}

    def close(self) -> None:
        """Stop serving and release the port (waits for the server thread)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5.0)
            self._server = self._thread = None


"""Which :class:`~fabricd.cluster.lease.LeaseBackend` a daemon uses, from its node config.

``[cluster] lease_backend = "builtin"`` (the default) is the daemons' own majority election
(:class:`~fabricd.cluster.lease.LeaseElection`); ``"etcd"`` is a lease in etcd v3
(:class:`~fabricd.cluster.etcd_lease.EtcdLease`). Both persist the term in the same term store.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from ..config import NodeConfig
from .etcd_gateway import EtcdGateway
from .etcd_lease import EtcdLease, lease_ttl_s
from .etcd_session import EtcdSession
from .lease import LeaseBackend, LeaseConfig, LeaseElection
from .term_store import TermStore

__all__ = ["make_lease", "etcd_call_timeout_s"]

log = logging.getLogger(__name__)


def etcd_call_timeout_s(config: LeaseConfig) -> float:
    """The timeout of one etcd call: short, so a cycle that fails leaves time for another one
    before the leader's ``renew_deadline_s`` runs out."""
    return max(0.2, min(1.0, config.renew_deadline_s / 3))


def make_lease(cfg: NodeConfig, store: TermStore, *, log_position: Callable[[], tuple[int, int]],
               now: float) -> LeaseBackend:
    """The lease backend ``cfg`` selects, started (an etcd session's thread runs from here on)."""
    c = cfg.cluster
    config = LeaseConfig(c.lease_duration_s, c.renew_deadline_s, c.retry_period_s)
    if c.lease_backend == "builtin":
        return LeaseElection(cfg.node_id, c.voters, config, store, log_position=log_position, now=now)
    if c.lease_backend != "etcd":
        raise ValueError(f"[cluster] lease_backend = {c.lease_backend!r}: unknown")
    gateway = EtcdGateway(c.etcd_endpoints, etcd_call_timeout_s(config))
    session = EtcdSession(gateway, prefix=c.etcd_prefix, node_id=cfg.node_id, voters=c.voters,
                          ttl_s=lease_ttl_s(config), period_s=c.retry_period_s)
    log.info("lease: etcd at %s, keys under %s, lease TTL %d s", ", ".join(c.etcd_endpoints), c.etcd_prefix,
             lease_ttl_s(config))
    lease = EtcdLease(cfg.node_id, c.voters, config, store, session, log_position, now)
    session.start()
    return lease

"""What crosses the lease's boundary: its timing config, the messages voters and candidates
exchange, and the actions :class:`~fabricd.cluster.lease.LeaseElection` returns to its owner.

All are frozen dataclasses with JSON-typed fields, so the wire protocol can map the messages to
and from the peer envelope field by field. They carry no behaviour beyond checking the config.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Any, Union

import msgspec
from fabric_client.protocol import Name

#: A lease term, a log position or a renew id on the wire: non-negative, below 2^53.
Counter = Annotated[int, msgspec.Meta(ge=0, le=1 << 53)]

__all__ = [
    "Action",
    "BecameLeader",
    "LeaderChanged",
    "LeaseAck",
    "LeaseConfig",
    "LeaseMessage",
    "LeaseRelease",
    "LeaseRenew",
    "Send",
    "SteppedDown",
    "VoteReply",
    "VoteRequest",
]


@dataclass(frozen=True)
class LeaseConfig:
    """Lease timing, in seconds (Kubernetes leader-election names)."""

    #: how long a voter's grant (ack or vote) keeps it from granting to anyone else
    lease_duration_s: float = 2.0
    #: how long after sending a renew the leader may rely on its acks
    renew_deadline_s: float = 1.3
    #: how often the leader renews; also the jitter range of elections
    retry_period_s: float = 0.3

    def __post_init__(self) -> None:
        for name in ("lease_duration_s", "renew_deadline_s", "retry_period_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"lease config: {name} = {value!r}: must be a finite number of seconds")
        if not 0 < self.retry_period_s < self.renew_deadline_s < self.lease_duration_s:
            raise ValueError(
                "lease config: need 0 < retry_period_s < renew_deadline_s < lease_duration_s, got "
                f"retry_period_s = {self.retry_period_s!r}, renew_deadline_s = {self.renew_deadline_s!r}, "
                f"lease_duration_s = {self.lease_duration_s!r}")


# --- messages (JSON-typed fields; the wire protocol maps them) ---------------------------------

@dataclass(frozen=True)
class VoteRequest:
    """Candidate -> voters. ``pre_vote``: "would you vote for me in ``term``?" (changes nothing)."""

    term: Counter
    candidate: Name
    last_log_term: Counter
    last_log_seq: Counter
    pre_vote: bool


@dataclass(frozen=True)
class VoteReply:
    """Voter -> candidate. ``term`` is the voter's current term (for pre-votes too)."""

    term: Counter
    voter: Name
    granted: bool
    pre_vote: bool


@dataclass(frozen=True)
class LeaseRenew:
    """Leader -> voters, every ``retry_period_s``; ``renew_id`` grows by one per renew."""

    term: Counter
    leader: Name
    renew_id: Counter


@dataclass(frozen=True)
class LeaseAck:
    """Voter -> leader. ``ok=False`` carries the voter's (higher) term: the leader is stale."""

    term: Counter
    voter: Name
    renew_id: Counter
    ok: bool


@dataclass(frozen=True)
class LeaseRelease:
    """Leader -> voters, once, as it stops leading ``term`` on purpose (a clean shutdown): the
    grants made to it end now, so a shadow can be elected without waiting out the lease. Sent
    only after the leader stopped acting as one."""

    term: Counter
    leader: Name


LeaseMessage = Union[VoteRequest, VoteReply, LeaseRenew, LeaseAck, LeaseRelease]


# --- actions -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Send:
    """Send ``msg`` (a lease or replication message) to node ``to``; best effort, the protocols
    tolerate loss and reordering."""

    to: str
    msg: Any


@dataclass(frozen=True)
class BecameLeader:
    """This node won ``term``; it is leader while
    :meth:`~fabricd.cluster.lease.LeaseElection.is_leader` says so."""

    term: int


@dataclass(frozen=True)
class SteppedDown:
    """This node stopped leading ``term`` (the term it led); stop issuing commands at once."""

    term: int
    reason: str


@dataclass(frozen=True)
class LeaderChanged:
    """The leader this node believes in is now ``leader`` in ``term`` (None: unknown)."""

    term: int
    leader: str | None


Action = Union[Send, BecameLeader, SteppedDown, LeaderChanged]

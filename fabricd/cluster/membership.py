"""Membership: which daemons are alive, from application-level heartbeats (no sockets here).

A hung process keeps answering ZMTP pings, so liveness is decided by heartbeats the daemon's
own loop sends (``MemberBeat``), which carry its telemetry and its roles' endpoints. A member is
alive while its last beat is younger than ``missed_beats × heartbeat_s``. A restarted daemon is
recognised by its new incarnation (a random id drawn at start).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any

import msgspec
from fabric_client.protocol import Ident, Name, OptName

from .telemetry import NodeTelemetry, RoleView

__all__ = ["MemberBeat", "MemberView", "Membership"]


@dataclass(frozen=True)
class MemberBeat:
    """Daemon → every peer, every heartbeat: proof of life, telemetry, and its roles' endpoints."""

    node: Name
    incarnation: Name
    term: Annotated[int, msgspec.Meta(ge=0, le=1 << 53)]
    leader: OptName
    telemetry: NodeTelemetry
    roles: Annotated[dict[Ident, RoleView], msgspec.Meta(max_length=4096)]
    #: the node's logical CPUs (what its ``cpu_percent`` is a share of); 0: not reported. Here and
    #: not in ``telemetry``, whose older decoders refuse a field they do not know: an older peer
    #: ignores it, and a beat from one reads 0 (the autoscaler then grows one worker at a time).
    cpus: Annotated[int, msgspec.Meta(ge=0, le=1 << 20)] = 0


@dataclass
class MemberView:
    """What this node knows of one member, as of its last heartbeat."""

    node_id: str
    last_beat: float | None = None       # local monotonic time the last beat arrived
    incarnation: str = ""
    term: int = 0
    leader: str | None = None
    telemetry: NodeTelemetry = field(default_factory=NodeTelemetry)
    roles: dict[str, RoleView] = field(default_factory=dict)
    deaths: int = 0
    cpus: int = 0


class Membership:
    """Liveness of the configured peers from heartbeats and the time."""

    def __init__(self, self_id: str, peers: Sequence[str], *, heartbeat_s: float, missed_beats: int) -> None:
        self.self_id = self_id
        self.timeout_s = heartbeat_s * missed_beats
        self.members = {p: MemberView(p) for p in peers}
        self._alive: dict[str, bool] = {p: p == self_id for p in peers}

    def on_beat(self, node_id: str, *, incarnation: str, term: int, leader: str | None,
                telemetry: NodeTelemetry, roles: dict[str, RoleView], now: float, cpus: int = 0) -> bool:
        """Record a heartbeat; True when it is a new incarnation (the member restarted)."""
        view = self.members.get(node_id)
        if view is None:
            return False  # not a configured peer: ignored (and counted by the caller)
        restarted = bool(view.incarnation) and view.incarnation != incarnation
        view.last_beat, view.incarnation, view.term, view.leader = now, incarnation, term, leader
        view.telemetry, view.roles, view.cpus = telemetry, roles, cpus
        return restarted

    def alive(self, node_id: str, now: float) -> bool:
        if node_id == self.self_id:
            return True
        view = self.members.get(node_id)
        return view is not None and view.last_beat is not None and now - view.last_beat < self.timeout_s

    def live(self, now: float) -> list[str]:
        return [n for n in self.members if self.alive(n, now)]

    def changes(self, now: float) -> list[tuple[str, bool]]:
        """Members whose liveness changed since the last call: (node, now_alive)."""
        out = []
        for node in self.members:
            alive = self.alive(node, now)
            if alive != self._alive[node]:
                self._alive[node] = alive
                if not alive:
                    self.members[node].deaths += 1
                out.append((node, alive))
        return out

    def status(self, now: float) -> dict[str, dict[str, Any]]:
        return {
            n: {"alive": self.alive(n, now),
                "last_beat_s_ago": None if v.last_beat is None or n == self.self_id else round(now - v.last_beat, 2),
                "term": v.term, "leader": v.leader, "telemetry": msgspec.to_builtins(v.telemetry), "cpus": v.cpus, "deaths": v.deaths}
            for n, v in self.members.items()
        }

"""Role placement: which daemon runs which role of a job (a pure function the leader calls).

Source loaders go wherever there is room — the live daemon with the fewest roles, then the
lowest CPU load — and the workers of one source are spread over different daemons, so losing a
daemon never empties a pool. A data constructor goes to the daemon on its trainers' host when
the job names one (``[topology] constructor_nodes``) and that daemon is alive. A role stays
where it is as long as its daemon is alive: moving a working role only costs a pause.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..config import JobSpec

__all__ = ["RoleWant", "wanted_roles", "place_roles"]


@dataclass(frozen=True)
class RoleWant:
    """A role a job needs: its id, kind, arguments, and the daemons it prefers (if any)."""

    role_id: str
    kind: str
    extra: dict[str, Any]
    spread_key: str          # roles with the same key go to different daemons when possible
    prefer: tuple[str, ...] = ()


def wanted_roles(spec: JobSpec, *, fingerprint: str, default_workers: int, standby: bool) -> list[RoleWant]:
    """Every role ``spec`` needs, in a deterministic order.

    With ``standby``, each data constructor has an idle twin on another daemon: it builds nothing
    until a trainer subscribes (delivery is demand-driven), and a trainer whose constructor died
    switches to it at once instead of waiting for a new leader to re-place the role.
    """
    wants = []
    for s in spec.sources:
        for w in range(s.workers or default_workers):
            wants.append(RoleWant(f"{spec.name}/loader/{s.name}/{w}", "source_loader",
                                  {"source": s.name}, spread_key=f"loader/{s.name}"))
    prefer = spec.topology.constructor_nodes
    for g, ranks in enumerate(spec.topology.groups()):
        node = (prefer[g % len(prefer)],) if prefer else ()
        extra = {"ranks": ranks, "fingerprint": fingerprint}
        wants.append(RoleWant(f"{spec.name}/constructor/{g}", "constructor", extra,
                              spread_key=f"constructor/{g}", prefer=node))
        if standby:
            wants.append(RoleWant(f"{spec.name}/constructor/{g}/standby", "constructor", extra,
                                  spread_key=f"constructor/{g}"))
    return wants


def place_roles(wants: Sequence[RoleWant], *, live: Sequence[str], current: Mapping[str, str],
                load: Mapping[str, int], cpu: Mapping[str, float] | None = None) -> dict[str, str]:
    """role_id → node for every wanted role whose placement must change (new or on a dead node).

    ``current`` is the existing placement (role_id → node), ``load`` the number of roles each
    daemon already runs (all jobs), ``cpu`` each daemon's CPU use in percent (telemetry).
    """
    if not live:
        return {}
    cpu = cpu or {}
    count = Counter({n: load.get(n, 0) for n in live})
    spread: dict[str, Counter] = {}
    for w in wants:
        node = current.get(w.role_id)
        if node in count:
            spread.setdefault(w.spread_key, Counter())[node] += 1
    moves = {}
    for w in wants:
        if current.get(w.role_id) in count:
            continue
        same = spread.setdefault(w.spread_key, Counter())
        preferred = [n for n in w.prefer if n in count]
        candidates = preferred or list(live)
        node = min(candidates, key=lambda n: (same[n], count[n], cpu.get(n, 0.0), n))
        moves[w.role_id] = node
        count[node] += 1
        same[node] += 1
    return moves

"""Role placement: which daemon runs which role of a job (pure functions the leader calls).

Source loaders go wherever there is room: never onto a daemon short of memory while another
has some, then the live daemon with the fewest roles, then the lowest CPU load; the workers of
one source are spread over different daemons, so losing a daemon never empties a pool.

A data constructor goes next to the trainers it serves: to a daemon on the host its trainer
ranks declared (each ``Locate`` carries the trainer's host; the most common host of the group
wins), else to the job's ``[topology] constructor_nodes``. Its standby goes to another daemon.

A role stays where it is as long as its daemon is alive — moving a working role costs a pause —
except a constructor away from its trainers' host when a daemon there is alive: it moves there
(its trainers switch to the standby meanwhile), and a twin it would now share a daemon with is
moved off it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..config import JobSpec
from .state import RoleEntry

__all__ = [
    "MEMORY_GUARD_PERCENT",
    "RoleWant",
    "constructor_id",
    "group_hosts",
    "loader_id",
    "loader_prefix",
    "local_changes",
    "nodes_by_host",
    "place_roles",
    "pool_prefix",
    "wanted_roles",
]

#: A daemon whose memory use is above this gets no new role while another daemon is below it.
MEMORY_GUARD_PERCENT = 90.0


def loader_id(job: str, source: str, worker: int) -> str:
    """The role id of source-loader worker ``worker`` of ``source`` in ``job``."""
    return f"{loader_prefix(job, source)}{worker}"


def loader_prefix(job: str, source: str) -> str:
    """What every role id of ``source``'s loader pool in ``job`` starts with."""
    return f"{job}/loader/{source}/"


def pool_prefix(role_id: str) -> str:
    """A role id less its last part: for a source loader, its pool's :func:`loader_prefix`
    (``""`` for an id without one, which no pool has)."""
    head, sep, _ = role_id.rpartition("/")
    return head + sep


def constructor_id(job: str, group: int, *, standby: bool = False) -> str:
    """The role id of the data constructor of ``group`` in ``job`` (or of its standby)."""
    return f"{job}/constructor/{group}" + ("/standby" if standby else "")


@dataclass(frozen=True)
class RoleWant:
    """A role a job needs: its id, kind, arguments, and the daemons it prefers (if any)."""

    role_id: str
    kind: str
    extra: dict[str, Any]
    spread_key: str          # roles with the same key go to different daemons when possible
    prefer: tuple[str, ...] = ()


def group_hosts(spec: JobSpec, declared: Mapping[str, Sequence]) -> dict[int, str]:
    """Constructor group → the host most of its trainer ranks declared (ties: the lowest rank's).

    ``declared`` is the state's ``hosts[job]``: ``"dp_rank/mp_rank" → [host, declared_ms]``.
    Groups none of whose ranks declared a host are absent.
    """
    out = {}
    for g, ranks in enumerate(spec.topology.groups()):
        seen = [declared[k][0] for dp in ranks for mp in range(spec.topology.mp_size)
                if (k := f"{dp}/{mp}") in declared]
        if seen:
            counts = Counter(seen)
            out[g] = max(counts, key=lambda h: (counts[h], -seen.index(h)))
    return out


def nodes_by_host(names: Mapping[str, Iterable[str]]) -> dict[str, tuple[str, ...]]:
    """Host name → the daemons that run there; ``names`` maps each daemon to the names it is
    known by (its node id, its hostname, the host of its endpoint)."""
    out: dict[str, list[str]] = {}
    for node in sorted(names):
        for name in set(names[node]):
            out.setdefault(name, []).append(node)
    return {h: tuple(nodes) for h, nodes in out.items()}


def wanted_roles(spec: JobSpec, *, fingerprint: str, default_workers: int, standby: bool,
                 group_nodes: Mapping[int, Sequence[str]] | None = None,
                 pool_sizes: Mapping[str, int] | None = None) -> list[RoleWant]:
    """Every role ``spec`` needs, in a deterministic order.

    ``pool_sizes``: source → the pool size the autoscaler chose (else the spec's, else
    ``default_workers``).

    ``group_nodes``: constructor group → the daemons on its trainers' declared host. The job's
    ``[topology] constructor_nodes`` narrow that down when they name some of those daemons, and
    decide alone for a group whose trainers declared no host with a daemon on it.

    With ``standby``, each data constructor has an idle twin on another daemon: it builds nothing
    until a trainer subscribes (delivery is demand-driven), and a trainer whose constructor died
    switches to it at once instead of waiting for a new leader to re-place the role.
    """
    group_nodes, pool_sizes = group_nodes or {}, pool_sizes or {}
    wants = []
    for s in spec.sources:
        for w in range(pool_sizes.get(s.name) or s.workers or default_workers):
            wants.append(RoleWant(loader_id(spec.name, s.name, w), "source_loader",
                                  {"source": s.name}, spread_key=f"loader/{s.name}"))
    prefer = spec.topology.constructor_nodes
    for g, ranks in enumerate(spec.topology.groups()):
        named = (prefer[g % len(prefer)],) if prefer else ()
        host = tuple(group_nodes.get(g, ()))
        # the trainers' host decides; the job's constructor_nodes narrow it down when both apply
        node = tuple(n for n in host if n in named) or host or named
        extra = {"ranks": ranks, "fingerprint": fingerprint}
        wants.append(RoleWant(constructor_id(spec.name, g), "constructor", extra,
                              spread_key=f"constructor/{g}", prefer=node))
        if standby:
            wants.append(RoleWant(constructor_id(spec.name, g, standby=True), "constructor", extra,
                                  spread_key=f"constructor/{g}"))
    return wants


def place_roles(wants: Sequence[RoleWant], *, live: Sequence[str], current: Mapping[str, str],
                load: Mapping[str, int], cpu: Mapping[str, float] | None = None,
                memory: Mapping[str, float] | None = None, cores: Mapping[str, int] | None = None) -> dict[str, str]:
    """role_id → node for every wanted role whose placement must change.

    That is a role that is new, on a dead node, or away from its preferred daemons while one of
    them is alive; and a role that a preferred twin (same ``spread_key``) just joined on its node,
    when another node has none of that key. ``current`` is the existing placement (role_id →
    node), ``load`` the number of roles each daemon already runs (all jobs), ``cpu`` and
    ``memory`` each daemon's CPU and memory use in percent (telemetry), ``cores`` each daemon's
    logical CPUs. When every live daemon reports its cores, roles are counted per core: a pool's
    workers and a daemon's roles go where they are fewest for its cores, so a 48-core daemon
    takes six workers for an 8-core one's one (a pool still spans daemons first: a daemon with
    none of its workers comes before any with one). Otherwise (or with equal cores) by count.
    """
    if not live:
        return {}
    cpu, memory = cpu or {}, memory or {}
    per = {n: cores[n] for n in live} if cores and all(cores.get(n, 0) > 0 for n in live) else {n: 1 for n in live}
    count = Counter({n: load.get(n, 0) for n in live})
    spread: dict[str, Counter] = {}
    placed = dict(current)

    for w in wants:
        if current.get(w.role_id) in count:
            spread.setdefault(w.spread_key, Counter())[current[w.role_id]] += 1

    def choose(w: RoleWant, candidates: list[str]) -> str:
        same = spread.setdefault(w.spread_key, Counter())
        roomy = [n for n in candidates if memory.get(n, 0.0) < MEMORY_GUARD_PERCENT] or candidates
        return min(roomy, key=lambda n: (same[n] / per[n], count[n] / per[n], cpu.get(n, 0.0), memory.get(n, 0.0), n))

    moves: dict[str, str] = {}

    def move(w: RoleWant, candidates: list[str]) -> str:
        old, new = placed.get(w.role_id), choose(w, candidates)
        for node, delta in ((old, -1), (new, +1)):
            if node in count:
                count[node] += delta
                spread[w.spread_key][node] += delta
        moves[w.role_id] = placed[w.role_id] = new
        return new

    crowded: set[tuple[str, str]] = set()  # (spread_key, node) a preferred role moved onto
    for w in wants:
        node = placed.get(w.role_id)
        preferred = [n for n in w.prefer if n in count]
        if node in count and (not preferred or node in preferred):
            continue
        target = move(w, preferred or list(live))
        if preferred and node in count:
            crowded.add((w.spread_key, target))
    for w in wants:
        if w.role_id in moves or w.prefer or (w.spread_key, placed.get(w.role_id)) not in crowded:
            continue
        free = [n for n in live if spread[w.spread_key][n] == 0]
        if free:
            move(w, free)
    return moves


def local_changes(roles: Mapping[str, RoleEntry], *, node: str, jobs: Iterable[str], commit_seq: int,
                  running: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """What ``node`` must stop and start to match the state's role records: ``(stop, start)``.

    ``roles`` is the state's role_id → :class:`RoleEntry`, ``jobs`` the jobs this node runs, ``running``
    role_id → the arguments (``extra``) a running role was started with. A role starts only
    once its record is committed (``seq <= commit_seq``): a record a later leader may truncate
    never starts a process. A role stops as soon as the state no longer assigns it here as it
    runs, committed or not — stopping early costs a pause, never a wrong batch.
    """
    jobs = set(jobs)
    mine = {rid: r for rid, r in roles.items() if r.node == node and r.job in jobs}
    stop = [rid for rid, extra in running.items() if rid not in mine or mine[rid].extra != extra]
    start = [rid for rid, r in mine.items()
             if (rid not in running or rid in stop) and r.seq <= commit_seq]
    return stop, start

"""What a daemon tells its peers about itself in every heartbeat (``MemberBeat``), as typed records.

The leader places roles and resizes pools from these numbers, so they are validated at decode
like every other wire field: a peer that sends a negative CPU, a rank outside any job or a list of
a million trainer positions has its whole heartbeat dropped and counted, and the leader's logic
only ever reads well-formed values. A field these records do not know is ignored, not refused:
it is what a newer daemon adds during a rolling upgrade (an older release refused them, which is
why a daemon's core count travels in ``MemberBeat.cpus`` rather than here).
"""

from __future__ import annotations

from typing import Annotated

import msgspec
from fabric_client.protocol import Bounded, Count, DpRank, Ident, MpRank, Name, NextStep, OptName, Seconds

__all__ = ["HostDeclaration", "NodeTelemetry", "RoleProcessTelemetry", "RoleView", "TrainerAt", "TrainerWait"]

Percent = Annotated[float, msgspec.Meta(ge=0.0, le=100.0 * 4096)]  # psutil's per-process CPU can pass 100
Megabytes = Annotated[float, msgspec.Meta(ge=0.0, le=float(1 << 40))]

#: ``(dp_rank, mp_rank, next_step)`` of one trainer a constructor serves (or served).
TrainerAt = tuple[DpRank, MpRank, NextStep]
#: ``(job, dp_rank, mp_rank, host, declared_ms)``: a trainer's host, from its ``Locate``.
HostDeclaration = tuple[Name, DpRank, MpRank, Name, Count]
#: ``(dp_rank, mp_rank, next_step, data_wait_s)`` of one trainer a constructor serves now.
TrainerWait = tuple[DpRank, MpRank, NextStep, Seconds]


class RoleProcessTelemetry(msgspec.Struct, frozen=True, omit_defaults=True):
    """One role process: its resources (psutil) and the counters the autoscaler reads."""

    rss_mb: Megabytes = 0.0
    cpu_percent: Percent = 0.0
    builds: Count = 0
    units: Count = 0
    requests: Count = 0
    busy_s: Seconds = 0.0
    built_batches: Count = 0
    hedged: Count = 0
    load_retries: Count = 0
    sent: Count = 0
    # what `fabricctl top` shows cluster-wide (constructors): delivery rates, the load requests
    # queued per source, and how long each served trainer waited for data
    batches_sent: Count = 0
    tokens_sent: Count = 0
    load_queue: Annotated[dict[Name, Count], msgspec.Meta(max_length=1024)] = {}
    trainer_waits: Bounded(TrainerWait, 1 << 16) = []


class NodeTelemetry(msgspec.Struct, frozen=True):
    """A daemon's machine and role processes, and the trainer host declarations it passes on."""

    cpu_percent: Percent = 0.0
    mem_used_percent: Annotated[float, msgspec.Meta(ge=0.0, le=100.0)] = 0.0
    mem_available_mb: Megabytes = 0.0
    roles: Count = 0
    role_processes: Annotated[dict[Ident, RoleProcessTelemetry], msgspec.Meta(max_length=4096)] = {}
    hostname: OptName = ""
    trainer_hosts: Bounded(HostDeclaration, 4096) = []


class RoleView(msgspec.Struct, frozen=True, omit_defaults=True):
    """One role as its daemon's peers see it: where it serves, and which trainers it serves."""

    endpoint: Ident | None = None
    kind: OptName = ""
    alive: bool = False
    trainers: Bounded(TrainerAt, 1 << 16) = []

"""Upper bounds on what a job spec and a node config may ask for.

A real cluster never comes near these; they exist so that one job spec cannot make the fabric do
unbounded work (plan a step of 10^12 samples, start a million role processes, write a log record
of many megabytes). A value past a bound is refused when the spec is validated, with an error
naming the file, the key, the value and the bound (``... must be <= MAX_SAMPLES_PER_STEP (2097152)``).

=====================================  ======================  =============================================
bound                                  value                   applies to
=====================================  ======================  =============================================
``MAX_SPEC_BYTES``                     1 MiB                   the job spec text (UTF-8)
``fabric_client.limits.MAX_DP_SIZE``   65,536                  ``topology.dp_size``, ``ranks_per_constructor``
``fabric_client.limits.MAX_MP_SIZE``   1,024                   ``topology.mp_size``
``MAX_CONSTRUCTOR_NODES``              4,096                   entries of ``topology.constructor_nodes``
``MAX_JOB_TRAINER_KEYS``               4,096                   entries of ``job.trainers``
``MAX_SAMPLES_PER_STEP``               2^21 (2,097,152)        ``batch.samples_per_step``
``MAX_TOKENS_PER_STEP``                2^36                    ``batch.tokens_per_step`` (its draws per step: at most MAX_SAMPLES_PER_STEP)
``MAX_DELAY_STEPS``                    64                      ``batch.max_delay_steps``
``MAX_MICRO_BATCH_TOKENS``             2^24 (16,777,216)       ``batch.micro_batch_tokens``
``MAX_SEQ_LEN``                        2^24 (16,777,216)       ``buckets[].max_seq_len``
``MAX_PREFETCH``                       256                     ``batch.prefetch``
``MAX_BUCKETS``                        64                      number of ``[[buckets]]``
``MAX_SOURCES``                        1,024                   number of ``[[sources]]``
``MAX_WORKERS_PER_SOURCE``             256                     ``sources[].workers``, ``autoscale.max_workers``
``MAX_MIXTURE_POINTS``                 4,096                   number of ``[[mixture.points]]``
``fabric_client.limits.MAX_STEP``      2^40                    ``mixture.points[].step``
``MAX_ROLES_PER_DAEMON``               64                      a daemon's role slots (what a job needs at submit,
                                                               what pools grow to), or its cores where more
                                                               (:func:`role_slots`)
=====================================  ======================  =============================================

The roles a job needs are its data constructors (``ceil(dp_size / ranks_per_constructor)``,
twice that when the cluster has more than one daemon: each has a standby) plus its source-loader
workers (``sources[].workers``, else the node's ``roles.loader_workers``, per source). The
number of daemons is only known to the daemon a job is submitted to, so that bound is checked
there (:func:`roles_needed`), not when a spec file is parsed.

Node config bounds: ``roles.heartbeat_s`` and the ``[cluster]`` timings must lie within
``[MIN_PERIOD_S, MAX_PERIOD_S]``: a heartbeat every nanosecond is a busy loop, not a setting.
"""

from __future__ import annotations

import math

from fabric_client.limits import MAX_DP_SIZE, MAX_MP_SIZE, MAX_STEP

__all__ = [
    "MAX_SPEC_BYTES",
    "MAX_DP_SIZE",
    "MAX_MP_SIZE",
    "MAX_STEP",
    "MAX_CONSTRUCTOR_NODES",
    "MAX_SAMPLES_PER_STEP",
    "MAX_TOKENS_PER_STEP",
    "MAX_MICRO_BATCH_TOKENS",
    "MAX_SEQ_LEN",
    "MAX_PREFETCH",
    "MAX_BUCKETS",
    "MAX_SOURCES",
    "MAX_WORKERS_PER_SOURCE",
    "MAX_MIXTURE_POINTS",
    "MAX_ROLES_PER_DAEMON",
    "MAX_ROLE_SLOTS",
    "MIN_PERIOD_S",
    "MAX_PERIOD_S",
    "roles_needed",
    "role_slots",
]

#: Largest job spec text, in bytes (the spec is stored in the log and on every daemon).
MAX_SPEC_BYTES = 1 << 20
#: Most daemons a job may name in ``topology.constructor_nodes``.
MAX_CONSTRUCTOR_NODES = 4096
MAX_JOB_TRAINER_KEYS = 4096
#: Largest global batch, in samples (units) per step; one step's plan is O(this).
MAX_SAMPLES_PER_STEP = 1 << 21
#: Largest global batch in tokens (``batch.tokens_per_step``).
MAX_TOKENS_PER_STEP = 1 << 36
#: Largest packing budget of one micro-batch, in tokens.
MAX_MICRO_BATCH_TOKENS = 1 << 24
#: Longest context of a bucket, in tokens (a bucket must also fit one micro-batch).
MAX_SEQ_LEN = 1 << 24
#: Most unconsumed batches a trainer may hold (constructors buffer this many per rank).
MAX_PREFETCH = 256
#: Most length buckets of a job.
MAX_BUCKETS = 64
#: Most sources of a job.
MAX_SOURCES = 1024
#: Most source-loader processes of one source (configured or grown by the autoscaler).
MAX_WORKERS_PER_SOURCE = 256
#: Most points of a mixture schedule.
MAX_MIXTURE_POINTS = 4096
#: Most role processes a job may need per daemon of the cluster it is submitted to.
MAX_ROLES_PER_DAEMON = 64
#: Most role processes the autoscaler fills a daemon to, however many cores it reports.
MAX_ROLE_SLOTS = 1024
#: Shortest heartbeat or lease period a node config may set, in seconds.
MIN_PERIOD_S = 0.01
#: Longest heartbeat or lease period a node config may set, in seconds.
MAX_PERIOD_S = 3600.0


def role_slots(cpus: int) -> int:
    """Role processes a daemon has room for, at submit and when pools grow: ``MAX_ROLES_PER_DAEMON``,
    or one per core on a node with more (at most ``MAX_ROLE_SLOTS``). A fixed 64 would keep loaders
    off most of a 192-core node's cores, where per-rank DataLoaders (8 ranks x 16 workers) run
    128 processes. ``cpus``: what the daemon reports (0 when it does not)."""
    return max(MAX_ROLES_PER_DAEMON, min(int(cpus), MAX_ROLE_SLOTS))


def roles_needed(*, dp_size: int, ranks_per_constructor: int, loader_workers: list[int], standby: bool) -> int:
    """Role processes a job starts with: its constructors (and their standbys) and loader workers."""
    constructors = math.ceil(dp_size / ranks_per_constructor)
    return constructors * (2 if standby else 1) + sum(loader_workers)

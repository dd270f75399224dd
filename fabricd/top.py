"""``fabricctl top``: a live view of a fabric, redrawn from its status document about once a second.

Why this shape: everything shown is computed by :func:`render`, a pure function of two status
snapshots (the newest and the one before it, for rates), so a frame is unit-tested with
``rich.console.Console(record=True)`` and no daemon. :func:`run_top` is the thin loop around it:
poll the daemon (the same authenticated ``StatusRequest`` as ``fabricctl status``), render, wait
for the next tick or a key. A daemon that does not answer (down, restarting, partitioned) is a
snapshot too: the view says "unreachable since ..." over the last frame it had, and keeps polling.

What it shows, all from the status document (``fabricctl status --json``):

- the leader and term, and which daemon answered;
- members: alive, CPU and memory (their heartbeat telemetry);
- per job, its pools (per source: workers up/total, load requests queued at the constructors,
  units loaded per second), its trainers (step and data wait: the seconds its loader waited for a
  batch, reported with its credits, see :mod:`fabricd.roles.delivery`), the balance of recently
  planned steps (max/mean rank cost and the bound no balancer can beat, see
  :mod:`fabricd.planner.quality`) and its rates: batches, units and tokens per second.

Counters are summed per role id across snapshots; a counter that went down (its role process
restarted) counts from zero, so a restart never shows a negative rate.
"""

from __future__ import annotations

import contextlib
import os
import select
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from rich import box
from rich.columns import Columns
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

__all__ = ["Snapshot", "render", "run_top", "poll_snapshot", "TRAINER_ROWS"]

#: trainers listed per job (the slowest first); the rest are summed up in one line
TRAINER_ROWS = 12
#: planned steps whose balance is listed per job (the newest)
BALANCE_ROWS = 4


@dataclass(frozen=True)
class Snapshot:
    """One poll of a daemon: its status document, or why there is none.

    ``at`` is the wall-clock time of the poll (``time.time()``); ``unreachable_since`` the time
    of the first of the failed polls in a row (None while the daemon answers)."""

    at: float
    status: dict[str, Any] | None = None
    error: str = ""
    unreachable_since: float | None = None


@dataclass(frozen=True)
class Rates:
    """Per-second rates between two snapshots (None: not computable, e.g. only one snapshot)."""

    batches: float | None = None
    units: float | None = None
    tokens: float | None = None
    #: the busiest constructor's share of the interval spent working (its ``busy_s``), in percent:
    #: one thread builds every batch of its ranks, so near 100 it is the job's limit
    constructor_busy_pct: float | None = None


@dataclass(frozen=True)
class TrainerRow:
    rank: str          # "dp/mp"
    step: int          # the next step its constructor sends it
    wait_s: float      # data wait so far (seconds)
    wait_pct: float | None  # share of the last interval spent waiting, in percent
    constructor: str


@dataclass(frozen=True)
class PoolRow:
    source: str
    up: int
    workers: int
    queue: int
    units: int
    units_per_s: float | None


@dataclass(frozen=True)
class JobView:
    """What the view shows of one job, computed from two snapshots."""

    name: str
    summary: str
    pools: list[PoolRow] = field(default_factory=list)
    trainers: list[TrainerRow] = field(default_factory=list)
    trainers_hidden: int = 0
    floor: int = 0
    balance: list[dict[str, Any]] = field(default_factory=list)
    rates: Rates = Rates()


# ------------------------------------------------------------------------------ pure logic


def role_telemetry(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Role id → its process telemetry, from every member's last heartbeat; the answering
    daemon's own roles from its current telemetry (its heartbeat copy lags a beat)."""
    out: dict[str, dict[str, Any]] = {}
    for node, member in status.get("cluster", {}).get("members", {}).items():
        if node != status.get("node"):
            out.update((member.get("telemetry") or {}).get("role_processes", {}))
    out.update(status.get("telemetry", {}).get("role_processes", {}))
    return out


def counter_delta(now: dict[str, dict[str, Any]], before: dict[str, dict[str, Any]], roles: list[str],
                  key: str) -> float:
    """How much counter ``key`` grew over ``roles`` between two telemetry maps; a role whose
    counter went down restarted and counts from zero."""
    total = 0.0
    for rid in roles:
        cur = float(now.get(rid, {}).get(key, 0))
        old = float(before.get(rid, {}).get(key, 0))
        total += cur - old if cur >= old else cur
    return total


def _rate(delta: float, dt: float | None) -> float | None:
    return None if dt is None or dt <= 0 else delta / dt


def job_view(name: str, job: dict[str, Any], tel: dict[str, dict[str, Any]],
             prev_tel: dict[str, dict[str, Any]] | None, dt: float | None) -> JobView:
    """One job's pools, trainers, balance and rates (``prev_tel``/``dt``: the previous snapshot's
    telemetry and the seconds since it; None for the first)."""
    roles = job.get("roles", [])
    loaders = [r for r in roles if r["kind"] == "source_loader"]
    constructors = [r["id"] for r in roles if r["kind"] == "constructor"]
    before = prev_tel if prev_tel is not None else {}
    ok_dt = dt if prev_tel is not None else None

    pools = []
    for source in sorted({r["source"] for r in loaders if r.get("source")}):
        ids = [r["id"] for r in loaders if r.get("source") == source]
        queue = sum(int(tel.get(c, {}).get("load_queue", {}).get(source, 0)) for c in constructors)
        units = sum(int(tel.get(rid, {}).get("units", 0)) for rid in ids)
        pools.append(PoolRow(source=source, up=sum(1 for r in loaders if r.get("source") == source and r["alive"]),
                             workers=len(ids), queue=queue, units=units,
                             units_per_s=_rate(counter_delta(tel, before, ids, "units"), ok_dt)))

    waits_before = {(w[0], w[1]): w[3] for c in constructors for w in before.get(c, {}).get("trainer_waits", [])}
    by_rank: dict[tuple[int, int], TrainerRow] = {}
    for c in constructors:
        for dp, mp, step, wait in tel.get(c, {}).get("trainer_waits", []):
            old = waits_before.get((dp, mp))
            pct = None if old is None or ok_dt is None or wait < old else min(100.0, 100.0 * (wait - old) / ok_dt)
            row = TrainerRow(rank=f"{dp}/{mp}", step=int(step), wait_s=float(wait), wait_pct=pct, constructor=c)
            seen = by_rank.get((dp, mp))
            if seen is None or row.step > seen.step:  # moved between constructors: where it is now
                by_rank[(dp, mp)] = row
    trainers = sorted(by_rank.values(), key=lambda t: (t.step, t.rank))

    topo = job.get("topology", {})
    state = job.get("state", "?") + (", serving" if job.get("serving") else "")
    summary = (f"{state}  dp={topo.get('dp_size', '-')} mp={topo.get('mp_size', '-')} "
               f"constructors={topo.get('constructors', '-')}  fingerprint={job.get('fingerprint') or '-'}")
    if job.get("error"):
        summary += f"  error: {job['error']}"
    busy = [counter_delta(tel, before, [c], "busy_s") for c in constructors if c in tel]
    busiest = _rate(100.0 * max(busy), ok_dt) if busy else None  # heartbeats lag the snapshot: capped at 100
    rates = Rates(batches=_rate(counter_delta(tel, before, constructors, "batches_sent"), ok_dt),
                  units=_rate(counter_delta(tel, before, [r["id"] for r in loaders], "units"), ok_dt),
                  tokens=_rate(counter_delta(tel, before, constructors, "tokens_sent"), ok_dt),
                  constructor_busy_pct=None if busiest is None else min(100.0, busiest))
    balance = list((job.get("planning") or {}).get("balance", []))
    return JobView(name=name, summary=summary, pools=pools, trainers=trainers[:TRAINER_ROWS],
                   trainers_hidden=max(0, len(trainers) - TRAINER_ROWS), floor=int(job.get("progress_floor") or 0),
                   balance=balance, rates=rates)


# ------------------------------------------------------------------------------ rendering


def _clock(t: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t))


def _num(x: float | None, fmt: str = "{:,.1f}") -> str:
    return "-" if x is None else fmt.format(x)


def _header(snapshot: Snapshot, shown: Snapshot | None) -> RenderableType:
    lines: list[RenderableType] = []
    if snapshot.status is None:
        since = snapshot.unreachable_since if snapshot.unreachable_since is not None else snapshot.at
        lines.append(Text(f"unreachable since {_clock(since)} ({snapshot.at - since:.0f}s): {snapshot.error}",
                          style="bold red"))
        if shown is not None:
            lines.append(Text(f"showing the last answer, from {_clock(shown.at)}", style="yellow"))
    status = shown.status if shown is not None else None
    if status is not None:
        leader = status.get("leader") or "-"
        t = Text()
        t.append("leader ", style="bold")
        t.append(leader, style="bold green" if status.get("leader") else "bold red")
        t.append("  term ", style="bold")
        t.append(str(status.get("term")), style="bold")
        t.append(f"   answered by {status.get('node')} ({status.get('endpoint')}, fabricd {status.get('version')})"
                 f"   {_clock(shown.at)}")
        lines.append(t)
        degraded = status.get("cluster", {}).get("degraded")
        if degraded:
            lines.append(Text(f"DEGRADED: {degraded}", style="bold red"))
    return Group(*lines)


def _members_table(status: dict[str, Any]) -> Table:
    table = Table(title="members", title_justify="left", expand=False, box=box.SIMPLE_HEAD, show_edge=False)
    for col, justify in (("node", "left"), ("state", "left"), ("cpu %", "right"), ("mem %", "right"),
                         ("mem free MB", "right"), ("roles", "right"), ("beat", "right")):
        table.add_column(col, justify=justify)
    leader = status.get("leader")
    for node, m in sorted(status.get("cluster", {}).get("members", {}).items()):
        t = status.get("telemetry", {}) if node == status.get("node") else (m.get("telemetry") or {})
        beat = "-" if m.get("last_beat_s_ago") is None else f"{m['last_beat_s_ago']:.1f}s ago"
        state = ("alive" if m.get("alive") else "DEAD") + (" leader" if node == leader else "")
        table.add_row(node, Text(state, style="green" if m.get("alive") else "bold red"),
                      _num(t.get("cpu_percent"), "{:.0f}"), _num(t.get("mem_used_percent"), "{:.0f}"),
                      _num(t.get("mem_available_mb"), "{:,.0f}"), str(t.get("roles", "-")), beat)
    return table


def _job_tables(view: JobView) -> RenderableType:
    parts: list[RenderableType] = [Text.assemble((f"job {view.name}", "bold cyan"), f"  {view.summary}")]
    r = view.rates
    busy = r.constructor_busy_pct
    parts.append(Text.assemble(f"  rates: {_num(r.batches)} batches/s  {_num(r.units)} units/s  "
                               f"{_num(r.tokens, '{:,.0f}')} tokens/s  busiest constructor ",
                               (f"{_num(busy, '{:.0f}')}% busy", "bold red" if busy is not None and busy >= 90 else "")))
    pools = Table(title="pools", title_justify="left", box=box.SIMPLE_HEAD, show_edge=False)
    for col in ("source", "workers", "queue", "units", "units/s"):
        pools.add_column(col, justify="left" if col == "source" else "right")
    for p in view.pools:
        pools.add_row(p.source, Text(f"{p.up}/{p.workers}", style="" if p.up == p.workers else "bold red"),
                      str(p.queue), f"{p.units:,}", _num(p.units_per_s))
    trainers = Table(title=f"trainers (all at step >= {view.floor})", title_justify="left", box=box.SIMPLE_HEAD, show_edge=False)
    for col in ("dp/mp", "step", "data wait s", "wait %"):
        trainers.add_column(col, justify="left" if col == "dp/mp" else "right")
    for t in view.trainers:
        trainers.add_row(t.rank, str(t.step), f"{t.wait_s:.1f}", _num(t.wait_pct, "{:.0f}"))
    if view.trainers_hidden:
        trainers.add_row(f"+{view.trainers_hidden} more", "", "", "")
    if not view.trainers:
        trainers.add_row("none subscribed", "", "", "")
    balance = Table(title="balance (cost per rank)", title_justify="left", box=box.SIMPLE_HEAD, show_edge=False)
    for col in ("step", "max/mean", "bound"):
        balance.add_column(col, justify="right")
    for b in view.balance[-BALANCE_ROWS:]:
        balance.add_row(str(b["step"]), f"{b['max_over_mean']:.3f}", f"{b['bound']:.3f}")
    if not view.balance:
        balance.add_row("-", "-", "-")
    parts.append(Columns([pools, trainers, balance], padding=(0, 3)))  # side by side when they fit
    return Group(*parts)


def render(snapshot: Snapshot, previous: Snapshot | None) -> RenderableType:
    """The frame for ``snapshot``, with rates against ``previous`` (the last poll the daemon
    answered before it; None for the first). When ``snapshot`` has no status (the daemon did
    not answer), the frame says since when, over the content of ``previous``. A status document
    it cannot read (another version's, a broken one) is a frame saying so, never a crash."""
    try:
        return _render(snapshot, previous)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        return Group(Text(f"cannot show the status document polled at {_clock(snapshot.at)}: "
                          f"{type(e).__name__}: {e}", style="bold red"), _footer())


def _render(snapshot: Snapshot, previous: Snapshot | None) -> RenderableType:
    shown = snapshot if snapshot.status is not None else (previous if previous and previous.status else None)
    parts: list[RenderableType] = [_header(snapshot, shown)]
    if shown is None or shown.status is None:
        parts.append(Text("no status yet", style="dim"))
        return Group(*parts, _footer())
    status = shown.status
    parts.append(_members_table(status))
    tel = role_telemetry(status)
    comparable = snapshot.status is not None and previous is not None and previous.status is not None
    prev_tel = role_telemetry(previous.status) if comparable else None
    dt = (snapshot.at - previous.at) if comparable else None
    jobs = status.get("jobs", {})
    for name in sorted(jobs):
        parts.append(_job_tables(job_view(name, jobs[name], tel, prev_tel, dt)))
    if not jobs:
        parts.append(Text("no jobs", style="dim"))
    return Group(*parts, _footer())


def _footer() -> Text:
    return Text("q: quit", style="dim")


# ------------------------------------------------------------------------------ the loop


def poll_snapshot(fetch: Callable[[], dict[str, Any]], last: Snapshot | None,
                  errors: tuple[type[BaseException], ...], clock: Callable[[], float] = time.time) -> Snapshot:
    """One poll: ``fetch()``'s status, or (on one of ``errors``) a snapshot saying since when
    the daemon has not answered."""
    try:
        status = fetch()
    except errors as e:
        now = clock()
        since = last.unreachable_since if last is not None and last.unreachable_since is not None else now
        return Snapshot(at=now, error=str(e), unreachable_since=since)
    return Snapshot(at=clock(), status=status)


@contextlib.contextmanager
def _keys() -> Iterator[Callable[[float], str]]:
    """``read(timeout)``: one key pressed within ``timeout`` seconds ("" if none). The terminal
    is in cbreak mode meanwhile (keys arrive unbuffered; Ctrl-C still interrupts) and restored
    on exit, whatever happens. Without a terminal on stdin: just waits."""
    fd = sys.stdin.fileno() if sys.stdin is not None and sys.stdin.isatty() else None
    if fd is None:
        yield lambda timeout: (time.sleep(max(0.0, timeout)), "")[1]
        return
    import termios
    import tty

    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)

        def read(timeout: float) -> str:
            ready, _, _ = select.select([fd], [], [], max(0.0, timeout))
            return os.read(fd, 32).decode(errors="replace") if ready else ""

        yield read
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def run_top(fetch: Callable[[], dict[str, Any]], errors: tuple[type[BaseException], ...], *, interval: float,
            once: bool = False, console: Console | None = None) -> int:
    """Poll with ``fetch`` every ``interval`` seconds and redraw until q or Ctrl-C (exit status
    0; the terminal is restored). ``once``: print one frame (rates over one interval: two polls)
    and return 1 when the daemon did not answer, else 0."""
    console = console or Console()
    last: Snapshot | None = None  # the newest poll
    good: Snapshot | None = None  # the newest poll the daemon answered: shown while it does not, and rated against
    try:
        if once:
            first = poll_snapshot(fetch, None, errors)
            time.sleep(interval)
            last = poll_snapshot(fetch, first, errors)
            console.print(render(last, first if first.status is not None else None))
            return 0 if last.status is not None else 1
        with _keys() as read_key, Live(console=console, screen=True, auto_refresh=False,
                                        redirect_stdout=False, redirect_stderr=False) as live:
            while True:
                last = poll_snapshot(fetch, last, errors)
                live.update(render(last, good), refresh=True)
                if last.status is not None:
                    good = last
                deadline = time.monotonic() + interval
                while (left := deadline - time.monotonic()) > 0:
                    if "q" in read_key(left).lower():
                        return 0
    except KeyboardInterrupt:  # the view's way out (like q); a script's --once was interrupted
        return 130 if once else 0

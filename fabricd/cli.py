"""Command lines: ``fabricd run`` (the daemon) and ``fabricctl`` (talk to one, or compute offline)."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from collections import Counter
from pathlib import Path

import click

from fabric_client import protocol
from fabric_client.errors import FabricError
from fabric_client.keys import KINDS, ClientKeys, KeysError, generate, list_keys

from .config import NodeConfig, describe_defaults, load_job_spec, load_node_config
from .node_checks import check_node_environment
from .ctl import request_any
from .errors import FabricdError
from .failpoints import arm_on_signal

__all__ = ["fabricd_main", "fabricctl_main"]

DEFAULT_ADDRESS = "tcp://127.0.0.1:7700"


@click.group()
def fabricd_main() -> None:
    """fabricd: the data-loading fabric daemon."""


@fabricd_main.command("run")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False),
              help="Node config (TOML), e.g. /etc/fabricd/fabricd.toml.")
def run_cmd(config_path: str) -> None:
    """Run the daemon in the foreground, logging to stdout, until SIGTERM or SIGINT.

    Under systemd (``Type=notify``) it reports readiness, status, watchdog pings and stopping on
    ``$NOTIFY_SOCKET``. SIGHUP re-reads the config and applies what can change live (the log
    level; see ``Daemon.service.reload_hooks``). A config or a machine it cannot start with (port
    in use, state dir unusable, term file unreadable) is one line on stderr naming the file, key
    and value, and exit status 1.
    """
    import zmq

    from .daemon import Daemon
    from .sdnotify import SystemdNotifier

    notifier = SystemdNotifier()  # reads and unsets $NOTIFY_SOCKET: role processes must not inherit it
    try:
        cfg = load_node_config(config_path)
        check_node_environment(cfg)
    except FabricdError as e:
        raise click.ClickException(str(e)) from e
    logging.basicConfig(level=cfg.log_level, stream=sys.stdout,
                        format="%(asctime)s %(levelname)s [fabricd pid=%(process)d] %(name)s: %(message)s")
    os.environ.setdefault("FABRICD_LOG_LEVEL", cfg.log_level)
    try:
        daemon = Daemon(cfg, notifier)
    except zmq.ZMQError as e:  # the control bind, or a peer endpoint ZeroMQ refuses
        raise click.ClickException(f"{cfg.file}: node.control = {cfg.control!r}: cannot bind: {e.strerror}") from e
    except FabricdError as e:  # the term store or the checkpoint log cannot be read
        raise click.ClickException(f"cannot start: {e}") from e
    except KeysError as e:  # a key of [security] keys_dir is missing or malformed
        raise click.ClickException(f"{cfg.file}: security.keys_dir = {str(cfg.security.keys_dir)!r}: {e} "
                                   "(make keys with `fabricctl keys generate`, or set insecure = true)") from e
    except OSError as e:  # the state dir filled up or changed under us since the check
        raise click.ClickException(f"{cfg.file}: node.state_dir = {str(cfg.state_dir)!r}: cannot start: {e}") from e
    arm_on_signal()
    signal.signal(signal.SIGTERM, lambda *_: daemon.stop())
    signal.signal(signal.SIGINT, lambda *_: daemon.stop())
    daemon.service.reload_hooks.append(_apply_log_level)
    signal.signal(signal.SIGHUP, lambda *_: daemon.service.request_reload())
    daemon.serve()


def _apply_log_level(cfg: NodeConfig) -> None:
    """Reload hook: the daemon's log level, and that of the role processes started from now on."""
    root = logging.getLogger()
    if logging.getLevelName(root.level) != cfg.log_level:
        logging.getLogger(__name__).warning("reload: log level %s -> %s", logging.getLevelName(root.level),
                                            cfg.log_level)
        root.setLevel(cfg.log_level)
    os.environ["FABRICD_LOG_LEVEL"] = cfg.log_level


# --------------------------------------------------------------------------------------------


def _address(address: str | None, config: str | None) -> str:
    if address:
        return address
    if config:
        cfg = load_node_config(config)
        if cfg.endpoint_file.exists():
            return cfg.endpoint_file.read_text().strip()
        return cfg.control.replace("0.0.0.0", "127.0.0.1")
    return os.environ.get("FABRICD_ADDRESS", DEFAULT_ADDRESS)


@click.group()
@click.option("--address", envvar="FABRICD_ADDRESS", default=None,
              help=f"Control endpoint(s) of daemons, comma-separated (default {DEFAULT_ADDRESS}, or $FABRICD_ADDRESS).")
@click.option("--config", "config_path", default=None, type=click.Path(dir_okay=False),
              help="Read the daemon's endpoint from this node config instead.")
@click.option("--timeout", default=5.0, show_default=True, help="Seconds to wait for each answer.")
@click.option("--key", "key_file", envvar="FABRICCTL_KEY", default=None, type=click.Path(dir_okay=False),
              help="Operator key file (KEYS/operators/NAME.key_secret; default $FABRICCTL_KEY). The server key is "
                   "KEYS/server.key (or $FABRIC_SERVER_KEY). Without one, requests are plaintext.")
@click.pass_context
def fabricctl_main(ctx: click.Context, address: str | None, config_path: str | None, timeout: float,
                   key_file: str | None) -> None:
    """Control a fabricd daemon, or compute what a job should deliver."""
    ctx.obj = {"address": address, "config": config_path, "timeout": timeout, "key_file": key_file}


def _request(ctx: click.Context, msg: protocol.Message) -> protocol.Message:
    """Ask the daemons of --address (comma-separated) in turn; decisions go to the leader."""
    try:
        keys = ClientKeys.load(ctx.obj["key_file"]) if ctx.obj["key_file"] else None
        return _request_with(ctx, msg, keys, timeout_s=ctx.obj["timeout"])
    except (FabricError, FabricdError, KeysError) as e:
        raise click.ClickException(str(e)) from e


def _request_with(ctx: click.Context, msg: protocol.Message, keys: ClientKeys | None, *,
                  timeout_s: float) -> protocol.Message:
    """``_request`` with the keys already loaded, raising the fabric's errors as they are (the
    address is resolved again each time: a restarted daemon may have written a new endpoint)."""
    addresses = _address(ctx.obj["address"], ctx.obj["config"]).split(",")
    return request_any(addresses, msg, timeout_s=timeout_s, keys=keys,
                       leader_only=isinstance(msg, (protocol.SubmitJob, protocol.CancelJob, protocol.PlanUpdate)))


@fabricctl_main.command("submit")
@click.argument("job_file", type=click.Path(exists=True, dir_okay=False))
@click.option("--wait/--no-wait", default=False, help="Wait until the job serves trainers.")
@click.option("--wait-timeout", default=600.0, show_default=True, help="Seconds --wait waits at most.")
@click.pass_context
def submit_cmd(ctx: click.Context, job_file: str, wait: bool, wait_timeout: float) -> None:
    """Validate JOB_FILE here, then submit it to the daemon."""
    try:
        spec = load_job_spec(job_file)
    except FabricdError as e:
        raise click.ClickException(str(e)) from e
    if spec.defaults_applied:
        click.echo(describe_defaults(spec), err=True)
    reply = _request(ctx, protocol.SubmitJob(spec_toml=Path(job_file).read_text(encoding="utf-8"),
                                             spec_path=spec.file))
    click.echo(f"job {reply.job}: {reply.state}")
    if not wait:
        click.echo(f"accepted; its sources are indexed now. Follow it with `fabricctl status` "
                   f"or wait for it with `fabricctl submit --wait {job_file}`.", err=True)
        return
    deadline = time.monotonic() + wait_timeout
    last = None
    while time.monotonic() < deadline:
        status = _request(ctx, protocol.StatusRequest()).status
        job = status["jobs"].get(spec.name, {})
        state = job.get("state")
        if state != last:
            click.echo(f"job {spec.name}: {state}", err=True)
            last = state
        if job.get("serving"):
            click.echo(f"job {spec.name}: serving (fingerprint {job['fingerprint']})")
            return
        if state == "failed":
            raise click.ClickException(f"job {spec.name} failed: {job.get('error')}")
        time.sleep(0.3)
    raise click.ClickException(f"job {spec.name} not ready after {wait_timeout:.0f}s (state {last})")


@fabricctl_main.command("cancel")
@click.argument("job")
@click.pass_context
def cancel_cmd(ctx: click.Context, job: str) -> None:
    """Stop a job's roles and forget it."""
    _request(ctx, protocol.CancelJob(job=job))
    click.echo(f"job {job}: cancelled")


@fabricctl_main.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print the raw status document.")
@click.pass_context
def status_cmd(ctx: click.Context, as_json: bool) -> None:
    """Show the daemon, its jobs, their roles and counters."""
    status = _request(ctx, protocol.StatusRequest()).status
    if as_json:
        click.echo(json.dumps(status, indent=2, sort_keys=True))
        return
    tel = status["telemetry"]
    cluster = status["cluster"]
    click.echo(f"node {status['node']} (fabricd {status['version']}, pid {status['pid']}) on {status['endpoint']}, "
               f"up {status['uptime_s']:.0f}s, cpu {tel['cpu_percent']:.0f}%, mem {tel['mem_used_percent']:.0f}%")
    log_pos = cluster["log"]
    click.echo(f"leader {status['leader'] or '-'} term {status['term']}"
               f"{' (this node)' if status['is_leader'] else ''}; log at {log_pos['last']}, committed "
               f"{log_pos['commit_seq']}; malformed dropped {status['counters']['malformed_dropped']}")
    if cluster.get("degraded"):
        click.echo(f"DEGRADED: {cluster['degraded']} (this daemon follows but cannot vote or lead)")
    sec = status.get("security", {})
    if sec.get("insecure"):
        click.echo(f"INSECURE: {sec['warning']}")
    elif sec:
        click.echo(f"security: CurveZMQ, keys {sec['keys']} in {sec['keys_dir']}; "
                   f"refused handshakes {sec['refused_handshakes']}")
    if sec.get("local_ipc"):
        shared = sec.get("trainer_ipc")
        click.echo(f"same-node links: Unix sockets in {sec['local_ipc']} (plaintext; this user only)"
                   + (f"; trainers of group {shared['group']}: {shared['dir']}" if shared else ""))
    if status.get("planner", "c") != "c":
        click.echo(f"planner: {status['planner']}")
    met = status.get("metrics") or {}
    if met.get("url") or met.get("error"):
        click.echo(f"metrics: {met['url'] or 'NOT SERVED: ' + met['error']}")
    replicas = cluster.get("replicas", {})
    for node, m in cluster["members"].items():
        t = m.get("telemetry") or {}
        seen = "" if m["last_beat_s_ago"] is None else f", beat {m['last_beat_s_ago']}s ago"
        repl = f", replica at {replicas[node]}" if node in replicas else ""
        click.echo(f"  member {node:<12} {'alive' if m['alive'] else 'DEAD '} cpu {t.get('cpu_percent', '-')}% "
                   f"roles {t.get('roles', '-')}{seen}{repl}")
    for name, job in status["jobs"].items():
        topo = job["topology"]
        click.echo(f"job {name}: {job['state']}{', serving' if job.get('serving') else ''}  dp={topo['dp_size']} "
                   f"mp={topo['mp_size']} constructors={topo['constructors']}  fingerprint={job['fingerprint'] or '-'}")
        if job["error"]:
            click.echo(f"  error: {job['error']}")
        if job.get("tokenizer"):
            click.echo(f"  tokenizer {job['tokenizer']}, images {job.get('images')}")
        if job.get("defaults_applied"):
            click.echo(f"  defaults applied: {', '.join(job['defaults_applied'])}")
        comp = job.get("composition")
        if comp:
            sizes = ", ".join(f"dp {dp} from step {start}" for start, dp in comp["dp_history"])
            click.echo(f"  composition {comp['mode']}: max delay {comp['max_delay_steps']} steps, "
                       f"{comp['samples_per_step'] if comp['samples_per_step'] is not None else '-'} units/step, {sizes}")
        for change in job.get("plan_changes", ()):
            click.echo(f"  plan change {change['change']} (term {change['term']})")
        c = job["counters"]
        click.echo(f"  plans {c['plans_computed']} (max {c['plan_ms_max']} ms), skipped units {c['skipped_units']} "
                   f"(recorded {job['skipped_recorded']})")
        for src, info in job["sources"].items():
            what = (f" ({info['format']}: {info['tokens']} text tokens, {info['images']} images)"
                    if "format" in info else "")
            click.echo(f"  source {src}: {info['samples']} samples{what}, {info['files_skipped']} files and "
                       f"{info['rows_skipped']} rows skipped at indexing")
            for reason in info.get("files_skipped_reasons", ()):
                click.echo(f"    skipped {reason}")
        for role in job["roles"]:
            stats = role.get("stats", {})
            extra = ", ".join(f"{k}={stats[k]}" for k in ("units", "built_batches", "sent") if k in stats)
            local = f"pid={role['pid']} restarts={role['restarts']} rss={role.get('rss_mb', '-')}MB " if "pid" in role else ""
            click.echo(f"  {role['id']:<34} on {role['node']:<10} {'up  ' if role['alive'] else 'DOWN'} {local}{extra}")
        pools = Counter(r["source"] for r in job["roles"] if r["kind"] == "source_loader")
        pools_up = Counter(r["source"] for r in job["roles"] if r["kind"] == "source_loader" and r["alive"])
        if pools:
            click.echo("  pools (up/size): " + ", ".join(f"{s} {pools_up[s]}/{n}" for s, n in sorted(pools.items())))
        if job.get("trainer_hosts"):
            hosts = sorted((k, v[0]) for k, v in job["trainer_hosts"].items())
            click.echo("  trainer hosts (dp/mp: host): " + ", ".join(f"{k}: {h}" for k, h in hosts[:16])
                       + (" ..." if len(hosts) > 16 else ""))
        if job.get("progress_floor") or job["progress"]:
            steps = sorted(job["progress"].items())
            click.echo(f"  trainer progress: every rank at step {job.get('progress_floor', 0)} or later"
                       + ("; ahead (dp/mp: next step): " + ", ".join(f"{k}: {v}" for k, v in steps[:16])
                          + (" ..." if len(steps) > 16 else "") if steps else ""))


@fabricctl_main.command("top")
@click.option("--interval", default=1.0, show_default=True, type=click.FloatRange(min=0.1),
              help="Seconds between refreshes.")
@click.option("--once", is_flag=True, help="Print one frame (rates over one interval) and exit; "
                                           "exit status 1 when no daemon answered.")
@click.pass_context
def top_cmd(ctx: click.Context, interval: float, once: bool) -> None:
    """A live view of the fabric: leader and term, members, and per job its pools, trainers,
    balance and rates. q or Ctrl-C quits. A daemon that stops answering is shown as
    "unreachable since ..." until it answers again."""
    from .top import run_top

    try:
        keys = ClientKeys.load(ctx.obj["key_file"]) if ctx.obj["key_file"] else None
    except KeysError as e:
        raise click.ClickException(str(e)) from e
    # a poll that waits long holds up the keys (q): at most a couple of intervals, or --timeout
    timeout_s = min(ctx.obj["timeout"], max(1.0, 2 * interval))
    fetch = lambda: _request_with(ctx, protocol.StatusRequest(), keys, timeout_s=timeout_s).status  # noqa: E731
    ctx.exit(run_top(fetch, (FabricError, FabricdError, KeysError, OSError), interval=interval, once=once))


@fabricctl_main.command("dev-cluster")
@click.option("--nodes", default=3, show_default=True, help="Daemons to start.")
@click.option("--dir", "workdir", default=".fabricd-dev", show_default=True, type=click.Path(file_okay=False),
              help="Configs, state and logs of the daemons.")
@click.option("--loader-workers", default=2, show_default=True, help="Source-loader workers per source.")
@click.option("--data-root", "data_roots", multiple=True, type=click.Path(file_okay=False),
              help="A directory jobs may read data from (repeatable). Default: the current directory.")
def dev_cluster_cmd(nodes: int, workdir: str, loader_workers: int, data_roots: tuple[str, ...]) -> None:
    """Run a local fabric of NODES daemons on 127.0.0.1 until Ctrl-C (for trying things)."""
    from .localnode import LocalCluster

    roots = [Path(p).absolute() for p in data_roots] or [Path.cwd()]
    cluster = LocalCluster(workdir, nodes=nodes, loader_workers=loader_workers, data_roots=roots)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    try:
        cluster.start()
        addresses = ",".join(cluster.addresses)
        click.echo(f"{nodes} daemons up; leader {cluster.leader()}; logs under {Path(workdir).absolute()}/*/fabricd.log")
        click.echo(f"  jobs may read data below: {', '.join(map(str, roots))} (--data-root to change)")
        click.echo(f"  export FABRICD_ADDRESS={addresses}")
        for var, value in cluster.client_env().items():  # the local trainer's and operator's keys
            click.echo(f"  export {var}={value}")
        click.echo("  fabricctl submit config/jobs/demo.toml --wait; fabricctl status   (Ctrl-C stops the cluster)")
        while not stop:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
        click.echo("stopped")


@fabricctl_main.group("keys")
def keys_group() -> None:
    """CurveZMQ keys: who may talk to the fabric (see fabric_client.keys)."""


@keys_group.command("generate")
@click.argument("kind", type=click.Choice(["server", *KINDS]))
@click.argument("names", nargs=-1)
@click.option("--dir", "keys_dir", default="/etc/fabricd/keys", show_default=True,
              type=click.Path(file_okay=False), help="The keys directory.")
def keys_generate_cmd(kind: str, names: tuple[str, ...], keys_dir: str) -> None:
    """Make key pairs: `server` (once per fabric), or `node ID...`, `trainer NAME...`,
    `operator NAME...`. Secret files are mode 0600; nothing is overwritten. Copy the directory to
    every node (the secrets of trainers and operators only to them), then reload the daemons'
    allow-lists with SIGHUP (`systemctl reload fabricd`)."""
    if kind == "server":
        names = names or ("server",)
    elif not names:
        raise click.UsageError(f"name the {kind} key(s) to make")
    for name in names:
        try:
            public, secret = generate(keys_dir, kind, name)
        except KeysError as e:
            raise click.ClickException(str(e)) from e
        click.echo(f"{kind} {name}: {public} (public), {secret} (secret, 0600)")


@keys_group.command("list")
@click.option("--dir", "keys_dir", default="/etc/fabricd/keys", show_default=True,
              type=click.Path(file_okay=False, exists=True), help="The keys directory.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per key.")
def keys_list_cmd(keys_dir: str, as_json: bool) -> None:
    """Every key of a keys directory: kind, name, public key, and whether its secret is here."""
    try:
        keys = list_keys(keys_dir)
    except KeysError as e:
        raise click.ClickException(str(e)) from e
    for k in keys:
        click.echo(json.dumps(k) if as_json else f"{k['kind']:9} {k['name']:24} {k['public_key']}  secret: {k['secret']}")
    if not keys and not as_json:
        click.echo(f"no keys in {keys_dir} (make them with `fabricctl keys generate`)")


@fabricctl_main.command("expect")
@click.argument("job_file", type=click.Path(exists=True, dir_okay=False))
@click.option("--steps", default="0:10", show_default=True, help="Step range START:STOP (STOP excluded).")
@click.option("--dp-size", type=int, default=None, help="DP world size (default: the spec's).")
@click.option("--log", "logs", multiple=True, type=click.Path(exists=True, file_okay=False),
              help="Checkpoint-log directory (a stopped daemon's STATE_DIR/log, or a copy) whose skip records "
                   "and plan changes apply (and, under compose = 'outliers', its DP-size changes); repeat it to use the "
                   "most up-to-date of several. Without it: no skip records, no plan changes.")
def expect_cmd(job_file: str, steps: str, dp_size: int | None, logs: tuple[str, ...]) -> None:
    """Print the expected batches of JOB_FILE (one JSON object per micro-batch), computed offline
    from the spec and the log's skip records."""
    from .expect import expected_batches, log_dp_history, log_plan_changes, log_skips, newest_log_state

    try:
        start, stop = (int(x) for x in steps.split(":"))
    except ValueError as e:
        raise click.BadParameter(f"{steps!r} is not START:STOP", param_hint="--steps") from e
    try:
        spec = load_job_spec(job_file)
        state = newest_log_state([Path(p) for p in logs]) if logs else None
        skips = log_skips(state, spec.name) if state is not None else set()
        history = log_dp_history(state, spec.name) if state is not None else ()
        changes = log_plan_changes(state, spec.name) if state is not None else ()
        for batch in expected_batches(spec, range(start, stop), dp_size=dp_size, progress=sys.stderr.isatty(),
                                      skips=skips, dp_history=history, plan_changes=changes):
            click.echo(json.dumps(batch.to_dict()))
    except FabricdError as e:
        raise click.ClickException(str(e)) from e



@fabricctl_main.group("plan")
def plan_group() -> None:
    """Change a running job's plan from a future step, or preview its steps."""


def _steps(steps: str) -> range:
    try:
        start, stop = (int(x) for x in steps.split(":"))
    except ValueError as e:
        raise click.BadParameter(f"{steps!r} is not START:STOP", param_hint="--steps") from e
    if not 0 <= start < stop or stop - start > MAX_SHOW_STEPS:
        raise click.BadParameter(f"{steps!r}: need 0 <= START < STOP, at most {MAX_SHOW_STEPS} steps", param_hint="--steps")
    return range(start, stop)


#: Most steps ``plan show`` plans at once (each is a full plan of the step, computed here).
MAX_SHOW_STEPS = 4096

_SET_HELP = ("PATH=VALUE, repeatable: mixture.weights.SOURCE=SHARE (a fraction of the mix; the other sources share "
             "the rest as they did), mixture.kind=constant|piecewise|linear, buckets.NAME.max_seq_len=L, "
             "buckets.NAME.long_samples=split|truncate.")
_POINT_HELP = "A mixture point to add at or after --at-step, repeatable: 'step=S,weights={a=1,b=3}'."


@plan_group.command("update")
@click.argument("job")
@click.option("--at-step", "at_step", type=int, required=True, help="The step the change takes effect at, for every rank.")
@click.option("--set", "sets", multiple=True, help=_SET_HELP)
@click.option("--add-point", "points", multiple=True, help=_POINT_HELP)
@click.pass_context
def plan_update_cmd(ctx: click.Context, job: str, at_step: int, sets: tuple[str, ...], points: tuple[str, ...]) -> None:
    """Change JOB's plan from step --at-step on (recorded in the log; refused for a step already
    planned or delivered, naming the first step still changeable). Preview it first with
    `fabricctl plan show JOB --steps A:B --at-step N --set ...`."""
    from .plan_changes import make_change

    try:
        make_change(job, at_step, sets, points)  # a typo is refused here, before asking the leader
    except FabricdError as e:
        raise click.ClickException(str(e)) from e
    reply = _request(ctx, protocol.PlanUpdate(job=job, at_step=at_step, sets=list(sets), points=list(points)))
    click.echo(f"job {reply.job}: plan change recorded (log seq {reply.seq}, term {reply.term}): {reply.change}")
    click.echo(f"  in effect from step {reply.at_step} for every rank; the first step still changeable is now "
               f"{reply.frontier}", err=True)


@plan_group.command("show")
@click.argument("job")
@click.option("--steps", default="0:10", show_default=True, help="Step range START:STOP (STOP excluded).")
@click.option("--dp-size", type=int, default=None, help="DP world size (default: the job's).")
@click.option("--at-step", "at_step", type=int, default=None, help="Preview a change from this step (not applied).")
@click.option("--set", "sets", multiple=True, help="With --at-step: " + _SET_HELP)
@click.option("--add-point", "points", multiple=True, help="With --at-step: " + _POINT_HELP)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per step.")
@click.pass_context
def plan_show_cmd(ctx: click.Context, job: str, steps: str, dp_size: int | None, at_step: int | None,
                  sets: tuple[str, ...], points: tuple[str, ...], as_json: bool) -> None:
    """Dry run: JOB's predicted per-source mix, tokens and balance (max/mean and its lower bound)
    over --steps, under the plan in effect (the spec and the log's changes), computed here from
    the sources' indexes. With --at-step and --set/--add-point: as it would be with that change."""
    import msgspec

    from .cluster.records import PlanChange
    from .config import parse_job_spec
    from .job import build_planner, open_sources
    from .plan_changes import describe_change, make_change
    from .plan_preview import format_summaries, summarize

    if (sets or points) and at_step is None:
        raise click.UsageError("--set and --add-point preview a change: give its --at-step too")
    window = _steps(steps)
    reply = _request(ctx, protocol.PlanShowRequest(job=job))
    try:
        spec = parse_job_spec(reply.spec_toml, reply.spec_origin)
        changes = [msgspec.convert(c, PlanChange) for c in reply.changes]
        preview = [make_change(job, at_step, sets, points, origin="preview")] if at_step is not None else []
        if preview and at_step < reply.frontier:
            click.echo(f"note: step {at_step} is before the first step still changeable ({reply.frontier}); "
                       "`plan update` would refuse it", err=True)
        planner = build_planner(spec, open_sources(spec, progress=sys.stderr.isatty()),
                                [tuple(x) for x in reply.dp_history], [*changes, *preview])
        names = [s.name for s in planner.sources]
        rows = [summarize(planner.plan(s, dp_size or spec.topology.dp_size), names) for s in window]
    except FabricdError as e:
        raise click.ClickException(str(e)) from e
    if as_json:
        for r in rows:
            click.echo(json.dumps(r.to_dict()))
        return
    click.echo(f"job {job}: {len(changes)} logged plan change(s)"
               + "".join(f"\n  {describe_change(c)}" for c in changes)
               + f"\n  first step still changeable: {reply.frontier}")
    if preview:
        click.echo(f"PREVIEW (not applied): {describe_change(preview[0])}")
    for line in format_summaries(rows):
        click.echo(line)

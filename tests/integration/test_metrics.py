"""The Prometheus endpoint of a real daemon: scraped while a small job runs, parsed with
prometheus_client's own parser, compared with what the trainers received and with the status
document; and the endpoint's own life (port 0, off, a busy port, closed at shutdown)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fabric_client import Loader
from fabricd.config import MetricsConfig
from fabricd.job import PLAN_CACHE_BYTES
from fabricd.metrics import CATALOGUE, COUNTER, FabricMetrics, MetricsServer

from ..conftest import keyed_dealer, write_job
from .test_data_path import submit

pytestmark = [pytest.mark.integration]

STEPS = 4


def scrape(url: str) -> dict[str, dict[tuple, float]]:
    """family name → {sorted label items: value} of one scrape (counters by their sample name)."""
    with urllib.request.urlopen(url, timeout=5) as reply:
        assert reply.headers["Content-Type"].startswith("text/plain")
        text = reply.read().decode()
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        samples = out.setdefault(family.name, {})
        for s in family.samples:
            if s.name.endswith("_created"):
                continue
            samples[tuple(sorted(s.labels.items()))] = s.value
    return out


def value(metrics: dict, name: str, **labels: str) -> float:
    return metrics[name][tuple(sorted(labels.items()))]


def consume(address: str, dp_rank: int, dp_size: int) -> tuple[int, int, float]:
    """Pull STEPS steps as one trainer: (batches, units received, the loader's own data wait)."""
    batches = units = 0
    with Loader(address, job="t", dp_rank=dp_rank, dp_size=dp_size, max_steps=STEPS, deadline_s=60.0) as loader:
        for batch in loader:
            batches += 1
            units += len(batch["sample_ids"])
        return batches, units, loader.stats["wait_s"]


@pytest.mark.timeout(180)
def test_scrape_of_a_daemon_serving_a_job(tmp_path, tiny_corpus, local_daemon):
    job_file = write_job(tmp_path / "job.toml", tiny_corpus, dp_size=2)
    submitted = time.monotonic()
    submit(local_daemon, job_file)
    got = {d: consume(local_daemon.address, d, 2) for d in range(2)}
    sock = keyed_dealer("node", "test")  # two malformed messages: dropped, counted per reason
    sock.connect(local_daemon.address)
    for _ in range(2):
        sock.send_multipart([b"\x00\xff garbage"])
        assert sock.poll(5000)
        sock.recv_multipart()
    sock.close()

    url = local_daemon.metrics_url()
    assert url and url.startswith("http://127.0.0.1:")
    status = local_daemon.status()
    assert status["metrics"] == {"url": url, "error": None}
    trainers = {d: f"dp{d}/mp0" for d in got}
    deadline = time.monotonic() + 20
    while True:  # role counters arrive with heartbeats; the snapshot is refreshed every second
        m = scrape(url)
        delivered = {d: m["fabricd_trainer_batches_delivered"].get(
            (("job", "t"), ("trainer", t)), 0) for d, t in trainers.items()}
        dropped = m["fabricd_dropped_messages"].get((("reason", "malformed"), ("socket", "control")), 0)
        if all(delivered[d] >= got[d][0] for d in got) and dropped >= 2:
            break
        assert time.monotonic() < deadline, f"metrics never caught up: {delivered} {dropped} {got}"
        time.sleep(0.2)

    # every declared family is exported, and nothing else under the fabricd_ prefix
    names = {spec.name for spec in CATALOGUE}
    assert names <= set(m), names - set(m)
    assert {n for n in m if n.startswith("fabricd_")} == names
    assert value(m, "fabricd_node_info", node="test", version=status["version"]) == 1
    assert m["process_resident_memory_bytes"][()] > 0  # the registry's process collector

    # trainers: at least the batches they consumed; their data wait as the loaders measured it
    for d, (batches, _units, wait_s) in got.items():
        assert batches >= STEPS
        assert delivered[d] >= batches
        waited = value(m, "fabricd_trainer_data_wait_seconds", job="t", trainer=trainers[d])
        assert 0 < waited <= wait_s + 1e-6, (waited, wait_s)

    # sources: every unit a trainer received was loaded by a source loader of this daemon
    loaded = m["fabricd_source_units_loaded"]
    assert sum(loaded.values()) >= sum(u for _, u, _ in got.values())
    assert {dict(k)["source"] for k in loaded} == {s["name"] for s in _sources(job_file)}
    for key in m["fabricd_source_load_requests_queued"]:
        assert m["fabricd_source_load_requests_queued"][key] >= 0
        assert m["fabricd_source_load_requests_in_flight"][key] >= 0

    # roles and pools match the status document
    job = status["jobs"]["t"]
    kinds = Counter(r["kind"] for r in job["roles"])
    for kind, n in kinds.items():
        assert value(m, "fabricd_roles", job="t", kind=kind) == n
    for source in {r["source"] for r in job["roles"] if r["kind"] == "source_loader"}:
        workers = sum(1 for r in job["roles"] if r["kind"] == "source_loader" and r["source"] == source)
        assert value(m, "fabricd_pool_workers", job="t", source=source) == workers
        assert value(m, "fabricd_pool_target_workers", job="t", source=source) == \
            job["pool_sizes"].get(source, workers)
    for r in job["roles"]:
        labels = {"job": "t", "role": r["id"], "kind": r["kind"]}
        assert value(m, "fabricd_role_up", **labels) == 1
        assert value(m, "fabricd_role_resident_memory_bytes", **labels) > 1 << 20
        # forked from the role template: its share of shared pages counts once over the processes
        assert 0 < value(m, "fabricd_role_proportional_memory_bytes", **labels) \
            <= value(m, "fabricd_role_resident_memory_bytes", **labels)
        assert value(m, "fabricd_role_cpu_seconds", **labels) > 0
        if r["kind"] == "constructor":  # its loop's time not waiting on its sockets: some, far from all of it
            busy = value(m, "fabricd_constructor_busy_seconds", job="t", role=r["id"])
            assert 0 < busy < 0.5 * (time.monotonic() - submitted), busy
    assert value(m, "fabricd_role_cpu_seconds", job="", role="daemon", kind="daemon") > 0

    # lease, log, planning
    assert value(m, "fabricd_lease_term") >= 1 and value(m, "fabricd_lease_term") == status["term"]
    assert value(m, "fabricd_is_leader") == 1 and value(m, "fabricd_in_touch") == 1
    assert value(m, "fabricd_leader_changes") >= 1
    assert value(m, "fabricd_lease_events", event="elections_won") >= 1
    assert value(m, "fabricd_log_last_seq") >= value(m, "fabricd_log_commit_seq") >= 1
    assert value(m, "fabricd_plan_latest_step", job="t") >= STEPS - 1
    ratio, bound = (value(m, "fabricd_plan_balance_max_over_mean", job="t"),
                    value(m, "fabricd_plan_balance_lower_bound", job="t"))
    assert ratio >= bound - 1e-9 and bound >= 1.0
    assert 0 < value(m, "fabricd_plan_cache_bytes", job="t") <= PLAN_CACHE_BYTES  # the plans its constructors asked for
    # the floor counts what constructors sent: a trainer that stops after STEPS may have been sent
    # up to its credits' worth more (write_job's prefetch, 2 batches of one micro-batch each)
    assert value(m, "fabricd_job_progress_floor_step", job="t") <= STEPS + 2

    # messages: the status document reads the same counters
    status = local_daemon.status()
    assert status["dropped"]["malformed"] >= 2
    assert status["counters"]["malformed_dropped"] == sum(status["dropped"].values())
    assert value(m, "fabricd_control_messages") >= 4
    assert m["fabricd_dropped_messages"][(("reason", "malformed"), ("socket", "control"))] <= \
        status["dropped"]["malformed"]

    fabricctl = [sys.executable, "-c", "from fabricd.cli import fabricctl_main; fabricctl_main()"]
    out = subprocess.run([*fabricctl, "--address", local_daemon.address, "status"], capture_output=True, text=True,
                         check=True, timeout=30, env={**os.environ, **local_daemon.client_env()}).stdout
    assert f"metrics: {url}" in out.splitlines()

    # shutdown closes the endpoint
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    local_daemon.stop()
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        urllib.request.urlopen(url, timeout=2)
    assert_released(port)


def assert_released(port: int) -> None:
    """Nothing listens on ``port`` any more (a listener would make the bind fail even with
    SO_REUSEADDR; the scrapes' connections in TIME_WAIT do not)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))


def _sources(job_file) -> list[dict]:
    from fabricd.config import load_job_spec

    return [{"name": s.name} for s in load_job_spec(job_file).sources]


@pytest.mark.timeout(30)
def test_metrics_server_port_zero_off_and_busy(tmp_path):
    metrics = FabricMetrics("n", "0")
    metrics.refresh({})
    endpoint = tmp_path / "metrics.endpoint"
    server = MetricsServer(MetricsConfig(port=0), metrics.registry, endpoint)
    try:
        assert server.error is None and endpoint.read_text().strip() == server.url
        m = scrape(server.url)
        assert {spec.name for spec in CATALOGUE} <= set(m)
        assert all(v == 0 for spec in CATALOGUE if spec.kind == COUNTER for v in m[spec.name].values())
        port = int(server.url.rsplit(":", 1)[1].split("/")[0])
        busy = MetricsServer(MetricsConfig(port=port), metrics.registry, tmp_path / "other.endpoint")
        assert busy.url is None and f"127.0.0.1:{port}" in busy.error
        assert not (tmp_path / "other.endpoint").exists()
    finally:
        server.close()
    assert_released(port)
    off = MetricsServer(MetricsConfig(enabled=False), metrics.registry, endpoint)
    assert off.url is None and off.error is None and not endpoint.exists()
    off.close()


@pytest.mark.timeout(30)
def test_role_cpu_is_measured_between_two_looks_at_one_process_handle(tmp_path):
    """The supervisor keeps one psutil handle per role pid: a fresh handle reads 0 % CPU."""
    from types import SimpleNamespace

    from fabricd.roles.supervisor import RoleProcess, Supervisor

    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        sup = Supervisor(backoff_s=0.1, backoff_max_s=1.0, template=False)
        role = RoleProcess(args=SimpleNamespace(role_id="j/x/0"), proc=busy)
        sup.roles["j/x/0"] = role
        sup.telemetry(role)
        time.sleep(0.5)
        second = sup.telemetry(role)
        assert second["cpu_percent"] > 20 and second["rss_mb"] > 1
        assert sup.process(role) is sup.process(role)
    finally:
        busy.kill()
        busy.wait()
    assert sup.process(role) is None and sup.telemetry(role) == {}

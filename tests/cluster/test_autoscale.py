"""Pools follow demand: loaders slowed by a simulated slow store (a ``sleep`` failpoint in every
load) saturate, the leader grows their pools from the heartbeats' counters, and delivery stays
exact while workers are added.

Marker ``cluster``; bounded (~30 s), runs in CI.
"""

from __future__ import annotations

import threading
import time

import pytest

from fabric_client import Loader

from fabricd.failpoints import ROLE_ENV
from fabricd.localnode import LocalDaemon

from ..conftest import write_job
from ..integration.test_data_path import assert_exact, expected, submit

pytestmark = [pytest.mark.cluster]


@pytest.mark.timeout(240)
def test_saturated_pools_grow_and_delivery_stays_exact(tmp_path, tiny_corpus):
    job_file = write_job(tmp_path / "job.toml", tiny_corpus, dp_size=2, samples_per_step=12, prefetch=4,
                         extra="[autoscale]\nmax_workers = 3\ncpu_guard_percent = 0  # the CI machine may be busy: grow anyway\n")
    env = {ROLE_ENV: "loader.before_load=sleep(60)"}
    with LocalDaemon(tmp_path / "node", node_id="auto", extra_env=env) as daemon:
        submit(daemon, job_file)
        steps = 400  # far more than the test waits for: the trainers are stopped once pools grew
        out, stop = {}, threading.Event()

        def trainer(d):
            records = out.setdefault(d, [])
            with Loader(daemon.address, job="t", dp_rank=d, dp_size=2, max_steps=steps, stall_s=2.0,
                        deadline_s=90) as loader:
                for b in loader:
                    records.append(((b.step, b.dp_rank, b.micro_batch), b.checksum))
                    if stop.is_set():
                        break

        threads = [threading.Thread(target=trainer, args=(d,)) for d in range(2)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        grown = {}
        while time.monotonic() < deadline and not grown:
            job = daemon.status()["jobs"]["t"]
            grown = {s: n for s, n in job["pool_sizes"].items() if n > 1}
            time.sleep(0.5)
        assert grown, f"no pool grew: {daemon.tail(30)}"
        assert max(grown.values()) <= 3
        # the new workers come up and serve (the pools listed in status count live loaders)
        deadline = time.monotonic() + 30
        while True:
            roles = daemon.status()["jobs"]["t"]["roles"]
            live = {s: sum(1 for r in roles if r["id"].startswith(f"t/loader/{s}/") and r["alive"]) for s in grown}
            if all(live[s] >= grown[s] for s in grown):
                break
            assert time.monotonic() < deadline, f"grown pools not running: {live} vs {grown}"
            time.sleep(0.2)
        time.sleep(2.0)  # some delivery with the bigger pools
        stop.set()
        for t in threads:
            t.join(60)
        last = min(max(k[0] for k, *_ in out[d]) for d in range(2))
        want = expected(job_file, range(last))
        for d in range(2):
            assert_exact([r for r in out[d] if r[0][0] < last], want, d)

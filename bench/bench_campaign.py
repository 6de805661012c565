"""The campaign engine's throughput and per-job cost (docs/campaigns.md), on LocalClusters.

Two local clusters are started side by side, one of one worker process and one of two (one
thread each, as `mmud campaign run` starts them), and each worker's job process is started
by a first job before anything is timed.
- `campaign_speedup_2w`: jobs per second with two workers over jobs per second with one, on
  the same CPU-bound jobs (smoke kind: the `kernel` workload, 64 MiB, 20,000 steps each —
  about half a second — a batch of eight), through the engine's own submission loop and journal
  (mmud.campaign.engine.submit_all). The two clusters run each batch in turn, round by round
  in alternating order; the figure is the median over rounds of the ratio within a round.
  Goal ≥ 1.7 on two cores: the work must spread over both workers.
- `campaign_job_overhead_ms`: a trivial job's round trip (smoke kind, no workload, 0 steps:
  build a 1 MiB VM) on the one-worker cluster — submit, the worker's task, the job process
  and back — one job at a time, the median of 40 after 5 untimed. Goal ≤ 20 ms.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from distributed import Client

from bench._common import figure
from mmud.campaign import cluster, engine, spec
from mmud.campaign.job import job_dir, job_id
from mmud.campaign.worker import run_job

SPEC = """
kind = "smoke"
[axes]
workload = ["kernel"]
mem_mb = [64]
vcpus = [1]
seed = [{seeds}]
steps = [{steps}]
[limits]
job_seconds = 600
"""


def _batch(tmp: Path, rnd: int, jobs: int, steps: int) -> spec.Spec:
    """Round `rnd`'s jobs: fresh seeds each round, so that no result is ever reused."""
    seeds = ", ".join(str(rnd * jobs + k) for k in range(jobs))
    path = tmp / f"round{rnd}.toml"
    path.write_text(SPEC.format(seeds=seeds, steps=steps))
    return spec.load(path)


def _jobs_per_s(client: Client, batch: spec.Spec, out: Path) -> float:
    out.mkdir()
    todo, _ = engine.plan(batch, out, quick=False, resume=False)
    t0 = time.perf_counter()
    assert engine.submit_all(batch, client, out, todo, engine.Stop(), quiet=True) == len(todo)
    return len(todo) / (time.perf_counter() - t0)


def _round_trip_ms(client: Client, out: Path, seed: int) -> float:
    params: dict[str, object] = {"workload": "none", "mem_mb": 1, "vcpus": 1, "seed": seed, "steps": 0}
    jid = job_id("smoke", params)
    t0 = time.perf_counter()
    result = client.submit(run_job, "smoke", params, str(job_dir(out, jid)), 60.0,
                           key=f"smoke-{jid}").result()
    elapsed = time.perf_counter() - t0
    assert result["outcome"] == "ok", result
    return elapsed * 1e3


def run(quick: bool = False) -> None:
    rounds, jobs, steps = (2, 4, 5000) if quick else (4, 8, 20000)
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-campaign-")))
        clients = {n: stack.enter_context(cluster.local(n)) for n in (1, 2)}
        warm = _batch(tmp, 0, 4, 0)
        for n, client in clients.items():
            _jobs_per_s(client, warm, tmp / f"warm{n}")
        ratios = []
        for r in range(1, rounds + 1):
            batch = _batch(tmp, r, jobs, steps)
            rate = {n: _jobs_per_s(clients[n], batch, tmp / f"r{r}w{n}")
                    for n in ((1, 2) if r % 2 else (2, 1))}
            ratios.append(rate[2] / rate[1])
        figure("campaign_speedup_2w", statistics.median(ratios), "ratio")
        out = tmp / "trivial"
        times = [_round_trip_ms(clients[1], out, seed) for seed in range(45 if not quick else 15)]
        figure("campaign_job_overhead_ms", statistics.median(times[5:]), "ms")

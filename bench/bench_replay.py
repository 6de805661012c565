"""Record and replay (docs/replay.md), measured side by side in one process.

- `record_overhead_ratio`: steps/s of the simulation loop with a recording (a state
  directory) over steps/s without, both under a steady load of 100 requests/s (parameter
  stores, statistic clears, 64-byte memory writes) applied through the loop's own request
  path (`Simulation._apply`).  The two run in alternating rounds (ABBA).  Goal: ≥ 0.95.
- `replay_speed_ratio`: steps/s of `mmud replay` (Replay.run) over the steps/s of the live
  run that made the recording.  Goal: ≥ 1.0.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from bench._common import figure, interleaved, paired_ratio
from mmud.daemon.protocol import Request, SimConfig, VmConfig
from mmud.daemon.replay import Replay
from mmud.daemon.sim import Simulation
from mmud.log import setup_logging

REQUESTS_PER_SECOND = 100
VM = VmConfig(mem_mb=64, vcpus=1, seed=1)  # what `mmud run` starts by default
LOAD = [
    ("param", {"name": "mmu_audit_ratelimit_burst", "text": b"10"}),
    ("clear_stat", {"name": "pf_fixed"}),
    ("memory_write", {"vm": "vm0", "gpa": 60 << 20, "data": b"mmud-rec" * 8}),
]


def _simulation(state_dir: str | None) -> Simulation:
    return Simulation.offline(SimConfig(vms=(VM,), state_dir=state_dir, log_level="warning"))


def _drive(sim: Simulation, seconds: float) -> float:
    """Run the loop for `seconds` with requests at REQUESTS_PER_SECOND; its steps/s."""
    start_steps = sim.slots[0].vm.steps
    t0 = time.perf_counter()
    next_request, n = t0, 0
    while (now := time.perf_counter()) - t0 < seconds:
        sim._step_batch(sim.slots)
        if now >= next_request:
            op, args = LOAD[n % len(LOAD)]
            sim._apply(Request(n, op, args))
            n += 1
            next_request += 1 / REQUESTS_PER_SECOND
    return (sim.slots[0].vm.steps - start_steps) / (time.perf_counter() - t0)


def _record_and_replay(directory: Path, seconds: float) -> list[float]:
    """One live run with a recording, then its replay: [replay steps/s over live steps/s]."""
    sim = _simulation(str(directory))
    live = _drive(sim, seconds)
    sim.recorder.close(sim.slots, sim.step_counts())
    assert sim.recorder.path is not None
    replay = Replay(sim.recorder.path)
    t0 = time.perf_counter()
    outcome = replay.run()
    elapsed = time.perf_counter() - t0
    if outcome.divergence is not None:
        raise RuntimeError(outcome.render())
    return [replay.sim.slots[0].vm.steps / elapsed / live]


def run(quick: bool) -> None:
    setup_logging("warning")  # the load's 100 requests/s would each log a line
    seconds, rounds = (0.5, 1) if quick else (4.0, 4)
    with tempfile.TemporaryDirectory(prefix="mmud-bench-replay-") as tmp:
        recorded, plain = _simulation(str(Path(tmp, "overhead"))), _simulation(None)
        samples = interleaved({"on": lambda: [_drive(recorded, seconds)],
                               "off": lambda: [_drive(plain, seconds)]}, rounds)
        figure("record_overhead_ratio", paired_ratio(samples, "on", "off"), "ratio")
        ratios = [_record_and_replay(Path(tmp, f"replay{i}"), seconds)[0] for i in range(rounds)]
        figure("replay_speed_ratio", sorted(ratios)[len(ratios) // 2], "ratio")

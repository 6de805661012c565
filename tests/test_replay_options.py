"""`mmud replay` options (docs/replay.md) on a short run recorded by the simulation itself:
`--until`, `--audit`, `--trace`, and `mmud.replay()`.  The recording goes through the
simulation's request path (`Simulation._apply`), as a daemon's writes do; a whole daemon run
through a real mount is tests/test_record_replay.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

import mmud
from mmud.daemon import recording as recording_module
from mmud.daemon.breakpoints import STEPPED
from mmud.daemon.protocol import Request, SimConfig, VmConfig
from mmud.daemon.replay import Replay
from mmud.daemon.sim import Simulation
from tests.fusemount import REPO
from tests.test_record_replay import replay_cli

# (step of vm0 from which it is applied, op, args): a bug armed while the audit is on but
# rate-limited, disarmed later.
WRITES = [
    (300, "param", {"name": "mmu_audit", "text": b"1"}),
    (500, "inject", {"vm": "vm0", "name": "sync_skipped"}),
    (1100, "inject", {"vm": "vm0", "name": "none"}),
    (1300, "zap_all", {"vm": "vm0", "kind": "fast"}),
    (1500, "memory_write", {"vm": "vm0", "gpa": 15 << 20, "data": b"mmud" * 2000}),
]
END = 2000


@pytest.fixture(scope="module")
def recording(tmp_path_factory: pytest.TempPathFactory) -> Path:
    state = tmp_path_factory.mktemp("state")
    sim = Simulation.offline(SimConfig(vms=(VmConfig(mem_mb=16, vcpus=2, seed=9),), state_dir=str(state)))
    pending = list(WRITES)
    while sim.slots[0].vm.steps < END:
        sim._step_batch(sim.slots)
        while pending and sim.slots[0].vm.steps >= pending[0][0]:
            _, op, args = pending.pop(0)
            sim._apply(Request(1, op, args))
    sim.recorder.close(sim.slots, sim.step_counts())
    (path,) = (state / "recordings").iterdir()
    return path


def event_steps(path: Path, op: str, **args: Any) -> int:
    for line in path.read_text().splitlines()[1:]:
        r = json.loads(line)
        if r.get("op") == op and all(r["args"].get(k) == v for k, v in args.items()):
            return int(r["steps"]["vm0"])
    raise AssertionError(f"no {op} {args} recorded")


def test_until_stops_at_that_step(recording: Path) -> None:
    at = event_steps(recording, "zap_all")
    vms = mmud.replay(recording, until=at)
    assert list(vms) == ["vm0"] and vms["vm0"].steps == at
    assert vms["vm0"].stats["mmu_shadow_zapped"] > 0  # the event at that step is applied
    whole = mmud.replay(recording)
    assert whole["vm0"].steps == json.loads(recording.read_text().splitlines()[-1])["steps"]["vm0"]


def test_audit_differs_in_the_audit_only_and_says_where_errors_begin(recording: Path) -> None:
    plain = Replay(recording).run()
    assert plain.divergence is None and plain.audit_error is None
    audited = Replay(recording, audit=True).run()
    assert audited.divergence is None, audited.render()
    armed = event_steps(recording, "inject", name="sync_skipped")
    assert audited.audit_error is not None
    assert audited.audit_error.startswith("audit errors first at vm0 step ")
    first = int(audited.audit_error.split()[6])
    assert armed < first <= event_steps(recording, "inject", name="none")
    assert "'sync_skipped'" in audited.audit_error and "after sync root" in audited.audit_error


def test_trace_prints_the_replayed_span(recording: Path) -> None:
    until = event_steps(recording, "inject", name="sync_skipped")
    done = replay_cli(recording, "--until", until, "--trace", "kvmmmu:kvm_mmu_get_page")
    assert done.returncode == 0, done.stderr
    out = done.stdout.splitlines()
    assert out[-2:] == ["identical through step 0 (0 checkpoints, 2 events)",
                        f"stopped at step {until} (--until)"]
    traced = out[:-2]
    assert traced and all(": kvm_mmu_get_page: " in line for line in traced), traced[:3]


def test_the_cap_stops_the_recording_once_and_it_still_replays(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(recording_module, "CAP_BYTES", 3000)
    sim = Simulation.offline(SimConfig(vms=(VmConfig(mem_mb=16, seed=2),), state_dir=str(tmp_path)))
    with capture_logs() as logs:
        for word in b"10" * 30:  # about 100 bytes a line
            sim._step_batch(sim.slots)
            sim._apply(Request(1, "param", {"name": "mmu_audit", "text": bytes([word])}))
    assert [e["reason"] for e in logs if e["event"] == "recording_stopped"] == ["cap reached"]
    assert sim.params["mmu_audit"] is False  # the run went on to the last write
    path = sim.recorder.path
    assert path is not None and sim.recorder.stopped == "cap reached"
    data = path.read_bytes()
    assert 2000 < len(data) <= 3000 and data.endswith(b"\n")
    outcome = Replay(path).run()
    assert outcome.divergence is None and not outcome.complete
    assert outcome.events == data.count(b'"op"')


def test_run_control_pauses_replay_where_they_happened(tmp_path: Path) -> None:
    """`step N` and an `audit_error` break pause the VM inside the loop's stepping; the
    replay's stepping, through the same run control, pauses it at the same steps."""
    sim = Simulation.offline(SimConfig(vms=(VmConfig(mem_mb=16, vcpus=2, seed=9),), state_dir=str(tmp_path)))
    sim._step_batch(sim.slots)
    sim._apply(Request(1, "state", {"vm": "vm0", "action": "step", "steps": 77}))
    while sim.slots[0].running:
        sim._step_batch(sim.slots)
    for op, args in [("param", {"name": "mmu_audit", "text": b"1"}),
                     ("param", {"name": "mmu_audit_ratelimit_ms", "text": b"0"}),
                     ("break", {"vm": "vm0", "kind": "audit_error"}),
                     ("inject", {"vm": "vm0", "name": "sync_skipped"}),
                     ("state", {"vm": "vm0", "action": "run"})]:
        sim._apply(Request(1, op, args))
    for _ in range(2000):
        if not sim.slots[0].running:
            break
        sim._step_batch(sim.slots)
    sim.recorder.close(sim.slots, sim.step_counts())
    path = sim.recorder.path
    assert path is not None
    paused = [r["args"]["why"] for r in map(json.loads, path.read_text().splitlines()[1:])
              if r.get("op") == "paused"]
    assert paused == [STEPPED, "audit_error"]
    outcome = Replay(path).run()
    assert outcome.divergence is None and outcome.complete, outcome.render()


def test_bench_replay_quick() -> None:
    """The benchmark runs and prints its figures (their values are not judged here)."""
    done = subprocess.run([sys.executable, "-m", "bench", "--quick", "replay"], cwd=REPO,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    for name in ("record_overhead_ratio", "replay_speed_ratio"):
        assert any(line.startswith(f"{name} = ") and line.endswith(" ratio")
                   for line in done.stdout.splitlines()), done.stdout

"""The control plane under load (docs/daemon.md, "How a parameter reaches the simulation"):
a parameter store reaches a running step at the audit's store points — each audit point and
between the checks of a run — so it never waits for a whole audit run; it is recorded with
that place, and a replay applies it there again.

The positions are checked, not wall-clock times: a store that waited for the run to end
would land at an audit point or after the step, never `before <check>` inside a run.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from multiprocessing.connection import Connection
from typing import Any, cast

import pytest
from structlog.testing import capture_logs

from mmud.daemon.client import SimClient
from mmud.daemon.protocol import Reply, Request, SimConfig, StoreChannel, VmConfig
from mmud.daemon.replay import Replay
from mmud.daemon.sim import PUBLISH_SECONDS, Simulation
from tests.fusemount import Daemon, cat, echo, serving, status_fields, wait_for

EVERY_POINT = {"mmu_audit": "1", "mmu_audit_ratelimit_ms": "0"}


class Writer:
    """The FUSE side of a store channel in this process: posts each planned store when the
    audit reaches its store point, as a write(2) arriving at that moment would."""

    def __init__(self, plan: dict[int, tuple[str, bytes]]) -> None:
        ctx = multiprocessing.get_context("spawn")
        receive, self.send = ctx.Pipe(duplex=False)
        self.posted = ctx.RawValue("Q", 0)
        self.channel = StoreChannel(receive, self.posted)
        self.plan, self.ids = plan, itertools.count(1)

    def attach(self, sim: Simulation) -> None:
        """Post the planned stores from the simulation's own store points."""
        inner = sim.module.audit.notice
        assert inner is not None

        def notice() -> None:
            if (store := self.plan.pop(sim.module.audit.points, None)) is not None:
                self.post(*store)
            inner()

        sim.module.audit.notice = notice

    def post(self, name: str, text: bytes) -> None:
        self.post_request(Request(next(self.ids), "param", {"name": name, "text": text}))

    def post_request(self, req: Request) -> None:
        self.send.send(req)
        self.posted.value += 1


def recorded_run(state: Path, plan: dict[int, tuple[str, bytes]],
                 between: dict[int, tuple[str, bytes]], end: int) -> tuple[Path, list[dict]]:
    """A recorded run of two VMs, the audit at every point: stores posted at the
    planned store points (`plan`) and between rounds once vm0 passes a step (`between`);
    the recording and the `param_set` events.  Round by round, as `_step_batch` steps, but
    without its wall-clock batches: the same run every time."""
    sim, writer = offline(state, plan, VmConfig("vm0", mem_mb=16, vcpus=2, seed=5),
                          VmConfig("vm1", mem_mb=16, vcpus=1, seed=6))
    with capture_logs() as logs:
        while sim.slots[0].vm.steps < end:
            sim.step_round(sim.slots)
            for step in [s for s in between if s <= sim.slots[0].vm.steps]:
                writer.post(*between.pop(step))
            sim._take_stores()
    return recording(sim, state), [e for e in logs if e["event"] == "param_set"]


def offline(state: Path, plan: dict[int, tuple[str, bytes]],
            *vms: VmConfig) -> tuple[Simulation, Writer]:
    """A recording simulation of `vms` with the audit at every point, and its store writer."""
    writer = Writer(plan)
    config = SimConfig(vms=vms, load=EVERY_POINT, state_dir=str(state))
    sim = Simulation.offline(config, writer.channel)
    writer.attach(sim)
    return sim, writer


def recording(sim: Simulation, state: Path) -> Path:
    """End the simulation's recording; its file."""
    sim.recorder.close(sim.slots, sim.step_counts())
    (path,) = (state / "recordings").iterdir()
    return path


# Store points of this run: 18 of them make a full run (its audit point, then one before each
# of its seventeen parts); both stores land in the middle of a run, the first in vm0's
# chunk, the second in vm1's.
PLAN = {
    20: ("mmu_audit_ratelimit_burst", b"3\n"),
    205: ("mmu_audit", b"0\n"),
}
BETWEEN = {60: ("mmu_audit", b"1\n")}


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    return recorded_run(tmp_path_factory.mktemp("state"), dict(PLAN), dict(BETWEEN), 160)


def events(path: Path) -> list[dict[str, Any]]:
    return [r for r in map(json.loads, path.read_text().splitlines()[1:]) if "op" in r]


def test_a_store_lands_inside_a_run_and_ends_it(recorded: tuple[Path, list[dict]]) -> None:
    path, sets = recorded
    off = next(e for e in sets if e["name"] == "mmu_audit" and not e["value"])
    # Posted in the middle of a full run: applied at the next check, not after the run.
    assert off["point"] == 205 and off["in"] == "vm1" and " before " in off["where"], off
    burst = next(e for e in sets if e["name"] == "mmu_audit_ratelimit_burst")
    assert burst["point"] == 20 and burst["in"] == "vm0" and " before " in burst["where"]
    on = next(e for e in sets if e["name"] == "mmu_audit" and e["value"])
    assert "point" not in on  # between batches: the audit was off, so no store point ran
    recorded_events = [e for e in events(path) if e["op"] == "param"]
    assert [(e.get("in"), e.get("point")) for e in recorded_events] == [
        ("vm0", 20), ("vm1", 205), (None, None)]


def test_the_replay_applies_each_store_at_its_point(recorded: tuple[Path, list[dict]]) -> None:
    path, _ = recorded
    outcome = Replay(path).run()
    assert outcome.divergence is None and outcome.complete, outcome.render()
    assert outcome.events == len(events(path))


def test_without_its_point_the_replay_diverges(recorded: tuple[Path, list[dict]],
                                               tmp_path: Path) -> None:
    """The position is what makes the run reproducible: applied at the start of its step
    instead, the store in the middle of the run gives another run."""
    path, _ = recorded
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    for line in lines:
        if line.get("point") == 205:
            del line["in"], line["point"]
    moved = tmp_path / "moved.jsonl"
    moved.write_text("".join(json.dumps(r) + "\n" for r in lines))
    outcome = Replay(moved).run()
    assert outcome.divergence is not None, outcome.render()


def test_a_read_on_the_store_channel_is_answered_inside_a_run(tmp_path: Path) -> None:
    """A read (READ_OPS) posted while the audit is inside a run is answered at that store
    point, inside the VM's chunk, and leaves nothing in the recording."""
    writer = Writer({})
    receive, out = multiprocessing.get_context("spawn").Pipe(duplex=False)
    config = SimConfig(vms=(VmConfig("vm0", mem_mb=16, vcpus=1, seed=5),), load=EVERY_POINT,
                       state_dir=str(tmp_path))
    sim = Simulation(config, cast(Connection, None), out, writer.channel)
    inner = sim.module.audit.notice
    assert inner is not None
    answers: list[tuple[str, Reply, bytes]] = []

    def notice() -> None:
        if sim.module.audit.points == 20:
            writer.post_request(Request(99, "memory_read", {"vm": "vm0", "gpa": 0, "size": 64}))
        inner()
        if sim.module.audit.points == 20:
            assert sim._stepping is not None and receive.poll(0)
            answers.append((sim.module.audit.where, receive.recv(), sim.slots[0].vm.read_guest(0, 64)))

    sim.module.audit.notice = notice
    while sim.slots[0].vm.steps < 40:
        sim.step_round(sim.slots)
    ((where, reply, ram),) = answers
    assert " before " in where, where
    assert reply.id == 99 and reply.errno == 0 and reply.result == ram
    assert not [e for e in events(recording(sim, tmp_path)) if e["op"] == "memory_read"]


def test_the_daemon_sends_reads_on_the_store_channel() -> None:
    """The FUSE side sends a read (READ_OPS) on the store channel, counted in shared memory,
    so that the simulation answers it at its next store point; a request that changes
    something still takes the request pipe, applied between batches and recorded there."""
    client = SimClient(SimConfig(vms=(VmConfig("vm0", mem_mb=16, vcpus=1, seed=5),)))
    client.start()
    try:
        posted = client._sim.posted.value
        reply = client.request("memory_read", vm="vm0", gpa=0, size=64)
        assert len(reply.result) == 64 and client._sim.posted.value == posted + 1
        client.request("state", vm="vm0", action="pause")
        assert client._sim.posted.value == posted + 1
    finally:
        client.stop()


# -- through the mount --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    base = tmp_path_factory.mktemp("cp")
    yield from serving(base / "mnt", "--mem", "256M", "--vcpus", "2",
                       "--param", "mmu_audit_ratelimit_ms=0", "--state-dir", str(base / "state"))


def param_sets(d: Daemon, value: bool) -> list[dict]:
    return [e for e in d.events("param_set") if e["name"] == "mmu_audit" and e["value"] is value]


def test_echo_0_lands_inside_an_audit_run(daemon: Daemon) -> None:
    """`echo 0` while full runs go on at every point is applied where the audit is inside
    its step: at a store point, most of them between two checks of a run."""
    d = daemon
    for _ in range(8):
        assert echo(d.path("parameters/mmu_audit"), "1").returncode == 0
        before = int(cat(d.path("kvm/mmu_audit_runs")))
        wait_for(lambda after=before + 2: int(cat(d.path("kvm/mmu_audit_runs"))) > after,
                 30, "audit runs")
        assert echo(d.path("parameters/mmu_audit"), "0").returncode == 0
        assert cat(d.path("parameters/mmu_audit")) == "N\n"
        # The static key is off when the store returns: no run starts after it (the
        # statistics are read from snapshots published after the store).
        time.sleep(0.15)
        runs = int(cat(d.path("kvm/mmu_audit_runs")))
        time.sleep(0.2)
        assert int(cat(d.path("kvm/mmu_audit_runs"))) == runs
    # Most land inside a step (one that arrives while the loop publishes lands after the
    # round); those inside a run land before its next check, not after the run.
    offs = param_sets(d, False)
    assert any(" before " in e.get("where", "") for e in offs), offs


def test_a_trace_switch_lands_inside_a_step(daemon: Daemon) -> None:
    """A tracing/ write takes the store channel too: with the audit running at every point,
    `echo 1 > tracing/events/kvmmmu/enable` is applied at a store point inside a step, as
    a tracepoint's static key flips while a vCPU is inside a fault; through the request
    path it would land only between chunks."""
    d = daemon
    enable = d.path("tracing/events/kvmmmu/enable")
    assert echo(d.path("parameters/mmu_audit"), "1").returncode == 0
    try:
        for _ in range(8):
            before = int(cat(d.path("kvm/mmu_audit_runs")))
            wait_for(lambda after=before + 2: int(cat(d.path("kvm/mmu_audit_runs"))) > after,
                     30, "audit runs")
            assert echo(enable, "1").returncode == 0
            assert cat(enable) == "1\n"
            assert echo(enable, "0").returncode == 0
            if any("point" in e for e in d.events("tracefs_write")):
                break
    finally:
        assert echo(d.path("parameters/mmu_audit"), "0").returncode == 0
    writes = d.events("tracefs_write")
    assert {e["file"] for e in writes} == {"events/kvmmmu/enable"}
    assert {(e["action"], e["text"]) for e in writes} == {
        ("truncate", None), ("write", "1\n"), ("write", "0\n")}  # echo opens with O_TRUNC
    assert any("point" in e for e in writes), writes


def test_reads_are_answered_inside_a_step(daemon: Daemon) -> None:
    """A read of guest memory takes the store channel too.  With the audit at every point a
    round is an audited step of each VM, and through the request pipe each 4 KiB read of
    `vm0/memory` waits for the end of a batch, at least one round: a thousand reads, a
    thousand steps or more (7,384 in one run).  Answered at the store points inside a
    step, and after each round, they pass while fewer steps go by (191 to 522 seen)."""
    d = daemon
    assert echo(d.path("parameters/mmu_audit"), "1").returncode == 0
    try:
        before = int(cat(d.path("kvm/mmu_audit_runs")))
        wait_for(lambda: int(cat(d.path("kvm/mmu_audit_runs"))) > before + 2, 30, "audit runs")
        steps = int(status_fields(d.read("vm0/status"))["steps"])
        done = subprocess.run(["dd", f"if={d.path('vm0/memory')}", "of=/dev/null", "bs=4096",
                               "count=1000"], capture_output=True, text=True, check=False)
        assert done.returncode == 0 and "4096000 bytes" in done.stderr, done
        time.sleep(2 * PUBLISH_SECONDS)  # the status after the reads is published
        passed = int(status_fields(d.read("vm0/status"))["steps"]) - steps
    finally:
        assert echo(d.path("parameters/mmu_audit"), "0").returncode == 0
    assert 0 < passed < 1000, passed


def test_the_daemon_run_replays_identically(daemon: Daemon) -> None:
    d = daemon
    assert d.stop() == 0
    state = Path(d.args[d.args.index("--state-dir") + 1])
    (path,) = (state / "recordings").iterdir()
    assert any("point" in e for e in events(path))  # stores that landed inside a step
    assert any(e["op"] == "tracefs" and "point" in e for e in events(path))
    outcome = Replay(path).run()
    assert outcome.divergence is None and outcome.complete, outcome.render()


# -- with run control armed ---------------------------------------------------------------------

def armed_run(state: Path, plan: dict[int, tuple[str, bytes]],
              steps: int) -> tuple[Simulation, Path, list[dict]]:
    """vm0 alone, the audit at every point, `break audit_error` armed and `step <steps>`
    pending: RunControl steps it one step at a time while the audit is on.  The planned
    stores land inside those steps.  Run until the VM pauses."""
    sim, _ = offline(state, plan, VmConfig("vm0", mem_mb=16, vcpus=2, seed=5))
    sim.dispatch(Request(1001, "break", {"vm": "vm0", "kind": "audit_error"}))
    sim.dispatch(Request(1002, "state", {"vm": "vm0", "action": "step", "steps": steps}))
    with capture_logs() as logs:
        while sim.slots[0].running:
            sim.step_round(sim.slots)
            sim._take_stores()
    return sim, recording(sim, state), logs


def test_a_store_inside_a_step_of_an_armed_vm_lands_there_and_replays(tmp_path: Path) -> None:
    """A VM with a break armed and a `step N` pending is stepped in pieces of one step; a
    store reaching one of them mid-run lands at its store point, the VM still pauses at
    its target, and the replay applies the store at the same point."""
    target = 120
    sim, path, logs = armed_run(tmp_path, {150: ("mmu_audit", b"0\n")}, target)
    vm = sim.slots[0].vm
    assert target <= vm.steps <= target + 3  # a preempted step may run a few more (breakpoints.py)
    assert not vm.mmu.audit_enabled and vm.stat["mmu_audit_errors"] == 0
    (off,) = [e for e in logs if e["event"] == "param_set"]
    assert off["in"] == "vm0" and off["point"] == 150 and off["step"] < target, off
    paused = [e for e in logs if e["event"] == "vm_paused"]
    assert [e["why"] for e in paused] == ["stepped"]
    recorded = [e for e in events(path) if e["op"] == "param"]
    assert [(e.get("in"), e.get("point")) for e in recorded] == [("vm0", 150)]
    outcome = Replay(path).run()
    assert outcome.divergence is None and outcome.complete, outcome.render()

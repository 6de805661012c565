"""Batch independence: how the daemon's loop cuts its batches (by wall-clock deadline) must
not change the run, or a recording could not be replayed (docs/replay.md).

Digests (mmud/daemon/recording.py) compare the whole state: statistics, guest RAM, the shadow
MMU's structure, the audit and fault logs.
"""

from __future__ import annotations


import pytest

import mmud
from mmud.daemon import sim as sim_module
from mmud.daemon.protocol import Request, SimConfig, VmConfig
from mmud.daemon.recording import digest
from mmud.daemon.sim import Simulation
from mmud.guest import WORKLOADS
from mmud.host import HOST_WORKLOADS

ALL_WORKLOADS = [*WORKLOADS, *HOST_WORKLOADS]


class _Vm:
    """A bare VM seen as a simulation slot, for its digest."""

    def __init__(self, vm: mmud.VM) -> None:
        self.vm, self.name, self.failure, self.state = vm, "vm0", None, "running"


@pytest.mark.parametrize("workload", ALL_WORKLOADS)
def test_stepping_n_then_m_is_stepping_n_plus_m(workload: str) -> None:
    """The VM API: one VM.step(N+M) and VM.step(N) then VM.step(M) run the same guest
    (the audit on, so that its limiter and log are part of the comparison)."""
    params = {"mmu_audit": "1"}
    whole = mmud.VM(mem_mb=16, vcpus=2, seed=7, workload=workload, params=params)
    split = mmud.VM(mem_mb=16, vcpus=2, seed=7, workload=workload, params=params)
    whole.step(1500)
    split.step(613)
    split.step(887)
    assert whole.steps == split.steps
    assert digest(_Vm(whole)) == digest(_Vm(split))


def _simulation(workload: str) -> Simulation:
    config = SimConfig(vms=(VmConfig(mem_mb=16, vcpus=2, seed=3, workload=workload),),
                       load={"address_space_isolation": "1", "mmu_audit": "1"})
    sim = Simulation.offline(config)
    # A second VM: both share the module's audit limiter and log, so their interleaving
    # must be the same too.
    assert sim.dispatch(Request(1, "create", {"name": "vm1", "seed": 4})).errno == 0
    return sim


def _run(sim: Simulation, steps: int) -> None:
    while sim.slots[0].vm.steps < steps:
        sim._step_batch([s for s in sim.slots if s.running])


@pytest.mark.parametrize("workload", ALL_WORKLOADS)
def test_daemon_batches_do_not_change_the_run(workload: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The simulation loop: batches of one round against batches of many give the same
    state at the same step counts — with address-space isolation on, where every return
    to userspace (the end of a `VM.step` call) is an isolation exit, so the calls' sizes
    must not follow the batches."""
    monkeypatch.setattr(sim_module, "BATCH_SECONDS", 0.0)  # one round per batch
    short = _simulation(workload)
    _run(short, 2000)
    monkeypatch.setattr(sim_module, "BATCH_SECONDS", 0.05)
    long = _simulation(workload)
    _run(long, 2000)
    # Align to the same counts: both step the same chunks, so one catches up exactly.
    while long.step_counts() != short.step_counts():
        behind = short if short.slots[0].vm.steps < long.slots[0].vm.steps else long
        behind.step_round(behind.slots)
    assert [digest(s) for s in short.slots] == [digest(s) for s in long.slots]
    assert short.slots[0].vm.stats["isolation_exits"] > 0


@pytest.mark.parametrize("audit", ["0", "1"])
def test_a_round_is_one_step_while_the_audit_is_on(audit: str) -> None:
    """A request waits for at most one chunk: with the audit on (whose runs can take tens of
    milliseconds a step) a chunk is one step, else STEP_CHUNK."""
    sim = Simulation.offline(SimConfig(vms=(VmConfig(mem_mb=16, seed=1),),
                                       load={"mmu_audit": audit, "mmu_audit_ratelimit_ms": "0"}))
    vm = sim.slots[0].vm
    for _ in range(20):
        before = vm.steps
        sim.step_round(sim.slots)
        ran = vm.steps - before
        # A step in which a vCPU is preempted runs a few steps of the others inside it.
        assert (1 <= ran <= 4) if audit == "1" else ran >= sim_module.STEP_CHUNK

"""The guest's table scans read runs of entries at once (`Vcpu.scan_u64`) and make the same
run as reading them one `read_u64` at a time, which is what scan_u64 is defined to be.

The reference replaces scan_u64 on each vCPU with that definition — the per-entry path —
and runs the same seed beside the fast one, for every workload and 50 seeds: statistics,
guest counters, accesses, guest memory and the shadow MMU must come out the same.
"""

from __future__ import annotations

from collections import Counter

import pytest

import mmud
from mmud.uapi.vms import WORKLOADS
from tests.fingerprint import memory_digest, mmu_digest

SEEDS = range(50)
STEPS = 1500


def per_entry(vcpu, calls: Counter) -> None:
    """scan_u64 as its definition: read_u64 word by word up to a word with a mask bit."""

    def scan_u64(gva: int, n: int, mask: int) -> tuple[int, int]:
        read = 0
        while True:
            value = vcpu.read_u64(gva + 8 * read)
            read += 1
            if value & mask or read == n:
                calls["scans"] += 1
                calls["words"] += read
                return read, value

    vcpu.scan_u64 = scan_u64


def run(workload: str, seed: int, calls: Counter | None = None) -> dict[str, object]:
    vm = mmud.VM(mem_mb=16, vcpus=1 + seed % 2, seed=seed, workload=workload,
                 params={"address_space_isolation": "0"})
    if calls is not None:
        for vcpu in vm.vcpus:
            per_entry(vcpu, calls)
    vm.step(STEPS)
    return {"steps": vm.steps, "stats": dict(vm.stats),
            "counters": dict(vm.workload.counters) if vm.workload else {},
            "accesses": [v.accesses for v in vm.vcpus],
            "memory": memory_digest(vm), "mmu": mmu_digest(vm)}


@pytest.mark.parametrize("workload", WORKLOADS)
def test_scans_of_runs_of_entries_make_the_per_entry_run(workload):
    calls: Counter = Counter()
    for seed in SEEDS:
        assert run(workload, seed) == run(workload, seed, calls), (workload, seed)
    if workload == "kernel":  # the workload whose processes fork, mprotect, unmap and exit
        assert calls["scans"] > 10_000 and calls["words"] > 2 * calls["scans"]

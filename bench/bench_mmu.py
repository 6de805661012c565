"""Shadow-MMU speed (docs/performance.md).

- `faults_per_s[<mem>]`, `accesses_per_s[<mem>]`: the `kernel` workload on one vCPU, shadow
  page faults fixed (pf_fixed) and guest memory accesses per second of wall time, for a
  64 MiB and a 1 GiB guest. Everything the simulation does is in the time: the guest kernel
  model, walks, emulation, syncs.
- `fault_path_per_s`: demand faults alone — a guest touching pages whose tables exist,
  each access one shadow fault (guest walk, shadow-page lookup, spte install, retry).
- `hit_vs_fault_cost_ratio`: cost of an access that hits existing sptes (TLB flushed, so
  the shadow tables are walked) over the cost of one that takes a shadow fault, measured
  side by side in interleaved rounds (median of the rounds).

All with `address_space_isolation=0`: these figures are the MMU's; what simulating the
KVM address space adds on top is `isolation_on_ratio` (bench_isolation.py).
"""

from __future__ import annotations

import time

import mmud
from bench._common import figure, interleaved, median

P, W, U, A, D = 1, 2, 4, 0x20, 0x40
ADDR = ((1 << 46) - 1) & ~0xFFF
USER_BASE = 0x0000_0010_0000_0000
MMU_ONLY = {"address_space_isolation": "0"}


def _workload_rates(mem_mb: int, steps: int) -> tuple[float, float]:
    vm = mmud.VM(mem_mb=mem_mb, vcpus=1, seed=1, workload="kernel", params=MMU_ONLY)
    vm.step(min(2000, steps // 10))  # boot and first processes
    before_faults, before_acc = vm.stats["pf_fixed"], vm.vcpus[0].accesses
    t0 = time.perf_counter()
    vm.step(steps)
    dt = time.perf_counter() - t0
    return (vm.stats["pf_fixed"] - before_faults) / dt, (vm.vcpus[0].accesses - before_acc) / dt


class FaultBench:
    """One address space with n pages mapped (tables built by the host before the run)."""

    def __init__(self, pages: int) -> None:
        self.vm = mmud.VM(mem_mb=256, params=MMU_ONLY)
        self.vcpu = self.vm.vcpus[0]
        self.pages = pages
        self.next_table = 0x10000
        self.pml4 = self._table()
        for i in range(pages):
            self._map(USER_BASE + i * 4096, 0x0400_0000 + i * 4096)
        self.vcpu.cr3 = self.pml4

    def _table(self) -> int:
        pa, self.next_table = self.next_table, self.next_table + 0x1000
        return pa

    def _map(self, va: int, pa: int) -> None:
        table = self.pml4
        for level in (4, 3, 2):
            gpa = table + 8 * ((va >> (12 + 9 * (level - 1))) & 511)
            entry = self.vm.read_u64(gpa)
            if not entry & P:
                entry = self._table() | P | W | U
                self.vm.write_u64(gpa, entry)
            table = entry & ADDR
        self.vm.write_u64(table + 8 * ((va >> 12) & 511), pa | P | W | U | A | D)

    def faults(self) -> float:
        """Seconds per access that takes a shadow fault (every leaf spte zapped first)."""
        self.vm.zap_all("slow")
        self.vcpu.read_u64(USER_BASE, user=True)  # reload the root outside the timing
        read = self.vcpu.read_u64
        t0 = time.perf_counter()
        for i in range(1, self.pages):
            read(USER_BASE + i * 4096, user=True)
        return (time.perf_counter() - t0) / (self.pages - 1)

    def hits(self) -> float:
        """Seconds per access that walks existing sptes (TLB emptied first)."""
        self.vcpu.tlb.clear()
        read = self.vcpu.read_u64
        t0 = time.perf_counter()
        for i in range(1, self.pages):
            read(USER_BASE + i * 4096, user=True)
        return (time.perf_counter() - t0) / (self.pages - 1)


def run(quick: bool = False) -> None:
    steps = 2000 if quick else 60000
    for mem_mb, label in ((64, "64M"), (1024, "1G")):
        faults, accesses = _workload_rates(mem_mb, steps)
        figure(f"faults_per_s[{label}]", faults, "faults/s")
        figure(f"accesses_per_s[{label}]", accesses, "accesses/s")
    bench = FaultBench(500 if quick else 8000)
    samples = interleaved({"fault": lambda: [bench.faults()], "hit": lambda: [bench.hits()]},
                          rounds=2 if quick else 7)
    figure("fault_path_per_s", 1 / median(samples["fault"]), "faults/s")
    figure("hit_vs_fault_cost_ratio", median(samples["hit"]) / median(samples["fault"]), "ratio")

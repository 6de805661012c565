"""The guest a zap is measured on (`python -m bench zap`, and the campaigns' zap kind): all of
its RAM faulted in through a 2 MiB-page direct map built by the host, one direct shadow page
per 2 MiB, and vCPUs beside the zap that contend for the MMU lock at every step.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

import mmud
from mmud.kvm.devices import IORAM_BASE
from mmud.kvm.vcpu import Vcpu

P, W, PS = 1, 2, 0x80
DIRECT_VA = 0xFFFF888000000000
MMIO_VA = 1 << 39  # pml4 entry 1, entry 0 below: one table per level
PMD_SPAN = 1 << 30  # guest physical space one pmd table maps with 2 MiB pages
PDPT_SPAN = 1 << 39


def read_all_ram(vcpu: Vcpu, ranges: Sequence[tuple[int, int]]) -> None:
    """Read every 4 KiB page of the RAM ranges once through the direct map at DIRECT_VA
    (this guest's, and the guest kernel's): a shadow spte for every page of RAM."""
    read = vcpu.read_u64
    for start, stop in ranges:
        for gpa in range(start, stop, 4096):
            read(DIRECT_VA + gpa)


class Guest:
    """A vCPU on a direct map of all RAM with 2 MiB pages (tables built by the host)."""

    def __init__(self, mem_mb: int, params: dict[str, str] | None = None,
                 contenders: int = 0) -> None:
        self.vm = mmud.VM(mem_mb=mem_mb, vcpus=1 + contenders, params=params)
        self.vcpu = self.vm.vcpus[0]
        self.ranges = self.vm.ram_ranges  # RAM below the PCI hole, and from 4 GiB up
        self.pages = sum(stop - start for start, stop in self.ranges) >> 12
        end = self.ranges[-1][1]
        assert end <= PDPT_SPAN, "one pdpt maps the whole guest physical space"
        pml4, pdpt, pmd_base = 0x1000, 0x2000, 0x3000
        write = self.vm.write_u64
        write(pml4 + 8 * ((DIRECT_VA >> 39) & 511), pdpt | P | W)
        for k in range(-(-end // PMD_SPAN)):
            write(pdpt + 8 * k, (pmd_base + 0x1000 * k) | P | W)
        for start, stop in self.ranges:
            for big in range(start >> 21, stop >> 21):
                write(pmd_base + 8 * big, (big << 21) | P | W | PS)
        # A user page mapped onto the ioram device, for the MMIO figure.
        for gpa, entry in ((pml4 + 8 * ((MMIO_VA >> 39) & 511), 0x100000 | P | W | 4),
                           (0x100000, 0x101000 | P | W | 4), (0x101000, 0x102000 | P | W | 4),
                           (0x102000, IORAM_BASE | P | W | 4)):
            write(gpa, entry)
        for vcpu in self.vm.vcpus:
            vcpu.cr3 = pml4
        for k, vcpu in enumerate(self.vm.vcpus[1:], 1):
            self.vm.scheduler.add(f"vcpu{k}", self._contend(vcpu, DIRECT_VA + (k << 21)))

    @staticmethod
    def _contend(vcpu: Vcpu, va: int) -> Iterator[None]:
        """A vCPU that takes mmu_lock at every step: INVLPG of a page, then a read of it."""
        while True:
            vcpu.invlpg(va)
            vcpu.read_u64(va)
            yield

    def fault_all(self) -> None:
        read_all_ram(self.vcpu, self.ranges)

    def zap(self, kind: str) -> tuple[float, float]:
        """Fault everything in, zap all while the contenders run; (stall, total) in ms."""
        self.fault_all()
        run = self.vm.zap_all(kind)
        while self.vm.zap_in_progress:
            self.vm.step(100)
        return run.max_stall_ns / 1e6, run.cpu_ns / 1e6

    def mmio_reads(self, n: int) -> float:
        """Seconds per read of the ioram page."""
        read = self.vcpu.read_u64
        read(MMIO_VA, user=True)
        t0 = time.perf_counter()
        for _ in range(n):
            read(MMIO_VA, user=True)
        return (time.perf_counter() - t0) / n

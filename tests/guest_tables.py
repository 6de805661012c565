"""Test helpers: build guest page tables in a fresh VM, edit them as the guest would, and
compare the simulated MMU's answers with the independent reference walk of the x86-64 rules
(mmud.campaign.reference, written from the SDM, not from mmud.x86).

Layout: page-table frames are handed out from TABLE_BASE; data frames from DATA_BASE. The
guest kernel's direct map (2 MiB pages, supervisor, RW) covers the first DIRECT_MB of
RAM at DIRECT_VA, so the "guest" edits its tables with stores through the MMU.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mmud
from mmud.campaign.reference import ADDR, PS, Expect, P, Regs, U, W, idx
from mmud.campaign.reference import NX as NX, A as A, D as D  # re-exported to the tests
from mmud.campaign.reference import reference_walk as sdm_walk

DIRECT_VA = 0xFFFF888000000000
DIRECT_MB = 16
TABLE_BASE = 0x10000
DATA_BASE = 0x400000


@dataclass
class GuestTables:
    """Owns the page tables of one address space (one PML4)."""

    vm: mmud.VM
    next_table: int = TABLE_BASE
    next_data: int = DATA_BASE
    pml4: int = 0
    tables: dict[tuple[int, int], int] = field(default_factory=dict)  # (level, prefix) -> pa

    def __post_init__(self) -> None:
        self.pml4 = self.alloc_table()
        self.map_direct()

    def alloc_table(self) -> int:
        pa = self.next_table
        self.next_table += 0x1000
        return pa

    def alloc_data(self) -> int:
        pa = self.next_data
        self.next_data += 0x1000
        return pa

    def table_for(self, va: int, level: int, upper_flags: int = P | W | U) -> int:
        """The table of `level` covering va, created (host writes) if missing."""
        table = self.pml4
        for lvl in range(4, level, -1):
            gpa = table + 8 * idx(va, lvl)
            entry = self.vm.read_u64(gpa)
            if not entry & P:
                new = self.alloc_table()
                self.vm.write_u64(gpa, new | upper_flags)
                entry = new | upper_flags
            table = entry & ADDR
        return table

    def entry_gpa(self, va: int, level: int = 1) -> int:
        return self.table_for(va, level) + 8 * idx(va, level)

    def map(self, va: int, pa: int | None = None, flags: int = P | W | U, upper: int = P | W | U) -> int:
        """Map a 4 KiB page with host writes (before the guest runs); returns its pa."""
        pa = self.alloc_data() if pa is None else pa
        table = self.table_for(va, 1, upper)
        self.vm.write_u64(table + 8 * idx(va, 1), pa | flags)
        return pa

    def map_direct(self) -> None:
        flags = P | W  # no XD: tests toggle EFER.NXE, which would make XD reserved
        for mb2 in range(DIRECT_MB // 2):
            va = DIRECT_VA + mb2 * (2 << 20)
            table = self.table_for(va, 2, P | W)
            self.vm.write_u64(table + 8 * idx(va, 2), (mb2 << 21) | flags | PS)

    def guest_write_entry(self, vcpu: mmud.Vcpu, gpa: int, value: int) -> None:
        """The guest kernel edits a paging entry through its direct map."""
        vcpu.write_u64(DIRECT_VA + gpa, value)


def new_vm(**kw) -> tuple[mmud.VM, GuestTables, mmud.Vcpu]:
    vm = mmud.VM(mem_mb=kw.pop("mem_mb", 64), **kw)
    gt = GuestTables(vm)
    vcpu = vm.vcpus[0]
    vcpu.cr3 = gt.pml4
    return vm, gt, vcpu


def reference_walk(vm: mmud.VM, vcpu: mmud.Vcpu, va: int, **kind: bool) -> Expect:
    """What the SDM says one access does (mmud.campaign.reference), for this vCPU's state."""
    regs = Regs(cr0=vcpu.cr0, cr3=vcpu.cr3, cr4=vcpu.cr4, efer=vcpu.efer, rflags=vcpu.rflags)
    return sdm_walk(vm.read_u64, regs, va, **kind)


def check_access(vm: mmud.VM, vcpu: mmud.Vcpu, va: int, **kind) -> mmud.Access:
    """Run the access through the simulated MMU and assert it matches the reference walk."""
    want = reference_walk(vm, vcpu, va, **kind)
    got = vcpu.access(va, **kind)
    assert got.fault == want.fault, (hex(va), kind, got, want)
    if want.fault:
        assert got.error_code == want.error_code, (hex(va), kind, hex(got.error_code), hex(want.error_code))
    else:
        assert got.gpa == want.gpa, (hex(va), kind, got, want)
    return got

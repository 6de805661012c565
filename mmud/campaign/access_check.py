"""One case of the access-rights matrix, run through mmud's vCPU and judged by the reference.

A job keeps one VM. Before each case the guest's four entries are rewritten with host writes
and every shadow page is zapped (kvm_mmu_zap_all) and the TLB emptied: the shadow MMU then
holds nothing a previous case built, so the access walks the new tables afresh, exactly as
in a new VM (tests/test_campaign_access.py checks that a fresh VM answers the same).  The
access then runs through `Vcpu.access`, the path of every guest access (TLB, shadow walk,
#PF exit into KVM, retry or reflected #PF), and is compared with the SDM reference walk
(mmud/campaign/reference.py): fault or not, error code, guest-physical address, and the
accessed/dirty bits left in each entry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from mmud.campaign.access_matrix import (
    ACCESSES,
    PKEY_LEAF,
    PKEY_TABLE,
    Cpu,
    flag_names,
    upper_edits,
    upper_entries,
)
from mmud.campaign.reference import (
    CR0_WP,
    CR4_SMAP,
    CR4_SMEP,
    EFER_NXE,
    PS,
    RFLAGS_AC,
    Expect,
    Regs,
    idx,
    outcome,
)
from mmud.kvm.vcpu import Access
from mmud.machine import VM

# The guest layout: one table per level, a 4 KiB data page and a 2 MiB frame, all below
# MEM_MB; the address has different indices at every level and a page offset, so a wrong
# index or a lost offset shows in the gpa.
MEM_MB = 8
PML4, PDPT, PD, PT, DATA = 0x1000, 0x2000, 0x3000, 0x4000, 0x5000
LARGE = 0x400000
VA = 0xFFFF_9234_4012_3678
ENTRY_NAMES = ("pml4e", "pdpte", "pde", "pte")
ENTRY_GPAS = tuple(table + 8 * idx(VA, level)
                   for table, level in ((PML4, 4), (PDPT, 3), (PD, 2), (PT, 1)))


def entries(upper: str, pde: int, pte: int, pkey: bool) -> tuple[int, int, int, int]:
    """The four entries of a case (PML4E, PDPTE, PDE, PTE) with their addresses filled in."""
    pml4e, pdpte = upper_entries(upper)
    large = bool(pde & PS)
    pde |= (LARGE if large else PT) | (0 if not pkey else PKEY_LEAF if large else PKEY_TABLE)
    return (PDPT | pml4e, PD | pdpte, pde, DATA | pte | (PKEY_LEAF if pkey else 0))


@dataclass(frozen=True)
class Mismatch:
    """A case where mmud and the reference disagree, with all it takes to read it."""

    case: str
    what: str
    before: tuple[int, int, int, int]

    def __str__(self) -> str:
        table = ", ".join(f"{n} {v:#x}" for n, v in zip(ENTRY_NAMES, self.before, strict=True))
        return f"{self.case}: {self.what}\n    entries before: {table}"


def _key(fault: bool, error_code: int, gpa: int | None) -> tuple[bool, int | None]:
    """What is compared of an outcome: the error code of a fault, the gpa of a success."""
    return fault, error_code if fault else gpa


class AccessBench:
    """A VM set up for the matrix under one job's control bits."""

    def __init__(self, cpu: Cpu, upper: str, pkey: bool,
                 reference: Callable[..., Expect]) -> None:
        self.vm = VM(mem_mb=MEM_MB)
        self.vcpu = vcpu = self.vm.vcpus[0]
        self.cpu, self.upper, self.pkey = cpu, upper, pkey
        self.reference = reference
        vcpu.cr3 = PML4
        vcpu.cr0 = vcpu.cr0 & ~CR0_WP | (CR0_WP if cpu.cr0_wp else 0)
        vcpu.cr4 = vcpu.cr4 & ~(CR4_SMEP | CR4_SMAP) | (CR4_SMEP if cpu.cr4_smep else 0) | (
            CR4_SMAP if cpu.cr4_smap else 0)
        vcpu.efer = vcpu.efer & ~EFER_NXE | (EFER_NXE if cpu.efer_nxe else 0)
        vcpu.rflags = vcpu.rflags & ~RFLAGS_AC | (RFLAGS_AC if cpu.rflags_ac else 0)
        self.regs = Regs(cr0=vcpu.cr0, cr3=vcpu.cr3, cr4=vcpu.cr4, efer=vcpu.efer, rflags=vcpu.rflags)

    def describe(self, pde: int, pte: int, access: int) -> str:
        """The case as access.c prints it: its flags, then the control bits and the access."""
        names = [*upper_edits(self.upper), *flag_names(pde, pte), *self.cpu.names()]
        if self.pkey:
            names.append("pkey")
        return f"test {' '.join(names)} [{ACCESSES[access][0]}]"

    def steps(self, access: int) -> list[tuple[str, dict[str, bool]]]:
        """The accesses a case makes: access.c's "twice" is a supervisor read first."""
        _, write, fetch, user, twice = ACCESSES[access]
        first: list[tuple[str, dict[str, bool]]] = [("the first (supervisor read)", {})] if twice else []
        return [*first, ("the access", {"write": write, "fetch": fetch, "user": user})]

    def observe(self, pde: int, pte: int, access: int) -> tuple[list[Access], list[int]]:
        """Run one case from a clean shadow MMU: what each access gave, and the four
        entries afterwards."""
        vm, vcpu = self.vm, self.vcpu
        for gpa, value in zip(ENTRY_GPAS, entries(self.upper, pde, pte, self.pkey), strict=True):
            vm.write_u64(gpa, value)
        vm.zap_all("slow")
        vcpu.flush_tlb_current()
        got = [vcpu.access(VA, **kind) for _, kind in self.steps(access)]
        return got, [vm.read_u64(gpa) for gpa in ENTRY_GPAS]

    def run(self, pde: int, pte: int, access: int) -> Mismatch | None:
        """Run one case and judge it; the first disagreement with the reference, or None."""
        before = entries(self.upper, pde, pte, self.pkey)
        got, after = self.observe(pde, pte, access)
        model = dict(zip(ENTRY_GPAS, before, strict=True))
        for (label, kind), result in zip(self.steps(access), got, strict=True):
            want = self.reference(lambda gpa: model.get(gpa, 0), self.regs, VA, **kind)
            for gpa, bits in want.ad:
                model[gpa] |= bits
            if _key(result.fault, result.error_code, result.gpa) != _key(
                    want.fault, want.error_code, want.gpa):
                what = (f"{label}: mmud gives {outcome(result.fault, result.error_code, result.gpa)}, "
                        f"the reference {outcome(want.fault, want.error_code, want.gpa)}")
                return Mismatch(self.describe(pde, pte, access), what, before)
        for name, gpa, value in zip(ENTRY_NAMES, ENTRY_GPAS, after, strict=True):
            if value != model[gpa]:
                what = f"{name} is {value:#x} after the access, the reference says {model[gpa]:#x}"
                return Mismatch(self.describe(pde, pte, access), what, before)
        return None

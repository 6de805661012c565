"""The shadow tables on view: vm<N>/mmu/pages, vm<N>/mmu/walk, kvm/<pid>-<fd>/mmu_rmaps_stat.

Text renderings of MMU state for the debugging files (docs/mmu.md, "The shadow tables on
view"), made in the simulation on request. None of them changes guest or MMU state: guest
memory is read straight from the slots' buffers (nothing is faulted in, no A/D bit is set)
and not even the memslot lookup cache moves.

- `render_pages`: one line per active shadow page, oldest first (the tail of
  `active_mmu_pages`), its role as the kvmmmu tracepoints print it (KVM_MMU_PAGE_PRINTK of
  v5.16's mmutrace.h).
- `render_walk`: the guest's walk of a gva and the shadow walk from the vCPU's root, entry
  by entry, and whether they agree.
- `render_rmaps_stat`: arch/x86/kvm/debugfs.c kvm_mmu_rmaps_stat_show() (v5.15+), byte for
  byte.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from mmud.kvm.memslot import Memslot, Memslots
from mmud.kvm.mmu import spte as S
from mmud.kvm.mmu.page import ACCESS_STR, ShadowPage, sp_address
from mmud.kvm.mmu.page import kvm_mmu_page_printk as page_printk
from mmud.x86.paging import (
    ACC_ALL,
    ACC_USER_MASK,
    ACC_WRITE_MASK,
    CR3_ADDR_MASK,
    PAGE_SHIFT,
    PT64_BASE_ADDR_MASK,
    PT64_LEVEL_BITS,
    PT64_LVL2_LARGE_ADDR_MASK,
    PT64_NX_MASK,
    PT_ACCESSED_MASK,
    PT_DIRTY_MASK,
    PT_PAGE_SIZE_MASK,
    PT_PRESENT_MASK,
    PT_USER_MASK,
    PT_WRITABLE_MASK,
    gpte_access,
    is_canonical,
    pt_index,
)

if TYPE_CHECKING:
    from mmud.kvm.mmu.mmu import KvmMmu
    from mmud.kvm.mmu.vcpu_mmu import VcpuMmu

def kvm_mmu_page_printk(sp: ShadowPage) -> str:
    """A shadow page as the kvmmmu tracepoints print it (mmud has no quadrants: q0, and never
    disables A/D bits: ad)."""
    return page_printk(sp.mmu_valid_gen, sp.gfn, sp.role, sp.root_count, sp.unsync)


PAGES_HEADER = f"{'sp':<16} {'unsync_children':>15} {'parents':>7} {'sptes':>5} kvm_mmu_page"


def render_pages(mmu: KvmMmu) -> str:
    """vm<N>/mmu/pages: the header, then each active shadow page, oldest first: its address
    (as the audit prints it), unsync children, parent sptes, MMU-present sptes, the page."""
    present = np.count_nonzero(mmu.pool.spt_array() & np.uint64(S.SPTE_MMU_PRESENT), axis=1)
    lines = [PAGES_HEADER]
    for sp in mmu.active_mmu_pages:
        lines.append(f"{sp_address(sp)} {sp.unsync_children:>15} {len(sp.parent_ptes):>7} "
                     f"{int(present[sp.index]):>5} {kvm_mmu_page_printk(sp)}")
    return "".join(f"{line}\n" for line in lines)


# --- mmu_rmaps_stat -------------------------------------------------------------------------

RMAP_LOG_SIZE = 11  # "covers statistics <1024 (11=log(1024)+1)"
KVM_NR_PAGE_SIZES = 3
KVM_LPAGE_STR = ("4K", "2M", "1G")


def _ffs(n: int) -> int:
    """ffs(): the 1-based index of the lowest set bit, 0 for 0."""
    return (n & -n).bit_length()


def kvm_mmu_slot_lpages(slot: Memslot, level: int) -> int:
    """How many rmap heads the slot has at `level` (1: 4K, 2: 2M, 3: 1G)."""
    shift = (level - 1) * PT64_LEVEL_BITS
    return ((slot.base_gfn + slot.npages - 1) >> shift) - (slot.base_gfn >> shift) + 1


def rmaps_stat(memslots: Memslots) -> list[list[int]]:
    """kvm_mmu_rmaps_stat_show()'s histogram: per page size, how many rmap heads hold a chain
    whose length has its lowest set bit at each index (`ffs(pte_list_count())`, capped at
    RMAP_LOG_SIZE - 1; index 0 counts the empty heads). mmud's sptes are all 4 KiB, so the
    2M and 1G heads are all empty: those rows count them in column 0."""
    log = [[0] * RMAP_LOG_SIZE for _ in range(KVM_NR_PAGE_SIZES)]
    cur = log[0]
    for slot in memslots:
        head = slot.rmap.head
        chained = len(slot.rmap.desc)
        single = int(np.count_nonzero(head)) - chained  # non-empty, but not MANY
        cur[0] += len(head) - single - chained
        cur[1] += single
        for entries in slot.rmap.desc.values():
            cur[min(_ffs(len(entries)), RMAP_LOG_SIZE - 1)] += 1
        for k in range(1, KVM_NR_PAGE_SIZES):
            log[k][0] += kvm_mmu_slot_lpages(slot, k + 1)
    return log


def render_rmaps_stat(memslots: Memslots) -> str:
    """kvm/<pid>-<fd>/mmu_rmaps_stat, in the kernel's format (tab after every field)."""
    out = ["Rmap_Count:\t0\t1\t"]
    out += [f"{1 << (i - 1)}-{(1 << i) - 1}\t" for i in range(2, RMAP_LOG_SIZE)]
    out.append("\n")
    for name, cur in zip(KVM_LPAGE_STR, rmaps_stat(memslots), strict=True):
        out.append(f"Level={name}:\t" + "".join(f"{c}\t" for c in cur) + "\n")
    return "".join(out)




# --- walk -----------------------------------------------------------------------------------

_GPTE_FLAGS = (("P", PT_PRESENT_MASK), ("W", PT_WRITABLE_MASK), ("U", PT_USER_MASK),
               ("A", PT_ACCESSED_MASK), ("D", PT_DIRTY_MASK), ("PS", PT_PAGE_SIZE_MASK),
               ("NX", PT64_NX_MASK))
_SPTE_FLAGS = (("P", PT_PRESENT_MASK), ("W", PT_WRITABLE_MASK), ("U", PT_USER_MASK),
               ("NX", PT64_NX_MASK), ("A", PT_ACCESSED_MASK), ("D", PT_DIRTY_MASK),
               ("mmu-writable", S.SPTE_MMU_WRITEABLE), ("host-writable", S.SPTE_HOST_WRITEABLE),
               ("mmu-present", S.SPTE_MMU_PRESENT))


def _flags(value: int, table: tuple[tuple[str, int], ...]) -> str:
    """Each flag by name when set, as dashes of the same width when clear."""
    return " ".join(name if value & bit else "-" * len(name) for name, bit in table)


def _slot_of(memslots: Memslots, gfn: int) -> Memslot | None:
    """The slot holding gfn, without touching the lookup cache."""
    return next((s for s in memslots if s.base_gfn <= gfn < s.end_gfn), None)


@dataclass
class _Guest:
    """The guest walk's outcome: a gfn and the rights of the whole walk, or where it stopped."""

    gfn: int | None = None
    access: int = 0
    leaf: int = 0  # the gpte that maps the page
    stop_level: int = 0
    stop: str = ""


def _guest_walk(vmmu: VcpuMmu, gva: int, lines: list[str]) -> _Guest:
    memslots = vmmu.kvm_mmu.memslots
    table = vmmu.vcpu.cr3 & CR3_ADDR_MASK
    access = ACC_ALL
    for level in (4, 3, 2, 1):
        gpa = table + 8 * pt_index(gva, level)
        slot = _slot_of(memslots, gpa >> PAGE_SHIFT)
        if slot is None:
            lines.append(f"  L{level} gpa {gpa:#018x} no memslot")
            return _Guest(stop_level=level, stop="its table is not in a memslot")
        gpte = slot.backing.u64[(gpa - (slot.base_gfn << PAGE_SHIFT)) >> 3]
        large = level == 2 and bool(gpte & PT_PAGE_SIZE_MASK)
        head = f"  L{level} gpa {gpa:#018x} gpte {gpte:#018x} {_flags(gpte, _GPTE_FLAGS)}"
        if not gpte & PT_PRESENT_MASK:
            lines.append(f"{head} not present")
            return _Guest(stop_level=level, stop="not present")
        rsvd = gpte & vmmu.rsvd_table[level * 2 + large]
        if rsvd:
            lines.append(f"{head} reserved bits {rsvd:#x}")
            return _Guest(stop_level=level, stop="reserved bits set")
        access &= gpte_access(gpte, vmmu.nxe)
        if large:
            base = gpte & PT64_LVL2_LARGE_ADDR_MASK
            gfn = (base >> PAGE_SHIFT) + pt_index(gva, 1)
            lines.append(f"{head} addr {base:#x} (2M) gfn {gfn:#x} {ACCESS_STR[access]}")
            return _Guest(gfn, access, gpte)
        addr = gpte & PT64_BASE_ADDR_MASK
        if level == 1:
            lines.append(f"{head} addr {addr:#x} gfn {addr >> PAGE_SHIFT:#x} {ACCESS_STR[access]}")
            return _Guest(addr >> PAGE_SHIFT, access, gpte)
        lines.append(f"{head} addr {addr:#x}")
        table = addr
    raise AssertionError("unreachable")


def _shadow_walk(vmmu: VcpuMmu, gva: int, lines: list[str]) -> tuple[ShadowPage, int] | None:
    """Print the shadow walk; the (sp, spte) it ends at, None without a root."""
    mmu = vmmu.kvm_mmu
    root = vmmu.root
    if root is None:
        lines.append("shadow walk: no root loaded")
        return None
    lines.append(f"shadow walk from root {sp_address(root)}:")
    end: tuple[ShadowPage, int] | None = None
    for sp, i, spte in mmu.shadow_walk(root, gva):
        head = (f"  L{sp.level} sp {sp_address(sp)}[{i}] spte {spte:#018x} "
                f"{_flags(spte, _SPTE_FLAGS)}")
        if S.is_mmio_spte(spte):
            lines.append(f"{head} mmio gfn {S.get_mmio_spte_gfn(spte):#x} "
                         f"access {ACCESS_STR[S.get_mmio_spte_access(spte)]} "
                         f"gen {S.get_mmio_spte_generation(spte)}")
        elif not S.is_shadow_present_pte(spte):
            lines.append(f"{head} not present")
        elif S.is_last_spte(spte, sp.level):
            lines.append(f"{head} pfn {S.spte_to_pfn(spte):#x} {ACCESS_STR[S.spte_access(spte)]}")
        else:
            lines.append(f"{head} child {sp_address(mmu.child_of(spte))}")
        end = (sp, spte)
    return end


def _verdict(vmmu: VcpuMmu, g: _Guest, end: tuple[ShadowPage, int] | None) -> str:
    memslots = vmmu.kvm_mmu.memslots
    sp, spte = end if end is not None else (None, 0)
    stale = " (its shadow page is unsync: stale until INVLPG or the next sync)" if (
        sp is not None and sp.unsync) else ""
    fails = f"the guest walk stops at L{g.stop_level}: {g.stop}"
    if sp is not None and S.is_mmio_spte(spte):
        mmio_gfn = S.get_mmio_spte_gfn(spte)
        gen = S.get_mmio_spte_generation(spte)
        if g.gfn is None:
            return f"disagree: an mmio spte for gfn {mmio_gfn:#x}, but {fails}{stale}"
        if mmio_gfn != g.gfn:
            return f"disagree: the mmio spte is for gfn {mmio_gfn:#x}, the guest maps gfn {g.gfn:#x}{stale}"
        current = memslots.generation & S.MMIO_SPTE_GEN_MASK
        if gen != current:
            return (f"agree: mmio at gfn {g.gfn:#x}, stale generation {gen} (memslots at "
                    f"{current}: the next access rewalks it)")
        if _slot_of(memslots, g.gfn) is not None:
            return f"disagree: an mmio spte for gfn {g.gfn:#x}, which is in a memslot"
        return f"agree: mmio at gfn {g.gfn:#x}, generation {gen}"
    if sp is None or not S.is_shadow_present_pte(spte):
        if g.gfn is None:
            return f"agree: neither maps it ({fails})"
        return "agree: not shadowed yet (the next access faults it in)"
    pfn = S.spte_to_pfn(spte)
    if g.gfn is None:
        return f"disagree: the spte maps pfn {pfn:#x}, but {fails}{stale}"
    slot = _slot_of(memslots, g.gfn)
    if slot is None:
        return f"disagree: the spte maps pfn {pfn:#x}, but gfn {g.gfn:#x} is in no memslot{stale}"
    if pfn != slot.gfn_to_pfn(g.gfn):
        return (f"disagree: the spte maps pfn {pfn:#x}, gfn {g.gfn:#x} is pfn "
                f"{slot.gfn_to_pfn(g.gfn):#x}{stale}")
    have = S.spte_access(spte)
    allowed = g.access
    if have & ACC_WRITE_MASK and not vmmu.cr0_wp and not have & ACC_USER_MASK:
        allowed |= ACC_WRITE_MASK  # CR0.WP=0: a supervisor-only spte may write (make_spte)
    if have & ~allowed:
        return (f"disagree: the spte allows {ACCESS_STR[have]}, the guest only "
                f"{ACCESS_STR[g.access]}{stale}")
    if spte & PT_WRITABLE_MASK and not g.leaf & PT_DIRTY_MASK:
        return f"disagree: the spte is writable but the gpte is not dirty{stale}"
    return (f"agree: gfn {g.gfn:#x} is pfn {pfn:#x} in both; the spte allows "
            f"{ACCESS_STR[have]}, the guest {ACCESS_STR[g.access]}")


def render_walk(vmmu: VcpuMmu, gva: int) -> str:
    """vm<N>/mmu/walk: the guest walk of gva from the vCPU's CR3, the shadow walk from its
    root, and whether they agree: the same frame, and no right in the spte the guest's walk
    does not grant (a writable spte also needs a dirty gpte)."""
    note = "" if is_canonical(gva) else " (non-canonical: an access raises #GP)"
    lines = [f"gva {gva:#018x} vcpu {vmmu.vcpu.index} cr3 {vmmu.vcpu.cr3:#x}{note}",
             "guest walk:"]
    g = _guest_walk(vmmu, gva, lines)
    end = _shadow_walk(vmmu, gva, lines)
    lines.append(_verdict(vmmu, g, end))
    return "".join(f"{line}\n" for line in lines)

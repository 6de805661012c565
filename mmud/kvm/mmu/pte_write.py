"""Emulated guest writes to shadowed page tables: `kvm_mmu_pte_write` (v5.16).

Every write the emulator performs reaches here through page tracking. Each valid indirect
sp of the written gfn either is zapped whole (misaligned write, or write flooding: three
emulated writes to a non-leaf table with no access through it in between) or has the written
spte zapped; the next access faults and builds it from the new gpte. (Kernels up to v5.11
also rebuilt a level-1 spte at once, counted as mmu_pte_updated; v5.12 dropped that.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mmud.kvm.mmu import spte as S
from mmud.kvm.mmu import zap
from mmud.kvm.mmu.audit import AUDIT_POST_PTE_WRITE, AUDIT_PRE_PTE_WRITE, kvm_mmu_audit
from mmud.kvm.mmu.mmu import KvmMmu
from mmud.kvm.mmu.page import ShadowPage
from mmud.x86.paging import PAGE_SHIFT, PAGE_SIZE

if TYPE_CHECKING:
    from mmud.kvm.mmu.vcpu_mmu import VcpuMmu

WRITE_FLOOD_THRESHOLD = 3
PTE_SIZE = 8  # 64-bit guests only: gpte_is_8_bytes


def detect_write_misaligned(offset: int, nbytes: int) -> bool:
    if not offset & (PTE_SIZE - 1) and nbytes == 1:
        return False
    misaligned = (offset ^ (offset + nbytes - 1)) & ~(PTE_SIZE - 1)
    return bool(misaligned) or nbytes < 4


def detect_write_flooding(sp: ShadowPage) -> bool:
    """Level-1 pages never flood (they can go unsync instead)."""
    if sp.level == 1:
        return False
    sp.write_flooding_count += 1
    return sp.write_flooding_count >= WRITE_FLOOD_THRESHOLD


def need_remote_flush(old: int, new: int) -> bool:
    if not old & S.SPTE_MMU_PRESENT:
        return False
    if not new & S.SPTE_MMU_PRESENT:
        return True
    if (old ^ new) & S.SPTE_BASE_ADDR_MASK:
        return True
    old ^= S.PT64_NX_MASK
    new ^= S.PT64_NX_MASK
    return bool(old & ~new & S.SPTE_PERM_MASK)


def kvm_mmu_pte_write(mmu: KvmMmu, vmmu: VcpuMmu, gpa: int, nbytes: int) -> None:
    """The guest wrote nbytes at gpa (already in memory); update the shadow of that gpte."""
    if not mmu.indirect_shadow_pages:
        return
    gfn = gpa >> PAGE_SHIFT
    if mmu.obs: mmu.obs.pte_write(gfn)  # observer
    # mmu_pte_write_fetch_gpte(): a PAE/64-bit guest's 4-byte write is widened to its gpte.
    if nbytes == 4:
        gpa &= ~7
        nbytes = 8
    gentry = 0
    if nbytes == 8:
        gentry = mmu.memslots.read_u64(gpa) or 0
    mmu.stat["mmu_pte_write"] += 1
    if mmu.audit_enabled: kvm_mmu_audit(mmu, vmmu, AUDIT_PRE_PTE_WRITE, gfn)  # audit point
    offset = gpa & (PAGE_SIZE - 1)
    invalid_list: list[ShadowPage] = []
    remote_flush = local_flush = False
    for sp in mmu.indirect_valid_sps_of_gfn(gfn) if mmu.bug != "pte_write_ignored" else ():
        if sp.invalid:
            continue  # zapped earlier in this loop
        if detect_write_misaligned(offset, nbytes) or detect_write_flooding(sp):
            zap.prepare_zap_page(mmu, sp, invalid_list)
            mmu.stat["mmu_flooded"] += 1
            continue
        i = offset // PTE_SIZE
        local_flush = True
        old = sp.spt[i]
        zap.mmu_page_zap_pte(mmu, sp, i)
        if gentry and sp.level != 1:
            mmu.stat["mmu_pde_zapped"] += 1
        if need_remote_flush(old, sp.spt[i]):
            remote_flush = True
    zap.kvm_mmu_flush_or_zap(mmu, vmmu, invalid_list, remote_flush, local_flush)
    if mmu.audit_enabled: kvm_mmu_audit(mmu, vmmu, AUDIT_POST_PTE_WRITE)  # audit point

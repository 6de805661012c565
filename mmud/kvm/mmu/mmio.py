"""MMIO sptes: caching "no memslot here" in the shadow tables (arch/x86/kvm/mmu/mmu.c ≈v5.6).

A guest access to a gfn no memslot backs is emulated (the VMM's device answers it). The
fault that found out installs an MMIO spte — reserved bit 51 set, so the next access faults
with RSVD at once — holding the gfn, the access rights and the memslot generation. The RSVD
fault then takes `handle_mmio_page_fault` straight to emulation, without a guest walk.

Staleness is handled by the generation, never by finding the sptes: every memslot update
adds KVM_ADDRESS_SPACE_NUM to it, and an MMIO spte (or a vCPU's cached MMIO info) of
another generation no longer counts — the access re-runs the normal fault, which re-resolves
the gfn (it may be RAM now). Only when the 19 generation bits an spte holds wrap around
could a stale spte look current again; then every shadow page is zapped.

The spte layout itself is spte.py's; the vCPU's MMIO info cache (vcpu->arch.mmio_*) is the
vCPU's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import structlog

from mmud.kvm.memslot import KVM_ADDRESS_SPACE_NUM, KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS
from mmud.kvm.mmu import spte as S
from mmud.kvm.mmu.mmu import RET_PF_EMULATE, RET_PF_INVALID, RET_PF_RETRY, KvmMmu
from mmud.kvm.mmu.page import ShadowPage
from mmud.kvm.ratelimit import Ratelimit

if TYPE_CHECKING:
    from mmud.kvm.mmu.vcpu_mmu import VcpuMmu

# The host's reserved physical-address bit that MMIO sptes borrow (host MAXPHYADDR < 52).
SPTE_RSVD_MASK = S.SHADOW_MMIO_VALUE & ~S.PT_PRESENT_MASK
_WRAP_MESSAGE = "kvm: zapping shadow pages for mmio generation wraparound"

log = structlog.get_logger("mmud.kvm")


class KvmInternalError(RuntimeError):
    """KVM found its own tables corrupt and fails KVM_RUN with -EINVAL."""


def mark_mmio_spte(mmu: KvmMmu, vmmu: VcpuMmu, sp: ShadowPage, i: int, gfn: int, access: int) -> int:
    """Install an MMIO spte for a gfn without memslot; the access is then emulated."""
    if sp.spt[i] & S.SPTE_MMU_PRESENT:
        mmu.drop_spte(sp, i)
        mmu.kvm_flush_remote_tlbs()
    sp.spt[i] = S.make_mmio_spte(gfn, access, mmu.memslots.generation)
    vmmu.stat["pf_mmio_spte_created"] += 1
    return RET_PF_EMULATE


def check_mmio_spte(mmu: KvmMmu, spte: int) -> bool:
    """The MMIO spte belongs to the current memslot generation (none while one is updated)."""
    gen = mmu.memslots.generation
    if gen & KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS:
        return False
    return gen & S.MMIO_SPTE_GEN_MASK == S.get_mmio_spte_generation(spte)


def sync_mmio_spte(mmu: KvmMmu, sp: ShadowPage, i: int, gfn: int, access: int) -> bool:
    """During sync_page: an MMIO spte follows its gpte; True if entry i was one.

    A gpte that now names another gfn drops the spte; otherwise it is rewritten with the
    current generation (the next access then emulates; the emulator finds RAM if a memslot
    has appeared there meanwhile).
    """
    old = sp.spt[i]
    if not S.is_mmio_spte(old):
        return False
    if gfn != S.get_mmio_spte_gfn(old):
        sp.spt[i] = 0
    else:
        sp.spt[i] = S.make_mmio_spte(gfn, access, mmu.memslots.generation)
    return True


def handle_mmio_page_fault(mmu: KvmMmu, vmmu: VcpuMmu, gva: int) -> int:
    """An RSVD fault: EMULATE (a current MMIO spte or cached info), INVALID (a stale MMIO
    spte: run the normal fault, which re-resolves the gfn) or RETRY (zapped meanwhile)."""
    if vmmu.match_mmio_gva(gva):
        return RET_PF_EMULATE
    assert vmmu.root is not None, "the faulting access walked the root"
    sptes = [(spte, sp.level) for sp, _, spte in mmu.shadow_walk(vmmu.root, gva)]
    spte, _ = sptes[-1]
    if S.is_shadow_present_pte(spte) and spte & SPTE_RSVD_MASK:
        head = f"handle_mmio_page_fault: detect reserved bits on spte, addr {gva:#x}, dump hierarchy:"
        lines = [head]
        lines += [f"------ spte {s:#x} level {lvl}." for s, lvl in sptes]
        log.error("mmu_reserved_spte", message="\n".join(lines))
        raise KvmInternalError(lines[0])
    if not S.is_mmio_spte(spte):
        return RET_PF_RETRY
    if not check_mmio_spte(mmu, spte):
        return RET_PF_INVALID
    vmmu.cache_mmio_info(gva, S.get_mmio_spte_gfn(spte), S.get_mmio_spte_access(spte))
    return RET_PF_EMULATE


def mmio_generation_wrapped(gen: int, now_ns: int, limit: Ratelimit) -> bool:
    """kvm_mmu_invalidate_mmio_sptes()'s test, after a memslot update made generation gen.

    Generations step by KVM_ADDRESS_SPACE_NUM, so the address-space bits are stripped
    before looking for a wrap of the bits an MMIO spte holds. On a wrap the caller zaps
    every shadow page; the kernel's rate-limited debug message is logged here (`limit`:
    kvm_debug_ratelimited()'s state, one per module).
    """
    gen &= S.MMIO_SPTE_GEN_MASK & ~(KVM_ADDRESS_SPACE_NUM - 1)
    if gen:
        return False
    if limit.allow(now_ns, []):
        log.debug("mmio_generation_wraparound", message=_WRAP_MESSAGE)
    return True

"""MMIO sptes: caching "no memslot here" in the shadow tables (arch/x86/kvm/mmu/mmu.c, v5.16).

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

import os
from typing import TYPE_CHECKING

import structlog

from mmud.kvm.memslot import KVM_ADDRESS_SPACE_NUM, KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS
from mmud.kvm.mmu import spte as S
from mmud.kvm.mmu.mmu import RET_PF_EMULATE, RET_PF_INVALID, RET_PF_RETRY, KvmMmu
from mmud.kvm.mmu.page import ShadowPage
from mmud.kvm.ratelimit import Ratelimit
from mmud.x86.paging import PT_PAGE_SIZE_MASK, rsvd_bits

if TYPE_CHECKING:
    from mmud.kvm.mmu.vcpu_mmu import VcpuMmu

_WRAP_MESSAGE = "kvm: zapping shadow pages for mmio generation wraparound"


def kvm_debug_ratelimited(message: str) -> str:
    """The line kvm_debug_ratelimited() prints: pr_debug's `kvm [<pid>]: ` prefix, the pid
    being the task that made the ioctl (the process running the VM)."""
    return f"kvm [{os.getpid()}]: {message}"

log = structlog.get_logger("mmud.kvm")


class KvmInternalError(RuntimeError):
    """KVM found its own tables corrupt and fails KVM_RUN with -EINVAL."""


def mark_mmio_spte(mmu: KvmMmu, vmmu: VcpuMmu, sp: ShadowPage, i: int, gfn: int, access: int) -> int:
    """Install an MMIO spte for a gfn without memslot; the access is then emulated."""
    if sp.spt[i] & S.SPTE_MMU_PRESENT:
        mmu.drop_spte(sp, i)
        mmu.kvm_flush_remote_tlbs()
    spte = S.make_mmio_spte(gfn, access, mmu.memslots.generation)
    if mmu.obs: mmu.obs.mark_mmio_spte(sp, i, gfn, spte)  # observer
    sp.spt[i] = spte
    vmmu.stat["pf_mmio_spte_created"] += 1
    return RET_PF_EMULATE


def check_mmio_spte(mmu: KvmMmu, spte: int) -> bool:
    """The MMIO spte belongs to the current memslot generation (none while one is updated)."""
    gen = mmu.memslots.generation
    if gen & KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS:
        return False
    kvm_gen = gen & S.MMIO_SPTE_GEN_MASK
    spte_gen = S.get_mmio_spte_generation(spte)
    if mmu.obs: mmu.obs.check_mmio_spte(spte, kvm_gen, spte_gen)  # observer
    return kvm_gen == spte_gen


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
    else:  # mark_mmio_spte()
        spte = S.make_mmio_spte(gfn, access, mmu.memslots.generation)
        if mmu.obs: mmu.obs.mark_mmio_spte(sp, i, gfn, spte)  # observer
        sp.spt[i] = spte
    return True


def handle_mmio_page_fault(mmu: KvmMmu, vmmu: VcpuMmu, gva: int) -> int:
    """An RSVD fault: EMULATE (a current MMIO spte or cached info), INVALID (a stale MMIO
    spte: run the normal fault, which re-resolves the gfn) or RETRY (zapped meanwhile)."""
    if vmmu.match_mmio_gva(gva):
        return RET_PF_EMULATE
    spte = get_mmio_spte(mmu, vmmu, gva)
    if not S.is_mmio_spte(spte):
        return RET_PF_RETRY
    if not check_mmio_spte(mmu, spte):
        return RET_PF_INVALID
    gfn = S.get_mmio_spte_gfn(spte)
    access = S.get_mmio_spte_access(spte)
    if mmu.obs: mmu.obs.handle_mmio_page_fault(gva, gfn, access)  # observer
    vmmu.cache_mmio_info(gva, gfn, access)
    return RET_PF_EMULATE


def get_mmio_spte(mmu: KvmMmu, vmmu: VcpuMmu, gva: int) -> int:
    """get_mmio_spte() (v5.16): the last spte of gva's shadow walk, after checking every
    MMU-present spte on the way for reserved bits (is_rsvd_spte with the shadow zero check:
    the host's reserved bits). A non-present terminal spte — an MMIO spte among them, whose
    reserved bit is by design — is not checked. A reserved bit in a present spte is a KVM
    bug: pr_err lines, then KVM_RUN fails with -EINVAL (KvmInternalError).

    Deviation: the kernel's walk goes on through an spte with reserved bits (reading
    whatever its address points at); mmud's ends there, so the hierarchy it prints stops at
    the bad spte."""
    assert vmmu.root is not None, "the faulting access walked the root"
    masks: list[tuple[int, int, int]] = []
    for sp, _, spte in mmu.shadow_walk(vmmu.root, gva):
        mask = rsvd_bits(sp.level, bool(spte & PT_PAGE_SIZE_MASK) and sp.level == 2, True)
        if S.is_shadow_present_pte(spte):
            masks.append((spte, sp.level, mask))
            if spte & mask:
                break
    if any(s & mask for s, _, mask in masks):
        lines = [f"get_mmio_spte: reserved bits set on MMU-present spte, addr {gva:#x}, hierarchy:"]
        lines += [f"------ spte = {s:#x} level = {level}, rsvd bits = {mask:#x}" for s, level, mask in masks]
        log.error("mmu_reserved_spte", message="\n".join(lines))
        raise KvmInternalError(lines[0])
    return spte


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
        log.debug("mmio_generation_wraparound", message=kvm_debug_ratelimited(_WRAP_MESSAGE))
    return True

"""vCPU roots: loading, freeing, and the cache of previous roots used on CR3 switches.

A root is the level-4 shadow page of the guest's CR3; `root_count` pins it so zapping only
marks it invalid. Up to KVM_MMU_NUM_PREV_ROOTS previous (cr3, root) pairs are kept so that
switching back to a recent address space reuses its shadow tree (fast_pgd_switch, v5.16).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mmud.kvm.mmu.get_page import kvm_mmu_get_page
from mmud.kvm.mmu import sync, zap
from mmud.kvm.mmu.mmu import KvmMmu
from mmud.kvm.mmu.page import ShadowPage
from mmud.kvm.mmu.vcpu_mmu import KVM_MMU_NUM_PREV_ROOTS
from mmud.x86.paging import ACC_ALL, CR3_ADDR_MASK, PAGE_SHIFT, PT64_ROOT_4LEVEL

if TYPE_CHECKING:
    from mmud.kvm.mmu.vcpu_mmu import VcpuMmu



class TripleFault(Exception):
    """The guest's CR3 points outside every memslot (mmu_check_root): the vCPU shuts down."""


def mmu_alloc_roots(mmu: KvmMmu, vmmu: VcpuMmu) -> None:
    root_gfn = (vmmu.vcpu.cr3 & CR3_ADDR_MASK) >> PAGE_SHIFT
    if mmu.memslots.lookup(root_gfn) is None:
        raise TripleFault(f"CR3 {vmmu.vcpu.cr3:#x} is not in guest RAM")
    zap.make_mmu_pages_available(mmu)
    sp = kvm_mmu_get_page(mmu, vmmu, root_gfn, PT64_ROOT_4LEVEL, False, ACC_ALL)
    sp.root_count += 1
    vmmu.root = sp
    vmmu.root_cr3 = vmmu.vcpu.cr3


def kvm_mmu_load(mmu: KvmMmu, vmmu: VcpuMmu) -> None:
    """Allocate the root, sync it and start from an empty TLB."""
    mmu_alloc_roots(mmu, vmmu)
    sync.kvm_mmu_sync_roots(mmu, vmmu)
    vmmu.vcpu.flush_tlb_current()


def mmu_free_root_page(mmu: KvmMmu, sp: ShadowPage, invalid_list: list[ShadowPage]) -> None:
    sp.root_count -= 1
    if not sp.root_count and sp.invalid:
        zap.prepare_zap_page(mmu, sp, invalid_list)


def kvm_mmu_free_roots(mmu: KvmMmu, vmmu: VcpuMmu, *, current: bool, previous: bool) -> None:
    invalid_list: list[ShadowPage] = []
    if previous:
        for k, (_, sp) in enumerate(vmmu.prev_roots):
            if sp is not None:
                mmu_free_root_page(mmu, sp, invalid_list)
            vmmu.prev_roots[k] = (0, None)
    if current and vmmu.root is not None:
        mmu_free_root_page(mmu, vmmu.root, invalid_list)
        vmmu.root = None
    zap.commit_zap_page(mmu, invalid_list)


def kvm_mmu_unload(mmu: KvmMmu, vmmu: VcpuMmu) -> None:
    kvm_mmu_free_roots(mmu, vmmu, current=True, previous=True)


def cached_root_available(vmmu: VcpuMmu, new_cr3: int, new_role: int) -> ShadowPage | None:
    """Swap the current root into the cache, looking for one usable for new_cr3 (LRU order);
    the root found, now current, or None."""
    root = (vmmu.root_cr3, vmmu.root)
    for k in range(KVM_MMU_NUM_PREV_ROOTS):
        root, vmmu.prev_roots[k] = vmmu.prev_roots[k], root
        cr3, sp = root
        if sp is not None and cr3 == new_cr3 and sp.role == new_role:
            vmmu.root_cr3, vmmu.root = new_cr3, sp
            return sp
    # Not found: the evicted oldest entry becomes "current" and is freed by the caller.
    vmmu.root_cr3, vmmu.root = new_cr3, root[1]
    return None


def kvm_mmu_new_cr3(mmu: KvmMmu, vmmu: VcpuMmu, new_cr3: int) -> None:
    """MOV CR3 to a new value: reuse a cached root (fast switch) or drop the current one."""
    new_role = vmmu.root_role()
    if mmu.memslots.lookup((new_cr3 & CR3_ADDR_MASK) >> PAGE_SHIFT) is not None and (
        root := cached_root_available(vmmu, new_cr3, new_role)
    ):
        vmmu.vcpu.request_mmu_sync()
        vmmu.vcpu.request_tlb_flush()
        root.write_flooding_count = 0
        return
    kvm_mmu_free_roots(mmu, vmmu, current=True, previous=False)

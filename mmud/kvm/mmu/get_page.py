"""kvm_mmu_get_page(): find the shadow page for (gfn, role), or build it.

It sits above sync.py and zap.py, which it calls (an unsync page found is resynced or
zapped, a new upper-level table syncs the unsync pages of its gfn), and below the paths
that build shadow tables: FNAME(fetch) in paging_tmpl.py and the root allocation in roots.py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mmud.kvm.mmu import sync, zap
from mmud.kvm.mmu.mmu import KvmMmu
from mmud.kvm.mmu.page import ShadowPage, hash_64, make_role

if TYPE_CHECKING:
    from mmud.kvm.mmu.vcpu_mmu import VcpuMmu


def kvm_mmu_get_page(
    mmu: KvmMmu, vmmu: VcpuMmu, gfn: int, level: int, direct: bool, access: int
) -> ShadowPage:
    """Find the sp for (gfn, role) or build it."""
    if mmu.obs: mmu.obs.hash_lookup(gfn)  # observer
    role = make_role(vmmu.base_role, level, direct, access)
    collisions = 0
    need_sync = False
    invalid_list: list[ShadowPage] = []
    found = None
    bucket = mmu.page_hash.get(hash_64(gfn))
    if bucket:
        for sp in reversed(list(bucket)):
            if sp.invalid or sp.mmu_valid_gen != mmu.mmu_valid_gen:
                continue
            if sp.gfn != gfn:
                collisions += 1
                continue
            if not need_sync and sp.unsync:
                need_sync = True
            if sp.role != role:
                continue
            if sp.unsync:
                if not sync.resync_page(mmu, vmmu, sp, invalid_list):
                    break
                mmu.kvm_flush_remote_tlbs()
            if sp.unsync_children:
                vmmu.vcpu.request_mmu_sync()
            sp.write_flooding_count = 0
            found = sp
            break
    created = found is None
    if found is None:
        mmu.stat["mmu_cache_miss"] += 1
        found = mmu.alloc_page(gfn, role)
        flush = False
        if not direct:
            mmu.account_shadowed(found)
            if level == 1 and mmu.bug != "write_protect_skipped" and mmu.rmap_write_protect(gfn):
                mmu.kvm_flush_remote_tlbs()
            if level > 1 and need_sync:
                flush = sync.kvm_sync_pages(mmu, vmmu, gfn, invalid_list)
        zap.kvm_mmu_flush_or_zap(mmu, vmmu, invalid_list, False, flush)
    elif invalid_list:
        zap.commit_zap_page(mmu, invalid_list)
    # The kernel traces before committing the zaps, which have no tracepoint of their own.
    if mmu.obs: mmu.obs.kvm_mmu_get_page(found, created)  # observer
    if collisions > mmu.stat["max_mmu_page_hash_collisions"]:
        mmu.stat["max_mmu_page_hash_collisions"] = collisions
    return found

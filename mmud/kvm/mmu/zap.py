"""Zapping shadow pages: one page, the oldest pages for the budget, and all of them.

`prepare_zap_page` + `commit_zap_page` follow __kvm_mmu_prepare_zap_page and
kvm_mmu_commit_zap_page (≈v5.6): a zapped sp loses its children links, its parent sptes and
its write protection; if a vCPU still uses it as a root it stays on the active list, marked
invalid, until the last root reference is dropped.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from mmud.kvm.mmu import spte as S
from mmud.kvm.mmu.mmu import (
    KVM_MIN_FREE_MMU_PAGES,
    KVM_REFILL_PAGES,
    KvmMmu,
)
from mmud.kvm.mmu.page import ShadowPage, spte_index, sptep_page

if TYPE_CHECKING:
    from mmud.kvm.mmu.vcpu_mmu import VcpuMmu

BATCH_ZAP_PAGES = 10


def mmu_page_zap_pte(mmu: KvmMmu, sp: ShadowPage, i: int) -> bool:
    """Clear entry i of sp: unlink a child or drop a leaf. True if it was present."""
    spte = sp.spt[i]
    if spte & S.SPTE_MMU_PRESENT:
        if S.is_last_spte(spte, sp.level):
            mmu.drop_spte(sp, i)
        else:
            mmu.drop_parent_pte(mmu.child_of(spte), sp, i)
        return True
    if S.is_mmio_spte(spte):
        if mmu.obs: mmu.obs.zap_mmio_spte(sp, i)  # observer
        sp.spt[i] = 0
    return False


def _unlink_children(mmu: KvmMmu, sp: ShadowPage) -> None:
    spt = sp.spt
    for i in sp.sptes.nonzero()[0].tolist():
        if spt[i]:
            mmu_page_zap_pte(mmu, sp, i)


def _unlink_parents(mmu: KvmMmu, sp: ShadowPage) -> None:
    pages = mmu.pool.pages
    for sptep in list(sp.parent_ptes):
        mmu.drop_parent_pte(sp, pages[sptep_page(sptep)], spte_index(sptep))


def prepare_zap_page(mmu: KvmMmu, sp: ShadowPage, invalid_list: list[ShadowPage]) -> int:
    """__kvm_mmu_prepare_zap_page(); returns how many pages it moved to invalid_list."""
    if mmu.obs: mmu.obs.prepare_zap_page(sp)  # observer
    mmu.stat["mmu_shadow_zapped"] += 1
    nr_zapped = 0
    if sp.level > 1:
        for child in mmu.mmu_unsync_walk(sp):
            if child in mmu.active_mmu_pages and not child.invalid:
                nr_zapped += prepare_zap_page(mmu, child, invalid_list)
    _unlink_children(mmu, sp)
    _unlink_parents(mmu, sp)
    if not sp.invalid and not sp.direct:
        mmu.unaccount_shadowed(sp)
    if sp.unsync:
        mmu.kvm_unlink_unsync_page(sp)
    if not sp.root_count:
        nr_zapped += 1
        del mmu.active_mmu_pages[sp]
        invalid_list.append(sp)
        mmu.n_used_mmu_pages -= 1
    else:
        # Still a root somewhere: move to the head, and ask the vCPUs to let go of it.
        del mmu.active_mmu_pages[sp]
        mmu.active_mmu_pages[sp] = None
        if not mmu.is_obsolete_sp(sp):
            mmu.kvm_reload_remote_mmus()
    sp.mark_invalid()
    return nr_zapped


def commit_zap_page(mmu: KvmMmu, invalid_list: list[ShadowPage]) -> None:
    """kvm_mmu_commit_zap_page(): one remote flush, then free every page of the list."""
    if not invalid_list:
        return
    mmu.kvm_flush_remote_tlbs()
    for sp in invalid_list:
        mmu.free_page(sp)
    invalid_list.clear()




def kvm_mmu_flush_or_zap(
    mmu: KvmMmu, vmmu: VcpuMmu, invalid_list: list[ShadowPage], remote_flush: bool, local_flush: bool
) -> None:
    if invalid_list:
        commit_zap_page(mmu, invalid_list)
        return
    if remote_flush:
        mmu.kvm_flush_remote_tlbs()
        return
    if local_flush:
        vmmu.vcpu.request_tlb_flush()


def prepare_zap_oldest_mmu_page(mmu: KvmMmu, invalid_list: list[ShadowPage]) -> bool:
    """v5.6: zap the tail of active_mmu_pages; False if there is none to zap."""
    if not mmu.active_mmu_pages:
        return False
    sp = next(iter(mmu.active_mmu_pages))
    return prepare_zap_page(mmu, sp, invalid_list) > 0


def make_mmu_pages_available(mmu: KvmMmu) -> bool:
    """Keep KVM_MIN_FREE_MMU_PAGES free, recycling the oldest pages; False = -ENOSPC."""
    if mmu.kvm_mmu_available_pages() >= KVM_MIN_FREE_MMU_PAGES:
        return True
    invalid_list: list[ShadowPage] = []
    while mmu.kvm_mmu_available_pages() < KVM_REFILL_PAGES:
        if not prepare_zap_oldest_mmu_page(mmu, invalid_list):
            break
        mmu.stat["mmu_recycled"] += 1
    commit_zap_page(mmu, invalid_list)
    return mmu.kvm_mmu_available_pages() > 0


def kvm_mmu_change_mmu_pages(mmu: KvmMmu, goal: int) -> None:
    """Set the page budget; zap oldest pages until the pool fits (not counted as recycled)."""
    if mmu.n_used_mmu_pages > goal:
        invalid_list: list[ShadowPage] = []
        while mmu.n_used_mmu_pages > goal:
            if not prepare_zap_oldest_mmu_page(mmu, invalid_list):
                break
        commit_zap_page(mmu, invalid_list)
        goal = mmu.n_used_mmu_pages
    mmu.n_max_mmu_pages = goal


def kvm_mmu_set_nr_mmu_pages(mmu: KvmMmu, nr: int) -> None:
    """KVM_SET_NR_MMU_PAGES (the caller has refused nr < KVM_MIN_ALLOC_MMU_PAGES)."""
    mmu.n_requested_mmu_pages = nr
    kvm_mmu_change_mmu_pages(mmu, nr)


def kvm_mmu_unprotect_page(mmu: KvmMmu, gfn: int) -> bool:
    """Zap every indirect sp of gfn so the guest may write the page freely again."""
    invalid_list: list[ShadowPage] = []
    found = False
    for sp in mmu.indirect_valid_sps_of_gfn(gfn):
        found = True
        prepare_zap_page(mmu, sp, invalid_list)
    commit_zap_page(mmu, invalid_list)
    return found


class ZapRun:
    """One zap of every shadow page, as the MMU lock saw it.

    `hold()` runs the zap up to its next lock break (cond_resched_lock), where whoever
    drives the zap lets the vCPUs run. The figures are the simulating thread's CPU time with
    the lock held, so that other processes taking the host's CPUs do not show as stalls:
    `max_hold_ns` is the longest stretch without a break, i.e. the longest any vCPU waiting
    for the MMU lock stalls.
    """

    def __init__(self, fast: bool, walk: Callable[[ZapRun], Iterator[None]]) -> None:
        self.fast = fast
        self.pages = 0  # pages freed
        self.breaks = 0
        self.hold_ns = 0  # total time the lock was held
        self.max_hold_ns = 0
        self.done = False
        self._holds = walk(self)

    def hold(self) -> bool:
        """Run up to the next lock break; False once the zap is complete."""
        if self.done:
            return False
        t0 = time.thread_time_ns()
        try:
            next(self._holds)
        except StopIteration:
            self.done = True
        held = time.thread_time_ns() - t0
        self.hold_ns += held
        self.max_hold_ns = max(self.max_hold_ns, held)
        self.breaks += not self.done
        return not self.done

    def finish(self) -> None:
        """Run to the end; the breaks are taken but nothing else runs in them."""
        while self.hold():
            pass

    def task(self) -> Iterator[None]:
        """The zap as a scheduler task: each step holds the lock up to the next break."""
        while self.hold():
            yield


def _zap_all_walk(mmu: KvmMmu, run: ZapRun) -> Iterator[None]:
    """kvm_mmu_zap_all as before ≈v3.11: one walk, newest first, without a lock break.

    Invalid pages still pinned as roots are skipped: they go when their vCPUs drop them.
    (≈v5.6 added cond_resched_lock() to this walk; mmud keeps the old form as the
    comparison the fast zap was introduced against.)
    """
    invalid_list: list[ShadowPage] = []
    for sp in reversed(list(mmu.active_mmu_pages)):
        if sp in mmu.active_mmu_pages and not (sp.invalid and sp.root_count):
            run.pages += prepare_zap_page(mmu, sp, invalid_list)
    commit_zap_page(mmu, invalid_list)
    yield from ()  # no lock break


def kvm_mmu_zap_all(mmu: KvmMmu) -> ZapRun:
    """The slow whole-VM zap: every page one by one with the lock held throughout."""
    return ZapRun(False, lambda run: _zap_all_walk(mmu, run))


def kvm_zap_obsolete_pages(mmu: KvmMmu, run: ZapRun) -> Iterator[None]:
    """Zap obsolete pages oldest first, BATCH_ZAP_PAGES per lock hold.

    The walk starts at the tail and stops at the first valid page: active_mmu_pages is a
    FIFO, so everything newer than a valid page is valid too (pages the vCPUs build during
    a lock break are new). Invalid pages pinned as roots are skipped; they are freed when
    their vCPUs drop them. After a break the walk restarts from the tail. No TLB flush per
    page: every vCPU has been asked to load a new root, and the zapped pages are committed,
    with one remote flush, at the end.
    """
    invalid_list: list[ShadowPage] = []
    active = mmu.active_mmu_pages
    while True:
        batch = 0
        lock_break = False
        for sp in list(active):  # a copy: zapping reorders and shrinks the list
            if not mmu.is_obsolete_sp(sp):
                break
            if sp not in active or (sp.invalid and sp.root_count):
                continue
            if batch >= BATCH_ZAP_PAGES:
                lock_break = True
                break
            nr_zapped = prepare_zap_page(mmu, sp, invalid_list)
            batch += nr_zapped
            run.pages += nr_zapped
        if not lock_break:
            break
        yield  # cond_resched_lock(&kvm->mmu_lock): vCPUs run, then the walk restarts
    commit_zap_page(mmu, invalid_list)


def kvm_mmu_zap_all_fast(mmu: KvmMmu) -> ZapRun:
    """Invalidate every shadow page at once by toggling mmu_valid_gen (≈v5.4).

    The toggle and the reload request happen now, under the lock, so no vCPU can miss
    them: lookups skip obsolete pages from here on, and every vCPU drops its roots at its
    next entry. The returned run frees the obsolete pages; drive it to the end (`finish`)
    or let vCPUs run in its lock breaks (`task`). The caller serialises zaps (slots_lock):
    with a 0/1 generation there must never be two obsolete generations at once.
    """
    mmu.mmu_valid_gen ^= 1
    mmu.kvm_reload_remote_mmus()
    return ZapRun(True, lambda run: kvm_zap_obsolete_pages(mmu, run))

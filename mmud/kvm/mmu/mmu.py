"""The shadow MMU of one VM (`kvm->arch` MMU state) and its core operations.

Mirrors arch/x86/kvm/mmu/mmu.c of v5.16 (the legacy shadow MMU): the shadow-page hash and active list, rmaps,
write protection through page_track, unsync marking, and installing sptes (set_spte /
mmu_set_spte). Paths that use these live beside it: paging_tmpl.py (guest walk and page
fault), sync.py, zap.py, pte_write.py, roots.py.

Invariants kept here (checked by tests and the audit):
- every present leaf spte is in the level-1 rmap of its gfn, and nothing else is;
- every shadowed guest table (indirect sp) is write-protected unless its sp is unsync;
  upper-level tables are write-tracked and can never go unsync;
- each present non-leaf spte is on its child's parent_ptes; a parent's unsync_children equals
  the popcount of its unsync_child_bitmap.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from mmud.kvm.memslot import Memslot, Memslots
from mmud.kvm.mmu import spte as S
from mmud.kvm.mmu.observer import MmuObserver, combine
from mmud.kvm.mmu.page import (
    ShadowPage,
    ShadowPagePool,
    hash_64,
    spte_index,
    sptep_of,
    sptep_page,
)
from mmud.x86.paging import ACC_WRITE_MASK, PT_DIRTY_MASK, PT_WRITABLE_MASK, pt_index

if TYPE_CHECKING:
    from mmud.kvm.mmu.audit import AuditTrack, ModuleAudit
    from mmud.kvm.mmu.vcpu_mmu import VcpuMmu

KVM_MIN_ALLOC_MMU_PAGES = 64
KVM_PERMILLE_MMU_PAGES = 20
KVM_MIN_FREE_MMU_PAGES = 5
KVM_REFILL_PAGES = 25
RMAP_RECYCLE_THRESHOLD = 1000
KVM_PAGE_ARRAY_NR = 16

# Return values of the page-fault paths (RET_PF_*). v5.16 also has RET_PF_CONTINUE (an
# internal step), RET_PF_FIXED and RET_PF_SPURIOUS; mmud's paths return RETRY for those two.
RET_PF_RETRY = 0
RET_PF_EMULATE = 1
RET_PF_INVALID = 2
# Returned by fast_page_fault() only (kvm_mmu_page_fault() turns them into RETRY); the
# fast_page_fault tracepoint prints them.
RET_PF_FIXED = 3
RET_PF_SPURIOUS = 4

# The pfn of a gfn no memslot holds (include/linux/kvm_host.h).
KVM_PFN_NOSLOT = 1 << 63

# set_spte() result bits.
SET_SPTE_WRITE_PROTECTED_PT = 1 << 0
SET_SPTE_NEED_REMOTE_TLB_FLUSH = 1 << 1
SET_SPTE_SPURIOUS = 1 << 2  # the new spte equals the old one: nothing written

class KvmMmu:
    """MMU state of one VM. Only the simulation loop touches it (no locks inside)."""

    mmu_lock_held = False  # a harvest holds kvm->mmu_lock across its preemption points

    def __init__(
        self, memslots: Memslots, stat: dict[str, int], module_audit: ModuleAudit,
        clock_ns: Callable[[], int],
    ) -> None:
        self.memslots = memslots
        self.stat = stat
        self.module_audit = module_audit  # the kvm module's audit limiter and log
        self.clock_ns = clock_ns
        # The audit's static key and its incremental touch set (also an attached observer).
        self.audit_enabled = False
        self.audit_track: AuditTrack | None = None
        # Who listens to the MMU's events (observer.py): None, one observer, or a Fanout.
        self.obs: MmuObserver | None = None
        self._observers: list[MmuObserver] = []
        self.bug: str | None = None  # the armed injectable bug (mmud/uapi/bugs.py)
        self.vcpus: list[VcpuMmu] = []
        self.pool = ShadowPagePool()
        self.page_hash: dict[int, list[ShadowPage]] = {}
        # Insertion-ordered: first key = tail (oldest), last key = head (newest).
        self.active_mmu_pages: dict[ShadowPage, None] = {}
        self.n_used_mmu_pages = 0
        self.n_max_mmu_pages = KVM_MIN_ALLOC_MMU_PAGES
        self.n_requested_mmu_pages = 0
        self.mmu_valid_gen = 0
        self.indirect_shadow_pages = 0

    def attach(self, observer: MmuObserver) -> None:
        """Start telling `observer` the MMU's events (after those attached before)."""
        self._observers.append(observer)
        self.obs = combine(self._observers)

    def detach(self, observer: MmuObserver) -> None:
        self._observers.remove(observer)
        self.obs = combine(self._observers)

    # --- helpers ---------------------------------------------------------------------------

    def sptep_to_sp(self, sptep: int) -> ShadowPage:
        return self.pool.pages[sptep_page(sptep)]

    def child_of(self, spte: int) -> ShadowPage:
        return self.pool.pages[S.spte_child_index(spte)]

    def shadow_walk(self, root: ShadowPage, addr: int) -> Iterator[tuple[ShadowPage, int, int]]:
        """for_each_shadow_entry(): (sp, index, spte) from the root down to the last spte
        on addr's path — the first one that is not present, or a leaf."""
        sp = root
        while True:
            i = pt_index(addr, sp.level)
            spte = sp.spt[i]
            yield sp, i, spte
            if not spte & S.SPTE_MMU_PRESENT or S.is_last_spte(spte, sp.level):
                return
            sp = self.child_of(spte)

    def is_obsolete_sp(self, sp: ShadowPage) -> bool:
        return sp.invalid or sp.mmu_valid_gen != self.mmu_valid_gen

    def valid_sps_of_gfn(self, gfn: int) -> list[ShadowPage]:
        """for_each_gfn_valid_sp(): non-obsolete sps with this gfn, newest first."""
        bucket = self.page_hash.get(hash_64(gfn))
        if not bucket:
            return []
        return [sp for sp in reversed(bucket) if sp.gfn == gfn and not self.is_obsolete_sp(sp)]

    def indirect_valid_sps_of_gfn(self, gfn: int) -> list[ShadowPage]:
        return [sp for sp in self.valid_sps_of_gfn(gfn) if not sp.direct]

    def kvm_flush_remote_tlbs(self) -> None:
        """kvm_make_all_cpus_request(KVM_REQ_TLB_FLUSH): every vCPU flushes its own TLB.

        Each vCPU services the request before it next enters the guest (and every guest
        access checks for requests first), as kvm_vcpu_flush_tlb() does in vcpu_enter_guest.
        The requester only posts it: emptying a TLB that caches every page the guest touched
        would make the MMU lock hold of a commit grow with guest memory (a 1 GiB guest's
        TLB took 15 ms), where a hardware flush costs the same at any size.

        Every call is a request (remote_tlb_flush_requests); remote_tlb_flush counts those
        that kicked a vCPU (kvm_make_all_cpus_request() returned true). mmud does not model
        vcpu->mode: a vCPU with a root loaded counts as one in guest mode.
        """
        self.stat["remote_tlb_flush_requests"] += 1
        kicked = False
        for vmmu in self.vcpus:
            vmmu.vcpu.request_tlb_flush()
            kicked = kicked or vmmu.root is not None
        if kicked:
            self.stat["remote_tlb_flush"] += 1

    def kvm_reload_remote_mmus(self) -> None:
        for vmmu in self.vcpus:
            vmmu.vcpu.make_request_mmu_reload()

    # --- page budget ----------------------------------------------------------------------

    def kvm_mmu_available_pages(self) -> int:
        if self.n_max_mmu_pages > self.n_used_mmu_pages:
            return self.n_max_mmu_pages - self.n_used_mmu_pages
        return 0

    def default_mmu_pages(self) -> int:
        """kvm_mmu_calculate_default_mmu_pages(): 2 % of all memslot pages, at least 64."""
        pages = self.memslots.total_pages() * KVM_PERMILLE_MMU_PAGES // 1000
        return max(pages, KVM_MIN_ALLOC_MMU_PAGES)

    # --- rmap -------------------------------------------------------------------------------

    def rmap_add(self, slot: Memslot, gfn: int, sptep: int) -> int:
        if self.obs: self.obs.rmap_add(gfn)  # observer
        return slot.rmap.add(gfn, sptep)

    def rmap_remove(self, sp: ShadowPage, i: int) -> None:
        """pte_list_remove(): a missing entry is an MMU bug; tolerated (the kernel BUG()s),
        so that an injected bug leaves the VM running for the audit to report."""
        gfn = sp.gfn_of(i)
        if self.obs: self.obs.rmap_remove(sp, i, gfn)  # observer
        slot = self.memslots.lookup(gfn)
        if slot is None or not slot.rmap.remove(gfn, sptep_of(sp, i)):
            return
        self.stat["pages_4k"] -= 1

    def rmap_write_protect(self, gfn: int) -> bool:
        """Clear W and MMU-writable in every spte mapping gfn; True if a flush is needed.

        spte_write_protect(pt_protect=true) + mmu_spte_update() (v5.16): an spte that was
        writable or could locklessly become writable (MMU-writable implies Host-writable)
        loses that, which needs a flush; an spte that was neither is left alone."""
        if self.obs: self.obs.rmap_write_protect(gfn)  # observer
        slot = self.memslots.lookup(gfn)
        if slot is None:
            return False
        flush = False
        pages = self.pool.pages
        clear = ~(PT_WRITABLE_MASK | S.SPTE_MMU_WRITEABLE)
        for sptep in slot.rmap.get(gfn):
            spt = pages[sptep_page(sptep)].spt
            i = spte_index(sptep)
            old = spt[i]
            if old & (PT_WRITABLE_MASK | S.SPTE_MMU_WRITEABLE):
                spt[i] = old & clear
                flush = True
        return flush

    def drop_spte(self, sp: ShadowPage, i: int) -> None:
        """Clear a present leaf spte and take it out of its rmap."""
        if self.obs: self.obs.drop_spte(sp, i)  # observer
        if self.bug != "rmap_remove_skipped":
            self.rmap_remove(sp, i)
        sp.spt[i] = 0

    def kvm_zap_rmapp(self, slot: Memslot, gfn: int) -> bool:
        rmap = slot.rmap.get(gfn)
        if not rmap:
            return False
        for sptep in list(rmap):
            self.drop_spte(self.sptep_to_sp(sptep), spte_index(sptep))
        return True

    # --- page tracking (KVM_PAGE_TRACK_WRITE) ------------------------------------------------

    def page_track_is_active(self, gfn: int) -> bool:
        if self.obs: self.obs.page_track_is_active(gfn)  # observer
        slot = self.memslots.lookup(gfn)
        return slot is not None and slot.gfn_track.get(gfn, 0) > 0

    def account_shadowed(self, sp: ShadowPage) -> None:
        if self.obs: self.obs.account_shadowed(sp)  # observer
        self.indirect_shadow_pages += 1
        gfn = sp.gfn
        slot = self.memslots.lookup(gfn)
        if slot is None:
            return
        if sp.level > 1:
            slot.gfn_track[gfn] = slot.gfn_track.get(gfn, 0) + 1
            if self.rmap_write_protect(gfn):
                self.kvm_flush_remote_tlbs()

    def unaccount_shadowed(self, sp: ShadowPage) -> None:
        if self.obs: self.obs.unaccount_shadowed(sp)  # observer
        self.indirect_shadow_pages -= 1
        if sp.level == 1:
            return
        slot = self.memslots.lookup(sp.gfn)
        if slot is None:
            return
        count = slot.gfn_track[sp.gfn] - 1
        if count:
            slot.gfn_track[sp.gfn] = count
        else:
            del slot.gfn_track[sp.gfn]

    # --- shadow page lookup and allocation ---------------------------------------------------

    def alloc_page(self, gfn: int, role: int) -> ShadowPage:
        sp = self.pool.alloc()
        if sp.hashed:  # freed by a commit: it leaves its old bucket now (free_pages)
            self.page_hash[hash_64(sp.gfn)].remove(sp)
        sp.init(gfn, role, self.mmu_valid_gen)
        if self.obs: self.obs.alloc_page(sp)  # observer
        self.page_hash.setdefault(hash_64(gfn), []).append(sp)
        sp.hashed = True
        self.active_mmu_pages[sp] = None
        self.n_used_mmu_pages += 1
        return sp

    def free_pages(self, sps: list[ShadowPage]) -> None:
        """kvm_mmu_free_page() of every sp of a committed list, which the caller hands over.

        Each sp leaves mmu_page_hash when its row is next allocated (alloc_page), not here:
        until then it is invalid, and every lookup skips invalid pages, so nothing can tell
        the difference — and a commit of any number of pages costs one step, as the C
        frees of a few thousand pages cost next to nothing (docs/performance.md)."""
        self.pool.release_all(sps)

    # --- linking ------------------------------------------------------------------------------

    def link_shadow_page(self, parent: ShadowPage, i: int, sp: ShadowPage) -> None:
        if self.obs: self.obs.link_shadow_page(parent, i, sp)  # observer
        parent.spt[i] = S.make_nonleaf_spte(sp.index)
        sp.parent_ptes.append(sptep_of(parent, i))
        if sp.unsync_children or sp.unsync:
            self.mark_unsync(parent, i)

    def drop_parent_pte(self, child: ShadowPage, parent: ShadowPage, i: int) -> None:
        if self.obs: self.obs.drop_parent_pte(parent, i, child)  # observer
        if self.bug != "parent_unlink_skipped":
            sptep = sptep_of(parent, i)
            if sptep in child.parent_ptes:
                child.parent_ptes.remove(sptep)
        parent.spt[i] = 0

    def mark_unsync(self, sp: ShadowPage, i: int) -> None:
        """Set bit i of sp's unsync_child_bitmap and propagate upward on 0 → 1."""
        bit = 1 << i
        if sp.unsync_child_bitmap & bit:
            return
        if self.obs: self.obs.unsync_children_changed(sp)  # observer
        sp.unsync_child_bitmap |= bit
        sp.unsync_children += 1
        if sp.unsync_children == 1:
            self.mark_parents_unsync(sp)

    def mark_parents_unsync(self, sp: ShadowPage) -> None:
        pages = self.pool.pages
        for sptep in list(sp.parent_ptes):
            self.mark_unsync(pages[sptep_page(sptep)], spte_index(sptep))

    def clear_unsync_child_bit(self, sp: ShadowPage, i: int) -> None:
        if self.obs: self.obs.unsync_children_changed(sp)  # observer
        sp.unsync_children -= 1
        sp.unsync_child_bitmap &= ~(1 << i)

    def mmu_unsync_walk(self, sp: ShadowPage) -> list[ShadowPage]:
        """The unsync leaf pages below sp, following unsync_child_bitmap.

        Stale bits (the child was unlinked, synced or zapped since) are cleared on the way,
        so a walk that finds nothing leaves sp with unsync_children == 0.
        """
        found: list[ShadowPage] = []
        bitmap = sp.unsync_child_bitmap
        while bitmap:
            low = bitmap & -bitmap
            i = low.bit_length() - 1
            bitmap ^= low
            spte = sp.spt[i]
            if not spte & S.SPTE_MMU_PRESENT or spte & S.PT_PAGE_SIZE_MASK:
                self.clear_unsync_child_bit(sp, i)
                continue
            child = self.child_of(spte)
            if child.unsync_children:
                found.extend(self.mmu_unsync_walk(child))
                if not child.unsync_children:
                    self.clear_unsync_child_bit(sp, i)
            elif child.unsync:
                found.append(child)
            else:
                self.clear_unsync_child_bit(sp, i)
        return found

    def kvm_unsync_page(self, sp: ShadowPage) -> None:
        if self.obs: self.obs.kvm_unsync_page(sp)  # observer
        self.stat["mmu_unsync"] += 1
        sp.unsync = True
        self.mark_parents_unsync(sp)

    def kvm_unlink_unsync_page(self, sp: ShadowPage) -> None:
        if self.obs: self.obs.kvm_unlink_unsync_page(sp)  # observer
        sp.unsync = False
        self.stat["mmu_unsync"] -= 1

    def mmu_need_write_protect(self, gfn: int, can_unsync: bool) -> bool:
        """Whether a writable spte for gfn must stay read-only; unsyncs leaf tables instead."""
        if self.page_track_is_active(gfn) and self.bug != "unsync_nonleaf":
            return True
        for sp in self.indirect_valid_sps_of_gfn(gfn):
            if not can_unsync:
                return True
            if sp.unsync:
                continue
            self.kvm_unsync_page(sp)
        return False

    # --- installing sptes -----------------------------------------------------------------------

    def set_spte(
        self,
        vmmu: VcpuMmu,
        sp: ShadowPage,
        i: int,
        pte_access: int,
        gfn: int,
        pfn: int,
        can_unsync: bool,
        host_writable: bool,
        prefetch: bool,
    ) -> int:
        """set_spte(): make_spte(), mark the page dirty if the spte is writable, then
        mmu_spte_update() unless nothing changed; SET_SPTE_* bits (v5.15/v5.16)."""
        spt = sp.spt
        if self.obs: self.obs.set_spte(sp, i, gfn)  # observer
        old = spt[i]
        spte, ret = self.make_spte(sp, pte_access, gfn, pfn, old, prefetch, can_unsync, host_writable)
        if spte & PT_WRITABLE_MASK:
            vmmu.vcpu.mark_page_dirty(gfn)
        if spte == old:
            return ret | SET_SPTE_SPURIOUS
        spt[i] = spte
        if S.spte_update_needs_flush(old, spte):
            ret |= SET_SPTE_NEED_REMOTE_TLB_FLUSH
        return ret

    def make_spte(self, sp: ShadowPage, pte_access: int, gfn: int, pfn: int, old: int, prefetch: bool,
                  can_unsync: bool, host_writable: bool) -> tuple[int, int]:
        """make_spte() (spte.c, v5.15/v5.16): the leaf spte, and SET_SPTE_WRITE_PROTECTED_PT
        when a guest table of gfn keeps it read-only.

        A writable spte carries D (spte_shadow_dirty_mask) and a non-prefetched one A; a
        prefetched one is made not-accessed (mark_spte_for_access_track). A sync of an
        spte that is already writable keeps it writable without looking for shadowed tables
        — write protection is kvm_mmu_get_page's and the sync's job — and, as the kernel's
        `goto out` does, without D and without the prefetch's access tracking.
        """
        spte = S.make_leaf_spte(pfn, pte_access, sp.level, host_writable, accessed=not prefetch)
        if not host_writable:
            pte_access &= ~ACC_WRITE_MASK
        ret = 0
        if pte_access & ACC_WRITE_MASK:
            spte |= PT_WRITABLE_MASK | S.SPTE_MMU_WRITEABLE
            if not can_unsync and old & PT_WRITABLE_MASK:
                return spte, ret
            if self.mmu_need_write_protect(gfn, can_unsync):
                ret |= SET_SPTE_WRITE_PROTECTED_PT
                pte_access &= ~ACC_WRITE_MASK
                spte &= ~(PT_WRITABLE_MASK | S.SPTE_MMU_WRITEABLE)
        if pte_access & ACC_WRITE_MASK:
            spte |= PT_DIRTY_MASK
        return spte, ret

    def mmu_set_spte(
        self,
        vmmu: VcpuMmu,
        sp: ShadowPage,
        i: int,
        pte_access: int,
        write_fault: bool,
        gfn: int,
        pfn: int,
        host_writable: bool = True,
        *,
        prefetch: bool = False,
    ) -> int:
        """Install a leaf spte for gfn→pfn; RET_PF_EMULATE if a write fault stays read-only.

        `prefetch`: the spte is built ahead of an access (FNAME(prefetch_gpte)), not for the
        faulting one."""
        spt = sp.spt
        old = spt[i]
        was_rmapped = False
        flush = False
        if old & S.SPTE_MMU_PRESENT:
            if not S.is_last_spte(old, sp.level):
                self.drop_parent_pte(self.child_of(old), sp, i)
                flush = True
            elif pfn != S.spte_to_pfn(old):
                self.drop_spte(sp, i)
                flush = True
            else:
                was_rmapped = True
        elif S.is_mmio_spte(old):
            spt[i] = 0
        ret = RET_PF_RETRY
        if self.bug == "wrong_pfn":
            pfn ^= 1
        result = self.set_spte(vmmu, sp, i, pte_access, gfn, pfn, True, host_writable, prefetch)
        if self.obs: self.obs.mmu_set_spte(sp, i, gfn, result)  # observer
        if result & SET_SPTE_WRITE_PROTECTED_PT:
            if write_fault:
                ret = RET_PF_EMULATE
            vmmu.vcpu.request_tlb_flush()
        if result & SET_SPTE_NEED_REMOTE_TLB_FLUSH or flush:
            self.kvm_flush_remote_tlbs()
        if not was_rmapped:
            if not sp.direct:
                sp.gfns[i] = gfn
            slot = self.memslots.lookup(gfn)
            assert slot is not None, "the fault found a pfn for gfn, so a memslot holds it"
            if self.bug == "rmap_add_skipped":
                return ret
            self.stat["pages_4k"] += 1
            rmap_count = self.rmap_add(slot, gfn, sptep_of(sp, i))
            if rmap_count > self.stat["max_mmu_rmap_size"]:
                self.stat["max_mmu_rmap_size"] = rmap_count
            if rmap_count > RMAP_RECYCLE_THRESHOLD:
                # rmap_recycle(): a hot gfn drops all its mappings (and this one) at once.
                self.kvm_zap_rmapp(slot, gfn)
                self.kvm_flush_remote_tlbs()
        return ret

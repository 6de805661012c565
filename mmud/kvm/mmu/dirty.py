"""Dirty logging's side of the shadow MMU: write-protecting sptes so that writes are logged.

With KVM_MEM_LOG_DIRTY_PAGES set, a guest write must fault (and mark the page dirty) at
least once per harvest. Dirty-log protection clears only W: MMU-writable stays, because
these pages are not shadowed page tables, so the next write fault may make the spte
writable again without the MMU lock (fast_pf.py). Write protection of guest page tables
(KvmMmu.rmap_write_protect) clears both.

mmud maps guest 2 MiB pages with 4 KiB sptes and has no huge sptes at all, so the kernel's
"no writable huge mapping in a logged slot" holds by construction: every writable spte of a
logged slot is a 4 KiB spte in the slot's level-1 rmap, which is all these functions walk.
"""

from __future__ import annotations

import numpy as np

from mmud.kvm.memslot import Memslot
from mmud.kvm.mmu.mmu import KvmMmu
from mmud.kvm.mmu.page import CHUNK_PAGES, spte_index, sptep_page
from mmud.x86.paging import PT_WRITABLE_MASK

_W = np.uint64(PT_WRITABLE_MASK)
_NOT_W = np.uint64(~PT_WRITABLE_MASK & ((1 << 64) - 1))


def _clear_w(mmu: KvmMmu, sptes: np.ndarray) -> bool:
    """Clear W in the sptes named by sptep (page.sptep_of); True if any had it."""
    if not len(sptes):
        return False
    index = sptep_page(sptes)
    entry = spte_index(sptes)
    chunk = index // CHUNK_PAGES
    row = index % CHUNK_PAGES
    flush = False
    for c in np.unique(chunk):
        sel = chunk == c
        spt = mmu.pool.spt_chunks[c]
        r, e = row[sel], entry[sel]
        if (spt[r, e] & _W).any():
            spt[r, e] &= _NOT_W
            flush = True
    return flush


def kvm_mmu_slot_remove_write_access(mmu: KvmMmu, slot: Memslot) -> None:
    """Logging starts: clear W in every writable spte of the slot, and flush if there was
    one (slot_rmap_write_protect, v5.16)."""
    if _clear_w(mmu, slot.rmap.entries()[0]):
        mmu.kvm_flush_remote_tlbs()


def kvm_mmu_write_protect_pt_masked(mmu: KvmMmu, slot: Memslot, pages: np.ndarray) -> None:
    """kvm_arch_mmu_enable_log_dirty_pt_masked() for the shadow MMU: clear W in the 4 KiB
    sptes of the slot-relative `pages`. The caller flushes (dirty_log.py decides when).

    Vectorised: the rmap heads of `pages` are read as one array, and nothing else of the
    slot's, so that a harvest's cost follows its dirty pages, not the slot's size.
    """
    if not len(pages):
        return
    _clear_w(mmu, slot.rmap.spteps_of(pages))

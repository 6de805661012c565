"""The audit's per-spte checks entry by entry, for the few entries of an incremental run.

An incremental run looks at a handful of sptes (a fault installs one; a sync rewrites a few).
numpy costs about a microsecond per call whatever the size, and the vectorised checks make
dozens of calls; plain Python over five entries is several times cheaper. `PageEntries`
gives the same messages in the same order as `audit_vector.PageArrays`
(tests/test_audit_paths.py checks that on random MMU states with bugs armed).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from mmud.kvm.mmu import audit_checks as C
from mmud.kvm.mmu import spte as S
from mmud.kvm.mmu.mmu import KvmMmu
from mmud.kvm.mmu.page import ROLE_CR0_WP, ROLE_NXE, ShadowPage, spte_index, sptep_page
from mmud.x86 import paging as pg

_PRESENT = S.SPTE_MMU_PRESENT
_PRESENT_NP = np.uint64(S.SPTE_MMU_PRESENT)


def _gpte_reserved(level: int, gpte: int, nxe: bool) -> bool:
    """Not present, or reserved bits set: the MMU must not have shadowed it."""
    large = level == 2 and bool(gpte & pg.PT_PAGE_SIZE_MASK)
    return not gpte & pg.PT_PRESENT_MASK or bool(gpte & pg.rsvd_bits(level, large, nxe))


def _excess(got: int, allowed: int, wp0: bool) -> bool:
    """Rights beyond `allowed`, except CR0.WP=0's supervisor-only write to a read-only page."""
    extra = got & ~allowed
    return bool(extra) and not (wp0 and extra == pg.ACC_WRITE_MASK and not got & pg.ACC_USER_MASK)


def _upper_translation(mmu: KvmMmu, sp: ShadowPage, rows: list[int], gptes: np.ndarray) -> list[str]:
    """translation for present non-leaf sptes of an upper-level page: the child is the page
    for the gpte's table (or, for a 2 MiB gpte, the direct page of its frame) with the
    access the path allows (no more, for 2 MiB: the CR0.WP=0 shape allowed)."""
    out = []
    nxe = bool(sp.role & ROLE_NXE)
    wp0 = not sp.role & ROLE_CR0_WP
    spt = sp.spt
    for i in rows:
        gpte = int(gptes[i])
        child = mmu.child_of(spt[i])
        access = pg.gpte_access(gpte, nxe) & sp.access
        if _gpte_reserved(sp.level, gpte, nxe):
            ok = False
        elif gpte & pg.PT_PAGE_SIZE_MASK:
            if not gpte & pg.PT_DIRTY_MASK:
                access &= ~pg.ACC_WRITE_MASK
            ok = (
                child.direct
                and child.gfn == (gpte & pg.PT64_LVL2_LARGE_ADDR_MASK) >> pg.PAGE_SHIFT
                and not _excess(child.access, access, wp0)
            )
        else:
            ok = (
                not child.direct
                and child.gfn == (gpte & pg.PT64_BASE_ADDR_MASK) >> pg.PAGE_SHIFT
                and child.access == access
            )
        if not ok:
            out.append(C.msg_link(sp, i, child, gpte))
    return out


class PageEntries:
    """The checked present entries of a few shadow pages, as Python lists."""

    def __init__(
        self, mmu: KvmMmu, sps: list[ShadowPage], gfns: set[int] | None,
        entries: list[set[int] | None] | None = None,
    ) -> None:
        self.mmu = mmu
        self.sps = sps
        self.rmap_gfns = gfns
        self.present: list[list[int]] = []
        self.leaves: list[tuple[int, int, int, int]] = []  # (row, entry, gfn, spte)
        for row, sp in enumerate(sps):
            spt = sp.spt
            chosen = None if entries is None else entries[row]
            if chosen is None:
                present = np.flatnonzero(sp.sptes & _PRESENT_NP).tolist()
            else:
                present = sorted(i for i in chosen if spt[i] & _PRESENT)
            self.present.append(present)
            for i in present:
                spte = spt[i]
                if S.is_last_spte(spte, sp.level):
                    self.leaves.append((row, i, sp.gfn_of(i), spte))
        self.size = sum(map(len, self.present))

    def stages(self) -> tuple[tuple[str, Callable[[], object]], ...]:
        """None: each entry asks its rmap when it is checked."""
        return ()

    def entry_reports(self, root_level: int) -> tuple[C.Messages, C.Messages]:
        check2: C.Messages = {}
        check1: C.Messages = {}
        lookup = self.mmu.memslots.lookup
        for row, i, gfn, spte in self.leaves:
            for text in C.inspect_spte_has_rmap(self.mmu, self.sps[row], i, gfn, spte):
                C.add_message(check2, row, i, text)
            slot = lookup(gfn)
            if slot is None:
                continue
            pfn = gfn - slot.base_gfn + slot.backing.base_pfn
            if (spte & S.SPTE_BASE_ADDR_MASK) >> pg.PAGE_SHIFT != pfn:
                C.add_message(check1, row, i, C.msg_mapping(root_level, pfn, spte))
        return check2, check1

    def rmap_exact(self) -> list[str]:
        mmu = self.mmu
        out: list[str] = []
        for row, i, gfn, _ in self.leaves:
            sp = self.sps[row]
            if not C.in_own_rmap(mmu, sp, i, gfn):
                out.append(C.msg_not_in_rmap(sp, i, gfn))
        pages = mmu.pool.pages
        active = mmu.active_mmu_pages
        for gfn, sptep in self._rmap_entries(self.rmap_gfns):
            sp, i = pages[sptep_page(sptep)], spte_index(sptep)
            spte = sp.spt[i]
            live = (
                sp in active
                and spte & _PRESENT
                and S.is_last_spte(spte, sp.level)
                and sp.gfn_of(i) == gfn
            )
            if not live:
                out.append(C.msg_rmap_stale(gfn, sp, i))
        return out

    def _rmap_entries(self, gfns: set[int] | None) -> list[tuple[int, int]]:
        """(gfn, sptep) of the rmap entries of gfns (None: all), in gfn order."""
        out: list[tuple[int, int]] = []
        if gfns is None:
            gfns = {g for slot in self.mmu.memslots
                    for g in (np.flatnonzero(slot.rmap.mapped()) + slot.base_gfn).tolist()}
        for gfn in sorted(gfns):
            slot = self.mmu.memslots.lookup(gfn)
            if slot is not None:
                out += [(gfn, sptep) for sptep in slot.rmap.get(gfn)]
        return out

    def translation(self, skip_gfn: int | None) -> list[str]:
        out: list[str] = []
        for row, sp in enumerate(self.sps):
            gptes = C.translated_page(self.mmu, sp, skip_gfn)
            if gptes is None:
                continue
            if sp.level > 1:
                out += _upper_translation(self.mmu, sp, self.present[row], gptes)
                continue
            nxe = bool(sp.role & ROLE_NXE)
            wp0 = not sp.role & ROLE_CR0_WP
            spt = sp.spt
            for i in self.present[row]:
                spte, gpte = spt[i], int(gptes[i])
                access = pg.gpte_access(gpte, nxe) & sp.access
                allowed = access if gpte & pg.PT_DIRTY_MASK else access & ~pg.ACC_WRITE_MASK
                if (
                    _gpte_reserved(1, gpte, nxe)
                    or not gpte & pg.PT_ACCESSED_MASK
                    or (gpte & pg.PT64_BASE_ADDR_MASK) >> pg.PAGE_SHIFT != sp.gfns[i]
                    or _excess(S.spte_access(spte), allowed, wp0)
                ):
                    out.append(C.msg_leaf_translation(sp, i, spte, gpte))
        return out

    def spte_bits(self) -> list[str]:
        return [
            C.msg_spte_bits(self.sps[row], i, spte)
            for row, i, _, spte in self.leaves
            if spte & C.SPTE_BITS_MASK not in C.SPTE_BITS_OK
        ]

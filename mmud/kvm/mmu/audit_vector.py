"""The audit's per-spte checks vectorised over many shadow pages (the full audit, and
incremental runs too large for audit_scalar).

A page's 512 sptes are one row of a 2-D array gathered once per run, with the gfn of each
entry beside it; rmaps come out of the memslots' head arrays (mmud/kvm/rmap.py) as (sptep,
gfn) arrays, and both directions of `rmap_exact` are a scatter and a gather over the pool's
(page, entry) space. So a run costs a few dozen numpy operations over all pages, plus Python
per reported error and per link of an upper-level page.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import cached_property

import numpy as np

from mmud.kvm.mmu import audit_checks as C
from mmud.kvm.mmu import spte as S
from mmud.kvm.mmu.mmu import KvmMmu
from mmud.kvm.mmu.page import ROLE_CR0_WP, ROLE_NXE, ShadowPage, spte_index, sptep_page
from mmud.x86 import paging as pg

_U = np.uint64
_PRESENT = _U(S.SPTE_MMU_PRESENT)
_ADDR = _U(S.SPTE_BASE_ADDR_MASK)
_IDX = np.arange(512, dtype=np.int64)
_W, _USER, _EXEC = _U(pg.PT_WRITABLE_MASK), _U(pg.PT_USER_MASK), _U(pg.ACC_EXEC_MASK)
# The low 16 bits of an spte hold every flag the per-entry masks test (present, page size,
# W, MMU- and Host-writable): masks over them are computed on a uint16 copy, a quarter of
# the memory traffic of the sptes themselves.
_LOW = np.uint16
assert max(S.SPTE_MMU_PRESENT, pg.PT_PAGE_SIZE_MASK, C.SPTE_BITS_MASK) < 1 << 16


def rmap_arrays(mmu: KvmMmu, gfns: Iterable[int] | None) -> tuple[np.ndarray, np.ndarray]:
    """(sptep, gfn) of every level-1 rmap entry of gfns (None: all), each gfn's together
    (in chain order), not sorted by gfn (see Rmap.entries)."""
    parts = []
    for slot in mmu.memslots:
        select = None
        if gfns is not None:
            select = np.zeros(slot.npages, dtype=bool)
            select[[g - slot.base_gfn for g in gfns if slot.base_gfn <= g < slot.end_gfn]] = True
        parts.append(slot.rmap.entries(select))
    if len(parts) == 1:
        return parts[0]
    if not parts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def live_leaf_gfns(mmu: KvmMmu, sptep: np.ndarray) -> np.ndarray:
    """For each sptep: the gfn its spte maps if it is a present leaf of an active page, else -1."""
    pool = mmu.pool
    active = mmu.active_mmu_pages
    n = len(pool.pages)
    is_active = np.fromiter((sp in active for sp in pool.pages), dtype=bool, count=n)
    level = np.fromiter((sp.level for sp in pool.pages), dtype=np.int64, count=n)
    direct = np.fromiter((sp.direct for sp in pool.pages), dtype=bool, count=n)
    base = np.fromiter((sp.gfn for sp in pool.pages), dtype=np.int64, count=n)
    idx, i = sptep_page(sptep), spte_index(sptep)
    spte = C.spte_values(mmu, sptep)
    mapped = pool.gfn_array().reshape(-1)[sptep].astype(np.int64)
    level, direct = level[idx], direct[idx]
    mapped = np.where(direct, base[idx] + (i << (9 * (level - 1))), mapped)
    leaf = (level == 1) | ((spte & _U(pg.PT_PAGE_SIZE_MASK)) != 0)
    live = is_active[idx] & ((spte & _PRESENT) != 0) & leaf
    return np.where(live, mapped, -1)


def _coords(mask: np.ndarray) -> list[tuple[int, int]]:
    """(row, entry) where a 2-D mask is set, row-major (what is reported: usually nothing)."""
    if not mask.any():
        return []
    return list(zip(*(a.tolist() for a in np.nonzero(mask)), strict=True))


def _gpte_access(g: np.ndarray, nxe: np.ndarray) -> np.ndarray:
    """ACC_* of gptes: W and U as they are, exec unless NX under EFER.NXE."""
    return (g & (_W | _USER)) | np.where(nxe & ((g & _U(pg.PT64_NX_MASK)) != 0), _U(0), _EXEC)


def _excess(got: np.ndarray, allowed: np.ndarray, wp0: np.ndarray) -> np.ndarray:
    """Rights beyond `allowed`, except CR0.WP=0's supervisor-only write to a read-only page."""
    excess = got & ~allowed
    wp0_shape = wp0 & (excess == _U(pg.ACC_WRITE_MASK)) & ((got & _U(pg.ACC_USER_MASK)) == 0)
    return (excess != 0) & ~wp0_shape


class PageArrays:
    """The sptes of a list of shadow pages as 2-D arrays (a row per page, an entry per
    column), gathered once per run, so that every check is a few numpy operations over all
    pages at once; Python runs only for what is reported."""

    def __init__(
        self, mmu: KvmMmu, sps: list[ShadowPage], gfns: set[int] | None,
        entries: list[set[int] | None] | None = None,
    ) -> None:
        n = len(sps)
        self.mmu = mmu
        self.sps = sps
        self.rmap_gfns = gfns
        self.entries = entries
        self.index = np.fromiter((sp.index for sp in sps), dtype=np.int64, count=n)
        self.level = np.fromiter((sp.level for sp in sps), dtype=np.int64, count=n)
        self.upper = np.flatnonzero(self.level > 1)
        # Every active page, every entry: leaves of these are all the live leaves there are.
        self.complete = entries is None and len(sps) == len(mmu.active_mmu_pages) and all(
            sp in mmu.active_mmu_pages for sp in sps
        )

    def stages(self) -> tuple[tuple[str, Callable[[], object]], ...]:
        """The arrays are computed when first used; a run computes them in these stages
        first, each a few numpy operations over all pages, with a store point before each
        (run_checks): at 4 GiB of guest each is still tens of megabytes of memory traffic."""
        return (("gathering sptes", lambda: self.sptes), ("flags", lambda: self.leaf),
                ("gfns", lambda: self.gfns), ("frames", lambda: self._offset),
                ("rmap entries", lambda: self._rmap_entries),
                ("registering", lambda: self._registered), ("missing", lambda: self._missing))

    @cached_property
    def sptes(self) -> np.ndarray:
        if not self.sps:
            return np.zeros((0, 512), dtype=np.uint64)
        return np.stack([sp.sptes for sp in self.sps])

    @cached_property
    def _flags(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Present entries, leaves (both limited to the run's entries) and each spte's
        W/MMU-writable/Host-writable bits, from the low 16 bits of the sptes."""
        low = self.sptes.astype(_LOW)  # truncated: bits 0-15
        present = (low & _LOW(S.SPTE_MMU_PRESENT)) != 0
        leaf = present.copy()
        leaf[self.upper] &= (low[self.upper] & _LOW(pg.PT_PAGE_SIZE_MASK)) != 0
        bits = low & _LOW(C.SPTE_BITS_MASK)  # spte_bits reads only these
        entries = self.entries
        if entries is not None and any(e is not None for e in entries):
            # Only the entries an operation changed: the per-entry checks look at those.
            wanted = np.ones((len(self.sps), 512), dtype=bool)
            for row, chosen in enumerate(entries):
                if chosen is not None:
                    wanted[row] = False
                    wanted[row, list(chosen)] = True
            present &= wanted
            leaf &= wanted
        return present, leaf, bits

    @property
    def present(self) -> np.ndarray:
        return self._flags[0]

    @property
    def leaf(self) -> np.ndarray:
        return self._flags[1]

    @cached_property
    def gfns(self) -> np.ndarray:
        """The gfn of each entry (kvm_mmu_page_get_gfn()): computed for direct pages (as if
        all were level 1, then fixed), recorded for indirect ones. The more numerous kind
        fills the array, the other is written over it: one pass over most rows, not two."""
        sps = self.sps
        base = np.fromiter((sp.gfn for sp in sps), dtype=np.int64, count=len(sps))
        direct = [row for row, sp in enumerate(sps) if sp.direct]
        if 2 * len(direct) >= len(sps):
            gfns = np.add(base[:, None], _IDX[None, :])
            indirect = [row for row, sp in enumerate(sps) if not sp.direct]
            if indirect:
                gfns[indirect] = np.stack([sps[r]._gfns_np for r in indirect]).view(np.int64)
        else:
            gfns = np.stack([sp._gfns_np for sp in sps]).view(np.int64)
            gfns[direct] = base[direct, None] + _IDX[None, :]
        direct_upper = [row for row in self.upper.tolist() if sps[row].direct]
        if direct_upper:
            shift = 9 * (self.level[direct_upper] - 1)[:, None]
            gfns[direct_upper] = base[direct_upper, None] + (_IDX << shift)
        return gfns

    @cached_property
    def _offset(self) -> np.ndarray:
        """Frame minus gfn of each entry: a leaf's is its slot's offset (check 1)."""
        offset = self.sptes & _ADDR  # in place from here: one temporary, not three
        offset >>= _U(pg.PAGE_SHIFT)
        offset = offset.view(np.int64)
        offset -= self.gfns
        return offset

    @cached_property
    def _rmap_entries(self) -> tuple[np.ndarray, np.ndarray]:
        """The (sptep, gfn) rmap entries of the run's gfns and the leaves' gfns."""
        gfns = self.rmap_gfns
        wanted = None if gfns is None else set(gfns) | set(self.gfns[self.leaf].tolist())
        return rmap_arrays(self.mmu, wanted)

    @cached_property
    def _registered(self) -> np.ndarray:
        """The gfn registered at each (pool page, entry), -1 for none; rmap_exact then
        reuses it as its scratch array."""
        r_sptep, r_gfn = self._rmap_entries
        registered = np.full((len(self.mmu.pool.pages), 512), -1, dtype=np.int64)
        registered.reshape(-1)[r_sptep] = r_gfn
        return registered

    @cached_property
    def _missing(self) -> np.ndarray:
        """Which leaves are not registered under their gfn (a superset: an sptep found in
        two rmaps may show here). Checks 2 and rmap_exact both start from it."""
        return self.leaf & (self._registered[self.index] != self.gfns)

    def entry_reports(self, root_level: int) -> tuple[C.Messages, C.Messages]:
        # Check 2 can fail only where the exact rmap check fails: Python looks at those.
        check2: C.Messages = {}
        for r, i in _coords(self._missing):
            spte = int(self.sptes[r, i])
            for text in C.inspect_spte_has_rmap(self.mmu, self.sps[r], i, int(self.gfns[r, i]), spte):
                C.add_message(check2, r, i, text)
        check1: C.Messages = {}
        for slot in self.mmu.memslots:
            # A leaf maps the frame of its gfn in its slot: frame - gfn is the slot's offset.
            bad = self.leaf & (self._offset != slot.backing.base_pfn - slot.base_gfn)
            if not bad.any():
                continue  # with one slot, the usual case: nothing more to look at
            bad &= (self.gfns >= slot.base_gfn) & (self.gfns < slot.end_gfn)
            for r, i in _coords(bad):
                pfn = int(self.gfns[r, i]) - slot.base_gfn + slot.backing.base_pfn
                C.add_message(check1, int(r), int(i), C.msg_mapping(root_level, pfn, int(self.sptes[r, i])))
        for msgs in check1.values():
            msgs.sort(key=lambda m: m[0])
        return check2, check1

    def rmap_exact(self) -> list[str]:
        mmu = self.mmu
        pages = mmu.pool.pages
        missing, scratch = self._missing, self._registered
        r_sptep, r_gfn = self._rmap_entries
        out: list[str] = []
        found = _coords(missing)
        for r, i in found:
            # An sptep in two rmaps shows one of them above: confirm against the gfn's own.
            sp, gfn = self.sps[r], int(self.gfns[r, i])
            if not C.in_own_rmap(mmu, sp, i, gfn):
                out.append(C.msg_not_in_rmap(sp, i, gfn))
        gfns = self.rmap_gfns
        if not found and self.complete and gfns is None and len(r_sptep) == np.count_nonzero(self.leaf):
            # Every live leaf (sptep, gfn) is registered, and the rmaps hold no more entries
            # than there are leaves: they hold exactly the leaves (distinct spteps, since each
            # leaf's is set), so no rmap entry is stale.
            return out
        if gfns is not None:
            keep = np.isin(r_gfn, np.fromiter(gfns, dtype=np.int64, count=len(gfns)))
            r_sptep, r_gfn = r_sptep[keep], r_gfn[keep]
        if self.complete:
            live = scratch  # the registered gfns are compared already: refill, no new array
            live.fill(-1)
            live[self.index] = np.where(self.leaf, self.gfns, -1)
            mapped = live.reshape(-1)[r_sptep]
        else:
            mapped = live_leaf_gfns(mmu, r_sptep)
        for k in C.gfn_order(r_gfn, mapped != r_gfn):
            sptep = int(r_sptep[k])
            out.append(C.msg_rmap_stale(int(r_gfn[k]), pages[sptep_page(sptep)], spte_index(sptep)))
        return out

    def translation(self, skip_gfn: int | None) -> list[str]:
        by_level: dict[bool, list[int]] = {True: [], False: []}
        tables: dict[bool, list[np.ndarray]] = {True: [], False: []}
        for row, sp in enumerate(self.sps):
            gptes = C.translated_page(self.mmu, sp, skip_gfn)
            if gptes is not None:
                by_level[sp.level == 1].append(row)
                tables[sp.level == 1].append(gptes)
        found: list[tuple[int, int, str]] = []
        if by_level[True]:
            found += self._leaf_translation(by_level[True], np.stack(tables[True]))
        if by_level[False]:
            found += self._upper_translation(by_level[False], np.stack(tables[False]))
        return [text for _, _, text in sorted(found, key=lambda f: (f[0], f[1]))]

    def _row_facts(self, rows: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per row, as columns: EFER.NXE and CR0.WP=0 of the page's role, its access."""
        sps = [self.sps[r] for r in rows]
        nxe = np.array([bool(sp.role & ROLE_NXE) for sp in sps])[:, None]
        wp0 = np.array([not sp.role & ROLE_CR0_WP for sp in sps])[:, None]
        access = np.array([sp.access for sp in sps], dtype=np.uint64)[:, None]
        return nxe, wp0, access

    def _leaf_translation(self, rows: list[int], g: np.ndarray) -> list[tuple[int, int, str]]:
        """Level-1 pages: frame, A bit, reserved bits and rights per spte."""
        nxe, wp0, access = self._row_facts(rows)
        rsvd = np.array([pg.rsvd_bits(1, False, bool(n)) for n in nxe[:, 0]], dtype=np.uint64)[:, None]
        s = self.sptes[rows]
        gaccess = _gpte_access(g, nxe) & access
        bad_gpte = ((g & _U(pg.PT_PRESENT_MASK)) == 0) | ((g & rsvd) != 0)
        bad_gpte |= (g & _U(pg.PT_ACCESSED_MASK)) == 0
        want_gfn = ((g & _U(pg.PT64_BASE_ADDR_MASK)) >> _U(pg.PAGE_SHIFT)).view(np.int64)
        got_gfn = self.gfns[rows]
        allowed = np.where((g & _U(pg.PT_DIRTY_MASK)) != 0, gaccess, gaccess & ~_U(pg.ACC_WRITE_MASK))
        got = (s & (_W | _USER)) | np.where((s & _U(pg.PT64_NX_MASK)) != 0, _U(0), _EXEC)
        bad = self.present[rows] & (bad_gpte | (want_gfn != got_gfn) | _excess(got, allowed, wp0))
        return [
            (rows[k], i, C.msg_leaf_translation(self.sps[rows[k]], i, int(s[k, i]), int(g[k, i])))
            for k, i in _coords(bad)
        ]

    def _upper_translation(self, rows: list[int], g: np.ndarray) -> list[tuple[int, int, str]]:
        """Upper-level pages: each present spte links the page for the gpte's table (for a
        2 MiB gpte, the direct page of its frame) with the access the path allows (for
        2 MiB, no more: the CR0.WP=0 shape allowed)."""
        nxe, wp0, access = self._row_facts(rows)
        level = self.level[rows]
        rsvd_table = [pg.rsvd_bits(int(lv), False, bool(n)) for lv, n in zip(level, nxe[:, 0], strict=True)]
        rsvd_large = [pg.rsvd_bits(int(lv), lv == 2, bool(n)) for lv, n in zip(level, nxe[:, 0], strict=True)]
        ks, es = np.nonzero(self.present[rows])
        gpte = g[ks, es]
        large = (level[ks] == 2) & ((gpte & _U(pg.PT_PAGE_SIZE_MASK)) != 0)
        rsvd = np.where(large, np.array(rsvd_large, dtype=np.uint64)[ks],
                        np.array(rsvd_table, dtype=np.uint64)[ks])
        bad_gpte = ((gpte & _U(pg.PT_PRESENT_MASK)) == 0) | ((gpte & rsvd) != 0)
        pages = self.mmu.pool.pages
        child_index = (self.sptes[rows][ks, es] & _ADDR) >> _U(pg.PAGE_SHIFT)
        children = [pages[c - S.SPT_PFN_BASE] for c in child_index.tolist()]
        c_direct = np.fromiter((c.direct for c in children), dtype=bool, count=len(children))
        c_gfn = np.fromiter((c.gfn for c in children), dtype=np.uint64, count=len(children))
        c_access = np.fromiter((c.access for c in children), dtype=np.uint64, count=len(children))
        gaccess = _gpte_access(gpte, nxe[ks, 0]) & access[ks, 0]
        allowed = np.where((gpte & _U(pg.PT_DIRTY_MASK)) != 0, gaccess, gaccess & ~_U(pg.ACC_WRITE_MASK))
        ok_large = (
            c_direct
            & (c_gfn == (gpte & _U(pg.PT64_LVL2_LARGE_ADDR_MASK)) >> _U(pg.PAGE_SHIFT))
            & ~_excess(c_access, allowed, wp0[ks, 0])
        )
        ok_table = (
            ~c_direct
            & (c_gfn == (gpte & _U(pg.PT64_BASE_ADDR_MASK)) >> _U(pg.PAGE_SHIFT))
            & (c_access == gaccess)
        )
        bad = bad_gpte | ~np.where(large, ok_large, ok_table)
        out = []
        for k in np.flatnonzero(bad).tolist():
            row, i = rows[int(ks[k])], int(es[k])
            out.append((row, i, C.msg_link(self.sps[row], i, children[k], int(gpte[k]))))
        return out

    def spte_bits(self) -> list[str]:
        bits = self._flags[2]
        ok = bits == _LOW(C.SPTE_BITS_OK[0])
        for value in C.SPTE_BITS_OK[1:]:
            ok |= bits == _LOW(value)
        bad = self.leaf & ~ok
        return [
            C.msg_spte_bits(self.sps[row], i, int(self.sptes[row, i]))
            for row, i in _coords(bad)
        ]

"""The audit's per-spte checks vectorised over many shadow pages (the full audit, and
incremental runs too large for audit_scalar).

A page's 512 sptes are a row of 2-D arrays, and one pass over the pages, a block of rows at a
time, computes what the per-entry checks test: flags, gfns, frames, and the rmap head at each
leaf's gfn (mmud/kvm/rmap.py keeps the heads of a memslot in one array). It keeps only where a
check may fail. The rmaps are read whole (as (sptep, gfn) arrays) only when the leaves and
the rmap entries do not pair up one to one. So a run costs a few dozen numpy operations per
block, plus Python per reported error, per link of an upper-level page and per synced
indirect page.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence
from functools import cached_property, partial

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
STAGES = 7  # parts of the pass over the pages, each after a store point
BLOCK_ROWS = 64  # pages per block of the pass: its int64 temporaries are 256 KiB each
_IDX_ROWS = np.tile(_IDX, (BLOCK_ROWS, 1))  # each column's entry index, for a block's rows
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


def _pool_rows(chunks: list[np.ndarray], index: np.ndarray) -> np.ndarray:
    """Rows `index` of the pool's chunked (pages, 512) arrays, copied: a take per chunk,
    not a stack of page views, which costs a Python call per page."""
    per = len(chunks[0])
    which = index // per
    first, last = (int(which.min()), int(which.max())) if len(index) else (0, 0)
    if first == last:
        return np.take(chunks[first], index - per * first, axis=0)
    rows = np.empty((len(index), 512), dtype=chunks[0].dtype)
    for c in range(first, last + 1):
        sel = which == c
        rows[sel] = np.take(chunks[c], index[sel] - per * c, axis=0)
    return rows


def _rows_plus_index(first: np.ndarray) -> np.ndarray:
    """A (rows, 512) int64 array: each row's `first` plus the entry's index. Repeating
    `first` and adding a constant array is faster than numpy's broadcast of a column."""
    out = np.repeat(first, 512).reshape(len(first), 512)
    out += _IDX_ROWS[: len(first)]
    return out


def _coords(mask: np.ndarray, first_row: int = 0) -> list[tuple[int, int]]:
    """(row, entry) where a 2-D mask of rows from `first_row` on is set, row-major (what is
    reported: usually nothing)."""
    if not mask.any():
        return []
    rows, entries = np.divmod(np.flatnonzero(mask), mask.shape[1])  # nonzero() of 2-D is slower
    return list(zip((rows + first_row).tolist(), entries.tolist(), strict=True))


def _within(rows: list[int], a: int, b: int) -> list[int]:
    """Of sorted `rows`, those in a..b, counted from a."""
    return [row - a for row in rows[bisect_left(rows, a) : bisect_left(rows, b)]]


def _gpte_access(g: np.ndarray, nxe: np.ndarray) -> np.ndarray:
    """ACC_* of gptes: W and U as they are, exec unless NX under EFER.NXE."""
    return (g & (_W | _USER)) | np.where(nxe & ((g & _U(pg.PT64_NX_MASK)) != 0), _U(0), _EXEC)


def _excess(got: np.ndarray, allowed: np.ndarray, wp0: np.ndarray) -> np.ndarray:
    """Rights beyond `allowed`, except CR0.WP=0's supervisor-only write to a read-only page."""
    excess = got & ~allowed
    wp0_shape = wp0 & (excess == _U(pg.ACC_WRITE_MASK)) & ((got & _U(pg.ACC_USER_MASK)) == 0)
    return (excess != 0) & ~wp0_shape


class PageArrays:
    """The checked entries of a list of shadow pages, as rows of 512 (a row per page), so
    that every check is a few numpy operations over many pages at once; Python runs only
    for what is reported.

    One pass over the pages, BLOCK_ROWS at a time, computes everything the per-entry checks
    test (flags, frames, rmap heads at the leaves' gfns) and keeps only where a check may
    fail: a block's int64 temporaries stay in the CPU's cache, where operations over all
    pages at once would each stream megabytes through memory."""

    def __init__(
        self, mmu: KvmMmu, sps: list[ShadowPage], gfns: set[int] | None,
        entries: list[set[int] | None] | None = None,
    ) -> None:
        n = len(sps)
        self.mmu = mmu
        self.sps = sps
        self.rmap_gfns = gfns
        self.index = np.fromiter((sp.index for sp in sps), dtype=np.int64, count=n)
        self.level = np.fromiter((sp.level for sp in sps), dtype=np.int64, count=n)
        self.base = np.fromiter((sp.gfn for sp in sps), dtype=np.int64, count=n)
        self.direct = direct = np.fromiter((sp.direct for sp in sps), dtype=bool, count=n)
        # Rows of the kinds a block treats apart (as lists: a block looks them up by bisection).
        self._upper = np.flatnonzero(self.level > 1).tolist()
        self._indirect = np.flatnonzero(~direct).tolist()
        self._direct_upper = np.flatnonzero(direct & (self.level > 1)).tolist()
        self._sptep1 = (self.index << 9) + 1  # of entry 0; a head holding one sptep holds sptep + 1
        # Every active page, every entry: leaves of these are all the live leaves there are.
        self.complete = entries is None and len(sps) == len(mmu.active_mmu_pages) and all(
            sp in mmu.active_mmu_pages for sp in sps
        )
        # Only the entries an operation changed: the per-entry checks look at those.
        self._chosen = {row: sorted(chosen) for row, chosen in enumerate(entries or ())
                        if chosen is not None}
        # What the pass finds, (row, entry) in row-major order: leaves that are not their
        # gfn's only rmap entry, leaves that fail check 1, leaves that fail spte_bits.
        self._unregistered: list[tuple[int, int]] = []
        self._bad_frame: list[tuple[int, int]] = []
        self._bad_bits: list[tuple[int, int]] = []
        self._leaves = 0  # how many leaves it saw
        self._filled = 0  # rows done

    def stages(self) -> tuple[tuple[str, Callable[[], object]], ...]:
        """The pass over the pages, in seven parts of about equal size, with a store point
        before each (run_checks): at 4 GiB of guest the pass moves tens of megabytes."""
        n = len(self.sps)
        return tuple((f"entries {k}/{STAGES}", partial(self._fill, n * k // STAGES))
                     for k in range(1, STAGES + 1))

    def _fill(self, upto: int) -> None:
        """The pass over rows not yet done, up to `upto`."""
        for start in range(self._filled, upto, BLOCK_ROWS):
            self._block(start, min(start + BLOCK_ROWS, upto))
        self._filled = max(self._filled, upto)

    def _done(self) -> None:
        self._fill(len(self.sps))

    def _block(self, a: int, b: int) -> None:
        """Rows a..b: leaves, spte_bits, check 1, and whether each leaf is the only entry
        of its gfn's rmap (the slots' rmap heads read at the leaves' gfns: the rmaps of all
        RAM are not read)."""
        index = self.index[a:b]
        s = _pool_rows(self.mmu.pool.spt_chunks, index)
        low = s.astype(_LOW)  # truncated: bits 0-15 hold every flag tested here
        leaf = self._present(low, range(a, b))
        upper = _within(self._upper, a, b)
        if upper:
            leaf[upper] &= (low[upper] & _LOW(pg.PT_PAGE_SIZE_MASK)) != 0
        self._leaves += int(np.count_nonzero(leaf))
        low &= _LOW(C.SPTE_BITS_MASK)
        ok = low == _LOW(C.SPTE_BITS_OK[0])
        for value in C.SPTE_BITS_OK[1:]:
            ok |= low == _LOW(value)
        self._bad_bits += _coords(leaf > ok, a)  # leaf and not ok
        gfns = self._gfns(a, b)
        offset = s & _ADDR  # frame - gfn, in place: one temporary, not three
        offset >>= _U(pg.PAGE_SHIFT)
        offset = offset.view(np.int64)
        offset -= gfns
        sptep1 = _rows_plus_index(self._sptep1[a:b])
        registered = np.zeros(leaf.shape, dtype=bool)
        bad_frame = np.zeros(leaf.shape, dtype=bool)
        for slot in self.mmu.memslots:
            rel = gfns - slot.base_gfn if slot.base_gfn else gfns
            in_slot = rel.view(np.uint64) < _U(slot.npages)
            head = slot.rmap.head.take(rel, mode="clip")
            registered |= (head == sptep1) & in_slot
            # A leaf maps the frame of its gfn in its slot: frame - gfn is the slot's offset.
            bad_frame |= (offset != slot.backing.base_pfn - slot.base_gfn) & in_slot
        self._bad_frame += _coords(bad_frame & leaf, a)
        self._unregistered += _coords(leaf > registered, a)

    def _present(self, sptes: np.ndarray, rows: Sequence[int]) -> np.ndarray:
        """Present entries among the run's entries, given the sptes of `rows` (or the low 16
        bits of them)."""
        present = (sptes & sptes.dtype.type(S.SPTE_MMU_PRESENT)) != 0
        for k, row in enumerate(rows) if self._chosen else ():
            if row in self._chosen:
                wanted = np.zeros(512, dtype=bool)
                wanted[self._chosen[row]] = True
                present[k] &= wanted
        return present

    def _gfns(self, a: int, b: int) -> np.ndarray:
        """The gfn of each entry of rows a..b (kvm_mmu_page_get_gfn()): computed for direct
        pages, recorded for indirect ones. An array of its own (the pass writes over it)."""
        gfns = _rows_plus_index(self.base[a:b])
        indirect = _within(self._indirect, a, b)
        if indirect:
            recorded = _pool_rows(self.mmu.pool.gfn_chunks, self.index[a:b][indirect])
            gfns[indirect] = recorded.view(np.int64)
        for k in _within(self._direct_upper, a, b):
            gfns[k] = self.base[a + k] + (_IDX << (9 * (int(self.level[a + k]) - 1)))
        return gfns

    def _rows(self, rows: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """The sptes of some rows, and which of them are present among the run's entries."""
        sptes = np.stack([self.sps[r].sptes for r in rows])
        return sptes, self._present(sptes, rows)

    @cached_property
    def _missing(self) -> list[tuple[int, int]]:
        """(row, entry) of the leaves that may not be in their gfn's rmap: a superset (an
        sptep in the chains of two gfns may show here). Checks 2 and rmap_exact look only
        at these, and each confirms what it reports."""
        self._done()
        found = self._unregistered
        if not found:
            return found
        chained = {sptep: slot.base_gfn + rel for slot in self.mmu.memslots
                   for rel, spteps in slot.rmap.desc.items() for sptep in spteps}
        sps = self.sps
        return [(r, i) for r, i in found if chained.get(sps[r].index << 9 | i) != sps[r].gfn_of(i)]

    def entry_reports(self, root_level: int) -> tuple[C.Messages, C.Messages]:
        self._done()
        sps = self.sps
        # Check 2 can fail only where the exact rmap check fails: Python looks at those.
        check2: C.Messages = {}
        for r, i in self._missing:
            spte = sps[r].spt[i]
            for text in C.inspect_spte_has_rmap(self.mmu, sps[r], i, sps[r].gfn_of(i), spte):
                C.add_message(check2, r, i, text)
        check1: C.Messages = {}
        for r, i in self._bad_frame:
            gfn = sps[r].gfn_of(i)
            slot = self.mmu.memslots.lookup(gfn)
            assert slot is not None  # the pass found it in one
            pfn = gfn - slot.base_gfn + slot.backing.base_pfn
            C.add_message(check1, r, i, C.msg_mapping(root_level, pfn, sps[r].spt[i]))
        return check2, check1

    def rmap_exact(self) -> list[str]:
        self._done()
        mmu = self.mmu
        pages = mmu.pool.pages
        out: list[str] = []
        for r, i in self._missing:
            # A superset: confirm against the gfn's own rmap.
            sp = self.sps[r]
            gfn = sp.gfn_of(i)
            if not C.in_own_rmap(mmu, sp, i, gfn):
                out.append(C.msg_not_in_rmap(sp, i, gfn))
        gfns = self.rmap_gfns
        if not out and self.complete and gfns is None and self._leaves == sum(
                slot.rmap.entry_count() for slot in mmu.memslots):
            # Every live leaf (sptep, gfn) is in its rmap, and the rmaps hold no more entries
            # than there are leaves: they hold exactly the leaves (distinct spteps), so no
            # rmap entry is stale.
            return out
        r_sptep, r_gfn = rmap_arrays(mmu, gfns)
        mapped = live_leaf_gfns(mmu, r_sptep)
        for k in C.gfn_order(r_gfn, mapped != r_gfn):
            sptep = int(r_sptep[k])
            out.append(C.msg_rmap_stale(int(r_gfn[k]), pages[sptep_page(sptep)], spte_index(sptep)))
        return out

    def translation(self, skip_gfn: int | None) -> list[str]:
        self._done()
        by_level: dict[bool, list[int]] = {True: [], False: []}
        tables: dict[bool, list[np.ndarray]] = {True: [], False: []}
        for row in self._indirect:  # translated_page() has nothing for direct pages
            sp = self.sps[row]
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

    @cached_property
    def _access(self) -> np.ndarray:
        """Each page's access."""
        return np.fromiter((sp.access for sp in self.sps), dtype=np.uint64, count=len(self.sps))

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
        s, present = self._rows(rows)
        gaccess = _gpte_access(g, nxe) & access
        bad_gpte = ((g & _U(pg.PT_PRESENT_MASK)) == 0) | ((g & rsvd) != 0)
        bad_gpte |= (g & _U(pg.PT_ACCESSED_MASK)) == 0
        want_gfn = ((g & _U(pg.PT64_BASE_ADDR_MASK)) >> _U(pg.PAGE_SHIFT)).view(np.int64)
        got_gfn = np.stack([self.sps[r]._gfns_np for r in rows]).view(np.int64)  # indirect pages
        allowed = np.where((g & _U(pg.PT_DIRTY_MASK)) != 0, gaccess, gaccess & ~_U(pg.ACC_WRITE_MASK))
        got = (s & (_W | _USER)) | np.where((s & _U(pg.PT64_NX_MASK)) != 0, _U(0), _EXEC)
        bad = present & (bad_gpte | (want_gfn != got_gfn) | _excess(got, allowed, wp0))
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
        sptes, present = self._rows(rows)
        ks, es = np.nonzero(present)
        gpte = g[ks, es]
        large = (level[ks] == 2) & ((gpte & _U(pg.PT_PAGE_SIZE_MASK)) != 0)
        rsvd = np.where(large, np.array(rsvd_large, dtype=np.uint64)[ks],
                        np.array(rsvd_table, dtype=np.uint64)[ks])
        bad_gpte = ((gpte & _U(pg.PT_PRESENT_MASK)) == 0) | ((gpte & rsvd) != 0)
        pages = self.mmu.pool.pages
        child = ((sptes[ks, es] & _ADDR) >> _U(pg.PAGE_SHIFT)).view(np.int64) - S.SPT_PFN_BASE
        # The children's facts from the run's rows where they are among its pages.
        row_of = np.full(len(pages), -1, dtype=np.int64)
        row_of[self.index] = np.arange(len(self.sps))
        c_row = row_of[child]
        c_direct, c_gfn, c_access = self.direct[c_row], self.base[c_row].view(np.uint64), self._access[c_row]
        for k in np.flatnonzero(c_row < 0).tolist():
            c = pages[child[k]]
            c_direct[k], c_gfn[k], c_access[k] = c.direct, c.gfn, c.access
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
            out.append((row, i, C.msg_link(self.sps[row], i, pages[child[k]], int(gpte[k]))))
        return out

    def spte_bits(self) -> list[str]:
        self._done()
        return [
            C.msg_spte_bits(self.sps[row], i, self.sps[row].spt[i])
            for row, i in self._bad_bits
        ]

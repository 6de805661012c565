"""The audit's per-spte checks vectorised over many shadow pages (the full audit, and
incremental runs too large for audit_scalar).

A page's 512 sptes are a row of 2-D arrays, and one pass over the pages, a block of rows at a
time, computes what the per-entry checks test: flags, gfns, frames, and the rmap head at each
leaf's gfn (mmud/kvm/rmap.py keeps the heads of a memslot in one array). It keeps only where a
check may fail. Stretches of direct level-1 pages a guest faulted in order (consecutive pool
rows mapping consecutive gfns) take a shorter way: a few operations over a piece of one
prove it has nothing to report, and only a piece where that fails is computed in full. The
rmaps are read whole (as (sptep, gfn) arrays) only when the leaves and the rmap entries do
not pair up one to one. So a run costs a few dozen numpy operations per block, plus Python
per reported error, per link of an upper-level page and per synced indirect page.
"""

from __future__ import annotations

import threading
from bisect import bisect_right
from collections.abc import Callable, Iterable, Sequence
from functools import cached_property, partial

import numpy as np

from mmud.kvm.mmu import audit_checks as C
from mmud.kvm.mmu import spte as S
from mmud.kvm.mmu.mmu import KvmMmu
from mmud.kvm.mmu.page import (
    ROLE_ACCESS_MASK,
    ROLE_ACCESS_SHIFT,
    ROLE_CR0_WP,
    ROLE_DIRECT,
    ROLE_LEVEL_MASK,
    ROLE_NXE,
    ShadowPage,
    spte_index,
    sptep_page,
)
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
_FLAT = np.arange(BLOCK_ROWS * 512, dtype=np.int64)  # each entry's place in a piece of a stretch
_FLAT_ADDR = (_FLAT << pg.PAGE_SHIFT).view(np.uint64)  # and the frame address that adds
_LOCAL = threading.local()  # numpy lets other threads run (another VM's audit) during an operation
assert max(S.SPTE_MMU_PRESENT, pg.PT_PAGE_SIZE_MASK, C.SPTE_BITS_MASK) < 1 << 16
MIN_STRETCH = 8  # pages: below this, a stretch's check costs more than the general pass
# The flags of a present leaf that keeps spte_bits, the commonest first (writable, then
# write-protected): a stretch's check counts them until every entry is accounted for.
_LEAF_FLAGS = tuple(_LOW(S.SPTE_MMU_PRESENT | C.SPTE_BITS_OK[k]) for k in (3, 1, 2, 0))


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


def _scratch() -> np.ndarray:
    """Two int64 temporaries for a piece of a stretch, made once per thread: a fresh 256 KiB
    array costs the host's page faults on every use, more than the operation that fills it."""
    try:
        return _LOCAL.scratch
    except AttributeError:
        _LOCAL.scratch = np.empty((2, _FLAT.size), dtype=np.int64)
        return _LOCAL.scratch


def _coords(mask: np.ndarray, rows: np.ndarray | None = None) -> list[tuple[int, int]]:
    """(row, entry) where a 2-D mask is set, row-major, its k-th row being rows[k] (None:
    k): what is reported, usually nothing."""
    if not mask.any():
        return []
    at, entries = np.divmod(np.flatnonzero(mask), mask.shape[1])  # nonzero() of 2-D is slower
    return list(zip((at if rows is None else rows[at]).tolist(), entries.tolist(), strict=True))


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
    pages at once would each stream megabytes through memory. The pass takes the stretches
    first (_plan) and puts what it finds back in row order at its end."""

    def __init__(
        self, mmu: KvmMmu, sps: list[ShadowPage], gfns: set[int] | None,
        entries: list[set[int] | None] | None = None,
    ) -> None:
        n = len(sps)
        self.mmu = mmu
        self.sps = sps
        self.rmap_gfns = gfns
        self.index = np.fromiter((sp.index for sp in sps), dtype=np.int64, count=n)
        self.base = np.fromiter((sp.gfn for sp in sps), dtype=np.int64, count=n)
        # Level, direct and access as the kernel reads them, from sp->role (a page's own
        # copies of them are made from its role, which nothing changes but ROLE_INVALID).
        self.role = role = np.fromiter((sp.role for sp in sps), dtype=np.int64, count=n)
        self.level = role & ROLE_LEVEL_MASK
        self.direct = direct = (role & ROLE_DIRECT) != 0
        self._access = ((role & ROLE_ACCESS_MASK) >> ROLE_ACCESS_SHIFT).astype(np.uint64)
        self._indirect = np.flatnonzero(~direct).tolist()
        self._sptep1 = (self.index << 9) + 1  # of entry 0; a head holding one sptep holds sptep + 1
        # Every active page, every entry: leaves of these are all the live leaves there are.
        self.complete = entries is None and len(sps) == len(mmu.active_mmu_pages) and all(
            map(mmu.active_mmu_pages.__contains__, sps)
        )
        # Only the entries an operation changed: the per-entry checks look at those.
        self._chosen = {row: sorted(chosen) for row, chosen in enumerate(entries or ())
                        if chosen is not None}
        # The memslot holding all 512 gfns of each row's page, as an index in _slots (or -1).
        self._slots = list(mmu.memslots)
        self._slot_of = np.full(n, -1, dtype=np.int64)
        for k, slot in enumerate(self._slots):
            self._slot_of[(self.base >= slot.base_gfn) & (self.base + 512 <= slot.end_gfn)] = k
        self._order, self._cuts, self._stretched = self._plan()
        # What the pass finds, (row, entry) in row-major order: leaves that are not their
        # gfn's only rmap entry, leaves that fail check 1, leaves that fail spte_bits.
        self._unregistered: list[tuple[int, int]] = []
        self._bad_frame: list[tuple[int, int]] = []
        self._bad_bits: list[tuple[int, int]] = []
        self._leaves = 0  # how many leaves it saw
        # Per memslot (as _slots), the gfn ranges of the stretches' pieces found clean: their
        # rmap heads hold one entry each.
        self._singles: list[list[tuple[int, int]]] = [[] for _ in self._slots]
        self._filled = 0  # places of _order done

    def _plan(self) -> tuple[np.ndarray, list[int], int]:
        """The order of the pass: first the stretches, then the other level-1 rows, then the
        upper-level rows (in row order: their blocks seldom hold a leaf, and a block without
        one is done once it has counted them); the places in it where a piece of a stretch
        or a block ends; how many rows the stretches hold.

        A stretch is a page table a guest filled in order: direct level-1 pages at consecutive
        pool indices of one chunk, mapping consecutive gfns of one memslot (a guest's
        sequential touches of its RAM fault them in so). Its sptes are one slice of a chunk
        and the rmap heads of its gfns one slice of the slot's heads, so each piece of it
        (BLOCK_ROWS pages at most) is checked with a few numpy operations over all its
        entries at once (_stretch_clean), and goes to the general pass only if that fails."""
        slot_of = self._slot_of
        candidate = self.direct & (self.level == 1) & (slot_of >= 0)
        candidate[list(self._chosen)] = False
        rows = np.flatnonzero(candidate)
        rows = rows[np.argsort(self.index[rows], kind="stable")]
        stretched = np.zeros(len(rows), dtype=bool)
        starts: list[int] = []
        if len(rows):
            index, per = self.index[rows], len(self.mmu.pool.spt_chunks[0])
            follows = ((np.diff(index) == 1) & (index[1:] % per != 0)
                       & (np.diff(self.base[rows]) == 512) & (np.diff(slot_of[rows]) == 0))
            starts = np.flatnonzero(np.concatenate(([True], ~follows))).tolist()
        lengths = np.diff([*starts, len(rows)]).tolist()
        for a, length in zip(starts, lengths, strict=True):
            stretched[a : a + length] = length >= MIN_STRETCH
        rest = np.ones(len(self.sps), dtype=bool)
        rest[rows[stretched]] = False
        upper = self.level > 1
        parts = (rows[stretched], np.flatnonzero(rest & ~upper), np.flatnonzero(rest & upper))
        cuts: list[int] = []
        for length in [n for n in lengths if n >= MIN_STRETCH] + [len(p) for p in parts[1:] if len(p)]:
            first = cuts[-1] if cuts else 0
            cuts += range(first + BLOCK_ROWS, first + length, BLOCK_ROWS)
            cuts.append(first + length)
        return np.concatenate(parts), cuts, len(parts[0])

    def stages(self) -> tuple[tuple[str, Callable[[], object]], ...]:
        """The pass over the pages, in seven parts of about equal size, with a store point
        before each (run_checks): at 4 GiB of guest the pass moves tens of megabytes. Each
        part ends where a piece or block does, the nearest to its seventh of the pages, so
        that no piece is checked in two."""
        n, ends = len(self.sps), np.array([0, *self._cuts])
        parts = [int(ends[np.abs(ends - n * k // STAGES).argmin()]) for k in range(1, STAGES + 1)]
        return tuple((f"entries {k}/{STAGES}", partial(self._fill, end)) for k, end in enumerate(parts, 1))

    def _fill(self, upto: int) -> None:
        """The pass over places of _order not yet done, up to `upto`: pieces of stretches, then
        blocks of the other rows."""
        place = self._filled
        if place >= upto:
            return  # done already: what it found is sorted
        while place < upto:
            end = min(self._cuts[bisect_right(self._cuts, place)], upto)
            rows = self._order[place:end]
            if place < self._stretched and self._stretch_clean(rows):
                self._leaves += len(rows) * 512
                gfn = int(self.base[rows[0]])
                self._singles[int(self._slot_of[rows[0]])].append((gfn, gfn + len(rows) * 512))
            else:
                self._block(rows)
            place = end
        self._filled = place
        if place == len(self.sps):  # back in row-major order: the pass went in _order's
            for found in (self._unregistered, self._bad_frame, self._bad_bits):
                found.sort()

    def _done(self) -> None:
        self._fill(len(self.sps))

    def _stretch_clean(self, rows: np.ndarray) -> bool:
        """Whether a piece of a stretch has nothing to report: every entry a present leaf with
        flags that keep spte_bits, entry k's rmap head holding just its sptep (that of entry
        0 plus k) and its frame that of its gfn (that of entry 0's gfn plus k), as check 1
        wants."""
        first, size = int(self.index[rows[0]]), len(rows) * 512
        chunks = self.mmu.pool.spt_chunks
        at = first % len(chunks[0])
        sptes = chunks[first // len(chunks[0])][at : at + len(rows)]
        low = sptes.astype(_LOW)  # truncated: bits 0-15 hold every flag tested here
        low &= _LOW(S.SPTE_MMU_PRESENT | C.SPTE_BITS_MASK)
        kept = 0
        for flags in _LEAF_FLAGS:
            kept += int(np.count_nonzero(low == flags))
            if kept == size:
                break
        else:
            return False
        slot = self._slots[int(self._slot_of[rows[0]])]
        rel = int(self.base[rows[0]]) - slot.base_gfn
        head = slot.rmap.head[rel : rel + size]
        sptep1 = (first << 9) + 1
        scratch = _scratch()
        held = np.subtract(head, _FLAT[:size], out=scratch[0, :size])
        if held.min() != sptep1 or held.max() != sptep1:
            return False
        frame = np.bitwise_and(sptes.reshape(-1), _ADDR, out=scratch[1, :size].view(np.uint64))
        frame -= _FLAT_ADDR[:size]  # entry 0's frame address everywhere
        want = _U((int(self.base[rows[0]]) + slot.backing.base_pfn - slot.base_gfn) << pg.PAGE_SHIFT)
        return bool(frame.min() == want == frame.max())

    def _block(self, rows: np.ndarray) -> None:
        """Some rows: leaves, spte_bits, check 1, and whether each leaf is the only entry of
        its gfn's rmap (the slots' rmap heads read at the leaves' gfns: the rmaps of all RAM
        are not read)."""
        index, level = self.index[rows], self.level[rows]
        s = _pool_rows(self.mmu.pool.spt_chunks, index)
        low = s.astype(_LOW)  # truncated: bits 0-15 hold every flag tested here
        leaf = self._present(low, rows.tolist() if self._chosen else ())
        upper = np.flatnonzero(level > 1)
        if len(upper):
            leaf[upper] &= (low[upper] & _LOW(pg.PT_PAGE_SIZE_MASK)) != 0
        leaves = int(np.count_nonzero(leaf))
        self._leaves += leaves
        if not leaves:  # every check below looks at leaves only
            return
        low &= _LOW(C.SPTE_BITS_MASK)
        ok = low == _LOW(C.SPTE_BITS_OK[0])
        for value in C.SPTE_BITS_OK[1:]:
            ok |= low == _LOW(value)
        self._bad_bits += _coords(leaf > ok, rows)  # leaf and not ok
        gfns = self._gfns(rows, index, level)
        offset = s & _ADDR  # frame - gfn, in place: one temporary, not three
        offset >>= _U(pg.PAGE_SHIFT)
        offset = offset.view(np.int64)
        offset -= gfns
        sptep1 = _rows_plus_index(self._sptep1[rows])
        registered = np.zeros(leaf.shape, dtype=bool)
        bad_frame = np.zeros(leaf.shape, dtype=bool)
        for slot in self.mmu.memslots:
            rel = gfns - slot.base_gfn if slot.base_gfn else gfns
            in_slot = rel.view(np.uint64) < _U(slot.npages)
            head = slot.rmap.head.take(rel, mode="clip")
            registered |= (head == sptep1) & in_slot
            # A leaf maps the frame of its gfn in its slot: frame - gfn is the slot's offset.
            bad_frame |= (offset != slot.backing.base_pfn - slot.base_gfn) & in_slot
        self._bad_frame += _coords(bad_frame & leaf, rows)
        self._unregistered += _coords(leaf > registered, rows)

    def _present(self, sptes: np.ndarray, rows: Sequence[int]) -> np.ndarray:
        """Present entries among the run's entries, given the sptes of `rows` (or the low 16
        bits of them); rows may be left out when no row has chosen entries."""
        present = (sptes & sptes.dtype.type(S.SPTE_MMU_PRESENT)) != 0
        for k, row in enumerate(rows) if self._chosen else ():
            if row in self._chosen:
                wanted = np.zeros(512, dtype=bool)
                wanted[self._chosen[row]] = True
                present[k] &= wanted
        return present

    def _gfns(self, rows: np.ndarray, index: np.ndarray, level: np.ndarray) -> np.ndarray:
        """The gfn of each entry of some rows (kvm_mmu_page_get_gfn()): computed for direct
        pages, recorded for indirect ones. An array of its own (the pass writes over it)."""
        gfns = _rows_plus_index(self.base[rows])
        direct = self.direct[rows]
        indirect = np.flatnonzero(~direct)
        if len(indirect):
            gfns[indirect] = _pool_rows(self.mmu.pool.gfn_chunks, index[indirect]).view(np.int64)
        for k in np.flatnonzero(direct & (level > 1)).tolist():
            gfns[k] = self.base[rows[k]] + (_IDX << (9 * (int(level[k]) - 1)))
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
                slot.rmap.entry_count(sorted(singles))
                for slot, singles in zip(self._slots, self._singles, strict=True)):
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

    def _row_facts(self, rows: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per row, as columns: EFER.NXE and CR0.WP=0 of the page's role, its access."""
        role = self.role[rows][:, None]
        return (role & ROLE_NXE) != 0, (role & ROLE_CR0_WP) == 0, self._access[rows][:, None]

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
        ks, es = np.divmod(np.flatnonzero(present), 512)  # nonzero() of 2-D is slower
        gpte = g[ks, es]
        large = (level[ks] == 2) & ((gpte & _U(pg.PT_PAGE_SIZE_MASK)) != 0)
        rsvd = np.where(large, np.array(rsvd_large, dtype=np.uint64)[ks],
                        np.array(rsvd_table, dtype=np.uint64)[ks])
        bad_gpte = ((gpte & _U(pg.PT_PRESENT_MASK)) == 0) | ((gpte & rsvd) != 0)
        pages = self.mmu.pool.pages
        child = S.spte_child_indices(sptes[ks, es])
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

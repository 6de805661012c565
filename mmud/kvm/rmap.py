"""Arrays of `struct kvm_rmap_head`: a memslot's level-1 rmap and the shadow pages' parent_ptes.

The kernel keeps one `struct kvm_rmap_head` per page of a slot (`slot->arch.rmap[0]`: for
each gfn, the sptes mapping it) and one in each shadow page (`sp->parent_ptes`: the sptes
pointing at it), both with the pte_list encoding: an empty head, a head holding the one spte
pointer itself, or a head pointing at a chain of descriptors. mmud does the same for an
array of heads: `head` is an int64 numpy array with one entry per key (a page of the slot,
or a row of the shadow-page pool) — `EMPTY` (0), a single sptep stored as sptep + 1 (> 0),
or `MANY`, whose spteps are in the `desc` list of that key. Empty being 0, as a NULL head is
in the kernel, the array starts as zeroes that the host commits only where a gfn gets
mapped: the heads of a 1 TiB slot take 2 GiB of address space, not of memory. Nearly every
gfn has at most one mapping, and nearly every shadow page one parent, so the whole rmap is
one array: the audit and dirty logging read it, and a zap clears a page's worth of heads,
with a few numpy operations, while the fault path reads and writes heads through a
memoryview as cheaply as a dict.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import chain

import numpy as np

from mmud.hostmem import lazy_zeros
from mmud.x86.paging import PT64_ENT_PER_PAGE

EMPTY = 0
MANY = -2
_ONE_UP = np.arange(1, PT64_ENT_PER_PAGE + 1, dtype=np.int64)  # entry i's sptep + 1 - first


class Rmap:
    """Heads for the keys base_gfn .. base_gfn + npages - 1 (gfns of a slot, or pool rows
    from 0); every method takes the key as the gfn but spteps_of, which takes a dirty
    bitmap's page numbers."""

    __slots__ = ("base_gfn", "head", "_head", "desc")

    def __init__(self, base_gfn: int, npages: int) -> None:
        self.base_gfn = base_gfn
        self.head = lazy_zeros(npages, np.int64)
        self._head = self.head.data
        self.desc: dict[int, list[int]] = {}  # page of the slot -> spteps (2 or more)

    def resize(self, npages: int) -> None:
        """Room for npages heads, the ones held kept (the pool's parent_ptes grow with it)."""
        head = lazy_zeros(npages, np.int64)
        head[:len(self.head)] = self.head
        self.head = head
        self._head = head.data

    def reset(self, gfn: int) -> None:
        """Empty gfn's head, whatever it holds (a shadow page allocated anew)."""
        rel = gfn - self.base_gfn
        if self._head[rel] == MANY:
            del self.desc[rel]
        self._head[rel] = EMPTY

    def add(self, gfn: int, sptep: int) -> int:
        """pte_list_add(): returns how many entries the head held before ("the number of
        pointers in the rmap chain, not counting the new one"), which the caller compares
        with RMAP_RECYCLE_THRESHOLD and records in the max_mmu_rmap_size peak."""
        rel = gfn - self.base_gfn
        head = self._head
        h = head[rel]
        if h == EMPTY:
            head[rel] = sptep + 1
            return 0
        if h != MANY:
            self.desc[rel] = [h - 1, sptep]
            head[rel] = MANY
            return 1
        entries = self.desc[rel]
        entries.append(sptep)
        return len(entries) - 1

    def remove(self, gfn: int, sptep: int) -> bool:
        """pte_list_remove(); False if sptep is not in gfn's rmap."""
        rel = gfn - self.base_gfn
        head = self._head
        h = head[rel]
        if h == sptep + 1:
            head[rel] = EMPTY
            return True
        if h != MANY:
            return False
        entries = self.desc[rel]
        if sptep not in entries:
            return False
        entries.remove(sptep)
        if len(entries) == 1:
            head[rel] = entries[0] + 1
            del self.desc[rel]
        return True

    def remove_many(self, gfns: np.ndarray, spteps: np.ndarray) -> int:
        """remove() of each (gfn, sptep) (int64 arrays, every gfn in this slot); how many
        were in the rmap. A head holding just that sptep is cleared in one numpy operation;
        the rest (chains, and a sptep that is not there) go one by one, in order."""
        rels = gfns - self.base_gfn if self.base_gfn else gfns
        single = self.head[rels] == spteps + 1
        self.head[rels[single]] = EMPTY
        removed = int(np.count_nonzero(single))
        if removed < len(rels):
            rest = ~single
            for gfn, sptep in zip(gfns[rest].tolist(), spteps[rest].tolist(), strict=True):
                removed += self.remove(gfn, sptep)
        return removed

    def remove_run(self, gfn: int, present: np.ndarray, n_present: int, first_sptep: int) -> int:
        """remove() of sptep first_sptep + k from the rmap of gfn + k for every k where
        `present` (PT64_ENT_PER_PAGE values, nonzero = present; `n_present` of them) is set
        — the sptes of a last-level direct page, which map consecutive gfns, or of a
        directory whose children are consecutive pool rows — all of them in this rmap; how
        many were in it. The heads are one slice, compared and cleared in a few numpy
        operations, or fewer when every entry is there and alone in its head; chains, and a
        sptep that is not there, go one by one, in order."""
        rel = gfn - self.base_gfn
        heads = self.head[rel:rel + PT64_ENT_PER_PAGE]
        single = heads == _ONE_UP + first_sptep
        removed = int(np.count_nonzero(single))
        if removed == n_present == PT64_ENT_PER_PAGE:
            heads.fill(EMPTY)
            return removed
        np.logical_and(single, present, out=single)
        heads[single] = EMPTY
        removed = int(np.count_nonzero(single))
        if removed < n_present:
            rest = np.flatnonzero(np.logical_and(present, ~single)).tolist()
            for k in rest:
                removed += self.remove(gfn + k, first_sptep + k)
        return removed

    def get(self, gfn: int) -> Sequence[int]:
        """The spteps mapping gfn (the live chain when there are several: copy to mutate)."""
        h = self._head[gfn - self.base_gfn]
        if h > 0:
            return (h - 1,)
        if h == EMPTY:
            return ()
        return self.desc[gfn - self.base_gfn]

    def has(self, gfn: int) -> bool:
        return self._head[gfn - self.base_gfn] != EMPTY

    def entry_count(self, singles: Sequence[tuple[int, int]] = ()) -> int:
        """How many entries all heads hold: the non-empty heads but those of chains (MANY),
        and the chains' entries. No temporary as large as the heads (1 TiB has 2^28).

        `singles`: sorted, disjoint gfn ranges [start, stop) whose heads the caller knows to
        hold one entry each (the audit's pass has read them); they are not read again."""
        bounds = [self.base_gfn, *chain.from_iterable(singles), self.base_gfn + len(self.head)]
        held = sum(b - a for a, b in singles)
        for a, b in zip(bounds[::2], bounds[1::2], strict=True):
            held += int(np.count_nonzero(self.head[a - self.base_gfn : b - self.base_gfn]))
        return held - len(self.desc) + sum(map(len, self.desc.values()))

    def mapped(self) -> np.ndarray:
        """Mask over the slot's pages: which have a non-empty rmap."""
        return self.head != EMPTY

    def spteps_of(self, pages: np.ndarray) -> np.ndarray:
        """The spteps in the rmaps of `pages` — numbered from base_gfn, as a dirty bitmap
        numbers them, not gfns; int64, ascending, each once — in no particular order: the
        single heads' as one gather (one slice where the pages are a run, as when every page
        is dirty), then the chains'. Its cost follows len(pages), not the slot's size (a
        harvest's dirty pages of a 1 TiB slot)."""
        if not len(pages):
            return pages
        first = int(pages[0])
        if int(pages[-1]) - first + 1 == len(pages):
            heads = self.head[first:first + len(pages)]
            chained = (np.flatnonzero(heads == MANY) + first).tolist()
        else:
            heads = self.head[pages]
            chained = pages[heads == MANY].tolist()
        single = heads[heads > 0] - 1
        if not chained:
            return single
        lists = [self.desc[r] for r in chained]
        count = sum(map(len, lists))
        return np.concatenate((single, np.fromiter(chain.from_iterable(lists), dtype=np.int64, count=count)))

    def entries(self, select: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(sptep, gfn) of every entry — of the pages where the mask `select` is set, if
        given: the single heads in gfn order, then the chains in gfn order (each in chain
        order). Sort by gfn (stably) for the rmap's own order."""
        head = self.head
        single = head > 0
        if select is not None:
            single &= select
        rels = np.flatnonzero(single)
        chained = sorted(r for r in self.desc if select is None or select[r])
        lists = [self.desc[r] for r in chained]
        lens = np.fromiter(map(len, lists), dtype=np.int64, count=len(lists))
        n = len(rels)
        sptep = np.empty(n + int(lens.sum()), dtype=np.int64)
        gfn = np.empty_like(sptep)
        np.take(head, rels, out=sptep[:n])
        sptep[:n] -= 1
        np.add(rels, self.base_gfn, out=gfn[:n])
        if chained:
            gfn[n:] = np.repeat(np.array(chained, dtype=np.int64) + self.base_gfn, lens)
            sptep[n:] = np.fromiter(chain.from_iterable(lists), dtype=np.int64, count=len(sptep) - n)
        return sptep, gfn

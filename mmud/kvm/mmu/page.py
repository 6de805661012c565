"""Shadow pages (`struct kvm_mmu_page`), their role word, and the pool that holds their sptes.

The sptes of all shadow pages live in numpy chunks of CHUNK_PAGES × 512 uint64, never moved
or reallocated, so whole-MMU walks (audit, zap-all, dirty-log protection) are vectorised over
a few arrays, while the per-fault path indexes a page's `memoryview` and gets plain Python
ints. Indirect pages also record the gfn of each spte (`gfns`, the kernel's `sp->gfns[]`).
Each page's parent_ptes is its row's head in one `Rmap` of the pool (the kernel's
`struct kvm_rmap_head`), so that a zap unlinks a directory's 512 children with a few numpy
operations instead of visiting 512 objects.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TypeVar

import numpy as np

from mmud.kvm.rmap import Rmap
from mmud.x86.paging import PT64_ENT_PER_PAGE, PT64_LEVEL_BITS

CHUNK_PAGES = 256
PARENT_ROWS = 1 << 12  # parent_ptes heads a pool starts with (an 8 GiB guest needs more)
T = TypeVar("T", int, np.ndarray)

# union kvm_mmu_page_role (v5.16), LSB first. Keep in step with the kernel's layout so that
# printed role words (the audit prints them) read like the kernel's.
ROLE_LEVEL_MASK = 0xF
ROLE_GPTE_IS_8_BYTES = 1 << 4
ROLE_DIRECT = 1 << 7
ROLE_ACCESS_SHIFT = 8
ROLE_ACCESS_MASK = 0x7 << ROLE_ACCESS_SHIFT
ROLE_INVALID = 1 << 11
ROLE_NXE = 1 << 12
ROLE_CR0_WP = 1 << 13
ROLE_SMEP_ANDNOT_WP = 1 << 14
ROLE_SMAP_ANDNOT_WP = 1 << 15
# The paging-mode part every shadow page of one context shares (mmu_base_role_mask).
ROLE_BASE_MASK = (
    ROLE_GPTE_IS_8_BYTES | ROLE_NXE | ROLE_CR0_WP | ROLE_SMEP_ANDNOT_WP | ROLE_SMAP_ANDNOT_WP
)

KVM_MMU_HASH_SHIFT = 12
_GOLDEN_RATIO_64 = 0x61C8864680B583EB
_U64 = (1 << 64) - 1


def hash_64(val: int, bits: int = KVM_MMU_HASH_SHIFT) -> int:
    """include/linux/hash.h hash_64(): the bucket of a gfn in mmu_page_hash."""
    return ((val * _GOLDEN_RATIO_64) & _U64) >> (64 - bits)


def make_role(base: int, level: int, direct: bool, access: int) -> int:
    role = (base & ROLE_BASE_MASK) | level | (access << ROLE_ACCESS_SHIFT)
    if direct:
        role |= ROLE_DIRECT | ROLE_GPTE_IS_8_BYTES
    return role


# Where the pool's pages would sit in the host kernel's address space: a stable stand-in for
# the hashed `%p` printk gives a `struct kvm_mmu_page *` (16 hex digits).
SP_ADDRESS_BASE = 0xFFFF888100000000


# KVM_MMU_PAGE_PRINTK's access table, indexed by role.access (ACC_EXEC 1, ACC_WRITE 2, ACC_USER 4).
ACCESS_STR = ("---", "--x", "w--", "w-x", "-u-", "-ux", "wu-", "wux")


def kvm_mmu_page_printk(mmu_valid_gen: int, gfn: int, role: int, root_count: int, unsync: bool) -> str:
    """KVM_MMU_PAGE_PRINTK() (mmutrace.h, v5.16): a shadow page and its role word,
    `sp gen %u gfn %llx l%u %u-byte q%u%s %s%s %snxe %sad root %u %s` (gen is the trace
    field's __u8). The kvmmmu tracepoints and vm<N>/mmu/pages print pages this way."""
    quadrant = role >> 5 & 3
    ad_disabled = role >> 16 & 1
    return (f"sp gen {mmu_valid_gen & 0xFF} gfn {gfn:x} l{role & ROLE_LEVEL_MASK} "
            f"{8 if role & ROLE_GPTE_IS_8_BYTES else 4}-byte q{quadrant}"
            f"{' direct' if role & ROLE_DIRECT else ''} "
            f"{ACCESS_STR[(role & ROLE_ACCESS_MASK) >> ROLE_ACCESS_SHIFT]}"
            f"{' invalid' if role & ROLE_INVALID else ''} {'' if role & ROLE_NXE else '!'}nxe "
            f"{'!' if ad_disabled else ''}ad root {root_count} {'unsync' if unsync else 'sync'}")


def sp_address(sp: ShadowPage) -> str:
    return f"{SP_ADDRESS_BASE + sp.index * 0x100:016x}"


# A `u64 *sptep` is pool index << SPTEP_SHIFT | entry; these two helpers (and sptep_of) are
# the only code that knows it. They work on ints and on numpy arrays of sptep alike.
SPTEP_SHIFT = 9  # PT64_ENT_PER_PAGE entries per page
SPTEP_INDEX_MASK = (1 << SPTEP_SHIFT) - 1


def sptep_of(sp: ShadowPage, i: int) -> int:
    """A pointer to entry i of sp, as an int (the kernel's `u64 *sptep`)."""
    return sp.index << SPTEP_SHIFT | i


def sptep_page(sptep: T) -> T:
    """The pool index of the shadow page sptep points into (sptep_to_sp() without the pool)."""
    return sptep >> SPTEP_SHIFT


def spte_index(sptep: T) -> T:
    """Which entry of its page sptep points at (`sptep - sp->spt`)."""
    return sptep & SPTEP_INDEX_MASK


class ParentPtes:
    """`sp->parent_ptes`: the sptes pointing at one shadow page, in the order they came, as
    a list of spteps would hold them — row `row` of the pool's parent rmap."""

    __slots__ = ("_rmap", "_row")

    def __init__(self, rmap: Rmap, row: int) -> None:
        self._rmap = rmap
        self._row = row

    def append(self, sptep: int) -> None:
        """pte_list_add()."""
        self._rmap.add(self._row, sptep)

    def remove(self, sptep: int) -> None:
        """pte_list_remove(); ValueError if sptep is not there, as list.remove."""
        if not self._rmap.remove(self._row, sptep):
            raise ValueError(f"sptep {sptep:#x} is not a parent pte")

    def clear(self) -> None:
        self._rmap.reset(self._row)

    def __contains__(self, sptep: object) -> bool:
        return sptep in self._rmap.get(self._row)

    def __iter__(self) -> Iterator[int]:
        return iter(self._rmap.get(self._row))

    def __len__(self) -> int:
        return len(self._rmap.get(self._row))

    def __repr__(self) -> str:
        return repr(list(self))


class ShadowPage:
    """One shadow page. Identity is (gfn, role); `index` is its row in the pool."""

    __slots__ = (
        "index", "spt", "sptes", "gfns", "gfn", "role", "level", "direct", "access",
        "unsync", "unsync_children", "unsync_child_bitmap", "parent_ptes", "root_count",
        "mmu_valid_gen", "write_flooding_count", "invalid", "_gfns_np", "hashed",
    )

    def __init__(self, index: int, sptes: np.ndarray, gfns: np.ndarray, parents: Rmap) -> None:
        self.index = index
        self.sptes = sptes  # numpy row view, for vectorised work on one page
        self.spt = sptes.data  # a memoryview: Python-int access on the hot path
        self._gfns_np = gfns
        self.gfns = gfns.data
        self.parent_ptes = ParentPtes(parents, index)  # sptep_of(parent, entry) of each parent
        self.hashed = False  # in mmu_page_hash: from alloc until its row is allocated again
        self.init(0, 0, 0)

    def init(self, gfn: int, role: int, gen: int) -> None:
        """kvm_mmu_alloc_page(): a page from the pool starts as new for (gfn, role)."""
        self.gfn = gfn
        self.role = role
        self.level = role & ROLE_LEVEL_MASK
        self.direct = bool(role & ROLE_DIRECT)
        self.access = (role & ROLE_ACCESS_MASK) >> ROLE_ACCESS_SHIFT
        self.unsync = False
        self.unsync_children = 0
        self.unsync_child_bitmap = 0  # Python int, bit i = entry i
        self.parent_ptes.clear()
        self.root_count = 0
        self.mmu_valid_gen = gen
        self.write_flooding_count = 0
        self.invalid = False
        self.sptes[:] = 0
        self._gfns_np[:] = 0

    def gfn_of(self, i: int) -> int:
        """kvm_mmu_page_get_gfn(): the gfn entry i maps."""
        if self.direct:
            return self.gfn + (i << ((self.level - 1) * PT64_LEVEL_BITS))
        return self.gfns[i]

    def mark_invalid(self) -> None:
        self.invalid = True
        self.role |= ROLE_INVALID

    def __repr__(self) -> str:
        return f"<sp {self.index} gfn={self.gfn:#x} role={self.role:#x}>"


class ShadowPagePool:
    """Storage of all shadow pages: chunked spte/gfn arrays and a free list of rows.

    The free list is a stack: rows never used, under the lists of pages freed by each
    commit (`release_all`), newest on top; `alloc` takes the top row. A commit hands its
    list over whole, so that freeing N pages costs the same as freeing one.

    `parent_ptes` holds every row's parent_ptes head (pool index = key); its capacity
    doubles as the pool grows past it.
    """

    def __init__(self) -> None:
        self.spt_chunks: list[np.ndarray] = []
        self.gfn_chunks: list[np.ndarray] = []
        self.parent_ptes = Rmap(0, PARENT_ROWS)
        self.pages: list[ShadowPage] = []  # by index, allocated or free
        self.free: list[int] = []  # rows never used, lowest index on top
        self._released: list[list[ShadowPage]] = []  # freed pages, by commit

    def _grow(self) -> None:
        base = len(self.pages)
        spt = np.zeros((CHUNK_PAGES, PT64_ENT_PER_PAGE), dtype=np.uint64)
        gfns = np.zeros((CHUNK_PAGES, PT64_ENT_PER_PAGE), dtype=np.uint64)
        self.spt_chunks.append(spt)
        self.gfn_chunks.append(gfns)
        if base + CHUNK_PAGES > len(self.parent_ptes.head):
            self.parent_ptes.resize(2 * len(self.parent_ptes.head))
        parents = self.parent_ptes
        self.pages.extend(ShadowPage(base + i, spt[i], gfns[i], parents) for i in range(CHUNK_PAGES))
        # Lowest index first, so allocation order (and so the run) is deterministic.
        self.free.extend(range(base + CHUNK_PAGES - 1, base - 1, -1))

    def alloc(self) -> ShadowPage:
        released = self._released
        while released:
            if released[-1]:
                return released[-1].pop()
            released.pop()
        if not self.free:
            self._grow()
        return self.pages[self.free.pop()]

    def release_all(self, sps: list[ShadowPage]) -> None:
        """Return the pages of a commit, which the caller no longer holds; the last of
        them is the next to be allocated, as if each had been freed in turn."""
        self._released.append(sps)

    def free_rows(self) -> list[int]:
        """Every free row, the next to be allocated last."""
        return [*self.free, *(sp.index for sps in self._released for sp in sps)]

    def spt_array(self) -> np.ndarray:
        """Every page's sptes as one (pages, 512) array, indexed by pool index (a copy when
        there are several chunks): for reading many sptes at once."""
        return _joined(self.spt_chunks)

    def gfn_array(self) -> np.ndarray:
        """Every page's recorded gfns (`sp->gfns[]`), likewise."""
        return _joined(self.gfn_chunks)


def _joined(chunks: list[np.ndarray]) -> np.ndarray:
    if len(chunks) == 1:
        return chunks[0]
    return np.concatenate(chunks) if chunks else np.zeros((0, PT64_ENT_PER_PAGE), dtype=np.uint64)

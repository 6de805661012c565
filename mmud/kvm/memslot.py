"""Memslots (`struct kvm_memory_slot`) and the host memory behind them.

Each memslot is backed by a host buffer (the userspace mapping of KVM_SET_USER_MEMORY_REGION);
a host frame number is `backing.id << BACKING_PFN_SHIFT | page`, so a pfn names its buffer
without a search. A buffer over 4 GiB takes as many consecutive ids as it has 4 GiB pieces,
all naming it, so `pfn >> BACKING_PFN_SHIFT` still indexes a list. Moving a slot keeps its
backing (same userspace address); deleting and re-creating one gives a fresh zeroed buffer.

A slot may be as large as KVM allows (KVM_MEM_MAX_NR_PAGES pages, 8 TiB), so nothing per
page is committed before the guest touches it: the buffer, the rmap heads and the dirty
bitmap are zeroed MAP_NORESERVE mappings (`hostmem.lazy_zeros`) whose pages the host fills in
on first write.

Per slot, as in the kernel: the level-1 rmap (`slot->arch.rmap[0]`, mmud/kvm/rmap.py),
the write-tracking counts of page_track (`gfn_track`) and the dirty
bitmap.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mmud.hostmem import lazy_zeros
from mmud.kvm.rmap import Rmap
from mmud.x86.paging import PAGE_SHIFT, PAGE_SIZE

KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1
KVM_USER_MEM_SLOTS = 509
KVM_ADDRESS_SPACE_NUM = 2
# The memslot "update in progress" bit of the generation (never stored in MMIO sptes).
KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS = 1 << 63

BITS_PER_LONG = 64  # a dirty bitmap is an array of unsigned longs

# include/linux/kvm_host.h: `#define KVM_MEM_MAX_NR_PAGES ((1UL << 31) - 1)`.
KVM_MEM_MAX_NR_PAGES = (1 << 31) - 1

BACKING_PFN_SHIFT = 20  # 4 GiB of pages per backing id
# Backing ids are reused lowest first, so host frames stay in the low half of the host's
# 46-bit physical address space, below the shadow pages' frames (spte.SPT_PFN_BASE).
MAX_BACKINGS = 1 << 13


class Backing:
    """A host buffer: guest RAM as one numpy array, with a u64 memoryview for scalar access."""

    __slots__ = ("id", "npages", "array", "u64", "base_pfn")

    def __init__(self, backing_id: int, npages: int) -> None:
        self.id = backing_id
        self.npages = npages
        self.array = lazy_zeros(npages * (PAGE_SIZE // 8), np.uint64)
        self.u64 = self.array.data
        self.base_pfn = backing_id << BACKING_PFN_SHIFT  # the host frame of its first page


def backing_ids(npages: int) -> int:
    """How many backing ids (4 GiB pieces of host frames) a buffer of npages spans."""
    return -(-npages >> BACKING_PFN_SHIFT)


@dataclass(eq=False)
class Memslot:
    id: int
    base_gfn: int
    npages: int
    flags: int
    backing: Backing
    rmap: Rmap = field(init=False)
    gfn_track: dict[int, int] = field(default_factory=dict)
    dirty_bitmap: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.rmap = Rmap(self.base_gfn, self.npages)

    @property
    def end_gfn(self) -> int:
        return self.base_gfn + self.npages

    def gfn_to_pfn(self, gfn: int) -> int:
        return self.backing.base_pfn + (gfn - self.base_gfn)

    @property
    def log_dirty(self) -> bool:
        return bool(self.flags & KVM_MEM_LOG_DIRTY_PAGES)


class Memslots:
    """The VM's address-space-0 memslots, sorted by gfn, with the memslot generation."""

    def __init__(self) -> None:
        self.slots: dict[int, Memslot] = {}
        self._sorted: list[Memslot] = []
        self._last: Memslot | None = None
        self.generation = 0
        # Backing id -> its buffer; a buffer over 4 GiB fills several consecutive entries.
        # The list is only ever updated in place: a vCPU's TLB fill indexes it directly.
        self.backings: list[Backing | None] = [None] * MAX_BACKINGS

    def __iter__(self):
        return iter(self._sorted)

    def lookup(self, gfn: int) -> Memslot | None:
        """__gfn_to_memslot(): the slot holding gfn, or None (an MMIO gfn)."""
        last = self._last
        if last is not None and last.base_gfn <= gfn < last.base_gfn + last.npages:
            return last
        for slot in self._sorted:
            if slot.base_gfn <= gfn < slot.base_gfn + slot.npages:
                self._last = slot
                return slot
        return None

    def new_backing(self, npages: int) -> Backing | None:
        """A fresh zeroed buffer under the lowest run of free ids long enough for it (a host
        frame range is reused only after its slot was deleted, which zapped every spte
        mapping it); None when the host's frames below the shadow pages' are used up."""
        need = backing_ids(npages)
        run = 0
        for k in range(1, MAX_BACKINGS):
            run = run + 1 if self.backings[k] is None else 0
            if run == need:
                backing = Backing(k - need + 1, npages)
                self.backings[backing.id:k + 1] = [backing] * need
                return backing
        return None

    def drop_backing(self, backing: Backing) -> None:
        n = backing_ids(backing.npages)
        self.backings[backing.id:backing.id + n] = [None] * n

    def install(self, slot: Memslot) -> None:
        self.slots[slot.id] = slot
        self._resort()

    def remove(self, slot_id: int) -> Memslot:
        slot = self.slots.pop(slot_id)
        self._resort()
        return slot

    def _resort(self) -> None:
        self._sorted = sorted(self.slots.values(), key=lambda s: s.base_gfn)
        self._last = None

    def overlaps(self, base_gfn: int, npages: int, ignore: int | None = None) -> bool:
        end = base_gfn + npages
        return any(
            s.id != ignore and s.base_gfn < end and base_gfn < s.end_gfn for s in self._sorted
        )

    def read_u64(self, gpa: int) -> int | None:
        """kvm_read_guest() of one aligned u64; None where no memslot backs gpa."""
        slot = self.lookup(gpa >> PAGE_SHIFT)
        if slot is None:
            return None
        return slot.backing.u64[(gpa - (slot.base_gfn << PAGE_SHIFT)) >> 3]

    def write_u64(self, gpa: int, value: int) -> Memslot | None:
        """kvm_write_guest() of one aligned u64; returns the slot (None: no memslot)."""
        slot = self.lookup(gpa >> PAGE_SHIFT)
        if slot is not None:
            slot.backing.u64[(gpa - (slot.base_gfn << PAGE_SHIFT)) >> 3] = value
        return slot

    def total_pages(self) -> int:
        return sum(s.npages for s in self._sorted)


def bitmap_pages(first_word: int, words: np.ndarray) -> np.ndarray:
    """Slot-relative page numbers of the set bits of `words` (dirty-bitmap words from
    first_word), ascending. Where most words are zero only the others are unpacked: a
    harvest of a big slot with few dirty pages costs its words, not 64 bytes per word."""
    nonzero = np.flatnonzero(words)
    if 2 * len(nonzero) > len(words):
        bits = np.unpackbits(words.astype("<u8", copy=False).view(np.uint8), bitorder="little")
        return np.flatnonzero(bits) + first_word * BITS_PER_LONG
    bits = np.unpackbits(words[nonzero].astype("<u8").view(np.uint8), bitorder="little")
    index = np.flatnonzero(bits)
    return (nonzero[index >> 6] + first_word) * BITS_PER_LONG + (index & (BITS_PER_LONG - 1))

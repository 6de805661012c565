"""KVM_GET_DIRTY_LOG, KVM_CLEAR_DIRTY_LOG and KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2.

Follows kvm_get_dirty_log_protect / kvm_clear_dirty_log_protect of virt/kvm/kvm_main.c
(v5.16). The order is what keeps a dirty page from being lost (docs/dirty-logging.md, the
2010 fix): for each word of the bitmap, first take the word and zero it (the snapshot), then
write-protect the pages whose bits were set, and flush TLBs once at the end. A write that
makes a page writable again after the snapshot sets the page's bit in the bitmap, which
the next harvest reports; a write through a stale TLB entry before the flush hits a page
that is already in this snapshot.

A harvest is a generator that holds kvm->mmu_lock from its first step to its last. Run
whole (`run_ioctl`) it is one ioctl between two scheduler steps. Run as a task with
`words_per_step`, it yields after each step of each chunk of words — the points where, on a
real host, vCPUs on other CPUs keep running: their lockless fast page faults and TLB hits
go on, anything that needs the MMU lock waits (Kvm.wait_mmu_lock). The ordering bugs of
mmud.uapi.bugs sit at these steps.
"""

from __future__ import annotations

import errno
from collections.abc import Generator
from typing import TYPE_CHECKING, TypeVar

import numpy as np

from mmud.kvm.kvm_main import (
    KVM_DIRTY_LOG_INITIALLY_SET,
    KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
    KvmError,
)
from mmud.kvm.memslot import BITS_PER_LONG, KVM_USER_MEM_SLOTS, Memslot, bitmap_pages
from mmud.kvm.mmu.dirty import kvm_mmu_write_protect_pt_masked

if TYPE_CHECKING:
    from mmud.kvm.vm import Kvm

KVM_DIRTY_LOG_MANUAL_CAPS = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET

T = TypeVar("T")
Ioctl = Generator[None, None, T]


def run_ioctl(ioctl: Ioctl[T]) -> T:
    """Run a harvest to its end with nothing in between (one ioctl between two steps)."""
    while True:
        try:
            next(ioctl)
        except StopIteration as done:
            return done.value


def enable_manual_protect(kvm: Kvm, flags: int) -> None:
    """KVM_ENABLE_CAP(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, flags); INITIALLY_SET needs ENABLE."""
    if flags & ~KVM_DIRTY_LOG_MANUAL_CAPS or (
        flags & KVM_DIRTY_LOG_INITIALLY_SET and not flags & KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
    ):
        raise KvmError(errno.EINVAL, f"bad manual dirty log flags {flags:#x}")
    kvm.manual_dirty_log_protect = flags


def logged_slot(kvm: Kvm, slot_id: int) -> Memslot:
    """The slot of a dirty-log ioctl (kvm_get_dirty_log_protect, v5.16): EINVAL for an id
    out of range, ENOENT for an id without a slot or a slot that does not log."""
    if not 0 <= slot_id < KVM_USER_MEM_SLOTS:
        raise KvmError(errno.EINVAL, f"memslot id {slot_id} out of range")
    slot = kvm.memslots.slots.get(slot_id)
    if slot is None:
        raise KvmError(errno.ENOENT, f"no memslot {slot_id}")
    if slot.dirty_bitmap is None:
        raise KvmError(errno.ENOENT, f"memslot {slot_id} does not log dirty pages")
    return slot


def dirty_bitmap(slot: Memslot) -> np.ndarray:
    """The bitmap of a slot that logged_slot() accepted."""
    assert slot.dirty_bitmap is not None, "logged_slot() checks that the slot logs"
    return slot.dirty_bitmap


def to_bytes(words: np.ndarray) -> bytes:
    """The userspace bitmap: little-endian 64-bit words, bit 0 = the first page."""
    return words.astype("<u8", copy=False).tobytes()


def kvm_get_dirty_log_protect(kvm: Kvm, slot_id: int, words_per_step: int = 0) -> Ioctl[bytes]:
    """KVM_GET_DIRTY_LOG: the bitmap since the last call, its pages protected again.

    With manual protect the bitmap is only copied: KVM_CLEAR_DIRTY_LOG clears and protects.
    """
    slot = logged_slot(kvm, slot_id)
    bitmap = dirty_bitmap(slot)
    if kvm.manual_dirty_log_protect:
        return to_bytes(bitmap)
    snapshot = np.zeros(len(bitmap), dtype=bitmap.dtype)  # calloc: committed as written
    yield from _harvest(kvm, slot, 0, None, snapshot, words_per_step)
    return to_bytes(snapshot)


def kvm_clear_dirty_log_protect(
    kvm: Kvm, slot_id: int, first_page: int, num_pages: int, bitmap: bytes,
    words_per_step: int = 0,
) -> Ioctl[None]:
    """KVM_CLEAR_DIRTY_LOG: clear the given bits; protect pages whose bits were set.

    first_page must be a multiple of 64 and num_pages too, unless the range reaches the
    end of the slot (EINVAL otherwise); a bitmap shorter than the range is EFAULT.
    """
    if first_page & (BITS_PER_LONG - 1) or num_pages < 0:
        raise KvmError(errno.EINVAL, "first_page must be a multiple of 64")
    slot = logged_slot(kvm, slot_id)
    if first_page > slot.npages or num_pages > slot.npages - first_page or (
        num_pages < slot.npages - first_page and num_pages & (BITS_PER_LONG - 1)
    ):
        raise KvmError(errno.EINVAL, "num_pages must be a multiple of 64 or reach the end")
    nbytes = (num_pages + BITS_PER_LONG - 1) // BITS_PER_LONG * 8
    if len(bitmap) < nbytes:
        raise KvmError(errno.EFAULT, "bitmap shorter than num_pages")
    mask = np.frombuffer(bitmap[:nbytes], dtype="<u8").astype(np.uint64)
    if num_pages & (BITS_PER_LONG - 1):  # the slot's last word: no bits past its end
        mask[-1] &= np.uint64((1 << (num_pages & (BITS_PER_LONG - 1))) - 1)
    yield from _harvest(kvm, slot, first_page // BITS_PER_LONG, mask, None, words_per_step)


def _harvest(
    kvm: Kvm, slot: Memslot, first_word: int, mask: np.ndarray | None,
    snapshot: np.ndarray | None, words_per_step: int,
) -> Ioctl[None]:
    """For each chunk of words: take-and-zero (only the bits of `mask`, if given), then
    write-protect the pages whose bits were taken; one flush at the end if any bit was taken
    (v5.16 flushes when a bitmap word was non-zero, whatever the protection found)."""
    mmu = kvm.mmu
    bitmap = dirty_bitmap(slot)
    n = len(mask) if mask is not None else len(bitmap)
    chunk = words_per_step or max(n, 1)
    flush = False
    kvm.wait_mmu_lock()
    mmu.mmu_lock_held = True
    try:
        for a in range(0, n, chunk):
            b = min(n, a + chunk)
            words = slice(first_word + a, first_word + b)
            want = mask[a:b] if mask is not None else None
            if mmu.bug == "dirty_wp_before_snapshot":
                # Protect what is dirty now, and only then take the bits: a page made
                # writable in between is taken too, and stays writable with its bit clear.
                _protect(kvm, slot, first_word + a, _select(bitmap[words], want))
                if words_per_step:
                    yield
                taken = _take(bitmap, words, want)
            else:
                taken = _take(bitmap, words, want)
                if words_per_step:
                    yield
                if mmu.bug != "dirty_wp_skipped":
                    _protect(kvm, slot, first_word + a, taken)
            flush |= bool(taken.any())
            if mmu.obs: mmu.obs.dirty_log_protect(slot, first_word + a, taken)  # observer
            if snapshot is not None:
                snapshot[a:b] = taken
            if words_per_step:
                yield
    finally:
        mmu.mmu_lock_held = False
    if flush:
        mmu.kvm_flush_remote_tlbs()


def _select(words: np.ndarray, want: np.ndarray | None) -> np.ndarray:
    return words if want is None else words & want


def _take(bitmap: np.ndarray, words: slice, want: np.ndarray | None) -> np.ndarray:
    """xchg(word, 0) / atomic_long_fetch_andnot(mask, word): the bits taken. Only words
    with bits taken are written, so the bitmap of a big guest stays uncommitted where
    nothing was dirtied."""
    view = bitmap[words]
    taken = _select(view, want).copy()
    np.bitwise_and(view, ~taken, out=view, where=taken != 0)
    return taken


def _protect(kvm: Kvm, slot: Memslot, first_word: int, words: np.ndarray) -> None:
    """kvm_arch_mmu_enable_log_dirty_pt_masked(): its answer is not used for the flush."""
    if words.any():
        kvm_mmu_write_protect_pt_masked(kvm.mmu, slot, bitmap_pages(first_word, words))

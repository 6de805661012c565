"""KVM_SET_USER_MEMORY_REGION: creating, moving, re-flagging and deleting memslots.

Follows __kvm_set_memory_region / kvm_set_memslot / install_new_memslots of
virt/kvm/kvm_main.c (v5.16) and the x86 hooks they call:

- every change publishes a new memslot set with the generation's update-in-progress bit
  (63) set, then clears it and adds KVM_ADDRESS_SPACE_NUM (2 on x86) — so everything
  tagged with the old generation (MMIO sptes, vCPU MMIO info) is stale from then on, and a
  wrap of the bits MMIO sptes keep zaps every shadow page;
- DELETE and MOVE first publish the slot as going away (one generation step), then zap
  every shadow page with the fast zap (nothing may keep mapping the old range), then
  publish the final set (a second step); CREATE and FLAGS_ONLY take one step;
- a new or moved slot may not overlap another (EEXIST); size and read-only-ness never
  change in place (EINVAL).

The ioctl runs whole between two scheduler steps, so no vCPU observes the slot half
deleted; the fast zap inside it takes its lock breaks with nothing waiting on them.
"""

from __future__ import annotations

import errno
from enum import Enum
from typing import TYPE_CHECKING

import numpy as np

from mmud.kvm.memslot import (
    KVM_ADDRESS_SPACE_NUM,
    KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEM_READONLY,
    KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS,
    KVM_USER_MEM_SLOTS,
    KVM_MEM_MAX_NR_PAGES,
    Memslot,
)
from mmud.kvm.mmu import dirty, mmio, zap
from mmud.hostmem import lazy_zeros
from mmud.x86.paging import PAGE_SHIFT, PAGE_SIZE

if TYPE_CHECKING:
    from mmud.kvm.vm import Kvm

KVM_VALID_MEM_FLAGS = KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_READONLY
# KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 flags (uapi kvm.h); their ioctls are in dirty_log.py.
KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE = 1 << 0
KVM_DIRTY_LOG_INITIALLY_SET = 1 << 1


class KvmError(OSError):
    """An ioctl's failure, with the errno the kernel would return."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(err, message)


class MrChange(Enum):
    """enum kvm_mr_change."""

    CREATE = "create"
    DELETE = "delete"
    MOVE = "move"
    FLAGS_ONLY = "flags_only"


def kvm_set_memory_region(kvm: Kvm, slot_id: int, gpa: int, size: int, flags: int) -> None:
    """Check one KVM_SET_USER_MEMORY_REGION call as the kernel does, then apply it."""
    if flags & ~KVM_VALID_MEM_FLAGS:
        raise KvmError(errno.EINVAL, f"unknown flags {flags:#x}")
    if not 0 <= slot_id < KVM_USER_MEM_SLOTS:
        raise KvmError(errno.EINVAL, f"slot {slot_id} out of range")
    if gpa < 0 or size < 0 or gpa & (PAGE_SIZE - 1) or size & (PAGE_SIZE - 1):
        raise KvmError(errno.EINVAL, "gpa and size must be page aligned")
    if gpa + size > 1 << 64:  # the kernel's u64 wrap check
        raise KvmError(errno.EINVAL, "the range wraps around the address space")
    npages = size >> PAGE_SHIFT
    if npages > KVM_MEM_MAX_NR_PAGES:
        raise KvmError(errno.EINVAL, f"slot larger than {KVM_MEM_MAX_NR_PAGES} pages")
    base_gfn = gpa >> PAGE_SHIFT
    old = kvm.memslots.slots.get(slot_id)
    if not npages:
        if old is None:
            raise KvmError(errno.EINVAL, f"slot {slot_id} does not exist")
        change = MrChange.DELETE
    elif old is None:
        change = MrChange.CREATE
    elif npages != old.npages or (flags ^ old.flags) & KVM_MEM_READONLY:
        raise KvmError(errno.EINVAL, "a memslot's size and read-only flag cannot change")
    elif base_gfn != old.base_gfn:
        change = MrChange.MOVE
    elif flags != old.flags:
        change = MrChange.FLAGS_ONLY
    else:
        return
    if change in (MrChange.CREATE, MrChange.MOVE) and kvm.memslots.overlaps(
        base_gfn, npages, ignore=slot_id
    ):
        raise KvmError(errno.EEXIST, "overlaps another memslot")
    kvm.finish_zap()  # slots_lock: memslot changes and zaps of all pages are serialised
    kvm_set_memslot(kvm, old, slot_id, base_gfn, npages, flags, change)


def kvm_set_memslot(
    kvm: Kvm, old: Memslot | None, slot_id: int, base_gfn: int, npages: int, flags: int,
    change: MrChange,
) -> None:
    memslots = kvm.memslots
    if change in (MrChange.DELETE, MrChange.MOVE):
        install_new_memslots(kvm)  # the slot is published as going away
        kvm.kvm_mmu_zap_all_fast().finish()  # kvm_arch_flush_shadow_memslot()
    new: Memslot | None = None
    if change is MrChange.CREATE:
        backing = memslots.new_backing(npages)
        if backing is None:  # userspace's mmap() of the slot's memory would have failed
            raise KvmError(errno.ENOMEM, "no host frames left for the slot's memory")
        new = Memslot(slot_id, base_gfn, npages, flags, backing)
        memslots.install(new)
        install_new_memslots(kvm)
        kvm_arch_commit_memory_region(kvm, new, change)
        return
    assert old is not None, "only CREATE makes a slot that did not exist"
    if change is MrChange.DELETE:
        memslots.remove(slot_id)
        memslots.drop_backing(old.backing)
    elif change is MrChange.MOVE:
        # Same userspace mapping, new guest-physical place; rmaps start empty.
        new = Memslot(slot_id, base_gfn, npages, flags, old.backing)
        memslots.install(new)
    else:
        new = old
        new.flags = flags
    install_new_memslots(kvm)
    kvm_arch_commit_memory_region(kvm, new, change)


def install_new_memslots(kvm: Kvm) -> None:
    """Publish a memslot change: generation with bit 63 while readers drain, then += 2."""
    memslots = kvm.memslots
    memslots.generation |= KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS
    gen = (memslots.generation & ~KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS) + KVM_ADDRESS_SPACE_NUM
    memslots.generation = gen
    # kvm_arch_memslots_updated():
    if mmio.mmio_generation_wrapped(gen, kvm.clock_ns, kvm.module.mmio_wrap_limit):
        kvm.kvm_mmu_zap_all_fast().finish()


def kvm_arch_commit_memory_region(kvm: Kvm, new: Memslot | None, change: MrChange) -> None:
    """Resize the default page budget; start or stop dirty logging on the new slot."""
    mmu = kvm.mmu
    if not mmu.n_requested_mmu_pages:
        zap.kvm_mmu_change_mmu_pages(mmu, mmu.default_mmu_pages())
    if new is None:
        return
    if new.log_dirty and new.dirty_bitmap is None:
        new.dirty_bitmap = lazy_zeros((new.npages + 63) // 64, np.uint64)
        if kvm.manual_dirty_log_protect & KVM_DIRTY_LOG_INITIALLY_SET:
            # Every page starts dirty; pages are protected as userspace clears their bits
            # (only huge sptes would be protected now, and mmud has none).
            new.dirty_bitmap[:] = np.uint64((1 << 64) - 1)
            if new.npages & 63:
                new.dirty_bitmap[-1] = np.uint64((1 << (new.npages & 63)) - 1)
        elif change is MrChange.FLAGS_ONLY:
            dirty.kvm_mmu_slot_remove_write_access(mmu, new)
    elif not new.log_dirty:
        new.dirty_bitmap = None

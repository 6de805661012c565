"""The KVM side of a VM (`struct kvm`): memslots, the shadow MMU, vCPUs, statistics, params.

What runs *in* the VM (guest workloads) and the scheduler that drives the vCPUs live above
this layer (mmud/machine.py); this class is what the ioctls of a VM fd would reach.
"""

from __future__ import annotations

import errno
from collections.abc import Mapping

import numpy as np

from mmud.kvm import stats
from mmud.kvm.memslot import (
    KVM_ADDRESS_SPACE_NUM,
    KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS,
    KVM_USER_MEM_SLOTS,
    MAX_SLOT_PAGES,
    Memslot,
    Memslots,
)
from mmud.kvm.mmu import spte as S
from mmud.kvm.mmu import audit, zap
from mmud.kvm.mmu.mmu import KVM_MIN_ALLOC_MMU_PAGES, KvmMmu
from mmud.kvm.isolation import kvm_isolation_init_vm
from mmud.kvm.params import Params
from mmud.kvm.vcpu import Vcpu
from mmud.x86.paging import PAGE_SHIFT, PAGE_SIZE

MMIO_READ_VALUE = (1 << 64) - 1  # an unclaimed bus reads all ones


class KvmError(OSError):
    """An ioctl's failure, with the errno the kernel would return."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(err, message)


class Kvm:
    def __init__(
        self,
        mem_mb: int = 64,
        vcpus: int = 1,
        params: Params | Mapping[str, str] | None = None,
    ) -> None:
        if mem_mb <= 0 or vcpus <= 0:
            raise ValueError("mem_mb and vcpus must be positive")
        self.params = params if isinstance(params, Params) else Params(load=params)
        self.mem_mb = mem_mb
        self.mem_bytes = mem_mb << 20
        self.stat = stats.new_vm_stats()
        self.memslots = Memslots()
        self.mmu = KvmMmu(self.memslots, self.stat)
        self.mmio_caching = bool(self.params["mmio_caching"])
        self.vcpus: list[Vcpu] = []
        self.set_memslot(0, 0, self.mem_bytes)
        self.vcpus.extend(Vcpu(self, i) for i in range(vcpus))
        self.mmu.vcpus = self.vcpus
        self.isolation = kvm_isolation_init_vm(self)

    # --- statistics ----------------------------------------------------------------------------

    @property
    def stats(self) -> dict[str, int]:
        """Every stat by its kernel name; vCPU stats summed over the VM's vCPUs."""
        out = dict(self.stat)
        for name in stats.VCPU_STATS:
            out[name] = sum(v.stat[name] for v in self.vcpus)
        return {s.name: out[s.name] for s in stats.STATS}

    def clear_stat(self, name: str) -> None:
        desc = stats.STAT_BY_NAME[name]
        if desc.scope == "vm":
            self.stat[name] = 0
        else:
            for vcpu in self.vcpus:
                vcpu.stat[name] = 0

    # --- host access to guest memory (kvm_read_guest / kvm_write_guest) ---------------------

    def _check_gpa(self, gpa: int) -> None:
        if gpa & 7:
            raise ValueError(f"gpa {gpa:#x} is not 8-byte aligned")

    def read_u64(self, gpa: int) -> int:
        self._check_gpa(gpa)
        value = self.memslots.read_u64(gpa)
        if value is None:
            raise KvmError(errno.EFAULT, f"gpa {gpa:#x} is not guest RAM")
        return value

    def write_u64(self, gpa: int, value: int) -> None:
        """A host write: lands in memory and the dirty log, but the shadow MMU is not told."""
        self._check_gpa(gpa)
        if self.memslots.write_u64(gpa, value & ((1 << 64) - 1)) is None:
            raise KvmError(errno.EFAULT, f"gpa {gpa:#x} is not guest RAM")
        self.mark_page_dirty(gpa >> PAGE_SHIFT)

    def mark_page_dirty(self, gfn: int) -> None:
        slot = self.memslots.lookup(gfn)
        if slot is not None and slot.dirty_bitmap is not None:
            rel = gfn - slot.base_gfn
            slot.dirty_bitmap[rel >> 6] |= 1 << (rel & 63)

    # --- emulated devices (userspace's side of an MMIO exit) -----------------------------------

    def mmio_read(self, gpa: int) -> int:
        return MMIO_READ_VALUE

    def mmio_write(self, gpa: int, value: int) -> None:
        """Writes to unclaimed guest-physical addresses are dropped."""

    # --- memslots (KVM_SET_USER_MEMORY_REGION) -----------------------------------------------

    def set_memslot(self, slot: int, gpa: int, size: int, log_dirty: bool = False) -> None:
        """Create, move, change flags of, or (size 0) delete a memslot, as KVM does."""
        if not 0 <= slot < KVM_USER_MEM_SLOTS:
            raise KvmError(errno.EINVAL, f"slot {slot} out of range")
        if gpa & (PAGE_SIZE - 1) or size & (PAGE_SIZE - 1) or gpa < 0 or size < 0:
            raise KvmError(errno.EINVAL, "gpa and size must be page aligned")
        npages = size >> PAGE_SHIFT
        if npages > MAX_SLOT_PAGES:
            raise KvmError(errno.EINVAL, "slot larger than 4 GiB")
        base_gfn = gpa >> PAGE_SHIFT
        flags = KVM_MEM_LOG_DIRTY_PAGES if log_dirty else 0
        old = self.memslots.slots.get(slot)
        if npages == 0:
            if old is None:
                raise KvmError(errno.EINVAL, f"slot {slot} does not exist")
            self._invalidate_slot(old)
            self.memslots.remove(slot)
            self.memslots.drop_backing(old.backing)
        elif old is None:
            if self.memslots.overlaps(base_gfn, npages):
                raise KvmError(errno.EEXIST, "overlaps another memslot")
            backing = self.memslots.new_backing(npages)
            self.memslots.install(Memslot(slot, base_gfn, npages, flags, backing))
        elif npages != old.npages:
            raise KvmError(errno.EINVAL, "a memslot cannot be resized")
        elif base_gfn != old.base_gfn:
            if self.memslots.overlaps(base_gfn, npages, ignore=slot):
                raise KvmError(errno.EEXIST, "overlaps another memslot")
            self._invalidate_slot(old)
            self.memslots.install(Memslot(slot, base_gfn, npages, flags, old.backing))
        elif flags != old.flags:
            old.flags = flags
            self._update_dirty_logging(old)
        else:
            return
        new = self.memslots.slots.get(slot)
        if new is not None and new is not old:
            self._update_dirty_logging(new)
        self._bump_generation()
        if not self.mmu.n_requested_mmu_pages:
            zap.kvm_mmu_change_mmu_pages(self.mmu, self.mmu.default_mmu_pages())

    def _invalidate_slot(self, slot: Memslot) -> None:
        """DELETE/MOVE: publish the change in progress, then zap all shadow pages (fast)."""
        self.memslots.generation |= KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS
        zap.kvm_mmu_zap_all_fast(self.mmu)

    def _bump_generation(self) -> None:
        gen = (self.memslots.generation & ~KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS) + KVM_ADDRESS_SPACE_NUM
        self.memslots.generation = gen
        # kvm_mmu_invalidate_mmio_sptes(): on wrap of the generation bits MMIO sptes keep,
        # stale sptes could match again, so every shadow page goes.
        if not gen & S.MMIO_SPTE_GEN_MASK & ~(KVM_ADDRESS_SPACE_NUM - 1):
            zap.kvm_mmu_zap_all_fast(self.mmu)

    def _update_dirty_logging(self, slot: Memslot) -> None:
        if slot.log_dirty and slot.dirty_bitmap is None:
            slot.dirty_bitmap = np.zeros((slot.npages + 63) // 64, dtype=np.uint64)
        elif not slot.log_dirty:
            slot.dirty_bitmap = None

    def set_nr_mmu_pages(self, nr: int) -> None:
        """KVM_SET_NR_MMU_PAGES."""
        if nr < KVM_MIN_ALLOC_MMU_PAGES:
            raise KvmError(errno.EINVAL, f"at least {KVM_MIN_ALLOC_MMU_PAGES} pages")
        zap.kvm_mmu_set_nr_mmu_pages(self.mmu, nr)

    def zap_all(self, fast: bool = True) -> None:
        if fast:
            zap.kvm_mmu_zap_all_fast(self.mmu)
        else:
            zap.kvm_mmu_zap_all(self.mmu)

    def audit(self) -> list[str]:
        """Run one full audit now (every check, every vCPU's tree); the error lines."""
        return audit.audit_full(self.mmu, self.vcpus, "manual")

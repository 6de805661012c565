"""A vCPU: architectural registers, simulated hardware (TLB and shadow-table walk), VM exits.

One guest access runs as on hardware with shadow paging: look up the TLB; on a miss walk the
*shadow* tables from the root; a missing or insufficient spte is a #PF VM exit handled by
KVM's page-fault path (mmu/paging_tmpl.py), after which the access is retried, emulated, or
reflected into the guest as a #PF. The TLB caches translations exactly as long as hardware
may: it is emptied by KVM's flushes (local requests, remote flushes, root loads) and by
INVLPG of the address, so stale translations show up exactly where KVM allows them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from mmud.kvm.memslot import BACKING_PFN_SHIFT
from mmud.kvm.mmu import paging_tmpl, pte_write, roots, sync, zap
from mmud.kvm.mmu import spte as S
from mmud.kvm.mmu.mmu import RET_PF_EMULATE
from mmud.kvm.mmu.page import ShadowPage
from mmud.kvm.mmu.page_fault import kvm_mmu_page_fault
from mmud.kvm.mmu.vcpu_mmu import VcpuMmu
from mmud.uapi import stats
from mmud.x86.paging import (
    MSR_EFER,
    ACC_EXEC_MASK,
    CR0_PE,
    CR0_PG,
    CR0_WP,
    CR4_PAE,
    CR4_PGE,
    CR4_PKE,
    CR4_SMAP,
    CR4_SMEP,
    EFER_LMA,
    EFER_LME,
    EFER_NXE,
    PAGE_MASK,
    PT_ACCESSED_MASK,
    PT_DIRTY_MASK,
    PT_USER_MASK,
    PT_WRITABLE_MASK,
    PAGE_SHIFT,
    PFERR_FETCH_MASK,
    PFERR_PRESENT_MASK,
    PFERR_RSVD_MASK,
    PFERR_USER_MASK,
    PFERR_WRITE_MASK,
    PT_INDEX_SHIFT,
    X86_EFLAGS_AC,
    X86_EFLAGS_FIXED,
    is_canonical,
    rsvd_table,
)

if TYPE_CHECKING:
    from mmud.kvm.isolation import VmIsolation
    from mmud.kvm.vm import Kvm

# Requests (KVM_REQ_*), serviced at the next guest entry in vcpu_enter_guest()'s order.
KVM_REQ_MMU_RELOAD = 1 << 0
KVM_REQ_MMU_SYNC = 1 << 1
KVM_REQ_TLB_FLUSH = 1 << 2

# A TLB entry: (u64 view of the frame's buffer, u64 index of the frame in it, the access
# kinds it allows, the buffer as a numpy array, the gfn). A translation is one of these, or
# RET_PF_EMULATE where the access must be emulated.
TlbEntry = tuple[memoryview, int, int, np.ndarray, int]

# The host's reserved bits by level * 2 + PS (it runs with EFER.NX and the guest's MAXPHYADDR).
_HOST_RSVD = rsvd_table(True)

# The access kinds (write | user << 1 | fetch << 2) that write: a TLB entry's allowed mask
# loses them while the spte is not dirty.
_WRITE_KINDS = sum(1 << kind for kind in range(8) if kind & 1)
# An spte's W and U bits are its rights' W and U bits (ACC_WRITE_MASK, ACC_USER_MASK).
_SPTE_WU = PT_WRITABLE_MASK | PT_USER_MASK
# The #PF error code's access bits for each kind; the host always runs with EFER.NX, so a
# fetch is marked as one.
_HW_ERROR_CODE = tuple((kind & 1) * PFERR_WRITE_MASK | (kind >> 1 & 1) * PFERR_USER_MASK
                       | (kind >> 2 & 1) * PFERR_FETCH_MASK for kind in range(8))

# The processor's walk reads these on every TLB miss: module constants, not attribute lookups.
_PRESENT = S.PT_PRESENT_MASK
_LARGE = S.PT_PAGE_SIZE_MASK
_ADDR = S.SPTE_BASE_ADDR_MASK
_SPT_PFN_BASE = S.SPT_PFN_BASE
# An entry of a table level (2-4) the walk goes through without further checks has exactly
# P of these bits: a superset of what the complete checks look at for such an entry.
_TABLE_CHECK = _PRESENT | _LARGE | _HOST_RSVD[2 * 2] | _HOST_RSVD[3 * 2] | _HOST_RSVD[4 * 2]
# By the root's level: the index shifts of the table levels from the root down to level 2.
_TABLE_SHIFTS = tuple(tuple(PT_INDEX_SHIFT[k] for k in range(level, 1, -1)) for level in range(6))
# The bits the walk sets in the leaf spte, by whether the access writes.
_WALK_SETS = (PT_ACCESSED_MASK, PT_ACCESSED_MASK | PT_DIRTY_MASK)

# A linear address whose bits 63:47 are neither all clear nor all set has bits 63:47 between 0
# and this, exclusive.
_NONCANONICAL_TOP_END = (1 << 17) - 1

# A fault that keeps coming back means KVM failed to make progress: a simulator bug.
_MAX_FAULT_RETRIES = 64

class PageFault(Exception):
    """A #PF delivered to the guest (the caller plays the guest's handler)."""

    def __init__(self, gva: int, error_code: int) -> None:
        super().__init__(f"#PF at {gva:#x} error code {error_code:#x}")
        self.gva = gva
        self.error_code = error_code


class GeneralProtection(Exception):
    """#GP: a non-canonical linear address (never a #PF)."""


@dataclass(frozen=True)
class Access:
    """The outcome of one guest access: a #PF error code, or the translated gpa."""

    gva: int
    fault: bool
    error_code: int = 0
    gpa: int | None = None


class Vcpu:
    """The CPU side of a vCPU: registers, the TLB, requests, VM exits and the emulator.

    Its MMU (`self.mmu`, the kernel's `vcpu->arch.mmu`) holds the roots, the paging mode
    and the MMIO cache; this class implements the `VcpuOps` the MMU asks of it.
    """

    isolation: VmIsolation | None = None  # the VM's, when address_space_isolation=Y

    def __init__(self, vm: Kvm, index: int) -> None:
        self.vm = vm
        self.index = index
        self.stat = stats.new_vcpu_stats()
        self._cr0 = CR0_PE | CR0_PG | CR0_WP
        self._cr4 = CR4_PAE
        self._efer = EFER_LME | EFER_LMA | EFER_NXE
        self._rflags = X86_EFLAGS_FIXED
        self._cr3 = 0
        self.requests = 0
        self.tlb: dict[int, TlbEntry] = {}  # by virtual page number
        self.injected: int | None = None
        self.accesses = 0  # guest memory accesses run (not a kernel stat; for rates)
        self.mmu = VcpuMmu(vm.mmu, self, vm.mmio_caching)
        # What the processor's walk and TLB fill index (lists that are only updated in place).
        self._sp_pages = vm.mmu.pool.pages
        self._backings = vm.memslots.backings
        self._init_mmu()

    # --- paging mode ----------------------------------------------------------------------

    def _init_mmu(self) -> None:
        self.mmu.init_context(self._cr0, self._cr4, self._efer, self._rflags)

    def kvm_mmu_reset_context(self) -> None:
        """A paging-mode change: drop every root; lookups under the new role miss the old pages."""
        self.lock_mmu()
        roots.kvm_mmu_unload(self.mmu.kvm_mmu, self.mmu)
        self._init_mmu()

    def _set_mode_register(self, name: str, value: int, reset_on: int) -> None:
        """A CR0/CR4/EFER write: an exit, and a context reset if a paging-mode bit changed
        (kvm_set_cr0/kvm_set_cr4/set_efer)."""
        old = getattr(self, name)
        setattr(self, name, value)
        self.stat["exits"] += 1
        if (old ^ value) & reset_on:
            self.kvm_mmu_reset_context()

    @property
    def cr0(self) -> int:
        return self._cr0

    @cr0.setter
    def cr0(self, value: int) -> None:
        if self.vm.mmu.obs: self.vm.mmu.obs.handle_cr(self.index, 0, value)  # observer
        self._set_mode_register("_cr0", value, CR0_PG | CR0_WP)

    @property
    def cr4(self) -> int:
        return self._cr4

    @cr4.setter
    def cr4(self, value: int) -> None:
        if self.vm.mmu.obs: self.vm.mmu.obs.handle_cr(self.index, 4, value)  # observer
        self._set_mode_register("_cr4", value, CR4_PGE | CR4_PAE | CR4_SMEP | CR4_SMAP | CR4_PKE)

    @property
    def efer(self) -> int:
        return self._efer

    @efer.setter
    def efer(self, value: int) -> None:
        if self.vm.mmu.obs: self.vm.mmu.obs.handle_wrmsr(self.index, MSR_EFER, value)  # observer
        self._set_mode_register("_efer", value, EFER_NXE)

    @property
    def rflags(self) -> int:
        return self._rflags

    @rflags.setter
    def rflags(self, value: int) -> None:
        old, self._rflags = self._rflags, value | X86_EFLAGS_FIXED
        if (old ^ value) & X86_EFLAGS_AC:
            # TLB entries carry permission decisions taken under the old AC.
            self.mmu.update_permission_bitmask(self._rflags)
            self.tlb.clear()

    @property
    def cr3(self) -> int:
        return self._cr3

    @cr3.setter
    def cr3(self, value: int) -> None:
        """kvm_set_cr3(): same value = sync + flush; new value = (fast) root switch."""
        self.stat["exits"] += 1
        if self.vm.mmu.obs: self.vm.mmu.obs.handle_cr(self.index, 3, value)  # observer
        mmu = self.mmu
        self.lock_mmu()
        if value == self._cr3:
            sync.kvm_mmu_sync_roots(mmu.kvm_mmu, mmu)
            self.request_tlb_flush()
            return
        roots.kvm_mmu_new_cr3(mmu.kvm_mmu, mmu, value)
        self._cr3 = value

    # --- requests ---------------------------------------------------------------------------

    def request_tlb_flush(self) -> None:
        self.requests |= KVM_REQ_TLB_FLUSH

    def request_mmu_sync(self) -> None:
        self.requests |= KVM_REQ_MMU_SYNC

    def make_request_mmu_reload(self) -> None:
        self.requests |= KVM_REQ_MMU_RELOAD

    def enter_guest(self) -> None:
        """vcpu_enter_guest(): service requests, then make sure a root is loaded."""
        if self.isolation: self.isolation.enter()  # isolation
        mmu = self.mmu
        if mmu.kvm_mmu.obs: mmu.kvm_mmu.obs.vcpu_enter_guest(self.index)  # observer
        if self.requests:
            req, self.requests = self.requests, 0
            if req & (KVM_REQ_MMU_RELOAD | KVM_REQ_MMU_SYNC):
                self.lock_mmu()
            if req & KVM_REQ_MMU_RELOAD:
                roots.kvm_mmu_unload(mmu.kvm_mmu, mmu)
            if req & KVM_REQ_MMU_SYNC:
                sync.kvm_mmu_sync_roots(mmu.kvm_mmu, mmu)
            if req & KVM_REQ_TLB_FLUSH:
                self.tlb.clear()
                self.stat["tlb_flush"] += 1
        if mmu.root is None:
            self.lock_mmu()
            roots.kvm_mmu_load(mmu.kvm_mmu, mmu)

    # --- what the MMU asks of the CPU (VcpuOps) -------------------------------------------------

    def lock_mmu(self) -> None:
        """spin_lock(&kvm->mmu_lock): while a harvest holds it across its preemption
        points, wait and let the other tasks run (only lockless work may overlap it)."""
        if self.mmu.kvm_mmu.mmu_lock_held:
            self.vm.wait_mmu_lock()

    def preempt(self) -> None:
        self.vm.preempt()

    def mark_page_dirty(self, gfn: int) -> None:
        self.vm.mark_page_dirty(gfn)

    def inject_page_fault(self, gva: int, error_code: int) -> None:
        self.injected = error_code
        self.stat["pf_guest"] += 1
        self.stat["req_event"] += 1  # the queued #PF: KVM_REQ_EVENT, serviced at the next entry

    def flush_tlb_current(self) -> None:
        self.tlb.clear()

    def flush_tlb_gva(self, gva: int) -> None:
        self.tlb.pop(gva >> PAGE_SHIFT, None)

    def _hw_walk(self, gva: int, kind: int) -> TlbEntry | int:
        """The processor's walk of the shadow tables: a TLB entry, or a #PF error code.

        A present entry with a reserved bit set faults with RSVD at any level: that is how
        an MMIO spte (bit 51 set) reaches handle_mmio_page_fault, and how a corrupt spte
        reaches its reserved-bit check.

        The walk first descends through plain table entries (present, no reserved bit, no
        PS), the path of nearly every access, with one test each; the complete checks take
        the walk on from the entry where that stops."""
        sp = self.mmu.root
        assert sp is not None, "enter_guest() loads a root before any access"
        pages = self._sp_pages
        for shift in _TABLE_SHIFTS[sp.level]:
            spte = sp.spt[(gva >> shift) & 511]
            if spte & _TABLE_CHECK != _PRESENT:
                level = (shift - PAGE_SHIFT) // 9 + 1
                break
            sp = pages[((spte & _ADDR) >> PAGE_SHIFT) - _SPT_PFN_BASE]
        else:
            level = 1
            spte = sp.spt[(gva >> PAGE_SHIFT) & 511]
        while True:
            if not spte & _PRESENT:
                return _HW_ERROR_CODE[kind]
            if spte & _HOST_RSVD[level * 2 + (spte >> 7 & 1)]:
                return _HW_ERROR_CODE[kind] | PFERR_PRESENT_MASK | PFERR_RSVD_MASK
            if level == 1 or spte & _LARGE:
                break
            sp = pages[((spte & _ADDR) >> PAGE_SHIFT) - _SPT_PFN_BASE]
            level -= 1
            spte = sp.spt[(gva >> PT_INDEX_SHIFT[level]) & 511]
        entry = self._tlb_fill(gva, kind, sp, spte)
        return _HW_ERROR_CODE[kind] | PFERR_PRESENT_MASK if entry is None else entry

    def _tlb_fill(self, gva: int, kind: int, sp: ShadowPage, spte: int) -> TlbEntry | None:
        """Cache the translation of gva by the leaf spte of sp; None if it refuses `kind`.

        As the processor does, the walk sets A in the spte, and D on a write; a translation
        cached without D does not serve writes, so the first write walks again to set it.
        """
        allowed = self.mmu.hw_allowed[(spte & _SPTE_WU) | (spte >> 63 ^ 1)]  # spte_access()
        if not allowed >> kind & 1:
            return None
        i = (gva >> PAGE_SHIFT) & 511
        set_bits = _WALK_SETS[kind & 1]
        if ~spte & set_bits:
            spte |= set_bits
            sp.spt[i] = spte
        if not spte & PT_DIRTY_MASK:
            allowed &= ~_WRITE_KINDS
        pfn = (spte & _ADDR) >> PAGE_SHIFT  # spte_to_pfn()
        backing = self._backings[pfn >> BACKING_PFN_SHIFT]  # the host buffer holding pfn
        assert backing is not None, f"pfn {pfn:#x} is no guest RAM"
        gfn = sp.gfns[i] if not sp.direct else sp.gfn_of(i)  # gfn_of(), inline for a guest table
        entry = (backing.u64, (pfn - backing.base_pfn) << 9, allowed, backing.array, gfn)
        self.tlb[gva >> PAGE_SHIFT] = entry
        return entry

    def _translate(self, gva: int, kind: int) -> TlbEntry | int:
        """Run one access to translation: a TLB entry, or RET_PF_EMULATE.

        Raises PageFault when KVM reflects a #PF into the guest.
        """
        self.accesses += 1
        if self.requests or self.mmu.root is None:
            self.enter_guest()
        entry = self.tlb.get(gva >> PAGE_SHIFT)
        if entry is not None and entry[2] >> kind & 1:
            return entry
        if 0 < gva >> 47 < _NONCANONICAL_TOP_END:  # is_canonical(), inline: every TLB miss
            raise GeneralProtection(f"non-canonical address {gva:#x}")
        # Each walk runs after vcpu_enter_guest(). Before the first, the root was loaded
        # above; what is left for it is a request made while that waited for the MMU
        # lock, isolation's switch and the observer.
        if self.requests or self.isolation or self.mmu.kvm_mmu.obs:
            self.enter_guest()
        # The first walk stands outside the retry loop, as the last one in it does: a TLB
        # refill, the common miss, then sets up no loop (0.13-0.2 µs of its 2.2 µs).
        result = self._hw_walk(gva, kind)
        if not isinstance(result, int):
            return result
        for _ in range(_MAX_FAULT_RETRIES):
            self.stat["exits"] += 1
            mmu = self.mmu
            if mmu.kvm_mmu.obs: mmu.kvm_mmu.obs.handle_exception_nmi(self.index, gva, result)  # observer
            mmu.fixed = None
            r = kvm_mmu_page_fault(mmu, gva, result)
            if self.injected is not None:
                error_code, self.injected = self.injected, None
                raise PageFault(gva, error_code)
            if r == RET_PF_EMULATE:
                return RET_PF_EMULATE
            if mmu.fixed is not None and not self.requests:
                # The retried access would walk to the spte the fault just installed or made
                # writable (no request is pending: whatever ran in between — a harvest in
                # the fast path's window — changed no spte on the way): take its
                # translation directly.
                sp, i = mmu.fixed
                spte = sp.spt[i]
                if spte & S.SPTE_MMU_PRESENT:
                    entry = self._tlb_fill(gva, kind, sp, spte)
                    if entry is not None:
                        return entry
            self.enter_guest()
            result = self._hw_walk(gva, kind)
            if not isinstance(result, int):
                return result
        raise RuntimeError(f"vCPU {self.index}: no progress on {gva:#x} (kind {kind})")

    # --- the emulator -----------------------------------------------------------------------------

    def _emulated_gpa(self, gva: int, kind: int) -> tuple[int, bool]:
        """The emulator's translation, and whether it is known to be MMIO; raises PageFault.

        A data access is vcpu_mmio_gva_to_gpa(): the cached MMIO gva, if its rights allow
        the access, else the guest walk. An instruction fetch (kvm_fetch_guest_virt) always
        walks, with PFERR_FETCH_MASK in the access, so that NX and SMEP apply.

        A gpa from the MMIO cache is MMIO (the function's return value 1): its memslot
        generation is current, so no memslot has appeared there, and the emulator
        (emulator_read_write_onepage) goes to the device without trying guest memory."""
        self.stat["insn_emulation"] += 1
        if self.vm.mmu.obs: self.vm.mmu.obs.x86_decode_emulated_instruction(self.index)  # observer
        mmu = self.mmu
        if not kind & 4 and mmu.match_mmio_gva(gva) and not (
            mmu.guest_permissions[kind] >> (mmu.mmio_access | ACC_EXEC_MASK) & 1
        ):
            return mmu.mmio_gfn << PAGE_SHIFT | (gva & ~PAGE_MASK), True
        # The walk's access is the #PF error code's access bits of the kind.
        gpa = paging_tmpl.gva_to_gpa(mmu.kvm_mmu, mmu, gva, _HW_ERROR_CODE[kind])
        if gpa < 0:
            self.stat["pf_guest"] += 1
            self.stat["req_event"] += 1
            raise PageFault(gva, ~gpa)
        return gpa, False

    def _emulate_read(self, gva: int, kind: int) -> int:
        gpa, mmio = self._emulated_gpa(gva, kind)
        value = None if mmio else self.vm.memslots.read_u64(gpa)
        if value is None:
            self.stat["mmio_exits"] += 1
            return self.vm.mmio_read(gpa)
        return value

    def _emulate_write(self, gva: int, value: int) -> None:
        gpa, mmio = self._emulated_gpa(gva, 1)
        self._write_gpa(gpa, value, mmio=mmio)

    def _write_gpa(self, gpa: int, value: int, nbytes: int = 8, mmio: bool = False) -> None:
        """An emulated store: memory (or the device, where there is none or `mmio` says the
        gpa is MMIO), then the page-track notifier."""
        if mmio or self.vm.memslots.write_u64(gpa, value) is None:
            self.stat["mmio_exits"] += 1
            self.vm.mmio_write(gpa, value)
            return
        self.mark_page_dirty(gpa >> PAGE_SHIFT)
        pte_write.kvm_mmu_pte_write(self.mmu.kvm_mmu, self.mmu, gpa, nbytes)

    # --- the guest's instructions --------------------------------------------------------------

    def access(self, gva: int, *, write: bool = False, fetch: bool = False, user: bool = False) -> Access:
        """One guest access of the page at gva; the data is left as it is."""
        kind = write | user << 1 | fetch << 2
        try:
            entry = self._translate(gva, kind)
            if isinstance(entry, int):
                gpa, mmio = self._emulated_gpa(gva, kind)
                if write:  # a read-modify-write that stores the value it read
                    value = None if mmio else self.vm.memslots.read_u64(gpa & ~7)
                    self._write_gpa(gpa & ~7, self.vm.mmio_read(gpa) if value is None else value, mmio=mmio)
                return Access(gva, False, 0, gpa)
        except PageFault as pf:
            return Access(gva, True, pf.error_code)
        return Access(gva, False, 0, entry[4] << PAGE_SHIFT | (gva & ~PAGE_MASK))

    def read_u64(self, gva: int, *, user: bool = False) -> int:
        kind = user << 1
        entry = self._translate(gva, kind)
        if isinstance(entry, int):
            return self._emulate_read(gva, kind)
        return entry[0][entry[1] + ((gva & ~PAGE_MASK) >> 3)]

    def scan_u64(self, gva: int, n: int, mask: int) -> tuple[int, int]:
        """Supervisor loads of up to n consecutive words from gva (all in one page), one by
        one, stopping after the first with a bit of `mask` set: how many were loaded, and
        the last word — a loop of `read_u64`, such as a table scan for a present entry.

        Only the first load can exit: once it has a translation and no request is
        pending, the others hit the same TLB entry (nothing else runs in between), so
        they are read straight from the page. Otherwise each goes as `read_u64` does."""
        entry = self._translate(gva, 0)
        if isinstance(entry, int):
            value = self._emulate_read(gva, 0)
        else:
            u64, base = entry[0], entry[1] + ((gva & ~PAGE_MASK) >> 3)
            value = u64[base]
            if not self.requests:
                k = 1
                while not value & mask and k < n:
                    value = u64[base + k]
                    k += 1
                self.accesses += k - 1
                return k, value
        k = 1
        while not value & mask and k < n:
            value = self.read_u64(gva + 8 * k)
            k += 1
        return k, value

    def write_u64(self, gva: int, value: int, *, user: bool = False) -> None:
        """A MOV store: a trapped write to a shadowed page table is emulated."""
        kind = 1 | user << 1
        entry = self._translate(gva, kind)
        if isinstance(entry, int):
            self._emulate_write(gva, value)
            return
        entry[0][entry[1] + ((gva & ~PAGE_MASK) >> 3)] = value

    def fetch(self, gva: int, *, user: bool = False) -> Access:
        return self.access(gva, fetch=True, user=user)

    def _string_target(self, gva: int, kind: int) -> TlbEntry | None:
        """Translation for `rep stos/movs` of a page; None if the page is MMIO.

        Such instructions do not write page tables, so when their write traps on a
        write-protected guest table KVM unprotects the gfn and re-executes
        (retry_instruction), instead of emulating 512 stores.
        """
        entry = self._translate(gva, kind)
        if isinstance(entry, int) and kind & 1:
            gpa, mmio = self._emulated_gpa(gva, kind)
            if mmio or self.vm.memslots.lookup(gpa >> PAGE_SHIFT) is None:
                return None
            zap.kvm_mmu_unprotect_page(self.mmu.kvm_mmu, gpa >> PAGE_SHIFT)
            entry = self._translate(gva, kind)
        if isinstance(entry, int):
            return None
        return entry

    def clear_page(self, gva: int) -> None:
        """Supervisor `rep stosq` of the 4 KiB page at gva."""
        gva &= PAGE_MASK
        entry = self._string_target(gva, 1)
        if entry is not None:
            entry[3][entry[1]:entry[1] + 512] = 0

    def copy_page(self, dst_gva: int, src_gva: int) -> None:
        """Supervisor `rep movsq` of 4 KiB from src_gva to dst_gva."""
        src = self._string_target(src_gva & PAGE_MASK, 0)
        dst = self._string_target(dst_gva & PAGE_MASK, 1)
        if dst is None:
            return
        if src is None:  # reading a device page: one device read per word
            gpa, _ = self._emulated_gpa(src_gva & PAGE_MASK, 0)
            self.stat["mmio_exits"] += 512
            words = self.vm.mmio_bus.read_page(gpa)
            if self.vm.mmu.obs: self.vm.mmu.obs.vcpu_mmio(False, gpa, words)  # observer
            dst[3][dst[1]:dst[1] + 512] = words
        else:
            dst[3][dst[1]:dst[1] + 512] = src[3][src[1]:src[1] + 512]

    def invlpg(self, gva: int) -> None:
        self.stat["exits"] += 1
        if self.vm.mmu.obs: self.vm.mmu.obs.handle_invlpg(self.index, gva)  # observer
        self.lock_mmu()
        if is_canonical(gva):
            sync.kvm_mmu_invlpg(self.mmu.kvm_mmu, self.mmu, gva)

"""Switching between the kernel and the KVM address space, and the touches that can fault.

`KvmMmu.asi` is the switch: it holds the VM's `VmIsolation` while the CPU runs KVM code on
the KVM address space, and None otherwise (isolation off, or back on the kernel address
space after a fault).  A touch point in the MMU is one line,

    if mmu.asi: mmu.asi.touch_rmap(slot, gfn, True)  # isolation

so it costs one attribute test whenever no fault is possible — the zero-cost-when-off rule
of the audit points — and a bisect in the mapping set when one is.

The cycle, as the series runs it: vcpu_enter_guest() enters the KVM address space, the VM
exit is handled there, the first touch of an unmapped object is an isolation page fault —
the handler switches to the kernel address space (an exit), logs the fault and the access is
retried, now on the full kernel page table — and the return to userspace at the end of
KVM_RUN exits too.  Counted in the VM stats isolation_enters/exits/faults.
"""

from __future__ import annotations

import sys
from types import FrameType
from typing import TYPE_CHECKING

from mmud.kvm.isolation import layout as L
from mmud.kvm.isolation.addrspace import KvmAddressSpace
from mmud.kvm.isolation.faultlog import FaultLog
from mmud.kvm.isolation.symbols import KernelText
from mmud.kvm.mmu.page import hash_64
from mmud.x86.paging import PAGE_SIZE, PFERR_WRITE_MASK

if TYPE_CHECKING:
    from mmud.kvm.mmu.page import ShadowPage
    from mmud.kvm.vcpu import Vcpu
    from mmud.kvm.vm import Kvm

# Offsets of the fields the touch points read or write (x86-64, ≈v5.6).
VCPU_ARCH_MMU = 0x2A0  # vcpu->arch.mmu
KVM_MEMSLOTS_LRU_SLOT = 0x208  # slots->lru_slot
SP_PARENT_PTES = 0x30  # sp->parent_ptes


class ModuleIsolation:
    """The kvm module's isolation state, shared by its VMs: kvm_mm and the fault log."""

    def __init__(self, enabled: bool, stack: bool, text: KernelText) -> None:
        self.enabled = enabled  # address_space_isolation
        self.stack = stack  # page_fault_stack
        self.text = text
        self.mm = KvmAddressSpace()
        self.log = FaultLog()
        self.current: VmIsolation | None = None  # the newest VM: `map` resolves its symbols

    def symbols(self) -> L.SymbolTable | None:
        return self.current.symbols() if self.current else None


class VmIsolation:
    """One VM's side of isolation: its objects' addresses, switches and touch points."""

    def __init__(self, kvm: Kvm, module: ModuleIsolation) -> None:
        self.kvm, self.mmu, self.stat, self.module = kvm, kvm.mmu, kvm.stat, module
        self.mm, self.log = module.mm, module.log
        self.switch_fault_armed = False

    def symbols(self) -> L.SymbolTable:
        return L.SymbolTable(L.vm_regions(self.kvm, self.module.text.end))

    # --- switches ---------------------------------------------------------------------------

    def enter(self) -> None:
        """kvm_isolation_enter(): run the coming VM exit on the KVM address space."""
        if self.mmu.asi is None:
            self.mmu.asi = self
            self.stat["isolation_enters"] += 1

    def exit(self) -> None:
        """kvm_isolation_exit(): back to the kernel address space (fault, or to userspace)."""
        if self.mmu.asi is None:
            return
        if self.switch_fault_armed:
            self.switch_fault_armed = False
            self._switch_fault(sys._getframe(0))
        self.mmu.asi = None
        self.stat["isolation_exits"] += 1

    def arm_switch_fault(self) -> None:
        """The isolation_switch_fault bug: the next switch back reads init_mm on kvm_mm."""
        self.switch_fault_armed = True

    # --- touch points (called only while on the KVM address space) ---------------------------

    def touch_vcpu(self, vcpu: Vcpu) -> None:
        if not self.mm.is_mapped(a := L.VCPU_ADDR + vcpu.index * L.VCPU_STRIDE + VCPU_ARCH_MMU):
            self._fault(a, False, sys._getframe(1))

    def touch_memslots(self) -> None:
        """The memslots array of __gfn_to_memslot() (`kvm->memslots[0]`)."""
        if not self.mm.is_mapped(a := L.KVM_MEMSLOTS_ADDR + KVM_MEMSLOTS_LRU_SLOT):
            self._fault(a, False, sys._getframe(1))

    def touch_rmap(self, gfn: int, write: bool = False) -> None:
        """The rmap head of gfn (`slot->arch.rmap[0][gfn - base_gfn]`)."""
        if (slot := self.kvm.memslots.lookup(gfn)) is None:
            return
        a = L.RMAP_ADDR + slot.id * L.RMAP_STRIDE + (gfn - slot.base_gfn) * L.SIZEOF_RMAP_HEAD
        if not self.mm.is_mapped(a):
            self._fault(a, write, sys._getframe(1))

    def touch_gfn_track(self, gfn: int, write: bool = False) -> None:
        """The write-tracking count of gfn (`slot->arch.gfn_track[0][gfn - base_gfn]`)."""
        if (slot := self.kvm.memslots.lookup(gfn)) is None:
            return
        a = (L.GFN_TRACK_ADDR + slot.id * L.GFN_TRACK_STRIDE
             + (gfn - slot.base_gfn) * L.SIZEOF_GFN_TRACK)
        if not self.mm.is_mapped(a):
            self._fault(a, write, sys._getframe(1))

    def touch_hash(self, gfn: int, write: bool = False) -> None:
        if not self.mm.is_mapped(a := L.MMU_PAGE_HASH_ADDR + hash_64(gfn) * L.SIZEOF_HLIST_HEAD):
            self._fault(a, write, sys._getframe(1))

    def touch_sp(self, sp: ShadowPage, write: bool = False) -> None:
        """The `struct kvm_mmu_page` header (role, gfn, parent_ptes, unsync…)."""
        a = L.SP_ADDRESS_BASE + sp.index * L.SIZEOF_KVM_MMU_PAGE + SP_PARENT_PTES
        if not self.mm.is_mapped(a):
            self._fault(a, write, sys._getframe(1))

    def touch_spt(self, sp: ShadowPage, i: int, write: bool = False) -> None:
        """Entry i of the shadow page table itself (`sp->spt[i]`)."""
        if not self.mm.is_mapped(a := L.SPT_ADDR + sp.index * PAGE_SIZE + 8 * i):
            self._fault(a, write, sys._getframe(1))

    # --- the fault handler -------------------------------------------------------------------

    def _fault(self, address: int, write: bool, frame: FrameType) -> None:
        """kvm_page_fault() on the KVM address space: switch, log a new IP, retry."""
        self.exit()
        self.stat["isolation_faults"] += 1
        text = self.module.text
        sym, offset = text.symbol(frame.f_code), frame.f_lasti  # the faulting IP
        n = self.log.track(sym.address + offset)
        if n is None:
            return  # an IP already seen: nothing more to do (no call chain to walk)
        chain = text.call_chain(frame)
        trace = [s.format(o) for s, o in chain[1:]] if self.module.stack else None
        error_code = PFERR_WRITE_MASK if write else 0
        self.log.entry(self.mmu.clock_ns(), n, error_code, sym.format(offset), address,
                       self.symbols().format(address), trace)

    def _switch_fault(self, frame: FrameType) -> None:
        """A fault while switching mm: dump both page tables, then the series' report."""
        self.stat["isolation_faults"] += 1
        address = L.INIT_MM + L.MM_PGD_OFFSET
        chain = self.module.text.call_chain(frame)
        sym, offset = chain[0]
        mm = self.mm
        kvm_mm, active_mm = L.KVM_ADDR + 0x9000, L.INIT_MM
        lines = [
            mm.dump_pagetable(address, kernel=False),
            mm.dump_pagetable(address, kernel=True),
            f"KVM isolation: page fault 0 at {sym.format(offset)} on {address:x} "
            f"({self.symbols().format(address)}) while switching mm",
            f"  cr3={mm.PGD - L.PAGE_OFFSET:x}",
            f"  kvm_mm={kvm_mm:016x} pgd={mm.PGD:016x}",
            f"  active_mm={active_mm:016x} pgd={mm.KERNEL_PGD:016x}",
            "Call Trace:",
            *(f" {s.format(o)}" for s, o in chain[1:]),
        ]
        self.log.append(self.mmu.clock_ns(), lines)

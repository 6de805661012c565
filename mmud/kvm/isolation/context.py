"""Switching between the kernel and the KVM address space, and the touches that can fault.

`VmIsolation` is an observer of the MMU (mmud/kvm/mmu/observer.py), attached while the CPU
runs KVM code on the KVM address space and detached otherwise (isolation off, or back on
the kernel address space after a fault).  Each MMU event names the object KVM touches
there — `rmap_add(gfn)` writes the rmap head of gfn — so a touch point is the observer
line at the kernel's site,

    if mmu.obs: mmu.obs.rmap_add(gfn)  # observer

which costs one attribute test whenever no fault is possible — the zero-cost-when-off
rule of every observer — and a bisect in the mapping set when one is.

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
from mmud.kvm.mmu import observer
from mmud.kvm.mmu.observer import MmuObserver
from mmud.kvm.mmu.page import hash_64
from mmud.x86.paging import PAGE_SIZE, PFERR_WRITE_MASK

if TYPE_CHECKING:
    from mmud.kvm.mmu.page import ShadowPage
    from mmud.kvm.vm import Kvm

# Offsets of the fields the touch points read or write (x86-64, the kernel of the 2019 isolation RFC series).
VCPU_ARCH_MMU = 0x2A0  # vcpu->arch.mmu
KVM_MEMSLOTS_LRU_SLOT = 0x208  # slots->lru_slot
SP_PARENT_PTES = 0x30  # sp->parent_ptes

# Frames of the observer machinery: a touch fault's IP is the MMU site that raised the event.
_OBSERVER_FILES = frozenset({__file__, observer.__file__})


def _site() -> FrameType:
    """The frame of the MMU code whose event led to the current touch."""
    frame: FrameType | None = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename in _OBSERVER_FILES:
        frame = frame.f_back
    assert frame is not None, "an MMU event always has a caller"
    return frame


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


class VmIsolation(MmuObserver):
    """One VM's side of isolation: its objects' addresses, switches and touch points."""

    def __init__(self, kvm: Kvm, module: ModuleIsolation) -> None:
        self.kvm, self.mmu, self.stat, self.module = kvm, kvm.mmu, kvm.stat, module
        self.mm, self.log = module.mm, module.log
        self.switch_fault_armed = False
        self.on_kvm_mm = False  # running on the KVM address space (attached to the MMU)

    def symbols(self) -> L.SymbolTable:
        return L.SymbolTable(L.vm_regions(self.kvm, self.module.text.end), self.module.text)

    # --- switches ---------------------------------------------------------------------------

    def enter(self) -> None:
        """kvm_isolation_enter(): run the coming VM exit on the KVM address space."""
        if not self.on_kvm_mm:
            self.on_kvm_mm = True
            self.mmu.attach(self)
            self.stat["isolation_enters"] += 1

    def exit(self) -> None:
        """kvm_isolation_exit(): back to the kernel address space (fault, or to userspace)."""
        if not self.on_kvm_mm:
            return
        if self.switch_fault_armed:
            self.switch_fault_armed = False
            self._switch_fault(sys._getframe(0))
        self.on_kvm_mm = False
        self.mmu.detach(self)
        self.stat["isolation_exits"] += 1

    def arm_switch_fault(self) -> None:
        """The isolation_switch_fault bug: the next switch back reads init_mm on kvm_mm."""
        self.switch_fault_armed = True

    # --- touch points (attached only while on the KVM address space) ----------------------

    def page_fault(self, vcpu_index: int) -> None:
        """`vcpu->arch.mmu` of the faulting vCPU."""
        self._touch(L.VCPU_ADDR + vcpu_index * L.VCPU_STRIDE + VCPU_ARCH_MMU)

    def gfn_to_memslot(self) -> None:
        """The memslots array of __gfn_to_memslot() (`kvm->memslots[0]`)."""
        self._touch(L.KVM_MEMSLOTS_ADDR + KVM_MEMSLOTS_LRU_SLOT)

    def _touch_rmap(self, gfn: int, write: bool) -> None:
        """The rmap head of gfn (`slot->arch.rmap[0][gfn - base_gfn]`)."""
        if (slot := self.kvm.memslots.lookup(gfn)) is not None:
            self._touch(L.RMAP_ADDR + slot.id * L.RMAP_STRIDE + (gfn - slot.base_gfn) * L.SIZEOF_RMAP_HEAD,
                        write)

    def rmap_add(self, gfn: int) -> None:
        self._touch_rmap(gfn, True)

    def rmap_write_protect(self, gfn: int) -> None:
        self._touch_rmap(gfn, False)

    def _touch_gfn_track(self, gfn: int, write: bool) -> None:
        """The write-tracking count of gfn (`slot->arch.gfn_track[0][gfn - base_gfn]`)."""
        if (slot := self.kvm.memslots.lookup(gfn)) is not None:
            self._touch(L.GFN_TRACK_ADDR + slot.id * L.GFN_TRACK_STRIDE
                        + (gfn - slot.base_gfn) * L.SIZEOF_GFN_TRACK, write)

    def page_track_is_active(self, gfn: int) -> None:
        self._touch_gfn_track(gfn, False)

    def account_shadowed(self, sp: ShadowPage) -> None:
        self._touch_gfn_track(sp.gfn, True)

    def _touch_hash(self, gfn: int, write: bool) -> None:
        """The mmu_page_hash bucket of gfn."""
        self._touch(L.MMU_PAGE_HASH_ADDR + hash_64(gfn) * L.SIZEOF_HLIST_HEAD, write)

    def hash_lookup(self, gfn: int) -> None:
        self._touch_hash(gfn, False)

    def pte_write(self, gfn: int) -> None:
        self._touch_hash(gfn, False)

    def alloc_page(self, sp: ShadowPage) -> None:
        self._touch_hash(sp.gfn, True)

    def kvm_mmu_commit_zap_page(self, sps: list[ShadowPage]) -> None:
        for sp in sps:
            self._touch_hash(sp.gfn, True)

    def _touch_sp(self, sp: ShadowPage, write: bool) -> None:
        """The `struct kvm_mmu_page` header (role, gfn, parent_ptes, unsync…)."""
        self._touch(L.SP_ADDRESS_BASE + sp.index * L.SIZEOF_KVM_MMU_PAGE + SP_PARENT_PTES, write)

    def link_shadow_page(self, parent: ShadowPage, i: int, child: ShadowPage) -> None:
        self._touch_sp(child, True)

    def kvm_unsync_page(self, sp: ShadowPage) -> None:
        self._touch_sp(sp, True)

    def prepare_zap_page(self, sp: ShadowPage) -> None:
        self._touch_sp(sp, True)

    def sync_page(self, sp: ShadowPage) -> None:
        self._touch_sp(sp, False)

    def mmu_sync_children(self, parent: ShadowPage) -> None:
        self._touch_sp(parent, False)

    def invlpg(self, root: ShadowPage) -> None:
        self._touch_sp(root, False)

    def set_spte(self, sp: ShadowPage, i: int, gfn: int) -> None:
        """Entry i of the shadow page table itself (`sp->spt[i]`)."""
        self._touch(L.SPT_ADDR + sp.index * PAGE_SIZE + 8 * i, True)

    def _touch(self, address: int, write: bool = False) -> None:
        if not self.mm.is_mapped(address):
            self._fault(address, write, _site())

    # --- the fault handler -------------------------------------------------------------------

    def _fault(self, address: int, write: bool, frame: FrameType) -> None:
        """kvm_page_fault() on the KVM address space: switch, log a new IP, retry."""
        self.exit()
        self.stat["isolation_faults"] += 1
        text = self.module.text
        sym, offset = text.symbol(frame.f_code), frame.f_lasti  # the faulting IP
        assert sym is not None, f"a touch from outside KVM's code: {frame.f_code.co_qualname}"
        n = self.log.track(sym.address + offset)
        if n is None:
            return  # an IP already seen: nothing more to do (no call chain to walk)
        chain = text.call_chain(frame)
        trace = [s.format(o) for s, o in chain[1:]] if self.module.stack else None
        error_code = PFERR_WRITE_MASK if write else 0
        symbols = self.symbols()
        self.log.entry(self.mmu.clock_ns(), n, error_code, sym, offset, address,
                       symbols.sprint_symbol(address), symbols.describe(address), trace,
                       vm=self.kvm)

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
            f"({self.symbols().sprint_symbol(address)}) while switching mm",
            f"  cr3={mm.PGD - L.PAGE_OFFSET:x}",
            f"  kvm_mm={kvm_mm:016x} pgd={mm.PGD:016x}",
            f"  active_mm={active_mm:016x} pgd={mm.KERNEL_PGD:016x}",
            "Call Trace:",
            *(f" {s.format(o)}" for s, o in chain[1:]),
        ]
        self.log.append(self.mmu.clock_ns(), lines)

"""One interface through which the shadow MMU tells observers what it does.

Observers — the incremental audit's touch set, address-space isolation's touch points, and
next the kvmmmu tracepoints and the recorder — all hook into the MMU the same way: one line
at the kernel's own site, which with nobody listening costs one attribute test,

    if mmu.obs: mmu.obs.set_spte(sp, i, gfn)  # observer

`KvmMmu.obs` is None, the one attached observer, or a `Fanout` calling each of several in
attachment order. An observer subclasses `MmuObserver` and overrides the events it cares
about; the others stay no-ops. A hook's name is the kernel function it sits in.

Events say what the MMU did or touched, not why an observer cares: the audit keeps the
pages and gfns that changed, isolation checks whether the object touched is mapped in the
KVM address space (so a hook also marks a read that changes nothing, e.g. `hash_lookup`).
The benchmark's hooks-removed build deletes every `# observer` line.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from mmud.kvm.memslot import Memslot
    from mmud.kvm.mmu.page import ShadowPage
    import numpy as np


class MmuObserver(Protocol):
    """The MMU's events. Subclass it explicitly to inherit a no-op for every event (the
    bodies say `return None` so that a type checker does not take them for abstract)."""

    # --- shadow pages ------------------------------------------------------------------
    def hash_lookup(self, gfn: int) -> None:
        """kvm_mmu_get_page() reads the hash bucket of gfn."""
        return None

    def alloc_page(self, sp: ShadowPage) -> None:
        """kvm_mmu_alloc_page(): sp is new (on the hash and the active list)."""
        return None

    def kvm_mmu_commit_zap_page(self, sps: list[ShadowPage]) -> None:
        """kvm_mmu_commit_zap_page(): each sp of the list is freed (kvm_mmu_free_page,
        inlined there), leaving the hash."""
        return None

    def prepare_zap_page(self, sp: ShadowPage) -> None:
        """__kvm_mmu_prepare_zap_page(): sp is being zapped."""
        return None

    def account_shadowed(self, sp: ShadowPage) -> None:
        """sp's gfn becomes write-tracked (an upper-level guest table)."""
        return None

    def unaccount_shadowed(self, sp: ShadowPage) -> None:
        """sp's gfn stops being shadowed by it."""
        return None

    # --- links and unsync ----------------------------------------------------------------
    def link_shadow_page(self, parent: ShadowPage, i: int, child: ShadowPage) -> None:
        """Entry i of parent now points at child."""
        return None

    def drop_parent_pte(self, parent: ShadowPage, i: int, child: ShadowPage) -> None:
        """Entry i of parent no longer points at child."""
        return None

    def unsync_children_changed(self, sp: ShadowPage) -> None:
        """A bit of sp's unsync_child_bitmap was set or cleared."""
        return None

    def kvm_unsync_page(self, sp: ShadowPage) -> None:
        """sp goes unsync: its guest table may now change without a trap."""
        return None

    def kvm_unlink_unsync_page(self, sp: ShadowPage) -> None:
        """sp is marked synced."""
        return None

    def sync_page(self, sp: ShadowPage) -> None:
        """FNAME(sync_page): sp's sptes are re-read from its guest table."""
        return None

    def mmu_sync_children(self, parent: ShadowPage) -> None:
        """The unsync pages below parent are about to be synced."""
        return None

    def invlpg(self, root: ShadowPage) -> None:
        """FNAME(invlpg) walks the tree of root."""
        return None

    # --- sptes and rmaps ---------------------------------------------------------------------
    def set_spte(self, sp: ShadowPage, i: int, gfn: int) -> None:
        """Entry i of sp is written as a leaf mapping gfn."""
        return None

    def drop_spte(self, sp: ShadowPage, i: int) -> None:
        """The present leaf entry i of sp is cleared."""
        return None

    def zap_mmio_spte(self, sp: ShadowPage, i: int) -> None:
        """The MMIO entry i of sp is cleared."""
        return None

    def rmap_add(self, gfn: int) -> None:
        """An spte joins the rmap of gfn."""
        return None

    def rmap_remove(self, sp: ShadowPage, i: int, gfn: int) -> None:
        """Entry i of sp leaves the rmap of gfn."""
        return None

    def rmap_write_protect(self, gfn: int) -> None:
        """Every spte mapping gfn loses W."""
        return None

    def page_track_is_active(self, gfn: int) -> None:
        """The write-tracking count of gfn is read."""
        return None

    # --- guest walks, emulated writes, dirty logging ------------------------------------------
    def gfn_to_memslot(self) -> None:
        """The guest walker looks up memslots."""
        return None

    def page_fault(self, vcpu_index: int) -> None:
        """kvm_mmu_page_fault() starts on a vCPU (it reads vcpu->arch.mmu)."""
        return None

    def pte_write(self, gfn: int) -> None:
        """kvm_mmu_pte_write(): the guest wrote its page table at gfn (shadowed pages exist)."""
        return None

    def dirty_log_protect(self, slot: Memslot, first_word: int, words: np.ndarray) -> None:
        """A dirty-log harvest took the bits `words` (from bitmap word first_word) and
        write-protected their pages."""
        return None

    # --- what the kvmmmu tracepoints report (mmud/kvm/trace) ------------------------------------
    # Named after the kernel function they sit in, or after the tracepoint where one function
    # has several (the guest walker's).
    def walk_addr(self, addr: int, pferr: int) -> None:
        """FNAME(walk_addr_generic) starts a guest walk of addr for access pferr."""
        return None

    def paging_element(self, pte: int, level: int) -> None:
        """The guest walker read the gpte of one level."""
        return None

    def update_accessed_dirty_bits(self, pte_gpa: int, old: int, new: int) -> None:
        """FNAME(update_accessed_dirty_bits) sets A (and D) of the gpte at pte_gpa."""
        return None

    def walker_error(self, pferr: int) -> None:
        """The guest walk failed: pferr is the #PF error code to inject."""
        return None

    def kvm_mmu_get_page(self, sp: ShadowPage, created: bool) -> None:
        """kvm_mmu_get_page() returns sp, new or found on the hash."""
        return None

    def spte_requested(self, gfn: int, pfn: int, level: int) -> None:
        """FNAME(fetch) has built the upper levels and is about to map gfn → pfn at level."""
        return None

    def mmu_set_spte(self, sp: ShadowPage, i: int, gfn: int, result: int) -> None:
        """mmu_set_spte() has written entry i of sp (set_spte()'s SET_SPTE_* result)."""
        return None

    def mark_mmio_spte(self, sp: ShadowPage, i: int, gfn: int, spte: int) -> None:
        """Entry i of sp is about to become the MMIO spte `spte` for gfn."""
        return None

    def check_mmio_spte(self, spte: int, kvm_gen: int, spte_gen: int) -> None:
        """An MMIO spte's generation is compared with the memslots'."""
        return None

    def handle_mmio_page_fault(self, addr: int, gfn: int, access: int) -> None:
        """An RSVD fault on a current MMIO spte goes to emulation."""
        return None

    def fast_page_fault(self, vcpu_index: int, addr: int, error_code: int, sp: ShadowPage | None,
                        i: int, old: int, ret: int) -> None:
        """fast_page_fault() ends with RET_PF_* ret; entry i of sp was `old` (sp None: no root)."""
        return None

    def kvm_mmu_zap_all_fast(self, mmu_valid_gen: int, used_pages: int) -> None:
        """kvm_mmu_zap_all_fast() is about to toggle the generation."""
        return None


    # --- the vCPU around the MMU: exits, entries, the emulator (vmx.c, x86.c) -------------
    def vcpu_enter_guest(self, vcpu_index: int) -> None:
        """vcpu_enter_guest(): the vCPU is about to run guest code (requests serviced)."""
        return None

    def handle_exception_nmi(self, vcpu_index: int, address: int, error_code: int) -> None:
        """A #PF VM exit at address with error_code (shadow paging intercepts #PF)."""
        return None

    def handle_cr(self, vcpu_index: int, cr: int, value: int) -> None:
        """A MOV-to-CR VM exit writing value to CRcr."""
        return None

    def handle_wrmsr(self, vcpu_index: int, msr: int, value: int) -> None:
        """A WRMSR VM exit (EFER)."""
        return None

    def handle_invlpg(self, vcpu_index: int, address: int) -> None:
        """An INVLPG VM exit."""
        return None

    def x86_decode_emulated_instruction(self, vcpu_index: int) -> None:
        """The emulator decodes the faulting instruction (stat insn_emulation)."""
        return None

    def vcpu_mmio(self, write: bool, gpa: int, values: Iterable[int]) -> None:
        """Emulated 8-byte accesses to the device at gpa, gpa+8, …, served by the VMM
        (a read's values are what the device returned)."""
        return None


# Every event of MmuObserver, for Fanout.
EVENTS: tuple[str, ...] = tuple(
    name for name, value in vars(MmuObserver).items() if callable(value) and not name.startswith("_")
)


class Fanout(MmuObserver):
    """Several observers at once: each event goes to every one, in attachment order."""

    def __init__(self, observers: tuple[MmuObserver, ...]) -> None:
        self.observers = observers


def _fan(name: str) -> Callable[..., None]:
    def event(self: Fanout, *args: object) -> None:
        for observer in self.observers:
            getattr(observer, name)(*args)
    event.__name__ = event.__qualname__ = name
    return event


for _name in EVENTS:
    setattr(Fanout, _name, _fan(_name))


def combine(observers: list[MmuObserver]) -> MmuObserver | None:
    """What `KvmMmu.obs` holds for a list of attached observers."""
    if not observers:
        return None
    if len(observers) == 1:
        return observers[0]
    return Fanout(tuple(observers))

"""Spte bits and TLB flushes as Linux v5.16 makes them (make_spte, mmu_spte_update,
spte_write_protect, get_mmio_spte, make_mmio_spte), and the processor's A/D updates."""

from __future__ import annotations

import pytest
from structlog.testing import capture_logs

from mmud.kvm.mmu import spte as S
from mmud.kvm.mmu.mmio import KvmInternalError
from mmud.x86.paging import pt_index
from tests.guest_tables import DIRECT_VA, A, D, P, U, W, new_vm

VA = 0x0000_0000_0040_0000
MMIO_GPA = 0x1000_0000  # above the 64 MiB of RAM, no memslot
HIGH_MMIO_GPA = (1 << 45) | (1 << 41) | 0x5000  # gpa bits the L1TF mask hides
WRITABLE_BITS = S.PT_WRITABLE_MASK | S.SPTE_MMU_WRITEABLE | S.SPTE_HOST_WRITEABLE


def leaf(vcpu, va):
    """(sp, index) of va's leaf spte."""
    sp = vcpu.mmu.root
    for level in (4, 3, 2):
        sp = vcpu.mmu.kvm_mmu.child_of(sp.spt[pt_index(va, level)])
    return sp, pt_index(va, 1)


def leaf_spte(vcpu, va):
    sp, i = leaf(vcpu, va)
    return sp.spt[i]


def test_a_write_fault_makes_a_writable_dirty_accessed_spte():
    """spte_shadow_dirty_mask: every writable spte make_spte builds carries D (and A when it
    is built for an access)."""
    vm, gt, vcpu = new_vm()
    gt.map(VA, flags=P | W | U | A | D)
    vcpu.write_u64(VA, 1, user=True)
    spte = leaf_spte(vcpu, VA)
    assert spte & WRITABLE_BITS == WRITABLE_BITS
    assert spte & (S.PT_DIRTY_MASK | S.PT_ACCESSED_MASK) == S.PT_DIRTY_MASK | S.PT_ACCESSED_MASK
    assert vm.audit() == []


def test_a_read_fault_on_a_clean_gpte_is_read_only_and_clean_until_the_first_write():
    vm, gt, vcpu = new_vm()
    gt.map(VA, flags=P | W | U | A)  # clean gpte: no W in the spte (protect_clean_gpte)
    vcpu.read_u64(VA, user=True)
    spte = leaf_spte(vcpu, VA)
    assert spte & S.PT_ACCESSED_MASK and not spte & (S.PT_DIRTY_MASK | S.PT_WRITABLE_MASK)
    vcpu.write_u64(VA, 2, user=True)
    dirty_writable = S.PT_DIRTY_MASK | S.PT_WRITABLE_MASK
    assert leaf_spte(vcpu, VA) & dirty_writable == dirty_writable


def test_the_processor_sets_d_on_the_first_write_through_a_cached_translation():
    """A translation filled by a read of a writable spte without D does not serve a write:
    the write walks again and the processor sets D in the spte, as hardware does."""
    vm, gt, vcpu = new_vm()
    gt.map(VA, flags=P | W | U | A | D)
    vcpu.write_u64(VA, 1, user=True)
    sp, i = leaf(vcpu, VA)
    sp.spt[i] &= ~S.PT_DIRTY_MASK  # as if KVM had made it writable without D
    vcpu.tlb.clear()
    exits = vm.stats["exits"]
    assert vcpu.read_u64(VA, user=True) == 1
    assert not sp.spt[i] & S.PT_DIRTY_MASK
    vcpu.write_u64(VA, 3, user=True)
    assert sp.spt[i] & S.PT_DIRTY_MASK and vm.stats["exits"] == exits  # a walk, no VM exit
    assert vm.read_u64(vcpu.access(VA, user=True).gpa & ~0xFFF) == 3


def test_a_prefetched_spte_starts_not_accessed_and_the_processor_sets_a():
    """FNAME(prefetch_gpte) (INVLPG of an unsync page's entry): make_spte with prefetch marks
    the spte for access tracking (no A); the first access through it sets A."""
    vm, gt, vcpu = new_vm()
    other = VA + 0x1000
    gt.map(VA, flags=P | W | U | A | D)
    gt.map(other, flags=P | W | U | A | D)
    vcpu.read_u64(VA, user=True)
    vcpu.read_u64(other, user=True)  # both leaves in one level-1 sp
    table = gt.table_for(other, 1)
    new_gpte = gt.alloc_data() | P | U | A | D
    vcpu.write_u64(DIRECT_VA + table + 8 * pt_index(other, 1), new_gpte)  # the page goes unsync
    vcpu.invlpg(other)
    spte = leaf_spte(vcpu, other)
    assert spte & S.SPTE_MMU_PRESENT and not spte & S.PT_ACCESSED_MASK
    vcpu.read_u64(other, user=True)
    assert leaf_spte(vcpu, other) & S.PT_ACCESSED_MASK
    assert vm.audit() == []


def test_a_sync_that_clears_a_flushes_remote_tlbs():
    """mmu_spte_update(): clearing A (a synced spte is prefetched, so not accessed) needs a
    flush even when W stays."""
    vm, gt, vcpu = new_vm()
    other = VA + 0x1000
    gt.map(VA, flags=P | W | U | A | D)
    gt.map(other, flags=P | U | A)
    vcpu.read_u64(VA, user=True)
    vcpu.read_u64(other, user=True)
    table = gt.table_for(other, 1)
    vcpu.write_u64(DIRECT_VA + table + 8 * pt_index(VA, 1), vm.read_u64(table + 8 * pt_index(VA, 1)))
    sp, i = leaf(vcpu, other)
    assert sp.unsync and sp.spt[i] & S.PT_ACCESSED_MASK
    flushes = vm.stats["remote_tlb_flush"]
    vcpu.cr3 = vcpu.cr3  # sync: the unchanged gpte is re-read, the spte rebuilt without A
    vcpu.enter_guest()
    assert not sp.unsync and not sp.spt[i] & S.PT_ACCESSED_MASK
    assert vm.stats["remote_tlb_flush"] > flushes


@pytest.mark.parametrize(("old", "new", "flush"), [
    (WRITABLE_BITS | S.SPTE_MMU_PRESENT, S.SPTE_MMU_PRESENT | S.SPTE_HOST_WRITEABLE, True),
    # MMU-writable but not W (protected for dirty logging): losing MMU-writable flushes too.
    (S.SPTE_MMU_WRITEABLE | S.SPTE_HOST_WRITEABLE | S.SPTE_MMU_PRESENT, S.SPTE_MMU_PRESENT, True),
    (S.SPTE_MMU_PRESENT | S.SPTE_HOST_WRITEABLE, S.SPTE_MMU_PRESENT, False),
    (S.SPTE_MMU_PRESENT | S.PT_ACCESSED_MASK, S.SPTE_MMU_PRESENT, True),
    (S.SPTE_MMU_PRESENT | S.PT_DIRTY_MASK, S.SPTE_MMU_PRESENT, True),
    (S.SPTE_MMU_PRESENT, S.SPTE_MMU_PRESENT | S.PT_ACCESSED_MASK, False),
    (0, S.SPTE_MMU_PRESENT, False),
])
def test_mmu_spte_update_flush_rule(old, new, flush):
    assert S.spte_update_needs_flush(old, new) is flush


def test_write_protecting_a_dirty_log_protected_spte_flushes():
    """rmap_write_protect (spte_write_protect with pt_protect): an spte that is not writable
    but could become so locklessly loses MMU-writable, and that needs a flush."""
    vm, gt, vcpu = new_vm()
    gt.map(VA, flags=P | W | U | A | D)
    vcpu.write_u64(VA, 1, user=True)
    sp, i = leaf(vcpu, VA)
    sp.spt[i] &= ~S.PT_WRITABLE_MASK  # as dirty logging leaves it
    gfn = sp.gfn_of(i)
    assert vm.mmu.rmap_write_protect(gfn) is True
    assert not sp.spt[i] & (S.PT_WRITABLE_MASK | S.SPTE_MMU_WRITEABLE)
    assert vm.mmu.rmap_write_protect(gfn) is False  # nothing left to protect


def test_a_harvest_of_a_dirty_word_flushes_even_if_nothing_was_writable():
    """kvm_get_dirty_log_protect (v5.16): flush when a bitmap word was non-zero."""
    vm, gt, vcpu = new_vm()
    vm.set_memslot(0, 0, vm.mem_bytes, log_dirty=True)
    vm.get_dirty_log(0)
    flushes = vm.stats["remote_tlb_flush_requests"]
    vm.get_dirty_log(0)
    assert vm.stats["remote_tlb_flush_requests"] == flushes  # an empty bitmap: no flush
    vm.write_u64(0x3000, 1)  # a host write: dirty, but no spte maps the page writable
    vm.get_dirty_log(0)
    assert vm.stats["remote_tlb_flush_requests"] == flushes + 1


def test_mmio_sptes_carry_the_l1tf_mask_and_keep_every_gpa_bit():
    """make_mmio_spte(): the top 5 bits of the host's physical-address width (41-45) are set
    in every MMIO spte, the gpa bits they cover move 5 bits up, and the gfn reads back."""
    vm, gt, vcpu = new_vm()
    gt.map(VA, MMIO_GPA, flags=P | W | U)
    gt.map(VA + 0x1000, HIGH_MMIO_GPA, flags=P | W | U)
    vcpu.read_u64(VA, user=True)
    vcpu.read_u64(VA + 0x1000, user=True)
    for va, gpa in ((VA, MMIO_GPA), (VA + 0x1000, HIGH_MMIO_GPA)):
        spte = leaf_spte(vcpu, va)
        assert S.is_mmio_spte(spte)
        assert spte & S.SHADOW_NONPRESENT_OR_RSVD_MASK == 0x3E00_0000_0000  # bits 41..45
        assert (spte >> 46) & 0x1F == (gpa >> 41) & 0x1F
        assert S.get_mmio_spte_gfn(spte) == gpa >> 12
    assert vm.stats["mmio_exits"] == 2 and vm.audit() == []


def test_a_reserved_bit_in_an_upper_level_spte_is_caught_on_every_level():
    """get_mmio_spte(): every MMU-present spte of the walk is checked, not only the last; the
    report is the kernel's pr_err lines and KVM_RUN fails."""
    vm, gt, vcpu = new_vm()
    gt.map(VA, flags=P | W | U | A | D)
    vcpu.read_u64(VA, user=True)
    root = vcpu.mmu.root
    i4 = pt_index(VA, 4)
    l3 = vcpu.mmu.kvm_mmu.child_of(root.spt[i4])
    bad = l3.spt[pt_index(VA, 3)] | 1 << 47  # above MAXPHYADDR 46: reserved
    l3.spt[pt_index(VA, 3)] = bad
    vcpu.tlb.clear()
    with capture_logs() as logs, pytest.raises(Exception) as e:
        vcpu.read_u64(VA, user=True)
    assert isinstance(e.value, KvmInternalError) or isinstance(e.value.__cause__, KvmInternalError)
    (event,) = [entry for entry in logs if entry["event"] == "mmu_reserved_spte"]
    lines = event["message"].split("\n")
    assert lines[0] == f"get_mmio_spte: reserved bits set on MMU-present spte, addr {VA:#x}, hierarchy:"
    assert lines[1] == f"------ spte = {root.spt[i4]:#x} level = 4, rsvd bits = 0xfc00000000080"
    assert lines[2] == f"------ spte = {bad:#x} level = 3, rsvd bits = 0xfc00000000080"
    assert len(lines) == 3  # mmud cannot follow a pointer with reserved bits: the walk ends there


def test_present_sptes_never_have_reserved_bits():
    """Every host frame mmud hands out — guest RAM backings and shadow pages — lies below
    the host's MAXPHYADDR, so a clean run never trips the reserved-bit check."""
    vm, gt, vcpu = new_vm()
    for k in range(64):
        gt.map(VA + k * 0x1000, flags=P | W | U | A | D)
        vcpu.write_u64(VA + k * 0x1000, k, user=True)
    rsvd_above = ((1 << 52) - 1) & ~((1 << 46) - 1)
    for sp in vm.mmu.active_mmu_pages:
        for spte in sp.sptes.tolist():
            if spte & S.SPTE_MMU_PRESENT:
                assert not spte & rsvd_above, hex(spte)

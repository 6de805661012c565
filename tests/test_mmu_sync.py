"""Guest page-table edits through the MMU: write protection, emulation, unsync and sync,
INVLPG and CR3 reloads (docs/x86-paging.md §9-§10, docs/mmu.md)."""

from __future__ import annotations

import pytest

from mmud.kvm.mmu import spte as S
from tests.guest_tables import A, ADDR, D, P, U, W, check_access, new_vm

VA = 0x0000_0000_0040_0000


def mapped_and_used(flags=P | W | U):
    vm, gt, vcpu = new_vm()
    pa = gt.map(VA, flags=flags)
    vcpu.write_u64(VA, 0x55, user=True)
    return vm, gt, vcpu, pa, gt.entry_gpa(VA, 1)


def flush(vcpu, how):
    if how == "invlpg":
        vcpu.invlpg(VA)
    else:
        vcpu.cr3 = vcpu.cr3  # MOV CR3 with the same value: sync roots + TLB flush


EDITS = {
    "clear R/W": (lambda e: e & ~W, dict(write=True, user=True), 0x07),
    "clear U/S": (lambda e: e & ~U, dict(user=True), 0x05),
    "clear P": (lambda e: e & ~P, dict(user=True), 0x04),
    "set reserved bit": (lambda e: e | (1 << 50), dict(user=True), 0x0D),
    "set XD": (lambda e: e | (1 << 63), dict(fetch=True, user=True), 0x15),
}


@pytest.mark.parametrize("how", ["invlpg", "cr3"])
@pytest.mark.parametrize("edit", list(EDITS))
def test_leaf_edit_then_flush_takes_effect(edit, how):
    change, kind, error_code = EDITS[edit]
    vm, gt, vcpu, pa, pte = mapped_and_used()
    # Twice: the first store write-protects or unsyncs, the second goes straight through
    # an unsync table — both must be picked up by the flush.
    for value in (change(vm.read_u64(pte)), change(vm.read_u64(pte))):
        gt.guest_write_entry(vcpu, pte, value)
    flush(vcpu, how)
    got = check_access(vm, vcpu, VA, **kind)
    assert got.fault and got.error_code == error_code
    assert vm.audit() == []


@pytest.mark.parametrize("how", ["invlpg", "cr3"])
def test_leaf_frame_change_then_flush_uses_the_new_frame(how):
    vm, gt, vcpu, pa, pte = mapped_and_used()
    new_pa = gt.alloc_data()
    vm.write_u64(new_pa, 0x77)
    gt.guest_write_entry(vcpu, pte, new_pa | P | W | U)
    gt.guest_write_entry(vcpu, pte, new_pa | P | W | U)
    flush(vcpu, how)
    assert vcpu.read_u64(VA, user=True) == 0x77
    vcpu.write_u64(VA, 0x78, user=True)
    assert vm.read_u64(new_pa) == 0x78 and vm.read_u64(pa) == 0x55
    assert vm.audit() == []


def test_cleared_accessed_bit_is_set_again_after_flush():
    vm, gt, vcpu, pa, pte = mapped_and_used()
    gt.guest_write_entry(vcpu, pte, vm.read_u64(pte) & ~(A | D))
    vcpu.invlpg(VA)
    vcpu.read_u64(VA, user=True)
    assert vm.read_u64(pte) & A and not vm.read_u64(pte) & D
    vcpu.write_u64(VA, 1, user=True)
    assert vm.read_u64(pte) & D


def test_upper_level_edit_is_visible_at_once():
    """Upper-level tables are write-tracked: every store is emulated and zaps the spte."""
    vm, gt, vcpu, pa, pte = mapped_and_used()
    pde = gt.entry_gpa(VA, 2)
    before = vm.stats
    gt.guest_write_entry(vcpu, pde, vm.read_u64(pde) & ~W)
    after = vm.stats
    assert after["mmu_pte_write"] == before["mmu_pte_write"] + 1
    assert after["insn_emulation"] > before["insn_emulation"]
    assert after["mmu_pde_zapped"] == before["mmu_pde_zapped"] + 1
    vcpu.invlpg(VA)
    assert check_access(vm, vcpu, VA, write=True, user=True).error_code == 0x07
    assert vm.audit() == []


def test_leaf_table_goes_unsync_and_syncs_on_cr3_load():
    vm, gt, vcpu, pa, pte = mapped_and_used()
    table_gfn = (pte & ADDR) >> 12
    gt.guest_write_entry(vcpu, pte, vm.read_u64(pte) & ~W)
    [sp] = [sp for sp in vm.mmu.active_mmu_pages if sp.gfn == table_gfn and not sp.direct]
    assert sp.unsync and vm.stats["mmu_unsync"] == 1
    vcpu.cr3 = vcpu.cr3
    assert not sp.unsync and vm.stats["mmu_unsync"] == 0
    assert vm.audit() == []


def test_write_flooding_zaps_an_upper_level_shadow_page():
    vm, gt, vcpu, pa, pte = mapped_and_used()
    pde = gt.entry_gpa(VA, 2)
    other = (pde & ~0xFFF) + 8 * 100  # an unused PDE in the same table
    for _ in range(3):
        gt.guest_write_entry(vcpu, other, 0)
    assert vm.stats["mmu_flooded"] == 1
    assert vm.audit() == []
    assert vcpu.read_u64(VA, user=True) == 0x55


def test_unsync_pages_of_a_gfn_that_becomes_an_upper_table_are_synced():
    """get_page() of a level>1 sp syncs the unsync level-1 sps of that gfn first."""
    vm, gt, vcpu, pa, pte = mapped_and_used()
    table = pte & ~0xFFF
    gt.guest_write_entry(vcpu, pte, vm.read_u64(pte) & ~W)  # leaf table now unsync
    # Make the same frame a page directory for another region (a guest recycling a table).
    va2 = 0x0000_0080_0000_0000
    pdpt = gt.table_for(va2, 3)
    gt.guest_write_entry(vcpu, pdpt + 8 * ((va2 >> 30) & 511), table | P | W | U)
    vcpu.invlpg(va2)
    vcpu.access(va2 + (1 << 30) * 0, user=True)
    assert vm.stats["mmu_unsync"] == 0
    assert vm.audit() == []


def test_remote_tlb_flush_reaches_every_vcpu():
    vm, gt, vcpu = new_vm(vcpus=2)
    gt.map(VA, flags=P | W | U)
    other = vm.vcpus[1]
    other.cr3 = gt.pml4
    other.write_u64(VA, 1, user=True)
    assert other.tlb
    before = vm.stats["remote_tlb_flush"]
    vm.zap_all("slow")
    assert vm.stats["remote_tlb_flush"] > before
    flushes = vm.stats["tlb_flush"]
    assert other.read_u64(VA, user=True) == 1  # the vCPU serviced KVM_REQ_TLB_FLUSH first
    assert vm.stats["tlb_flush"] > flushes and len(other.tlb) == 1
    assert vm.audit() == []


def test_an_emulated_write_to_a_leaf_table_zaps_the_spte_without_rebuilding_it():
    """kvm_mmu_pte_write (v5.16): the written spte of every valid shadow page of the table is
    zapped, and the next access builds it again; v5.11 and older rebuilt a level-1 spte at
    once (mmu_pte_updated). A table that is also shadowed as an upper-level table is
    write-tracked, so the guest's store to it is emulated rather than unsyncing the page."""
    vm, gt, vcpu = new_vm()
    table = gt.table_for(VA, 1)
    for j in range(4):
        gt.map(VA + j * 0x1000, flags=P | W | U | A | D)
        vcpu.read_u64(VA + j * 0x1000, user=True)
    # The same table as a page directory elsewhere: entry 0 is a present PTE, which as a PDE
    # maps a 2 MiB page (bit 7, the PTE's PAT bit, is PS at level 2).
    va2 = 0x0000_0080_0000_0000
    gt.guest_write_entry(vcpu, gt.table_for(VA, 1), vm.read_u64(table) | 0x80)
    pdpt = gt.table_for(va2, 3)
    vm.write_u64(pdpt + 8 * ((va2 >> 30) & 511), table | P | W | U)
    vcpu.cr3 = vcpu.cr3
    vcpu.read_u64(va2, user=True)
    sps = [sp for sp in vm.mmu.active_mmu_pages if sp.gfn == table >> 12 and not sp.direct]
    assert sorted(sp.level for sp in sps) == [1, 2]
    [leaf] = [sp for sp in sps if sp.level == 1]
    assert leaf.spt[2] & S.SPTE_MMU_PRESENT and not leaf.unsync
    pde_zapped, writes = vm.stats["mmu_pde_zapped"], vm.stats["mmu_pte_write"]
    gt.guest_write_entry(vcpu, table + 8 * 2, gt.alloc_data() | P | W | U | A | D)
    assert vm.stats["mmu_pte_write"] == writes + 1
    assert leaf.spt[2] == 0 and not leaf.unsync  # zapped, not rebuilt, and the page stays synced
    assert vm.stats["mmu_pde_zapped"] == pde_zapped + 1  # the level-2 page's entry
    assert "mmu_pte_updated" not in vm.stats
    assert vcpu.read_u64(VA + 2 * 0x1000, user=True) == 0 and leaf.spt[2] & S.SPTE_MMU_PRESENT
    assert vm.audit() == []


def test_get_page_syncs_an_unsync_page_it_finds_but_leaves_it_unsync():
    """kvm_mmu_get_page (v5.16, as v5.6): an unsync page found for the same role is brought
    up to date (__kvm_sync_page / sync_page) but not marked synced — kvm_unlink_unsync_page
    belongs to the syncs that write-protect the gfn first."""
    vm, gt, vcpu, pa, pte = mapped_and_used()
    table = pte & ~0xFFF
    gt.guest_write_entry(vcpu, pte + 8, gt.alloc_data() | P | W | U | A | D)  # the table goes unsync
    [sp] = [sp for sp in vm.mmu.active_mmu_pages if sp.gfn == table >> 12 and sp.level == 1]
    assert sp.unsync
    # A second page directory entry pointing at the same page table: the fault through it
    # looks the table up again and finds the unsync page.
    va2 = VA + (2 << 20)
    vm.write_u64(gt.entry_gpa(va2, 2), table | P | W | U | A)
    vcpu.cr3 = vcpu.cr3  # (the host write above is not seen by the MMU: start clean)
    gt.guest_write_entry(vcpu, pte + 8, gt.alloc_data() | P | W | U | A | D)
    assert sp.unsync
    misses = vm.stats["mmu_cache_miss"]
    vcpu.read_u64(va2 + 0x1000, user=True)  # entry 1 of the same table, through the new PDE
    assert vm.stats["mmu_cache_miss"] == misses  # the lookup found sp
    assert sp.unsync and not sp.invalid
    assert S.spte_to_pfn(sp.spt[1]) != 0 and vm.audit() == []

"""Guest-visible x86 paging through the shadow MMU: permissions, error codes, A/D bits,
2 MiB pages, and mode changes (docs/x86-paging.md §5-§11)."""

from __future__ import annotations

import pytest

import mmud
from mmud.x86.paging import is_canonical
from tests.guest_tables import A, D, NX, P, PS, U, W, check_access, idx, new_vm

VA = 0x0000_7F00_0040_0000
CR0_WP = 1 << 16
CR4_SMEP, CR4_SMAP = 1 << 20, 1 << 21
EFER_NXE = 1 << 11
AC = 1 << 18


def setup(
    pte=P | W | U, pde=P | W | U, efer_nxe=True, cr0_wp=True, smep=False, smap=False, ac=False
):
    vm, gt, vcpu = new_vm()
    pa = gt.map(VA, flags=pte, upper=P | W | U)
    pde_gpa = gt.entry_gpa(VA, 2)
    vm.write_u64(pde_gpa, (vm.read_u64(pde_gpa) & ~(P | W | U | NX)) | pde)
    if not cr0_wp:
        vcpu.cr0 &= ~CR0_WP
    if not efer_nxe:
        vcpu.efer &= ~EFER_NXE
    if smep or smap:
        vcpu.cr4 |= (CR4_SMEP if smep else 0) | (CR4_SMAP if smap else 0)
    if ac:
        vcpu.rflags |= AC
    return vm, gt, vcpu, pa


# docs/x86-paging.md §11 worked examples, plus the other rows of the permission table.
CASES = [
    ("user read, PTE not present", dict(pte=0), dict(user=True), 0x04),
    ("supervisor write, PDE read-only", dict(pde=P | U), dict(write=True), 0x03),
    ("same with CR0.WP=0", dict(pde=P | U, cr0_wp=False), dict(write=True), None),
    ("user write, PTE supervisor", dict(pte=P | W), dict(write=True, user=True), 0x07),
    ("user fetch, PTE XD", dict(pte=P | W | U | NX), dict(fetch=True, user=True), 0x15),
    (
        "user fetch, bit 63 with NXE=0",
        dict(pte=P | W | U | NX, efer_nxe=False),
        dict(fetch=True, user=True),
        0x0D,
    ),
    ("supervisor fetch from user page, SMEP", dict(smep=True), dict(fetch=True), 0x11),
    (
        "supervisor fetch, PTE not present, NXE=0",
        dict(pte=0, efer_nxe=False),
        dict(fetch=True),
        0x00,
    ),
    ("supervisor read of user page, SMAP AC=0", dict(smap=True), dict(), 0x01),
    ("supervisor read of user page, SMAP AC=1", dict(smap=True, ac=True), dict(), None),
    (
        "supervisor write RO user page, SMAP AC=1 WP=0",
        dict(pte=P | U, smap=True, ac=True, cr0_wp=False),
        dict(write=True),
        None,
    ),
    ("user read of supervisor page", dict(pte=P | W), dict(user=True), 0x05),
    ("user write to read-only page", dict(pte=P | U), dict(write=True, user=True), 0x07),
    (
        "user write to read-only page, WP=0",
        dict(pte=P | U, cr0_wp=False),
        dict(write=True, user=True),
        0x07,
    ),
    ("supervisor write to read-only page", dict(pte=P | U), dict(write=True), 0x03),
    ("supervisor fetch, XD in PDE", dict(pde=P | W | U | NX), dict(fetch=True), 0x11),
    ("supervisor fetch, SMEP off", dict(), dict(fetch=True), None),
    ("user read", dict(), dict(user=True), None),
    ("reserved bit 46 in PTE", dict(pte=P | W | U | (1 << 46)), dict(user=True), 0x0D),
    ("reserved bit 51 in PDE", dict(pde=P | W | U | (1 << 51)), dict(), 0x09),
    ("reserved bit 51 in non-present PDE", dict(pde=(1 << 51)), dict(), 0x00),
    (
        "fetch, NXE=0 and SMEP=0, permission fault",
        dict(pte=P | W, efer_nxe=False),
        dict(fetch=True, user=True),
        0x05,
    ),
]


@pytest.mark.parametrize("name,state,kind,error_code", CASES, ids=[c[0] for c in CASES])
def test_error_codes(name, state, kind, error_code):
    vm, gt, vcpu, pa = setup(**state)
    got = check_access(vm, vcpu, VA, **kind)
    if error_code is None:
        assert not got.fault
        assert got.gpa == pa
    else:
        assert got.fault and got.error_code == error_code
    # The same access again hits whatever the first one built: same answer.
    again = check_access(vm, vcpu, VA, **kind)
    assert (again.fault, again.error_code) == (got.fault, got.error_code)
    assert vm.audit() == []


def test_reserved_ps_in_pml4e_and_pdpte():
    vm, gt, vcpu, _ = setup()
    pdpte = gt.entry_gpa(VA, 3)
    vm.write_u64(pdpte, vm.read_u64(pdpte) | PS)
    assert check_access(vm, vcpu, VA).error_code == 0x09
    vm2, gt2, vcpu2, _ = setup()
    pml4e = gt2.entry_gpa(VA, 4)
    vm2.write_u64(pml4e, vm2.read_u64(pml4e) | PS)
    assert check_access(vm2, vcpu2, VA, user=True).error_code == 0x0D


def test_2mib_page_translation_and_reserved_bits():
    vm, gt, vcpu = new_vm()
    va = 0x0000_0040_0000_0000
    pd = gt.table_for(va, 2)
    vm.write_u64(pd + 8 * idx(va, 2), 0x0060_0000 | P | W | U | PS)
    got = check_access(vm, vcpu, va + 0x12345, user=True)
    assert got.gpa == 0x0060_0000 + 0x12345
    check_access(vm, vcpu, va + 0x1FF000, write=True, user=True)
    # Bit 13 of a 2 MiB PDE is reserved.
    va2 = va + (2 << 20)
    vm.write_u64(pd + 8 * idx(va2, 2), 0x0080_0000 | P | W | U | PS | (1 << 13))
    assert check_access(vm, vcpu, va2, user=True).error_code == 0x0D
    assert vm.audit() == []


def test_2mib_page_is_backed_by_a_direct_shadow_page():
    vm, gt, vcpu = new_vm()
    va = 0x0000_0040_0000_0000
    pd = gt.table_for(va, 2)
    vm.write_u64(pd + 8 * idx(va, 2), 0x0060_0000 | P | W | U | PS | A | D)
    vcpu.write_u64(va + 0x3008, 0xABCD, user=True)
    assert vm.read_u64(0x0060_3008) == 0xABCD
    direct = [sp for sp in vm.mmu.active_mmu_pages if sp.direct]
    assert [(sp.gfn, sp.level) for sp in direct if sp.gfn == 0x600] == [(0x600, 1)]


def test_accessed_and_dirty_bits():
    vm, gt, vcpu = new_vm()
    pa = gt.map(VA, flags=P | W | U)
    entries = [gt.entry_gpa(VA, level) for level in (4, 3, 2, 1)]
    vcpu.read_u64(VA, user=True)
    assert all(vm.read_u64(e) & A for e in entries)
    assert not vm.read_u64(entries[3]) & D
    assert not any(vm.read_u64(e) & D for e in entries[:3])
    # The read built a clean-page spte without W: the first write must still set D.
    vcpu.write_u64(VA, 5, user=True)
    assert vm.read_u64(entries[3]) & D
    assert not any(vm.read_u64(e) & D for e in entries[:3])
    assert vm.read_u64(pa) == 5


def test_faulting_access_leaves_the_leaf_unchanged():
    vm, gt, vcpu = new_vm()
    gt.map(VA, flags=P | U)  # read-only
    leaf = gt.entry_gpa(VA, 1)
    before = vm.read_u64(leaf)
    assert vcpu.access(VA, write=True, user=True).error_code == 0x07
    assert vm.read_u64(leaf) == before
    vcpu.access(VA, user=True)
    assert vm.read_u64(leaf) == before | A


def test_same_table_through_parents_with_different_rights_gets_distinct_shadow_pages():
    """CVE-2021-38198: role.access must hold the access inherited from the parents."""
    vm, gt, vcpu = new_vm()
    va_rw = 0x0000_0000_4000_0000 * 0 + 0x0000_0010_0000_0000
    pa = gt.map(va_rw, flags=P | W | U | A | D)
    pml4 = gt.pml4
    rw_entry = vm.read_u64(pml4 + 8 * idx(va_rw, 4))
    va_ro = va_rw + (1 << 39)  # next PML4 slot: same PDPT, read-only
    vm.write_u64(pml4 + 8 * idx(va_ro, 4), (rw_entry & ~W) | A)
    vcpu.write_u64(va_rw, 1, user=True)
    got = check_access(vm, vcpu, va_ro, write=True, user=True)
    assert got.fault and got.error_code == 0x07
    assert check_access(vm, vcpu, va_ro, user=True).gpa == pa
    pdpt_gfn = (rw_entry & ((1 << 46) - 1)) >> 12
    accesses = sorted(sp.access for sp in vm.mmu.active_mmu_pages if sp.gfn == pdpt_gfn)
    assert accesses == [5, 7]
    assert vm.audit() == []


def test_cr0_wp_change_takes_effect_without_cr3_reload():
    vm, gt, vcpu = new_vm()
    gt.map(VA, flags=P | U | A | D)
    assert check_access(vm, vcpu, VA, write=True).error_code == 0x03
    vcpu.cr0 &= ~CR0_WP
    assert not check_access(vm, vcpu, VA, write=True).fault
    # The supervisor-write spte is supervisor-only: a user read must still work (ping-pong).
    assert not check_access(vm, vcpu, VA, user=True).fault
    assert not check_access(vm, vcpu, VA, write=True).fault
    vcpu.cr0 |= CR0_WP
    assert check_access(vm, vcpu, VA, write=True).error_code == 0x03
    assert vm.audit() == []


def test_cr0_wp0_with_smep_does_not_let_the_kernel_execute_a_user_page():
    vm, gt, vcpu = new_vm()
    gt.map(VA, flags=P | U | A | D)
    vcpu.cr4 |= CR4_SMEP
    vcpu.cr0 &= ~CR0_WP
    assert not check_access(vm, vcpu, VA, write=True).fault
    assert check_access(vm, vcpu, VA, fetch=True).error_code == 0x11
    assert vm.audit() == []


def test_efer_nxe_change_takes_effect_without_cr3_reload():
    vm, gt, vcpu = new_vm()
    gt.map(VA, flags=P | W | U | NX | A)
    assert check_access(vm, vcpu, VA, fetch=True, user=True).error_code == 0x15
    vcpu.efer &= ~EFER_NXE
    assert check_access(vm, vcpu, VA, fetch=True, user=True).error_code == 0x0D
    vcpu.efer |= EFER_NXE
    assert check_access(vm, vcpu, VA, fetch=True, user=True).error_code == 0x15


def test_smap_follows_rflags_ac_at_every_access():
    vm, gt, vcpu = new_vm()
    gt.map(VA, flags=P | W | U | A | D)
    vcpu.cr4 |= CR4_SMAP
    assert check_access(vm, vcpu, VA).error_code == 0x01
    vcpu.rflags |= AC
    assert not check_access(vm, vcpu, VA, write=True).fault
    vcpu.rflags &= ~AC
    assert check_access(vm, vcpu, VA, write=True).error_code == 0x03


@pytest.mark.parametrize("gva", [0x0000_7FFF_FFFF_F000, 0x0000_8000_0000_0000, 0x7FFF_FFFF_FFFF_F000,
                                 0x8000_0000_0000_0000, 0xFFFF_7FFF_FFFF_F000, 0xFFFF_8000_0000_0000])
def test_non_canonical_address_is_gp_not_pf(gva):
    """Bits 63:47 not all equal: #GP, before any walk; a canonical address walks (and, with
    nothing mapped there, takes a #PF)."""
    vm, gt, vcpu = new_vm()
    if is_canonical(gva):
        assert vcpu.access(gva).fault
    else:
        with pytest.raises(mmud.GeneralProtection):
            vcpu.read_u64(gva)

"""Memslot changes and MMIO sptes, in the spirit of the KVM memslot selftests (docs/memslots-mmio.md)."""

from __future__ import annotations

import errno
import os

import pytest
from structlog.testing import capture_logs

import mmud
from mmud.kvm import dirty_log
from mmud.kvm.devices import IORAM_BASE
from mmud.kvm.mmu import spte as S
from mmud.x86.paging import CR4_SMAP, pt_index
from tests.guest_tables import A, P, U, W, check_access, new_vm

SLOT = 1
SLOT_GPA = 0x1000_0000  # above the 64 MiB of RAM
SLOT_SIZE = 0x10000
VA = 0x0000_0000_0040_0000
ALL_ONES = (1 << 64) - 1


def leaf_spte(vcpu, va):
    sp = vcpu.mmu.root
    for level in (4, 3, 2):
        sp = vcpu.mmu.kvm_mmu.child_of(sp.spt[pt_index(va, level)])
    return sp.spt[pt_index(va, 1)]


def slot_vm(**kw):
    vm, gt, vcpu = new_vm(**kw)
    vm.set_memslot(SLOT, SLOT_GPA, SLOT_SIZE)
    gt.map(VA, SLOT_GPA, flags=P | W | U)
    return vm, gt, vcpu


def test_deleted_slot_reads_all_ones_and_recreated_slot_is_zeroed_ram():
    vm, gt, vcpu = slot_vm()
    vcpu.write_u64(VA, 0x1234, user=True)
    assert vcpu.read_u64(VA, user=True) == 0x1234
    vm.set_memslot(SLOT, SLOT_GPA, 0)
    exits = vm.stats["mmio_exits"]
    assert vcpu.read_u64(VA, user=True) == ALL_ONES  # MMIO now, never a guest #PF
    vcpu.write_u64(VA, 5, user=True)  # dropped
    assert vcpu.read_u64(VA, user=True) == ALL_ONES
    assert vm.stats["mmio_exits"] == exits + 3
    assert vm.stats["pf_guest"] == 0
    assert S.is_mmio_spte(leaf_spte(vcpu, VA))
    assert vm.audit() == []
    vm.set_memslot(SLOT, SLOT_GPA, SLOT_SIZE)
    assert vcpu.read_u64(VA, user=True) == 0  # fresh RAM, through the same gva
    assert not S.is_mmio_spte(leaf_spte(vcpu, VA))
    vcpu.write_u64(VA, 7, user=True)
    assert vm.read_u64(SLOT_GPA) == 7
    assert vm.audit() == []


def test_an_unrelated_slot_makes_cached_mmio_sptes_rewalk():
    vm, gt, vcpu = new_vm()
    gt.map(VA, SLOT_GPA, flags=P | W | U)  # no memslot there: MMIO
    assert vcpu.read_u64(VA, user=True) == ALL_ONES
    created, fixed = vm.stats["pf_mmio_spte_created"], vm.stats["pf_fixed"]
    assert created == 1
    for _ in range(3):  # RSVD fault, current MMIO spte / MMIO info: straight to emulation
        assert vcpu.read_u64(VA, user=True) == ALL_ONES
    assert (vm.stats["pf_mmio_spte_created"], vm.stats["pf_fixed"]) == (created, fixed)
    vm.set_memslot(2, 0x2000_0000, SLOT_SIZE)  # unrelated: only the generation moves
    assert vcpu.read_u64(VA, user=True) == ALL_ONES
    # The stale spte sent the fault down the normal path, which rebuilt it.
    assert vm.stats["pf_mmio_spte_created"] == created + 1
    assert vm.stats["pf_fixed"] == fixed + 1
    assert S.get_mmio_spte_generation(leaf_spte(vcpu, VA)) == vm.memslots.generation
    assert vm.audit() == []


def test_mmio_info_cache_is_cleared_by_invlpg_and_root_sync():
    vm, gt, vcpu = new_vm()
    gt.map(VA, SLOT_GPA, flags=P | W | U)
    vcpu.read_u64(VA, user=True)
    vcpu.read_u64(VA, user=True)
    assert vcpu.mmu.match_mmio_gva(VA)
    vcpu.invlpg(VA)
    assert not vcpu.mmu.match_mmio_gva(VA)
    vcpu.read_u64(VA, user=True)
    assert vcpu.mmu.match_mmio_gva(VA)
    vcpu.cr3 = vcpu.cr3  # kvm_mmu_sync_roots clears it
    assert not vcpu.mmu.match_mmio_gva(VA)


def test_churn_of_other_slots_never_makes_a_stable_slot_mmio():
    vm, gt, vcpu = slot_vm()
    vcpu.write_u64(VA, 0xABC, user=True)
    exits = vm.stats["mmio_exits"]
    for k in range(20):
        vm.set_memslot(3, 0x3000_0000 + (k % 3) * SLOT_SIZE * 2, SLOT_SIZE)
        assert vcpu.read_u64(VA, user=True) == 0xABC
        vm.set_memslot(3, 0x3000_0000, 0)
        assert vcpu.read_u64(VA, user=True) == 0xABC
    assert vm.stats["mmio_exits"] == exits
    assert vm.audit() == []


def test_move_keeps_contents_and_unmaps_the_old_range():
    vm, gt, vcpu = slot_vm()
    vcpu.write_u64(VA, 0x55, user=True)
    vm.set_memslot(SLOT, 0x2000_0000, SLOT_SIZE)
    assert vcpu.read_u64(VA, user=True) == ALL_ONES
    assert vm.read_u64(0x2000_0000) == 0x55
    assert vm.audit() == []


def test_generation_steps():
    vm, gt, vcpu = new_vm()
    gen = vm.memslots.generation
    vm.set_memslot(SLOT, SLOT_GPA, SLOT_SIZE)  # create: one step
    assert vm.memslots.generation == gen + 2
    vm.set_memslot(SLOT, SLOT_GPA, SLOT_SIZE, log_dirty=True)  # flags: one step
    assert vm.memslots.generation == gen + 4
    vm.set_memslot(SLOT, SLOT_GPA, 0)  # delete: invalid slot, then the final set
    assert vm.memslots.generation == gen + 8
    assert not vm.memslots.generation & (1 << 63)


@pytest.mark.parametrize(
    "args, err",
    [
        ((SLOT, 0x1000, SLOT_SIZE), errno.EEXIST),  # overlaps slot 0
        ((SLOT, SLOT_GPA + 1, SLOT_SIZE), errno.EINVAL),
        ((SLOT, SLOT_GPA, 0), errno.EINVAL),  # delete a slot that does not exist
        ((509, SLOT_GPA, SLOT_SIZE), errno.EINVAL),
    ],
)
def test_refused_changes(args, err):
    vm, gt, vcpu = new_vm()
    gen = vm.memslots.generation
    with pytest.raises(mmud.KvmError) as e:
        vm.set_memslot(*args)
    assert e.value.errno == err
    assert vm.memslots.generation == gen


def test_resize_and_move_onto_another_slot_are_refused():
    vm, gt, vcpu = slot_vm()
    with pytest.raises(mmud.KvmError) as e:
        vm.set_memslot(SLOT, SLOT_GPA, 2 * SLOT_SIZE)
    assert e.value.errno == errno.EINVAL
    with pytest.raises(mmud.KvmError) as e:
        vm.set_memslot(SLOT, 0, SLOT_SIZE)
    assert e.value.errno == errno.EEXIST


def test_ioram_reads_back_and_every_access_exits():
    vm, gt, vcpu = new_vm()
    gt.map(VA, IORAM_BASE + 0x3000, flags=P | W)
    exits = vm.stats["mmio_exits"]
    for k in range(4):
        vcpu.write_u64(VA + 8 * k, 0x100 + k)
    assert [vcpu.read_u64(VA + 8 * k) for k in range(4)] == [0x100 + k for k in range(4)]
    assert vm.stats["mmio_exits"] == exits + 8
    assert vm.stats["pf_mmio_spte_created"] == 1
    assert vm.mmio_read(IORAM_BASE + 0x3008) == 0x101
    assert vm.audit() == []


def test_a_fetch_from_a_cached_mmio_gva_is_walked_as_a_fetch():
    """The MMIO info cache serves data accesses only (vcpu_mmio_gva_to_gpa); a fetch walks
    with PFERR_FETCH_MASK: a user fetch of a supervisor page faults with F (0x15), and SMAP,
    a rule for data, does not stop a supervisor fetch of a user page."""
    vm, gt, vcpu = new_vm()
    gt.map(VA, IORAM_BASE, flags=P | W | A)
    check_access(vm, vcpu, VA)  # a supervisor read caches the gva's MMIO info
    assert check_access(vm, vcpu, VA, fetch=True, user=True).error_code == 0x15
    gt.map(VA + 0x1000, IORAM_BASE + 0x1000, flags=P | W | U | A)
    vcpu.cr4 |= CR4_SMAP
    check_access(vm, vcpu, VA + 0x1000, user=True)
    assert not check_access(vm, vcpu, VA + 0x1000, fetch=True).fault


def test_mmio_caching_off_creates_no_mmio_sptes():
    vm, gt, vcpu = new_vm(params={"mmio_caching": "0"})
    gt.map(VA, IORAM_BASE, flags=P | W)
    for k in range(5):
        vcpu.write_u64(VA, k)
        assert vcpu.read_u64(VA) == k
    assert vm.stats["pf_mmio_spte_created"] == 0
    assert vm.stats["mmio_exits"] == 10
    assert vm.stats["pf_emulate"] == 10  # every access: full fault, walk, emulation
    assert vm.audit() == []


def test_sync_rewrites_mmio_sptes_of_unsync_pages():
    vm, gt, vcpu = new_vm()
    other = VA + 0x1000
    gt.map(other, SLOT_GPA + 0x1000, flags=P | W | U)
    vcpu.read_u64(other, user=True)  # MMIO spte in the same leaf table
    gt.map(VA, flags=P | W | U)
    vcpu.write_u64(VA, 1, user=True)
    # The guest edits the table twice (it goes unsync), retargeting `other` to RAM: the
    # sync at the CR3 reload drops the MMIO spte (sync_mmio_spte, other gfn).
    ram = gt.alloc_data()
    entry = gt.entry_gpa(other, 1)
    gt.guest_write_entry(vcpu, entry, ram | P | W | U)
    gt.guest_write_entry(vcpu, entry, ram | P | W | U)
    vcpu.cr3 = vcpu.cr3
    assert vcpu.read_u64(other, user=True) == 0
    assert vm.audit() == []


def test_generation_wraparound_zaps_everything():
    vm, gt, vcpu = slot_vm()
    vcpu.write_u64(VA, 3, user=True)
    gen_before = vm.mmu.mmu_valid_gen
    vm.memslots.generation = (1 << 19) - 2  # the next step wraps the bits MMIO sptes keep
    with capture_logs() as logs:
        vm.set_memslot(2, 0x2000_0000, SLOT_SIZE)
    wrap = f"kvm [{os.getpid()}]: kvm: zapping shadow pages for mmio generation wraparound"
    assert any(e.get("message") == wrap for e in logs)
    assert vm.mmu.mmu_valid_gen != gen_before
    assert all(vm.mmu.is_obsolete_sp(sp) for sp in vm.mmu.active_mmu_pages)
    assert vcpu.read_u64(VA, user=True) == 3
    assert all(not vm.mmu.is_obsolete_sp(sp) for sp in vm.mmu.active_mmu_pages)
    assert vm.audit() == []


def test_memslot_churn_workload_runs_clean():
    vm = mmud.VM(mem_mb=64, vcpus=2, seed=3, workload="memslot_churn")
    vm.step(6000)
    counters = vm.workload.counters
    assert counters["data_errors"] == 0 and counters["oops"] == 0, vm.workload.errors
    assert counters["ioram_io"] > 0
    assert vm.memslots.generation > 20
    assert vm.audit() == []


def test_a_cached_mmio_access_does_not_wait_for_the_mmu_lock():
    """handle_mmio_page_fault() walks the shadow tables locklessly (v5.16): while a dirty-log
    harvest holds kvm->mmu_lock across its steps, an access to a page with an MMIO spte
    reaches the device; a fault that needs the lock waits (here nothing releases it)."""
    vm, gt, vcpu = new_vm()
    gt.map(VA, IORAM_BASE + 0x2000, flags=P | W)
    gt.map(VA + 0x1000, 0x30000, flags=P | W)
    vm.log_dirty_pages(0)  # a memslot change: MMIO sptes made before it are stale
    vcpu.write_u64(VA, 0x77)  # the shadow fault makes the MMIO spte
    harvest = dirty_log.kvm_get_dirty_log_protect(vm, 0, words_per_step=1)
    next(harvest)
    assert vm.mmu.mmu_lock_held
    for _ in range(3):
        vcpu.mmu.clear_mmio_info_any()  # no cached gva either: the walk finds the MMIO spte
        assert vcpu.read_u64(VA) == 0x77
    assert vm.mmu.mmu_lock_held
    with pytest.raises(RuntimeError, match="never released"):
        vcpu.read_u64(VA + 0x1000)  # a shadow fault: it takes the lock

"""Guests as large as KVM allows: the PC memory layout, slots up to 2^31 - 1 pages, and
per-page state committed only as the guest touches it (docs/memslots-mmio.md)."""

from __future__ import annotations

import errno
import random
from types import SimpleNamespace

import pytest

import mmud
from mmud.daemon import recording, vmio
from mmud.guest.frames import FrameAllocator, OutOfMemory
from mmud.guest.kernel import Kernel
from mmud.guest.pgtable import PAGE_OFFSET
from mmud.hostmem import resident_pages
from mmud.kvm.devices import IORAM_BASE, IORAM_SIZE
from mmud.kvm.kvm_main import KvmError
from mmud.kvm.memslot import BACKING_PFN_SHIFT, KVM_MEM_MAX_NR_PAGES
from mmud.kvm.vcpu import PageFault

GiB = 1 << 30
LOW_END = 2 * GiB  # q35's low RAM once a guest has 0xb0000000 bytes or more
HIGH = 4 * GiB


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def slot_layout(vm: mmud.VM) -> list[tuple[int, int, int]]:
    return [(s.id, s.base_gfn << 12, s.end_gfn << 12) for s in vm.memslots]


def test_a_16g_guest_has_ram_below_and_above_the_pci_hole_and_runs():
    vm = mmud.VM(mem_mb=16 << 10, vcpus=2, seed=3, workload="kernel")
    assert slot_layout(vm) == [(0, 0, LOW_END), (1, HIGH, HIGH + 14 * GiB)]
    assert vm.ram_ranges == [(0, LOW_END), (HIGH, HIGH + 14 * GiB)]
    assert LOW_END <= IORAM_BASE and IORAM_BASE + IORAM_SIZE <= HIGH  # the device is in the hole
    assert vm.memslots.lookup(IORAM_BASE >> 12) is None
    assert vm.step(2000) == 2000
    counters = vm.workload.counters
    assert counters["ioram_io"] > 0  # the guest reaches the device, RAM no longer hides it
    assert counters["data_errors"] == counters["oops"] == counters["segv"] == 0


def test_the_guest_direct_map_covers_high_ram_and_leaves_the_hole_unmapped():
    vm = mmud.VM(mem_mb=5 << 10, seed=1, workload="kernel")
    vm.step(10)  # the vCPU is up on the kernel's page tables
    vcpu = vm.vcpus[0]
    top = HIGH + 3 * GiB - 8
    for gpa in (HIGH, top):
        vm.write_u64(gpa, gpa ^ 0x5A5A)
        assert vcpu.read_u64(PAGE_OFFSET + gpa) == gpa ^ 0x5A5A
    with pytest.raises(PageFault):
        vcpu.read_u64(PAGE_OFFSET + LOW_END)  # no RAM, no direct mapping



def test_the_guest_allocates_every_ram_frame_past_its_boot_tables_and_none_in_the_hole():
    frames = Kernel(mmud.VM(mem_mb=5 << 10), seed=0).frames
    first = frames.alloc()  # the first frame after the boot page tables
    assert first < 16 and frames.nr_frames == (LOW_END + 3 * GiB) // 4096 - first


def test_guests_below_q35_low_ram_keep_one_slot_from_zero():
    below = mmud.VM(mem_mb=(0xB0000000 >> 20) - 1)
    assert slot_layout(below) == [(0, 0, 0xB0000000 - (1 << 20))]
    at = mmud.VM(mem_mb=0xB0000000 >> 20)
    assert slot_layout(at) == [(0, 0, LOW_END), (1, HIGH, HIGH + 0xB0000000 - LOW_END)]


def test_a_1t_guest_is_created_and_run_with_memory_committed_as_touched():
    before = rss_mb()
    vm = mmud.VM(mem_mb=1 << 20, vcpus=2, seed=5, workload="kernel")
    assert slot_layout(vm) == [(0, 0, LOW_END), (1, HIGH, HIGH + 1022 * GiB)]
    assert vm.step(2000) == 2000
    assert vm.workload.counters["data_errors"] == vm.workload.counters["oops"] == 0
    assert rss_mb() - before < 300


def test_vm_memory_reads_stop_at_the_pci_hole():
    vm = mmud.VM(mem_mb=4 << 10)
    vm.write_u64(LOW_END - 8, 0x1122334455667788)
    assert vmio.memory_read(vm, LOW_END - 8, 64) == (0x1122334455667788).to_bytes(8, "little")
    with pytest.raises(OSError) as hole:
        vmio.memory_read(vm, LOW_END, 8)
    assert hole.value.errno == errno.EIO
    assert vmio.memory_read(vm, HIGH, 8) == bytes(8)
    assert vmio.ram_end(vm) == HIGH + 2 * GiB  # vm<N>/memory's st_size: the end of RAM


def test_a_slot_of_2_31_pages_is_einval_and_one_page_less_is_a_slot():
    vm = mmud.VM(mem_mb=64)
    with pytest.raises(KvmError) as too_big:
        vm.set_memslot(9, 1 << 44, (KVM_MEM_MAX_NR_PAGES + 1) << 12)
    assert too_big.value.errno == errno.EINVAL and 9 not in vm.memslots.slots
    vm.set_memslot(9, 1 << 44, KVM_MEM_MAX_NR_PAGES << 12)
    slot = vm.memslots.slots[9]
    last = slot.gfn_to_pfn(slot.end_gfn - 1)
    assert vm.memslots.backings[last >> BACKING_PFN_SHIFT] is slot.backing
    vm.write_u64((slot.end_gfn << 12) - 8, 7)
    assert vm.read_u64((slot.end_gfn << 12) - 8) == 7


def test_a_large_backing_takes_consecutive_ids_reused_lowest_first():
    vm = mmud.VM(mem_mb=64)  # slot 0: backing id 1
    vm.set_memslot(9, 1 << 40, 12 * GiB)
    big = vm.memslots.slots[9].backing
    assert big.base_pfn == 2 << BACKING_PFN_SHIFT
    assert all(vm.memslots.backings[k] is big for k in (2, 3, 4))
    vm.set_memslot(10, 1 << 41, 4096)
    assert vm.memslots.slots[10].backing.base_pfn == 5 << BACKING_PFN_SHIFT
    vm.set_memslot(9, 0, 0)
    vm.set_memslot(11, 1 << 42, 8 * GiB)  # fits in the ids slot 9 left
    assert vm.memslots.slots[11].backing.base_pfn == 2 << BACKING_PFN_SHIFT


class ListAllocator:
    """The allocator as it was: every free frame in one list, popped from the end."""

    def __init__(self, first_pfn: int, end_pfn: int) -> None:
        self.free = list(range(end_pfn - 1, first_pfn - 1, -1))

    def alloc(self) -> int:
        if not self.free:
            raise OutOfMemory
        return self.free.pop()

    def put(self, pfn: int) -> None:
        self.free.append(pfn)


def test_the_allocator_hands_out_the_frames_of_the_list_it_replaced_in_the_same_order():
    rng = random.Random(42)
    new, old = FrameAllocator([(7, 3000)]), ListAllocator(7, 3000)
    held: list[int] = []
    order = []
    for _ in range(20_000):
        if held and (rng.random() < 0.45 or new.nr_free == 0):
            pfn = held.pop(rng.randrange(len(held)))
            new.put_page(pfn)
            old.put(pfn)
        else:
            pfn = new.alloc()
            assert pfn == old.alloc()
            held.append(pfn)
            order.append(pfn)
        assert new.nr_free == len(old.free)
    assert len(set(order)) < len(order)  # freed frames came back, LIFO


def test_the_allocator_walks_the_ram_ranges_up_and_skips_the_holes():
    frames = FrameAllocator([(5, 8), (8, 8), (100, 102)])
    assert frames.nr_frames == frames.nr_free == 5
    assert [frames.alloc() for _ in range(5)] == [5, 6, 7, 100, 101]
    with pytest.raises(OutOfMemory):
        frames.alloc()
    frames.put_page(6)
    assert frames.nr_free == 1 and frames.alloc() == 6


def test_the_churned_memslot_keeps_clear_of_the_ram_of_a_guest_past_1_tib():
    """memslot_churn moves its slot between places from 1 TiB up; a guest whose RAM reaches
    past 1 TiB gets places past its RAM instead of a slot that overlaps it (EEXIST)."""
    vm = mmud.VM(mem_mb=(1 << 20) + 4096, seed=3, workload="memslot_churn")
    ram_end = vm.ram_ranges[-1][1]
    assert ram_end > 1 << 40
    generation = vm.memslots.generation
    vm.step(3000)
    assert vm.memslots.generation > generation + 8  # the churn task ran its ioctls
    assert all(s.base_gfn << 12 >= ram_end for s in vm.memslots if s.id == 8)


def _ram_digest(vm: mmud.VM) -> str:
    """The recording's `memory` part of a VM's checkpoint digest."""
    slot = SimpleNamespace(vm=vm, state="running", failure=None)
    return str(recording.digest(slot)["memory"])


def test_a_checkpoint_reads_only_the_ram_the_guest_touched():
    """A recording's checkpoint digests guest RAM page by page over the pages the host has
    mapped (mincore), so it leaves the untouched pages of a big guest untouched; pages read
    but all zero count as untouched, and a changed word changes the digest."""
    vm = mmud.VM(mem_mb=4096, seed=1, workload="kernel")
    vm.step(500)
    before = [len(resident_pages(slot.backing.array)) for slot in vm.memslots]
    first = _ram_digest(vm)
    assert [len(resident_pages(slot.backing.array)) for slot in vm.memslots] == before
    assert sum(before) < vm.mem_bytes // 4096 // 10
    high = vm.memslots.slots[1]
    assert int(high.backing.array[1 << 20]) == 0  # a read of an untouched page maps it
    assert _ram_digest(vm) == first
    vm.write_u64((high.base_gfn << 12) + (4 << 20), 1)
    assert _ram_digest(vm) != first

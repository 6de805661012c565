"""Dirty logging in the style of the KVM selftest dirty_log_test, over many interleavings.

vCPUs write the iteration number into random pages of a logged slot while a collector
harvests the dirty log concurrently — both interleaved by the seeded scheduler, including
inside the harvest (its per-word steps) and at the fast page fault's preemption point
between making an spte writable and marking the page dirty. Then the vCPUs stop at a sync
point, a final harvest is made, and every page whose value changed must have been reported
in that iteration, and every reported page must hold a value written in it. The audit
(with its dirty-log check) runs at every sync point.
"""

from __future__ import annotations

import errno
import random
from dataclasses import dataclass, field

import numpy as np
import pytest

import mmud
from mmud.kvm.dirty_log import kvm_clear_dirty_log_protect, kvm_get_dirty_log_protect
from mmud.kvm.memslot import bitmap_pages
from tests.guest_tables import P, U, W, GuestTables

SLOT = 1
SLOT_GPA = 1 << 30
PAGES = 128  # two bitmap words
TEST_VA = 0x0000_0040_0000_0000
ITERATIONS = 3
WRITES_PER_ITERATION = 10
HARVEST_CHANCE = 0.15  # per collector step while the vCPUs run


@dataclass
class Outcome:
    lost: int = 0  # changed in an iteration, not reported in it
    spurious: int = 0  # reported, but not holding a value written in that iteration
    audit: list[str] = field(default_factory=list)
    pf_fast: int = 0


@dataclass
class Run:
    vm: mmud.VM
    manual: bool
    iteration: int = 1
    arrived: int = 0
    reported: set[int] = field(default_factory=set)
    outcome: Outcome = field(default_factory=Outcome)


def _pages(bitmap: bytes) -> set[int]:
    bits = np.unpackbits(np.frombuffer(bitmap, dtype=np.uint8), bitorder="little")
    return {int(p) for p in np.flatnonzero(bits) if p < PAGES}


def _harvest(run: Run, cooperative: bool):
    """One collection: GET_DIRTY_LOG, or GET then CLEAR of what it reported (manual)."""
    step = 1 if cooperative else 0
    bitmap = yield from kvm_get_dirty_log_protect(run.vm, SLOT, step)
    if run.manual:
        yield from kvm_clear_dirty_log_protect(run.vm, SLOT, 0, PAGES, bitmap, step)
    run.reported |= _pages(bitmap)


def _values(vm: mmud.VM) -> np.ndarray:
    return np.array([vm.read_u64(SLOT_GPA + p * 4096) for p in range(PAGES)], dtype=np.uint64)


def writer(run: Run, vcpu: mmud.Vcpu, rng: random.Random, nvcpus: int):
    for i in range(1, ITERATIONS + 1):
        for _ in range(WRITES_PER_ITERATION):
            vcpu.write_u64(TEST_VA + rng.randrange(PAGES) * 4096, i, user=True)
            yield
        run.arrived += 1
        while run.iteration == i:  # the sync point
            yield


def collector(run: Run, rng: random.Random, nvcpus: int):
    vm = run.vm
    yield from _harvest(run, cooperative=False)  # start clean (INITIALLY_SET reports all)
    before = _values(vm)
    for i in range(1, ITERATIONS + 1):
        run.reported = set()
        while run.arrived < nvcpus:
            if rng.random() < HARVEST_CHANCE:
                yield from _harvest(run, cooperative=True)
            yield
        yield from _harvest(run, cooperative=False)  # the vCPUs are stopped
        now = _values(vm)
        changed = set(np.flatnonzero(now != before).tolist())
        run.outcome.lost += len(changed - run.reported)
        run.outcome.spurious += sum(1 for p in run.reported if now[p] != i)
        run.outcome.audit += vm.audit()
        before = now
        run.arrived = 0
        run.iteration += 1


def dirty_log_run(seed: int, *, manual: bool = False, initially_set: bool = False,
                  vcpus: int = 3, bug: str | None = None) -> Outcome:
    vm = mmud.VM(mem_mb=4, vcpus=vcpus, seed=seed)
    if manual:
        vm.enable_manual_dirty_log_protect(initially_set=initially_set)
    vm.set_memslot(SLOT, SLOT_GPA, PAGES * 4096, log_dirty=True)
    gt = GuestTables(vm)
    for p in range(PAGES):
        gt.map(TEST_VA + p * 4096, SLOT_GPA + p * 4096, flags=P | W | U)
    for v in vm.vcpus:
        v.cr3 = gt.pml4
    if bug:
        vm.inject(bug)
    run = Run(vm, manual)
    rng = random.Random(f"dirty_log/{seed}")
    for v in vm.vcpus:
        vm.scheduler.add(f"vcpu{v.index}", writer(run, v, random.Random(rng.random()), vcpus))
    vm.scheduler.add("collector", collector(run, random.Random(rng.random()), vcpus))
    while vm.step(10_000):
        pass
    run.outcome.pf_fast = vm.stats["pf_fast"]
    return run.outcome


MODES = {"get": {}, "manual": {"manual": True}, "initially_set": {"manual": True, "initially_set": True}}
CLEAN_SEEDS = {"get": 500, "manual": 300, "initially_set": 200}
BUG_SEEDS = 80


@pytest.mark.parametrize("mode", list(MODES))
def test_no_dirty_page_is_lost(mode):
    fast = 0
    for seed in range(CLEAN_SEEDS[mode]):
        out = dirty_log_run(seed, vcpus=2 + seed % 3, **MODES[mode])
        assert (out.lost, out.spurious, out.audit) == (0, 0, []), (mode, seed, out)
        fast += out.pf_fast
    assert fast > 0  # the fast path and its preemption point were exercised


@pytest.mark.parametrize("mode", ["get", "manual"])
@pytest.mark.parametrize("bug", ["dirty_wp_before_snapshot", "dirty_wp_skipped"])
def test_each_ordering_bug_loses_pages(bug, mode):
    outcomes = [dirty_log_run(seed, bug=bug, **MODES[mode]) for seed in range(BUG_SEEDS)]
    losing = [o for o in outcomes if o.lost]
    assert losing, f"{bug} ({mode}): no lost page in {BUG_SEEDS} seeds"
    assert all(o.audit for o in losing)  # the audit's dirty-log check saw it too


def test_manual_protect_through_the_vm_api():
    """vm.enable_manual_dirty_log_protect() + vm.get_dirty_log() + vm.clear_dirty_log():
    GET copies the bitmap and protects nothing; CLEAR clears the bits and write-protects
    their pages, so the next write is logged again; a misaligned first page is EINVAL."""
    vm = mmud.VM(mem_mb=4)
    vm.enable_manual_dirty_log_protect()
    vm.set_memslot(SLOT, SLOT_GPA, PAGES * 4096, log_dirty=True)
    gt = GuestTables(vm)
    gt.map(TEST_VA, SLOT_GPA, flags=P | W | U)
    vcpu = vm.vcpus[0]
    vcpu.cr3 = gt.pml4
    vcpu.write_u64(TEST_VA, 1)
    first = vm.get_dirty_log(SLOT)
    assert _pages(first) == {0} and vm.get_dirty_log(SLOT) == first  # GET does not clear
    exits = vm.stats["exits"]
    vcpu.write_u64(TEST_VA, 2)
    assert vm.stats["exits"] == exits  # still writable: GET protected nothing
    vm.clear_dirty_log(SLOT, 0, first)
    assert _pages(vm.get_dirty_log(SLOT)) == set()
    vcpu.write_u64(TEST_VA, 3)
    assert vm.stats["exits"] > exits and _pages(vm.get_dirty_log(SLOT)) == {0}  # protected, logged
    with pytest.raises(mmud.KvmError) as e:
        vm.clear_dirty_log(SLOT, 1, first)
    assert e.value.errno == errno.EINVAL


@pytest.mark.parametrize(("slot_id", "err"), [(-1, errno.EINVAL), (509, errno.EINVAL), (7, errno.ENOENT),
                                              (0, errno.ENOENT)])
def test_dirty_log_ioctl_errnos(slot_id, err):
    """kvm_get_dirty_log_protect/kvm_clear_dirty_log_protect (v5.16): an id out of range is
    EINVAL; an id in range without a slot, or a slot that does not log, is ENOENT."""
    vm = mmud.VM(mem_mb=4)
    vm.enable_manual_dirty_log_protect()
    for call in (lambda: vm.get_dirty_log(slot_id), lambda: vm.clear_dirty_log(slot_id, 0, bytes(8), 64)):
        with pytest.raises(mmud.KvmError) as e:
            call()
        assert e.value.errno == err


@pytest.mark.parametrize("density", [0.001, 0.3, 0.9])
def test_bitmap_pages_lists_every_set_bit_of_sparse_and_dense_bitmaps(density):
    """bitmap_pages unpacks only the non-zero words of a mostly clean bitmap and every word
    of a mostly dirty one; both give each set bit's page, ascending."""
    rng = np.random.default_rng(7)
    words = np.where(rng.random(4096) < density, rng.integers(1, 2**63, 4096, dtype=np.uint64),
                     np.uint64(0)).astype(np.uint64)
    expected = [64 * (100 + w) + b for w in range(len(words)) for b in range(64)
                if int(words[w]) >> b & 1]
    assert bitmap_pages(100, words).tolist() == expected


def test_log_dirty_pages_changes_only_the_flag_of_a_slot_where_it_is():
    """The VMM's switch for dirty logging: a flags-only KVM_SET_USER_MEMORY_REGION of the slot
    as it stands, here the high slot of a guest past the PCI hole; no slot is EINVAL."""
    vm = mmud.VM(mem_mb=4096, workload=None)
    high = vm.memslots.slots[1]
    where, generation = (high.base_gfn, high.npages), vm.memslots.generation
    vm.log_dirty_pages(1)
    assert high.log_dirty and high.dirty_bitmap is not None
    assert (high.base_gfn, high.npages) == where and vm.memslots.generation > generation
    vm.log_dirty_pages(1, on=False)
    assert not vm.memslots.slots[1].log_dirty
    with pytest.raises(mmud.KvmError) as e:
        vm.log_dirty_pages(7)
    assert e.value.errno == errno.EINVAL


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith(field)).split()[1])


def test_a_harvest_takes_no_memory_in_proportion_to_the_slot():
    """KVM_GET_DIRTY_LOG write-protects the dirty pages through their own rmap heads
    (kvm_mmu_write_protect_pt_masked), with no temporary of a byte per page of the slot
    (16 MiB for the 62 GiB slot here, 255 MiB for a 1 TiB guest's): the process's peak
    resident set, reset just before (/proc/self/clear_refs), hardly grows in a harvest of
    64 dirty pages."""
    vm = mmud.VM(mem_mb=64 << 10, seed=1, workload="stream")
    high = vm.memslots.slots[1]
    vm.log_dirty_pages(high.id)
    vm.step(1000)
    vm.get_dirty_log(high.id)
    high.dirty_bitmap[1 << 10] = np.uint64(2**64 - 1)  # 64 pages, 256 MiB into the slot
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # VmHWM := VmRSS
    rss = _status_kib("VmRSS:")
    bitmap = np.frombuffer(vm.get_dirty_log(high.id), dtype="<u8")
    assert int(bitmap[1 << 10]) == 2**64 - 1
    assert (_status_kib("VmHWM:") - rss) * 1024 < high.npages // 4

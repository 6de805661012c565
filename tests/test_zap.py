"""Zapping every shadow page: the fast zap by generation, the slow walk of v5.1+ and the legacy
walk of before 2013, and when each breaks kvm->mmu_lock (docs/memslots-mmio.md)."""

from __future__ import annotations

import errno

import numpy as np
import pytest

import mmud
import mmud.kvm.mmu.observer
from mmud.campaign.reference import idx
from mmud.campaign.zap_guest import Guest
from mmud.kvm.devices import IORAM_BASE
from mmud.kvm.kvm_main import KvmError
from mmud.kvm.mmu import spte as S
from mmud.kvm.mmu import zap
from mmud.kvm.mmu.page import PARENT_ROWS, ShadowPagePool
from mmud.kvm.mmu.page import hash_64 as hash_64
from mmud.kvm.rmap import Rmap
from mmud.kvm.mmu.zap import BATCH_ZAP_PAGES, ZAP_AT_ONCE_ENTRIES, ZAP_KINDS
from tests.guest_tables import DIRECT_MB, DIRECT_VA, P, U, W, check_access, new_vm

BASE = 0x0000_0010_0000_0000
PAGES = 2048  # four leaf tables' worth of mappings, plus the direct map


def faulted_vm(vcpus=1):
    vm, gt, vcpu = new_vm(vcpus=vcpus)
    for i in range(0, PAGES, 64):
        gt.map(BASE + i * 4096)
    for v in vm.vcpus[1:]:
        v.cr3 = gt.pml4
    for v in vm.vcpus:
        for i in range(0, PAGES, 64):
            v.write_u64(BASE + i * 4096, i, user=True)
    return vm, gt, vcpu


def no_obsolete_pages(vm):
    mmu = vm.mmu
    return all(not mmu.is_obsolete_sp(sp) for sp in mmu.active_mmu_pages)


def spread_vm(tables=40, vcpus=1):
    """A VM whose vCPUs map one page in each of `tables` 2 MiB regions: a leaf shadow page
    each, so that a zap has several batches to do."""
    vm, gt, vcpu = new_vm(vcpus=vcpus)
    vas = [BASE + (i << 21) for i in range(tables)]
    for va in vas:
        gt.map(va)
    for v in vm.vcpus:
        v.cr3 = gt.pml4
        for va in vas:
            v.write_u64(va, va, user=True)
    return vm, gt, vcpu, vas


def idle():
    """A task beside the zap that never takes mmu_lock."""
    while True:
        yield


def contend(vcpu, va, steps):
    """A vCPU that takes mmu_lock at every step (INVLPG) and reads its page back."""
    while True:
        vcpu.invlpg(va)
        assert vcpu.read_u64(va, user=True) == va
        steps.append(vcpu.vm.zap_in_progress)
        yield


def drive(vm, limit=100_000, audit=False):
    """Step a VM until its zap has ended; with `audit`, a full audit after every step."""
    steps = 0
    while vm.zap_in_progress:
        assert steps < limit, "the zap does not end"
        steps += vm.step(1)
        assert not audit or vm.audit() == []
    return steps


@pytest.mark.parametrize("kind", ZAP_KINDS)
def test_translations_are_rebuilt_after_zap_all(kind):
    vm, gt, vcpu = faulted_vm()
    used = vm.mmu.n_used_mmu_pages
    run = vm.zap_all(kind)
    assert run.done and run.pages >= used - 1  # all but the pinned root
    for i in range(0, PAGES, 64):
        check_access(vm, vcpu, BASE + i * 4096, user=True)
        assert vcpu.read_u64(BASE + i * 4096, user=True) == i
    assert no_obsolete_pages(vm)
    assert vm.mmu.n_used_mmu_pages == len(vm.mmu.active_mmu_pages)
    assert vm.audit() == []


@pytest.mark.parametrize("kind", ["fast", "slow"])
def test_with_nobody_waiting_a_zap_runs_to_its_end_without_a_lock_break(kind):
    vm, gt, vcpu, vas = spread_vm()
    vm.scheduler.add("idle", idle())
    run = vm.zap_all(kind)
    assert vm.zap_in_progress  # a task beside the other one
    drive(vm)
    assert run.pages > 3 * BATCH_ZAP_PAGES
    assert run.breaks == 0 and run.batches == [run.pages] and run.max_stall_ns == 0


def test_need_resched_breaks_a_long_zap_only_when_another_task_could_run(monkeypatch):
    monkeypatch.setattr(zap, "NEED_RESCHED_STEPS", 15)
    vm, gt, vcpu, vas = spread_vm()
    run = vm.zap_all("fast")  # nothing else to run: straight to the end
    assert run.done and run.breaks == 0
    for va in vas:
        vcpu.read_u64(va, user=True)
    vm.scheduler.add("idle", idle())
    run = vm.zap_all("fast")
    drive(vm)
    assert run.breaks >= 2 and run.handoffs == 0  # the tick's breaks: nobody took the lock
    assert all(b >= BATCH_ZAP_PAGES for b in run.batches[:-1])


def test_fast_zap_lets_a_waiting_vcpu_in_once_ten_pages_are_zapped():
    vm, gt, vcpu, vas = spread_vm()
    run = vm.kvm_mmu_zap_all_fast()
    task = run.task(lambda: False)
    next(task)  # the lock taken, the oldest page next
    assert vm.mmu.mmu_lock_held and run.lock_held
    vcpu.lock_mmu()  # queues on the lock: the zap breaks at its next check after ten pages
    assert not vm.mmu.mmu_lock_held and run.breaks == 1 and run.handoffs == 1
    assert run.batches == [BATCH_ZAP_PAGES] and run.pages == BATCH_ZAP_PAGES
    assert 0 < run.max_stall_ns <= run.hold_ns
    next(task)  # takes the lock back and restarts from the tail
    assert run.lock_held and run.restarts == 1
    for _ in task:
        pass
    assert run.done and not vm.mmu.mmu_lock_held and run.breaks == 1
    assert all(sp.invalid and sp.root_count for sp in vm.mmu.active_mmu_pages)


def test_a_dirty_log_harvest_waits_for_the_fast_zaps_next_break():
    vm, gt, vcpu, vas = spread_vm()
    vm.set_memslot(0, 0, vm.mem_bytes, log_dirty=True)
    run = vm.kvm_mmu_zap_all_fast()
    task = run.task(lambda: False)
    next(task)
    steps = vm.steps
    vm.get_dirty_log(0)  # KVM_GET_DIRTY_LOG queues on mmu_lock like a vCPU
    assert run.breaks == 1 and run.handoffs == 1 and run.batches == [BATCH_ZAP_PAGES]
    assert vm.steps == steps  # the zap's CPU went on; no scheduler step ran meanwhile
    for _ in task:
        pass
    assert run.done and not vm.mmu.mmu_lock_held


def test_fast_zap_breaks_for_contending_vcpus_who_run_in_the_breaks():
    vm, gt, vcpu, vas = spread_vm(vcpus=3)
    steps: dict[int, list[bool]] = {1: [], 2: []}
    for k in steps:
        vm.scheduler.add(f"vcpu{k}", contend(vm.vcpus[k], vas[k], steps[k]))
    run = vm.zap_all("fast")
    drive(vm)
    assert run.breaks >= 2 and run.handoffs >= run.breaks  # every break let a vCPU in
    assert all(b >= BATCH_ZAP_PAGES for b in run.batches[:-1])
    assert all(sum(during) > run.breaks for during in steps.values())  # they ran meanwhile
    assert 0 < run.max_stall_ns < run.hold_ns
    assert vm.audit() == []


def test_slow_zap_breaks_after_each_page_when_contended_and_restarts_from_the_head():
    vm, gt, vcpu, vas = spread_vm()
    vm.last_zap = run = zap.kvm_mmu_zap_all(vm.mmu)  # what vm.zap_all("slow") starts
    task = run.task(lambda: False)
    next(task)  # the lock taken, the newest page next
    for n in range(1, 4):
        vcpu.lock_mmu()  # a waiter: the zap breaks after the page it is zapping
        assert not run.lock_held and run.breaks == n and run.batches == [1] * n
        next(task)
        assert run.lock_held and run.restarts == n
    vcpu.lock_mmu()
    new_va = BASE + (len(vas) << 21)  # in the break the vCPU builds a page: at the head
    gt.map(new_va)
    vcpu.write_u64(new_va, 1, user=True)
    newest = next(reversed(vm.mmu.active_mmu_pages))
    assert not newest.invalid
    next(task)  # the restarted walk starts with it
    vcpu.lock_mmu()
    assert newest.invalid and newest not in vm.mmu.active_mmu_pages
    for _ in task:
        pass
    assert run.done and run.breaks == 5 and run.handoffs == 5


def test_slow_zap_breaks_for_contending_vcpus_in_a_running_vm():
    vm, gt, vcpu, vas = spread_vm(vcpus=2)
    steps: list[bool] = []
    vm.scheduler.add("vcpu1", contend(vm.vcpus[1], vas[1], steps))
    run = vm.zap_all("slow")
    drive(vm)
    assert run.breaks >= 2 and run.restarts >= run.breaks and sum(steps) > run.breaks
    assert 1 in run.batches[:-1]  # let in after a single page
    assert 0 < run.max_stall_ns < run.hold_ns
    assert vm.audit() == []


def test_legacy_zap_never_breaks_the_lock():
    vm, gt, vcpu, vas = spread_vm()
    vm.last_zap = run = zap.kvm_mmu_zap_all_legacy(vm.mmu)  # vm.zap_all("legacy")
    task = run.task(lambda: True)  # others to run, and a waiter: still no break
    next(task)
    vcpu.lock_mmu()  # waits for the whole walk
    assert run.done and not vm.mmu.mmu_lock_held
    assert run.breaks == 0 and run.batches == [run.pages] and run.pages > 3 * BATCH_ZAP_PAGES
    assert run.max_stall_ns > 0.8 * run.hold_ns  # the waiter came after its first page
    assert run.restarts >= run.pages  # ≤v3.10: `goto restart` after every page freed


def test_legacy_zap_stalls_contending_vcpus_for_its_whole_length():
    vm, gt, vcpu, vas = spread_vm(vcpus=2)
    steps: list[bool] = []
    vm.scheduler.add("vcpu1", contend(vm.vcpus[1], vas[1], steps))
    run = vm.zap_all("legacy")
    drive(vm)
    assert run.breaks == 0 and run.handoffs == 0 and len(run.batches) == 1
    assert run.max_stall_ns > 0.8 * run.hold_ns
    vm.step(20)
    assert vm.audit() == []


@pytest.mark.parametrize("kind", ZAP_KINDS)
def test_every_zap_leaves_no_valid_shadow_page(kind):
    vm, gt, vcpu, vas = spread_vm(vcpus=2)
    run = vm.zap_all(kind)
    assert run.done and not vm.mmu.mmu_lock_held
    assert vm.mmu.active_mmu_pages and all(  # only the roots the vCPUs still hold
        sp.invalid and sp.root_count for sp in vm.mmu.active_mmu_pages)
    assert vm.mmu.n_used_mmu_pages == len(vm.mmu.active_mmu_pages)


def zap_stats(kind, pinned):
    vm, gt, vcpu, vas = spread_vm(vcpus=2)
    if pinned:  # vCPU 1 changes paging mode: a root newer than most pages, pinned
        other = vm.vcpus[1]
        other.cr0 ^= 1 << 16
        assert other.read_u64(vas[0], user=True) == vas[0]
    else:
        for v in vm.vcpus:
            v.kvm_mmu_reset_context()  # drops the roots
    before = vm.stats
    vm.zap_all(kind)
    return {name: value - before[name] for name, value in vm.stats.items()}


def test_the_three_zaps_count_alike_without_pinned_roots():
    fast = zap_stats("fast", False)
    assert fast["mmu_shadow_zapped"] > 3 * BATCH_ZAP_PAGES
    assert zap_stats("slow", False) == fast
    assert zap_stats("legacy", False) == fast


def test_legacy_counts_a_pinned_root_again_at_each_restart():
    fast, slow, legacy = (zap_stats(kind, True) for kind in ZAP_KINDS)
    assert slow == fast
    assert legacy["mmu_shadow_zapped"] > fast["mmu_shadow_zapped"]  # as ≤v3.10 counted
    assert {**legacy, "mmu_shadow_zapped": 0} == {**fast, "mmu_shadow_zapped": 0}


def test_the_control_file_takes_the_kinds_the_vm_knows():
    from mmud.fs.memslots import ZAP_KINDS as FILE_WORDS

    assert FILE_WORDS == ZAP_KINDS == ("fast", "slow", "legacy")


def test_zap_all_takes_a_kind():
    vm, gt, vcpu = new_vm()
    assert vm.zap_all().kind == "fast" and vm.zap_all("fast").kind == "fast"
    assert vm.zap_all("slow").kind == "slow" and vm.zap_all("legacy").kind == "legacy"
    with pytest.raises(KvmError) as refused:
        vm.zap_all("all")
    assert refused.value.errno == errno.EINVAL


def test_pinned_roots_go_when_released():
    vm, gt, vcpu = faulted_vm(vcpus=2)
    roots = [v.mmu.root for v in vm.vcpus]
    vm.zap_all("fast")
    assert all(r.invalid and r.root_count for r in roots)  # still pinned, skipped
    for v in vm.vcpus:
        assert v.read_u64(BASE, user=True) == 0
    assert all(r not in vm.mmu.active_mmu_pages for r in roots)
    assert no_obsolete_pages(vm)
    assert vm.audit() == []


@pytest.mark.parametrize("kind", ["fast", "slow"])
def test_vcpus_run_in_the_lock_breaks_of_a_running_vm(kind):
    vm = mmud.VM(mem_mb=64, vcpus=2, seed=5, workload="kernel")
    vm.step(4000)
    run = vm.zap_all(kind)
    assert vm.zap_in_progress
    # The audit between the steps also sees the obsolete pages a fast zap has not freed yet:
    # their sptes may no longer match the guest's tables, and no check may count that.
    steps = drive(vm, audit=True)
    assert run.breaks > 1 and run.handoffs > 1 and steps > run.breaks
    assert vm.audit() == []
    vm.step(500)
    assert no_obsolete_pages(vm)
    assert vm.workload is not None
    assert vm.workload.counters["data_errors"] == 0, vm.workload.errors
    assert vm.audit() == []


def test_a_second_zap_finishes_the_first():
    vm = mmud.VM(mem_mb=64, vcpus=1, seed=5, workload="kernel")
    vm.step(3000)
    first = vm.zap_all("fast")
    assert not first.done
    vm.zap_all("fast")
    assert first.done
    vm.set_memslot(1, 0x1000_0000, 0x10000)
    assert not vm.zap_in_progress
    vm.step(500)
    assert vm.audit() == []


def test_direct_zap_of_an_idle_vm_completes_at_once():
    vm, gt, vcpu = new_vm()
    gt.map(BASE, flags=P | W | U)
    vcpu.write_u64(BASE, 1, user=True)
    vm.zap_all("fast")
    assert not vm.zap_in_progress


class _Listener(mmud.kvm.mmu.observer.MmuObserver):
    """An observer that hears nothing it acts on: attached, it makes the zap drop each spte
    one at a time (the per-entry path), as any observer does."""


def _aliased_vm() -> mmud.VM:
    """Leaf pages with every kind of entry: sptes whose gfn has one mapping, gfns mapped
    twice in one page (rmap chains), a page mapped from two leaf tables, and MMIO sptes."""
    vm, gt, vcpu = new_vm()
    shared = gt.alloc_data()
    for i in range(0, PAGES, 8):
        pa = shared if i % 64 == 0 else None
        gt.map(BASE + i * 4096, pa)
    gt.map(BASE + (PAGES + 1) * 4096, IORAM_BASE)  # an MMIO spte once accessed
    for i in range(0, PAGES, 8):
        vcpu.write_u64(BASE + i * 4096, i, user=True)
    vcpu.read_u64(BASE + (PAGES + 1) * 4096, user=True)
    return vm


def _rmap_state(vm: mmud.VM) -> list[tuple[int, list[int], dict[int, list[int]]]]:
    return [(slot.id, slot.rmap.head.tolist(), {k: list(v) for k, v in slot.rmap.desc.items()})
            for slot in vm.memslots]


@pytest.mark.parametrize("kind", ZAP_KINDS)
def test_a_leaf_page_zapped_at_once_leaves_what_the_per_entry_zap_leaves(kind):
    """Zapping a last-level page with nobody observing clears its sptes together
    (zap._drop_leaf_sptes); with an observer each goes through drop_spte(). Both leave the
    same rmaps, statistics and pool."""
    plain, observed = _aliased_vm(), _aliased_vm()
    assert plain.stats["pages_4k"] == PAGES // 8 and any(s.rmap.desc for s in plain.memslots)
    observed.mmu.attach(_Listener())
    for vm in (plain, observed):
        vm.zap_all(kind).finish()
    assert _rmap_state(plain) == _rmap_state(observed)
    assert all(not s.rmap.mapped().any() for s in plain.memslots)
    assert plain.stats == observed.stats and plain.stats["pages_4k"] == 0
    assert plain.mmu.pool.free_rows() == observed.mmu.pool.free_rows()


def _page_state(vm: mmud.VM) -> list[tuple[int, list[int], list[int], bool]]:
    return [(sp.index, sp.sptes.tolist(), sorted(sp.parent_ptes), sp.invalid)
            for sp in vm.mmu.pool.pages]


def test_an_upper_level_page_zapped_at_once_leaves_what_the_per_entry_zap_leaves():
    """Zapping a directory with nobody observing unlinks its children together
    (zap._unlink_child_pages); with an observer each goes through drop_parent_pte(). Both
    leave every page, parent pte list and rmap alike."""
    plain, observed = _aliased_vm(), _aliased_vm()
    observed.mmu.attach(_Listener())
    for vm in (plain, observed):
        sp = next(sp for sp in vm.mmu.active_mmu_pages if sp.level == 2)
        children = [vm.mmu.child_of(s) for s in sp.spt.tolist() if s]
        assert len(children) >= 4 and all(c.parent_ptes for c in children)
        invalid_list: list = []
        zap.prepare_zap_page(vm.mmu, sp, invalid_list)
        zap.commit_zap_page(vm.mmu, invalid_list)
        assert not any(c.parent_ptes for c in children)
    assert _page_state(plain) == _page_state(observed)
    assert _rmap_state(plain) == _rmap_state(observed) and plain.stats == observed.stats


def test_a_direct_leaf_page_zapped_at_once_leaves_what_the_per_entry_zap_leaves():
    """A direct last-level page maps consecutive gfns: zapped with nobody observing, its
    rmap heads are compared and cleared as one slice (Rmap.remove_run), chains one by one.
    Pages with holes, and gfns also mapped from a guest leaf table (chains), leave what
    drop_spte() entry by entry leaves."""
    plain, observed = _aliased_vm(), _aliased_vm()
    observed.mmu.attach(_Listener())
    for vm in (plain, observed):
        vcpu = vm.vcpus[0]
        for gpa in range(0, DIRECT_MB << 20, 4096):
            if (gpa >> 12) % 7:  # holes in every direct page
                vcpu.read_u64(DIRECT_VA + gpa)
    direct = [sp for sp in plain.mmu.active_mmu_pages if sp.direct and sp.level == 1]
    present = [int(((sp.sptes & S.SPTE_MMU_PRESENT) != 0).sum()) for sp in direct]
    assert len(direct) == DIRECT_MB // 2 and all(ZAP_AT_ONCE_ENTRIES <= n < 512 for n in present)
    assert any(len(s.rmap.desc) > 10 for s in plain.memslots)  # data pages mapped twice
    for vm in (plain, observed):
        vm.zap_all("fast").finish()
    assert _rmap_state(plain) == _rmap_state(observed) and _page_state(plain) == _page_state(observed)
    assert all(not s.rmap.mapped().any() for s in plain.memslots)
    assert plain.stats == observed.stats and plain.stats["pages_4k"] == 0


def test_a_directory_of_many_children_zapped_at_once_leaves_what_the_per_entry_zap_leaves():
    """A directory with ZAP_AT_ONCE_ENTRIES children or more, nobody observing, unlinks them
    together in the pool's parent rmap; one child is linked from two of its entries (a
    guest leaf table under two directory entries), a chain of two parent ptes. Every page,
    parent pte list and rmap ends as drop_parent_pte() entry by entry leaves them."""
    states = []
    for observe in (False, True):
        vm, gt, vcpu, vas = spread_vm(tables=2 * ZAP_AT_ONCE_ENTRIES)
        if observe:
            vm.mmu.attach(_Listener())
        alias = BASE + (len(vas) << 21)
        vm.write_u64(gt.table_for(BASE, 2) + 8 * idx(alias, 2), gt.table_for(BASE, 1) | P | W | U)
        assert vcpu.read_u64(alias, user=True) == BASE
        sp = next(sp for sp in vm.mmu.active_mmu_pages if sp.level == 2)
        twice = vm.mmu.child_of(sp.spt[idx(BASE, 2)])
        assert len(twice.parent_ptes) == 2 and int(sp.sptes.astype(bool).sum()) == len(vas) + 1
        invalid_list: list = []
        zap.prepare_zap_page(vm.mmu, sp, invalid_list)
        zap.commit_zap_page(vm.mmu, invalid_list)
        assert not twice.parent_ptes and not sp.sptes.any()
        states.append((_page_state(vm), _rmap_state(vm), vm.stats))
    assert states[0] == states[1]


def test_parent_ptes_keep_a_lists_order_and_contents_as_the_pool_grows():
    """sp->parent_ptes is a head of the pool's parent rmap: appends, removals and membership
    answer as a list of spteps would, a page allocated anew starts with none, and the heads
    outlive the array's growth past PARENT_ROWS rows."""
    pool = ShadowPagePool()
    pages = [pool.alloc() for _ in range(PARENT_ROWS // 2)]
    model: dict[int, list[int]] = {}
    for n, sp in enumerate(pages):
        for sptep in range(n % 4):
            sp.parent_ptes.append(sptep << 9 | n % 512)
            model.setdefault(sp.index, []).append(sptep << 9 | n % 512)
    pages += [pool.alloc() for _ in range(PARENT_ROWS)]
    pages[-1].parent_ptes.append(7)
    model[pages[-1].index] = [7]
    for sp in pages[::3]:
        chain = model.get(sp.index, [])
        if chain:
            sp.parent_ptes.remove(chain[0])
            del chain[0]
        with pytest.raises(ValueError):
            sp.parent_ptes.remove(1 << 40)
    for sp in pages:
        chain = model.get(sp.index, [])
        assert list(sp.parent_ptes) == chain and len(sp.parent_ptes) == len(chain)
        assert all(sptep in sp.parent_ptes for sptep in chain) and (1 << 40) not in sp.parent_ptes
    sp = next(sp for sp in pages if len(sp.parent_ptes) >= 2)
    sp.init(0x1234, 1, 0)
    assert list(sp.parent_ptes) == [] and pool.parent_ptes.get(sp.index) == ()


def test_a_committed_page_leaves_the_hash_when_its_row_is_used_again():
    """A commit hands its pages to the pool at once; each stays in its hash bucket, invalid,
    until its row is allocated again. Lookups never return it, and reuse takes it out of
    its old bucket, so every bucket holds each page once and only as it is now."""
    vm, gt, vcpu = faulted_vm()
    mmu = vm.mmu
    old = {sp: sp.gfn for sp in mmu.active_mmu_pages if not sp.root_count}
    vm.zap_all("fast").finish()
    freed = [sp for sp in old if sp not in mmu.active_mmu_pages]
    assert freed and all(sp.invalid and sp.hashed for sp in freed)
    assert not any(mmu.valid_sps_of_gfn(gfn) for gfn in old.values())
    for i in range(0, PAGES, 64):  # the guest builds its shadow tables again
        assert vcpu.read_u64(BASE + i * 4096, user=True) == i
    reused = [sp for sp in freed if sp in mmu.active_mmu_pages]
    assert reused
    buckets = [sp for bucket in mmu.page_hash.values() for sp in bucket]
    assert len(buckets) == len(set(buckets))
    for bucket_id, bucket in mmu.page_hash.items():
        for sp in bucket:
            assert hash_64(sp.gfn) == bucket_id
    assert all(sp in buckets for sp in mmu.active_mmu_pages)
    assert all(sp.invalid for sp in buckets if sp not in mmu.active_mmu_pages)


class _CommitListener(mmud.kvm.mmu.observer.MmuObserver):
    """Hears the pages of each commit."""

    def __init__(self) -> None:
        self.commits: list[list[int]] = []

    def kvm_mmu_commit_zap_page(self, sps):
        self.commits.append([sp.index for sp in sps])


def _freed_lists(vm: mmud.VM, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The length of each list the VM's commits will hand to the pool (KvmMmu.free_pages)."""
    lists: list[int] = []
    free_pages = vm.mmu.free_pages

    def counted(sps: list) -> None:
        lists.append(len(sps))
        free_pages(sps)

    monkeypatch.setattr(vm.mmu, "free_pages", counted)
    return lists


@pytest.mark.parametrize("kind", ZAP_KINDS)
@pytest.mark.parametrize("observe", [False, True])
def test_a_zap_of_more_pages_than_an_invalid_list_holds_commits_them_as_one_list(kind, observe, monkeypatch):
    """A zap of every page starts a new invalid list every INVALID_LIST_CHUNK pages, so that
    no list of all a large guest's pages is ever moved whole. Its commit still flushes once
    and frees every page in order, as one list would: the pool hands the rows out in the
    same order, and an observer hears one commit of every page."""
    outcomes = []
    for chunk in (4, 1 << 20):
        monkeypatch.setattr(zap, "INVALID_LIST_CHUNK", chunk)
        vm, gt, vcpu, vas = spread_vm()
        listener = _CommitListener()
        if observe:
            vm.mmu.attach(listener)
        lists = _freed_lists(vm, monkeypatch)
        before = vm.stats
        vm.zap_all(kind).finish()
        assert sum(lists) > 3 * 4 and (len(lists) > 3 if chunk == 4 else len(lists) == 1)
        stats = {name: value - before[name] for name, value in vm.stats.items()}
        assert stats["remote_tlb_flush_requests"] == 1
        outcomes.append((vm.mmu.pool.free_rows(), stats, listener.commits))
    assert outcomes[0] == outcomes[1]
    assert len(outcomes[0][2]) == (1 if observe else 0)


def test_a_commit_hands_its_list_to_the_pool_without_copying_it():
    """kvm_mmu_commit_zap_page() frees the pages of the caller's list by handing the list
    itself to the pool, so that a commit of any length costs the same (copying and clearing
    a 64 GiB guest's 32,800 pages took over a millisecond under the lock). The pool hands
    the pages out from the list's end: the last page freed is the first allocated."""
    vm, gt, vcpu = faulted_vm()
    mmu = vm.mmu
    invalid_list: list = []
    for sp in [sp for sp in mmu.active_mmu_pages if sp.level == 1][:3]:
        zap.prepare_zap_page(mmu, sp, invalid_list)
    pages = list(invalid_list)
    assert len(pages) == 3
    zap.commit_zap_page(mmu, invalid_list)
    assert invalid_list == pages  # the pool's list now
    assert mmu.pool.free_rows()[-3:] == [sp.index for sp in pages]
    assert mmu.pool.alloc() is pages[-1] and invalid_list == pages[:-1]


def _direct_map_guest(observed: bool, twice: bool) -> mmud.VM:
    """The zap bench's guest: a directory of consecutive children (one direct leaf page per
    2 MiB of RAM, each full and each gfn mapped once). `twice`: one of those children also
    hangs from a second directory (a chain of two parent ptes)."""
    guest = Guest(64)
    vm = guest.vm
    if observed:
        vm.mmu.attach(_Listener())
    guest.fault_all()
    if twice:
        pdpt = 0x2000
        vm.write_u64(pdpt + 8 * 8, 0x9000 | P | W)  # the pmd of 8 GiB up: one entry
        vm.write_u64(0x9000, (5 << 21) | P | W | 0x80)  # the 2 MiB page at 10 MiB again
        guest.vcpu.read_u64(DIRECT_VA + (8 << 30))
    return vm


def _consecutive_directory(vm: mmud.VM):
    return next(sp for sp in vm.mmu.active_mmu_pages if sp.level == 2 and not sp.direct
                and np.count_nonzero(sp.sptes) > ZAP_AT_ONCE_ENTRIES)


@pytest.mark.parametrize("twice", [False, True])
def test_a_directory_of_consecutive_children_zapped_at_once_leaves_what_the_per_entry_zap_leaves(twice):
    """A direct map's directory, whose children are consecutive pool rows, unlinks them as
    one slice of parent rmap heads (zap._unlink_child_pages, Rmap.remove_run): every page,
    parent pte list and rmap ends as drop_parent_pte() entry by entry leaves them, with a
    child of two parents (`twice`) too."""
    plain, observed = _direct_map_guest(False, twice), _direct_map_guest(True, twice)
    directory = _consecutive_directory(plain)
    children = S.spte_child_indices(directory.sptes[directory.sptes != 0])
    assert (np.diff(children) == 1).all()
    assert sum(len(plain.mmu.pool.pages[c].parent_ptes) == 2 for c in children.tolist()) == twice
    for vm in (plain, observed):
        invalid_list: list = []
        zap.prepare_zap_page(vm.mmu, _consecutive_directory(vm), invalid_list)
        zap.commit_zap_page(vm.mmu, invalid_list)
    assert _page_state(plain) == _page_state(observed)
    assert _rmap_state(plain) == _rmap_state(observed) and plain.stats == observed.stats
    assert sum(bool(plain.mmu.pool.pages[c].parent_ptes) for c in children.tolist()) == twice


@pytest.mark.parametrize("kind", ZAP_KINDS)
def test_full_direct_leaf_pages_zapped_at_once_leave_what_the_per_entry_zap_leaves(kind):
    """The direct leaf pages of a direct map are full, each gfn alone in its rmap head: the
    zap clears each page's heads as one slice (Rmap.remove_run's shortest path), and
    leaves what drop_spte() entry by entry leaves."""
    plain, observed = _direct_map_guest(False, True), _direct_map_guest(True, True)
    leaves = [sp for sp in plain.mmu.active_mmu_pages if sp.direct and sp.level == 1]
    assert len(leaves) == 32 and all(np.count_nonzero(sp.sptes) == 512 for sp in leaves)
    for vm in (plain, observed):
        vm.zap_all(kind).finish()
    assert _page_state(plain) == _page_state(observed)
    assert _rmap_state(plain) == _rmap_state(observed) and plain.stats == observed.stats
    assert not plain.mmu.pool.parent_ptes.head.any() and plain.stats["pages_4k"] == 0


def test_a_run_of_rmap_heads_is_removed_only_where_present_says():
    """Rmap.remove_run removes first_sptep + k from gfn + k only where `present` is set, even
    when every head of the run holds its entry alone; chains lose just that entry."""
    rmap = Rmap(0x100, 2048)
    first = 7 << 9
    for k in range(512):
        rmap.add(0x200 + k, first + k)
    present = np.ones(512, dtype=np.uint64)
    present[[3, 100]] = 0
    assert rmap.remove_run(0x200, present, 510, first) == 510
    assert [k for k in range(512) if rmap.has(0x200 + k)] == [3, 100]
    rmap.add(0x200 + 3, 999)  # a chain of two
    full = np.ones(512, dtype=np.uint64)
    assert rmap.remove_run(0x200, full, 512, first) == 2
    assert [list(rmap.get(0x200 + k)) for k in (3, 100)] == [[999], []]
    for k in range(512):
        rmap.add(0x400 + k, first + k)
    assert rmap.remove_run(0x400, full, 512, first) == 512
    assert not any(rmap.has(0x400 + k) for k in range(512))

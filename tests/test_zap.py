"""Zapping every shadow page: the fast zap by generation with lock breaks, and the slow walk
(kvm-mmu.md §8, §10)."""

from __future__ import annotations

import pytest

import mmud
from mmud.kvm.mmu.zap import BATCH_ZAP_PAGES
from tests.guest_tables import P, U, W, check_access, new_vm

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


@pytest.mark.parametrize("fast", [True, False])
def test_translations_are_rebuilt_after_zap_all(fast):
    vm, gt, vcpu = faulted_vm()
    used = vm.mmu.n_used_mmu_pages
    run = vm.zap_all(fast=fast)
    assert run.done and run.pages >= used - 1  # all but the pinned root
    for i in range(0, PAGES, 64):
        check_access(vm, vcpu, BASE + i * 4096, user=True)
        assert vcpu.read_u64(BASE + i * 4096, user=True) == i
    assert no_obsolete_pages(vm)
    assert vm.mmu.n_used_mmu_pages == len(vm.mmu.active_mmu_pages)
    assert vm.audit() == []


def test_fast_zap_holds_the_lock_for_batches():
    vm, gt, vcpu = faulted_vm()
    pages = vm.mmu.n_used_mmu_pages
    run = vm.zap_all(fast=True)
    assert run.breaks >= (pages - 1) // BATCH_ZAP_PAGES - 1
    slow = vm.zap_all(fast=False)
    assert slow.breaks == 0


def test_pinned_roots_go_when_released():
    vm, gt, vcpu = faulted_vm(vcpus=2)
    roots = [v.mmu.root for v in vm.vcpus]
    vm.zap_all(fast=True)
    assert all(r.invalid and r.root_count for r in roots)  # still pinned, skipped
    for v in vm.vcpus:
        assert v.read_u64(BASE, user=True) == 0
    assert all(r not in vm.mmu.active_mmu_pages for r in roots)
    assert no_obsolete_pages(vm)
    assert vm.audit() == []


def test_vcpus_run_in_the_lock_breaks_of_a_running_vm():
    vm = mmud.VM(mem_mb=64, vcpus=2, seed=5, workload="kernel")
    vm.step(4000)
    vm.zap_all(fast=True)
    assert vm.zap_in_progress
    steps = 0
    while vm.zap_in_progress:
        steps += vm.step(1)
        assert vm.audit() == []
    run = vm.last_zap
    assert run.breaks > 1 and steps > run.breaks  # vCPU steps ran between the batches
    vm.step(500)
    assert no_obsolete_pages(vm)
    assert vm.workload.counters["data_errors"] == 0, vm.workload.errors
    assert vm.audit() == []


def test_a_second_zap_finishes_the_first():
    vm = mmud.VM(mem_mb=64, vcpus=1, seed=5, workload="kernel")
    vm.step(3000)
    first = vm.zap_all(fast=True)
    assert not first.done
    vm.zap_all(fast=True)
    assert first.done
    vm.set_memslot(1, 0x1000_0000, 0x10000)
    assert not vm.zap_in_progress
    vm.step(500)
    assert vm.audit() == []


def test_direct_zap_of_an_idle_vm_completes_at_once():
    vm, gt, vcpu = new_vm()
    gt.map(BASE, flags=P | W | U)
    vcpu.write_u64(BASE, 1, user=True)
    vm.zap_all(fast=True)
    assert not vm.zap_in_progress

"""The `kernel` workload drives the shadow MMU through every event the statistics count."""

from __future__ import annotations

import mmud

# Every counter must move within this many scheduler steps on a 64 MiB VM.
MAX_STEPS = 40_000
POLL = 500
EVENTS = (
    "pf_fixed",
    "pf_guest",
    "tlb_flush",
    "invlpg",
    "exits",
    "insn_emulation",
    "mmu_shadow_zapped",
    "mmu_pte_write",
    "mmu_pde_zapped",
    "mmu_flooded",
    "mmu_cache_miss",
    "mmu_unsync",  # a gauge: it must have been > 0 at some point
    "remote_tlb_flush",
    "pages_4k",
)


def steps_until(vm: mmud.VM, names: tuple[str, ...]) -> set[str]:
    """Step until each stat was seen > 0; return those never seen within MAX_STEPS."""
    missing = set(names)
    for _ in range(MAX_STEPS // POLL):
        vm.step(POLL)
        stats = vm.stats
        missing = {name for name in missing if not stats[name]}
        if not missing:
            break
    return missing


def test_kernel_workload_provokes_every_mmu_event() -> None:
    vm = mmud.VM(mem_mb=64, vcpus=2, seed=1, workload="kernel")
    assert steps_until(vm, EVENTS) == set()


def test_small_mmu_page_budget_recycles() -> None:
    vm = mmud.VM(mem_mb=64, vcpus=2, seed=2, workload="kernel")
    vm.set_nr_mmu_pages(64)  # KVM_SET_NR_MMU_PAGES to the minimum
    assert steps_until(vm, ("mmu_recycled",)) == set()


def test_kernel_workload_exercises_its_kernel_paths_without_errors() -> None:
    vm = mmud.VM(mem_mb=64, vcpus=2, seed=3, workload="kernel")
    vm.step(30_000)
    counters = vm.workload.counters
    for name in (
        "anon_faults",
        "file_faults",
        "cow_copies",
        "forks",
        "exits",
        "munmaps",
        "mprotects",
        "segv_caught",
        "pt_pages_freed",
        "pte_tables_replaced",
        "context_switches",
    ):
        assert counters[name] > 0, name
    for name in ("data_errors", "oops", "segv", "fault_loops", "oom_kills"):
        assert counters[name] == 0, (name, vm.workload.errors)

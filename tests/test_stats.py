"""The statistics set is x86 Linux v5.16's, and the new counters count what the kernel counts.

The kernel lists below are copied from the kernel sources, not from mmud.uapi.stats:
arch/x86/kvm/x86.c `kvm_vm_stats_desc[]` / `kvm_vcpu_stats_desc[]` and include/linux/kvm_host.h
`KVM_GENERIC_VM_STATS()` / `KVM_GENERIC_VCPU_STATS()` (v5.16; `blocking` arrived in v5.17),
each name with the STATS_DESC_* macro that declares it.
"""

from __future__ import annotations

import pytest

import mmud
from mmud.daemon.status import render_status
from mmud.kvm.mmu.page_fault import kvm_mmu_page_fault
from mmud.uapi.stats import STAT_BY_NAME, STATS, Kind, Origin
from mmud.x86.paging import PFERR_PRESENT_MASK, PFERR_USER_MASK, PFERR_WRITE_MASK
from tests.guest_tables import P, U, W, GuestTables, new_vm

# include/linux/kvm_host.h, v5.16
KVM_GENERIC_VM_STATS = [
    ("STATS_DESC_COUNTER", "remote_tlb_flush"),
    ("STATS_DESC_COUNTER", "remote_tlb_flush_requests"),
]
KVM_GENERIC_VCPU_STATS = [
    ("STATS_DESC_COUNTER", "halt_successful_poll"),
    ("STATS_DESC_COUNTER", "halt_attempted_poll"),
    ("STATS_DESC_COUNTER", "halt_poll_invalid"),
    ("STATS_DESC_COUNTER", "halt_wakeup"),
    ("STATS_DESC_TIME_NSEC", "halt_poll_success_ns"),
    ("STATS_DESC_TIME_NSEC", "halt_poll_fail_ns"),
    ("STATS_DESC_TIME_NSEC", "halt_wait_ns"),
    ("STATS_DESC_LOGHIST_TIME_NSEC", "halt_poll_success_hist"),
    ("STATS_DESC_LOGHIST_TIME_NSEC", "halt_poll_fail_hist"),
    ("STATS_DESC_LOGHIST_TIME_NSEC", "halt_wait_hist"),
]
# arch/x86/kvm/x86.c, v5.16
X86_VM_STATS = [
    ("STATS_DESC_COUNTER", "mmu_shadow_zapped"),
    ("STATS_DESC_COUNTER", "mmu_pte_write"),
    ("STATS_DESC_COUNTER", "mmu_pde_zapped"),
    ("STATS_DESC_COUNTER", "mmu_flooded"),
    ("STATS_DESC_COUNTER", "mmu_recycled"),
    ("STATS_DESC_COUNTER", "mmu_cache_miss"),
    ("STATS_DESC_ICOUNTER", "mmu_unsync"),
    ("STATS_DESC_ICOUNTER", "pages_4k"),
    ("STATS_DESC_ICOUNTER", "pages_2m"),
    ("STATS_DESC_ICOUNTER", "pages_1g"),
    ("STATS_DESC_ICOUNTER", "nx_lpage_splits"),
    ("STATS_DESC_PCOUNTER", "max_mmu_rmap_size"),
    ("STATS_DESC_PCOUNTER", "max_mmu_page_hash_collisions"),
]
X86_VCPU_STATS = [
    ("STATS_DESC_COUNTER", "pf_fixed"),
    ("STATS_DESC_COUNTER", "pf_guest"),
    ("STATS_DESC_COUNTER", "tlb_flush"),
    ("STATS_DESC_COUNTER", "invlpg"),
    ("STATS_DESC_COUNTER", "exits"),
    ("STATS_DESC_COUNTER", "io_exits"),
    ("STATS_DESC_COUNTER", "mmio_exits"),
    ("STATS_DESC_COUNTER", "signal_exits"),
    ("STATS_DESC_COUNTER", "irq_window_exits"),
    ("STATS_DESC_COUNTER", "nmi_window_exits"),
    ("STATS_DESC_COUNTER", "l1d_flush"),
    ("STATS_DESC_COUNTER", "halt_exits"),
    ("STATS_DESC_COUNTER", "request_irq_exits"),
    ("STATS_DESC_COUNTER", "irq_exits"),
    ("STATS_DESC_COUNTER", "host_state_reload"),
    ("STATS_DESC_COUNTER", "fpu_reload"),
    ("STATS_DESC_COUNTER", "insn_emulation"),
    ("STATS_DESC_COUNTER", "insn_emulation_fail"),
    ("STATS_DESC_COUNTER", "hypercalls"),
    ("STATS_DESC_COUNTER", "irq_injections"),
    ("STATS_DESC_COUNTER", "nmi_injections"),
    ("STATS_DESC_COUNTER", "req_event"),
    ("STATS_DESC_COUNTER", "nested_run"),
    ("STATS_DESC_COUNTER", "directed_yield_attempted"),
    ("STATS_DESC_COUNTER", "directed_yield_successful"),
    ("STATS_DESC_ICOUNTER", "guest_mode"),
]
# "KVM: x86/mmu: Expand and clean up page fault stats" (v5.19): pf_taken before pf_fixed,
# the other four right after it.
LATER_PF_STATS = ["pf_taken", "pf_emulate", "pf_spurious", "pf_fast", "pf_mmio_spte_created"]
MMUD_STATS = ["isolation_enters", "isolation_exits", "isolation_faults",
              "mmu_audit_runs", "mmu_audit_ratelimited", "mmu_audit_errors"]

KIND_OF_MACRO = {
    "STATS_DESC_COUNTER": Kind.CUMULATIVE,
    "STATS_DESC_TIME_NSEC": Kind.CUMULATIVE,
    "STATS_DESC_ICOUNTER": Kind.INSTANT,
    "STATS_DESC_PCOUNTER": Kind.PEAK,
    "STATS_DESC_LOGHIST_TIME_NSEC": Kind.LOG_HIST,
}
V5_16 = [(m, n, "vm") for m, n in KVM_GENERIC_VM_STATS + X86_VM_STATS] + \
        [(m, n, "vcpu") for m, n in KVM_GENERIC_VCPU_STATS + X86_VCPU_STATS]

VA = 0x0000_0000_0040_0000
PAGE = 0x1000


@pytest.mark.parametrize(("macro", "name", "scope"), V5_16, ids=[n for _, n, _ in V5_16])
def test_every_v5_16_statistic_exists_with_its_kernel_kind(macro, name, scope):
    desc = STAT_BY_NAME[name]
    assert (desc.scope, desc.kind) == (scope, KIND_OF_MACRO[macro])
    assert desc.origin in (Origin.GENERIC, Origin.X86)
    assert desc.mode == (0o444 if macro == "STATS_DESC_ICOUNTER" else 0o644)  # kvm_stats_debugfs_mode


def test_the_set_is_v5_16_plus_the_later_pf_stats_plus_mmuds_own():
    v5_16 = {n for _, n, _ in V5_16}
    assert set(STAT_BY_NAME) == v5_16 | set(LATER_PF_STATS) | set(MMUD_STATS)
    assert len(STATS) == len(STAT_BY_NAME)
    assert {s.name for s in STATS if s.origin is Origin.LATER} == set(LATER_PF_STATS)
    assert {s.name for s in STATS if s.origin is Origin.MMUD} == set(MMUD_STATS)


def test_names_from_other_eras_are_gone():
    for name in ("mmu_pte_updated", "largepages", "lpages", "nx_largepages_splitted", "efer_reload",
                 "irq_window", "nmi_window", "request_irq", "blocking", "preemption_reported",
                 "preemption_other"):
        assert name not in STAT_BY_NAME
    vm = mmud.VM(mem_mb=16)
    assert "mmu_pte_updated" not in vm.stats


def test_order_is_the_kernels_vm_then_vcpu_with_mmuds_own_last():
    vcpu_order = [n for _, n in KVM_GENERIC_VCPU_STATS] + ["pf_taken", "pf_fixed", *LATER_PF_STATS[1:]] + \
        [n for _, n in X86_VCPU_STATS[1:]]
    want = [n for _, n in KVM_GENERIC_VM_STATS + X86_VM_STATS] + vcpu_order + MMUD_STATS
    assert [s.name for s in STATS] == want


def test_later_pf_stats_say_so_in_their_help():
    for name in LATER_PF_STATS:
        assert "v5.19" in STAT_BY_NAME[name].help and "not in v5.16" in STAT_BY_NAME[name].help


# -- what the counters count -------------------------------------------------------------


def test_no_huge_sptes_and_no_nx_splits():
    vm = mmud.VM(mem_mb=64, vcpus=2, seed=3, workload="kernel")
    vm.step(3000)
    s = vm.stats
    assert s["pages_4k"] > 0
    assert s["pages_2m"] == s["pages_1g"] == s["nx_lpage_splits"] == 0


def _longest_chain(vm: mmud.VM) -> int:
    return max((len(v) for slot in vm.memslots for v in slot.rmap.desc.values()), default=1)


def test_max_mmu_rmap_size_follows_the_longest_rmap_chain():
    """One gfn mapped at N virtual addresses: N sptes in its rmap. pte_list_add() returns the
    entries already there, and that is what the kernel records: the longest chain less one."""
    n = 12
    vm, gt, vcpu = new_vm()
    pa = gt.alloc_data()
    for k in range(n):
        gt.map(VA + k * PAGE, pa, flags=P | U)
    assert vm.stats["max_mmu_rmap_size"] == 0
    for k in range(n):
        vcpu.read_u64(VA + k * PAGE, user=True)
    assert len(vm.memslots.lookup(pa >> 12).rmap.get(pa >> 12)) == n == _longest_chain(vm)
    assert vm.stats["max_mmu_rmap_size"] == _longest_chain(vm) - 1
    # A peak: clearing it restarts it from the next add.
    vm.clear_stat("max_mmu_rmap_size")
    assert vm.stats["max_mmu_rmap_size"] == 0
    gt.map(VA + n * PAGE, pa, flags=P | U)
    vcpu.read_u64(VA + n * PAGE, user=True)
    assert vm.stats["max_mmu_rmap_size"] == n == _longest_chain(vm) - 1


def test_max_mmu_rmap_size_on_a_run():
    vm = mmud.VM(mem_mb=64, vcpus=2, seed=1, workload="kernel")
    vm.step(5000)
    assert 0 < vm.stats["max_mmu_rmap_size"] >= _longest_chain(vm) - 1


def _dirty_logging_run() -> mmud.VM:
    """The kernel workload with slot 0 logging dirty pages and harvested: every fault path."""
    vm = mmud.VM(mem_mb=64, vcpus=2, seed=4, workload="kernel")
    vm.step(3000)
    vm.set_memslot(0, 0, vm.mem_bytes, log_dirty=True)
    for _ in range(6):
        vm.step(500)
        vm.get_dirty_log(0)
    return vm


def test_pf_taken_counts_every_fault_the_paths_resolve():
    s = _dirty_logging_run().stats
    assert s["pf_fast"] > 0 and s["pf_fixed"] > 0 and s["pf_emulate"] > 0 and s["pf_guest"] > 0
    assert s["pf_taken"] >= s["pf_fixed"] + s["pf_fast"] + s["pf_emulate"]
    assert s["req_event"] == s["pf_guest"]  # mmud's only events: the #PFs KVM queues


def test_a_current_mmio_spte_goes_to_emulation_without_pf_taken():
    """kvm_mmu_page_fault() answers an RSVD fault on a current MMIO spte itself, before
    kvm_mmu_do_page_fault(): neither pf_taken nor pf_emulate."""
    from mmud.kvm.devices import IORAM_BASE

    vm, gt, vcpu = new_vm()
    gt.map(VA, IORAM_BASE, flags=P | W)
    vcpu.write_u64(VA, 1)  # not present: a fault that creates the MMIO spte, then emulation
    s = vm.stats
    assert (s["pf_taken"], s["pf_emulate"], s["pf_mmio_spte_created"], s["mmio_exits"]) == (1, 1, 1, 1)
    vcpu.write_u64(VA, 2)  # RSVD on the MMIO spte
    s = vm.stats
    assert (s["pf_taken"], s["pf_emulate"], s["mmio_exits"]) == (1, 1, 2)


def test_pf_spurious_counts_a_fault_another_vcpu_fixed_first():
    """vCPU 0 takes a write #PF on an spte dirty logging write-protected; before its handler
    runs, vCPU 1's fast page fault makes the spte writable. vCPU 0's fast path then finds the
    access allowed: RET_PF_SPURIOUS, counted as pf_fast and pf_spurious (v5.19)."""
    slot, gpa = 1, 1 << 30
    vm = mmud.VM(mem_mb=16, vcpus=2)
    vm.set_memslot(slot, gpa, 16 * PAGE, log_dirty=True)
    gt = GuestTables(vm)
    gt.map(VA, gpa, flags=P | W | U)
    vcpu0, vcpu1 = vm.vcpus
    vcpu0.cr3 = vcpu1.cr3 = gt.pml4
    vcpu0.write_u64(VA, 1, user=True)
    vm.get_dirty_log(slot)  # write-protects the spte
    before = vm.stats
    vcpu1.write_u64(VA, 2, user=True)  # vCPU 1's fault: fixed by the fast path
    mid = vm.stats
    assert (mid["pf_fast"], mid["pf_spurious"]) == (before["pf_fast"] + 1, before["pf_spurious"])
    error_code = PFERR_PRESENT_MASK | PFERR_WRITE_MASK | PFERR_USER_MASK
    kvm_mmu_page_fault(vcpu0.mmu, VA, error_code)  # vCPU 0's #PF exit, handled now
    after = vm.stats
    assert after["pf_spurious"] == mid["pf_spurious"] + 1
    assert after["pf_fast"] == mid["pf_fast"] + 1
    assert after["pf_taken"] == mid["pf_taken"] + 1
    assert (after["pf_fixed"], after["pf_guest"]) == (mid["pf_fixed"], mid["pf_guest"])
    assert vcpu0.read_u64(VA, user=True) == 2


def test_remote_tlb_flush_requests_count_every_request():
    """Every kvm_flush_remote_tlbs() is a request; it is a flush done only if a vCPU had to
    be kicked — none has entered the guest (loaded a root) in a fresh VM."""
    vm = mmud.VM(mem_mb=16, vcpus=2)
    before = vm.stats
    vm.mmu.kvm_flush_remote_tlbs()
    s = vm.stats
    assert s["remote_tlb_flush_requests"] == before["remote_tlb_flush_requests"] + 1
    assert s["remote_tlb_flush"] == before["remote_tlb_flush"]
    gt = GuestTables(vm)
    vm.vcpus[0].cr3 = gt.pml4
    vm.vcpus[0].read_u64(0xFFFF888000000000)  # the direct map: the vCPU runs, a root is loaded
    vm.mmu.kvm_flush_remote_tlbs()
    after = vm.stats
    assert after["remote_tlb_flush_requests"] == s["remote_tlb_flush_requests"] + 1
    assert after["remote_tlb_flush"] == s["remote_tlb_flush"] + 1


def test_remote_tlb_flush_requests_at_least_the_flushes_on_a_run():
    s = _dirty_logging_run().stats
    assert s["remote_tlb_flush"] > 0
    assert s["remote_tlb_flush_requests"] >= s["remote_tlb_flush"]


def test_events_mmud_never_has_stay_zero():
    s = _dirty_logging_run().stats
    never = [d.name for d in STATS if d.help.startswith("0: ")]
    assert "halt_exits" in never and "io_exits" in never and "guest_mode" in never
    assert {n: s[n] for n in never} == dict.fromkeys(never, 0)


def test_status_shows_the_pid_that_holds_the_vm():
    from mmud.daemon.status import RateMeter

    vm = mmud.VM(mem_mb=16)
    text = render_status(vm, "running", RateMeter().update(0, vm.stats), None, pid=4242)
    fields = dict(line.split(":", 1) for line in text.splitlines())
    assert fields["pid"].strip() == "4242"

"""The run-time MMU audit: clean runs, rate limiting, switches, and each injected bug
reported by the check docs/audit.md names — in full scope at the first audit point after
the bug's code path, in incremental scope at the post point of that very operation."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import structlog.testing

import mmud
from bench._stripped import HOOK_MARKERS, kernel_vm, without_hooks
from mmud.guest import WORKLOADS
from mmud.host import HOST_WORKLOADS
from mmud.kvm.dirty_log import kvm_get_dirty_log_protect, run_ioctl
from mmud.kvm.mmu.audit import AUDIT_LOG_LINES, ERROR_LOG_BURST, ERROR_LOG_INTERVAL_MS
from mmud.kvm.mmu.observer import EVENTS
from mmud.uapi.bugs import BUGS, render_choices
from tests.guest_tables import P, U, W, GuestTables

VA = 0x0000_0000_0040_0000


def audited_vm(scope: str, **kw) -> mmud.VM:
    params = {"mmu_audit": "1", "mmu_audit_ratelimit_ms": "0", "mmu_audit_scope": scope}
    return mmud.VM(params=params, **kw)


@pytest.mark.parametrize("scope", ["full", "incremental"])
@pytest.mark.parametrize("workload", [*WORKLOADS, *HOST_WORKLOADS])
def test_no_bug_no_error_at_every_point(scope, workload):
    vm = audited_vm(scope, mem_mb=64, vcpus=2, seed=5, workload=workload)
    vm.step(1200 if scope == "full" else 8000)
    stats = vm.stats
    assert stats["mmu_audit_runs"] > 50
    assert stats["mmu_audit_errors"] == 0, vm.audit_log()[:5]
    assert vm.audit() == []


HOOK_TESTS = {"# audit point": "audit_enabled", "# observer": "obs", "# isolation": "isolation"}


def _hook_lines() -> list[tuple[Path, int, str, str]]:
    """(file, line number, line, marker) of every hook in the package."""
    found = []
    for path in sorted(Path(mmud.__file__).parent.rglob("*.py")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            marker = next((m for m in HOOK_TESTS if line.rstrip().endswith(m)), None)
            if marker is not None:
                found.append((path, n, line, marker))
    return found


def test_hooks_are_one_line_tests():
    """Every audit point, observer hook and isolation switch is one `if <test>: <call>`
    line, so that with nobody listening it costs that test, and deleting the lines (the
    hooks-removed build of bench/_stripped.py) leaves the same program. An observer hook
    calls one event of MmuObserver on the attribute it tests."""
    hooks = _hook_lines()
    for path, _, line, marker in hooks:
        (node,) = ast.parse(line.strip()).body
        assert isinstance(node, ast.If) and not node.orelse and len(node.body) == 1, (path, line)
        assert isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Call), line
        assert ast.unparse(node.test).endswith(HOOK_TESTS[marker]), (path, line)
        if marker == "# observer":
            call = node.body[0].value.func
            assert isinstance(call, ast.Attribute) and call.attr in EVENTS, (path, line)
            assert ast.unparse(call.value) == ast.unparse(node.test), (path, line)
    assert sum(m == "# observer" for *_, m in hooks) > 20 and set(HOOK_MARKERS) <= set(HOOK_TESTS)


def test_one_observer_hook_per_site():
    """Pairs are merged: no two observer hooks stand on consecutive lines, and every event
    of the observer interface has a site."""
    hooks = [(p, n) for p, n, _, m in _hook_lines() if m == "# observer"]
    assert not [(p, n) for p, n in hooks if (p, n + 1) in set(hooks)]
    text = "\n".join(line for *_, line, m in _hook_lines() if m == "# observer")
    assert [e for e in EVENTS if f".{e}(" not in text] == []


def test_the_build_without_the_audit_runs_the_same_guest():
    with without_hooks() as stripped:
        without, with_audit = kernel_vm(stripped), kernel_vm(mmud)
        without.step(400)
        with_audit.step(400)
        assert without.stats == with_audit.stats


def test_audit_off_runs_nothing():
    vm = mmud.VM(mem_mb=64, seed=5, workload="kernel")
    vm.step(3000)
    assert vm.stats["mmu_audit_runs"] == 0 and vm.stats["mmu_audit_ratelimited"] == 0


def test_switch_at_run_time():
    vm = mmud.VM(
        mem_mb=64,
        seed=5,
        workload="kernel",
        params={"mmu_audit_ratelimit_ms": "0", "mmu_audit_scope": "incremental"},
    )
    vm.step(1000)
    vm.params["mmu_audit"] = "1\n"
    vm.step(1000)
    runs = vm.stats["mmu_audit_runs"]
    assert runs > 0
    vm.params["mmu_audit"] = "0"
    vm.step(1000)
    assert vm.stats["mmu_audit_runs"] == runs


def test_rate_limit_window_and_suppressed_report():
    params = {"mmu_audit": "1", "mmu_audit_ratelimit_ms": "100", "mmu_audit_ratelimit_burst": "3"}
    vm = mmud.VM(mem_mb=64, seed=5, workload="kernel", params=params)
    vm.step(20000)  # 400 ms of simulated time: four windows of 100 ms
    stats = vm.stats
    assert 3 <= stats["mmu_audit_runs"] <= 3 * 5
    assert stats["mmu_audit_ratelimited"] > 0
    assert any(
        re.fullmatch(r"__kvm_mmu_audit: \d+ callbacks suppressed\n", line)
        for line in vm.audit_log()
    )


LIMITED = {"mmu_audit": "1", "mmu_audit_ratelimit_ms": "100000", "mmu_audit_ratelimit_burst": "4"}


def test_rate_limit_is_shared_by_the_vms_of_a_module():
    module = mmud.KvmModule(LIMITED)
    a = mmud.VM(mem_mb=64, seed=1, workload="kernel", module=module)
    b = mmud.VM(mem_mb=64, seed=2, workload="kernel", module=module)
    a.step(2000)
    b.step(2000)
    assert a.stats["mmu_audit_runs"] + b.stats["mmu_audit_runs"] == 4
    assert len(module.audit.lines) == len(a.audit_log()) == len(b.audit_log())


def test_vms_of_two_modules_share_nothing():
    """No module state hides in a registry: each module has its own limiter and log."""
    a = mmud.VM(mem_mb=64, seed=1, workload="kernel", params=LIMITED)
    b = mmud.VM(mem_mb=64, seed=2, workload="kernel", module=mmud.KvmModule(LIMITED))
    a.step(2000)
    b.step(2000)
    assert a.stats["mmu_audit_runs"] == b.stats["mmu_audit_runs"] == 4
    assert a.module.audit is not b.module.audit and a.module.isolation is not b.module.isolation


def test_inject_lists_bugs_with_the_armed_one_in_brackets():
    assert render_choices(None).startswith("[none] rmap_add_skipped ")
    assert " [wrong_pfn] " in render_choices("wrong_pfn")
    vm = mmud.VM(mem_mb=64)
    with pytest.raises(mmud.KvmError):
        vm.inject("no_such_bug")
    vm.inject("wrong_pfn")
    assert vm.mmu.bug == "wrong_pfn"
    vm.inject("none")
    assert vm.mmu.bug is None


# --- each bug, and the check that catches it --------------------------------------------------


def _setup(scope: str):
    vm = audited_vm(scope, mem_mb=64)
    gt = GuestTables(vm)
    gt.map(VA, flags=P | W | U)
    vcpu = vm.vcpus[0]
    vcpu.cr3 = gt.pml4
    return vm, gt, vcpu


def _touch(vm, gt, vcpu):
    vcpu.write_u64(VA, 1, user=True)


def trigger_fault(vm, gt, vcpu):
    _touch(vm, gt, vcpu)


def trigger_write_protect_skipped(vm, gt, vcpu):
    # The guest writes the (not yet shadowed) page table through its direct map, then the
    # first access through that table shadows it.
    pte = gt.entry_gpa(VA, 1)
    gt.guest_write_entry(vcpu, (pte & ~0xFFF) + 8 * 100, 0)
    _touch(vm, gt, vcpu)


def trigger_sync(vm, gt, vcpu):
    _touch(vm, gt, vcpu)
    pte = gt.entry_gpa(VA, 1)
    gt.guest_write_entry(vcpu, pte, vm.read_u64(pte) & ~P)  # leaf table goes unsync
    vcpu.cr3 = vcpu.cr3


def trigger_upper_table_store(vm, gt, vcpu):
    _touch(vm, gt, vcpu)
    pde = gt.entry_gpa(VA, 2)
    gt.guest_write_entry(vcpu, pde, vm.read_u64(pde) & ~W)


def _logged_write_and_harvest(vm, gt, vcpu):
    """Log slot 0's dirty pages; a write makes VA dirty and writable; a harvest reports it."""
    vm.set_memslot(0, 0, vm.mem_bytes, log_dirty=True)
    _touch(vm, gt, vcpu)
    assert vm.get_dirty_log(0)


def _fault_elsewhere(vm, gt, vcpu):
    """A slow fault on another page: its audit points see the logged slot."""
    gt.map(VA + 0x1000, flags=P | W | U)
    vcpu.write_u64(VA + 0x1000, 1, user=True)


def trigger_dirty_harvest(vm, gt, vcpu):
    _logged_write_and_harvest(vm, gt, vcpu)
    _fault_elsewhere(vm, gt, vcpu)


def trigger_write_in_harvest(vm, gt, vcpu):
    # VA is write-protected and clean; a write (the fast path) makes it dirty, and another
    # write faults at the harvest's preemption point, after its TLB entry was evicted.
    _logged_write_and_harvest(vm, gt, vcpu)
    _touch(vm, gt, vcpu)
    harvest = kvm_get_dirty_log_protect(vm, 0, words_per_step=1 << 20)  # one chunk
    next(harvest)
    vcpu.flush_tlb_gva(VA)
    _touch(vm, gt, vcpu)
    run_ioctl(harvest)
    assert vm.stats["pf_fast"] >= 1
    _fault_elsewhere(vm, gt, vcpu)


SCENARIOS = {
    "rmap_add_skipped": (trigger_fault, "post page fault", "no rmap for writable spte"),
    "write_protect_skipped": (
        trigger_write_protect_skipped,
        "post page fault",
        "shadow page has writable mappings: gfn",
    ),
    "wrong_pfn": (trigger_fault, "post page fault", "levels 4 pfn "),
    "sync_skipped": (trigger_sync, "post sync", "after sync root."),
    "unsync_nonleaf": (trigger_upper_table_store, "post page fault", "unsync sp: "),
    "rmap_remove_skipped": (trigger_sync, "post sync", "which does not map it"),
    "pte_write_ignored": (trigger_upper_table_store, "post pte write", "for gpte"),
    "parent_unlink_skipped": (
        trigger_upper_table_store,
        "post pte write",
        "which does not point at it",
    ),
    "dirty_wp_before_snapshot": (trigger_write_in_harvest, "pre page fault", "is clean but spte"),
    "dirty_wp_skipped": (trigger_dirty_harvest, "pre page fault", "is clean but spte"),
}


def test_every_bug_has_a_scenario():
    assert set(SCENARIOS) == {b.name for b in BUGS}


@pytest.mark.parametrize("scope", ["full", "incremental"])
@pytest.mark.parametrize("bug", list(SCENARIOS))
def test_bug_is_reported_by_its_check(bug, scope):
    trigger, point, message = SCENARIOS[bug]
    if scope == "incremental" and point.startswith("pre "):
        # The bug ran outside an audited operation (a harvest); the incremental audit,
        # which runs at post points only, reports it at the next one.
        point = point.replace("pre ", "post ", 1)
    vm, gt, vcpu = _setup(scope)
    vm.inject(bug)
    trigger(vm, gt, vcpu)
    log = vm.audit_log()
    assert log, f"{bug}: nothing reported"
    first = log[0]
    assert first.startswith(f"audit: ({point}) error: "), (bug, first)
    assert any(message in line for line in log if line.startswith(f"audit: ({point}) error: ")), (
        bug,
        log[:5],
    )


def test_each_error_reaches_the_audit_log_and_the_first_ones_structlog():
    trigger, point, _ = SCENARIOS["wrong_pfn"]
    vm, gt, vcpu = _setup("full")
    vm.inject("wrong_pfn")
    with structlog.testing.capture_logs() as events:
        trigger(vm, gt, vcpu)
    errors = [e for e in events if e["event"] == "mmu_audit_error"]
    lines = vm.audit_log()
    assert lines and len(lines) == vm.stats["mmu_audit_errors"]
    first = [line.rstrip("\n") for line in lines[:ERROR_LOG_BURST]]
    assert [e["message"] for e in errors] == first
    assert {e["log_level"] for e in errors} == {"error"} and errors[0]["point"] == point


def test_error_events_are_rate_limited_then_summarised_and_the_log_keeps_every_line():
    """printk_ratelimited style, on simulated time: 10 events per 5 s per module; the first
    event of a later window says how many were dropped.  kvm/audit_log has them all."""
    vm = audited_vm("full", mem_mb=16, seed=3, workload="kernel")
    vm.inject("rmap_add_skipped")
    with structlog.testing.capture_logs() as events:
        vm.step(20)
    errors = [e for e in events if e["event"] == "mmu_audit_error"]
    total = vm.stats["mmu_audit_errors"]
    lines = vm.audit_log()
    assert ERROR_LOG_BURST < total == len(lines) <= AUDIT_LOG_LINES
    assert [e["message"] for e in errors] == [line.rstrip("\n") for line in lines[:ERROR_LOG_BURST]]
    vm.clock_ns += ERROR_LOG_INTERVAL_MS * 1_000_000  # the window is over
    with structlog.testing.capture_logs() as events:
        vm.step(20)
    errors = [e for e in events if e["event"] == "mmu_audit_error"]
    summary, *rest = errors
    assert summary["message"] == f"{total - ERROR_LOG_BURST} events suppressed"
    assert summary["suppressed"] == total - ERROR_LOG_BURST and summary["log_level"] == "error"
    assert len(rest) == ERROR_LOG_BURST
    # The log also holds the run and rmap-report limiters' notes; its error lines are all there.
    lines = [line.rstrip("\n") for line in vm.audit_log() if line.startswith("audit: ")]
    assert len(lines) == vm.stats["mmu_audit_errors"] > total + ERROR_LOG_BURST
    assert [e["message"] for e in rest] == lines[total:total + ERROR_LOG_BURST]


def test_error_events_are_limited_per_module():
    """Two VMs of one module share the limiter, as they share the kernel's printk limit."""
    first = audited_vm("full", mem_mb=16, seed=3, workload="kernel")
    second = mmud.VM(mem_mb=16, seed=4, workload="kernel", module=first.module)
    for vm in (first, second):
        vm.inject("rmap_add_skipped")
    with structlog.testing.capture_logs() as events:
        first.step(100)
        second.step(100)
    assert first.stats["mmu_audit_errors"] > ERROR_LOG_BURST
    assert second.stats["mmu_audit_errors"] > 0
    assert len([e for e in events if e["event"] == "mmu_audit_error"]) == ERROR_LOG_BURST


@pytest.mark.parametrize("bug", list(SCENARIOS))
def test_scenarios_are_clean_without_the_bug(bug):
    trigger, _, _ = SCENARIOS[bug]
    for scope in ("full", "incremental"):
        vm, gt, vcpu = _setup(scope)
        trigger(vm, gt, vcpu)
        assert vm.audit_log() == [] and vm.audit() == []
        assert vm.stats["mmu_audit_runs"] > 0

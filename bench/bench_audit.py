"""The MMU audit's cost and its detection latency (docs/audit.md).

Throughput is guest steps per second of the `kernel` workload (64 MiB, seed 7), one VM per
variant in one process, the VMs stepping in turn, 1,000 steps each, round by round (ABBA);
a ratio is the median over rounds of the two variants' ratio within the round:
- `audit_off_ratio`: audit off relative to the hooks-removed build (bench/_stripped.py: a
  copy of the source with every `# audit point` and `# observer` line deleted, imported
  beside mmud as `mmud_stripped`). Address-space isolation is off in these VMs.
- `audit_full_ratio[<mem>]`: full audit at every point (rate limit 0) relative to off, for a
  guest whose RAM has first been touched through the guest kernel's direct map, so the
  shadow MMU holds a page per 4 KiB of RAM — the size the audit must walk. Measured in one
  process: a segment with the audit on (ten runs) between two equal segments off.
- `audit_ratelimited_ratio`: full audit with the default limit (10 runs per 5 s) relative to off.
- `audit_incremental_ratio`: incremental audit at every point relative to off.
- `audit_full_sptes_per_s`: a full audit over a faulted 1 GiB guest, sptes checked (512 per
  active shadow page) per second; the median of five runs after one untimed run.
- `detect_ops[<bug>,<mode>]`: MMU operations (VM exits: every page fault, trapped write,
  CR3 load and INVLPG is one) from arming the bug until the audit first reports, for
  full+ratelimited, full+every point and incremental. The dirty-log bugs run with slot 0
  logged and harvested by a scheduled task, a bitmap word per step with the vCPUs running
  in between, every 200 steps (their code path is the harvest). A bug not reported
  within the budget (60,000 steps or 60 s) prints the operations run with a `>` unit.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import mmud
from bench._common import figure, interleaved, median, paired_ratio
from bench._stripped import kernel_vm, without_hooks
from mmud.campaign.kinds.detect import MODES, detect
from mmud.campaign.kinds.overhead import touched_vm
from mmud.uapi.bugs import BUGS

def _stepper(vm: mmud.VM, steps: int) -> Callable[[], list[float]]:
    def measure() -> list[float]:
        t = time.perf_counter()
        vm.step(steps)
        return [steps / (time.perf_counter() - t)]
    return measure


def throughput(quick: bool) -> None:
    rounds = 4 if quick else 200
    steps = 250 if quick else 1000
    with without_hooks() as stripped:
        vms = {
            "stripped": kernel_vm(stripped),
            "off": kernel_vm(mmud),
            "ratelimited": kernel_vm(mmud, MODES["ratelimited"]),
            "incremental": kernel_vm(mmud, MODES["incremental"]),
        }
        for vm in vms.values():
            vm.step(300)
        samples = interleaved({name: _stepper(vm, steps) for name, vm in vms.items()}, rounds)
    figure("audit_off_ratio", paired_ratio(samples, "off", "stripped"), "ratio")
    figure("audit_ratelimited_ratio", paired_ratio(samples, "ratelimited", "off"), "ratio")
    figure("audit_incremental_ratio", paired_ratio(samples, "incremental", "off"), "ratio")
    sizes = ((64, "64M"),) if quick else ((64, "64M"), (256, "256M"), (1024, "1G"))
    for mem_mb, label in sizes:
        figure(f"audit_full_ratio[{label}]", full_ratio(mem_mb, 3 if quick else 10), "ratio")


def full_ratio(mem_mb: int, runs: int) -> float:
    """Steps/s with the full audit at every point over steps/s with it off, on one VM:
    a segment with the audit on (until `runs` audit runs) between two equal segments off."""
    vm = touched_vm(mem_mb)
    vm.params["mmu_audit_ratelimit_ms"] = "0"

    def segment(steps: int | None) -> tuple[int, float]:
        t0, n = time.perf_counter(), 0
        if steps is None:
            start = vm.stats["mmu_audit_runs"]
            while vm.stats["mmu_audit_runs"] - start < runs:
                n += vm.step(1)
        else:
            n = vm.step(steps)
        return n, time.perf_counter() - t0

    vm.params["mmu_audit"] = "1"
    n, t_full = segment(None)
    vm.params["mmu_audit"] = "0"
    _, t_off1 = segment(n)
    _, t_off2 = segment(n)
    return ((t_off1 + t_off2) / 2) / t_full


def full_audit_speed(quick: bool) -> None:
    vm = touched_vm(64 if quick else 1024)
    pages = len(vm.mmu.active_mmu_pages)
    assert vm.audit() == []  # the first run grows the heap that later runs reuse
    times = []
    for _ in range(5):
        t = time.perf_counter()
        assert vm.audit() == []
        times.append(time.perf_counter() - t)
    figure("audit_full_sptes_per_s", pages * 512 / median(times), "sptes/s")


def detection(quick: bool) -> None:
    """The detect campaign's job (mmud/campaign/kinds/detect.py) for seed 11, with a wall-time
    budget besides the step budget."""
    budget_steps = 3000 if quick else 60000
    budget_s = 10 if quick else 60
    bugs = BUGS[:2] if quick else BUGS
    for bug in bugs:
        for mode in MODES:
            deadline = time.monotonic() + budget_s
            d = detect(bug.name, mode, seed=11, budget_steps=budget_steps,
                       give_up=lambda: time.monotonic() >= deadline)  # noqa: B023 - called now
            unit = ("ops" if d.reported else "ops (>, the guest crashed first)" if d.crashed
                    else "ops (>, not reported)")
            figure(f"detect_ops[{bug.name},{mode}]", d.ops, unit)


def run(quick: bool = False) -> None:
    throughput(quick)
    full_audit_speed(quick)
    detection(quick)

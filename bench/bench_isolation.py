"""Cost of address-space isolation (docs/isolation.md) and of its hooks when it is off.

- `isolation_on_ratio`: guest throughput (kernel workload, scheduler steps per second) with
  `address_space_isolation=Y` over the same with `N`, two VMs of the same seed stepped side
  by side in interleaved rounds (median of the rounds).  With isolation on, every VM exit
  switches address spaces and takes an isolation fault at its first unmapped touch, as a
  freshly loaded module does before anything is added to the KVM address space.
- `isolation_off_ratio`: throughput with isolation off (nobody listens to the MMU's events)
  over the hooks-removed build (bench/_stripped.py), ABBA rounds of 1,000 steps, the median
  of the per-round ratios: what the touch points cost when isolation is off.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import mmud
from bench._common import figure, interleaved, median, paired_ratio
from bench._stripped import kernel_vm, without_hooks


def _stepper(vm: mmud.VM, steps: int) -> Callable[[], list[float]]:
    def measure() -> list[float]:
        t0 = time.perf_counter()
        vm.step(steps)
        return [steps / (time.perf_counter() - t0)]

    return measure


def _booted(isolation: str) -> mmud.VM:
    vm = mmud.VM(seed=1, workload="kernel", params={"address_space_isolation": isolation})
    vm.step(2000)  # boot and first processes
    return vm


def run(quick: bool = False) -> None:
    steps = 500 if quick else 20000
    samples = interleaved({"on": _stepper(_booted("Y"), steps), "off": _stepper(_booted("N"), steps)},
                          rounds=2 if quick else 7)
    figure("isolation_on_ratio", median(samples["on"]) / median(samples["off"]), "ratio")
    with without_hooks() as stripped:
        vms = {"off": kernel_vm(mmud), "stripped": kernel_vm(stripped)}
        for vm in vms.values():
            vm.step(300)
        samples = interleaved({name: _stepper(vm, 250 if quick else 1000) for name, vm in vms.items()},
                              rounds=4 if quick else 200)
    figure("isolation_off_ratio", paired_ratio(samples, "off", "stripped"), "ratio")

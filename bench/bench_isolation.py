"""Cost of address-space isolation (issue 5).

- `isolation_on_ratio`: guest throughput (kernel workload, scheduler steps per second) with
  `address_space_isolation=Y` over the same with `N`, two VMs of the same seed stepped side
  by side in interleaved rounds (median of the rounds).  With isolation on, every VM exit
  switches address spaces and takes an isolation fault at its first unmapped touch, as a
  freshly loaded module does before anything is added to the KVM address space.
"""

from __future__ import annotations

import time

import mmud
from bench._common import figure, interleaved, median


def _stepper(isolation: str, steps: int):
    vm = mmud.VM(seed=1, workload="kernel", params=mmud.Params({"address_space_isolation": isolation}))
    vm.step(2000)  # boot and first processes

    def measure() -> list[float]:
        t0 = time.perf_counter()
        vm.step(steps)
        return [steps / (time.perf_counter() - t0)]

    return measure


def run(quick: bool = False) -> None:
    steps = 500 if quick else 20000
    samples = interleaved({"on": _stepper("Y", steps), "off": _stepper("N", steps)},
                          rounds=2 if quick else 7)
    figure("isolation_on_ratio", median(samples["on"]) / median(samples["off"]), "ratio")

"""The workload protocol the VM drives: one generator per vCPU, each yield one scheduler step."""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import ClassVar

from mmud.guest.hw import GuestVcpu, GuestVm
from mmud.guest.kernel import Kernel


class Workload:
    """A guest: the kernel model plus the user programs it keeps running.

    Subclasses say which processes exist (`replenish`); the kernel schedules them. All
    randomness comes from the seed, so the same seed and the same VM scheduling give the
    same guest behaviour step for step.
    """

    name: ClassVar[str]

    def __init__(self, vm: GuestVm, seed: int) -> None:
        self.kernel = Kernel(vm, seed)
        self.rng = random.Random(f"{self.name}/{seed}")

    @property
    def counters(self) -> dict[str, int]:
        return self.kernel.status()

    @property
    def errors(self) -> list[str]:
        """The first data errors and oopses, verbatim."""
        return self.kernel.errors

    def task(self, vcpu: GuestVcpu) -> Iterator[None]:
        """The vCPU's life: boot onto the kernel tables, then schedule forever."""
        yield from self.kernel.cpu_up(vcpu)
        while True:
            yield from self.replenish(vcpu)
            yield from self.kernel.run_slice(vcpu)

    def replenish(self, vcpu: GuestVcpu) -> Iterator[None]:
        """Start the processes the workload is missing, on this vCPU."""
        raise NotImplementedError

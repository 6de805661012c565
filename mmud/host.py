"""Host-side activity that runs beside the vCPUs: what the VMM does to a running VM.

`memslot_churn` plays a VMM that keeps adding, moving, re-flagging and deleting one small
memslot while the guest runs, as the KVM selftests memslot_modification_stress_test and
memslot_perf_test do. Each memslot ioctl is one scheduler step. The guest never touches the
churned range; what it checks — every load against what it stored — is that churn elsewhere
never disturbs its own memory (no spurious MMIO, no stale translation). The task checks
the slot itself: data survives a move (same userspace memory) and a re-created slot is zero.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from typing import Any

from mmud.x86.paging import PAGE_SIZE

CHURN_SLOT = 8
CHURN_PAGES = 16
# The slot moves between four places 1 GiB apart, from 1 TiB up, far above the RAM of most
# guests and the ioram device (churn_gpas).
CHURN_BASE = 1 << 40
CHURN_STRIDE = 1 << 30
# Scheduler steps of this task between two ioctls (the vCPUs get the steps in between).
CHURN_IDLE_STEPS = (20, 200)
MARKER = 0x6D656D736C6F7421  # "memslot!"


def churn_gpas(ram_end: int) -> tuple[int, ...]:
    """Where the churned slot may be: from 1 TiB, or past the end of RAM of a guest that
    reaches that high."""
    base = max(CHURN_BASE, -(-ram_end // CHURN_STRIDE) * CHURN_STRIDE)
    return tuple(base + k * CHURN_STRIDE for k in range(4))


class ChurnError(RuntimeError):
    """The churned slot's memory did not behave as KVM promises."""


def memslot_churn(vm: Any, seed: int) -> Iterator[None]:
    rng = random.Random(f"memslot_churn/{seed}")
    size = CHURN_PAGES * PAGE_SIZE

    def idle() -> Iterator[None]:
        for _ in range(rng.randint(*CHURN_IDLE_STEPS)):
            yield

    places = churn_gpas(vm.ram_ranges[-1][1])
    while True:
        gpa = rng.choice(places)
        vm.set_memslot(CHURN_SLOT, gpa, size)
        if vm.read_u64(gpa) != 0:
            raise ChurnError(f"new memslot at {gpa:#x} is not zeroed")
        vm.write_u64(gpa, MARKER)
        yield from idle()
        new_gpa = rng.choice([g for g in places if g != gpa])
        vm.set_memslot(CHURN_SLOT, new_gpa, size)
        if vm.read_u64(new_gpa) != MARKER:
            raise ChurnError(f"memslot moved to {new_gpa:#x} lost its contents")
        yield from idle()
        vm.set_memslot(CHURN_SLOT, new_gpa, size, log_dirty=True)
        yield from idle()
        vm.set_memslot(CHURN_SLOT, new_gpa, 0)
        yield from idle()


# Workload name -> (the guest workload it runs, the host task beside it).
HOST_WORKLOADS: dict[str, tuple[str, Callable[[Any, int], Iterator[None]]]] = {
    "memslot_churn": ("kernel", memslot_churn),
}

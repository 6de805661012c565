"""The guest sees correct memory through the shadow MMU.

A scripted process stores known values and checks them across context switches, fork and
copy-on-write, mprotect and munmap/re-mmap, while a random `kernel`-workload process churns
memory beside it on a second vCPU. The `stream` workload must reach a steady state without
faults or data errors.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import mmud
from mmud.guest import Workload
from mmud.guest.kernel import Kernel, SegmentationFault, Task
from mmud.guest.mm import HEAP_START, VM_READ, VM_WRITE
from mmud.guest.pgtable import PAGE_SIZE
from mmud.guest.workloads import Limits, ProcessProgram, process_layout

PARENT = 0x1111_0000_0000_0000
CHILD = 0x2222_0000_0000_0000
NR_PAGES = 8
# Steps a scripted process gives away so that the other tasks run and vCPUs switch.
PAUSE = 300
MAX_STEPS = 200_000


def words() -> list[int]:
    return [HEAP_START + i * PAGE_SIZE + 8 * i for i in range(NR_PAGES)]


def pause(steps: int = PAUSE) -> Iterator[None]:
    for _ in range(steps):
        yield


def load_all(k: Kernel, task: Task) -> Iterator[None]:
    values = []
    for addr in words():
        values.append((yield from k.get_user(task, addr)))
    return values


@dataclass
class Child:
    seen: dict[str, Any]

    def run(self, k: Kernel, task: Task) -> Iterator[None]:
        self.seen["child_inherited"] = yield from load_all(k, task)
        for i, addr in enumerate(words()):
            yield from k.put_user(task, addr, CHILD + i)
        yield from pause()
        self.seen["child_own"] = yield from load_all(k, task)
        self.seen["child_done"] = True


@dataclass
class Parent:
    seen: dict[str, Any] = field(default_factory=dict)

    def run(self, k: Kernel, task: Task) -> Iterator[None]:
        seen = self.seen
        for i, addr in enumerate(words()):
            yield from k.put_user(task, addr, PARENT + i)
        yield from pause()
        seen["after_switches"] = yield from load_all(k, task)

        yield from k.do_fork(task, Child(seen))
        while not seen.get("child_done"):
            yield
        seen["parent_after_cow"] = yield from load_all(k, task)

        first = words()[0]
        yield from k.sys_mprotect(task, HEAP_START, HEAP_START + PAGE_SIZE, write=False)
        try:
            yield from k.put_user(task, first, 0xBAD)
            seen["readonly_store"] = "succeeded"
        except SegmentationFault as fault:
            seen["readonly_store"] = fault.error_code
        seen["readonly_load"] = yield from k.get_user(task, first)

        area = k.sys_mmap(task, 4, VM_READ | VM_WRITE)
        for page in range(4):
            yield from k.put_user(task, area + page * PAGE_SIZE, PARENT)
        yield from k.sys_munmap(task, area, area + 4 * PAGE_SIZE)
        seen["remapped_same_area"] = k.sys_mmap(task, 4, VM_READ | VM_WRITE) == area
        seen["remapped"] = []
        for page in range(4):
            seen["remapped"].append((yield from k.get_user(task, area + page * PAGE_SIZE)))
        seen["done"] = True
        while True:
            yield


class Scripted(Workload):
    """The scripted parent plus one random process, started once."""

    name = "scripted"

    def __init__(self, vm: Any, seed: int) -> None:
        super().__init__(vm, seed)
        self.parent = Parent()
        self.started = False

    def replenish(self, vcpu: Any) -> Iterator[None]:
        if self.started:
            return
        self.started = True
        limits = Limits.for_frames(self.kernel.frames.nr_frames)
        yield from self.kernel.spawn(vcpu, process_layout(0), [self.parent])
        noise = ProcessProgram(random.Random(self.rng.getrandbits(64)), limits)
        yield from self.kernel.spawn(vcpu, process_layout(1), [noise])


def test_process_memory_survives_switches_fork_mprotect_and_munmap() -> None:
    vm = mmud.VM(mem_mb=64, vcpus=2, seed=0)
    workload = Scripted(vm, seed=0)
    tasks = [workload.task(vcpu) for vcpu in vm.vcpus]
    rng = random.Random(0)
    for _ in range(MAX_STEPS):
        next(rng.choice(tasks))
        if workload.parent.seen.get("done"):
            break
    seen = workload.parent.seen
    assert seen.get("done"), seen
    parent = [PARENT + i for i in range(NR_PAGES)]
    assert seen["after_switches"] == parent
    assert seen["child_inherited"] == parent
    assert seen["child_own"] == [CHILD + i for i in range(NR_PAGES)]
    assert seen["parent_after_cow"] == parent
    assert seen["readonly_store"] == 0x7  # P | W | U: a protection fault from user mode
    assert seen["readonly_load"] == PARENT
    assert seen["remapped_same_area"]
    assert seen["remapped"] == [0, 0, 0, 0]
    counters = workload.counters
    assert counters["cow_copies"] >= NR_PAGES
    assert counters["context_switches"] > 2
    assert counters["data_errors"] == 0, workload.errors


def test_stream_reaches_a_fault_free_steady_state() -> None:
    vm = mmud.VM(mem_mb=16, vcpus=2, seed=0, workload="stream")
    workload = vm.workload
    for _ in range(MAX_STEPS // 1000):
        vm.step(1000)
        if workload.counters["anon_faults"] == workload.nr_pages:
            break
    counters = workload.counters
    assert counters["anon_faults"] == workload.nr_pages
    vm.step(5000)
    after = workload.counters
    assert after["page_faults"] == counters["page_faults"]
    assert after["reads"] > counters["reads"] and after["writes"] > counters["writes"]
    assert after["data_errors"] == 0, workload.errors

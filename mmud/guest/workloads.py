"""The `kernel` and `stream` workloads: user programs on the guest kernel model.

`kernel` keeps several processes busy with what makes a shadow MMU work hard: demand
paging, context switches, munmap/mprotect with INVLPG, fork with copy-on-write, exits that
free page tables for reuse, prefaulting bursts that write one directory several times in a
row (write flooding), page-table moves that rewrite a pmd (pde zapping) and sweeps over many
pages (shadow page recycling under a small budget).

`stream` is one process whose threads (one per vCPU) touch a fixed working set with a
read/write mix: demand paging first, then a steady state of hits.

Every load is checked against what the process stored (`MM.expected`); a mismatch is a data
error, the one outcome a correct MMU never produces.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from mmud.guest.hw import GuestVcpu, GuestVm
from mmud.guest.kernel import Kernel, SegmentationFault, Task
from mmud.guest.mm import (
    HEAP_START,
    STACK_TOP,
    TEXT_START,
    VM_EXEC,
    VM_READ,
    VM_WRITE,
    VMA,
)
from mmud.guest.pgtable import PAGE_SIZE, PMD_SIZE, PTRS_PER_TABLE
from mmud.guest.workload import Workload

# Words of a page the programs use, spread over the page: few enough that the memory oracle
# stays bounded (at most this many entries per resident page) in runs of any length.
WORD_SLOTS = 8
# Program images (page-cache files) shared by the processes: the same text frames appear in
# many address spaces at once.
NR_IMAGES = 3
TEXT_PAGES = 16
DATA_PAGES = 16
HEAP_PAGES = 256
STACK_PAGES = 32
# Recently touched pages a process keeps returning to (its hot set).
HOT_PAGES = 64
# Sizes of anonymous mmaps, in pages: mostly small, sometimes several PTE tables wide.
MMAP_SIZES = (1, 4, 16, 64, 256, 1024, 2048)
SWEEP_PAGES = 64
# Fraction of RAM user pages may take; the rest is page tables, page cache and slack.
USER_MEMORY_SHARE = 0.7
# Resident pages one process is sized for; fewer processes run on a small VM.
PROCESS_PAGES = 1000
MAX_PROCESSES = 12
STREAM_MAX_PAGES = 8192
STREAM_WRITE_RATIO = 0.3

# One operation of a process: a system activity that yields at its preemption points.
Op = Callable[[Kernel, Task], Iterator[None]]


def check_load(k: Kernel, task: Task, addr: int, expected: int) -> Iterator[None]:
    """Load a user word and compare it with what the process knows is there."""
    value = yield from k.get_user(task, addr)
    if value != expected:
        k.error(f"pid {task.pid}: load {addr:#x} = {value:#x}, expected {expected:#x}")


def random_word(rng: random.Random, page: int) -> int:
    return page + rng.randrange(WORD_SLOTS) * (PAGE_SIZE // WORD_SLOTS)


@dataclass(frozen=True)
class Limits:
    """Process population and size, derived from the VM's memory."""

    min_processes: int
    target_processes: int
    max_processes: int
    rss: int

    @classmethod
    def for_frames(cls, nr_frames: int) -> Limits:
        user_pages = int(nr_frames * USER_MEMORY_SHARE)
        nr_max = max(2, min(MAX_PROCESSES, user_pages // PROCESS_PAGES))
        return cls(
            min_processes=max(1, nr_max // 3),
            target_processes=max(1, nr_max * 2 // 3),
            max_processes=nr_max,
            rss=user_pages // nr_max,
        )


def process_layout(image: int) -> list[VMA]:
    """The VMAs of a freshly exec'ed process running program image `image`."""
    text_end = TEXT_START + TEXT_PAGES * PAGE_SIZE
    data_end = text_end + DATA_PAGES * PAGE_SIZE
    return [
        VMA(TEXT_START, text_end, VM_READ | VM_EXEC, file=image),
        VMA(text_end, data_end, VM_READ | VM_WRITE),
        VMA(HEAP_START, HEAP_START + HEAP_PAGES * PAGE_SIZE, VM_READ | VM_WRITE),
        VMA(STACK_TOP - STACK_PAGES * PAGE_SIZE, STACK_TOP, VM_READ | VM_WRITE),
    ]


@dataclass
class ProcessProgram:
    """A process of the `kernel` workload: one random system activity per operation."""

    rng: random.Random
    limits: Limits
    hot: list[int] = field(default_factory=list)

    def clone(self) -> ProcessProgram:
        """The child's copy after fork: same hot set, its own random stream."""
        return ProcessProgram(random.Random(self.rng.getrandbits(64)), self.limits, list(self.hot))

    def run(self, k: Kernel, task: Task) -> Iterator[None]:
        # None is exit(): the generator returns and the kernel reaps the task.
        ops: tuple[tuple[Op | None, float], ...] = (
            (self.touch, 50),
            (self.sweep, 3),
            (self.fetch, 6),
            (self.mmap, 5),
            (self.munmap, 4),
            (self.mprotect, 3),
            (self.populate, 2),
            (self.replace_table, 1.5),
            (self.fork, 1),
            (None, 0.5),
        )
        funcs = [func for func, _ in ops]
        weights = [w for _, w in ops]
        while True:
            op = self._next_op(task, funcs, weights)
            if op is None:
                if k.nr_processes > self.limits.min_processes:
                    return
                continue
            k.counters["ops"] += 1
            yield from op(k, task)

    def _next_op(self, task: Task, funcs: list[Op | None], weights: list[float]) -> Op | None:
        """A random operation by weight; over its RSS budget the process must shrink (munmap),
        or exit if it has nothing it may unmap."""
        if task.mm.rss > self.limits.rss:
            return self.munmap if any(v.mapped for v in task.mm.vmas) else None
        return self.rng.choices(funcs, weights)[0]

    # -- memory accesses ---------------------------------------------------------------

    def _remember(self, page: int) -> None:
        if len(self.hot) < HOT_PAGES:
            self.hot.append(page)
        else:
            self.hot[self.rng.randrange(HOT_PAGES)] = page

    def _pick_page(self, task: Task) -> int:
        """A hot page most of the time, else a random page of a random VMA."""
        if self.hot and self.rng.random() < 0.7:
            page = self.rng.choice(self.hot)
            if task.mm.find_vma(page) is not None:
                return page
            self.hot.remove(page)
        vma = self.rng.choice(task.mm.vmas)
        return vma.start + self.rng.randrange(vma.nr_pages) * PAGE_SIZE

    def access_page(self, k: Kernel, task: Task, page: int, write: bool) -> Iterator[None]:
        """Store to or load from a random word of page, checking loads; text is read-only."""
        vma = task.mm.find_vma(page)
        assert vma is not None
        self._remember(page)
        if vma.file is not None:
            yield from check_load(k, task, page, k.file_word(vma.file, vma.pgoff(page)))
            return
        addr = random_word(self.rng, page)
        if write and vma.flags & VM_WRITE:
            yield from k.put_user(task, addr, self.rng.getrandbits(64))
        else:
            yield from check_load(k, task, addr, task.mm.expected.get(addr, 0))

    def touch(self, k: Kernel, task: Task) -> Iterator[None]:
        yield from self.access_page(k, task, self._pick_page(task), self.rng.random() < 0.4)

    def sweep(self, k: Kernel, task: Task) -> Iterator[None]:
        """Touch a run of consecutive pages: many PTEs of one table, many translations."""
        vma = self.rng.choice([v for v in task.mm.vmas if v.file is None])
        first = self.rng.randrange(vma.nr_pages)
        for index in range(first, min(vma.nr_pages, first + SWEEP_PAGES)):
            write = self.rng.random() < 0.5
            yield from self.access_page(k, task, vma.start + index * PAGE_SIZE, write)

    def fetch(self, k: Kernel, task: Task) -> Iterator[None]:
        """Execute from the program image, then read the page's known first word."""
        text = next(v for v in task.mm.vmas if v.file is not None)
        page = text.start + self.rng.randrange(text.nr_pages) * PAGE_SIZE
        yield from k.exec_user(task, random_word(self.rng, page))
        yield from self.access_page(k, task, page, write=False)

    # -- address-space changes ---------------------------------------------------------

    def _pick_mapped(self, task: Task) -> VMA | None:
        mapped = [v for v in task.mm.vmas if v.mapped]
        return self.rng.choice(mapped) if mapped else None

    def _mmap_and_access(self, k: Kernel, task: Task, nr_pages: int, write: bool) -> Iterator[None]:
        addr = k.sys_mmap(task, nr_pages, VM_READ | VM_WRITE)
        if addr is not None:
            yield from self.access_page(k, task, addr, write)

    def mmap(self, k: Kernel, task: Task) -> Iterator[None]:
        yield from self._mmap_and_access(k, task, self.rng.choice(MMAP_SIZES), write=True)

    def munmap(self, k: Kernel, task: Task) -> Iterator[None]:
        """Unmap a whole mmap area or a piece of it, and sometimes map the hole again."""
        vma = self._pick_mapped(task)
        if vma is None:
            return
        start, end = vma.start, vma.end
        if vma.nr_pages > 1 and self.rng.random() < 0.3:
            start += self.rng.randrange(vma.nr_pages) * PAGE_SIZE
            end = min(end, start + self.rng.randint(1, vma.nr_pages) * PAGE_SIZE)
        yield from k.sys_munmap(task, start, end)
        if self.rng.random() < 0.5:
            # A fresh mapping must read as zeroes, whatever the frames held before.
            yield from self._mmap_and_access(k, task, (end - start) // PAGE_SIZE, write=False)

    def mprotect(self, k: Kernel, task: Task) -> Iterator[None]:
        """Flip an mmap area between read-write and read-only; probe a read-only one."""
        vma = self._pick_mapped(task)
        if vma is None:
            return
        write = not vma.flags & VM_WRITE
        start, end = vma.start, vma.end
        yield from k.sys_mprotect(task, start, end, write)
        if not write:
            page = start + self.rng.randrange(vma.nr_pages) * PAGE_SIZE
            yield from self.probe_readonly(k, task, page)

    def probe_readonly(self, k: Kernel, task: Task, page: int) -> Iterator[None]:
        """A store to a read-only page must raise SIGSEGV, which the program handles."""
        addr = random_word(self.rng, page)
        try:
            yield from k.put_user(task, addr, self.rng.getrandbits(64))
        except SegmentationFault:
            k.counters["segv_caught"] += 1
        else:
            k.error(f"pid {task.pid}: store to read-only {addr:#x} succeeded")

    def populate(self, k: Kernel, task: Task) -> Iterator[None]:
        """MAP_POPULATE over several pmds: one directory written again and again."""
        nr_pmds = self.rng.randint(3, 6)
        addr = k.sys_mmap(task, nr_pmds * PTRS_PER_TABLE, VM_READ | VM_WRITE)
        if addr is None:
            return
        for i in range(nr_pmds):
            page = addr + i * PMD_SIZE + self.rng.randrange(PTRS_PER_TABLE) * PAGE_SIZE
            yield from k.populate(task, page)
            self._remember(page)

    def replace_table(self, k: Kernel, task: Task) -> Iterator[None]:
        if self.hot:
            yield from k.replace_pte_table(task, self.rng.choice(self.hot))

    def fork(self, k: Kernel, task: Task) -> Iterator[None]:
        if k.nr_processes < self.limits.max_processes:
            yield from k.do_fork(task, self.clone())


@dataclass
class StreamProgram:
    """One thread of the `stream` process: random words of a fixed working set."""

    rng: random.Random
    base: int
    nr_pages: int

    def run(self, k: Kernel, task: Task) -> Iterator[None]:
        while True:
            k.counters["ops"] += 1
            page = self.base + self.rng.randrange(self.nr_pages) * PAGE_SIZE
            addr = random_word(self.rng, page)
            if self.rng.random() < STREAM_WRITE_RATIO:
                yield from k.put_user(task, addr, self.rng.getrandbits(64))
            else:
                yield from check_load(k, task, addr, task.mm.expected.get(addr, 0))


class KernelWorkload(Workload):
    name = "kernel"

    def __init__(self, vm: GuestVm, seed: int) -> None:
        super().__init__(vm, seed)
        self.limits = Limits.for_frames(self.kernel.frames.nr_frames)

    def replenish(self, vcpu: GuestVcpu) -> Iterator[None]:
        if self.kernel.nr_processes < self.limits.target_processes:
            program = ProcessProgram(random.Random(self.rng.getrandbits(64)), self.limits)
            image = self.rng.randrange(NR_IMAGES)
            yield from self.kernel.spawn(vcpu, process_layout(image), [program])


class StreamWorkload(Workload):
    name = "stream"

    def __init__(self, vm: GuestVm, seed: int) -> None:
        super().__init__(vm, seed)
        self.nr_pages = min(STREAM_MAX_PAGES, self.kernel.frames.nr_frames // 4)
        self.nr_threads = len(vm.vcpus)
        self.started = False

    def replenish(self, vcpu: GuestVcpu) -> Iterator[None]:
        if self.started:
            return
        self.started = True
        heap = VMA(HEAP_START, HEAP_START + self.nr_pages * PAGE_SIZE, VM_READ | VM_WRITE)
        threads = [
            StreamProgram(random.Random(self.rng.getrandbits(64)), HEAP_START, self.nr_pages)
            for _ in range(self.nr_threads)
        ]
        yield from self.kernel.spawn(vcpu, [heap], threads)

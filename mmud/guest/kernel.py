"""The guest kernel: boot page tables, tasks, the per-vCPU scheduler, #PF handling, syscalls.

A small model of Linux x86-64 running as the guest of the simulated shadow MMU. It maps all
RAM the e820 map lists at PAGE_OFFSET with 2 MiB pages, gives every process its own pgd
sharing the kernel half, demand-pages user memory, and implements
mmap/munmap/mprotect/fork/exit with the TLB maintenance Linux does (INVLPG per page, CR3
reload for whole-mm flushes). The workloads (workloads.py) are user programs on top of it.

Concurrency model: one generator per vCPU (`cpu_loop`); vCPUs interleave only at yields. A
task runs on at most one vCPU at a time and only single-threaded processes ever remove
mappings, so no cross-vCPU TLB shootdown is ever needed: every vCPU that switches mm reloads
CR3 and so flushes.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np

from mmud.guest import memory
from mmud.guest.frames import BadPage, FrameAllocator, OutOfMemory
from mmud.guest.hw import GuestVcpu, GuestVm, PageFault
from mmud.guest.ioremap import IoramDriver, ioram_mappable, ioremap_boot
from mmud.guest.mm import MM, VM_WRITE, VMA
from mmud.guest.pgtable import (
    _KERNPG_TABLE,
    _PAGE_KERNEL_LARGE,
    KERNEL_PGD_BOUNDARY,
    PAGE_OFFSET,
    PAGE_SHIFT,
    PAGE_SIZE,
    PGDIR_SIZE,
    PMD_SIZE,
    PTRS_PER_TABLE,
    PUD_SIZE,
    pgd_index,
)
from mmud.x86 import paging as pg

COUNTERS = (
    "ops",  # user operations the programs performed
    "reads",
    "writes",
    "fetches",
    "page_faults",  # guest #PFs taken from user mode
    "anon_faults",
    "file_faults",
    "cow_copies",
    "cow_reuses",
    "spurious_faults",
    "pt_pages_allocated",
    "pt_pages_freed",
    "pte_tables_replaced",
    "invlpg",
    "tlb_flushes",
    "context_switches",
    "spawns",
    "forks",
    "fork_failed",
    "exits",
    "mmaps",
    "munmaps",
    "mprotects",
    "populates",
    "segv",  # tasks killed by SIGSEGV they did not expect
    "segv_caught",  # expected SIGSEGVs (protection probes)
    "fault_loops",  # accesses still faulting after MAX_FAULT_RETRIES fixes
    "oom_kills",
    "oops",  # kernel-mode faults and bad page maps: the task is abandoned
    "data_errors",  # a load returned something other than what was stored
    "ioram_io",  # write + read-back pairs on the ioram device
)

# Boot page tables: frame 0 stays unused (as the real-mode IVT page would), then the kernel
# pgd, its pud and the direct map's pmd tables.
SWAPPER_PGD_PFN = 1
# The kernel never expects more than a couple of fixes for one access (map, then break COW).
MAX_FAULT_RETRIES = 4
# Steps a task runs before the vCPU schedules the next one.
TIMESLICE = (16, 128)
# Error messages kept verbatim for the report; the count goes on in `data_errors`.
MAX_ERRORS_KEPT = 16
# Chance per time slice that the ioram driver does one write and one read.
IORAM_IO_CHANCE = 0.25
# Frames fork keeps free beyond a copy of the parent's pages (tables, COW breaks).
FORK_RESERVE = 256


class SegmentationFault(Exception):
    """SIGSEGV for the current task: a user access the kernel refused to resolve."""

    def __init__(self, addr: int, error_code: int) -> None:
        super().__init__(f"segfault at {addr:#x} error {error_code:#x}")
        self.addr = addr
        self.error_code = error_code


class Program(Protocol):
    """The user-mode behaviour of one task: a generator that yields at preemption points."""

    def run(self, k: Kernel, task: Task) -> Iterator[None]: ...


@dataclass(eq=False)
class Task:
    pid: int
    mm: MM
    # The vCPU the task runs on, updated on migration. Until its first step, the vCPU that
    # created it: the scheduler sets the real one before the task runs.
    vcpu: GuestVcpu
    program: Program | None = None
    gen: Iterator[None] | None = field(default=None, repr=False)


class Kernel:
    def __init__(self, vm: GuestVm, seed: int) -> None:
        self.vm = vm
        self.rng = random.Random(seed)
        self.counters = dict.fromkeys(COUNTERS, 0)
        self.errors: list[str] = []
        # (file, page offset) -> frame of a program-image page; the cache holds a reference.
        self.page_cache: dict[tuple[int, int], int] = {}
        self.runqueue: deque[Task] = deque()
        self.nr_processes = 0
        self._next_pid = 1
        first_free, ram = self._boot_page_tables()
        self.ioram: IoramDriver | None = None
        if ioram_mappable(vm.ram_ranges):
            first_free = ioremap_boot(vm.write_u64, SWAPPER_PGD_PFN, first_free)
            self.ioram = IoramDriver(random.Random(f"ioram/{seed}"))
        self.frames = FrameAllocator([(max(first, first_free), end) for first, end in ram])
        self.init_mm = MM(pgd=SWAPPER_PGD_PFN)
        self.idle_tasks: dict[int, Task] = {}

    def _boot_page_tables(self) -> tuple[int, list[tuple[int, int]]]:
        """Build the direct map of every RAM range of the e820 map like a bootloader: host
        writes before any vCPU runs, 2 MiB pages (the largest the guest walk of the shadow
        MMU knows; Linux would use 1 GiB pages where the CPU has them), a pud table per
        512 GiB and a pmd table per GiB that holds RAM. The holes between the ranges stay
        unmapped, as init_mem_mapping() maps only RAM.

        Returns the first frame after the tables and the mapped RAM, as [first, end) pfns.
        """
        mapped = [(start, start + (end - start) // PMD_SIZE * PMD_SIZE)
                  for start, end in self.vm.ram_ranges]
        nr_puds = max(1, -(-max(end for _, end in mapped) // PGDIR_SIZE))
        gigs = np.array(sorted({g for start, end in mapped
                                for g in range(start // PUD_SIZE, -(-end // PUD_SIZE))}), dtype=np.int64)
        first_pud = SWAPPER_PGD_PFN + 1
        first_pmd = first_pud + nr_puds
        # The pud tables, then the pmd tables in the order of the GiBs they map.
        tables = np.zeros((nr_puds + len(gigs), PTRS_PER_TABLE), dtype=np.uint64)
        pmd_pfns = np.arange(first_pmd, first_pmd + len(gigs), dtype=np.uint64)
        tables[gigs // PTRS_PER_TABLE, gigs % PTRS_PER_TABLE] = (
            pmd_pfns << np.uint64(PAGE_SHIFT)) | np.uint64(_KERNPG_TABLE)
        for start, end in mapped:
            addrs = np.arange(start, end, PMD_SIZE, dtype=np.int64)
            rows = nr_puds + np.searchsorted(gigs, addrs // PUD_SIZE)
            tables[rows, addrs // PMD_SIZE % PTRS_PER_TABLE] = (
                addrs.astype(np.uint64) | np.uint64(_PAGE_KERNEL_LARGE))
        for k in range(nr_puds):
            self.vm.write_u64(_entry_gpa(SWAPPER_PGD_PFN, pgd_index(PAGE_OFFSET) + k),
                              ((first_pud + k) << PAGE_SHIFT) | _KERNPG_TABLE)
        self.vm.write_guest(first_pud << PAGE_SHIFT, tables.tobytes())
        return first_pmd + len(gigs), [(start // PAGE_SIZE, end // PAGE_SIZE) for start, end in mapped]

    # -- bookkeeping ---------------------------------------------------------------------

    def status(self) -> dict[str, int]:
        """Counters plus the current gauges, for vm0/status."""
        return self.counters | {
            "processes": self.nr_processes,
            "runnable": len(self.runqueue),
            "frames_free": self.frames.nr_free,
        }

    def error(self, message: str) -> None:
        self.counters["data_errors"] += 1
        if len(self.errors) < MAX_ERRORS_KEPT:
            self.errors.append(message)

    @staticmethod
    def file_word(file: int, pgoff: int) -> int:
        """Contents of the first word of a program-image page, known to every reader."""
        return ((file << 32 | pgoff) * 0x9E3779B97F4A7C15 + 1) % (1 << 64)

    def _new_pid(self) -> int:
        pid = self._next_pid
        self._next_pid += 1
        return pid

    # -- scheduler -----------------------------------------------------------------------

    def cpu_up(self, vcpu: GuestVcpu) -> Iterator[None]:
        """Bring a vCPU up on the kernel page tables, with SMEP and SMAP as Linux enables."""
        vcpu.cr4 |= pg.CR4_SMEP | pg.CR4_SMAP
        vcpu.cr3 = SWAPPER_PGD_PFN << PAGE_SHIFT
        self.idle_tasks[vcpu.index] = Task(pid=0, mm=self.init_mm, vcpu=vcpu)
        yield

    def run_slice(self, vcpu: GuestVcpu) -> Iterator[None]:
        """Pick the next runnable task and run it for a time slice, or idle one step."""
        if self.ioram is not None and self.ioram.rng.random() < IORAM_IO_CHANCE:
            self.ioram.io(vcpu, self.error)
            self.counters["ioram_io"] += 1
        if not self.runqueue:
            self._switch_mm(vcpu, self.init_mm)
            yield
            return
        task = self.runqueue.popleft()
        task.vcpu = vcpu
        if self._switch_mm(vcpu, task.mm):
            yield
        assert task.gen is not None
        reason = None
        try:
            for _ in range(self.rng.randint(*TIMESLICE)):
                next(task.gen)
                yield
        except StopIteration:
            reason = "exits"
        except SegmentationFault:
            reason = "segv"
        except OutOfMemory:
            reason = "oom_kills"
        except (PageFault, BadPage) as fault:
            self._oops(task, fault)
            self._release_mm(task.mm)
            return
        if reason is None:
            self.runqueue.append(task)
            return
        self.counters[reason] += 1
        try:
            yield from self.do_exit(task)
        except (PageFault, BadPage) as fault:
            self._oops(task, fault)

    def _switch_mm(self, vcpu: GuestVcpu, mm: MM) -> bool:
        """switch_mm: load mm's pgd unless this vCPU already runs on it."""
        cr3 = mm.pgd << PAGE_SHIFT
        if vcpu.cr3 == cr3:
            return False
        vcpu.cr3 = cr3
        self.counters["context_switches"] += 1
        return True

    def _oops(self, task: Task, fault: Exception) -> None:
        """A kernel-mode fault: the task dies without cleanup, its memory leaks."""
        self.counters["oops"] += 1
        if len(self.errors) < MAX_ERRORS_KEPT:
            self.errors.append(f"oops in pid {task.pid}: {fault!r}")

    def _release_mm(self, mm: MM) -> bool:
        """Drop a task's reference to its mm; True if that was the last one."""
        mm.users -= 1
        if mm.users:
            return False
        self.nr_processes -= 1
        return True

    def _start(self, task: Task) -> None:
        assert task.program is not None
        task.gen = task.program.run(self, task)
        self.runqueue.append(task)

    # -- process lifecycle ---------------------------------------------------------------

    def spawn(
        self, vcpu: GuestVcpu, vmas: Sequence[VMA], programs: Sequence[Program]
    ) -> Generator[None, None, bool]:
        """Start a process (execve into a fresh mm) with one thread per program."""
        pgd = yield from self._alloc_process(self.idle_tasks[vcpu.index], "oom_kills")
        if pgd is None:
            return False
        mm = MM(pgd=pgd, users=len(programs))
        for vma in vmas:
            mm.insert_vma(vma)
        for program in programs:
            self._start(Task(self._new_pid(), mm, vcpu, program))
        self.counters["spawns"] += 1
        return True

    def _alloc_process(self, task: Task, failure: str) -> Generator[None, None, int | None]:
        """Count a new process and allocate its pgd; None, counted as `failure`, on OOM."""
        self.nr_processes += 1
        try:
            return (yield from self.pgd_alloc(task))
        except OutOfMemory:
            self.nr_processes -= 1
            self.counters[failure] += 1
            return None

    def pgd_alloc(self, task: Task) -> Generator[None, None, int]:
        """A new pgd: zeroed, with the kernel half copied from swapper_pg_dir (pgd_ctor)."""
        pgd = yield from memory.alloc_zeroed_page(self, task)
        for index in range(KERNEL_PGD_BOUNDARY, PTRS_PER_TABLE):
            entry = memory.read_entry(task, SWAPPER_PGD_PFN, index)
            if entry:
                memory.set_entry(task, pgd, index, entry)
                yield
        return pgd

    def do_fork(self, task: Task, child_program: Program) -> Generator[None, None, None]:
        """fork(): a child running child_program on a copy-on-write copy of the mm."""
        parent = task.mm
        assert parent.users == 1, "multi-threaded processes do not fork"
        if self.frames.nr_free < 2 * parent.rss + FORK_RESERVE:
            self.counters["fork_failed"] += 1
            return
        pgd = yield from self._alloc_process(task, "fork_failed")
        if pgd is None:
            return
        vmas = [replace(v) for v in parent.vmas]
        child = MM(pgd=pgd, vmas=vmas, expected=dict(parent.expected))
        try:
            for vma in parent.vmas:
                yield from memory.copy_page_range(self, task, parent, child, vma)
        except OutOfMemory:
            yield from memory.exit_mmap(self, task, child)
            self.nr_processes -= 1
            self.counters["fork_failed"] += 1
        else:
            self._start(Task(self._new_pid(), child, task.vcpu, child_program))
            self.counters["forks"] += 1
        # The parent's writable PTEs became read-only: flush them from this vCPU's TLB.
        memory.flush_tlb_local(self, task)
        yield

    def do_exit(self, task: Task) -> Generator[None, None, None]:
        """Leave the mm for init_mm, and tear it down if this was its last user."""
        self._switch_mm(task.vcpu, self.init_mm)
        yield
        if self._release_mm(task.mm):
            yield from memory.exit_mmap(self, task, task.mm)

    # -- faults and user access ----------------------------------------------------------

    def do_page_fault(
        self, task: Task, addr: int, error_code: int
    ) -> Generator[None, None, None]:
        """The #PF handler for user-mode faults; raises SegmentationFault on a bad access."""
        self.counters["page_faults"] += 1
        write = bool(error_code & pg.PFERR_WRITE_MASK)
        fetch = bool(error_code & pg.PFERR_FETCH_MASK)
        vma = task.mm.find_vma(addr)
        if error_code & pg.PFERR_RSVD_MASK or vma is None or not vma.permits(write, fetch):
            raise SegmentationFault(addr, error_code)
        yield from memory.handle_mm_fault(self, task, vma, addr, write)

    def _user_access(
        self, task: Task, addr: int, *, write: bool = False, fetch: bool = False, value: int = 0
    ) -> Generator[None, None, int]:
        """One user-mode access, retried after each #PF the kernel fixed; returns the load.

        An access still faulting after MAX_FAULT_RETRIES fixes gets SIGSEGV with the last
        error code: the kernel cannot make progress on it.
        """
        last_error = 0
        for _ in range(MAX_FAULT_RETRIES):
            error_code, loaded = _user_op(task.vcpu, addr, write, fetch, value)
            yield
            if error_code is None:
                return loaded
            last_error = error_code
            yield from self.do_page_fault(task, addr, error_code)
        self.counters["fault_loops"] += 1
        raise SegmentationFault(addr, last_error)

    def get_user(self, task: Task, addr: int) -> Generator[None, None, int]:
        self.counters["reads"] += 1
        return (yield from self._user_access(task, addr))

    def put_user(self, task: Task, addr: int, value: int) -> Generator[None, None, None]:
        self.counters["writes"] += 1
        yield from self._user_access(task, addr, write=True, value=value)
        task.mm.expected[addr] = value

    def exec_user(self, task: Task, addr: int) -> Generator[None, None, None]:
        self.counters["fetches"] += 1
        yield from self._user_access(task, addr, fetch=True)

    # -- memory syscalls -----------------------------------------------------------------

    def sys_mmap(self, task: Task, nr_pages: int, flags: int) -> int | None:
        """Anonymous private mmap; pages arrive on demand."""
        length = nr_pages * PAGE_SIZE
        addr = task.mm.get_unmapped_area(length)
        if addr is None:
            return None
        task.mm.insert_vma(VMA(addr, addr + length, flags, mapped=True))
        self.counters["mmaps"] += 1
        return addr

    def sys_munmap(self, task: Task, start: int, end: int) -> Generator[None, None, None]:
        mm = task.mm
        yield from memory.zap_pte_range(self, task, mm, start, end, flush=True)
        mm.remove_vmas(start, end)
        if (yield from memory.free_pgd_range(self, task, mm, start, end)):
            # Freed tables may sit in paging-structure caches: flush everything.
            memory.flush_tlb_local(self, task)
            yield
        self.counters["munmaps"] += 1

    def sys_mprotect(
        self, task: Task, start: int, end: int, write: bool
    ) -> Generator[None, None, None]:
        for vma in task.mm.split(start, end):
            vma.flags = vma.flags | VM_WRITE if write else vma.flags & ~VM_WRITE
        yield from memory.change_protection(self, task, task.mm, start, end, write)
        self.counters["mprotects"] += 1

    def populate(self, task: Task, addr: int) -> Generator[None, None, None]:
        """Prefault one page as MAP_POPULATE does, without a user access."""
        vma = task.mm.find_vma(addr)
        assert vma is not None
        yield from memory.handle_mm_fault(self, task, vma, addr, bool(vma.flags & VM_WRITE))
        self.counters["populates"] += 1

    def replace_pte_table(self, task: Task, addr: int) -> Generator[None, None, None]:
        if (yield from memory.replace_pte_table(self, task, addr)):
            self.counters["pte_tables_replaced"] += 1


def _user_op(vcpu: GuestVcpu, addr: int, write: bool, fetch: bool, value: int) -> tuple[int | None, int]:
    """Run one user-mode access; return the #PF error code (None if none) and the load."""
    try:
        if write:
            vcpu.write_u64(addr, value, user=True)
        elif fetch:
            access = vcpu.access(addr, fetch=True, user=True)
            return (access.error_code if access.fault else None), 0
        else:
            value = vcpu.read_u64(addr, user=True)
    except PageFault as fault:
        return fault.error_code, 0
    return None, value


def _entry_gpa(table: int, index: int) -> int:
    return (table << PAGE_SHIFT) + 8 * index

"""Recording trace events (kvmmmu and kvm): trace instances, the per-VM tracer, and `vm.trace()`.

The module (`KvmModule.trace`, a `ModuleTrace`) holds the trace instances — the top-level one
that tracefs will show, and one per open `vm.trace()` session (ftrace's `instances/`), each
with its enabled events, their filters, an optional pid list (`set_event_pid`) and per-CPU
ring buffers. A VM of the module has a `VmTrace`; while some instance records any of its
events, a `Tracer` — an `MmuObserver` — is attached to its MMU, and with none it is detached,
so tracing off costs what any unobserved hook costs.

Who an event belongs to (docs/tracing.md): the VM's k-th vCPU runs as task `vcpu<k>`
on CPU k; everything else of the VM (ioctls, host tasks, the lock breaks of a zap) runs as
its VMM thread, task `vmm`, on CPU 0. The n-th VM created in the module (n = 0, 1, …) has
pids 1000·(n+1) for the VMM thread and 1000·(n+1) + 1 + k for vCPU k.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mmud.kvm.mmu.mmu import SET_SPTE_SPURIOUS
from mmud.kvm.mmu.observer import MmuObserver
from mmud.kvm.mmu.spte import get_mmio_spte_generation
from mmud.kvm.trace.events import (
    COMMON_FIELDS,
    EVENTS,
    EXIT_REASON_CR_ACCESS,
    EXIT_REASON_EXCEPTION_NMI,
    EXIT_REASON_INVLPG,
    EXIT_REASON_MSR_WRITE,
    KVM_EMUL_INSN_F_CR0_PE,
    KVM_EMUL_INSN_F_CS_L,
    KVM_ISA_VMX,
    KVM_TRACE_MMIO_READ,
    KVM_TRACE_MMIO_READ_UNSATISFIED,
    KVM_TRACE_MMIO_WRITE,
    Event,
    select,
    sptep_address,
    virt_to_phys,
)
from mmud.kvm.trace.filter import Predicate, compile_filter
from mmud.kvm.trace.ring import TRACE_BUF_SIZE_DEFAULT, CpuRing, Record
from mmud.x86.paging import ACC_ALL, PT64_NX_MASK, PT_ACCESSED_MASK, PT_DIRTY_MASK, PT_USER_MASK

if TYPE_CHECKING:
    from mmud.kvm.mmu.mmu import KvmMmu
    from mmud.kvm.mmu.page import ShadowPage

PID_STRIDE = 1000

# VM-exit interruption information of a #PF intercepted by shadow paging: valid, hardware
# exception, error code delivered, vector 14 (SDM vol. 3C §24.9.2).
PF_INTR_INFO = 0x80000000 | 3 << 8 | 1 << 11 | 14
# mmud's guest runs no instruction stream: RIP reads 0 and the emulator shows no bytes; the
# guest is always in 64-bit mode (CR0.PE, CS.L).
GUEST_RIP = 0
EMUL_FLAGS_PROT64 = KVM_EMUL_INSN_F_CR0_PE | KVM_EMUL_INSN_F_CS_L
VMM_COMM = "vmm"
VMM_CPU = 0


def vm_pids(number: int, vcpus: int) -> tuple[int, ...]:
    """The pids of the `number`-th VM: its VMM thread, then vCPU 0, 1, …"""
    base = PID_STRIDE * (number + 1)
    return (base, *(base + 1 + k for k in range(vcpus)))


# --- one VM --------------------------------------------------------------------------------------

class VmTrace:
    """The tracing side of one VM: its number in the module, and its tracer when attached."""

    def __init__(self, module: ModuleTrace, number: int, mmu: KvmMmu, clock: Callable[[], int],
                 current_task: Callable[[], str | None]) -> None:
        self.module = module
        self.number = number
        self.mmu = mmu
        self.clock = clock
        self.current_task = current_task
        self.tracer: Tracer | None = None
        self.vmm_pid = PID_STRIDE * (number + 1)

    def pids(self) -> set[int]:
        return set(vm_pids(self.number, len(self.mmu.vcpus)))

    def context(self) -> tuple[int, int, str]:
        """(cpu, pid, comm) of the task running now."""
        task = self.current_task()
        if task is not None and task.startswith("vcpu") and task[4:].isdigit():
            k = int(task[4:])
            return k, self.vmm_pid + 1 + k, task
        return VMM_CPU, self.vmm_pid, VMM_COMM

    def update(self) -> None:
        """Attach the tracer while some instance records an event of this VM, else detach."""
        wanted = self.module.enabled_for(self)
        if wanted and self.tracer is None:
            self.tracer = Tracer(self, wanted)
            self.mmu.attach(self.tracer)
        elif wanted and self.tracer is not None:
            self.tracer.on = wanted
        elif not wanted and self.tracer is not None:
            self.mmu.detach(self.tracer)
            self.tracer = None

    def emit(self, event: Event, values: tuple[int, ...]) -> None:
        cpu, pid, comm = self.context()
        flags, preempt = event.context
        record = Record(event, values, self.clock(), cpu, pid, comm, flags, preempt)
        for instance in self.module.instances:
            instance.record(record)


def _page(sp: ShadowPage) -> tuple[int, ...]:
    """KVM_MMU_PAGE_ASSIGN(sp)."""
    return (sp.mmu_valid_gen & 0xFF, sp.gfn, sp.role, sp.root_count, int(sp.unsync))


class Tracer(MmuObserver):
    """The kvmmmu tracepoints, fed by the MMU's observer events."""

    def __init__(self, vm: VmTrace, on: frozenset[str]) -> None:
        self.vm = vm
        self.on = on  # the events some instance records
        self.in_guest: set[int] = set()  # vCPUs entered and not exited since

    # --- the kvm system: entries, exits and the emulator ---------------------------------------

    def vcpu_enter_guest(self, vcpu_index: int) -> None:
        if vcpu_index not in self.in_guest:
            self.in_guest.add(vcpu_index)
            if "kvm_entry" in self.on:
                self.vm.emit(EVENTS["kvm_entry"], (vcpu_index, GUEST_RIP))

    def _exit(self, vcpu_index: int, reason: int, info1: int, intr_info: int = 0,
              error_code: int = 0) -> None:
        """kvm_exit with what vmx_get_exit_info() reads: the exit qualification as info1;
        info2 (the IDT-vectoring information) is 0, no event was being delivered.

        A vCPU that exits again without having passed vcpu_enter_guest (two CR writes in a
        row: mmud re-enters only when the next access needs it) was re-entered in between."""
        self.vcpu_enter_guest(vcpu_index)
        self.in_guest.discard(vcpu_index)
        if "kvm_exit" in self.on:
            self.vm.emit(EVENTS["kvm_exit"], (reason, GUEST_RIP, KVM_ISA_VMX, info1, 0, intr_info,
                                              error_code, vcpu_index))

    def handle_exception_nmi(self, vcpu_index: int, address: int, error_code: int) -> None:
        self._exit(vcpu_index, EXIT_REASON_EXCEPTION_NMI, address, PF_INTR_INFO, error_code)
        if "kvm_page_fault" in self.on:
            self.vm.emit(EVENTS["kvm_page_fault"], (address, error_code))

    def handle_cr(self, vcpu_index: int, cr: int, value: int) -> None:
        # Exit qualification: CR number, access type 0 (MOV to CR), register 0 (RAX).
        self._exit(vcpu_index, EXIT_REASON_CR_ACCESS, cr)
        if "kvm_cr" in self.on:
            self.vm.emit(EVENTS["kvm_cr"], (1, cr, value))

    def handle_wrmsr(self, vcpu_index: int, msr: int, value: int) -> None:
        self._exit(vcpu_index, EXIT_REASON_MSR_WRITE, 0)

    def handle_invlpg(self, vcpu_index: int, address: int) -> None:
        self._exit(vcpu_index, EXIT_REASON_INVLPG, address)

    def x86_decode_emulated_instruction(self, vcpu_index: int) -> None:
        if "kvm_emulate_insn" in self.on:
            self.vm.emit(EVENTS["kvm_emulate_insn"], (GUEST_RIP, 0, 0, 0, EMUL_FLAGS_PROT64, 0))

    def vcpu_mmio(self, write: bool, gpa: int, values: Iterable[int]) -> None:
        """A write is traced before it goes out (write_mmio); a read that no in-kernel device
        serves is traced unsatisfied when it exits to the VMM, then with its value when the
        emulator completes it (read_exit_mmio, read_prepare)."""
        if "kvm_mmio" not in self.on:
            return
        event = EVENTS["kvm_mmio"]
        for k, value in enumerate(values):
            if write:
                self.vm.emit(event, (KVM_TRACE_MMIO_WRITE, 8, gpa + 8 * k, int(value)))
            else:
                self.vm.emit(event, (KVM_TRACE_MMIO_READ_UNSATISFIED, 8, gpa + 8 * k, 0))
                self.vm.emit(event, (KVM_TRACE_MMIO_READ, 8, gpa + 8 * k, int(value)))

    # --- kvmmmu ----------------------------------------------------------------------------------

    def walk_addr(self, addr: int, pferr: int) -> None:
        if "kvm_mmu_pagetable_walk" in self.on:
            self.vm.emit(EVENTS["kvm_mmu_pagetable_walk"], (addr, pferr))

    def paging_element(self, pte: int, level: int) -> None:
        if "kvm_mmu_paging_element" in self.on:
            self.vm.emit(EVENTS["kvm_mmu_paging_element"], (pte, level))

    def update_accessed_dirty_bits(self, pte_gpa: int, old: int, new: int) -> None:
        # gpa = (table_gfn << PAGE_SHIFT) + index * sizeof(pte): the gpte's own address.
        if ~old & new & PT_ACCESSED_MASK and "kvm_mmu_set_accessed_bit" in self.on:
            self.vm.emit(EVENTS["kvm_mmu_set_accessed_bit"], (pte_gpa,))
        if ~old & new & PT_DIRTY_MASK and "kvm_mmu_set_dirty_bit" in self.on:
            self.vm.emit(EVENTS["kvm_mmu_set_dirty_bit"], (pte_gpa,))

    def walker_error(self, pferr: int) -> None:
        if "kvm_mmu_walker_error" in self.on:
            self.vm.emit(EVENTS["kvm_mmu_walker_error"], (pferr,))

    def kvm_mmu_get_page(self, sp: ShadowPage, created: bool) -> None:
        if "kvm_mmu_get_page" in self.on:
            self.vm.emit(EVENTS["kvm_mmu_get_page"], (*_page(sp), int(created)))

    def kvm_unlink_unsync_page(self, sp: ShadowPage) -> None:
        if "kvm_mmu_sync_page" in self.on:
            self.vm.emit(EVENTS["kvm_mmu_sync_page"], _page(sp))

    def kvm_unsync_page(self, sp: ShadowPage) -> None:
        if "kvm_mmu_unsync_page" in self.on:
            self.vm.emit(EVENTS["kvm_mmu_unsync_page"], _page(sp))

    def prepare_zap_page(self, sp: ShadowPage) -> None:
        if "kvm_mmu_prepare_zap_page" in self.on:
            self.vm.emit(EVENTS["kvm_mmu_prepare_zap_page"], _page(sp))

    def mark_mmio_spte(self, sp: ShadowPage, i: int, gfn: int, spte: int) -> None:
        if "mark_mmio_spte" in self.on:
            self.vm.emit(EVENTS["mark_mmio_spte"],  # access: the kernel's `spte & ACC_ALL`
                         (sptep_address(sp.index, i), gfn, spte & ACC_ALL, get_mmio_spte_generation(spte)))

    def check_mmio_spte(self, spte: int, kvm_gen: int, spte_gen: int) -> None:
        if "check_mmio_spte" in self.on:
            self.vm.emit(EVENTS["check_mmio_spte"], (kvm_gen, spte_gen, spte))

    def handle_mmio_page_fault(self, addr: int, gfn: int, access: int) -> None:
        if "handle_mmio_page_fault" in self.on:
            self.vm.emit(EVENTS["handle_mmio_page_fault"], (addr, gfn, access))

    def fast_page_fault(self, vcpu_index: int, addr: int, error_code: int, sp: ShadowPage | None,
                        i: int, old: int, ret: int) -> None:
        if "fast_page_fault" in self.on:
            sptep = 0 if sp is None else sptep_address(sp.index, i)
            new = 0 if sp is None else sp.spt[i]
            self.vm.emit(EVENTS["fast_page_fault"], (vcpu_index, addr, error_code, sptep, old, new, ret))

    def kvm_mmu_zap_all_fast(self, mmu_valid_gen: int, used_pages: int) -> None:
        if "kvm_mmu_zap_all_fast" in self.on:
            self.vm.emit(EVENTS["kvm_mmu_zap_all_fast"], (mmu_valid_gen & 0xFF, used_pages))

    def mmu_set_spte(self, sp: ShadowPage, i: int, gfn: int, result: int) -> None:
        if "kvm_mmu_set_spte" in self.on and not result & SET_SPTE_SPURIOUS:
            spte = sp.spt[i]
            # Shadow paging: shadow_present_mask and shadow_user_mask are P and U; X is !NX.
            self.vm.emit(EVENTS["kvm_mmu_set_spte"], (
                gfn, spte, virt_to_phys(sptep_address(sp.index, i)), sp.level, 1,
                int(not spte & PT64_NX_MASK), int(bool(spte & PT_USER_MASK))))

    def spte_requested(self, gfn: int, pfn: int, level: int) -> None:
        if "kvm_mmu_spte_requested" in self.on:
            # fault->pfn | (gfn & (KVM_PAGES_PER_HPAGE(goal_level) - 1))
            self.vm.emit(EVENTS["kvm_mmu_spte_requested"],
                         (gfn, pfn | (gfn & ((1 << (9 * (level - 1))) - 1)), level))


# --- instances -------------------------------------------------------------------------------------

class TraceInstance:
    """An ftrace instance: enabled events, their filters, a pid list and per-CPU buffers."""

    def __init__(self, module: ModuleTrace, name: str, pids: set[int] | None = None) -> None:
        self.module = module
        self.name = name
        self.enabled: set[str] = set()
        self.filters: dict[str, tuple[str, Predicate]] = {}
        self.pids = pids  # set_event_pid; None: every task
        self.buffer_size = TRACE_BUF_SIZE_DEFAULT
        self.rings: dict[int, CpuRing] = {}
        self.tracing_on = True  # tracefs `tracing_on`: off, the rings record nothing

    @property
    def buffer_size_kb(self) -> int:
        return self.buffer_size >> 10

    @buffer_size_kb.setter
    def buffer_size_kb(self, kb: int) -> None:
        if kb <= 0:
            raise ValueError("buffer_size_kb must be positive")
        self.buffer_size = kb << 10
        for ring in self.rings.values():
            ring.resize(self.buffer_size)

    def ring(self, cpu: int) -> CpuRing:
        ring = self.rings.get(cpu)
        if ring is None:
            ring = self.rings[cpu] = CpuRing(cpu, self.buffer_size)
        return ring

    def set_enabled(self, names: set[str], on: bool) -> None:
        if on:
            self.enabled |= names
        else:
            self.enabled -= names
        self.module.update()

    def set_filter(self, names: set[str], text: str) -> None:
        """The `filter` file of each event (checked against each event's fields first)."""
        compiled = {}
        for name in names:
            fields = {f.name for f in (*COMMON_FIELDS, *EVENTS[name].fields)}
            compiled[name] = compile_filter(text, fields)
        for name, predicate in compiled.items():
            if predicate is None:
                self.filters.pop(name, None)
            else:
                self.filters[name] = (text, predicate)

    def record(self, record: Record) -> None:
        name = record.event.name
        if not self.tracing_on or name not in self.enabled:
            return
        if self.pids is not None and record.pid not in self.pids:
            return
        flt = self.filters.get(name)
        if flt is not None and not flt[1](_fields(record, common=True)):
            return
        self.ring(record.cpu).write(record)

    def consume(self) -> tuple[Record, int] | None:
        """trace_pipe's next event: the oldest over the CPUs (the lowest CPU on a tie), and the
        events that CPU lost before it."""
        best: CpuRing | None = None
        best_ts = 0
        for cpu in sorted(self.rings):
            head = self.rings[cpu].peek()
            if head is not None and (best is None or head.ts < best_ts):
                best, best_ts = self.rings[cpu], head.ts
        return None if best is None else best.consume()

    def reset(self) -> None:
        for ring in self.rings.values():
            ring.reset()


class ModuleTrace:
    """The kvm module's tracing: its instances and its VMs."""

    def __init__(self) -> None:
        self.top = TraceInstance(self, "")
        self.instances: list[TraceInstance] = [self.top]
        self._vms: list[weakref.ref[VmTrace]] = []
        self._next_vm = 0

    def add_vm(self, mmu: KvmMmu, clock: Callable[[], int],
               current_task: Callable[[], str | None]) -> VmTrace:
        vm = VmTrace(self, self._next_vm, mmu, clock, current_task)
        self._next_vm += 1
        self._vms.append(weakref.ref(vm))
        vm.update()
        return vm

    def vms(self) -> list[VmTrace]:
        alive = [vm for ref in self._vms if (vm := ref()) is not None]
        self._vms = [weakref.ref(vm) for vm in alive]
        return alive

    def enabled_for(self, vm: VmTrace) -> frozenset[str]:
        pids = vm.pids()
        on: set[str] = set()
        for instance in self.instances:
            if instance.pids is None or instance.pids & pids:
                on |= instance.enabled
        return frozenset(on)

    def update(self) -> None:
        for vm in self.vms():
            vm.update()

    def add_instance(self, name: str, pids: set[int] | None = None) -> TraceInstance:
        instance = TraceInstance(self, name, pids)
        self.instances.append(instance)
        return instance

    def remove_instance(self, instance: TraceInstance) -> None:
        self.instances.remove(instance)
        self.update()


# --- reading -----------------------------------------------------------------------------------------

def _fields(record: Record, common: bool = False) -> dict[str, int]:
    out = dict(zip(record.event.field_names, record.values, strict=True))
    if common:
        out.update(common_type=record.event.id, common_flags=record.flags,
                   common_preempt_count=record.preempt_count, common_pid=record.pid)
    return out


def lat_flags(flags: int, preempt_count: int) -> str:
    """trace_print_lat_fmt(): irqs-off, need-resched, hard/softirq, preempt depth,
    migrate-disable depth."""
    irqs_off = "d" if flags & 0x01 else "."
    depth = f"{preempt_count & 0xF:x}" if preempt_count & 0xF else "."
    migrate = f"{preempt_count >> 4:x}" if preempt_count & 0xF0 else "."
    return f"{irqs_off}..{depth}{migrate}"


def trace_ts(ns: int) -> str:
    """A trace timestamp, `%5lu.%06lu` of ns2usecs() (which rounds to the microsecond)."""
    secs, usec = divmod((ns + 500) // 1000, 1_000_000)
    return f"{secs:5d}.{usec:06d}"


def format_line(record: Record) -> str:
    """The default ftrace line (trace_print_context + the event's output), without newline:
    `%16s-%-7d [%03d] <flags> %5lu.%06lu: <event>: <TP_printk text>`."""
    return (f"{record.comm:>16}-{record.pid:<7} [{record.cpu:03d}] "
            f"{lat_flags(record.flags, record.preempt_count)} {trace_ts(record.ts)}: "
            f"{record.event.name}: {record.event.text(record.values)}")


def lost_line(cpu: int, lost: int) -> str:
    return f"CPU:{cpu} [LOST {lost} EVENTS]"


@dataclass(frozen=True)
class TraceEvent:
    """One event as a reader sees it."""

    system: str
    name: str
    fields: dict[str, int]
    timestamp: int  # ns of the VM's simulated clock
    cpu: int
    vcpu: int | None  # None: the VMM thread
    pid: int
    task: str
    text: str  # the TP_printk text
    line: str  # the whole trace_pipe line

    @classmethod
    def of(cls, record: Record) -> TraceEvent:
        vcpu = int(record.comm[4:]) if record.comm.startswith("vcpu") else None
        return cls(record.event.system, record.event.name, _fields(record), record.ts, record.cpu,
                   vcpu, record.pid, record.comm, record.event.text(record.values), format_line(record))


class TraceSession:
    """`vm.trace(events, filter)`: an instance recording the VM's events, read like trace_pipe.

    Iterating consumes the events recorded so far, oldest first, and stops when the buffer is
    empty (iterate again after running more); `lines()` gives the text, `CPU:%d [LOST %lu
    EVENTS]` lines included, and `lost` counts the events the rings dropped. Use it in a `with`
    block, or call close(): then the instance goes, and with it the tracer if nothing else
    traces.
    """

    def __init__(self, vm: VmTrace, events: list[str] | tuple[str, ...] | str = ("kvmmmu:*",),
                 filter: str | None = None) -> None:
        names = select(events)
        self.instance = vm.module.add_instance(f"vm{vm.number}-{id(self):x}", vm.pids())
        try:
            if filter is not None:
                self.instance.set_filter(names, filter)
            self.instance.set_enabled(names, True)
        except Exception:
            vm.module.remove_instance(self.instance)
            raise
        self.module = vm.module
        self.lost = 0
        self.closed = False

    def __enter__(self) -> TraceSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.module.remove_instance(self.instance)

    def _next(self) -> tuple[Record, int] | None:
        got = self.instance.consume()
        if got is not None:
            self.lost += got[1]
        return got

    def __iter__(self) -> Iterator[TraceEvent]:
        return self

    def __next__(self) -> TraceEvent:
        got = self._next()
        if got is None:
            raise StopIteration
        return TraceEvent.of(got[0])

    def lines(self) -> Iterator[str]:
        """Consume the buffer as trace_pipe text (one line per event, no newlines)."""
        while (got := self._next()) is not None:
            record, lost = got
            if lost:
                yield lost_line(record.cpu, lost)
            yield format_line(record)

    def text(self) -> str:
        return "".join(line + "\n" for line in self.lines())

    @property
    def overrun(self) -> int:
        """Events the rings dropped, over every CPU (per_cpu/cpu*/stats `overrun`)."""
        return sum(r.overrun for r in self.instance.rings.values())

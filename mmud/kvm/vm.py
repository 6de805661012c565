"""The KVM side of a VM (`struct kvm`): memslots, the shadow MMU, vCPUs, statistics, params.

What runs *in* the VM (guest workloads) and the scheduler that drives the vCPUs live above
this layer (mmud/machine.py); this class is what the ioctls of a VM fd would reach.
"""

from __future__ import annotations

import errno
import weakref
from collections.abc import Mapping

from mmud import hostmem
from mmud.kvm import dirty_log, guest_rw, kvm_main
from mmud.uapi import bugs, stats
from mmud.kvm.devices import IORAM_BASE, IORAM_SIZE, IoRam, MmioBus, pc_ram_ranges
from mmud.kvm.kvm_main import KvmError
from mmud.kvm.memslot import KVM_MEM_LOG_DIRTY_PAGES, Memslots
from mmud.kvm.mmu import audit, zap
from mmud.kvm.mmu.mmu import KVM_MIN_ALLOC_MMU_PAGES, KvmMmu
from mmud.kvm.module import KvmModule
from mmud.kvm.trace.tracer import TraceSession
from mmud.kvm.isolation import arm_switch_fault, kvm_isolation_init_vm
from mmud.uapi.params import Params
from mmud.kvm.vcpu import Vcpu
from mmud.x86.paging import PAGE_SHIFT



# Preemption points a waiter lets pass before it calls the lock holder stuck: a simulator bug.
_MAX_LOCK_WAITS = 100_000


class Kvm:
    manual_dirty_log_protect = 0  # KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 flags

    def __init__(
        self,
        mem_mb: int = 64,
        vcpus: int = 1,
        params: Params | Mapping[str, str | None] | None = None,
        module: KvmModule | None = None,
    ) -> None:
        """A VM of `module` (the loaded kvm module it shares with other VMs); without one,
        a module of its own loaded with `params`."""
        if mem_mb <= 0 or vcpus <= 0:
            raise ValueError("mem_mb and vcpus must be positive")
        if module is not None and params is not None:
            raise ValueError("give the parameters to the module, not to each VM")
        hostmem.keep_freed_arrays()
        self.module = module if module is not None else KvmModule(params)
        self.mem_mb = mem_mb
        self.mem_bytes = mem_mb << 20
        self.stat = stats.new_vm_stats()
        self.memslots = Memslots()
        self.clock_ns = 0  # simulated time, advanced by whoever runs the vCPUs
        self.mmu = KvmMmu(self.memslots, self.stat, self.module.audit, lambda: self.clock_ns)
        self._watch_params()
        self.mmio_caching = bool(self.params["mmio_caching"])
        self.vcpus: list[Vcpu] = []
        self.mmio_bus = MmioBus([IoRam(IORAM_BASE, IORAM_SIZE)])
        self.last_zap: zap.ZapRun | None = None
        # The VMM's RAM around the PCI hole, one memslot per range (slot 0 low, slot 1 high),
        # and what the firmware's e820 map tells the guest.
        self.ram_ranges = pc_ram_ranges(self.mem_bytes)
        for slot, (start, end) in enumerate(self.ram_ranges):
            self.set_memslot(slot, start, end - start)
        self.vcpus.extend(Vcpu(self, i) for i in range(vcpus))
        self.mmu.vcpus = [v.mmu for v in self.vcpus]
        self.isolation = kvm_isolation_init_vm(self)
        # The module's tracing knows the VM (its pids); a tracer is attached while some
        # trace instance records one of its events (mmud/kvm/trace).
        self.trace_vm = self.module.trace.add_vm(self.mmu, lambda: self.clock_ns, self.current_task)

    @property
    def params(self) -> Params:
        """The module's parameter block (/sys/module/kvm/parameters)."""
        return self.module.params

    def _watch_params(self) -> None:
        """Follow run-time parameter writes; the watcher holds the VM weakly."""
        ref = weakref.ref(self)
        params = self.params

        def changed(name: str, value: object) -> None:
            vm = ref()
            if vm is None:
                params.unwatch(changed)
            elif name.startswith("mmu_audit"):
                vm._apply_audit_params()

        self.params.watch(changed)
        self._apply_audit_params()

    def _apply_audit_params(self) -> None:
        """The audit's static key, and its touch set attached while the scope is incremental."""
        mmu = self.mmu
        mmu.audit_enabled = bool(self.params["mmu_audit"])
        incremental = mmu.audit_enabled and self.params["mmu_audit_scope"] == "incremental"
        if not incremental and mmu.audit_track is not None:
            mmu.detach(mmu.audit_track)
            mmu.audit_track = None
        elif incremental and mmu.audit_track is None:
            mmu.audit_track = audit.AuditTrack()  # from now on: what changes
            mmu.attach(mmu.audit_track)

    def current_task(self) -> str | None:
        """The scheduler task running now (`vcpu<k>` for vCPU k); a bare Kvm has none."""
        return None

    def trace(self, events: list[str] | tuple[str, ...] | str = ("kvmmmu:*",),
              filter: str | None = None) -> TraceSession:
        """Record this VM's kvmmmu events (docs/tracing.md): `system:event`, `system:*` or
        `*:*` selections, and an optional filter in the kernel's grammar for numeric fields.
        A context manager and an iterator of `TraceEvent`s."""
        return TraceSession(self.trace_vm, events, filter)

    # --- statistics ----------------------------------------------------------------------------

    @property
    def stats(self) -> dict[str, int]:
        """Every stat by its kernel name; vCPU stats summed over the VM's vCPUs."""
        out = dict(self.stat)
        for name in stats.VCPU_STATS:
            out[name] = sum(v.stat[name] for v in self.vcpus)
        return {s.name: out[s.name] for s in stats.STATS}

    def clear_stat(self, name: str) -> None:
        desc = stats.STAT_BY_NAME[name]
        if desc.scope == "vm":
            self.stat[name] = 0
        else:
            for vcpu in self.vcpus:
                vcpu.stat[name] = 0

    # --- host access to guest memory (kvm_read_guest / kvm_write_guest) ---------------------

    def _check_gpa(self, gpa: int) -> None:
        if gpa & 7:
            raise ValueError(f"gpa {gpa:#x} is not 8-byte aligned")

    def read_u64(self, gpa: int) -> int:
        self._check_gpa(gpa)
        value = self.memslots.read_u64(gpa)
        if value is None:
            raise KvmError(errno.EFAULT, f"gpa {gpa:#x} is not guest RAM")
        return value

    def write_u64(self, gpa: int, value: int) -> None:
        """A host write: lands in memory and the dirty log, but the shadow MMU is not told."""
        self._check_gpa(gpa)
        if self.memslots.write_u64(gpa, value & ((1 << 64) - 1)) is None:
            raise KvmError(errno.EFAULT, f"gpa {gpa:#x} is not guest RAM")
        self.mark_page_dirty(gpa >> PAGE_SHIFT)

    def read_guest(self, gpa: int, size: int) -> bytes:
        """kvm_read_guest() of a byte range; EFAULT unless it is all guest RAM."""
        return guest_rw.kvm_read_guest(self.memslots, gpa, size)

    def write_guest(self, gpa: int, data: bytes) -> None:
        """kvm_write_guest() of a byte range: memory, then every page it touched is dirty."""
        guest_rw.kvm_write_guest(self, gpa, data)

    def mark_page_dirty(self, gfn: int) -> None:
        slot = self.memslots.lookup(gfn)
        if slot is not None and slot.dirty_bitmap is not None:
            rel = gfn - slot.base_gfn
            slot.dirty_bitmap[rel >> 6] |= 1 << (rel & 63)

    # --- dirty logging (KVM_GET_DIRTY_LOG, KVM_CLEAR_DIRTY_LOG) --------------------------------

    def get_dirty_log(self, slot: int) -> bytes:
        """KVM_GET_DIRTY_LOG: 1 bit per page of the slot, little-endian 64-bit words."""
        return dirty_log.run_ioctl(dirty_log.kvm_get_dirty_log_protect(self, slot))

    def enable_manual_dirty_log_protect(self, initially_set: bool = False) -> None:
        """KVM_ENABLE_CAP(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)."""
        flags = kvm_main.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
        if initially_set:
            flags |= kvm_main.KVM_DIRTY_LOG_INITIALLY_SET
        dirty_log.enable_manual_protect(self, flags)

    def clear_dirty_log(self, slot: int, first_page: int, bitmap: bytes,
                        num_pages: int | None = None) -> None:
        """KVM_CLEAR_DIRTY_LOG; num_pages defaults to the bitmap's bits, cut at the slot end."""
        if num_pages is None:
            s = self.memslots.slots.get(slot)
            num_pages = len(bitmap) * 8 if s is None else min(len(bitmap) * 8, s.npages - first_page)
        dirty_log.run_ioctl(
            dirty_log.kvm_clear_dirty_log_protect(self, slot, first_page, num_pages, bitmap))

    # --- the vCPU threads' view of the host CPUs ------------------------------------------------

    def preempt(self) -> None:
        """A point where a vCPU thread may lose its CPU. With nothing else to run (a bare
        Kvm driven by hand) nothing happens; mmud.machine.VM runs other tasks here."""

    def wait_mmu_lock(self) -> None:
        """Wait for kvm->mmu_lock, held across preemption points by a dirty-log harvest or
        a zap of every shadow page.

        While a zap holds it, the waiter queues on the lock — the zap sees spin_needbreak()
        at its next cond_resched_lock() — and spins while the zap's CPU goes on to its next
        lock break (ZapRun.run_to_break); a harvest's holder is another task, so the other
        tasks run meanwhile.
        """
        run: zap.ZapRun | None = None
        token = 0
        try:
            for _ in range(_MAX_LOCK_WAITS):
                if not self.mmu.mmu_lock_held:
                    return
                if self.last_zap is not None and self.last_zap.lock_held:
                    if run is not self.last_zap:
                        if run is not None:
                            run.waiter_leaves(token)
                        run, token = self.last_zap, self.last_zap.waiter_arrives()
                    run.run_to_break()
                else:
                    self.preempt()
            raise RuntimeError("kvm->mmu_lock is never released")
        finally:
            if run is not None:
                run.waiter_leaves(token)

    # --- emulated devices (userspace's side of an MMIO exit) -----------------------------------

    def mmio_read(self, gpa: int) -> int:
        value = self.mmio_bus.read(gpa)
        if self.mmu.obs: self.mmu.obs.vcpu_mmio(False, gpa, (value,))  # observer
        return value

    def mmio_write(self, gpa: int, value: int) -> None:
        if self.mmu.obs: self.mmu.obs.vcpu_mmio(True, gpa, (value,))  # observer
        self.mmio_bus.write(gpa, value)

    # --- memslots (KVM_SET_USER_MEMORY_REGION) -----------------------------------------------

    def set_memslot(self, slot: int, gpa: int, size: int, log_dirty: bool = False) -> None:
        """Create, move, change flags of, or (size 0) delete a memslot, as KVM does."""
        flags = KVM_MEM_LOG_DIRTY_PAGES if log_dirty else 0
        kvm_main.kvm_set_memory_region(self, slot, gpa, size, flags)

    def log_dirty_pages(self, slot: int, on: bool = True) -> None:
        """Dirty logging of a slot on or off, as a VMM asks for it: KVM_SET_USER_MEMORY_REGION
        of the slot where it is, with KVM_MEM_LOG_DIRTY_PAGES set or cleared."""
        s = self.memslots.slots.get(slot)
        if s is None:
            raise KvmError(errno.EINVAL, f"slot {slot} does not exist")
        self.set_memslot(slot, s.base_gfn << PAGE_SHIFT, s.npages << PAGE_SHIFT, log_dirty=on)

    def set_nr_mmu_pages(self, nr: int) -> None:
        """KVM_SET_NR_MMU_PAGES."""
        if nr < KVM_MIN_ALLOC_MMU_PAGES:
            raise KvmError(errno.EINVAL, f"at least {KVM_MIN_ALLOC_MMU_PAGES} pages")
        zap.kvm_mmu_set_nr_mmu_pages(self.mmu, nr)

    # --- zapping every shadow page -------------------------------------------------------------

    def kvm_mmu_zap_all_fast(self) -> zap.ZapRun:
        """Start a fast zap (after any unfinished one: slots_lock serialises them)."""
        self.finish_zap()
        self.last_zap = zap.kvm_mmu_zap_all_fast(self.mmu)
        return self.last_zap

    @property
    def zap_in_progress(self) -> bool:
        """A zap of every shadow page has not reached its end yet."""
        return self.last_zap is not None and not self.last_zap.done

    def finish_zap(self) -> None:
        """Run an unfinished zap to its end."""
        if self.last_zap is not None:
            self.last_zap.finish()

    def zap_all(self, kind: str = "fast") -> zap.ZapRun:
        """Zap every shadow page (docs/memslots-mmio.md): `fast` (kvm_mmu_zap_all_fast, the
        2013 series as in v5.16: by generation, a lock break after ten pages when someone
        waits), `slow` (kvm_mmu_zap_all, v5.1+: one walk, a lock break after any page when
        someone waits) or `legacy` (kvm_mmu_zap_all before 2013: no lock break).

        The zap is then driven by run_lock_breaks: to its end here, as a scheduler task in a
        VM that runs vCPUs.
        """
        if kind not in zap.ZAP_KINDS:
            raise KvmError(errno.EINVAL, f"zap kind {kind!r} (known: {', '.join(zap.ZAP_KINDS)})")
        if kind == "fast":
            run = self.kvm_mmu_zap_all_fast()
        else:
            self.finish_zap()
            start = zap.kvm_mmu_zap_all if kind == "slow" else zap.kvm_mmu_zap_all_legacy
            run = self.last_zap = start(self.mmu)
        self.run_lock_breaks(run)
        return run

    def run_lock_breaks(self, run: zap.ZapRun) -> None:
        """Drive a zap started by zap_all(); here nothing else runs, so straight to the end.

        A VM that runs vCPUs (mmud.machine.VM) makes it a task and lets them run beside it.
        """
        self.finish_zap()

    def audit(self) -> list[str]:
        """Run one full audit now (every check, every vCPU's tree); the error lines."""
        return audit.audit_full(self.mmu, self.mmu.vcpus, "manual")

    def inject(self, name: str) -> None:
        """Arm the bug `name` (bugs.INJECTABLE_BUGS); "none" disarms."""
        if name == bugs.ISOLATION_SWITCH_FAULT:
            arm_switch_fault(self)
        elif name != "none" and name not in bugs.BUG_BY_NAME:
            raise KvmError(errno.EINVAL, f"unknown bug {name!r}")
        self.mmu.bug = None if name == "none" else name

    def render_inject(self) -> str:
        """The vm<N>/inject file: every bug, the armed one in brackets."""
        return bugs.render_choices(self.mmu.bug, bugs.INJECTABLE_BUGS)

    def audit_log(self) -> list[str]:
        """The module's audit log (kvm/audit_log), oldest first."""
        return list(self.module.audit.lines)

"""The simulation process: the one owner of VM and MMU state.

It runs apart from the FUSE process because a pure-Python loop in the same process holds the
GIL and makes every control-file access wait for the 5 ms switch interval (docs/daemon.md).
The loop steps each running VM in batches of about `BATCH_SECONDS`, and between batches —
never inside one, so that the same seed and the same writes at the same steps give the same
run — it drains the request pipe, applies each request, publishes a fresh snapshot and
answers.  Parameter stores come on a channel of their own (`StoreChannel`) and land sooner:
after any round, and inside a step at each place the audit looks for one (`store_point`),
recorded with that place, so a write never waits for a long step or a whole audit run.
Requests that only read (`READ_OPS`: guest memory, the shadow tables on view, the trace
buffer) come on that channel too and are answered there, unrecorded: a store point is where
the audit finds the MMU consistent.  While running it also publishes every
`PUBLISH_SECONDS`, which doubles as the liveness signal the main process turns into
WATCHDOG=1.
"""

from __future__ import annotations

import errno
import gc
import itertools
import os
import signal
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field, replace
from enum import StrEnum
from multiprocessing.connection import Connection, wait
from typing import Any, cast

import structlog

from mmud.daemon import vmctl, vmio
from mmud.daemon.recording import Recorder, Recording
from mmud.daemon.breakpoints import RunControl
from mmud.daemon.protocol import (Reply, Request, SimConfig, Snapshot, StoreChannel, VmConfig,
                                  VmSnapshot)
from mmud.daemon.faultlog import FaultLogPublisher
from mmud.daemon.status import RateMeter, render_status
from mmud.kvm.isolation import isolation_map
from mmud.kvm.mmu import view
from mmud.uapi.isolation import parse_map
from mmud.kvm.module import KvmModule
from mmud.kvm.trace.events import EVENTS
from mmud.kvm.trace.tracefs import TraceFs
from mmud.machine import VM
from mmud.migration import Migration, MigrationResult
from mmud.uapi.params import ParamError
from mmud.uapi.runcontrol import STEP, render_break
from mmud.uapi.vms import KVM_MAX_VCPUS, NO_WORKLOAD, WORKLOADS, is_vm_name
from mmud.log import setup_logging

# A batch this long keeps a request's wait (at most one batch) far under the 20 ms budget
# from a parameter write to its effect, while the per-batch pipe poll stays negligible.
BATCH_SECONDS = 0.002
# Files show values at most this old while the VM runs; also the paused loop's poll timeout.
PUBLISH_SECONDS = 0.05
STEP_CHUNK = 32  # steps between two looks at the batch deadline
# Requests that only read: nothing a snapshot shows changes, so none is published after
# them (a blocked trace_pipe reader asks every 5 ms) and none is recorded; they come on the
# store channel (client.py), so that they are answered at store points inside a step too.
READ_OPS = frozenset({"memory_read", "mmu_pages", "mmu_rmaps_stat", "mmu_walk", "tracefs_read",
                      "recording_read"})
# tracing/events/<system>/<event>/: the snapshot lists the events, which never change.
TRACE_EVENTS = tuple(f"{e.system}:{n}" for n, e in EVENTS.items())


def chunk(vm: VM) -> int:
    """A VM's steps per `vm.step` call: STEP_CHUNK, or 1 while the audit is on — a burst of
    audit runs can take tens of milliseconds a step, and a request waits up to one chunk.
    A function of the simulation's state alone, so a replay cuts the same chunks."""
    return 1 if vm.mmu.audit_enabled else STEP_CHUNK


class VmState(StrEnum):
    """What `vm<N>/state` reads."""

    RUNNING = "running"
    PAUSED = "paused"
    CRASHED = "crashed"  # the guest or the simulated KVM raised; only `restart` clears it

log = structlog.get_logger("mmud.sim")


@dataclass
class _Slot:
    """One VM and what Linux holds for it: the fd its debugfs directory is named after."""

    name: str
    config: VmConfig
    vm: VM
    fd: int
    running: bool = True
    failure: str | None = None  # why the VM crashed; only a restart clears it
    rates: RateMeter = field(default_factory=RateMeter)
    migration: Migration | None = None  # the running pre-copy, if any
    precopy: Generator[None, None, MigrationResult] | None = None  # its run(): a round per turn
    migrated: MigrationResult | None = None  # the last migration's: what vm<N>/migrate shows
    dest_of: str | None = None  # a destination: the source whose next migration replaces it
    control: RunControl = field(default_factory=RunControl)  # vm<N>/break, `step N`

    def migrate_text(self) -> str:
        return self.migrated.render() if self.migrated else ""

    @property
    def state(self) -> VmState:
        if self.failure:
            return VmState.CRASHED
        return VmState.RUNNING if self.running else VmState.PAUSED

    @property
    def debugfs_dir(self) -> str:
        return f"{os.getpid()}-{self.fd}"


class _Discard:
    """The output pipe of a simulation nobody reads."""

    def send(self, message: object) -> None:
        pass


class Simulation:
    """The loop, the VMs and the request handlers (`op` name -> method)."""

    @classmethod
    def offline(cls, config: SimConfig, stores: StoreChannel | None = None) -> Simulation:
        """A simulation with no main process: no request pipe, and snapshots and replies
        that go nowhere — a replay's (docs/replay.md), a benchmark's, a test's (which may
        post parameter stores on a channel of its own)."""
        return cls(config, cast(Connection, None), cast(Connection, _Discard()), stores)

    def __init__(self, config: SimConfig, requests: Connection, out: Connection,
                 stores: StoreChannel | None = None) -> None:
        self.module = KvmModule(config.load)  # one kvm module, shared by every VM
        self.params = self.module.params
        self.requests, self.out, self.stores = requests, out, stores
        self._taken = 0  # stores taken from the store channel
        self._stepping: _Slot | None = None  # the VM inside its chunk: where a store lands
        self._chunk_from = 0  # its step count when the chunk began
        self._last: Snapshot | None = None  # the last snapshot published
        self.config = config  # its first VM's configuration gives what a `create` leaves out
        self.protected = config.vms[0].name  # the service's own VM: restarted, never destroyed
        self._freed = False  # a VM went away: collect before the reply (see _apply)
        self.slots = [self._create(c.name, c) for c in config.vms]
        self.handlers: dict[str, Callable[..., Any]] = {
            "param": self.set_param,
            "clear_stat": self.clear_stat,
            "state": self.set_state,
            "break": self.set_break,
            "isolation_map": self.isolation_map,
            "inject": self.inject,
            "memory_read": lambda vm, gpa, size: vmio.memory_read(self._slot(vm).vm, gpa, size),
            "memory_write": lambda vm, gpa, data: vmio.memory_write(self._slot(vm).vm, gpa, data),
            "dirty_log": lambda vm, slot: self._slot(vm).vm.get_dirty_log(slot),
            "migrate": self.migrate,
            "create": self.create,
            "destroy": self.destroy,
            "memslot": lambda vm, **line: vmctl.set_memslot(self._slot(vm).vm, **line),
            "zap_all": lambda vm, kind: vmctl.zap_all(self._slot(vm).vm, kind,
                                                      self._slot(vm).running),
            # The shadow tables on view: rendered at open, never published (docs/mmu.md).
            "mmu_pages": lambda vm: view.render_pages(self._slot(vm).vm.mmu),
            "mmu_rmaps_stat": lambda vm: view.render_rmaps_stat(self._slot(vm).vm.memslots),
            "mmu_walk": self.mmu_walk,
            # tracing/: rendered at open, applied here; trace_pipe drains between batches.
            "tracefs": self.tracefs_op,
            "tracefs_read": self.tracefs_op,
            # The loop's own: one pre-copy round, recorded as an event for a replay.
            "precopy": self.precopy_round,
            "recording_read": lambda offset, size: self.recorder.read(offset, size),
        }
        self.tracefs = TraceFs(self.module.trace)
        self.isolation = FaultLogPublisher(self.module.isolation, config.state_dir)
        # Every event that changes the run, and checkpoints (docs/replay.md).
        self.recorder = Recording(config.state_dir, config) if config.state_dir else Recorder()
        self.logs: dict[str, tuple[str, ...]] = {}
        self._seq = 0
        self._stopping = False
        if stores is not None:
            self.module.audit.notice = self._store_point

    def _create(self, name: str, c: VmConfig) -> _Slot:
        vm = VM(mem_mb=c.mem_mb, vcpus=c.vcpus, seed=c.seed, workload=c.workload, module=self.module)
        return _Slot(name, c, vm, os.memfd_create(f"kvm-{name}", os.MFD_CLOEXEC))

    # -- the loop -------------------------------------------------------------------------

    def run(self) -> None:
        self.publish()
        published = time.monotonic()
        while not self._stopping:
            running = [s for s in self.slots if s.running]
            if running:
                self._step_batch(running)
                running.clear()  # a request may destroy a VM: hold no slot across the drain
                self._drain(timeout=0)
            else:
                self._drain(timeout=PUBLISH_SECONDS)
            self._advance_migrations()
            if time.monotonic() - published >= PUBLISH_SECONDS:
                self.publish()
                published = time.monotonic()
        self.recorder.close(self.slots, self.step_counts())

    def _step_batch(self, running: list[_Slot]) -> None:
        """Step the running VMs in rounds until BATCH_SECONDS have passed (at least one).

        Only whole rounds, so that where a batch ends changes nothing a replay could see:
        each VM runs one chunk per round — one `vm.step` call, one KVM_RUN, which returns
        to userspace at its end — and the VMs take their turns in slot order (they share the
        module: the audit's rate limiter and logs).  A chunk is short (`chunk`), so a
        stretch of slow steps still ends the batch on time and a waiting request is served."""
        deadline = time.perf_counter() + BATCH_SECONDS
        while True:
            self.step_round(running)
            self._take_stores()
            if time.perf_counter() >= deadline or not any(s.running for s in running):
                return

    def step_round(self, slots: list[_Slot]) -> None:
        """One chunk of each running VM of `slots`, in order (a replay steps with it too)."""
        for s in slots:
            if not s.running:
                continue
            self._stepping, self._chunk_from = s, s.vm.steps
            try:
                if s.control.armed:  # a break or a `step N`: stop exactly where it holds
                    if why := s.control.run(s.vm, chunk(s.vm)):
                        s.running = False
                        log.info("vm_paused", vm=s.name, steps=s.vm.steps, why=why)
                        self.recorder.event("paused", {"vm": s.name, "why": why},
                                            self.step_counts(), 0)
                else:
                    s.vm.step(chunk(s.vm))
            except Exception as e:  # noqa: BLE001 - any VM failure stops that VM, not the host
                self.recorder.event("crash", {"vm": s.name}, self.step_counts(), 0)
                self._crash(s, e)
                continue
            finally:
                self._stepping = None
            self.recorder.chunk_done(s, self.step_counts())

    def step_counts(self) -> dict[str, int]:
        """Every VM's step count: where an event lands."""
        return {s.name: s.vm.steps for s in self.slots}

    def _crash(self, s: _Slot, e: Exception) -> None:
        """Stop a VM whose simulation raised, as KVM stops a VM on an internal error.

        The daemon keeps serving: the files show the last state, vm<N>/state reads
        "crashed" and `restart` builds a fresh VM.
        """
        s.running, s.failure = False, f"{type(e).__name__}: {e}"
        log.error("vm_crashed", vm=s.name, steps=s.vm.steps, seed=s.config.seed, exc_info=e)
        if why := s.control.crashed(s.vm.steps):
            log.info("vm_break_hit", vm=s.name, steps=s.vm.steps, why=why)

    def _drain(self, timeout: float) -> None:
        """Apply every pending request and store; EOF means the main process is gone."""
        conns = [self.requests] if self.stores is None else [self.requests, self.stores.conn]
        try:
            while not self._stopping and wait(conns, timeout):
                self._take_stores(posted_or_not=True)
                while self.requests.poll(0):
                    self._apply(self.requests.recv())
                timeout = 0
        except EOFError:
            self._stopping = True

    def _take_stores(self, posted_or_not: bool = False) -> None:
        """Apply the parameter stores waiting on the store channel, wherever the loop or
        the audit stands (`store_point` calls it inside a step).  The shared counter says
        whether one is waiting, unless `posted_or_not`: the pipe is then asked directly
        (the loop's wait found it readable, the counter may not be bumped yet)."""
        ch = self.stores
        if ch is None or not (posted_or_not or ch.posted.value > self._taken):
            return
        try:
            while ch.conn.poll(0):
                self._taken += 1
                self._apply(ch.conn.recv(), in_step=self._stepping is not None)
        except EOFError:
            self._stopping = True

    def _store_point(self) -> None:
        """A store point inside a VM's chunk takes the waiting stores; one reached by a
        request's handler (a memory write's pte write) leaves them to the loop, so that
        each store is recorded at a place a replay can find."""
        if self._stepping is not None:
            self._take_stores()

    def _apply(self, req: Request, in_step: bool = False) -> None:
        if req.op == "stop":
            self._stopping = True
            return
        reply = self.dispatch(req)
        if in_step:
            if req.op == "param":  # the VMs are inside a step: only the parameters changed
                self._publish_params()
        elif req.op not in READ_OPS:
            self.publish()  # the change is visible before the writer's write(2) returns
        if self._freed:
            # A VM went away: its objects form cycles (vCPUs, MMU and guest point back at
            # it), so only a collection frees them; do it now, so that its memory is back
            # before the write(2) that destroyed it returns.  After the publish, which hands
            # the fault log's pending entries (they name their VM) to the publisher.
            self._freed = False
            gc.collect()
        self.out.send(reply)

    def dispatch(self, req: Request) -> Reply:
        """Apply one request; one that may change state is recorded with where it landed:
        every VM's step count, and inside a step, the VM stepping and the store point."""
        step = self.slots[0].vm.steps
        steps = None if req.op in READ_OPS else self.step_counts()
        at = None
        if self._stepping is not None:
            at = self.position()
            if steps is not None:  # the count its chunk began at: a replay steps to it
                steps[self._stepping.name] = self._chunk_from
        try:
            reply = Reply(req.id, result=self.handlers[req.op](**req.args), step=step)
        except (ParamError, OSError) as e:
            reply = Reply(req.id, errno=e.errno or errno.EINVAL, message=str(e), step=step)
        if steps is not None:
            self.recorder.event(req.op, req.args, steps, reply.errno, at)
        return reply

    def position(self) -> dict[str, object]:
        """Where inside a step a store lands: the VM in its chunk and the module's count of
        store points passed (`ModuleAudit.points`)."""
        assert self._stepping is not None
        return {"in": self._stepping.name, "point": self.module.audit.points}

    def _publish_params(self) -> None:
        """The last snapshot with the current parameters: a store taken inside a step is
        visible before its write(2) returns; the rest of the picture follows at the
        loop's next publish."""
        if self._last is None:  # nothing published yet (an offline simulation)
            self.publish()
            return
        self._seq += 1
        self._last = replace(self._last, seq=self._seq, params=self.params.render_all())
        self.out.send(self._last)

    def publish(self) -> None:
        self._seq += 1
        self._last = Snapshot(
            seq=self._seq,
            params=self.params.render_all(),
            vms=tuple(self._vm_snapshot(s) for s in self.slots),
            logs={**self.logs, **self.isolation.logs(self._fault_context),
                  "audit_log": tuple(line.rstrip("\n") for line in self.module.audit.lines)},
            trace_events=TRACE_EVENTS)
        self.out.send(self._last)

    def _vm_snapshot(self, s: _Slot) -> VmSnapshot:
        stats = s.vm.stats
        status = render_status(s.vm, s.state, s.rates.update(s.vm.steps, stats), s.failure,
                               pid=os.getpid(),
                               state_write_failures=self.isolation.state_write_failures,
                               recording=self._recording_status(),
                               run_control=s.control.status_lines(s.running))
        return VmSnapshot(s.name, s.debugfs_dir, s.state.value, s.vm.steps, stats, status,
                          s.vm.render_inject(), vmio.dirty_log_slots(s.vm), s.migrate_text(),
                          memslots=vmctl.render_memslots(s.vm.memslots), config=s.config,
                          ram_end=vmio.ram_end(s.vm), breaks=s.control.render())

    # -- request handlers ---------------------------------------------------------------

    def _slot(self, name: str) -> _Slot:
        for s in self.slots:
            if s.name == name:
                return s
        raise OSError(errno.ENOENT, f"no VM {name}")

    def set_param(self, name: str, text: bytes) -> bytes:
        self.params[name] = text
        log.info("param_set", name=name, value=self.params[name], step=self.slots[0].vm.steps,
                 **self._inside(), applied_ns=time.monotonic_ns())
        return self.params.render(name)

    def _inside(self) -> dict[str, object]:
        """Where inside a step a store lands, for its log event: `position()` and the audit's
        place (`where`); nothing between chunks."""
        return {**self.position(), "where": self.module.audit.where} if self._stepping else {}

    def clear_stat(self, name: str, vm: str | None = None) -> None:
        """`echo 0 > kvm/<stat>` clears it in every VM, `kvm/<pid>-<fd>/<stat>` in one."""
        for s in self.slots if vm is None else [self._slot(vm)]:
            s.vm.clear_stat(name)
        log.info("stat_cleared", name=name, vm=vm or "all")

    def _fault_context(self, kvm: Any) -> dict[str, object]:
        """Whose fault a new fault-log entry is: the VM that took it (a VM a restart replaced
        has no slot, hence no name; the publisher remembers the name it had)."""
        s = next((s for s in self.slots if s.vm is kvm), None)
        if s is None:
            return {"seed": kvm.seed, "step": kvm.steps}
        return {"vm": s.name, "seed": s.config.seed, "step": s.vm.steps}

    def mmu_walk(self, vm: str, gva: int, vcpu: int = 0) -> str:
        """vm<N>/mmu/walk: the guest and shadow walks of gva on one vCPU (EINVAL: no such
        vCPU). Reads only: nothing is faulted in, no A/D bit set."""
        vcpus = self._slot(vm).vm.vcpus
        if not 0 <= vcpu < len(vcpus):
            raise OSError(errno.EINVAL, f"{vm} has no vcpu {vcpu}")
        return view.render_walk(vcpus[vcpu].mmu, gva)

    def tracefs_op(self, action: str, file: str = "", text: str = "", size: int = 0) -> str | None:
        """tracing/<file>: `read` renders it, `write` applies a write(2) (EINVAL: refused),
        `truncate` is an O_TRUNC open, `pipe` consumes up to `size` bytes of trace_pipe."""
        if action == "read":
            return self.tracefs.read(file)
        if action == "pipe":
            return self.tracefs.pipe(size)
        if action == "truncate":
            self.tracefs.truncate(file)
        else:
            self.tracefs.write(file, text)
        log.info("tracefs_write", file=file, action=action, text=text if action == "write" else None,
                 step=self.slots[0].vm.steps, **self._inside())
        return None

    def inject(self, vm: str, name: str) -> None:
        """`vm<N>/inject`: arm a bug in that VM ("none" disarms)."""
        self._slot(vm).vm.inject(name)
        log.info("bug_armed", vm=vm, bug=name, step=self._slot(vm).vm.steps)

    def migrate(self, vm: str, action: str) -> None:
        """`echo start > vm<N>/migrate`: pre-copy it into a paused destination, one round per
        loop turn while the source keeps running; the source is paused at the stop.

        The destination is the VM the source's last migration made, if it is still there:
        it is destroyed and made again under its name.  Otherwise it is a new VM under the
        lowest free name vm<K>.  So each source has at most one destination, however many
        times it migrates (docs/control-files.md §10.4)."""
        s = self._slot(vm)
        if s.migration is not None or not s.running:
            raise OSError(errno.EBUSY, f"{vm} is migrating or not running")
        old = next((t for t in self.slots if t.dest_of == vm), None)
        if old is not None:
            name = old.name
            self._remove(old)  # freed before the reply, so before the copy starts (_apply)
        else:
            taken = {t.name for t in self.slots}
            name = next(n for k in itertools.count(1) if (n := f"vm{k}") not in taken)
        migration = Migration.to_new_vm(s.vm)
        config = VmConfig(name, s.config.mem_mb, s.config.vcpus, s.config.seed, workload=None)
        dest = _Slot(name, config, migration.dest, os.memfd_create(f"kvm-{name}", os.MFD_CLOEXEC),
                     running=False, dest_of=vm)
        self.slots.append(dest)
        s.migration, s.precopy, s.migrated = migration, migration.run(), migration.result
        log.info("migration_started", vm=vm, dest=name, replaced=old is not None, step=s.vm.steps)

    def create(self, name: str, mem_mb: int | None = None, vcpus: int | None = None,
               seed: int | None = None, workload: str | None = None) -> None:
        """`create NAME …` in `vms`: a new running VM.  What the line leaves out is the
        daemon's command line's (`mmud run --mem/--vcpus/--seed/--workload`: the first
        VM's configuration); `workload="none"` is an idle guest.  EEXIST for a name in use,
        EINVAL for a configuration a VM refuses."""
        if not is_vm_name(name):
            raise OSError(errno.EINVAL, f"{name!r} is not a VM name")
        if any(s.name == name for s in self.slots):
            raise OSError(errno.EEXIST, f"{name} exists")
        d = self.config.vms[0]
        config = VmConfig(name, d.mem_mb if mem_mb is None else mem_mb,
                          d.vcpus if vcpus is None else vcpus, d.seed if seed is None else seed,
                          d.workload if workload is None else
                          None if workload == NO_WORKLOAD else workload)
        if config.workload not in (None, *WORKLOADS) or not 1 <= config.vcpus <= KVM_MAX_VCPUS:
            raise OSError(errno.EINVAL, f"{name}: workload or vcpus out of range")
        try:
            slot = self._create(name, config)
        except (ValueError, MemoryError, OSError) as e:
            self._follow_newest_isolation()  # a VM built halfway may have made itself current
            err = errno.ENOMEM if isinstance(e, MemoryError) else getattr(e, "errno", None)
            raise OSError(err or errno.EINVAL, f"{name}: {e}") from None
        self.slots.append(slot)
        log.info("vm_created", vm=name, mem_mb=config.mem_mb, vcpus=config.vcpus,
                 seed=config.seed, workload=config.workload, debugfs=slot.debugfs_dir)

    def destroy(self, name: str) -> None:
        """`destroy NAME` in `vms`, `destroy` in vm<N>/state: the VM, its vm<N>/ and
        kvm/<pid>-<fd>/ directories go away and its memory is freed.  ENOENT for no such VM,
        EPERM for the service's own VM (vm0), which a restart renews instead."""
        s = self._slot(name)
        if name == self.protected:
            raise OSError(errno.EPERM, f"{name} is the service's own VM: restart it instead")
        steps = s.vm.steps
        self._remove(s)
        log.info("vm_destroyed", vm=name, steps=steps)

    def _remove(self, s: _Slot) -> None:
        """Take a VM out of the simulation, and every pointer to it with it.

        A destination keeps belonging to its source's name: a VM made again under that name
        replaces it at its first migration, so a create/migrate/destroy cycle keeps one
        destination, not one more each time."""
        self.slots.remove(s)
        self._release(s)

    def _release(self, s: _Slot) -> None:
        """Drop what refers to a VM that goes away (destroyed, or replaced by a restart): its
        memfd, its own migration, the migrations into it (cancelled: their source runs on),
        the isolation module's `current`.  Its memory is freed by the collection in _apply."""
        os.close(s.fd)
        s.migration = s.precopy = None
        for other in self.slots:
            if other is s:
                continue
            if other.migration is not None and other.migration.dest is s.vm:
                other.migration.cancel()
                other.migration = other.precopy = None
                log.info("migration_cancelled", vm=other.name, dest=s.name, step=other.vm.steps)
            if other.migrated is not None and other.migrated.dest is s.vm:
                other.migrated.dest = None
        if s.vm.isolation is not None and self.module.isolation.current is s.vm.isolation:
            self._follow_newest_isolation(without=s)
        self._freed = True

    def _follow_newest_isolation(self, without: _Slot | None = None) -> None:
        """The isolation module's `current` (whose symbols `map` resolves) is the newest VM's."""
        self.module.isolation.current = next(
            (t.vm.isolation for t in reversed(self.slots) if t is not without and t.vm.isolation),
            None)

    def _recording_status(self) -> str | None:
        r = self.recorder
        if r.path is None:
            return None
        return f"{r.path} (stopped: {r.stopped})" if r.stopped else str(r.path)

    def _advance_migrations(self) -> None:
        """A pre-copy round of each migration: when one comes depends on the batches'
        wall-clock sizes, so each goes through `dispatch` and is recorded as an event."""
        for s in [s for s in self.slots if s.precopy is not None]:
            self.dispatch(Request(0, "precopy", {"vm": s.name}))

    def precopy_round(self, vm: str) -> None:
        """One step of a migration's run(): a chunk of the first copy or one round."""
        s = self._slot(vm)
        if s.precopy is None:
            return
        try:
            next(s.precopy)
        except StopIteration as done:
            s.migration, s.precopy, s.running = None, None, False
            log.info("migration_done", vm=s.name, step=s.vm.steps,
                     identical=done.value.identical, pages_sent=done.value.pages_sent)
        except Exception as e:  # noqa: BLE001 - a failing migration stops the source only
            s.migration = s.precopy = None
            self._crash(s, e)

    def isolation_map(self, text: bytes) -> None:
        """`kvm/isolation/map`: extend the KVM address space (EINVAL: unknown symbol)."""
        isolation_map(self.module.isolation, parse_map(text))
        log.info("isolation_map", text=text.decode("latin-1").rstrip("\n"))

    def set_state(self, vm: str, action: str, steps: int | None = None) -> None:
        """vm<N>/state: `run`, `pause`, `restart`, `destroy`, or `step N`: run N more steps
        and pause (RunControl).  A crashed VM refuses `run` and `step N` (EINVAL) until a
        restart."""
        s = self._slot(vm)
        if action == "destroy":
            self.destroy(vm)
            return
        if action == "restart":
            i = self.slots.index(s)
            self._release(s)
            fresh = self._create(s.name, s.config)
            fresh.running = s.running or s.failure is not None  # a paused VM restarts paused
            fresh.dest_of = s.dest_of
            fresh.control = s.control.restarted()
            self.slots[i] = s = fresh
        elif action in ("run", STEP) and s.failure:
            raise OSError(errno.EINVAL, f"{vm} crashed; restart it")
        else:
            s.running = action != "pause"
            s.control.stop_at = s.vm.steps + steps if steps is not None else None
        log.info("vm_state", vm=vm, action=action, steps=s.vm.steps, step_by=steps)

    def set_break(self, vm: str, kind: str, step: int | None = None) -> None:
        """vm<N>/break: arm `audit_error`, `guest_crash` or `step=N` (`none` disarms)."""
        s = self._slot(vm)
        s.control.arm(kind, step)
        log.info("vm_break", vm=vm, condition=render_break(kind, step), steps=s.vm.steps)


def main(config: SimConfig, requests: Connection, out: Connection,
         prepare: Callable[[Simulation], None] | None = None,
         stores: StoreChannel | None = None) -> None:
    """Entry point of the spawned process.

    It ignores SIGINT and SIGTERM: a terminal's Ctrl-C or systemd's stop signal reaches the
    whole process group, but only the main process decides when the simulation ends (it
    sends `stop`, or its death closes the pipe).  `prepare` runs on the simulation before
    it serves (`mmud replay --mount` replays the recording into it there).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    setup_logging(config.log_level)
    try:
        sim = Simulation(config, requests, out, stores)
    except (ValueError, ParamError) as e:  # a configuration the VM refuses
        out.send(Reply(0, errno=errno.EINVAL, message=str(e)))
        return
    if prepare is not None:
        prepare(sim)
    sim.run()

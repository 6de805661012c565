"""The simulation process: the one owner of VM and MMU state.

It runs apart from the FUSE process because a pure-Python loop in the same process holds the
GIL and makes every control-file access wait for the 5 ms switch interval (docs/daemon.md).
The loop steps each running VM in batches of about `BATCH_SECONDS`, and between batches —
never inside one, so that the same seed and the same writes at the same steps give the same
run — it drains the request pipe, applies each request, publishes a fresh snapshot and
answers.  While running it also publishes every `PUBLISH_SECONDS`, which doubles as the
liveness signal the main process turns into WATCHDOG=1.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from enum import StrEnum
from multiprocessing.connection import Connection
from typing import Any

import structlog

from mmud.daemon import vmctl, vmio
from mmud.daemon.protocol import Reply, Request, SimConfig, Snapshot, VmConfig, VmSnapshot
from mmud.daemon.faultlog import FaultLogPublisher
from mmud.daemon.status import RateMeter, render_status
from mmud.kvm.isolation import isolation_map
from mmud.uapi.isolation import parse_map
from mmud.kvm.module import KvmModule
from mmud.machine import VM
from mmud.migration import Migration, MigrationResult
from mmud.uapi.params import ParamError
from mmud.log import setup_logging

# A batch this long keeps a request's wait (at most one batch) far under the 20 ms budget
# from a parameter write to its effect, while the per-batch pipe poll stays negligible.
BATCH_SECONDS = 0.002
# Files show values at most this old while the VM runs; also the paused loop's poll timeout.
PUBLISH_SECONDS = 0.05
STEP_CHUNK = 32  # steps between two looks at the batch deadline


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
    migration: Generator[None, None, MigrationResult] | None = None  # the running pre-copy, if any
    migrate_text: Callable[[], str] = lambda: ""  # what vm<N>/migrate shows

    @property
    def state(self) -> VmState:
        if self.failure:
            return VmState.CRASHED
        return VmState.RUNNING if self.running else VmState.PAUSED

    @property
    def debugfs_dir(self) -> str:
        return f"{os.getpid()}-{self.fd}"


class Simulation:
    """The loop, the VMs and the request handlers (`op` name -> method)."""

    def __init__(self, config: SimConfig, requests: Connection, out: Connection) -> None:
        self.module = KvmModule(config.load)  # one kvm module, shared by every VM
        self.params = self.module.params
        self.requests, self.out = requests, out
        self.slots = [self._create(c.name, c) for c in config.vms]
        self.handlers: dict[str, Callable[..., Any]] = {
            "param": self.set_param,
            "clear_stat": self.clear_stat,
            "state": self.set_state,
            "isolation_map": self.isolation_map,
            "inject": self.inject,
            "memory_read": lambda vm, gpa, size: vmio.memory_read(self._slot(vm).vm, gpa, size),
            "memory_write": lambda vm, gpa, data: vmio.memory_write(self._slot(vm).vm, gpa, data),
            "dirty_log": lambda vm, slot: self._slot(vm).vm.get_dirty_log(slot),
            "migrate": self.migrate,
            "memslot": lambda vm, **line: vmctl.set_memslot(self._slot(vm).vm, **line),
            "zap_all": lambda vm, kind: vmctl.zap_all(self._slot(vm).vm, kind,
                                                      self._slot(vm).running),
        }
        self.isolation = FaultLogPublisher(self.module.isolation, config.state_dir)
        self.logs: dict[str, tuple[str, ...]] = {}
        self._seq = 0
        self._batch = 1
        self._stopping = False

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
                self._drain(timeout=0)
            else:
                self._drain(timeout=PUBLISH_SECONDS)
            self._advance_migrations()
            if time.monotonic() - published >= PUBLISH_SECONDS:
                self.publish()
                published = time.monotonic()

    def _step_batch(self, running: list[_Slot]) -> None:
        """Step every running VM `_batch` steps, resizing the batch toward BATCH_SECONDS."""
        t0 = time.perf_counter()
        deadline = t0 + BATCH_SECONDS
        for s in running:
            try:
                # In chunks, so that a stretch of slow steps (an audit at every point, a
                # zap) ends the batch on time and a waiting request is served.
                done = 0
                while done < self._batch and time.perf_counter() < deadline:
                    done += s.vm.step(min(STEP_CHUNK, self._batch - done)) or 1
            except Exception as e:  # noqa: BLE001 - any VM failure stops that VM, not the host
                self._crash(s, e)
        elapsed = time.perf_counter() - t0
        scale = BATCH_SECONDS / elapsed if elapsed > 0 else 2.0
        self._batch = max(1, min(self._batch * 2, int(self._batch * scale)))

    def _crash(self, s: _Slot, e: Exception) -> None:
        """Stop a VM whose simulation raised, as KVM stops a VM on an internal error.

        The daemon keeps serving: the files show the last state, vm<N>/state reads
        "crashed" and `restart` builds a fresh VM.
        """
        s.running, s.failure = False, f"{type(e).__name__}: {e}"
        log.error("vm_crashed", vm=s.name, steps=s.vm.steps, seed=s.config.seed, exc_info=e)

    def _drain(self, timeout: float) -> None:
        """Apply every pending request; EOF means the main process is gone."""
        try:
            while self.requests.poll(timeout):
                self._apply(self.requests.recv())
                timeout = 0
        except EOFError:
            self._stopping = True

    def _apply(self, req: Request) -> None:
        if req.op == "stop":
            self._stopping = True
            return
        step = self.slots[0].vm.steps
        try:
            reply = Reply(req.id, result=self.handlers[req.op](**req.args), step=step)
        except (ParamError, OSError) as e:
            reply = Reply(req.id, errno=e.errno or errno.EINVAL, message=str(e), step=step)
        self.publish()  # the change is visible before the writer's write(2) returns
        self.out.send(reply)

    def publish(self) -> None:
        self._seq += 1
        self.out.send(Snapshot(
            seq=self._seq,
            params={n: self.params.render(n) for n in self.params.names()},
            vms=tuple(self._vm_snapshot(s) for s in self.slots),
            logs={**self.logs, **self.isolation.logs(self._fault_context()),
                  "audit_log": tuple(line.rstrip("\n") for line in self.module.audit.lines)}))

    def _vm_snapshot(self, s: _Slot) -> VmSnapshot:
        stats = s.vm.stats
        status = render_status(s.vm, s.state, s.rates.update(s.vm.steps, stats), s.failure,
                               pid=os.getpid())
        return VmSnapshot(s.name, s.debugfs_dir, s.state.value, s.vm.steps, stats, status,
                          s.vm.render_inject(), vmio.dirty_log_slots(s.vm), s.migrate_text(),
                          memslots=vmctl.render_memslots(s.vm.memslots), config=s.config)

    # -- request handlers ---------------------------------------------------------------

    def _slot(self, name: str) -> _Slot:
        for s in self.slots:
            if s.name == name:
                return s
        raise OSError(errno.ENOENT, f"no VM {name}")

    def set_param(self, name: str, text: bytes) -> bytes:
        self.params[name] = text
        log.info("param_set", name=name, value=self.params[name], step=self.slots[0].vm.steps,
                 applied_ns=time.monotonic_ns())
        return self.params.render(name)

    def clear_stat(self, name: str, vm: str | None = None) -> None:
        """`echo 0 > kvm/<stat>` clears it in every VM, `kvm/<pid>-<fd>/<stat>` in one."""
        for s in self.slots if vm is None else [self._slot(vm)]:
            s.vm.clear_stat(name)
        log.info("stat_cleared", name=name, vm=vm or "all")

    def _fault_context(self) -> dict[str, object]:
        """Where new fault-log entries happened: the newest VM (the one isolation logs for)."""
        s = self.slots[-1]
        return {"vm": s.name, "seed": s.config.seed, "step": s.vm.steps}

    def inject(self, vm: str, name: str) -> None:
        """`vm<N>/inject`: arm a bug in that VM ("none" disarms)."""
        self._slot(vm).vm.inject(name)
        log.info("bug_armed", vm=vm, bug=name, step=self._slot(vm).vm.steps)

    def migrate(self, vm: str, action: str) -> None:
        """`echo start > vm<N>/migrate`: pre-copy it into a new paused VM, one round per loop
        turn while the source keeps running; the source is paused at the stop."""
        s = self._slot(vm)
        if s.migration is not None or not s.running:
            raise OSError(errno.EBUSY, f"{vm} is migrating or not running")
        migration = Migration.to_new_vm(s.vm)
        name = f"vm{len(self.slots)}"
        config = VmConfig(name, s.config.mem_mb, s.config.vcpus, s.config.seed, workload=None)
        dest = _Slot(name, config, migration.dest, os.memfd_create(f"kvm-{name}", os.MFD_CLOEXEC),
                     running=False)
        self.slots.append(dest)
        s.migration, s.migrate_text = migration.run(), migration.result.render
        log.info("migration_started", vm=vm, dest=name, step=s.vm.steps)

    def _advance_migrations(self) -> None:
        for s in self.slots:
            if s.migration is None:
                continue
            try:
                next(s.migration)
            except StopIteration as done:
                s.migration, s.running = None, False
                log.info("migration_done", vm=s.name, step=s.vm.steps,
                         identical=done.value.identical, pages_sent=done.value.pages_sent)
            except Exception as e:  # noqa: BLE001 - a failing migration stops the source only
                s.migration = None
                self._crash(s, e)

    def isolation_map(self, text: bytes) -> None:
        """`kvm/isolation/map`: extend the KVM address space (EINVAL: unknown symbol)."""
        isolation_map(self.module.isolation, parse_map(text))
        log.info("isolation_map", text=text.decode("latin-1").rstrip("\n"))

    def set_state(self, vm: str, action: str) -> None:
        s = self._slot(vm)
        if action == "restart":
            i = self.slots.index(s)
            os.close(s.fd)
            fresh = self._create(s.name, s.config)
            fresh.running = s.running or s.failure is not None  # a paused VM restarts paused
            self.slots[i] = s = fresh
        elif action == "run" and s.failure:
            raise OSError(errno.EINVAL, f"{vm} crashed; restart it")
        else:
            s.running = action == "run"
        log.info("vm_state", vm=vm, action=action, steps=s.vm.steps)


def main(config: SimConfig, requests: Connection, out: Connection) -> None:
    """Entry point of the spawned process.

    It ignores SIGINT and SIGTERM: a terminal's Ctrl-C or systemd's stop signal reaches the
    whole process group, but only the main process decides when the simulation ends (it
    sends `stop`, or its death closes the pipe).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    setup_logging(config.log_level)
    try:
        sim = Simulation(config, requests, out)
    except (ValueError, ParamError) as e:  # a configuration the VM refuses
        out.send(Reply(0, errno=errno.EINVAL, message=str(e)))
        return
    sim.run()

"""The layout of the control filesystem (docs/control-files.md §10) and path lookup in it.

    parameters/<param>          like /sys/module/kvm/parameters
    kvm/mmu-debug, kvm/<stat>   like /sys/kernel/debug/kvm (stats summed over VMs)
    kvm/fault_log, kvm/isolation/{map,mappings}   address-space isolation (docs/isolation.md)
    kvm/audit_log, vm<N>/inject                   the MMU audit's log; bug injection
    kvm/<pid>-<fd>/<stat>       one directory per VM, named as KVM names it
    vm<N>/state, vm<N>/status   simulator control, one directory per VM
    vm<N>/break                 pause at an audit error, a guest crash, a step (docs/daemon.md)
    vm<N>/recording             the run's recording so far (docs/replay.md)
    vm<N>/memory, vm<N>/dirty_log/<slot>, vm<N>/migrate   guest RAM, dirty logs, live migration
    vm<N>/memslots, vm<N>/zap_all   memslot changes, zap of every shadow page (docs/memslots-mmio.md)
    vm<N>/mmu/{pages,walk}, kvm/<pid>-<fd>/mmu_rmaps_stat   the shadow tables on view (docs/mmu.md)
    vms                         the VMs, one line each; `create …`/`destroy …` (mmud/uapi/vms.py)
    tracing/                    like /sys/kernel/tracing: the kvmmmu events (docs/tracing.md)

A later file is one more entry in `_kvm_files` or `_vm_files`, built from the node types.
"""

from __future__ import annotations

import errno
from collections.abc import Mapping

from mmud.daemon.protocol import Snapshot
from mmud.fs.nodes import (
    Backend,
    Parse,
    CommandFile,
    Dir,
    File,
    LiveFile,
    Node,
    PipeFile,
    RequestFile,
    choice_file,
    dirty_log_dir,
    isolation_dir,
    log_file,
    memory_file,
    recording_file,
    mmu_debug_file,
    param_file,
    requested_file,
    stat_file,
    walk_file,
)
from mmud.fs.memslots import memslots_file, zap_all_file
from mmud.uapi.bugs import INJECTABLE_BUGS
from mmud.uapi.params import Params
from mmud.uapi.runcontrol import parse_break, parse_state
from mmud.uapi.stats import STATS
from mmud.uapi.tracefs import parse_buffer_size, parse_enable, parse_number, parse_text
from mmud.uapi.vms import parse_vms_line, render_vm_line


class Tree:
    """The root directory; per-VM directories follow the VMs of the current snapshot."""

    def __init__(self, backend: Backend, params: Params) -> None:
        self.backend = backend
        self.parameters = Dir({n: param_file(backend, params, n) for n in params.names()})
        self._kvm_files: dict[str, Node] = {"mmu-debug": mmu_debug_file(backend, params)}
        self._kvm_files.update({s.name: stat_file(backend, s) for s in STATS})
        self._kvm_files.update(fault_log=log_file("fault_log"), isolation=isolation_dir(backend),
                               audit_log=log_file("audit_log"))
        self._vm_dirs: dict[str, tuple[Dir, Dir]] = {}  # VM name -> (debugfs dir, vm<N>/ dir)
        self.vms = CommandFile(backend, _render_vms, parse_vms_line)
        self.kvm = Dir(self._kvm_children)
        self.tracing = self._tracing()
        self.root = Dir(self._root_children)

    def _dirs(self, vm: str) -> tuple[Dir, Dir]:
        dirs = self._vm_dirs.get(vm)  # never a second lookup: another thread may prune it
        if dirs is None:
            dirs = self._vm_dirs.setdefault(vm, (
                Dir({**{s.name: stat_file(self.backend, s, vm) for s in STATS},
                     # kvm_arch_create_vm_debugfs(), after the stats; 0644 without a write
                     # method in Linux (a write fails), refused at open here (§9)
                     "mmu_rmaps_stat": requested_file(self.backend, "mmu_rmaps_stat",
                                                      {"vm": vm}, 0o644)}),
                Dir(self._vm_files(vm))))
        return dirs

    def _vm_files(self, vm: str) -> dict[str, Node]:
        def state(snap: Snapshot) -> bytes:
            one = snap.vm(vm)
            return f"{one.state}\n".encode() if one else b""

        def status(snap: Snapshot) -> bytes:
            one = snap.vm(vm)
            return one.status.encode() if one else b""

        def inject(snap: Snapshot) -> bytes:
            one = snap.vm(vm)
            return one.inject.encode() if one else b""

        def migrate(snap: Snapshot) -> bytes:
            one = snap.vm(vm)
            return one.migrate.encode() if one else b""

        def breaks(snap: Snapshot) -> bytes:
            one = snap.vm(vm)
            return one.breaks.encode() if one else b""

        return {
            "memory": memory_file(self.backend, vm),
            "dirty_log": dirty_log_dir(self.backend, vm),
            "migrate": choice_file(self.backend, migrate, "migrate", "action", ("start",),
                                   {"vm": vm}),
            "state": RequestFile(self.backend, state, "state",
                                 lambda data: {"vm": vm, **parse_state(data)}),
            "break": RequestFile(self.backend, breaks, "break",
                                 lambda data: {"vm": vm, **parse_break(data)}),
            "inject": choice_file(self.backend, inject, "inject", "name",
                                  ("none", *INJECTABLE_BUGS), {"vm": vm}),
            "status": File(status),
            "recording": recording_file(self.backend),
            "memslots": memslots_file(self.backend, vm),
            "zap_all": zap_all_file(self.backend, vm),
            "mmu": Dir({"pages": requested_file(self.backend, "mmu_pages", {"vm": vm}),
                        "walk": walk_file(self.backend, vm)}),
        }

    def _kvm_children(self, snap: Snapshot) -> Mapping[str, Node]:
        return {**self._kvm_files, **{v.debugfs_dir: self._dirs(v.name)[0] for v in snap.vms}}

    def _root_children(self, snap: Snapshot) -> Mapping[str, Node]:
        names = {v.name for v in snap.vms}
        for gone in self._vm_dirs.keys() - names:  # a destroyed VM's nodes go with it
            self._vm_dirs.pop(gone, None)
        return {"parameters": self.parameters, "kvm": self.kvm, "vms": self.vms,
                "tracing": self.tracing,
                **{v.name: self._dirs(v.name)[1] for v in snap.vms}}

    def _tracing(self) -> Dir:
        """tracing/: every file is rendered and applied by the simulation (op `tracefs`);
        the event directories follow the snapshot's `trace_events`."""
        b = self.backend

        def live(file: str, parse: Parse | None, mode: int = 0o644) -> LiveFile:
            return LiveFile(b, "tracefs", {"file": file}, parse, mode)

        event_dirs: dict[str, Dir] = {}

        def event_dir(system: str, name: str) -> Dir:
            d = event_dirs.get(name)
            if d is None:
                base = f"events/{system}/{name}/"
                d = event_dirs.setdefault(name, Dir({
                    "enable": live(base + "enable", parse_enable),
                    "filter": live(base + "filter", parse_text),
                    "format": live(base + "format", None, 0o444)}))
            return d

        def systems(snap: Snapshot) -> dict[str, list[str]]:
            out: dict[str, list[str]] = {}
            for full in snap.trace_events:
                system, _, name = full.partition(":")
                out.setdefault(system, []).append(name)
            return out

        def system_dir(system: str) -> Dir:
            return Dir(lambda snap: {
                "enable": live(f"events/{system}/enable", parse_enable),
                **{n: event_dir(system, n) for n in systems(snap).get(system, [])}})

        events = Dir(lambda snap: {"enable": live("events/enable", parse_enable),
                                   **{s: system_dir(s) for s in systems(snap)}})
        cpu_dirs: dict[int, Dir] = {}

        def cpu_dir(cpu: int) -> Dir:
            """per_cpu/cpu<N>/: the trace CPUs are the vCPU indices (docs/tracing.md)."""
            d = cpu_dirs.get(cpu)
            if d is None:
                d = cpu_dirs[cpu] = Dir({"stats": live(f"per_cpu/cpu{cpu}/stats", None, 0o444)})
            return d

        per_cpu = Dir(lambda snap: {
            f"cpu{k}": cpu_dir(k)
            for k in range(max([v.config.vcpus for v in snap.vms if v.config] + [1]))})
        return Dir({
            "available_events": live("available_events", None, 0o444),
            "set_event": live("set_event", parse_text),
            "events": events,
            "tracing_on": live("tracing_on", parse_number),
            "buffer_size_kb": live("buffer_size_kb", parse_buffer_size),
            "trace": live("trace", parse_text),
            "trace_pipe": PipeFile(b, "tracefs"),
            "per_cpu": per_cpu,
        })

    def lookup(self, path: str, snap: Snapshot) -> Node:
        """The node at an absolute path such as "/kvm/pf_fixed"; ENOENT if there is none."""
        node: Node = self.root
        for part in path.strip("/").split("/") if path != "/" else ():
            if not isinstance(node, Dir) or part not in (children := node.children(snap)):
                raise OSError(errno.ENOENT, path)
            node = children[part]
        return node


def _render_vms(snap: Snapshot) -> bytes:
    """`vms`: one line per VM, in creation order (mmud/uapi/vms.py renders it)."""
    return "".join(render_vm_line(v.name, v.state, v.config.mem_mb, v.config.vcpus, v.config.seed,
                                  v.config.workload) if v.config else f"{v.name} {v.state}\n"
                   for v in snap.vms).encode()

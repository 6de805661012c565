"""The messages between the simulation process and the main (FUSE) process.

The simulation publishes `Snapshot`s: immutable, self-contained pictures of everything the
control files show.  The main process swaps the latest one into a single reference, so a file
is rendered without a lock and without waiting on the simulation.  Anything that changes
state travels the other way as a `Request`, which the simulation applies between step
batches (that keeps runs deterministic) and answers with a `Reply`; the snapshot that shows
the change is always sent before the reply.  Parameter stores and tracing/ writes travel on
a `StoreChannel` of their own, so that a running step can take one at an audit point
(docs/daemon.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any


@dataclass(frozen=True)
class VmConfig:
    """What builds one VM, and builds it again identically on a restart."""

    name: str = "vm0"  # the simulator's handle: the vm<N>/ directory
    mem_mb: int = 64
    vcpus: int = 1
    seed: int = 0
    workload: str | None = "kernel"


@dataclass(frozen=True)
class SimConfig:
    """What the simulation process starts with."""

    vms: tuple[VmConfig, ...] = (VmConfig(),)
    load: dict[str, str | None] = field(default_factory=dict)  # module parameters at load time
    log_level: str = "info"
    state_dir: str | None = None  # where persisted logs go (fault_log.jsonl, recordings/)
    replay: str | None = None  # `mmud replay --mount`: a recording to replay, then serve paused
    replay_until: int | None = None  # ... stopped at this step of the first VM


@dataclass(frozen=True)
class VmSnapshot:
    """One VM as its files show it."""

    name: str  # "vm0": the simulator's own handle, stable across restarts
    debugfs_dir: str  # "<pid>-<fd>", as KVM names the per-VM debugfs directory
    state: str  # "running" or "paused"
    steps: int
    stats: dict[str, int]  # every stat of mmud.uapi.stats, vCPU stats summed over vCPUs
    status: str  # the vm<N>/status text
    inject: str = "[none]\n"  # the vm<N>/inject text: injectable bugs, the armed one in brackets
    dirty_log_slots: tuple[int, ...] = ()  # slots with dirty logging on: vm<N>/dirty_log/<slot>
    migrate: str = ""  # the vm<N>/migrate text: rounds of the last migration and its result
    memslots: str = ""  # the vm<N>/memslots table
    config: VmConfig | None = None  # what built the VM: a restart of the simulation rebuilds it
    ram_end: int = 0  # the end of the highest memslot: vm<N>/memory's st_size
    breaks: str = "none\n"  # the vm<N>/break text: the armed condition, the last hit


@dataclass(frozen=True)
class Snapshot:
    """Everything the control files render; never mutated once sent."""

    seq: int
    params: dict[str, bytes]  # parameter name -> sysfs file content
    vms: tuple[VmSnapshot, ...]
    logs: dict[str, tuple[str, ...]] = field(default_factory=dict)  # log name -> ring of lines
    trace_events: tuple[str, ...] = ()  # "kvmmmu:<event>": the tracing/events/ directories

    def vm(self, name: str) -> VmSnapshot | None:
        return next((v for v in self.vms if v.name == name), None)


@dataclass(frozen=True)
class Request:
    id: int
    op: str  # a key of the simulation's handler table
    args: dict[str, Any]


@dataclass(frozen=True)
class Reply:
    id: int
    errno: int = 0  # 0: applied; else the errno the write(2) fails with
    message: str = ""
    result: Any = None
    step: int = 0  # the VM step count at which the request was applied


@dataclass(frozen=True)
class StoreChannel:
    """The way a parameter store (or a tracing/ write: a tracepoint switch) reaches the
    simulation, even in the middle of a step; requests that only read take it too.

    The FUSE side sends the store's `Request` on `conn` (a pipe of its own), then bumps
    `posted`, a counter in shared memory (a `multiprocessing.RawValue`).  The simulation
    compares that counter with the stores it took at every place a store may land inside a
    step (`mmud.kvm.mmu.audit.store_point`): one memory read, no system call, so looking
    costs nothing measurable even at every audit point."""

    conn: Connection  # the simulation's receiving end
    posted: Any  # a ctypes unsigned 64-bit value in shared memory: stores sent so far

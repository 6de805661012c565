"""VM lifecycle inside the simulation: `create`, `destroy`, migrations that replace their
destination — and proof, with `gc` and weak references, that a VM that goes away is freed.

Requests go through `Simulation._apply`, the path a write takes in the daemon (handler,
snapshot, collection, reply), against a recording pipe; the filesystem side is
tests/test_fs_vms.py (real mount) and tests/test_fs_tree.py (the `vms` node).
"""

from __future__ import annotations

import errno
import gc
import os
import weakref
from collections.abc import Iterator
from typing import Any

import pytest

from mmud.daemon.protocol import Reply, Request, SimConfig, Snapshot, VmConfig
from mmud.daemon.sim import Simulation
from mmud.guest import WORKLOADS
from mmud.host import HOST_WORKLOADS
from mmud.uapi import vms

DEFAULT = VmConfig(mem_mb=8, vcpus=1, seed=1, workload="kernel")


class Out:
    """The simulation's end of the pipe: keeps what it sends."""

    def __init__(self) -> None:
        self.sent: list[Any] = []

    def send(self, message: Any) -> None:
        self.sent.append(message)


@pytest.fixture
def sim() -> Simulation:
    # Isolation on: the module then points at the newest VM, one more reference to drop.
    return Simulation(SimConfig(vms=(DEFAULT,), load={"address_space_isolation": "1"}),
                      None, Out())  # type: ignore[arg-type]


def apply(sim: Simulation, op: str, **args: Any) -> Reply:
    sim._apply(Request(1, op, args))
    reply = sim.out.sent[-1]
    assert isinstance(reply, Reply)
    return reply


def ok(sim: Simulation, op: str, **args: Any) -> None:
    reply = apply(sim, op, **args)
    assert reply.errno == 0, reply.message


def snapshot(sim: Simulation) -> Snapshot:
    return next(m for m in reversed(sim.out.sent) if isinstance(m, Snapshot))


def names(sim: Simulation) -> list[str]:
    return [s.name for s in sim.slots]


def run(sim: Simulation, steps: int = 500) -> None:
    for s in sim.slots:
        if s.running:
            s.vm.step(steps)


def finish_migration(sim: Simulation, source: str = "vm0") -> None:
    s = sim._slot(source)
    while s.precopy is not None:
        sim._advance_migrations()
        s.vm.step(50)


@pytest.fixture
def no_automatic_gc() -> Iterator[None]:
    """Only an explicit collection frees cycles: the one the simulation makes must do it."""
    gc.collect()
    gc.disable()
    yield
    gc.enable()


def memfd_open(fd: int, name: str) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}").startswith(f"/memfd:kvm-{name}")
    except FileNotFoundError:
        return False


def test_the_workload_names_the_filesystem_checks_are_the_simulations():
    assert set(vms.WORKLOADS) == {*WORKLOADS, *HOST_WORKLOADS}


def test_create_takes_what_the_line_leaves_out_from_the_daemons_command_line(sim):
    ok(sim, "create", name="vm5")
    ok(sim, "create", name="vm6", mem_mb=16, vcpus=2, seed=3, workload="none")
    five, six = sim._slot("vm5"), sim._slot("vm6")
    assert five.config == VmConfig("vm5", 8, 1, 1, "kernel") and five.running
    assert six.config == VmConfig("vm6", 16, 2, 3, None)
    assert (six.vm.mem_mb, len(six.vm.vcpus), six.vm.seed, six.vm.workload_name) == (16, 2, 3, None)
    assert [v.name for v in snapshot(sim).vms] == ["vm0", "vm5", "vm6"]
    assert len({v.debugfs_dir for v in snapshot(sim).vms}) == 3


def test_a_created_vm_runs_its_seed_as_any_vm_of_that_configuration(sim):
    """Per-VM determinism: the same configuration gives the same run, created or re-created."""
    def stats_after_create() -> dict[str, int]:
        ok(sim, "create", name="vm5", seed=3, vcpus=2)
        sim._slot("vm5").vm.step(2000)
        stats = sim._slot("vm5").vm.stats
        ok(sim, "destroy", name="vm5")
        return stats

    first = stats_after_create()
    run(sim, 700)  # vm0 moves on meanwhile
    assert stats_after_create() == first
    assert first["pf_fixed"] > 0


@pytest.mark.parametrize(("args", "err"), [
    ({"name": "vm0"}, errno.EEXIST),
    ({"name": "bad"}, errno.EINVAL),
    ({"name": "vm5", "workload": "bogus"}, errno.EINVAL),
    ({"name": "vm5", "vcpus": vms.KVM_MAX_VCPUS + 1}, errno.EINVAL),
    # RAM above the PCI hole of 2^31 pages: one page more than a memslot may hold
    ({"name": "vm5", "mem_mb": (8 << 20) + 2048}, errno.EINVAL),
])
def test_create_refuses_with_an_errno_and_changes_nothing(sim, args, err):
    current = sim.module.isolation.current
    assert apply(sim, "create", **args).errno == err
    assert names(sim) == ["vm0"]
    assert sim.module.isolation.current is current


def test_destroy_refuses_vm0_with_eperm_and_an_unknown_vm_with_enoent(sim):
    assert apply(sim, "destroy", name="vm0").errno == errno.EPERM
    assert apply(sim, "state", vm="vm0", action="destroy").errno == errno.EPERM
    assert apply(sim, "destroy", name="vm5").errno == errno.ENOENT
    assert names(sim) == ["vm0"] and sim.slots[0].running


@pytest.mark.parametrize("how", ["vms", "state"])
def test_a_destroyed_vm_is_gone_and_freed_before_the_reply(sim, no_automatic_gc, how):
    ok(sim, "create", name="vm5", seed=3, vcpus=2)
    five = sim._slot("vm5")
    fd, vm = five.fd, weakref.ref(five.vm)
    run(sim, 2000)  # faults in the isolation log, shadow pages, rmaps: all of it must go
    sim.publish()
    assert sim.module.isolation.current is five.vm.isolation
    del five
    if how == "vms":
        ok(sim, "destroy", name="vm5")
    else:
        ok(sim, "state", vm="vm5", action="destroy")
    assert vm() is None  # collected by the simulation itself: automatic gc is off
    assert not memfd_open(fd, "vm5")
    assert [v.name for v in snapshot(sim).vms] == ["vm0"]
    assert sim.module.isolation.current is sim.slots[0].vm.isolation
    run(sim)  # the rest goes on
    ok(sim, "create", name="vm5")  # the name is free again


def test_migrations_in_a_row_replace_their_destination_and_free_the_old_one(sim, no_automatic_gc):
    dests = []
    for _ in range(10):
        ok(sim, "migrate", vm="vm0", action="start")
        dests.append(weakref.ref(sim._slot("vm1").vm))
        finish_migration(sim)
        assert "result: identical" in sim.slots[0].migrate_text()
        ok(sim, "state", vm="vm0", action="run")
        run(sim, 300)
    assert names(sim) == ["vm0", "vm1"]
    assert [d() is None for d in dests] == [True] * 9 + [False]
    assert sim._slot("vm1").dest_of == "vm0"


def test_a_migration_goes_to_the_lowest_free_name_and_never_replaces_a_created_vm(sim):
    ok(sim, "create", name="vm1")
    ok(sim, "create", name="vm3")
    ok(sim, "migrate", vm="vm0", action="start")
    assert names(sim) == ["vm0", "vm1", "vm3", "vm2"]
    finish_migration(sim)
    ok(sim, "state", vm="vm0", action="run")
    ok(sim, "migrate", vm="vm3", action="start")  # vm3's destination: the next free name
    assert names(sim) == ["vm0", "vm1", "vm3", "vm2", "vm4"]
    ok(sim, "migrate", vm="vm0", action="start")  # replaces vm2, vm0's own destination
    assert names(sim) == ["vm0", "vm1", "vm3", "vm4", "vm2"]
    assert sim._slot("vm1").dest_of is None and sim._slot("vm2").dest_of == "vm0"


def test_a_destination_belongs_to_its_sources_name(sim):
    """Destroying the source leaves its destination; a VM made again under the source's name
    replaces it at its first migration, so create/migrate/destroy cycles stay bounded."""
    for _ in range(3):
        ok(sim, "create", name="vm5")
        ok(sim, "migrate", vm="vm5", action="start")
        assert sim._slot("vm1").dest_of == "vm5"
        ok(sim, "destroy", name="vm5")  # its running migration goes with it
        assert names(sim) == ["vm0", "vm1"]
    ok(sim, "migrate", vm="vm0", action="start")  # another source: a destination of its own
    assert names(sim) == ["vm0", "vm1", "vm2"] and sim._slot("vm2").dest_of == "vm0"


def test_destroying_the_destination_cancels_the_migration_and_the_source_runs_on(sim,
                                                                                  no_automatic_gc):
    source = sim.slots[0]
    ok(sim, "migrate", vm="vm0", action="start")
    dest = weakref.ref(sim._slot("vm1").vm)
    sim._advance_migrations()  # dirty logging is on in the source now
    assert source.vm.memslots.slots[0].log_dirty
    ok(sim, "destroy", name="vm1")
    assert dest() is None
    assert source.migration is None and source.precopy is None and source.running
    assert not source.vm.memslots.slots[0].log_dirty  # as before the migration
    assert "result: cancelled" in source.migrate_text()
    run(sim)
    ok(sim, "migrate", vm="vm0", action="start")  # a new one can start
    assert names(sim) == ["vm0", "vm1"]


def test_a_restart_frees_the_old_vm_and_keeps_the_destination_role(sim, no_automatic_gc):
    ok(sim, "migrate", vm="vm0", action="start")
    finish_migration(sim)
    old = weakref.ref(sim._slot("vm1").vm)
    ok(sim, "state", vm="vm1", action="restart")
    assert old() is None
    assert sim._slot("vm1").dest_of == "vm0"
    ok(sim, "state", vm="vm0", action="run")
    ok(sim, "migrate", vm="vm0", action="start")
    assert names(sim) == ["vm0", "vm1"]


@pytest.mark.parametrize(("op", "args", "publishes"), [
    ("mmu_pages", {"vm": "vm0"}, False),
    ("mmu_walk", {"vm": "vm0", "gva": 0}, False),
    ("memory_read", {"vm": "vm0", "gpa": 0, "size": 8}, False),
    ("tracefs_read", {"action": "pipe", "size": 4096}, False),
    ("tracefs", {"action": "write", "file": "tracing_on", "text": "0\n"}, True),
    ("inject", {"vm": "vm0", "name": "none"}, True),
])
def test_only_requests_that_change_state_are_followed_by_a_snapshot(sim, op, args, publishes):
    """A write's change is published before its reply; a read changes nothing a snapshot
    shows, so none is sent (a blocked trace_pipe reader polls every 5 ms)."""
    before = len(sim.out.sent)
    ok(sim, op, **args)
    assert [type(m) for m in sim.out.sent[before:]] == ([Snapshot] if publishes else []) + [Reply]

"""vm0/memory, vm0/dirty_log/<slot> and vm0/migrate through a real mount."""

from __future__ import annotations

import errno
import os
import stat

import multiprocessing

import pytest

from mmud.daemon.protocol import Reply
from mmud.daemon.protocol import SimConfig, VmConfig
from mmud.daemon.sim import Simulation
from mmud.fs.nodes import dirty_log_dir
from tests.fusemount import echo, serving, wait_for

PAGE = 4096


@pytest.fixture(scope="module")
def daemon(workdir):
    yield from serving(workdir / "dirty", "--seed", "4", "--mem", "16M")


def test_memory_reads_and_writes_guest_ram(daemon):
    path = daemon.path("vm0/memory")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    fd = os.open(path, os.O_RDWR)
    try:
        gpa = 15 << 20  # high in RAM, where the guest kernel rarely allocates
        assert os.pwrite(fd, b"mmud-dirty" * 1000, gpa) == 10_000
        assert os.pread(fd, 10, gpa) == b"mmud-dirty"
        assert len(os.pread(fd, 300_000, 0)) == 300_000  # chunked through the simulation
        assert os.pread(fd, 4096, 16 << 20) == b""  # past the last memslot: end of file
    finally:
        os.close(fd)


def test_dirty_log_and_migration(daemon):
    assert os.listdir(daemon.path("vm0/dirty_log")) == []
    with pytest.raises(FileNotFoundError):
        daemon.path("vm0/dirty_log/0").read_bytes()
    assert echo(daemon.path("vm0/migrate"), "start").returncode == 0
    wait_for(lambda: "result:" in daemon.read("vm0/migrate"), 30, "the migration")
    text = daemon.read("vm0/migrate")
    assert text.startswith("round 0: sent 4096 pages, ") and "result: identical" in text, text
    assert daemon.read("vm0/state") == "paused\n" and daemon.read("vm1/state") == "paused\n"
    # vm1 holds the same RAM as the stopped vm0.
    assert daemon.path("vm1/memory").read_bytes() == daemon.path("vm0/memory").read_bytes()


def test_dirty_log_file_is_one_harvest_per_read_at_offset_0():
    """The file's handle against the simulation's handlers, without a mount."""
    config = SimConfig(vms=(VmConfig(mem_mb=4, workload=None),))
    ends = multiprocessing.Pipe()
    sim = Simulation(config, ends[0], ends[1])

    class Backend:
        snapshot = None

        def request(self, op, **args):
            return Reply(0, result=sim.handlers[op](**args))

    vm = sim.slots[0].vm
    vm.set_memslot(0, 0, vm.mem_bytes, log_dirty=True)
    sim.publish()
    snap = ends[0].recv()
    f = dirty_log_dir(Backend(), "vm0").children(snap)["0"]
    assert f.mode == 0o400
    vm.write_u64(3 * PAGE, 1)
    handle = f.open_handle()
    assert handle.read(0, 4096)[:1] == b"\x08"  # page 3, bit 3 of the first word
    assert handle.read(0, 4096)[:1] == b"\x00"  # the previous read harvested it
    vm.set_memslot(0, 0, vm.mem_bytes)
    with pytest.raises(OSError) as e:
        handle.read(0, 4096)
    assert e.value.errno == errno.ENOENT

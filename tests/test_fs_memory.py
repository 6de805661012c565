"""vm0/memory through a real mount: its size, fallocate, and I/O that reaches a hole or the end.

What the kernel decides on its own is what these tests look at: glibc's posix_fallocate falls
back to writing a byte per block only on EOPNOTSUPP, and only where the file "has no size";
FUSE hands a short read or write to the caller as it is.  The answers follow /dev/mem for
fallocate (ENODEV) and /proc/<pid>/mem (fs/proc/base.c mem_rw) for I/O: the bytes moved
before a hole, or EIO when none were.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

import mmud
from mmud.daemon import vmio
from mmud.kvm.devices import IORAM_BASE
from tests.fusemount import echo, serving, wait_for

MIB = 1 << 20
RAM = 16 * MIB  # --mem 16M: one memslot, [0, 16 MiB)
HOLE_SLOT = (9, 0x1000_0000, 0x1_0000)  # `add 9 0x10000000 0x10000`: RAM after a hole


@pytest.fixture(scope="module")
def daemon(workdir):
    yield from serving(workdir / "memory", "--seed", "2", "--mem", "16M")


@pytest.fixture
def paused(daemon):
    """vm0 stopped, so that guest memory changes only if a test changes it."""
    assert echo(daemon.path("vm0/state"), "pause").returncode == 0
    yield daemon
    assert echo(daemon.path("vm0/state"), "run").returncode == 0


@pytest.fixture
def mem(daemon):
    fd = os.open(daemon.path("vm0/memory"), os.O_RDWR)
    yield fd
    os.close(fd)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def errno_of(call, *args) -> int | None:
    with pytest.raises(OSError) as e:
        call(*args)
    return e.value.errno


def test_memory_size_is_the_end_of_guest_ram(daemon):
    st = os.stat(daemon.path("vm0/memory"))
    assert (stat.S_IMODE(st.st_mode), st.st_size) == (0o600, RAM)
    listing = subprocess.run(["ls", "-l", str(daemon.path("vm0/memory"))], capture_output=True,
                             text=True, check=True).stdout
    assert listing.split()[4] == str(RAM)
    assert os.stat(daemon.path("vm0/status")).st_size == 0  # generated text: procfs style


def test_posix_fallocate_fails_with_enodev_and_leaves_guest_memory_alone(paused):
    path = paused.path("vm0/memory")
    before = digest(path)
    fd = os.open(path, os.O_RDWR)
    try:
        for offset, length in ((0, RAM), (0, 1), (RAM - 4096, 4096), (RAM, MIB)):
            assert errno_of(os.posix_fallocate, fd, offset, length) == errno.ENODEV
    finally:
        os.close(fd)
    assert digest(path) == before


def test_fallocate_command_fails_and_leaves_guest_memory_alone(paused):
    if shutil.which("fallocate") is None:
        pytest.skip("fallocate(1) (util-linux) is not installed")
    path = paused.path("vm0/memory")
    before = digest(path)
    for args in (["-l", str(RAM)], ["-o", "4096", "-l", "8192"]):
        done = subprocess.run(["fallocate", *args, str(path)], capture_output=True, text=True,
                              check=False)
        assert (done.returncode, "No such device" in done.stderr) == (1, True), done
    # Zeroing a range is a mode FUSE itself refuses (EOPNOTSUPP), and fallocate(1), unlike
    # glibc's posix_fallocate, never falls back to writing.
    done = subprocess.run(["fallocate", "-z", "-l", "4096", str(path)], capture_output=True,
                          text=True, check=False)
    assert done.returncode == 1, done
    assert digest(path) == before


def test_fallocate_of_a_control_file_fails_with_enodev(daemon):
    fd = os.open(daemon.path("parameters/mmu_audit_ratelimit_burst"), os.O_WRONLY)
    try:
        assert errno_of(os.posix_fallocate, fd, 0, 4096) == errno.ENODEV
    finally:
        os.close(fd)
    assert daemon.read("parameters/mmu_audit_ratelimit_burst") == "10\n"


def test_cp_copies_all_of_guest_ram(paused, workdir):
    copy = workdir / "memory.copy"
    subprocess.run(["cp", str(paused.path("vm0/memory")), str(copy)], check=True)
    assert copy.stat().st_size == RAM
    assert digest(copy) == digest(paused.path("vm0/memory"))
    copy.unlink()


def test_a_write_across_the_end_of_ram_is_short(paused, mem):
    assert os.pwrite(mem, b"e" * 32, RAM - 16) == 16
    assert os.pread(mem, 32, RAM - 16) == b"e" * 16
    assert errno_of(os.pwrite, mem, b"e" * 32, RAM) == errno.EIO  # nothing written: EIO
    assert errno_of(os.pwrite, mem, b"e", RAM + MIB) == errno.EIO
    assert os.pread(mem, 32, RAM) == b""  # a read at the end is the end of file
    assert os.stat(paused.path("vm0/memory")).st_size == RAM  # the file does not grow


def test_a_large_read_that_reaches_the_end_is_short(daemon, mem):
    assert len(os.pread(mem, 1 * MIB, RAM - 100)) == 100


def test_io_across_a_hole_is_short_and_io_in_it_fails_with_eio(paused, mem):
    slot, gpa, size = HOLE_SLOT
    assert echo(paused.path("vm0/memslots"), f"add {slot} {gpa:#x} {size:#x}").returncode == 0
    try:
        wait_for(lambda: os.stat(paused.path("vm0/memory")).st_size == gpa + size, 5,
                 "st_size to follow the new slot")  # the kernel caches attributes for 1 s
        assert os.pwrite(mem, b"h" * 32, RAM - 16) == 16  # up to the hole
        assert os.pread(mem, 32, RAM - 16) == b"h" * 16
        assert len(os.pread(mem, 4 * MIB, RAM - 4096)) == 4096
        assert errno_of(os.pread, mem, 32, RAM) == errno.EIO  # in the hole: nothing read
        assert errno_of(os.pwrite, mem, b"h" * 32, RAM + 4096) == errno.EIO
        assert errno_of(os.pread, mem, 32, gpa - 16) == errno.EIO  # starts in the hole
        assert os.pwrite(mem, b"s" * 64, gpa + size - 32) == 32  # the new slot's end
        assert os.pread(mem, 64, gpa + size - 32) == b"s" * 32
        assert os.pread(mem, 16, gpa + size) == b""  # the end of the highest slot: EOF
    finally:
        assert echo(paused.path("vm0/memslots"), f"delete {slot}").returncode == 0
    wait_for(lambda: os.stat(paused.path("vm0/memory")).st_size == RAM, 5, "st_size back")


def test_a_guest_past_q35_low_ram_reads_eio_in_the_pci_hole(daemon):
    """A 3 GiB guest: RAM [0, 2 GiB) and [4 GiB, 5 GiB), the ioram device in between."""
    assert echo(daemon.path("vms"), "create vm8 workload=none mem=3G").returncode == 0
    try:
        path = daemon.path("vm8/memory")
        wait_for(path.exists, 5, "vm8/memory")
        assert os.stat(path).st_size == 5 << 30  # the end of RAM, past the hole
        fd = os.open(path, os.O_RDWR)
        try:
            low_end, high = 2 << 30, 4 << 30
            assert os.pwrite(fd, b"l" * 32, low_end - 16) == 16
            assert os.pread(fd, 32, low_end - 16) == b"l" * 16
            for gpa in (low_end, IORAM_BASE, high - 16):
                assert errno_of(os.pread, fd, 32, gpa) == errno.EIO
            assert os.pwrite(fd, b"h" * 32, high) == 32
            assert os.pread(fd, 32, high) == b"h" * 32
        finally:
            os.close(fd)
    finally:
        assert echo(daemon.path("vm8/state"), "destroy").returncode == 0


# -- the simulation's side (mmud/daemon/vmio.py), without a mount -------------------------------


def test_vmio_moves_bytes_up_to_a_hole_and_fails_with_eio_only_when_none_moved():
    vm = mmud.VM(mem_mb=4, workload=None)
    end = 4 * MIB
    vm.set_memslot(9, 0x1000_0000, 0x1_0000)
    assert vmio.ram_end(vm) == 0x1001_0000
    assert vmio.memory_write(vm, end - 16, b"w" * 32) == 16
    assert vmio.memory_read(vm, end - 16, 32) == b"w" * 16
    for gpa in (end, 0x1000_0000 - 1, -1):
        assert errno_of(vmio.memory_read, vm, gpa, 32) == errno.EIO
        assert errno_of(vmio.memory_write, vm, gpa, b"w") == errno.EIO
    assert vmio.memory_read(vm, 0x1001_0000, 32) == b""  # the end of the highest slot
    assert errno_of(vmio.memory_write, vm, 0x1001_0000, b"w") == errno.EIO
    assert len(vmio.memory_read(vm, 0, 1 << 30)) == vmio.MEMORY_CHUNK  # one chunk a request

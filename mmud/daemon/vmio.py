"""The simulation's handlers for the byte files of a VM: vm<N>/memory, vm<N>/dirty_log/<slot>.

They answer with bytes, so the FUSE process reads guest RAM and dirty bitmaps from the one
owner of that state instead of a snapshot. Each request moves at most MEMORY_CHUNK bytes,
which keeps it well inside one loop turn (the 20 ms budget of a control-file access).

Guest memory follows /proc/<pid>/mem (fs/proc/base.c `mem_rw`): a transfer stops at the
first byte that is not guest RAM and returns what it moved; only a transfer that moves
nothing fails, with EIO.  The FUSE handle (mmud/fs/nodes.py) turns that into a short read or
write when an earlier request of the same read(2)/write(2) moved bytes.
"""

from __future__ import annotations

import errno

from mmud.kvm.guest_rw import ram_extent
from mmud.kvm.vm import Kvm
from mmud.x86.paging import PAGE_SHIFT

# Bytes per memory request: what one FUSE read usually asks for (max_read, 128 KiB).
MEMORY_CHUNK = 128 << 10


def ram_end(vm: Kvm) -> int:
    """The end of the highest memslot: reads at or past it are end of file."""
    return max((s.end_gfn << PAGE_SHIFT for s in vm.memslots), default=0)


def memory_read(vm: Kvm, gpa: int, size: int) -> bytes:
    """pread of vm<N>/memory: the RAM from gpa up to the first hole; end of file at and past
    the end of the highest slot (the file's st_size); EIO at a hole below it, as mem_rw
    answers when access_remote_vm() copies nothing: unbacked guest-physical memory fails
    rather than invent bytes."""
    size = min(size, MEMORY_CHUNK)
    if size <= 0 or gpa >= ram_end(vm):
        return b""
    n = ram_extent(vm.memslots, gpa, size) if gpa >= 0 else 0
    if not n:
        raise OSError(errno.EIO, f"gpa {gpa:#x} is not guest RAM")
    return vm.read_guest(gpa, n)


def memory_write(vm: Kvm, gpa: int, data: bytes) -> int:
    """pwrite of vm<N>/memory: stores up to the first hole or the end of RAM (a short
    write), marking the pages dirty; EIO if gpa itself is not RAM, as mem_rw answers when
    nothing was copied (past the end too: the file does not grow)."""
    n = ram_extent(vm.memslots, gpa, min(len(data), MEMORY_CHUNK)) if gpa >= 0 else 0
    if not n:
        raise OSError(errno.EIO, f"gpa {gpa:#x} is not guest RAM")
    vm.write_guest(gpa, data[:n])
    return n


def dirty_log_slots(vm: Kvm) -> tuple[int, ...]:
    """The slots with dirty logging on: the entries of vm<N>/dirty_log/."""
    return tuple(sorted(s.id for s in vm.memslots if s.dirty_bitmap is not None))

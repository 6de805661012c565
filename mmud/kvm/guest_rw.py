"""Host access to guest RAM by byte range: kvm_read_guest() / kvm_write_guest().

What userspace reaches through its mapping of the memslots (vm<N>/memory, migration) and
KVM through its own copies. A write marks every page it touches dirty after copying, as
kvm_write_guest() does (mark_page_dirty_in_slot), so the dirty log sees host writes too.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

from mmud.kvm.kvm_main import KvmError
from mmud.kvm.memslot import Memslots
from mmud.x86.paging import PAGE_SHIFT

if TYPE_CHECKING:
    from mmud.kvm.vm import Kvm


def ram_extent(memslots: Memslots, gpa: int, size: int) -> int:
    """How many of the `size` bytes from gpa are guest RAM without a hole."""
    done = 0
    while done < size:
        slot = memslots.lookup((gpa + done) >> PAGE_SHIFT)
        if slot is None:
            break
        done = min(size, (slot.end_gfn << PAGE_SHIFT) - gpa)
    return done


def _pieces(memslots: Memslots, gpa: int, size: int) -> Iterator[np.ndarray]:
    """The byte views of the slots covering [gpa, gpa + size); EFAULT at a hole."""
    if gpa < 0 or ram_extent(memslots, gpa, size) < size:
        raise KvmError(errno.EFAULT, f"[{gpa:#x}, +{size:#x}) is not all guest RAM")
    end = gpa + size
    while gpa < end:
        slot = memslots.lookup(gpa >> PAGE_SHIFT)
        assert slot is not None, "ram_extent() found RAM all the way"
        start = gpa - (slot.base_gfn << PAGE_SHIFT)
        n = min(end, slot.end_gfn << PAGE_SHIFT) - gpa
        yield slot.backing.array.view(np.uint8)[start:start + n]
        gpa += n


def kvm_read_guest(memslots: Memslots, gpa: int, size: int) -> bytes:
    return b"".join(view.tobytes() for view in _pieces(memslots, gpa, size))


def kvm_write_guest(kvm: Kvm, gpa: int, data: bytes) -> None:
    src = np.frombuffer(data, dtype=np.uint8)
    done = 0
    for view in _pieces(kvm.memslots, gpa, len(data)):
        view[:] = src[done:done + len(view)]
        done += len(view)
    if data:
        for gfn in range(gpa >> PAGE_SHIFT, ((gpa + len(data) - 1) >> PAGE_SHIFT) + 1):
            kvm.mark_page_dirty(gfn)

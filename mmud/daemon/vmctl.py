"""The simulation's side of vm<N>/memslots and vm<N>/zap_all (parsed in mmud/fs/memslots.py).

A memslot line becomes one KVM_SET_USER_MEMORY_REGION call with the slot's other fields kept
as they are, so every check and errno is KVM's (mmud/kvm/kvm_main.py): EEXIST for an
overlap, EINVAL for a bad size, alignment or slot number, or a slot that does not exist.
"""

from __future__ import annotations

import errno

from mmud.kvm.memslot import KVM_MEM_LOG_DIRTY_PAGES, Memslots
from mmud.kvm.vm import Kvm
from mmud.x86.paging import PAGE_SHIFT


def render_memslots(memslots: Memslots) -> str:
    """The vm<N>/memslots table: hex gpa and size, flags by name, the memslot generation."""
    lines = [f"{'id':>3} {'gpa':>18} {'size':>18} {'flags':>9} generation"]
    for slot in memslots:
        flags = "log_dirty" if slot.flags & KVM_MEM_LOG_DIRTY_PAGES else "-"
        lines.append(f"{slot.id:>3} {slot.base_gfn << PAGE_SHIFT:#018x} "
                     f"{slot.npages << PAGE_SHIFT:#018x} {flags:>9} {memslots.generation}")
    return "".join(f"{line}\n" for line in lines)


def set_memslot(vm: Kvm, action: str, slot: int, gpa: int | None, size: int | None,
                log_dirty: bool | None) -> None:
    """Apply one parsed line; `add` of a slot that exists is EEXIST, the others need one.

    gpa and size are None where the action's grammar has no such field (mmud/fs/memslots.py
    lets `add` through only with both, `move` only with a gpa).
    """
    old = vm.memslots.slots.get(slot)
    if action == "add":
        if old is not None:
            raise OSError(errno.EEXIST, f"memslot {slot} exists")
        if gpa is None or size is None:
            raise OSError(errno.EINVAL, "add takes a gpa and a size")
        vm.set_memslot(slot, gpa, size, log_dirty=bool(log_dirty))
        return
    if old is None:
        raise OSError(errno.EINVAL, f"memslot {slot} does not exist")
    if action == "delete":
        vm.set_memslot(slot, 0, 0)
        return
    vm.set_memslot(slot, old.base_gfn << PAGE_SHIFT if gpa is None else gpa,
                   old.npages << PAGE_SHIFT, old.log_dirty if log_dirty is None else log_dirty)


def zap_all(vm: Kvm, kind: str, running: bool) -> None:
    """vm<N>/zap_all: `fast`, `slow` or `legacy` (Kvm.zap_all; any other word is EINVAL).

    In a running VM the zap is a task beside the vCPUs, which wait for its lock breaks; in a
    paused VM nothing would run beside it, so it is driven to its end now."""
    vm.zap_all(kind)
    if not running:
        vm.finish_zap()

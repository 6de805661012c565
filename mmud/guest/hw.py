"""The machine as the guest kernel sees it: the vCPU and VM calls it programs against.

The guest model is a client of the simulated KVM, not a part of it. It is handed a VM and
its vCPUs and uses them only through the calls described here: control registers, loads,
stores, string instructions and INVLPG on a vCPU; the RAM ranges and host writes to RAM (the
bootloader's page tables) on the VM. Describing them as Protocols keeps the rest of
mmud.guest free of imports from mmud.kvm, and lets mypy check at the VM's call sites that
the real vCPU still offers what the guest relies on.

This is the one module of mmud.guest that imports mmud.kvm, and only what a real guest
knows without asking the hypervisor: the #PF its accesses raise (the vCPU API's exception)
and where the platform puts the ioram device (its firmware-described address map).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from mmud.kvm.devices import IORAM_BASE, IORAM_SIZE
from mmud.kvm.vcpu import PageFault

__all__ = ["IORAM_BASE", "IORAM_SIZE", "AccessOutcome", "GuestVcpu", "GuestVm", "PageFault"]


class AccessOutcome(Protocol):
    """What a data-less access (an instruction fetch) reports: the #PF, if one was taken."""

    @property
    def fault(self) -> bool: ...

    @property
    def error_code(self) -> int: ...


class GuestVcpu(Protocol):
    """A vCPU from the inside: what guest instructions can do with it.

    Accesses raise PageFault for a #PF the hypervisor reflects into the guest; `access`
    reports it instead, for accesses whose data the guest does not use.
    """

    cr3: int
    cr4: int

    @property
    def index(self) -> int: ...

    def read_u64(self, gva: int, *, user: bool = False) -> int: ...

    def scan_u64(self, gva: int, n: int, mask: int) -> tuple[int, int]: ...

    def write_u64(self, gva: int, value: int, *, user: bool = False) -> None: ...

    def access(
        self, gva: int, *, write: bool = False, fetch: bool = False, user: bool = False
    ) -> AccessOutcome: ...

    def clear_page(self, gva: int) -> None: ...

    def copy_page(self, dst_gva: int, src_gva: int) -> None: ...

    def invlpg(self, gva: int) -> None: ...


class GuestVm(Protocol):
    """The VM as its guest's boot code and workloads see it: RAM ranges, vCPUs, host writes.

    `ram_ranges` are the RAM entries of the firmware's e820 map, [start, end) gpa in
    ascending order: what a kernel learns of its memory at boot. Between them lie holes
    (the PCI hole below 4 GiB) that are no RAM.
    """

    @property
    def ram_ranges(self) -> Sequence[tuple[int, int]]: ...

    @property
    def vcpus(self) -> Sequence[GuestVcpu]: ...

    def write_u64(self, gpa: int, value: int) -> None: ...

    def write_guest(self, gpa: int, data: bytes) -> None: ...

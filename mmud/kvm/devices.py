"""The VMM's emulated devices: what answers a guest access to a gpa without a memslot.

Every such access exits to userspace (KVM_EXIT_MMIO, `mmio_exits`); the VMM hands it to the
device claiming the address, or — nothing claims it — reads return all ones (an unclaimed
bus floats high) and writes are dropped.

`ioram` is a device that behaves like RAM: what the guest writes it reads back. Being a
device rather than a memslot, every access to it is emulated, which makes it the plainest
way to watch the MMIO path (MMIO sptes, the RSVD fault, the emulator) carry data.
Accesses are aligned 8-byte words, the width the vCPU model uses.

The devices sit in the PCI hole of the PC memory map that the VMM lays RAM around
(`pc_ram_ranges`, as QEMU's q35 machine does).
"""

from __future__ import annotations

import numpy as np

from mmud.x86.paging import PAGE_SIZE

IORAM_BASE = 0xFF000000
IORAM_SIZE = 1 << 20
MMIO_READ_VALUE = (1 << 64) - 1  # an unclaimed bus reads all ones

# hw/i386/pc_q35.c: RAM below 4 GiB ends at 0xb0000000 if all of it fits there, else at
# 2 GiB; the rest starts at 4 GiB. The PCI hole between holds the devices (ioram included).
Q35_LOWMEM = 0xB0000000
Q35_LOWMEM_SPLIT = 0x80000000
HIGHMEM_BASE = 1 << 32


def pc_ram_ranges(mem_bytes: int) -> list[tuple[int, int]]:
    """The RAM ranges ([start, end) gpa) of a q35 PC with mem_bytes of RAM: the e820 map's
    RAM entries, one memslot each."""
    if mem_bytes < Q35_LOWMEM:
        return [(0, mem_bytes)]
    return [(0, Q35_LOWMEM_SPLIT), (HIGHMEM_BASE, HIGHMEM_BASE + mem_bytes - Q35_LOWMEM_SPLIT)]


class IoRam:
    """A RAM-like device: reads return what was written (zeroes at first)."""

    def __init__(self, base: int, size: int) -> None:
        self.base = base
        self.size = size
        self.end = base + size
        self.words = np.zeros(size // 8, dtype=np.uint64)
        self._u64 = self.words.data  # a memoryview: Python ints, without numpy scalars

    def read(self, gpa: int) -> int:
        return self._u64[(gpa - self.base) >> 3]

    def write(self, gpa: int, value: int) -> None:
        self._u64[(gpa - self.base) >> 3] = value


class MmioBus:
    """The devices of the VMM, searched in order."""

    def __init__(self, devices: list[IoRam]) -> None:
        self.devices = devices

    def _device(self, gpa: int) -> IoRam | None:
        for device in self.devices:
            if device.base <= gpa < device.end:
                return device
        return None

    def read(self, gpa: int) -> int:
        device = self._device(gpa)
        return MMIO_READ_VALUE if device is None else device.read(gpa)

    def write(self, gpa: int, value: int) -> None:
        device = self._device(gpa)
        if device is not None:
            device.write(gpa, value)

    def read_page(self, gpa: int) -> np.ndarray:
        """The 512 words of the page at gpa, one device read each (a `rep movs` from MMIO)."""
        page = gpa & ~(PAGE_SIZE - 1)
        return np.array([self.read(page + 8 * k) for k in range(PAGE_SIZE // 8)], dtype=np.uint64)

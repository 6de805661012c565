"""The guest's driver for the platform's `ioram` device: an ioremap()ed window, used now and then.

At boot the kernel maps the device's guest-physical range into the vmalloc area with 4 KiB
uncached (PCD|PWT), non-executable supervisor PTEs, as ioremap() does; the pgd entry lives
in the kernel half, so every process's pgd shares it (pgd_ctor). The driver then writes a
word and reads one back from time to time. Every such access is an MMIO exit to the VMM;
the first one per page also leaves an MMIO spte behind. A read that does not return what
the driver wrote is a data error, like any other load of the guest.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from mmud.guest.hw import IORAM_BASE, IORAM_SIZE, GuestVcpu
from mmud.guest.pgtable import (
    _KERNPG_TABLE,
    _PAGE_NX,
    _PAGE_PRESENT,
    _PAGE_RW,
    PAGE_SHIFT,
    PAGE_SIZE,
    pgd_index,
    pmd_index,
    pte_index,
    pud_index,
)
from mmud.x86 import paging as pg

VMALLOC_START = 0xFFFFC90000000000
_PAGE_IOREMAP = _PAGE_PRESENT | _PAGE_RW | pg.PT_PCD_MASK | pg.PT_PWT_MASK | _PAGE_NX
# Words of the device the driver uses: a bounded set, so its record of them stays small.
IORAM_WORDS = 256


def ioremap_boot(write: Callable[[int, int], None], pgd: int, first_free: int) -> int:
    """Map the device at VMALLOC_START with host writes at boot; returns the next free frame.

    The device's range must fit one PTE table (it is 1 MiB).
    """
    pud, pmd, pte = first_free, first_free + 1, first_free + 2
    va = VMALLOC_START
    write(_entry(pgd, pgd_index(va)), (pud << PAGE_SHIFT) | _KERNPG_TABLE)
    write(_entry(pud, pud_index(va)), (pmd << PAGE_SHIFT) | _KERNPG_TABLE)
    write(_entry(pmd, pmd_index(va)), (pte << PAGE_SHIFT) | _KERNPG_TABLE)
    for offset in range(0, IORAM_SIZE, PAGE_SIZE):
        write(_entry(pte, pte_index(va + offset)), (IORAM_BASE + offset) | _PAGE_IOREMAP)
    return pte + 1


def _entry(table: int, index: int) -> int:
    return (table << PAGE_SHIFT) + 8 * index


class IoramDriver:
    """Writes and reads back words of the device through its ioremap() window."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.words: dict[int, int] = {}  # virtual address -> value last written

    def io(self, vcpu: GuestVcpu, error: Callable[[str], None]) -> None:
        """One write to a random word, then a read of a random word written before."""
        stride = IORAM_SIZE // IORAM_WORDS
        addr = VMALLOC_START + self.rng.randrange(IORAM_WORDS) * stride
        value = self.rng.getrandbits(64)
        vcpu.write_u64(addr, value)
        self.words[addr] = value
        addr = self.rng.choice(list(self.words))
        got = vcpu.read_u64(addr)
        if got != self.words[addr]:
            error(f"ioram: load {addr:#x} = {got:#x}, expected {self.words[addr]:#x}")


def ioram_mappable(ram_ranges: Sequence[tuple[int, int]]) -> bool:
    """The device is reachable only where no RAM range hides it."""
    return all(end <= IORAM_BASE or start >= IORAM_BASE + IORAM_SIZE for start, end in ram_ranges)

"""Where the simulated KVM's data sits in the host kernel's address space, with symbol names.

x86-64 with 4-level paging: the direct map at PAGE_OFFSET (0xffff888000000000), vmalloc
space at 0xffffc90000000000, the cpu_entry_area at 0xfffffe0000000000, the kernel image at
0xffffffff81000000 and modules at 0xffffffffc0000000.  Every object gets its own pages, so
mapping one object never maps a neighbour by accident.

One layout serves every VM: a VM's objects sit at the same addresses as those of any other
VM (the kernel reuses freed memory the same way), which keeps the log of a restarted VM
identical to the first one's.  The kmem_cache of `struct kvm_mmu_page` starts at
page.SP_ADDRESS_BASE, the address the audit prints for a shadow page.

Region names are mmud's own: what `kvm/isolation/map` takes, what `kvm/isolation/mappings`
and the object column of `kvm/isolation/faults` show.  Only a few of them are kernel
symbols, and only those are what `%pS` prints: a region says which kind it is.

- IMAGE: a symbol of the kernel image — text (`_stext`) and, with CONFIG_KALLSYMS_ALL,
  data and bss (`init_mm`).  `%pS` prints `name+0xoff/0xsize`.
- MODULE: the text of a loaded module (`kvm_text`), whose symbols are the functions of
  symbols.KernelText.  `%pS` prints `function+0xoff/0xsize [kvm]`.  No kvm data or bss
  symbol is modelled: no touch point reads the module's globals.
- ALLOC: everything allocated at run time — kmalloc/slab (`struct kvm`, which embeds
  `arch.mmu_page_hash`; `struct kvm_vcpu`; task_structs; the `kvm_mmu_page` headers),
  vmalloc (rmap and gfn_track arrays, vmapped stacks), per-CPU areas, the cpu_entry_area,
  the direct-map pages of the shadow page tables.  kallsyms knows none of it: `%pS`
  prints the bare address, `0x` and lower-case hex without leading zeros.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Literal

from mmud.kvm.isolation.symbols import KVM_TEXT_BASE
from mmud.kvm.mmu.page import SP_ADDRESS_BASE
from mmud.x86.paging import PAGE_SIZE

if TYPE_CHECKING:
    from mmud.kvm.isolation.symbols import KernelText
    from mmud.kvm.vm import Kvm

IMAGE: Final = "image"
MODULE: Final = "module"
ALLOC: Final = "alloc"
Kind = Literal["image", "module", "alloc"]

PAGE_OFFSET = 0xFFFF888000000000
VMALLOC_START = 0xFFFFC90000000000
CPU_ENTRY_AREA = 0xFFFFFE0000000000
KERNEL_TEXT = 0xFFFFFFFF81000000

# Sizes of the structures (x86-64, VMX, the kernel of the 2019 isolation RFC series with the
# usual config); page-rounded below.
SIZEOF_KVM_VMX = 0x9E00
SIZEOF_KVM_MEMSLOTS = 0x9F48  # 509 user slots + 3 private ones of `struct kvm_memory_slot`
SIZEOF_VCPU_VMX = 0x3200
SIZEOF_TASK_STRUCT = 0x2640
THREAD_SIZE = 0x4000
SIZEOF_PER_CPU = 0x2C000
SIZEOF_KVM_MMU_PAGE = 0x100  # the stride of page.sp_address()
CPU_ENTRY_AREA_SIZE = 1 << 39  # its own P4D entry
KERNEL_TEXT_SIZE = 0xE00000
KVM_NUM_MMU_PAGES = 1 << 12  # hash buckets (KVM_MMU_HASH_SHIFT)
SIZEOF_HLIST_HEAD = 8
SIZEOF_RMAP_HEAD = 8  # struct kvm_rmap_head
SIZEOF_GFN_TRACK = 2  # unsigned short per gfn

# Kernel data the switch path uses; not in the KVM address space.
INIT_MM = 0xFFFFFFFF82A5B8C0
SIZEOF_MM_STRUCT = 0x3C0
MM_PGD_OFFSET = 0x50

# Object bases.  Per-vCPU and per-slot objects are strided by index.
KVM_ADDR = PAGE_OFFSET + 0x103200000
KVM_MEMSLOTS_ADDR = PAGE_OFFSET + 0x103240000
MMU_PAGE_HASH_ADDR = PAGE_OFFSET + 0x103300000
VCPU_ADDR, VCPU_STRIDE = PAGE_OFFSET + 0x103400000, 0x10000
TASK_ADDR, TASK_STRIDE = PAGE_OFFSET + 0x103800000, 0x4000
STACK_ADDR, STACK_STRIDE = VMALLOC_START + 0xA00000, 0x8000  # vmapped stacks, guard pages between
PER_CPU_ADDR, PER_CPU_STRIDE = PAGE_OFFSET + 0x13BC00000, 0x40000
SPT_ADDR = PAGE_OFFSET + 0x200000000  # `sp->spt` pages, index-strided
RMAP_ADDR, RMAP_STRIDE = PAGE_OFFSET + 0x140000000, 0x1000000  # slot->arch.rmap[0]
GFN_TRACK_ADDR, GFN_TRACK_STRIDE = PAGE_OFFSET + 0x180000000, 0x400000


@dataclass(frozen=True)
class Region:
    """One object (or array of objects) under one name; `kind` says whether kallsyms knows it."""

    name: str
    start: int
    size: int
    kind: Kind = ALLOC

    @property
    def end(self) -> int:
        return self.start + self.size


def vm_regions(kvm: Kvm, text_end: int) -> list[Region]:
    """Every object of the VM and of the host it runs on, sorted by address."""
    pool = kvm.mmu.pool
    regions = [
        Region("kvm", KVM_ADDR, SIZEOF_KVM_VMX),
        Region("kvm_memslots", KVM_MEMSLOTS_ADDR, SIZEOF_KVM_MEMSLOTS),
        Region("mmu_page_hash", MMU_PAGE_HASH_ADDR, KVM_NUM_MMU_PAGES * SIZEOF_HLIST_HEAD),
        Region("mmu_page_header", SP_ADDRESS_BASE, len(pool.pages) * SIZEOF_KVM_MMU_PAGE),
        Region("mmu_shadow_page", SPT_ADDR, len(pool.pages) * PAGE_SIZE),
        Region("cpu_entry_area", CPU_ENTRY_AREA, CPU_ENTRY_AREA_SIZE),
        Region("_stext", KERNEL_TEXT, KERNEL_TEXT_SIZE, IMAGE),
        Region("init_mm", INIT_MM, SIZEOF_MM_STRUCT, IMAGE),
        Region("kvm_text", KVM_TEXT_BASE, text_end - KVM_TEXT_BASE, MODULE),
    ]
    for v in kvm.vcpus:
        i = v.index
        regions += [Region(f"vcpu{i}", VCPU_ADDR + i * VCPU_STRIDE, SIZEOF_VCPU_VMX),
                    Region(f"vcpu{i}_task", TASK_ADDR + i * TASK_STRIDE, SIZEOF_TASK_STRUCT),
                    Region(f"vcpu{i}_stack", STACK_ADDR + i * STACK_STRIDE, THREAD_SIZE),
                    Region(f"cpu{i}_per_cpu", PER_CPU_ADDR + i * PER_CPU_STRIDE, SIZEOF_PER_CPU)]
    for slot in kvm.memslots:
        s = slot.id
        regions += [
            Region(f"slot{s}_rmap", RMAP_ADDR + s * RMAP_STRIDE, slot.npages * SIZEOF_RMAP_HEAD),
            Region(f"slot{s}_gfn_track", GFN_TRACK_ADDR + s * GFN_TRACK_STRIDE,
                   slot.npages * SIZEOF_GFN_TRACK),
        ]
    return sorted(regions, key=lambda r: r.start)


class SymbolTable:
    """Address -> region, `%pS` and mmud's object name; name -> region."""

    def __init__(self, regions: list[Region], text: KernelText | None = None) -> None:
        self.regions = regions
        self.text = text  # the functions of MODULE regions
        self._starts = [r.start for r in regions]
        self._by_name = {r.name: r for r in regions}

    def find(self, address: int) -> Region | None:
        k = bisect.bisect_right(self._starts, address) - 1
        if k >= 0 and address < self.regions[k].end:
            return self.regions[k]
        return None

    def lookup(self, name: str) -> Region | None:
        return self._by_name.get(name)

    def sprint_symbol(self, address: int) -> str:
        """What `%pS` prints for an address (kernel/kallsyms.c __sprint_symbol).

        `name+%#lx/%#lx` (offset, size) for a kernel-image symbol, the same plus ` [kvm]`
        for a module's function, and `0x%lx` — the bare address — for anything kallsyms
        does not know.  kallsyms sizes a symbol up to the next one, so the offset it prints
        is always below the size; mmud knows only the symbols it models, and an address
        between them (nothing touches one) prints bare as well.
        """
        r = self.find(address)
        if r is not None and r.kind == IMAGE:
            return f"{r.name}+{address - r.start:#x}/{r.size:#x}"
        if r is not None and r.kind == MODULE and self.text is not None:
            if (found := self.text.find(address)) is not None:
                return found[0].format(found[1])
        return f"{address:#x}"

    def describe(self, address: int) -> str:
        """mmud's name of the object at an address: `name+0xoff` (`-` if none is known)."""
        r = self.find(address)
        return f"{r.name}+{address - r.start:#x}" if r is not None else "-"


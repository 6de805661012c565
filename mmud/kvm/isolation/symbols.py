"""kallsyms for the simulated KVM: Python frames of KVM code read as kernel `symbol+off/size`.

The fault log prints the instruction that faulted and the call trace above it, and both are
taken from the real call chain of the simulated KVM code at the faulting access: each Python
function of `mmud.kvm` is one kernel function of the `kvm` module, laid out in module text at
a fixed address.  A frame's offset is its bytecode offset (`f_lasti`) and a function's size
its bytecode length, so one call site is one IP, stable from run to run: same seed, same log.

Which frames are kernel code: functions of the `mmud.kvm` modules, minus the ones that model
the processor rather than KVM (a guest access, the hardware walk of the shadow tables).
The isolation code is kernel text too (its switch can fault), but a touch fault starts the
chain at the function that made the access, not in the handler.  The walk stops at the first
frame that is not kernel code: below it is the guest.
"""

from __future__ import annotations

import bisect
import importlib
import pkgutil
import types
from collections.abc import Iterator

KVM_TEXT_BASE = 0xFFFFFFFFC0600000  # where the kvm module's text is loaded
_ALIGN = 16  # functions start 16-byte aligned, as gcc lays them out

# Python function -> the kernel function it implements, where the names differ.
KERNEL_NAMES = {
    "mmud.kvm.vcpu:Vcpu._translate": "vcpu_run",
    "mmud.kvm.vcpu:Vcpu.enter_guest": "vcpu_enter_guest",
    "mmud.kvm.vcpu:Vcpu.cr0": "kvm_set_cr0",
    "mmud.kvm.vcpu:Vcpu.cr3": "kvm_set_cr3",
    "mmud.kvm.vcpu:Vcpu.cr4": "kvm_set_cr4",
    "mmud.kvm.vcpu:Vcpu.efer": "kvm_set_efer",
    "mmud.kvm.vcpu:Vcpu.invlpg": "handle_invlpg",
    "mmud.kvm.vcpu:Vcpu._emulated_gpa": "vcpu_mmio_gva_to_gpa",
    "mmud.kvm.vcpu:Vcpu._emulate_read": "emulator_read_emulated",
    "mmud.kvm.vcpu:Vcpu._emulate_write": "emulator_write_emulated",
    "mmud.kvm.vcpu:Vcpu._write_gpa": "emulator_write_phys",
    "mmud.kvm.vcpu:Vcpu.mark_page_dirty": "kvm_vcpu_mark_page_dirty",
    "mmud.kvm.memslot:Memslots.lookup": "__gfn_to_memslot",
    "mmud.kvm.memslot:Memslots.read_u64": "kvm_read_guest",
    "mmud.kvm.memslot:Memslots.write_u64": "kvm_write_guest",
    "mmud.kvm.mmu.mmu:KvmMmu.alloc_page": "kvm_mmu_alloc_page",
    "mmud.kvm.mmu.mmu:KvmMmu.page_track_is_active": "kvm_page_track_is_active",
    "mmud.kvm.mmu.mmu:KvmMmu.drop_spte": "drop_spte",
    "mmud.kvm.mmu.paging_tmpl:walk_addr": "paging64_walk_addr_generic",
    "mmud.kvm.mmu.paging_tmpl:page_fault": "paging64_page_fault",
    "mmud.kvm.mmu.paging_tmpl:fetch": "paging64_fetch",
    "mmud.kvm.mmu.paging_tmpl:gva_to_gpa": "paging64_gva_to_gpa",
    "mmud.kvm.mmu.sync:sync_page": "paging64_sync_page",
    "mmud.kvm.mmu.sync:invlpg_root": "paging64_invlpg",
    "mmud.kvm.mmu.sync:update_pte": "paging64_update_pte",
    "mmud.kvm.mmu.zap:prepare_zap_page": "__kvm_mmu_prepare_zap_page",
    "mmud.kvm.mmu.zap:commit_zap_page": "kvm_mmu_commit_zap_page",
    "mmud.kvm.vm:Kvm.set_memslot": "__kvm_set_memory_region",
    "mmud.kvm.isolation.context:VmIsolation.enter": "kvm_isolation_enter",
    "mmud.kvm.isolation.context:VmIsolation.exit": "kvm_isolation_exit",
}
# Functions that model the processor, not KVM: the call chain ends below them.
HARDWARE = frozenset({
    "mmud.kvm.vcpu:Vcpu.access", "mmud.kvm.vcpu:Vcpu.read_u64", "mmud.kvm.vcpu:Vcpu.write_u64",
    "mmud.kvm.vcpu:Vcpu.fetch", "mmud.kvm.vcpu:Vcpu.scan_u64", "mmud.kvm.vcpu:Vcpu._hw_walk",
    "mmud.kvm.vcpu:Vcpu.clear_page", "mmud.kvm.vcpu:Vcpu.copy_page",
    "mmud.kvm.vcpu:Vcpu._string_target",
})
_PACKAGE = "mmud.kvm"


class Symbol:
    """One function of module text: kernel name, address and size."""

    __slots__ = ("name", "address", "size", "module")

    def __init__(self, name: str, address: int, size: int, module: str) -> None:
        self.name, self.address, self.size, self.module = name, address, size, module

    def format(self, offset: int, with_module: bool = True) -> str:
        """%pS: `name+0xoff/0xsize [module]` (`with_module=False`: without ` [module]`)."""
        text = f"{self.name}+{offset:#x}/{self.size:#x}"
        return f"{text} [{self.module}]" if with_module else text


def _codes(obj: object, seen: set[int]) -> Iterator[types.CodeType]:
    """The code objects a module-level object holds: functions, methods, properties."""
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, types.FunctionType):
        yield obj.__code__
    elif isinstance(obj, property):
        for fn in (obj.fget, obj.fset):
            if fn is not None:
                yield from _codes(fn, seen)
    elif isinstance(obj, (staticmethod, classmethod)):
        yield from _codes(obj.__func__, seen)
    elif isinstance(obj, type):
        for member in vars(obj).values():
            yield from _codes(member, seen)


class KernelText:
    """The text of the kvm module (and any other loaded module) with its symbol table.

    The layout is computed once from the source, in module and definition order, so a
    function has the same address in every run whatever ran first.
    """

    def __init__(self) -> None:
        self._by_code: dict[types.CodeType, Symbol | None] = {}
        self._placed: list[Symbol] = []  # in address order (each is placed after the last)
        self._addresses: list[int] = []
        self._next = KVM_TEXT_BASE
        self.insmod(_PACKAGE, "kvm")

    @property
    def end(self) -> int:
        return self._next

    def insmod(self, package: str, module_name: str) -> None:
        """Load every function of `package` (a module or package) as text of `module_name`."""
        root = importlib.import_module(package)
        names = [package]
        if hasattr(root, "__path__"):
            names += sorted(m.name for m in pkgutil.walk_packages(root.__path__, package + "."))
        seen: set[int] = set()
        for name in names:
            mod = importlib.import_module(name)
            for obj in list(vars(mod).values()):
                if getattr(obj, "__module__", name) != name:
                    continue  # imported from elsewhere: laid out with its own module
                for code in _codes(obj, seen):
                    self._place(name, code, module_name)

    def _place(self, module: str, code: types.CodeType, module_name: str) -> None:
        key = f"{module}:{code.co_qualname}"
        if key in HARDWARE or code in self._by_code:
            self._by_code.setdefault(code, None)
            return
        size = len(code.co_code)
        name = KERNEL_NAMES.get(key, code.co_name)
        sym = self._by_code[code] = Symbol(name, self._next, size, module_name)
        self._placed.append(sym)
        self._addresses.append(sym.address)
        self._next += -(-size // _ALIGN) * _ALIGN

    def symbol(self, code: types.CodeType) -> Symbol | None:
        """The kernel function of a code object; None if it is not kernel code."""
        return self._by_code.get(code)

    def find(self, address: int) -> tuple[Symbol, int] | None:
        """(function, offset) of a text address; None outside every function.

        kallsyms would give the alignment padding after a function to that function (its
        size runs to the next symbol); here a function's size is its bytecode length and
        the padding is no function's — nothing executes or reads it.
        """
        k = bisect.bisect_right(self._addresses, address) - 1
        if k >= 0 and address < (sym := self._placed[k]).address + sym.size:
            return sym, address - sym.address
        return None

    def call_chain(self, frame: types.FrameType | None) -> list[tuple[Symbol, int]]:
        """(function, offset) of each kernel frame from `frame` outward: [0] is the IP."""
        chain = []
        by_code = self._by_code
        while frame is not None:
            sym = by_code.get(frame.f_code)
            if sym is None:
                break
            chain.append((sym, frame.f_lasti))
            frame = frame.f_back
        return chain

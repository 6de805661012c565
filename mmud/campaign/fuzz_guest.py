"""The fuzzer's guest kernel: its memory layout, its page tables and the operations it runs.

The guest behaves as a correct kernel does, so that whatever goes wrong is the MMU's fault:
it edits its page tables with stores through its direct map (host writes only before any
vCPU ran), follows every change of a present entry with the TLB maintenance x86 asks for —
INVLPG of the address for a leaf (4 KiB or 2 MiB), a CR3 reload for an upper-level entry —
on every vCPU that may hold the old translation, zeroes a page-table frame before it reuses
it, and frees the tables below an entry it clears. Every access is compared with the SDM
reference walk (mmud/campaign/reference.py): fault or not, error code, gpa and the
accessed/dirty bits it leaves in the guest's entries.

An operation is a short JSON list (`["map", cpu, space, va, level, frame, flags]`, …) whose
every field is an index into the fixed layout below, so that any subsequence of a run is
again a valid run: an operation whose premise is gone (the entry is not present, the slot is
not there) does nothing. That is what lets the shrinker drop operations freely.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Generator, Iterator, Sequence

from mmud.campaign.reference import ADDR, PS, Expect, P, Regs, U, W, idx, outcome, reference_walk
from mmud.kvm import dirty_log
from mmud.kvm.devices import IORAM_BASE
from mmud.kvm.vcpu import Vcpu
from mmud.machine import VM
from mmud.x86.paging import CR0_WP, CR4_SMAP, CR4_SMEP, EFER_NXE, X86_EFLAGS_AC

Op = list  # ["name", field, ...]: JSON-able; the operations are the op_* methods of Guest

PAGE = 0x1000
LARGE = 0x20_0000
MEM_MB = 8

# Fixed frames: the direct map's tables, the PDPT every address space shares at PML4 slot
# SHARED_SLOT, and one PML4 per address space. Page tables come from [TABLES, TABLES_END),
# all inside the direct map (the first 2 MiB).
DIRECT_VA = 0xFFFF_8880_0000_0000
DIRECT_PDPT, DIRECT_PD, SHARED_PDPT = 0x1000, 0x2000, 0x3000
SPACES = 2
PML4S = tuple(0x4000 + k * PAGE for k in range(SPACES))
PINNED = frozenset((DIRECT_PDPT, DIRECT_PD, SHARED_PDPT, *PML4S))
TABLES, TABLES_END = 0x10000, LARGE
UPPER = P | W | U  # the flags of a new upper-level entry
SHARED_SLOT = 256

# The addresses the guest uses: a few indices at every level, so that tables are shared by
# several addresses and the shadow MMU stays small (its audit runs at every point).
PML4_IDX, PDPT_IDX, PD_IDX, PT_IDX = (0, SHARED_SLOT), (0, 3), (0, 5), (0, 1, 511)
VAS = tuple(
    (0xFFFF << 48 if a >= 256 else 0) | a << 39 | b << 30 | c << 21 | d << 12
    for a in PML4_IDX for b in PDPT_IDX for c in PD_IDX for d in PT_IDX
)

# Extra memslots (ids 1 and 2) of 2 MiB at one of these positions; MMIO: a hole and a device.
SLOT_IDS = (1, 2)
SLOT_SIZE = LARGE
SLOT_GPAS = tuple(0x4000_0000 + k * LARGE for k in range(3))
HOLE = 0x6000_0000
# Frames a leaf may map: RAM of slot 0 (below the tables, so that their dirty bits share the
# first bitmap word with those of the extra slots' frames), of the extra slots, and MMIO.
SLOT0_FRAMES = tuple(0x8000 + k * PAGE for k in range(8))
FRAMES_4K = (
    *SLOT0_FRAMES,
    *(gpa + k * PAGE for gpa in SLOT_GPAS for k in range(4)),
    HOLE, IORAM_BASE,
)
FRAMES_2M = (0, LARGE, 2 * LARGE, 3 * LARGE, *SLOT_GPAS, HOLE)

# Access kinds: (write, fetch, user).
KINDS = tuple((w, f, u) for u in (False, True) for w, f in ((False, False), (True, False), (False, True)))
# Control-register bits a guest flips: (register, bit).
FLIPS = {
    "wp": ("cr0", CR0_WP),
    "smep": ("cr4", CR4_SMEP),
    "smap": ("cr4", CR4_SMAP),
    "nxe": ("efer", EFER_NXE),
    "ac": ("rflags", X86_EFLAGS_AC),
}
SLOT_ACTIONS = ("add", "move", "delete", "log", "unlog")
DIRTY_MODES = (0, dirty_log.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, dirty_log.KVM_DIRTY_LOG_MANUAL_CAPS)


class Mismatch(AssertionError):
    """An access did not do what the reference walk says."""


def is_shared(va: int) -> bool:
    return idx(va, 4) == SHARED_SLOT


class Guest:
    """The guest kernel of one VM: owns its page tables and runs operations on its vCPUs."""

    def __init__(self, vm: VM) -> None:
        self.vm = vm
        self.read = vm.read_u64
        self.running = False  # a vCPU has run: from now on, tables change by guest stores
        self.next_table = TABLES
        self.free: list[int] = []  # freed table frames, lowest first
        self.accesses = 0
        self._build()

    def _build(self) -> None:
        """The direct map (2 MiB, supervisor, writable, executable: EFER.NXE flips must not
        make it reserved) and the address spaces, with host writes; every vCPU on one."""
        write = self.vm.write_u64
        write(DIRECT_PDPT + 8 * idx(DIRECT_VA, 3), DIRECT_PD | P | W)
        write(DIRECT_PD + 8 * idx(DIRECT_VA, 2), 0 | P | W | PS)
        for pml4 in PML4S:
            write(pml4 + 8 * idx(DIRECT_VA, 4), DIRECT_PDPT | P | W)
            write(pml4 + 8 * SHARED_SLOT, SHARED_PDPT | UPPER)
        for vcpu in self.vm.vcpus:
            vcpu.cr3 = PML4S[vcpu.index % SPACES]

    # --- stores and TLB maintenance ---------------------------------------------------------

    def _store(self, cpu: int, gpa: int, value: int) -> None:
        """The kernel writes a paging entry: through its direct map once vCPUs run."""
        if self.running:
            self.vm.vcpus[cpu].write_u64(DIRECT_VA + gpa, value)
        else:
            self.vm.write_u64(gpa, value)

    def _holders(self, space: int, va: int, level: int) -> list[Vcpu]:
        """The vCPUs that may cache translations through this entry: those on the address
        space, or all of them for the shared tables below SHARED_SLOT."""
        if level < 4 and is_shared(va):
            return list(self.vm.vcpus)
        return [v for v in self.vm.vcpus if v.cr3 == PML4S[space]]

    def _flush(self, space: int, va: int, level: int, old: int, new: int) -> None:
        """What x86 asks after changing a present entry: INVLPG for a leaf that stays a leaf
        or goes, a CR3 reload for anything that links tables."""
        if not self.running or not old & P:
            return
        leaf = level == 1 or (level == 2 and bool(old & PS) and (not new & P or bool(new & PS)))
        for vcpu in self._holders(space, va, level):
            if leaf:
                vcpu.invlpg(va)
            else:
                vcpu.cr3 = vcpu.cr3

    def _set_entry(self, cpu: int, space: int, va: int, level: int, gpa: int, new: int) -> None:
        """Write one entry, flush, and free the tables the old entry linked (if it did)."""
        old = self.read(gpa)
        self._store(cpu, gpa, new)
        self._flush(space, va, level, old, new)
        if old & P and level > 1 and not (level == 2 and old & PS) and (old ^ new) & (P | ADDR):
            self._free_tree(old & ADDR, level - 1)

    # --- page-table frames -------------------------------------------------------------------

    def _alloc_table(self, cpu: int) -> int | None:
        """A zeroed frame for a new table (a reused one is cleared with `rep stosq`)."""
        if self.free:
            frame = heapq.heappop(self.free)
            if self.running:
                self.vm.vcpus[cpu].clear_page(DIRECT_VA + frame)
            else:
                self.vm.write_guest(frame, bytes(PAGE))
            return frame
        if self.next_table >= TABLES_END:
            return None
        frame, self.next_table = self.next_table, self.next_table + PAGE
        return frame

    def _free_tree(self, table: int, level: int) -> None:
        """Free a table and the tables below it (the kernel's free_pgd_range)."""
        if table in PINNED or not TABLES <= table < TABLES_END:
            return
        if level > 1:
            for i in range(512):
                entry = self.read(table + 8 * i)
                if entry & P and not (level == 2 and entry & PS):
                    self._free_tree(entry & ADDR, level - 1)
        heapq.heappush(self.free, table)

    def _entry(self, space: int, va: int, level: int) -> int | None:
        """The gpa of va's entry at `level`, None if the path above it is not all tables."""
        table = PML4S[space]
        for lvl in range(4, level, -1):
            entry = self.read(table + 8 * idx(va, lvl))
            if not entry & P or (lvl == 2 and entry & PS):
                return None
            table = entry & ADDR
        return table + 8 * idx(va, level)

    # --- the operations -----------------------------------------------------------------------

    def apply(self, op: Sequence) -> None:
        name, *args = op
        if name != "map":
            self.running = True
        getattr(self, "op_" + name)(*args)

    def op_map(self, cpu: int, space: int, v: int, level: int, frame: int, flags: int) -> None:
        """Map VAS[v] with a 4 KiB (level 1) or 2 MiB (level 2) page, making missing tables."""
        va = VAS[v]
        table = PML4S[space]
        for lvl in range(4, level, -1):
            gpa = table + 8 * idx(va, lvl)
            entry = self.read(gpa)
            if entry & P and not (lvl == 2 and entry & PS):
                table = entry & ADDR
                continue
            new = self._alloc_table(cpu)
            if new is None:
                return
            self._set_entry(cpu, space, va, lvl, gpa, new | UPPER)
            table = new
        if level == 1:
            pa = FRAMES_4K[frame % len(FRAMES_4K)]
        else:
            pa = FRAMES_2M[frame % len(FRAMES_2M)] | PS
        self._set_entry(cpu, space, va, level, table + 8 * idx(va, level), pa | flags)

    def op_perm(self, cpu: int, space: int, v: int, level: int, flip: int) -> None:
        """Flip bits of a present entry on VAS[v]'s path (W, U, NX, A, D, a reserved bit,
        P of a leaf). An entry that links a table keeps P and never gains or loses PS at
        level 2 (those are unmap and map); PS at levels 3 and 4 is a reserved bit."""
        va = VAS[v]
        gpa = self._entry(space, va, level)
        if gpa is None:
            return
        old = self.read(gpa)
        if not old & P:
            return
        if level == 2:
            flip &= ~PS
        if level > 1 and not (level == 2 and old & PS):
            flip &= ~P
        self._set_entry(cpu, space, va, level, gpa, old ^ flip)

    def op_unmap(self, cpu: int, space: int, v: int, level: int) -> None:
        va = VAS[v]
        gpa = self._entry(space, va, level)
        if gpa is not None and self.read(gpa) & P:
            self._set_entry(cpu, space, va, level, gpa, 0)

    def op_access(self, cpu: int, v: int, kind: int) -> None:
        self.check_access(self.vm.vcpus[cpu], VAS[v], kind)

    def op_invlpg(self, cpu: int, v: int) -> None:
        self.vm.vcpus[cpu].invlpg(VAS[v])

    def op_cr3(self, cpu: int, space: int) -> None:
        """Switch address space, or (the same one) reload CR3."""
        self.vm.vcpus[cpu].cr3 = PML4S[space]

    def op_flip(self, cpu: int, name: str) -> None:
        """Toggle one paging-mode bit — but never into CR0.WP=0 with CR4.SMAP=1, which no
        kernel runs with: there KVM's supervisor-write shape for a read-only user page
        (U=0, W=1, built while RFLAGS.AC=1) keeps serving supervisor accesses after AC is
        cleared, where SMAP would fault them (docs/fuzzing.md)."""
        register, bit = FLIPS[name]
        vcpu = self.vm.vcpus[cpu]
        value = getattr(vcpu, register) ^ bit
        cr0 = value if register == "cr0" else vcpu.cr0
        cr4 = value if register == "cr4" else vcpu.cr4
        if not cr0 & FLIPS["wp"][1] and cr4 & FLIPS["smap"][1]:
            return
        setattr(vcpu, register, value)

    def op_zap(self, kind: str) -> None:
        self.vm.zap_all(kind)

    def op_slot(self, sid: int, action: str, pos: int) -> None:
        """Memslot add / move / delete, or dirty logging on or off (slot 0 too)."""
        vm = self.vm
        slot = vm.memslots.slots.get(sid)
        gpa = SLOT_GPAS[pos]
        taken = {s.base_gfn * PAGE for s in vm.memslots if s.id != sid}
        if action in ("log", "unlog"):
            if slot is not None:
                vm.set_memslot(sid, slot.base_gfn * PAGE, slot.npages * PAGE, log_dirty=action == "log")
        elif sid == 0:
            return
        elif action == "add" and slot is None and gpa not in taken:
            vm.set_memslot(sid, gpa, SLOT_SIZE)
        elif action == "move" and slot is not None and gpa not in taken:
            vm.set_memslot(sid, gpa, SLOT_SIZE, log_dirty=slot.log_dirty)
        elif action == "delete" and slot is not None:
            vm.set_memslot(sid, slot.base_gfn * PAGE, 0)

    def op_dirty_mode(self, mode: int) -> None:
        """KVM_ENABLE_CAP(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2): off, on, on + initially set."""
        dirty_log.enable_manual_protect(self.vm, DIRTY_MODES[mode])

    def op_harvest(self, which: int, accesses: Sequence[Sequence[int]]) -> None:
        """Collect the dirty log of the `which`-th slot that logs (GET, and CLEAR of what it
        reported in manual mode); with accesses, the collection runs as a task beside the
        vCPUs, which make them at its preemption points (each word's steps), as on a host
        with more CPUs."""
        vm = self.vm
        logged = [s.id for s in vm.memslots if s.log_dirty]
        if not logged:
            return
        sid = logged[which % len(logged)]
        slot = vm.memslots.slots[sid]
        step = 1 if accesses else 0
        npages = slot.npages

        def collect() -> Generator[None, None, None]:
            bitmap = yield from dirty_log.kvm_get_dirty_log_protect(vm, sid, step)
            if vm.manual_dirty_log_protect:
                yield from dirty_log.kvm_clear_dirty_log_protect(vm, sid, 0, npages, bitmap, step)

        if not accesses:
            dirty_log.run_ioctl(collect())
            return
        mismatches: list[Mismatch] = []

        def accessor(cpu: int) -> Iterator[None]:
            for c, v, kind in accesses:
                if c == cpu:
                    try:
                        self.check_access(vm.vcpus[cpu], VAS[v], kind)
                    except Mismatch as m:
                        mismatches.append(m)
                    yield

        vm.scheduler.add("collector", collect())
        for cpu in sorted({c for c, _, _ in accesses}):
            vm.scheduler.add(f"vcpu{cpu}", accessor(cpu))
        while vm.step(1000):
            pass
        if mismatches:
            raise mismatches[0]

    # --- the check ---------------------------------------------------------------------------

    def check_access(self, vcpu: Vcpu, va: int, kind: int) -> None:
        """One access through the vCPU, judged by the reference walk of the tables now."""
        write, fetch, user = KINDS[kind]
        regs = Regs(cr0=vcpu.cr0, cr3=vcpu.cr3, cr4=vcpu.cr4, efer=vcpu.efer, rflags=vcpu.rflags)
        want = reference_walk(self.read, regs, va, write=write, fetch=fetch, user=user)
        got = vcpu.access(va, write=write, fetch=fetch, user=user)
        self.accesses += 1
        what = f"vcpu{vcpu.index} {describe_kind(kind)} {va:#x}"
        if got.fault != want.fault or got.error_code != want.error_code or (
            not want.fault and got.gpa != want.gpa
        ):
            raise Mismatch(f"{what}: mmud {outcome(got.fault, got.error_code, got.gpa)}, "
                           f"reference {outcome(want.fault, want.error_code, want.gpa)}")
        if want.gpa is not None and self._is_ram(want.gpa):
            _check_ad(self.read, want, what)

    def _is_ram(self, gpa: int | None) -> bool:
        return gpa is not None and self.vm.memslots.lookup(gpa >> 12) is not None


def _check_ad(read: Callable[[int], int], want: Expect, what: str) -> None:
    for gpa, bits in want.ad:
        if read(gpa) & bits != bits:
            raise Mismatch(f"{what}: entry at gpa {gpa:#x} is {read(gpa):#x}, lacks A/D bits {bits:#x}")


def describe_kind(kind: int) -> str:
    write, fetch, user = KINDS[kind]
    return ("user " if user else "supervisor ") + ("write" if write else "fetch" if fetch else "read")

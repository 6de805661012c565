"""The trace events: kvmmmu (arch/x86/kvm/mmu/mmutrace.h) and the kvm events the simulation
has (arch/x86/kvm/trace.h, include/trace/events/kvm.h), their fields and TP_printk text, v5.16.

Each `Event` lists its fields as the tracefs `format` file does — the four common fields of
`struct trace_entry` first, then the event's own at the offsets the C compiler gives them —
and renders its line from the field values exactly as the kernel's TP_printk does
(`KVM_MMU_PAGE_PRINTK`'s role decoding, `__print_flags` of the #PF error code, C's `%llx`,
`%#llx` and `%p`).

Values are Python ints (bools as 0/1, signed fields with their sign). `%p` prints mmud's
stand-in address of the object (the kernel prints a per-boot hash of it): 16 hex digits,
zeros for NULL. A `u64 *sptep` stands at the direct-map address of its shadow page's frame,
`PAGE_OFFSET + (SPT_PFN_BASE + pool index) * 4096 + 8 * entry`, so that `virt_to_phys()`
of it (kvm_mmu_set_spte's `at %llx`) is the frame address a non-leaf spte holds.

Not traced: kvm_tdp_mmu_spte_changed (mmud has no TDP MMU), and the TRACE_DEFINE_ENUMs
need no event. The events below are the v5.16 ones; the stored upstream copy read while
writing this (newer) spells `role.gpte_is_8_bytes ? 8 : 4` as `role.has_4_byte_gpte ? 4 : 8`
(same text) and adds kvm_mmu_split_huge_page (v5.18, eager page splitting: not in v5.16).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from mmud.kvm.mmu.page import kvm_mmu_page_printk as page_printk
from mmud.kvm.mmu.spte import SPT_PFN_BASE
from mmud.x86.paging import (
    PAGE_SHIFT,
    PFERR_FETCH_MASK,
    PFERR_PRESENT_MASK,
    PFERR_RSVD_MASK,
    PFERR_USER_MASK,
    PFERR_WRITE_MASK,
)

SYSTEM = "kvmmmu"

# arch/x86/include/asm/page_64_types.h (4-level paging, no KASLR): the direct map.
PAGE_OFFSET = 0xFFFF888000000000


def sptep_address(index: int, i: int) -> int:
    """The kernel virtual address of entry i of the shadow page at pool index `index`."""
    return PAGE_OFFSET + ((SPT_PFN_BASE + index) << PAGE_SHIFT) + 8 * i


def virt_to_phys(address: int) -> int:
    return address - PAGE_OFFSET


# --- fields ---------------------------------------------------------------------------------

# C type → (size, signed). Alignment is the size (x86-64).
_CTYPES: dict[str, tuple[int, bool]] = {
    "unsigned short": (2, False), "unsigned char": (1, False), "int": (4, True),
    "__u8": (1, False), "u8": (1, False), "bool": (1, False), "signed char": (1, True),
    "__u32": (4, False), "u32": (4, False), "unsigned": (4, False), "unsigned int": (4, False),
    "__u64": (8, False), "u64": (8, False), "gfn_t": (8, False), "gpa_t": (8, False),
    "void *": (8, False), "u64 *": (8, False), "unsigned long": (8, False),
}


@dataclass(frozen=True)
class Field:
    name: str
    ctype: str
    offset: int
    size: int
    signed: bool
    count: int = 0  # an array's length (`__u8 insn[15]`); 0 for a scalar

    def format_line(self) -> str:
        """The line of the tracefs `format` file."""
        name = f"{self.name}[{self.count}]" if self.count else self.name
        return (f"\tfield:{self.ctype} {name};\toffset:{self.offset};\tsize:{self.size};"
                f"\tsigned:{int(self.signed)};")


# struct trace_entry.
COMMON_FIELDS = (
    Field("common_type", "unsigned short", 0, 2, False),
    Field("common_flags", "unsigned char", 2, 1, False),
    Field("common_preempt_count", "unsigned char", 3, 1, False),
    Field("common_pid", "int", 4, 4, True),
)
_COMMON_SIZE = 8


def _layout(decls: tuple[tuple[str, str], ...]) -> tuple[tuple[Field, ...], int]:
    """The event's fields at their C offsets after the common ones, and the struct size."""
    fields = []
    offset = _COMMON_SIZE
    align = 4
    for ctype, decl in decls:
        size, signed = _CTYPES[ctype]
        name, _, count = decl.rstrip("]").partition("[")
        offset = (offset + size - 1) // size * size
        n = int(count) if count else 0
        fields.append(Field(name, ctype, offset, size * max(n, 1), signed, n))
        offset += size * max(n, 1)
        align = max(align, size)
    return tuple(fields), (offset + align - 1) // align * align


# Where the kernel emits an event: under kvm->mmu_lock (write_lock: preempt count 1), with
# interrupts off (the shadow MMU's lockless walk: local_irq_disable), or neither.
TRACE_FLAG_IRQS_OFF = 0x01
CTX_NONE = (0, 0)
CTX_MMU_LOCK = (0, 1)
CTX_IRQS_OFF = (TRACE_FLAG_IRQS_OFF, 0)
# kvm_entry and kvm_exit: vmx_vcpu_run(), inside vcpu_enter_guest's preempt_disable() and
# local_irq_disable().
CTX_GUEST_SWITCH = (TRACE_FLAG_IRQS_OFF, 1)


@dataclass(frozen=True)
class Event:
    name: str
    id: int
    fields: tuple[Field, ...]
    size: int  # sizeof(struct trace_event_raw_<name>): the ring buffer's payload
    render: Callable[[Mapping[str, int]], str]  # the TP_printk text
    context: tuple[int, int]  # (common_flags, common_preempt_count)
    system: str = SYSTEM

    @property
    def field_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields)

    def text(self, values: tuple[int, ...]) -> str:
        return self.render(dict(zip(self.field_names, values, strict=True)))

    def format_file(self) -> str:
        """The tracefs `events/kvmmmu/<name>/format` file, its `print fmt` line last."""
        lines = [f"name: {self.name}", f"ID: {self.id}", "format:"]
        lines += [f.format_line() for f in COMMON_FIELDS]
        lines.append("")
        lines += [f.format_line() for f in self.fields]
        lines += ["", f"print fmt: {PRINT_FMT[self.name]}"]
        return "\n".join(lines) + "\n"


# --- C formatting -----------------------------------------------------------------------------

def _hash_x(value: int) -> str:
    """C's `%#llx`: 0x-prefixed, except for zero."""
    return f"{value:#x}" if value else "0"


def _p(value: int) -> str:
    """`%p`: mmud's stand-in address, 16 hex digits (NULL prints as zeros, as vsprintf does)."""
    return f"{value:016x}"


PFERR_FLAGS = (
    (PFERR_PRESENT_MASK, "P"), (PFERR_WRITE_MASK, "W"), (PFERR_USER_MASK, "U"),
    (PFERR_RSVD_MASK, "RSVD"), (PFERR_FETCH_MASK, "F"),
)


def print_flags(value: int, delim: str, flags: tuple[tuple[int, str], ...]) -> str:
    """__print_flags() (trace_print_flags_seq): the names of the set flags in table order,
    then any bits left over as 0x%lx."""
    out = []
    for mask, name in flags:
        if not value:
            break
        if value & mask == mask:
            out.append(name)
            value &= ~mask
    if value:
        out.append(f"0x{value:x}")
    return delim.join(out)


def kvm_mmu_page_printk(f: Mapping[str, int]) -> str:
    """KVM_MMU_PAGE_PRINTK() of the page fields of an event."""
    return page_printk(f["mmu_valid_gen"], f["gfn"], f["role"], f["root_count"], bool(f["unsync"]))


# --- the events -----------------------------------------------------------------------------

_PAGE_FIELDS = (("__u8", "mmu_valid_gen"), ("__u64", "gfn"), ("__u32", "role"),
                ("__u32", "root_count"), ("bool", "unsync"))

# RET_PF_* of v5.16 (mmu_internal.h), for fast_page_fault's text.
_RET_PF_FIXED = 3
_RET_PF_SPURIOUS = 4

# (name, fields, TP_printk, context), in the order of mmutrace.h.
_Render = Callable[[Mapping[str, int]], str]
_DEFS: tuple[tuple[str, tuple[tuple[str, str], ...], _Render, tuple[int, int]], ...] = (
    ("kvm_mmu_pagetable_walk", (("__u64", "addr"), ("__u32", "pferr")),
     lambda f: f"addr {f['addr']:x} pferr {f['pferr']:x} {print_flags(f['pferr'], '|', PFERR_FLAGS)}",
     CTX_NONE),
    ("kvm_mmu_paging_element", (("__u64", "pte"), ("__u32", "level")),
     lambda f: f"pte {f['pte']:x} level {f['level']}", CTX_NONE),
    ("kvm_mmu_set_accessed_bit", (("__u64", "gpa"),), lambda f: f"gpa {f['gpa']:x}", CTX_NONE),
    ("kvm_mmu_set_dirty_bit", (("__u64", "gpa"),), lambda f: f"gpa {f['gpa']:x}", CTX_NONE),
    ("kvm_mmu_walker_error", (("__u32", "pferr"),),
     lambda f: f"pferr {f['pferr']:x} {print_flags(f['pferr'], '|', PFERR_FLAGS)}", CTX_NONE),
    ("kvm_mmu_get_page", (*_PAGE_FIELDS, ("bool", "created")),
     lambda f: f"{kvm_mmu_page_printk(f)} {'new' if f['created'] else 'existing'}", CTX_MMU_LOCK),
    ("kvm_mmu_sync_page", _PAGE_FIELDS, kvm_mmu_page_printk, CTX_MMU_LOCK),
    ("kvm_mmu_unsync_page", _PAGE_FIELDS, kvm_mmu_page_printk, CTX_MMU_LOCK),
    ("kvm_mmu_prepare_zap_page", _PAGE_FIELDS, kvm_mmu_page_printk, CTX_MMU_LOCK),
    ("mark_mmio_spte", (("void *", "sptep"), ("gfn_t", "gfn"), ("unsigned", "access"),
                        ("unsigned int", "gen")),
     lambda f: f"sptep:{_p(f['sptep'])} gfn {f['gfn']:x} access {f['access']:x} gen {f['gen']:x}",
     CTX_MMU_LOCK),
    ("handle_mmio_page_fault", (("u64", "addr"), ("gfn_t", "gfn"), ("unsigned", "access")),
     lambda f: f"addr:{f['addr']:x} gfn {f['gfn']:x} access {f['access']:x}", CTX_NONE),
    ("fast_page_fault", (("int", "vcpu_id"), ("gpa_t", "cr2_or_gpa"), ("u32", "error_code"),
                         ("u64 *", "sptep"), ("u64", "old_spte"), ("u64", "new_spte"), ("int", "ret")),
     lambda f: (f"vcpu {f['vcpu_id']} gva {f['cr2_or_gpa']:x} error_code "
                f"{print_flags(f['error_code'], '|', PFERR_FLAGS)} sptep {_p(f['sptep'])} "
                f"old {_hash_x(f['old_spte'])} new {f['new_spte']:x} "
                f"spurious {int(f['ret'] == _RET_PF_SPURIOUS)} fixed {int(f['ret'] == _RET_PF_FIXED)}"),
     CTX_IRQS_OFF),
    ("kvm_mmu_zap_all_fast", (("__u8", "mmu_valid_gen"), ("unsigned int", "mmu_used_pages")),
     lambda f: f"kvm-mmu-valid-gen {f['mmu_valid_gen']} used_pages {f['mmu_used_pages']:x}",
     CTX_MMU_LOCK),
    ("check_mmio_spte", (("unsigned int", "kvm_gen"), ("unsigned int", "spte_gen"), ("u64", "spte")),
     lambda f: (f"spte {f['spte']:x} kvm_gen {f['kvm_gen']:x} spte-gen {f['spte_gen']:x} "
                f"valid {int(f['kvm_gen'] == f['spte_gen'])}"),
     CTX_NONE),
    ("kvm_mmu_set_spte", (("u64", "gfn"), ("u64", "spte"), ("u64", "sptep"), ("u8", "level"),
                          ("bool", "r"), ("bool", "x"), ("signed char", "u")),
     lambda f: (f"gfn {f['gfn']:x} spte {f['spte']:x} ({'r' if f['r'] else '-'}"
                f"{'w' if f['spte'] & 2 else '-'}{'x' if f['x'] else '-'}"
                f"{'' if f['u'] == -1 else ('u' if f['u'] else '-')}) level {f['level']} at {f['sptep']:x}"),
     CTX_MMU_LOCK),
    ("kvm_mmu_spte_requested", (("u64", "gfn"), ("u64", "pfn"), ("u8", "level")),
     lambda f: f"gfn {f['gfn']:x} pfn {f['pfn']:x} level {f['level']}", CTX_MMU_LOCK),
)

# --- the kvm system's events that the simulation has (arch/x86/kvm/trace.h and
# include/trace/events/kvm.h, v5.16) --------------------------------------------------------------

KVM_SYSTEM = "kvm"

# The ISA of kvm_exit: mmud's exits are those of Intel VMX with shadow paging (enable_ept=0).
KVM_ISA_VMX = 1
# The VMX basic exit reasons mmud's vCPU takes (arch/x86/include/uapi/asm/vmx.h), with the
# names VMX_EXIT_REASONS gives them.
EXIT_REASON_EXCEPTION_NMI = 0
EXIT_REASON_INVLPG = 14
EXIT_REASON_CR_ACCESS = 28
EXIT_REASON_MSR_WRITE = 32
VMX_EXIT_REASONS = {EXIT_REASON_EXCEPTION_NMI: "EXCEPTION_NMI", EXIT_REASON_INVLPG: "INVLPG",
                    EXIT_REASON_CR_ACCESS: "CR_ACCESS", EXIT_REASON_MSR_WRITE: "MSR_WRITE"}

# kvm_trace_symbol_mmio.
KVM_TRACE_MMIO_READ_UNSATISFIED = 0
KVM_TRACE_MMIO_READ = 1
KVM_TRACE_MMIO_WRITE = 2
_MMIO_TYPES = {KVM_TRACE_MMIO_READ_UNSATISFIED: "unsatisfied-read", KVM_TRACE_MMIO_READ: "read",
               KVM_TRACE_MMIO_WRITE: "write"}

# kvm_trace_symbol_emul_flags, from KVM_EMUL_INSN_F_{CR0_PE,EFL_VM,CS_D,CS_L} (bits 0-3).
KVM_EMUL_INSN_F_CR0_PE, KVM_EMUL_INSN_F_CS_L = 1 << 0, 1 << 3
_EMUL_FLAGS = {0: "real", 1 | 1 << 1: "vm16", 1: "prot16", 1 | 1 << 2: "prot32", 1 | 1 << 3: "prot64"}


def print_symbolic(value: int, table: Mapping[int, str]) -> str:
    """__print_symbolic() (trace_print_symbols_seq): the value's name, else 0x%lx."""
    return table.get(value, f"0x{value:x}")


def _exit_reason(f: Mapping[str, int]) -> str:
    """kvm_print_exit_reason() for VMX: the basic reason's name; mmud sets no flag bits."""
    reason = f["exit_reason"]
    flags = reason & ~0xFFFF
    return print_symbolic(reason & 0xFFFF, VMX_EXIT_REASONS) + (f" 0x{flags:x}" if flags else "")


def _print_hex(value: int, length: int) -> str:
    """__print_hex() of a byte array held as a little-endian int: `%*ph`, space-separated."""
    return " ".join(f"{value >> 8 * k & 0xFF:02x}" for k in range(length))


_KVM_DEFS: tuple[tuple[str, tuple[tuple[str, str], ...], _Render, tuple[int, int]], ...] = (
    ("kvm_entry", (("unsigned int", "vcpu_id"), ("unsigned long", "rip")),
     lambda f: f"vcpu {f['vcpu_id']}, rip 0x{f['rip']:x}", CTX_GUEST_SWITCH),
    ("kvm_exit", (("unsigned int", "exit_reason"), ("unsigned long", "guest_rip"), ("u32", "isa"),
                  ("u64", "info1"), ("u64", "info2"), ("u32", "intr_info"), ("u32", "error_code"),
                  ("unsigned int", "vcpu_id")),
     lambda f: (f"vcpu {f['vcpu_id']} reason {_exit_reason(f)} rip 0x{f['guest_rip']:x} "
                f"info1 0x{f['info1']:016x} info2 0x{f['info2']:016x} "
                f"intr_info 0x{f['intr_info']:08x} error_code 0x{f['error_code']:08x}"),
     CTX_GUEST_SWITCH),
    ("kvm_page_fault", (("unsigned long", "fault_address"), ("unsigned int", "error_code")),
     lambda f: f"address {f['fault_address']:x} error_code {f['error_code']:x}", CTX_NONE),
    ("kvm_cr", (("unsigned int", "rw"), ("unsigned int", "cr"), ("unsigned long", "val")),
     lambda f: f"cr_{'write' if f['rw'] else 'read'} {f['cr']:x} = 0x{f['val']:x}", CTX_NONE),
    ("kvm_emulate_insn", (("__u64", "rip"), ("__u32", "csbase"), ("__u8", "len"),
                          ("__u8", "insn[15]"), ("__u8", "flags"), ("__u8", "failed")),
     lambda f: (f"{f['csbase']:x}:{f['rip']:x}:{_print_hex(f['insn'], f['len'])} "
                f"({print_symbolic(f['flags'], _EMUL_FLAGS)}){' failed' if f['failed'] else ''}"),
     CTX_NONE),
    ("kvm_mmio", (("u32", "type"), ("u32", "len"), ("u64", "gpa"), ("u64", "val")),
     lambda f: (f"mmio {print_symbolic(f['type'], _MMIO_TYPES)} len {f['len']} "
                f"gpa 0x{f['gpa']:x} val 0x{f['val']:x}"),
     CTX_NONE),
)

# Event ids are handed out at boot in registration order; mmud numbers them from here.
FIRST_EVENT_ID = 1000


def _make(k: int, system: str, name: str, decls: tuple[tuple[str, str], ...],
          render: Callable[[Mapping[str, int]], str], ctx: tuple[int, int]) -> Event:
    fields, size = _layout(decls)
    return Event(name, FIRST_EVENT_ID + k, fields, size, render, ctx, system)


EVENTS: dict[str, Event] = {
    d[0]: _make(k, system, *d)
    for k, (system, d) in enumerate([*((KVM_SYSTEM, d) for d in _KVM_DEFS),
                                     *((SYSTEM, d) for d in _DEFS)])}
SYSTEMS: tuple[str, ...] = (KVM_SYSTEM, SYSTEM)

# The `print fmt:` line of each format file: TP_printk's format string and arguments as the
# preprocessor leaves them (macros expanded, whitespace collapsed), `__entry->` read as
# `REC->`, and the TRACE_DEFINE_ENUM values (RET_PF_*) replaced by their numbers as the kernel
# does at boot. One simplification: kvm_exit keeps the names of its three long symbol tables
# (VMX_EXIT_REASONS, SVM_EXIT_REASONS, VMX_EXIT_REASON_FLAGS) where the kernel lists them whole.
_PFERR = '{ (1U << 0), "P" }, { (1U << 1), "W" }, { (1U << 2), "U" }, { (1U << 3), "RSVD" }, ' \
         '{ (1U << 4), "F" }'
KVM_MMU_PAGE_PRINTK_FMT = (
    '({ const char *saved_ptr = trace_seq_buffer_ptr(p); static const char *access_str[] = '
    '{ "---", "--x", "w--", "w-x", "-u-", "-ux", "wu-", "wux" }; union kvm_mmu_page_role role; '
    'role.word = REC->role; trace_seq_printf(p, "sp gen %u gfn %llx l%u %u-byte q%u%s %s%s" '
    '" %snxe %sad root %u %s%c", REC->mmu_valid_gen, REC->gfn, role.level, '
    'role.gpte_is_8_bytes ? 8 : 4, role.quadrant, role.direct ? " direct" : "", '
    'access_str[role.access], role.invalid ? " invalid" : "", role.efer_nx ? "" : "!", '
    'role.ad_disabled ? "!" : "", REC->root_count, REC->unsync ? "unsync" : "sync", 0); '
    'saved_ptr; })')
_PAGE_FMT = f'"%s", {KVM_MMU_PAGE_PRINTK_FMT}'
PRINT_FMT: dict[str, str] = {
    "kvm_entry": '"vcpu %u, rip 0x%lx", REC->vcpu_id, REC->rip',
    "kvm_exit": '"vcpu %u reason %s%s%s rip 0x%lx info1 0x%016llx info2 0x%016llx intr_info '
                '0x%08x error_code 0x%08x", REC->vcpu_id, (REC->isa == 1) ? '
                '__print_symbolic(REC->exit_reason & 0xffff, VMX_EXIT_REASONS) : '
                '__print_symbolic(REC->exit_reason, SVM_EXIT_REASONS), (REC->isa == 1 && '
                'REC->exit_reason & ~0xffff) ? " " : "", (REC->isa == 1) ? '
                '__print_flags(REC->exit_reason & ~0xffff, " ", VMX_EXIT_REASON_FLAGS) : "", '
                'REC->guest_rip, REC->info1, REC->info2, REC->intr_info, REC->error_code',
    "kvm_page_fault": '"address %lx error_code %x", REC->fault_address, REC->error_code',
    "kvm_cr": '"cr_%s %x = 0x%lx", REC->rw ? "write" : "read", REC->cr, REC->val',
    "kvm_emulate_insn": '"%x:%llx:%s (%s)%s", REC->csbase, REC->rip, __print_hex(REC->insn, '
                        'REC->len), __print_symbolic(REC->flags, { 0, "real" }, '
                        '{ (1 << 0) | (1 << 1), "vm16" }, { (1 << 0), "prot16" }, '
                        '{ (1 << 0) | (1 << 2), "prot32" }, { (1 << 0) | (1 << 3), "prot64" }), '
                        'REC->failed ? " failed" : ""',
    "kvm_mmio": '"mmio %s len %u gpa 0x%llx val 0x%llx", __print_symbolic(REC->type, '
                '{ 0, "unsatisfied-read" }, { 1, "read" }, { 2, "write" }), REC->len, REC->gpa, '
                'REC->val',
    "kvm_mmu_pagetable_walk":
        f'"addr %llx pferr %x %s", REC->addr, REC->pferr, __print_flags(REC->pferr, "|", {_PFERR})',
    "kvm_mmu_paging_element": '"pte %llx level %u", REC->pte, REC->level',
    "kvm_mmu_set_accessed_bit": '"gpa %llx", REC->gpa',
    "kvm_mmu_set_dirty_bit": '"gpa %llx", REC->gpa',
    "kvm_mmu_walker_error":
        f'"pferr %x %s", REC->pferr, __print_flags(REC->pferr, "|", {_PFERR})',
    "kvm_mmu_get_page": f'"%s %s", {KVM_MMU_PAGE_PRINTK_FMT}, REC->created ? "new" : "existing"',
    "kvm_mmu_sync_page": _PAGE_FMT,
    "kvm_mmu_unsync_page": _PAGE_FMT,
    "kvm_mmu_prepare_zap_page": _PAGE_FMT,
    "mark_mmio_spte": '"sptep:%p gfn %llx access %x gen %x", REC->sptep, REC->gfn, REC->access, '
                      'REC->gen',
    "handle_mmio_page_fault": '"addr:%llx gfn %llx access %x", REC->addr, REC->gfn, REC->access',
    "fast_page_fault": '"vcpu %d gva %llx error_code %s sptep %p old %#llx new %llx spurious %d '
                       'fixed %d", REC->vcpu_id, REC->cr2_or_gpa, __print_flags(REC->error_code, '
                       f'"|", {_PFERR}), REC->sptep, REC->old_spte, REC->new_spte, '
                       f'REC->ret == {_RET_PF_SPURIOUS}, REC->ret == {_RET_PF_FIXED}',
    "kvm_mmu_zap_all_fast": '"kvm-mmu-valid-gen %u used_pages %x", REC->mmu_valid_gen, '
                            'REC->mmu_used_pages',
    "check_mmio_spte": '"spte %llx kvm_gen %x spte-gen %x valid %d", REC->spte, REC->kvm_gen, '
                       'REC->spte_gen, REC->kvm_gen == REC->spte_gen',
    "kvm_mmu_set_spte": '"gfn %llx spte %llx (%s%s%s%s) level %d at %llx", REC->gfn, REC->spte, '
                        'REC->r ? "r" : "-", REC->spte & (1ULL << 1) ? "w" : "-", '
                        'REC->x ? "x" : "-", REC->u == -1 ? "" : (REC->u ? "u" : "-"), '
                        'REC->level, REC->sptep',
    "kvm_mmu_spte_requested": '"gfn %llx pfn %llx level %d", REC->gfn, REC->pfn, REC->level',
}

# Not in mmud: TDP MMU only.
SKIPPED = {"kvm_tdp_mmu_spte_changed": "mmud has no TDP MMU (shadow paging only)"}


def select(patterns: list[str] | tuple[str, ...] | str) -> set[str]:
    """The events named by `set_event`-style patterns: `system:event`, `system:*`, `*:*`, or a
    bare name (an event or a system), with shell globs. An unknown pattern is an error
    (the kernel's EINVAL)."""
    if isinstance(patterns, str):
        patterns = [patterns]
    chosen: set[str] = set()
    for pattern in patterns:
        if ":" in pattern:
            system, _, event = pattern.partition(":")
            system, event = system or "*", event or "*"
            found = {n for n, e in EVENTS.items()
                     if fnmatch.fnmatchcase(e.system, system) and fnmatch.fnmatchcase(n, event)}
        else:
            found = {n for n, e in EVENTS.items()
                     if fnmatch.fnmatchcase(n, pattern) or fnmatch.fnmatchcase(e.system, pattern)}
        if not found:
            raise ValueError(f"no trace event matches {pattern!r}")
        chosen |= found
    return chosen

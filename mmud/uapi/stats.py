"""KVM statistics: names, scope and kind, as debugfs `kvm/` publishes them.

The set is x86 Linux v5.16's: the VM and vCPU descriptor arrays of arch/x86/kvm/x86.c
(`kvm_vm_stats_desc[]`, `kvm_vcpu_stats_desc[]`), each opening with the generic ones of
include/linux/kvm_host.h (`KVM_GENERIC_VM_STATS()`, `KVM_GENERIC_VCPU_STATS()`). Five page-fault
statistics that x86 only gained in v5.19 are kept, marked as later additions, and a few
statistics are mmud's own. docs/statistics.md says what mmud counts in each.

The kind decides the debugfs mode, as kvm_stats_debugfs_mode() does (≥v5.14 binary-stats era):
*instant* gauges are 0444 and cannot be cleared; *cumulative* counters, *peak* values and
*log_hist* histograms are 0644 and are cleared by writing 0. A histogram's debugfs file shows
(and clears) its first bucket only, the u64 at the stat's offset.

Per-object counters are plain Python dicts (`VcpuStats`, `VmStats`) because they are bumped
on the per-fault hot path, where a dict item increment is the cheapest mutable int.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Kind(Enum):
    CUMULATIVE = "cumulative"
    INSTANT = "instant"
    PEAK = "peak"
    LOG_HIST = "log_hist"


class Origin(Enum):
    """Where a statistic comes from."""

    GENERIC = "v5.16 generic"  # KVM_GENERIC_VM_STATS() / KVM_GENERIC_VCPU_STATS()
    X86 = "v5.16 x86"  # arch/x86/kvm/x86.c
    LATER = "x86, v5.19"  # after v5.16: "KVM: x86/mmu: Expand and clean up page fault stats"
    MMUD = "mmud"  # mmud's own


@dataclass(frozen=True)
class StatDesc:
    name: str
    scope: str  # "vm" or "vcpu"
    kind: Kind
    help: str
    origin: Origin = Origin.X86

    @property
    def mode(self) -> int:
        return 0o444 if self.kind is Kind.INSTANT else 0o644


NEVER = "0: the simulated machine never has this event"


def _vm(name: str, help_: str, kind: Kind = Kind.CUMULATIVE, origin: Origin = Origin.X86) -> StatDesc:
    return StatDesc(name, "vm", kind, help_, origin)


def _vcpu(name: str, help_: str, kind: Kind = Kind.CUMULATIVE, origin: Origin = Origin.X86) -> StatDesc:
    return StatDesc(name, "vcpu", kind, help_, origin)


_G, _LATER, _MMUD = Origin.GENERIC, Origin.LATER, Origin.MMUD
_LATER_NOTE = " (x86 since v5.19, not in v5.16)"

# Order: the kernel's — kvm_create_vm_debugfs() makes the VM stats, then the vCPU stats, each
# in the order of its descriptor array, generic ones first; mmud's own last.
STATS: tuple[StatDesc, ...] = (
    # KVM_GENERIC_VM_STATS()
    _vm("remote_tlb_flush", "remote TLB flushes that found a vCPU to kick", origin=_G),
    _vm("remote_tlb_flush_requests", "requests to flush remote TLBs (kvm_flush_remote_tlbs)", origin=_G),
    # kvm_vm_stats_desc[]
    _vm("mmu_shadow_zapped", "shadow pages prepared for zapping"),
    _vm("mmu_pte_write", "emulated writes to shadowed guest page tables"),
    _vm("mmu_pde_zapped", "written entries of level>1 shadow pages zapped"),
    _vm("mmu_flooded", "shadow pages zapped for misaligned or flooding writes"),
    _vm("mmu_recycled", "shadow pages reclaimed to keep the page budget"),
    _vm("mmu_cache_miss", "shadow page lookups that allocated a new page"),
    _vm("mmu_unsync", "shadow pages currently unsync", Kind.INSTANT),
    _vm("pages_4k", "4 KiB leaf sptes currently installed", Kind.INSTANT),
    _vm("pages_2m", "2 MiB leaf sptes currently installed (mmud has no huge sptes: 0)", Kind.INSTANT),
    _vm("pages_1g", "1 GiB leaf sptes currently installed (mmud has no huge sptes: 0)", Kind.INSTANT),
    _vm("nx_lpage_splits", "huge pages split by the NX huge page mitigation (none in mmud: 0)", Kind.INSTANT),
    _vm("max_mmu_rmap_size", "longest rmap chain an spte was added to (entries before it)", Kind.PEAK),
    _vm("max_mmu_page_hash_collisions", "longest hash-chain walk past other gfns", Kind.PEAK),
    # KVM_GENERIC_VCPU_STATS()
    _vcpu("halt_successful_poll", NEVER + " (HLT)", origin=_G),
    _vcpu("halt_attempted_poll", NEVER + " (HLT)", origin=_G),
    _vcpu("halt_poll_invalid", NEVER + " (HLT)", origin=_G),
    _vcpu("halt_wakeup", NEVER + " (HLT)", origin=_G),
    _vcpu("halt_poll_success_ns", NEVER + " (HLT)", origin=_G),
    _vcpu("halt_poll_fail_ns", NEVER + " (HLT)", origin=_G),
    _vcpu("halt_wait_ns", NEVER + " (HLT)", origin=_G),
    _vcpu("halt_poll_success_hist", NEVER + " (HLT); bucket 0 of the histogram", Kind.LOG_HIST, origin=_G),
    _vcpu("halt_poll_fail_hist", NEVER + " (HLT); bucket 0 of the histogram", Kind.LOG_HIST, origin=_G),
    _vcpu("halt_wait_hist", NEVER + " (HLT); bucket 0 of the histogram", Kind.LOG_HIST, origin=_G),
    # kvm_vcpu_stats_desc[] (the pf_* marked later are where v5.19 put them)
    _vcpu("pf_taken", "#PF exits that entered the page-fault handler" + _LATER_NOTE, origin=_LATER),
    _vcpu("pf_fixed", "shadow page faults that reached the leaf spte (FNAME(fetch))"),
    _vcpu("pf_emulate", "page faults resolved by emulating the instruction" + _LATER_NOTE, origin=_LATER),
    _vcpu("pf_spurious", "page faults that found the spte already fixed" + _LATER_NOTE, origin=_LATER),
    _vcpu("pf_fast", "page faults handled by the lockless fast path" + _LATER_NOTE, origin=_LATER),
    _vcpu("pf_mmio_spte_created", "MMIO sptes created" + _LATER_NOTE, origin=_LATER),
    _vcpu("pf_guest", "page faults reflected into the guest"),
    _vcpu("tlb_flush", "guest TLB flushes serviced (KVM_REQ_TLB_FLUSH)"),
    _vcpu("invlpg", "INVLPG operations handled"),
    _vcpu("exits", "VM exits"),
    _vcpu("io_exits", NEVER + " (port I/O)"),
    _vcpu("mmio_exits", "exits to userspace for MMIO"),
    _vcpu("signal_exits", NEVER + " (KVM_RUN interrupted by a signal)"),
    _vcpu("irq_window_exits", NEVER + " (interrupt window)"),
    _vcpu("nmi_window_exits", NEVER + " (NMI window)"),
    _vcpu("l1d_flush", NEVER + " (L1TF mitigation)"),
    _vcpu("halt_exits", NEVER + " (HLT)"),
    _vcpu("request_irq_exits", NEVER + " (userspace interrupt window request)"),
    _vcpu("irq_exits", NEVER + " (external interrupt)"),
    _vcpu("host_state_reload", NEVER + " (host state reload)"),
    _vcpu("fpu_reload", NEVER + " (guest FPU reload)"),
    _vcpu("insn_emulation", "instructions emulated"),
    _vcpu("insn_emulation_fail", "instructions whose emulation failed"),
    _vcpu("hypercalls", NEVER + " (hypercall)"),
    _vcpu("irq_injections", NEVER + " (interrupt injection)"),
    _vcpu("nmi_injections", NEVER + " (NMI injection)"),
    _vcpu("req_event", "KVM_REQ_EVENT serviced at guest entry (an injected exception)"),
    _vcpu("nested_run", NEVER + " (nested VM entry)"),
    _vcpu("directed_yield_attempted", NEVER + " (directed yield)"),
    _vcpu("directed_yield_successful", NEVER + " (directed yield)"),
    _vcpu("guest_mode", NEVER + " (running a nested guest)", Kind.INSTANT),
    # mmud's own
    _vm("isolation_enters", "switches to the KVM address space", origin=_MMUD),
    _vm("isolation_exits", "switches back to the kernel address space", origin=_MMUD),
    _vm("isolation_faults", "page faults on the KVM address space", origin=_MMUD),
    _vm("mmu_audit_runs", "MMU audit runs", origin=_MMUD),
    _vm("mmu_audit_ratelimited", "MMU audit runs skipped by the rate limiter", origin=_MMUD),
    _vm("mmu_audit_errors", "MMU audit error lines", origin=_MMUD),
)

STAT_BY_NAME: dict[str, StatDesc] = {s.name: s for s in STATS}
VCPU_STATS: tuple[str, ...] = tuple(s.name for s in STATS if s.scope == "vcpu")
VM_STATS: tuple[str, ...] = tuple(s.name for s in STATS if s.scope == "vm")


def new_vcpu_stats() -> dict[str, int]:
    return dict.fromkeys(VCPU_STATS, 0)


def new_vm_stats() -> dict[str, int]:
    return dict.fromkeys(VM_STATS, 0)

"""KVM statistics: names, scope and kind, as debugfs `kvm/` publishes them.

Names and meanings follow Linux (virt/kvm/kvm_main.c, arch/x86/kvm/x86.c); the kind decides
the debugfs mode (≥v5.14 binary-stats era): *instant* gauges are 0444 and cannot be cleared,
*cumulative* counters and *peak* values are 0644 and are cleared by writing 0.

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


@dataclass(frozen=True)
class StatDesc:
    name: str
    scope: str  # "vm" or "vcpu"
    kind: Kind
    help: str

    @property
    def mode(self) -> int:
        return 0o444 if self.kind is Kind.INSTANT else 0o644


def _vcpu(name: str, help_: str) -> StatDesc:
    return StatDesc(name, "vcpu", Kind.CUMULATIVE, help_)


def _vm(name: str, help_: str, kind: Kind = Kind.CUMULATIVE) -> StatDesc:
    return StatDesc(name, "vm", kind, help_)


# Order: the kernel's (vCPU stats first, then VM stats), mmud additions last in each group.
STATS: tuple[StatDesc, ...] = (
    _vcpu("pf_fixed", "leaf sptes installed by a shadow page fault"),
    _vcpu("pf_guest", "page faults reflected into the guest"),
    _vcpu("tlb_flush", "guest TLB flushes serviced (KVM_REQ_TLB_FLUSH)"),
    _vcpu("invlpg", "INVLPG operations handled"),
    _vcpu("exits", "VM exits"),
    _vcpu("mmio_exits", "exits to userspace for MMIO"),
    _vcpu("insn_emulation", "instructions emulated"),
    _vcpu("insn_emulation_fail", "instructions whose emulation failed"),
    _vcpu("pf_emulate", "page faults resolved by emulating the instruction"),
    _vcpu("pf_mmio_spte_created", "MMIO sptes created"),
    _vcpu("pf_fast", "page faults fixed by the lockless fast path"),
    _vm("mmu_shadow_zapped", "shadow pages prepared for zapping"),
    _vm("mmu_pte_write", "emulated writes to shadowed guest page tables"),
    _vm("mmu_pte_updated", "level-1 sptes rebuilt in place from an emulated write"),
    _vm("mmu_pde_zapped", "written entries of level>1 shadow pages zapped"),
    _vm("mmu_flooded", "shadow pages zapped for misaligned or flooding writes"),
    _vm("mmu_recycled", "shadow pages reclaimed to keep the page budget"),
    _vm("mmu_cache_miss", "shadow page lookups that allocated a new page"),
    _vm("mmu_unsync", "shadow pages currently unsync", Kind.INSTANT),
    _vm("remote_tlb_flush", "remote TLB flushes"),
    _vm("pages_4k", "4 KiB leaf sptes currently installed", Kind.INSTANT),
    _vm("max_mmu_page_hash_collisions", "longest hash-chain walk past other gfns", Kind.PEAK),
    _vm("isolation_enters", "switches to the KVM address space"),
    _vm("isolation_exits", "switches back to the kernel address space"),
    _vm("isolation_faults", "page faults on the KVM address space"),
    _vm("mmu_audit_runs", "MMU audit runs"),
    _vm("mmu_audit_ratelimited", "MMU audit runs skipped by the rate limiter"),
    _vm("mmu_audit_errors", "MMU audit error lines"),
)

STAT_BY_NAME: dict[str, StatDesc] = {s.name: s for s in STATS}
VCPU_STATS: tuple[str, ...] = tuple(s.name for s in STATS if s.scope == "vcpu")
VM_STATS: tuple[str, ...] = tuple(s.name for s in STATS if s.scope == "vm")


def new_vcpu_stats() -> dict[str, int]:
    return dict.fromkeys(VCPU_STATS, 0)


def new_vm_stats() -> dict[str, int]:
    return dict.fromkeys(VM_STATS, 0)

"""The MMU audit: run the checks of audit_checks.py over the whole MMU and format the report.

A full run follows mmu_audit.c: every active page head to tail (checks 5, 6), then the vCPU's
shadow tree from its root (checks 3, 1, 4), then mmud's extended checks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mmud.kvm.mmu import audit_checks as C
from mmud.kvm.mmu.mmu import KvmMmu
from mmud.x86.paging import PT64_ROOT_4LEVEL

if TYPE_CHECKING:
    from mmud.kvm.vcpu import Vcpu


def format_errors(point: str, messages: list[str]) -> list[str]:
    return [f"audit: ({point}) error: {m}" for m in messages]


def audit_full(mmu: KvmMmu, vcpus: list[Vcpu], point: str) -> list[str]:
    rmaps = C.RmapIndex(mmu)
    active = list(reversed(mmu.active_mmu_pages))
    out: list[str] = []
    for sp in active:
        out += C.check_mappings_rmap(rmaps, sp)
        out += C.audit_write_protection(mmu, sp)
    for vcpu in vcpus:
        if vcpu.root is not None:
            tree = C.reachable_pages(mmu, vcpu.root)
            out += C.walk_checks(mmu, rmaps, tree, point, PT64_ROOT_4LEVEL)
    if vcpus:
        out += C.extended_checks(mmu, vcpus[0], active, None)
    return format_errors(point, out)

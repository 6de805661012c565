"""mmud: a simulated x86-64 VM on a simulated KVM shadow MMU, with kernel-style control files.

Layering (lower never imports upper): x86 architecture facts (mmud.x86) → simulated KVM
(mmud.kvm: VM, memslots, vCPUs, shadow MMU) → guest workloads (mmud.guest) → the runnable VM
and its scheduler (mmud.machine, mmud.sched) → daemon (mmud.daemon) → control filesystem
(mmud.fs) → CLI (mmud.cli).
"""

from mmud.kvm.memslot import Memslot
from mmud.kvm.mmu.roots import TripleFault
from mmud.uapi.params import ParamError, Params
from mmud.kvm.vcpu import Access, GeneralProtection, PageFault, Vcpu
from mmud.kvm.vm import KvmError
from mmud.machine import VM
from mmud.migration import MigrationResult, migrate

__all__ = [
    "VM",
    "Access",
    "GeneralProtection",
    "KvmError",
    "Memslot",
    "MigrationResult",
    "PageFault",
    "ParamError",
    "Params",
    "TripleFault",
    "Vcpu",
    "migrate",
]

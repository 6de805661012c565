"""mmud: a simulated x86-64 VM on a simulated KVM shadow MMU, with kernel-style control files.

Layering (lower never imports upper): x86 architecture facts (mmud.x86) → simulated KVM
(mmud.kvm: VM, memslots, vCPUs, shadow MMU) → guest workloads (mmud.guest) → the runnable VM
and its scheduler (mmud.machine, mmud.sched) → daemon (mmud.daemon) → control filesystem
(mmud.fs) → CLI (mmud.cli).

The public names below are imported on first use (PEP 562), not here: importing any
submodule runs this file first, and the FUSE process (mmud.fs) must not pay for numpy and the
simulated machine it never runs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mmud.daemon.replay import replay
    from mmud.kvm.memslot import Memslot
    from mmud.kvm.mmu.roots import TripleFault
    from mmud.kvm.module import KvmModule
    from mmud.kvm.vcpu import Access, GeneralProtection, PageFault, Vcpu
    from mmud.kvm.vm import KvmError
    from mmud.machine import VM
    from mmud.migration import MigrationResult, migrate
    from mmud.uapi.params import ParamError, Params

# Public name -> the module that defines it.
_LAZY: dict[str, str] = {
    "VM": "mmud.machine",
    "Access": "mmud.kvm.vcpu",
    "GeneralProtection": "mmud.kvm.vcpu",
    "KvmError": "mmud.kvm.vm",
    "KvmModule": "mmud.kvm.module",
    "Memslot": "mmud.kvm.memslot",
    "MigrationResult": "mmud.migration",
    "PageFault": "mmud.kvm.vcpu",
    "ParamError": "mmud.uapi.params",
    "Params": "mmud.uapi.params",
    "TripleFault": "mmud.kvm.mmu.roots",
    "Vcpu": "mmud.kvm.vcpu",
    "migrate": "mmud.migration",
    "replay": "mmud.daemon.replay",
}

__all__ = [
    "VM",
    "Access",
    "GeneralProtection",
    "KvmError",
    "KvmModule",
    "Memslot",
    "MigrationResult",
    "PageFault",
    "ParamError",
    "Params",
    "TripleFault",
    "Vcpu",
    "migrate",
    "replay",
]


def __getattr__(name: str) -> Any:
    """Import a public name's module on first access and cache the name in this module."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})

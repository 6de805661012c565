"""KVM address-space isolation and its page-fault log (the KVM ASI RFC series, 2019).

KVM handles VM exits on a reduced "KVM address space" (kvm_mm) that maps only what KVM is
known to need; KVM code touching anything else takes a page fault, whose handler switches
to the full kernel address space, logs the fault once per faulting instruction and retries.
The log (`kvm/fault_log`) tells the developer what to add to the KVM address space
(`kvm/isolation/map`).

Modules, one job each:
- symbols: kallsyms for KVM code — frames of the simulated KVM as `symbol+off/size`;
- layout: the addresses and names of the data KVM uses, and what `%pS` prints for them;
- addrspace: kvm_mm — the mapping set, map requests, page-table dumps;
- faultlog: the tracking table and message format of kvm_log_page_fault();
- context: the switches, the touch points and the fault handler.

State that the kernel keeps in module globals (kvm_mm, kvm_last_fault[], the parameters)
lives in one `ModuleIsolation`, held by the `KvmModule` (mmud/kvm/module.py).
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from mmud.kvm.isolation.addrspace import INITIAL_SYMBOLS, INITIAL_VCPU_SYMBOLS
from mmud.kvm.isolation.context import ModuleIsolation, VmIsolation
from mmud.uapi.isolation import MapRequest

if TYPE_CHECKING:
    from mmud.kvm.vm import Kvm

__all__ = [
    "ModuleIsolation",
    "VmIsolation",
    "arm_switch_fault",
    "isolation_map",
    "kvm_isolation_init_vm",
]


def kvm_isolation_init_vm(kvm: Kvm) -> VmIsolation | None:
    """A VM is created: clear the fault log and map its structures (None: isolation is off)."""
    module = kvm.module.isolation
    if not module.enabled:
        return None
    ctx = VmIsolation(kvm, module)
    module.current = ctx
    module.log.clear()
    symbols = ctx.symbols()
    names = list(INITIAL_SYMBOLS)
    names += [f.format(i=v.index) for v in kvm.vcpus for f in INITIAL_VCPU_SYMBOLS]
    mapped = {what for _, _, what in module.mm.named}
    for name in names:
        if name not in mapped:
            module.mm.apply(MapRequest(symbol=name), symbols)
    for vcpu in kvm.vcpus:
        vcpu.isolation = ctx
    return ctx


def isolation_map(module: ModuleIsolation, req: MapRequest) -> None:
    """A `kvm/isolation/map` write; EINVAL for a symbol no VM has."""
    symbols = module.symbols()
    if symbols is None:
        raise OSError(errno.EINVAL, "address space isolation is off")
    module.mm.apply(req, symbols)


def arm_switch_fault(kvm: Kvm) -> None:
    """Arm the `isolation_switch_fault` bug in one VM (EINVAL when isolation is off)."""
    if kvm.isolation is None:
        raise OSError(errno.EINVAL, "address space isolation is off")
    kvm.isolation.arm_switch_fault()

"""The loaded kvm module (`kvm.ko`): its parameter block and the state it keeps in globals.

The kernel keeps some MMU state once per module, shared by every VM: the parameters under
/sys/module/kvm/parameters, the audit's rate limiter (`__kvm_mmu_audit`'s static
ratelimit state) and its log, the MMIO generation wrap message's limiter, and — in the
address-space-isolation series — `kvm_mm` and the fault log; and the trace instances with
their ring buffers. mmud holds all of it in one `KvmModule`, created once (the daemon's
simulation process makes one; a script makes one per experiment) and handed to each VM, so
that what is shared is visible in the code and two modules never share anything:

    module = KvmModule({"mmu_audit": "1"})
    a, b = mmud.VM(module=module), mmud.VM(module=module)   # one rate limiter, one log

A VM created without a module gets one of its own.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache

from mmud.kvm.isolation.context import ModuleIsolation
from mmud.kvm.isolation.symbols import KernelText
from mmud.kvm.mmu.audit import ModuleAudit
from mmud.kvm.ratelimit import Ratelimit
from mmud.kvm.trace.tracer import ModuleTrace
from mmud.uapi.params import Params, Value

# kvm_debug_ratelimited(): DEFAULT_RATELIMIT_INTERVAL (5 s) and DEFAULT_RATELIMIT_BURST (10).
DEFAULT_RATELIMIT_INTERVAL_MS = 5000
DEFAULT_RATELIMIT_BURST = 10


@cache
def kernel_text() -> KernelText:
    """The layout of KVM's code as module text: the same for every module of the process
    (it is derived from the code, which never changes while it runs)."""
    return KernelText()


class KvmModule:
    """Parameters plus the module-wide state of the audit, MMIO and isolation."""

    def __init__(self, params: Params | Mapping[str, str | None] | None = None) -> None:
        self.params = params if isinstance(params, Params) else Params(load=params)
        # __ratelimit() inside __kvm_mmu_audit() names its function in the suppressed line.
        self.audit = ModuleAudit(Ratelimit("__kvm_mmu_audit", int(self.params["mmu_audit_ratelimit_ms"]),
                                           int(self.params["mmu_audit_ratelimit_burst"])))
        self.mmio_wrap_limit = Ratelimit("kvm_mmu_invalidate_mmio_sptes",
                                         DEFAULT_RATELIMIT_INTERVAL_MS, DEFAULT_RATELIMIT_BURST)
        self.isolation = ModuleIsolation(bool(self.params["address_space_isolation"]),
                                         bool(self.params["page_fault_stack"]), kernel_text())
        # The kvmmmu trace events: the instances and their per-CPU ring buffers (mmud/kvm/trace).
        self.trace = ModuleTrace()
        self.params.watch(self._param_changed)

    def _param_changed(self, name: str, value: Value) -> None:
        """The audit's run limiter follows its two parameters (a store takes effect at once)."""
        if name == "mmu_audit_ratelimit_ms":
            self.audit.run_limit.interval_ns = int(value) * 1_000_000
        elif name == "mmu_audit_ratelimit_burst":
            self.audit.run_limit.burst = int(value)

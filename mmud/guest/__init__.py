"""Guest workloads: a model of a Linux-like guest kernel and the user programs it runs.

The VM instantiates `WORKLOADS[name](vm, seed)` and advances `workload.task(vcpu)` once per
scheduler step of that vCPU. Layering: this package uses the VM's guest-facing API only
(vCPU registers and accesses, host writes to RAM at boot) and never the MMU's internals;
hw.py describes that API and is the package's only module that imports mmud.kvm.
"""

from mmud.guest.workload import Workload
from mmud.guest.workloads import KernelWorkload, StreamWorkload

WORKLOADS: dict[str, type[Workload]] = {
    KernelWorkload.name: KernelWorkload,
    StreamWorkload.name: StreamWorkload,
}

__all__ = ["WORKLOADS", "KernelWorkload", "StreamWorkload", "Workload"]

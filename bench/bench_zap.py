"""Zapping every shadow page, fast, slow and legacy, and the MMIO spte fast path (docs/memslots-mmio.md).

The guest has every page faulted in through a 2 MiB-page direct map (one direct shadow page
per 2 MiB); two more vCPUs run beside the zap as scheduler tasks, each flushing and
re-reading a page of its own at every step (INVLPG takes mmu_lock), so that someone always
contends for the lock.

- `zap_<kind>_stall_ms[<size>]`: the longest any vCPU waited for the MMU lock during the
  zap. `fast` (kvm_zap_obsolete_pages) breaks after ten pages when someone waits, `slow`
  (kvm_mmu_zap_all, v5.1+) after every page when someone waits: both stay flat as memory
  grows. `legacy` (kvm_mmu_zap_all before 2013) never breaks: its stall is its length.
- `zap_<kind>_total_ms[<size>]`: the zap from start to end, as the CPU time of its own steps
  (the vCPUs run on other CPUs). The slow zap restarts from the newest page after each
  break and also zaps what the vCPUs rebuilt meanwhile.
- `mmio_cached_cost_ratio`: cost of an access to the ioram device with its MMIO spte cached
  over the cost with mmio_caching=N (full fault and guest walk each time), side by side.
"""

from __future__ import annotations

from bench._common import figure, interleaved, median
from mmud.campaign.zap_guest import Guest
from mmud.kvm.mmu.zap import ZAP_KINDS


def warm_up() -> None:
    """One zap of each kind on a small guest. The first zap of a process also pays numpy's
    first use of each operation it runs, a few hundred µs: a stall figure is a warm
    process's."""
    guest = Guest(64, contenders=2)
    for kind in ZAP_KINDS:
        guest.zap(kind)


def run(quick: bool = False) -> None:
    warm_up()
    sizes = ((64, "64M"),) if quick else ((64, "64M"), (256, "256M"), (1024, "1G"), (4096, "4G"))
    for mem_mb, label in sizes:
        guest = Guest(mem_mb, contenders=2)
        results: dict[str, list[tuple[float, float]]] = {kind: [] for kind in ZAP_KINDS}
        for _ in range(1 if mem_mb >= 1024 or quick else 2):
            for kind in ZAP_KINDS:
                results[kind].append(guest.zap(kind))
        for kind in ZAP_KINDS:
            figure(f"zap_{kind}_stall_ms[{label}]", median([s for s, _ in results[kind]]), "ms")
            figure(f"zap_{kind}_total_ms[{label}]", median([t for _, t in results[kind]]), "ms")
        del guest
    cached, uncached = Guest(64), Guest(64, {"mmio_caching": "0"})
    n = 200 if quick else 5000
    samples = interleaved({"cached": lambda: [cached.mmio_reads(n)],
                           "uncached": lambda: [uncached.mmio_reads(n)]}, rounds=2 if quick else 7)
    figure("mmio_cached_cost_ratio", median(samples["cached"]) / median(samples["uncached"]), "ratio")

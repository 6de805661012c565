"""`overhead`: what the audit and the kvmmmu tracepoints cost as guest memory grows.

A job builds two identical guests of `mem_mb` (`touched_vm`: the `kernel` workload, seed 7,
its RAM read once through the guest's direct map, so the shadow MMU holds a page per 4 KiB
of RAM — what a full audit walks; bench/bench_audit.py measures on the same guests): one
with the audit and tracing off, one with `audit` (off, or a mode of the detect kind:
ratelimited, every, incremental) and `tracing` (every kvmmmu event on, drained as
trace_pipe text after each batch, as bench/bench_trace.py does). They run `steps` steps
each in turn for `rounds` rounds, in alternating order (mmud/campaign/measure.py's `interleaved`);
`ratio` is the median over rounds of the variant's steps/s over the plain guest's in the
same round — 1.0 costs nothing, 0.5 halves the speed. Audit off with tracing off is the
control: its spread is the noise.

The throughputs are timings (rerun does not compare them); `audit_runs` and `trace_lines`
count what the variant did and are the same on every run of the job.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import mmud
from mmud.campaign import tables
from mmud.campaign.kinds.detect import MODES
from mmud.campaign.measure import interleaved, paired_ratio
from mmud.campaign.zap_guest import read_all_ram
from mmud.campaign.params import choices, flag, integer, require, text, typed_grid
from mmud.kvm.trace.tracefs import TraceFs

if TYPE_CHECKING:
    import pandas as pd

AXES = ("audit", "tracing", "mem_mb", "rounds", "steps")
AUDITS = ("off", *MODES)
TIMINGS = ("ratio", "steps_per_s", "off_steps_per_s")
WARMUP_STEPS = 300
PIPE_READ = 1 << 16


def jobs(axes: dict[str, list], quick: bool) -> list[dict[str, object]]:
    require(axes, AXES)
    choices(axes, "audit", AUDITS)
    return typed_grid(axes, integers=AXES[2:], flags=("tracing",))


def touched_vm(mem_mb: int) -> mmud.VM:
    """A kernel-workload VM whose RAM was read once through the guest's direct map, so the
    shadow MMU holds a page per 4 KiB of RAM: the size a full audit must walk."""
    vm = mmud.VM(mem_mb=mem_mb, seed=7, workload="kernel")
    vm.step(200)
    read_all_ram(vm.vcpus[0], vm.ram_ranges)
    return vm


def _stepper(vm: mmud.VM, steps: int, lines: list[int],
             trace: TraceFs | None) -> Callable[[], list[float]]:
    """One batch of `steps` steps, timed with the trace drained inside the timed interval."""
    def measure() -> list[float]:
        t = time.perf_counter()
        vm.step(steps)
        while trace is not None and (text := trace.pipe(PIPE_READ)):
            lines[0] += text.count("\n")
        return [steps / (time.perf_counter() - t)]
    return measure


def run(job: dict[str, object], out: Path) -> dict[str, object]:
    mem_mb, steps = integer(job, "mem_mb"), integer(job, "steps")
    plain, variant = touched_vm(mem_mb), touched_vm(mem_mb)
    audit = text(job, "audit")
    for name, value in (MODES[audit] if audit != "off" else {}).items():
        variant.params[name] = value
    trace = TraceFs(variant.module.trace) if flag(job, "tracing") else None
    if trace is not None:
        trace.write("events/enable", "1\n")
    for vm in (plain, variant):
        vm.step(WARMUP_STEPS)
    runs0, lines = variant.stats["mmu_audit_runs"], [0]
    if trace is not None:
        trace.pipe(1 << 30)
    samples = interleaved({"off": _stepper(plain, steps, [0], None),
                           "variant": _stepper(variant, steps, lines, trace)},
                          integer(job, "rounds"))
    return {"ratio": paired_ratio(samples, "variant", "off"),
            "steps_per_s": statistics.median(samples["variant"]),
            "off_steps_per_s": statistics.median(samples["off"]),
            "audit_runs": variant.stats["mmu_audit_runs"] - runs0, "trace_lines": lines[0]}


def _variant(df: pd.DataFrame) -> pd.Series:
    return df["audit"] + df["tracing"].map({True: " + tracing", False: ""})


def summarize(df: pd.DataFrame) -> str:
    ok = df[df["outcome"] == "ok"].assign(variant=_variant)
    if ok.empty:
        return "No job ended ok.\n"
    table = ok.pivot_table(index="variant", columns="mem_mb", values="ratio", aggfunc="median")
    table.columns = [f"{c} MiB" for c in table.columns]
    return ("## Throughput ratio against audit and tracing off (median over jobs)\n\n"
            "1.0: no cost; 0.5: half the steps per second. `off` is the control.\n\n"
            + tables.markdown(table))


def plot(df: pd.DataFrame, out: Path) -> list[Path]:
    from mmud.campaign import plots

    ok = df[df["outcome"] == "ok"].assign(variant=_variant)
    if ok.empty:
        return []
    fig, ax = plots.figure()
    for variant, rows in ok.groupby("variant", sort=False):
        per_size = rows.groupby("mem_mb")["ratio"].median().sort_index()
        ax.plot(per_size.index, per_size.values, marker="o", label=str(variant))
    ax.axhline(1.0, color="gray", linewidth=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("guest memory (MiB), all of it shadowed")
    ax.set_ylabel("steps/s ratio against audit and tracing off")
    ax.set_title("overhead: throughput ratio vs memory size")
    ax.legend(fontsize="small")
    return [plots.save(fig, out / "overhead_ratio.png")]

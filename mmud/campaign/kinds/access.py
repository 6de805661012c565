"""The `access` campaign: the x86 access-rights matrix of kvm-unit-tests' x86/access.c.

Every job fixes the control bits, the upper entries' edit and the protection-key bits (its
axes) and runs every legal PDE × PTE × access case under them (mmud/campaign/access_matrix.py)
through mmud's vCPU against the SDM reference walk (mmud/campaign/access_check.py).
docs/access-matrix.md says how the matrix maps to access.c, its size and its running time.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

from mmud.campaign import grid, tables
from mmud.campaign.access_check import AccessBench
from mmud.campaign.access_matrix import Cpu, job_cases, upper_entries
from mmud.campaign.params import flag, integer, require, text
from mmud.campaign.reference import reference_walk

if TYPE_CHECKING:
    import pandas as pd

CPU_AXES = ("efer_nxe", "cr0_wp", "cr4_smep", "cr4_smap", "rflags_ac")
AXES = (*CPU_AXES, "upper", "pkey")
# --quick runs every QUICK_SAMPLE-th case of each job (from a different first case in each
# job), so every flag and access still varies while the grid runs in seconds.
QUICK_SAMPLE = 97
# Mismatches written out in full per job (mismatches.txt in its artifact directory).
MISMATCHES_KEPT = 20
TIMINGS = ("seconds", "cases_per_second")
FIRST_SHOWN = 5


def jobs(axes: dict[str, list], quick: bool) -> list[dict[str, object]]:
    """One job per combination of the axes; each runs all its cases, or a sample if quick."""
    require(axes, AXES)
    extra = [a for a in axes if a not in AXES]
    if extra:
        raise ValueError(f"unknown axes {', '.join(extra)} (this kind takes {', '.join(AXES)})")
    out = grid.product(axes)
    for i, job in enumerate(out):
        for axis in (*CPU_AXES, "pkey"):
            flag(job, axis)
        upper_entries(text(job, "upper"))  # ValueError for an unknown edit
        job["sample"] = QUICK_SAMPLE if quick else 1
        job["offset"] = i % QUICK_SAMPLE if quick else 0
    return out


def run(job: dict[str, object], out: Path) -> dict[str, object]:
    """Run the job's cases; the counts, the first mismatch, and up to MISMATCHES_KEPT in full
    in out/mismatches.txt."""
    cpu = Cpu(*(flag(job, a) for a in CPU_AXES))
    upper = text(job, "upper")
    bench = AccessBench(cpu, upper, flag(job, "pkey"), reference_walk)
    start = time.perf_counter()
    cases = mismatches = 0
    kept: list[str] = []
    for pde, pte, access in job_cases(cpu.efer_nxe, upper, integer(job, "sample"), integer(job, "offset")):
        cases += 1
        mismatch = bench.run(pde, pte, access)
        if mismatch is not None:
            mismatches += 1
            if len(kept) < MISMATCHES_KEPT:
                kept.append(str(mismatch))
    seconds = time.perf_counter() - start
    if kept:
        out.mkdir(parents=True, exist_ok=True)
        (out / "mismatches.txt").write_text("\n".join(kept) + "\n")
    return {
        "cases": cases,
        "mismatches": mismatches,
        "first_mismatch": kept[0] if kept else "",
        "seconds": round(seconds, 3),
        "cases_per_second": round(cases / seconds) if seconds else 0,
    }


def summarize(df: pd.DataFrame) -> str:
    """Cases and mismatches in total, by upper-entry edit and by control bits; the first
    mismatches in full."""
    ok = df[df["outcome"] == "ok"]
    if ok.empty:
        return "No job ended ok.\n"
    counts = ["cases", "mismatches"]
    text = (f"## Access-rights matrix\n\n{int(ok['cases'].sum())} cases in {len(ok)} jobs, "
            f"**{int(ok['mismatches'].sum())} mismatches** (goal 0).\n\n")
    text += "### By upper entries\n\n" + tables.markdown(ok.groupby("upper", sort=False)[counts].sum())
    text += "\n### By control bits\n\n" + tables.markdown(ok.groupby(list(CPU_AXES))[counts].sum())
    first = ok[ok["mismatches"] > 0]["first_mismatch"].head(FIRST_SHOWN)
    if len(first):
        text += "\n### First mismatches (each job's first; the rest in its mismatches.txt)\n\n"
        text += "".join("    " + str(t).replace("\n", "\n    ") + "\n\n" for t in first)
    return text


def plot(df: pd.DataFrame, out: Path) -> list[Path]:
    """access_cases.png: cases per upper-entry edit, the mismatches of each above its bar."""
    from mmud.campaign import plots

    by_upper = df[df["outcome"] == "ok"].groupby("upper", sort=False)[["cases", "mismatches"]].sum()
    if by_upper.empty:
        return []
    fig, ax = plots.figure(max(7.0, 0.6 * len(by_upper) + 2))
    bars = ax.bar([str(u) for u in by_upper.index], by_upper["cases"], color="tab:blue")
    for bar, n in zip(bars, by_upper["mismatches"], strict=True):
        ax.annotate(f"{int(n)} mismatches", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=7, color="red" if n else "black")
    ax.set_yscale("log")
    ax.set_ylabel("cases run (log)")
    ax.set_xlabel("upper entries (PML4E, PDPTE)")
    ax.set_title("x86 access-rights matrix: cases and mismatches")
    ax.tick_params(axis="x", labelrotation=45, labelsize=7)
    return [plots.save(fig, out / "access_cases.png")]

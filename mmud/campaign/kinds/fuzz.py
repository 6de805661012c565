"""The `fuzz` campaign kind: random guest operations against the SDM reference walk.

One job generates `ops` operations from its seed (mmud/campaign/fuzz_gen.py) and runs them
on a fresh VM of `vcpus` vCPUs with the audit at every point and `bug` armed ("none": none),
until the first finding (mmud/campaign/fuzz_run.py). A finding is shrunk (fuzz_shrink.py)
and saved as `finding.json` in the job's directory with the command that replays it:

    python -m mmud.campaign.kinds.fuzz replay DIR/finding.json

docs/fuzzing.md describes the operations, the checks and how to read the results.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from mmud.campaign.fuzz_gen import Generator
from mmud.campaign.fuzz_run import Config, Finding, run_ops
from mmud.campaign.fuzz_shrink import DEFAULT_RUNS, shrink
from mmud.campaign.grid import product
from mmud.uapi.bugs import BUG_BY_NAME

if TYPE_CHECKING:
    import pandas as pd

DEFAULTS: dict[str, object] = {"seed": 0, "vcpus": 1, "ops": 2000, "bug": "none", "shrink": DEFAULT_RUNS}
QUICK_SHRINK = 100  # shrinker runs per finding in a --quick campaign
MAX_VCPUS = 4
FINDING_FILE = "finding.json"
TIMINGS = ("seconds", "shrink_seconds")


def jobs(axes: dict[str, list], quick: bool) -> list[dict[str, object]]:
    """One job per combination of the axes (seed, vcpus, ops, bug, shrink); missing axes
    take DEFAULTS. A quick campaign also shrinks with fewer runs."""
    unknown = set(axes) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"fuzz: unknown axes {', '.join(sorted(unknown))} (known: {', '.join(DEFAULTS)})")
    out = []
    for job in product(axes):
        full = {**DEFAULTS, **job}
        if quick and "shrink" not in axes:
            full["shrink"] = QUICK_SHRINK
        _config(full)  # refuse a bad value before anything runs
        out.append(full)
    return out


def _config(job: dict[str, object]) -> Config:
    bug, vcpus = str(job["bug"]), int(str(job["vcpus"]))
    if bug != "none" and bug not in BUG_BY_NAME:
        raise ValueError(f"fuzz: unknown bug {bug!r} (known: none, {', '.join(BUG_BY_NAME)})")
    if not 1 <= vcpus <= MAX_VCPUS:
        raise ValueError(f"fuzz: vcpus must be 1 to {MAX_VCPUS}, not {vcpus}")
    return Config(vcpus=vcpus, seed=int(str(job["seed"])), bug=bug)


def run(job: dict[str, object], out: Path) -> dict[str, object]:
    """Run one job; shrink and save its finding (if any) under `out`. Without a finding,
    `first_finding_op` is -1 and `shrunk_ops` 0 (metrics are JSON scalars, never null)."""
    config = _config(job)
    ops = Generator(config.seed, config.vcpus).ops(int(str(job["ops"])))
    outcome = run_ops(config, ops)
    finding = outcome.finding
    metrics: dict[str, object] = {
        "ops_run": outcome.ops_run,
        "accesses": outcome.accesses,
        "audit_runs": outcome.audit_runs,
        "audit_errors": outcome.audit_errors,
        "findings": int(finding is not None),
        "first_finding_op": -1 if finding is None else finding.op,
        "finding_kind": "" if finding is None else finding.kind,
        "finding": "" if finding is None else finding.message,
        "mismatches": int(finding is not None and finding.kind == "mismatch"),
        "exceptions": int(finding is not None and finding.kind == "exception"),
        "shrunk_ops": 0,
        "finding_file": "",
        "seconds": round(outcome.seconds, 3),
        "shrink_seconds": 0.0,
    }
    if finding is not None:
        start = time.perf_counter()
        small = shrink(config, ops, finding, int(str(job.get("shrink", DEFAULT_RUNS))))
        out.mkdir(parents=True, exist_ok=True)
        path = save(out / FINDING_FILE, config, small.ops, small.finding, original_ops=finding.op + 1)
        metrics.update(shrunk_ops=len(small.ops), finding_file=str(path),
                       shrink_seconds=round(time.perf_counter() - start, 3))
    return metrics


def replay_command(path: Path) -> str:
    return f"python -m mmud.campaign.kinds.fuzz replay {path}"


def save(path: Path, config: Config, ops: list, finding: Finding, original_ops: int) -> Path:
    """Write a finding with the sequence that shows it and the command that replays it."""
    record = {
        "config": {"vcpus": config.vcpus, "seed": config.seed, "bug": config.bug, "mem_mb": config.mem_mb},
        "finding": finding.as_dict(),
        "original_ops": original_ops,
        "replay": replay_command(path),
    }
    head = json.dumps(record, indent=1).removesuffix("\n}")
    lines = ",\n".join("  " + json.dumps(op) for op in ops)  # one operation a line
    path.write_text(f'{head},\n "ops": [\n{lines}\n ]\n}}\n')
    return path


def replay(path: Path) -> tuple[Finding | None, Finding]:
    """Run a saved sequence again: (what it finds now, what was saved)."""
    record = json.loads(path.read_text())
    config = Config(**record["config"])
    return run_ops(config, record["ops"]).finding, Finding(**record["finding"])


# --- reports -----------------------------------------------------------------------------------


def summarize(df: pd.DataFrame) -> str:
    """Per armed bug: jobs, how many found it, when (operations), the shrunk length; then
    every finding with no bug armed (each one is a bug of mmud, or of the fuzzer). Axes
    the spec left out take DEFAULTS; jobs that did not finish count as jobs only."""
    df = df.assign(**{k: v for k, v in DEFAULTS.items() if k not in df.columns})
    if "findings" not in df.columns:
        return "No fuzz job finished.\n"
    lines = [
        "| bug | jobs | found | first finding op (median) | (max) | shrunk ops (median) | ops run |",
        "|---|---|---|---|---|---|---|",
    ]
    for bug, rows in df.groupby("bug", sort=True):
        found = rows[rows["findings"] > 0]
        first = found["first_finding_op"]
        shrunk = found["shrunk_ops"]
        lines.append(
            f"| {bug} | {len(rows)} | {len(found)} | {_num(first.median())} | {_num(first.max())} "
            f"| {_num(shrunk.median())} | {int(rows['ops_run'].sum())} |"
        )
    clean = df[(df["bug"] == "none") & (df["findings"] > 0)]
    if len(clean):
        lines += ["", "Findings with no bug armed:", ""]
        lines += [f"- seed {r.seed}, {r.vcpus} vCPUs: {r.finding_kind}: {r.finding} "
                  f"(`{replay_command(Path(r.finding_file))}`)" for r in clean.itertuples()]
    return "\n".join(lines) + "\n"


def _num(value: object) -> str:
    return "–" if value is None or value != value else f"{float(str(value)):.0f}"


def plot(df: pd.DataFrame, out: Path) -> list[Path]:
    """fuzz_first_finding.png: per armed bug, the operation at which each job found it
    (log scale); jobs that found nothing are counted in the label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if "bug" not in df.columns or "findings" not in df.columns:
        return []
    armed = df[df["bug"] != "none"]
    if not len(armed):
        return []
    bugs = sorted(armed["bug"].unique())
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(bugs) + 1.5))
    for k, bug in enumerate(bugs):
        rows = armed[armed["bug"] == bug]
        found = rows[rows["findings"] > 0]["first_finding_op"].astype(float) + 1
        ax.boxplot([found.tolist() or [float("nan")]], positions=[k], orientation="horizontal", widths=0.6)
        ax.plot(found, [k] * len(found), "o", alpha=0.4, color="tab:blue")
    missed = {bug: int((armed[armed["bug"] == bug]["findings"] == 0).sum()) for bug in bugs}
    ax.set_yticks(range(len(bugs)), [f"{b} ({missed[b]} missed)" if missed[b] else b for b in bugs])
    ax.set_xscale("log")
    ax.set_xlabel("operations until the finding")
    ax.set_title("fuzz: how soon each armed bug is found")
    fig.tight_layout()
    path = out / "fuzz_first_finding.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]


# --- the replay command ------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """`replay FILE`: run a saved sequence and print its finding; exit 0 when the saved
    finding shows again, 1 when it does not."""
    parser = argparse.ArgumentParser(prog="python -m mmud.campaign.kinds.fuzz")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("replay", help="re-run a saved finding").add_argument("file", type=Path)
    args = parser.parse_args(argv)
    now, saved = replay(args.file)
    print(f"saved:  {saved.kind} after operation {saved.op}: {saved.message}")
    if now is None:
        print("replay: no finding")
        return 1
    print(f"replay: {now.kind} after operation {now.op}: {now.message}")
    return 0 if now.signature == saved.signature else 1


if __name__ == "__main__":
    sys.exit(main())

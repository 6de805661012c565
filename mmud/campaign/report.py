"""DIR/summary.md and DIR/*.png: the kind's tables and plots over the results, and the jobs
that did not end ok, each with the command that reruns it."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from mmud.campaign import tables
from mmud.campaign.job import OK, OUTCOMES
from mmud.campaign.spec import Spec

SUMMARY = "summary.md"
FAILED_SHOWN = 50


def outcome_line(df: pd.DataFrame) -> str:
    counts = df["outcome"].value_counts()
    return f"{len(df)} jobs: " + ", ".join(f"{o} {int(counts.get(o, 0))}" for o in OUTCOMES)


def failures(df: pd.DataFrame) -> str:
    failed = df[df["outcome"] != OK]
    if failed.empty:
        return ""
    text = f"\n## Jobs that did not end ok ({len(failed)})\n\n"
    text += tables.markdown(failed[["job", "outcome", "message", "rerun"]].head(FAILED_SHOWN),
                            index=False)
    if len(failed) > FAILED_SHOWN:
        text += f"\n… and {len(failed) - FAILED_SHOWN} more in results.parquet.\n"
    return text


def write(out: Path, spec: Spec, df: pd.DataFrame, note: str) -> tuple[Path, list[Path]]:
    """Write summary.md and the kind's plots; `note` says how the run went (or stopped)."""
    module = spec.module()
    pngs = module.plot(df, out) if not df.empty else []
    parts = [f"# Campaign `{spec.kind}` ({spec.path.name})\n"]
    if spec.description:
        parts.append(spec.description.strip() + "\n")
    parts.append(f"{note}\n\n{outcome_line(df)}.\n")
    if not df.empty:
        parts.append(module.summarize(df))
    parts.extend(f"\n![{p.stem}]({p.name})\n" for p in pngs)
    parts.append(failures(df))
    path = out / SUMMARY
    path.write_text("\n".join(parts))
    return path, pngs

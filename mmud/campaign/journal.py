"""The campaign's journal: every finished job, one JSON line each, in DIR/journal.jsonl.

The journal is the campaign's record; results.parquet is rebuilt from it. A line is written
whole and flushed as soon as its job finishes, so a campaign stopped at any moment (Ctrl-C,
a crash, a power cut) keeps every job it finished, and `--resume` skips them. Only a line
torn by the stop itself can be lost: reading ignores it, and the next append cuts it off
first so that it cannot glue itself to the next line.

An entry: job (the id), kind, params (the job's axes values), metrics, outcome, message,
duration_s, worker, job_seconds (the limit it ran under, which rerun applies again).
"""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path
from typing import IO, TYPE_CHECKING, TypedDict

if TYPE_CHECKING:
    import pandas as pd

JOURNAL = "journal.jsonl"
RESULTS = "results.parquet"
COLUMNS = ("job", "outcome", "message", "duration_s", "worker", "rerun")


class Entry(TypedDict):
    job: str
    kind: str
    params: dict[str, object]
    metrics: dict[str, object]
    outcome: str
    message: str
    duration_s: float
    worker: str
    job_seconds: float


def read(out: Path) -> dict[str, Entry]:
    """The journal's entries by job id (a job journaled twice: its last entry)."""
    path = out / JOURNAL
    entries: dict[str, Entry] = {}
    if not path.exists():
        return entries
    with path.open() as f:
        for line in f:
            if not line.endswith("\n"):
                break  # torn by a stop in mid-write
            entry: Entry = json.loads(line)
            entries[entry["job"]] = entry
    return entries


class Journal:
    """The journal open for appending."""

    def __init__(self, out: Path) -> None:
        path = out / JOURNAL
        if path.exists():
            data = path.read_bytes()
            if data and not data.endswith(b"\n"):
                with path.open("r+b") as f:
                    f.truncate(data.rfind(b"\n") + 1)
        self._file: IO[str] = path.open("a")

    def append(self, entry: Entry) -> None:
        self._file.write(json.dumps(entry) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def rerun_command(out: Path, jid: str) -> str:
    return f"mmud campaign rerun {shlex.quote(str(out.resolve()))} {jid}"


def frame(out: Path, entries: dict[str, Entry]) -> pd.DataFrame:
    """One row per job: job id, its axes, its metrics, then outcome, message, duration_s,
    worker and the command that reruns it. Kinds name their metrics apart from their axes."""
    import pandas as pd

    rows = []
    for jid, e in entries.items():
        rows.append({"job": jid, **e["params"], **e["metrics"], "outcome": e["outcome"],
                     "message": e["message"], "duration_s": e["duration_s"], "worker": e["worker"],
                     "rerun": rerun_command(out, jid)})
    df = pd.DataFrame(rows)
    if df.empty:
        return pd.DataFrame(columns=list(COLUMNS))
    middle = [c for c in df.columns if c not in COLUMNS]
    return df[["job", *middle, *COLUMNS[1:]]]


def write_results(out: Path, df: pd.DataFrame) -> Path:
    """DIR/results.parquet, replaced whole (written beside it, then renamed)."""
    path = out / RESULTS
    tmp = path.with_suffix(".parquet.tmp")
    df.to_parquet(tmp, engine="pyarrow", index=False)
    os.replace(tmp, path)
    return path

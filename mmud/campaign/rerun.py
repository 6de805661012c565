"""`mmud campaign rerun DIR JOB`: run one journaled job again, alone, and compare.

The job runs here, in this process, through the same `job.execute` as in a worker's job
process, under the same time limit (an interval timer instead of a kill). Its row is
printed; the exit status says whether it reproduced the journal: 0 if the outcome and every
deterministic metric are equal, 1 with the differences otherwise. Timings (the kind's
TIMINGS, and duration_s) differ from run to run and are shown, not compared.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from types import FrameType

from mmud.campaign import journal, kinds
from mmud.campaign.job import TIMEOUT, Result, execute, job_dir
from mmud.campaign.spec import SpecError
from mmud.log import setup_logging

LOCAL = "local (rerun)"


class JobTimeout(BaseException):
    """The job outlived its limit. A BaseException, so that execute() does not take it for
    the job's own error."""


def _alarm(signum: int, frame: FrameType | None) -> None:
    raise JobTimeout


def run_alone(kind: str, params: dict[str, object], out: Path, seconds: float) -> Result:
    """execute() under a time limit, in this (main) thread."""
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return execute(kind, params, out)
    except JobTimeout:
        return Result(metrics={}, outcome=TIMEOUT, message=f"stopped at the time limit of "
                      f"{seconds:g} s", duration_s=seconds)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def differences(recorded: journal.Entry, result: Result, timings: frozenset[str]) -> list[str]:
    """What the rerun gave that the journal does not say, timings aside."""
    diffs = []
    if recorded["outcome"] != result["outcome"]:
        diffs.append(f"outcome: recorded {recorded['outcome']}, now {result['outcome']} "
                     f"({result['message']})")
    old, new = recorded["metrics"], result["metrics"]
    for name in sorted((set(old) | set(new)) - timings):
        if old.get(name) != new.get(name):
            diffs.append(f"{name}: recorded {old.get(name, '(none)')}, now {new.get(name, '(none)')}")
    return diffs


def find(out: Path, job: str) -> journal.Entry:
    """The journal entry of `job` (an id or an unambiguous prefix of one)."""
    entries = journal.read(out)
    if not entries:
        raise SpecError(f"{out}: no campaign journal there ({journal.JOURNAL})")
    found = [jid for jid in entries if jid.startswith(job)]
    if len(found) != 1:
        raise SpecError(f"{out}: {'no' if not found else 'more than one'} job {job!r} in the journal")
    return entries[found[0]]


def rerun(out: Path, job: str) -> int:
    recorded = find(out, job)
    jid, kind = recorded["job"], recorded["kind"]
    setup_logging("critical")  # as in the job process: audit reports are metrics, not log lines
    result = run_alone(kind, recorded["params"], job_dir(out, jid), recorded["job_seconds"])
    entry = journal.Entry(job=jid, kind=kind, params=recorded["params"], metrics=result["metrics"],
                          outcome=result["outcome"], message=result["message"],
                          duration_s=result["duration_s"], worker=LOCAL,
                          job_seconds=recorded["job_seconds"])
    row = journal.frame(out, {jid: entry}).iloc[0]
    width = max(len(str(c)) for c in row.index)
    for name, value in row.items():
        print(f"{str(name):<{width}}  {value}")
    timings = kinds.timings(kinds.load(kind))
    diffs = differences(recorded, result, timings)
    if diffs:
        print("\nthe rerun differs from the journal:\n  " + "\n  ".join(diffs))
        return 1
    shown = ", ".join(sorted(timings | {"duration_s"}))
    print(f"\nthe rerun reproduces the journal's row (timings not compared: {shown})", file=sys.stderr)
    return 0

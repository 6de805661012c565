"""One job: its id, and running it — the one code path of a worker's job process and of rerun.

A job is a kind and a flat dict of parameters. Its id is a short hash of both, so that the
same job has the same id in every run of every spec (what `--resume` and `rerun` key on).
`execute` turns whatever the kind's `run` does into an outcome:

    ok           run returned its metrics
    guest_crash  the guest crashed (mmud.sched.TaskFailed: a guest task raised)
    error        any other exception, with its message
    timeout      the job was still running at the spec's job_seconds (set by the caller
                 that enforces the limit: the worker's job process, or rerun's alarm)
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import TypedDict

from mmud.campaign import kinds
from mmud.sched import TaskFailed

OK, GUEST_CRASH, TIMEOUT, ERROR = "ok", "guest_crash", "timeout", "error"
OUTCOMES = (OK, GUEST_CRASH, TIMEOUT, ERROR)
ID_CHARS = 12


class Result(TypedDict):
    """What running a job gives, before the engine adds who ran it."""

    metrics: dict[str, object]
    outcome: str
    message: str
    duration_s: float


def job_id(kind: str, params: dict[str, object]) -> str:
    """A stable short id of (kind, parameters): the same on every machine and every run."""
    canonical = json.dumps([kind, params], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:ID_CHARS]


def job_dir(out: Path, jid: str) -> Path:
    return out / "jobs" / jid


def _message(e: BaseException) -> str:
    text = str(e)
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def execute(kind: str, params: dict[str, object], out: Path) -> Result:
    """Run one job here, in this process, and say how it ended.

    `out` is the job's artifact directory: created before the job, removed after it if the
    job left nothing there (most jobs do not write artifacts).
    """
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    metrics: dict[str, object] = {}
    outcome, message = OK, ""
    try:
        module = kinds.load(kind)
        t0 = time.perf_counter()  # the job's time, not the kind's first import
        metrics = module.run(dict(params), out)
        bad = {k: v for k, v in metrics.items() if not isinstance(v, str | int | float | bool)}
        if bad:
            raise TypeError(f"kind {kind!r} returned metrics that are not JSON scalars: {bad}")
    except TaskFailed as e:
        metrics, outcome, message = {}, GUEST_CRASH, str(e)
    except Exception as e:  # noqa: BLE001 - any failure of one job is that job's outcome
        metrics, outcome, message = {}, ERROR, _message(e)
    duration = time.perf_counter() - t0
    if not any(out.iterdir()):
        shutil.rmtree(out, ignore_errors=True)
    return Result(metrics=metrics, outcome=outcome, message=message, duration_s=duration)

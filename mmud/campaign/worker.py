"""What runs on a Dask worker: the task that hands one job to a job process.

Each worker process keeps its idle job processes (mmud.campaign.jobproc) in a pool: a task
takes one (or starts one), runs its job there under the time limit and gives it back if it
is still alive. A worker with one thread keeps one job process; a worker started with more
threads keeps one per thread that runs a job at the same time. The pool is killed when the
worker's interpreter exits; if the worker is killed instead, each job process sees that it
was orphaned and exits by itself.
"""

from __future__ import annotations

import atexit
import threading
from pathlib import Path

from mmud.campaign.job import Result
from mmud.campaign.jobproc import JobProcess

_idle: list[JobProcess] = []
_lock = threading.Lock()


def _take() -> JobProcess:
    with _lock:
        while _idle:
            proc = _idle.pop()
            if proc.alive:
                return proc
    return JobProcess()


def _give_back(proc: JobProcess) -> None:
    if proc.alive:
        with _lock:
            _idle.append(proc)


@atexit.register
def _kill_idle() -> None:
    with _lock:
        for proc in _idle:
            proc.kill()
        _idle.clear()


def worker_name() -> str:
    """The address of the Dask worker running this task."""
    from distributed import get_worker

    return str(get_worker().address)


def run_job(kind: str, params: dict[str, object], out: str, job_seconds: float) -> dict[str, object]:
    """The Dask task of one job: its Result plus the worker that ran it."""
    proc = _take()
    result: Result = proc.run(kind, params, Path(out), job_seconds)
    _give_back(proc)
    return {**result, "worker": worker_name()}

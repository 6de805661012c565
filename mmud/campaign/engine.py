"""Running a campaign: submit its jobs to the cluster, journal each as it finishes, report.

Jobs are submitted a window at a time (a few per worker thread), not all at once: the
scheduler holds only what can start soon, a stop has little to cancel, and workers that join
a running cluster widen the window. Each finished job is journaled at once (journal.py); a
job whose worker was lost more often than the scheduler allows (KilledWorker) is journaled
as an error. At the end — or at a stop — results.parquet, summary.md and the plots are
rebuilt from the whole journal, so a resumed campaign reports every job it ever finished.

SIGINT (Ctrl-C) stops the campaign: nothing more is submitted, the jobs in flight are
cancelled, the cluster is closed, the results so far are written and the exit status is 130.
A second SIGINT interrupts at once.
"""

from __future__ import annotations

import contextlib
import queue
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from mmud.campaign import journal, report
from mmud.campaign.job import ERROR, OK, job_dir, job_id
from mmud.campaign.spec import Spec, SpecError
from mmud.campaign.worker import run_job

if TYPE_CHECKING:
    from distributed import Client, Future

EXIT_INTERRUPTED = 130
JOBS_PER_THREAD = 3
WINDOW_REFRESH_S = 1.0
POLL_S = 0.2
SPEC_COPY = "spec.toml"


@dataclass
class Planned:
    jid: str
    params: dict[str, object]


def plan(spec: Spec, out: Path, quick: bool, resume: bool) -> tuple[list[Planned], int]:
    """The jobs still to run in `out`, and how many the journal already holds.

    A directory with a journal is a campaign already started: it is refused unless resuming,
    and resumed only with a spec of the same kind.
    """
    planned = [Planned(job_id(spec.kind, p), p) for p in spec.jobs(quick)]
    done = journal.read(out)
    if done and not resume:
        raise SpecError(f"{out} already holds a campaign's journal: --resume to go on with it, "
                        "or choose another --out")
    kinds = {e["kind"] for e in done.values()}
    if kinds - {spec.kind}:
        raise SpecError(f"{out} holds a campaign of kind {', '.join(sorted(kinds))}, "
                        f"not {spec.kind!r}")
    todo = [p for p in planned if p.jid not in done]
    return todo, len(planned) - len(todo)


class Stop:
    """The first SIGINT asks the campaign to stop; the second interrupts at once."""

    def __init__(self) -> None:
        self.requested = False

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    @contextlib.contextmanager
    def installed(self) -> Iterator[Stop]:
        previous = signal.signal(signal.SIGINT, self)
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, previous)


def _progress(total: int, quiet: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, file=sys.stderr, unit="job", disable=quiet, smoothing=0.1,
                dynamic_ncols=True)


def _entry(spec: Spec, job: Planned, fut: Future) -> journal.Entry:
    """The journal entry of a finished future: the job's result, or how Dask lost it."""
    if fut.status == "finished":
        result = fut.result()
        metrics, outcome, message = result["metrics"], result["outcome"], result["message"]
        duration, worker = result["duration_s"], result["worker"]
    else:  # KilledWorker: its workers died twice; cancelled: the scheduler dropped it
        exc = fut.exception() if fut.status == "error" else None
        message = f"{type(exc).__name__}: {exc}" if exc else f"Dask {fut.status} the job"
        metrics, outcome, duration, worker = {}, ERROR, 0.0, ""
    return journal.Entry(job=job.jid, kind=spec.kind, params=job.params, metrics=metrics,
                         outcome=outcome, message=message, duration_s=duration, worker=worker,
                         job_seconds=spec.job_seconds)


def submit_all(spec: Spec, client: Client, out: Path, todo: list[Planned], stop: Stop,
               quiet: bool = False) -> int:
    """Run `todo` on the cluster, journaling each job as it ends, until all are journaled or
    a stop is requested; the number journaled."""
    finished: queue.SimpleQueue[Future] = queue.SimpleQueue()
    running: dict[str, Planned] = {}
    futures: dict[str, Future] = {}
    pending = iter(todo)
    root = out.resolve()  # the workers' working directories are not ours
    window, window_at = 0, 0.0
    log = journal.Journal(out)
    bar = _progress(len(todo), quiet)
    ok = failed = 0
    try:
        while not stop.requested:
            if time.monotonic() - window_at > WINDOW_REFRESH_S:
                window = JOBS_PER_THREAD * max(1, sum(client.nthreads().values()))
                window_at = time.monotonic()
            while len(running) < window and (job := next(pending, None)) is not None:
                fut = client.submit(run_job, spec.kind, job.params, str(job_dir(root, job.jid)),
                                    spec.job_seconds, key=f"{spec.kind}-{job.jid}")
                running[str(fut.key)], futures[str(fut.key)] = job, fut
                fut.add_done_callback(finished.put)
            if not running:
                break
            try:
                fut = finished.get(timeout=POLL_S)
            except queue.Empty:
                continue
            entry = _entry(spec, running.pop(str(fut.key)), fut)
            del futures[str(fut.key)]
            log.append(entry)
            if entry["outcome"] == OK:
                ok += 1
            else:
                failed += 1
            bar.set_postfix_str(f"ok {ok}, failed {failed}", refresh=False)
            bar.update()
        if futures:
            client.cancel(list(futures.values()))
        return ok + failed
    finally:
        bar.close()
        log.close()


def finish(spec: Spec, out: Path, note: str) -> Path:
    """Rebuild results.parquet, summary.md and the plots from the whole journal."""
    df = journal.frame(out, journal.read(out))
    journal.write_results(out, df)
    summary, _ = report.write(out, spec, df, note)
    return summary


def run(spec: Spec, connect: Callable[[], contextlib.AbstractContextManager[Client]], out: Path,
        *, quick: bool, resume: bool, quiet: bool = False) -> int:
    """The campaign of `spec` into `out` on the cluster `connect()` gives (and closes): 0 when
    every job ran (whatever its outcome), 130 when stopped by SIGINT."""
    out.mkdir(parents=True, exist_ok=True)
    todo, skipped = plan(spec, out, quick, resume)
    (out / SPEC_COPY).write_text(spec.path.read_text())
    t0 = time.monotonic()
    with Stop().installed() as stop:
        with connect() as client:
            workers = len(client.scheduler_info()["workers"])
            if not quiet:
                print(f"mmud campaign: {spec.kind}: {len(todo)} jobs to run"
                      + (f" ({skipped} already in the journal)" if skipped else "")
                      + f" on {workers} workers, results in {out}", file=sys.stderr)
            ran = submit_all(spec, client, out, todo, stop, quiet)
        stopped = stop.requested
    how = "was stopped (SIGINT) after" if stopped else "ran"
    note = (f"The {'quick' if quick else 'full'} grid {how} {ran} jobs in "
            f"{time.monotonic() - t0:.0f} s on {workers} workers"
            + (f"; {skipped} more came from the journal" if skipped else "") + ".")
    summary = finish(spec, out, note)
    if not quiet:
        print(f"mmud campaign: {note} See {summary}", file=sys.stderr)
    return EXIT_INTERRUPTED if stopped else 0

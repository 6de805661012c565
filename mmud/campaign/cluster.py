"""Where jobs run: a LocalCluster of worker processes, or an existing Dask scheduler.

A worker runs jobs with the mmud it has installed, and the client and workers exchange
pickled Python objects through Dask; so before anything is submitted to an existing cluster,
every worker's mmud, Python, dask and distributed versions (and the scheduler's Python, dask
and distributed) must equal the client's — a mismatch is refused, naming the worker and what
differs. Workers that join after the check are not checked.

A worker that dies while it runs a job loses the job; the scheduler gives it to another
worker, and marks it failed (KilledWorker) once it has lost it more than `allowed-failures`
times. Campaigns want one retry: the local cluster is started with
distributed.scheduler.allowed-failures = 1, and for an existing scheduler the setting is the
scheduler's own (DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES=1 in its environment,
docs/campaigns.md); a different value is reported.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import platform
import signal
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from distributed import Client

ALLOWED_FAILURES = 1
PACKAGES = ("mmud", "dask", "distributed")
WAIT_FOR_WORKERS_S = 60


class ClusterError(RuntimeError):
    """The cluster cannot run this campaign (versions differ, no worker came)."""


def versions() -> dict[str, str]:
    """This process's mmud, Python, dask and distributed versions (run on each worker too)."""
    found = {name: importlib.metadata.version(name) for name in PACKAGES}
    return {**found, "python": platform.python_version()}


def _scheduler_versions(client: Client) -> dict[str, str]:
    packages = cast(dict, client.get_versions())["scheduler"]["packages"]
    python = str(packages["python"]).split(".final")[0]
    return {"python": python, "dask": str(packages["dask"]), "distributed": str(packages["distributed"])}


def mismatches(client: Client) -> list[str]:
    """One line per scheduler or worker whose versions differ from the client's."""
    mine = versions()
    problems = []
    theirs = {"scheduler": _scheduler_versions(client)}
    for address, found in sorted(client.run(versions, on_error="return").items()):
        if isinstance(found, BaseException):
            problems.append(f"worker {address}: cannot run mmud's version check "
                            f"({type(found).__name__}: {found}); is mmud[campaign] installed?")
        else:
            theirs[f"worker {address}"] = found
    for who, found in theirs.items():
        diff = [f"{name} {found[name]} (client: {mine[name]})"
                for name in sorted(found) if found[name] != mine[name]]
        if diff:
            problems.append(f"{who}: {', '.join(diff)}")
    return problems


def allowed_failures(client: Client) -> int:
    return int(client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.allowed_failures))


def _ignore_sigint() -> Any:
    """A worker plugin that makes its worker process ignore SIGINT (made here, so that the
    module imports distributed only when a cluster is started)."""
    from distributed.diagnostics.plugin import WorkerPlugin

    class IgnoreSigint(WorkerPlugin):
        def setup(self, worker: Any) -> None:
            signal.signal(signal.SIGINT, signal.SIG_IGN)

    return IgnoreSigint()


@contextlib.contextmanager
def local(workers: int) -> Iterator[Client]:
    """A LocalCluster of `workers` single-threaded worker processes, and its client.

    A Ctrl-C in the terminal reaches the whole process group, the local workers too. The
    campaign's own process stops the campaign on it (engine.Stop) and then closes the
    cluster, so the workers ignore SIGINT — one that died of it first could leave the
    cluster's close waiting for it. Workers a nanny restarts get the plugin too."""
    import dask
    from distributed import Client, LocalCluster

    with dask.config.set({"distributed.scheduler.allowed-failures": ALLOWED_FAILURES}):
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                               dashboard_address=":0", silence_logs=logging.ERROR)
    client = Client(cluster)
    client.register_plugin(_ignore_sigint())
    try:
        yield client
    finally:
        client.close()
        cluster.close()


@contextlib.contextmanager
def remote(address: str) -> Iterator[Client]:
    """A client of the scheduler at `address`, once at least one worker is there and every
    worker's versions match."""
    from distributed import Client

    try:
        client = Client(address, timeout=WAIT_FOR_WORKERS_S)
    except OSError as e:
        raise ClusterError(f"cannot reach the scheduler at {address}: {e}") from None
    try:
        try:
            client.wait_for_workers(1, timeout=WAIT_FOR_WORKERS_S)
        except TimeoutError:
            raise ClusterError(f"no worker joined the scheduler at {address} "
                               f"within {WAIT_FOR_WORKERS_S} s") from None
        problems = mismatches(client)
        if problems:
            raise ClusterError("refusing to run on a cluster whose versions differ from this "
                               "client's:\n  " + "\n  ".join(problems))
        retries = allowed_failures(client)
        if retries != ALLOWED_FAILURES:
            print(f"mmud campaign: warning: the scheduler gives a lost worker's job {retries} more "
                  f"tries (allowed-failures), campaigns expect {ALLOWED_FAILURES}: start it with "
                  f"DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES={ALLOWED_FAILURES}", file=sys.stderr)
        yield client
    finally:
        client.close()

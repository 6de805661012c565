"""The job process: a long-lived child of a worker that runs jobs one after another.

Dask cannot stop a task that is running, so a job runs outside the worker, in a process the
worker can kill at the job's time limit. Starting a fresh interpreter per job would cost
hundreds of milliseconds (Python, numpy, mmud) for jobs that may take a few; so the worker
keeps the process and hands it the next job, and only a process that was killed (timeout) or
died is replaced. Jobs do not share state through it: every job builds its own VM and module
(nothing module-wide lives in a global, docs/architecture.md), and `rerun` checks that a job
run alone gives the metrics it gave here.

The protocol is lines: the child says `ready` once it has started, then for each job the
request {kind, params, out} comes as a JSON line on its stdin and the job.Result goes back as
one on a private copy of its stdout. The child's own fd 1 is pointed at stderr, so
a job that prints cannot corrupt a reply. The child ignores SIGINT (a Ctrl-C in the
terminal reaches the whole process group; the campaign decides what stops) and exits when its
worker is gone — stdin closed, or its parent replaced by init after a SIGKILL of the worker.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, cast

from mmud.campaign.job import ERROR, TIMEOUT, Result, execute

ORPHAN_POLL_S = 0.2
START_SECONDS = 120
READY = b"ready\n"


class JobProcess:
    """The worker's handle on one job process."""

    def __init__(self) -> None:
        """Start the process and wait until it is ready, so that a job's time limit does not
        include an interpreter's start (seconds on a loaded machine)."""
        self.proc = subprocess.Popen([sys.executable, "-m", "mmud.campaign.jobproc"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
        ready = self._reply(time.monotonic() + START_SECONDS)
        if ready != READY:
            self.kill()
            raise RuntimeError(f"the job process did not start (it said {ready!r})")

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def _died(self, t0: float) -> Result:
        status = self.proc.wait()
        how = f"killed by {signal.Signals(-status).name}" if status < 0 else f"exit status {status}"
        return Result(metrics={}, outcome=ERROR, message=f"the job process died ({how})",
                      duration_s=time.monotonic() - t0)

    def run(self, kind: str, params: dict[str, object], out: Path, seconds: float) -> Result:
        """Run one job in the process; kill the process if the job outlives `seconds`."""
        t0 = time.monotonic()
        request = json.dumps({"kind": kind, "params": params, "out": str(out)}) + "\n"
        stdin = cast(IO[bytes], self.proc.stdin)
        try:
            stdin.write(request.encode())
            stdin.flush()
        except BrokenPipeError:
            return self._died(t0)
        reply = self._reply(t0 + seconds)
        if reply is None:
            self.kill()
            return Result(metrics={}, outcome=TIMEOUT,
                          message=f"killed at the time limit of {seconds:g} s",
                          duration_s=time.monotonic() - t0)
        if not reply:
            return self._died(t0)
        return cast(Result, json.loads(reply))

    def _reply(self, deadline: float) -> bytes | None:
        """The process's next line; None at the deadline, b"" if the process died first."""
        stdout = cast(IO[bytes], self.proc.stdout)
        reply = b""
        while not reply.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            if select.select([stdout], [], [], left)[0]:
                chunk = os.read(stdout.fileno(), 1 << 16)
                if not chunk:
                    return b""
                reply += chunk
        return reply


def _exit_when_orphaned(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(ORPHAN_POLL_S)
    os._exit(1)


def main() -> None:
    """The child's loop: read a request, run the job, reply; until stdin closes."""
    from mmud.log import setup_logging

    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_when_orphaned, args=(os.getppid(),), daemon=True).start()
    setup_logging("critical")  # an armed bug's audit reports are the job's metrics, not log lines
    try:
        replies.write(READY.decode())
        replies.flush()
        for line in sys.stdin:
            request = json.loads(line)
            result = execute(request["kind"], request["params"], Path(request["out"]))
            replies.write(json.dumps(result) + "\n")
            replies.flush()
    except BrokenPipeError:  # the worker went away while the job ran: nobody to tell
        os._exit(1)


if __name__ == "__main__":
    main()

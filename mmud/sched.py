"""A tiny deterministic scheduler of cooperative tasks (the vCPUs' guest programs).

Each task is a generator; one `step()` advances one task to its next `yield` — a preemption
point. The task is chosen by a seeded RNG, so the same seed gives the same interleaving, and
anything the host does between steps (control writes) lands at a reproducible point.
A task that raises stops the run with the original exception chained.

A few preemption points sit inside synchronous code that cannot yield — a vCPU between
making an spte writable and marking the page dirty, or waiting for the MMU lock. There
`preempt()` runs a seeded number of steps of the other tasks before the caller goes on:
the tasks already running (on the Python stack) are not eligible, so interleavings nest,
and the same seed still gives the same run.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

# Steps of other tasks one preemption point runs: 0 (no preemption) up to this many.
PREEMPT_MAX_STEPS = 3


class TaskFailed(RuntimeError):
    """A guest task raised: the simulation stops here."""


class Scheduler:
    def __init__(self, seed: int) -> None:
        self._rng = random.Random(seed)
        self._tasks: list[tuple[str, Iterator[None]]] = []
        self._running: list[Iterator[None]] = []  # the tasks on the stack, outermost first
        self._running_names: list[str] = []  # their names

    @property
    def current(self) -> str | None:
        """The name of the task running now (the innermost on the stack), None between steps."""
        return self._running_names[-1] if self._running_names else None

    def add(self, name: str, task: Iterator[None]) -> None:
        self._tasks.append((name, task))

    def __len__(self) -> int:
        return len(self._tasks)

    def step(self) -> bool:
        """Advance one task by one step; False when no task can run."""
        tasks = self._tasks
        if self._running:
            tasks = [t for t in tasks if not any(t[1] is r for r in self._running)]
        if not tasks:
            return False
        k = self._rng.randrange(len(tasks)) if len(tasks) > 1 else 0
        name, task = tasks[k]
        self._running.append(task)
        self._running_names.append(name)
        try:
            next(task)
        except StopIteration:
            self._tasks = [t for t in self._tasks if t[1] is not task]
        except TaskFailed:
            raise
        except Exception as exc:
            raise TaskFailed(f"task {name} failed: {exc}") from exc
        finally:
            self._running.pop()
            self._running_names.pop()
        return True

    def preempt(self) -> int:
        """A preemption point inside a running step: run other tasks; the steps run."""
        done = 0
        for _ in range(self._rng.randrange(PREEMPT_MAX_STEPS + 1)):
            if not self.step():
                break
            done += 1
        return done

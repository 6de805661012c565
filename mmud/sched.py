"""A tiny deterministic scheduler of cooperative tasks (the vCPUs' guest programs).

Each task is a generator; one `step()` advances one task to its next `yield` — a preemption
point. The task is chosen by a seeded RNG, so the same seed gives the same interleaving, and
anything the host does between steps (control writes) lands at a reproducible point.
A task that raises stops the run with the original exception chained.
"""

from __future__ import annotations

import random
from collections.abc import Iterator


class TaskFailed(RuntimeError):
    """A guest task raised: the simulation stops here."""


class Scheduler:
    def __init__(self, seed: int) -> None:
        self._rng = random.Random(seed)
        self._tasks: list[tuple[str, Iterator[None]]] = []

    def add(self, name: str, task: Iterator[None]) -> None:
        self._tasks.append((name, task))

    def __len__(self) -> int:
        return len(self._tasks)

    def step(self) -> bool:
        """Advance one task by one step; False when no task is left."""
        tasks = self._tasks
        if not tasks:
            return False
        k = self._rng.randrange(len(tasks)) if len(tasks) > 1 else 0
        name, task = tasks[k]
        try:
            next(task)
        except StopIteration:
            del tasks[k]
        except Exception as exc:
            raise TaskFailed(f"task {name} failed: {exc}") from exc
        return True

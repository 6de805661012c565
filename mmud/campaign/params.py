"""Typed access to a job's parameters, which arrive as a JSON-able dict of objects.

A wrong type is a ValueError naming the parameter: raised in a kind's `jobs()` it makes the
spec refused before anything runs; raised in `run()` it is that job's error.
"""

from __future__ import annotations

from collections.abc import Iterable

from mmud.campaign import grid


def integer(job: dict[str, object], name: str) -> int:
    value = job[name]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, not {value!r}")
    return value


def text(job: dict[str, object], name: str) -> str:
    value = job[name]
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string, not {value!r}")
    return value


def flag(job: dict[str, object], name: str) -> bool:
    value = job[name]
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, not {value!r}")
    return value


def require(axes: dict[str, list], names: tuple[str, ...]) -> None:
    """Refuse a spec that lacks one of the kind's axes."""
    missing = [a for a in names if a not in axes]
    if missing:
        raise ValueError(f"missing axes {', '.join(missing)} (this kind needs {', '.join(names)})")


def choices(axes: dict[str, list], name: str, known: Iterable[str]) -> None:
    """Refuse a value of axis `name` that is not one of `known`."""
    known = list(known)
    for value in axes[name]:
        if value not in known:
            raise ValueError(f"unknown {name} {value!r} (known: {', '.join(known)})")


def typed_grid(axes: dict[str, list], integers: Iterable[str] = (), flags: Iterable[str] = (),
               texts: Iterable[str] = ()) -> list[dict[str, object]]:
    """The jobs of the axes' grid (grid.product), each axis of the named ones checked for its
    type, so that a spec with a wrong value is refused before anything runs."""
    jobs = grid.product(axes)
    for job in jobs:
        for check, names in ((integer, integers), (flag, flags), (text, texts)):
            for name in names:
                check(job, name)
    return jobs

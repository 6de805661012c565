"""A campaign spec: the TOML file that names a kind, its axes, its limits and its quick grid.

    kind = "detect"
    description = "..."                # optional, shown in summary.md

    [axes]                             # each axis a non-empty list of values
    bug = ["wrong_pfn", "sync_skipped"]
    seed = [1, 2, 3]

    [limits]
    job_seconds = 60                   # a job still running then is killed: outcome timeout

    [quick]                            # `--quick`: fewer values for some axes, never new axes
    seed = [1]

The spec is checked whole before anything runs — and the kind's `jobs()` is asked for the job
list then too, so that a bad value (an unknown bug) is refused at once with the kind's
message, not discovered job by job on the workers.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from mmud.campaign import kinds

TOP_KEYS = {"kind", "description", "axes", "limits", "quick"}
LIMIT_KEYS = {"job_seconds"}
SCALARS = (str, int, float, bool)


class SpecError(ValueError):
    """The spec cannot be run; the message says which key is wrong and why."""


@dataclass(frozen=True)
class Spec:
    path: Path
    kind: str
    description: str
    axes: dict[str, list]
    quick_axes: dict[str, list]
    job_seconds: float

    def grid(self, quick: bool) -> dict[str, list]:
        """The axes to run: the full grid, or with the [quick] table's values in place."""
        return {**self.axes, **self.quick_axes} if quick else dict(self.axes)

    def module(self) -> ModuleType:
        return kinds.load(self.kind)

    def jobs(self, quick: bool) -> list[dict[str, object]]:
        """The kind's job list for this spec; a value the kind refuses is a SpecError."""
        try:
            return self.module().jobs(self.grid(quick), quick)
        except (ValueError, TypeError, KeyError) as e:
            raise SpecError(f"{self.path}: kind {self.kind!r} refuses the axes: {e}") from None


def _axes(path: Path, table: object, name: str) -> dict[str, list]:
    if not isinstance(table, dict):
        raise SpecError(f"{path}: [{name}] must be a table of lists")
    for axis, values in table.items():
        if not isinstance(values, list) or not values:
            raise SpecError(f"{path}: {name}.{axis} must be a non-empty list")
        bad = [v for v in values if not isinstance(v, SCALARS)]
        if bad:
            raise SpecError(f"{path}: {name}.{axis} holds {bad[0]!r}: values are strings, numbers "
                            "or booleans")
        if len(set(map(repr, values))) != len(values):
            raise SpecError(f"{path}: {name}.{axis} lists a value twice")
    return table


def parse(path: Path, text: str) -> Spec:
    """The spec in `text` (read from `path`), checked; SpecError if it is not runnable."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise SpecError(f"{path}: not valid TOML: {e}") from None
    unknown = set(data) - TOP_KEYS
    if unknown:
        raise SpecError(f"{path}: unknown key(s) {', '.join(sorted(unknown))} "
                        f"(known: {', '.join(sorted(TOP_KEYS))})")
    kind = data.get("kind")
    if not isinstance(kind, str):
        raise SpecError(f"{path}: `kind` must name a campaign kind ({', '.join(sorted(kinds.KINDS))})")
    try:
        kinds.load(kind)
    except kinds.UnknownKind as e:
        raise SpecError(f"{path}: {e}") from None
    description = data.get("description", "")
    if not isinstance(description, str):
        raise SpecError(f"{path}: `description` must be a string")
    axes = _axes(path, data.get("axes"), "axes")
    if not axes:
        raise SpecError(f"{path}: [axes] names no axis")
    quick = _axes(path, data.get("quick", {}), "quick")
    extra = set(quick) - set(axes)
    if extra:
        raise SpecError(f"{path}: [quick] may only narrow axes of [axes]; "
                        f"{', '.join(sorted(extra))} is not one")
    limits = data.get("limits", {})
    if not isinstance(limits, dict) or set(limits) - LIMIT_KEYS:
        raise SpecError(f"{path}: [limits] takes {', '.join(sorted(LIMIT_KEYS))} only")
    seconds = limits.get("job_seconds")
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) \
            or not math.isfinite(seconds) or seconds <= 0:
        raise SpecError(f"{path}: limits.job_seconds must be a positive number of seconds")
    spec = Spec(path=path, kind=kind, description=description, axes=axes, quick_axes=quick,
                job_seconds=float(seconds))
    for quick_run in (False, True):
        if not spec.jobs(quick_run):
            raise SpecError(f"{path}: the {'quick ' if quick_run else ''}grid has no jobs")
    return spec


def load(path: Path) -> Spec:
    try:
        text = path.read_text()
    except OSError as e:
        raise SpecError(f"{path}: cannot read the spec: {e.strerror}") from None
    return parse(path, text)

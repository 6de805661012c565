"""The job grid of a campaign: the cartesian product of a spec's axes.

Kinds build their job lists from it, so that the order of jobs (and therefore the progress
bar, the journal and the job ids a reader sees) is the same on every run of the same spec.
"""

from __future__ import annotations

import itertools


def product(axes: dict[str, list]) -> list[dict[str, object]]:
    """Every combination of the axes' values, one flat dict per job.

    The order is stable: axes in the order the spec names them, the last axis varying
    fastest, values in the order the spec lists them. An axis with no values gives no jobs.
    """
    names = list(axes)
    return [dict(zip(names, values, strict=True))
            for values in itertools.product(*(list(axes[name]) for name in names))]

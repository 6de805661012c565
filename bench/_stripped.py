"""The hooks-removed build: mmud without its audit points and observer hooks.

A copy of the package source with every `# audit point` and `# observer` line deleted,
imported beside mmud as `mmud_stripped`. Each hook is one line (tests/test_audit.py checks
it), so the copy is the same program minus the hooks: what a hook costs when nobody
listens is the throughput of mmud over that of the copy (`audit_off_ratio`,
`isolation_off_ratio`).
"""

from __future__ import annotations

import contextlib
import importlib
import re
import shutil
import sys
import tempfile
import types
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STRIPPED = "mmud_stripped"
HOOK_MARKERS = ("# audit point", "# observer")
_MMUD_NAME = re.compile(r"\bmmud\b")


def stripped_package(dest: Path) -> str:
    """Write the copy under `dest`; its importable name."""
    shutil.copytree(REPO / "mmud", dest / STRIPPED, ignore=shutil.ignore_patterns("__pycache__"))
    for path in (dest / STRIPPED).rglob("*.py"):
        lines = path.read_text().splitlines(keepends=True)
        kept = "".join(line for line in lines if not any(m in line for m in HOOK_MARKERS))
        path.write_text(_MMUD_NAME.sub(STRIPPED, kept))
    return STRIPPED


@contextlib.contextmanager
def without_hooks() -> Iterator[types.ModuleType]:
    """The hooks-removed package, imported for the duration."""
    with tempfile.TemporaryDirectory(prefix="mmud-stripped-") as tmp:
        sys.path.insert(0, tmp)
        try:
            yield importlib.import_module(stripped_package(Path(tmp)))
        finally:
            sys.path.remove(tmp)
            for name in [m for m in sys.modules if m.split(".")[0] == STRIPPED]:
                del sys.modules[name]


def kernel_vm(package: types.ModuleType, params: dict[str, str] | None = None) -> types.ModuleType:
    """The throughput guest (kernel workload, 64 MiB, seed 7) of mmud or its stripped copy,
    with address-space isolation off unless `params` turn it on."""
    return package.VM(mem_mb=64, seed=7, workload="kernel",
                      params={"address_space_isolation": "0", **(params or {})})

"""The FUSE process stays light: the filesystem layer loads neither numpy nor the simulation.

Each check runs in a fresh interpreter, since this one has long imported everything.
"""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.util import find_spec

import pytest

import mmud

# Modules only the simulation process may load.
HEAVY = ("numpy", "mmud.kvm", "mmud.machine", "mmud.guest", "mmud.migration", "mmud.daemon.sim")


def modules_after(code: str) -> set[str]:
    """The names in sys.modules once `code` has run in a fresh interpreter."""
    script = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stdout.splitlines()[-1]))


def heavy(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if any(m == h or m.startswith(h + ".") for h in HEAVY))


@pytest.mark.parametrize("imports", ["mmud.fs.tree, mmud.fs.fuse", "mmud.fs.nodes, mmud.fs.memslots",
                                     "mmud.daemon.protocol", "mmud.uapi.params, mmud.uapi.stats",
                                     "mmud"])
def test_the_filesystem_layer_imports_neither_numpy_nor_the_simulation(imports):
    loaded = modules_after(f"import {imports}")
    assert set(imports.split(", ")) <= loaded
    assert heavy(loaded) == []


def test_the_check_sees_a_heavy_import():
    """The probe above would notice: using a public name of mmud loads the simulated machine."""
    assert {"numpy", "mmud.machine"} <= set(heavy(modules_after("import mmud\nmmud.VM")))


@pytest.mark.parametrize("name", sorted(set(mmud.__all__) - {"KvmModule"}))
def test_every_public_name_resolves_to_the_object_its_module_defines(name):
    value = getattr(mmud, name)
    assert getattr(sys.modules[value.__module__], value.__name__) is value
    assert name in dir(mmud)


@pytest.mark.skipif(find_spec("mmud.kvm.module") is None, reason="mmud.kvm.module not written yet")
def test_kvm_module_is_a_public_name():
    from mmud.kvm.module import KvmModule

    assert mmud.KvmModule is KvmModule


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no_such_name"):
        mmud.no_such_name  # noqa: B018
    assert not hasattr(mmud, "no_such_name")

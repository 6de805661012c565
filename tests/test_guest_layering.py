"""The guest model stays a client of the simulated KVM: one-way imports, one door into mmud.kvm.

The guest kernel must work against the vCPU/VM API it is handed, never the MMU's internals,
and its modules must not import each other in a circle (the kernel imports its page-table
code, not the other way round). Imports under `if TYPE_CHECKING:` count too: a cycle hidden
there is still a cycle for an import-linter contract and for a reader.
"""

from __future__ import annotations

import ast
from pathlib import Path

GUEST = Path(__file__).resolve().parent.parent / "mmud" / "guest"
# The one guest module allowed to import mmud.kvm, and what it may import from there.
HW_MODULE = "mmud.guest.hw"
HW_ALLOWED = {"mmud.kvm.vcpu", "mmud.kvm.devices"}


def _module_name(path: Path) -> str:
    return "mmud.guest" if path.stem == "__init__" else f"mmud.guest.{path.stem}"


def _submodules() -> set[str]:
    return {_module_name(path) for path in GUEST.glob("*.py")}


def _imports(path: Path) -> set[str]:
    """Modules a file imports, anywhere in it; `from pkg import mod` names the submodule."""
    known = _submodules()
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if candidate in known else node.module)
    return found


def _graph() -> dict[str, set[str]]:
    return {_module_name(path): _imports(path) for path in GUEST.glob("*.py")}


def test_guest_never_imports_the_top_level_package() -> None:
    offenders = {name for name, imports in _graph().items() if "mmud" in imports}
    assert not offenders


def test_only_the_hw_module_imports_kvm() -> None:
    kvm_imports = {
        name: {imp for imp in imports if imp == "mmud.kvm" or imp.startswith("mmud.kvm.")}
        for name, imports in _graph().items()
    }
    outside_hw = {name: imps for name, imps in kvm_imports.items() if imps and name != HW_MODULE}
    assert not outside_hw
    assert kvm_imports[HW_MODULE] <= HW_ALLOWED


def test_guest_modules_import_each_other_without_cycles() -> None:
    graph = _graph()
    inner = {name: {imp for imp in imports if imp in graph} for name, imports in graph.items()}
    done: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, " -> ".join((*path, name))
        if name in done:
            return
        for imported in sorted(inner[name]):
            visit(imported, (*path, name))
        done.add(name)

    for name in sorted(inner):
        visit(name, ())

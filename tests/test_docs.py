"""The repository stands on its own: code, docs and the unit cite only files it contains, and
no text claims the old ≈v5.6 baseline (mmud models Linux v5.16; a rule taken from another
version names that version)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
THIS = Path(__file__).resolve()

# Directories that are not the project's text: virtualenvs, VCS, caches, build output, and a
# mount point a running daemon may be serving.
SKIP_DIRS = {".venv", "venv", ".git", "build", "dist", "node_modules", "__pycache__",
             "mountpoint"}
SUFFIXES = {".py", ".md", ".service"}

# Citations of the design folder that lived outside the repository.  (This file is not
# scanned: it has to spell them.)
OUTSIDE = [re.compile(r"\bDESIGN\.md\b"), re.compile(r"(?<![\w-])reference/"),
           re.compile(r"(?<![\w-])shared/")]
URL = re.compile(r"\b[a-z][a-z0-9+.-]*://\S+")
MD_TOKEN = re.compile(r"(?<![\w./-])((?:\.{1,2}/)*[\w./-]*[\w-]\.md)(?![\w-])")
TESTS_TOKEN = re.compile(r"(?<![\w./-])((?:tests/)?test_\w+\.py|tests/[\w/]+\.py)(?![\w-])")

# The old baseline, in the forms it was written.  Add a (path, line text) pair here only for
# a mention that is legitimate; there is none.
OLD_BASELINE = re.compile(r"(?:≈|~|about )v5\.6(?![\d])|v5\.6 numbering")
OLD_BASELINE_ALLOWED: set[tuple[str, str]] = set()


def _text_files() -> list[Path]:
    out = []
    for root, dirs, files in os.walk(REPO):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith(".")
                         and not d.endswith(".egg-info"))
        for name in sorted(files):
            path = Path(root, name)
            if (path.suffix in SUFFIXES or name == "Makefile") and path.resolve() != THIS:
                out.append(path)
    return out


def _lines(path: Path) -> list[tuple[int, str]]:
    return list(enumerate(path.read_text(encoding="utf-8").splitlines(), 1))


def _where(path: Path, n: int) -> str:
    return f"{path.relative_to(REPO)}:{n}"


def md_tokens(line: str) -> list[str]:
    """The `something.md` paths a line names (URLs left out)."""
    return MD_TOKEN.findall(URL.sub(" ", line))


def test_tokens_are_found_as_meant():
    line = ("see `docs/mmu.md` §2, README.md and ../shared/x.md; not file:///usr/share/a.md, "
            "*.md or foo.mdx; tests/test_audit.py, test_lint.py")
    assert md_tokens(line) == ["docs/mmu.md", "README.md", "../shared/x.md"]
    assert TESTS_TOKEN.findall(line) == ["tests/test_audit.py", "test_lint.py"]


def _exists_in_repo(token: str, *bases: Path) -> bool:
    for base in bases:
        path = (base / token).resolve()
        if path.is_relative_to(REPO) and ".venv" not in path.parts and path.is_file():
            return True
    return False


def test_no_citation_of_files_outside_the_repository():
    bad = [f"{_where(p, n)}: {line.strip()}" for p in _text_files() for n, line in _lines(p)
           if any(rx.search(line) for rx in OUTSIDE)]
    assert not bad, "cites the design folder outside the repository:\n" + "\n".join(bad)


# Markdown files mmud writes rather than cites: a campaign's report (docs/campaigns.md).
OUTPUTS = {"summary.md"}


def test_cited_markdown_files_exist():
    """Relative names resolve against docs/ or the repository root, as the docs use them."""
    bad = [f"{_where(p, n)}: {token}" for p in _text_files() for n, line in _lines(p)
           for token in md_tokens(line)
           if Path(token).name not in OUTPUTS and not _exists_in_repo(token, REPO / "docs", REPO)]
    assert not bad, "cites a .md file that is not in the repository:\n" + "\n".join(bad)


def test_cited_test_files_exist():
    bad = [f"{_where(p, n)}: {token}" for p in _text_files() for n, line in _lines(p)
           for token in TESTS_TOKEN.findall(line)
           if not _exists_in_repo(token.removeprefix("tests/"), REPO / "tests")]
    assert not bad, "cites a test file that does not exist:\n" + "\n".join(bad)


@pytest.mark.parametrize("where", ["mmud", "docs", "README.md"])
def test_no_claim_of_the_old_v5_6_baseline(where):
    root = REPO / where
    files = [root] if root.is_file() else [p for p in _text_files() if p.is_relative_to(root)]
    bad = [f"{_where(p, n)}: {line.strip()}" for p in files for n, line in _lines(p)
           if OLD_BASELINE.search(line)
           and (str(p.relative_to(REPO)), line.strip()) not in OLD_BASELINE_ALLOWED]
    assert not bad, ("claims the old v5.6 baseline (mmud models v5.16; name the version a "
                     "rule comes from explicitly):\n" + "\n".join(bad))


def test_every_test_docs_fidelity_names_exists():
    """docs/fidelity.md names the test that checks each behaviour: each must exist."""
    named = set(re.findall(r"`(test_\w+)`", (REPO / "docs" / "fidelity.md").read_text()))
    defined = set()
    for path in (REPO / "tests").glob("test_*.py"):
        defined |= set(re.findall(r"^def (test_\w+)\(", path.read_text(), re.M))
    assert len(named) > 30
    assert sorted(named - defined) == []


def test_the_readme_table_marks_what_linux_does_not_have():
    """README's claim is exact: its table lists every parameter, and the parameters and files
    that are mmud's own say so."""
    from mmud.uapi.params import PARAMS

    readme = (REPO / "README.md").read_text()
    rows = [line for line in readme.splitlines() if line.startswith("| `")]
    for p in PARAMS:
        short = p.name.removeprefix("mmu_audit_ratelimit")
        assert any(p.name in row or f"`…{short}`" in row for row in rows), p.name
    mmud_only = ("mmu_audit_ratelimit_ms", "mmu_audit_scope", "kvm/mmu-debug", "kvm/audit_log",
                 "kvm/isolation/map", "vm<N>/state")
    for name in mmud_only:
        (row,) = [row for row in rows if name in row]
        assert "*mmud only*" in row, row
    assert "*mmud only*" not in next(row for row in rows if "parameters/mmu_audit`" in row)

"""The `access` campaign kind (docs/access-matrix.md): the x86 access-rights matrix through
mmud's vCPU against the SDM reference walk, its job split, and the reference's A/D rules."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from mmud.campaign import spec as campaign_spec
from mmud.campaign.access_check import VA, AccessBench
from mmud.campaign.access_matrix import ACCESSES, LOWER_FLAGS, UPPER_EDITS, Cpu, job_cases, lower_entries
from mmud.campaign.kinds import access
from mmud.campaign.reference import NX, PS, A, D, Expect, P, Regs, U, W, idx, reference_walk

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "campaigns" / "access.toml"


def quick_jobs() -> list[dict[str, object]]:
    return campaign_spec.load(SPEC).jobs(quick=True)


def cases_of(job: dict[str, object]) -> list[tuple[int, int, int]]:
    """The (PDE, PTE, access) cases a job runs."""
    return list(job_cases(bool(job["efer_nxe"]), str(job["upper"]), int(str(job["sample"])),
                          int(str(job["offset"]))))


def test_quick_matrix_varies_every_flag_access_and_axis():
    """The reduced matrix keeps every axis, and across its jobs every table flag is seen set
    and clear, every access is made, and every upper-entry edit of the spec is run."""
    spec = campaign_spec.load(SPEC)
    jobs = spec.jobs(quick=True)
    assert set(spec.quick_axes) <= set(spec.axes) == set(access.AXES)
    for axis, values in spec.grid(quick=True).items():
        assert {job[axis] for job in jobs} == set(values), axis
    seen_set, seen_clear, seen_access = set(), set(), set()
    for job in jobs:
        for pde, pte, acc in cases_of(job):
            seen_access.add(acc)
            for name, level, bit in LOWER_FLAGS:
                (seen_set if (pde if level == 2 else pte) & bit else seen_clear).add(name)
    names = {name for name, _, _ in LOWER_FLAGS}
    assert seen_set == names and seen_clear == names
    assert seen_access == set(range(len(ACCESSES)))
    assert all(job["sample"] == access.QUICK_SAMPLE for job in jobs)


def test_quick_matrix_has_no_mismatches(tmp_path):
    cases = mismatches = 0
    for i, job in enumerate(quick_jobs()):
        row = access.run(job, tmp_path / str(i))
        assert row["cases"] == len(cases_of(job))
        cases += int(str(row["cases"]))
        mismatches += int(str(row["mismatches"]))
    assert cases > 40_000
    assert mismatches == 0
    assert not list(tmp_path.rglob("mismatches.txt"))


def test_full_matrix_size_is_the_documented_one():
    """docs/access-matrix.md gives the size of the full and the quick matrix: what the spec runs."""
    jobs = campaign_spec.load(SPEC).jobs(quick=False)
    cases = sum(len(lower_entries(bool(j["efer_nxe"]), str(j["upper"]))) * len(ACCESSES) for j in jobs)
    doc = (ROOT / "docs" / "access-matrix.md").read_text()
    assert f"{len(jobs)} jobs, {cases:,} cases" in doc
    quick = quick_jobs()
    quick_cases = sum(len(cases_of(job)) for job in quick)
    assert f"{len(quick)} jobs, {quick_cases:,} cases" in doc


# --- the check can fail ---------------------------------------------------------------------


def _wrong_error_code(*args, **kw) -> Expect:
    want = reference_walk(*args, **kw)
    return dataclasses.replace(want, error_code=want.error_code ^ 0x10) if want.fault else want


def _wrong_gpa(*args, **kw) -> Expect:
    want = reference_walk(*args, **kw)
    return want if want.fault else dataclasses.replace(want, gpa=want.gpa + 8)


def _reads_set_dirty(*args, **kw) -> Expect:
    want = reference_walk(*args, **kw)
    return dataclasses.replace(want, ad=tuple((gpa, bits | D) for gpa, bits in want.ad))


def _never_faults(*args, **kw) -> Expect:
    want = reference_walk(*args, **kw)
    return dataclasses.replace(want, fault=False, error_code=0, gpa=want.gpa or 0)


@pytest.mark.parametrize("wrong,message", [
    (_wrong_error_code, r"mmud gives #PF error code 0x\w+, the reference #PF error code"),
    (_wrong_gpa, r"mmud gives gpa 0x\w+, the reference gpa"),
    (_reads_set_dirty, r"(pml4e|pdpte|pde|pte) is 0x\w+ after the access, the reference says"),
    (_never_faults, r"mmud gives #PF error code 0x\w+, the reference gpa"),
])
def test_a_wrong_expectation_is_reported_as_mismatches(monkeypatch, tmp_path, wrong, message):
    monkeypatch.setattr(access, "reference_walk", wrong)
    job = next(j for j in quick_jobs() if j["efer_nxe"] and j["upper"] == "none")
    row = access.run(job, tmp_path)
    assert 0 < int(str(row["mismatches"])) <= int(str(row["cases"]))
    assert re.search(message, str(row["first_mismatch"])), row["first_mismatch"]
    assert str(row["first_mismatch"]).startswith("test ")
    kept = (tmp_path / "mismatches.txt").read_text()
    assert kept.count("entries before: pml4e") == min(int(str(row["mismatches"])), access.MISMATCHES_KEPT)
    assert kept.startswith(str(row["first_mismatch"]))


def test_the_first_access_of_twice_is_checked_too():
    """access.c's "twice" makes a supervisor read first: a wrong answer to it is reported."""
    def wrong_first(read_u64, regs, va, **kind):
        want = reference_walk(read_u64, regs, va, **kind)
        return want if kind else dataclasses.replace(want, fault=True, error_code=0x1F)

    bench = AccessBench(Cpu(True, True, False, False, False), "none", False, wrong_first)
    twice_read = next(i for i, a in enumerate(ACCESSES) if a[0] == "read twice")
    mismatch = bench.run(P | W | U, P | W | U, twice_read)
    assert mismatch is not None and "the first (supervisor read): mmud gives gpa" in mismatch.what
    assert bench.run(P | W | U, P | W | U, ACCESSES.index(("read", False, False, False, False))) is None


# --- a clean state per case --------------------------------------------------------------------


def test_a_reused_vm_answers_as_a_fresh_vm():
    """Rewriting the entries, zapping every shadow page and emptying the TLB leaves nothing
    of the previous case: a sample of cases in one VM, one after the other, gives the same
    accesses and the same entries afterwards as each case in a VM of its own."""
    cpu = Cpu(efer_nxe=True, cr0_wp=False, cr4_smep=True, cr4_smap=True, rflags_ac=False)
    reused = AccessBench(cpu, "pdpte.ro", True, reference_walk)
    sample = list(job_cases(True, "pdpte.ro", sample=1999, offset=5))
    assert len(sample) > 20
    for pde, pte, acc in sample:
        fresh = AccessBench(cpu, "pdpte.ro", True, reference_walk)
        assert reused.observe(pde, pte, acc) == fresh.observe(pde, pte, acc), (hex(pde), hex(pte), acc)


# --- the job split ------------------------------------------------------------------------------


def test_jobs_refuse_axes_the_kind_does_not_take():
    axes = campaign_spec.load(SPEC).grid(quick=True)
    with pytest.raises(ValueError, match="unknown upper-entry edit 'pdpte.rw'"):
        access.jobs({**axes, "upper": ["pdpte.rw"]}, False)
    with pytest.raises(ValueError, match="missing axes pkey"):
        access.jobs({k: v for k, v in axes.items() if k != "pkey"}, False)
    with pytest.raises(ValueError, match="unknown axes seed"):
        access.jobs({**axes, "seed": [1]}, False)
    with pytest.raises(ValueError, match="cr0_wp must be true or false"):
        access.jobs({**axes, "cr0_wp": [0, 1]}, False)


def test_an_entry_the_walk_never_reads_is_held_not_varied():
    assert lower_entries(True, "pml4e.np") == ((P | W | U | A | D, P | W | U | A | D),)
    assert lower_entries(False, "pdpte.nx") == lower_entries(True, "pdpte.ps")
    pairs = lower_entries(True, "none")
    not_present = {pte for pde, pte in pairs if not pde & P}
    assert not_present == {P | W | U | A | D}
    assert len({pte for pde, pte in pairs if pde == P}) == 2 ** 8 - 2 ** 6  # not both 51 and 46
    assert set(UPPER_EDITS) == {f"{e}.{w}" for e in ("pml4e", "pdpte")
                                for w in ("np", "ro", "nouser", "nx", "a", "ps", "51")}


# --- the reference's A/D rules, by hand -----------------------------------------------------------

PML4, PDPT, PD, PT, PAGE, LARGE = 0x1000, 0x2000, 0x3000, 0x4000, 0x7000, 0x200000
X = 0x0000_7F12_3456_7ABC
REGS = Regs(cr0=1 << 16, cr3=PML4, cr4=0, efer=1 << 11, rflags=2)


def tables(pde: int = PT | P | W | U, pte: int = PAGE | P | W | U) -> dict[int, int]:
    return {PML4 + 8 * idx(X, 4): PDPT | P | W | U, PDPT + 8 * idx(X, 3): PD | P | W | U,
            PD + 8 * idx(X, 2): pde, PT + 8 * idx(X, 1): pte}


def walk(memory: dict[int, int], regs: Regs = REGS, **kind: bool) -> Expect:
    return reference_walk(lambda gpa: memory.get(gpa, 0), regs, X, **kind)


def test_reference_a_read_or_fetch_sets_a_in_every_entry_and_no_d():
    memory = tables()
    used = list(memory)
    for kind in ({}, {"user": True}, {"fetch": True}):
        want = walk(memory, **kind)
        assert not want.fault and want.gpa == PAGE | (X & 0xFFF)
        assert want.ad == tuple((gpa, A) for gpa in used)


def test_reference_a_write_sets_d_in_the_leaf_only():
    memory = tables()
    used = list(memory)
    assert walk(memory, write=True).ad == ((used[0], A), (used[1], A), (used[2], A), (used[3], A | D))


def test_reference_a_2mib_page_uses_three_entries_and_its_pde_is_the_leaf():
    memory = tables(pde=LARGE | P | W | U | PS)
    want = walk(memory, write=True, user=True)
    assert want.gpa == LARGE | (X & 0x1FFFFF)
    assert want.ad == tuple(zip(list(memory)[:3], (A, A, A | D), strict=True))


def test_reference_a_fault_sets_nothing():
    assert walk(tables(pte=PAGE | P | U), write=True) == Expect(True, 0x03)  # read-only, WP=1
    assert walk(tables(pte=PAGE | P | W), user=True) == Expect(True, 0x05)  # supervisor page
    assert walk(tables(pde=PT | P | W | U | (1 << 51))) == Expect(True, 0x09)  # reserved bit
    assert walk(tables(pte=PAGE | W | U)) == Expect(True, 0x00)  # not present
    assert walk(tables(pte=PAGE | P | W | U | NX), fetch=True) == Expect(True, 0x11)  # XD


def test_reference_a_supervisor_write_with_wp_off_sets_d_in_a_read_only_leaf():
    memory = tables(pte=PAGE | P | U)
    want = walk(memory, Regs(cr0=0, cr3=PML4, cr4=0, efer=1 << 11, rflags=2), write=True)
    assert not want.fault and want.ad[-1] == (list(memory)[3], A | D)


def test_the_bench_address_indexes_every_level_differently():
    assert len({idx(VA, level) for level in (1, 2, 3, 4)}) == 4 and VA & 0xFFF


# --- summary and plot --------------------------------------------------------------------------


def test_summary_and_plot_count_the_cases_of_the_jobs_that_ended_ok(monkeypatch, tmp_path):
    pandas = pytest.importorskip("pandas")
    pytest.importorskip("matplotlib")
    jobs = [j for j in quick_jobs() if j["efer_nxe"] and j["cr0_wp"]][:3]
    rows = [{**jobs[0], **access.run(jobs[0], tmp_path / "0"), "outcome": "ok"},
            {**jobs[2], "outcome": "timeout"}]
    monkeypatch.setattr(access, "reference_walk", _wrong_gpa)
    rows.insert(1, {**jobs[1], **access.run(jobs[1], tmp_path / "1"), "outcome": "ok"})
    df = pandas.DataFrame(rows)
    text = access.summarize(df)
    cases = int(str(rows[0]["cases"])) + int(str(rows[1]["cases"]))
    assert f"{cases} cases in 2 jobs, **{rows[1]['mismatches']} mismatches** (goal 0)." in text
    assert int(str(rows[1]["mismatches"])) > 0 and str(rows[1]["first_mismatch"]).split("\n")[0] in text
    assert f"| {jobs[0]['upper']} | {rows[0]['cases']} | 0 |" in text
    paths = access.plot(df, tmp_path)
    assert [p.name for p in paths] == ["access_cases.png"]
    assert paths[0].read_bytes().startswith(b"\x89PNG")


def test_the_reference_imports_nothing_from_mmud():
    """The reference judges mmud: it must share no code with it (standard library only)."""
    import ast

    tree = ast.parse((ROOT / "mmud" / "campaign" / "reference.py").read_text())
    modules = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    modules |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert modules and not {m for m in modules if m.split(".")[0] == "mmud"}, modules

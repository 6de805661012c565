"""The audit's two implementations of its per-spte checks — vectorised over many pages
(audit_vector.PageArrays, the full audit) and entry by entry (audit_scalar.PageEntries, the
incremental audit) — give the same messages in the same order, on random MMU states with
and without a bug armed; and the numpy rmap behaves as a dict of lists."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mmud.kvm.mmu import audit_checks as C
from mmud.kvm.mmu import spte as S
from mmud.kvm.mmu.audit import _run
from mmud.kvm.mmu.audit_scalar import PageEntries
from mmud.kvm.mmu.audit_vector import PageArrays
from mmud.uapi.bugs import BUGS
from mmud.kvm.rmap import Rmap
from mmud.sched import TaskFailed
import mmud
from tests.test_mmu_properties import ALIAS, KINDS, NX, P, U, VAS, W, World, idx, ops

MMU_BUGS = [b.name for b in BUGS if b.name != "isolation_switch_fault"]
# (bits flipped in the spte, bits flipped in the guest's entry); "gfn": a gfn without memslot.
DAMAGE = [
    *((bit, 0) for bit in (W, U, NX, S.SPTE_MMU_WRITEABLE, S.SPTE_HOST_WRITEABLE, 1 << 12)),
    *((0, bit) for bit in (P, W, U, NX, 1 << 5, 1 << 6, 1 << 7, 1 << 12, 1 << 13, 1 << 51)),
    (U, W),  # a supervisor-only writable spte for a read-only entry: allowed only if CR0.WP=0
    "gfn",
    "rmap",  # the spte also in the next gfn's rmap
]
NO_MEMSLOT_GFN = 0xF_0000_0000


def _run_guest(world: World, program) -> None:
    """The program's operations; accesses are not compared with the SDM (a bug may be armed)."""
    for op in program:
        if op[0] == "access":
            _, k, kind, alias = op
            vcpu = world.vcpu
            aliased = alias and vcpu.cr3 == world.pml4_b and idx(VAS[k], 4) == idx(VAS[0], 4)
            vcpu.access(VAS[k] + (ALIAS if aliased else 0), **kind)
        else:
            world.apply(op)


def _damage(vm, sp, i, damage) -> None:
    """Damage no bug does, to reach every message of both: spte bits, frames, a lost
    memslot, guest entries changed behind the MMU's back, an spte in two rmaps."""
    if damage == "gfn":
        sp.gfns[i] = NO_MEMSLOT_GFN
        return
    if damage == "rmap":
        slot = vm.memslots.lookup(sp.gfn_of(i) + 1)
        if slot is not None and sp.level == 1:
            slot.rmap.add(sp.gfn_of(i) + 1, sp.index << 9 | i)
        return
    spte_bits, gpte_bits = damage
    if sp.level == 1:
        sp.spt[i] ^= spte_bits
    gpa = sp.gfn * 4096 + 8 * i
    vm.write_u64(gpa, vm.read_u64(gpa) ^ gpte_bits)


def _both(mmu, point, pages, tree, gfns, entries=None):
    vector = _run(mmu, point, pages, tree, gfns, entries=entries, impl=PageArrays)
    scalar = _run(mmu, point, pages, tree, gfns, entries=entries, impl=PageEntries)
    return vector, scalar


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(ops, min_size=1, max_size=40),
    st.sampled_from([None, *MMU_BUGS]),
    st.sampled_from(["post page fault", "post sync"]),
    st.data(),
)
def test_scalar_and_vector_checks_agree(program, bug, point, data):
    world = World(None)
    world.vm.inject(bug or "none")
    _run_guest(world, program)
    # A final burst of accesses, so that an armed bug has run.
    for va in VAS:
        world.vcpu.access(va, **KINDS[3])
    mmu = world.vm.mmu
    pages = list(reversed(mmu.active_mmu_pages))
    tree = [sp for v in mmu.vcpus if v.root is not None for sp in C.reachable_pages(mmu, v.root)]
    vector, scalar = _both(mmu, point, pages, tree, None)
    assert vector == scalar
    if bug is None and point == "post page fault":
        assert vector == []
    present = [(sp, i) for sp in pages for i in range(512) if sp.spt[i] & S.SPTE_MMU_PRESENT]
    for sp, i in data.draw(st.lists(st.sampled_from(present), max_size=3)) if present else ():
        _damage(world.vm, sp, i, data.draw(st.sampled_from(DAMAGE)))
    vector, scalar = _both(mmu, point, pages, tree, None)
    assert vector == scalar
    # An incremental-style run: some pages, some of them limited to some entries, some gfns.
    if pages:
        subset = data.draw(st.lists(st.sampled_from(pages), unique=True, max_size=8))
        entries = [
            data.draw(st.one_of(st.none(), st.sets(st.integers(0, 511), max_size=6)))
            for _ in subset
        ]
        mapped = sorted({g for sp in pages for g in map(sp.gfn_of, range(512))} | {sp.gfn for sp in pages})
        gfns = data.draw(st.sets(st.sampled_from(mapped), max_size=10))
        vector, scalar = _both(mmu, point, subset, subset, gfns, entries)
        assert vector == scalar


@pytest.mark.parametrize("bug", [None, *MMU_BUGS])
def test_checks_agree_under_the_kernel_workload(bug):
    """The guest kernel model with memslot churn: syncs, unsync pages, zaps, a bug's damage."""
    vm = mmud.VM(mem_mb=64, vcpus=2, seed=5, workload="kernel")
    vm.inject(bug or "none")
    mmu = vm.mmu
    rng = np.random.default_rng(5)
    for _ in range(6):
        try:
            vm.step(150)
        except TaskFailed:  # the bug broke the guest kernel; the MMU state is still there
            pass
        pages = list(reversed(mmu.active_mmu_pages))
        tree = [sp for v in mmu.vcpus if v.root is not None for sp in C.reachable_pages(mmu, v.root)]
        for point in ("post page fault", "post sync"):  # outside a sync: check 4 reports
            vector, scalar = _both(mmu, point, pages, tree, None)
            assert vector == scalar
        if bug is None:
            assert _both(mmu, "post page fault", pages, tree, None)[0] == []
        subset = [pages[k] for k in rng.choice(len(pages), size=min(12, len(pages)), replace=False)]
        entries = [None if k % 3 else set(rng.integers(0, 512, size=20).tolist()) for k in range(len(subset))]
        gfns = {sp.gfn_of(int(i)) for sp in subset for i in rng.integers(0, 512, size=4)}
        vector, scalar = _both(mmu, "post page fault", subset, subset, gfns, entries)
        assert vector == scalar
    # Then each kind of damage, to any present spte and to a writable leaf of a synced
    # indirect page (the one whose rights `translation` weighs), and compare once more.
    present = [(sp, i) for sp in pages for i in range(512) if sp.spt[i] & S.SPTE_MMU_PRESENT]
    writable = [(sp, i) for sp, i in present
                if sp.level == 1 and not sp.direct and not sp.unsync and sp.spt[i] & W]
    for damage in DAMAGE:
        for candidates in (present, writable):
            for k in rng.choice(len(candidates), size=min(2, len(candidates)), replace=False):
                _damage(vm, *candidates[int(k)], damage)
        vector, scalar = _both(mmu, "post page fault", pages, pages, None)
        assert vector == scalar


def test_the_spteps_of_a_run_of_pages_and_of_scattered_pages():
    """Rmap.spteps_of reads a run of pages as one slice of heads and scattered pages as a
    gather; both give every entry of those pages' rmaps, chains included, and nothing else."""
    base = 0x100
    rmap = Rmap(base, 64)
    model = {base + k: [1000 + k] for k in range(0, 64, 3)}
    for gfn in (base + 3, base + 30, base + 63):
        model[gfn] += [2000 + gfn, 3000 + gfn]
    for gfn, chain in model.items():
        for sptep in chain:
            rmap.add(gfn, sptep)
    for pages in (range(64), range(3, 31), range(30, 64), range(63, 64), [1, 3, 40, 63], []):
        got = rmap.spteps_of(np.array(pages, dtype=np.int64))
        assert sorted(got.tolist()) == sorted(p for k in pages for p in model.get(base + k, [])), pages


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 15), st.integers(0, 40)), max_size=120),
       st.lists(st.booleans(), min_size=16, max_size=16))
def test_rmap_heads_behave_as_lists(ops_list, select):
    base = 0x100
    rmap = Rmap(base, 16)
    model: dict[int, list[int]] = {}
    for add, rel, sptep in ops_list:
        gfn, chain = base + rel, model.setdefault(base + rel, [])
        if add and sptep not in chain:
            assert rmap.add(gfn, sptep) == len(chain)
            chain.append(sptep)
        elif not add:
            assert rmap.remove(gfn, sptep) == (sptep in chain)
            if sptep in chain:
                chain.remove(sptep)
    for gfn in range(base, base + 16):
        assert list(rmap.get(gfn)) == model.get(gfn, [])
        assert rmap.has(gfn) == bool(model.get(gfn))
    assert rmap.entry_count() == sum(map(len, model.values()))
    mask = np.array(select)
    sptep, gfn = rmap.entries(mask)
    order = np.argsort(gfn, kind="stable")
    got = list(zip(gfn[order].tolist(), sptep[order].tolist(), strict=True))
    assert got == [(g, p) for g in sorted(model) if mask[g - base] for p in model[g]]
    selected = np.flatnonzero(mask)
    held = sorted(p for k in selected.tolist() for p in model.get(base + k, []))
    assert sorted(rmap.spteps_of(selected).tolist()) == held

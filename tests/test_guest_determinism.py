"""The guest workloads are deterministic: the seed alone decides the run."""

from __future__ import annotations

import pytest

import mmud

STEPS = 6000


def run(workload: str, seed: int, vcpus: int = 2) -> tuple[dict[str, int], dict[str, int]]:
    vm = mmud.VM(mem_mb=64, vcpus=vcpus, seed=seed, workload=workload)
    vm.step(STEPS)
    return dict(vm.stats), dict(vm.workload.counters)


@pytest.mark.parametrize("workload", ["kernel", "stream"])
def test_same_seed_same_run(workload: str) -> None:
    first = run(workload, seed=7)
    assert first == run(workload, seed=7)
    assert first[1]["ops"] > 0


@pytest.mark.parametrize("workload", ["kernel", "stream"])
def test_other_seed_other_run(workload: str) -> None:
    assert run(workload, seed=7) != run(workload, seed=8)

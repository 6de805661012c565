"""Live migration by pre-copy: a running guest's RAM arrives identical, and a dirty log that
loses pages shows up as differences."""

from __future__ import annotations

import pytest

import mmud


@pytest.mark.parametrize("seed", [1, 2])
def test_running_kernel_workload_migrates_identical(seed):
    vm = mmud.VM(mem_mb=64, vcpus=2, seed=seed, workload="kernel")
    vm.step(2000)
    result = mmud.migrate(vm)
    assert result.identical and result.mismatched_pages == 0
    assert len(result.rounds) >= 2 and result.pages_sent > vm.memslots.total_pages()
    assert vm.workload.errors == []
    assert not any(s.log_dirty for s in vm.memslots)  # logging back off on the source
    text = result.render()
    assert text.startswith("round 0: sent 16384 pages, ")
    assert text.endswith(f"result: identical, {result.pages_sent} pages sent in "
                         f"{len(result.rounds)} rounds\n")


def test_lost_dirty_pages_make_the_copy_differ():
    vm = mmud.VM(mem_mb=64, vcpus=2, seed=3, workload="kernel")
    vm.step(3000)
    vm.inject("dirty_wp_skipped")
    result = mmud.migrate(vm)
    assert result.identical is False and result.mismatched_pages > 0

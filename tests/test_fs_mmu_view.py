"""The shadow tables on view through a real mount: vm0/mmu/pages, vm0/mmu/walk and
kvm/<pid>-<fd>/mmu_rmaps_stat, read with `cat` and written with `echo`."""

from __future__ import annotations

import os
import re
import stat
import time

import pytest

from tests.fusemount import assert_refused, cat, echo, shell_write, status_fields, wait_for

PAGE_OFFSET = 0xFFFF888000000000  # the guest kernel's direct map (mmud/guest/pgtable.py)
VMALLOC_START = 0xFFFFC90000000000  # where it ioremap()s the ioram device (mmud/guest/ioremap.py)
RAM_PAGES = 64 << 20 >> 12  # the daemon's default 64 MiB
STEPS = 20_000  # by then the guest has used its ioram window (MMIO sptes exist)
RMAP_HEADER = "Rmap_Count:\t0\t1\t2-3\t4-7\t8-15\t16-31\t32-63\t64-127\t128-255\t256-511\t512-1023\t"
PAGE_LINE = re.compile(r"[0-9a-f]{16} +\d+ +\d+ +\d+ sp gen \d+ gfn [0-9a-f]+ l[1-4] [48]-byte q0"
                       r"( direct)? [w-][u-][x-]( invalid)? !?nxe ad root \d+ (un)?sync")


LOOKS = 40  # pause points tried before a test gives up on finding the state it needs
NO_ROOT = "shadow walk: no root loaded"


@pytest.fixture(scope="module")
def paused(daemon):
    """vm0 after it ran STEPS steps, paused so that successive reads see the same MMU."""
    wait_for(lambda: int(status_fields(daemon.read("vm0/status"))["steps"]) >= STEPS, 120,
             f"{STEPS} steps")
    assert echo(daemon.path("vm0/state"), "pause").returncode == 0
    yield daemon
    assert echo(daemon.path("vm0/state"), "run").returncode == 0


def walk_rw(daemon, gvas: list[int]) -> list[str]:
    """Each address written to one read-write open of vm0/mmu/walk, then read back."""
    fd = os.open(daemon.path("vm0/mmu/walk"), os.O_RDWR)
    try:
        out = []
        for gva in gvas:
            os.write(fd, f"{gva:#x}\n".encode())
            out.append(os.pread(fd, 1 << 16, 0).decode())
        return out
    finally:
        os.close(fd)


def verdict(text: str) -> str:
    return text.splitlines()[-1]


def look_until(daemon, look, found):
    """What `look()` returns at the first pause point where `found` holds it.

    The MMU a paused VM shows is whatever the pause fell on: a root the fast zap or the page
    budget has just dropped (reloaded at the next entry), or shadow pages just recycled. The
    VM runs a little between looks until the state a test needs is there; what the test then
    asserts of it is unchanged."""
    for _ in range(LOOKS):
        seen = look()
        if found(seen):
            return seen
        assert echo(daemon.path("vm0/state"), "run").returncode == 0
        time.sleep(0.05)
        assert echo(daemon.path("vm0/state"), "pause").returncode == 0
    raise AssertionError(f"not found in {LOOKS} pause points: {seen!r:.2000}")


def test_pages_lists_the_roots_after_the_vm_ran(paused):
    assert stat.S_IMODE(paused.path("vm0/mmu/pages").stat().st_mode) == 0o444
    def roots_of(lines: list[str]) -> list[str]:
        return [line for line in lines[1:] if re.search(r" l4 .* root [1-9]\d* (un)?sync$", line)]

    # the vCPU's CR3 loads made roots, pinned by root_count (unless the pause fell where one
    # was just dropped)
    lines = look_until(paused, lambda: paused.read("vm0/mmu/pages").splitlines(), roots_of)
    assert lines[0] == "sp               unsync_children parents sptes kvm_mmu_page"
    assert len(lines) > 4 and all(PAGE_LINE.fullmatch(line) for line in lines[1:]), lines[:5]
    roots = roots_of(lines)
    assert all(" parents" not in line and line.split()[2] == "0" for line in roots)
    used = status_fields(paused.read("vm0/status"))["shadow pages"].split(" / ")[0]
    assert len(lines) - 1 == int(used)  # every active page once (n_used_mmu_pages)


def test_pages_of_a_vm_that_never_loaded_cr3_is_the_header(daemon):
    assert echo(daemon.path("vms"), "create vm7 workload=none").returncode == 0
    try:
        assert daemon.read("vm7/mmu/pages") == \
            "sp               unsync_children parents sptes kvm_mmu_page\n"
    finally:
        assert echo(daemon.path("vms"), "destroy vm7").returncode == 0


def test_walk_of_a_mapped_address_agrees_and_echo_then_cat_shows_it(paused):
    assert stat.S_IMODE(paused.path("vm0/mmu/walk").stat().st_mode) == 0o644
    candidates = [PAGE_OFFSET + k * 0x1000 for k in range(64)]
    texts = look_until(paused, lambda: walk_rw(paused, candidates),
                       lambda seen: any(verdict(t).startswith("agree: gfn ") for t in seen))
    assert all(verdict(t).startswith("agree: ") for t in texts)
    mapped = [(gva, t) for gva, t in zip(candidates, texts, strict=True)
              if verdict(t).startswith("agree: gfn ")]
    assert mapped, "no shadowed page in the first 64 of the direct map"
    gva, text = mapped[0]
    assert echo(paused.path("vm0/mmu/walk"), f"{gva:#x}").returncode == 0
    assert cat(paused.path("vm0/mmu/walk")) == text
    lines = text.splitlines()
    assert lines[0].startswith(f"gva {gva:#018x} vcpu 0 cr3 ")
    assert lines[1] == "guest walk:" and " PS " in lines[4] and "(2M)" in lines[4]
    assert re.fullmatch(r"  L1 sp [0-9a-f]{16}\[\d+\] spte 0x[0-9a-f]{16} P .* mmu-present "
                        r"pfn 0x[0-9a-f]+ [w-][u-][x-]", lines[-2])


def test_walk_of_an_unmapped_address_stops_at_a_non_present_level_in_both(paused):
    def look() -> str:
        assert echo(paused.path("vm0/mmu/walk"), "1000").returncode == 0  # `0x` is optional
        return cat(paused.path("vm0/mmu/walk"))

    lines = look_until(paused, look, lambda text: NO_ROOT not in text).splitlines()
    assert lines[0].startswith("gva 0x0000000000001000 vcpu 0 ")
    assert any(line.startswith("  L") and " gpte " in line and line.endswith(" not present")
               for line in lines)
    assert lines[-2].endswith(" not present")
    assert lines[-1].startswith("agree: neither maps it (the guest walk stops at L")


def test_walk_of_the_ioram_window_shows_an_mmio_spte(paused):
    texts = look_until(paused, lambda: walk_rw(paused, [VMALLOC_START + k * 0x1000
                                                         for k in range(256)]),
                       lambda seen: any(verdict(t).startswith("agree: mmio at gfn ")
                                        for t in seen))
    mmio = [t for t in texts if verdict(t).startswith("agree: mmio at gfn ")]
    assert re.search(r" mmio gfn 0x[0-9a-f]+ access [w-][u-]- gen \d+$", mmio[0].splitlines()[-2])


def test_two_opens_read_the_walks_of_their_own_addresses(paused):
    path = paused.path("vm0/mmu/walk")
    a, b = os.open(path, os.O_RDWR), os.open(path, os.O_RDWR)
    try:
        os.write(a, b"0x1000\n")
        os.write(b, f"{PAGE_OFFSET:#x} vcpu=0\n".encode())
        assert os.pread(a, 1 << 16, 0).decode().startswith("gva 0x0000000000001000 vcpu 0 ")
        assert os.pread(b, 1 << 16, 0).decode().startswith(f"gva {PAGE_OFFSET:#018x} vcpu 0 ")
        assert os.pread(a, 1 << 16, 0).decode().startswith("gva 0x0000000000001000 ")
    finally:
        os.close(a)
        os.close(b)


@pytest.mark.parametrize("line", ["zz", "0x1000 vcpu=x", "0x10000000000000000", "0x1000 vcpu=1"])
def test_a_bad_walk_line_fails_with_einval(paused, line):
    # one write(2), as dd makes it (dash's echo reports any write error as "I/O error")
    assert_refused(shell_write(paused.path("vm0/mmu/walk"), f"{line}\n"))  # vm0: one vCPU


def test_mmu_rmaps_stat_has_the_kernel_format_and_counts_the_heads(paused):
    path = f"kvm/{paused.per_vm_dir()}/mmu_rmaps_stat"
    assert stat.S_IMODE(paused.path(path).stat().st_mode) == 0o644
    text = paused.read(path)
    lines = text.split("\n")
    assert lines[0] == RMAP_HEADER and lines[4:] == [""]
    rows = {}
    for line in lines[1:4]:
        name, _, rest = line.partition(":\t")
        assert rest.endswith("\t") and re.fullmatch(r"(\d+\t){11}", rest), line
        rows[name] = [int(n) for n in rest.split("\t")[:-1]]
    assert list(rows) == ["Level=4K", "Level=2M", "Level=1G"]
    assert sum(rows["Level=4K"]) == RAM_PAGES  # one head per 4 KiB page of the slot
    assert rows["Level=2M"] == [RAM_PAGES // 512] + [0] * 10  # no huge sptes: all empty
    assert rows["Level=1G"] == [1] + [0] * 10
    in_use = sum(rows["Level=4K"][1:])
    sptes = int(paused.read(f"kvm/{paused.per_vm_dir()}/pages_4k"))
    assert 0 < in_use <= sptes  # each head in use holds one leaf spte or more


def test_mmu_rmaps_stat_refuses_a_write_open(paused):
    path = paused.path(f"kvm/{paused.per_vm_dir()}/mmu_rmaps_stat")
    done = echo(path, "0")
    assert done.returncode != 0 and "Permission denied" in done.stderr, done.stderr
    with pytest.raises(PermissionError):
        os.open(path, os.O_WRONLY)

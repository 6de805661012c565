"""vm0/memslots and vm0/zap_all through a real mount, written the way a shell user does."""

from __future__ import annotations

import stat
import subprocess

import pytest

from tests.fusemount import assert_refused, echo, shell_write, wait_for

HEADER = " id                gpa               size     flags generation"
SLOT0 = "  0 0x0000000000000000 0x0000000004000000         -"  # the 64 MiB of guest RAM
GPA = 0x100000000  # 4 GiB: above the guest's RAM and the ioram device


def table(daemon) -> list[list[str]]:
    lines = daemon.read("vm0/memslots").splitlines()
    assert lines[0] == HEADER
    return [line.split() for line in lines[1:]]


def generation(daemon) -> int:
    (gen,) = {row[4] for row in table(daemon)}
    return int(gen)


def write(daemon, line: str) -> None:
    done = echo(daemon.path("vm0/memslots"), line)
    assert done.returncode == 0, done.stderr


def status_field(daemon, key: str) -> str:
    fields = dict(line.split(":", 1) for line in daemon.read("vm0/status").splitlines())
    return fields[key].strip()


def test_table_lists_the_ram_slot(daemon):
    assert stat.S_IMODE(daemon.path("vm0/memslots").stat().st_mode) == 0o644
    text = daemon.read("vm0/memslots")
    assert text.splitlines()[1].startswith(SLOT0 + " ") and text.endswith("\n")
    assert len(table(daemon)) == 1


def test_add_move_flags_delete_update_the_table_and_the_generation(daemon):
    gen = generation(daemon)
    write(daemon, f"add 9 {GPA:#x} 0x10000")
    assert table(daemon)[1] == ["9", f"{GPA:#018x}", f"{0x10000:#018x}", "-", str(gen + 2)]
    write(daemon, f"move 9 {2 * GPA:#x}")  # DELETE/MOVE publish the set twice
    assert table(daemon)[1][:4] == ["9", f"{2 * GPA:#018x}", f"{0x10000:#018x}", "-"]
    assert generation(daemon) == gen + 6
    write(daemon, "flags 9 log_dirty=1")
    assert table(daemon)[1][3] == "log_dirty" and generation(daemon) == gen + 8
    write(daemon, "flags 9 log_dirty=0")
    assert table(daemon)[1][3] == "-"
    write(daemon, "delete 9")
    assert len(table(daemon)) == 1 and generation(daemon) == gen + 14
    write(daemon, f"add 010 {GPA:#x} 65536 log_dirty")  # base 0: octal 010 is slot 8
    assert table(daemon)[1][0::3] == ["8", "log_dirty"]
    write(daemon, "delete 8")
    assert len(table(daemon)) == 1


@pytest.mark.parametrize("line", [
    # malformed, refused in the FUSE process (the whole matrix: tests/test_fs_tree.py)
    "add 9", "delete 0\ndelete 0\n", "zap 0",
    # well formed, refused by KVM: unaligned, too big, past the end of the address space,
    # a slot number past 508, no such slot
    f"add 9 {GPA + 1:#x} 0x1000", f"add 9 {GPA:#x} 0x1001", f"add 9 {GPA:#x} 0x80000000000",
    "add 9 0xfffffffffffff000 0x2000", f"add 509 {GPA:#x} 0x1000", "delete 9",
    f"move 9 {GPA:#x}", "flags 9 log_dirty=1", "move 0 0x1001",
])
def test_bad_lines_fail_with_einval_and_change_nothing(daemon, line):
    before = daemon.read("vm0/memslots")
    assert_refused(shell_write(daemon.path("vm0/memslots"), line))
    assert daemon.read("vm0/memslots") == before


@pytest.mark.parametrize("line", [
    "add 9 0x3000000 0x2000000",  # inside slot 0
    "add 9 0x0 0x1000",
    "add 0 0x100000000 0x1000",  # slot 0 exists
])
def test_overlap_or_existing_slot_fails_with_eexist(daemon, line):
    before = daemon.read("vm0/memslots")
    assert_refused(shell_write(daemon.path("vm0/memslots"), line), "File exists")
    assert daemon.read("vm0/memslots") == before


def test_zap_all_fast_slow_and_legacy_zap_every_page(daemon):
    path = daemon.path("vm0/zap_all")
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert daemon.read("vm0/zap_all") == "fast slow legacy\n"
    wait_for(lambda: int(status_field(daemon, "shadow pages").split()[0]) > 8, 10, "pages")
    assert echo(daemon.path("vm0/state"), "pause").returncode == 0
    for kind in ("fast", "slow", "legacy"):
        used = int(status_field(daemon, "shadow pages").split()[0])
        zapped = int(daemon.read("kvm/mmu_shadow_zapped"))
        assert echo(path, kind).returncode == 0
        left = int(status_field(daemon, "shadow pages").split()[0])
        assert left <= 4  # only roots the paused vCPU still holds (root and 3 cached)
        assert int(daemon.read("kvm/mmu_shadow_zapped")) >= zapped + used - left
        assert echo(daemon.path("vm0/state"), "run").returncode == 0
        wait_for(lambda: int(status_field(daemon, "shadow pages").split()[0]) > 8, 10,
                 "the VM to rebuild its shadow pages")
        assert echo(daemon.path("vm0/state"), "pause").returncode == 0
    assert echo(daemon.path("vm0/state"), "run").returncode == 0
    for kind in ("fast", "legacy"):  # running: a task beside the vCPUs
        steps = int(status_field(daemon, "steps"))
        assert echo(path, kind).returncode == 0
        wait_for(lambda before=steps: int(status_field(daemon, "steps")) > before, 10, "steps")
    assert daemon.read("vm0/state") == "running\n"


def test_echo_legacy_zaps_every_page_of_a_paused_vm(daemon):
    wait_for(lambda: int(status_field(daemon, "shadow pages").split()[0]) > 8, 10, "pages")
    assert echo(daemon.path("vm0/state"), "pause").returncode == 0
    zapped = int(daemon.read("kvm/mmu_shadow_zapped"))
    done = echo(daemon.path("vm0/zap_all"), "legacy")
    assert done.returncode == 0 and done.stderr == ""
    assert int(status_field(daemon, "shadow pages").split()[0]) <= 4
    assert int(daemon.read("kvm/mmu_shadow_zapped")) > zapped
    assert echo(daemon.path("vm0/state"), "run").returncode == 0


# The whole matrix of refused words: tests/test_fs_tree.py.
@pytest.mark.parametrize("word", ["Fast", "fast\n\n", "Legacy", "legacy slow"])
def test_zap_all_refuses_other_words(daemon, word):
    assert_refused(shell_write(daemon.path("vm0/zap_all"), word))


def test_echo_of_a_bad_zap_word_is_a_write_error_of_einval(daemon):
    done = subprocess.run(["bash", "-c", 'echo all > "$0"', str(daemon.path("vm0/zap_all"))],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 1
    assert "echo: write error: Invalid argument" in done.stderr, done.stderr

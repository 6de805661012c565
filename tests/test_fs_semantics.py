"""What sysfs and debugfs answer, through a real mount and real tools (docs/control-files.md §11).

Names are never created, removed, renamed or linked; chmod, chown and touch are kept (and never
make a file without a store writable); a write(2) to a sysfs-like file stores at most a page
and returns that count, a debugfs file takes it whole; a number of any length written to a
file is refused with its errno and never reaches the log as a traceback; mapping a symbol that
is mapped already adds no line to kvm/isolation/mappings.
"""

from __future__ import annotations

import errno
import os
import stat
import subprocess
from pathlib import Path

import pytest

from tests.fusemount import assert_refused, echo, serving, shell_write

HUGE = "9" * 10240  # past Python's 4300-digit conversion limit


@pytest.fixture(scope="module")
def daemon(workdir):
    yield from serving(workdir / "semantics", "--seed", "3", "--mem", "16M",
               "--param", "address_space_isolation=1")


def run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True, check=False)


def errno_of(call, *args) -> int | None:
    with pytest.raises(OSError) as e:
        call(*args)
    return e.value.errno


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def refused_at_open(done: subprocess.CompletedProcess) -> None:
    """`echo … > f` whose open failed with EACCES: the shell reports the redirection."""
    assert done.returncode != 0 and "Permission denied" in done.stderr, done


# -- names --------------------------------------------------------------------------------------

DIRS = ["parameters", "kvm", "vm0", "kvm/isolation"]


@pytest.mark.parametrize("where", DIRS)
def test_creating_a_file_is_eacces(daemon, where):
    """lookup_open(): a directory without ->create refuses O_CREAT of a new name; so does
    vfs_create() for mknod(2) of a regular file."""
    new = daemon.path(f"{where}/new")
    assert errno_of(os.open, new, os.O_CREAT | os.O_WRONLY, 0o644) == errno.EACCES
    assert errno_of(os.mknod, new, stat.S_IFREG | 0o600) == errno.EACCES
    done = run("touch", str(new))
    assert done.returncode == 1 and "Permission denied" in done.stderr
    assert not new.exists()


@pytest.mark.parametrize("where", DIRS)
def test_every_other_change_of_names_is_eperm(daemon, where):
    """kernfs_iop_mkdir/rmdir/rename without syscall_ops; vfs_mknod/symlink/link/unlink without
    the directory's method; debugfs directories have only ->lookup."""
    d = daemon.path(where)
    existing = next(d / n for n in sorted(os.listdir(d)) if (d / n).is_file())
    calls = [(os.mkdir, d / "new"), (os.mknod, d / "new", stat.S_IFIFO | 0o600),
             (os.symlink, "x", d / "new"),
             (os.link, existing, d / "new"), (os.rename, existing, d / "new"),
             (os.unlink, existing)]
    for call, *args in calls:
        assert errno_of(call, *args) == errno.EPERM, call.__name__
    assert errno_of(os.rmdir, daemon.path("vm0/dirty_log")) == errno.EPERM
    for cmd in (["mkdir", str(d / "new")], ["rm", "-f", str(existing)],
                ["mv", str(existing), str(d / "new")], ["ln", "-s", "x", str(d / "new")],
                ["ln", str(existing), str(d / "new")], ["mknod", str(d / "new"), "p"]):
        done = run(*cmd)
        assert done.returncode == 1 and "Operation not permitted" in done.stderr, (cmd, done)
    assert existing.exists() and not (d / "new").exists()


# -- attributes ---------------------------------------------------------------------------------


def test_chmod_chown_and_touch_show_in_ls(daemon):
    path = daemon.path("vm0/inject")
    try:
        assert run("chmod", "600", str(path)).returncode == 0
        assert run("chown", "65534:65534", str(path)).returncode == 0
        assert run("touch", "-d", "2001-02-03 04:05:06 UTC", str(path)).returncode == 0
        st = os.stat(path)
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o600, 65534, 65534)
        assert st.st_mtime == 981173106
        fields = run("ls", "-l", "--time-style=+%Y", str(path)).stdout.split()
        assert fields[0] == "-rw-------" and fields[2:4] == ["nobody", "nogroup"]
        assert fields[5] == "2001"
        assert run("chmod", "750", str(daemon.path("kvm/isolation"))).returncode == 0
        assert mode(daemon.path("kvm/isolation")) == 0o750
    finally:
        run("chmod", "644", str(path))
        run("chown", "0:0", str(path))
        run("chmod", "755", str(daemon.path("kvm/isolation")))
    assert mode(path) == 0o644


def test_a_read_only_parameter_made_0644_still_refuses_the_store(daemon):
    """kernel/params.c gives a 0444 parameter no store ("Do not allow runtime DAC changes
    to make param writable"): after chmod the open passes kernfs's mode check, and the write
    fails in module_attr_store with EIO.  The value never changes."""
    path = daemon.path("parameters/mmio_caching")
    try:
        assert run("chmod", "644", str(path)).returncode == 0
        assert mode(path) == 0o644
        fd = os.open(path, os.O_WRONLY)
        try:
            assert errno_of(os.write, fd, b"0\n") == errno.EIO
        finally:
            os.close(fd)
        assert_refused(shell_write(path, "0\n"), "Input/output error")
    finally:
        assert run("chmod", "444", str(path)).returncode == 0
    assert daemon.read("parameters/mmio_caching") == "Y\n"
    refused_at_open(echo(path, "0"))  # back to 0444: refused at the open, root included


@pytest.mark.parametrize("path", ["vm0/status", "kvm/pages_4k", "kvm/fault_log"])
def test_chmod_never_makes_a_file_without_a_store_writable(daemon, path):
    try:
        assert run("chmod", "666", str(daemon.path(path))).returncode == 0
        refused_at_open(echo(daemon.path(path), "0"))
    finally:
        run("chmod", "444", str(daemon.path(path)))


def test_a_parameter_chmod_0444_refuses_root_and_chown_lets_its_owner_write(daemon):
    path = daemon.path("parameters/mmu_audit_ratelimit_burst")
    try:
        assert run("chmod", "444", str(path)).returncode == 0
        refused_at_open(echo(path, "12"))  # sysfs: even root
        assert run("chmod", "644", str(path)).returncode == 0
        assert run("chown", "nobody", str(path)).returncode == 0
        assert shell_write(path, "12\n", user="nobody").returncode == 0
        assert daemon.read("parameters/mmu_audit_ratelimit_burst") == "12\n"
    finally:
        run("chown", "root", str(path))
        run("chmod", "644", str(path))
        assert shell_write(path, "10\n").returncode == 0
    assert shell_write(path, "11\n", user="nobody").returncode == 1


# -- writes larger than a page ------------------------------------------------------------------


def test_a_parameter_stores_one_page_of_a_larger_write(daemon, workdir):
    """kernfs_fop_write_iter(): len = min(count, PAGE_SIZE); the store's count comes back."""
    path = daemon.path("parameters/mmu_audit_ratelimit_ms")
    try:
        fd = os.open(path, os.O_WRONLY)
        try:
            assert os.write(fd, b"7\n" + b"\0" * 4998) == 4096  # a short write
        finally:
            os.close(fd)
        assert daemon.read("parameters/mmu_audit_ratelimit_ms") == "7\n"
        # dd writes the rest after the short write: a page of NULs, an empty value: EINVAL.
        block = workdir / "block"
        block.write_bytes(b"8\n" + b"\0" * 8190)
        done = run("dd", f"if={block}", f"of={path}", "bs=8192", "count=1")
        assert done.returncode == 1 and "Invalid argument" in done.stderr, done
        assert "4096 bytes" in done.stderr
        assert daemon.read("parameters/mmu_audit_ratelimit_ms") == "8\n"
    finally:
        assert shell_write(path, "5000\n").returncode == 0


def test_a_debugfs_stat_takes_a_larger_write_whole(daemon, workdir):
    """simple_attr_write(): parses the first 23 bytes and claims the whole count."""
    path = daemon.path("kvm/exits")
    assert echo(daemon.path("vm0/state"), "pause").returncode == 0
    try:
        fd = os.open(path, os.O_WRONLY)
        try:
            assert os.write(fd, b"0\n" + b"\0" * 4998) == 5000
        finally:
            os.close(fd)
        assert daemon.read("kvm/exits") == "0\n"
        block = workdir / "zero"
        block.write_bytes(b"0\n" + b"\0" * 8190)
        done = run("dd", f"if={block}", f"of={path}", "bs=8192", "count=1")
        assert done.returncode == 0 and "8192 bytes" in done.stderr, done
        block.write_bytes(b"5\n" + b"\0" * 8190)
        done = run("dd", f"if={block}", f"of={path}", "bs=8192", "count=1")
        assert done.returncode == 1 and "Invalid argument" in done.stderr, done
    finally:
        assert echo(daemon.path("vm0/state"), "run").returncode == 0


# -- numbers of any length ----------------------------------------------------------------------


def test_ten_thousand_digits_are_erange_and_no_traceback(daemon):
    path = daemon.path("parameters/mmu_audit_ratelimit_ms")
    assert_refused(shell_write(path, HUGE + "\n"), "Numerical result out of range")
    fd = os.open(path, os.O_WRONLY)
    try:
        assert errno_of(os.write, fd, HUGE.encode()) == errno.ERANGE
    finally:
        os.close(fd)
    # echo: the shell's buffer splits the line; the last piece is a bare "\n" (EINVAL), as on
    # a real sysfs file.  What matters: refused, unchanged, nothing in the log.
    assert run("bash", "-c", f'echo {HUGE} > "{path}"').returncode == 1
    assert daemon.read("parameters/mmu_audit_ratelimit_ms") == "5000\n"
    assert_refused(shell_write(daemon.path("parameters/mmu_audit"), HUGE))  # EINVAL, its setter
    # debugfs files take a write whole: kvm/mmu-debug hands all 10,240 digits to the setter.
    assert_refused(shell_write(daemon.path("kvm/mmu-debug"), HUGE))
    assert_refused(shell_write(daemon.path("kvm/exits"), HUGE), "Numerical result out of range")
    assert_refused(shell_write(daemon.path("vm0/memslots"), f"add 9 {HUGE[:4000]} 0x1000\n"),
                   "Numerical result out of range")
    log = daemon.log()
    assert "Traceback" not in log and "fs_callback_error" not in log


# -- kvm/isolation/map --------------------------------------------------------------------------


def test_mapping_a_mapped_symbol_again_adds_no_line(daemon):
    before = daemon.read("kvm/isolation/mappings").splitlines()
    for _ in range(20):
        assert echo(daemon.path("kvm/isolation/map"), "mmu_page_hash").returncode == 0
        assert echo(daemon.path("kvm/isolation/map"), "kvm").returncode == 0  # mapped at start
    after = daemon.read("kvm/isolation/mappings").splitlines()
    assert after[:len(before)] == before
    assert [line.split()[-1] for line in after[len(before):]] == ["mmu_page_hash"]

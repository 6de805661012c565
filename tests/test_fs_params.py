"""parameters/ and kvm/mmu-debug through a real mount: sysfs parse matrix, modes, errors."""

import errno
import os
import stat
import subprocess

import pytest

from tests.fusemount import assert_refused, cat, echo, shell_write


@pytest.fixture(autouse=True)
def audit_off(daemon):
    """Each test starts with the audit off and default limits."""
    yield
    for name, text in (("mmu_audit", "0"), ("mmu_audit_ratelimit_ms", "5000"),
                       ("mmu_audit_ratelimit_burst", "10"), ("mmu_audit_scope", "full")):
        assert shell_write(daemon.path(f"parameters/{name}"), text).returncode == 0


def test_defaults_and_modes(daemon):
    expect = {"mmu_audit": ("N\n", 0o644), "mmu_audit_ratelimit_ms": ("5000\n", 0o644),
              "mmu_audit_ratelimit_burst": ("10\n", 0o644), "mmu_audit_scope": ("full\n", 0o644),
              "page_fault_stack": ("Y\n", 0o444), "address_space_isolation": ("N\n", 0o444),
              "mmio_caching": ("Y\n", 0o444)}
    assert sorted(os.listdir(daemon.path("parameters"))) == sorted(expect)
    for name, (content, mode) in expect.items():
        st = os.stat(daemon.path(f"parameters/{name}"))
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (mode, 0, 0)
        assert daemon.read(f"parameters/{name}") == content


@pytest.mark.parametrize("text", ["1", "1\n", "+1", "01", "001"])
def test_mmu_audit_accepts(daemon, text):
    assert shell_write(daemon.path("parameters/mmu_audit"), text).returncode == 0
    assert daemon.read("parameters/mmu_audit") == "Y\n"
    assert daemon.read("kvm/mmu-debug") == "1\n"


# The whole refusal matrices are in tests/test_fs_tree.py (in-process, with no request sent);
# here a few of each reach write(2) through the kernel.
@pytest.mark.parametrize("text", ["y", "2", "1\n\n", "99999999999999999999"])
def test_mmu_audit_refuses(daemon, text):
    assert_refused(shell_write(daemon.path("parameters/mmu_audit"), text))
    assert daemon.read("parameters/mmu_audit") == "N\n"


def test_echo_enables_and_disables(daemon):
    assert echo(daemon.path("parameters/mmu_audit"), "1").returncode == 0
    assert daemon.read("parameters/mmu_audit") == "Y\n"
    assert echo(daemon.path("parameters/mmu_audit"), "0").returncode == 0
    assert daemon.read("parameters/mmu_audit") == "N\n"


def test_mmu_debug_mirrors_mmu_audit(daemon):
    assert daemon.read("kvm/mmu-debug") == "0\n"
    assert echo(daemon.path("kvm/mmu-debug"), "1").returncode == 0
    assert daemon.read("parameters/mmu_audit") == "Y\n"
    assert echo(daemon.path("parameters/mmu_audit"), "0").returncode == 0
    assert daemon.read("kvm/mmu-debug") == "0\n"
    for bad in ("2", "y", "maybe"):
        assert_refused(shell_write(daemon.path("kvm/mmu-debug"), bad))
    assert daemon.read("kvm/mmu-debug") == "0\n"


@pytest.mark.parametrize(("text", "value"), [("42", "42"), ("42\n", "42"), ("+42", "42"),
                                             ("0x2a", "42"), ("052", "42"), ("0", "0"),
                                             ("00", "0"), ("4294967295", "4294967295")])
def test_uint_accepts(daemon, text, value):
    assert shell_write(daemon.path("parameters/mmu_audit_ratelimit_ms"), text).returncode == 0
    assert daemon.read("parameters/mmu_audit_ratelimit_ms") == value + "\n"


@pytest.mark.parametrize(("text", "message"), [
    ("08", "Invalid argument"), ("42\n\n", "Invalid argument"),
    ("4294967296", "Numerical result out of range"),
])
def test_uint_refuses(daemon, text, message):
    assert_refused(shell_write(daemon.path("parameters/mmu_audit_ratelimit_burst"), text), message)
    assert daemon.read("parameters/mmu_audit_ratelimit_burst") == "10\n"


def test_scope(daemon):
    assert echo(daemon.path("parameters/mmu_audit_scope"), "incremental").returncode == 0
    assert daemon.read("parameters/mmu_audit_scope") == "incremental\n"
    for bad in ("Full", "full\n\n", "partial", " full"):
        assert_refused(shell_write(daemon.path("parameters/mmu_audit_scope"), bad))
    assert daemon.read("parameters/mmu_audit_scope") == "incremental\n"


@pytest.mark.parametrize(("name", "default"), [
    ("page_fault_stack", "Y\n"), ("address_space_isolation", "N\n"), ("mmio_caching", "Y\n")])
def test_read_only_parameter_refuses_root(daemon, name, default):
    path = daemon.path(f"parameters/{name}")
    done = echo(path, "1" if default == "N\n" else "0")
    assert done.returncode != 0 and "Permission denied" in done.stderr
    for flags in (os.O_WRONLY, os.O_RDWR):
        with pytest.raises(PermissionError):
            os.open(path, flags)
    with pytest.raises(PermissionError):
        os.truncate(path, 0)
    assert cat(path) == default


def test_write_semantics(daemon):
    """Offsets are ignored, a zero-length write stores nothing, each write is one store."""
    path = daemon.path("parameters/mmu_audit_ratelimit_ms")
    fd = os.open(path, os.O_WRONLY)
    try:
        assert os.write(fd, b"") == 0
        assert os.pwrite(fd, b"7", 3) == 1
        with pytest.raises(OSError) as e:
            os.write(fd, b"x")
        assert e.value.errno == errno.EINVAL
    finally:
        os.close(fd)
    assert cat(path) == "7\n"
    append = subprocess.run(["sh", "-c", 'echo 8 >> "$0"', str(path)], check=False)
    assert append.returncode == 0
    assert cat(path) == "8\n"


def test_reads_follow_offsets(daemon):
    with open(daemon.path("parameters/mmu_audit_ratelimit_ms"), "rb", buffering=0) as f:
        assert f.read(2) == b"50"
        assert f.read() == b"00\n"
        assert f.read() == b""


def test_unknown_paths(daemon):
    for rel in ("parameters/nope", "kvm/nope", "nope/x", "parameters/mmu_audit/x"):
        with pytest.raises((FileNotFoundError, NotADirectoryError)):
            os.stat(daemon.path(rel))
    assert shell_write(daemon.path("parameters/new"), "1").returncode != 0


def test_bash_echo_reports_invalid_argument(daemon):
    done = subprocess.run(["bash", "-c", 'echo y > "$0"', str(daemon.path("parameters/mmu_audit"))],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 1
    assert "write error: Invalid argument" in done.stderr

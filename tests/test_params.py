"""Module parameters parse and render as kernel/params.c and lib/kstrtox.c do."""

import errno

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mmud.uapi.params import ParamError, Params, kstrtoull

MMU_AUDIT_ON = ["1", "1\n", "+1", "01", "001", b"1\n", "1\0junk"]
MMU_AUDIT_OFF = ["0", "0\n", "+0", "0000"]
MMU_AUDIT_REFUSED = ["y", "Y", "n", "on", "true", "2", "10", "-1", "-0", "0x1", " 1", "1 ",
                     "1\n\n", "1a", "\n", "", "99999999999999999999"]


@pytest.mark.parametrize("text", MMU_AUDIT_ON)
def test_mmu_audit_accepts_one(text):
    p = Params()
    p["mmu_audit"] = text
    assert p["mmu_audit"] is True
    assert p.render("mmu_audit") == b"Y\n"


@pytest.mark.parametrize("text", MMU_AUDIT_OFF)
def test_mmu_audit_accepts_zero(text):
    p = Params({"mmu_audit": "1"})
    p["mmu_audit"] = text
    assert p.render("mmu_audit") == b"N\n"


@pytest.mark.parametrize("text", MMU_AUDIT_REFUSED)
def test_mmu_audit_refuses_with_einval(text):
    p = Params()
    with pytest.raises(ParamError) as e:
        p["mmu_audit"] = text
    assert e.value.errno == errno.EINVAL
    assert p["mmu_audit"] is False


@pytest.mark.parametrize(("text", "value"), [
    ("42", 42), ("42\n", 42), ("+42", 42), ("0x2a", 42), ("052", 42), ("0X2A", 42),
    ("0", 0), ("0\n", 0), ("00", 0), ("4294967295", 2**32 - 1),
])
def test_uint_accepts(text, value):
    p = Params()
    p["mmu_audit_ratelimit_ms"] = text
    assert p["mmu_audit_ratelimit_ms"] == value
    assert p.render("mmu_audit_ratelimit_ms") == b"%d\n" % value


@pytest.mark.parametrize(("text", "err"), [
    ("08", errno.EINVAL), ("0x", errno.EINVAL), ("4 2", errno.EINVAL), (" 42", errno.EINVAL),
    ("42 ", errno.EINVAL), ("42\n\n", errno.EINVAL), ("-1", errno.EINVAL), ("", errno.EINVAL),
    ("++1", errno.EINVAL), ("4294967296", errno.ERANGE), ("99999999999999999999", errno.ERANGE),
])
def test_uint_refuses(text, err):
    p = Params()
    with pytest.raises(ParamError) as e:
        p["mmu_audit_ratelimit_burst"] = text
    assert e.value.errno == err
    assert p["mmu_audit_ratelimit_burst"] == 10


@pytest.mark.parametrize("text", ["incremental", "incremental\n"])
def test_scope_accepts(text):
    p = Params()
    p["mmu_audit_scope"] = text
    assert p.render("mmu_audit_scope") == b"incremental\n"


@pytest.mark.parametrize("text", ["Full", "full\n\n", " full", "incr", "", "full "])
def test_scope_refuses(text):
    p = Params()
    with pytest.raises(ParamError) as e:
        p["mmu_audit_scope"] = text
    assert e.value.errno == errno.EINVAL
    assert p["mmu_audit_scope"] == "full"


def test_read_only_params_refuse_run_time_stores():
    p = Params()
    for name, default in (("page_fault_stack", b"Y\n"), ("address_space_isolation", b"N\n"),
                          ("mmio_caching", b"Y\n")):
        assert p.mode(name) == 0o444
        assert p.render(name) == default
        with pytest.raises(PermissionError) as e:
            p[name] = "0"
        assert e.value.errno == errno.EACCES


def test_address_space_isolation_is_off_by_default_as_in_the_rfc():
    assert Params()["address_space_isolation"] is False
    assert Params({"address_space_isolation": "1"})["address_space_isolation"] is True


@pytest.mark.parametrize(("text", "value"), [
    ("0", False), ("n", False), ("No", False), ("1", True), ("yes", True), ("Y\n", True),
    (None, True), ("on", True), ("ON\n", True), ("oN", True), ("off", False), ("OFF\n", False),
    ("oFx", False), ("onion", True),
])
def test_load_time_bool(text, value):
    """v5.16's kstrtobool: one character for y/n/1/0, two for on/off, the rest unread."""
    assert Params({"mmio_caching": text})["mmio_caching"] is value


@pytest.mark.parametrize("text", ["true", "false", "t", "f", "2", "", "\n", " y", "o", "o\n", "ox"])
def test_load_time_bool_refuses_what_a_v5_16_kernel_refuses(text):
    with pytest.raises(ParamError) as e:
        Params({"page_fault_stack": text})
    assert e.value.errno == errno.EINVAL


def test_load_time_errors():
    with pytest.raises(ParamError) as e:
        Params({"no_such": "1"})
    assert e.value.errno == errno.ENOENT
    with pytest.raises(ParamError):
        Params({"mmu_audit": None})  # no NOARG flag on the mmu_audit ops


def test_watchers_see_changes_only():
    p, seen = Params(), []
    p.watch(lambda name, value: seen.append((name, value)))
    p["mmu_audit"] = "1"
    p["mmu_audit"] = "1\n"
    p["mmu_audit_scope"] = "incremental"
    with pytest.raises(ParamError):
        p["mmu_audit"] = "2"
    assert seen == [("mmu_audit", True), ("mmu_audit_scope", "incremental")]


def test_names_and_modes():
    p = Params()
    assert p.names()[0] == "mmu_audit"
    assert {p.mode(n) for n in p.names()} == {0o644, 0o444}


@given(st.integers(min_value=0, max_value=2**64 - 1), st.sampled_from(["%d", "%#x", "0%o"]))
def test_kstrtoull_round_trips_base_zero(n, fmt):
    text = fmt % n if n or fmt == "%d" else "0"
    assert kstrtoull(text + "\n", 0) == n


# A number longer than Python converts (4300 decimal digits) is judged by its digit count:
# ERANGE as _parse_integer() flags it, never a ValueError from int().
HUGE = [("9" * 10240, 0), ("9" * 10240 + "\n", 10), ("1" + "0" * 20, 0), ("0x1" + "0" * 16, 0),
        ("0x" + "f" * 5000, 16), ("02" + "0" * 21, 0), ("7" * 30000, 8), ("+" + "9" * 4301, 10)]


@pytest.mark.parametrize(("text", "base"), HUGE, ids=lambda v: f"{str(v)[:12]}…")
def test_kstrtoull_refuses_a_number_of_any_length_past_64_bits_with_erange(text, base):
    with pytest.raises(ParamError) as e:
        kstrtoull(text, base)
    assert e.value.errno == errno.ERANGE


@pytest.mark.parametrize(("text", "base", "value"), [
    ("0" * 10240 + "1", 10, 1), ("0" * 10240, 0, 0), ("0x" + "0" * 5000 + "ff", 0, 255),
    ("0" * 5000 + "18446744073709551615", 10, 2**64 - 1),
    ("0" * 5000 + "1777777777777777777777", 0, 2**64 - 1),
], ids=lambda v: f"{str(v)[:12]}…")
def test_kstrtoull_leading_zeros_do_not_count_towards_the_width(text, base, value):
    assert kstrtoull(text, base) == value


def test_kstrtoull_checks_the_width_before_the_trailing_text():
    """As kstrtoull(): an overflow is ERANGE even when junk follows the digits."""
    with pytest.raises(ParamError) as e:
        kstrtoull("9" * 10240 + "junk", 10)
    assert e.value.errno == errno.ERANGE


@pytest.mark.parametrize("name", ["mmu_audit_ratelimit_ms", "mmu_audit_ratelimit_burst"])
def test_a_uint_parameter_refuses_ten_thousand_digits_with_erange(name):
    p = Params()
    with pytest.raises(ParamError) as e:
        p[name] = "9" * 10240 + "\n"
    assert e.value.errno == errno.ERANGE
    assert p.render(name) == Params().render(name)


def test_mmu_audit_refuses_ten_thousand_digits_with_einval():
    with pytest.raises(ParamError) as e:
        Params()["mmu_audit"] = "1" * 10240
    assert e.value.errno == errno.EINVAL  # mmu_audit_set(): every parse failure is EINVAL

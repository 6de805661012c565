"""KVM module parameters, parsed and rendered exactly as /sys/module/kvm/parameters does.

One `Params` instance plays the kernel's parameter block: it is shared by every VM (module
parameters are global), takes load-time values the way `modprobe kvm name=value` does, and
takes run-time stores the way one write(2) to the sysfs file does: the bytes are handed to the
parameter's setter as written (a trailing newline from `echo` included, cut at the first NUL
like the kernel's C string), a bad value fails with the setter's errno and changes nothing.

Parsers follow lib/kstrtox.c and kernel/params.c of Linux v5.16 (docs/control-files.md):

- `mmu_audit` uses the custom setter of arch/x86/kvm/mmu/mmu_audit.c: kstrtoul base 10, only 0
  or 1, every failure EINVAL; it reads back bool style, "Y\\n"/"N\\n".
- uint parameters use kstrtouint base 0 (hex `0x`, octal leading `0`), EINVAL or ERANGE.
- bool parameters use v5.16's kstrtobool: the first character decides for y/Y/1 (true) and
  n/N/0 (false), the first two for on/off (`o`/`O` then `n`/`N` or `f`/`F`); anything else is
  EINVAL.  t/f and true/false arrived later (v5.19); mmud models v5.16 so that the whole
  parameter block is one consistent kernel version.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Mapping
from dataclasses import dataclass

Value = bool | int | str

# The kernel's C string ends at the first NUL; sysfs NUL-terminates what was written.
_NUL = "\0"
_U32_MAX = 0xFFFF_FFFF
_U64_MAX = 0xFFFF_FFFF_FFFF_FFFF
_DIGITS = {8: "01234567", 10: "0123456789", 16: "0123456789abcdefABCDEF"}
# Digits of U64_MAX in each base: a number with more (leading zeros aside) overflows.
_U64_DIGITS = {8: 22, 10: 20, 16: 16}


class ParamError(ValueError):
    """A value the parameter's setter refuses; `errno` is what write(2) would fail with."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(message)
        self.errno = err


def _fixup_radix(s: str, base: int) -> tuple[str, int]:
    """_parse_integer_fixup_radix(): base 0 picks 16 for `0x<hexdigit>`, 8 for a leading 0."""
    if base == 0:
        if s[:1] == "0":
            base = 16 if s[1:2] in ("x", "X") and s[2:3] and s[2] in _DIGITS[16] else 8
        else:
            base = 10
    if base == 16 and s[:1] == "0" and s[1:2] in ("x", "X"):
        s = s[2:]
    return s, base


def kstrtoull(s: str, base: int) -> int:
    """lib/kstrtox.c kstrtoull(): one optional `+`, digits, one optional `\\n`, end."""
    if s[:1] == "+":
        s = s[1:]
    s, base = _fixup_radix(s, base)
    digits = _DIGITS[base]
    n = 0
    while n < len(s) and s[n] in digits:
        n += 1
    if n == 0:
        raise ParamError(errno.EINVAL, "no digits")
    # _parse_integer() flags an overflow as it goes; here the count of significant digits
    # tells first, so a number of any length is judged without converting it whole (Python
    # refuses to convert a decimal string of more than 4300 digits).
    significant = s[:n].lstrip("0")
    if len(significant) > _U64_DIGITS[base]:
        raise ParamError(errno.ERANGE, "overflow")
    value = int(significant or "0", base)
    if value > _U64_MAX:
        raise ParamError(errno.ERANGE, "overflow")
    rest = s[n:]
    if rest not in ("", "\n"):
        raise ParamError(errno.EINVAL, f"trailing characters {rest!r}")
    return value


def kstrtouint(s: str, base: int) -> int:
    value = kstrtoull(s, base)
    if value > _U32_MAX:
        raise ParamError(errno.ERANGE, "out of range for unsigned int")
    return value


def kstrtobool(s: str) -> bool:
    """lib/kstrtox.c kstrtobool() of v5.16: `[yY1]…` true, `[nN0]…` false, `[oO][nN]…` true,
    `[oO][fF]…` false; only those characters are looked at."""
    first = s[:1]
    if first in ("y", "Y", "1"):
        return True
    if first in ("n", "N", "0"):
        return False
    if first in ("o", "O"):
        second = s[1:2]
        if second in ("n", "N"):
            return True
        if second in ("f", "F"):
            return False
    raise ParamError(errno.EINVAL, "not a boolean")


def _render_bool(value: Value) -> bytes:
    return b"Y\n" if value else b"N\n"


def _set_mmu_audit(s: str) -> bool:
    """mmu_audit_set(): kstrtoul base 10; any parse failure or a number other than 0/1 is EINVAL."""
    try:
        value = kstrtoull(s, 10)
    except ParamError as e:
        raise ParamError(errno.EINVAL, str(e)) from None
    if value not in (0, 1):
        raise ParamError(errno.EINVAL, "mmu_audit takes 0 or 1")
    return bool(value)


def _set_uint(s: str) -> int:
    return kstrtouint(s, 0)


def _render_uint(value: Value) -> bytes:
    return b"%u\n" % int(value)


AUDIT_SCOPES = ("full", "incremental")


def _set_scope(s: str) -> str:
    word = s.removesuffix("\n")
    if word not in AUDIT_SCOPES:
        raise ParamError(errno.EINVAL, f"scope is one of {', '.join(AUDIT_SCOPES)}")
    return word


def _render_str(value: Value) -> bytes:
    return f"{value}\n".encode()


@dataclass(frozen=True)
class ParamDesc:
    """A parameter: sysfs mode, default, setter (text -> value), getter (value -> bytes)."""

    name: str
    mode: int
    default: Value
    set: Callable[[str], Value]
    get: Callable[[Value], bytes]
    noarg: bool = False  # KERNEL_PARAM_OPS_FL_NOARG: a bare `name` at load time means true


def _bool(name: str, mode: int, default: bool) -> ParamDesc:
    return ParamDesc(name, mode, default, kstrtobool, _render_bool, noarg=True)


# docs/control-files.md §10.1, in the order `ls parameters/` shows them.
PARAMS: tuple[ParamDesc, ...] = (
    ParamDesc("mmu_audit", 0o644, False, _set_mmu_audit, _render_bool),
    ParamDesc("mmu_audit_ratelimit_ms", 0o644, 5000, _set_uint, _render_uint),
    ParamDesc("mmu_audit_ratelimit_burst", 0o644, 10, _set_uint, _render_uint),
    ParamDesc("mmu_audit_scope", 0o644, "full", _set_scope, _render_str),
    _bool("page_fault_stack", 0o444, True),
    _bool("address_space_isolation", 0o444, False),  # off by default, as in the RFC series
    _bool("mmio_caching", 0o444, True),
)
PARAM_BY_NAME: dict[str, ParamDesc] = {p.name: p for p in PARAMS}

Watcher = Callable[[str, Value], None]


def _text(raw: str | bytes) -> str:
    """The setter's view of a write: bytes as latin-1 (no byte is lost), cut at the first NUL."""
    text = raw.decode("latin-1") if isinstance(raw, bytes) else raw
    return text.split(_NUL, 1)[0]


class Params:
    """The kvm module's parameter block: typed current values plus sysfs-exact parse/render."""

    def __init__(self, load: Mapping[str, str | None] | None = None) -> None:
        """Apply load-time values (`modprobe kvm name=value`; None is a bare `name`).

        Load time is the only way to set a 0444 parameter.  An unknown name fails with ENOENT
        as the kernel's parse_args() does; a bad value with the setter's errno.
        """
        self._values: dict[str, Value] = {p.name: p.default for p in PARAMS}
        self._watchers: list[Watcher] = []
        for name, raw in (load or {}).items():
            desc = PARAM_BY_NAME.get(name)
            if desc is None:
                raise ParamError(errno.ENOENT, f"unknown parameter {name!r}")
            if raw is None and not desc.noarg:
                raise ParamError(errno.EINVAL, f"{name} needs a value")
            try:
                self._values[name] = True if raw is None else desc.set(_text(raw))
            except ParamError as e:
                raise ParamError(e.errno, f"{name}: {e}") from None

    def names(self) -> tuple[str, ...]:
        return tuple(p.name for p in PARAMS)

    def mode(self, name: str) -> int:
        return PARAM_BY_NAME[name].mode

    def __getitem__(self, name: str) -> Value:
        return self._values[name]

    def parse(self, name: str, raw: str | bytes) -> Value:
        """What a run-time store of `raw` would set, without setting it.

        Raises PermissionError (EACCES) for a parameter without write bits — sysfs refuses
        those even to root — and ParamError with the setter's errno for a refused value.
        """
        desc = PARAM_BY_NAME[name]
        if not desc.mode & 0o222:
            raise PermissionError(errno.EACCES, f"{name} is read-only at run time")
        return desc.set(_text(raw))

    def __setitem__(self, name: str, raw: str | bytes) -> None:
        """One write(2) to the sysfs file: parse, store, then tell the watchers of a change."""
        value = self.parse(name, raw)
        if value == self._values[name]:
            return  # enabling mmu_audit when on is a no-op: the static key is never re-counted
        self._values[name] = value
        for fn in tuple(self._watchers):
            fn(name, value)

    def render(self, name: str) -> bytes:
        desc = PARAM_BY_NAME[name]
        return desc.get(self._values[name])

    def render_all(self) -> dict[str, bytes]:
        """Every parameter's file text, by name: what a snapshot shows."""
        return {n: self.render(n) for n in self.names()}

    def watch(self, fn: Watcher) -> None:
        """Call fn(name, value) after every store that changes a value."""
        self._watchers.append(fn)

    def unwatch(self, fn: Watcher) -> None:
        """Stop calling fn: a destroyed VM drops its watcher from the shared block."""
        self._watchers.remove(fn)

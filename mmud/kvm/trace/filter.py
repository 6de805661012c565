"""Event filters: the kernel's grammar for numeric fields (kernel/trace/trace_events_filter.c).

    expr   := or
    or     := and ('||' and)*
    and    := unary ('&&' unary)*
    unary  := '!' unary | '(' or ')' | field op number
    op     := '==' | '!=' | '<' | '<=' | '>' | '>=' | '&'

A number is read as kstrtoull(…, 0) does (decimal, 0x hex, leading-0 octal), with a minus sign
for signed fields; `field & n` is true when any bit of n is set in the field. Any field of
the event may be named, the common ones (common_pid, …) included. A filter that does not
parse, or names a field the event does not have, is an error (the kernel's EINVAL).
String fields and the `~` glob operator are not supported: the kvmmmu events have none.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Mapping

Predicate = Callable[[Mapping[str, int]], bool]

_TOKEN = re.compile(r"\s*(?:(\|\||&&|==|!=|<=|>=|<|>|&|!|\(|\))"
                    r"|(-?[0-9][0-9a-fA-Fx]*)|([A-Za-z_][A-Za-z0-9_]*))")
_OPS: dict[str, Callable[[int, int], bool]] = {
    "==": operator.eq, "!=": operator.ne, "<": operator.lt, "<=": operator.le,
    ">": operator.gt, ">=": operator.ge, "&": lambda a, b: bool(a & b),
}


class FilterError(ValueError):
    """The filter does not parse (write() of the filter file fails with EINVAL)."""


def _number(text: str) -> int:
    sign = -1 if text.startswith("-") else 1
    digits = text.lstrip("-")
    try:
        if digits[:2].lower() == "0x":
            value = int(digits[2:], 16)
        elif len(digits) > 1 and digits.startswith("0"):
            value = int(digits[1:], 8)
        else:
            value = int(digits, 10)
    except ValueError:
        raise FilterError(f"bad number {text!r}") from None
    return sign * value


def _tokens(text: str) -> list[str]:
    out = []
    pos = 0
    text = text.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            raise FilterError(f"unexpected {text[pos:].strip()!r}")
        out.append(m.group(m.lastindex or 0))
        pos = m.end()
    return out


def compile_filter(text: str, fields: set[str]) -> Predicate | None:
    """The predicate of filter `text` over the events with `fields`; None for "0"/empty (no
    filter, as writing 0 to the filter file clears it)."""
    if text.strip() in ("", "0"):
        return None
    tokens = _tokens(text)
    pos = 0

    def peek() -> str | None:
        return tokens[pos] if pos < len(tokens) else None

    def take() -> str:
        nonlocal pos
        if pos >= len(tokens):
            raise FilterError("unexpected end of filter")
        pos += 1
        return tokens[pos - 1]

    def parse_or() -> Predicate:
        terms = [parse_and()]
        while peek() == "||":
            take()
            terms.append(parse_and())
        return terms[0] if len(terms) == 1 else (lambda f: any(t(f) for t in terms))

    def parse_and() -> Predicate:
        terms = [parse_unary()]
        while peek() == "&&":
            take()
            terms.append(parse_unary())
        return terms[0] if len(terms) == 1 else (lambda f: all(t(f) for t in terms))

    def parse_unary() -> Predicate:
        tok = take()
        if tok == "!":
            inner = parse_unary()
            return lambda f: not inner(f)
        if tok == "(":
            inner = parse_or()
            if take() != ")":
                raise FilterError("missing ')'")
            return inner
        if tok not in fields:
            raise FilterError(f"no field {tok!r}")
        op = take()
        if op not in _OPS:
            raise FilterError(f"bad operator {op!r}")
        value = _number(take())
        compare = _OPS[op]
        return lambda f: compare(f[tok], value)

    predicate = parse_or()
    if pos != len(tokens):
        raise FilterError(f"unexpected {tokens[pos]!r}")
    return predicate

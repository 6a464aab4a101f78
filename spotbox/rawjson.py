"""What orjson parses silently but spotbox refuses: duplicate keys, numbers no database keeps as written, deep nesting.

orjson keeps the last of two equal keys, reads `1e-999999` as 0.0 and integers past 64 bits as floats; PostgreSQL's
jsonb refuses some of those numbers and SQLite keeps the text, so the two databases would disagree. These checks
refuse such a status before it is stored, naming the field. They cost well under a microsecond for an ordinary
status: an exact (slower) pass over the text runs only when a cheap test of the text and of the parsed document
both say it might find something.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# Digits become "0", exponent markers "e" (the sign stays): long digit runs and negative 3-digit exponents then show
# up as plain substrings, found by bytes.find in C instead of a regular expression.
_SHAPE = bytes.maketrans(b"123456789E", b"000000000e")
# An integer past int64 has 19 digits or more, and so does a mantissa small enough to underflow (without an
# exponent, or with one under 300 in size); an exponent from -300 down has at least three digits.
_LONG_DIGITS = b"0" * 19
_NEGATIVE_EXPONENT = b"e-000"
# A key ends with `"`, optional whitespace, then `:`; any whitespace right before a colon defeats the quick count.
_SPACED_COLONS = (b" :", b"\t:", b"\n:", b"\r:")
_PREVIEW = 40


def preview(text: str, limit: int = _PREVIEW) -> str:
    """`text` cut to about `limit` characters, marked when cut: what a reason may quote of a value."""
    return text if len(text) <= limit else text[:limit] + "…"


@dataclass(slots=True, frozen=True)
class Shape:
    """What one walk of a parsed status finds: how deep it nests, how many keys, numbers to look at closer."""

    depth: int
    keys: int
    bad_integer: tuple[str, int] | None
    doubtful_floats: bool


def shape(doc: dict[str, Any], max_depth: int) -> Shape:
    """Walk `doc` once (stopping past `max_depth`): nesting, key count, an integer past int64, doubtful floats.

    A float is doubtful when it is 0 (perhaps an underflow of non-zero text) or at least 2**63 in size (perhaps an
    integer past 64 bits that orjson turned into a float); the text decides, see `number_problem`.
    """
    depth = 1
    keys = 0
    bad_integer: tuple[str, int] | None = None
    doubtful = False
    stack: list[tuple[Any, int, str]] = [(doc, 1, "")]
    while stack:
        value, level, path = stack.pop()
        depth = max(depth, level)
        if level > max_depth:
            break
        if isinstance(value, dict):
            keys += len(value)
            items: Any = value.items()
        else:
            items = enumerate(value)
        for key, child in items:
            kind = type(child)
            if kind is float:
                if child == 0.0 or abs(child) >= 2.0**63:
                    doubtful = True
            elif kind is int:
                if bad_integer is None and not INT64_MIN <= child <= INT64_MAX:
                    bad_integer = (f"{path}{key}", child)
            elif kind is dict or kind is list:
                stack.append((child, level + 1, f"{path}{key}."))
    return Shape(depth, keys, bad_integer, doubtful)


def may_repeat_keys(raw: bytes, keys: int) -> bool:
    """False when `raw` surely holds no more keys than the `keys` orjson kept (so no key repeats).

    Every key ends in `":` (unless whitespace sits before its colon); a string can add a few more, never fewer.
    """
    if any(spaced in raw for spaced in _SPACED_COLONS):
        return True
    return raw.count(b'":') > keys


def may_hold_bad_number(raw: bytes) -> bool:
    """False when no number in `raw` can be an integer past int64 or a non-zero number that rounds to 0."""
    shaped = raw.translate(_SHAPE)
    return _LONG_DIGITS in shaped or _NEGATIVE_EXPONENT in shaped


class _Bad:
    """Stands in a stdlib parse for a number or an object spotbox refuses, carrying why."""

    __slots__ = ("key", "rule")

    def __init__(self, rule: str, key: str | None = None) -> None:
        self.rule = rule
        # For an object that repeats a key: that key, which is the field to name.
        self.key = key


def _float(text: str) -> float | _Bad:
    value = float(text)
    if math.isinf(value):
        return _Bad(f"{preview(text)} is beyond the range of a double")
    mantissa = text.lower().partition("e")[0]
    if value == 0.0 and mantissa.strip("-0.") != "":
        return _Bad(f"{preview(text)} rounds to 0 as a double")
    return value


def _int(text: str) -> int | _Bad:
    # Compared as text first: int() refuses strings of more than 4300 digits.
    digits = text.lstrip("-")
    if len(digits) > 19 or not INT64_MIN <= int(text) <= INT64_MAX:
        return _Bad(f"{preview(text)} is beyond the 64-bit integer range")
    return int(text)


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any] | _Bad:
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            return _Bad("is a duplicate key (a JSON object names each key once)", key)
        seen.add(key)
    return dict(pairs)


def _find_bad(value: Any, path: str) -> tuple[str, str] | None:
    """The first refused value in document order: (field path, rule)."""
    stack: list[tuple[Any, str]] = [(value, path)]
    while stack:
        item, where = stack.pop()
        if isinstance(item, _Bad):
            if item.key is not None:
                where = f"{where}.{item.key}" if where else item.key
            return where or "payload", item.rule
        if isinstance(item, dict):
            stack.extend(reversed([(child, f"{where}.{key}" if where else key) for key, child in item.items()]))
        elif isinstance(item, list):
            stack.extend(reversed([(child, f"{where}.{i}" if where else str(i)) for i, child in enumerate(item)]))
    return None


def exact_problem(raw: bytes) -> str | None:
    """Parse `raw` again, slowly and exactly: `field: rule` for the first repeated key or refused number, or None.

    Only for a status the quick checks could not clear (or that orjson refused for an infinite number).
    """
    try:
        doc = json.loads(raw, parse_float=_float, parse_int=_int, object_pairs_hook=_pairs, parse_constant=float)
    except (ValueError, RecursionError):
        return None
    found = _find_bad(doc, "")
    return None if found is None else f"{found[0]}: {found[1]}"


def problem(raw: bytes, doc: dict[str, Any], walked: Shape) -> str | None:
    """`field: rule` when `raw` repeats a key or holds a number spotbox refuses; None for an ordinary status."""
    if walked.bad_integer is not None:
        field, value = walked.bad_integer
        return f"{field}: {preview(str(value))} is beyond the 64-bit integer range"
    repeats = may_repeat_keys(raw, walked.keys)
    numbers = walked.doubtful_floats and may_hold_bad_number(raw)
    if not repeats and not numbers:
        return None
    return exact_problem(raw)

"""What orjson parses silently but spotbox refuses: duplicate keys, numbers no database keeps as written, deep nesting.

orjson keeps the last of two equal keys, reads `1e-999999` as 0.0 and integers past 64 bits as floats; PostgreSQL's
jsonb refuses some of those numbers and SQLite keeps the text, so the two databases would disagree. These checks
refuse such a status before it is stored, naming the field. They cost about 2 microseconds for an ordinary status
(one translate of the text, a walk of its objects and arrays); an exact pass runs only when those say it might find
something: a second parse by the standard library, which names the field, up to 64 KiB; past that, bulk passes in
C (strings blanked out, keys counted, numbers read by orjson at once), a few times the cost of parsing.
"""

from __future__ import annotations

import json
import math
import re
from itertools import compress
from typing import Any, NamedTuple

import orjson

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# Digits become "0", exponent markers "e" (the sign stays), whitespace a space: long digit runs, negative 3-digit
# exponents and whitespace before a colon then show up as plain substrings, found in C without a regular expression.
_SHAPE = bytes.maketrans(b"123456789E\t\n\r", b"000000000e   ")
# An integer past int64 has 19 digits or more, and so does a mantissa small enough to underflow (without an
# exponent, or with one under 300 in size); an exponent from -300 down has at least three digits.
_LONG_DIGITS = b"0" * 19
_NEGATIVE_EXPONENT = b"e-000"
# A key ends with `"`, optional whitespace, then `:`; any whitespace right before a colon defeats the quick count.
_SPACED_COLON = b" :"
_PREVIEW = 40
# Up to this size a refused status is parsed again by the standard library to name the field; past it the text is
# checked in C-heavy passes (strings blanked out, numbers read in bulk) and the reason names `payload`.
NAMED_EXACT_MAX = 64 * 1024
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_WHITESPACE = b" \t\n\r"
# With strings emptied, what separates numbers: punctuation, and the three literals (removed first).
_PUNCTUATION = bytes.maketrans(b',[]{}:"', b"       ")


def preview(text: str, limit: int = _PREVIEW) -> str:
    """`text` cut to about `limit` characters, marked when cut: what a reason may quote of a value."""
    return text if len(text) <= limit else text[:limit] + "…"


class Shape(NamedTuple):
    """What one walk of a parsed status finds: how deep it nests, how many keys, numbers to look at closer."""

    depth: int
    keys: int
    bad_integer: tuple[str, int] | None
    doubtful_floats: bool


def shape(doc: dict[str, Any], max_depth: int, *, numbers: bool = True) -> Shape:
    """Walk `doc` once (stopping past `max_depth`): nesting, key count and, when `numbers`, an integer past int64
    and doubtful floats. Without `numbers` (the text holds no number that could be wrong) only containers are
    visited, which is what most statuses need.

    A float is doubtful when it is 0 (perhaps an underflow of non-zero text) or at least 2**63 in size (perhaps an
    integer past 64 bits that orjson turned into a float); the text decides, see `exact_problem`.
    """
    if not numbers:
        return _containers(doc, max_depth)
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


def _containers(doc: dict[str, Any], max_depth: int) -> Shape:
    """`shape` visiting objects and arrays only: nesting and key count."""
    depth = 1
    keys = len(doc)
    stack: list[tuple[Any, int]] = [(child, 2) for child in doc.values() if type(child) is dict or type(child) is list]
    while stack:
        value, level = stack.pop()
        if level > depth:
            depth = level
            if level > max_depth:
                break
        if type(value) is dict:
            keys += len(value)
            value = value.values()
        stack.extend([(child, level + 1) for child in value if type(child) is dict or type(child) is list])
    return Shape(depth, keys, None, False)


class Hints(NamedTuple):
    """What a quick look at the text says: whether a number in it could be wrong, whether the key count is exact."""

    numbers: bool
    spaced_colon: bool


def hints(raw: bytes) -> Hints:
    """One pass over the text in C: can a number be an integer past int64 or a non-zero number rounding to 0, and
    does whitespace sit before a colon (so that counting `":` may miss a key)?"""
    shaped = raw.translate(_SHAPE)
    return Hints(_LONG_DIGITS in shaped or _NEGATIVE_EXPONENT in shaped, _SPACED_COLON in shaped)


def may_repeat_keys(raw: bytes, keys: int, *, spaced_colon: bool) -> bool:
    """False when `raw` surely holds no more keys than the `keys` orjson kept (so no key repeats).

    Every key ends in `":` (unless whitespace sits before its colon); a string can add a few more, never fewer.
    """
    return spaced_colon or raw.count(b'":') > keys


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


def _unquoted(raw: bytes) -> bytes:
    """`raw` with every string emptied and whitespace removed: a key is then exactly `"":`."""
    return _STRING.sub(b'""', raw).translate(None, _WHITESPACE)


def _bad_token(unquoted: bytes) -> bytes | None:
    """The first number in `unquoted` text no database keeps as written, read in bulk rather than one by one."""
    for literal in (b"true", b"false", b"null"):
        unquoted = unquoted.replace(literal, b" ")
    tokens = unquoted.translate(_PUNCTUATION).split()
    # orjson reads them all at once (as it read the status: 1e-999 as 0.0), ten times faster than float() each.
    values = orjson.loads(b"[" + b",".join(tokens) + b"]")
    # compress/map iterate in C: only the zeros, and the integers past 2**63 in size, are looked at one by one.
    for token in set(compress(tokens, map((0.0).__eq__, values))):
        if token.lower().partition(b"e")[0].strip(b"-0.") != b"":
            return token
    if values and (max(values) >= 2**63 or min(values) < -(2**63)):
        for token in compress(tokens, map((2.0**63).__le__, map(abs, values))):
            if not any(mark in token for mark in (b".", b"e", b"E")) and isinstance(_int(token.decode()), _Bad):
                return token
    return None


def _large_problem(raw: bytes, walked: Shape, *, repeats: bool, numbers: bool) -> str | None:
    """`problem` for a status past NAMED_EXACT_MAX: exact, in passes that cost a few parses, naming `payload`."""
    unquoted = _unquoted(raw)
    if repeats and unquoted.count(b'"":') != walked.keys:
        return "payload: repeats a key in an object (a JSON object names each key once)"
    if numbers and (token := _bad_token(unquoted)) is not None:
        return f"payload: {preview(token.decode())} rounds to 0 as a double or is beyond the 64-bit integer range"
    return None


# What `screen` answers for a status nested deeper than allowed (the caller words the reason).
TOO_DEEP = "payload: too deep"


def screen(raw: bytes, doc: dict[str, Any], max_depth: int) -> str | None:
    """Everything these checks refuse, in one call: TOO_DEEP past `max_depth` levels, `field: rule` for a repeated
    key or a number spotbox refuses, None for an ordinary status (one translate of the text, one walk of its
    objects and arrays)."""
    seen = hints(raw)
    walked = shape(doc, max_depth, numbers=seen.numbers and len(raw) <= NAMED_EXACT_MAX)
    if walked.depth > max_depth:
        return TOO_DEEP
    return problem(raw, walked, seen)


def problem(raw: bytes, walked: Shape, seen: Hints) -> str | None:
    """`field: rule` when `raw` repeats a key or holds a number spotbox refuses; None for an ordinary status.

    `walked` is `shape` of the parsed document, with `numbers` when `seen.numbers` and the status is at most
    NAMED_EXACT_MAX bytes (a larger one has its numbers read from the text in bulk instead).
    """
    if walked.bad_integer is not None:
        field, value = walked.bad_integer
        return f"{field}: {preview(str(value))} is beyond the 64-bit integer range"
    repeats = may_repeat_keys(raw, walked.keys, spaced_colon=seen.spaced_colon)
    large = len(raw) > NAMED_EXACT_MAX
    numbers = walked.doubtful_floats or (large and seen.numbers)
    if not repeats and not numbers:
        return None
    if large:
        return _large_problem(raw, walked, repeats=repeats, numbers=numbers)
    return exact_problem(raw)

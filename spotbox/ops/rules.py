"""Alert rules: the built-in defaults, and a TOML file (`--alerts rules.toml`) read with the standard library.

A rule names what it watches (`kind`), when it opens, when it clears, how long the condition must hold before the
alert is active (`for_s`, on spotbox's receive clock) and a severity. See examples/alerts.toml for the format.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from spotbox.errors import ConfigError

Kind = Literal["threshold", "presence", "rejections", "unregistered"]
KINDS: tuple[Kind, ...] = ("threshold", "presence", "rejections", "unregistered")
SEVERITIES = ("info", "warning", "critical")
# The numeric fields of a stored status a threshold rule may watch.
FIELDS = ("battery_level", "latitude", "longitude", "height")
PRESENCE_STATES = ("stale", "offline")


@dataclass(frozen=True, slots=True)
class Rule:
    """One alert rule. For a threshold rule `below` or `above` opens it and `clear` closes it (hysteresis)."""

    name: str
    kind: Kind
    severity: str = "warning"
    for_s: float = 0.0
    enabled: bool = True
    field: str | None = None
    below: float | None = None
    above: float | None = None
    clear: float | None = None
    states: tuple[str, ...] = PRESENCE_STATES
    # rejections: share of a robot's statuses rejected over `window_s`, once at least `min_seen` were received.
    ratio: float = 0.1
    window_s: float = 300.0
    min_seen: int = 10

    def opens(self, value: float) -> bool:
        """True when `value` of the watched field opens an alert (threshold and rejection rules)."""
        if self.below is not None:
            return value < self.below
        assert self.above is not None
        return value > self.above

    def clears(self, value: float) -> bool:
        """True when `value` is past the clear level: an open alert of this rule ends."""
        level = self.clear
        if self.below is not None:
            return value >= (level if level is not None else self.below)
        assert self.above is not None
        return value <= (level if level is not None else self.above)


DEFAULT_RULES: tuple[Rule, ...] = (
    Rule("battery_low", "threshold", "warning", 60.0, field="battery_level", below=20, clear=25),
    Rule("not_reporting", "presence", "critical", 120.0),
    Rule("rejections_high", "rejections", "warning", 0.0, above=0.1, clear=0.1),
    Rule("unknown_robot", "unregistered", "info", 0.0, enabled=False),
)


def _number(where: str, entry: dict[str, Any], key: str, default: float | None = None) -> float | None:
    value = entry.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError("--alerts", f"{where}: {key} must be a number, not {value!r}")
    return float(value)


def parse_rule(where: str, entry: dict[str, Any]) -> Rule:
    """One `[[rule]]` table as a Rule; a ConfigError names the rule and what is wrong."""
    known = {"name", "kind", "severity", "for_s", "enabled", "field", "below", "above", "clear", "states", "ratio"}
    known |= {"window_s", "min_seen"}
    if unknown := sorted(set(entry) - known):
        raise ConfigError("--alerts", f"{where}: unknown key(s) {', '.join(unknown)}")
    name, kind = entry.get("name"), entry.get("kind")
    if not isinstance(name, str) or not name:
        raise ConfigError("--alerts", f"{where}: every rule needs a name")
    where = f"{where} ({name})"
    if kind not in KINDS:
        raise ConfigError("--alerts", f"{where}: kind must be one of {', '.join(KINDS)}, not {kind!r}")
    severity = entry.get("severity", "warning")
    if severity not in SEVERITIES:
        raise ConfigError("--alerts", f"{where}: severity must be one of {', '.join(SEVERITIES)}")
    for_s = _number(where, entry, "for_s", 0.0) or 0.0
    if for_s < 0:
        raise ConfigError("--alerts", f"{where}: for_s must not be negative")
    enabled = entry.get("enabled", True)
    if not isinstance(enabled, bool):
        raise ConfigError("--alerts", f"{where}: enabled must be true or false")
    below, above, clear = (_number(where, entry, key) for key in ("below", "above", "clear"))
    rule = Rule(str(name), kind, severity, for_s, enabled, below=below, above=above, clear=clear)
    if kind == "threshold":
        return _threshold(where, entry, rule)
    if kind == "presence":
        return _presence(where, entry, rule)
    if kind == "rejections":
        return _rejections(where, entry, rule)
    return rule


def _threshold(where: str, entry: dict[str, Any], rule: Rule) -> Rule:
    field, below, above, clear = entry.get("field"), rule.below, rule.above, rule.clear
    if field not in FIELDS:
        raise ConfigError("--alerts", f"{where}: field must be one of {', '.join(FIELDS)}, not {field!r}")
    if (below is None) == (above is None):
        raise ConfigError("--alerts", f"{where}: give exactly one of below or above")
    if clear is not None and ((below is not None and clear < below) or (above is not None and clear > above)):
        raise ConfigError("--alerts", f"{where}: clear must be on the safe side of the threshold")
    return replace(rule, field=field)


def _presence(where: str, entry: dict[str, Any], rule: Rule) -> Rule:
    states = entry.get("states", list(PRESENCE_STATES))
    if not isinstance(states, list) or not states or not set(states) <= set(PRESENCE_STATES):
        raise ConfigError("--alerts", f"{where}: states must list stale and/or offline")
    return replace(rule, states=tuple(states))


def _rejections(where: str, entry: dict[str, Any], rule: Rule) -> Rule:
    ratio = _number(where, entry, "ratio", 0.1)
    window_s = _number(where, entry, "window_s", 300.0)
    min_seen = entry.get("min_seen", 10)
    if ratio is None or window_s is None or not 0 <= ratio < 1 or window_s <= 0:
        raise ConfigError("--alerts", f"{where}: ratio must be from 0 to 1 and window_s positive")
    if not isinstance(min_seen, int) or min_seen < 1:
        raise ConfigError("--alerts", f"{where}: min_seen must be a positive integer")
    clear = min(rule.clear if rule.clear is not None else ratio, ratio)
    return replace(rule, above=ratio, below=None, clear=clear, ratio=ratio, window_s=window_s, min_seen=min_seen)


def load_rules(path: Path | None) -> tuple[Rule, ...]:
    """The rules of `path` (a TOML file of `[[rule]]` tables), or the built-in defaults for None."""
    if path is None:
        return DEFAULT_RULES
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError("--alerts", f"cannot read {path}: {exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError("--alerts", f"{path} is not valid TOML: {exc}") from None
    if unknown := sorted(set(doc) - {"rule"}):
        raise ConfigError("--alerts", f"{path}: unknown table(s) {', '.join(unknown)}; rules are [[rule]] tables")
    entries = doc.get("rule", [])
    if not isinstance(entries, list):
        raise ConfigError("--alerts", f"{path}: rules are [[rule]] tables")
    rules = tuple(parse_rule(f"{path} rule {n + 1}", entry) for n, entry in enumerate(entries))
    names = [rule.name for rule in rules]
    if duplicate := next((name for name in names if names.count(name) > 1), None):
        raise ConfigError("--alerts", f"{path}: two rules are named {duplicate!r}")
    return rules

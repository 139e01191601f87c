"""The engine's `search=` language, for the subset the FT code and tests use.

Grammar: `cond (and cond)* (or cond (and cond)*)*`, where `cond` is `field op value`,
op one of `= != < > <= >=`, value optionally quoted, `*` a wildcard. An optional
leading `Vms:`/`Hosts:`/`Events:` prefix is accepted and ignored, as the engine's REST
layer adds it itself. Statuses compare without case or underscores (`nonresponsive`
matches `non_responsive`), like the engine's enum search.
"""
from __future__ import annotations

import fnmatch
import re
import shlex
from dataclasses import dataclass
from typing import Callable, Iterable, List, Sequence, Union

Value = Union[str, int, float]


class SearchError(ValueError):
    """The search text cannot be parsed, or names a field this collection lacks."""


@dataclass(frozen=True)
class Condition:
    field: str
    op: str
    value: str


_COND = re.compile(r"^([A-Za-z_][A-Za-z_0-9.]*)\s*(!=|<=|>=|=|<|>)\s*(.*)$", re.S)
_PREFIX = re.compile(r"^\s*[A-Za-z]+\s*:\s*")


def parse(text: str) -> List[List[Condition]]:
    """Parse into OR-groups of AND-ed conditions. An empty text matches everything."""
    text = _PREFIX.sub("", text or "", count=1).strip()
    if not text:
        return []
    try:
        tokens = shlex.split(text, posix=True)
    except ValueError as e:
        raise SearchError("cannot parse search %r: %s" % (text, e)) from e
    # Re-join tokens into conditions: "a", "=", "b" or "a=b" or "a=", "b".
    groups: List[List[Condition]] = [[]]
    pending = ""
    for tok in tokens + ["and"]:
        low = tok.lower()
        if low in ("and", "or") and pending:
            m = _COND.match(pending)
            if not m or not m.group(3):
                raise SearchError("cannot parse search condition %r" % pending)
            groups[-1].append(Condition(m.group(1).lower(), m.group(2), m.group(3)))
            pending = ""
            if low == "or":
                groups.append([])
        elif low in ("and", "or"):
            raise SearchError("search %r has '%s' without a condition before it" % (text, tok))
        else:
            pending += tok
    if any(not g for g in groups):
        raise SearchError("search %r has an empty 'or' branch" % text)
    return groups


def _norm(s: str) -> str:
    return s.replace("_", "").replace("-", "").lower()


def _compare(actual: Value, op: str, wanted: str, case_sensitive: bool,
             ordered: Sequence[str] = ()) -> bool:
    if ordered:
        # Enumerations with an order (event severity): compare by rank.
        try:
            a, w = ordered.index(_norm(str(actual))), ordered.index(_norm(wanted))
        except ValueError:
            return False
    elif isinstance(actual, (int, float)):
        try:
            a, w = actual, float(wanted)
        except ValueError:
            return False
    else:
        a_s, w_s = str(actual), wanted
        if not case_sensitive:
            a_s, w_s = a_s.lower(), w_s.lower()
        if op in ("=", "!="):
            hit = fnmatch.fnmatchcase(a_s, w_s) if "*" in w_s else a_s == w_s
            return hit if op == "=" else not hit
        a, w = a_s, w_s
    return {"=": a == w, "!=": a != w, "<": a < w, ">": a > w, "<=": a <= w, ">=": a >= w}[op]


Getter = Callable[[object, str], Iterable[Value]]


def matcher(groups: List[List[Condition]], fields: dict, case_sensitive: bool = True
            ) -> Callable[[object], bool]:
    """Build a predicate. `fields` maps a field name to (getter(entity) -> values, kind),
    kind being "text", "enum" (compared without case/underscores) or a tuple giving an
    enumeration's order."""
    for group in groups:
        for c in group:
            if c.field not in fields:
                raise SearchError("unknown search field %r (known: %s)"
                                  % (c.field, ", ".join(sorted(fields))))

    def test(entity: object, c: Condition) -> bool:
        getter, kind = fields[c.field]
        values = list(getter(entity))
        if kind == "enum":
            values, wanted = [_norm(str(v)) for v in values], _norm(c.value)
            return _compare_any(values, c.op, wanted, False)
        if isinstance(kind, tuple):
            return any(_compare(v, c.op, c.value, False, kind) for v in values)
        return _compare_any(values, c.op, c.value, case_sensitive)

    def predicate(entity: object) -> bool:
        return not groups or any(all(test(entity, c) for c in g) for g in groups)

    return predicate


def _compare_any(values: List[Value], op: str, wanted: str, case_sensitive: bool) -> bool:
    if op == "!=":
        # "tag!=x" means: not tagged x (no value equals x), also when there are no values.
        return not any(_compare(v, "=", wanted, case_sensitive) for v in values)
    return any(_compare(v, op, wanted, case_sensitive) for v in values)

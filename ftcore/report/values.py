"""Reading figures out of result dicts, where any figure may be missing: a failed backend, or a
framework without that counter. Missing is None, shown as "n/a", never guessed."""

from __future__ import annotations

import json
import math
from typing import Any

NA = "n/a"

# Floats recorded by different frameworks (e.g. an lr stored as float32) count as equal
# within this relative tolerance; real setting differences are far larger.
FLOAT_RTOL = 1e-6


def num(v: Any) -> float | None:
    """A usable number or None (None, bools, strings and the like are not numbers)."""
    if isinstance(v, bool) or v is None:
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def finite(v: Any) -> float | None:
    x = num(v)
    return x if x is not None and math.isfinite(x) else None


def ratio(num: Any, den: Any) -> float | None:
    a, b = finite(num), finite(den)
    if a is None or b is None or a <= 0 or b <= 0:  # 0.0 is RunResult's "not measured" default
        return None
    return a / b


def backend_name(r: dict[str, Any], i: int) -> str:
    """The row's name; a data-parallel run's says its ranks ("torch x2")."""
    name = str(r.get("backend") or f"backend-{i}")
    world = r.get("world_size") or 1
    return f"{name} x{world}" if isinstance(world, int) and world > 1 else name


def ok_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in results if r.get("status") == "ok"]


def same(a: Any, b: Any) -> bool:
    """Deep equality; floats equal within FLOAT_RTOL, tuples equal lists."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) or isinstance(b, float):
        x, y = num(a), num(b)
        if x is None or y is None:
            return False
        if math.isnan(x) and math.isnan(y):
            return True
        return math.isclose(x, y, rel_tol=FLOAT_RTOL, abs_tol=0.0)
    return a == b


def short(v: Any, width: int = 60) -> str:
    if v is None:
        return "None"
    s = v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str)
    return s if len(s) <= width else s[: width - 3] + "..."


def fmt(v: Any, spec: str, suffix: str = "") -> str:
    x = num(v)
    if x is None:
        return NA
    if not math.isfinite(x):
        return str(x)
    return format(x, spec) + suffix


def fmt_int(v: Any) -> str:
    x = finite(v)
    return NA if x is None else f"{int(x):,}"


def fmt_text(v: Any, width: int = 40) -> str:
    if v is None or v == "":
        return NA
    return short(str(v), width)

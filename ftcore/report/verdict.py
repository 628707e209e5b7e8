"""The verdict of a compare: which backend is faster, which holds less memory, or that the runs
cannot tell; from repeated runs (ftcore.run.compare) and the statistics of ftcore.measure.stats.

Input: `repeats` = {label: [result dicts, one per run of that backend, in run order]} and the
reference label (A); every other label is a B. A run counts when it ran ok and its timed steps
were not BUSY (ftcore.measure.machine_load); BUSY runs are left out and counted.

- speed:  per run, the median of its timed step times, each taken relative to that step's median
          over every run of both sides (relative_steps: steps differ in width); ratio = B's speed
          / A's speed (= median of A's run medians / median of B's);
- memory: per run, its peak RSS; ratio = A's peak / B's peak (how many times less B holds).

Both ratios read "B's advantage over A": above 1, B is better. Outcome (ftcore.measure.stats):
"decided" when the 95% interval lies wholly outside 1 +- 5% (the winner is named), "no clear
difference" when wholly inside, else "undecided". The console line, report.md and comparison.json
all come from the one dict build_verdict returns.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

import numpy as np

from ftcore.measure.stats import BAND, compare_runs

MAX_SUGGESTED_REPEATS = 50
MIN_RUNS_FOR_INTERVAL = 3  # suggested after one run a side
# figures that must be identical across a backend's repeats: same batches, seed and threads
DETERMINISTIC = ("losses", "eval_losses", "eval_loss_before", "eval_loss", "accuracy_before",
                 "accuracy_after", "generations")


def timed_steps(r: dict[str, Any]) -> list[float]:
    """A run's timed step times: after its timing warm-up steps (compilation)."""
    skip = int((r.get("config") or {}).get("timing_warmup_steps") or 0)
    return list(r.get("step_times_s") or [])[skip:]


def busy(r: dict[str, Any]) -> bool:
    return bool((r.get("machine_load") or {}).get("busy"))


def usable(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The runs the statistics use: ok, with timed steps, on a machine that was not BUSY."""
    return [r for r in runs if r.get("status") == "ok" and timed_steps(r) and not busy(r)]


def relative_steps(a: list[list[float]], b: list[list[float]]
                   ) -> tuple[list[list[float]], list[list[float]]]:
    """Each timed step's time over that step's median across every run of both sides. Step i is
    the same batch (the same width) in every run, and widths differ a lot between steps (`longest`
    at --max-seq-len 512: 65 to 225 columns, 10 to 32 s a step at TinyLlama's size); as a share of
    its step's pooled median, a run's values vary with its backend's speed and noise, not with the
    widths it meets; a constant speed ratio between the sides comes out unchanged."""
    n = min(len(r) for r in a + b)
    ref = np.median(np.array([r[:n] for r in a + b], dtype=float), axis=0)  # (n,) per step
    return ([list(np.array(r[:n]) / ref) for r in a], [list(np.array(r[:n]) / ref) for r in b])


def run_figures(r: dict[str, Any]) -> dict[str, Any]:
    """One run's entry under verdict["repeats"]."""
    steps = timed_steps(r)
    return {
        "status": r.get("status"),
        "busy": busy(r),
        "median_step_s": statistics.median(steps) if steps else None,
        "train_time_s": r.get("train_time_s"),
        "peak_rss_mb": r.get("peak_rss_mb"),
        "loss_tokens_per_s": r.get("loss_tokens_per_s"),
    }


def _suggest_repeats(ratio: float, lo: float, hi: float, runs: int) -> int | None:
    """Runs a side that would likely decide it: the interval's half-width (log scale) shrinks as
    1/sqrt(runs) until it clears the nearer edge of the 1 +- BAND band; None if it sits on an
    edge."""
    centre, half = math.log(ratio), (math.log(hi) - math.log(lo)) / 2
    edge = math.log(1 + BAND)
    room = abs(abs(centre) - edge)
    if room < 1e-3 or half <= 0:
        return None
    return min(MAX_SUGGESTED_REPEATS, max(runs + 1, math.ceil(runs * (half / room) ** 2)))


def judge(
    kind: str, a: str, b: str, runs_a: list[dict[str, Any]], runs_b: list[dict[str, Any]]
) -> dict[str, Any]:
    """One verdict entry (kind "speed" or "memory") of B against A from their runs."""
    use_a, use_b = usable(runs_a), usable(runs_b)
    entry: dict[str, Any] = {
        "kind": kind, "pair": [a, b], "winner": None, "ratio": None, "ci_low": None,
        "ci_high": None, "p_value": None, "runs": {a: len(use_a), b: len(use_b)},
        "busy_left_out": {a: sum(map(busy, runs_a)), b: sum(map(busy, runs_b))},
        "outcome": "undecided", "suggested_repeats": None,
    }  # fmt: skip
    if not use_a or not use_b:
        return entry
    if kind == "speed":  # step times: B over A, read the other way round as speed
        s = compare_runs(*relative_steps(
            [timed_steps(r) for r in use_a], [timed_steps(r) for r in use_b])).inverted()
    else:
        peaks_a, peaks_b = ([[r.get("peak_rss_mb")] for r in u] for u in (use_a, use_b))
        if any(p[0] is None or p[0] <= 0 for p in peaks_a + peaks_b):
            return entry
        s = compare_runs(peaks_a, peaks_b).inverted()
    entry.update(
        ratio=s.ratio, ci_low=s.ci_low, ci_high=s.ci_high, p_value=s.p_value, outcome=s.outcome
    )
    if s.outcome == "decided":
        entry["winner"] = b if s.ratio > 1 else a
    elif s.ci_low is None:  # one run a side: no spread between runs to judge by
        entry["suggested_repeats"] = MIN_RUNS_FOR_INTERVAL
    elif s.outcome == "undecided":
        entry["suggested_repeats"] = _suggest_repeats(
            s.ratio, s.ci_low, s.ci_high, min(len(use_a), len(use_b))
        )
    return entry


def nondeterminism(repeats: dict[str, list[dict[str, Any]]]) -> list[str]:
    """One line per backend whose ok repeats disagree on a figure that must be identical."""
    out = []
    for label, runs in repeats.items():
        ok = [(i + 1, r) for i, r in enumerate(runs) if r.get("status") == "ok"]
        if len(ok) < 2:
            continue
        (first_i, first), differ = ok[0], []
        for i, r in ok[1:]:
            keys = [k for k in DETERMINISTIC if r.get(k) != first.get(k)]
            if keys:
                differ.append(
                    f"run {i} vs run {first_i}: "
                    f"{', '.join(keys)}{_largest_loss_gap(first, r, keys)}"
                )
        if differ:
            out.append(
                f"non-deterministic: {label}'s repeats differ on figures that must be identical "
                f"(same batches, seed and threads): {'; '.join(differ)}"
            )
    return out


def _largest_loss_gap(a: dict[str, Any], b: dict[str, Any], keys: list[str]) -> str:
    if "losses" not in keys:
        return ""
    gaps = [
        (abs(x - y), i + 1)
        for i, (x, y) in enumerate(zip(a.get("losses") or [], b.get("losses") or [], strict=False))
        if isinstance(x, float) and isinstance(y, float) and math.isfinite(x) and math.isfinite(y)
    ]
    if not gaps:
        return ""
    gap, step = max(gaps)
    return f" (largest loss gap {gap:.2e} at step {step})"


def build_verdict(
    repeats: dict[str, list[dict[str, Any]]], reference: str | None
) -> dict[str, Any] | None:
    """{"speed", "memory": the reference against the other backend (the first other, when there
    are several), "pairs": the reference against every other backend, "repeats": per-run figures,
    "nondeterministic": warning lines}; None with fewer than two backends that ran ok at least once
    (a failed backend's row and the headline say why)."""
    ran = [label for label, runs in repeats.items() if any(r.get("status") == "ok" for r in runs)]
    if reference not in ran or len(ran) < 2:  # a failed backend's row and headline say why
        return None
    pairs = [{"pair": [reference, b],
              "speed": judge("speed", reference, b, repeats[reference], repeats[b]),
              "memory": judge("memory", reference, b, repeats[reference], repeats[b])}
             for b in ran if b != reference]  # fmt: skip
    return {"speed": pairs[0]["speed"], "memory": pairs[0]["memory"], "pairs": pairs,
            "repeats": {label: [run_figures(r) for r in runs] for label, runs in repeats.items()},
            "nondeterministic": nondeterminism(repeats)}


def _runs_text(entry: dict[str, Any], first: str, second: str) -> str:
    n, m = entry["runs"][first], entry["runs"][second]
    return f"{n} run{'s' if n != 1 else ''} each" if n == m else f"{n} and {m} runs"


def _busy_text(entry: dict[str, Any]) -> str:
    k = sum(entry["busy_left_out"].values())
    return f"; {k} BUSY run{'s' if k != 1 else ''} left out" if k else ""


def line(entry: dict[str, Any]) -> str:
    """The one console line of a verdict entry, e.g.
    `Faster: mlx, 1.42x torch's speed (95% CI 1.31-1.55, 5 runs each, p=0.008)`."""
    a, b = entry["pair"]
    speed = entry["kind"] == "speed"
    what, title = ("speed", "Speed") if speed else ("peak-RSS", "Peak RSS")
    busy_note = _busy_text(entry)
    if entry["ratio"] is None:
        return (f"{title} undecided: no usable run of {a if not entry['runs'][a] else b} "
                f"(failed or BUSY){busy_note}")
    r, lo, hi = entry["ratio"], entry["ci_low"], entry["ci_high"]
    ci = "no interval from one run" if lo is None else f"95% CI {lo:.2f}-{hi:.2f}"
    if entry["outcome"] == "decided":
        win = entry["winner"]
        lose = a if win == b else b
        if win == a:  # the ratio reads B over A; say it as the winner's advantage
            r, lo, hi = 1 / r, 1 / hi, 1 / lo
        said = f"{r:.2f}x {lose}'s speed" if speed else f"{r:.2f}x below {lose}"
        return (
            f"{'Faster' if speed else 'Less peak RSS'}: {win}, {said} (95% CI {lo:.2f}-{hi:.2f}, "
            f"{_runs_text(entry, a, b)}, p={entry['p_value']:.3g}{busy_note})"
        )
    ratio_name = f"{b}/{a}" if speed else f"{a}/{b}"
    if entry["outcome"] == "no_clear_difference":
        return (f"No clear {what} difference: {ratio_name} {r:.2f}x ({ci}, "
                f"{_runs_text(entry, a, b)}{busy_note})")
    hint = (
        f"; --repeats {entry['suggested_repeats']} to decide" if entry["suggested_repeats"] else ""
    )
    return (f"{title} undecided after {_runs_text(entry, a, b)}: {ratio_name} {r:.2f}x "
            f"({ci}{busy_note}){hint}")


def verdict_lines(verdict: dict[str, Any] | None) -> list[str]:
    """The verdict's lines: speed then memory for every pair, then non-determinism warnings."""
    if not verdict:
        return []
    out = [line(p[kind]) for p in verdict["pairs"] for kind in ("speed", "memory")]
    return out + [f"warning: {w}" for w in verdict.get("nondeterministic") or []]

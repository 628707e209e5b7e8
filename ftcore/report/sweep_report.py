"""`ftcore sweep`'s report: where the speed winner changes with model size (crossover), the
printed table (format_sweep), speedup_vs_size.png (the ratio and its 95% interval against the
parameter count) and write_sweep (sweep.json and the plot, each written atomically).

A point is sweep.json's entry of one compare (ftcore.run.sweep.point_entry): `layers`, `width`,
`params`, `status`, `speed` (its comparison's verdict["speed"] or None), `median_step_s`."""

from __future__ import annotations

import statistics
from itertools import groupby
from pathlib import Path
from typing import Any

from ftcore.files import json_bytes, write_atomic
from ftcore.measure.stats import BAND
from ftcore.report.plots import new_figure, png_bytes
from ftcore.report.verdict import timed_steps

JSON_FILE, PLOT_FILE = "sweep.json", "speedup_vs_size.png"


def median_steps(comparison: dict[str, Any]) -> dict[str, float | None]:
    """Per label, the median of its runs' median timed step (the verdict's speed figure) over the
    runs that were ok and not BUSY (all ok runs when every one was BUSY); None when none ran ok."""
    verdict = comparison.get("verdict")
    if verdict:
        runs = verdict["repeats"]
    else:  # fewer than two backends ran ok: the first run of each, as results holds it
        runs = {r["backend"]: [{"status": r.get("status"), "busy": False,
                                "median_step_s": statistics.median(timed_steps(r) or [0.0])}]
                for r in comparison["results"]}  # fmt: skip
    out = {}
    for label, figures in runs.items():
        ok = [f for f in figures if f["status"] == "ok" and f["median_step_s"]]
        used = [f for f in ok if not f["busy"]] or ok
        out[label] = statistics.median(f["median_step_s"] for f in used) if used else None
    return out


def params_text(n: int) -> str:
    """Three figures: 1100048384 -> "1.10B", 33947648 -> "33.9M", 446848 -> "447k"."""
    for size, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= size:
            x = n / size
            return f"{x:.{2 if x < 10 else 1 if x < 100 else 0}f}{unit}"
    return str(n)


def point_label(p: dict[str, Any]) -> str:
    return f"{p['layers']} layers x {p['width']} ({params_text(p['params'])} params)"


def _winner(p: dict[str, Any]) -> str | None:
    """The point's speed winner when its outcome is decided, else None."""
    speed = p.get("speed") or {}
    decided = p["status"] == "ok" and speed.get("outcome") == "decided"
    return speed.get("winner") if decided else None


def crossover(points: list[dict[str, Any]]) -> str:
    """Where the speed winner changes with size, from the decided outcomes only (smallest model
    first); the points that decided nothing are named as such."""
    pts = sorted(points, key=lambda p: p["params"])
    decided = [p for p in pts if _winner(p)]
    runs = [(w, list(g)) for w, g in groupby(decided, key=_winner)]
    if not runs:
        said = "no size decided the speed winner"
    elif len(runs) == 1:
        every = "size" if len(decided) == len(pts) else "decided size"
        said = f"{runs[0][0]} is faster at every {every}"
    elif len(runs) == 2:
        (low, below), (high, above) = runs
        said = (f"{high} wins from {point_label(above[0])} up; {low} below (up to "
                f"{point_label(below[-1])})")
    else:
        said = "the winner changes more than once: " + "; ".join(
            f"{w} at {', '.join(str(p['layers']) + ' layers x ' + str(p['width']) for p in g)}"
            for w, g in runs)
    rest = [p for p in pts if not _winner(p)]
    for what in STATES:
        named = [p for p in rest if _state(p) == what]
        if named:
            said += f"; {STATES[what]} at " + ", ".join(map(point_label, named))
    return said


# what a point that decided nothing says, in the order the crossover sentence names them
STATES = {"failed": "failed", "no_ratio": "no ratio (no usable runs)",
          "no_clear_difference": f"no clear difference (within 1 +- {BAND:.0%})",
          "undecided": "undecided"}  # fmt: skip


def _state(p: dict[str, Any]) -> str:
    speed = p.get("speed") or {}
    if p["status"] != "ok":
        return "failed"
    return "no_ratio" if speed.get("ratio") is None else speed.get("outcome") or "undecided"


def _ratio_text(speed: dict[str, Any] | None) -> str:
    if not speed or speed.get("ratio") is None:
        return "n/a"
    if speed.get("ci_low") is None:
        return f"{speed['ratio']:.2f} (no CI)"
    return f"{speed['ratio']:.2f} [{speed['ci_low']:.2f}-{speed['ci_high']:.2f}]"


def _outcome_text(p: dict[str, Any]) -> str:
    if p["status"] != "ok":
        return "failed"
    speed = p.get("speed") or {}
    said = (f"{speed['winner']} faster" if speed.get("outcome") == "decided"
            else (speed.get("outcome") or "n/a").replace("_", " "))  # fmt: skip
    busy = sum((speed.get("busy_left_out") or {}).values())
    return f"{said} ({busy} BUSY left out)" if busy else said


def format_sweep(record: dict[str, Any]) -> str:
    """The printed table, one row a point (smallest model first), then the crossover line."""
    labels = record["labels"]
    a, b = (labels + [""])[:2]
    ratio_head = f"{b}/{a} [95% CI]" if b else "speed ratio"
    head = ["layers", "width", "params", ratio_head, "outcome", "runs",
            *(f"{x} s/step" for x in labels)]  # fmt: skip
    rows = [head]
    for p in sorted(record["points"], key=lambda p: p["params"]):
        runs = ((p.get("speed") or {}).get("runs") or {}).values()
        steps = [p["median_step_s"].get(x) for x in labels]
        rows.append([str(p["layers"]), str(p["width"]), params_text(p["params"]),
                     _ratio_text(p.get("speed")), _outcome_text(p),
                     "/".join(map(str, runs)) or "n/a",
                     *("n/a" if s is None else f"{s:.3f}" for s in steps)])  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) if i != 4 else c.ljust(w)
                       for i, (c, w) in enumerate(zip(r, widths, strict=True))).rstrip()
             for r in rows]  # fmt: skip
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join([*lines, "", f"Across sizes: {record['crossover']}"])


def plot_sweep(record: dict[str, Any]) -> bytes:
    """speedup_vs_size.png: each point's speed ratio with its 95% interval (error bars) against
    its parameter count (log x), a line at 1.0, each point labelled by its layers."""
    fig = new_figure()
    ax = fig.add_subplot()
    labels = record["labels"]
    shown = [p for p in record["points"] if (p.get("speed") or {}).get("ratio") is not None]
    mixed = len({p["width"] for p in shown}) > 1  # then each label gives its width too
    for p in shown:
        s = p["speed"]
        err = ([[s["ratio"] - s["ci_low"]], [s["ci_high"] - s["ratio"]]]
               if s.get("ci_low") is not None else None)  # fmt: skip
        decided = s["outcome"] == "decided"
        ax.errorbar([p["params"]], [s["ratio"]], yerr=err, fmt="o", color="C0", capsize=4,
                    markerfacecolor="C0" if decided else "white")
        ax.annotate(f"{p['layers']}L" + (f" x{p['width']}" if mixed else ""),
                    (p["params"], s["ratio"]), textcoords="offset points", xytext=(6, 6),
                    fontsize=9)
    ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
    # the band of "no clear difference" (ftcore.measure.stats.BAND), with 1.0 well inside the plot
    ax.axhspan(1 - BAND, 1 + BAND, color="grey", alpha=0.12, linewidth=0)
    low, high = ax.get_ylim()
    ax.set_ylim(min(low, 1 - 2 * BAND), max(high, 1 + 2 * BAND))
    ax.set_xscale("log")
    ax.margins(x=0.12)  # room for the last point's label
    ax.set_xlabel("base parameters (log scale)")
    pair = f"{labels[1]}/{labels[0]}" if len(labels) > 1 else "speed ratio"
    ax.set_ylabel(f"{pair} speed (95% CI)")
    ax.set_title(f"{pair} speed against model size (filled: decided; band: +-{BAND:.0%})")
    ax.grid(True, which="both", alpha=0.3)
    if not shown:
        ax.text(0.5, 0.5, "no point has a speed ratio", ha="center", transform=ax.transAxes)
    fig.tight_layout()
    return png_bytes(fig)


def write_sweep(record: dict[str, Any], out: Path) -> dict[str, Path]:
    """Write sweep.json and speedup_vs_size.png into `out`, each atomically; return their paths."""
    paths = {"json": out / JSON_FILE, "plot": out / PLOT_FILE}
    write_atomic(paths["plot"], plot_sweep(record))
    write_atomic(paths["json"], json_bytes(record))
    return paths

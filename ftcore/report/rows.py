"""What each row of the full table shows (`TABLE_ROWS`): a RunResult figure by name, rendered as
its schema says (ftcore.result.figure), or a derived row; `TARGET_ROWS` with --target-eval-loss.
ftcore.report.table lays them out as a grid and as markdown; ftcore.report.console picks some."""

from __future__ import annotations

from typing import Any

from ftcore.report.values import NA, finite, fmt, fmt_int, fmt_text
from ftcore.result import figure_format, figure_tags

# The full table's rows, in order: a RunResult figure by name (its label and format are the
# schema's: ftcore.result.figure; "spread" figures show "median (min-max)" over repeats), or a
# derived row, (label, how to render it from the comparison row).
TABLE_LAYOUT: list[str | tuple[str, Any]] = [
    "train_time_s",
    ("Epoch, projected (95% CI)", lambda r: projected(r, "epoch_time")),
    ("Records per projected epoch", lambda r: fmt_int(r.get("epoch_records"))),
    ("Fine-tune, projected (95% CI)", lambda r: projected(r, "finetune_time")),
    "peak_rss_mb",
    "framework_peak_mb",
    ("Memory model (MB)", lambda r: fmt(r.get("memory_model_mb"), ".1f")),
    ("Peak RSS / model", lambda r: fmt(r.get("peak_rss_over_model"), ".2f", "x")),
    ("Framework peak / model", lambda r: fmt(r.get("framework_peak_over_model"), ".2f", "x")),
    "final_loss",
    "eval_loss",
    "eval_loss_before",
    ("Eval loss drop (%)", lambda r: fmt(_percent(r.get("eval_loss_drop")), ".1f")),
    ("Exact match before -> after (%)", lambda r: _before_after(r)),
    ("Greedy agreement", lambda r: _agreement(r)),
    ("Speedup factor", lambda r: fmt(r.get("speedup"), ".2f", "x")),
    ("Memory efficiency", lambda r: fmt(r.get("memory_efficiency"), ".2f", "x")),
    "tokens_per_s",
    "real_tokens_per_s",
    "loss_tokens_per_s",
    ("Padding share (%)", lambda r: fmt(_padding_percent(r), ".1f")),
    ("MFU (%)", lambda r: fmt(r.get("mfu_percent"), ".2f")),
    "load_time_s",
    "warmup_time_s",
    "compile_time_s",
    "fine_tune",
    "grad_accum",
    "trainable_params",
    "blas",
    "threads",
    "cpu_busy_threads",
    "world_size",
    "rank_threads",
    (
        "All-reduce (ms/step)",
        lambda r: fmt(
            None if r.get("allreduce_time_s") is None else 1000 * r["allreduce_time_s"], ".2f"
        ),
    ),
    "peak_rss_max_rank_mb",
    ("Scaling efficiency", lambda r: fmt(r.get("scaling_efficiency"), ".2f")),
    (
        "Machine (timed steps)",
        lambda r: {True: "BUSY", False: "quiet"}.get(r.get("machine_busy"), NA),
    ),
    (
        "Status",
        lambda r: "ok" if r.get("status") == "ok" else str(r.get("status") or "failed").upper(),
    ),
]


def _figure_row(name: str) -> tuple[str, Any]:
    """(label, renderer) of a RunResult figure, from its schema entry."""
    label, spec = figure_format(name)
    if label is None:
        raise ValueError(f"RunResult.{name} has no table label (ftcore.result.figure)")
    if spec == "int":
        return label, lambda r: fmt_int(r.get(name) or None)  # 0: not recorded
    if spec == "text":
        return label, lambda r: fmt_text(r.get(name))
    if "spread" in figure_tags(name):
        return label, lambda r: _with_spread(r, name, spec)
    return label, lambda r: fmt(r.get(name), spec)


TABLE_ROWS: list[tuple[str, Any]] = [
    _figure_row(x) if isinstance(x, str) else x for x in TABLE_LAYOUT
]


def _with_spread(r: dict[str, Any], key: str, spec: str) -> str:
    """A figure over repeated runs: "median (min-max)"; one run: the figure alone."""
    lo_hi = (r.get("spread") or {}).get(key) if (r.get("runs") or 0) > 1 else None
    return (
        f"{fmt(r.get(key), spec)} ({fmt(lo_hi[0], spec)}-{fmt(lo_hi[1], spec)})"
        if lo_hi
        else fmt(r.get(key), spec)
    )


def duration(seconds: float | None, ci: list[float] | None = None) -> str:
    """Seconds in the unit a person plans by (s, min, h), with the interval in the same unit."""
    if seconds is None:
        return NA
    unit, per = ("h", 3600.0) if seconds >= 7200 else ("min", 60.0) if seconds >= 120 else ("s", 1)
    text = f"{seconds / per:.1f} {unit}"
    return f"{text} ({ci[0] / per:.1f}-{ci[1] / per:.1f})" if ci else text


def projected(r: dict[str, Any], key: str) -> str:
    """An epoch projection's cell (ftcore.measure.projection): `<key>_s` with `<key>_ci_s`."""
    return duration(finite(r.get(f"{key}_s")), r.get(f"{key}_ci_s"))


def _padding_percent(r: dict[str, Any]) -> float | None:
    real, fed = r.get("real_tokens_per_s"), r.get("tokens_per_s")
    return 100 * (1 - real / fed) if real is not None and fed else None


def _percent(v: Any) -> float | None:
    return None if v is None else 100.0 * v


def _before_after(r: dict[str, Any]) -> str:
    a, b = r.get("accuracy_before"), r.get("accuracy_after")
    if a is None and b is None:
        return NA
    return f"{fmt(_percent(a), '.1f')} -> {fmt(_percent(b), '.1f')}"


def _agreement(r: dict[str, Any]) -> str:
    g = r.get("greedy_agreement")
    return f"{g['same']}/{g['of']} = {g['vs']}" if g else NA


def _target_steps(r: dict[str, Any]) -> str:
    t = r.get("target")
    if not t:
        return NA
    return str(t["step"]) if t.get("reached") else f"not reached in {r.get('steps')}"


def _target_seconds(r: dict[str, Any]) -> str:
    t = r.get("target")
    return fmt(t.get("seconds"), ".2f") if t and t.get("reached") else NA


# shown only when the run had --target-eval-loss
TARGET_ROWS: list[tuple[str, Any]] = [
    ("Steps to target eval loss", _target_steps),
    ("Time to target (s)", _target_seconds),
]

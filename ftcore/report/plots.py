"""The comparison's PNG plots: per-step loss curves (with each backend's difference from the first),
throughput and memory bars. matplotlib's Figure only: no pyplot, no global state, no display."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

from ftcore.report.values import NA, finite


def _ok_result_rows(comparison: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in comparison.get("results") or [] if r.get("status") == "ok"]


_STYLES = ["-", "--", "-.", ":"]
_MARKERS = ["o", "s", "^", "D", "v", "P"]


def new_figure() -> Any:
    from matplotlib.figure import Figure  # no pyplot: no global state, no display

    return Figure(figsize=(8, 5), dpi=120)


def png_bytes(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    return buf.getvalue()


def _empty(ax: Any, msg: str) -> None:
    ax.text(0.5, 0.5, msg, ha="center", va="center", transform=ax.transAxes, fontsize=12)
    ax.set_xticks([])
    ax.set_yticks([])


def _plot_losses(comparison: dict[str, Any]) -> bytes:
    cfg = comparison.get("config") or {}
    model = Path(str(cfg.get("model"))).name if cfg.get("model") else cfg.get("preset", "?")
    title = (
        f"{cfg.get('fine_tune', 'lora')} training loss: {model}, {cfg.get('precision', '?')}, "
        f"batch {cfg.get('batch_size', '?')} x {cfg.get('grad_accum', 1)} x seq "
        f"{cfg.get('max_seq_len', '?')}"
    )

    rows = [r for r in _ok_result_rows(comparison) if r.get("losses")]
    fig = new_figure()
    if not rows:
        ax = fig.add_subplot()
        _empty(ax, "no successful backend recorded losses")
        ax.set_title(title)
        return png_bytes(fig)

    two = len(rows) > 1
    gs = fig.add_gridspec(2 if two else 1, 1, height_ratios=[3, 1.2] if two else [1], hspace=0.08)
    ax = fig.add_subplot(gs[0])
    n_steps = max(len(r["losses"]) for r in rows)
    every = max(1, n_steps // 15)
    colors = [f"C{i % 10}" for i in range(len(rows))]  # same colour per backend in both panels
    for i, r in enumerate(rows):
        ys = [finite(v) if finite(v) is not None else math.nan for v in r["losses"]]
        xs = list(range(1, len(ys) + 1))
        # Decreasing widths, different dashes and hollow markers: identical curves stay visible.
        ax.plot(
            xs, ys, label=str(r.get("backend")), color=colors[i],
            linestyle=_STYLES[i % len(_STYLES)], marker=_MARKERS[i % len(_MARKERS)],
            markevery=(i % every, every),
            markersize=max(4, 9 - 2 * i), markerfacecolor="none", linewidth=max(1.0, 2.6 - 0.5 * i),
        )  # fmt: skip
        evals = [(x, finite(y)) for x, y in r.get("eval_losses") or [] if finite(y) is not None]
        if evals:  # eval points: step 0 is before training
            ax.plot([x for x, _ in evals], [y for _, y in evals], linestyle="none",
                    color=colors[i], marker="*", markersize=max(6, 12 - 2 * i),
                    label=f"{r.get('backend')} eval")  # fmt: skip
    ax.set_ylabel("loss (mean CE over target tokens)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(title="backend")
    if two:
        _plot_loss_diffs(fig, gs[1], ax, rows, colors)
    else:
        ax.set_xlabel("step")
    ax.xaxis.get_major_locator().set_params(integer=True)
    fig.subplots_adjust(left=0.16, right=0.97, top=0.92, bottom=0.1)
    return png_bytes(fig)

def _plot_loss_diffs(
    fig: Any, cell: Any, ax: Any, rows: list[dict[str, Any]], colors: list[str]
) -> None:
    """The lower panel: each backend's |loss difference| from the first, per step."""
    from matplotlib.ticker import FormatStrFormatter

    ax.tick_params(labelbottom=False)
    axd = fig.add_subplot(cell, sharex=ax)
    ref = rows[0]
    for i, r in enumerate(rows[1:], start=1):
        d = [
            abs(a - b) if a is not None and b is not None else math.nan
            for a, b in (
                (finite(x), finite(y))
                for x, y in zip(ref["losses"], r["losses"], strict=False)
            )
        ]
        axd.plot(range(1, len(d) + 1), d, color=colors[i], linestyle=_STYLES[i % len(_STYLES)],
                 marker=_MARKERS[i % len(_MARKERS)], markersize=4,
                 label=str(r.get("backend")))  # fmt: skip
    axd.set_ylabel(f"|loss diff|\nvs {ref.get('backend')}")
    # fixed format: no "1e-4" offset text drawn over the top panel
    axd.yaxis.set_major_formatter(FormatStrFormatter("%.1e"))
    axd.yaxis.get_major_locator().set_params(nbins=4)
    axd.legend(fontsize=8, loc="upper right")
    axd.grid(True, alpha=0.3)
    axd.set_xlabel("step")
    fig.align_ylabels([ax, axd])


def _bars(
    ax: Any, names: list[str], series: list[tuple[str, list[float | None]]], fmt: str
) -> None:
    """Grouped bars; a None value draws no bar (and is labelled n/a)."""
    n = len(series)
    width = 0.8 / max(1, n)
    for j, (label, vals) in enumerate(series):
        xs = [i + (j - (n - 1) / 2) * width for i in range(len(names))]
        hs = [v if v is not None else 0.0 for v in vals]
        bars = ax.bar(xs, hs, width=width, label=label)
        ax.bar_label(
            bars, labels=[NA if v is None else format(v, fmt) for v in vals], fontsize=8, padding=2
        )
    ax.set_xticks(range(len(names)), names)
    ax.grid(True, axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.margins(y=0.15)
    if any(v is not None for _, vals in series for v in vals):
        ax.set_ylim(bottom=0)
    else:  # nothing recorded (e.g. every backend failed): say so, no fake axis range
        ax.set_ylim(0, 1)
        ax.text(0.5, 0.6, "no figures recorded", ha="center", transform=ax.transAxes, fontsize=12)


def _bar_names(comparison: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [
        (
            str(r.get("backend"))
            + ("" if r.get("status") == "ok" else f"\n({r.get('status') or 'failed'})"),
            r,
        )
        for r in comparison.get("rows") or []
    ]


def _bar_plot(comparison: dict[str, Any], title: str, ylabel: str, fmt: str,
              fields: list[tuple[str, str]]) -> bytes:
    """Grouped bars, one group per backend, one bar per (label, row field); a field no backend
    recorded (framework peak on CPU torch) is left out."""
    fig = new_figure()
    ax = fig.add_subplot()
    named = _bar_names(comparison)
    if not named:
        _empty(ax, "no backends")
    else:
        series = [(label, [finite(r.get(field)) for _, r in named]) for label, field in fields]
        series = [
            (label, vals) for label, vals in series if any(v is not None for v in vals)
        ] or series
        _bars(ax, [n for n, _ in named], series, fmt)
        ax.set_ylabel(ylabel)
        ax.set_xlabel("backend")
        ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    return png_bytes(fig)


def _plot_throughput(comparison: dict[str, Any]) -> bytes:
    return _bar_plot(comparison, "Training throughput (timed steps after warm-up)",
                     "throughput (tokens / s)", ".1f",
                     [("all positions (incl. padding)", "tokens_per_s"),
                      ("real tokens", "real_tokens_per_s"),
                      ("loss tokens only", "loss_tokens_per_s")])


def _plot_memory(comparison: dict[str, Any]) -> bytes:
    return _bar_plot(comparison, "Memory: peak RSS of each backend's own process", "memory (MB)",
                     ".0f", [("peak RSS (own process)", "peak_rss_mb"),
                             ("framework peak", "framework_peak_mb"),
                             ("RSS after model load", "baseline_rss_mb")])


def plots(comparison: dict[str, Any]) -> dict[str, bytes]:
    """File stem -> PNG bytes for every plot of the report."""
    return {
        "loss_curves": _plot_losses(comparison),
        "throughput": _plot_throughput(comparison),
        "memory": _plot_memory(comparison),
    }

"""The short answer `ftcore compare` prints: the verdict, one compact table of the figures a user
decides by, fairness in one line. The full grid (format_table, `--verbose`), footnotes and
environment stay in report.md, every figure in comparison.json.

    All 2 backends ran ok.
    Faster: mlx, 1.30x torch's speed (95% CI 1.19-1.42, 3 runs each, p=0.1)
    Less peak RSS: mlx, 4.86x below torch (95% CI 4.79-4.93, 3 runs each, p=0.1)

                                        torch             mlx
    -----------------------------------------------------------
    Training time (s)                    3.23            1.61
    ...
    Fairness: 10/10 checks PASS
"""

from __future__ import annotations

import textwrap
from typing import Any

from ftcore.report.fairness import step_kinds_line
from ftcore.report.rows import TABLE_ROWS, TARGET_ROWS, duration
from ftcore.report.table import _fairness_lines, headline
from ftcore.report.values import NA, fmt, fmt_int, num
from ftcore.report.verdict import verdict_lines

WIDTH = 80  # at most; narrower when the terminal is
GAP = "  "
FULL = dict(TABLE_ROWS)  # the full table's cell for each label: the same figure, the same format


def _arrow(r: dict[str, Any], a: str, b: str, spec: str) -> str:
    x, y = r.get(a), r.get(b)
    return NA if x is None and y is None else f"{fmt(x, spec)} -> {fmt(y, spec)}"


def _loss_diff(r: dict[str, Any], comparison: dict[str, Any]) -> str:
    """This row's largest per-step training-loss difference from the reference."""
    vs = ((comparison.get("loss_diff") or {}).get("vs_reference") or {}).get(r.get("backend"))
    return fmt((vs or {}).get("max_abs_diff"), ".3e")


def _target_label(label: str, rows: list[dict[str, Any]]) -> str:
    target = next((r["target"]["eval_loss"] for r in rows if r.get("target")), None)
    return f"{label} {target:g}" if label.startswith("Steps") and target is not None else label


def _any(key: str, test: Any) -> Any:
    return lambda rows: any(test(r.get(key)) for r in rows)


ALWAYS = None
DATA_PARALLEL = _any("world_size", lambda w: (num(w) or 1) > 1)


def _full(label: str) -> Any:
    return lambda r, c: FULL[label](r)


# (label, cell(row, comparison), shown(rows) or ALWAYS): a row whose cells are all n/a is left out
# too (no eval generation: no exact match or agreement; one backend: no loss difference).
SHORT_ROWS: list[tuple[str, Any, Any]] = [
    ("Training time (s)", _full("Training time (s)"), ALWAYS),
    ("Speedup vs {ref}", _full("Speedup factor"), ALWAYS),
    ("Peak RSS (MB)", _full("Peak RSS (MB)"), ALWAYS),
    ("Memory efficiency vs {ref}", _full("Memory efficiency"), ALWAYS),
    ("Loss tokens/s", _full("Loss tokens/s"), ALWAYS),
    ("Epoch of {records} records", _full("Epoch, projected (95% CI)"), ALWAYS),
    ("Fine-tune, {epochs} epochs", _full("Fine-tune, projected (95% CI)"), ALWAYS),
    ("Eval loss before -> after",
     lambda r, c: _arrow(r, "eval_loss_before", "eval_loss", ".3f"), ALWAYS),
    ("Exact match before -> after (%)", _full("Exact match before -> after (%)"), ALWAYS),
    ("Greedy agreement", _full("Greedy agreement"), ALWAYS),
    ("Loss diff vs {ref} (largest)", _loss_diff, ALWAYS),
    # --target-eval-loss
    *[(label, lambda r, c, fn=fn: fn(r), ALWAYS) for label, fn in TARGET_ROWS],
    *[(label, _full(label), DATA_PARALLEL) for label in (
        "World size (processes)", "Threads per rank", "All-reduce (ms/step)",
        "Peak RSS, largest rank (MB)", "Scaling efficiency")],
    ("Machine (timed steps)", _full("Machine (timed steps)"), _any("machine_busy", bool)),
    ("Status", _full("Status"), _any("status", lambda s: s != "ok")),
]  # fmt: skip


def short_rows(comparison: dict[str, Any]) -> list[list[str]]:
    """[label, cell per backend] for each row shown."""
    rows = comparison.get("rows") or []
    ref = comparison.get("reference") or NA
    out = []
    for label, cell, shown in SHORT_ROWS:
        if shown is not ALWAYS and not shown(rows):
            continue
        cells = [cell(r, comparison) for r in rows]
        if all(c == NA for c in cells):
            continue
        names = {"ref": ref, "records": fmt_int(rows[0].get("epoch_records")),
                 "epochs": (comparison.get("config") or {}).get("epochs")}
        out.append([_target_label(label, rows).format(**names), *cells])
    return out


def _tables(header: list[str], body: list[list[str]], width: int) -> list[str]:
    """The table, its backends split over several tables when one would be wider than `width`."""
    label_w = max(len(line[0]) for line in [header, *body])
    col_w = [max(len(line[c]) for line in [header, *body]) for c in range(1, len(header))]
    groups: list[list[int]] = [[]]
    for c, w in enumerate(col_w):
        used = label_w + sum(len(GAP) + col_w[i] for i in groups[-1])
        if groups[-1] and used + len(GAP) + w > width:
            groups.append([])
        groups[-1].append(c)
    out: list[str] = []
    for cols in groups:
        if out:
            out.append("")
        for i, line in enumerate([header, *body]):
            text = line[0].ljust(label_w) + "".join(GAP + line[c + 1].rjust(col_w[c]) for c in cols)
            out.append(text.rstrip())
            if i == 0:
                out.append("-" * len(text))
    return out


def _fairness(comparison: dict[str, Any], width: int) -> list[str]:
    checks = comparison.get("fairness") or []
    passed = sum(bool(c.get("ok")) for c in checks)
    line = f"Fairness: {passed}/{len(checks)} checks PASS"
    kinds = textwrap.wrap(step_kinds_line(comparison.get("step_kinds")), width)
    if passed == len(checks):
        return [line, *kinds]
    failing = [
        ln for ln, c in zip(_fairness_lines(comparison), checks, strict=True) if not c.get("ok")
    ]
    return [
        line + "; not passed:",
        *[textwrap.shorten(ln, width, placeholder=" ...") for ln in failing],
        *kinds,
    ]


def _trained(comparison: dict[str, Any]) -> str:
    """"Trained: dora, 2 micro-batches of 2 rows a step" when --fine-tune or --grad-accum is not
    the default (LoRA, one batch a step), else ""."""
    cfg = next((r.get("config") or {} for r in comparison.get("results") or []), {})
    kind, accum = cfg.get("fine_tune", "lora"), cfg.get("grad_accum", 1)
    if kind == "lora" and accum == 1:
        return ""
    rows = cfg.get("batch_size")
    return (f"Trained: {kind}, {accum} micro-batch{'es' * (accum > 1)} of {rows} "
            f"row{'s' * (rows != 1)} a step")


def format_short(comparison: dict[str, Any], width: int = WIDTH) -> str:
    """The console answer: verdict, compact table, fairness line, warnings; lines fit `width`
    (a table too wide for it is split by backends)."""
    width = min(width, WIDTH)
    wrap = lambda text: textwrap.wrap(text, width) or [""]  # noqa: E731
    lines = wrap(headline(comparison))
    for said in verdict_lines(comparison.get("verdict")):
        lines += wrap(said)
    lines += wrap(_trained(comparison)) if _trained(comparison) else []
    for key in ("reference_note", "size_note"):
        if note := comparison.get(key):
            lines += wrap(f"Note: {note}")
    rows = comparison.get("rows") or []
    lines += [
        "",
        *_tables(["", *[str(r.get("backend")) for r in rows]], short_rows(comparison), width),
        "",
    ]
    lines += _fairness(comparison, width)
    for r in comparison.get("results") or []:
        for w in r.get("warnings") or []:
            lines.append(
                textwrap.shorten(f"warning: {r.get('backend')}: {w}", width, placeholder=" ...")
            )
    return "\n".join(lines)


def format_run(r: Any) -> str:
    """`ftcore run`/`profile`'s answer for one RunResult; "" when it did not run ok (the error
    line says why)."""
    if r.status != "ok":
        return ""
    first = r.losses[0] if r.losses else None
    mfu = None if r.mfu is None else 100 * r.mfu
    return "\n".join([
        f"backend          {r.backend} ({r.precision}, {r.device or 'cpu'}, {r.threads} threads, "
        f"BLAS {r.blas})",
        f"loss             {fmt(first, '.4f')} -> {fmt(r.final_loss, '.4f')} over {r.steps} "
        f"steps; eval {fmt(r.eval_loss, '.4f')}",
        f"time             load {fmt(r.load_time_s, '.2f')} s, warm-up "
        f"{fmt(r.warmup_time_s, '.2f')} s, train {fmt(r.train_time_s, '.2f')} s",
        f"throughput       {fmt(r.tokens_per_s, '.1f')} tok/s (all tokens), "
        f"{fmt(r.loss_tokens_per_s, '.1f')} loss tok/s",
        f"memory           peak RSS {fmt(r.peak_rss_mb, '.0f')} MB, after load "
        f"{fmt(r.baseline_rss_mb, '.0f')} MB, framework peak {fmt(r.framework_peak_mb, '.0f')} MB",
        f"trained          {r.fine_tune or 'n/a'}, {fmt_int(r.trainable_params)} params, "
        f"{fmt_int(r.grad_accum or None)} micro-batch(es) a step",
        f"MFU              {fmt(mfu, '.2f')} % of measured GEMM peak",
        f"epoch            {fmt_int(r.epoch_records)} records, projected: "
        f"{duration(r.epoch_time_s, r.epoch_time_ci_s)} (95% CI, this run's steps)",
    ])  # fmt: skip

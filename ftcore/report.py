"""Comparison report: fairness checks, derived figures, table, markdown/JSON and plots.

Input is a list of per-backend `result.json` dicts (see DESIGN.md). Any figure may be None
(a failed backend, or a framework without that counter); it is shown as "n/a", never guessed.
"""

from __future__ import annotations

import copy
import io
import json
import math
import os
import tempfile
from datetime import datetime, timezone
from itertools import combinations
from pathlib import Path
from typing import Any

NA = "n/a"

# Config keys that may legitimately differ between backends (not part of the experiment).
IGNORED_CONFIG_KEYS = frozenset({"backend", "out", "out_dir"})

# Floats recorded by different frameworks (e.g. an lr stored as float32) count as equal
# within this relative tolerance; real setting differences are far larger.
FLOAT_RTOL = 1e-6

FOOTNOTES = [
    "Training time: wall time of the timed steps after warm-up (warm-up/compilation steps reported apart).",
    "Tokens/s (all) counts padded tokens (batch x max_seq_len); loss tokens/s counts only the target tokens the loss is taken over.",
    "Memory = peak RSS of the backend's own process; framework peak (mx.get_peak_memory, torch.cuda.max_memory_allocated) is shown beside it, never instead.",
    "Speedup factor = reference training time / this training time; memory efficiency = reference peak RSS / this peak RSS (>1 means better than the reference).",
    "MFU = achieved training FLOP/s / this machine's measured GEMM peak at that precision.",
    "Final loss: training loss (mean CE over target tokens) at the last step; eval loss on held-out records.",
]


# ----------------------------------------------------------------------------- helpers


def _num(v: Any) -> float | None:
    """A usable number or None (None, bools, strings and the like are not numbers)."""
    if isinstance(v, bool) or v is None:
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _finite(v: Any) -> float | None:
    x = _num(v)
    return x if x is not None and math.isfinite(x) else None


def _ratio(num: Any, den: Any) -> float | None:
    a, b = _finite(num), _finite(den)
    if a is None or b is None or a <= 0 or b <= 0:  # 0.0 is RunResult's "not measured" default
        return None
    return a / b


def _name(r: dict[str, Any], i: int) -> str:
    return str(r.get("backend") or f"backend-{i}")


def _ok_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in results if r.get("status") == "ok"]


def _same(a: Any, b: Any) -> bool:
    """Deep equality; floats equal within FLOAT_RTOL, tuples equal lists."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) or isinstance(b, float):
        x, y = _num(a), _num(b)
        if x is None or y is None:
            return False
        if math.isnan(x) and math.isnan(y):
            return True
        return math.isclose(x, y, rel_tol=FLOAT_RTOL, abs_tol=0.0)
    return a == b


def _short(v: Any, width: int = 60) -> str:
    if v is None:
        return "None"
    s = v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str)
    return s if len(s) <= width else s[: width - 3] + "..."


def _jsonable(obj: Any) -> Any:
    """Plain JSON types only: non-finite floats -> None, tuples -> lists, numpy scalars -> Python."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    if hasattr(obj, "item"):  # numpy scalar
        return _jsonable(obj.item())
    if hasattr(obj, "tolist"):  # numpy array
        return _jsonable(obj.tolist())
    return str(obj)


def _optimizer_key(opt: Any) -> Any:
    """Optimizer settings to compare; the name is compared case-insensitively without module path."""
    if not isinstance(opt, dict):
        return opt
    out = dict(opt)
    if isinstance(out.get("name"), str):
        out["name"] = out["name"].rsplit(".", 1)[-1].lower()
    return out


def _config_key(cfg: Any) -> Any:
    if not isinstance(cfg, dict):
        return cfg
    return {k: v for k, v in cfg.items() if k not in IGNORED_CONFIG_KEYS}


# ----------------------------------------------------------------------------- fairness


def _check(name: str, rows: list[dict[str, Any]], get: Any) -> dict[str, Any]:
    names = [_name(r, i) for i, r in enumerate(rows)]
    values = [get(r) for r in rows]
    # None, "" and {} are RunResult's "not recorded" defaults (0 for counts, see callers)
    values = [None if v in ("", {}) else v for v in values]
    pairs = list(zip(names, values, strict=True))
    missing = [n for n, v in pairs if v is None]
    equal = all(_same(values[0], v) for v in values[1:]) if values else True
    if len(rows) < 2:
        status, detail = "pass", f"only {len(rows)} successful backend(s); nothing to compare"
        if missing:
            status = "missing"
    elif missing:
        status = "missing"
        detail = (
            "not recorded by "
            + ", ".join(missing)
            + "; "
            + ", ".join(f"{n}={_short(v, 24)}" for n, v in pairs)
        )
    elif equal:
        status, detail = "pass", f"all {len(rows)} = {_short(values[0])}"
    elif all(isinstance(v, dict) for v in values):
        # Name only the keys that differ, with each backend's value.
        keys = sorted(set().union(*values), key=str)
        diffs = [
            f"{k}: " + ", ".join(f"{n}={_short(v.get(k), 24)}" for n, v in pairs)
            for k in keys
            if not all(_same(values[0].get(k), v.get(k)) for v in values[1:])
        ]
        status, detail = "mismatch", "; ".join(diffs)
    else:
        status = "mismatch"
        detail = ", ".join(f"{n}={_short(v, 24)}" for n, v in pairs)
    return {"check": name, "ok": status == "pass", "status": status, "detail": detail}


def fairness_checks(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Did every successful backend see the same inputs and settings?

    Each check: {"check", "ok", "status" ("pass"|"mismatch"|"missing"), "detail"}.
    A value a backend did not record cannot be verified and is not ok ("missing").
    """
    rows = _ok_rows(results)
    return [
        _check("batch_fingerprint", rows, lambda r: r.get("batch_fingerprint")),
        _check("initial_adapter_fingerprint", rows, lambda r: r.get("initial_adapter_fingerprint")),
        _check("trainable_params", rows, lambda r: r.get("trainable_params") or None),
        _check("optimizer", rows, lambda r: _optimizer_key(r.get("optimizer"))),
        _check("precision", rows, lambda r: r.get("precision")),
        _check("threads", rows, lambda r: r.get("threads") or None),
        _check("config", rows, lambda r: _config_key(r.get("config"))),
        _check("steps", rows, lambda r: len(r.get("losses") or []) or r.get("steps")),
    ]


# ----------------------------------------------------------------------------- loss diff


def _pair_diff(a: list[Any], b: list[Any]) -> dict[str, Any]:
    """Largest |a-b| and |a-b|/|a| over steps where both losses are finite."""
    best, best_i, best_rel, compared = None, None, None, 0
    for i, (x, y) in enumerate(zip(a, b, strict=False)):  # common prefix; lengths flagged below
        x, y = _finite(x), _finite(y)
        if x is None or y is None:
            continue
        compared += 1
        d = abs(x - y)
        if best is None or d > best:
            best, best_i = d, i
        if x != 0:
            rel = d / abs(x)
            best_rel = rel if best_rel is None else max(best_rel, rel)
    return {
        "max_abs_diff": best,
        "step": None if best_i is None else best_i + 1,  # 1-based optimizer step
        "index": best_i,  # 0-based position in `losses`
        "max_rel_diff": best_rel,
        "steps_compared": compared,
        "length_mismatch": len(a) != len(b),
    }


def max_loss_diff(results: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Largest absolute per-step training-loss difference between successful backends.

    Returns None with fewer than two successful rows, else
    {"max_abs_diff", "pair": [a, b], "step" (1-based), "index" (0-based), "reference",
     "pairs": [every pair], "vs_reference": {backend: diff vs the first ok backend, with max_rel_diff}}.
    """
    rows = _ok_rows(results)
    if len(rows) < 2:
        return None
    named = [(_name(r, i), list(r.get("losses") or [])) for i, r in enumerate(rows)]
    pairs = []
    for (na, la), (nb, lb) in combinations(named, 2):
        pairs.append({"pair": [na, nb], **_pair_diff(la, lb)})
    scored = [p for p in pairs if p["max_abs_diff"] is not None]
    top = max(scored, key=lambda p: p["max_abs_diff"]) if scored else None
    ref_name, ref_losses = named[0]
    vs_ref = {n: _pair_diff(ref_losses, lo) for n, lo in named[1:]}
    return {
        "max_abs_diff": top["max_abs_diff"] if top else None,
        "pair": top["pair"] if top else None,
        "step": top["step"] if top else None,
        "index": top["index"] if top else None,
        "reference": ref_name,
        "pairs": pairs,
        "vs_reference": vs_ref,
    }


# ----------------------------------------------------------------------------- comparison

_ROW_FIELDS = (
    "backend", "status", "error", "load_time_s", "train_time_s", "warmup_time_s", "steps",
    "tokens_per_s", "loss_tokens_per_s", "final_loss", "eval_loss", "peak_rss_mb",
    "baseline_rss_mb", "framework_peak_mb", "trainable_params", "flops_per_token", "mfu",
    "precision", "blas", "threads",
)  # fmt: skip


def _env_summary(r: dict[str, Any]) -> dict[str, Any]:
    env = r.get("env") or {}
    cfg = r.get("config") or {}
    return {
        "cpu": env.get("cpu"),
        "logical_cores": env.get("logical_cores"),
        "python": env.get("python"),
        "versions": env.get("versions") or {},
        "git_commit": env.get("git_commit"),
        "blas": r.get("blas") if r.get("blas") is not None else env.get("blas"),
        "threads": r.get("threads") if r.get("threads") is not None else env.get("threads"),
        "device": cfg.get("device") or env.get("device"),
        "precision": r.get("precision") or cfg.get("precision"),
    }


def build_comparison(results: list[dict[str, Any]], reference: str | None = None) -> dict[str, Any]:
    """The machine-readable comparison (`comparison.json`).

    reference: backend the ratios are taken against; default (or when it did not succeed)
    the first successful backend. Ratios are None where either side has no figure.
    """
    results = [dict(r) for r in results]
    ok = _ok_rows(results)
    ok_names = [_name(r, i) for i, r in enumerate(results) if r.get("status") == "ok"]
    note = None
    if reference is not None and reference not in ok_names:
        note = (
            f"requested reference {reference!r} did not succeed; using the first successful backend"
        )
        reference = None
    if reference is None and ok_names:
        reference = ok_names[0]
    ref = next((r for r in ok if r.get("backend") == reference), ok[0] if ok else None)

    rows = []
    for i, r in enumerate(results):
        row = {k: r.get(k) for k in _ROW_FIELDS}
        row["backend"] = _name(r, i)
        if r.get("status") != "ok":  # a failed run's figures are defaults, not measurements
            row = {k: (row[k] if k in ("backend", "status", "error") else None) for k in row}
        good = r.get("status") == "ok" and ref is not None
        row["speedup"] = _ratio(ref.get("train_time_s"), r.get("train_time_s")) if good else None
        row["memory_efficiency"] = (
            _ratio(ref.get("peak_rss_mb"), r.get("peak_rss_mb")) if good else None
        )
        row["tokens_per_s_ratio"] = (
            _ratio(r.get("tokens_per_s"), ref.get("tokens_per_s")) if good else None
        )
        m = _finite(r.get("mfu"))
        row["mfu_percent"] = None if m is None else 100.0 * m
        rows.append(row)

    checks = fairness_checks(results)
    source = ref or (results[0] if results else {})
    return _jsonable(
        {
            "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "reference": reference,
            "reference_note": note,
            "backends": [row["backend"] for row in rows],
            "ok_backends": ok_names,
            "failed_backends": [row["backend"] for row in rows if row["status"] != "ok"],
            "rows": rows,
            "fairness": checks,
            "all_fair": all(c["ok"] for c in checks),
            "loss_diff": max_loss_diff(results),
            "environment": {_name(r, i): _env_summary(r) for i, r in enumerate(results)},
            "config": copy.deepcopy(source.get("config") or {}),
            "results": copy.deepcopy(results),
        }
    )


# ----------------------------------------------------------------------------- table


def _f(v: Any, spec: str, suffix: str = "") -> str:
    x = _num(v)
    if x is None:
        return NA
    if not math.isfinite(x):
        return str(x)
    return format(x, spec) + suffix


def _int(v: Any) -> str:
    x = _finite(v)
    return NA if x is None else f"{int(x):,}"


def _text(v: Any, width: int = 40) -> str:
    if v is None or v == "":
        return NA
    return _short(str(v), width)


# (label, how to render one row) in the write-up's order, then the extra figures.
TABLE_ROWS: list[tuple[str, Any]] = [
    ("Training time (s)", lambda r: _f(r.get("train_time_s"), ".2f")),
    ("Peak RSS (MB)", lambda r: _f(r.get("peak_rss_mb"), ".1f")),
    ("Framework peak (MB)", lambda r: _f(r.get("framework_peak_mb"), ".1f")),
    ("Final loss", lambda r: _f(r.get("final_loss"), ".5f")),
    ("Eval loss", lambda r: _f(r.get("eval_loss"), ".5f")),
    ("Speedup factor", lambda r: _f(r.get("speedup"), ".2f", "x")),
    ("Memory efficiency", lambda r: _f(r.get("memory_efficiency"), ".2f", "x")),
    ("Tokens/s (all)", lambda r: _f(r.get("tokens_per_s"), ".1f")),
    ("Loss tokens/s", lambda r: _f(r.get("loss_tokens_per_s"), ".1f")),
    ("MFU (%)", lambda r: _f(r.get("mfu_percent"), ".2f")),
    ("Load/convert time (s)", lambda r: _f(r.get("load_time_s"), ".2f")),
    ("Warm-up time (s)", lambda r: _f(r.get("warmup_time_s"), ".2f")),
    ("Trainable params", lambda r: _int(r.get("trainable_params"))),
    ("BLAS", lambda r: _text(r.get("blas"))),
    ("Threads", lambda r: _int(r.get("threads") or None)),  # 0: not recorded
    ("Status", lambda r: "ok" if r.get("status") == "ok" else "FAILED"),
]


def _cells(comparison: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    rows = comparison.get("rows") or []
    header = ["Backend"] + [str(r.get("backend")) for r in rows]
    body = [[label] + [fn(r) for r in rows] for label, fn in TABLE_ROWS]
    return header, body


def _grid(header: list[str], body: list[list[str]]) -> str:
    widths = [max(len(line[c]) for line in [header, *body]) for c in range(len(header))]
    sep = "+" + "+".join("-" * (w + 2) for w in widths) + "+"
    head_sep = "+" + "+".join("=" * (w + 2) for w in widths) + "+"

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    out = [sep, line(header), head_sep]
    for cells in body:
        out += [line(cells), sep]
    return "\n".join(out)


def _loss_diff_line(comparison: dict[str, Any]) -> str:
    d = comparison.get("loss_diff")
    if not d:
        return "Largest per-step loss difference: n/a (fewer than 2 successful backends)"
    if d.get("max_abs_diff") is None:
        return "Largest per-step loss difference: n/a (no finite losses to compare)"
    a, b = d["pair"]
    extra = [
        f"{n} vs {d['reference']}: {_f(p.get('max_abs_diff'), '.3e')} (step {p.get('step')}, rel {_f(p.get('max_rel_diff'), '.2e')})"
        for n, p in (d.get("vs_reference") or {}).items()
    ]
    mism = [
        f"{p['pair'][0]}/{p['pair'][1]}" for p in d.get("pairs") or [] if p.get("length_mismatch")
    ]
    text = (
        f"Largest per-step loss difference: {d['max_abs_diff']:.3e} ({a} vs {b}, step {d['step']})"
    )
    if len(extra) > 1:
        text += "; " + "; ".join(extra)
    if mism:
        text += "; loss lists differ in length: " + ", ".join(mism)
    return text


def _fairness_lines(comparison: dict[str, Any]) -> list[str]:
    label = {"pass": "PASS", "mismatch": "MISMATCH", "missing": "MISMATCH (not recorded)"}
    return [
        f"  {label.get(c.get('status'), 'PASS' if c.get('ok') else 'MISMATCH'):<8} {c['check']}: {c['detail']}"
        for c in comparison.get("fairness") or []
    ]


def _error_lines(comparison: dict[str, Any]) -> list[str]:
    out = []
    for r in comparison.get("rows") or []:
        if r.get("status") == "ok":
            continue
        err = str(r.get("error") or "no error message recorded").strip()
        lines = [ln for ln in err.splitlines() if ln.strip()]
        last = lines[-1] if lines else err
        more = " (full traceback in comparison.json)" if len(lines) > 1 else ""
        out.append(f"{r.get('backend')} FAILED: {_short(last, 300)}{more}")
    return out


def _backend_notes(comparison: dict[str, Any]) -> list[str]:
    """Where a backend's numerics differ on purpose (mlx-lm), how the `mlx` backend used its
    threads when it split rows over streams, and warnings (reference BLAS)."""
    out = []
    for r in comparison.get("results") or []:
        extra = r.get("extra") or {}
        for note in extra.get("numerics_notes") or []:
            out.append(f"{r.get('backend')} numerics differ: {note}")
        if (extra.get("cpu_streams") or 1) > 1:
            busy = extra.get("cpu_busy_threads")
            out.append(
                f"{r.get('backend')} threads: {extra.get('threads_note')}"
                + (f"; {busy:.2f} threads busy over the timed steps" if busy is not None else "")
            )
        for warning in extra.get("warnings") or []:
            out.append(f"{r.get('backend')}: {warning}")
    return out


def format_table(comparison: dict[str, Any]) -> str:
    """The write-up's grid table (one column per backend), then loss diff, fairness, errors, notes."""
    header, body = _cells(comparison)
    lines = [_grid(header, body), ""]
    if comparison.get("reference"):
        lines.append(f"Reference for ratios: {comparison['reference']}")
    if comparison.get("reference_note"):
        lines.append(f"Note: {comparison['reference_note']}")
    lines.append(_loss_diff_line(comparison))
    lines.append("Fairness checks:")
    lines += _fairness_lines(comparison)
    lines += _error_lines(comparison)
    lines += _backend_notes(comparison)
    lines.append("")
    lines += [f"* {n}" for n in FOOTNOTES]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- files


def _atomic_write(path: Path, data: bytes) -> None:
    """Write to a temp file beside `path`, then os.replace: never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the usual file mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _md_cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def _markdown(comparison: dict[str, Any]) -> str:
    cfg = comparison.get("config") or {}
    model = cfg.get("model") or f"preset {cfg.get('preset', NA)}"
    out = ["# ftcore comparison", ""]
    out += [
        f"- Model: `{model}`"
        + (f" (first {cfg['num_layers']} layers)" if cfg.get("num_layers") else ""),
        f"- Data: `{cfg.get('data') or 'built-in synthetic Alpaca-format set'}`, "
        f"{cfg.get('num_samples', NA)} samples, max_seq_len {cfg.get('max_seq_len', NA)}",
        f"- Batch {cfg.get('batch_size', NA)}, {cfg.get('steps', NA)} steps, precision "
        f"{cfg.get('precision', NA)}, device {cfg.get('device', NA)}, seed {cfg.get('seed', NA)}",
        f"- AdamW lr {cfg.get('lr', NA)} ({cfg.get('lr_schedule', NA)}, warm-up {cfg.get('warmup_steps', NA)}), "
        f"betas ({cfg.get('adam_beta1', NA)}, {cfg.get('adam_beta2', NA)}), eps {cfg.get('adam_eps', NA)}, "
        f"weight decay {cfg.get('weight_decay', NA)}",
        f"- LoRA rank {cfg.get('lora_rank', NA)}, alpha {cfg.get('lora_alpha', NA)}, dropout "
        f"{cfg.get('lora_dropout', NA)}, targets {', '.join(cfg.get('lora_targets') or []) or NA}",
        f"- Reference for ratios: {comparison.get('reference') or NA}",
    ]
    if comparison.get("reference_note"):
        out.append(f"- Note: {comparison['reference_note']}")

    header, body = _cells(comparison)
    out += ["", "## Results", ""]
    out.append("| " + " | ".join(_md_cell(h) for h in header) + " |")
    out.append("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
    out += ["| " + " | ".join(_md_cell(c) for c in cells) + " |" for cells in body]
    out += [""] + [f"- {n}" for n in FOOTNOTES]

    out += ["", "## Loss agreement", "", _loss_diff_line(comparison)]
    out += ["", "## Fairness checks", "", "| check | result | detail |", "|---|---|---|"]
    for c in comparison.get("fairness") or []:
        res = (
            "PASS"
            if c.get("ok")
            else ("MISMATCH (not recorded)" if c.get("status") == "missing" else "MISMATCH")
        )
        out.append(f"| {c['check']} | {res} | {_md_cell(str(c['detail']))} |")

    errors = _error_lines(comparison)
    if errors:
        out += ["", "## Failed backends", ""] + [f"- {_md_cell(e)}" for e in errors]
        for r in comparison.get("rows") or []:
            if r.get("status") != "ok" and r.get("error"):
                out += ["", f"`{r['backend']}` error:", "", "```", str(r["error"]).rstrip(), "```"]

    out += ["", "## Environment", ""]
    for name, env in (comparison.get("environment") or {}).items():
        versions = (
            ", ".join(f"{k} {v}" for k, v in sorted((env.get("versions") or {}).items())) or NA
        )
        out += [
            f"### {name}",
            "",
            f"- CPU: {env.get('cpu') or NA} ({env.get('logical_cores') or NA} logical cores)",
            f"- Device: {env.get('device') or NA}, precision: {env.get('precision') or NA}",
            f"- Python: {env.get('python') or NA}; versions: {versions}",
            f"- Git commit: {env.get('git_commit') or NA}",
            f"- BLAS: {env.get('blas') or NA}",
            f"- Threads: {env.get('threads') if env.get('threads') is not None else NA}",
            "",
        ]
    notes = _backend_notes(comparison)
    if notes:
        out += ["## Backend notes", "", *[f"- {n}" for n in notes], ""]
    out += [
        "## Plots",
        "",
        "![loss curves](loss_curves.png)",
        "![throughput](throughput.png)",
        "![memory](memory.png)",
        "",
    ]
    return "\n".join(out)


def _ok_result_rows(comparison: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in comparison.get("results") or [] if r.get("status") == "ok"]


_STYLES = ["-", "--", "-.", ":"]
_MARKERS = ["o", "s", "^", "D", "v", "P"]


def _new_figure() -> Any:
    from matplotlib.figure import Figure  # no pyplot: no global state, no display

    return Figure(figsize=(8, 5), dpi=120)


def _png(fig: Any) -> bytes:
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
        f"LoRA training loss: {model}, {cfg.get('precision', '?')}, "
        f"batch {cfg.get('batch_size', '?')} x seq {cfg.get('max_seq_len', '?')}"
    )
    from matplotlib.ticker import FormatStrFormatter

    rows = [r for r in _ok_result_rows(comparison) if r.get("losses")]
    fig = _new_figure()
    if not rows:
        ax = fig.add_subplot()
        _empty(ax, "no successful backend recorded losses")
        ax.set_title(title)
        return _png(fig)

    two = len(rows) > 1
    gs = fig.add_gridspec(2 if two else 1, 1, height_ratios=[3, 1.2] if two else [1], hspace=0.08)
    ax = fig.add_subplot(gs[0])
    n_steps = max(len(r["losses"]) for r in rows)
    every = max(1, n_steps // 15)
    colors = [f"C{i % 10}" for i in range(len(rows))]  # same colour per backend in both panels
    for i, r in enumerate(rows):
        ys = [_finite(v) if _finite(v) is not None else math.nan for v in r["losses"]]
        xs = list(range(1, len(ys) + 1))
        # Decreasing widths, different dashes and hollow markers: identical curves stay visible.
        ax.plot(
            xs, ys, label=str(r.get("backend")), color=colors[i], linestyle=_STYLES[i % len(_STYLES)],
            marker=_MARKERS[i % len(_MARKERS)], markevery=(i % every, every),
            markersize=max(4, 9 - 2 * i), markerfacecolor="none", linewidth=max(1.0, 2.6 - 0.5 * i),
        )  # fmt: skip
    ax.set_ylabel("training loss (mean CE over target tokens)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(title="backend")
    if two:
        ax.tick_params(labelbottom=False)
        axd = fig.add_subplot(gs[1], sharex=ax)
        ref = rows[0]
        for i, r in enumerate(rows[1:], start=1):
            d = [
                abs(a - b) if a is not None and b is not None else math.nan
                for a, b in (
                    (_finite(x), _finite(y))
                    for x, y in zip(ref["losses"], r["losses"], strict=False)
                )
            ]
            axd.plot(range(1, len(d) + 1), d, color=colors[i], linestyle=_STYLES[i % len(_STYLES)],
                     marker=_MARKERS[i % len(_MARKERS)], markersize=4, label=str(r.get("backend")))  # fmt: skip
        axd.set_ylabel(f"|loss diff|\nvs {ref.get('backend')}")
        # fixed format: no "1e-4" offset text drawn over the top panel
        axd.yaxis.set_major_formatter(FormatStrFormatter("%.1e"))
        axd.yaxis.get_major_locator().set_params(nbins=4)
        axd.legend(fontsize=8, loc="upper right")
        axd.grid(True, alpha=0.3)
        axd.set_xlabel("step")
        fig.align_ylabels([ax, axd])
    else:
        ax.set_xlabel("step")
    ax.xaxis.get_major_locator().set_params(integer=True)
    fig.subplots_adjust(left=0.16, right=0.97, top=0.92, bottom=0.1)
    return _png(fig)


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
        (str(r.get("backend")) + ("" if r.get("status") == "ok" else "\n(failed)"), r)
        for r in comparison.get("rows") or []
    ]


def _plot_throughput(comparison: dict[str, Any]) -> bytes:
    fig = _new_figure()
    ax = fig.add_subplot()
    named = _bar_names(comparison)
    if not named:
        _empty(ax, "no backends")
    else:
        names = [n for n, _ in named]
        _bars(ax, names, [
            ("all tokens (incl. padding)", [_finite(r.get("tokens_per_s")) for _, r in named]),
            ("loss tokens only", [_finite(r.get("loss_tokens_per_s")) for _, r in named]),
        ], ".1f")  # fmt: skip
        ax.set_ylabel("throughput (tokens / s)")
        ax.set_xlabel("backend")
        ax.legend()
    ax.set_title("Training throughput (timed steps after warm-up)")
    fig.tight_layout()
    return _png(fig)


def _plot_memory(comparison: dict[str, Any]) -> bytes:
    fig = _new_figure()
    ax = fig.add_subplot()
    named = _bar_names(comparison)
    if not named:
        _empty(ax, "no backends")
    else:
        names = [n for n, _ in named]
        series = [
            ("peak RSS (own process)", [_finite(r.get("peak_rss_mb")) for _, r in named]),
            ("RSS after model load", [_finite(r.get("baseline_rss_mb")) for _, r in named]),
        ]
        fw = [_finite(r.get("framework_peak_mb")) for _, r in named]
        if any(v is not None for v in fw):
            series.insert(1, ("framework peak", fw))
        _bars(ax, names, series, ".0f")
        ax.set_ylabel("memory (MB)")
        ax.set_xlabel("backend")
        ax.legend()
    ax.set_title("Memory: peak RSS of each backend's own process")
    fig.tight_layout()
    return _png(fig)


def write_report(comparison: dict[str, Any], out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Write report.md, comparison.json and the three PNG plots into out_dir; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "report": out / "report.md",
        "comparison": out / "comparison.json",
        "loss_curves": out / "loss_curves.png",
        "throughput": out / "throughput.png",
        "memory": out / "memory.png",
    }
    text = json.dumps(_jsonable(comparison), indent=2, sort_keys=False, allow_nan=False) + "\n"
    _atomic_write(paths["comparison"], text.encode())
    _atomic_write(paths["loss_curves"], _plot_losses(comparison))
    _atomic_write(paths["throughput"], _plot_throughput(comparison))
    _atomic_write(paths["memory"], _plot_memory(comparison))
    _atomic_write(paths["report"], _markdown(comparison).encode())
    return paths

"""The comparison for people: the grid table printed by `ftcore compare`, and report.md."""

from __future__ import annotations

from typing import Any

from ftcore.report.fairness import step_kinds_line
from ftcore.report.footnotes import FOOTNOTES
from ftcore.report.rows import TABLE_ROWS, TARGET_ROWS
from ftcore.report.values import NA, fmt, fmt_int, short
from ftcore.report.verdict import verdict_lines


def _cells(comparison: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    rows = comparison.get("rows") or []
    header = ["Backend"] + [str(r.get("backend")) for r in rows]
    spec = list(TABLE_ROWS)
    if any(r.get("target") for r in rows):
        target = next(r["target"]["eval_loss"] for r in rows if r.get("target"))
        at = [label for label, _ in spec].index("Greedy agreement") + 1
        spec[at:at] = [
            (f"{label} {target:g}" if label.startswith("Steps") else label, fn)
            for label, fn in TARGET_ROWS
        ]
    body = [[label] + [fn(r) for r in rows] for label, fn in spec]
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
        f"{n} vs {d['reference']}: {fmt(p.get('max_abs_diff'), '.3e')} (step {p.get('step')}, rel "
        f"{fmt(p.get('max_rel_diff'), '.2e')})"
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


def scaling_lines(comparison: dict[str, Any]) -> list[str]:
    """One line per data-parallel row: 1 process x T threads vs W processes x T/W threads."""
    out = []
    for x in comparison.get("scaling") or []:
        out.append(
            f"Scaling {x['backend']}: 1 process x {fmt_int(x.get('one_process_threads'))} threads "
            f"{fmt(x.get('one_process_tokens_per_s'), '.1f')} tok/s; {x['world_size']} processes x "
            f"{fmt_int(x.get('rank_threads'))} thread(s) {fmt(x.get('tokens_per_s'), '.1f')} "
            f"tok/s; efficiency {fmt(x.get('efficiency'), '.2f')}"
        )
    return out


def _fairness_lines(comparison: dict[str, Any]) -> list[str]:
    label = {"pass": "PASS", "mismatch": "MISMATCH", "missing": "MISMATCH (not recorded)"}
    return [
        f"  {label.get(c.get('status'), 'PASS' if c.get('ok') else 'MISMATCH'):<8} {c['check']}: "
        f"{c['detail']}"
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
        out.append(
            f"{r.get('backend')} {str(r.get('status') or 'failed').upper()}: "
            f"{short(last, 300)}{more}"
        )
    return out


def headline(comparison: dict[str, Any]) -> str:
    """First line of the console and report: whether every backend ran ok, and who did not."""
    bad = [r for r in comparison.get("rows") or [] if r.get("status") != "ok"]
    if not bad:
        return f"All {len(comparison.get('rows') or [])} backends ran ok."
    def last_line(err: Any) -> str:  # a traceback's last line says what happened
        lines = [ln.strip() for ln in str(err or "no error recorded").splitlines() if ln.strip()]
        return short(lines[-1] if lines else "no error recorded", 120)

    what = "; ".join(
        f"{r.get('backend')} {r.get('status')}: {last_line(r.get('error'))}" for r in bad
    )
    return f"NOT OK - {what}"


def _backend_notes(comparison: dict[str, Any]) -> list[str]:
    """What each backend says about how it ran (its result's notes and warnings)."""
    out = []
    for r in comparison.get("results") or []:
        for line in [*(r.get("notes") or []), *(r.get("warnings") or [])]:
            out.append(f"{r.get('backend')}: {line}")
    return out


def format_table(comparison: dict[str, Any]) -> str:
    """The grid table (one column per backend), then loss diff, fairness, errors and backend
    notes."""
    header, body = _cells(comparison)
    lines = [
        headline(comparison),
        "",
        _grid(header, body),
        "",
        *verdict_lines(comparison.get("verdict")),
    ]
    if comparison.get("reference"):
        lines.append(f"Reference for ratios: {comparison['reference']}")
    for key in ("reference_note", "size_note"):
        if comparison.get(key):
            lines.append(f"Note: {comparison[key]}")
    lines.append(_loss_diff_line(comparison))
    lines += scaling_lines(comparison)
    lines.append("Fairness checks:")
    lines += _fairness_lines(comparison)
    lines.append(f"  {step_kinds_line(comparison.get('step_kinds'))}")
    lines += _error_lines(comparison)
    lines += _backend_notes(comparison)
    lines.append("")
    lines += [f"* {n}" for n in FOOTNOTES]
    return "\n".join(lines)


def _md_cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def markdown(comparison: dict[str, Any]) -> str:
    """report.md: the setup, the full table with its footnotes, the checks, failures, the
    environment, the backend notes and the plots."""
    out = [*_md_setup(comparison), *_md_results(comparison), *_md_checks(comparison)]
    out += _md_environment(comparison)
    notes = _backend_notes(comparison)
    if notes:
        out += ["## Backend notes", "", *[f"- {n}" for n in notes], ""]
    out += ["## Plots", "", "![loss curves](loss_curves.png)", "![throughput](throughput.png)",
            "![memory](memory.png)", ""]
    return "\n".join(out)


def _md_setup(comparison: dict[str, Any]) -> list[str]:
    cfg = comparison.get("config") or {}
    model = cfg.get("model") or f"preset {cfg.get('preset', NA)}"
    out = ["# ftcore comparison", "", f"**{headline(comparison)}**", ""]
    if said := verdict_lines(comparison.get("verdict")):
        out += [*[f"- {line}" for line in said], ""]
    out += [
        f"- Model: `{model}`"
        + (f" (first {cfg['num_layers']} layers)" if cfg.get("num_layers") else ""),
        f"- Data: `{cfg.get('data') or 'built-in synthetic Alpaca-format set'}`, "
        f"{cfg.get('num_samples', NA)} samples, max_seq_len {cfg.get('max_seq_len', NA)}",
        f"- Fine-tune {cfg.get('fine_tune', 'lora')}, batch {cfg.get('batch_size', NA)} x "
        f"{cfg.get('grad_accum', 1)} micro-batch(es) a step, {cfg.get('steps', NA)} steps, "
        f"precision {cfg.get('precision', NA)}, device {cfg.get('device', NA)}, seed "
        f"{cfg.get('seed', NA)}",
        f"- AdamW lr {cfg.get('lr', NA)} ({cfg.get('lr_schedule', NA)}, warm-up "
        f"{cfg.get('warmup_steps', NA)}), betas ({cfg.get('adam_beta1', NA)}, "
        f"{cfg.get('adam_beta2', NA)}), eps {cfg.get('adam_eps', NA)}, weight decay "
        f"{cfg.get('weight_decay', NA)}",
        f"- LoRA rank {cfg.get('lora_rank', NA)}, alpha {cfg.get('lora_alpha', NA)}, dropout "
        f"{cfg.get('lora_dropout', NA)}, targets {', '.join(cfg.get('lora_targets') or []) or NA}",
        f"- Reference for ratios: {comparison.get('reference') or NA}",
    ]
    for key in ("reference_note", "size_note"):
        if comparison.get(key):
            out.append(f"- Note: {comparison[key]}")
    return out


def _md_results(comparison: dict[str, Any]) -> list[str]:
    header, body = _cells(comparison)
    out = ["", "## Results", ""]
    out.append("| " + " | ".join(_md_cell(h) for h in header) + " |")
    out.append("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
    out += ["| " + " | ".join(_md_cell(c) for c in cells) + " |" for cells in body]
    out += [""] + [f"- {n}" for n in FOOTNOTES]
    out += ["", "## Loss agreement", "", _loss_diff_line(comparison)]
    if scaled := scaling_lines(comparison):
        out += ["", "## Data-parallel scaling", "", *[f"- {x}" for x in scaled]]
    return out


def _md_checks(comparison: dict[str, Any]) -> list[str]:
    """The fairness checks' table and the failed backends with their errors."""
    out = ["", "## Fairness checks", "", "| check | result | detail |", "|---|---|---|"]
    for c in comparison.get("fairness") or []:
        res = (
            "PASS"
            if c.get("ok")
            else ("MISMATCH (not recorded)" if c.get("status") == "missing" else "MISMATCH")
        )
        out.append(f"| {c['check']} | {res} | {_md_cell(str(c['detail']))} |")
    out += ["", step_kinds_line(comparison.get("step_kinds"))]
    errors = _error_lines(comparison)
    if errors:
        out += ["", "## Failed backends", ""] + [f"- {_md_cell(e)}" for e in errors]
        for r in comparison.get("rows") or []:
            if r.get("status") != "ok" and r.get("error"):
                out += ["", f"`{r['backend']}` error:", "", "```", str(r["error"]).rstrip(), "```"]
    return out


def _md_environment(comparison: dict[str, Any]) -> list[str]:
    out = ["", "## Environment", ""]
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
    return out

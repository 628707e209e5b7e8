"""The machine-readable comparison (comparison.json): one row per backend with derived ratios, the
fairness checks, per-step loss differences and each backend's environment.

Input is a list of per-backend result.json dicts (fields: ftcore.result.RunResult).
"""

from __future__ import annotations

import copy
import statistics
from datetime import datetime, timezone
from itertools import combinations
from typing import Any

from ftcore.files import jsonable
from ftcore.measure.memory_model import peak_over_model
from ftcore.measure.projection import project_runs
from ftcore.report.fairness import fairness_checks, step_kinds
from ftcore.report.values import backend_name, finite, ok_rows, ratio
from ftcore.report.verdict import build_verdict, busy, usable
from ftcore.result import figures


def _pair_diff(a: list[Any], b: list[Any]) -> dict[str, Any]:
    """Largest |a-b| and |a-b|/|a| over steps where both losses are finite."""
    best, best_i, best_rel, compared = None, None, None, 0
    for i, (x, y) in enumerate(zip(a, b, strict=False)):  # common prefix; lengths flagged below
        x, y = finite(x), finite(y)
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
     "pairs": [every pair], "vs_reference": {backend: diff vs the first ok backend, with
     max_rel_diff}}.
    """
    rows = ok_rows(results)
    if len(rows) < 2:
        return None
    named = [(backend_name(r, i), list(r.get("losses") or [])) for i, r in enumerate(rows)]
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


_ROW_FIELDS = ("backend", "status", "error", *figures("row"))  # the schema: ftcore.result


def greedy_agreement(r: dict[str, Any], ref: dict[str, Any] | None) -> dict[str, Any] | None:
    """How many eval records got token-for-token the same greedy answer (after the fine-tune) from
    this backend as from the reference: {"same", "of", "vs"}; None when either did not generate."""
    if ref is None or r is ref:
        return None
    mine = (r.get("generations") or {}).get("after")
    theirs = (ref.get("generations") or {}).get("after")
    if not mine or not theirs or len(mine) != len(theirs):
        return None
    same = sum(list(a) == list(b) for a, b in zip(mine, theirs, strict=True))
    return {"same": same, "of": len(mine), "vs": ref.get("backend")}


def scaling(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per data-parallel row: its tokens/s against the same backend's one-process row (same
    threads in all): efficiency = tokens/s(W ranks x T/W threads) / tokens/s(1 x T threads)."""
    ok = ok_rows(results)
    out = []
    for r in ok:
        if (r.get("world_size") or 1) <= 1:
            continue
        one = next((o for o in ok if o.get("backend") == r.get("backend")
                    and (o.get("world_size") or 1) == 1), None)  # fmt: skip
        out.append({
            "backend": r.get("backend"), "world_size": r.get("world_size"),
            "rank_threads": r.get("rank_threads"), "tokens_per_s": r.get("tokens_per_s"),
            "one_process_threads": one.get("threads") if one else None,
            "one_process_tokens_per_s": one.get("tokens_per_s") if one else None,
            "efficiency": ratio(r.get("tokens_per_s"), one.get("tokens_per_s")) if one else None,
        })  # fmt: skip
    return out


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


# Figures a row takes as the median over its usable repeats (ok, not BUSY), with their spread.
REPEATED_FIELDS = figures("repeated")


def _over_repeats(result: dict[str, Any], runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The result with REPEATED_FIELDS replaced by their median over the usable runs (all ok runs
    when every one was BUSY), the epoch projection made from all of them
    (ftcore.measure.projection), plus `repeats_used`, `repeats_busy` and `spread` {field: [min,
    max]}."""
    ok = [r for r in runs if r.get("status") == "ok"]
    used = usable(runs) or ok
    out = {**result, "repeats_used": len(used), "repeats_busy": sum(map(busy, runs)), "spread": {}}
    if not used or result.get("status") != "ok":
        return out
    for key in REPEATED_FIELDS:
        values = [finite(r.get(key)) for r in used]
        if all(v is not None for v in values):
            out[key] = statistics.median(values)
            out["spread"][key] = [min(values), max(values)]
    out["machine_load"] = {**(result.get("machine_load") or {}), "busy": all(map(busy, used))}
    out.update(project_runs(used) or {})  # the epoch priced from every usable run's steps
    return out


def _row(
    i: int, r: dict[str, Any], ref: dict[str, Any] | None, scaled: list[dict[str, Any]]
) -> dict[str, Any]:
    """One backend's row: its figures (medians over repeats), the ratios against the reference
    `ref`, and the derived figures the table shows."""
    row = {k: r.get(k) for k in _ROW_FIELDS}
    row["backend"] = backend_name(r, i)
    if r.get("status") != "ok":  # a failed run's figures are defaults, not measurements
        row = {k: (row[k] if k in ("backend", "status", "error") else None) for k in row}
    good = r.get("status") == "ok" and ref is not None
    row["speedup"] = ratio(ref.get("train_time_s"), r.get("train_time_s")) if good else None
    row["memory_efficiency"] = (
        ratio(ref.get("peak_rss_mb"), r.get("peak_rss_mb")) if good else None
    )
    row["tokens_per_s_ratio"] = (
        ratio(r.get("tokens_per_s"), ref.get("tokens_per_s")) if good else None
    )
    m = finite(r.get("mfu"))
    row["mfu_percent"] = None if m is None else 100.0 * m
    before, after = finite(r.get("eval_loss_before")), finite(r.get("eval_loss"))
    row["eval_loss_drop"] = 1 - after / before if good and before and after is not None else None
    row["greedy_agreement"] = greedy_agreement(r, ref) if good else None
    eff = next((x["efficiency"] for x in scaled if x["backend"] == r.get("backend")), None)
    if r.get("status") == "ok" and eff is not None:  # the one-process row is the reference
        row["scaling_efficiency"] = eff if (r.get("world_size") or 1) > 1 else 1.0
    else:
        row["scaling_efficiency"] = None
    model = r.get("memory_model") if r.get("status") == "ok" else None
    row["memory_model_mb"] = (model or {}).get("total")
    row["peak_rss_over_model"] = peak_over_model(
        r.get("peak_rss_max_rank_mb"), r.get("peak_rss_mb"), model
    )
    # the framework's own peak of its arrays (MLX; torch on CUDA) against the model of them
    row["framework_peak_over_model"] = peak_over_model(None, r.get("framework_peak_mb"), model)
    load = r.get("machine_load") or {}
    row["machine_busy"] = load.get("busy") if r.get("status") == "ok" else None
    row["runs"], row["busy_runs"], row["spread"] = r["repeats_used"], r["repeats_busy"], r["spread"]
    return row


def build_comparison(results: list[dict[str, Any]], reference: str | None = None,
                     repeats: list[list[dict[str, Any]]] | None = None) -> dict[str, Any]:
    """The machine-readable comparison (`comparison.json`).

    reference: backend the ratios are taken against; default (or when it did not succeed)
    the first successful backend. Ratios are None where either side has no figure.
    repeats: each backend's runs (aligned with `results`, one representative each): the rows'
    time and memory figures become medians over them, and `verdict` (ftcore.report.verdict) says
    which backend is faster and leaner, with intervals; without repeats each result is one run.
    """
    repeats = repeats or [[r] for r in results]
    results = [dict(r) for r in results]
    summed = [_over_repeats(r, runs) for r, runs in zip(results, repeats, strict=True)]
    ok = ok_rows(summed)
    ok_names = [backend_name(r, i) for i, r in enumerate(results) if r.get("status") == "ok"]
    note = None
    if reference is not None and reference not in ok_names:
        note = (
            f"requested reference {reference!r} did not succeed; using the first successful backend"
        )
        reference = None
    if reference is None and ok_names:
        reference = ok_names[0]
    ref = next((r for r in ok if r.get("backend") == reference), ok[0] if ok else None)

    scaled = scaling(summed)
    rows = [_row(i, r, ref, scaled) for i, r in enumerate(summed)]

    checks = fairness_checks(results)
    names = [row["backend"] for row in rows]
    verdict = build_verdict(dict(zip(names, repeats, strict=True)), reference)
    source = ref or (results[0] if results else {})
    return jsonable(
        {
            "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "reference": reference,
            "reference_note": note,
            "backends": [row["backend"] for row in rows],
            "ok_backends": ok_names,
            "failed_backends": [row["backend"] for row in rows if row["status"] != "ok"],
            "all_ok": all(row["status"] == "ok" for row in rows),
            "rows": rows,
            "fairness": checks,
            "all_fair": all(c["ok"] for c in checks),
            "step_kinds": step_kinds(results),  # compiled / eager, informational
            "loss_diff": max_loss_diff(results),
            "scaling": scaled,
            "verdict": verdict,
            "environment": {backend_name(r, i): _env_summary(r) for i, r in enumerate(results)},
            "config": copy.deepcopy(source.get("config") or {}),
            "results": copy.deepcopy(results),
        }
    )

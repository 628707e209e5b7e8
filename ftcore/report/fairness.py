"""Fairness checks: did every successful backend see the same inputs and settings?"""

from __future__ import annotations

import math
from typing import Any

from ftcore.report.values import backend_name, ok_rows, same, short
from ftcore.tolerances import LR_RTOL

# Config keys that may legitimately differ between backends (not part of the experiment); the
# process count is what a scaling comparison varies (threads are compared in all: `threads`).
IGNORED_CONFIG_KEYS = frozenset({"backend", "out", "out_dir", "nproc", "nnodes", "rdzv_endpoint",
                                 "hostfile"})  # fmt: skip


def optimizer_key(opt: Any) -> Any:
    """Optimizer settings to compare; the name is compared case-insensitively without module path.
    The per-tensor weight decay has a check of its own (_decay_check)."""
    if not isinstance(opt, dict):
        return opt
    out = {k: v for k, v in opt.items() if k != "weight_decay_per_tensor"}
    if isinstance(out.get("name"), str):
        out["name"] = out["name"].rsplit(".", 1)[-1].lower()
    return out


def config_key(cfg: Any) -> Any:
    if not isinstance(cfg, dict):
        return cfg
    return {k: v for k, v in cfg.items() if k not in IGNORED_CONFIG_KEYS}


def scheduled_lr(cfg: dict[str, Any], step: int) -> float:
    """The LR of step `step` (0-based) by the documented schedule, written out here apart from
    RunConfig.lr_at so that a wrong lr_at, shared by every backend, still shows: warm-up
    lr * (step + 1) / (warmup + 1), then constant, or linear / cosine over the share of the
    decay still to go, (steps - step) / (steps - warmup): 1 at the warm-up's end, 1 / (steps -
    warmup) at the last step, so the last step's LR is never 0."""
    lr, warm, steps = cfg["lr"], cfg["warmup_steps"], cfg["steps"]
    if step < warm:
        return lr * (step + 1) / (warm + 1)
    left = (steps - step) / max(1, steps - warm)
    return {"constant": lr, "linear": lr * left,
            "cosine": lr * (1 - math.cos(math.pi * left)) / 2}[cfg["lr_schedule"]]


def lr_schedule_key(r: dict[str, Any]) -> Any:
    """The steps whose applied LR (read from the backend's optimizer, `lr_per_step`) is not the
    documented schedule's, as [step, applied, expected]: [] when every step's is (float32
    rounding allowed); None when the run recorded no LRs or no schedule."""
    lrs, cfg = (r.get("optimizer") or {}).get("lr_per_step"), r.get("config") or {}
    if not lrs or not all(k in cfg for k in ("lr", "warmup_steps", "steps", "lr_schedule")):
        return None
    want = [scheduled_lr(cfg, s) for s in range(len(lrs))]
    return [[s, a, w] for s, (a, w) in enumerate(zip(lrs, want, strict=True))
            if not math.isclose(a, w, rel_tol=LR_RTOL, abs_tol=1e-12)][:3]


# ----------------------------------------------------------------------------- fairness


def _check(name: str, rows: list[dict[str, Any]], get: Any) -> dict[str, Any]:
    names = [backend_name(r, i) for i, r in enumerate(rows)]
    values = [get(r) for r in rows]
    # None, "" and {} are RunResult's "not recorded" defaults (0 for counts, see callers)
    values = [None if v in ("", {}) else v for v in values]
    pairs = list(zip(names, values, strict=True))
    missing = [n for n, v in pairs if v is None]
    equal = all(same(values[0], v) for v in values[1:]) if values else True
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
            + ", ".join(f"{n}={short(v, 24)}" for n, v in pairs)
        )
    elif equal:
        status, detail = "pass", f"all {len(rows)} = {short(values[0])}"
    elif all(isinstance(v, dict) for v in values):
        # Name only the keys that differ, with each backend's value.
        keys = sorted(set().union(*values), key=str)
        diffs = [
            f"{k}: " + ", ".join(f"{n}={short(v.get(k), 24)}" for n, v in pairs)
            for k in keys
            if not all(same(values[0].get(k), v.get(k)) for v in values[1:])
        ]
        status, detail = "mismatch", "; ".join(diffs)
    else:
        status = "mismatch"
        detail = ", ".join(f"{n}={short(v, 24)}" for n, v in pairs)
    return {"check": name, "ok": status == "pass", "status": status, "detail": detail}


def _lr_check(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Each backend against the documented schedule, not against the others: a schedule wrong in
    the same way everywhere is a mismatch too."""
    pairs = [(backend_name(r, i), lr_schedule_key(r)) for i, r in enumerate(rows)]
    missing = [n for n, v in pairs if v is None]
    off = [f"{n} step {s}: {a:.6g} (schedule {w:.6g})" for n, v in pairs for s, a, w in v or []]
    if missing:
        status, detail = "missing", "no per-step LR recorded by " + ", ".join(missing)
    elif off:
        status, detail = "mismatch", "; ".join(off)
    else:
        status, detail = (
            "pass",
            f"all {len(rows)} applied the {rows[0]['config']['lr_schedule']} schedule"
            if rows
            else "no rows",
        )
    return {"check": "lr_schedule", "ok": status == "pass", "status": status, "detail": detail}


def _decay_check(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The weight decay each backend's optimizer applies to each trainable tensor
    (optimizer.weight_decay_per_tensor, {lora_state key: decay}), against the first backend's:
    decay on lora_B only in one backend is a mismatch though both were asked for the same."""
    pairs = [(backend_name(r, i), (r.get("optimizer") or {}).get("weight_decay_per_tensor") or None)
             for i, r in enumerate(rows)]  # fmt: skip
    if missing := [n for n, v in pairs if v is None]:
        status, detail = "missing", "no per-tensor weight decay recorded by " + ", ".join(missing)
        return {"check": "weight_decay", "ok": False, "status": status, "detail": detail}
    off = []
    (first, ref), *others = pairs or [("", {})]
    for n, v in others:
        keys = sorted(ref.keys() | v.keys())
        if diff := [k for k in keys if not same(ref.get(k), v.get(k))]:
            off.append(f"{n}: {len(diff)} of {len(keys)} tensors differ from {first}, e.g. "
                       + ", ".join(f"{k} {first}={ref.get(k)} {n}={v.get(k)}" for k in diff[:2]))
    decays = ", ".join(map(str, sorted(set(ref.values()))))
    detail = (
        "; ".join(off) or f"all {len(rows)} alike on each of {len(ref)} tensors (decay {decays})"
    )
    return {
        "check": "weight_decay",
        "ok": not off,
        "status": "mismatch" if off else "pass",
        "detail": detail,
    }


def _as_asked_check(name: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """A figure each backend recorded from what ran (RunResult.fine_tune: its trainable tensors;
    RunResult.grad_accum: the micro-batches its loop or trainer ran per step), alike across
    backends and equal to what the config asked for: two backends that both ran LoRA when DoRA
    was asked are alike, and still a mismatch."""
    check = _check(name, rows, lambda r: r.get(name) or None)
    off = [f"{backend_name(r, i)} ran {r.get(name)!r}, asked {(r.get('config') or {}).get(name)!r}"
           for i, r in enumerate(rows)
           if r.get(name) and r.get(name) != (r.get("config") or {}).get(name, r.get(name))]
    if check["ok"] and off:
        check.update(ok=False, status="mismatch", detail="; ".join(off))
    return check


def fairness_checks(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Did every successful backend see the same inputs and settings? Each figure is measured in
    the backend's own run: the token ids its loop fed (hashed step by step), the settings read back
    from its optimizer object (the weight decay per tensor) and the learning rate of every step,
    the parameters its model trains, the threads its framework reports.

    Each check: {"check", "ok", "status" ("pass"|"mismatch"|"missing"), "detail"}.
    A value a backend did not record cannot be verified and is not ok ("missing").
    """
    rows = ok_rows(results)
    return [
        _check("batch_fingerprint", rows, lambda r: r.get("batch_fingerprint")),
        _check("fed_batches", rows, lambda r: r.get("fed_batches_fingerprint")),
        _check("initial_adapter_fingerprint", rows, lambda r: r.get("initial_adapter_fingerprint")),
        _check("trainable_params", rows, lambda r: r.get("trainable_params") or None),
        _as_asked_check("fine_tune", rows),
        _as_asked_check("grad_accum", rows),
        _check("optimizer", rows, lambda r: optimizer_key(r.get("optimizer"))),
        _decay_check(rows),
        _lr_check(rows),
        _check("precision", rows, lambda r: r.get("precision")),
        _check("threads", rows, lambda r: r.get("threads") or None),
        _check("config", rows, lambda r: config_key(r.get("config"))),
        _check("steps", rows, lambda r: len(r.get("losses") or []) or r.get("steps")),
    ]


def step_kinds(results: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Which successful backends ran their training step compiled (torch.compile, mx.compile) and
    which eager, as each one's run recorded it (RunResult.compiled_step): said beside the fairness
    checks, not one of them (compiling is part of what a backend is)."""
    kinds: dict[str, list[str]] = {"compiled": [], "eager": [], "not recorded": []}
    for i, r in enumerate(results):
        if r.get("status") == "ok":
            said = r.get("compiled_step")
            kind = "not recorded" if said is None else "compiled" if said else "eager"
            kinds[kind].append(backend_name(r, i))
    return kinds


def step_kinds_line(kinds: dict[str, list[str]] | None) -> str:
    """'Training step: compiled mlx, torch-compile; eager torch' (empty kinds left out)."""
    said = [f"{kind} {', '.join(names)}" for kind, names in (kinds or {}).items() if names]
    return "Training step: " + ("; ".join(said) or "no successful backend")

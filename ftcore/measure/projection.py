"""What a whole epoch (and a whole fine-tune) will cost, projected from a short run's step times.

A step's time depends on its width (`longest` batching: 33 to 513 columns at --max-seq-len 512),
and not in proportion at small sizes (a fixed per-step overhead), so the projection prices each
width apart instead of scaling one mean step:

- fit    t(w) = a + b * w  by least squares over the timed steps of every run (width w, time t);
         with a single width measured, t(w) = t * w / w_measured (stated as the method); a slope
         below 0 (noise) is taken as 0: time does not fall with width;
- epoch  sum over the epoch's widths of steps(w) * t(w), plus the one-time start-up of a run:
         its warm-up steps' time less the fit's (compilation), the median over the runs (a kernel
         build that only the first run on a machine pays is not every run's), once;
- 95%    an interval for the epoch a fresh run will train: a two-level bootstrap (runs, then
         steps within each picked run; refit per draw) of the projection, times that run's own
         level (runs differ: exp(the runs' log spread x Student's t, R - 1 degrees of freedom)),
         plus the spread of a sum of that many steps' residuals (normal, sd * sqrt(n));
         percentiles. With one run it covers step-to-step noise only.

The epoch's widths come from the run's records (ftcore.inputs.batching.epoch_widths); projecting
N records scales those counts by N / --num-samples (records like the ones drawn: their lengths,
the same share too long to train). Checked by tests/test_epoch_projection.py (simulated runs)
and a study (tests/test_epoch_projection_study.py): a measured one-epoch run lies inside the
interval projected from a short compare.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

BOOTSTRAP = 2000  # draws (as ftcore.measure.stats, not imported: SciPy would add ~50 MB to the
# peak RSS of the backend process that projects its own run)


@dataclass(frozen=True)
class Projection:
    """seconds (point), ci [low, high] (None: nothing to resample), steps projected, method."""

    seconds: float
    ci: tuple[float, float] | None
    steps: float
    method: str


def _fit(w: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row of (D, n) widths and times: (a, b) of t = a + b * w (module docstring's rules)."""
    mw, mt = w.mean(axis=-1), t.mean(axis=-1)
    var = ((w - mw[..., None]) ** 2).mean(axis=-1)
    cov = ((w - mw[..., None]) * (t - mt[..., None])).mean(axis=-1)
    one_width = var <= 1e-12
    b = np.where(one_width, mt / mw, np.maximum(cov / np.where(one_width, 1.0, var), 0.0))
    a = np.where(one_width, 0.0, mt - b * mw)
    return a, b


def _refits(w: np.ndarray, t: np.ndarray, rng: np.random.Generator, draws: int,
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(a, b, residual sd) of `draws` two-level bootstrap samples of the (R, S) runs: pick R runs
    with replacement, then S steps of each. In chunks of ~5,000 values: a backend's process
    projects its own run, and its peak RSS is a measurement (a single (draws, R*S) pass of 2,000
    draws over 60 steps added ~7 MB to MLX's ~100 MB)."""
    r, s = w.shape
    out = []
    chunk = max(1, 5_000 // w.size)
    for n in [min(chunk, draws - k) for k in range(0, draws, chunk)]:
        picked = rng.integers(0, r, (n, r))[:, :, None]  # which runs
        within = rng.integers(0, s, (n, r, s))  # which steps of each picked run
        wd, td = w[picked, within].reshape(n, -1), t[picked, within].reshape(n, -1)
        a, b = _fit(wd, td)
        out.append((a, b, np.sqrt(((td - (a[:, None] + b[:, None] * wd)) ** 2).mean(axis=-1))))
    return tuple(np.concatenate(x) for x in zip(*out, strict=True))  # type: ignore[return-value]


def project(
    runs: Sequence[tuple[Sequence[int], Sequence[float], float]],
    widths: dict[int, float],
    seed: int = 0,
    draws: int = BOOTSTRAP,
) -> Projection:
    """Seconds for `widths` ({width: steps}) from `runs`: (timed steps' widths, their times, the
    run's one-time start-up in seconds). Runs are cut to the fewest timed steps of any."""
    s = min(len(t) for _, t, _ in runs)
    if s == 0:
        raise ValueError("a run without timed steps")
    w = np.array([list(ws)[:s] for ws, _, _ in runs], dtype=float)  # (R, S)
    t = np.array([list(ts)[:s] for _, ts, _ in runs], dtype=float)
    once = np.array([o for _, _, o in runs], dtype=float)  # (R,)
    n_steps = float(sum(widths.values()))
    width_steps = float(sum(k * n for k, n in widths.items()))

    def total(a: np.ndarray, b: np.ndarray, start: np.ndarray) -> np.ndarray:
        return a * n_steps + b * width_steps + start

    a, b = _fit(w.reshape(1, -1), t.reshape(1, -1))
    start_up = float(np.median(once))  # one run's kernel build is not every run's start-up
    point = float(total(a, b, np.array([start_up]))[0])
    one_width = len(set(w.ravel().tolist())) == 1
    method = (
        f"per-width fit t(w) = a + b*w over {w.size} timed steps at {len(set(w.ravel()))} widths"
        if not one_width
        else f"one width measured ({int(w[0, 0])}): time in proportion to width"
    ) + f", {len(w)} run{'s' if len(w) > 1 else ''}"
    if w.size < 2:
        return Projection(point, None, n_steps, method)
    rng = np.random.default_rng(seed)
    r = len(w)
    ad, bd, residual_sd = _refits(w, t, rng, draws)
    noise = rng.standard_normal(draws) * residual_sd * math.sqrt(n_steps)
    # the run that will train the epoch is another run: its level (its steps over the fit) varies
    # as the measured runs' levels do; Student's t with R - 1 degrees of freedom for R runs
    levels = np.log((t / (a[0] + b[0] * w)).mean(axis=1))  # (R,) each run's log speed level
    spread = levels.std(ddof=1) if r > 1 else 0.0
    level = np.exp(spread * (rng.standard_t(r - 1, draws) if r > 1 else 0.0))
    totals = total(ad, bd, np.full(draws, start_up)) * level + noise
    lo, hi = (float(x) for x in np.percentile(totals, [2.5, 97.5]))
    return Projection(point, (lo, hi), n_steps, method)


def pooled_fit(runs: Sequence[tuple[Sequence[int], Sequence[float]]]) -> tuple[float, float]:
    """(a, b) of t = a + b * w over every (widths, times) run's steps pooled."""
    w = np.array([x for ws, _ in runs for x in ws], dtype=float)[None, :]
    t = np.array([x for _, ts in runs for x in ts], dtype=float)[None, :]
    a, b = _fit(w, t)
    return float(a[0]), float(b[0])


def start_up_s(widths: Sequence[int], times: Sequence[float], warmup: int,
               fit: tuple[float, float]) -> float:
    """One run's one-time start-up: its warm-up steps' time less what the fit (a, b) gives their
    widths; never below 0."""
    a, b = fit
    fitted = sum(a + b * x for x in widths[:warmup])
    return max(0.0, sum(times[:warmup]) - fitted)


def project_runs(results: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The epoch projection of a backend's runs (result dicts of one config: step_times_s,
    step_widths, epoch_widths {width: steps for epoch_records records}, config): epoch_time_s,
    epoch_time_ci_s, epoch_steps, epoch_method and, with --epochs N > 1, finetune_time_s and
    finetune_time_ci_s (N epochs, the start-up once). None without timed steps or widths."""
    runs = []
    for r in results:
        warm = int((r.get("config") or {}).get("timing_warmup_steps") or 0)
        times, widths = list(r.get("step_times_s") or []), list(r.get("step_widths") or [])
        if len(times) > warm and len(widths) == len(times) and r.get("epoch_widths"):
            runs.append((widths, times, warm))
    if not runs:
        return None
    fit = pooled_fit([(ws[k:], ts[k:]) for ws, ts, k in runs])  # once, for every run's start-up
    fit_input = [(ws[k:], ts[k:], start_up_s(ws, ts, k, fit)) for ws, ts, k in runs]
    epoch_widths = {int(k): float(n) for k, n in results[0]["epoch_widths"].items()}
    epoch = project(fit_input, epoch_widths)
    out: dict[str, Any] = {
        "epoch_time_s": epoch.seconds, "epoch_time_ci_s": list(epoch.ci) if epoch.ci else None,
        "epoch_steps": epoch.steps, "epoch_method": epoch.method,
    }  # fmt: skip
    epochs = (results[0].get("config") or {}).get("epochs")
    if epochs and epochs > 1:  # N epochs: every step N times, the start-up once
        whole = project(fit_input, {k: n * epochs for k, n in epoch_widths.items()})
        out["finetune_time_s"] = whole.seconds
        out["finetune_time_ci_s"] = list(whole.ci) if whole.ci else None
    return out

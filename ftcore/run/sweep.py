"""`ftcore sweep`: the compare verdict across model sizes. One short compare
(ftcore.run.compare.compare: the same processes, rounds and verdict) per point, each into its own
sub-folder OUT/<point>/; after each point sweep.json and speedup_vs_size.png are rewritten
(ftcore.report.sweep_report), so an interrupted or failed sweep keeps every point it finished.

Points: TinyLlama's architecture (`tinyllama-1.1b`, width 2048) cut to each depth of --layers
(default DEFAULT_LAYERS), plus the embedded default model (`tiny-pretrained`, width 128, 4 layers)
when neither --preset nor --model is given. `--preset P`: P at each depth. `--model DIR`: that
checkpoint as it is, one point (RunConfig refuses --num-layers with --model, so --layers is
refused with it too). A point whose compare fails is recorded as failed and the sweep goes on.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ftcore.config import RunConfig, UserError
from ftcore.inputs.arch import read_arch
from ftcore.inputs.presets import PRESET_CONFIGS
from ftcore.measure.memory_model import base_param_count
from ftcore.report.sweep_report import crossover, median_steps, write_sweep
from ftcore.run.compare import Schedule, compare, labels_for
from ftcore.run.preflight import Prepared

SWEEP_PRESET = "tinyllama-1.1b"  # the architecture whose depths are swept by default
DEFAULT_LAYERS = (1, 2, 4, 8, 16, 22)
EXTRA_PRESET = "tiny-pretrained"  # the embedded default model: one more point of the default sweep
# Sweep's own defaults for the compare flags a user does not give: a short compare a point (4
# steps, the first a timing warm-up; no eval, no greedy answers) and 2 runs a backend, the fewest
# that give an interval, with no extra rounds. Measured per point with these defaults (torch,mlx,
# 2 runs each, process start and model load included) on this 2-core VM on 2026-12-05, shared
# with other jobs (every run BUSY): at load 5-6, tiny-pretrained 52 s, L1 125 s, L2 125 s, L4
# 198 s, L8 347 s; with one core taken, L16 ~520 s and L22 ~550 s (twice a one-run compare: L16
# torch 197 s + mlx 61 s, L22 199 s + 76 s; a step at L22 torch ~45 s, mlx ~16 s); the checks
# before the first point ~45 s: ~33 min in all. Quiet, estimated (not measured): ~13 min, from
# 2 backends x 2 runs x 4 steps x (L + 1.5 for the head) layers x ~0.4 s a layer (a step at L22:
# ~1.1 TFLOP at ~120 GFLOPS), plus ~10 s a process. All six depths are kept: 15 min is met only
# on a quiet machine; --layers 1,2,4,8 when it is not (15 min here at load 5-6).
SWEEP_DEFAULTS = {"steps": 4, "timing_warmup_steps": 1, "eval_samples": 0,
                  "eval_generate": False, "repeats": 2, "time_budget_s": 0.0}


@dataclass(frozen=True)
class Point:
    name: str  # its sub-folder: tinyllama-1.1b-L8
    cfg: RunConfig


def parse_layers(text: str | None, preset: str) -> list[int]:
    """The depths of --layers ("1,2,4"), ascending (none given: DEFAULT_LAYERS below the preset's
    depth, and its depth); UserError (one line) for an empty list, a non-integer, a depth < 1, one
    named twice or one beyond the preset's layers."""
    if text is None:
        most = PRESET_CONFIGS[preset]["num_hidden_layers"]
        return [n for n in DEFAULT_LAYERS if n < most] + [most]
    items = [t.strip() for t in text.split(",")]
    if not text.strip() or "" in items:
        raise UserError(f"--layers: give depths as a comma list, e.g. 1,2,4 (not {text!r})")
    try:
        depths = [int(t) for t in items]
    except ValueError:
        bad = next(t for t in items if not t.lstrip("-").isdigit())
        raise UserError(f"--layers: {bad!r} is not a whole number") from None
    most = PRESET_CONFIGS[preset]["num_hidden_layers"]
    for n in depths:
        if n < 1:
            raise UserError(f"--layers: a depth must be >= 1, not {n}")
        if n > most:
            raise UserError(f"--layers: {n} is more than preset {preset}'s {most} layers")
        if depths.count(n) > 1:
            raise UserError(f"--layers: {n} is named twice")
    return sorted(depths)


def plan_points(cfg: RunConfig, layers: str | None, preset_given: bool) -> list[Point]:
    """The sweep's points from the flags (cfg: the parsed flags; `preset_given`: --preset was)."""
    if cfg.num_layers is not None:
        raise UserError("--num-layers: sweep sets each point's depth; give depths with --layers")
    if cfg.model:
        if layers is not None:
            raise UserError(
                "--layers: cuts a preset only (as --num-layers); with --model DIR the sweep is "
                "that checkpoint at its own depth"
            )
        return [Point(Path(cfg.model).name or "model", cfg)]
    preset = cfg.preset if preset_given else SWEEP_PRESET
    points = [Point(f"{preset}-L{n}", cfg.replace(preset=preset, num_layers=n))
              for n in parse_layers(layers, preset)]
    if not preset_given:
        depth = PRESET_CONFIGS[EXTRA_PRESET]["num_hidden_layers"]
        points.insert(0, Point(f"{EXTRA_PRESET}-L{depth}", cfg.replace(preset=EXTRA_PRESET)))
    return points


def point_entry(point: Point, prep: Prepared, comparison: dict, wall_s: float) -> dict:
    """sweep.json's entry for one point: its model's size, the speed verdict, the medians."""
    arch = read_arch(prep.model_dir)
    failed = [r for r in comparison["results"] if r.get("status") != "ok"]
    return {
        "name": point.name, "folder": point.name, "model": point.cfg.model,
        "preset": None if point.cfg.model else point.cfg.preset,
        "layers": arch["num_hidden_layers"], "width": arch["hidden_size"],
        "params": base_param_count(arch),
        "status": "failed" if failed else "ok",
        "errors": [f"{r.get('backend')} {r.get('status')}: {r.get('error')}" for r in failed],
        "speed": (comparison.get("verdict") or {}).get("speed"),
        "median_step_s": median_steps(comparison),
        "rounds": comparison["schedule"]["rounds"], "wall_s": wall_s,
        "config": point.cfg.to_dict(),
    }  # fmt: skip


def sweep(points: list[Point], preps: list[Prepared], backends: list[str], out: Path,
          schedule: Schedule) -> dict:
    """Compare the backends at every point (prepared: preps), in order, each into OUT/<name>/;
    sweep.json and the plot are rewritten after each. Returns sweep.json's object."""
    started = time.monotonic()
    record = {
        "labels": labels_for(backends), "planned": [p.name for p in points], "complete": False,
        "schedule": {"repeats": schedule.repeats, "time_budget_s": schedule.time_budget_s,
                     **{k: getattr(points[0].cfg, k) for k in
                        ("steps", "timing_warmup_steps", "eval_samples", "eval_generate")}},
        "points": [], "crossover": None, "wall_s": 0.0,
    }  # fmt: skip
    for i, (point, prep) in enumerate(zip(points, preps, strict=True), 1):
        print(f"== sweep point {i}/{len(points)}: {point.name}", file=sys.stderr, flush=True)
        t0, folder = time.monotonic(), out / point.name
        comparison = compare(backends, prep.save(folder), folder, schedule=schedule)
        record["points"].append(point_entry(point, prep, comparison, time.monotonic() - t0))
        record["crossover"] = crossover(record["points"])
        record["complete"] = i == len(points)
        record["wall_s"] = time.monotonic() - started
        write_sweep(record, out)
    return record

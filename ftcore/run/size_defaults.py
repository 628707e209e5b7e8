"""The defaults of a compare at a real model's size: what it takes to answer in minutes.

The flags' defaults (60 steps, eval every 10 steps, greedy answers on the built-in data) suit the
embedded default, whose step is ~30 ms. At TinyLlama-1.1B's size on a 2-core CPU a step of
Alpaca-length batches takes 10-30 s, so those defaults would take hours. From LARGE_PARAMS base
parameters up, every flag the user did not give takes AT_SIZE instead: 3 steps a run (the first a
timing warm-up, so 2 timed, each a different batch width), no eval, and 2 runs a backend
(interleaved, as compare runs them), the fewest that give an interval. The answer says which
defaults changed; the epoch projection (ftcore.measure.projection) prices a whole epoch from those
timed steps. Measured (2-core AMD EPYC, 2026-12-05, quiet): 3 runs a backend took 11.6 min
(torch ~130 s a run, mlx ~100 s: the first batch is 321 wide, a 40-50 s warm-up step); 2 runs
gave the same verdict (mlx 1.27x, 95% CI 1.26-1.30, against 1.28x, 1.24-1.32 from 3).
"""

from __future__ import annotations

from typing import Any

from ftcore.config import RunConfig, UserError
from ftcore.inputs.arch import read_arch
from ftcore.inputs.presets import preset_config
from ftcore.measure.memory_model import base_param_count

# From here a step is seconds on a 2-core CPU (TinyLlama's width at 2 layers, 218M: ~3 s).
LARGE_PARAMS = 200_000_000
AT_SIZE: dict[str, Any] = {"steps": 3, "eval_samples": 0, "eval_generate": False}
REPEATS_AT_SIZE = 2  # runs a backend (compare's --repeats)


def model_params(cfg: RunConfig) -> int | None:
    """Base parameters of the model cfg names (a preset's config, or --model's config.json); None
    when the folder cannot be read (the run's own checks say why)."""
    try:
        arch = read_arch(cfg.model) if cfg.model else preset_config(cfg.preset, cfg.num_layers)
        return base_param_count(arch)
    except (UserError, OSError, KeyError, ValueError):
        return None


def size_defaults(cfg: RunConfig, given: set[str]) -> tuple[RunConfig, int | None, str | None]:
    """(cfg with AT_SIZE for every field not in `given` (the flags the user set), the runs a
    backend (REPEATS_AT_SIZE unless --repeats was given), the note that says what changed) when
    the model has LARGE_PARAMS or more; else (cfg, None, None)."""
    params = model_params(cfg)
    if params is None or params < LARGE_PARAMS:
        return cfg, None, None
    if "epochs" in given:  # whole epochs asked for: the steps are theirs
        given = given | {"steps"}
    changed = {k: v for k, v in AT_SIZE.items() if k not in given}
    repeats = None if "repeats" in given else REPEATS_AT_SIZE
    if not changed and repeats is None:
        return cfg, None, None
    said = [f"--{k.replace('_', '-')} {v}" for k, v in changed.items() if k != "eval_generate"]
    said += [f"--repeats {repeats}"] if repeats else []
    steps = changed.get("steps", cfg.steps)
    note = (
        f"a {params / 1e9:.2f}B-parameter model: defaults at this size are {', '.join(said)} "
        f"({cfg.timing_warmup_steps} warm-up step, {steps - cfg.timing_warmup_steps} timed a run); "
        "set the flags to change them"
    )
    return cfg.replace(**changed), repeats, note

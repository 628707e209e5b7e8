"""Backends: one module each, one entry point with the same shape.

    train(cfg: RunConfig, model_dir: Path, batches: Batches, out_dir: Path) -> RunResult

It runs inside a fresh process started by ftcore.runner, loads the checkpoint, trains
`cfg.steps` steps on `batches` starting from `ftcore.lora.initial_lora_state`, evaluates,
saves the adapter under out_dir/adapter, and reports measured figures.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Protocol

BACKENDS = {
    "torch": "ftcore.backends.torch_loop",
    "hf-trainer": "ftcore.backends.hf_trainer",
    "mlx": "ftcore.backends.mlx_loop",
    "mlx-lm": "ftcore.backends.mlx_lm_ref",
}


class Backend(Protocol):
    def train(self, cfg, model_dir, batches, out_dir): ...  # -> RunResult


def load_backend(name: str) -> ModuleType:
    return importlib.import_module(BACKENDS[name])

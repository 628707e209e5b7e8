"""What an MLX backend's process sets up around training: the device, AdamW, the run's MLX
conversion, and the BLAS facts of its result."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import mlx.core as mx

from ftcore.cache_dir import cache_root
from ftcore.config import RunConfig, UserError
from ftcore.mlx.convert import cached_conversion
from ftcore.mlx.jit import NOTE_ENV
from ftcore.result import RunResult

CONVERT_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def pick_device(device: str) -> mx.Device:
    """mx.cpu, or mx.gpu when this MLX build has one (Metal on macOS, CUDA with mlx[cuda])."""
    if device == "cpu":
        return mx.cpu
    if mx.is_available(mx.gpu):
        return mx.gpu
    raise UserError(
        "--device gpu: this MLX build sees no GPU "
        "(needs Metal on macOS, or the mlx[cuda] build with an NVIDIA GPU)"
    )


def convert(cfg: RunConfig, model_dir: Path) -> Path:
    """The cached HF -> MLX conversion at the run's precision (made now if missing or stale)."""
    return cached_conversion(model_dir, cache_root() / "mlx", CONVERT_DTYPES[cfg.precision])


def blas_facts(result: RunResult, cfg: RunConfig) -> None:
    """Record the BLAS MLX really calls (from the probe env_info ran in this process) and
    threads."""
    probe = result.env.get("mlx_blas")  # ftcore.measure.blas.mlx_blas_info(): dladdr + a timed GEMM
    result.extra["blas_probe"] = probe
    result.blas = f"{probe['name']} ({probe['path']})" if probe else "unknown (probe failed)"
    result.threads = cfg.threads or (probe or {}).get("threads") or os.cpu_count() or 1
    # Set by the runner (ftcore.mlx.env); absent when this process was started by hand.
    result.extra["mlx_jit"] = os.environ.get(NOTE_ENV, "MLX default g++ flags (not set by ftcore)")
    warning = result.env.get("blas_warning")
    if warning:
        print(warning, file=sys.stderr, flush=True)
        result.warn(warning)

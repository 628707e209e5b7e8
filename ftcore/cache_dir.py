"""Where ftcore keeps what it makes once per machine: presets, MLX conversions, JIT kernels and the
GEMM-peak cache."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path


def cache_root(env: Mapping[str, str] | None = None) -> Path:
    """$FTCORE_CACHE (of ``env``, default this process's), else ~/.cache/ftcore."""
    env = os.environ if env is None else env
    return Path(env.get("FTCORE_CACHE") or Path.home() / ".cache" / "ftcore").expanduser()

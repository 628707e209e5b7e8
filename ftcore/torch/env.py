"""The environment of a torch process (set by the parent before it starts; imports no torch).

Every BLAS library is removed from LD_PRELOAD: torch's CPU wheel links MKL statically but calls
sgemm_ through its PLT, so a preloaded OpenBLAS would interpose it (see ftcore.measure.blas).
torch.compile's caches (inductor's generated kernels, FX and AOTAutograd graphs) live under
ftcore's cache folder, so a second run on this machine compiles warm (backends.torch_compile).
"""

from __future__ import annotations

import sys
from pathlib import Path

from ftcore.cache_dir import cache_root
from ftcore.config import RunConfig, UserError
from ftcore.measure import blas_env
from ftcore.process.ranks import LAUNCHER_LOGS_DIR, under_launcher

INDUCTOR_CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"


def child_env(base_env: dict, threads: int) -> dict:
    """Environment for a torch process: no BLAS preload, every thread count set to `threads`,
    torch.compile's cache in <ftcore cache>/torchinductor."""
    env = blas_env.with_threads(blas_env.without_blas_preload(base_env), threads)
    return {**env, INDUCTOR_CACHE_ENV: str(cache_root(base_env) / "torchinductor")}


def launch_command(cfg: RunConfig, inner: list[str], out_dir: Path) -> list[str]:
    """`inner` (python -m ftcore.run.child ...) as cfg.nproc ranks per machine under torchrun.
    Its log tree goes into the run folder (without --log-dir torchrun leaves one in /tmp per run);
    the runner removes it when it holds no file (ftcore.run.rank_watch.prune_empty_dirs)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={cfg.nproc}",
           "--max-restarts=0", "--monitor-interval=0.5",
           f"--log-dir={out_dir / LAUNCHER_LOGS_DIR}"]  # fmt: skip
    if cfg.nnodes > 1:
        cmd += [
            f"--nnodes={cfg.nnodes}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={cfg.rdzv_endpoint}",
        ]
    else:
        cmd += ["--standalone"]  # a local rendezvous on a free port
    return under_launcher([*cmd, "-m", *inner[2:]])  # torchrun -m MODULE ARGS


def check_launch(cfg: RunConfig) -> None:
    if cfg.nnodes > 1 and not cfg.rdzv_endpoint:
        raise UserError("--nnodes > 1 with a torch backend needs --rdzv-endpoint HOST:PORT")

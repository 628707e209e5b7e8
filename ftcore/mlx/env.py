"""The environment of an MLX process (set by the parent before it starts; imports no MLX).

* BLAS: the Linux `mlx[cpu]` wheel calls a bundled reference BLAS (~7 GFLOP/s fp32 here); an
  optimised one found by `ftcore.measure.blas_env.find_fast_blas` is LD_PRELOADed (~250 GFLOP/s with
  OpenBLAS). FTCORE_NO_BLAS_PRELOAD=1 turns it off, to measure the stock wheel.
  On a CPU OpenBLAS does not know it would run SSE3 kernels; OPENBLAS_CORETYPE is then set to
  the CPU's vector ISA (`blas_env.with_core_type`).
* JIT: mx.compile's CPU kernels are built with vector flags (`ftcore.mlx.jit`).
* Threads: every BLAS/OpenMP thread count set to the run's threads.
* Row streams (`row_streams_env`, the `mlx` backend only): mx.eval lays the graph out as a tape in
  breadth-first order from the outputs, but once more than MLX_BFS_MAX_WIDTH arrays (default 20)
  wait in the queue it goes depth first, and it runs the tape with at most ~10 tasks in flight.
  Depth first walks one row stream's backward pass to its end before the other's, so the streams
  run in turn. The compiled step's outputs alone (every updated LoRA weight, both AdamW moments)
  are 3 x 2 x targets x layers arrays: 924 for TinyLlama's 22 layers and 7 targets. A fixed width
  held for 4 layers with q,v (48 outputs, width 100: 1.95 threads busy) and not for 22 layers
  (1.47 busy at width 100, 0.79x the tokens/s of no limit). So the limit is lifted
  (BFS_NO_LIMIT): the tape is plain breadth-first at any depth and the streams alternate at every
  level. MLX limits the width to bound the memory of wide graphs; in the training step MLX's peak
  was the same to the byte (22 layers: 6672.56 MB at width 100 and without limit).
  With --grad-checkpoint it is not: breadth first without limit kept far more of the recomputed
  layers alive (22 layers, one stream: MLX's peak 6067 MB; at MLX's default width 4745 MB, the
  memory model 4676 MB). So a checkpointing run keeps MLX's default width, and with it one
  stream with a T-thread BLAS (`ftcore.mlx.streams.plan_streams`).
"""

from __future__ import annotations

import sys
from pathlib import Path

from ftcore.cache_dir import cache_root
from ftcore.config import RunConfig, UserError
from ftcore.files import write_json_atomic
from ftcore.measure import blas_env
from ftcore.mlx import jit
from ftcore.process.ranks import free_ports, hostfile_hosts, under_launcher

BFS_WIDTH_ENV = "MLX_BFS_MAX_WIDTH"
BFS_NO_LIMIT = 2**31 - 1  # MLX reads the width as a C int


def child_env(base_env: dict, threads: int) -> dict:
    """Environment for a process that runs MLX: fast BLAS preloaded, JIT flags, threads set.
    Never give it to a torch process: the preload would interpose torch's MKL sgemm_ too."""
    env = jit.child_env(dict(base_env), cache_root(base_env))
    fast = None if env.get(blas_env.NO_PRELOAD_ENV) == "1" else blas_env.find_fast_blas()
    if fast:
        env = blas_env.with_core_type(blas_env.with_preload(env, fast), fast)
    return blas_env.with_threads(env, threads)


def row_streams_env(base_env: dict, threads: int, cfg: RunConfig) -> dict:
    """child_env plus mx.eval's breadth-first width unlimited, so row streams overlap at any depth;
    with gradient checkpointing MLX's default width (its peak then matches the memory model), and
    so one stream with a `threads`-thread BLAS (ftcore.mlx.streams.plan_streams)."""
    env = child_env(base_env, threads)
    if cfg.grad_checkpoint:
        env.pop(BFS_WIDTH_ENV, None)  # MLX's default, not one inherited from the user
        return env
    return {**env, BFS_WIDTH_ENV: str(BFS_NO_LIMIT)}


def launch_command(cfg: RunConfig, inner: list[str], out_dir: Path) -> list[str]:
    """`inner` as cfg.nproc ranks per machine under mlx.launch (ring on the CPU, NCCL with the
    CUDA build); several machines: the user's hostfile, each host repeated nproc times."""
    launcher = Path(sys.executable).with_name("mlx.launch")
    cmd = [sys.executable, str(launcher), "--backend", "nccl" if cfg.device == "gpu" else "ring",
           "--starting-port", str(free_ports(cfg.world_size))]  # fmt: skip
    if cfg.nnodes > 1:
        expanded = out_dir / "hostfile.json"
        write_json_atomic(
            expanded, [h for h in hostfile_hosts(cfg.hostfile) for _ in range(cfg.nproc)]
        )
        cmd += ["--hostfile", str(expanded)]
    else:
        cmd += ["-n", str(cfg.nproc)]
    return under_launcher([*cmd, "--", *inner])


def check_launch(cfg: RunConfig) -> None:
    if cfg.nnodes == 1:
        return
    if not cfg.hostfile:
        raise UserError("--nnodes > 1 with an MLX backend needs --hostfile")
    if len(hosts := hostfile_hosts(cfg.hostfile)) != cfg.nnodes:
        raise UserError(f"--hostfile lists {len(hosts)} hosts, --nnodes says {cfg.nnodes}")

"""Time a square GEMM in torch or MLX: the probe behind MFU's peak and the BLAS speed check.

Imports the framework only when asked to time it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass


def _torch_gemm(precision: str, m: int, k: int, n: int, device: str) -> Callable[[], None]:
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    dev = "cuda" if device == "gpu" else "cpu"
    a = torch.randn(m, k, dtype=dtype, device=dev)
    b = torch.randn(k, n, dtype=dtype, device=dev)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)

    def run() -> None:
        a @ b
        sync()

    return run


def _mlx_gemm(precision: str, m: int, k: int, n: int, device: str) -> Callable[[], None]:
    import mlx.core as mx

    dtype = {"fp32": mx.float32, "bf16": mx.bfloat16}[precision]
    stream = mx.gpu if device == "gpu" else mx.cpu
    a = mx.random.normal((m, k), stream=stream).astype(dtype, stream=stream)
    b = mx.random.normal((k, n), stream=stream).astype(dtype, stream=stream)
    mx.eval(a, b)

    def run() -> None:
        mx.eval(mx.matmul(a, b, stream=stream))  # MLX is lazy: the work happens in eval

    return run


GEMMS = {"torch": _torch_gemm, "mlx": _mlx_gemm}  # framework -> GEMM maker


@dataclass(frozen=True)
class Timing:
    """How long one GEMM is timed: at most `repeats` runs, stopping early once `max_time_s` is
    spent (after at least two), so slow backends (MLX's reference BLAS ~7 GFLOP/s, MLX bf16 ~6)
    stay within a couple of seconds."""

    repeats: int = 5
    max_time_s: float = 1.5


def gemm_gflops(framework: str, precision: str, shape: tuple[int, int, int], device: str = "cpu",
                timing: Timing = Timing()) -> float:
    """Best throughput of an (m x k) @ (k x n) GEMM, shape (m, k, n), in GFLOP/s, after one warm-up
    run."""
    m, k, n = shape
    repeats, max_time_s = timing.repeats, timing.max_time_s
    run = GEMMS[framework](precision, m, k, n, device)
    run()  # warm-up: thread pools, kernel selection, page faults
    best = math.inf
    t_end = time.perf_counter() + max_time_s
    for i in range(repeats):
        t0 = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t0)
        if i >= 1 and time.perf_counter() > t_end:
            break
    return 2 * m * k * n / best / 1e9


def measure_gemm_peak(
    framework: str,
    precision: str,
    n: int = 1024,
    device: str = "cpu",
    shapes: tuple[tuple[int, int, int], ...] = (),
    timing: Timing = Timing(),
) -> float:
    """Best GEMM throughput in GFLOP/s over an ``n``x``n`` square and the (m, k, n) ``shapes``
    (the run's own, ftcore.measure.flops.gemm_shapes): a peak no GEMM of that run can beat."""
    return max(
        gemm_gflops(framework, precision, shape, device, timing) for shape in [(n, n, n), *shapes]
    )

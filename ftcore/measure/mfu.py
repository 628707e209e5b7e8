"""Model FLOPs utilisation: one formula, one owner.

MFU = achieved training FLOP/s (real tokens/s x analytic FLOPs per token, ftcore.measure.flops)
over a measured GEMM peak (ftcore.measure.gemm_peak). The child measures the peaks only its own
process can (its framework's own CPU GEMM, with the BLAS and threads it trained with; on a GPU,
that GPU's) into result.extra; the parent (ftcore.run.backend_process) measures the machine's CPU
peak and calls record_mfu, which sets every MFU figure of the result.
"""

from __future__ import annotations

from ftcore.result import RunResult


def mfu(tokens_per_s: float, flops_per_token: float, peak_gflops: float | None) -> float | None:
    """Model FLOPs utilisation: achieved training FLOP/s over the measured GEMM peak."""
    if not peak_gflops or peak_gflops <= 0 or tokens_per_s is None:
        return None
    return tokens_per_s * flops_per_token / (peak_gflops * 1e9)


def achieved_gflops(result: RunResult) -> float | None:
    """The training GFLOP/s a result achieved: a GEMM peak below it cannot be this machine's."""
    if result.real_tokens_per_s is None or result.flops_per_token is None:
        return None
    return result.real_tokens_per_s * result.flops_per_token / 1e9


def record_mfu(result: RunResult, machine_peak: float | None) -> None:
    """result.mfu against this machine's CPU GEMM peak (`machine_peak`, the same figure for every
    backend) or, on a GPU, against the GPU peak its child measured; extra["mfu_vs_framework_gemm"]
    against the framework's own CPU peak its child measured."""
    rate, flops, extra = result.real_tokens_per_s, result.flops_per_token, result.extra
    if "gpu_gemm_peak_gflops" in extra:
        result.mfu = mfu(rate, flops, extra["gpu_gemm_peak_gflops"])
    if "framework_gemm_peak_gflops" in extra:
        extra["mfu_vs_framework_gemm"] = mfu(rate, flops, extra["framework_gemm_peak_gflops"])
    if machine_peak is not None:  # a CPU run: the figure every backend is divided by
        result.mfu = mfu(rate, flops, machine_peak)

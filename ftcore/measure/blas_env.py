"""The BLAS a child process gets (ftcore.mlx.env, ftcore.torch.env): a fast library found and
LD_PRELOADed for MLX (and kept out of torch's process), OpenBLAS's kernel set fixed when it guesses
below the CPU, and the thread counts. Why a preload redirects MLX's GEMM: ftcore.measure.blas."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

from ftcore.measure.blas import PRELOAD_ENV, classify
from ftcore.measure.hostinfo import cpu_features

# Optimised BLAS to preload for MLX, best first. Debian/Ubuntu's pthread OpenBLAS measured
# 220-270 GFLOP/s here, pip mkl's libmkl_rt ~155. libopenblas.so.0 in the variant folder is
# preferred over the libblas.so.3 wrapper next to it: the wrapper finds libopenblas.so.0 through
# the alternatives system, which may point at another variant.
_OPENBLAS_VARIANTS = ("openblas-pthread", "openblas-openmp", "openblas-serial")
_DEBIAN_TRIPLETS = ("x86_64-linux-gnu", "aarch64-linux-gnu")

CORETYPE_ENV = "OPENBLAS_CORETYPE"  # OpenBLAS's own override of the kernels it picks for the CPU
NO_PRELOAD_ENV = "FTCORE_NO_BLAS_PRELOAD"


def _ldconfig_paths(soname: str) -> list[str]:
    try:
        out = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        for alt in ("/sbin/ldconfig", "/usr/sbin/ldconfig"):
            try:
                out = subprocess.run([alt, "-p"], capture_output=True, text=True, timeout=5).stdout
                break
            except (OSError, subprocess.SubprocessError):
                continue
        else:
            return []
    return [ln.split("=>")[-1].strip() for ln in out.splitlines()
            if ln.strip().startswith(soname + " ") and "=>" in ln]


def find_fast_blas() -> str | None:
    """Path of an optimised BLAS to LD_PRELOAD for MLX on Linux, or None.

    Order: $FTCORE_BLAS_PRELOAD; Debian/Ubuntu OpenBLAS variant folders (x86_64, aarch64);
    ``ldconfig -p`` for libopenblas*.so.0; the pip ``mkl`` package's libmkl_rt. None on macOS
    (MLX uses Accelerate/Metal there) or when nothing suitable is installed.
    """
    if sys.platform != "linux":
        return None
    override = os.environ.get(PRELOAD_ENV)
    if override:
        return override if os.path.exists(override) else None
    for triplet in _DEBIAN_TRIPLETS:
        for variant in _OPENBLAS_VARIANTS:
            p = f"/usr/lib/{triplet}/{variant}/libopenblas.so.0"
            if os.path.exists(p):
                return p
    for soname in ("libopenblasp.so.0", "libopenblas.so.0", "libopenblaso.so.0"):
        for p in _ldconfig_paths(soname):
            if os.path.exists(p):
                return p
    for prefix in dict.fromkeys((sys.prefix, sys.base_prefix)):
        for name in ("libmkl_rt.so.2", "libmkl_rt.so"):
            p = Path(prefix) / "lib" / name
            if p.exists():
                return str(p)
    return None


def _is_blas_path(entry: str) -> bool:
    return classify(entry) != "unknown" or "blas" in os.path.basename(entry).lower()


def with_preload(env: dict, library: str) -> dict:
    """``env`` with ``library`` first in LD_PRELOAD (kept once; other preloads stay after it)."""
    rest = [p for p in env.get("LD_PRELOAD", "").replace(" ", ":").split(":") if p and p != library]
    return {**env, "LD_PRELOAD": ":".join([library, *rest])}


def without_blas_preload(env: dict) -> dict:
    """``env`` with every BLAS library removed from LD_PRELOAD (other preloads stay)."""
    env = dict(env)
    keep = [p for p in env.get("LD_PRELOAD", "").replace(" ", ":").split(":")
            if p and not _is_blas_path(p)]
    if keep:
        env["LD_PRELOAD"] = ":".join(keep)
    else:
        env.pop("LD_PRELOAD", None)
    return env


# OpenBLAS (DYNAMIC_ARCH builds, as Debian's) picks its kernels from the CPU's family and model
# number. A model it does not know (a CPU newer than the library, or a VM that hides the model)
# falls back to Prescott, SSE3 kernels: on a 2-core Xeon VM with AVX-512 and OpenBLAS 0.3.21,
# openblas_get_corename() said "Prescott" and MLX's fp32 2048^3 GEMM ran at 31 GFLOP/s; with
# OPENBLAS_CORETYPE=SkylakeX 242 (Haswell 142; torch's MKL 202). Kernel sets by vector ISA:
_AVX512_CORES = ("skylakex", "cooperlake", "sapphirerapids")
_AVX2_CORES = ("haswell", "zen")
# what SkylakeX kernels use
_AVX512_FLAGS = {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512cd"}


def cpu_vector_isa(flags: set[str] | None = None) -> str | None:
    """"avx512", "avx2" (with FMA) or None, from the x86 CPU flags (default: this CPU's)."""
    flags = cpu_features() if flags is None else flags
    if flags >= _AVX512_FLAGS:
        return "avx512"
    return "avx2" if {"avx2", "fma"} <= flags else None


@functools.cache
def openblas_corename(library: str) -> str | None:
    """The kernel set OpenBLAS ``library`` picks on this CPU by itself (openblas_get_corename, asked
    in a fresh process without OPENBLAS_CORETYPE), lower case; None if it cannot say."""
    code = ("import ctypes, sys; f = ctypes.CDLL(sys.argv[1]).openblas_get_corename; "
            "f.restype = ctypes.c_char_p; print(f().decode())")
    env = {k: v for k, v in os.environ.items() if k not in (CORETYPE_ENV, "LD_PRELOAD")}
    env["OPENBLAS_NUM_THREADS"] = "1"
    try:
        out = subprocess.run([sys.executable, "-c", code, library], env=env, capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.stdout.split()
    return lines[-1].lower() if out.returncode == 0 and lines else None


def openblas_core_fix(corename: str | None, isa: str | None) -> str | None:
    """The OPENBLAS_CORETYPE to set when OpenBLAS picked kernels below what the CPU can run (e.g.
    "prescott" on an AVX-512 CPU -> "SkylakeX"); None when its own pick is as good."""
    if corename is None or isa is None:
        return None
    if isa == "avx512" and corename not in _AVX512_CORES:
        return "SkylakeX"
    if isa == "avx2" and corename not in (*_AVX512_CORES, *_AVX2_CORES):
        return "Haswell"
    return None


def with_core_type(env: dict, library: str) -> dict:
    """``env`` with OPENBLAS_CORETYPE set when ``library`` is OpenBLAS and would otherwise run
    kernels below the CPU's vector ISA; a user's own OPENBLAS_CORETYPE is kept."""
    if CORETYPE_ENV in env or classify(library) != "openblas" or sys.platform != "linux":
        return env
    fix = openblas_core_fix(openblas_corename(library), cpu_vector_isa())
    return {**env, CORETYPE_ENV: fix} if fix else env


def with_threads(env: dict, threads: int) -> dict:
    """``env`` with every BLAS/OpenMP thread count set to ``threads``."""
    return {**env, **{v: str(threads) for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                                  "OPENBLAS_NUM_THREADS")}}



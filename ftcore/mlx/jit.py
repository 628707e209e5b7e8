"""Compiler flags for the CPU kernels that mx.compile builds at run time (Linux x86-64).

On the CPU, mx.compile fuses chains of element-wise ops into C++ kernels that MLX compiles on
first use with a fixed command, ``g++ -std=c++17 -O3 -Wall -fPIC -shared`` (mlx 0.32.4, read from
libmlx.so; ``g++`` is looked up on PATH), and caches by kernel name under ``$TMPDIR/mlx``. Those
flags target baseline x86-64, which has no FMA and no rounding instruction, so each exp or sigmoid
in a fused kernel is a chain of libm calls. Later MLX sources add ``-mavx2 -mfma -mf16c`` to that
command when MLX itself is built with AVX2; the Linux wheel here does not.

ftcore does the same for its MLX child processes (``ftcore.mlx.env.child_env``), where the CPU
has those features: a ``g++`` wrapper that adds the flags goes first on PATH, and TMPDIR points
at a kernel cache of its own, because MLX's cache key (the kernel name) ignores flags.
Measured on a 2-core EPYC with FLAGS below: a compiled exp over 2.9M floats 34 -> 1.7 ms,
silu(gate) * up 46 -> 2.4 ms (the first three flags alone: 8 and 25 ms). Kernels MLX ships prebuilt (softmax, logsumexp, ...) are not affected, which is why the
MLX model writes those out on the CPU (``ftcore.mlx.ops``).

``FTCORE_NO_MLX_JIT_FLAGS=1`` turns this off (to measure stock MLX). Results record what was used
(``FTCORE_MLX_JIT``, read by the MLX backends).
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
from pathlib import Path

from ftcore.hostinfo import cpu_features, cpu_model

# -mavx2 -mfma -mf16c: what later MLX sources add themselves. The other three let GCC inline MLX's
# simd::exp (a polynomial, no libm call) into the kernel loop and vectorize it; they do not
# change results (the torch CPU wheel is built with -fno-math-errno -fno-trapping-math too).
FLAGS = (
    "-mavx2", "-mfma", "-mf16c",
    "-fno-math-errno", "-fno-trapping-math", "--param=max-inline-insns-auto=1000",
)
CPU_FEATURES = ("avx2", "fma", "f16c")  # /proc/cpuinfo names the flags need
NOTE_ENV = "FTCORE_MLX_JIT"  # what the child's JIT kernels are built with, for its result
OFF_ENV = "FTCORE_NO_MLX_JIT_FLAGS"


def why_not() -> str | None:
    """Why the flags cannot be used on this machine, or None when they can."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"not Linux x86-64 ({platform.system()} {platform.machine()})"
    missing = [f for f in CPU_FEATURES if f not in cpu_features()]
    if missing:
        return f"CPU lacks {', '.join(missing)}"
    if shutil.which("g++") is None:
        return "no g++ on PATH (MLX cannot JIT-compile CPU kernels at all)"
    return None


def install_wrapper(cache: Path) -> Path:
    """Write (once) ``<root>/bin/g++``, the real g++ with FLAGS added, and make ``<root>/tmp`` for
    the kernel cache; returns root. root is keyed by CPU model, compiler and flags, so kernels
    built for one CPU are never loaded on another that shares the cache."""
    real = os.path.realpath(shutil.which("g++") or "g++")
    key = hashlib.sha256(f"{cpu_model()}|{real}|{' '.join(FLAGS)}".encode()).hexdigest()[:12]
    root = cache / "mlx-jit" / key
    wrapper = root / "bin" / "g++"
    # -frecord-gcc-switches stores the command line in each kernel (.GCC.command.line), so a
    # kernel can be checked for the flags it was built with.
    text = (
        "#!/bin/sh\n"
        "# Written by ftcore.mlx.jit: MLX's JIT CPU kernels, built for AVX2/FMA/F16C.\n"
        f"exec '{real}' {' '.join(FLAGS)} -frecord-gcc-switches \"$@\"\n"
    )
    if not wrapper.exists() or wrapper.read_text() != text:
        wrapper.parent.mkdir(parents=True, exist_ok=True)
        tmp = wrapper.with_name(f".g++.{os.getpid()}")
        tmp.write_text(text)
        tmp.chmod(0o755)
        tmp.replace(wrapper)  # atomic: a concurrent run never sees half a script
    (root / "tmp").mkdir(exist_ok=True)
    return root


def child_env(env: dict, cache: Path) -> dict:
    """Add the wrapper (PATH) and its kernel cache (TMPDIR) to an MLX child's env, when usable."""
    reason = "off (FTCORE_NO_MLX_JIT_FLAGS=1)" if env.get(OFF_ENV) == "1" else why_not()
    if reason:
        env[NOTE_ENV] = f"MLX default g++ flags: {reason}"
        return env
    root = install_wrapper(cache)
    env["PATH"] = os.pathsep.join([str(root / "bin"), env.get("PATH", os.defpath)])
    env["TMPDIR"] = str(root / "tmp")
    env[NOTE_ENV] = f"g++ {' '.join(FLAGS)} (wrapper {root / 'bin' / 'g++'})"
    return env

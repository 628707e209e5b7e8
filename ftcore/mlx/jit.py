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
silu(gate) * up 46 -> 2.4 ms (the first three flags alone: 8 and 25 ms). Kernels MLX ships prebuilt
(softmax, logsumexp, ...) are not affected, which is why the MLX model writes those out on the CPU
(``ftcore.mlx.ops``).

``FTCORE_NO_MLX_JIT_FLAGS=1`` turns this off (to measure stock MLX). Results record what was used
(``FTCORE_MLX_JIT``, read by the MLX backends).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

from ftcore.measure.hostinfo import cpu_features, cpu_model

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


PREAMBLE = "mlx/backend/cpu/compiled_preamble.h"  # what every kernel source includes first
MLX_COMMAND_FLAGS = "-std=c++17 -O3 -Wall -fPIC"  # MLX's own g++ flags (0.32.4), for the PCH


def mlx_include_dir() -> Path | None:
    """MLX's installed headers (the `-I` MLX passes g++), found without importing MLX."""
    spec = importlib.util.find_spec("mlx")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (Path(folder) / "include" / PREAMBLE).is_file():
            return Path(folder) / "include"
    return None


def install_wrapper(cache: Path) -> Path:
    """Write (once) ``<root>/bin/g++``, the real g++ with FLAGS added, and make ``<root>/tmp`` for
    the kernel cache; returns root. root is keyed by CPU model, compiler, flags and MLX's headers,
    so kernels built for one CPU are never loaded on another that shares the cache.

    Each kernel MLX builds is a few lines after ``#include <PREAMBLE>``, MLX's whole CPU op
    library: parsing that header is nearly all of a kernel's ~0.7 s. So the wrapper makes the
    header a GCC precompiled header once (``<root>/pch``, on its first call, ~2 s) and puts it
    first on the include path: 0.14 s a kernel, the same machine code (compared with objdump).
    g++ skips a precompiled header built with other flags and reads the header instead."""
    real = os.path.realpath(shutil.which("g++") or "g++")
    include = mlx_include_dir()
    key = hashlib.sha256(f"{cpu_model()}|{real}|{' '.join(FLAGS)}|{include}".encode()).hexdigest()[
        :12
    ]
    root = cache / "mlx-jit" / key
    wrapper = root / "bin" / "g++"
    flags = f"{' '.join(FLAGS)} -frecord-gcc-switches"
    pch = ""
    if include is not None:
        gch = root / "pch" / (PREAMBLE + ".gch")
        pch = (
            f"if [ ! -e '{gch}' ]; then\n  mkdir -p '{gch.parent}' && t='{gch}'.$$\n  '{real}' "
            f"{flags} {MLX_COMMAND_FLAGS} -I '{include}' -x c++-header '{include / PREAMBLE}' "
            '-o "$t" >/dev/null 2>&1 && mv -f "$t" '
            f"'{gch}' || rm -f \"$t\"\n"
            "fi\n"
        )
    # -frecord-gcc-switches stores the command line in each kernel (.GCC.command.line), so a
    # kernel can be checked for the flags it was built with.
    text = (
        "#!/bin/sh\n"
        "# Written by ftcore.mlx.jit: MLX's JIT CPU kernels, built for AVX2/FMA/F16C.\n"
        + pch
        + f"exec '{real}' {flags}" + (f" -I '{root / 'pch'}'" if pch else "") + ' "$@"\n'
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


# ----------------------------------------------------------------------------- one-time builds


def kernel_dir() -> Path:
    """Where this process's MLX keeps its JIT CPU kernels: $TMPDIR/mlx/<version>/cpu."""
    import mlx.core as mx

    return Path(tempfile.gettempdir()) / "mlx" / mx.__version__ / "cpu"


def built_kernels() -> set[str]:
    """The kernel libraries (lib*.so) MLX has built in this process's kernel cache so far."""
    d = kernel_dir()
    return {p.name for p in d.glob("lib*.so")} if d.is_dir() else set()


def announce_new_kernels(before: set[str], backend: str) -> dict | None:
    """After a step: the kernels built since `before` were g++ compiles (the first run on a
    machine, or a new fused graph); say so once on stderr, with their build time (each kernel's
    .so written minus its .cpp written), and return {kernels, seconds, cache} for the result."""
    d = kernel_dir()
    new = sorted(built_kernels() - before)
    if not new:
        return None
    seconds = 0.0
    for name in new:
        source = d / (name[len("lib") : -len(".so")] + ".cpp")
        if source.exists():
            seconds += max(0.0, (d / name).stat().st_mtime - source.stat().st_mtime)
    print(
        f"[{backend}] MLX built {len(new)} CPU kernels for this machine with g++ in {seconds:.1f} "
        f"s (one-time: cached in {d})",
        file=sys.stderr,
        flush=True,
    )
    return {"kernels": len(new), "seconds": round(seconds, 2), "cache": str(d)}

"""The environments the runner gives its child processes, checked in real child processes: which
BLAS MLX calls with and without the preload, why a torch process must not get it, the JIT kernels
an MLX child builds, and the BLAS thread count an MLX child can set."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ftcore.backends import BACKENDS
from ftcore.config import RunConfig
from ftcore.measure import blas, blas_env
from ftcore.mlx import env as mlx_env
from ftcore.mlx import jit
from ftcore.run.backend_process import child_env

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent

FAST = blas_env.find_fast_blas()
needs_openblas = pytest.mark.skipif(
    sys.platform != "linux" or FAST is None,
    reason="no optimised BLAS installed to preload (apt install libopenblas0-pthread)")


@needs_openblas
def test_mlx_blas_probe_with_and_without_preload() -> None:
    pytest.importorskip("mlx.core")
    stock = blas.probe_mlx_blas_subprocess(None)
    fast = blas.probe_mlx_blas_subprocess(FAST)
    assert stock["reference"] and stock["name"] == "reference" and "mlx" in stock["path"]
    assert blas.blas_warning(stock) is not None
    assert fast["name"] in ("openblas", "mkl") and not fast["reference"] and fast["path"] == FAST
    # The speed check is the ground truth: reference ~7 GFLOP/s, OpenBLAS >100 (2 noisy cores)
    assert fast["gflops"] > 5 * stock["gflops"], (stock, fast)


@needs_openblas
def test_mlx_child_gets_openblas_kernels_for_the_cpus_vector_isa(tmp_path: Path) -> None:
    """The kernel set OpenBLAS really runs in an MLX child's environment (openblas_get_corename),
    not the SSE3 fallback it picks for a CPU model it does not know (31 vs 242 GFLOP/s on an
    AVX-512 Xeon VM)."""
    isa = blas_env.cpu_vector_isa()
    if not FAST.endswith("libopenblas.so.0") or isa is None:
        pytest.skip("not OpenBLAS, or a CPU without AVX2/AVX-512")
    env = mlx_env.child_env({**os.environ, "FTCORE_CACHE": str(tmp_path)}, threads=1)
    code = ("import ctypes, sys; f = ctypes.CDLL(sys.argv[1]).openblas_get_corename; "
            "f.restype = ctypes.c_char_p; print(f().decode())")
    core = subprocess.run([sys.executable, "-c", code, FAST], env=env, capture_output=True, text=True,
                          timeout=60, check=True).stdout.split()[-1].lower()
    wanted = blas_env._AVX512_CORES if isa == "avx512" else (*blas_env._AVX512_CORES, *blas_env._AVX2_CORES)
    assert core in wanted, (core, isa, env.get(blas_env.CORETYPE_ENV))


@needs_openblas
def test_preload_interposes_torch_sgemm() -> None:
    """A BLAS preload also captures torch's exported sgemm_ — why torch children must not get it."""
    pytest.importorskip("torch")
    code = "import torch; from ftcore.measure.blas import torch_blas; print(torch_blas())"
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    env["PYTHONPATH"] = str(ROOT)
    plain = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                           timeout=60, check=True).stdout.strip()
    pre = subprocess.run([sys.executable, "-c", code], env={**env, "LD_PRELOAD": FAST},
                         capture_output=True, text=True, timeout=60, check=True).stdout.strip()
    assert "preloaded" not in plain
    assert pre.startswith(("openblas", "mkl")) and "preloaded" in pre


_CHILD = """
import json, sys
import mlx.core as mx, numpy as np
x = np.linspace(-80, 80, 100_003, dtype=np.float32)
ref = 0.5 * np.exp(x.astype(np.float64))
eager = np.array(mx.exp(mx.array(x)) * 0.5)  # MLX's prebuilt kernel
fused = np.array(mx.compile(lambda a: mx.exp(a) * 0.5)(mx.array(x)))  # a JIT kernel
print(json.dumps([np.abs(eager / ref - 1).max().item(), np.abs(fused / ref - 1).max().item()]))
"""


@pytest.mark.skipif(jit.why_not() is not None, reason=f"JIT flags unusable: {jit.why_not()}")
def test_runner_s_mlx_children_build_kernels_with_the_flags(tmp_path: Path) -> None:
    env = mlx_env.child_env({**os.environ, "FTCORE_CACHE": str(tmp_path)}, threads=1)
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True,
                         timeout=300, check=True)
    eager_err, fused_err = json.loads(out.stdout)
    # Same polynomial exp as MLX's prebuilt kernel, vectorized with FMA: no less accurate.
    assert fused_err < 1e-5 and fused_err <= 1.5 * eager_err, (eager_err, fused_err)
    kernels = list(Path(env["TMPDIR"]).glob("mlx/*/cpu/lib*.so"))
    assert kernels, "the compiled function built no kernel in the wrapper's cache"
    # -frecord-gcc-switches (added by the wrapper) stores the command line in the kernel.
    for kernel in kernels:
        assert b"-mfma" in kernel.read_bytes() and b"-fno-trapping-math" in kernel.read_bytes()


@needs_openblas
def test_set_blas_threads_in_an_mlx_child() -> None:
    """In the MLX child's environment (OpenBLAS preloaded, 2 threads) the count can be set."""
    code = (
        "from ftcore.measure import blas; import mlx.core as mx; mx.eval(mx.ones((4, 4)) @ mx.ones((4, 4)));"
        "before = blas.blas_threads(); ok = blas.set_blas_threads(1);"
        "print(before, ok, blas.blas_threads())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=child_env(BACKENDS["mlx"], 2, RunConfig()), capture_output=True,
        text=True, check=True, cwd=ROOT,
    ).stdout.split()  # fmt: skip
    assert out == ["2", "True", "1"]

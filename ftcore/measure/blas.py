"""Which BLAS each framework really calls: probed in the running process, never assumed.

How the libraries are linked (checked with readelf/nm/LD_DEBUG on mlx 0.32.4 and torch 2.13):

* ``mlx[cpu]`` on Linux: ``mlx/lib/libmlx.so`` has ``NEEDED libblas-<hash>.so.3.10.0`` and
  ``liblapack-<hash>`` from ``mlx_cpu.libs/`` (RPATH ``$ORIGIN/../../mlx_cpu.libs``). That bundled
  libblas is the *reference* (netlib) BLAS: fp32 GEMM ~7 GFLOP/s on a 2-core EPYC.
  ``cblas_sgemm`` is an unversioned undefined symbol in libmlx.so, so the dynamic linker looks it
  up in the global scope first (executable, its deps, LD_PRELOAD) and only then in libmlx's own
  dependencies. An ``LD_PRELOAD`` of OpenBLAS (or libmkl_rt) therefore redirects MLX's GEMM
  (measured 7 -> ~245 GFLOP/s). The bundled libblas is still *mapped* afterwards, so
  ``/proc/self/maps`` alone cannot tell which one is used; we ask the dynamic linker instead
  (``dlsym`` on the global scope + ``dladdr``) and cross-check with a timed GEMM.
* torch (CPU wheel): MKL is linked statically into ``libtorch_cpu.so``, which *exports*
  ``sgemm_``/``dgemm_`` and calls them through its PLT (no -Bsymbolic). A preloaded OpenBLAS
  therefore also interposes torch's fp32/fp64 GEMM (LD_DEBUG=bindings shows
  ``libtorch_cpu.so -> openblas-pthread/libblas.so.3: sgemm_``); bf16 goes through oneDNN and is
  unaffected. Results stay correct and a bare fp32 GEMM is as fast (~240 vs ~220 GFLOP/s), but
  OpenBLAS's pthreads then fight torch's spinning OpenMP threads: a Linear forward+backward ran
  ~2x slower here (0.028 s vs 0.015 s; OMP_WAIT_POLICY=passive restores it). So: preload only
  in MLX children (``ftcore.mlx.env``), strip it for torch (``ftcore.torch.env``), and
  report what :func:`torch_blas` finds.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from ftcore.measure.gemm_timing import Timing, measure_gemm_peak

_REFERENCE_GFLOPS = 30.0  # below this an fp32 512^3 GEMM is not an optimised BLAS on any CPU
PRELOAD_ENV = "FTCORE_BLAS_PRELOAD"  # user override: the library to preload for MLX (blas_env)


def classify(path: str | None) -> str:
    """Short BLAS name for a library path (symlinks resolved, e.g. Debian alternatives)."""
    if not path:
        return "unknown"
    real = os.path.realpath(path).lower()
    low = path.lower()
    if "mlx_cpu.libs" in real or "mlx_cpu.libs" in low:
        return "reference"
    for key, name in (("mkl", "mkl"), ("openblas", "openblas"), ("blis", "blis"),
                      ("accelerate", "accelerate"), ("atlas", "atlas")):
        if key in real or key in low:
            return name
    if "/blas/libblas" in real:  # Debian's libblas3 package: netlib reference BLAS
        return "reference"
    return "unknown"


class _DlInfo(ctypes.Structure):
    _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]


def global_symbol_owner(symbol: str) -> str | None:
    """Path of the library that provides ``symbol`` in the process's global scope, or None.

    The global scope is what an RTLD_LOCAL extension such as libmlx.so / libtorch_cpu.so binds to
    *before* its own dependencies, so a hit here means that library's calls go there.
    """
    try:
        glob = ctypes.CDLL(None)
        addr = ctypes.cast(getattr(glob, symbol), ctypes.c_void_p).value
    except (AttributeError, OSError):
        return None
    try:
        dladdr = glob.dladdr
    except AttributeError:  # glibc < 2.34 keeps dladdr in libdl
        dladdr = ctypes.CDLL(ctypes.util.find_library("dl")).dladdr
    info = _DlInfo()
    if not dladdr(ctypes.c_void_p(addr), ctypes.byref(info)) or not info.dli_fname:
        return None
    name = info.dli_fname.decode()
    # dladdr names the main program by argv[0]-ish path; that is "the executable", not a BLAS.
    return None if os.path.realpath(name) == os.path.realpath(sys.executable) else name


def mapped_libraries(pattern: str = "blas") -> list[str]:
    """Distinct mapped shared objects whose path contains ``pattern`` (Linux only)."""
    try:
        with open("/proc/self/maps") as f:
            paths = {ln.split(maxsplit=5)[-1].strip() for ln in f if pattern in ln.lower()}
    except OSError:
        return []
    return sorted(p for p in paths if p.startswith("/"))


def blas_threads() -> int | None:
    """Threads of a globally visible OpenBLAS/MKL (e.g. a preload), else None."""
    glob = ctypes.CDLL(None)
    for fn in ("openblas_get_num_threads", "MKL_Get_Max_Threads"):
        try:
            return int(getattr(glob, fn)())
        except (AttributeError, OSError):
            continue
    return None


def set_blas_threads(n: int) -> bool:
    """Set a globally visible OpenBLAS/MKL's thread count now; False when there is none to set."""
    glob = ctypes.CDLL(None)
    for fn in ("openblas_set_num_threads", "MKL_Set_Num_Threads"):
        try:
            getattr(glob, fn)(ctypes.c_int(n))
        except AttributeError:
            continue
        return blas_threads() == n
    return False


def torch_blas() -> str:
    """BLAS torch's CPU GEMM really calls: the build's BLAS_INFO unless a preload interposes it."""
    import torch

    cfg = torch.__config__.show()
    m = re.search(r"\bBLAS_INFO=([\w-]+)", cfg)
    built = m.group(1) if m else "unknown"
    if built == "mkl" and not torch.backends.mkl.is_available():
        built = "unknown"
    # libtorch_cpu exports sgemm_ and calls it via its PLT: a global provider wins (ELF only;
    # macOS's two-level namespace binds torch to its own BLAS).
    owner = global_symbol_owner("sgemm_") if sys.platform == "linux" else None
    if owner and "torch" not in owner:
        return f"{classify(owner)} (preloaded {owner}; interposes {built} for fp32 GEMM)"
    return built


def mlx_blas_info(time_gemm: bool = True, n: int = 512) -> dict:
    """{name, path, gflops, reference, threads, mapped} for the BLAS MLX's CPU matmul calls.

    Runs a small MLX CPU matmul first so the library is loaded and the symbol bound.
    ``gflops`` is a best-of-3 fp32 ``n``x``n`` GEMM (~0.2 s with the reference BLAS).
    """
    import mlx.core as mx

    a = mx.ones((8, 8))
    mx.eval(mx.matmul(a, a, stream=mx.cpu))
    if sys.platform == "darwin":
        name, path = "accelerate", None  # mlx on macOS links Accelerate; no preload games there
    else:
        path = global_symbol_owner("cblas_sgemm")
        if path is None:  # nothing global: libmlx falls through to its bundled dependency
            bundled = [p for p in mapped_libraries("blas") if "mlx" in p]
            path = bundled[0] if bundled else None
            name = classify(path) if path else "unknown"
        else:
            name = classify(path)
    gflops = None
    if time_gemm:
        gflops = measure_gemm_peak("mlx", "fp32", n=n, timing=Timing(repeats=3, max_time_s=1.0))
    threads = (
        blas_threads() if name in ("openblas", "mkl") else (1 if name == "reference" else None)
    )
    return {"name": name, "path": path, "gflops": gflops, "reference": name == "reference",
            "threads": threads, "mapped": mapped_libraries("blas")}


def blas_warning(info: dict) -> str | None:
    """A loud message when MLX runs on the reference BLAS (or any BLAS that is that slow)."""
    g = info.get("gflops")
    gtxt = f"~{g:.0f} GFLOP/s" if g else "speed not measured"
    if info.get("reference"):
        return ("WARNING: MLX is using the reference BLAS bundled in the mlx[cpu] wheel: fp32 GEMM "
                f"{gtxt}, expect ~30x slower than an optimised BLAS; install libopenblas0-pthread "
                f"(or set {PRELOAD_ENV} to an OpenBLAS/MKL library) so ftcore can LD_PRELOAD it.")
    if g is not None and g < _REFERENCE_GFLOPS:
        return (f"WARNING: MLX fp32 GEMM measured only {gtxt} with {info.get('name')} "
                f"({info.get('path')}); the machine may be overloaded or the BLAS unoptimised.")
    return None


def probe_mlx_blas_subprocess(preload: str | None, timeout: float = 60) -> dict:
    """Run :func:`mlx_blas_info` in a fresh Python with LD_PRELOAD set to ``preload`` (or unset)."""
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    if preload:
        env["LD_PRELOAD"] = preload
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    code = (
        "import json; from ftcore.measure.blas import mlx_blas_info; "
        "print(json.dumps(mlx_blas_info()))"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"MLX BLAS probe failed (rc {proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _torch_gemm_blas() -> dict:
    import torch

    return {"name": torch_blas(), "path": None, "threads": torch.get_num_threads()}


def _mlx_gemm_blas() -> dict:
    info = mlx_blas_info(time_gemm=False)
    return {"name": info["name"], "path": info["path"], "threads": info["threads"] or 1}


def _torch_facts() -> dict:
    name = torch_blas()
    return {"blas": name, "torch_blas": name}


def _mlx_facts() -> dict:
    info = mlx_blas_info()
    return {"blas": info["name"], "mlx_blas": info, "blas_warning": blas_warning(info)}


# framework -> (GEMM BLAS of this process: name, path, threads; the BLAS facts of a result's env)
_PROBES = {"torch": (_torch_gemm_blas, _torch_facts), "mlx": (_mlx_gemm_blas, _mlx_facts)}


def framework_blas(framework: str) -> dict:
    """BLAS facts for this process's ``framework`` ("torch" or "mlx"): ``blas`` (short name),
    ``<framework>_blas`` and, for MLX, ``blas_warning`` when it runs on the reference BLAS.
    For MLX it times a small GEMM (~0.2 s on the reference BLAS). Never raises; {} for a
    framework it does not know."""
    if framework not in _PROBES:
        return {}
    try:
        return _PROBES[framework][1]()
    except Exception as e:  # a probe failure must not lose the run; say so instead
        return {"blas": "unknown", "blas_probe_error": f"{type(e).__name__}: {e}"}


def gemm_blas(framework: str) -> dict:
    """{name, path, threads} of the BLAS this process's ``framework`` GEMM runs on."""
    return _PROBES[framework][0]()


def framework_blas_threads(framework: str) -> tuple[str, int]:
    """(BLAS name, threads) this process's ``framework`` GEMM runs with."""
    info = gemm_blas(framework)
    return info["name"], info["threads"]

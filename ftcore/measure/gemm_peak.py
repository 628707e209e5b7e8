"""The GEMM peaks MFU divides by (ftcore.measure.mfu): a framework's own, in this process, and
the machine's, the best over frameworks each probed in a fresh process; never a datasheet figure.
Peaks are cached in ``$FTCORE_CACHE/gemm_peak.json`` (default ~/.cache/ftcore).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from ftcore.cache_dir import cache_root
from ftcore.files import write_json_atomic
from ftcore.measure.blas import framework_blas_threads
from ftcore.measure.gemm_timing import measure_gemm_peak
from ftcore.measure.hostinfo import affinity_cores, cpu_model


def _read_cache(path: Path) -> dict:
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return cache if isinstance(cache, dict) else {}


def _shapes_key(shapes: tuple[tuple[int, int, int], ...]) -> str:
    return (
        hashlib.sha256(json.dumps(sorted(shapes)).encode()).hexdigest()[:12] if shapes else "square"
    )


def gemm_peak_cached(framework: str, precision: str, n: int = 1024, device: str = "cpu",
                     refresh: bool = False, shapes: tuple[tuple[int, int, int], ...] = ()) -> float:
    """This process's GEMM peak for ``framework`` over a square and the run's ``shapes``
    (ftcore.measure.gemm_timing.measure_gemm_peak), measured once per (cpu model, cores, framework,
    precision, blas, threads, n, device, shapes) and cached.

    Concurrent writers may drop each other's new entries (last replace wins); that only costs
    a re-measurement.
    """
    name, threads = framework_blas_threads(framework)
    key = "|".join(map(str, (cpu_model(), affinity_cores(), framework, precision, name, threads,
                             n, device, _shapes_key(shapes))))
    path = cache_root() / "gemm_peak.json"
    cache = _read_cache(path)
    if not refresh and isinstance(cache.get(key), dict) and cache[key].get("gflops", 0) > 0:
        return float(cache[key]["gflops"])
    gflops = measure_gemm_peak(framework, precision, n=n, device=device, shapes=shapes)
    if isinstance(cache.get(key), dict):  # load only slows a probe: keep the best figure seen
        gflops = max(gflops, float(cache[key].get("gflops", 0)))
    cache[key] = {"gflops": gflops, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    write_json_atomic(path, cache)
    return gflops


def machine_gemm_peak(
    precision: str,
    envs: dict[str, dict[str, str]],
    refresh: bool = False,
    shapes: tuple[tuple[int, int, int], ...] = (),
    at_least: float | None = None,
) -> float | None:
    """This machine's CPU GEMM peak at `precision`: the best over frameworks, each measured in a
    fresh process with the environment its backends run in (``envs``: framework -> environment,
    from ftcore.backends.framework_envs). Cached; None if no framework could be probed.

    MFU divides by this one figure for every backend, so a framework stuck on a slow GEMM (MLX's
    reference BLAS, MLX bf16 on CPU) shows a low MFU instead of a flattering one.
    A busy machine can only make a probe slower, so `refresh` re-measures and keeps the best
    figure seen; so does a peak below `at_least` GFLOP/s (what a run achieved: an MFU above 100%
    would show the figure was taken under load).
    """
    peak = _machine_gemm_peak(precision, envs, refresh, shapes)
    if peak and at_least is not None and peak < at_least and not refresh:
        peak = _machine_gemm_peak(precision, envs, True, shapes)
    return peak


def _machine_gemm_peak(precision: str, envs: dict[str, dict[str, str]], refresh: bool,
                       shapes: tuple[tuple[int, int, int], ...]) -> float | None:
    shapes = tuple(tuple(s) for s in shapes)
    key = f"machine|{cpu_model()}|{affinity_cores()}|{precision}|{_shapes_key(shapes)}"
    path = cache_root() / "gemm_peak.json"
    cached = _read_cache(path).get(key)
    if not refresh and isinstance(cached, dict) and cached.get("gflops", 0) > 0:
        return float(cached["gflops"])
    root = str(Path(__file__).resolve().parents[2])
    peaks = {}
    t0 = time.perf_counter()
    for fw, env in envs.items():
        if importlib.util.find_spec(fw) is None:
            continue
        env = {**env, "PYTHONPATH": os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))}
        code = (
            "from ftcore.measure.gemm_peak import gemm_peak_cached; "
            f"print(gemm_peak_cached({fw!r}, {precision!r}, refresh={refresh!r}, "
            f"shapes={shapes!r}))"
        )
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                             timeout=300)
        if out.returncode == 0 and out.stdout.strip():
            peaks[fw] = float(out.stdout.strip().splitlines()[-1])
    if not peaks:
        return None
    why = (
        "re-measured: an MFU above 100% showed the cached figure was low"
        if refresh
        else "once per machine and run shape"
    )
    print(
        f"ftcore: measured this machine's {precision} GEMM peak ({', '.join(peaks)}) in "
        f"{time.perf_counter() - t0:.1f} s ({why}; cached in {path})",
        file=sys.stderr,
        flush=True,
    )
    earlier = cached.get("gflops", 0) if isinstance(cached, dict) else 0
    best = max([*peaks.values(), earlier])
    cache = _read_cache(path)
    cache[key] = {"gflops": best, "per_framework": peaks,
                  "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    write_json_atomic(path, cache)
    return best

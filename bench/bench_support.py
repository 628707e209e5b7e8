"""Shared pieces of the benchmark suite: case matrix, per-round result aggregation, extra_info
completeness, the machine_info (hardware + BLAS) fingerprint, and memray capture analysis.

Imported by bench/conftest.py and the bench/test_*.py modules (pytest puts bench/ on sys.path).
Nothing here times anything; the timed call is `benchmark.pedantic` in test_finetune_bench.py.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ftcore.backends import BACKENDS, FRAMEWORK_ENVS
from ftcore.measure.memory_model import peak_over_model
from ftcore.result import figures
from ftcore.run.bench_cases import SIZES, Case, build_cases, parse_list, parse_shape  # noqa: F401

BACKEND_NAMES = tuple(BACKENDS)


# Backends whose tiny fine-tune has a memray peak-heap budget (bench/test_memory_bench.py); the
# only memray cases --bench-quick runs.
MEMRAY_BUDGET_BACKENDS = ("torch", "mlx")
QUICK_WARMUP, QUICK_TIMED = 1, 3  # --bench-quick: steps per case
QUICK_TOKENIZE_RECORDS = 2000


def missing_package(backend: str) -> str | None:
    """A skip reason when the backend's package is not importable here, else None."""
    return BACKENDS[backend].missing()


# ---------------------------------------------------------------------------------------------
# extra_info

# What a case's timed call is; recorded in machine_info so a baseline of other work is named.
TIMING_METHOD = "one training step per round (step gate)"
TIMED_WHAT = ("benchmark time = one training step of a process that loaded once (the step gate, "
              "ftcore.process.step_gate): from the parent's 'go' to the child's answer after the step's sync "
              "point; rounds pool the timed steps of several fresh processes, whose start, load "
              "and warm-up steps run untimed (pytest-benchmark's setup)")

# Figures every ok run must report (non-None, and > 0 where numeric), and those copied into
# extra_info (MEDIAN_FIELDS: median over the case's processes; the others: the first process's):
# the schema's tags (ftcore.result.figure).
REQUIRED = figures("required")
POSITIVE = figures("positive")
# Present in every record; None allowed where the framework has no such figure (CPU torch has
# no allocator peak); MLX backends must report mx.get_peak_memory.
NULLABLE = ("framework_peak_mb",)
FRAMEWORKS_WITH_PEAK = ("mlx",)  # frameworks whose backends must report their allocator peak
MEDIAN_FIELDS = figures("median")
RESULT_FIELDS = (*MEDIAN_FIELDS, *figures("first"))
# RunResult.extra entries of the first process, when present
EXTRA_KEYS = ("machine_gemm_peak_gflops", "framework_gemm_peak_gflops", "mfu_vs_framework_gemm",
              "parent_prepare_s")


def result_info(results: Sequence[Any], case: Case, warmup: int, timed: int) -> dict[str, Any]:
    """extra_info for one case from its processes' RunResults: process-level figures (load time,
    peak RSS, ...) as the median over processes (each process's value in `<name>_per_process`),
    beside the step times pytest-benchmark measured."""
    first = results[0]
    info: dict[str, Any] = {"backend": case.backend, "size": case.size, "status": first.status,
                            "processes": len(results)}
    for name in RESULT_FIELDS:
        values = [getattr(r, name) for r in results]
        if name in MEDIAN_FIELDS:
            info[name] = median_or_none(values)
            info[f"{name}_per_process"] = values
        else:
            info[name] = values[0]
    for key in EXTRA_KEYS:
        if key in first.extra:
            info[key] = first.extra[key]
    info["machine_load_per_process"] = [r.machine_load for r in results]
    info["process_wall_s_per_process"] = [r.extra.get("process_wall_s") for r in results]
    info["peak_rss_over_model"] = peak_over_model(
        info.get("peak_rss_max_rank_mb"), info.get("peak_rss_mb"), first.memory_model
    )
    info["busy_processes"] = sum(bool((r.machine_load or {}).get("busy")) for r in results)
    timed_steps = [t for r in results for t in r.step_times_s[warmup:]]
    info["child_step_median_s"] = statistics.median(timed_steps) if timed_steps else None
    env = first.env or {}
    info["cpu"] = env.get("cpu")
    info["versions"] = {k: v for k, v in (env.get("versions") or {}).items() if v}
    if env.get("blas_warning"):
        info["blas_warning"] = env["blas_warning"]
    info["git_commit"] = env.get("git_commit")
    info["warmup_steps"], info["timed_steps"] = warmup, timed
    info["timed"] = TIMED_WHAT
    info["config"] = first.config
    info["group"] = case.group
    return info


def median_or_none(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals or len(vals) != len(values):
        return None
    return float(statistics.median(vals))


def extra_info_problems(info: dict[str, Any], backend: str) -> list[str]:
    """What is missing or implausible in one case's extra_info (empty list: complete)."""
    problems = []
    for name in (*REQUIRED, *NULLABLE):
        if name not in info:
            problems.append(f"{name}: missing")
    for name in REQUIRED:
        if name in info and info[name] in (None, ""):
            problems.append(f"{name}: None/empty")
    for name in POSITIVE:
        v = info.get(name)
        if isinstance(v, int | float) and not v > 0:
            problems.append(f"{name}: {v} is not > 0")
    for name in ("final_loss", "eval_loss"):
        v = info.get(name)
        if isinstance(v, float) and not math.isfinite(v):
            problems.append(f"{name}: {v} is not finite")
    mfu = info.get("mfu")
    if isinstance(mfu, float) and mfu > 1.0:  # impossible: the GEMM peak it divides by is too low
        problems.append(f"mfu: {mfu:.2f} > 1: the cached GEMM peak ({info.get('machine_gemm_peak_gflops')} GFLOP/s) "
                        "was probably measured on a loaded machine; delete $FTCORE_CACHE/gemm_peak.json and rerun")
    if (info.get("world_size") or 1) > 1 and not (info.get("allreduce_time_s") or 0) > 0:
        problems.append("allreduce_time_s: not recorded by a data-parallel case")
    if BACKENDS[backend].framework in FRAMEWORKS_WITH_PEAK and info.get("framework_peak_mb") is None:
        problems.append("framework_peak_mb: None for an MLX backend (mx.get_peak_memory expected)")
    return problems


# ---------------------------------------------------------------------------------------------
# machine_info: what makes two baselines comparable

# CPU feature flags that change kernel selection (others, e.g. hypervisor bits, are ignored).
_FLAG_PREFIXES = ("avx", "amx", "fma", "f16c", "sse4", "neon", "asimd", "sve", "bf16", "i8mm")

_PROBE_CODE = r"""
import json, sys
from ftcore.measure.blas import gemm_blas
from ftcore.measure.hostinfo import version
fw = sys.argv[1]
try:
    info = gemm_blas(fw)
    out = {"blas": info["name"], "path": info["path"], "threads": info["threads"], "version": version(fw)}
except Exception as e:
    out = {"blas": "unknown", "error": f"{type(e).__name__}: {e}"}
print(json.dumps(out))
"""


def probe_framework_blas(threads: int | None = None, timeout: float = 120) -> dict[str, dict]:
    """BLAS each framework really calls, probed in child processes with the runner's own child
    environment (so the MLX probe sees the OpenBLAS preload the MLX backend gets). Never raises."""
    from ftcore.measure.hostinfo import affinity_cores
    from ftcore.run.backend_process import base_env

    threads = threads or affinity_cores()
    root = str(Path(__file__).resolve().parent.parent)
    procs = {}
    for fw, make_env in FRAMEWORK_ENVS.items():
        if importlib.util.find_spec(fw) is None:
            continue
        env = make_env(base_env(), threads)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
        procs[fw] = subprocess.Popen([sys.executable, "-c", _PROBE_CODE, fw], env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out = {}
    for fw, p in procs.items():
        try:
            stdout, stderr = p.communicate(timeout=timeout)
            lines = stdout.strip().splitlines()
            out[fw] = json.loads(lines[-1]) if lines else {"blas": "unknown", "error": stderr[-500:]}
        except Exception as e:  # a probe must never break the benchmark session
            p.kill()
            out[fw] = {"blas": "unknown", "error": f"{type(e).__name__}: {e}"}
    return out


def ftcore_machine_info(threads: int | None = None) -> dict[str, Any]:
    """The `ftcore` section added to pytest-benchmark's machine_info."""
    from ftcore.measure.hostinfo import affinity_cores, cpu_model, git_commit

    return {
        "cpu_model": cpu_model(),
        "logical_cores": os.cpu_count(),
        "affinity_cores": affinity_cores(),
        "framework_blas": probe_framework_blas(threads),
        "timing": TIMING_METHOD,
        "git_commit": git_commit(),
    }


def method_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Why a baseline's figures measure something else: recorded by an older ftcore whose cases
    timed other work (a whole process instead of one step)."""
    a = (saved.get("ftcore") or {}).get("timing")
    b = (current.get("ftcore") or {}).get("timing")
    if a == b:
        return []
    commit = (saved.get("ftcore") or {}).get("git_commit") or "an unknown commit"
    return [f"baseline recorded by an older ftcore ({commit}) that timed {a or 'whole processes'}; "
            f"this run times {b}: not comparable, re-record it"]


def hardware_key(machine_info: dict[str, Any]) -> dict[str, Any]:
    """The parts of a machine_info that make timings comparable: CPU model, architecture, core
    counts, the kernel-relevant CPU flags, each framework's BLAS (name and library) and version.
    Deliberately left out: hostname (`node`), clock speeds (`hz_actual` wobbles between runs),
    kernel release, cache-size strings and Python build details."""
    cpu = machine_info.get("cpu") or {}
    ft = machine_info.get("ftcore") or {}
    flags = sorted(f for f in cpu.get("flags") or () if f.startswith(_FLAG_PREFIXES))
    blas, versions = {}, {}
    for fw, info in (ft.get("framework_blas") or {}).items():
        path = info.get("path")
        blas[fw] = {"blas": info.get("blas"), "library": os.path.basename(path) if path else None}
        versions[fw] = info.get("version")
    return {
        "cpu_model": ft.get("cpu_model") or cpu.get("brand_raw"),
        "arch": cpu.get("arch") or machine_info.get("machine"),
        "logical_cores": ft.get("logical_cores") or cpu.get("count"),
        "affinity_cores": ft.get("affinity_cores"),
        "cpu_flags": flags,
        "system": machine_info.get("system"),
        "blas": blas,
        "versions": versions,  # torch / mlx: a framework upgrade changes what a step computes
    }


def hardware_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Human-readable differences that matter; [] when only noise (host name, clock) differs."""
    a, b = hardware_key(saved), hardware_key(current)
    diffs = []
    for name in ("cpu_model", "arch", "logical_cores", "affinity_cores", "system"):
        if a[name] is not None and b[name] is not None and a[name] != b[name]:
            diffs.append(f"{name}: baseline {a[name]!r}, now {b[name]!r}")
    if a["cpu_flags"] and b["cpu_flags"] and a["cpu_flags"] != b["cpu_flags"]:
        lost = sorted(set(a["cpu_flags"]) - set(b["cpu_flags"]))
        new = sorted(set(b["cpu_flags"]) - set(a["cpu_flags"]))
        diffs.append(f"cpu flags: only in baseline {lost}, only now {new}")
    if not a["blas"]:
        diffs.append("baseline records no per-framework BLAS (saved without bench/conftest.py's "
                     "machine_info hook); cannot tell whether the BLAS changed")
    def show(v: dict | None) -> str:
        return "not probed" if v is None else f"{v['blas']} ({v['library'] or 'library unknown'})"

    for fw in sorted(set(a["blas"]) | set(b["blas"])):
        x, y = a["blas"].get(fw), b["blas"].get(fw)
        if a["blas"] and x != y:
            diffs.append(f"{fw} BLAS: baseline {show(x)}, now {show(y)}")
    for fw in sorted(set(a["versions"]) & set(b["versions"])):
        x, y = a["versions"][fw], b["versions"][fw]
        if x and y and x != y:
            diffs.append(f"{fw} version: baseline {x}, now {y}")
    return diffs


# ---------------------------------------------------------------------------------------------
# memray

# Native-frame markers -> who owns the bytes live at memray's peak (first match wins).
MEMRAY_OWNERS = (
    ("torch CPU tensors (c10::alloc_cpu)", ("c10::alloc_cpu",)),
    ("torch mmap of weight files (at::MapAllocator)", ("at::MapAllocator",)),
    ("MLX buffers (mlx::core::allocator)", ("mlx::core::allocator",)),
    ("BLAS work buffers (blas_memory_alloc / mkl)", ("blas_memory_alloc", "mkl_serv", "mkl_")),
    # pyarrow (imported by datasets, which transformers' Trainer imports) reserves a 1 GiB mimalloc
    # arena: address space, never resident; memray counts it in full
    ("pyarrow mimalloc arena (reserved, not resident)", ("mi_reserve_os_memory", "arrow::")),
    ("numpy arrays", ("PyDataMem_", "default_malloc", "default_calloc", "npy_alloc")),
    ("Python objects (pymalloc arenas, PyObject_Malloc, PyMem)", ("_PyObject_Arena", "_PyObject_Malloc", "PyMem_", "_PyObject_GC", "_PyObject_New", "_PyMem_")),
)
# The framework allocator each backend's training memory must appear under (checked, not assumed).
FRAMEWORK_OWNER = {
    "torch": "torch CPU tensors (c10::alloc_cpu)",
    "mlx": "MLX buffers (mlx::core::allocator)",
}


def memray_summary(capture: Path, native_frames: int = 12) -> dict[str, Any]:
    """Peak heap of a memray capture and, at that high-water mark, bytes by allocator call and
    (with native traces) by owner. Sizes in MB (2**20 bytes)."""
    import memray

    def allocator_name(a: Any) -> str:
        try:
            return memray.AllocatorType(a).name
        except ValueError:
            return str(a)

    reader = memray.FileReader(str(capture))
    meta = reader.metadata
    by_allocator: dict[str, int] = {}
    by_owner: dict[str, int] = {}
    largest = []
    records = list(reader.get_high_watermark_allocation_records(merge_threads=True))
    for rec in records:
        name = allocator_name(rec.allocator)
        by_allocator[name] = by_allocator.get(name, 0) + rec.size
        if meta.has_native_traces:
            try:
                frames = [f[0] for f in rec.native_stack_trace(max_stacks=native_frames)]
            except Exception:
                frames = []
            text = " ".join(frames)
            owner = next((o for o, keys in MEMRAY_OWNERS if any(k in text for k in keys)), "other")
            by_owner[owner] = by_owner.get(owner, 0) + rec.size
    for rec in sorted(records, key=lambda r: -r.size)[:5]:
        try:
            where = [f"{f[0]} ({f[1]}:{f[2]})" for f in rec.hybrid_stack_trace(max_stacks=6)] if meta.has_native_traces \
                else [f"{f[0]} ({f[1]}:{f[2]})" for f in rec.stack_trace(max_stacks=6)]
        except Exception:
            where = []
        largest.append({"mb": rec.size / 2**20, "allocator": allocator_name(rec.allocator),
                        "thread": rec.tid, "stack": where})
    mb = 2**20
    return {
        "peak_memory_mb": meta.peak_memory / mb,
        "total_allocations": meta.total_allocations,
        "native_traces": meta.has_native_traces,
        "duration_s": (meta.end_time - meta.start_time).total_seconds(),
        "live_at_peak_mb": sum(r.size for r in records) / mb,
        "at_peak_by_allocator_mb": {k: v / mb for k, v in sorted(by_allocator.items(), key=lambda kv: -kv[1])},
        "at_peak_by_owner_mb": {k: v / mb for k, v in sorted(by_owner.items(), key=lambda kv: -kv[1])},
        "largest_at_peak": largest,
    }

"""Measurement: RunResult, step timing, peak RSS, environment capture, FLOPs, GEMM peak and MFU."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from ftcore.models import cache_root

# ---------------------------------------------------------------------------------------------
# RunResult


@dataclass
class RunResult:
    """One backend's run. ``train_time_s`` and the throughputs cover the timed steps only
    (``step_times_s[warmup:]``); ``warmup_time_s`` is the excluded first steps; ``step_times_s``
    lists every step, warm-up included. Memory figures are in MB (2**20 bytes)."""

    backend: str
    status: str = "ok"  # "ok" | "failed"
    error: str | None = None
    config: dict = field(default_factory=dict)
    env: dict = field(default_factory=dict)
    load_time_s: float = 0.0
    train_time_s: float = 0.0
    warmup_time_s: float = 0.0
    step_times_s: list[float] = field(default_factory=list)
    steps: int = 0
    tokens_per_s: float = 0.0  # all tokens, padding included, over timed steps
    loss_tokens_per_s: float = 0.0  # tokens that count in the loss, over timed steps
    losses: list[float] = field(default_factory=list)  # one per step
    final_loss: float | None = None
    eval_loss: float | None = None
    eval_losses: list[list[float]] = field(default_factory=list)  # [step, loss]
    peak_rss_mb: float = 0.0
    baseline_rss_mb: float = 0.0  # RSS after model load
    framework_peak_mb: float | None = None  # mx.get_peak_memory / cuda max allocated; None on CPU torch
    trainable_params: int = 0
    flops_per_token: float = 0.0
    mfu: float | None = None
    batch_fingerprint: str = ""
    initial_adapter_fingerprint: str = ""
    optimizer: dict = field(default_factory=dict)
    precision: str = ""
    blas: str = ""  # what BLAS this framework really calls (ftcore.blas)
    threads: int = 0
    extra: dict = field(default_factory=dict)

    @classmethod
    def failed(cls, backend: str, config: dict | None, error: str) -> RunResult:
        return cls(backend=backend, status="failed", error=error, config=dict(config or {}))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> RunResult:
        names = {f.name for f in dataclasses.fields(cls)}
        known = {k: v for k, v in d.items() if k in names}
        unknown = {k: v for k, v in d.items() if k not in names}
        res = cls(**known)
        if unknown:  # newer/older writers: keep what we do not know instead of dropping it
            res.extra = {**res.extra, "unknown_fields": unknown}
        return res

    def write_json(self, path: str | os.PathLike) -> None:
        """Write atomically: a temp file in the same folder, fsync, then os.replace.

        Non-finite floats (a diverged loss) are written as null so the file is strict JSON.
        """
        write_json_atomic(path, _finite(self.to_dict()))

    @classmethod
    def read_json(cls, path: str | os.PathLike) -> RunResult:
        return cls.from_dict(json.loads(Path(path).read_text()))


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """json.dump to ``path`` so that readers see the old file or the complete new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, allow_nan=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------------------------
# Step timing


class StepTimer:
    """Collects per-step wall times and token counts; the first ``warmup_steps`` are excluded
    from throughput. Call ``add`` only after the step's results are materialised (mx.eval /
    device sync), otherwise lazy MLX work leaks into the next step."""

    def __init__(self, warmup_steps: int = 0) -> None:
        self.warmup_steps = warmup_steps
        self.times: list[float] = []
        self.tokens: list[int] = []
        self.loss_tokens: list[int] = []

    def add(self, seconds: float, tokens: int, loss_tokens: int) -> None:
        self.times.append(float(seconds))
        self.tokens.append(int(tokens))
        self.loss_tokens.append(int(loss_tokens))

    def fill(self, result: RunResult) -> RunResult:
        """Set step_times_s, steps, warmup/train time and both throughputs on ``result``."""
        w = min(self.warmup_steps, len(self.times))
        timed = slice(w, None)
        if w == len(self.times) and self.times:  # every step was warm-up: fall back, say so
            timed = slice(0, None)
            result.extra["throughput_includes_warmup"] = True
        t = sum(self.times[timed])
        result.step_times_s = list(self.times)
        result.steps = len(self.times)
        result.warmup_time_s = sum(self.times[:w])
        result.train_time_s = sum(self.times[w:])
        result.tokens_per_s = sum(self.tokens[timed]) / t if t > 0 else 0.0
        result.loss_tokens_per_s = sum(self.loss_tokens[timed]) / t if t > 0 else 0.0
        return result


# ---------------------------------------------------------------------------------------------
# Memory


def current_rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def rss_high_water_mb() -> float:
    """Kernel's peak RSS of *this process* since it started (or since reset_rss_high_water):
    VmHWM on Linux, ru_maxrss otherwise (KiB on Linux, bytes on macOS)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2**20 if sys.platform == "darwin" else r / 1024


def reset_rss_high_water() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakRSS:
    """Peak resident memory of this process over a ``with`` block.

    A background thread samples RSS every ``interval_s``; on exit the peak is the max of the
    samples and the kernel's high-water mark, which catches spikes between samples. The
    high-water mark is per process and covers its whole lifetime unless it can be reset: with
    ``reset=True`` we try /proc/self/clear_refs (``hwm_reset`` says if it worked); otherwise
    an earlier peak in the same process leaks in. The runner therefore gives every backend a
    fresh process. Child processes are not counted.
    """

    def __init__(self, interval_s: float = 0.02, reset: bool = True) -> None:
        self.interval_s = interval_s
        self.reset = reset
        self.hwm_reset = False
        self.start_mb = 0.0
        self.sampled_peak_mb = 0.0
        self.peak_mb = 0.0
        self.samples = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._proc = psutil.Process()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval_s)

    def _sample(self) -> None:
        mb = self._proc.memory_info().rss / 2**20
        self.sampled_peak_mb = max(self.sampled_peak_mb, mb)
        self.samples += 1

    def __enter__(self) -> PeakRSS:
        if self.reset:
            self.hwm_reset = reset_rss_high_water()
        self.start_mb = current_rss_mb()
        self._sample()
        self._thread = threading.Thread(target=self._run, name="ftcore-peak-rss", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()
        self.peak_mb = max(self.sampled_peak_mb, rss_high_water_mb())


# ---------------------------------------------------------------------------------------------
# Environment

_VERSIONED = ("torch", "transformers", "peft", "mlx", "mlx-lm", "datasets", "numpy")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if sys.platform == "darwin":
        try:
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"],
                                  capture_output=True, text=True, timeout=5).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine()


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit() -> str | None:
    """HEAD of the checkout that holds this package, or None (not a checkout, no commit, no git)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent.parent,
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    sha = out.stdout.strip()
    return sha if out.returncode == 0 and sha else None


def affinity_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS has no sched_getaffinity
        return os.cpu_count() or 1


def framework_blas(framework: str) -> dict:
    """BLAS facts for ``framework``'s process: ``blas`` (short name), ``<fw>_blas`` and, for MLX,
    ``blas_warning`` when it runs on the reference BLAS. Never raises."""
    from ftcore import blas

    try:
        if framework.startswith("mlx"):
            info = blas.mlx_blas_info()
            return {"blas": info["name"], "mlx_blas": info, "blas_warning": blas.blas_warning(info)}
        if framework in ("torch", "hf-trainer"):
            name = blas.torch_blas()
            return {"blas": name, "torch_blas": name}
    except Exception as e:  # a probe failure must not lose the run; say so instead
        return {"blas": "unknown", "blas_probe_error": f"{type(e).__name__}: {e}"}
    return {}


def env_info(framework: str) -> dict:
    """Machine, OS, versions, git commit and this framework's BLAS for a result row.
    Never raises. For MLX it times a small GEMM (~0.2 s on the reference BLAS)."""
    return {
        "framework": framework,
        "cpu": cpu_model(),
        "machine": platform.machine(),
        "logical_cores": os.cpu_count(),
        "affinity_cores": affinity_cores(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": {d: _version(d) for d in _VERSIONED},
        "git_commit": git_commit(),
        # Thread/preload settings decide which BLAS runs and how wide: record them as given.
        "blas_env": {k: os.environ.get(k) for k in ("LD_PRELOAD", "OMP_NUM_THREADS",
                                                     "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")},
        **framework_blas(framework),
    }


# ---------------------------------------------------------------------------------------------
# FLOPs

LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def linear_shapes(arch: dict) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each per-layer linear of a Llama, from HF config names."""
    h, inter = arch["hidden_size"], arch["intermediate_size"]
    heads = arch["num_attention_heads"]
    kv = arch.get("num_key_value_heads") or heads
    hd = arch.get("head_dim") or h // heads
    return {"q_proj": (h, heads * hd), "k_proj": (h, kv * hd), "v_proj": (h, kv * hd),
            "o_proj": (heads * hd, h), "gate_proj": (h, inter), "up_proj": (h, inter),
            "down_proj": (inter, h)}


def _targets(lora_targets: str | Iterable[str] | None) -> list[str]:
    if lora_targets is None:
        return []
    if isinstance(lora_targets, str):
        lora_targets = [t for t in lora_targets.split(",") if t.strip()]
    out = [t.strip() for t in lora_targets]
    if out in (["all"], ["all-linear"]):
        return list(LLAMA_LINEARS)
    bad = sorted(set(out) - set(LLAMA_LINEARS))
    if bad:
        raise ValueError(f"unknown LoRA target(s) {bad}; expected some of {LLAMA_LINEARS}")
    return out


def flops_per_token(arch: dict, seq_len: int, lora_targets: str | Iterable[str] | None,
                    lora_rank: int) -> dict:
    """Analytic training FLOPs per token for LoRA fine-tuning a Llama (matmuls only).

    A matmul of (m x k) by (k x n) counts 2*m*k*n. Per token and layer:

    * base linears B = sum over q,k,v,o,gate,up,down of 2*in*out (k,v have kv_heads*head_dim
      outputs); lm_head Hd = 2*hidden*vocab; the embedding is a lookup (0).
    * attention A = 2*2*seq_len*heads*head_dim: QK^T and AV over the *full* seq_len, i.e. the
      dense, non-causal-halved count (what SDPA with a mask computes; PaLM's MFU convention).
    * LoRA R = 2*r*(in+out) per targeted linear (x@A then @B).

    forward = L*(B + A + R) + Hd.
    backward: frozen weights need only the input gradient (1x forward, no weight gradient);
    LoRA weights need input and weight gradients (2x); attention has no weights, but both
    operands of each matmul need gradients (2x). backward = L*(B + 2A + 2R) + Hd.
    total = forward + backward = L*(2B + 3A + 3R) + 2*Hd  (vs. 6N-ish for full fine-tuning).

    Convention: input gradients are counted for every layer, although autograd may skip
    the frozen base matmuls of layer 0 whose input (the embedding) needs no gradient — an
    over-count of at most one layer's B. Norms, RoPE, softmax, SiLU and the loss are ignored.
    """
    layers, vocab, h = arch["num_hidden_layers"], arch["vocab_size"], arch["hidden_size"]
    heads = arch["num_attention_heads"]
    hd = arch.get("head_dim") or h // heads
    shapes = linear_shapes(arch)
    targets = _targets(lora_targets) if lora_rank else []
    base = sum(2 * i * o for i, o in shapes.values())
    attn = 2 * 2 * seq_len * heads * hd
    lora = sum(2 * lora_rank * (shapes[t][0] + shapes[t][1]) for t in targets)
    head = 2 * h * vocab
    fwd = layers * (base + attn + lora) + head
    bwd = layers * (base + 2 * attn + 2 * lora) + head
    return {
        "forward": float(fwd), "backward": float(bwd), "total": float(fwd + bwd),
        "base_linear_forward": float(layers * base), "attention_forward": float(layers * attn),
        "lora_forward": float(layers * lora), "lm_head_forward": float(head),
        "linear_params": layers * base // 2 + head // 2,
        "lora_params": layers * lora // 2,
        "convention": "2*m*n*k matmul FLOPs; dense (non-causal-halved) attention; "
                      "frozen weights: input grads only",
    }


# ---------------------------------------------------------------------------------------------
# GEMM peak and MFU


def _torch_gemm(precision: str, n: int, device: str):
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    dev = "cuda" if device == "gpu" else "cpu"
    a = torch.randn(n, n, dtype=dtype, device=dev)
    b = torch.randn(n, n, dtype=dtype, device=dev)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)

    def run() -> None:
        a @ b
        sync()

    return run


def _mlx_gemm(precision: str, n: int, device: str):
    import mlx.core as mx

    dtype = {"fp32": mx.float32, "bf16": mx.bfloat16}[precision]
    stream = mx.gpu if device == "gpu" else mx.cpu
    a = mx.random.normal((n, n), stream=stream).astype(dtype, stream=stream)
    b = mx.random.normal((n, n), stream=stream).astype(dtype, stream=stream)
    mx.eval(a, b)

    def run() -> None:
        mx.eval(mx.matmul(a, b, stream=stream))  # MLX is lazy: the work happens in eval

    return run


def measure_gemm_peak(framework: str, precision: str, n: int = 1024, repeats: int = 5,
                      max_time_s: float = 1.5, device: str = "cpu") -> float:
    """Best fp32/bf16 ``n``x``n`` GEMM throughput in GFLOP/s after one warm-up.

    Stops early once ``max_time_s`` is spent (after at least two timed runs), so slow backends
    (MLX's reference BLAS ~7 GFLOP/s, MLX bf16 ~6) stay within a couple of seconds.
    """
    make = {"torch": _torch_gemm, "mlx": _mlx_gemm}[framework]
    run = make(precision, n, device)
    run()  # warm-up: thread pools, kernel selection, page faults
    best = math.inf
    t_end = time.perf_counter() + max_time_s
    for i in range(repeats):
        t0 = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t0)
        if i >= 1 and time.perf_counter() > t_end:
            break
    return 2 * n**3 / best / 1e9


def framework_blas_threads(framework: str) -> tuple[str, int]:
    """(BLAS name, threads) this process's ``framework`` GEMM runs with."""
    from ftcore import blas

    if framework == "torch":
        import torch

        return blas.torch_blas(), torch.get_num_threads()
    info = blas.mlx_blas_info(time_gemm=False)
    return info["name"], info["threads"] or 1


def gemm_peak_cached(framework: str, precision: str, n: int = 1024, device: str = "cpu",
                     refresh: bool = False) -> float:
    """GEMM peak from ``$FTCORE_CACHE/gemm_peak.json`` (default ~/.cache/ftcore), measured once
    per (cpu model, cores, framework, precision, blas, threads, n, device).

    Concurrent writers may drop each other's new entries (last replace wins); that only costs
    a re-measurement.
    """
    name, threads = framework_blas_threads(framework)
    key = "|".join(map(str, (cpu_model(), affinity_cores(), framework, precision, name, threads,
                             n, device)))
    path = cache_root() / "gemm_peak.json"
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    if not refresh and isinstance(cache.get(key), dict) and cache[key].get("gflops", 0) > 0:
        return float(cache[key]["gflops"])
    gflops = measure_gemm_peak(framework, precision, n=n, device=device)
    if isinstance(cache.get(key), dict):  # load only slows a probe: keep the best figure seen
        gflops = max(gflops, float(cache[key].get("gflops", 0)))
    cache[key] = {"gflops": gflops, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    write_json_atomic(path, cache)
    return gflops


def machine_gemm_peak(precision: str, refresh: bool = False) -> float | None:
    """This machine's CPU GEMM peak at `precision`: the best of torch and MLX, each measured in
    its own fresh process with the environment its backend runs in (MLX with the fast BLAS
    preloaded). Cached with the per-framework figures; None if no framework could be probed.

    MFU divides by this one figure for every backend, so a framework stuck on a slow GEMM (MLX's
    reference BLAS, MLX bf16 on CPU) shows a low MFU instead of a flattering one.
    A busy machine can only make a probe slower, so `refresh` re-measures and keeps the best
    figure seen (the runner refreshes when an MFU above 100% shows the cached peak was low).
    """
    import importlib.util

    from ftcore import blas

    key = f"machine|{cpu_model()}|{affinity_cores()}|{precision}"
    path = cache_root() / "gemm_peak.json"
    try:
        cached = json.loads(path.read_text()).get(key)
    except (OSError, ValueError):
        cached = None
    if not refresh and isinstance(cached, dict) and cached.get("gflops", 0) > 0:
        return float(cached["gflops"])
    threads = affinity_cores()
    envs = {"torch": blas.torch_child_env(dict(os.environ), threads),
            "mlx": blas.mlx_child_env(dict(os.environ), threads)}
    root = str(Path(__file__).resolve().parent.parent)
    peaks = {}
    for fw, env in envs.items():
        if importlib.util.find_spec(fw) is None:
            continue
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
        code = (f"from ftcore.measure import gemm_peak_cached; "
                f"print(gemm_peak_cached({fw!r}, {precision!r}, refresh={refresh!r}))")
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        if out.returncode == 0 and out.stdout.strip():
            peaks[fw] = float(out.stdout.strip().splitlines()[-1])
    if not peaks:
        return None
    best = max([*peaks.values(), (cached or {}).get("gflops", 0) if isinstance(cached, dict) else 0])
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    cache[key] = {"gflops": best, "per_framework": peaks, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    write_json_atomic(path, cache)
    return best


def mfu(tokens_per_s: float, flops_per_token: float, peak_gflops: float | None) -> float | None:
    """Model FLOPs utilisation: achieved training FLOP/s over the measured GEMM peak."""
    if not peak_gflops or peak_gflops <= 0 or tokens_per_s is None:
        return None
    return tokens_per_s * flops_per_token / (peak_gflops * 1e9)

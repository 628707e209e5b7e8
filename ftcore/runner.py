"""Run one backend in a fresh process; a crash becomes a failed row, not a lost run.

Parent side: `prepare()` materialises the model and writes the shared batches once;
`run_backend()` starts `python -m ftcore.runner ...` for one backend, streams its progress, and
returns its RunResult (or a failed one with the reason when the child dies).
Child side: `main()` loads config + batches, measures peak RSS around the backend's `train`, and
writes result.json atomically.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ftcore.backends import BACKENDS, FRAMEWORK_ENVS, BackendSpec, get_backend
from ftcore.config import RunConfig, UserError
from ftcore.data import Batches, build_batches
from ftcore.hostinfo import affinity_cores
from ftcore.memory import PeakRSS
from ftcore.mfu import machine_gemm_peak, mfu
from ftcore.models import load_tokenizer, resolve_model_dir
from ftcore.report import build_comparison, write_report
from ftcore.result import RunResult

RESULT_FILE = "result.json"
# Never reach for a hub, and keep library chatter (weight-loading bars) off the progress stream.
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


@dataclass
class Prepared:
    cfg: RunConfig  # threads resolved, so every backend uses the same count
    model_dir: Path
    batches_path: Path
    batches: Batches


def prepare(cfg: RunConfig, work_dir: Path) -> Prepared:
    """Resolve the model folder, build the batches once and save them for the child processes.

    Every user error (bad model folder, bad data, too-short max length) surfaces here, before
    any backend starts.
    """
    model_dir = resolve_model_dir(cfg)
    batches = build_batches(cfg, load_tokenizer(model_dir))
    if cfg.threads is None:
        cfg = cfg.replace(threads=affinity_cores())
    work_dir.mkdir(parents=True, exist_ok=True)
    batches_path = work_dir / "batches.npz"
    batches.save(batches_path)
    return Prepared(cfg, model_dir, batches_path, batches)


def base_env() -> dict[str, str]:
    """This process's environment, offline and unbuffered: what every child starts from."""
    env = dict(os.environ)
    env.update(OFFLINE_ENV)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONWARNINGS"] = "ignore::FutureWarning"  # transformers' deprecation chatter
    return env


def child_env(spec: BackendSpec, threads: int) -> dict[str, str]:
    """Environment for a backend's process: offline, equal thread counts, and the rest its spec
    asks for (for MLX a fast BLAS preloaded, which a torch process must never get)."""
    return spec.child_env(base_env(), threads)


def gemm_peak(precision: str, threads: int, refresh: bool = False) -> float | None:
    """This machine's GEMM peak, each framework probed in its backends' environment."""
    envs = {fw: make(base_env(), threads) for fw, make in FRAMEWORK_ENVS.items()}
    return machine_gemm_peak(precision, envs, refresh=refresh)


def child_command(backend: str, prep: Prepared, out_dir: Path) -> list[str]:
    return [
        sys.executable, "-m", "ftcore.runner",
        "--backend", backend,
        "--config", prep.cfg.to_json(),
        "--model-dir", str(prep.model_dir),
        "--batches", str(prep.batches_path),
        "--out", str(out_dir),
    ]  # fmt: skip


def run_backend(
    backend: str,
    prep: Prepared,
    out_dir: Path,
    on_start: Callable[[subprocess.Popen], None] | None = None,
    wrap: list[str] | None = None,
) -> RunResult:
    """Run `backend` in its own process and return its result; never raises for a child failure.

    `wrap` replaces the leading `python -m` (e.g. `python -m memray run -o X.bin -m` for a
    profiling pass). The child's stderr
    (progress lines) is echoed live; its last lines become the reason if it dies.
    """
    spec = get_backend(backend)
    out_dir.mkdir(parents=True, exist_ok=True)
    result_path = out_dir / RESULT_FILE
    before_spawn_s = None
    if spec.before_spawn:  # e.g. the MLX conversion, kept out of the child's load time and RSS
        t0 = time.perf_counter()
        spec.before_spawn(prep.cfg, prep.model_dir)
        before_spawn_s = time.perf_counter() - t0
    started = time.time()
    cmd = child_command(backend, prep, out_dir)
    if wrap:
        cmd = [*wrap, *cmd[2:]]
    proc = subprocess.Popen(
        cmd,
        env=child_env(spec, prep.cfg.threads),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    if on_start:
        on_start(proc)
    tail: collections.deque[str] = collections.deque(maxlen=20)

    def pump() -> None:
        for line in proc.stderr:
            tail.append(line.rstrip())
            sys.stderr.write(line)
            sys.stderr.flush()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    _, status, rusage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    reader.join(timeout=5)
    code = proc.returncode
    # the child writes result.json atomically at its end (a failed row on a caught error, exit 1);
    # an older file from an earlier run in this folder is never taken for this run's
    fresh = result_path.exists() and result_path.stat().st_mtime >= started - 1
    if fresh and code in (0, 1):
        result = RunResult.from_dict(json.loads(result_path.read_text()))
    else:
        if code < 0:
            name = signal.Signals(-code).name
            why = f"killed by {name}" + (" (out of memory?)" if name == "SIGKILL" else "")
        else:
            why = f"exited with status {code}"
        last = next((ln for ln in reversed(tail) if ln.strip()), "")
        result = RunResult.failed(
            backend, prep.cfg.to_dict(), f"{backend} process {why}" + (f": {last}" if last else "")
        )
        result.extra["stderr_tail"] = list(tail)
    if before_spawn_s is not None:
        result.extra["parent_prepare_s"] = before_spawn_s  # ~0 when a cached conversion was current
    if result.status == "ok" and prep.cfg.device == "cpu":
        peak = gemm_peak(prep.cfg.precision, prep.cfg.threads)
        result.mfu = mfu(result.tokens_per_s, result.flops_per_token, peak)
        if result.mfu is not None and result.mfu > 1:  # the cached peak was measured under load
            peak = gemm_peak(prep.cfg.precision, prep.cfg.threads, refresh=True)
            result.mfu = mfu(result.tokens_per_s, result.flops_per_token, peak)
        result.extra["machine_gemm_peak_gflops"] = peak
    # the kernel's high-water mark for the child alone (KiB on Linux), next to the child's own figure
    result.extra["child_maxrss_mb"] = (
        rusage.ru_maxrss / 1024 if sys.platform != "darwin" else rusage.ru_maxrss / 2**20
    )
    result.write_json(result_path)
    return result


def compare(
    backends: list[str],
    prep: Prepared,
    out_dir: Path,
    on_start: Callable[[str, subprocess.Popen], None] | None = None,
) -> dict:
    """Run the backends one after another, each in its own process, then write the comparison
    (comparison.json, report.md, plots) into out_dir. A failed backend is a failed row."""
    results = []
    for i, name in enumerate(backends, 1):
        print(f"== [{i}/{len(backends)}] {name}", file=sys.stderr, flush=True)
        hook = (lambda proc, name=name: on_start(name, proc)) if on_start else None
        results.append(run_backend(name, prep, out_dir / name, on_start=hook).to_dict())
    comparison = build_comparison(results)
    write_report(comparison, out_dir)
    return comparison


def main(argv: list[str] | None = None) -> int:
    """Child entry: train one backend, write result.json; exit 1 with a failed row on error."""
    ap = argparse.ArgumentParser(prog="python -m ftcore.runner")
    ap.add_argument("--backend", required=True, choices=sorted(BACKENDS))
    ap.add_argument("--config", required=True, help="RunConfig as JSON")
    ap.add_argument("--model-dir", required=True, type=Path)
    ap.add_argument("--batches", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args(argv)
    cfg = RunConfig.from_dict(json.loads(args.config))
    args.out.mkdir(parents=True, exist_ok=True)
    with PeakRSS() as rss:
        try:
            batches = Batches.load(args.batches)
            result = get_backend(args.backend).train(cfg, args.model_dir, batches, args.out)
            code = 0
        except UserError as e:
            result, code = RunResult.failed(args.backend, cfg.to_dict(), str(e)), 1
        except Exception as e:  # the row says why; the traceback stays in extra for debugging
            result, code = (
                RunResult.failed(args.backend, cfg.to_dict(), f"{type(e).__name__}: {e}"),
                1,
            )
            result.extra["traceback"] = traceback.format_exc()
            print(f"[{args.backend}] failed: {type(e).__name__}: {e}", file=sys.stderr)
    result.peak_rss_mb = rss.peak_mb
    result.write_json(args.out / RESULT_FILE)
    return code


if __name__ == "__main__":
    sys.exit(main())

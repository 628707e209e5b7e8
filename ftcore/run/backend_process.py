"""Run one backend in a fresh process; a crash becomes a failed row, not a lost run.

Parent side: `prepare()` (ftcore.run.preflight) checks every input and writes the shared batches
once; `run_backend()` starts `python -m ftcore.run.backend_process ...` for one backend, streams its progress, and
returns its RunResult (or a failed one with the reason when the child dies).
Child side: `main()` loads config + batches, measures peak RSS around the backend's `train`, and
writes result.json atomically: status `ok`, `diverged` (a non-finite loss or gradient stopped it,
ftcore.backends.step_clock.Diverged) or `failed` (an exception; its traceback in `traceback`).
Children run in their own session and die with the parent (ftcore.run.procs).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import json
import os
import select
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from ftcore.backends import BACKENDS, FRAMEWORK_ENVS, BackendSpec, get_backend
from ftcore.backends.step_clock import Diverged
from ftcore.config import RunConfig, UserError
from ftcore.inputs.arch import read_arch
from ftcore.inputs.batches import Batches
from ftcore.measure.flops import gemm_shapes
from ftcore.measure.gemm_peak import machine_gemm_peak, mfu
from ftcore.measure.rss import PeakRSS
from ftcore.report import build_comparison, write_report
from ftcore.result import RunResult
from ftcore.run.preflight import Prepared, check_run, prepare  # noqa: F401 (the runner's API)
from ftcore.run.procs import death_reason, die_with_parent, oom_kills, reaped, spawn
from ftcore.run.ranks import (
    DIST_ENV,
    RankInfo,
    RankWatch,
    announce,
    merge_ranks,
    rank_threads,
    write_rank_file,
)
from ftcore.run.stepgate import FIFO_PREFIX, GATE_ENV

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


def base_env() -> dict[str, str]:
    """This process's environment, offline and unbuffered: what every child starts from."""
    env = dict(os.environ)
    env.update(OFFLINE_ENV)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONWARNINGS"] = "ignore::FutureWarning"  # transformers' deprecation chatter
    return env


def child_env(spec: BackendSpec, threads: int, cfg: RunConfig) -> dict[str, str]:
    """Environment for a backend's process: offline, equal thread counts, and the rest its spec
    asks for (for MLX a fast BLAS preloaded, which a torch process must never get)."""
    return spec.child_env(base_env(), threads, cfg)


def gemm_peak(prep: Prepared, refresh: bool = False) -> float | None:
    """This machine's GEMM peak for the run (a large square and the run's own GEMM shapes), each
    framework probed in its backends' environment."""
    cfg = prep.cfg
    envs = {fw: make(base_env(), cfg.threads) for fw, make in FRAMEWORK_ENVS.items()}
    shapes = gemm_shapes(read_arch(prep.model_dir), cfg.batch_size, cfg.max_seq_len, cfg.threads)
    return machine_gemm_peak(cfg.precision, envs, refresh=refresh, shapes=tuple(shapes))


def child_command(backend: str, prep: Prepared, out_dir: Path) -> list[str]:
    return [
        sys.executable, "-m", "ftcore.run.backend_process",
        "--backend", backend,
        "--config", prep.cfg.to_json(),
        "--model-dir", str(prep.model_dir),
        "--batches", str(prep.batches_path),
        "--out", str(out_dir),
    ]  # fmt: skip


class BackendProcess:
    """One backend running in its own process, started on creation; never raises for a child
    failure: `wait()` turns a crash into a failed RunResult with the reason.

    `wrap` replaces the leading `python -m` (e.g. `python -m memray run -o X.bin -m` for a
    profiling pass). With `gate=True` the child waits before every training step until `step()`
    asks for it (ftcore.run.stepgate), so a caller can time steps one at a time; call `step()`
    exactly cfg.steps times, then `wait()`. The child's stderr (progress lines) is echoed live;
    its last lines become the reason if it dies.
    """

    def __init__(self, backend: str, prep: Prepared, out_dir: Path,
                 on_start: Callable[[subprocess.Popen], None] | None = None,
                 wrap: list[str] | None = None, gate: bool = False) -> None:
        self.backend, self.prep, self.out_dir = backend, prep, out_dir
        spec = get_backend(backend)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.before_spawn_s = None
        if spec.before_spawn:  # e.g. the MLX conversion, kept out of the child's load time and RSS
            t0 = time.perf_counter()
            spec.before_spawn(prep.cfg, prep.model_dir)
            self.before_spawn_s = time.perf_counter() - t0
        self.started = time.time()
        cmd = child_command(backend, prep, out_dir)
        if wrap:
            cmd = [*wrap, *cmd[2:]]
        cfg, self.world = prep.cfg, prep.cfg.world_size
        if self.world > 1:  # the framework's launcher starts the ranks (ftcore.run.ranks)
            env = {**child_env(spec, rank_threads(cfg), cfg), DIST_ENV: str(self.world)}
            cmd = spec.launch(cfg, cmd, out_dir)
        else:
            env = child_env(spec, cfg.threads, cfg)
        self._go = self._done = None
        child_fds: tuple[int, ...] = ()
        if gate and self.world > 1:  # named pipes: the launcher would close inherited fds
            go_path, done_path = out_dir / "gate-go", out_dir / "gate-done"
            for path in (go_path, done_path):
                path.unlink(missing_ok=True)
                os.mkfifo(path)
            # O_RDWR: opens at once on Linux; the child's open then never waits for us
            self._go = os.fdopen(os.open(go_path, os.O_RDWR), "w")
            self._done = os.fdopen(os.open(done_path, os.O_RDWR), "r")
            env[GATE_ENV] = f"{FIFO_PREFIX}{go_path},{done_path}"
            gate = False
        if gate:
            go_read, go_write = os.pipe()
            done_read, done_write = os.pipe()
            child_fds = (go_read, done_write)
            env[GATE_ENV] = f"{go_read},{done_write}"
        self.oom_before = oom_kills()
        # stdin: a pipe (RankWatch._nudge writes mlx.launch one byte; /dev/null would spin it)
        self.proc = spawn(cmd, env, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, pass_fds=child_fds)
        self.watch = RankWatch(out_dir, self.world, self.proc.pid, self.proc.stdin) if self.world > 1 else None
        if gate:
            os.close(go_read)
            os.close(done_write)
            self._go = os.fdopen(go_write, "w")
            self._done = os.fdopen(done_read, "r")
        if on_start:
            on_start(self.proc)
        self.tail: collections.deque[str] = collections.deque(maxlen=20)
        self._reader = threading.Thread(target=self._pump, daemon=True)
        self._reader.start()

    def _pump(self) -> None:
        for line in self.proc.stderr:
            self.tail.append(line.rstrip())
            sys.stderr.write(line)
            sys.stderr.flush()

    def step(self) -> float:
        """Let the gated child run one training step; returns that step's loss once it is done."""
        try:
            self._go.write("go\n")
            self._go.flush()
            answer = self._answer()
        except BrokenPipeError:
            answer = ""
        if not answer:
            if not self.watch:
                self.proc.wait()
            last = next((ln for ln in reversed(self.tail) if ln.strip()), "no output")
            raise RuntimeError(f"{self.backend} process ended before its step ({last})")
        return float(answer.split()[1])

    def _answer(self) -> str:
        """The child's answer line; "" when it died first. Named pipes (a launcher's rank 0) never
        reach EOF, since this process holds both ends: poll the launcher (and RankWatch) instead."""
        if not self.watch:
            return self._done.readline()
        while not select.select([self._done], [], [], 0.5)[0]:
            self.watch.poll()
            # has the launcher ended? WNOWAIT: leave it for wait()'s wait4 and its rusage
            if os.waitid(os.P_PID, self.proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT):
                return ""
        return self._done.readline()

    def wait(self) -> RunResult:
        """Wait for the child to finish; its result (a failed one if it died), MFU filled in."""
        for pipe in (self._go, self._done):
            if pipe is not None:
                with contextlib.suppress(BrokenPipeError):
                    pipe.close()  # a gated child still waiting for a step gets EOF and stops
        prep, backend = self.prep, self.backend
        result_path = self.out_dir / RESULT_FILE
        _, status, rusage = self._wait4()
        self.proc.returncode = code = os.waitstatus_to_exitcode(status)
        reaped(self.proc)
        self._reader.join(timeout=5)
        # the child writes result.json atomically at its end (a failed row on a caught error,
        # exit 1); an older file from an earlier run in this folder is never taken for this one's
        fresh = result_path.exists() and result_path.stat().st_mtime >= self.started - 1
        if fresh and code in (0, 1):
            result = RunResult.from_dict(json.loads(result_path.read_text()))
        else:
            why = death_reason(-code, self.oom_before) if code < 0 else f"exited with status {code}"
            last = next((ln for ln in reversed(self.tail) if ln.strip()), "")
            result = RunResult.failed(backend, prep.cfg.to_dict(),
                                      f"{backend} process {why}" + (f": {last}" if last else ""))
            result.extra["stderr_tail"] = list(self.tail)
        result.model_sha256 = prep.model_sha256
        if self.watch:
            self._merge_ranks(result)
        if self.before_spawn_s is not None:
            result.extra["parent_prepare_s"] = self.before_spawn_s  # ~0 for a current conversion
        if result.status == "ok" and prep.cfg.device == "cpu":
            peak = gemm_peak(prep)
            result.mfu = mfu(result.real_tokens_per_s, result.flops_per_token, peak)
            if result.mfu is not None and result.mfu > 1:  # the cached peak was taken under load
                peak = gemm_peak(prep, refresh=True)
                result.mfu = mfu(result.real_tokens_per_s, result.flops_per_token, peak)
            result.extra["machine_gemm_peak_gflops"] = peak
        result.extra["process_wall_s"] = time.time() - self.started  # start-up to exit, all of it
        # the kernel's high-water mark for the child alone (KiB on Linux), beside its own figure
        result.extra["child_maxrss_mb"] = (
            rusage.ru_maxrss / 1024 if sys.platform != "darwin" else rusage.ru_maxrss / 2**20
        )
        result.write_json(result_path)
        return result

    def _wait4(self) -> tuple[int, int, object]:
        """os.wait4 on the child; for a launcher, polled, with RankWatch ending it when a rank
        died and the others hang."""
        while self.watch:
            pid, status, rusage = os.wait4(self.proc.pid, os.WNOHANG)
            if pid:
                return pid, status, rusage
            self.watch.poll()
            time.sleep(0.5)
        return os.wait4(self.proc.pid, 0)

    def _merge_ranks(self, result: RunResult) -> None:
        """Every rank's peak RSS into the result; a rank that died makes the row failed."""
        result.world_size = self.world  # a failed row too: it names the run "NAME xW"
        self.watch.kill_ranks()  # none outlives its launcher (torchrun's lead their own sessions)
        # a rank without its rank file died before its end, seen by the watch or not (a launcher
        # that ends at once after a rank's death leaves it no poll to see it)
        if dead := sorted(set(self.watch.dead) | set(merge_ranks(result, self.out_dir, self.world))):
            why = f"rank(s) {', '.join(map(str, dead))} of {self.world} died mid-run"
            result.status, result.error = "failed", f"{self.backend} {why}; {result.error or ''}".rstrip("; ")


def run_backend(
    backend: str,
    prep: Prepared,
    out_dir: Path,
    on_start: Callable[[subprocess.Popen], None] | None = None,
    wrap: list[str] | None = None,
) -> RunResult:
    """Run `backend` in its own process and return its result (see BackendProcess)."""
    return BackendProcess(backend, prep, out_dir, on_start=on_start, wrap=wrap).wait()


def compare(
    backends: list[str],
    prep: Prepared,
    out_dir: Path,
    on_start: Callable[[str, subprocess.Popen], None] | None = None,
) -> dict:
    """Run the backends one after another, each in its own process, then write the comparison
    (comparison.json, report.md, plots) into out_dir. A failed backend is a failed row. With
    cfg.nproc > 1 each backend runs at one process (out_dir/NAME) and then data-parallel
    (out_dir/NAME-xW, W ranks): the scaling and parity reference."""
    runs = [(name, prep) for name in backends]
    world = prep.cfg.world_size
    if world > 1:  # each backend at one process too: the parity and scaling-efficiency reference
        one = dataclasses.replace(prep, cfg=prep.cfg.replace(nproc=1, nnodes=1))
        runs = [run for name in backends for run in ((name, one), (name, prep))]
    results = []
    for i, (name, p) in enumerate(runs, 1):
        label = name if p.cfg.world_size == 1 else f"{name}-x{p.cfg.world_size}"
        print(f"== [{i}/{len(runs)}] {label}", file=sys.stderr, flush=True)
        hook = (lambda proc, name=name: on_start(name, proc)) if on_start else None
        results.append(run_backend(name, p, out_dir / label, on_start=hook).to_dict())
    comparison = build_comparison(results)
    write_report(comparison, out_dir)
    return comparison


def main(argv: list[str] | None = None) -> int:
    """Child entry: train one backend, write result.json; exit 1 with a failed row on error."""
    ap = argparse.ArgumentParser(prog="python -m ftcore.run.backend_process")
    ap.add_argument("--backend", required=True, choices=sorted(BACKENDS))
    ap.add_argument("--config", required=True, help="RunConfig as JSON")
    ap.add_argument("--model-dir", required=True, type=Path)
    ap.add_argument("--batches", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args(argv)
    die_with_parent()
    cfg = RunConfig.from_dict(json.loads(args.config))
    args.out.mkdir(parents=True, exist_ok=True)
    ranks = RankInfo.from_env()
    if ranks:
        announce(args.out, ranks.rank)
    with PeakRSS() as rss:
        try:
            batches = Batches.load(args.batches)
            result = get_backend(args.backend).train(cfg, args.model_dir, batches, args.out)
            code = 0
        except KeyboardInterrupt:  # SIGINT sent to this process itself: stop, quietly
            return 130
        except Diverged as e:
            result, code = e.result(args.backend, cfg.to_dict()), 1
            print(f"[{args.backend}] {result.error}", file=sys.stderr)
        except UserError as e:
            result, code = RunResult.failed(args.backend, cfg.to_dict(), str(e)), 1
        except Exception as e:  # the row says why; the traceback stays in the result for debugging
            result, code = (
                RunResult.failed(args.backend, cfg.to_dict(), f"{type(e).__name__}: {e}"),
                1,
            )
            result.traceback = traceback.format_exc()
            print(f"[{args.backend}] failed: {type(e).__name__}: {e}", file=sys.stderr)
    result.peak_rss_mb = result.peak_rss_max_rank_mb = rss.peak_mb
    result.rank_threads = result.rank_threads or result.threads  # a loop that did not say
    if ranks:  # the parent sums the ranks' peaks (ftcore.run.ranks.merge_ranks)
        write_rank_file(args.out, ranks.rank, status=result.status, peak_rss_mb=rss.peak_mb,
                        baseline_rss_mb=result.baseline_rss_mb, threads=result.rank_threads)
        if ranks.rank:
            return code
    result.write_json(args.out / RESULT_FILE)
    return code


if __name__ == "__main__":
    sys.exit(main())

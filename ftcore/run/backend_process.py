"""Parent side of one backend's run: `run_backend()` / `BackendProcess` start
`python -m ftcore.run.child ...` (ftcore.run.child) for one backend in a fresh process, stream its
progress, and return its RunResult, or a failed one with the reason when the child dies; the
parent completes the result (MFU against this machine's GEMM peak, process figures, ranks).
Inputs are checked and the shared batches written once before, by ftcore.run.preflight.prepare.
"""

from __future__ import annotations

import collections
import json
import os
import select
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from ftcore.backends import FRAMEWORK_ENVS, BackendSpec, get_backend
from ftcore.config import RunConfig
from ftcore.inputs.arch import read_arch
from ftcore.measure.gemm_peak import machine_gemm_peak
from ftcore.measure.mfu import achieved_gflops, record_mfu
from ftcore.process.ranks import DIST_ENV, LAUNCHER_LOGS_DIR, rank_threads
from ftcore.result import RunResult
from ftcore.run.child import RESULT_FILE
from ftcore.run.parent_gate import ParentGate
from ftcore.run.preflight import Prepared
from ftcore.run.procs import death_reason, oom_kills, reaped, spawn
from ftcore.run.rank_watch import RankWatch, merge_ranks, prune_empty_dirs
from ftcore.run.training_health import adapter_problem, collapsed

CHILD_MODULE = "ftcore.run.child"
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


def gemm_peak(
    prep: Prepared, shapes: list | None = None, at_least: float | None = None
) -> float | None:
    """This machine's GEMM peak for the run (a large square and the run's own GEMM shapes: the
    child's, else made here the same way), each framework probed in its backends' environment;
    re-measured when below `at_least` GFLOP/s (ftcore.measure.gemm_peak.machine_gemm_peak)."""
    from ftcore.measure.flops import gemm_shapes

    cfg = prep.cfg
    envs = {fw: make(base_env(), cfg.threads) for fw, make in FRAMEWORK_ENVS.items()}
    if shapes is None:
        shapes = gemm_shapes(
            read_arch(prep.model_dir), cfg.batch_size, prep.batches.seq_len, cfg.threads
        )
    return machine_gemm_peak(
        cfg.precision, envs, shapes=tuple(map(tuple, shapes)), at_least=at_least
    )


def child_command(backend: str, prep: Prepared, out_dir: Path) -> list[str]:
    return [
        sys.executable, "-m", CHILD_MODULE,
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
    asks for it (ftcore.process.step_gate), so a caller can time steps one at a time; call `step()`
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
        if self.world > 1:  # the framework's launcher starts the ranks (ftcore.process.ranks)
            env = {**child_env(spec, rank_threads(cfg), cfg), DIST_ENV: str(self.world)}
            cmd = spec.launch(cfg, cmd, out_dir)
        else:
            env = child_env(spec, cfg.threads, cfg)
        self.gate = ParentGate(out_dir, self.world, env) if gate else None
        self.oom_before = oom_kills()
        # stdin: a pipe (RankWatch._nudge writes mlx.launch one byte; /dev/null would spin it)
        self.proc = spawn(cmd, env, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True,
                          pass_fds=self.gate.child_fds if self.gate else ())
        self.watch = (
            RankWatch(out_dir, self.world, self.proc.pid, self.proc.stdin)
            if self.world > 1
            else None
        )
        if self.gate:
            self.gate.spawned()
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
            self.gate.go()
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
        done = self.gate.done
        if not self.watch:
            return done.readline()
        while not select.select([done], [], [], 0.5)[0]:
            self.watch.poll()
            # has the launcher ended? WNOWAIT: leave it for wait()'s wait4 and its rusage
            if os.waitid(os.P_PID, self.proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT):
                return ""
        return done.readline()

    def wait(self) -> RunResult:
        """Wait for the child to finish; its result (a failed one if it died), MFU filled in."""
        if self.gate:
            self.gate.close()  # a gated child still waiting for a step gets EOF and stops
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
        if result.status == "ok":  # every backend held to one rule: it learned, and sanely
            vocab = read_arch(prep.model_dir)["vocab_size"]
            reason = collapsed(result.losses, vocab)
            problem = adapter_problem(self.out_dir / "adapter") or (
                ("diverged", reason) if reason else None
            )
            if problem:
                result.status, result.error = problem
        if self.before_spawn_s is not None:
            result.extra["parent_prepare_s"] = self.before_spawn_s  # ~0 for a current conversion
        machine_peak = None
        if result.status == "ok" and prep.cfg.device == "cpu":
            # a cached peak below what this run achieved was taken under load: re-measured
            machine_peak = gemm_peak(
                prep, result.extra.get("gemm_shapes"), at_least=achieved_gflops(result)
            )
            result.extra["machine_gemm_peak_gflops"] = machine_peak
        record_mfu(result, machine_peak)
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
        """After a launcher: no rank left running, its empty log tree gone, every rank's peak RSS
        in the result; a rank that died makes the row failed."""
        result.world_size = self.world  # a failed row too: it names the run "NAME xW"
        self.watch.kill_ranks()  # none outlives its launcher (torchrun's lead their own sessions)
        prune_empty_dirs(self.out_dir / LAUNCHER_LOGS_DIR)
        # a rank without its rank file died before its end, seen by the watch or not (a launcher
        # that ends at once after a rank's death leaves it no poll to see it)
        if dead := sorted(
            set(self.watch.dead) | set(merge_ranks(result, self.out_dir, self.world))
        ):
            why = f"rank(s) {', '.join(map(str, dead))} of {self.world} died mid-run"
            result.status, result.error = (
                "failed",
                f"{self.backend} {why}; {result.error or ''}".rstrip("; "),
            )


def run_backend(
    backend: str,
    prep: Prepared,
    out_dir: Path,
    on_start: Callable[[subprocess.Popen], None] | None = None,
    wrap: list[str] | None = None,
) -> RunResult:
    """Run `backend` in its own process and return its result (see BackendProcess)."""
    return BackendProcess(backend, prep, out_dir, on_start=on_start, wrap=wrap).wait()

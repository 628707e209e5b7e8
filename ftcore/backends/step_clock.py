"""What every training loop does around each step (StepClock), and the stop on a NaN/Inf loss or
gradient norm (Diverged)."""

from __future__ import annotations

import hashlib
import math
import sys
import time
from typing import Any

import numpy as np

from ftcore.backends.progress import Progress
from ftcore.backends.run_context import BackendRun
from ftcore.measure.machine_load import MachineLoad, busy_warning
from ftcore.process.ranks import sibling_pids
from ftcore.process.step_gate import StepGate
from ftcore.result import RunResult


class Diverged(Exception):
    """A step's loss or gradient norm is NaN or Inf: the run stops there with status `diverged`
    (raised by StepClock.end, turned into the result by the runner's child)."""

    def __init__(self, step: int, what: str, value: float, losses: list[float], times: list[float]):
        super().__init__(f"diverged at step {step + 1}: {what} is {value}")
        self.losses, self.times = losses, times

    def result(self, backend: str, config: dict) -> RunResult:
        r = RunResult(backend=backend, status="diverged", error=str(self), config=config,
                      losses=self.losses, step_times_s=self.times)  # fmt: skip
        r.steps = len(self.losses)
        return r


class StepClock:
    """What every training loop does around a step: wait for the step gate
    (ftcore.process.step_gate), time the step, answer the gate, print progress, and measure the
    machine's load from other processes over the timed steps (ftcore.measure.machine_load).

        clock.begin(i); <the step, ending at a sync point>; clock.end(i, loss, grad_norm)
        ... after the last step: clock.stop()

    Numerical health: `end` raises Diverged when the loss or the gradient norm (the loops that
    own their step pass it; the hf-trainer and mlx-lm trainers do not expose it per step, so only
    their loss is checked) is not finite.
    """

    def __init__(self, run: BackendRun) -> None:
        self.run, self.cfg, self.batches, rank = run, run.cfg, run.batches, run.rank
        self.gate = StepGate(
            {} if rank else None
        )  # ranks > 0 follow rank 0 through the collectives
        self.load = MachineLoad(sibling_pids)
        self.progress = Progress(run.backend, run.cfg.steps, quiet=rank > 0)
        self.times: list[float] = []
        self.lrs: list[float] = []
        self.losses: list[float] = []
        self.targets: list[int] = []  # this process's loss targets, per step (given to `end`)
        self.grad_norms: list[float] = []
        self._fed = hashlib.sha256()
        self._t = self._cpu = 0.0
        self.cpu_times: list[float] = []  # CPU seconds of all this process's threads, per step

    def feed(self, input_ids: Any) -> None:
        """Hash the token ids (B, L) the loop really feeds the model this step
        (numpy-convertible)."""
        ids = np.ascontiguousarray(np.asarray(input_ids), dtype=np.int64)
        self._fed.update(str(ids.shape).encode())
        self._fed.update(ids.tobytes())

    def lr(self, value: float) -> None:
        """The learning rate this step's update uses, read from the optimizer."""
        self.lrs.append(float(value))

    def begin(self, step: int) -> None:
        self.gate.before(step)
        if step == self.cfg.timing_warmup_steps:
            self.load.start()
        self._cpu = time.process_time()
        self._t = time.perf_counter()

    def end(
        self,
        step: int,
        loss: float,
        seconds: float | None = None,
        grad_norm: float | None = None,
        targets: int | None = None,
    ) -> None:
        """`seconds`: the step's time when the loop measured it itself (mlx-lm's trainer);
        `grad_norm`: before clipping; `targets`: the target tokens of the rows this process fed."""
        self.times.append(time.perf_counter() - self._t if seconds is None else seconds)
        if seconds is None:  # the step ran between begin and end: its CPU time is this process's
            self.cpu_times.append(time.process_time() - self._cpu)
        self.losses.append(loss)
        if grad_norm is not None:
            self.grad_norms.append(grad_norm)
        if targets is not None:
            self.targets.append(targets)
        if not math.isfinite(loss):
            raise Diverged(step, "the loss", loss, self.losses, self.times)
        if grad_norm is not None and not math.isfinite(grad_norm):
            raise Diverged(step, "the gradient norm", grad_norm, self.losses, self.times)
        self.gate.after(step, loss)
        w = self.cfg.timing_warmup_steps
        timed = self.times[w:]
        tps = self.batches.step_tokens(w, len(self.times))["fed"] / sum(timed) if timed else None
        self.progress.update(step, loss, tps)

    def stop(self) -> None:
        """Record the steps' losses, what they fed and used (token ids, learning rates) and the
        load of the machine over the timed steps; a busy machine is a warning."""
        result = self.run.result
        result.fed_batches_fingerprint = self._fed.hexdigest()[:16]
        timed = slice(self.cfg.timing_warmup_steps, None)
        if len(self.cpu_times) == len(self.times) and sum(self.times[timed]) > 0:
            # threads kept busy over the timed steps (for MLX: do its row streams overlap?)
            result.cpu_busy_threads = sum(self.cpu_times[timed]) / sum(self.times[timed])
        if result.optimizer:
            result.optimizer["lr_per_step"] = list(self.lrs)
        result.losses, result.step_targets = list(self.losses), list(self.targets)
        result.grad_norms = list(self.grad_norms)
        record = result.machine_load = self.load.stop()
        if (warning := busy_warning(record)) and not self.progress.quiet:
            print(f"[{result.backend}] {warning}", file=sys.stderr, flush=True)
            result.warn(warning)

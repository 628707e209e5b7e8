"""Step gate: a parent process times a backend's training steps one at a time.

The benchmark suite starts one backend process per case (ftcore.run.backend_process.BackendProcess
with gate=True; its channels: ParentGate). That process loads once and then, before each training
step, waits for a "go" line from the parent on a pipe, and after the step's results are materialised
(loss.item(), mx.eval) answers with one line. The parent's timed call is "send go, read the answer",
so what pytest-benchmark times and compares is one training step, not interpreter start-up, imports
and model load.

Without FTCORE_STEP_GATE in the environment (every ordinary run) the gate does nothing.
"""

from __future__ import annotations

import os

GATE_ENV = "FTCORE_STEP_GATE"  # "<fd to read go from>,<fd to write done to>", set by the runner
# or "fifo:<go path>,<done path>": launchers (torchrun, mlx.launch) close inherited fds, so a
# data-parallel run's rank 0 opens two named pipes instead (the other ranks follow it)
FIFO_PREFIX = "fifo:"


class StepGate:
    """Child side. Call before(step) right before a step starts and after(step, loss) once it has
    finished; both are no-ops unless the runner opened a gate."""

    def __init__(self, env: dict | None = None) -> None:
        spec = (os.environ if env is None else env).get(GATE_ENV)
        self._in = self._out = None
        if spec and spec.startswith(FIFO_PREFIX):
            go, done = spec[len(FIFO_PREFIX) :].split(",")
            self._in, self._out = open(go), open(done, "w")  # noqa: SIM115 (open for the run)
        elif spec:
            read_fd, write_fd = (int(v) for v in spec.split(","))
            self._in = os.fdopen(read_fd, "r")
            self._out = os.fdopen(write_fd, "w")

    @property
    def active(self) -> bool:
        return self._in is not None

    def before(self, step: int) -> None:
        if self._in is None:
            return
        line = self._in.readline()
        if line.strip() != "go":  # the parent closed the pipe or sent something else: stop here
            raise RuntimeError(f"step gate: expected 'go' before step {step}, got {line!r}")

    def after(self, step: int, loss: float) -> None:
        if self._out is None:
            return
        self._out.write(f"{step} {loss!r}\n")
        self._out.flush()

"""Step gate: a parent process times a backend's training steps one at a time.

The benchmark suite starts one backend process per case (ftcore.run.backend_process.BackendProcess
with gate=True; its channels: ParentGate). That process loads once and then, before each training step, waits for a "go" line
from the parent on a pipe, and after the step's results are materialised (loss.item(), mx.eval)
answers with one line. The parent's timed call is "send go, read the answer", so what
pytest-benchmark times and compares is one training step, not interpreter start-up, imports and
model load.

Without FTCORE_STEP_GATE in the environment (every ordinary run) the gate does nothing.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

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


class ParentGate:
    """Parent side: the two channels to a gated child. One process: two anonymous pipes whose
    child ends it inherits (`child_fds`, passed to spawn). A launcher (world > 1) closes inherited
    fds, so its rank 0 opens two named pipes in out_dir instead.

        gate = ParentGate(out_dir, world, env)   # sets env[GATE_ENV]
        proc = spawn(..., pass_fds=gate.child_fds); gate.spawned()
        gate.go(); gate.answer_ready(...) / gate.read_answer(); ...; gate.close()
    """

    def __init__(self, out_dir: Path, world: int, env: dict[str, str]) -> None:
        self.named = world > 1
        self.child_fds: tuple[int, ...] = ()
        if self.named:
            go_path, done_path = out_dir / "gate-go", out_dir / "gate-done"
            for path in (go_path, done_path):
                path.unlink(missing_ok=True)
                os.mkfifo(path)
            # O_RDWR: opens at once on Linux; the child's open then never waits for us
            self._go = os.fdopen(os.open(go_path, os.O_RDWR), "w")
            self._done = os.fdopen(os.open(done_path, os.O_RDWR), "r")
            env[GATE_ENV] = f"{FIFO_PREFIX}{go_path},{done_path}"
        else:
            go_read, self._go_write = os.pipe()
            self._done_read, done_write = os.pipe()
            self.child_fds = (go_read, done_write)
            env[GATE_ENV] = f"{go_read},{done_write}"
            self._go = self._done = None

    def spawned(self) -> None:
        """After the child started: close our copies of its ends, open ours."""
        if not self.named:
            for fd in self.child_fds:
                os.close(fd)
            self._go = os.fdopen(self._go_write, "w")
            self._done = os.fdopen(self._done_read, "r")

    def go(self) -> None:
        """Let the child run one step (BrokenPipeError when it is gone)."""
        self._go.write("go\n")
        self._go.flush()

    @property
    def done(self):
        """The answer channel: one line per step, `STEP LOSS`."""
        return self._done

    def close(self) -> None:
        """A gated child still waiting for a step gets EOF and stops."""
        for pipe in (self._go, self._done):
            if pipe is not None:
                with contextlib.suppress(BrokenPipeError):
                    pipe.close()

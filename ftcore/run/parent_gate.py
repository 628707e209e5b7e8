"""The step gate's parent side (ftcore.process.step_gate has the whole story and the child side):
the two channels to a gated backend process, and the "go" / answer of each timed step."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from ftcore.process.step_gate import FIFO_PREFIX, GATE_ENV


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

"""The progress line a training loop prints on stderr while it runs."""

from __future__ import annotations

import sys
import time


class Progress:
    """One status line on stderr: a live line on a terminal, a line every ~10% otherwise."""

    def __init__(self, backend: str, total: int, quiet: bool = False) -> None:
        self.backend, self.total, self.quiet = backend, total, quiet
        self.tty = sys.stderr.isatty()
        self.t0 = time.perf_counter()

    def update(self, step: int, loss: float, tokens_per_s: float | None) -> None:
        done = step + 1
        if self.quiet:
            return
        if not self.tty and done != self.total and done % max(1, self.total // 10):
            return
        tps = f"{tokens_per_s:8.1f} tok/s" if tokens_per_s else "    warm-up"
        elapsed = time.perf_counter() - self.t0
        line = (f"[{self.backend}] step {done:>4}/{self.total}  loss {loss:.4f}  {tps}  "
                f"{elapsed:6.1f}s")
        print(
            ("\r" + line) if self.tty else line,
            end="" if self.tty and done < self.total else "\n",
            file=sys.stderr,
            flush=True,
        )

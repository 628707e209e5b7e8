"""One backend's training run inside its own process: the one object a loop and the shared helpers
(result_fields, step_clock, eval_schedule, torch_common) take instead of (cfg, batches, result,
out_dir, ...) bundles."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ftcore.config import RunConfig
from ftcore.inputs.batches import Batches
from ftcore.process.ranks import RankInfo
from ftcore.result import RunResult


@dataclass
class BackendRun:
    """Made by BackendSpec.train in the child (ftcore.run.child); `result` is set by
    result_fields.start_result and filled by the loop. `cfg` may be replaced by the loop (a rank's
    own thread count) after the result recorded the run's config."""

    backend: str  # its name (BackendSpec.name)
    framework: str  # "torch" | "mlx": whose BLAS and GEMM peak this process probes
    cfg: RunConfig
    model_dir: Path
    batches: Batches
    out_dir: Path
    ranks: RankInfo | None = None  # under a launcher (ftcore.process.ranks); None: one process
    result: RunResult | None = None

    @property
    def rank(self) -> int:
        return self.ranks.rank if self.ranks else 0

    @property
    def lead(self) -> bool:
        """One process, or rank 0 of several: the process that evaluates and saves."""
        return self.rank == 0

"""`ftcore compare`: every backend run several times, each run a fresh process, interleaved
(round r: A then B; round r+1: B then A, so drift and background load hit both alike), on the same
batches; then the comparison report with its verdict (ftcore.report.verdict).

How many runs (Schedule): `repeats` fixed, or adaptive (one run when there is one backend, nothing
to compare it with): at least MIN_RUNS runs a backend, then more rounds while the speed verdict is
undecided, as long as another round (as long as the last one took) fits in `time_budget_s`. A run
whose timed steps were BUSY (another process took the CPU) is left out of the statistics and made up
for by another round while the budget lasts. A failed run stops the rounds: that backend's row is
failed. One-time costs (MLX building its kernels, the GEMM-peak probe) happen in the first round,
outside every timed step.

Folders: OUT/<label>/ holds a backend's first run (result.json, adapter/), OUT/<label>/repeats/<k>/
its k-th (k >= 2). A backend named twice (`--backends torch,torch`: an A/A run, this machine's
noise) is labelled `torch` and `torch#2`.
"""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ftcore.config import UserError
from ftcore.report import build_comparison, write_report
from ftcore.report.verdict import judge, usable
from ftcore.run.backend_process import run_backend
from ftcore.run.preflight import Prepared

MIN_RUNS = 3  # adaptive mode: runs a backend before the verdict may stop the rounds
MAX_ROUNDS = 30  # adaptive mode: never more, whatever the budget
DEFAULT_TIME_BUDGET_S = 45.0  # the default compare: 3 rounds of ~16 s here, ~55 s in all


@dataclass(frozen=True)
class Schedule:
    """How many runs: `repeats` fixed (None: adaptive) and the wall-time budget for the rounds
    beyond the minimum (MIN_RUNS, or `repeats`)."""

    repeats: int | None = None
    time_budget_s: float = DEFAULT_TIME_BUDGET_S

    @classmethod
    def checked(cls, repeats: int | None, time_budget_s: float) -> Schedule:
        """From the flags; a bad value is a UserError (one line)."""
        if repeats is not None and repeats < 1:
            raise UserError(f"--repeats: must be >= 1, not {repeats}")
        if not math.isfinite(time_budget_s) or time_budget_s < 0:
            raise UserError(
                f"--time-budget-s: must be a finite number of seconds >= 0, not {time_budget_s}"
            )
        return cls(repeats, time_budget_s)

    @property
    def min_rounds(self) -> int:
        return self.repeats or MIN_RUNS

    def another_round(self, repeats: dict[str, list[dict]], rounds: int, elapsed_s: float,
                      last_round_s: float) -> bool:
        """After `rounds` rounds: run one more? Never after a failed run; always up to the
        minimum; beyond it only while a backend has fewer usable (ok, not BUSY) runs than the
        minimum or (adaptive) the speed verdict is undecided, and the next round fits the budget."""
        if any(r.get("status") != "ok" for runs in repeats.values() for r in runs):
            return False
        if self.repeats is None and len(repeats) < 2:  # one backend: no verdict to decide
            return False
        if rounds < self.min_rounds:
            return True
        if rounds >= (MAX_ROUNDS if self.repeats is None else 2 * self.repeats):
            return False
        if elapsed_s + last_round_s > self.time_budget_s:
            return False
        short = any(len(usable(runs)) < self.min_rounds for runs in repeats.values())
        if short or self.repeats is not None:
            return short
        labels = list(repeats)
        ref = labels[0]
        return any(judge("speed", ref, b, repeats[ref], repeats[b])["outcome"] == "undecided"
                   for b in labels[1:])


def labels_for(backends: list[str]) -> list[str]:
    """Row labels: a backend named again gets `#k` (torch, torch#2)."""
    out = []
    for name in backends:
        k = backends[: len(out)].count(name) + 1
        out.append(name if k == 1 else f"{name}#{k}")
    return out


def run_dir(out_dir: Path, label: str, k: int) -> Path:
    """Where a label's k-th run writes (k from 1)."""
    return out_dir / label if k == 1 else out_dir / label / "repeats" / str(k)


def compare(
    backends: list[str],
    prep: Prepared,
    out_dir: Path,
    on_start: Callable[[str, subprocess.Popen], None] | None = None,
    schedule: Schedule = Schedule(),
    note: str | None = None,
) -> dict:
    """Run the backends in interleaved rounds (Schedule), each run in its own process, then write
    the comparison (comparison.json with its verdict, report.md, plots) into out_dir. With
    cfg.nproc > 1 each backend runs at one process (label NAME) and data-parallel (NAME-xW, W
    ranks) in every round: the scaling and parity reference. `note`: what the answer must say
    about how it was made (ftcore.run.size_defaults), comparison["size_note"]."""
    # (folder, row label, backend, prepared run): folder = label, or label-xW for W ranks
    sides = [
        (label, label, name, prep)
        for label, name in zip(labels_for(backends), backends, strict=True)
    ]
    world = prep.cfg.world_size
    if world > 1:  # each backend at one process too: the parity and scaling-efficiency reference
        one = dataclasses.replace(prep, cfg=prep.cfg.replace(nproc=1, nnodes=1))
        sides = [s for label, _, name, _ in sides
                 for s in ((label, label, name, one), (f"{label}-x{world}", label, name, prep))]
    repeats: dict[str, list[dict]] = {folder: [] for folder, *_ in sides}
    started, rounds, last_round_s = time.monotonic(), 0, 0.0
    while True:
        t0 = time.monotonic()
        for folder, label, name, p in sides if rounds % 2 == 0 else sides[::-1]:
            k = len(repeats[folder]) + 1
            print(
                f"== [round {rounds + 1}] {folder}" + (f" (run {k})" if k > 1 else ""),
                file=sys.stderr,
                flush=True,
            )
            hook = (lambda proc, name=name: on_start(name, proc)) if on_start else None
            result = run_backend(name, p, run_dir(out_dir, folder, k), on_start=hook).to_dict()
            # the row's name (torch#2); its result.json keeps the backend's
            result["backend"] = label
            repeats[folder].append(result)
        rounds, last_round_s = rounds + 1, time.monotonic() - t0
        if not schedule.another_round(repeats, rounds, time.monotonic() - started, last_round_s):
            break
    comparison = build_comparison(representatives(repeats), repeats=list(repeats.values()))
    comparison["schedule"] = {"repeats": schedule.repeats, "time_budget_s": schedule.time_budget_s,
                              "rounds": rounds, "repeats_wall_s": time.monotonic() - started}
    comparison["size_note"] = note
    write_report(comparison, out_dir)
    return comparison


def representatives(repeats: dict[str, list[dict]]) -> list[dict]:
    """One result per label for the rows: its first failed run if one failed (the row says why),
    else its first run (losses, evals and settings are the same in every repeat)."""
    out = []
    for runs in repeats.values():
        bad = [(k, r) for k, r in enumerate(runs, 1) if r.get("status") != "ok"]
        if bad and bad[0][0] > 1:  # an earlier run was ok: say which one failed
            k, r = bad[0]
            out.append({**r, "error": f"run {k} of {len(runs)}: {r.get('error')}"})
        else:
            out.append(bad[0][1] if bad else runs[0])
    return out

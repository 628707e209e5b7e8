"""`ftcore bench-diff BASE [HEAD]`: a same-machine A/B comparison of two revisions' training steps.

Each revision runs its own code: BASE (and HEAD, when given) is checked out in a temporary git
worktree, HEAD defaults to the working tree, and each benchmark process runs `python -m ftcore run`
with that tree first on its import path (and a model cache of its own). The installed ftcore only
orchestrates. Runs are interleaved on this machine in one job (round r runs A then B, the next
round B then A), so drift and background load hit both sides alike.

Statistics, per case (ftcore.measure.stats, shared with `ftcore compare`): the unit of replication
is one process (a run): its sample is the median of its timed step times. ratio = median of HEAD's
run medians / median of BASE's, with a 95% interval from a two-level bootstrap and the p-value of a
two-sided Mann-Whitney U test on the run medians. A case is "slower" only when the ratio exceeds
1 + threshold *and* p < ALPHA; the command then exits 1. Fewer runs a side than
smallest_runs_for(ALPHA) (4) could never reach p < ALPHA, so they are refused.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ftcore.config import RunConfig, UserError
from ftcore.files import write_json_atomic
from ftcore.measure.machine_load import MachineLoad
from ftcore.measure.stats import ALPHA, compare_runs, smallest_runs_for
from ftcore.run.bench_cases import Case, build_cases, matches


def summarise(runs_a: list[list[float]], runs_b: list[list[float]], threshold: float) -> dict:
    """The comparison of one case from each side's per-run timed step times (seconds)."""
    med_a = [float(np.median(r)) for r in runs_a]
    med_b = [float(np.median(r)) for r in runs_b]
    s = compare_runs(runs_a, runs_b)
    if s.ratio > 1 + threshold and s.p_value < ALPHA:
        verdict = "slower"
    elif s.ratio < 1 / (1 + threshold) and s.p_value < ALPHA:
        verdict = "faster"
    else:
        verdict = "same"
    return {
        "base_step_s": float(np.median(med_a)),
        "head_step_s": float(np.median(med_b)),
        "ratio": s.ratio,
        "ci95": [s.ci_low, s.ci_high],
        "p_value": s.p_value,
        "verdict": verdict,
        "base_run_medians_s": med_a,
        "head_run_medians_s": med_b,
    }


@dataclass
class Side:
    label: str
    rev: str  # what the user named ("working tree" for HEAD by default)
    root: Path  # the tree whose ftcore runs
    cache: Path
    runs: dict[str, list[list[float]]] = field(default_factory=dict)  # case id -> per-run steps
    busy: list[str] = field(default_factory=list)


def _git(repo: Path, *args: str) -> str:
    out = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True)
    if out.returncode != 0:
        why = (out.stderr.strip().splitlines() or [f"exit {out.returncode}"])[-1]
        raise UserError(f"git {' '.join(args)}: {why}")
    return out.stdout.strip()


def run_once(side: Side, case: Case, warmup: int, timed: int, out: Path) -> list[float]:
    """One `ftcore run` of `case` with `side`'s code; its timed step times (s)."""
    env = {
        **os.environ,
        "FTCORE_CACHE": str(side.cache),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(side.root), os.environ.get("PYTHONPATH")])),
    }
    knows_batching = "BATCHINGS" in (side.root / "ftcore" / "config.py").read_text()
    cmd = [sys.executable, "-m", "ftcore", "run", *case.run_args(warmup, timed, knows_batching),
           "--out", str(out)]
    load = MachineLoad()
    load.start()
    proc = subprocess.run(cmd, cwd=side.root, env=env, capture_output=True, text=True, timeout=3600)
    record = load.stop()
    if record and record.get("busy"):
        side.busy.append(f"{case.id}: {record['reason']}")
    result_file = out / "result.json"
    if proc.returncode != 0 or not result_file.exists():
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(
            f"{side.label} ({side.rev}) {case.id} failed (exit {proc.returncode}): {last}"
        )
    result = json.loads(result_file.read_text())
    steps = result["step_times_s"][warmup:]
    if len(steps) != timed:
        raise RuntimeError(f"{side.label} {case.id}: {len(steps)} timed steps, expected {timed}")
    return steps


def format_table(rows: list[dict], base: str, head: str, threshold: float) -> str:
    lines = [
        f"bench-diff: HEAD {head} vs BASE {base}; step time, median over runs of each run's "
        f"median; slower = ratio > {1 + threshold:.2f} and p < {ALPHA}",
        f"{'case':<34} {'BASE ms':>9} {'HEAD ms':>9} {'ratio':>7} {'95% CI':>15} {'p':>7}  verdict",
    ]
    for r in rows:
        lo, hi = r["ci95"]
        lines.append(
            f"{r['case']:<34} {1e3 * r['base_step_s']:>9.2f} {1e3 * r['head_step_s']:>9.2f} "
            f"{r['ratio']:>7.3f} {f'[{lo:.3f}, {hi:.3f}]':>15} {r['p_value']:>7.4f}  "
            f"{r['verdict'].upper() if r['verdict'] == 'slower' else r['verdict']}"
        )
    return "\n".join(lines)


@dataclass(frozen=True)
class DiffPlan:
    """What `ftcore bench-diff` compares: two revisions (head None: the working tree), the cases
    (sizes x backends, filtered by -k `expr`), runs per side, steps per run, the slower threshold
    and where the JSON goes."""

    base: str
    head: str | None
    expr: str | None
    threshold: float
    runs: int
    warmup: int
    timed: int
    sizes: list[str]
    json_path: Path | None
    backends: list[str]


def check_plan(plan: DiffPlan) -> list[Case]:
    """The plan's cases, once every flag is checked (UserError): before any run, so a mistake is
    said at once and not after minutes of runs."""
    threshold, runs, warmup, timed, json_path = (
        plan.threshold,
        plan.runs,
        plan.warmup,
        plan.timed,
        plan.json_path,
    )
    fewest = smallest_runs_for(ALPHA)
    if not math.isfinite(threshold) or threshold < 0:
        raise UserError(f"bench-diff: --threshold must be a finite fraction >= 0, not {threshold}")
    if runs < fewest:
        raise UserError(
            f"bench-diff: --runs {runs} can never be significant: with n runs a side the exact "
            f"U test's smallest p-value is 2/C(2n, n), below {ALPHA} only from {fewest} runs"
        )
    if timed < 1 or warmup < 0:
        raise UserError("bench-diff: --timed-steps >= 1, --warmup-steps >= 0")
    if json_path is not None and (json_path.is_dir() or not json_path.parent.is_dir()):
        # checked before the runs: it was once refused only after 88 s of them
        why = (
            "is a folder" if json_path.is_dir() else f"its folder {json_path.parent} does not exist"
        )
        raise UserError(f"bench-diff: --json {json_path}: {why}; name a file to write")
    lr_warmup = RunConfig().warmup_steps  # each run is `ftcore run` with the default LR warm-up
    if warmup + timed < lr_warmup:
        raise UserError(
            f"bench-diff: --warmup-steps {warmup} + --timed-steps {timed} is {warmup + timed} "
            f"steps; each run needs at least {lr_warmup} (its learning-rate warm-up)"
        )
    try:
        cases = [
            c
            for c in build_cases(plan.sizes, plan.backends, None, None)
            if matches(plan.expr, c.id)
        ]
    except ValueError as e:
        raise UserError(str(e)) from None
    if not cases:
        raise UserError(f"bench-diff: no case matches -k {plan.expr!r}")
    return cases


def _side(label: str, rev: str | None, repo: Path, tmp: Path, trees: list[Path]) -> Side:
    """One side of the A/B: the working tree (rev None) or `rev` checked out in a temporary
    worktree under `tmp` (appended to `trees`, which the caller removes)."""
    if rev is None:
        return Side(label, "working tree", repo, tmp / f"cache-{label.lower()}")
    sha = _git(repo, "rev-parse", "--verify", f"{rev}^{{commit}}")
    root = tmp / label.lower()
    _git(repo, "worktree", "add", "--detach", "--quiet", str(root), sha)
    trees.append(root)
    return Side(label, f"{rev} ({sha[:10]})", root, tmp / f"cache-{label.lower()}")


def bench_diff(plan: DiffPlan) -> int:
    """Run the comparison and print the table; 1 when a case is slower, else 0."""
    cases = check_plan(plan)
    base, head, threshold, runs = plan.base, plan.head, plan.threshold, plan.runs
    warmup, timed, json_path = plan.warmup, plan.timed, plan.json_path
    repo = Path(_git(Path.cwd(), "rev-parse", "--show-toplevel"))
    # a kill (SIGTERM) unwinds like Ctrl-C does, so the worktrees below are always removed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    tmp = Path(tempfile.mkdtemp(prefix="ftcore-bench-diff-"))
    trees: list[Path] = []
    try:
        sides = [_side("BASE", base, repo, tmp, trees), _side("HEAD", head, repo, tmp, trees)]
        started = time.monotonic()
        for r in range(runs):
            for side in sides if r % 2 == 0 else sides[::-1]:
                for case in cases:
                    print(f"bench-diff: run {r + 1}/{runs} {side.label} {case.id}", file=sys.stderr,
                          flush=True)
                    out = tmp / "out" / side.label / str(r) / case.id
                    side.runs.setdefault(case.id, []).append(
                        run_once(side, case, warmup, timed, out)
                    )
        rows = [{"case": c.id, **summarise(sides[0].runs[c.id], sides[1].runs[c.id], threshold)}
                for c in cases]
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        for tree in trees:
            subprocess.run(
                ["git", "worktree", "remove", "--force", str(tree)], cwd=repo, capture_output=True
            )
        shutil.rmtree(tmp, ignore_errors=True)
    print(format_table(rows, sides[0].rev, sides[1].rev, threshold))
    for side in sides:
        for line in side.busy:
            print(f"warning: {side.label} run on a busy machine: {line}")
    elapsed = time.monotonic() - started
    print(
        f"{len(cases)} case(s) x {runs} runs per side, {timed} timed steps per run, {elapsed:.0f} s"
    )
    if json_path:
        write_json_atomic(
            json_path,
            {
                "base": sides[0].rev,
                "head": sides[1].rev,
                "threshold": threshold,
                "alpha": ALPHA,
                "runs": runs,
                "warmup_steps": warmup,
                "timed_steps": timed,
                "elapsed_s": elapsed,
                "cases": rows,
                "busy": {s.label: s.busy for s in sides},
            },
        )
    return 1 if any(r["verdict"] == "slower" for r in rows) else 0

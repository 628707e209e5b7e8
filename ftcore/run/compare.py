"""`ftcore compare`: the backends one after another, each in its own process
(ftcore.run.backend_process), then the comparison report."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from ftcore.report import build_comparison, write_report
from ftcore.run.backend_process import run_backend
from ftcore.run.preflight import Prepared


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

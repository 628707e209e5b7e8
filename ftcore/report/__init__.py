"""The comparison report: comparison.json, report.md, the printed table and the plots.

comparison.build_comparison (rows, ratios, loss differences, environment) -> fairness (same inputs
and settings?) -> table (grid and markdown), console (the short printed answer) and plots (PNG);
write_report writes the files. sweep_report: `ftcore sweep`'s table, crossover sentence and plot.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ftcore.files import jsonable, write_atomic
from ftcore.report.comparison import build_comparison, max_loss_diff
from ftcore.report.console import SHORT_ROWS, format_run, format_short
from ftcore.report.fairness import fairness_checks
from ftcore.report.footnotes import FOOTNOTES
from ftcore.report.plots import plots
from ftcore.report.rows import TABLE_ROWS
from ftcore.report.table import format_table, markdown

__all__ = [
    "FOOTNOTES", "SHORT_ROWS", "TABLE_ROWS", "build_comparison", "fairness_checks", "format_run",
    "format_short", "format_table", "max_loss_diff", "write_report",
]


def write_report(comparison: dict[str, Any], out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Write report.md, comparison.json and the three PNG plots into out_dir; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"report": out / "report.md", "comparison": out / "comparison.json"}
    text = json.dumps(jsonable(comparison), indent=2, allow_nan=False) + "\n"
    write_atomic(paths["comparison"], text.encode())
    for stem, png in plots(comparison).items():
        paths[stem] = out / f"{stem}.png"
        write_atomic(paths[stem], png)
    write_atomic(paths["report"], markdown(comparison).encode())  # last: it links the others
    return paths

"""`ftcore profile`: one backend's run under memray, then its flamegraph (HTML that opens offline)
and the top allocation sites (PNG), from ftcore.report.flamegraph."""

from __future__ import annotations

import sys
from pathlib import Path

from ftcore.report import format_run
from ftcore.result import RunResult
from ftcore.run.backend_process import run_backend
from ftcore.run.preflight import Prepared


def profile(backend: str, prep: Prepared, out: Path, native: bool) -> tuple[RunResult, list[str]]:
    """The result, and the lines to print (none when the run failed)."""
    capture = out / f"memray-{backend}.bin"
    wrap = [
        sys.executable,
        "-m",
        "memray",
        "run",
        "-q",
        *(["--native"] if native else []),
        "-o",
        str(capture),
        "-m",
    ]
    result = run_backend(backend, prep.save(out), out, wrap=wrap)
    if result.status == "ok" and not capture.exists():
        result.status, result.error = "failed", "memray wrote no capture"
    if result.status != "ok":
        return result, []
    from ftcore.report.flamegraph import write_reports

    html, png = out / f"memray-flamegraph-{backend}.html", out / f"memray-top-{backend}.png"
    warnings = write_reports(capture, html, png, f"ftcore profile {backend}")  # self-contained
    lines = [summary] if (summary := format_run(result)) else []
    lines.append(
        f"memray capture   {capture}\nflamegraph       {html} (opens offline)\ntop allocators   "
        f"{png}"
    )
    lines += [f"warning: {w}" for w in warnings]
    lines.append(
        "note: timings under memray include its tracking overhead; use `ftcore run` for speed "
        "figures"
    )
    return result, lines

"""`--benchmark-compare` against a baseline recorded on another machine: say so in one line, mark
its rows, and do not fail on its timings.

How pytest-benchmark (5.x) compares: in its pytest_configure, BenchmarkSession.handle_loading
loads the baseline file(s) and calls pytest_benchmark_compare_machine_info once per file (the
baseline's JSON as `compared_benchmark`), then keeps `compared_mapping`: {path: {fullname: the
baseline's benchmark dict}}. At the end, prepare_benchmarks builds one flat row per (benchmark,
baseline): the current benchmark's fields with the baseline's stats and `path`, and calls each
--benchmark-compare-fail check as `check.fails(current, row)`; any message it returns is a
regression, and check_regressions raises PerformanceRegression (exit 1). The rows then go
through pytest_benchmark_group_stats to the table.

For a baseline whose machine differs (bench_support: CPU model, cores, flags, BLAS, framework
versions, timing method), bench/conftest.py's hooks call:
  note_other_machine  at load: the one-line notice; the baseline's benchmark dicts (in memory
                      only, never saved) get OTHER_MACHINE; the session's checks are wrapped in
                      SameMachineOnly (unless --bench-compare-across-machines);
  mark_rows           at grouping: those rows' names end in MARK.
"""

from __future__ import annotations

from typing import Any

OTHER_MACHINE = "ftcore_other_machine"
MARK = " [other machine: not comparable]"
ACROSS_FLAG = "--bench-compare-across-machines"


def note_other_machine(session: Any, compared_benchmark: dict, diffs: list[str], where: str,
                       enforce: bool) -> None:
    for bench in compared_benchmark.get("benchmarks") or ():
        bench[OTHER_MACHINE] = True
    if enforce:
        then = f"--benchmark-compare-fail still applies ({ACROSS_FLAG})"
    else:
        then = f"--benchmark-compare-fail is not applied to it ({ACROSS_FLAG} to apply it)"
    # one line, first, always shown (pytest-benchmark's logger.warning would be several lines
    # and a pytest warning; its info hides under --benchmark-quiet)
    session.logger.term.line(f"ftcore bench: baseline in {where} ran on another machine, its timings "
                             f"are not comparable ({'; '.join(diffs)}); {then}", yellow=True, bold=True)
    if not enforce and session.compare_fail:
        session.compare_fail = [c if isinstance(c, SameMachineOnly) else SameMachineOnly(c, session)
                                for c in session.compare_fail]


def baseline_entry(session: Any, row: dict) -> dict | None:
    """The baseline benchmark dict a comparison row came from (None for a current-run row)."""
    if not row.get("path"):
        return None
    for path, by_name in (session.compared_mapping or {}).items():
        if str(path) == row["path"]:
            return by_name.get(row.get("fullname"))
    return None


def from_other_machine(session: Any, row: dict) -> bool:
    return bool((baseline_entry(session, row) or {}).get(OTHER_MACHINE))


class SameMachineOnly:
    """A --benchmark-compare-fail check (pytest-benchmark's PercentageRegressionCheck or
    DifferenceRegressionCheck) that passes over rows from another machine's baseline."""

    def __init__(self, check: Any, session: Any) -> None:
        self.check, self.session = check, session

    def __getattr__(self, name: str) -> Any:  # field, threshold, ...
        return getattr(self.check, name)

    def fails(self, current: Any, compared: dict) -> str | None:
        if from_other_machine(self.session, compared):
            return None
        return self.check.fails(current, compared)


def mark_rows(session: Any, rows: list[dict]) -> None:
    for row in rows:
        if from_other_machine(session, row) and not row["name"].endswith(MARK):
            row["name"] += MARK

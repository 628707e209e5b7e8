"""`--benchmark-compare` against a baseline whose timings cannot decide a regression: one recorded
on another machine, or one where either side ran on a busy machine. Say so in one line, and do
not fail on those timings. Also the console line for each case whose processes ran busy.

How pytest-benchmark (5.x) compares: in its pytest_configure, BenchmarkSession.handle_loading
loads the baseline file(s) and calls pytest_benchmark_compare_machine_info once per file (the
baseline's JSON as `compared_benchmark`), then keeps `compared_mapping`: {path: {fullname: the
baseline's benchmark dict}}. At the end (pytest_sessionfinish), prepare_benchmarks builds one flat
row per (benchmark, baseline): the current benchmark's fields with the baseline's stats and `path`,
and calls each --benchmark-compare-fail check as `check.fails(current, row)`; any message it
returns is a regression, and check_regressions (in its pytest_terminal_summary) raises
PerformanceRegression (exit 1). The rows then go through pytest_benchmark_group_stats to the table.

bench/conftest.py's hooks call:
  guard_checks        at load, for every baseline file: the session's checks are wrapped in
                      DecidableOnly, which passes over (never fails) a row from another machine's
                      baseline (unless --bench-compare-across-machines) and a row where the current
                      case or the baseline's entry had a busy process (noted for the console);
  note_other_machine  at load, for a baseline whose machine differs (bench_support: CPU model,
                      cores, flags, BLAS, framework versions, timing method): the one-line notice;
                      the baseline's benchmark dicts (in memory only, never saved) get OTHER_MACHINE;
  mark_rows           at grouping: other-machine rows' names end in MARK;
  busy_lines, undecidable_lines
                      in the terminal summary: one line per busy case, one per comparison that a
                      busy side made not decidable.

"Busy": the case's extra_info `busy_processes` (bench_support.result_info: processes whose timed
steps ran while other processes or the hypervisor took CPU, ftcore.measure.machine_load) is > 0.
A benchmark without that field (a baseline saved by older code, the tokenising benchmark) counts
as quiet.
"""

from __future__ import annotations

from typing import Any

from ftcore.measure.machine_load import BUSY_OTHER_CORES, BUSY_STEAL_FRACTION

OTHER_MACHINE = "ftcore_other_machine"
MARK = " [other machine: not comparable]"
ACROSS_FLAG = "--bench-compare-across-machines"
UNDECIDABLE = "_ftcore_undecidable"  # BenchmarkSession attribute: {(case, baseline path): line}
PREFIX = "ftcore bench: "


def guard_checks(session: Any, enforce_across: bool) -> None:
    """Wrap each of the session's --benchmark-compare-fail checks in DecidableOnly (once; called
    for every baseline file, whichever machine it came from, since a busy side can make any
    comparison meaningless)."""
    if session.compare_fail:
        session.compare_fail = [c if isinstance(c, DecidableOnly) else DecidableOnly(c, session, enforce_across)
                                for c in session.compare_fail]


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
    session.logger.term.line(f"{PREFIX}baseline in {where} ran on another machine, its timings "
                             f"are not comparable ({'; '.join(diffs)}); {then}", yellow=True, bold=True)


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


def case_name(bench: Any) -> str:
    """The case id (`tiny-b4-s128-fp32-torch`) of a benchmark (Metadata or row dict), else its name."""
    get = bench.get if isinstance(bench, dict) else lambda k: getattr(bench, k, None)
    return get("param") or get("name")


def busy_count(info: dict | None) -> int:
    """Processes of a case that ran busy; 0 when not recorded (older baselines, other benchmarks)."""
    return int((info or {}).get("busy_processes") or 0)


def describe_load(info: dict | None) -> str:
    if busy_count(info):
        return f"{busy_count(info)} of {info.get('processes', '?')} processes busy"
    return "quiet" if "busy_processes" in (info or {}) else "quiet (no load recorded)"


class DecidableOnly:
    """A --benchmark-compare-fail check (pytest-benchmark's PercentageRegressionCheck or
    DifferenceRegressionCheck) that decides only comparisons whose timings can show a regression:
    it passes over rows from another machine's baseline (unless `enforce_across`, i.e.
    --bench-compare-across-machines) and rows where this run's case or the baseline's entry had a
    busy process (noted on the session for undecidable_lines); every other row it leaves to the
    check, so a quiet regression fails as before."""

    def __init__(self, check: Any, session: Any, enforce_across: bool) -> None:
        self.check, self.session, self.enforce_across = check, session, enforce_across

    def __getattr__(self, name: str) -> Any:  # field, threshold, ...
        return getattr(self.check, name)

    def fails(self, current: Any, compared: dict) -> str | None:
        if not self.enforce_across and from_other_machine(self.session, compared):
            return None  # its row is marked instead (mark_rows)
        base = (baseline_entry(self.session, compared) or {}).get("extra_info")
        if busy_count(current.extra_info) or busy_count(base):
            self._note_undecidable(current, compared, base)
            return None
        return self.check.fails(current, compared)

    def _note_undecidable(self, current: Any, compared: dict, base: dict | None) -> None:
        several = len(self.session.compared_mapping or {}) > 1  # then name the baseline file
        baseline = f"baseline {compared.get('source')}" if several else "baseline"
        case = case_name(current)
        notes = self.session.__dict__.setdefault(UNDECIDABLE, {})
        notes[(case, compared["path"])] = (  # one line per row, however many checks
            f"{PREFIX}{case}: --benchmark-compare-fail not decidable: busy (this run: "
            f"{describe_load(current.extra_info)}; {baseline}: {describe_load(base)})")


def undecidable_lines(session: Any) -> list[str]:
    """The lines DecidableOnly noted, in the order the rows were checked."""
    return list(getattr(session, UNDECIDABLE, {}).values())


def mark_rows(session: Any, rows: list[dict]) -> None:
    for row in rows:
        if from_other_machine(session, row) and not row["name"].endswith(MARK):
            row["name"] += MARK


def busy_reason(loads: list[dict]) -> str:
    """What kept the machine busy over these busy processes' timed steps (each figure the
    highest among them)."""
    up_to = "up to " if len(loads) > 1 else ""
    other = max((m.get("other_cores") or 0.0 for m in loads), default=0.0)
    steal = max((m.get("steal_fraction") or 0.0 for m in loads), default=0.0)
    reasons = []
    if other > BUSY_OTHER_CORES:
        reasons.append(f"other processes kept {up_to}{other:.2f} cores busy")
    if steal > BUSY_STEAL_FRACTION:
        reasons.append(f"the hypervisor stole {up_to}{100 * steal:.0f}% of CPU time")
    return "; ".join(reasons) or "; ".join(filter(None, (m.get("reason") for m in loads))) or "no reason recorded"


def busy_line(case: str, info: dict) -> str | None:
    """The console line for a case whose processes ran busy; None for a quiet case."""
    busy = busy_count(info)
    if not busy:
        return None
    loads = [m for m in info.get("machine_load_per_process") or () if m and m.get("busy")]
    return (f"{PREFIX}{case}: {busy} of {info.get('processes', '?')} processes ran on a busy machine "
            f"({busy_reason(loads)}); its timings are not a figure of the framework")


def busy_lines(benchmarks: list[Any]) -> list[str]:
    """One line per timed benchmark (pytest-benchmark's Metadata) whose case had a busy process."""
    return [line for b in benchmarks if (line := busy_line(case_name(b), b.extra_info or {}))]


STAT_FIELDS = ("min", "max", "mean", "median", "stddev")  # what --benchmark-compare-fail may read


def baseline_problem(compared_benchmark: Any) -> str | None:
    """What makes a loaded baseline unusable (it once ran the whole benchmark and then ended in a
    traceback or INTERNALERROR): not an object, `machine_info` not an object, `benchmarks` not a
    list of entries each with a `fullname` and finite numeric `stats`. None when it is usable."""
    import math

    if not isinstance(compared_benchmark, dict):
        return "not a JSON object"
    if not isinstance(compared_benchmark.get("machine_info"), dict):
        return "`machine_info` is not an object"
    benches = compared_benchmark.get("benchmarks")
    if not isinstance(benches, list) or not benches:
        return "`benchmarks` is not a non-empty list"
    for i, b in enumerate(benches):
        name = b.get("fullname") if isinstance(b, dict) else None
        if not isinstance(name, str):
            return f"benchmark {i} has no `fullname`"
        stats = b.get("stats")
        if not isinstance(stats, dict):
            return f"{name}: no `stats`"
        for key in STAT_FIELDS:
            v = stats.get(key)
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                return f"{name}: stats.{key} is {v!r}, not a number"
    return None


def check_baseline_files(config: Any) -> None:
    """Before pytest-benchmark loads them (it skips a file it cannot parse with a warning and
    ends in a traceback after the whole run): the baseline files `--benchmark-compare` selects,
    chosen as pytest-benchmark does, must parse and pass baseline_problem; else one usage error."""
    import json

    import pytest
    from pytest_benchmark.storage.file import FileStorage
    from pytest_benchmark.utils import get_machine_id

    compare, storage = config.getoption("benchmark_compare", None), config.getoption("benchmark_storage", None)
    if not compare or not isinstance(storage, str) or "://" in storage and not storage.startswith("file://"):
        return
    files = FileStorage(storage.removeprefix("file://"), logger=None, default_machine_id=get_machine_id())
    chosen = list(files.query("[0-9][0-9][0-9][0-9]_"))[-1:] if compare is True else list(files.query(compare))
    for path in chosen:
        try:
            problem = baseline_problem(json.loads(path.read_text(encoding="utf8")))
        except (OSError, UnicodeDecodeError, ValueError) as e:
            problem = f"not readable JSON ({e})"
        if problem:
            raise pytest.UsageError(f"--benchmark-compare: baseline {path} is unusable: {problem}")

"""`pytest bench/ --benchmark-compare` against a baseline from another machine and one from this
machine (bench/baseline_compare.py), through real pytest-benchmark in child pytest sessions.

The benchmark is the tokenising one at 300 records (in-process, a real timing, ~1.5 s of rounds).
1. The committed baseline's JSON, its CPU model edited, its tokenising entry renamed to 300
   records and its stats scaled to them and made 30x faster: exit 0, one notice line naming cpu_model,
   the baseline's rows marked not comparable. The same session saves this run.
2. That saved run, its stats made 3x faster (so this run's step is 3x slower), same machine:
   exit 1 (PerformanceRegression). Compared in the same session with a copy whose entry records
   1 of 3 processes busy: that row is one "not decidable: busy" line, not a regression (the
   tokenising benchmark records no load: this run's side counts as quiet, whatever runs here).
3. Baseline 1 again with --bench-compare-across-machines: exit 1.
The fail threshold is on `min` (10%) over 20 rounds: a loaded machine only ever adds time, so the
minimum of a run's rounds moves far less between sessions than its median. It still moves: on CI
one session's min was 27.8 ms and the next one's 18.0 ms (1.54x), which beat a 1.5x margin. So 2.
uses 3x: it fails unless this session's fastest round beats the first session's by more than 2.7x.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pytest_benchmark.utils import get_machine_id

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
RECORDS = 300
ROUNDS = 20  # ~70 ms each: a min over 1.5 s of rounds, robust to a moment of load
PARAM = f"tiny-{RECORDS}rec"
FULLNAME = f"bench/test_data_bench.py::test_tokenize_alpaca[{PARAM}]"
MARK = "[other machine: not comparable]"
SAME_MACHINE_SLOWDOWN = 3.0  # 2.'s margin: far above two sessions' min-to-min spread (1.54x seen)
BUSY_LINE = "processes ran on a busy machine"  # bench/baseline_compare.busy_line
TIME_STATS = ("min", "max", "mean", "stddev", "median", "iqr", "q1", "q3", "ld15iqr", "hd15iqr", "total")


def pytest_bench(storage: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python -m pytest ARGS --benchmark-only` in the repository root, its benchmarks stored in
    `storage`; `env`: variables to add to this process's environment."""
    cmd = [sys.executable, "-m", "pytest", "--benchmark-only", "-p", "no:cacheprovider",
           f"--benchmark-storage=file://{storage}", *args]
    env = dict(os.environ, **(env or {}),
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def bench_session(storage: Path, *args: str, compare: str | None = None) -> subprocess.CompletedProcess:
    """The tokenising benchmark compared with `storage`'s latest run (`compare`: a file glob
    instead), failing on a 10% slower min."""
    return pytest_bench(storage, "bench/test_data_bench.py", f"--tokenize-records={RECORDS}", f"--bench-rounds={ROUNDS}",
                        f"--benchmark-compare={compare}" if compare else "--benchmark-compare",
                        "--benchmark-compare-fail=min:10%", *args)


def scaled(bench: dict, factor: float) -> dict:
    """The benchmark entry with every time statistic multiplied by `factor`."""
    out = copy.deepcopy(bench)
    for k in TIME_STATS:
        out["stats"][k] *= factor
    out["stats"]["ops"] /= factor
    return out


def store(storage: Path, name: str, run: dict, number: int = 1) -> None:
    """Save `run` as pytest-benchmark would, as this machine's run `number` named `name`."""
    d = storage / get_machine_id()
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{number:04d}_{name}.json").write_text(json.dumps(run))


def test_compare_across_machines_notes_marks_and_does_not_fail(tmp_path: Path):
    committed = json.loads(next((ROOT / ".benchmarks").glob("*/0001_baseline.json")).read_text())
    other = copy.deepcopy(committed)
    other["machine_info"]["cpu"]["brand_raw"] = other["machine_info"]["ftcore"]["cpu_model"] = "Other CPU (edited)"
    tok = next(b for b in other["benchmarks"] if b["name"].startswith("test_tokenize_alpaca"))
    # per record as the committed run, then 30x faster: this machine looks many times slower
    # (at /3 a 300-record run here came within 3% of it: per-record cost is not the same at 300
    # and 20000 records, so only a wide margin makes the "far slower" premise hold)
    tok = scaled(tok, RECORDS / tok["params"]["tokenize_n"] / 30)
    tok.update(name=f"test_tokenize_alpaca[{PARAM}]", fullname=FULLNAME, param=PARAM,
               params={"tokenize_n": RECORDS}, group=f"tokenize tiny {RECORDS} records")
    other["benchmarks"] = [tok]
    store(tmp_path / "other", "other", other)

    # 1. another CPU: one notice, rows marked, exit 0 although far slower; this run is saved
    r1 = bench_session(tmp_path / "other", "--benchmark-save=now")
    out1 = r1.stdout + r1.stderr
    assert r1.returncode == 0, out1[-4000:]
    notices = [line for line in out1.splitlines() if "ran on another machine" in line]
    assert len(notices) == 1 and notices[0].startswith("ftcore bench: baseline") and "cpu_model" in notices[0], notices
    assert "Other CPU (edited)" in notices[0] and "PytestBenchmarkWarning" not in out1
    rows = [line for line in out1.splitlines() if line.startswith(f"test_tokenize_alpaca[{PARAM}]")]
    assert len(rows) == 2 and sum(MARK in row for row in rows) == 1, rows
    assert "Performance has regressed" not in out1
    assert BUSY_LINE not in out1, out1[-4000:]  # the tokenising benchmark records no load

    # 2. this machine, its step 3x slower than two baselines': the quiet one still fails; the one
    #    whose entry records busy processes is not decidable (one line) and is no regression
    saved = json.loads(next((tmp_path / "other").glob("*/0002_now.json")).read_text())
    same = dict(saved, benchmarks=[scaled(b, 1 / SAME_MACHINE_SLOWDOWN) for b in saved["benchmarks"]])
    store(tmp_path / "same", "same", same)
    busy = copy.deepcopy(same)
    for b in busy["benchmarks"]:
        b["extra_info"].update(busy_processes=1, processes=3)
    store(tmp_path / "same", "busy", busy, number=2)
    r2 = bench_session(tmp_path / "same", compare="000")  # both files
    out2 = r2.stdout + r2.stderr
    assert r2.returncode == 1 and "Performance has regressed" in out2, out2[-4000:]
    regressions = out2.split("Performance has regressed:")[1].split("Performance has regressed.")[0]
    assert "(0001_same)" in regressions and "0002_busy" not in regressions, regressions
    undecidable = [line for line in out2.splitlines() if "not decidable" in line]
    assert undecidable == [f"ftcore bench: {PARAM}: --benchmark-compare-fail not decidable: busy (this run: quiet "
                           "(no load recorded); baseline 0002_busy: 1 of 3 processes busy)"], undecidable
    assert "ran on another machine" not in out2 and MARK not in out2
    assert BUSY_LINE not in out2, out2[-4000:]

    # 3. another CPU with the explicit flag: the threshold applies again
    (tmp_path / "other" / get_machine_id() / "0002_now.json").unlink()
    r3 = bench_session(tmp_path / "other", "--bench-compare-across-machines")
    out3 = r3.stdout + r3.stderr
    assert r3.returncode == 1 and "Performance has regressed" in out3, out3[-4000:]
    assert "--benchmark-compare-fail still applies" in out3


def _no_median(b: dict) -> None:
    b["benchmarks"][0]["stats"]["median"] = None


def _info_text(b: dict) -> None:
    b["machine_info"] = "a string"


def _no_stats(b: dict) -> None:
    del b["benchmarks"][0]["stats"]


def _truncated(b: dict) -> str:
    return json.dumps(b)[:500]


@pytest.mark.parametrize("edit, said", [(_no_median, "stats.median is None, not a number"),
                                        (_info_text, "`machine_info` is not an object"),
                                        (_no_stats, ": no `stats`"),
                                        (_truncated, "not readable JSON (")])
def test_a_malformed_baseline_is_refused_before_the_first_case(tmp_path: Path, edit, said):
    """It once ran the whole benchmark, then ended in a traceback or INTERNALERROR."""
    committed = json.loads(next((ROOT / ".benchmarks").rglob("*.json")).read_text())
    text = edit(committed)
    if text is None:
        store(tmp_path, "bad", committed)
    else:
        (tmp_path / get_machine_id()).mkdir(parents=True)
        (tmp_path / get_machine_id() / "0001_bad.json").write_text(text)
    res = bench_session(tmp_path, compare="0001")
    lines = [ln for ln in (res.stdout + res.stderr).splitlines() if ln.strip()]
    bad = tmp_path / get_machine_id() / "0001_bad.json"
    assert res.returncode == 4 and len(lines) == 1, res.stdout + res.stderr
    assert lines[0].startswith(f"ERROR: --benchmark-compare: baseline {bad} is unusable: "), lines
    assert said in lines[0] and "Traceback" not in res.stderr and "test_tokenize_alpaca" not in res.stdout.split("ERROR")[0]

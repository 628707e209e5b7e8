"""A busy machine in `pytest bench/` (bench/baseline_compare.py), through real pytest-benchmark in
child pytest sessions: a fine-tune case whose processes ran busy says so in one console line, and
`--benchmark-compare-fail` against a baseline from this machine calls its comparison not
decidable instead of a regression (exit 0). The baseline-side rule (its entry records busy
processes) and "a quiet regression still fails" are in tests/test_baseline_compare.py's step 2.

Load-proof, as tests/test_step_timing.py's busy test: the case runs while CPU hogs (one per core)
run, so its processes are busy whatever else runs on this machine, and the test asserts what the
saved run recorded, not a guess of it. The baseline is this machine's (a short tokenising session
gives its machine_info) with the case's steps made 0.1 ms: a real step takes 40 ms or more, so
without the busy rule the check fails.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_baseline_compare import ROOT, TIME_STATS, pytest_bench, store

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CASE = "tiny-b4-s128-fp32-torch"
FULLNAME = f"bench/test_finetune_bench.py::test_finetune[{CASE}]"
WARMUP, ROUNDS = 1, 8  # 8 steps under the hogs: a load window of ~0.8 s, well over machine_load's 0.2 s
BASELINE_STEP_S = 1e-4
# Torch's OpenMP threads spin-wait by default: beside the hogs a two-process case took 152 s
# instead of 36 s with passive waiting, which changes the timing only (nothing here asserts it).
PASSIVE_OMP = {"OMP_WAIT_POLICY": "passive"}


def quiet_gemm_peak(tmp_path: Path) -> None:
    """Measure (or find cached) the case's GEMM peak before the hogs start, as the bench's own
    `prepared` fixture would: measured under them, a low figure would be cached for later runs."""
    from ftcore.run.backend_process import gemm_peak
    from ftcore.run.bench_cases import Case
    from ftcore.run.preflight import prepare

    gemm_peak(prepare(Case("tiny", "torch", 4, 128, "fp32").config(WARMUP, ROUNDS), tmp_path / "prep"))


def fast_baseline(this_machine: dict) -> dict:
    """This machine's run holding only the fine-tune case, every step BASELINE_STEP_S, saved by
    older code (its extra_info records no busy_processes)."""
    entry = copy.deepcopy(this_machine["benchmarks"][0])
    for k in TIME_STATS:
        entry["stats"][k] = 0.0 if k in ("stddev", "iqr") else BASELINE_STEP_S
    entry["stats"]["total"] = BASELINE_STEP_S * entry["stats"]["rounds"]
    entry["stats"]["ops"] = 1 / BASELINE_STEP_S
    entry.update(name=f"test_finetune[{CASE}]", fullname=FULLNAME, param=CASE,
                 params={"finetune_case": CASE}, group="tiny-L4 b4 s128 fp32", extra_info={})
    return dict(this_machine, benchmarks=[entry])


def test_busy_case_is_named_and_its_compare_fail_not_decided(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    here = pytest_bench(tmp_path, "bench/test_data_bench.py", "--tokenize-records=50", "--bench-rounds=2",
                        f"--benchmark-json={tmp_path / 'here.json'}")
    assert here.returncode == 0, (here.stdout + here.stderr)[-4000:]
    store(tmp_path, "fast", fast_baseline(json.loads((tmp_path / "here.json").read_text())))
    quiet_gemm_peak(tmp_path)

    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in os.sched_getaffinity(0)]
    try:
        r = pytest_bench(tmp_path, "bench/test_finetune_bench.py", "--bench-backends=torch", "--bench-precision=fp32",
                         "--bench-nproc=1", "--bench-processes=1", f"--bench-warmup-rounds={WARMUP}",
                         f"--bench-rounds={ROUNDS}", "--benchmark-compare=0001_fast",
                         "--benchmark-compare-fail=median:25%", f"--benchmark-json={tmp_path / 'busy.json'}",
                         env=PASSIVE_OMP)
    finally:
        for h in hogs:
            h.kill()
            h.wait()
    out = r.stdout + r.stderr
    assert r.returncode == 0 and "Performance has regressed" not in out, out[-4000:]
    info = json.loads((tmp_path / "busy.json").read_text())["benchmarks"][0]
    assert info["stats"]["median"] > 100 * BASELINE_STEP_S  # the premise: a regression by its timings
    extra = info["extra_info"]
    assert extra["busy_processes"] == extra["processes"] == 1, extra["machine_load_per_process"]
    other_cores = extra["machine_load_per_process"][0]["other_cores"]
    assert [line for line in out.splitlines() if CASE in line and "ftcore bench:" in line] == [
        f"ftcore bench: {CASE}: 1 of 1 processes ran on a busy machine (other processes kept {other_cores:.2f} "
        "cores busy); its timings are not a figure of the framework",
        f"ftcore bench: {CASE}: --benchmark-compare-fail not decidable: busy (this run: 1 of 1 processes busy; "
        "baseline: quiet (no load recorded))",
    ], out[-4000:]

    # the same case quiet: no line (what a quiet case's console shows, from the record just saved)
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import baseline_compare as bc

    quiet = dict(extra, busy_processes=0,
                 machine_load_per_process=[dict(m, busy=False, reason=None) for m in extra["machine_load_per_process"]])
    assert bc.busy_line(CASE, quiet) is None and bc.busy_line(CASE, extra) in out

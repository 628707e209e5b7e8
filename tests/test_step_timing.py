"""Gated backend processes (the bench's step timing) and the busy-machine flag, end to end."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from ftcore.measure.machine_load import MachineLoad
from ftcore.run.backend_process import BackendProcess
from ftcore.run.preflight import prepare

pytestmark = pytest.mark.integration


def test_gated_process_runs_one_step_per_request(tmp_path, small_cfg) -> None:
    prep = prepare(small_cfg.replace(steps=4, timing_warmup_steps=1), tmp_path)
    proc = BackendProcess("torch", prep, tmp_path / "run", gate=True)
    times, losses = [], []
    for _ in range(4):
        t = time.perf_counter()
        losses.append(proc.step())
        times.append(time.perf_counter() - t)
    result = proc.wait()
    assert result.status == "ok", result.error
    assert losses == result.losses  # each answer is that step's loss
    # what the parent timed is the child's step (plus a pipe round trip), not less
    for parent, child in zip(times[1:], result.step_times_s[1:], strict=True):
        assert child <= parent < child + 0.05


def test_gated_process_stopped_early_is_a_failed_row(tmp_path, small_cfg) -> None:
    prep = prepare(small_cfg.replace(steps=4, timing_warmup_steps=1), tmp_path)
    proc = BackendProcess("torch", prep, tmp_path / "run", gate=True)
    proc.step()
    result = proc.wait()  # the parent stops asking after one step
    assert result.status == "failed" and "expected 'go' before step 1" in result.error


def test_busy_flag_counts_a_hog_it_starts_and_not_its_own_work() -> None:
    """Its own load, whatever else runs: two CPU hogs (one per core of this 2-core machine) over
    one window, measured twice at once: as strangers (`plain`) they are other processes' load,
    the window is busy and at least their CPU time counts; as the run's own ranks (`own`) their
    CPU time is subtracted, exactly. Holds on a machine other processes already load: the window
    lasts until the hogs got 0.3 CPU seconds, and what either side adds to the other's figure is
    the hogs' own CPU seconds, read from /proc."""
    from ftcore.measure.machine_load import _pids_cpu_s

    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    pids = [h.pid for h in hogs]
    try:
        time.sleep(0.3)
        plain, own = MachineLoad(), MachineLoad(lambda: pids)
        before = _pids_cpu_s(pids)
        plain.start()
        own.start()
        t0 = time.monotonic()
        while _pids_cpu_s(pids) - before < 0.3 or time.monotonic() - t0 < 1.0:
            assert time.monotonic() - t0 < 30, "the hogs got no CPU"
            time.sleep(0.1)
        a, b = plain.stop(), own.stop()
        hog_s = _pids_cpu_s(pids) - before
    finally:
        for h in hogs:
            h.kill()
            h.wait()
    wall = a["wall_s"]
    assert a["busy"] is True and "other processes kept" in a["reason"], a
    assert a["other_cores"] * wall >= hog_s - 0.05, (a, hog_s)  # /proc/stat ticks: 10 ms
    assert (a["other_cores"] - b["other_cores"]) * wall == pytest.approx(hog_s, abs=0.05), (a, b, hog_s)

"""Gated backend processes (the bench's step timing) and the busy-machine flag, end to end."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from ftcore.machine_load import MachineLoad
from ftcore.runner import BackendProcess, prepare

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


def test_busy_machine_is_flagged_and_a_quiet_one_is_not() -> None:
    load = MachineLoad()
    load.start()
    time.sleep(0.5)
    quiet = load.stop()
    assert quiet["busy"] is False and quiet["other_cores"] < 0.25
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.2)
        load.start()
        time.sleep(1.0)
        busy = load.stop()
    finally:
        hog.kill()
    assert busy["busy"] is True and busy["other_cores"] > 0.5, busy
    assert "other processes kept" in busy["reason"]

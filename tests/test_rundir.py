"""Run folders (ftcore.run.rundir): claimed atomically, an earlier run never mixed with a new one."""

from __future__ import annotations

import json
import threading

import pytest

from ftcore.config import UserError
from ftcore.run.rundir import STATUS_FILE, RunFolder

pytestmark = pytest.mark.unit


def status(path):
    return json.loads((path / STATUS_FILE).read_text())


def test_default_folders_claimed_at_once_are_distinct(tmp_path):
    """Eight claims racing in the same second: eight different, existing folders."""
    got, barrier = [], threading.Barrier(8)

    def claim():
        barrier.wait()
        got.append(RunFolder(None, root=tmp_path).claim())

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(got)) == 8 and all(p.is_dir() and p.name.startswith("compare-") for p in got)
    assert all(status(p)["status"] == "running" for p in got)


def test_out_holding_a_run_is_refused_unless_replaced(tmp_path):
    out = tmp_path / "run"
    (out / "mlx").mkdir(parents=True)
    (out / "mlx" / "result.json").write_text("old")
    with pytest.raises(UserError, match="--replace"):
        RunFolder(out).claim()
    assert (out / "mlx" / "result.json").read_text() == "old"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert RunFolder(empty).claim() == empty  # an empty folder is fine


def test_replaced_run_is_replaced_whole(tmp_path):
    out = tmp_path / "run"
    (out / "mlx").mkdir(parents=True)
    (out / "mlx" / "result.json").write_text("old")
    run = RunFolder(out, replace=True)
    assert run.claim() == out and not (out / "mlx").exists()  # nothing old beside the new run
    run.end("complete", 0)
    assert status(out)["status"] == "complete" and status(out)["exit_code"] == 0
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # the old run is gone, not hidden


def test_interrupted_replacement_puts_the_old_run_back(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "comparison.json").write_text("old")
    run = RunFolder(out, replace=True)
    run.claim()
    (out / "batches.npz").write_text("half")
    run.interrupted()
    assert sorted(p.name for p in out.iterdir()) == ["comparison.json"]
    assert (out / "comparison.json").read_text() == "old"


def test_interrupted_new_run_is_marked(tmp_path):
    run = RunFolder(tmp_path / "new")
    path = run.claim()
    run.interrupted()
    assert status(path)["status"] == "interrupted" and status(path)["exit_code"] == 130


def test_out_that_is_a_file_is_refused(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(UserError, match="not a folder"):
        RunFolder(f).claim()


def test_kill_reason_names_the_oom_killer_only_when_its_counter_rose():
    import signal

    from ftcore.run import procs

    now = procs.oom_kills()
    assert now is None or now >= 0  # this machine's cgroup counter, read for real
    if now is not None:
        assert procs.death_reason(signal.SIGKILL, now) == "killed by SIGKILL"
        assert "OOM killer" in procs.death_reason(signal.SIGKILL, now - 1)  # it rose since then
    assert procs.death_reason(signal.SIGTERM, None) == "killed by SIGTERM"


def test_stop_all_terminates_then_kills_every_live_child():
    """What an interrupted CLI calls: a child that obeys SIGTERM and one that ignores it are both
    gone, and reaped, within the grace period plus the SIGKILL (on Linux PR_SET_PDEATHSIG would
    stop them too once the parent exits; this is the portable path, checked on its own)."""
    import os
    import subprocess
    import sys
    import time

    from ftcore.run import procs

    obey = procs.spawn([sys.executable, "-c", "import time; time.sleep(60)"], dict(os.environ))
    ignore = procs.spawn(
        [sys.executable, "-c",
         "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"],
        dict(os.environ), stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert ignore.stdout.readline().strip() == "ready"
    t0 = time.monotonic()
    procs.stop_all(grace_s=1.0)
    assert time.monotonic() - t0 < 10
    assert obey.returncode == -15 and ignore.returncode == -9  # SIGTERM, then SIGKILL
    assert not procs.LIVE


def test_a_run_whose_process_died_is_named_so(tmp_path):
    """A SIGKILLed parent leaves status.json at `running` for ever: the next run into the folder
    says that run's process is gone (a live one is not called dead)."""
    import os
    import subprocess
    import sys

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    out = tmp_path / "run"
    out.mkdir()
    (out / STATUS_FILE).write_text(json.dumps({"status": "running", "pid": gone.pid}))
    with pytest.raises(UserError, match=r"died without ending it .* pass --replace"):
        RunFolder(out).claim()
    (out / STATUS_FILE).write_text(json.dumps({"status": "running", "pid": os.getpid()}))
    with pytest.raises(UserError) as e:
        RunFolder(out).claim()
    assert "without ending it" not in str(e.value) and "holds an earlier run; pass --replace" in str(e.value)

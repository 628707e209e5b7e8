"""Data-parallel runs (--nproc, ftcore.process.ranks) through the command line: an N-process run trains
exactly what the one-process run trains, its figures are recorded and reported, a rank that dies
ends the backend as a failed row with nothing left running, and user mistakes are one line."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from unittest import mock

import numpy as np
import psutil
import pytest
from helpers import ftcore, ftcore_in_process

from ftcore.inputs.loss_contract import target_count
from ftcore.process.ranks import LAUNCHER_LOGS_DIR
from ftcore.run.rank_watch import RankWatch, prune_empty_dirs
from ftcore.tolerances import FP32_DATA_PARALLEL_GRAD_NORM_RTOL, FP32_DATA_PARALLEL_LOSS_ATOL

pytestmark = pytest.mark.integration

# 4 rows over 2 ranks; clipping at 0.05 is active every step, so it must see the summed gradients
SMALL = ["--num-samples", "16", "--eval-samples", "4", "--max-seq-len", "64", "--batch-size", "4",
         "--max-grad-norm", "0.05"]  # fmt: skip
DEVICE = os.environ.get("FTCORE_TEST_DEVICE", "cpu")  # scripts/gpu_check.sh sets gpu


@pytest.fixture(scope="module")
def compare_nproc2(tmp_path_factory):
    out = tmp_path_factory.mktemp("dp") / "run"
    tmp = tmp_path_factory.mktemp("tmpdir")  # the runs' TMPDIR: what they leave behind there
    with mock.patch.dict(os.environ, TMPDIR=str(tmp)):
        res = ftcore("compare", "--backends", "torch,mlx", "--nproc", "2", "--steps", "4", *SMALL,
                     "--device", DEVICE, "--repeats", 1, "--out", out, timeout=600)  # fmt: skip
    return res, out, tmp


def test_nproc2_losses_equal_one_process(compare_nproc2):
    res, out, _ = compare_nproc2
    assert res.returncode == 0, res.stderr[-3000:]
    comp = json.loads((out / "comparison.json").read_text())
    assert comp["backends"] == ["torch", "torch x2", "mlx", "mlx x2"] and comp["all_fair"]
    from ftcore.inputs.batches import Batches

    batches = Batches.load(out / "batches.npz")
    # rank r's rows are [2r, 2r + 2) of each 4-row batch (sliced here, not by ftcore's `shard`)
    labels = [batches.step(s)["labels"] for s in range(4)]
    counts = [[target_count(y[2 * r : 2 * r + 2]) for r in range(2)] for y in labels]
    assert any(a != b for a, b in counts), counts  # uneven shards: a per-rank mean would be wrong
    for name in ("torch", "mlx"):
        one = json.loads((out / name / "result.json").read_text())
        two = json.loads((out / f"{name}-x2" / "result.json").read_text())
        assert len(two["losses"]) == 4 and one["world_size"] == 1 and two["world_size"] == 2
        # The targets each rank's loss was taken over: its own rows, together the whole batch.
        ranks = [json.loads((out / f"{name}-x2" / "ranks" / f"rank-{r}.json").read_text()) for r in (0, 1)]
        got = [list(c) for c in zip(*(x["step_targets"] for x in ranks), strict=True)]  # (step, rank)
        assert two["step_targets"] == one["step_targets"] == list(map(target_count, labels)), (
            name, "targets per step, 2 ranks summed vs 1 process", two["step_targets"], one["step_targets"])
        assert got == counts, (name, "targets per rank and step", got, "rows as sharded:", counts)
        # The gradient norm before clipping: clipping at 0.05 would hide a scaled gradient (each
        # rank on the whole batch: 2x) from the losses and the weights.
        assert len(one["grad_norms"]) == len(two["grad_norms"]) == 4, name
        np.testing.assert_allclose(two["grad_norms"], one["grad_norms"], rtol=FP32_DATA_PARALLEL_GRAD_NORM_RTOL, err_msg=name)
        diff = np.abs(np.array(one["losses"]) - np.array(two["losses"])).max()
        assert diff <= FP32_DATA_PARALLEL_LOSS_ATOL, (name, one["losses"], two["losses"])
        assert abs(one["eval_loss"] - two["eval_loss"]) <= FP32_DATA_PARALLEL_LOSS_ATOL  # the same adapter at the end
        assert one["fed_batches_fingerprint"] == two["fed_batches_fingerprint"]


def test_nproc2_records_ranks_threads_allreduce_and_memory(compare_nproc2):
    res, out, _ = compare_nproc2
    assert res.returncode == 0, res.stderr[-3000:]
    for name in ("torch", "mlx"):
        r = json.loads((out / f"{name}-x2" / "result.json").read_text())
        assert r["status"] == "ok" and r["rank_threads"] >= 1 and r["threads"] == 2 * r["rank_threads"]
        assert len(r["allreduce_times_s"]) == 4 and all(t > 0 for t in r["allreduce_times_s"])
        assert r["allreduce_time_s"] == pytest.approx(np.mean(r["allreduce_times_s"][1:]))
        ranks = [json.loads((out / f"{name}-x2" / "ranks" / f"rank-{i}.json").read_text()) for i in (0, 1)]
        peaks = [x["peak_rss_mb"] for x in ranks]
        assert len({x["pid"] for x in ranks}) == 2 and min(peaks) > 20
        assert r["peak_rss_mb"] == pytest.approx(sum(peaks))
        assert r["peak_rss_max_rank_mb"] == pytest.approx(max(peaks))
    comp = json.loads((out / "comparison.json").read_text())
    rows = {row["backend"]: row for row in comp["rows"]}
    for name in ("torch", "mlx"):
        eff = rows[f"{name} x2"]["tokens_per_s"] / rows[name]["tokens_per_s"]
        assert rows[f"{name} x2"]["scaling_efficiency"] == pytest.approx(eff)
        assert rows[name]["scaling_efficiency"] == 1.0
    for label in ("World size (processes)", "Threads per rank", "All-reduce (ms/step)",
                  "Peak RSS, largest rank (MB)", "Scaling efficiency"):  # fmt: skip
        assert f"\n{label}  " in res.stdout, label  # the short answer's data-parallel rows
    report = (out / "report.md").read_text()  # the scaling lines: in the report
    assert "Scaling torch: 1 process x 2 threads" in report and "2 processes x 1 thread(s)" in report


def test_nproc2_leaves_no_launcher_logs_behind(compare_nproc2):
    """torchrun makes a per-rank log tree for every run (in TMPDIR unless told --log-dir); ftcore
    points it into the run folder and removes it, since it holds no file."""
    res, out, tmp = compare_nproc2
    assert res.returncode == 0, res.stderr[-3000:]
    assert not list(tmp.glob("torchelastic_*")), sorted(p.name for p in tmp.iterdir())
    assert not list(out.rglob(LAUNCHER_LOGS_DIR)), sorted(str(p) for p in out.rglob(LAUNCHER_LOGS_DIR))


def test_launcher_log_tree_is_pruned_only_where_it_holds_no_file(tmp_path):
    logs = tmp_path / LAUNCHER_LOGS_DIR
    (logs / "run_x" / "attempt_0" / "0").mkdir(parents=True)
    (logs / "run_x" / "attempt_0" / "1").mkdir()
    prune_empty_dirs(logs)
    assert not logs.exists()
    (logs / "run_y" / "attempt_0" / "1").mkdir(parents=True)
    (logs / "run_y" / "attempt_0" / "0").mkdir()
    (logs / "run_y" / "attempt_0" / "0" / "error.json").write_text("{}")
    prune_empty_dirs(logs)  # a rank's log is kept, with the folders above it
    assert (logs / "run_y" / "attempt_0" / "0" / "error.json").exists()
    assert not (logs / "run_y" / "attempt_0" / "1").exists()


def test_gated_data_parallel_process_runs_one_step_per_request(tmp_path, small_cfg):
    """The bench's step gate reaches rank 0 through named pipes (launchers close inherited fds)."""
    from ftcore.run.backend_process import BackendProcess
    from ftcore.run.preflight import prepare

    prep = prepare(small_cfg.replace(steps=3, batch_size=4, nproc=2, eval_samples=0), tmp_path, ["mlx"])
    proc = BackendProcess("mlx", prep, tmp_path / "run", gate=True)
    stuck = threading.Timer(90, lambda: os.killpg(proc.proc.pid, signal.SIGKILL))  # a hang fails
    stuck.start()
    times, losses = [], []
    try:
        for _ in range(3):
            t = time.perf_counter()
            losses.append(proc.step())
            times.append(time.perf_counter() - t)
    finally:
        result = proc.wait()
        stuck.cancel()
    assert result.status == "ok" and result.world_size == 2, result.error
    assert losses == result.losses
    for parent, child in zip(times[1:], result.step_times_s[1:], strict=True):
        assert child <= parent < child + 0.05


def _descendants(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_killed_rank_is_a_failed_row_no_hang_no_orphans(backend, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "ftcore", "run", "--backend", backend, "--nproc", "2", "--steps", "100",
         *SMALL, "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    for line in proc.stderr:  # rank 0 reports step 10: both ranks are in their all-reduces
        if line.startswith(f"[{backend}] step"):
            break
    started = out / "ranks" / "started-1"
    assert started.exists(), "rank 1 never announced itself"
    family = _descendants(proc.pid)
    assert len(family) >= 3  # the launcher (and its wrapper) and two ranks
    t0 = time.monotonic()
    os.kill(int(started.read_text()), signal.SIGKILL)
    _, stderr = proc.communicate(timeout=60)
    assert time.monotonic() - t0 < 60
    assert proc.returncode == 1, stderr[-2000:]
    r = json.loads((out / "result.json").read_text())
    # rank 0 may be named too: the launcher ends it once rank 1 is gone, before its rank file
    assert r["status"] == "failed" and re.search(r"rank\(s\) (0, )?1 of 2 died mid-run", r["error"]), r["error"]
    assert "Traceback" not in stderr.splitlines()[-1]
    time.sleep(0.5)
    alive = [p.pid for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"left running: {alive}"


def test_rank_watch_ends_a_launcher_whose_rank_died(tmp_path, monkeypatch):
    """A launcher that does not end the survivors (one stuck in a collective): the parent's watch
    kills its group and the announced ranks once a rank is gone without its rank file."""
    import ftcore.run.rank_watch as dist

    monkeypatch.setattr(dist, "DEAD_RANK_GRACE_S", 1.0)
    launcher = subprocess.Popen(["sleep", "60"], start_new_session=True)
    # a "rank" in its own session, as torchrun's are (named like one: only ranks are killed)
    survivor = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "ftcore.run.child"],
                                start_new_session=True)  # fmt: skip
    dead = subprocess.Popen(["true"])
    dead.wait()
    ranks = tmp_path / "ranks"
    ranks.mkdir()
    (ranks / "started-0").write_text(str(survivor.pid))
    (ranks / "started-1").write_text(str(dead.pid))
    watch = RankWatch(tmp_path, 2, launcher.pid)
    assert watch.poll() is False and watch.dead == [1]  # within the grace period
    time.sleep(1.1)
    assert watch.poll() is True
    assert launcher.wait(timeout=5) == -signal.SIGKILL and survivor.wait(timeout=5) == -signal.SIGKILL


def test_sibling_ranks_cpu_time_is_not_machine_load():
    """A rank's busy check must not count the other ranks of its own run as another load."""
    from ftcore.measure.machine_load import MachineLoad

    sibling = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        plain, own = MachineLoad(), MachineLoad(lambda: [sibling.pid])
        plain.start()
        own.start()
        time.sleep(1.5)
        a, b = plain.stop(), own.stop()
    finally:
        sibling.kill()
        sibling.wait()
    assert a["other_cores"] - b["other_cores"] > 0.3, (a, b)  # the spinning sibling: up to 1 core


def test_data_parallel_user_errors_are_one_line(tmp_path):
    bad_hosts = tmp_path / "hosts.json"
    bad_hosts.write_text('{"hosts": [{"ssh": "a", "ips": ["10.0.0.1"]}]}')
    cases = [
        (["compare", "--nproc", "2", "--batch-size", "3"], "does not split evenly over 2 processes"),
        (["compare", "--backends", "torch,hf-trainer", "--nproc", "2"], "hf-trainer runs in one process only"),
        (["run", "--backend", "mlx", "--nproc", "2", "--threads", "1"], "cannot be split over 2 processes"),
        (["run", "--backend", "torch", "--nnodes", "2"], "needs --rdzv-endpoint (torch) or --hostfile"),
        (["run", "--backend", "mlx", "--nnodes", "2", "--hostfile", bad_hosts], "lists 1 hosts, --nnodes says 2"),
    ]  # fmt: skip
    for args, needle in cases:
        res = ftcore_in_process(*args, "--num-samples", "16", "--out", tmp_path / "out")
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), res.stderr
        assert needle in lines[0], lines[0]
        assert not (tmp_path / "out").exists()

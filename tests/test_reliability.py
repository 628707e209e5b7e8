"""Hostile but realistic use, through the command line (a subprocess each): nothing wrong is
reported as ok, a user's mistake is one `error:` line (exit 2) with nothing written, a backend
that fails or diverges is a row that says so (exit 1), an interrupt stops every child and marks
the run (exit 130), and no earlier result is lost."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from helpers import broken_model, ftcore, ftcore_in_process
from safetensors.numpy import load_file, save_file

pytestmark = pytest.mark.integration

FAST = ["--num-samples", "16", "--eval-samples", "4", "--max-seq-len", "64", "--batch-size", "2"]
TINY = ["--preset", "tiny", *FAST]  # random init: for runs that are killed or interrupted anyway


def assert_user_error(out, needle: str, *never_written: Path) -> None:
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2, out.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], out.stderr
    assert "Traceback" not in out.stderr + out.stdout
    for p in never_written:
        assert not p.exists(), f"{p} was written for a refused run"


def checkpoint_copy(src: Path, dst: Path, edit_tensors=None, edit_config=None) -> Path:
    """A copy of the tiny checkpoint with its fp32 tensors and/or config.json edited."""
    shutil.copytree(src, dst)
    if edit_tensors:
        tensors = load_file(dst / "model.safetensors")
        edit_tensors(tensors)
        save_file(tensors, dst / "model.safetensors")
    if edit_config:
        cfg = json.loads((dst / "config.json").read_text())
        edit_config(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}  # fmt: skip


# ----------------------------------------------------------------------------- the checkpoint


def _drop_q(t):
    del t["model.layers.0.self_attn.q_proj.weight"]


def _vocab_512(t):  # embedding and head cut to 512 rows; the tokenizer still has 1024 tokens
    t["model.embed_tokens.weight"] = t["model.embed_tokens.weight"][:512].copy()
    t["lm_head.weight"] = t["lm_head.weight"][:512].copy()


def _nan_weight(t):
    t["model.layers.1.mlp.up_proj.weight"][3, 5] = np.nan


BROKEN_CHECKPOINTS = {
    # name: (make(src, dst), needle of the one error line)
    "missing tensor": (lambda s, d: checkpoint_copy(s, d, _drop_q),
                       "lack model.layers.0.self_attn.q_proj.weight"),
    "tokenizer larger than the embedding": (
        lambda s, d: checkpoint_copy(s, d, _vocab_512, lambda c: c.update(vocab_size=512)),
        "the tokenizer has 1024 tokens but the model's embedding only 512 rows"),
    "config vocab disagrees with the weights": (
        lambda s, d: checkpoint_copy(s, d, edit_config=lambda c: c.update(vocab_size=2048)),
        "model.embed_tokens.weight has shape [1024, 128], config.json implies [2048, 128]"),
    "NaN in a weight": (lambda s, d: checkpoint_copy(s, d, _nan_weight),
                        "model.layers.1.mlp.up_proj.weight holds NaN or Inf"),
    "truncated safetensors": (lambda s, d: _truncate(checkpoint_copy(s, d), 0.5), "truncated"),
    "half-written header": (lambda s, d: _truncate(checkpoint_copy(s, d), 40), "not a safetensors file"),
    "config.json is a list": (lambda s, d: _write(checkpoint_copy(s, d) / "config.json", b"[]"),
                              "expected a JSON object, found list"),
    "config.json not UTF-8": (lambda s, d: _write(checkpoint_copy(s, d) / "config.json", b'{"a": "\xff\xfe"}'),
                              "not UTF-8"),
}  # fmt: skip


def _truncate(folder: Path, keep: float | int) -> Path:
    f = folder / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: int(len(data) * keep) if isinstance(keep, float) else keep])
    return folder


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path.parent


CASES = [("compare", case) for case in BROKEN_CHECKPOINTS] + [("run", "missing tensor")]


@pytest.mark.parametrize(("command", "case"), CASES)
def test_broken_checkpoint_is_refused_before_any_backend(case, command, tiny_model_dir, tmp_path):
    """`run --backend torch` used to train a missing tensor from a random init, exit 0."""
    make, needle = BROKEN_CHECKPOINTS[case]
    model = make(tiny_model_dir, tmp_path / "model")
    out_dir = tmp_path / "out"
    extra = ["--backend", "torch"] if command == "run" else []
    out = ftcore_in_process(command, *extra, "--model", model, "--out", out_dir, "--steps", "2", *FAST)
    assert_user_error(out, needle, out_dir)


def test_pickle_weights_allowed_run_torch_and_refuse_mlx_up_front(tiny_model_dir, tmp_path):
    model = broken_model(tiny_model_dir, tmp_path, "pickle-only")
    out = ftcore_in_process("compare", "--model", model, "--allow-pickle", "--out", tmp_path / "c", "--steps", "2", *FAST)
    assert_user_error(out, "MLX reads safetensors weights only", tmp_path / "c")  # not after torch ran
    ok = ftcore("run", "--backend", "torch", "--model", model, "--allow-pickle", "--out", tmp_path / "r",
                "--steps", "2", *FAST)  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert json.loads((tmp_path / "r" / "result.json").read_text())["status"] == "ok"


# ----------------------------------------------------------------------------- data, flags, device


def test_bad_data_and_flags_are_one_line(tmp_path, write_alpaca):
    bad_utf8 = tmp_path / "bad.jsonl"
    bad_utf8.write_bytes(b'{"instruction": "a", "output": "b\xff"}\n')
    cases = [
        (["--data", bad_utf8], "not UTF-8"),
        (["--data", write_alpaca(tmp_path / "zero.json", [{"instruction": "a", "input": 0, "output": "b"}] * 30)],
         "record 0 has a non-string 'input' (int)"),
        (["--data", write_alpaca(tmp_path / "false.json", [{"instruction": "a", "input": False, "output": "b"}] * 30)],
         "record 0 has a non-string 'input' (bool)"),
        (["--threads", "999"], "--threads 999: this process may use"),
        (["--out", tmp_path / "a-file" / "sub"], "a-file is a file, not a folder, so the run folder cannot be made below it"),
        # nothing would train (every Adam update 0) yet every step would "run": refused up front
        (["--adam-eps", "inf"], "--adam-eps: must be a finite number > 0, got inf"),
        (["--max-grad-norm", "nan"], "--max-grad-norm: must be a finite number > 0, got nan"),
        (["--seed", str(2**32)], "--seed: must be in [0, 2**32)"),
        # it once trained the whole model and recorded num_layers 1: never record what did not run
        (["--model", tmp_path, "--num-layers", "1"], "--num-layers: truncates a --preset only"),
    ]  # fmt: skip
    import mlx.core as mx
    import torch

    if not torch.cuda.is_available() and not mx.is_available(mx.gpu):  # a machine without a GPU
        cases.append((["--device", "gpu"], "--device gpu"))
    (tmp_path / "a-file").write_text("x")
    for args, needle in cases:
        out_dir = tmp_path / "out"
        full = ["--out", out_dir, *args] if "--out" not in args else args
        out = ftcore_in_process("compare", *full, "--steps", "2", *FAST)
        assert_user_error(out, needle, out_dir)


# ----------------------------------------------------------------------------- output folders


def test_out_holding_a_run_is_kept_or_replaced_whole(tmp_path):
    out_dir = tmp_path / "out"
    (out_dir / "mlx").mkdir(parents=True)
    (out_dir / "mlx" / "result.json").write_text('{"backend": "mlx", "status": "ok"}')
    (out_dir / "comparison.json").write_text("{}")
    before = tree_hashes(out_dir)
    out = ftcore_in_process("compare", "--backends", "torch", "--out", out_dir, "--steps", "2", *FAST)
    assert_user_error(out, "holds an earlier run; pass --replace")
    assert tree_hashes(out_dir) == before

    out = ftcore("compare", "--backends", "torch", "--out", out_dir, "--replace", "--steps", "2", *FAST)
    assert out.returncode == 0, out.stderr
    assert not (out_dir / "mlx").exists()  # the old mlx result is not left beside the new run
    comp = json.loads((out_dir / "comparison.json").read_text())
    assert comp["backends"] == ["torch"] and comp["all_ok"] is True
    assert json.loads((out_dir / "status.json").read_text())["status"] == "complete"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no hidden leftovers

    # a replacement that diverges keeps the complete run it was to replace; it is kept beside it
    good = tree_hashes(out_dir)
    out = ftcore("compare", "--backends", "torch", "--out", out_dir, "--replace", "--steps", "3", "--lr", "1e9",
                 "--warmup-steps", "0", *FAST)  # fmt: skip
    assert out.returncode == 1 and "torch diverged" in out.stderr, out.stderr
    assert tree_hashes(out_dir) == good and f"{out_dir} keeps the earlier run" in out.stderr
    failed = [p for p in tmp_path.iterdir() if p.name.startswith("out.failed-")]
    assert len(failed) == 1 and json.loads((failed[0] / "status.json").read_text())["status"] == "failed"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_two_compares_at_once_write_two_whole_folders(tmp_path):
    """Both into the default runs/ folder, started together: each folder holds only its own run
    (the same-second race itself: tests/test_rundir.py)."""
    args = [sys.executable, "-m", "ftcore", "compare", "--backends", "torch", "--steps", "3", *FAST]
    procs = [subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]  # fmt: skip
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
    folders = sorted((tmp_path / "runs").iterdir())
    assert len(folders) == 2
    printed = {tmp_path / Path(o.split("report: ")[1].split()[0]).parent for o, _ in outs}
    assert printed == set(folders)  # each run reports its own folder
    pids = set()
    for folder in folders:
        status = json.loads((folder / "status.json").read_text())
        assert status["status"] == "complete"
        pids.add(status["pid"])
        comp = json.loads((folder / "comparison.json").read_text())
        for r in comp["results"]:  # each row is this folder's own result file
            own = json.loads((folder / r["backend"] / "result.json").read_text())
            assert own["step_times_s"] == r["step_times_s"] and own["status"] == "ok"
    assert len(pids) == 2


# ----------------------------------------------------------------------------- divergence, kills


def test_divergence_is_a_diverged_row_and_exit_1(tmp_path):
    """lr 1e9: torch's gradient norm is NaN at step 2 (its loss still finite), hf-trainer (which
    checks the loss only) sees a NaN loss at step 3; MLX's loss stays finite, pinned at ln(vocab)
    with lora_B ~1e9: the parent's check of the adapter (ftcore.run.training_health) calls it."""
    out_dir = tmp_path / "out"
    out = ftcore("compare", "--backends", "torch,hf-trainer,mlx", "--out", out_dir, "--lr", "1e9",
                 "--warmup-steps", "0", "--lr-schedule", "constant", "--steps", "4", *FAST)  # fmt: skip
    assert out.returncode == 1, out.stderr
    assert "Traceback" not in out.stderr
    comp = json.loads((out_dir / "comparison.json").read_text())
    diverged = [r for r in comp["rows"] if r["status"] == "diverged"]
    assert {r["backend"] for r in diverged} == {"torch", "hf-trainer", "mlx"} and comp["all_ok"] is False
    errors = " ".join(r["error"] for r in diverged)
    assert "the gradient norm is nan" in errors and "the loss is nan" in errors  # both checks
    mlx = next(r for r in diverged if r["backend"] == "mlx")
    assert "the adapter's weights exploded: max |w| = " in mlx["error"], mlx["error"]
    assert f"error: mlx diverged: {mlx['error']}" in out.stderr
    for r in diverged:
        if r["backend"] == "mlx":
            continue
        assert "diverged at step" in r["error"] and ("nan" in r["error"] or "inf" in r["error"])
        assert f"error: {r['backend']} diverged: diverged at step" in out.stderr
    assert out.stdout.splitlines()[0].startswith("NOT OK - ")
    assert json.loads((out_dir / "status.json").read_text())["status"] == "failed"


def _start(args, cwd):
    """The CLI as a terminal starts a job: its own process group, SIGINT at its default action.
    (pytest run in the background by a non-interactive shell inherits SIGINT ignored, and Python
    keeps an ignored SIGINT ignored, as `nohup`-style launchers expect: the restore makes these
    tests test ftcore, not how pytest was started.)"""
    return subprocess.Popen([sys.executable, "-m", "ftcore", *map(str, args)], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip


def _wait_training(proc, backend="torch", timeout=120) -> list[psutil.Process]:
    """Read stderr until `backend` reports a step; the parent's children then."""
    t0 = time.monotonic()
    for line in proc.stderr:
        if line.startswith(f"[{backend}] step"):
            return psutil.Process(proc.pid).children(recursive=True)
        assert time.monotonic() - t0 < timeout, "the backend never started training"
    raise AssertionError(f"the CLI ended before {backend} trained")


def test_killed_backend_is_a_failed_row_without_oom_guess(tmp_path):
    proc = _start(["compare", "--backends", "torch", "--out", tmp_path / "out", "--steps", "400", *TINY], tmp_path)
    children = _wait_training(proc)
    os.kill(children[0].pid, signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 1, stderr
    row = next(r for r in json.loads((tmp_path / "out" / "comparison.json").read_text())["rows"]
               if r["backend"] == "torch")  # fmt: skip
    assert row["status"] == "failed" and "killed by SIGKILL" in row["error"]
    assert "out of memory" not in row["error"]  # the kernel's OOM counter did not move


@pytest.mark.parametrize("how", ["SIGINT to the group", "SIGINT to the parent", "SIGTERM to the parent",
                                 "two Ctrl-C"])  # fmt: skip
def test_interrupt_stops_children_and_marks_the_run(how, tmp_path):
    out_dir = tmp_path / "out"
    proc = _start(["compare", "--out", out_dir, "--steps", "400", *TINY], tmp_path)
    children = _wait_training(proc)
    assert children
    if how == "SIGINT to the group":
        os.killpg(proc.pid, signal.SIGINT)
    elif how == "SIGINT to the parent":
        proc.send_signal(signal.SIGINT)
    elif how == "SIGTERM to the parent":
        proc.send_signal(signal.SIGTERM)
    else:
        os.killpg(proc.pid, signal.SIGINT)
        time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    assert stderr.strip().splitlines()[-1].startswith("error: interrupted")
    time.sleep(0.5)
    alive = [c.pid for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"orphaned children: {alive}"
    if how != "two Ctrl-C":  # the second one exits at once, before the status is written
        status = json.loads((out_dir / "status.json").read_text())
        assert status["status"] == "interrupted" and status["exit_code"] == 130
    assert not (out_dir / "comparison.json").exists()


def test_killed_parent_leaves_no_orphan(tmp_path):
    proc = _start(["compare", "--out", tmp_path / "out", "--steps", "400", *TINY], tmp_path)
    children = _wait_training(proc)
    proc.kill()  # SIGKILL: no handler runs; the children must go by themselves
    proc.communicate(timeout=30)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        alive = [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
        if not alive:
            break
        time.sleep(0.2)
    assert not alive, f"orphaned children: {[c.pid for c in alive]}"


def test_second_interrupt_still_says_one_error_line():
    """The second Ctrl-C exits at once (os._exit), and may come before the first one's message:
    it says its own line, never an empty stderr."""
    code = "from ftcore import cli; cli._second_interrupt(2, None)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 130
    assert res.stderr.strip().splitlines() == ["error: interrupted twice; children killed, exiting at once"]

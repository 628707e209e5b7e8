"""The torch and hf-trainer backends through the real runner (fresh child processes)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import numpy as np
import pytest
import torch
from helpers import RESULT_FIELDS

from ftcore.backends.result_fields import PROBE_FILE, PROBE_POSITIONS, probe_batch
from ftcore.inputs.arch import read_arch
from ftcore.inputs.lora_init import initial_lora_state, state_fingerprint
from ftcore.inputs.loss_contract import micro_batches, target_count
from ftcore.measure.flops import lora_param_count
from ftcore.run.backend_process import run_backend
from ftcore.run.preflight import prepare
from ftcore.tolerances import FP32_GRAD_ACCUM_ATOL, FP32_LOGITS_ATOL, REFERENCE_LOSS_ATOL

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    """torch and hf-trainer on one prepared config (20 steps, fp32)."""
    from ftcore.config import RunConfig

    cfg = RunConfig(
        num_samples=16, eval_samples=4, max_seq_len=64, batch_size=2, steps=20, warmup_steps=2
    )
    root = tmp_path_factory.mktemp("torch-runs")
    prep = prepare(cfg, root)
    return prep, {b: (run_backend(b, prep, root / b), root / b) for b in ("torch", "hf-trainer")}


def test_torch_run_is_complete_and_learns(runs):
    prep, all_runs = runs
    r, out = all_runs["torch"]
    assert r.status == "ok", r.error
    saved = json.loads((out / "result.json").read_text())
    assert not [f for f in RESULT_FIELDS if saved.get(f) in (None, "")]
    assert len(r.losses) == 20 and r.final_loss == r.losses[-1]
    assert r.final_loss < r.losses[0] - 0.2  # clearly learns within 20 steps
    assert r.eval_loss is not None and np.isfinite(r.eval_loss)
    assert r.tokens_per_s > r.loss_tokens_per_s > 0
    assert r.train_time_s > 0 and r.load_time_s > 0 and len(r.step_times_s) == 20
    assert r.peak_rss_mb >= r.baseline_rss_mb > 100  # torch + a model is well over 100 MB
    assert r.framework_peak_mb is None  # CPU torch has no allocator peak: never a made-up figure
    arch = read_arch(prep.model_dir)
    assert r.trainable_params == lora_param_count(arch, prep.cfg.lora_targets, prep.cfg.lora_rank)
    assert r.flops_per_token > 0 and 0 < r.mfu < 1
    assert r.batch_fingerprint == prep.batches.fingerprint
    init = initial_lora_state(arch, prep.cfg.lora_targets, prep.cfg.lora_rank, prep.cfg.seed)
    assert r.initial_adapter_fingerprint == state_fingerprint(init)
    assert r.blas and r.threads == prep.cfg.threads
    assert r.env["cpu"] and r.env["versions"]["torch"]


def test_hf_trainer_matches_the_plain_loop(runs):
    _, all_runs = runs
    t, h = all_runs["torch"][0], all_runs["hf-trainer"][0]
    assert h.status == "ok", h.error
    diff = np.abs(np.array(t.losses) - np.array(h.losses)).max()
    assert diff < REFERENCE_LOSS_ATOL, diff
    assert abs(t.eval_loss - h.eval_loss) < REFERENCE_LOSS_ATOL
    assert h.extra["trainer_overhead_s"] >= 0 and "trainer_init_s" in h.extra


@pytest.mark.parametrize("batching, fine_tune, grad_accum", [
    ("padded", "lora", 1), ("packed", "lora", 1), ("longest", "dora", 2), ("longest", "full", 2)])
def test_hf_trainer_matches_the_plain_loop_in_every_batching(tmp_path, batching, fine_tune,
                                                             grad_accum):
    """The default (`longest`, LoRA) is the test above; here the other two batchings, and
    --fine-tune dora and full with 2 micro-batches a step (the Trainer's own accumulation), 6
    steps each, both loops run in this process: the Trainer is fed the same rows (position_ids too
    when packed), trains the same weights from the same values and ends on the same losses."""
    from ftcore.backends import BACKENDS
    from ftcore.config import RunConfig

    cfg = RunConfig(num_samples=16, eval_samples=4, max_seq_len=128, batch_size=2, steps=6,
                    warmup_steps=1, batching=batching, threads=1, fine_tune=fine_tune,
                    grad_accum=grad_accum,
                    weight_decay=0.05)  # on: the Trainer's default groups would spare the norms
    prep = prepare(cfg, tmp_path)
    if batching == "packed":  # 2-3 records a row at 128 tokens
        assert prep.batches.stats["packed_rows"] < prep.batches.stats["train_records"]
    t, h = (BACKENDS[b].train(prep.cfg, prep.model_dir, prep.batches, tmp_path / b) for b in ("torch", "hf-trainer"))
    assert t.status == h.status == "ok", (t.error, h.error)
    assert t.fed_batches_fingerprint == h.fed_batches_fingerprint
    assert t.fine_tune == h.fine_tune == fine_tune and t.grad_accum == h.grad_accum == grad_accum
    assert t.initial_adapter_fingerprint == h.initial_adapter_fingerprint
    assert t.trainable_params == h.trainable_params == t.trainable_params_expected
    assert t.optimizer == h.optimizer  # lr per step, and the decay of each trained tensor
    np.testing.assert_allclose(h.losses, t.losses, rtol=0, atol=REFERENCE_LOSS_ATOL)
    assert abs(t.eval_loss - h.eval_loss) < REFERENCE_LOSS_ATOL


# --batch-size 8, and --batch-size 2 --grad-accum 4: the same 8 rows a step (the batches are built
# at batch-size x grad-accum rows), fp32, `padded`, the prompt masked (records of several lengths:
# the micro-batches' target counts differ)
ACCUM = dict(preset="tiny", num_samples=16, eval_samples=0, max_seq_len=64, steps=3, warmup_steps=1,
             batching="padded", threads=1)
ACCUM_SHAPES = {"one": (8, 1), "accum": (2, 4)}  # name: (batch_size, grad_accum)


@pytest.fixture(scope="module")
def accum_runs(tmp_path_factory, tiny_model_dir):
    """torch and hf-trainer in this process, each at both ACCUM_SHAPES: (preps, {(backend, name):
    result}, root); a run's adapter is under root/name/backend."""
    from ftcore.backends import BACKENDS
    from ftcore.config import RunConfig

    root = tmp_path_factory.mktemp("accum")
    preps = {n: prepare(RunConfig(**ACCUM, batch_size=b, grad_accum=g), root / n)
             for n, (b, g) in ACCUM_SHAPES.items()}  # fmt: skip
    runs = {(b, n): BACKENDS[b].train(p.cfg, p.model_dir, p.batches, root / n / b)
            for n, p in preps.items() for b in ("torch", "hf-trainer")}  # fmt: skip
    return preps, runs, root


@pytest.mark.parametrize("backend", ["torch", "hf-trainer"])
def test_grad_accum_equals_one_batch_of_all_rows(accum_runs, backend):
    """The loss contract: each micro-batch's summed loss over the WHOLE step's target count, so
    4 micro-batches of 2 rows train as one batch of 8: the same per-step losses and the same
    trained adapter (a mean of the micro-batches' means moves the losses by ~0.04)."""
    from parity_utils import initial_peft_adapter, read_adapter

    preps, runs, root = accum_runs
    one, acc = runs[backend, "one"], runs[backend, "accum"]
    assert one.status == acc.status == "ok", (one.error, acc.error)
    batches = preps["accum"].batches
    np.testing.assert_array_equal(batches.train["labels"], preps["one"].batches.train["labels"])
    counts = [[target_count(m["labels"]) for m in micro_batches(batches.step(s), 4)] for s in range(3)]
    assert all(len(set(c)) > 1 for c in counts), counts  # uneven: a mean of means would differ
    assert (one.grad_accum, acc.grad_accum) == (1, 4)  # counted by the loop / the Trainer
    assert acc.fed_batches_fingerprint == one.fed_batches_fingerprint  # each step's 8 rows, whole
    np.testing.assert_allclose(acc.losses, one.losses, rtol=0, atol=FP32_GRAD_ACCUM_ATOL)
    trained, want = read_adapter(root / "accum" / backend), read_adapter(root / "one" / backend)
    init = initial_peft_adapter(preps["one"].cfg, preps["one"].model_dir)
    for k in want:
        np.testing.assert_allclose(trained[k], want[k], rtol=0, atol=FP32_GRAD_ACCUM_ATOL, err_msg=k)
    assert max(np.abs(want[k] - init[k]).max() for k in want) > 100 * FP32_GRAD_ACCUM_ATOL  # trained


def test_hf_trainer_accumulates_as_the_plain_loop(accum_runs):
    """--grad-accum 4: the Trainer's micro-batches are the torch loop's, fed whole once a step, at
    the same LRs, ending on the same losses."""
    _, runs, _ = accum_runs
    t, h = runs["torch", "accum"], runs["hf-trainer", "accum"]
    assert t.fed_batches_fingerprint == h.fed_batches_fingerprint
    assert h.optimizer["lr_per_step"] == t.optimizer["lr_per_step"] and len(h.losses) == 3
    np.testing.assert_allclose(h.losses, t.losses, rtol=0, atol=REFERENCE_LOSS_ATOL)


@pytest.mark.parametrize("backend", ["torch", "hf-trainer"])
def test_saved_adapter_reproduces_trained_logits(runs, backend):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    prep, all_runs = runs
    _, out = all_runs[backend]
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    base = LlamaForCausalLM.from_pretrained(str(prep.model_dir), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(out / "adapter")).eval()
    b = probe_batch(prep.batches)
    with torch.no_grad():
        logits = model(
            input_ids=torch.from_numpy(b["input_ids"]),
            attention_mask=torch.from_numpy(b["attention_mask"]),
        ).logits[0, :PROBE_POSITIONS]
    trained = np.load(out / PROBE_FILE)
    np.testing.assert_allclose(logits.numpy(), trained, atol=FP32_LOGITS_ATOL, rtol=0)
    # and the adapter really moved: the base model alone gives other logits
    with torch.no_grad(), model.disable_adapter():
        plain = model(input_ids=torch.from_numpy(b["input_ids"])).logits[0, :PROBE_POSITIONS]
    assert np.abs(plain.numpy() - trained).max() > 1e-3


def test_killed_backend_is_a_failed_row(tiny_model_dir, tmp_path, small_cfg):
    prep = prepare(small_cfg.replace(steps=5000), tmp_path)

    def kill_when_training(proc):  # 5000 steps run for minutes; after 8 s it is mid-run
        threading.Timer(
            8.0, lambda: proc.poll() is None and proc.send_signal(signal.SIGKILL)
        ).start()

    # an earlier run's success in the same folder must not be taken for this run's result
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "result.json").write_text(json.dumps({"backend": "torch", "status": "ok"}))
    os.utime(tmp_path / "run" / "result.json", (time.time() - 60, time.time() - 60))
    r = run_backend("torch", prep, tmp_path / "run", on_start=kill_when_training)
    assert r.status == "failed"
    assert "killed by SIGKILL" in r.error
    saved = json.loads((tmp_path / "run" / "result.json").read_text())
    assert saved["status"] == "failed" and saved["losses"] == []


def test_error_inside_backend_is_a_failed_row_with_reason(tmp_path, small_cfg):
    if torch.cuda.is_available() or torch.backends.mps.is_available():
        pytest.skip("a GPU is present, so --device gpu is not an error here")
    prep = prepare(small_cfg.replace(device="gpu"), tmp_path)
    r = run_backend("torch", prep, tmp_path / "run")
    assert r.status == "failed" and "--device gpu: torch sees no CUDA or MPS device" in r.error

"""The `mlx` and `mlx-lm` backends end to end, each in its real child process (ftcore.run.backend_process):
loss falls, every result field is filled, the saved adapters load in PEFT and mlx-lm and
reproduce the MLX model's logits, the conversion cache is reused, a missing GPU is a clean error."""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from helpers import RESULT_FIELDS, torch_logits
from safetensors.numpy import load_file

from ftcore.backends.mlx_lm import offsets_lengths
from ftcore.config import RunConfig
from ftcore.inputs.arch import read_arch
from ftcore.inputs.lora_init import initial_lora_state, state_fingerprint
from ftcore.mlx.adapters import peft_to_mlx_adapter
from ftcore.mlx.lora import apply_lora, load_lora_state
from ftcore.mlx.model import load_model
from ftcore.run.backend_process import run_backend
from ftcore.run.preflight import prepare
from ftcore.tolerances import FP32_LOGITS_ATOL, FP32_LOSS_ATOL

pytestmark = pytest.mark.integration

# conftest's small_cfg, module-scoped here so that several tests share one run per backend.
CFG = RunConfig(  # the random `tiny` preset: the tests below rebuild its base from tiny_model_dir
    preset="tiny", num_samples=16, eval_samples=4, max_seq_len=64, batch_size=2, steps=8, warmup_steps=1
)


@pytest.fixture(scope="module")
def prep(tiny_model_dir, tmp_path_factory):
    return prepare(CFG, tmp_path_factory.mktemp("mlx-prep"))


@pytest.fixture(scope="module")
def mlx_run(prep, tmp_path_factory):
    out = tmp_path_factory.mktemp("mlx-run")
    return run_backend("mlx", prep, out), out


def mlx_logits(prep, result, adapter: dict[str, mx.array], batch, lora: bool = True) -> np.ndarray:
    """Logits of the run's converted base (+ `adapter`, lora_state keys) in ftcore's MLX model."""
    model, _ = load_model(Path(result.extra["conversion_dir"]))
    if lora:
        apply_lora(model, CFG.lora_targets, CFG.lora_rank, CFG.lora_alpha)
        load_lora_state(model, adapter)
    return np.array(model(mx.array(batch["input_ids"]), mx.array(batch["attention_mask"])))


def test_mlx_run_fills_every_field(mlx_run, prep, tiny_model_dir):
    result, out = mlx_run
    assert result.status == "ok", result.error
    on_disk = json.loads((out / "result.json").read_text())
    assert not [f for f in RESULT_FIELDS if on_disk.get(f) in (None, "")]
    assert len(result.losses) == CFG.steps and all(map(math.isfinite, result.losses))
    assert result.losses[-1] < result.losses[0]
    assert result.eval_loss is not None and math.isfinite(result.eval_loss)
    assert result.tokens_per_s > 0 and result.loss_tokens_per_s > 0 and result.load_time_s > 0
    assert result.peak_rss_mb > result.baseline_rss_mb > 0
    assert result.framework_peak_mb > 0
    assert result.blas and result.extra["blas_probe"]["name"] in result.blas
    assert result.threads == prep.cfg.threads
    # one CPU stream per thread when the batch's rows split evenly (ftcore.mlx.streams)
    threads = prep.cfg.threads
    assert result.extra["cpu_streams"] == (threads if CFG.batch_size % threads == 0 else 1)
    assert 0 < result.cpu_busy_threads <= threads + 0.5
    assert result.optimizer["bias_correction"] is True
    assert isinstance(result.compiled_step, bool)
    init = initial_lora_state(read_arch(tiny_model_dir), CFG.lora_targets, CFG.lora_rank, CFG.seed)
    assert result.initial_adapter_fingerprint == state_fingerprint(init)
    # MLX's one decay on every adapter tensor, under the keys the torch side records too
    assert result.optimizer["weight_decay_per_tensor"] == dict.fromkeys(init, CFG.weight_decay)


def test_peft_adapter_reproduces_mlx_logits(mlx_run, prep, tiny_model_dir):
    """out/adapter loads with PeftModel.from_pretrained on the HF base: same logits as MLX (fp32)."""
    import torch
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    result, out = mlx_run
    peft_state = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert any(
        k.endswith("lora_B.weight") and np.abs(v).max() > 0 for k, v in peft_state.items()
    ), "B never trained"
    # the mlx-lm copy holds the same arrays, transposed
    mlx_lm_state = load_file(str(out / "adapter_mlx_lm" / "adapters.safetensors"))
    for key, value in peft_state.items():
        module, leaf = key.removeprefix("base_model.model.").removesuffix(".weight").rsplit(".", 1)
        np.testing.assert_array_equal(mlx_lm_state[f"{module}.{leaf.lower()}"].T, value)

    batch = prep.batches.step(0)
    ours = mlx_logits(prep, result, peft_to_mlx_adapter(peft_state), batch)
    base = LlamaForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(out / "adapter")).eval()
    theirs = torch_logits(peft_model, batch["input_ids"], batch["attention_mask"])
    np.testing.assert_allclose(ours, theirs, atol=FP32_LOGITS_ATOL, rtol=0)


def test_conversion_cache_reused(mlx_run, prep, tmp_path):
    first, _ = mlx_run
    second = run_backend("mlx", prep, tmp_path / "again")
    assert second.status == "ok", second.error
    assert second.extra["conversion_cache_hit"] is True
    assert second.extra["conversion_dir"] == first.extra["conversion_dir"]
    assert second.losses == first.losses  # same inputs, same numbers


def test_gpu_without_one_is_a_clean_failed_row(small_cfg, tiny_model_dir, tmp_path):
    if mx.is_available(mx.gpu):
        pytest.skip("this MLX build has a GPU")
    prep = prepare(small_cfg.replace(device="gpu"), tmp_path / "prep")
    result = run_backend("mlx", prep, tmp_path / "out")
    assert result.status == "failed"
    assert result.error.startswith("--device gpu:") and "no GPU" in result.error
    assert result.traceback is None


@pytest.mark.mlx_lm
def test_mlx_lm_reference_runs(mlx_run, prep, tiny_model_dir, tmp_path):
    """mlx-lm's own loader, LoRA and trainer on the same batches; its adapter matches our model."""
    pytest.importorskip("mlx_lm", reason="mlx-lm is not installed (optional extra ftcore[mlx-lm])")
    from mlx_lm.tuner.utils import load_adapters
    from mlx_lm.utils import load_model as mlx_lm_load_model

    result = run_backend("mlx-lm", prep, tmp_path / "out")
    assert result.status == "ok", result.error
    assert len(result.losses) == CFG.steps and result.losses[-1] < result.losses[0]
    assert result.tokens_per_s > 0 and result.peak_rss_mb > result.baseline_rss_mb > 0
    assert result.initial_adapter_fingerprint == mlx_run[0].initial_adapter_fingerprint
    assert result.optimizer["bias_correction"] is False
    assert result.optimizer["weight_decay_per_tensor"] == mlx_run[0].optimizer["weight_decay_per_tensor"]
    assert any(n.startswith("numerics differ: ") for n in result.notes)

    # Step 0 runs with B = 0, i.e. the base model: its loss is the mean CE over mlx-lm's targets,
    # which are ours plus the pad target after each untruncated row.
    batch = prep.batches.step(0)
    logits = mlx_logits(prep, mlx_run[0], {}, batch, lora=False)[:, :-1].astype(np.float64)
    m = logits.max(-1, keepdims=True)
    logp = logits - (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))
    ce = -np.take_along_axis(logp, batch["input_ids"][:, 1:, None], -1)[..., 0]  # (B, L-1)
    ol = offsets_lengths(batch)
    positions = np.arange(1, batch["input_ids"].shape[1])[None]
    theirs_mask = (positions >= ol[:, :1]) & (positions <= ol[:, 1:])
    ours_mask = batch["labels"][:, 1:] != -100
    assert theirs_mask.sum() == ours_mask.sum() + (ol[:, 1] < batch["input_ids"].shape[1]).sum()
    assert not (ours_mask & ~theirs_mask).any()
    assert result.losses[0] == pytest.approx(ce[theirs_mask].mean(), abs=FP32_LOSS_ATOL)

    # mlx-lm reads back its own adapter folder; our model with the PEFT copy gives the same logits
    model, _ = mlx_lm_load_model(tiny_model_dir, model_config={"tie_word_embeddings": False})
    load_adapters(model, str(tmp_path / "out" / "adapter_mlx_lm"))
    batch = prep.batches.step(0)
    real = batch["attention_mask"].astype(bool)  # mlx-lm's model takes no padding mask
    theirs = np.array(model(mx.array(batch["input_ids"])))
    peft_state = load_file(str(tmp_path / "out" / "adapter" / "adapter_model.safetensors"))
    ours = mlx_logits(prep, mlx_run[0], peft_to_mlx_adapter(peft_state), batch)
    np.testing.assert_allclose(ours[real], theirs[real], atol=FP32_LOGITS_ATOL, rtol=0)


def test_mlx_compiles_once_per_distinct_width(tmp_path, write_alpaca):
    """`longest` batches of several widths: the compiled step is traced once per distinct width
    (MLX keeps each shape's trace), never once per step."""
    from test_data import _varied_records

    data = write_alpaca(tmp_path / "varied.json", _varied_records(40))
    cfg = CFG.replace(data=str(data), num_samples=30, max_seq_len=256, batch_size=2, steps=12, batching="longest")
    p = prepare(cfg, tmp_path / "prep")
    widths = p.batches.train["widths"].tolist()
    assert len(set(widths)) >= 3 and len(set(widths)) < len(widths)
    result = run_backend("mlx", p, tmp_path / "out")
    assert result.status == "ok", result.error
    assert result.extra["compiled_traces"] == len(set(widths)) == p.batches.stats["distinct_widths"]
    assert 0 < result.real_tokens_per_s < result.tokens_per_s

"""Gradient checkpointing (--grad-checkpoint): each layer recomputed in the backward pass gives the
same training as keeping its activations, in torch (transformers' gradient_checkpointing_enable)
and in MLX (mx.checkpoint per layer); and the analytic memory model (ftcore.measure.memory_model)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import ftcore_in_process, ftcore_together

from ftcore.config import RunConfig
from ftcore.lora_targets import LORA_TARGETS
from ftcore.measure.memory_model import base_param_count, memory_model
from ftcore.tolerances import FP32_GRAD_CHECKPOINT_LOSS_ATOL

TINYLLAMA = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
             "num_attention_heads": 32, "num_key_value_heads": 4, "vocab_size": 32000,
             "head_dim": 64}  # fmt: skip
# random `tiny`, 6 steps; torch with dropout 0.1 (its checkpoint replays the RNG: the same masks),
# MLX without (refused: its recomputation would draw new masks)
SMALL = ["--preset", "tiny", "--num-samples", "16", "--eval-samples", "4", "--max-seq-len", "64",
         "--batch-size", "4", "--steps", "6", "--no-eval-generate"]  # fmt: skip
DROPOUT = {"torch": ["--lora-dropout", "0.1"], "mlx": ["--lora-dropout", "0"]}


@pytest.mark.integration
@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_grad_checkpoint_trains_the_same(backend: str, tmp_path) -> None:
    flags = {"plain": [], "ckpt": ["--grad-checkpoint"]}
    done = ftcore_together(*(["run", "--backend", backend, *SMALL, *DROPOUT[backend], *flags[name], "--out", tmp_path / name]
                             for name in flags), timeout=600)  # fmt: skip
    runs = {}
    for name, res in zip(flags, done, strict=True):
        assert res.returncode == 0, res.stderr[-3000:]
        runs[name] = json.loads((tmp_path / name / "result.json").read_text())
    plain, ckpt = runs["plain"], runs["ckpt"]
    assert ckpt["config"]["grad_checkpoint"] and not plain["config"]["grad_checkpoint"]
    assert ckpt["memory_model"]["checkpoint"] and not plain["memory_model"]["checkpoint"]
    assert len(plain["losses"]) == len(ckpt["losses"]) == 6
    assert plain["losses"][-1] < plain["losses"][0]  # it trained
    diff = np.abs(np.array(plain["losses"]) - np.array(ckpt["losses"])).max()
    assert diff <= FP32_GRAD_CHECKPOINT_LOSS_ATOL, (plain["losses"], ckpt["losses"])
    assert abs(plain["eval_loss"] - ckpt["eval_loss"]) <= FP32_GRAD_CHECKPOINT_LOSS_ATOL
    assert ckpt["cpu_busy_threads"] > 0
    # and the layers really were recomputed: transformers says so for torch; MLX's allocator peak
    # (exact, not sampled) drops once activations are no longer kept
    if backend == "torch":
        assert ckpt["extra"]["grad_checkpoint_active"] and not plain["extra"]["grad_checkpoint_active"]
    else:
        assert ckpt["framework_peak_mb"] < plain["framework_peak_mb"], (ckpt["framework_peak_mb"], plain["framework_peak_mb"])
        # row streams need mx.eval's unlimited width, which checkpointing gives up (ftcore.mlx.env)
        assert ckpt["extra"]["cpu_streams"] == 1 < plain["extra"]["cpu_streams"]


@pytest.mark.integration
def test_mlx_grad_checkpoint_with_dropout_is_refused(tmp_path) -> None:
    res = ftcore_in_process("run", "--backend", "mlx", *SMALL, "--lora-dropout", "0.1", "--grad-checkpoint",
                            "--out", tmp_path / "r")  # fmt: skip
    assert res.returncode == 2 and res.stderr.strip().splitlines()[-1].startswith("error: --grad-checkpoint")
    assert "Traceback" not in res.stderr


@pytest.mark.unit
def test_memory_model_counts_tinyllama() -> None:
    assert base_param_count(TINYLLAMA) == 1_100_048_384  # TinyLlama-1.1B's parameter count
    cfg = RunConfig(precision="fp32", max_seq_len=256, lora_targets=LORA_TARGETS, lora_rank=8)
    plain = memory_model(TINYLLAMA, cfg, 2, 256)
    ckpt = memory_model(TINYLLAMA, cfg.replace(grad_checkpoint=True), 2, 256)
    half = memory_model(TINYLLAMA, cfg.replace(precision="bf16"), 2, 256)
    assert plain["weights"] == pytest.approx(1_100_048_384 * 4 / 2**20)
    assert half["weights"] == pytest.approx(plain["weights"] / 2)
    lora = 22 * 8 * (2048 + 2048 + 2 * (2048 + 256) + 2048 + 2048 + 3 * (2048 + 5632))
    assert plain["adapters"] == pytest.approx(lora * 4 / 2**20)
    assert plain["adamw_state"] == pytest.approx(2 * plain["grads"])  # fp32 in both precisions
    assert half["adamw_state"] == plain["adamw_state"]
    assert plain["logits"] == pytest.approx(2 * 512 * 32000 * 4 / 2**20)
    # per token and layer: 4 hidden-size tensors, q,k,v, probs (32 x 256), attention output,
    # 4 intermediate-size tensors, a rank-8 intermediate per target
    per = 4 * 2048 + (32 + 8) * 64 + 32 * 256 + 32 * 64 + 4 * 5632 + 7 * 8
    assert plain["saved_activations"] == pytest.approx(22 * 512 * per * 4 / 2**20)
    assert ckpt["saved_activations"] == pytest.approx((22 * 512 * 2048 + 512 * per) * 4 / 2**20)
    assert ckpt["total"] < plain["total"] - 1500  # checkpointing saves ~1.7 GB here
    parts = [v for k, v in plain.items() if k not in ("total", "checkpoint", "fine_tune")]
    assert plain["total"] == pytest.approx(sum(parts))


@pytest.mark.unit
def test_memory_model_counts_a_full_fine_tune_and_dora() -> None:
    """Full: grads and AdamW's two moments for every decoder layer weight, no adapters, no LoRA
    intermediates; DoRA: LoRA's plus a magnitude per output row (params, grads, moments), two saved
    outputs per targeted linear and token, and the largest W + scale B A and B A each step."""
    cfg = RunConfig(precision="fp32", max_seq_len=256, lora_targets=LORA_TARGETS, lora_rank=8)
    lora, full = memory_model(TINYLLAMA, cfg, 2, 256), memory_model(
        TINYLLAMA, cfg.replace(fine_tune="full"), 2, 256)
    dora = memory_model(TINYLLAMA, cfg.replace(fine_tune="dora"), 2, 256)
    layer = 2 * 2048 * 2048 + 2 * 2048 * 256 + 3 * 2048 * 5632 + 2 * 2048  # 7 linears, 2 norms
    assert full["adapters"] == 0 and full["fine_tune"] == "full"
    assert full["grads"] == pytest.approx(22 * layer * 4 / 2**20)  # ~3.6 GB
    assert full["adamw_state"] == pytest.approx(2 * full["grads"])
    assert full["saved_activations"] == pytest.approx(
        lora["saved_activations"] - 22 * 512 * 7 * 8 * 4 / 2**20)
    outs = 2048 + 256 + 256 + 2048 + 5632 + 5632 + 2048  # out features of the 7 linears
    assert dora["adapters"] - lora["adapters"] == pytest.approx(22 * outs * 4 / 2**20)
    assert dora["adamw_state"] - lora["adamw_state"] == pytest.approx(2 * 22 * outs * 4 / 2**20)
    assert dora["saved_activations"] - lora["saved_activations"] == pytest.approx(
        22 * 512 * 2 * outs * 4 / 2**20)
    assert dora["dora_norm"] == pytest.approx(2 * 2048 * 5632 * 4 / 2**20) and lora["dora_norm"] == 0
    for m in (lora, full, dora):
        parts = [v for k, v in m.items() if k not in ("total", "checkpoint", "fine_tune")]
        assert m["total"] == pytest.approx(sum(parts))

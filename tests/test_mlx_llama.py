"""MLX Llama and LoRA against transformers + peft: logits, padding, RoPE convention, adapters."""

from __future__ import annotations

import math
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from helpers import TINY, max_err_real, mlx_logits, save_hf_model, torch_logits
from hypothesis import given
from hypothesis import strategies as st
from mlx.utils import tree_flatten
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from transformers import LlamaForCausalLM

from ftcore.mlx.adapters import mlx_to_peft_adapter, peft_to_mlx_adapter
from ftcore.mlx.convert import convert_hf_to_mlx
from ftcore.mlx.lora import LoRALinear, apply_lora, load_lora_state, lora_state
from ftcore.mlx.model import ModelArgs, load_model
from ftcore.tolerances import BF16_LOGITS_RTOL, FP32_LOGITS_ATOL

pytestmark = pytest.mark.parity

B, L = 3, 16


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    return save_hf_model(tmp_path_factory.mktemp("hf") / "tiny")


@pytest.fixture(scope="module")
def mlx_dir(hf_dir, tmp_path_factory) -> Path:
    return convert_hf_to_mlx(hf_dir, tmp_path_factory.mktemp("mlx") / "tiny")


def batch(padding: str | None) -> tuple[np.ndarray, np.ndarray]:
    """(B, L) ids and a 1/0 attention mask; rows of different lengths padded right or left."""
    rng = np.random.default_rng(0)
    ids = rng.integers(0, TINY["vocab_size"], (B, L))
    mask = np.ones((B, L), dtype=np.int64)
    if padding is not None:
        for row, n in enumerate((L, L - 5, 3)):
            if padding == "right":
                mask[row, n:] = 0
            else:
                mask[row, : L - n] = 0
    return ids, mask


def hf_logits(
    hf_dir: Path, ids: np.ndarray, mask: np.ndarray | None, attn: str = "sdpa"
) -> np.ndarray:
    model = LlamaForCausalLM.from_pretrained(hf_dir, attn_implementation=attn).eval()
    return torch_logits(model, ids, mask)


def test_args_from_hf_config():
    base = dict(
        vocab_size=10,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
    )
    a = ModelArgs.from_hf_config(
        {**base, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}
    )
    assert (a.rope_theta, a.head_dim, a.num_key_value_heads, a.tie_word_embeddings) == (
        5e5,
        4,
        2,
        False,
    )
    assert (
        ModelArgs.from_hf_config({**base, "rope_theta": 123.0, "rope_scaling": None}).rope_theta
        == 123.0
    )
    for bad in (
        {"rope_scaling": {"type": "linear", "factor": 2.0}},
        {"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}},
        {"attention_bias": True},
        {"mlp_bias": True},
        {"hidden_act": "gelu"},
    ):
        with pytest.raises(ValueError):
            ModelArgs.from_hf_config({**base, **bad})


@pytest.mark.parametrize(
    "padding,attn",
    [(None, "sdpa"), ("right", "sdpa"), ("left", "sdpa"), ("right", "eager"), ("left", "eager")],
)
def test_logits_match_hf_fp32(hf_dir, mlx_dir, padding, attn):
    model, _ = load_model(mlx_dir)
    ids, mask = batch(padding)
    am = None if padding is None else mask
    ref, got = hf_logits(hf_dir, ids, am, attn), mlx_logits(model, ids, am)
    assert np.isfinite(got).all()  # fully masked rows (left-pad queries) must not be NaN
    assert np.abs(ref).max() > 1.0  # logits are not trivially small
    assert max_err_real(ref, got, mask) < FP32_LOGITS_ATOL


@pytest.fixture(scope="module")
def pair(hf_dir, mlx_dir):
    """(HF sdpa model, MLX model) loaded once, for the property test."""
    return LlamaForCausalLM.from_pretrained(hf_dir).eval(), load_model(mlx_dir)[0]


@given(
    rows=st.lists(st.tuples(st.integers(1, 10), st.booleans()), min_size=1, max_size=3),
    seed=st.integers(0, 2**16),
)
def test_any_padding_matches_hf(pair, rows, seed):
    """Rows of any real length, each padded left or right, in one batch of length 10."""
    hf, model = pair
    ids = np.random.default_rng(seed).integers(0, TINY["vocab_size"], (len(rows), 10))
    mask = np.zeros_like(ids)
    for i, (n, left) in enumerate(rows):
        if left:
            mask[i, 10 - n :] = 1
        else:
            mask[i, :n] = 1
    ref = torch_logits(hf, ids, mask)
    got = mlx_logits(model, ids, mask)
    assert np.isfinite(got).all()
    assert max_err_real(ref, got, mask) < FP32_LOGITS_ATOL


def test_ignoring_the_padding_mask_would_be_caught(hf_dir, mlx_dir):
    """Left padding is the sensitive case: with right padding, causality alone hides the pads."""
    model, _ = load_model(mlx_dir)
    ids, mask = batch("left")
    assert max_err_real(hf_logits(hf_dir, ids, mask), mlx_logits(model, ids, None), mask) > 1e-1


def test_wrong_rope_convention_would_be_caught(hf_dir, mlx_dir):
    """The parity test is sensitive: traditional (interleaved) RoPE gives visibly different logits."""
    model, args = load_model(mlx_dir)
    for layer in model.model.layers:
        layer.self_attn.rope = nn.RoPE(args.head_dim, traditional=True, base=args.rope_theta)
    ids, mask = batch("right")
    err = max_err_real(hf_logits(hf_dir, ids, mask), mlx_logits(model, ids, mask), mask)
    assert err > 1e-1  # >> FP32_LOGITS_ATOL


def test_logits_bf16_close_to_hf(hf_dir, tmp_path):
    """bf16 is only loosely comparable: rounding order differs (e.g. RMSNorm, RoPE)."""
    model, _ = load_model(convert_hf_to_mlx(hf_dir, tmp_path / "bf16", dtype="bf16"))
    ids, mask = batch("right")
    hf = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.bfloat16).eval()
    ref = torch_logits(hf, ids, mask)
    got = mlx_logits(model, ids, mask)
    # Measured: 0.09 with max |logit| 7.4 (HF bf16 vs HF fp32 differ by 0.19 on the same batch).
    assert max_err_real(ref, got, mask) < BF16_LOGITS_RTOL * np.abs(ref).max()


def test_lora_linear_formula_and_fuse():
    rng = np.random.default_rng(1)
    d_in, d_out, rank, alpha = 12, 10, 4, 8.0
    w = rng.standard_normal((d_out, d_in)).astype(np.float32)
    base = nn.Linear(d_in, d_out, bias=False)
    base.weight = mx.array(w)
    lora = LoRALinear.from_base(base, rank=rank, alpha=alpha, key=mx.random.key(7))
    a = np.array(lora.lora_A)
    assert a.shape == (rank, d_in) and lora.lora_B.shape == (d_out, rank)
    assert np.abs(a).max() <= 1 / math.sqrt(d_in) and np.abs(a).max() > 0.5 / math.sqrt(d_in)
    assert not np.array(lora.lora_B).any() and lora.scale == alpha / rank
    again = LoRALinear.from_base(base, rank=rank, alpha=alpha, key=mx.random.key(7))
    np.testing.assert_array_equal(np.array(again.lora_A), a)

    b = rng.standard_normal((d_out, rank)).astype(np.float32)
    lora.lora_B = mx.array(b)
    x = rng.standard_normal((2, 5, d_in)).astype(np.float32)
    expected = x @ w.T + (alpha / rank) * ((x @ a.T) @ b.T)
    np.testing.assert_allclose(np.array(lora(mx.array(x))), expected, atol=1e-5, rtol=1e-5)
    fused = lora.fuse()
    assert isinstance(fused, nn.Linear) and "bias" not in fused
    np.testing.assert_allclose(np.array(fused(mx.array(x))), expected, atol=1e-5, rtol=1e-5)
    assert dict(tree_flatten(lora.trainable_parameters())).keys() == {"lora_A", "lora_B"}


def test_apply_lora_trains_only_adapters(mlx_dir):
    model, _ = load_model(mlx_dir)
    apply_lora(model, ("q_proj", "down_proj"), rank=2, alpha=4.0)
    trainable = dict(tree_flatten(model.trainable_parameters()))
    assert sorted(trainable) == sorted(lora_state(model))
    assert sorted(trainable)[:2] == [
        "model.layers.0.mlp.down_proj.lora_A",
        "model.layers.0.mlp.down_proj.lora_B",
    ]
    assert len(trainable) == 2 * 2 * TINY["num_hidden_layers"]
    # Base weights keep their HF names, so a checkpoint still loads by name.
    model.load_weights(str(mlx_dir / "model.safetensors"), strict=False)
    assert "model.layers.0.self_attn.q_proj.weight" in dict(tree_flatten(model.parameters()))

    ids, mask = batch("right")

    def loss(m):
        return m(mx.array(ids), mx.array(mask)).astype(mx.float32).square().mean()

    _, grads = nn.value_and_grad(model, loss)(model)
    grads = dict(tree_flatten(grads))
    assert grads.keys() == trainable.keys()
    # B = 0 at init, so only lora_B gets a gradient at the first step; it must be non-zero.
    assert float(mx.abs(grads["model.layers.1.self_attn.q_proj.lora_B"]).max()) > 0
    with pytest.raises(ValueError, match="already"):
        apply_lora(model, ("q_proj",), rank=2, alpha=4.0)


def test_peft_adapter_parity_and_export(hf_dir, mlx_dir):
    targets = ["q_proj", "v_proj", "o_proj", "up_proj"]
    rank, alpha = 4, 8.0
    torch.manual_seed(3)
    peft_model = get_peft_model(
        LlamaForCausalLM.from_pretrained(hf_dir),
        LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0),
    ).eval()
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)  # B = 0 would hide a wrong A, scale or layout
    peft_state = {k: v.numpy() for k, v in get_peft_model_state_dict(peft_model).items()}
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in peft_state

    model, _ = load_model(mlx_dir)
    apply_lora(model, tuple(targets), rank=rank, alpha=alpha)
    load_lora_state(model, peft_to_mlx_adapter(peft_state))

    ids, mask = batch("left")
    ref = torch_logits(peft_model, ids, mask)
    base = hf_logits(hf_dir, ids, mask)
    got = mlx_logits(model, ids, mask)
    assert max_err_real(ref, base, mask) > 1e-1  # the adapter really changes the output
    assert max_err_real(ref, got, mask) < FP32_LOGITS_ATOL

    exported = mlx_to_peft_adapter(lora_state(model))
    assert exported.keys() == peft_state.keys()
    for k, v in peft_state.items():
        assert exported[k].dtype == v.dtype and exported[k].shape == v.shape
        assert exported[k].tobytes() == v.tobytes(), k

    with pytest.raises(ValueError, match="lacks"):
        load_lora_state(model, {k: v for k, v in lora_state(model).items() if "q_proj" not in k})

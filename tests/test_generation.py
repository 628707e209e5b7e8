"""Greedy decoding: MLX's KV cache against recomputing the whole sequence, MLX against transformers'
`generate`, and both through ftcore.run.generate_text with a PEFT adapter (random prompts, hypothesis)."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from helpers import TINY, save_hf_model
from hypothesis import given
from hypothesis import strategies as st
from peft import LoraConfig, get_peft_model
from transformers import LlamaForCausalLM

from ftcore.mlx.convert import convert_hf_to_mlx
from ftcore.mlx.generate import greedy as mlx_greedy
from ftcore.mlx.model import KVCache, load_model
from ftcore.run.generate_text import generate_mlx, generate_torch
from ftcore.torch.generate import greedy as torch_greedy

pytestmark = pytest.mark.parity

EOS = 2
NEW = 12  # prompts up to 30 tokens + 12 new fit TINY's 64 positions
prompts = st.lists(st.integers(3, TINY["vocab_size"] - 1), min_size=1, max_size=30)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    return save_hf_model(tmp_path_factory.mktemp("hf") / "tiny")  # init std 0.2: clear argmaxes


@pytest.fixture(scope="module")
def mlx_model(hf_dir, tmp_path_factory):
    model, _ = load_model(convert_hf_to_mlx(hf_dir, tmp_path_factory.mktemp("mlx") / "tiny"))
    return model


@pytest.fixture(scope="module")
def torch_model(hf_dir):
    return LlamaForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()


@given(prompt=prompts, continuation=st.lists(st.integers(3, TINY["vocab_size"] - 1), min_size=1, max_size=12))
def test_kv_cache_logits_equal_the_full_forward(mlx_model, prompt, continuation):
    """Prefill the prompt, then feed the continuation one token at a time through the cache: each
    step's logits equal the uncached forward over the whole sequence at that position (1e-5)."""
    cache = [KVCache() for _ in mlx_model.model.layers]
    steps = [np.array(mlx_model(mx.array([prompt]), cache=cache)[0, -1])]
    for t in continuation[:-1]:
        steps.append(np.array(mlx_model(mx.array([[t]]), cache=cache)[0, -1]))
    full = np.array(mlx_model(mx.array([prompt + continuation[:-1]])))[0, len(prompt) - 1 :]
    assert cache[0].offset == len(prompt) + len(continuation) - 1
    np.testing.assert_allclose(np.stack(steps), full, atol=1e-5, rtol=0)


@given(prompt=prompts)
def test_mlx_greedy_equals_transformers_generate(mlx_model, torch_model, prompt):
    """Same tokens, same stop (EOS kept, or NEW tokens), from the same weights."""
    got = mlx_greedy(mlx_model, prompt, NEW, EOS)
    assert got == torch_greedy(torch_model, prompt, NEW, EOS)
    assert len(got) == NEW or got[-1] == EOS
    assert EOS not in got[:-1]


def test_generate_with_a_peft_adapter_agrees_and_uses_it(hf_dir, tmp_path):
    """A PEFT adapter with non-zero B on every target: torch (PeftModel) and MLX (ftcore's LoRA,
    loaded from the same folder) give the same tokens, and different ones than the base."""
    torch.manual_seed(3)
    base = LlamaForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                           target_modules=["q_proj", "v_proj", "down_proj"]))  # fmt: skip
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # big enough to change the answers
    peft.save_pretrained(str(tmp_path / "adapter"))
    rng = np.random.default_rng(0)
    asks = [rng.integers(3, TINY["vocab_size"], size=n).tolist() for n in (3, 9, 17, 25)]
    with_torch = generate_torch(hf_dir, tmp_path / "adapter", asks, NEW, EOS)
    with_mlx = generate_mlx(hf_dir, tmp_path / "adapter", asks, NEW, EOS)
    assert with_mlx == with_torch
    assert with_mlx != generate_mlx(hf_dir, None, asks, NEW, EOS)

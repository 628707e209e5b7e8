"""Figures that come out of the models, in both frameworks, against values computed another way:
eval loss over uneven batches (a token-weighted mean by hand), LoRA dropout as each backend builds
its adapters (share dropped, 1/(1-p) scale, identity in eval), and greedy decoding with the KV
cache against recomputing the whole sequence, for prompts of 10, 100 and 1000 tokens."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from helpers import TINY, save_hf_model
from transformers import LlamaForCausalLM

from ftcore.config import Batching, RunConfig
from ftcore.inputs.batches import Batches
from ftcore.inputs.loss_contract import IGNORE_INDEX
from ftcore.mlx.convert import convert_hf_to_mlx
from ftcore.mlx.model import load_model
from ftcore.tolerances import FP32_EVAL_LOSS_ATOL

pytestmark = pytest.mark.parity

LONG = 1024 + 16  # positions: the 1000-token prompt and what it generates


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("figures")
    hf = save_hf_model(root / "hf", max_position_embeddings=LONG)
    return hf, convert_hf_to_mlx(hf, root / "mlx")


# ----------------------------------------------------------------------------- eval loss


def _ce_by_hand(logits: np.ndarray, batch: dict) -> tuple[float, int]:
    """Summed next-token CE (float64) of one batch from its full logits, and the target count."""
    lg = logits[:, :-1].astype(np.float64)
    t = batch["labels"][:, 1:]
    keep = t != IGNORE_INDEX
    lse = np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1)) + lg.max(-1)
    picked = np.take_along_axis(lg, np.where(keep, t, 0)[..., None], -1)[..., 0]
    return float(((lse - picked) * keep).sum()), int(keep.sum())


def _uneven_eval() -> list[dict]:
    """Two eval batches of 4 and 1 rows, 40 and 9 wide: 120 targets against 4."""
    rng = np.random.default_rng(1)
    out = []
    for rows, width, prompt in ((4, 40, 10), (1, 9, 5)):
        ids = rng.integers(3, TINY["vocab_size"], (rows, width)).astype(np.int64)
        labels = ids.copy()
        labels[:, :prompt] = IGNORE_INDEX
        out.append({"input_ids": ids, "labels": labels, "attention_mask": np.ones_like(ids)})
    return out


def test_eval_loss_is_token_weighted_over_uneven_batches(dirs) -> None:
    from helpers import torch_logits

    from ftcore.mlx.loss import evaluate as mlx_evaluate
    from ftcore.torch.loss import evaluate as torch_evaluate

    hf_dir, mlx_dir = dirs
    tm = LlamaForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    mm, _ = load_model(mlx_dir)
    batches = Batches(train={}, eval=_uneven_eval(), mode=Batching.LONGEST)
    parts = [_ce_by_hand(torch_logits(tm, b["input_ids"], b["attention_mask"]), b) for b in batches.eval]
    assert [n for _, n in parts] == [120, 4]
    weighted = sum(s for s, _ in parts) / sum(n for _, n in parts)
    per_batch = np.mean([s / n for s, n in parts])
    assert abs(weighted - per_batch) > 1e-2  # the two definitions differ here by far more than 1e-5
    assert torch_evaluate(tm, batches, torch.device("cpu")) == pytest.approx(weighted, abs=FP32_EVAL_LOSS_ATOL)
    assert mlx_evaluate(mm, batches) == pytest.approx(weighted, abs=FP32_EVAL_LOSS_ATOL)


# ----------------------------------------------------------------------------- LoRA dropout

P = 0.25
ROWS = 512  # x 8 rank slots = 4096 draws per framework: the share dropped has sd 0.0068


def _lora_term(layer_out: np.ndarray, base_out: np.ndarray, scale: float) -> np.ndarray:
    return (layer_out - base_out)[..., :8] / scale


def _torch_q(cfg, model_dir):
    from ftcore.torch.model import load_training_model

    pm = load_training_model(cfg, model_dir, torch.device("cpu"))
    q = pm.base_model.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():  # the LoRA term of slot i is x_i after dropout, times the scale
        q.lora_A["default"].weight.copy_(torch.eye(8, q.in_features))
        q.lora_B["default"].weight.copy_(torch.eye(q.out_features, 8))
    x = torch.ones(ROWS, q.in_features)

    def run(train: bool) -> np.ndarray:
        pm.train(train)
        with torch.no_grad():
            return _lora_term(q(x).numpy(), q.base_layer(x).numpy(), cfg.lora_scale)

    return run


def _mlx_q(cfg, model_dir):
    from ftcore.backends.mlx import load
    from ftcore.result import RunResult

    model = load(cfg, model_dir, RunResult(backend="mlx"))
    q = model.model.layers[0].self_attn.q_proj
    q.lora_A, q.lora_B = mx.eye(8, q.weight.shape[1]), mx.eye(q.weight.shape[0], 8)
    x = mx.ones((ROWS, q.weight.shape[1]))

    def run(train: bool) -> np.ndarray:
        model.train(train)
        return _lora_term(np.array(q(x)), np.array(x @ q.weight.T), cfg.lora_scale)

    return run


def test_lora_dropout_in_both_frameworks(tiny_model_dir) -> None:
    """Each backend's own adapter set-up (torch: load_training_model; MLX: mlx_loop.load) with
    lora_dropout 0.25: in training ~25% of the inputs to A are 0 and the rest 1/(1-p); in eval
    mode none is; torch and MLX drop alike (two-proportion z < 4)."""
    cfg = RunConfig(preset="tiny", lora_dropout=P, lora_targets=("q_proj",), lora_rank=8, lora_alpha=16)
    shares = {}
    for name, make in (("torch", _torch_q), ("mlx", _mlx_q)):
        run = make(cfg, tiny_model_dir)
        got = run(True)
        dropped = np.isclose(got, 0.0, atol=1e-4)
        kept = got[~dropped]
        assert np.allclose(kept, 1 / (1 - P), rtol=1e-4), (name, np.unique(kept.round(4))[:5])
        shares[name] = dropped.mean()
        assert abs(shares[name] - P) < 4 * np.sqrt(P * (1 - P) / got.size), (name, shares[name])
        assert np.allclose(run(False), 1.0, rtol=1e-4), name  # eval: identity
    z = abs(shares["torch"] - shares["mlx"]) / np.sqrt(2 * P * (1 - P) / (ROWS * 8))
    assert z < 4, shares


# ----------------------------------------------------------------------------- KV cache


def _mlx_greedy_uncached(model, prompt: list[int], n: int, eos: int) -> list[int]:
    seq, out = list(prompt), []
    for _ in range(n):
        nxt = int(mx.argmax(model(mx.array([seq]))[0, -1]).item())  # the whole sequence again
        out.append(nxt)
        if nxt == eos:
            break
        seq.append(nxt)
    return out


@pytest.mark.parametrize("length", [10, 100, 1000])
def test_greedy_with_cache_equals_without(dirs, length) -> None:
    from ftcore.mlx.generate import greedy as mlx_greedy
    from ftcore.torch.generate import greedy as torch_greedy

    hf_dir, mlx_dir = dirs
    prompt = np.random.default_rng(length).integers(3, TINY["vocab_size"], length).tolist()
    new, eos = 8, -1  # no EOS: every step decodes
    mm, _ = load_model(mlx_dir)
    cached = mlx_greedy(mm, prompt, new, eos)
    assert cached == _mlx_greedy_uncached(mm, prompt, new, eos)
    tm = LlamaForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        ids = torch.tensor([prompt])
        plain = tm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                            do_sample=False, use_cache=False, pad_token_id=0)[0, length:].tolist()
    assert torch_greedy(tm, prompt, new, eos) == plain == cached

"""Packed rows (--batching packed) are exact: a record packed with others has the loss terms and the
LoRA gradients it has alone, in torch (transformers + PEFT, the torch backend's loss_sum_count) and
in MLX (the MLX backend's loss_and_grads), fp32; and both frameworks agree on packed batches.

What "alone" means: the record as a row of its own (positions 0..n-1, plain causal mask). What
makes packing exact: the per-document causal mask (a record never sees the one before it), the
first token of each record not being a target, and positions restarting at 0. Llama's RoPE makes
attention depend on position differences only, so positions that did not restart would move the
losses by float rounding alone (~1e-7 here); the tests therefore also check the positions each
model rotates with, read where the model uses them (torch: the rotary embedding's input; MLX:
ftcore.mlx.ops.rope_at's).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_hf_model
from mlx.utils import tree_flatten
from parity_utils import add_peft, mlx_loss_and_grads, mlx_model_with_adapter, save_and_convert

from ftcore.inputs.batching import pack_tokenized, pad_rows
from ftcore.inputs.loss_contract import IGNORE_INDEX
from ftcore.inputs.token_rows import Tokenized
from ftcore.mlx import ops as mlx_ops
from ftcore.mlx.loss import to_mx
from ftcore.tolerances import FP32_LOSS_SUM_RTOL, FP32_PACKED_RTOL
from ftcore.torch.loss import loss_sum_count

pytestmark = pytest.mark.parity

CONFIG = dict(vocab_size=96, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=12, rms_norm_eps=1e-5, tie_word_embeddings=False,
              initializer_range=0.2, max_position_embeddings=128, rope_theta=10000.0)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj")
# fp32, relative: a packed row's loss sum and LoRA gradients vs its records' alone. Measured over
# seeds 0-4 (3-5 records of 5-40 tokens per row): loss 4.6e-8 torch, 1.6e-7 MLX; gradients 9.2e-7
# torch, 2.8e-6 MLX (float summation order only). A record that sees the one before it moves them
# by > 1e-2. The bound: FP32_PACKED_RTOL.


def records(seed: int, n: int) -> Tokenized:
    """n records of 5-40 tokens, longest first (the order packing puts them in a row); every other
    record has its first half masked as prompt (labels IGNORE_INDEX), the others are all targets
    (as with --no-mask-prompt), so a record's first token would be a target if packing let it."""
    rng = np.random.default_rng(seed)
    ids, labels = [], []
    for i, k in enumerate(sorted(rng.integers(5, 41, n).tolist(), reverse=True)):
        row = rng.integers(1, CONFIG["vocab_size"], k).tolist()
        ids.append(row)
        labels.append([IGNORE_INDEX] * (k // 2) + row[k // 2 :] if i % 2 else row)
    return Tokenized(ids, labels, 0)


def packed_row(tok: Tokenized) -> dict[str, np.ndarray]:
    """All records in one packed row (capacity = their total), padded by 7 tokens."""
    packed = pack_tokenized(tok, sum(len(r) for r in tok.ids))
    assert len(packed.ids) == 1
    return pad_rows(packed, [0], len(packed.ids[0]) + 7, pad_id=0)


def alone(tok: Tokenized, i: int) -> dict[str, np.ndarray]:
    return pad_rows(Tokenized([tok.ids[i]], [tok.labels[i]], 0), [0], len(tok.ids[i]), pad_id=0)


@pytest.fixture(scope="module")
def models():
    """The same random Llama + LoRA (B non-zero) in torch (PEFT) and MLX (converted)."""
    from parity_utils import peft_state_np

    base = make_hf_model(CONFIG, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        _, mlx_dir = save_and_convert(base, Path(tmp))
        pm = add_peft(base, TARGETS, rank=4, alpha=8.0, b_std=0.2, seed=0)
        mlx_model, _ = mlx_model_with_adapter(mlx_dir, TARGETS, 4, 8.0, peft_state_np(pm))
    return pm, mlx_model


def torch_sum_and_grads(pm, batch: dict[str, np.ndarray], packed: bool) -> tuple[float, dict[str, np.ndarray]]:
    pm.zero_grad()
    s, _ = loss_sum_count(pm, {k: torch.from_numpy(v) for k, v in batch.items()}, packed)
    s.backward()
    grads = {n: p.grad.numpy().copy() for n, p in pm.named_parameters() if p.requires_grad}
    return s.item(), grads


def mlx_sum_and_grads(model, batch: dict[str, np.ndarray], packed: bool) -> tuple[float, dict[str, np.ndarray]]:
    count = max(int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()), 1)
    loss, grads = mlx_loss_and_grads(model, to_mx(batch), packed)  # mean over targets: x count = sum
    return float(loss.item()) * count, {k: np.array(g) * count for k, g in tree_flatten(grads)}


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("framework", ["torch", "mlx"])
def test_a_packed_row_is_its_records_run_alone(models, framework: str, seed: int) -> None:
    """Loss sum and every LoRA gradient of one packed row = the sums over its records alone."""
    run = torch_sum_and_grads if framework == "torch" else mlx_sum_and_grads
    model = models[0] if framework == "torch" else models[1]
    tok = records(seed, n=3 + seed)
    packed_sum, packed_grads = run(model, packed_row(tok), True)
    sums, grads = zip(*(run(model, alone(tok, i), False) for i in range(len(tok.ids))), strict=True)
    assert abs(packed_sum - sum(sums)) <= FP32_PACKED_RTOL * max(1.0, abs(sum(sums)))
    for name, g in packed_grads.items():
        expected = sum(gi[name] for gi in grads)
        err = np.linalg.norm(g - expected) / max(np.linalg.norm(expected), 1e-12)
        assert err <= FP32_PACKED_RTOL, (name, err)


def test_torch_and_mlx_agree_on_packed_batches(models) -> None:
    """Two packed rows of different records (so row 2 has its own layout), fp32."""
    a, b = records(10, 4), records(11, 3)
    rows = [packed_row(t) for t in (a, b)]
    width = max(r["input_ids"].shape[1] for r in rows)
    batch = {k: np.zeros((2, width), np.int64) for k in rows[0]}
    for r, row in enumerate(rows):
        for k, v in row.items():
            batch[k][r, : v.shape[1]] = v[0]
            if k == "labels":
                batch[k][r, v.shape[1] :] = IGNORE_INDEX
    t_sum, t_grads = torch_sum_and_grads(models[0], batch, True)
    m_sum, m_grads = mlx_sum_and_grads(models[1], batch, True)
    assert abs(t_sum - m_sum) <= FP32_LOSS_SUM_RTOL * abs(t_sum)
    assert len(t_grads) == len(m_grads)


def test_the_models_rotate_packed_records_from_position_0(models, monkeypatch) -> None:
    """Both frameworks rotate each packed record's tokens with positions 0..n-1."""
    tok = records(3, 3)
    batch = packed_row(tok)
    expected = np.concatenate([np.arange(len(r)) for r in tok.ids])
    n = len(expected)

    seen_torch = []
    rotary = models[0].get_base_model().model.rotary_emb
    handle = rotary.register_forward_hook(
        lambda m, args, kwargs, out: seen_torch.append(kwargs.get("position_ids", args[-1]).numpy().copy()),
        with_kwargs=True,
    )
    try:
        torch_sum_and_grads(models[0], batch, True)
    finally:
        handle.remove()
    assert seen_torch and (seen_torch[0][0, :n] == expected).all()

    seen_mlx = []
    real = mlx_ops.rope_at

    def recording(x, positions, base):
        seen_mlx.append(np.array(positions))
        return real(x, positions, base)

    import ftcore.mlx.model as mlx_model_module

    monkeypatch.setattr(mlx_model_module, "rope_at", recording)
    mlx_sum_and_grads(models[1], batch, True)
    assert seen_mlx and all((p[0, :n] == expected).all() for p in seen_mlx)


def test_packing_rule_first_fit_decreasing() -> None:
    """Rows hold at most the capacity; longest record first, each into the first row with room."""
    from ftcore.inputs.batching import pack_rows

    assert pack_rows([5, 3, 8, 2, 6], 10) == [[2, 3], [4, 1], [0]]
    lengths = np.random.default_rng(0).integers(1, 100, 500).tolist()
    rows = pack_rows(lengths, 128)
    assert sorted(i for r in rows for i in r) == list(range(500))
    assert all(sum(lengths[i] for i in r) <= 128 for r in rows)
    assert len(rows) <= -(-sum(lengths) // 128) * 11 // 9 + 1  # FFD's bound: 11/9 OPT + 1


def test_packed_batches_carry_positions_and_untargeted_record_starts() -> None:
    tok = records(5, 4)
    row = packed_row(tok)
    starts = np.cumsum([0] + [len(r) for r in tok.ids])[:-1]
    n = sum(len(r) for r in tok.ids)
    pos = row["position_ids"][0]
    assert (pos[starts] == 0).all() and (np.diff(pos[:n])[np.diff(pos[:n]) != 1] < 0).all()
    assert (row["labels"][0][starts] == IGNORE_INDEX).all()
    assert (row["attention_mask"][0] == (np.arange(n + 7) < n)).all()

"""Both backends' training loss is the textbook next-token CE: full logits (B, L, V) from the model's
plain forward, logits[:, :-1] against labels[:, 1:], -100 ignored, sum / count.

The backends skip the last position's logits and (MLX, CPU) write logsumexp out; the parity suite
compares the backends with each other, so a shift bug made in both would pass it. This pins each to
the definition separately, in fp32, with prompt masking and padding in the batch."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import torch
import torch.nn.functional as F
from parity_utils import TINY, make_hf_model, save_and_convert

from ftcore.backends import mlx_loop, torch_loop
from ftcore.data import IGNORE_INDEX
from ftcore.mlx_llama import load_model


def _batch() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    B, L = 3, 12
    ids = rng.integers(0, TINY["vocab_size"], (B, L))
    mask = np.ones((B, L), dtype=np.int64)
    mask[1, 9:] = 0  # right padding
    labels = np.where(mask == 1, ids, IGNORE_INDEX)
    labels[:, :4] = IGNORE_INDEX  # prompt
    labels[2, :] = IGNORE_INDEX
    labels[2, 7] = ids[2, 7]  # a row with a single target
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _reference(logits: np.ndarray, labels: np.ndarray) -> tuple[float, int]:
    """float64 CE over full logits with the shift done on the logits."""
    lo, tg = logits[:, :-1].astype(np.float64), labels[:, 1:]
    keep = tg != IGNORE_INDEX
    lse = np.log(np.exp(lo - lo.max(-1, keepdims=True)).sum(-1)) + lo.max(-1)
    picked = np.take_along_axis(lo, np.where(keep, tg, 0)[..., None], -1)[..., 0]
    return float(((lse - picked) * keep).sum()), int(keep.sum())


def test_both_backends_compute_the_textbook_loss(tmp_path: Path) -> None:
    model = make_hf_model(TINY, seed=0)
    _, mlx_dir = save_and_convert(model, tmp_path)
    b = _batch()

    tb = {k: torch.from_numpy(v) for k, v in b.items()}
    with torch.no_grad():
        full = model(input_ids=tb["input_ids"], attention_mask=tb["attention_mask"]).logits
        t_sum, t_n = torch_loop.loss_sum_count(model, tb)
    ref_sum, ref_n = _reference(full.numpy(), b["labels"])
    assert int(t_n) == ref_n == 8 + 5 + 1
    assert abs(float(t_sum) - ref_sum) <= 1e-5 * abs(ref_sum)
    # torch's own CE on the full logits agrees too (the definition, not just our float64 copy)
    plain = F.cross_entropy(full[:, :-1].reshape(-1, full.shape[-1]), tb["labels"][:, 1:].reshape(-1),
                            ignore_index=IGNORE_INDEX, reduction="sum")
    assert abs(float(plain) - ref_sum) <= 1e-5 * abs(ref_sum)

    mlx_model, _ = load_model(mlx_dir)
    mb = mlx_loop.to_mx(b)
    m_sum, m_n = mlx_loop.loss_sum_count(mlx_model, mb)
    m_full = np.array(mlx_model(mb["input_ids"], mb["attention_mask"]))
    m_ref_sum, _ = _reference(m_full, b["labels"])
    assert int(m_n.item()) == ref_n
    assert abs(m_sum.item() - m_ref_sum) <= 1e-5 * abs(m_ref_sum)
    assert abs(m_sum.item() - ref_sum) <= 1e-4 * abs(ref_sum)  # and the same as torch's
    assert mx.default_device() == mx.cpu  # the written-out logsumexp path was the one tested

"""Both backends' training loss is the textbook next-token CE: full logits (B, L, V) from the model's
plain forward, logits[:, :-1] against labels[:, 1:], -100 ignored, sum / count.

The backends skip the last position's logits and (MLX, CPU) write logsumexp out; the parity suite
compares the backends with each other, so a shift bug made in both would pass it. This pins each to
the definition separately, in fp32, with prompt masking and padding in the batch."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import TINY, make_hf_model
from parity_utils import save_and_convert

from ftcore.inputs.loss_contract import IGNORE_INDEX, reference_sum_count
from ftcore.mlx import loss as mlx_loss
from ftcore.mlx.model import load_model
from ftcore.tolerances import FP32_LOSS_REFERENCE_RTOL, FP32_LOSS_SUM_RTOL
from ftcore.torch import loss as torch_loss

pytestmark = pytest.mark.unit


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


def test_both_backends_compute_the_textbook_loss(tmp_path: Path) -> None:
    model = make_hf_model(TINY, seed=0)
    _, mlx_dir = save_and_convert(model, tmp_path)
    b = _batch()

    tb = {k: torch.from_numpy(v) for k, v in b.items()}
    with torch.no_grad():
        full = model(input_ids=tb["input_ids"], attention_mask=tb["attention_mask"]).logits
        t_sum, t_n = torch_loss.loss_sum_count(model, tb, packed=False)
    ref_sum, ref_n = reference_sum_count(full.numpy(), b["labels"])
    assert int(t_n) == ref_n == 8 + 5 + 1
    assert abs(float(t_sum) - ref_sum) <= FP32_LOSS_REFERENCE_RTOL * abs(ref_sum)
    # torch's own CE on the full logits agrees too (the definition, not just the float64 reference)
    plain = F.cross_entropy(full[:, :-1].reshape(-1, full.shape[-1]), tb["labels"][:, 1:].reshape(-1),
                            ignore_index=IGNORE_INDEX, reduction="sum")
    assert abs(float(plain) - ref_sum) <= FP32_LOSS_REFERENCE_RTOL * abs(ref_sum)

    mlx_model, _ = load_model(mlx_dir)
    mb = mlx_loss.to_mx(b)
    m_sum, m_n = mlx_loss.loss_sum_count(mlx_model, mb, packed=False)
    m_full = np.array(mlx_model(mb["input_ids"], mb["attention_mask"]))
    m_ref_sum, _ = reference_sum_count(m_full, b["labels"])
    assert int(m_n.item()) == ref_n
    assert abs(m_sum.item() - m_ref_sum) <= FP32_LOSS_REFERENCE_RTOL * abs(m_ref_sum)
    assert abs(m_sum.item() - ref_sum) <= FP32_LOSS_SUM_RTOL * abs(ref_sum)  # and the same as torch's
    assert mx.default_device() == mx.cpu  # the written-out logsumexp path was the one tested

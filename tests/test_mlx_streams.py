"""The MLX training step's row split: each CPU stream (thread) takes an equal share of a batch's
rows, and the summed losses and gradients equal one pass over the whole batch. Also when the
split is used, and that the runner gives `mlx` processes the mx.eval width it needs (that the BLAS
thread count can be set in such a process is checked in test_child_processes.py)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from helpers import TINY, make_hf_model
from mlx.utils import tree_flatten
from parity_utils import save_and_convert

from ftcore.backends import BACKENDS
from ftcore.config import RunConfig
from ftcore.inputs.loss_contract import IGNORE_INDEX
from ftcore.lora_targets import LORA_TARGETS
from ftcore.mlx.env import BFS_NO_LIMIT, BFS_WIDTH_ENV
from ftcore.mlx.lora import apply_lora, load_lora_state, lora_state
from ftcore.mlx.loss import loss_sum_count, to_mx
from ftcore.mlx.model import load_model
from ftcore.mlx.streams import cpu_streams, loss_and_grads, plan_streams
from ftcore.run.backend_process import child_env
from ftcore.tolerances import FP32_STREAMS_GRAD_RTOL, FP32_STREAMS_LOSS_RTOL

pytestmark = pytest.mark.unit


def _batch(rows: int) -> dict[str, mx.array]:
    """`rows` rows of 12 tokens: padding, a prompt prefix, and one row without any target."""
    rng = np.random.default_rng(5)
    ids = rng.integers(0, TINY["vocab_size"], (rows, 12))
    mask = np.ones_like(ids)
    mask[1, 8:] = 0
    labels = np.where(mask == 1, ids, IGNORE_INDEX)
    labels[:, :3] = IGNORE_INDEX
    labels[rows - 1] = IGNORE_INDEX  # its group's share of the loss is 0, the count is the batch's
    return to_mx({"input_ids": ids, "attention_mask": mask, "labels": labels})


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    _, mlx_dir = save_and_convert(make_hf_model(TINY, seed=0), tmp_path_factory.mktemp("split"))
    m, _ = load_model(mlx_dir)
    apply_lora(m, ("q_proj", "v_proj", "down_proj"), rank=4, alpha=8.0)
    # lora_B starts at 0, which makes every lora_A gradient 0: give B values so all are tested.
    keys = iter(mx.random.split(mx.random.key(1), 64))
    load_lora_state(
        m, {k: 0.1 * mx.random.normal(v.shape, key=next(keys)) for k, v in lora_state(m).items()}
    )
    return m


@pytest.mark.parametrize("n_streams", [2, 4])
def test_split_over_streams_equals_one_pass(model, n_streams: int) -> None:
    batch = _batch(4)
    loss_1, grads_1 = loss_and_grads(model, batch, False, cpu_streams(1))
    loss_n, grads_n = loss_and_grads(model, batch, False, cpu_streams(n_streams))
    # the mean over the whole batch's targets, not a mean of per-group means
    total, count = loss_sum_count(model, batch, False)
    assert abs(loss_1.item() - (total / count).item()) <= FP32_STREAMS_LOSS_RTOL * loss_1.item()
    assert abs(loss_n.item() - loss_1.item()) <= FP32_STREAMS_LOSS_RTOL * loss_1.item()
    flat_1, flat_n = dict(tree_flatten(grads_1)), dict(tree_flatten(grads_n))
    assert flat_1.keys() == flat_n.keys() == lora_state(model).keys()
    for k, g in flat_1.items():
        scale = float(mx.abs(g).max())
        assert scale > 0, k
        np.testing.assert_allclose(np.array(flat_n[k]), np.array(g), rtol=0, atol=FP32_STREAMS_GRAD_RTOL * scale)


def test_split_needs_equal_groups(model) -> None:
    with pytest.raises(ValueError, match="3 rows do not split evenly over 2 streams"):
        loss_and_grads(model, _batch(3), False, cpu_streams(2))


def test_plan_streams(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(BFS_WIDTH_ENV, str(BFS_NO_LIMIT))
    assert plan_streams(mx.cpu, threads=2, batch_size=4) == 2
    assert plan_streams(mx.cpu, threads=2, batch_size=3) == 1  # a thread would idle
    assert plan_streams(mx.cpu, threads=1, batch_size=4) == 1
    assert plan_streams(mx.gpu, threads=2, batch_size=4) == 1
    # MLX's default width (20) runs two streams one after the other: not worth splitting; a fixed
    # width (100 held for 4 layers) too, since the step's graph grows with depth
    monkeypatch.delenv(BFS_WIDTH_ENV)
    assert plan_streams(mx.cpu, threads=2, batch_size=4) == 1
    monkeypatch.setenv(BFS_WIDTH_ENV, "100")
    assert plan_streams(mx.cpu, threads=2, batch_size=4) == 1
    assert cpu_streams(2) is cpu_streams(2)  # streams (threads) made once


def test_runner_gives_only_the_mlx_backend_the_eval_width(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(BFS_WIDTH_ENV, raising=False)
    cfg = RunConfig()
    width = int(child_env(BACKENDS["mlx"], 3, cfg)[BFS_WIDTH_ENV])
    # Above it mx.eval goes depth first and the row streams run in turn. The compiled step's
    # outputs alone (each LoRA A and B, both AdamW moments) at TinyLlama's 22 layers, 7 targets:
    step_outputs = 3 * 2 * len(LORA_TARGETS) * 22
    assert width >= 10 * step_outputs  # a model 10x deeper or wider still overlaps
    # mlx-lm is the yardstick, run as its users would run it
    assert BFS_WIDTH_ENV not in child_env(BACKENDS["mlx-lm"], 3, cfg)
    assert BFS_WIDTH_ENV not in child_env(BACKENDS["torch"], 3, cfg)


def test_checkpointing_keeps_mlx_default_width_and_one_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    """Breadth first without limit, mx.eval kept far more of the recomputed layers alive (22 layers:
    MLX's peak 6067 MB against 4745 at its default width, the memory model 4676): with --grad-checkpoint the mlx child keeps MLX's default width, even
    over a user's own, and so trains on one stream."""
    monkeypatch.setenv(BFS_WIDTH_ENV, str(BFS_NO_LIMIT))
    env = child_env(BACKENDS["mlx"], 2, RunConfig(grad_checkpoint=True))
    assert BFS_WIDTH_ENV not in env
    monkeypatch.delenv(BFS_WIDTH_ENV)
    assert plan_streams(mx.cpu, threads=2, batch_size=4) == 1

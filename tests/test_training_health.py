"""The parent's check that a fine-tune learned, sanely (ftcore.run.training_health), on adapter
files and loss curves made here; the real backends at --lr 1e9 are in test_reliability.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
from safetensors.numpy import save_file

from ftcore.run.training_health import adapter_problem, collapsed

pytestmark = pytest.mark.unit

A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


def adapter(tmp_path, b: np.ndarray, a: np.ndarray | None = None):
    a = np.full((8, 16), 0.1, np.float32) if a is None else a
    save_file({A: a, B: b.astype(np.float32)}, str(tmp_path / "adapter_model.safetensors"))
    return tmp_path


def test_a_trained_adapter_passes(tmp_path) -> None:
    b = np.zeros((16, 8), np.float32)
    b[3, 2] = 0.02
    assert adapter_problem(adapter(tmp_path, b)) is None
    assert adapter_problem(tmp_path / "nowhere") is None  # no adapter written: nothing to judge


@pytest.mark.parametrize("b, status, said", [
    (np.zeros((16, 8)), "failed", "the adapter did not move: every lora_B is still 0"),
    (np.full((16, 8), np.nan), "diverged", "holds NaN or Inf"),
    (np.full((16, 8), 1.5e9), "diverged", "exploded: max |w| = 1.5e+09"),
])
def test_an_adapter_that_did_not_learn_or_exploded_is_not_ok(tmp_path, b, status, said) -> None:
    got = adapter_problem(adapter(tmp_path, b))
    assert got is not None and got[0] == status and said in got[1], got


def test_losses_pinned_at_ln_vocab_are_a_collapse() -> None:
    u = math.log(1024)
    assert "collapsed to a uniform output" in collapsed([2.5, u, u, u], 1024)
    assert collapsed([2.5, 2.0, u, u], 1024) is None  # not the last three
    assert collapsed([u, u, u, u], 1024) is None  # a random-init model starts there: not a collapse
    assert collapsed([2.5, 1.0, 0.5, 0.2], 1024) is None

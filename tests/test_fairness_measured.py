"""Fairness figures come from the run itself: each deliberate defect in a backend's loop shows up
as a MISMATCH next to an honest run (the torch backend, run in this process, tiny and short)."""

from __future__ import annotations

import pytest
import torch

from ftcore.backends import BACKENDS
from ftcore.inputs.batches import Batches
from ftcore.report import fairness_checks
from ftcore.run.preflight import prepare

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from ftcore.config import RunConfig

    cfg = RunConfig(num_samples=16, eval_samples=2, max_seq_len=48, batch_size=2, steps=3,
                    warmup_steps=1, threads=1)
    prep = prepare(cfg, tmp_path_factory.mktemp("fair"))
    return prep, tmp_path_factory


def train(setup, name: str, **changes):
    prep, factory = setup
    cfg = prep.cfg.replace(**changes)
    result = BACKENDS["torch"].train(cfg, prep.model_dir, prep.batches, factory.mktemp(name))
    assert result.status == "ok"
    return result.to_dict() | {"backend": name}


def check(rows: list[dict], name: str) -> dict:
    return {c["check"]: c for c in fairness_checks(rows)}[name]


def test_honest_runs_pass_every_check(setup):
    rows = [train(setup, "a"), train(setup, "b")]
    assert all(c["ok"] for c in fairness_checks(rows)), fairness_checks(rows)
    prep, _ = setup
    assert rows[0]["optimizer"]["lr_per_step"] == [prep.cfg.lr_at(s) for s in range(3)]
    assert rows[0]["threads"] == 1 and rows[0]["optimizer"]["betas"] == [0.9, 0.999]


def test_a_reordered_batch_is_caught(setup, monkeypatch):
    honest = train(setup, "honest")
    original = Batches.step
    monkeypatch.setattr(Batches, "step", lambda self, s: original(self, {0: 1, 1: 0}.get(s, s)))
    swapped = train(setup, "swapped")
    assert check([honest, swapped], "batch_fingerprint")["ok"]  # the same batches file...
    assert not check([honest, swapped], "fed_batches")["ok"]  # ...fed in another order


def test_another_beta2_is_caught(setup, monkeypatch):
    import ftcore.backends.torch as torch_backend

    honest = train(setup, "honest")
    make = torch_backend.make_optimizer
    monkeypatch.setattr(torch_backend, "make_optimizer",
                        lambda cfg, params: make(cfg.replace(adam_beta2=0.99), params))
    other = train(setup, "beta2")
    assert other["optimizer"]["betas"][1] == 0.99 and other["config"] == honest["config"]
    result = check([honest, other], "optimizer")
    assert not result["ok"] and "betas" in result["detail"]


def test_weight_decay_on_lora_b_only_is_caught(setup, monkeypatch):
    """Two param groups, lora_B's first with the asked decay and lora_A's without: group 0 says
    0.05 as the honest run's does; per tensor, the lora_A half differs."""
    import ftcore.backends.torch as torch_backend
    from ftcore.inputs.arch import read_arch
    from ftcore.inputs.lora_init import initial_lora_state

    prep, _ = setup
    honest = train(setup, "honest", weight_decay=0.05)

    def lora_b_only(cfg, params):  # PEFT registers each module's lora_A, then its lora_B
        return torch.optim.AdamW([{"params": params[1::2]}, {"params": params[0::2], "weight_decay": 0.0}],
                                 lr=cfg.lr, weight_decay=cfg.weight_decay)  # fmt: skip

    monkeypatch.setattr(torch_backend, "make_optimizer", lora_b_only)
    other = train(setup, "b-only", weight_decay=0.05)
    keys = initial_lora_state(read_arch(prep.model_dir), prep.cfg.lora_targets, prep.cfg.lora_rank, 0)
    assert honest["optimizer"]["weight_decay_per_tensor"] == dict.fromkeys(keys, 0.05)
    assert other["optimizer"]["weight_decay_per_tensor"] == {k: 0.05 if k.endswith("lora_B") else 0.0 for k in keys}
    assert check([honest, other], "optimizer")["ok"]  # the settings beside the decay are alike
    result = check([honest, other], "weight_decay")
    assert not result["ok"] and result["status"] == "mismatch", result
    assert f"b-only: {len(keys) // 2} of {len(keys)} tensors differ from honest" in result["detail"]
    assert "lora_A honest=0.05 b-only=0.0" in result["detail"], result["detail"]


def test_an_extra_trainable_tensor_is_caught(setup, monkeypatch):
    from ftcore.backends import torch_common

    honest = train(setup, "honest")
    load = torch_common.load_training_model

    def also_train_a_norm(cfg, model_dir, device):
        model = load(cfg, model_dir, device)
        model.base_model.model.model.norm.weight.requires_grad_(True)
        return model

    monkeypatch.setattr(torch_common, "load_training_model", also_train_a_norm)
    other = train(setup, "norm")
    expected = other["trainable_params_expected"]  # the closed-form LoRA count
    assert other["trainable_params"] > honest["trainable_params"] == expected
    assert not check([honest, other], "trainable_params")["ok"]


def test_a_framework_ignoring_the_thread_count_is_caught(setup, monkeypatch):
    honest = train(setup, "honest")  # threads=1, as asked
    torch.set_num_threads(2)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # the request goes nowhere
    other = train(setup, "ignored")
    assert other["threads"] == 2 and other["config"]["threads"] == 1
    assert not check([honest, other], "threads")["ok"]

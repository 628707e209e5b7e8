"""The `torch-compile` backend against `torch`, both in this process on one prepared run: the tiny
preset cut to 2 layers, 10 steps of `longest` batches at three widths (65, 129, 192), fp32, LoRA
dropout 0.1 (the compiled graph must draw torch's masks). The compiled forward + loss must train as
the eager one does (per-step losses within
REFERENCE_LOSS_ATOL, adapters within FP32_ADAPTER_RTOL), with every width compiled before the
timed steps and its time recorded apart.

Inductor's cache is the persistent test cache's (as a run's child gets ftcore's: ftcore.torch.env),
so only the first run on a machine compiles cold (~60 s a width on 2 busy cores; warm ~5 s)."""

from __future__ import annotations

import os
from unittest import mock

import numpy as np
import pytest
import torch
from parity_utils import read_adapter, rel_norm_err

from ftcore.backends import BACKENDS
from ftcore.backends.loop import train_with
from ftcore.backends.run_context import BackendRun
from ftcore.backends.torch_compile import TorchCompileRecipe
from ftcore.config import RunConfig
from ftcore.inputs.arch import read_arch
from ftcore.inputs.lora_init import initial_lora_state
from ftcore.process.ranks import RankInfo
from ftcore.run.preflight import prepare
from ftcore.tolerances import FP32_ADAPTER_RTOL, REFERENCE_LOSS_ATOL
from ftcore.torch.env import INDUCTOR_CACHE_ENV
from ftcore.torch.lora import lora_state

pytestmark = [pytest.mark.parity, pytest.mark.slow]

CFG = RunConfig(preset="tiny", num_layers=2, data="builtin:alpaca-lengths", num_samples=16,
                eval_samples=4, max_seq_len=192, batch_size=2, steps=10, warmup_steps=1,
                eval_every=0, eval_generate=False, threads=2, lora_dropout=0.1)  # fmt: skip
WIDTHS = [65, 129, 192]  # the widths CFG's steps feed


class Watched(TorchCompileRecipe):
    """TorchCompileRecipe that notes what its compile warm-up left behind."""

    def ready(self) -> None:
        rng = torch.random.get_rng_state()
        super().ready()
        self.after_warmup = {
            "lora": {k: np.array(v) for k, v in lora_state(self.model).items()},  # copies
            "opt_state": len(self.opt.state),
            "grads": [p.grad for p in self.params],
            "rng_same": torch.equal(rng, torch.random.get_rng_state()),
        }


@pytest.fixture(scope="module")
def pair(tmp_path_factory, ftcore_cache):
    root = tmp_path_factory.mktemp("torch-compile")
    prep = prepare(CFG, root)
    with mock.patch.dict(os.environ, {INDUCTOR_CACHE_ENV: str(ftcore_cache / "torchinductor")}):
        eager = BACKENDS["torch"].train(prep.cfg, prep.model_dir, prep.batches, root / "torch")
        run = BackendRun("torch-compile", "torch", prep.cfg, prep.model_dir, prep.batches,
                         root / "torch-compile", RankInfo.from_env())  # fmt: skip
        recipe = Watched(run)
        compiled = train_with(run, recipe)
    return prep, root, eager, compiled, recipe


def test_compiled_training_matches_eager(pair):
    prep, root, eager, compiled, _ = pair
    assert eager.status == compiled.status == "ok", (eager.error, compiled.error)
    assert sorted({int(prep.batches.step(s)["input_ids"].shape[1]) for s in range(10)}) == WIDTHS
    assert compiled.fed_batches_fingerprint == eager.fed_batches_fingerprint
    assert compiled.initial_adapter_fingerprint == eager.initial_adapter_fingerprint
    assert len(compiled.losses) == len(eager.losses) == 10
    np.testing.assert_allclose(compiled.losses, eager.losses, rtol=0, atol=REFERENCE_LOSS_ATOL)
    assert compiled.optimizer["lr_per_step"] == eager.optimizer["lr_per_step"]
    a, b = read_adapter(root / "torch-compile"), read_adapter(root / "torch")
    assert a.keys() == b.keys()
    for k in a:
        assert rel_norm_err(a[k], b[k]) < FP32_ADAPTER_RTOL, k
    assert compiled.compiled_step is True and eager.compiled_step is False


def test_every_width_is_compiled_before_the_timed_steps(pair):
    prep, _, eager, compiled, recipe = pair
    assert compiled.extra["compiled_widths"] == WIDTHS
    assert compiled.extra["compiled_graphs"] == len(WIDTHS)  # one static graph per width
    assert not [w for w in compiled.warnings if "inside the timed steps" in w]
    # the compile is its own figure, not in a step: each step is far shorter than one width's
    assert compiled.compile_time_s > 0 and eager.compile_time_s is None
    assert max(compiled.step_times_s) < compiled.compile_time_s / len(WIDTHS)
    assert compiled.train_time_s == pytest.approx(sum(compiled.step_times_s[1:]))


def test_the_compile_warmup_changes_no_weight_state_or_rng(pair):
    prep, _, _, _, recipe = pair
    seen = recipe.after_warmup
    init = initial_lora_state(read_arch(prep.model_dir), CFG.lora_targets, CFG.lora_rank, CFG.seed)
    assert seen["lora"].keys() == init.keys()
    for k, v in init.items():
        assert np.array_equal(seen["lora"][k], v), k
    assert seen["opt_state"] == 0 and all(g is None for g in seen["grads"])
    assert seen["rng_same"]

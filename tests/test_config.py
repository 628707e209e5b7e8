"""RunConfig validation: a bad value is refused on creation, naming the field."""

from __future__ import annotations

import argparse
import json
import math
import re

import pytest

from ftcore.config import Batching, RunConfig, UserError
from ftcore.config_flags import add_run_options, config_from_args
from ftcore.files import jsonable

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    "change, field",
    [
        ({"lora_rank": 0}, "--lora-rank"),
        ({"lr": -1e-3}, "--lr"),
        ({"lr": float("nan")}, "--lr"),
        ({"batch_size": 65, "num_samples": 64}, "--batch-size"),
        ({"lora_targets": ("q_proj", "qkv")}, "--lora-targets"),
        ({"lora_targets": ()}, "--lora-targets"),
        ({"precision": "fp16"}, "--precision"),
        ({"device": "tpu"}, "--device"),
        ({"preset": "llama-70b"}, "--preset"),
        ({"steps": 0}, "--steps"),
        ({"timing_warmup_steps": 20, "steps": 20}, "--timing-warmup-steps"),
        ({"warmup_steps": 21, "steps": 20}, "--warmup-steps"),
        ({"lora_dropout": 1.0}, "--lora-dropout"),
        ({"max_seq_len": 4}, "--max-seq-len"),
        ({"num_layers": 0}, "--num-layers"),
        ({"batching": "sorted"}, "--batching"),
    ],
)
def test_bad_values_name_the_field(change, field):
    with pytest.raises(UserError, match=f"^{field}:"):
        RunConfig(**change)


def test_targets_from_comma_string_and_round_trip():
    cfg = RunConfig(lora_targets="q_proj, v_proj,o_proj")
    assert cfg.lora_targets == ("q_proj", "v_proj", "o_proj")
    assert RunConfig.from_dict(cfg.to_dict()) == cfg


def test_batching_is_a_member_and_written_as_its_string():
    """The flag and JSON carry the mode's string; the config holds the Batching member."""
    p = argparse.ArgumentParser()
    add_run_options(p)
    cfg = config_from_args(p.parse_args(["--batching", "packed"]))
    assert cfg.batching is Batching.PACKED and RunConfig().batching is Batching.LONGEST
    assert "(default longest)" in re.sub(r"\s+", " ", p.format_help())
    written = json.loads(cfg.to_json())
    assert type(written["batching"]) is str and written["batching"] == "packed"
    assert json.dumps(jsonable({"batching": cfg.batching})) == '{"batching": "packed"}'
    back = RunConfig(**written)
    assert back == cfg and back.batching is Batching.PACKED


def test_unknown_field_refused():
    with pytest.raises(UserError, match="unknown config field"):
        RunConfig.from_dict({"lora_rnak": 8})


def test_lr_schedule_shapes():
    cfg = RunConfig(lr=1.0, steps=12, warmup_steps=3, lr_schedule="cosine")
    lrs = [cfg.lr_at(s) for s in range(12)]
    assert lrs[:3] == [0.25, 0.5, 0.75]  # linear warm-up, never a wasted zero-lr step
    assert lrs[3] == 1.0 and all(a >= b for a, b in zip(lrs[3:], lrs[4:], strict=False))
    assert math.isclose(cfg.replace(lr_schedule="linear").lr_at(11), 1.0 - 8 / 9)
    assert cfg.replace(lr_schedule="constant").lr_at(11) == 1.0


def test_lora_scale_is_alpha_over_rank():
    assert RunConfig(lora_rank=8, lora_alpha=16).lora_scale == 2.0

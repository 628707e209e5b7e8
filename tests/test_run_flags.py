"""The run options are generated from RunConfig's fields (ftcore.config.option ->
ftcore.config_flags.add_run_options): the same flags as the hand-written list they replaced, and a new
field is a new flag with no other edit."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from ftcore import config
from ftcore.cli_args import Parser
from ftcore.config import RunConfig, UserError, option
from ftcore.config_flags import add_run_options, config_from_args

pytestmark = pytest.mark.unit

# The hand-written flags as they were before generation (commit f734d5f), one row each:
# flag strings, action, type, choices (the config constant's name, so a new choice in it is
# still the same flag), group title. Every one's argparse default was None.
MODEL, DATA, TRAIN = "model", "data", "training"
OPTIM, LORA = "optimiser (AdamW with bias correction)", "LoRA"
DP = "data parallel (torchrun / mlx.launch; torch and mlx backends)"
HAND_WRITTEN = {
    "model": (("--model",), "store", None, None, MODEL),
    "preset": (("--preset",), "store", None, "PRESETS", MODEL),
    "num_layers": (("--num-layers",), "store", int, None, MODEL),
    "allow_pickle": (("--allow-pickle",), "store_true", None, None, MODEL),
    "data": (("--data",), "store", None, None, DATA),
    "num_samples": (("--num-samples",), "store", int, None, DATA),
    "eval_samples": (("--eval-samples",), "store", int, None, DATA),
    "max_seq_len": (("--max-seq-len",), "store", int, None, DATA),
    "batching": (("--batching",), "store", None, "BATCHINGS", DATA),
    "mask_prompt": (("--mask-prompt", "--no-mask-prompt"), "bool", None, None, DATA),
    "batch_size": (("--batch-size",), "store", int, None, TRAIN),
    "steps": (("--steps",), "store", int, None, TRAIN),
    "epochs": (("--epochs",), "store", int, None, TRAIN),
    "project_records": (("--project-records",), "store", int, None, TRAIN),
    "timing_warmup_steps": (("--timing-warmup-steps",), "store", int, None, TRAIN),
    "eval_every": (("--eval-every",), "store", int, None, TRAIN),
    "eval_generate": (("--eval-generate", "--no-eval-generate"), "bool", None, None, TRAIN),
    "target_eval_loss": (("--target-eval-loss",), "store", float, None, TRAIN),
    "seed": (("--seed",), "store", int, None, TRAIN),
    "precision": (("--precision",), "store", None, "PRECISIONS", TRAIN),
    "device": (("--device",), "store", None, "DEVICES", TRAIN),
    "threads": (("--threads",), "store", int, None, TRAIN),
    "grad_checkpoint": (("--grad-checkpoint",), "store_true", None, None, TRAIN),
    "lr": (("--lr",), "store", float, None, OPTIM),
    "lr_schedule": (("--lr-schedule",), "store", None, "LR_SCHEDULES", OPTIM),
    "warmup_steps": (("--warmup-steps",), "store", int, None, OPTIM),
    "weight_decay": (("--weight-decay",), "store", float, None, OPTIM),
    "adam_beta1": (("--adam-beta1",), "store", float, None, OPTIM),
    "adam_beta2": (("--adam-beta2",), "store", float, None, OPTIM),
    "adam_eps": (("--adam-eps",), "store", float, None, OPTIM),
    "max_grad_norm": (("--max-grad-norm",), "store", float, None, OPTIM),
    "lora_rank": (("--lora-rank",), "store", int, None, LORA),
    "lora_alpha": (("--lora-alpha",), "store", float, None, LORA),
    "lora_dropout": (("--lora-dropout",), "store", float, None, LORA),
    "lora_targets": (("--lora-targets",), "store", None, None, LORA),
    "nproc": (("--nproc",), "store", int, None, DP),
    "nnodes": (("--nnodes",), "store", int, None, DP),
    "rdzv_endpoint": (("--rdzv-endpoint",), "store", None, None, DP),
    "hostfile": (("--hostfile",), "store", None, None, DP),
}
ACTIONS = {argparse._StoreAction: "store", argparse._StoreTrueAction: "store_true",
           argparse.BooleanOptionalAction: "bool"}  # fmt: skip


def run_flags(cfg: type = RunConfig) -> dict[str, tuple[argparse.Action, str]]:
    p = Parser(prog="t")
    add_run_options(p, cfg)
    return {a.dest: (a, g.title) for g in p._action_groups for a in g._group_actions if a.dest != "help"}


def test_generated_flags_are_the_hand_written_ones():
    flags = run_flags()
    assert set(HAND_WRITTEN) <= set(flags), set(HAND_WRITTEN) - set(flags)
    for dest, (strings, action, kind, choices, group) in HAND_WRITTEN.items():
        a, title = flags[dest]
        want = (strings, action, kind, getattr(config, choices) if choices else None, group, None)
        got = (tuple(a.option_strings), ACTIONS.get(type(a)), a.type, a.choices, title, a.default)
        assert got == want, dest


def test_every_field_has_a_flag_whose_help_gives_its_default():
    flags = run_flags()
    for f in dataclasses.fields(RunConfig):
        a, _ = flags[f.name]
        if f.default is not None and f.default is not False:  # None and off: the help says what
            assert "default" in a.help, f.name


def test_an_unset_flag_keeps_the_config_default_and_a_set_one_reaches_it():
    p = Parser(prog="t")
    add_run_options(p)
    assert config_from_args(p.parse_args([])) == RunConfig()
    args = p.parse_args(["--lr", "0.01", "--no-mask-prompt", "--grad-checkpoint", "--lora-targets", "q_proj,v_proj"])
    assert config_from_args(args) == RunConfig(lr=0.01, mask_prompt=False, grad_checkpoint=True,
                                               lora_targets=("q_proj", "v_proj"))  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Scratch(RunConfig):
    """RunConfig plus the fields a contributor adds: one line each, nothing else."""

    warmup_ratio: float = option(0.1, "share of steps for LR warm-up", group="scratch")
    style: str = option("plain", "prompt style", choices=("plain", "fancy"))
    verbose_steps: bool = False  # a bare field still gets its flag


def test_a_new_field_is_a_new_flag():
    flags = run_flags(Scratch)
    a, title = flags["warmup_ratio"]
    assert (a.option_strings, a.type, a.default, title) == (["--warmup-ratio"], float, None, "scratch")
    assert "(default 0.1)" in a.help
    assert flags["style"][0].choices == ("plain", "fancy")
    assert isinstance(flags["verbose_steps"][0], argparse._StoreTrueAction)
    p = Parser(prog="t")
    add_run_options(p, Scratch)
    cfg = config_from_args(p.parse_args(["--warmup-ratio", "0.25", "--style", "fancy"]), Scratch)
    assert (cfg.warmup_ratio, cfg.style, cfg.verbose_steps, cfg.lr) == (0.25, "fancy", False, RunConfig().lr)
    with pytest.raises(UserError, match="invalid choice: 'odd'"):  # a bad choice: one error line
        p.parse_args(["--style", "odd"])

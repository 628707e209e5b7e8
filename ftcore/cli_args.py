"""ftcore's command line, its arguments: one sub-parser per command (ftcore.cli runs them). Run
options come from RunConfig's fields (ftcore.config_flags.add_run_options)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ftcore.backends import BACKENDS
from ftcore.config import PRESETS, PROMPT_FORMATS, RunConfig, UserError
from ftcore.config_flags import add_run_options
from ftcore.run.bench_cases import SIZES
from ftcore.run.compare import DEFAULT_TIME_BUDGET_S, MIN_RUNS
from ftcore.run.sweep import DEFAULT_LAYERS, EXTRA_PRESET, SWEEP_DEFAULTS, SWEEP_PRESET

DEBUG_ENV = "FTCORE_DEBUG"
REPLACE_HELP = "replace an earlier run in --out (whole; it is kept if this run is interrupted)"
DEFAULT_BACKENDS = "torch,mlx"
BACKENDS_HELP = "; ".join(f"{name}: {spec.summary}" for name, spec in BACKENDS.items())


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's default prints the whole usage block
        raise UserError(f"{self.prog}: {message}")


def build_parser() -> Parser:
    ap = Parser(
        prog="ftcore",
        description="LoRA fine-tuning benchmarks: PyTorch vs MLX on identical inputs.",
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--debug",
        action="store_true",
        help=f"show tracebacks of unexpected errors (or {DEBUG_ENV}=1)",
    )
    sub = ap.add_subparsers(dest="command", required=True, parser_class=Parser)
    for add in (
        _add_run,
        _add_compare,
        _add_sweep,
        _add_convert,
        _add_generate,
        _add_profile_and_pretrain,
        _add_bench_diff,
    ):
        add(sub, common)
    return ap


def _add_run(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "run",
        parents=[common],
        help="fine-tune with one backend",
        description=(
            "Fine-tune with one backend in a fresh process; writes OUT/result.json and "
            "OUT/adapter/."
        ),
    )
    p.add_argument("--backend", required=True, choices=list(BACKENDS), help=BACKENDS_HELP)
    p.add_argument("--out", required=True, type=Path, help="output folder (new or empty)")
    p.add_argument("--replace", action="store_true", help=REPLACE_HELP)
    add_run_options(p)



def _add_compare(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "compare",
        parents=[common],
        help="run backends side by side and report",
        description=(
            "Run each backend on one config (each in its own process) and write "
            "OUT/<backend>/result.json, comparison.json, report.md and plots."
        ),
    )
    p.add_argument(
        "--out",
        type=Path,
        help="output folder, new or empty (default: a new runs/compare-<time>[-n] folder)",
    )
    p.add_argument("--replace", action="store_true", help=REPLACE_HELP)
    p.add_argument(
        "--verbose",
        action="store_true",
        help=(
            "print the full table, checks, notes and footnotes (as in report.md) instead of the "
            "short answer"
        ),
    )
    _add_compare_options(p)


def _add_compare_options(p: argparse.ArgumentParser) -> None:
    """The flags of a compare (compare's and each of sweep's points): backends, runs, the run."""
    p.add_argument("--backends", default=DEFAULT_BACKENDS,
                   help=f"comma list (default {DEFAULT_BACKENDS}); {BACKENDS_HELP}")
    p.add_argument(
        "--repeats", type=int, default=None, metavar="N",
        help=(
            "runs per backend, each a fresh process, interleaved (default: adaptive, at least "
            f"{MIN_RUNS}, more while the speed verdict is undecided and --time-budget-s allows)"
        ),
    )  # fmt: skip
    p.add_argument(
        "--time-budget-s", type=float, default=DEFAULT_TIME_BUDGET_S, metavar="S",
        help=(
            f"wall time the rounds of runs may take beyond the first {MIN_RUNS} (or --repeats): "
            "more rounds to decide an undecided verdict or to make up for BUSY runs (default "
            f"{DEFAULT_TIME_BUDGET_S:g})"
        ),
    )  # fmt: skip
    add_run_options(p)


def _add_sweep(sub: Any, common: argparse.ArgumentParser) -> None:
    own = " ".join(f"--{k.replace('_', '-')} {v:g}" if not isinstance(v, bool) else
                   f"--{'' if v else 'no-'}{k.replace('_', '-')}"
                   for k, v in SWEEP_DEFAULTS.items())  # fmt: skip
    p = sub.add_parser(
        "sweep", parents=[common], help="the compare verdict across model sizes",
        description=(
            f"One short compare per model size: {SWEEP_PRESET} (width 2048) cut to each depth of "
            f"--layers, plus the embedded default ({EXTRA_PRESET}) unless --preset or --model "
            "names the model. Writes OUT/sweep.json, OUT/speedup_vs_size.png and OUT/<point>/ "
            f"(each point's compare). Flags not given take sweep's own defaults: {own} (the "
            "flags' help gives compare's)."
        ),
    )  # fmt: skip
    p.add_argument("--layers", metavar="N,N,...",
                   help=f"depths to cut the preset to (default {','.join(map(str, DEFAULT_LAYERS))}"
                   ": those below the preset's depth, and its depth)")  # fmt: skip
    p.add_argument("--out", type=Path,
                   help="output folder, new or empty (default: a new runs/sweep-<time>[-n] folder)")
    p.add_argument("--replace", action="store_true", help=REPLACE_HELP)
    _add_compare_options(p)
    p.set_defaults(**SWEEP_DEFAULTS)


def _add_convert(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "convert",
        parents=[common],
        help="convert a HF Llama checkpoint to MLX",
        description="Convert a local Hugging Face Llama folder to MLX weights + config.",
    )
    p.add_argument("--model", required=True, type=Path, help="local Hugging Face Llama folder")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument(
        "--dtype", choices=["float32", "bfloat16", "float16"], help="cast weights (default: keep)"
    )
    p.add_argument(
        "--force", action="store_true", help="replace what --out holds (an earlier conversion)"
    )



def _add_generate(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "generate",
        parents=[common],
        help="greedy answer from a checkpoint (+ adapter) in torch or MLX",
        description=(
            "Greedy decoding (KV cache, fp32) from a local checkpoint (a full fine-tune's: "
            "RUN/<backend>/model) or a preset, with a trained LoRA or DoRA adapter (PEFT folder, "
            "e.g. RUN/<backend>/adapter) when given; prints the answer."
        ),
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--model", type=Path,
        help="local Hugging Face Llama folder (a full fine-tune's: RUN/<backend>/model)",
    )  # fmt: skip
    g.add_argument(
        "--preset", choices=PRESETS, help=f"built-in checkpoint (default {RunConfig().preset})"
    )
    p.add_argument(
        "--adapter",
        type=Path,
        help="PEFT LoRA / DoRA adapter folder (ftcore writes one per backend: "
        "RUN/<backend>/adapter)",
    )
    p.add_argument(
        "--backend",
        choices=["torch", "mlx"],
        default="torch",
        help="framework that decodes (default torch)",
    )
    p.add_argument(
        "--prompt",
        required=True,
        action="append",
        help=(
            "the instruction (wrapped in the Alpaca template unless --raw); repeat for several, "
            "one answer per line"
        ),
    )
    p.add_argument("--input", default="", help="the Alpaca input section, if the task has one")
    p.add_argument(
        "--raw", action="store_true", help="send --prompt as it is, without the template"
    )
    p.add_argument(
        "--prompt-format",
        choices=PROMPT_FORMATS,
        default=None,
        help=(
            "alpaca or chat (default: the format the --adapter was trained with, recorded in its "
            "folder; alpaca without one)"
        ),
    )
    p.add_argument("--max-new-tokens", type=int, default=64, help="(default 64)")
    p.add_argument(
        "--json", action="store_true", help="print backend, prompt, token ids and text as JSON"
    )


def _add_profile_and_pretrain(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "profile",
        parents=[common],
        help="memray-profile one backend's fine-tune",
        description=(
            "Record a memray capture of one backend's whole fine-tune process (a separate, "
            "untimed pass) and write its flamegraph."
        ),
    )
    p.add_argument("--backend", required=True, choices=list(BACKENDS), help=BACKENDS_HELP)
    p.add_argument("--out", required=True, type=Path, help="output folder (new or empty)")
    p.add_argument("--replace", action="store_true", help=REPLACE_HELP)
    p.add_argument(
        "--native",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="record native (C/C++) stacks (default on)",
    )
    add_run_options(p)

    p = sub.add_parser(
        "pretrain",
        parents=[common],
        help="rebuild the shipped default model from its recipe",
        description=(
            "Make the tiny-pretrained preset from its recipe (ftcore/inputs/pretrain.py: "
            "tokenizer, seeded init, 1-2 minutes of pretraining on 2 cores) into OUT. ftcore "
            "ships the result in ftcore/presets/tiny-pretrained; rebuild it there when the recipe "
            "changes."
        ),
    )
    p.add_argument("--out", required=True, type=Path, help="output folder (new or empty)")
    p.add_argument("--replace", action="store_true", help="replace what OUT holds")


def _add_bench_diff(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "bench-diff",
        parents=[common],
        help="same-machine A/B of two revisions' training steps",
        description=(
            "Time the training steps of two git revisions of this repository on this machine, "
            "interleaved, and report per case the HEAD/BASE step-time ratio with a 95%% interval "
            "and a p-value. Exit 1 when a case is slower by more than --threshold and "
            "significantly so, else 0."
        ),
    )
    p.add_argument("base", help="git revision to compare against (e.g. main, HEAD~1)")
    p.add_argument("head", nargs="?", help="git revision to test (default: the working tree)")
    p.add_argument(
        "-k",
        dest="expr",
        metavar="EXPR",
        help="select cases by id, as pytest -k (ids like tiny-b4-s128-fp32-torch)",
    )
    p.add_argument(
        "--threshold",
        type=float,
        default=0.10,
        help="slowdown that counts, as a fraction (default 0.10)",
    )
    p.add_argument(
        "--runs",
        type=int,
        default=10,
        help="processes per revision and case, interleaved (default 10)",
    )
    p.add_argument(
        "--warmup-steps", type=int, default=2, help="untimed steps per process (default 2)"
    )
    p.add_argument("--timed-steps", type=int, default=6, help="timed steps per process (default 6)")
    p.add_argument(
        "--sizes", default="tiny", help=f"comma list from {','.join(SIZES)} (default tiny)"
    )
    p.add_argument(
        "--backends", default=",".join(BACKENDS), help=f"comma list (default {','.join(BACKENDS)})"
    )
    p.add_argument("--json", type=Path, help="write every figure to this file")



"""ftcore command line: run | compare | convert | generate | profile | pretrain | bench-diff.

Exit codes: 0 every backend ran ok; 1 a backend failed, diverged or was killed (its row says why);
2 a user mistake (data, model folder, flags, device, output folder): one line `error: ...` on
stderr and nothing written, or a full disk (one line naming the file, status.json `failed`); 130
interrupted (SIGINT/SIGTERM): the children are stopped and the run folder is marked `interrupted`
(ftcore.run.rundir). No traceback reaches the user unless --debug or FTCORE_DEBUG=1 asks for it."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
from pathlib import Path

from ftcore.backends import BACKENDS
from ftcore.bench.cases import SIZES
from ftcore.config import (
    PRESETS,
    PROMPT_FORMATS,
    RunConfig,
    UserError,
    add_run_options,
    config_from_args,
)
from ftcore.inputs.presets import resolve_model_dir
from ftcore.report import format_run, format_short, format_table
from ftcore.result import RunResult
from ftcore.run.backend_process import OFFLINE_ENV, run_backend
from ftcore.run.compare import DEFAULT_TIME_BUDGET_S, MIN_RUNS, Schedule, compare
from ftcore.run.preflight import check_run
from ftcore.run.procs import kill_all, stop_all
from ftcore.run.rundir import RunDir

DEBUG_ENV = "FTCORE_DEBUG"
ACTIVE_RUN: RunDir | None = None  # the folder being written, marked if the run is interrupted

DEFAULT_BACKENDS = "torch,mlx"
BACKENDS_HELP = "; ".join(f"{name}: {spec.summary}" for name, spec in BACKENDS.items())


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's default prints the whole usage block
        raise UserError(f"{self.prog}: {message}")


def build_parser() -> Parser:
    ap = Parser(prog="ftcore", description="LoRA fine-tuning benchmarks: PyTorch vs MLX on identical inputs.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help=f"show tracebacks of unexpected errors (or {DEBUG_ENV}=1)")
    sub = ap.add_subparsers(dest="command", required=True, parser_class=Parser)
    replace_help = "replace an earlier run in --out (whole; it is kept if this run is interrupted)"

    p = sub.add_parser("run", parents=[common], help="fine-tune with one backend", description="Fine-tune with one backend in a fresh process; writes OUT/result.json and OUT/adapter/.")
    p.add_argument("--backend", required=True, choices=list(BACKENDS), help=BACKENDS_HELP)
    p.add_argument("--out", required=True, type=Path, help="output folder (new or empty)")
    p.add_argument("--replace", action="store_true", help=replace_help)
    add_run_options(p)

    p = sub.add_parser("compare", parents=[common], help="run backends side by side and report", description="Run each backend on one config (each in its own process) and write OUT/<backend>/result.json, comparison.json, report.md and plots.")
    p.add_argument("--backends", default=DEFAULT_BACKENDS, help=f"comma list (default {DEFAULT_BACKENDS}); {BACKENDS_HELP}")
    p.add_argument("--out", type=Path, help="output folder, new or empty (default: a new runs/compare-<time>[-n] folder)")
    p.add_argument("--replace", action="store_true", help=replace_help)
    p.add_argument("--verbose", action="store_true", help="print the full table, checks, notes and footnotes (as in report.md) instead of the short answer")
    p.add_argument("--repeats", type=int, default=None, metavar="N", help=f"runs per backend, each a fresh process, interleaved (default: adaptive, at least {MIN_RUNS}, more while the speed verdict is undecided and --time-budget-s allows)")
    p.add_argument("--time-budget-s", type=float, default=DEFAULT_TIME_BUDGET_S, metavar="S", help=f"wall time the rounds of runs may take beyond the first {MIN_RUNS} (or --repeats): more rounds to decide an undecided verdict or to make up for BUSY runs (default {DEFAULT_TIME_BUDGET_S:g})")
    add_run_options(p)

    p = sub.add_parser("convert", parents=[common], help="convert a HF Llama checkpoint to MLX", description="Convert a local Hugging Face Llama folder to MLX weights + config.")
    p.add_argument("--model", required=True, type=Path, help="local Hugging Face Llama folder")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="cast weights (default: keep)")
    p.add_argument("--force", action="store_true", help="replace what --out holds (an earlier conversion)")

    p = sub.add_parser("generate", parents=[common], help="greedy answer from a checkpoint (+ adapter) in torch or MLX", description="Greedy decoding (KV cache, fp32) from a local checkpoint or a preset, with a trained adapter (PEFT folder, e.g. RUN/<backend>/adapter) when given; prints the answer.")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--model", type=Path, help="local Hugging Face Llama folder")
    g.add_argument("--preset", choices=PRESETS, help=f"built-in checkpoint (default {RunConfig().preset})")
    p.add_argument("--adapter", type=Path, help="PEFT LoRA adapter folder (ftcore writes one per backend: RUN/<backend>/adapter)")
    p.add_argument("--backend", choices=["torch", "mlx"], default="torch", help="framework that decodes (default torch)")
    p.add_argument("--prompt", required=True, action="append", help="the instruction (wrapped in the Alpaca template unless --raw); repeat for several, one answer per line")
    p.add_argument("--input", default="", help="the Alpaca input section, if the task has one")
    p.add_argument("--raw", action="store_true", help="send --prompt as it is, without the template")
    p.add_argument("--prompt-format", choices=PROMPT_FORMATS, default=None, help="alpaca or chat (default: the format the --adapter was trained with, recorded in its folder; alpaca without one)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="(default 64)")
    p.add_argument("--json", action="store_true", help="print backend, prompt, token ids and text as JSON")

    p = sub.add_parser("profile", parents=[common], help="memray-profile one backend's fine-tune", description="Record a memray capture of one backend's whole fine-tune process (a separate, untimed pass) and write its flamegraph.")
    p.add_argument("--backend", required=True, choices=list(BACKENDS), help=BACKENDS_HELP)
    p.add_argument("--out", required=True, type=Path, help="output folder (new or empty)")
    p.add_argument("--replace", action="store_true", help=replace_help)
    p.add_argument("--native", action=argparse.BooleanOptionalAction, default=True, help="record native (C/C++) stacks (default on)")
    add_run_options(p)

    p = sub.add_parser("pretrain", parents=[common], help="rebuild the shipped default model from its recipe", description="Make the tiny-pretrained preset from its recipe (ftcore/inputs/pretrain.py: tokenizer, seeded init, 1-2 minutes of pretraining on 2 cores) into OUT. ftcore ships the result in ftcore/presets/tiny-pretrained; rebuild it there when the recipe changes.")
    p.add_argument("--out", required=True, type=Path, help="output folder (new or empty)")
    p.add_argument("--replace", action="store_true", help="replace what OUT holds")

    p = sub.add_parser("bench-diff", parents=[common], help="same-machine A/B of two revisions' training steps", description="Time the training steps of two git revisions of this repository on this machine, interleaved, and report per case the HEAD/BASE step-time ratio with a 95%% interval and a p-value. Exit 1 when a case is slower by more than --threshold and significantly so, else 0.")
    p.add_argument("base", help="git revision to compare against (e.g. main, HEAD~1)")
    p.add_argument("head", nargs="?", help="git revision to test (default: the working tree)")
    p.add_argument("-k", dest="expr", metavar="EXPR", help="select cases by id, as pytest -k (ids like tiny-b4-s128-fp32-torch)")
    p.add_argument("--threshold", type=float, default=0.10, help="slowdown that counts, as a fraction (default 0.10)")
    p.add_argument("--runs", type=int, default=10, help="processes per revision and case, interleaved (default 10)")
    p.add_argument("--warmup-steps", type=int, default=2, help="untimed steps per process (default 2)")
    p.add_argument("--timed-steps", type=int, default=6, help="timed steps per process (default 6)")
    p.add_argument("--sizes", default="tiny", help=f"comma list from {','.join(SIZES)} (default tiny)")
    p.add_argument("--backends", default=",".join(BACKENDS), help=f"comma list (default {','.join(BACKENDS)})")
    p.add_argument("--json", type=Path, help="write every figure to this file")
    return ap


def parse_backends(text: str, twice_ok: bool = False) -> list[str]:
    """Backend names from a comma list; `twice_ok`: a backend may be named again (compare's A/A
    run: `torch,torch` measures this machine's noise)."""
    names = [b.strip() for b in text.split(",") if b.strip()]
    unknown = [b for b in names if b not in BACKENDS]
    if unknown or not names:
        raise UserError(f"--backends: unknown backend(s) {', '.join(unknown) or '(none given)'} (choose from {','.join(BACKENDS)})")
    if len(set(names)) != len(names) and not twice_ok:
        raise UserError("--backends: a backend is named twice")
    return names


def open_run(out: Path | None, replace: bool) -> RunDir:
    """The run's folder, to be claimed once every input check has passed (ftcore.run.rundir)."""
    global ACTIVE_RUN
    ACTIVE_RUN = RunDir(out, replace)
    ACTIVE_RUN.check()  # refuse an earlier run in --out before the slower checks
    return ACTIVE_RUN


def finish_run(results: list, code_if_ok: int = 0) -> int:
    """Exit code 0 when every row is ok, else 1 with one `error:` line per other row; the run
    folder's status says which."""
    bad = [r for r in results if r.status != "ok"]
    for r in bad:
        print(f"error: {r.backend} {r.status}: {r.error}", file=sys.stderr)
    code = 1 if bad else code_if_ok
    ACTIVE_RUN.end("failed" if bad else "complete", code)
    return code


def cmd_run(args: argparse.Namespace) -> int:
    run_dir = open_run(args.out, args.replace)
    prep = check_run(config_from_args(args), [args.backend])
    out = run_dir.claim()
    result = run_backend(args.backend, prep.save(out), out)
    if summary := format_run(result):
        print(summary)
    print(f"result           {out / 'result.json'}")
    return finish_run([result])


def cmd_compare(args: argparse.Namespace) -> int:
    backends = parse_backends(args.backends, twice_ok=True)
    schedule = Schedule.checked(args.repeats, args.time_budget_s)
    run_dir = open_run(args.out, args.replace)
    prep = check_run(config_from_args(args), list(dict.fromkeys(backends)))
    out = run_dir.claim()
    comparison = compare(backends, prep.save(out), out, schedule=schedule)
    if args.verbose:
        print(format_table(comparison))
        print(f"\nreport: {out / 'report.md'}   data: {out / 'comparison.json'}   plot: {out / 'loss_curves.png'}")
    else:  # the short answer; the full table with footnotes and environment is in report.md
        width = shutil.get_terminal_size().columns
        print(format_short(comparison, width))
        print(f"\nFull table, footnotes, environment: report.md (or --verbose)\nreport: {out / 'report.md'}"
              f"\ndata:   {out / 'comparison.json'}")
    return finish_run([RunResult.from_dict(r) for r in comparison["results"]])


def cmd_convert(args: argparse.Namespace) -> int:
    from ftcore.mlx.convert import ConversionError, convert_hf_to_mlx  # imports MLX

    if args.out.is_dir() and any(args.out.iterdir()) and not args.force:
        raise UserError(f"--out {args.out}: not empty; pass --force to replace an earlier conversion there")
    try:
        out = convert_hf_to_mlx(args.model, args.out, dtype=args.dtype)
    except ConversionError as e:
        raise UserError(str(e)) from None
    print(f"MLX weights and config written to {out}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from ftcore.run.generate_text import Prompting, generate

    cfg = RunConfig(model=str(args.model) if args.model else None, preset=args.preset or RunConfig().preset)
    how = Prompting(args.input, args.raw, args.prompt_format)
    for out in generate(resolve_model_dir(cfg), args.adapter, args.backend, args.prompt, args.max_new_tokens, how):
        print(json.dumps(out) if args.json else out["text"])
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    if cfg.world_size > 1:
        raise UserError("profile: --nproc/--nnodes must be 1: memray records one process, and the ranks "
                        "would write one capture file; profile one process (ftcore run for --nproc speed)")
    from ftcore.run.memray_profile import profile

    run_dir = open_run(args.out, args.replace)
    prep = check_run(cfg, [args.backend])
    result, lines = profile(args.backend, prep, run_dir.claim(), args.native)
    for line in lines:
        print(line)
    return finish_run([result])


def cmd_pretrain(args: argparse.Namespace) -> int:
    from ftcore.inputs.checkpoint import weights_sha256
    from ftcore.inputs.presets import build_preset, check_preset_out, preset_config

    check_preset_out(args.out, args.replace)
    build_preset("tiny-pretrained", preset_config("tiny-pretrained"), args.out)
    made = json.loads((args.out / "ftcore_preset.json").read_text())
    shares = ", ".join(f"{k} {100 * v:.0f}%" for k, v in made["exact_match"].items())
    print(f"tiny-pretrained written to {args.out} (fingerprint {made['fingerprint']}, "
          f"weights sha256 {weights_sha256(args.out)[:16]})\nexact match by family: {shares}")
    return 0


def cmd_bench_diff(args: argparse.Namespace) -> int:
    from ftcore.bench.bench_diff import DiffPlan, bench_diff

    sizes = [x.strip() for x in args.sizes.split(",") if x.strip()]
    if unknown := [x for x in sizes if x not in SIZES]:
        raise UserError(f"--sizes: unknown {', '.join(unknown)} (choose from {','.join(SIZES)})")
    return bench_diff(DiffPlan(args.base, args.head, args.expr, args.threshold, args.runs, args.warmup_steps,
                               args.timed_steps, sizes, args.json, parse_backends(args.backends)))


COMMANDS = {"run": cmd_run, "compare": cmd_compare, "convert": cmd_convert, "generate": cmd_generate, "profile": cmd_profile,
            "pretrain": cmd_pretrain, "bench-diff": cmd_bench_diff}


def _interrupt(signum, frame) -> None:  # SIGTERM takes Ctrl-C's path
    raise KeyboardInterrupt


def _second_interrupt(signum, frame) -> None:  # while stopping: stop at once, still in one line
    kill_all()
    os.write(2, b"error: interrupted twice; children killed, exiting at once\n")
    os._exit(130)


def interrupted() -> int:
    """Stop the children, mark the run folder, exit 130; a second Ctrl-C exits at once."""
    signal.signal(signal.SIGINT, _second_interrupt)
    signal.signal(signal.SIGTERM, _second_interrupt)
    stop_all()
    where = ""
    if ACTIVE_RUN is not None and ACTIVE_RUN.path is not None:
        replacing = ACTIVE_RUN.replacing
        ACTIVE_RUN.interrupted()
        where = f"; {ACTIVE_RUN.path} " + ("kept as it was" if replacing else "is marked interrupted")
    print(f"error: interrupted{where}", file=sys.stderr)
    # a late Ctrl-C must not kill the exit itself (Python restores SIG_DFL while shutting down)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return 130


def main(argv: list[str] | None = None) -> int:
    for k, v in OFFLINE_ENV.items():
        os.environ.setdefault(k, v)
    argv = sys.argv[1:] if argv is None else argv
    debug = os.environ.get(DEBUG_ENV) == "1" or "--debug" in argv
    if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return interrupted()
    except OSError as e:  # unwritable --out, disk full (ftcore.files.DiskFull names the file), ...
        if debug:
            raise
        print(f"error: {e}{ACTIVE_RUN.mark_failed(2) if ACTIVE_RUN else ''}", file=sys.stderr)
        return 2
    except Exception as e:  # a bug, not the user's: one line unless asked for the traceback
        if debug:
            raise
        print(f"error: internal error: {type(e).__name__}: {e} (--debug shows the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

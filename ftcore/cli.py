"""ftcore command line: run | compare | sweep | convert | generate | profile | pretrain |
bench-diff.

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
from ftcore.cli_args import DEBUG_ENV, build_parser
from ftcore.config import RunConfig, UserError
from ftcore.config_flags import config_from_args
from ftcore.inputs.presets import resolve_model_dir
from ftcore.report import format_run, format_short, format_table
from ftcore.report.sweep_report import format_sweep
from ftcore.result import RunResult
from ftcore.run.backend_process import OFFLINE_ENV, run_backend
from ftcore.run.bench_cases import SIZES
from ftcore.run.compare import Schedule, compare
from ftcore.run.preflight import check_run
from ftcore.run.procs import kill_all, stop_all
from ftcore.run.rundir import RunFolder
from ftcore.run.size_defaults import size_defaults
from ftcore.run.sweep import plan_points, sweep

ACTIVE_RUN: RunFolder | None = None  # the folder being written, marked if the run is interrupted

def parse_backends(text: str, twice_ok: bool = False) -> list[str]:
    """Backend names from a comma list; `twice_ok`: a backend may be named again (compare's A/A
    run: `torch,torch` measures this machine's noise)."""
    names = [b.strip() for b in text.split(",") if b.strip()]
    unknown = [b for b in names if b not in BACKENDS]
    if unknown or not names:
        raise UserError(
            f"--backends: unknown backend(s) {', '.join(unknown) or '(none given)'} (choose from "
            f"{','.join(BACKENDS)})"
        )
    if len(set(names)) != len(names) and not twice_ok:
        raise UserError("--backends: a backend is named twice")
    return names


def open_run(out: Path | None, replace: bool, prefix: str = "compare") -> RunFolder:
    """The run's folder, to be claimed once every input check has passed (ftcore.run.rundir)."""
    global ACTIVE_RUN
    ACTIVE_RUN = RunFolder(out, replace, prefix=prefix)
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
    given = {k for k, v in vars(args).items() if v is not None}  # the flags the user set
    cfg, repeats, size_note = size_defaults(config_from_args(args), given)
    schedule = Schedule.checked(repeats or args.repeats, args.time_budget_s)
    run_dir = open_run(args.out, args.replace)
    if size_note:
        print(f"note: {size_note}", file=sys.stderr, flush=True)
    prep = check_run(cfg, list(dict.fromkeys(backends)))
    out = run_dir.claim()
    comparison = compare(backends, prep.save(out), out, schedule=schedule, note=size_note)
    if args.verbose:
        print(format_table(comparison))
        print(
            f"\nreport: {out / 'report.md'}   data: {out / 'comparison.json'}   plot: "
            f"{out / 'loss_curves.png'}"
        )
    else:  # the short answer; the full table with footnotes and environment is in report.md
        width = shutil.get_terminal_size().columns
        print(format_short(comparison, width))
        print(
            "\nFull table, footnotes, environment: report.md (or --verbose)\nreport: "
            f"{out / 'report.md'}\ndata:   {out / 'comparison.json'}"
        )
    return finish_run([RunResult.from_dict(r) for r in comparison["results"]])


def cmd_sweep(args: argparse.Namespace) -> int:
    backends = parse_backends(args.backends, twice_ok=True)
    schedule = Schedule.checked(args.repeats, args.time_budget_s)
    points = plan_points(config_from_args(args), args.layers, args.preset is not None)
    run_dir = open_run(args.out, args.replace, prefix="sweep")
    # every point's inputs checked (presets made, MLX conversions cached) before any point runs
    preps = [check_run(p.cfg, list(dict.fromkeys(backends))) for p in points]
    out = run_dir.claim()
    record = sweep(points, preps, backends, out, schedule)
    print(format_sweep(record))
    print(f"\ndata: {out / 'sweep.json'}\nplot: {out / 'speedup_vs_size.png'}")
    bad = [p for p in record["points"] if p["status"] != "ok"]
    for p in bad:
        print(f"error: point {p['name']} failed: {'; '.join(p['errors'])}", file=sys.stderr)
    ACTIVE_RUN.end("failed" if bad else "complete", 1 if bad else 0)
    return 1 if bad else 0


def cmd_convert(args: argparse.Namespace) -> int:
    from ftcore.mlx.convert import ConversionError, convert_hf_to_mlx  # imports MLX

    if args.out.is_dir() and any(args.out.iterdir()) and not args.force:
        raise UserError(
            f"--out {args.out}: not empty; pass --force to replace an earlier conversion there"
        )
    try:
        out = convert_hf_to_mlx(args.model, args.out, dtype=args.dtype)
    except ConversionError as e:
        raise UserError(str(e)) from None
    print(f"MLX weights and config written to {out}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from ftcore.run.generate_text import Prompting, generate

    cfg = RunConfig(
        model=str(args.model) if args.model else None, preset=args.preset or RunConfig().preset
    )
    how = Prompting(args.input, args.raw, args.prompt_format)
    for out in generate(
        resolve_model_dir(cfg), args.adapter, args.backend, args.prompt, args.max_new_tokens, how
    ):
        print(json.dumps(out) if args.json else out["text"])
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    if cfg.world_size > 1:
        raise UserError(
            "profile: --nproc/--nnodes must be 1: memray records one process, and the ranks "
            "would write one capture file; profile one process (ftcore run for --nproc speed)"
        )
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
    from ftcore.run.bench_diff import DiffPlan, bench_diff

    sizes = [x.strip() for x in args.sizes.split(",") if x.strip()]
    if unknown := [x for x in sizes if x not in SIZES]:
        raise UserError(f"--sizes: unknown {', '.join(unknown)} (choose from {','.join(SIZES)})")
    return bench_diff(
        DiffPlan(
            args.base,
            args.head,
            args.expr,
            args.threshold,
            args.runs,
            args.warmup_steps,
            args.timed_steps,
            sizes,
            args.json,
            parse_backends(args.backends),
        )
    )


COMMANDS = {
    "run": cmd_run,
    "compare": cmd_compare,
    "sweep": cmd_sweep,
    "convert": cmd_convert,
    "generate": cmd_generate,
    "profile": cmd_profile,
    "pretrain": cmd_pretrain,
    "bench-diff": cmd_bench_diff,
}


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
        where = f"; {ACTIVE_RUN.path} " + (
            "kept as it was" if replacing else "is marked interrupted"
        )
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
        print(
            f"error: internal error: {type(e).__name__}: {e} (--debug shows the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())

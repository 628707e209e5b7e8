"""Child side of one backend's run: `python -m ftcore.run.child` (started by
ftcore.run.backend_process.BackendProcess) loads config + batches, measures peak RSS around the
backend's `train`, and writes result.json atomically: status `ok`, `diverged` (a non-finite loss or
gradient stopped it, ftcore.backends.step_clock.Diverged) or `failed` (an exception; its
traceback in `traceback`; a full disk in one line, ftcore.files.DiskFull). When even result.json
finds no room, the reason is its last line on stderr, exit status 1. It runs in its own session
and dies with the parent (ftcore.run.procs).
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

from ftcore.backends import BACKENDS, get_backend
from ftcore.backends.step_clock import Diverged
from ftcore.config import RunConfig, UserError
from ftcore.files import DiskFull
from ftcore.inputs.batches import Batches
from ftcore.measure.rss import PeakRSS
from ftcore.process.ranks import RankInfo, announce, write_rank_file
from ftcore.result import RunResult
from ftcore.run.procs import die_with_parent

RESULT_FILE = "result.json"


def main(argv: list[str] | None = None) -> int:
    """Child entry: train one backend, write result.json; exit 1 with a failed row on error."""
    ap = argparse.ArgumentParser(prog="python -m ftcore.run.child")
    ap.add_argument("--backend", required=True, choices=sorted(BACKENDS))
    ap.add_argument("--config", required=True, help="RunConfig as JSON")
    ap.add_argument("--model-dir", required=True, type=Path)
    ap.add_argument("--batches", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args(argv)
    die_with_parent()
    cfg = RunConfig.from_dict(json.loads(args.config))
    args.out.mkdir(parents=True, exist_ok=True)
    ranks = RankInfo.from_env()
    if ranks:
        announce(args.out, ranks.rank)
    with PeakRSS() as rss:
        try:
            batches = Batches.load(args.batches)
            result = get_backend(args.backend).train(cfg, args.model_dir, batches, args.out)
            code = 0
        except KeyboardInterrupt:  # SIGINT sent to this process itself: stop, quietly
            return 130
        except Diverged as e:
            result, code = e.result(args.backend, cfg.to_dict()), 1
            print(f"[{args.backend}] {result.error}", file=sys.stderr)
        except (UserError, DiskFull) as e:  # one line, no traceback: the row says it
            result, code = RunResult.failed(args.backend, cfg.to_dict(), str(e)), 1
        except Exception as e:  # the row says why; the traceback stays in the result for debugging
            result, code = (
                RunResult.failed(args.backend, cfg.to_dict(), f"{type(e).__name__}: {e}"),
                1,
            )
            result.traceback = traceback.format_exc()
            print(f"[{args.backend}] failed: {type(e).__name__}: {e}", file=sys.stderr)
    result.peak_rss_mb = result.peak_rss_max_rank_mb = rss.peak_mb
    result.rank_threads = result.rank_threads or result.threads  # a loop that did not say
    if ranks:  # the parent sums the ranks' peaks (ftcore.run.rank_watch.merge_ranks)
        write_rank_file(args.out, ranks.rank, status=result.status, peak_rss_mb=rss.peak_mb,
                        baseline_rss_mb=result.baseline_rss_mb, threads=result.rank_threads,
                        # this rank's shard's, summed by the parent
                        step_targets=result.step_targets)
        if ranks.rank:
            return code
    try:
        result.write_json(args.out / RESULT_FILE)
    except DiskFull as e:  # the parent reads its row's reason from this line
        print(
            f"[{args.backend}] failed: {result.error if result.status != 'ok' else e}",
            file=sys.stderr,
        )
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())

"""Timed fine-tune cases: backend x size x batch/sequence x precision.

What is timed: pytest-benchmark's figures (min/median/...) are the wall clock of one whole child
process per round — interpreter start, imports, model load (MLX: conversion, cached after the
first run), training, eval and adapter save — started by `ftcore.runner.run_backend`, so every
round is a clean process (no allocator state, caches or leaks carried between rounds). The
backend's own figures from each round (train_time_s over the timed steps, tokens/s, peak RSS,
MFU, ...) go into `benchmark.extra_info`: medians over the timed rounds, per-round lists in
`<name>_rounds`. Warm-up rounds (default 1) run first and are left out of both.
"""

from __future__ import annotations

import bench_support as bs
import pytest


def test_finetune(benchmark, finetune_case: bs.Case, bench_opts, prepared, tmp_path):
    case = finetune_case
    if reason := bs.missing_package(case.backend):
        pytest.skip(reason)
    from ftcore.runner import run_backend

    prep = prepared(case)  # model + batches, shared by every backend of this config (untimed)
    benchmark.group = case.group
    benchmark.extra_info.update({"backend": case.backend, "size": case.size, "status": "running"})
    results = []

    def one_round() -> None:
        result = run_backend(case.backend, prep, tmp_path / f"round{len(results)}")
        assert result.status == "ok", f"{case.backend} failed: {result.error}"
        results.append(result)

    benchmark.pedantic(one_round, rounds=bench_opts.rounds, warmup_rounds=bench_opts.warmup_rounds, iterations=1)

    # pedantic runs warm-up rounds first; with timing disabled (--bench-quick) it runs once
    timed = results[bench_opts.warmup_rounds:] if benchmark.enabled else results
    info = bs.aggregate(timed, case, bench_opts.rounds, bench_opts.warmup_rounds if benchmark.enabled else 0)
    benchmark.extra_info.update(info)

    problems = bs.extra_info_problems(benchmark.extra_info, case.backend)
    assert not problems, f"{case.id}: incomplete figures: {problems}"
    assert info["batch_fingerprint"] == prep.batches.fingerprint, "the child trained on other batches"

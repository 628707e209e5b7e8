"""Epoch-timed fine-tune cases: one pass over records with real (Alpaca) lengths, per batching mode.

The step-timed cases (test_finetune_bench.py) keep fixed shapes (`padded`) so a regression stays
comparable between revisions. These answer the user's question instead: how long does an epoch
take with the batching I would use? Data: the built-in Alpaca-length profile
(`--data builtin:alpaca-lengths`: token lengths with Stanford Alpaca's percentiles), batch 4,
`--max-seq-len 512`, fp32, for each of `padded`, `longest` and `packed` and each backend that takes
the mode (mlx-lm has no packed rows).

What is timed: the second of two epochs. A case starts one backend process with the step gate
(ftcore.process.step_gate); its first epoch (loading, compiling every batch width the epoch has, the
allocator's growth) runs in pedantic's untimed `setup`, then the benchmark round lets it run the
second epoch's steps one by one, each waited on to its sync point. So the figure is one
steady-state epoch of that batching, the same records in a new batch order.
"""

from __future__ import annotations

import bench_support as bs
import pytest

from ftcore.backends import BACKENDS
from ftcore.config import BATCHINGS, RunConfig
from ftcore.inputs.length_profile import NAME as ALPACA_LENGTHS
from ftcore.run.bench_cases import BENCH_TARGETS, SIZES

BATCH, SEQ = 4, 512
RECORDS = 64  # training records: 16 steps an epoch with `longest`, ~6 with `packed`
QUICK_RECORDS = 16  # --bench-quick: 4 steps an epoch with `longest`


def epoch_cases(opts) -> list[tuple[str, str, str]]:
    """(size, batching, backend) for every size, mode and backend asked for; in --bench-quick the
    first backend of each framework only (torch, mlx), `longest` and `packed` (the step-timed
    cases cover the other backends and `padded`)."""
    first_of_framework = {}
    for name, spec in BACKENDS.items():
        first_of_framework.setdefault(spec.framework, name)
    backends = [b for b in opts.backends if not opts.quick or b in first_of_framework.values()]
    # quick: the modes whose shapes change from step to step (the step cases run `padded`)
    batchings = [b for b in BATCHINGS if not opts.quick or b != "padded"]
    return [(size, batching, b) for size in opts.sizes for batching in batchings for b in backends
            if batching != "packed" or BACKENDS[b].takes_packed_rows]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "epoch_case" in metafunc.fixturenames:
        cases = epoch_cases(metafunc.config._ftcore_bench)
        ids = [f"{size}-alpaca-lengths-b{BATCH}-s{SEQ}-fp32-{batching}-{b}" for size, batching, b in cases]
        metafunc.parametrize("epoch_case", cases, ids=ids)


@pytest.fixture(scope="module")
def epoch_prepared(tmp_path_factory, ftcore_cache, bench_opts):
    """prepared(size, batching) -> ftcore.run.preflight.Prepared for two epochs, built once per pair and
    shared by the backends."""
    from ftcore.run.backend_process import gemm_peak
    from ftcore.run.preflight import prepare

    cache = {}

    def get(size: str, batching: str):
        if (size, batching) not in cache:
            spec = SIZES[size]
            cfg = RunConfig(preset=spec.preset, num_layers=spec.num_layers, data=ALPACA_LENGTHS,
                            num_samples=QUICK_RECORDS if bench_opts.quick else RECORDS, eval_samples=0,
                            batch_size=BATCH, max_seq_len=SEQ, epochs=2, batching=batching,
                            lora_targets=BENCH_TARGETS, precision="fp32")
            prep = prepare(cfg, tmp_path_factory.mktemp(f"epoch-{size}-{batching}"))
            # prepare resolved --epochs into steps; time only the second epoch
            per_epoch = prep.cfg.steps // 2
            prep.cfg = prep.cfg.replace(timing_warmup_steps=per_epoch)
            gemm_peak(prep)  # measured (and cached) outside any timed round
            cache[(size, batching)] = prep
        return cache[(size, batching)]

    return get


def test_epoch(benchmark, epoch_case, epoch_prepared, tmp_path):
    from ftcore.run.backend_process import BackendProcess

    size, batching, backend = epoch_case
    if reason := bs.missing_package(backend):
        pytest.skip(reason)
    prep = epoch_prepared(size, batching)
    per_epoch = prep.cfg.steps // 2
    benchmark.group = f"epoch {size} alpaca-lengths b{BATCH} s{SEQ} fp32"
    proc = {}

    def first_epoch() -> None:  # untimed: start, load, compile every width, allocator
        proc["p"] = BackendProcess(backend, prep, tmp_path / "run", gate=True)
        for _ in range(per_epoch):
            proc["p"].step()

    def second_epoch() -> None:
        for _ in range(per_epoch):
            proc["p"].step()

    try:
        benchmark.pedantic(second_epoch, setup=first_epoch, rounds=1, iterations=1)
    finally:
        result = proc["p"].wait() if "p" in proc else None
    assert result is not None and result.status == "ok", result and result.error
    assert len(result.losses) == 2 * per_epoch
    stats = prep.batches.stats
    benchmark.extra_info.update({
        "backend": backend, "size": size, "batching": batching, "steps_per_epoch": per_epoch,
        "epoch_time_s": result.epoch_time_s, "real_tokens_per_s": result.real_tokens_per_s,
        "loss_tokens_per_s": result.loss_tokens_per_s, "padding_share": stats["padding_share"],
        "packed_rows": stats["packed_rows"], "peak_rss_mb": result.peak_rss_mb,
        "compiled_traces": result.extra.get("compiled_traces"), "final_loss": result.final_loss,
        "timed": "benchmark time = the second epoch's steps (the first, untimed, compiles every width)",
    })  # fmt: skip
    # the child's own figure covers the same steps (timing_warmup_steps = one epoch)
    assert result.epoch_time_s > 0 and result.real_tokens_per_s > 0
    if batching == "packed":
        assert stats["packed_rows"] < stats["train_records"]

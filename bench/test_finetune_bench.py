"""Step-timed fine-tune cases: backend x size x batch/sequence x precision.

What is timed: one training step. Each case starts one backend process (ftcore.runner's
BackendProcess with the step gate, ftcore.stepgate) that loads the model once; then every
pytest-benchmark round lets it run one step and waits for the step's answer, sent after the
step's sync point (loss.item(), mx.eval). Warm-up steps (compilation, allocator) are
pytest-benchmark's warm-up rounds, so min / median / IQR / outliers and --benchmark-compare are
about step time only. Process-level figures (load time, peak RSS, MFU, losses, the child's own
step times, the machine's load during the timed steps) go into `benchmark.extra_info`.
"""

from __future__ import annotations

import statistics

import bench_support as bs
import pytest

from ftcore.backends import BACKENDS, REFERENCE_BACKEND

LOSS_ATOL = 1e-4  # fp32 per-step loss agreement with the reference backend (docs/contracts.md)


@pytest.fixture(scope="session")
def losses_by_config() -> dict[str, dict[str, list[float]]]:
    """config id -> backend -> per-step losses, filled as the cases run (reference first)."""
    return {}


def test_finetune(benchmark, finetune_case: bs.Case, bench_opts, prepared, losses_by_config, tmp_path):
    case = finetune_case
    if reason := bs.missing_package(case.backend):
        pytest.skip(reason)
    from ftcore.runner import BackendProcess

    prep, warmup, timed = prepared(case)  # model + batches, shared by every backend (untimed)
    benchmark.group = case.group
    benchmark.extra_info.update({"backend": case.backend, "size": case.size, "status": "running"})
    proc = BackendProcess(case.backend, prep, tmp_path / "run", gate=True)
    try:
        if benchmark.enabled:
            benchmark.pedantic(proc.step, rounds=timed, warmup_rounds=warmup, iterations=1)
        else:  # --bench-quick / --benchmark-disable: pedantic runs its target once, untimed
            for _ in range(warmup + timed - 1):
                proc.step()
            benchmark.pedantic(proc.step, rounds=1, iterations=1)
    finally:
        result = proc.wait()
    assert result.status == "ok", f"{case.backend} failed: {result.error}"
    info = bs.result_info(result, case, warmup, timed)
    benchmark.extra_info.update(info)

    problems = bs.extra_info_problems(benchmark.extra_info, case.backend)
    assert not problems, f"{case.id}: incomplete figures: {problems}"
    assert info["batch_fingerprint"] == prep.batches.fingerprint, "the child trained on other batches"
    assert len(result.losses) == warmup + timed
    if benchmark.enabled:  # the parent timed the step itself, not a message that skips it
        parent = statistics.median(benchmark.stats.stats.data)
        assert parent >= 0.95 * info["child_step_median_s"], (parent, info["child_step_median_s"])

    seen = losses_by_config.setdefault(case.config_id, {})
    seen[case.backend] = result.losses
    reference = seen.get(REFERENCE_BACKEND)
    if case.precision == "fp32" and BACKENDS[case.backend].same_numerics and reference:
        diff = max(abs(a - b) for a, b in zip(reference, result.losses, strict=True))
        assert diff < LOSS_ATOL, f"{case.backend} per-step losses differ from {REFERENCE_BACKEND}'s by {diff:.2e}"

"""Step-timed fine-tune cases: backend x size x batch/sequence x precision.

What is timed: one training step. A case runs a few fresh backend processes one after another
(ftcore.run.backend_process's BackendProcess with the step gate, ftcore.process.step_gate); each loads the model once,
runs its warm-up steps (compilation, allocator) untimed, then every pytest-benchmark round lets it
run one step and waits for the answer sent after the step's sync point (loss.item(), mx.eval).
Starting a process, loading and warm-up happen in pedantic's untimed `setup`. So min / median / IQR
/ outliers and --benchmark-compare are about step time only, pooled over processes (step times
vary 20-35% between processes). Process-level figures (load time, peak RSS, MFU, losses, the
children's own step times, the machine's load during the timed steps) go into `extra_info`.
"""

from __future__ import annotations

import statistics

import bench_support as bs
import pytest

from ftcore.backends import BACKENDS, REFERENCE_BACKEND
from ftcore.tolerances import REFERENCE_LOSS_ATOL


@pytest.fixture(scope="session")
def losses_by_config() -> dict[str, dict[str, list[float]]]:
    """config id -> backend -> per-step losses, filled as the cases run (reference first)."""
    return {}


class Processes:
    """The case's backend processes, started one at a time as the previous one's timed steps
    are used up; `setup` (untimed) starts the next one and runs its warm-up steps."""

    def __init__(self, backend: str, prep, root, warmup: int, timed: int) -> None:
        self.backend, self.prep, self.root, self.warmup, self.timed = backend, prep, root, warmup, timed
        self.current = None
        self.left = 0
        self.results = []

    def setup(self) -> None:
        from ftcore.run.backend_process import BackendProcess

        if self.left == 0:
            self.close()
            self.current = BackendProcess(self.backend, self.prep, self.root / f"process{len(self.results)}", gate=True)
            for _ in range(self.warmup):
                self.current.step()
            self.left = self.timed

    def step(self) -> None:
        self.current.step()
        self.left -= 1

    def close(self) -> None:
        if self.current is not None:
            self.results.append(self.current.wait())
            self.current = None


def test_finetune(benchmark, finetune_case: bs.Case, bench_opts, prepared, losses_by_config, tmp_path):
    case = finetune_case
    if reason := bs.missing_package(case.backend):
        pytest.skip(reason)
    prep, warmup, timed = prepared(case)  # model + batches, shared by every backend (untimed)
    count = bench_opts.process_count(case)
    benchmark.group = case.group
    benchmark.extra_info.update({"backend": case.backend, "size": case.size, "status": "running"})
    procs = Processes(case.backend, prep, tmp_path, warmup, timed)
    try:
        if benchmark.enabled:
            benchmark.pedantic(procs.step, setup=procs.setup, rounds=count * timed, iterations=1)
        else:  # --bench-quick / --benchmark-disable: pedantic runs setup and target once, untimed
            for _ in range(count * timed - 1):
                procs.setup()
                procs.step()
            benchmark.pedantic(procs.step, setup=procs.setup, rounds=1, iterations=1)
    finally:
        procs.close()
    results = procs.results
    assert len(results) == count
    failed = [r.error for r in results if r.status != "ok"]
    assert not failed, f"{case.backend} failed: {failed[0]}"
    info = bs.result_info(results, case, warmup, timed)
    benchmark.extra_info.update(info)

    problems = bs.extra_info_problems(benchmark.extra_info, case.backend)
    assert not problems, f"{case.id}: incomplete figures: {problems}"
    assert info["batch_fingerprint"] == prep.batches.fingerprint, "the child trained on other batches"
    assert all(len(r.losses) == warmup + timed for r in results)
    if benchmark.enabled:  # the parent timed the step itself, not a message that skips it
        parent = statistics.median(benchmark.stats.stats.data)
        assert parent >= 0.95 * info["child_step_median_s"], (parent, info["child_step_median_s"])

    seen = losses_by_config.setdefault(case.config_id, {})
    seen[case.backend] = results[0].losses
    reference = seen.get(REFERENCE_BACKEND)
    if case.precision == "fp32" and BACKENDS[case.backend].same_numerics and reference:
        diff = max(abs(a - b) for a, b in zip(reference, results[0].losses, strict=True))
        assert diff < REFERENCE_LOSS_ATOL, f"{case.backend} per-step losses differ from {REFERENCE_BACKEND}'s by {diff:.2e}"

"""Benchmark-suite options, case generation, fixtures and pytest-benchmark hooks.

Options live here (not in the root conftest), so they exist when bench/ is on the command line:
`pytest bench/ ...` or `pytest bench/test_x.py ...`. See the Benchmarks section of README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import baseline_compare as bc
import bench_support as bs
import pytest

# ---------------------------------------------------------------------------------------------
# options


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("ftcore-bench", "ftcore benchmarks (bench/)")
    g.addoption("--bench-size", action="append", default=None, metavar="SIZE",
                help=f"model sizes to run, repeat or comma list from {','.join(bs.SIZES)} (default: tiny)")
    g.addoption("--bench-backends", action="append", default=None, metavar="LIST",
                help=f"comma list from {','.join(bs.BACKEND_NAMES)} (default: all; mlx-lm skipped when not installed)")
    g.addoption("--bench-precision", action="append", default=None, metavar="LIST",
                help="fp32,bf16 (default per size: tiny fp32+bf16, TinyLlama sizes fp32)")
    g.addoption("--bench-shape", action="append", default=None, metavar="BxL",
                help="batch x sequence length, e.g. 4x128,8x256 (default per size: tiny 4x128, TinyLlama 2x256)")
    g.addoption("--bench-rounds", type=int, default=None,
                help="timed training steps per process (default per size: tiny 8, tinyllama-4l 6, "
                     "tinyllama-full 3)")
    g.addoption("--bench-warmup-rounds", type=int, default=None,
                help="untimed steps first in each process (compilation, allocator; default per size: "
                     "tiny 3, else 1)")
    g.addoption("--bench-processes", type=int, default=None,
                help="fresh processes per case, their timed steps pooled (default per size: tiny 4, else 1)")
    g.addoption("--bench-nproc", action="append", default=None, metavar="LIST",
                help="data-parallel process counts, comma list (default 1,2: 2 for torch and mlx; "
                     "1 with --bench-quick)")
    g.addoption("--bench-quick", action="store_true", default=False,
                help="CI smoke mode: tiny fp32 only, 4 steps per case, timing disabled (implies "
                     "--benchmark-disable); asserts every case runs, reports complete figures and "
                     "trains as the reference backend does")
    g.addoption("--tokenize-records", type=int, default=None,
                help="records in the tokenising micro-benchmark (default 20000; 2000 with --bench-quick)")
    g.addoption("--memray-out", type=Path, default=None,
                help="folder for the memray pass (test_memory_bench.py): <dir>/<size>/memray-<backend>.bin, "
                     "memray-flamegraph-<backend>.html, memray-summary-<backend>.json (default: a pytest tmp dir)")
    g.addoption("--memray-native", action=argparse.BooleanOptionalAction, default=None,
                help="record native stacks in the memray pass (default on; off with --bench-quick)")
    g.addoption(bc.ACROSS_FLAG, action="store_true", default=False,
                help="apply --benchmark-compare-fail to a baseline recorded on another machine (CPU, "
                     "cores, BLAS, framework versions); by default its rows are marked not comparable "
                     "and never fail the run")


class Opts:
    """Resolved bench options (quick mode applied)."""

    def __init__(self, config: pytest.Config) -> None:
        get = config.getoption
        self.quick = bool(get("--bench-quick"))
        sizes = bs.parse_list(get("--bench-size")) or ["tiny"]
        backends = bs.parse_list(get("--bench-backends")) or list(bs.BACKEND_NAMES)
        precisions = bs.parse_list(get("--bench-precision")) or None
        try:
            shapes = [bs.parse_shape(s) for s in bs.parse_list(get("--bench-shape"))] or None
        except ValueError as e:
            raise pytest.UsageError(f"--bench-shape: {e}") from None
        for name, values, allowed in (("--bench-size", sizes, bs.SIZES), ("--bench-backends", backends, bs.BACKEND_NAMES),
                                      ("--bench-precision", precisions or [], ("fp32", "bf16"))):
            bad = [v for v in values if v not in allowed]
            if bad:
                raise pytest.UsageError(f"{name}: unknown {', '.join(bad)} (choose from {', '.join(allowed)})")
        self.rounds = get("--bench-rounds")
        self.warmup_rounds = get("--bench-warmup-rounds")
        self.processes = get("--bench-processes")
        nprocs = [int(n) for n in bs.parse_list(get("--bench-nproc"))] or [1, 2]
        self.tokenize_records = get("--tokenize-records") or (bs.QUICK_TOKENIZE_RECORDS if self.quick else 20000)
        native = get("--memray-native")
        if self.quick:
            sizes = ["tiny"]
            precisions = precisions or ["fp32"]
            self.rounds, self.warmup_rounds, self.processes = bs.QUICK_TIMED, bs.QUICK_WARMUP, 1
            nprocs = [int(n) for n in bs.parse_list(get("--bench-nproc"))] or [1]  # CI: tests/ covers 2
            native = False if native is None else native
        if (self.rounds is not None and self.rounds < 1) or (self.warmup_rounds or 0) < 0 or (
                self.processes is not None and self.processes < 1):
            raise pytest.UsageError("--bench-rounds and --bench-processes must be >= 1, --bench-warmup-rounds >= 0")
        self.native = True if native is None else native
        self.sizes, self.backends = sizes, backends
        self.cases = bs.build_cases(sizes, backends, precisions, shapes, nprocs)
        # memray pass: per size its default shape, one precision (the first), every backend
        self.memray_cases = [
            bs.Case(size, b, *bs.SIZES[size].shapes[0], (precisions or bs.SIZES[size].precisions)[0])
            for size in sizes for b in backends
        ]
        if self.quick:  # CI: only the cases with a memory budget
            self.memray_cases = [c for c in self.memray_cases if c.backend in bs.MEMRAY_BUDGET_BACKENDS]
        self.memray_out: Path | None = get("--memray-out")

    def steps(self, case: bs.Case) -> tuple[int, int]:
        """(warm-up steps, timed steps) per process for a case: the options, else the size's."""
        warmup = case.spec.warmup if self.warmup_rounds is None else self.warmup_rounds
        return warmup, self.rounds or case.spec.timed

    def process_count(self, case: bs.Case) -> int:
        return self.processes or case.spec.processes


def pytest_configure(config: pytest.Config) -> None:
    opts = config._ftcore_bench = Opts(config)
    bc.check_baseline_files(config)  # before pytest-benchmark (trylast) loads them
    config.addinivalue_line("markers", f"{FULL_ONLY}: left out of --bench-quick (CI's time budget)")
    if opts.quick:
        clash = [flag for flag, dest in (("--benchmark-only", "benchmark_only"), ("--benchmark-save", "benchmark_save"),
                                         ("--benchmark-autosave", "benchmark_autosave"),
                                         ("--benchmark-compare", "benchmark_compare"))
                 if config.getoption(dest, None)]
        if clash:
            raise pytest.UsageError(f"--bench-quick runs every case once with timing disabled; drop {', '.join(clash)}")
        # pytest-benchmark builds its session in a trylast pytest_configure, after this one
        config.option.benchmark_disable = True


# Cases too slow for CI's 15-minute budget: `--bench-quick` leaves them out (deselected, and the
# header says so); a full `pytest bench/` runs them.
FULL_ONLY = "full_bench"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not config._ftcore_bench.quick:
        return
    left_out = [item for item in items if item.get_closest_marker(FULL_ONLY)]
    if left_out:
        config.hook.pytest_deselected(items=left_out)
        items[:] = [item for item in items if not item.get_closest_marker(FULL_ONLY)]


def pytest_report_header(config: pytest.Config) -> list[str]:
    o: Opts = config._ftcore_bench
    return [f"ftcore bench: sizes={','.join(o.sizes)} backends={','.join(o.backends)} "
            f"timed steps={o.rounds or 'per size'} warm-up steps={o.warmup_rounds if o.warmup_rounds is not None else 'per size'} "
            f"quick={o.quick} memray_native={o.native}"] + (
        [f"ftcore bench: --bench-quick leaves out the cases marked {FULL_ONLY} (the A/A bench-diff: "
         "`pytest bench/test_bench_diff.py`)"] if o.quick else [])


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    o: Opts = metafunc.config._ftcore_bench
    if "finetune_case" in metafunc.fixturenames:
        metafunc.parametrize("finetune_case", o.cases, ids=[c.id for c in o.cases])
    if "tokenize_n" in metafunc.fixturenames:  # the record count is part of the name baselines match
        metafunc.parametrize("tokenize_n", [o.tokenize_records], ids=[f"tiny-{o.tokenize_records}rec"])
    if "memray_case" in metafunc.fixturenames:
        metafunc.parametrize("memray_case", o.memray_cases, ids=[f"{c.size}-{c.precision}-{c.backend}" for c in o.memray_cases])


# ---------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="session")
def bench_opts(pytestconfig: pytest.Config) -> Opts:
    return pytestconfig._ftcore_bench


@pytest.fixture(scope="session")
def prepared(tmp_path_factory: pytest.TempPathFactory, ftcore_cache: Path, bench_opts: Opts):
    """prepared(case) -> (ftcore.run.preflight.Prepared, warm-up steps, timed steps): the model
    materialised (cached across sessions with FTCORE_TEST_CACHE) and the batches built once per
    config, shared by every backend."""
    from ftcore.run.backend_process import gemm_peak
    from ftcore.run.preflight import prepare

    cache: dict[str, object] = {}

    def get(case: bs.Case):
        if case.config_id not in cache:
            warmup, timed = bench_opts.steps(case)
            cfg = case.config(warmup, timed)
            prep = prepare(cfg, tmp_path_factory.mktemp(f"prep-{case.config_id}"))
            cache[case.config_id] = (prep, warmup, timed)
            # run_backend divides by this machine's GEMM peak, measured once (in two probe
            # processes) and cached in FTCORE_CACHE: measure it here, outside any timed round
            gemm_peak(prep)
        prep, warmup, timed = cache[case.config_id]
        return dataclasses.replace(prep, cfg=prep.cfg.replace(nproc=case.nproc)), warmup, timed

    return get


@pytest.fixture(scope="session")
def memray_dir(bench_opts: Opts, tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config) -> Path:
    d = bench_opts.memray_out or tmp_path_factory.mktemp("memray")
    d = Path(d).resolve()
    d.mkdir(parents=True, exist_ok=True)
    pytestconfig._ftcore_memray_dir = d
    return d


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    """Before pytest-benchmark's table (this conftest's hook runs first): one line per timed case
    whose processes ran on a busy machine, one per comparison a busy side made not decidable
    (bench/baseline_compare.py); quiet cases say nothing. Then where the memray pass wrote."""
    session = getattr(config, "_benchmarksession", None)
    if session is not None:  # None with -p no:benchmark; no benchmarks when timing is disabled
        for line in bc.busy_lines(session.benchmarks) + bc.undecidable_lines(session):
            terminalreporter.write_line(line, yellow=True, bold=True)
    d = getattr(config, "_ftcore_memray_dir", None)
    if d is not None:
        terminalreporter.write_line(f"ftcore bench: memray captures, flamegraphs and summaries in {d}")


# ---------------------------------------------------------------------------------------------
# pytest-benchmark machine_info: record each framework's BLAS; warn only on real differences

_MACHINE_INFO_CACHE: dict[str, dict] = {}


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    """Add `ftcore`: CPU model, cores and the BLAS each framework really calls (probed in child
    processes with the backends' own environment: MLX gets the OpenBLAS preload, torch not)."""
    if "ftcore" not in _MACHINE_INFO_CACHE:  # called at load (compare) and again at save
        _MACHINE_INFO_CACHE["ftcore"] = bs.ftcore_machine_info()
    machine_info["ftcore"] = _MACHINE_INFO_CACHE["ftcore"]


@pytest.hookimpl(wrapper=True)
def pytest_benchmark_compare_machine_info(config, benchmarksession, machine_info, compared_benchmark):
    """Say in one line when the baseline ran on different hardware, BLAS or framework versions
    (bench/baseline_compare.py: its rows are then marked and never fail on time); stay quiet
    about host names and clock-speed wobble. Whatever the machine, wrap the
    --benchmark-compare-fail checks so that a comparison with a busy side is not decided.

    pytest-benchmark's own implementation of this hook warns on *any* machine_info difference
    (hostname, `hz_actual`), i.e. on every run here. This wrapper does the meaningful comparison
    itself, then lets the built-in one compare the current info with itself (so it stays silent),
    and puts the saved info back afterwards.
    """
    bc.guard_checks(benchmarksession, enforce_across=config.getoption(bc.ACROSS_FLAG))
    saved = compared_benchmark.get("machine_info") or {}
    diffs = bs.method_differences(saved, machine_info) + bs.hardware_differences(saved, machine_info)
    where = getattr(benchmarksession.storage, "path", None) or "storage"  # .location raises outside cwd
    if diffs:
        bc.note_other_machine(benchmarksession, compared_benchmark, diffs, str(where),
                              enforce=config.getoption(bc.ACROSS_FLAG))
    else:
        key = bs.hardware_key(machine_info)
        blas = ", ".join(f"{fw} {v['blas']}" for fw, v in key["blas"].items())
        benchmarksession.logger.info(
            f"Baseline machine matches: {key['cpu_model']}, {key['affinity_cores']} cores, BLAS {blas} "
            "(host name and clock speed not compared)")
    compared_benchmark["machine_info"] = machine_info
    try:
        return (yield)
    finally:
        compared_benchmark["machine_info"] = saved


@pytest.hookimpl(wrapper=True)
def pytest_benchmark_group_stats(config, benchmarks, group_by):
    """Rows compared with another machine's baseline end in "[other machine: not comparable]"."""
    bc.mark_rows(config._benchmarksession, benchmarks)
    return (yield)

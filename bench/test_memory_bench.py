"""memray profiling pass: one backend's whole fine-tune process under `memray run`.

Separate from the timed pass (these tests take no `benchmark` fixture, so `--benchmark-only`
skips them and no timing is ever taken under memray, whose tracking slows torch several-fold).
Each case runs `ftcore.run.child` for one backend under `python -m memray run [--native]` (via
run_backend's `wrap`, as `ftcore profile` does; memray does not follow subprocesses, so it must
wrap the child itself) and writes into `--memray-out` (default: a pytest tmp dir):

    <dir>/<size>/memray-<backend>.bin                the capture (all allocations, not aggregated:
                                                     `memray stats|summary|tree|table` all work on it)
    <dir>/<size>/memray-flamegraph-<backend>.html    `python -m memray flamegraph` of the capture,
                                                     its CDN scripts inlined (ftcore.report.flamegraph)
    <dir>/<size>/memray-top-<backend>.png            the top allocation sites at the peak
    <dir>/<size>/memray-summary-<backend>.json       peak, bytes live at the peak by allocator and
                                                     owner, beside the child's RSS figures

What memray sees (checked on Linux CPU, mlx 0.32.4 / torch 2.13; the test re-checks the framework
part on every native run instead of assuming it):
* torch / hf-trainer: CPU tensors come from c10::alloc_cpu (posix_memalign) and are tracked; the
  safetensors weights arrive through at::MapAllocator (mmap of the file, tracked as MMAP). On the
  tiny model the peak is dominated by Python objects of the torch/transformers imports (~175 of
  ~220 MB, 120 MB of it pymalloc arenas); tensors are ~23 MB.
* mlx / mlx-lm: MLX's CPU buffers come from mlx::core::allocator::CommonAllocator::malloc and are
  tracked (plain malloc). The preloaded OpenBLAS maps a 128 MB work buffer (blas_memory_alloc,
  mmap, from MLX's stream thread) at the first GEMM; memray counts its full size although few of
  its pages are ever touched, so for the tiny MLX run memray's peak (~185 MB) is *above* the peak
  RSS (~100 MB). (On macOS, Metal buffers would not show in memray.)
How memray's peak relates to RSS: memray's peak is the largest sum of live bytes requested from
the tracked allocators (malloc family, posix_memalign, mmap incl. file maps, pymalloc arenas) at
any moment. RSS counts resident pages instead: it includes what memray does not track (code and
data of the loaded shared libraries — libtorch_cpu alone is hundreds of MB —, the interpreter,
thread stacks, malloc's retained free memory) and excludes untouched pages of big mappings.
Tiny fp32, timed-pass peak RSS vs memray peak: torch ~420 vs 220 MB, hf-trainer ~500 vs 1285 MB
(pyarrow, imported through datasets, reserves a 1 GiB mimalloc arena that is never resident),
mlx ~100 vs 185 MB, mlx-lm ~325 vs 278 MB. The RSS figure stays the headline memory figure
(docs/contracts.md, measurement); memray says where heap memory goes.
"""

from __future__ import annotations

import json
import sys

import bench_support as bs
import pytest

from ftcore.backends import BACKENDS
from ftcore.report.flamegraph import external_resources, write_reports

# Memory budgets for the tiny fp32 case (default shape 4x128): memray peak heap of the
# whole child process, in MB. Measured on the 2-core EPYC (torch 2.13 CPU wheel, transformers
# 5.24, peft 0.21, mlx 0.32.4 with Debian OpenBLAS preloaded): torch 220.5 MB (same with and
# without --native); mlx 317 MB, of which 256 MB is one malloc by OpenBLAS on a stream thread,
# its work buffers once GEMMs are called from the two row-stream threads (128 MB with one
# stream); it is reserved, not touched: peak RSS under memray 149 MB. Budget: ~1.5x measured,
# that buffer counted once.
TINY_BUDGET_MB = {"torch": 330, "mlx": 350}


def test_memray_profile(memray_case: bs.Case, bench_opts, prepared, memray_dir, tmp_path):
    case = memray_case
    if reason := bs.missing_package(case.backend):
        pytest.skip(reason)
    from ftcore.run.backend_process import run_backend

    prep, _, _ = prepared(case)
    out = memray_dir / case.size
    out.mkdir(parents=True, exist_ok=True)
    capture = out / f"memray-{case.backend}.bin"
    html = out / f"memray-flamegraph-{case.backend}.html"
    capture.unlink(missing_ok=True)  # memray refuses to overwrite a capture
    wrap = [sys.executable, "-m", "memray", "run", "-q", *(["--native"] if bench_opts.native else []),
            "-o", str(capture), "-m"]
    result = run_backend(case.backend, prep, tmp_path / "run", wrap=wrap)
    assert result.status == "ok", f"{case.backend} under memray failed: {result.error}"
    assert capture.exists(), "memray wrote no capture"
    png = out / f"memray-top-{case.backend}.png"
    assert write_reports(capture, html, png, case.id) == [], "flamegraph assets not all vendored"
    assert external_resources(html.read_text()) == [] and png.stat().st_size > 0  # opens offline

    summary = bs.memray_summary(capture)
    summary.update({
        "backend": case.backend, "case": case.id, "config": prep.cfg.to_dict(),
        "capture": str(capture), "flamegraph": str(html),
        # RSS of the same process under memray (its own overhead included); compare with the
        # timed pass's peak_rss_mb for the untracked figure
        "peak_rss_under_memray_mb": result.peak_rss_mb,
        "baseline_rss_under_memray_mb": result.baseline_rss_mb,
        "framework_peak_mb": result.framework_peak_mb,
    })
    (out / f"memray-summary-{case.backend}.json").write_text(json.dumps(summary, indent=2))
    peak = summary["peak_memory_mb"]
    print(f"{case.id}: memray peak {peak:.1f} MB, peak RSS under memray {result.peak_rss_mb:.1f} MB, "
          f"by owner {json.dumps({k: round(v, 1) for k, v in summary['at_peak_by_owner_mb'].items()})}")
    assert peak > 0

    if summary["native_traces"]:  # verify, do not assume, that the framework's buffers are seen
        owner = bs.FRAMEWORK_OWNER[BACKENDS[case.backend].framework]
        assert summary["at_peak_by_owner_mb"].get(owner, 0) > 0, (
            f"memray saw no {owner} at its peak: {summary['at_peak_by_owner_mb']}")

    budget = TINY_BUDGET_MB.get(case.backend)
    if case.size == "tiny" and case.precision == "fp32" and budget is not None:
        assert peak < budget, (f"memory regression: {case.backend} tiny fine-tune peaks at {peak:.1f} MB of heap "
                               f"(memray), budget {budget} MB; see {html}")

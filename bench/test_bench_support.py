"""Fast checks of the suite's own logic (no training): machine_info comparison, extra_info
completeness, case ids/groups. Not benchmarks: `--benchmark-only` skips them."""

from __future__ import annotations

import copy

import bench_support as bs
import pytest


def machine_info(**over) -> dict:
    mi = {
        "node": "host-a", "machine": "x86_64", "system": "Linux", "release": "6.1.0",
        "python_version": "3.11.7",
        "cpu": {"brand_raw": "AMD EPYC", "arch": "X86_64", "count": 2, "hz_actual": [2450000000, 0],
                "hz_actual_friendly": "2.4500 GHz", "flags": ["avx2", "avx512f", "avx512_bf16", "fma", "hypervisor"],
                "l3_cache_size": 33554432},
        "ftcore": {"cpu_model": "AMD EPYC", "logical_cores": 2, "affinity_cores": 2,
                   "framework_blas": {"torch": {"blas": "mkl", "threads": 2},
                                      "mlx": {"blas": "openblas", "threads": 2,
                                              "path": "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0"}}},
    }
    for path, value in over.items():
        d = mi
        *parents, last = path.split("__")
        for p in parents:
            d = d[p]
        d[last] = value
    return mi


def test_clock_and_host_noise_is_not_a_difference():
    a = machine_info()
    b = machine_info(node="host-b", release="6.1.1", cpu__hz_actual=[2593000000, 0],
                     cpu__hz_actual_friendly="2.5930 GHz", cpu__l3_cache_size=33554433)
    b["cpu"]["flags"] = [*a["cpu"]["flags"], "some_vm_flag"]
    assert bs.hardware_differences(a, b) == []


@pytest.mark.parametrize("change, expect", [
    ({"cpu__brand_raw": "Intel Xeon", "ftcore__cpu_model": "Intel Xeon"}, "cpu_model"),
    ({"ftcore__affinity_cores": 4, "ftcore__logical_cores": 4, "cpu__count": 4}, "cores"),
    ({"cpu__flags": ["avx2", "fma"]}, "cpu flags"),
])
def test_hardware_differences_are_reported(change, expect):
    diffs = bs.hardware_differences(machine_info(), machine_info(**change))
    assert diffs and any(expect in d for d in diffs), diffs


def test_blas_difference_is_reported():
    a = machine_info()
    b = copy.deepcopy(a)
    b["ftcore"]["framework_blas"]["mlx"] = {"blas": "reference", "threads": 1,
                                            "path": "/x/mlx_cpu.libs/libblas-1.so.3.10.0"}
    diffs = bs.hardware_differences(a, b)
    assert len(diffs) == 1 and diffs[0].startswith("mlx BLAS"), diffs


def test_framework_version_difference_is_reported():
    a, b = machine_info(), machine_info()
    a["ftcore"]["framework_blas"]["torch"]["version"] = "2.13.0+cpu"
    b["ftcore"]["framework_blas"]["torch"]["version"] = "2.14.0+cpu"
    assert bs.hardware_differences(a, b) == ["torch version: baseline 2.13.0+cpu, now 2.14.0+cpu"]
    del b["ftcore"]["framework_blas"]["torch"]["version"]  # older baselines lack it: no claim
    assert bs.hardware_differences(a, b) == []


def test_baseline_without_blas_info_is_flagged():
    a = machine_info()
    del a["ftcore"]
    assert any("no per-framework BLAS" in d for d in bs.hardware_differences(a, machine_info()))


def test_extra_info_problems():
    good = {k: 1.0 for k in bs.REQUIRED} | {"blas": "mkl", "batch_fingerprint": "ab", "threads": 2,
                                           "framework_peak_mb": None}
    assert bs.extra_info_problems(good, "torch") == []
    assert bs.extra_info_problems(good, "mlx") == ["framework_peak_mb: None for an MLX backend (mx.get_peak_memory expected)"]
    bad = dict(good, mfu=None, tokens_per_s=0.0)
    del bad["eval_loss"]
    problems = bs.extra_info_problems(bad, "torch")
    assert "eval_loss: missing" in problems and "mfu: None/empty" in problems
    assert "tokens_per_s: 0.0 is not > 0" in problems
    assert any(p.startswith("mfu: 1.62 > 1") for p in bs.extra_info_problems(dict(good, mfu=1.62), "torch"))


def test_case_ids_and_groups():
    cases = bs.build_cases(["tiny", "tinyllama-4l"], ["torch", "mlx"], None, None)
    assert [c.id for c in cases] == [
        "tiny-b4-s128-fp32-torch", "tiny-b4-s128-fp32-mlx", "tiny-b4-s128-bf16-torch",
        "tiny-b4-s128-bf16-mlx", "tinyllama-4l-b2-s256-fp32-torch", "tinyllama-4l-b2-s256-fp32-mlx"]
    assert cases[0].group == "tiny-L4 b4 s128 fp32"
    assert cases[-1].group == "tinyllama-1.1b-L4 b2 s256 fp32"
    assert bs.Case("tinyllama-full", "torch", 2, 256, "fp32").group == "tinyllama-1.1b-L22 b2 s256 fp32"
    cfg = cases[-1].config()
    assert (cfg.preset, cfg.num_layers, cfg.batch_size, cfg.max_seq_len, cfg.steps, cfg.timing_warmup_steps) == (
        "tinyllama-1.1b", 4, 2, 256, 7, 1)
    assert cases[0].config(2, 5).steps == 7 and cases[0].config(2, 5).timing_warmup_steps == 2
    assert bs.parse_shape("8x256") == (8, 256)
    assert bs.parse_list(["fp32,bf16", "fp32"]) == ["fp32", "bf16"]


def test_case_run_args_reproduce_the_case_config():
    from ftcore.cli_args import build_parser
    from ftcore.config_flags import config_from_args

    case = bs.Case("tinyllama-4l", "mlx", 2, 256, "fp32")
    args = build_parser().parse_args(["run", *case.run_args(2, 5), "--out", "x"])
    assert args.backend == case.backend and config_from_args(args) == case.config(2, 5)


def test_k_expressions_select_like_pytest():
    from ftcore.run.bench_cases import matches

    name = "tiny-b4-s128-fp32-mlx-lm"
    assert matches("tiny and fp32 and mlx", name) and matches(None, name)
    assert not matches("mlx and not mlx-lm", name) and matches("torch or (mlx-lm and fp32)", name)
    with pytest.raises(ValueError):
        matches("tiny and (", name)
    with pytest.raises(ValueError):
        matches("__import__('os')", name)

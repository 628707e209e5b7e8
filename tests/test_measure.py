"""Measurement plumbing: RunResult JSON (ftcore.result), peak RSS (ftcore.measure.rss), the FLOPs
formula (ftcore.measure.flops), MFU and the GEMM peak cache (ftcore.measure.gemm_timing, ftcore.measure.gemm_peak), host facts
(ftcore.measure.hostinfo), BLAS lookup and child environments (ftcore.measure.blas, ftcore.mlx.env,
ftcore.torch.env). The probes that need a child process are in test_child_processes.py."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import ftcore.files
from ftcore.measure import blas, blas_env, gemm_peak, gemm_timing, hostinfo, mfu
from ftcore.measure.flops import flops_per_token
from ftcore.measure.rss import PeakRSS, current_rss_mb
from ftcore.mlx import env as mlx_env
from ftcore.result import RunResult
from ftcore.torch import env as torch_env

pytestmark = pytest.mark.unit

TINYLLAMA = {  # TinyLlama-1.1B-Chat-v1.0 config.json
    "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
    "num_attention_heads": 32, "num_key_value_heads": 4, "vocab_size": 32000,
}


def _full_result() -> RunResult:
    return RunResult(
        backend="torch", status="ok", error=None, config={"steps": 3, "lora_targets": ["q_proj"]},
        env={"cpu": "x"}, load_time_s=1.5, train_time_s=2.0, warmup_time_s=0.5,
        step_times_s=[0.5, 1.0, 1.0], steps=3, tokens_per_s=512.0, loss_tokens_per_s=300.0,
        losses=[2.0, 1.5, 1.25], final_loss=1.25, eval_loss=1.3, eval_losses=[[3, 1.3]],
        peak_rss_mb=900.0, baseline_rss_mb=700.0, framework_peak_mb=None, trainable_params=1024,
        flops_per_token=1e9, mfu=0.25, batch_fingerprint="ab12", initial_adapter_fingerprint="cd34",
        optimizer={"name": "AdamW", "lr": 1e-4}, precision="fp32", blas="mkl", threads=2,
        extra={"note": "x"},
    )


def test_runresult_json_round_trip(tmp_path: Path) -> None:
    r = _full_result()
    assert RunResult.from_dict(json.loads(json.dumps(r.to_dict()))) == r
    r.write_json(tmp_path / "result.json")
    assert RunResult.read_json(tmp_path / "result.json") == r
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]  # no temp file left


def test_runresult_failed_and_non_finite(tmp_path: Path) -> None:
    f = RunResult.failed("mlx", {"steps": 1}, "boom")
    assert (f.status, f.error, f.config, f.losses, f.mfu) == ("failed", "boom", {"steps": 1}, [], None)
    f.losses = [1.0, math.nan]
    f.write_json(tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text())["losses"] == [1.0, None]  # strict JSON


@pytest.mark.parametrize("fail_at", ["fsync", "replace"])
def test_write_json_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail_at: str) -> None:
    """The disk fails after the new JSON went into the temp file (fsync) or just before the rename
    (replace): the old result.json stays whole and no temp file is left behind."""
    path = tmp_path / "result.json"
    _full_result().write_json(path)
    before = path.read_text()
    written = []

    def disk_full(*args, **kw):
        written.extend(tmp_path.glob(".result.json.*.tmp*"))  # the half-done write, beside it
        raise RuntimeError("disk full")

    monkeypatch.setattr(ftcore.files.os, fail_at, disk_full)
    with pytest.raises(RuntimeError):
        RunResult.failed("torch", {}, "x").write_json(path)
    monkeypatch.undo()
    assert written  # the failure hit mid-write, with the new file on disk under a temp name
    assert path.read_text() == before  # readers never see a half-written file
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_peak_rss_sees_200mb_allocation() -> None:
    with PeakRSS() as rss:
        a = np.ones(200 * 2**20 // 8)  # ones, not empty: the pages must be touched
        time.sleep(0.15)  # several sampler ticks
        del a
    assert rss.peak_mb - rss.start_mb >= 180, (rss.start_mb, rss.peak_mb)
    assert rss.sampled_peak_mb - rss.start_mb >= 180  # the sampler alone saw it too
    assert rss.samples >= 3
    assert current_rss_mb() < rss.peak_mb


def _tiny_arch() -> dict:
    # head_dim 32 != hidden/heads (16) so a formula that ignores head_dim fails
    return {"hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 256}


def test_flops_match_module_shapes_of_real_llama() -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    arch = _tiny_arch()
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**arch))
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                       target_modules=["q_proj", "v_proj"]))
    base = lora = 0
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):  # 2*in*out FLOPs per token for each linear
            if ".lora_A." in name or ".lora_B." in name:
                lora += 2 * mod.in_features * mod.out_features
            else:
                base += 2 * mod.in_features * mod.out_features
    seq = 48
    f = flops_per_token(arch, seq, ["q_proj", "v_proj"], 4)
    assert f["base_linear_forward"] + f["lm_head_forward"] == base
    assert f["lora_forward"] == lora
    assert f["lora_params"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    attn = 2 * 2 * seq * 4 * 32 * 2  # QK^T + AV, heads*head_dim, 2 layers
    assert f["attention_forward"] == attn
    assert f["forward"] == base + lora + attn
    assert f["backward"] == base + 2 * (attn + lora)  # frozen: input grads only; LoRA/attn: 2x
    assert f["total"] == f["forward"] + f["backward"]


def test_flops_closed_form_tinyllama() -> None:
    f = flops_per_token(TINYLLAMA, 512, ["q_proj", "v_proj"], 8)
    per_layer = 2048 * 2048 * 2 + 2048 * 256 * 2 + 3 * 2048 * 5632  # q,o + k,v + MLP
    assert per_layer == 44_040_192
    assert f["linear_params"] == 22 * per_layer + 2048 * 32000 == 1_034_420_224
    # + embedding + 2 RMSNorms per layer + final norm = TinyLlama's published 1,100,048,384
    assert f["linear_params"] + 32000 * 2048 + 2048 * (2 * 22 + 1) == 1_100_048_384
    assert f["lora_params"] == 1_126_400  # PEFT's "trainable params" for r=8 on q_proj,v_proj
    assert f["base_linear_forward"] + f["lm_head_forward"] == 2 * 1_034_420_224
    assert f["attention_forward"] == 22 * 4 * 512 * 2048
    # LoRA training is ~4N per token (2N forward + 2N input grads) plus attention
    assert f["total"] == pytest.approx(4 * 1_034_420_224 + 3 * (f["attention_forward"] + f["lora_forward"]))
    with pytest.raises(ValueError, match="unknown LoRA target"):
        flops_per_token(TINYLLAMA, 512, ["qproj"], 8)


def test_mfu() -> None:
    assert mfu.mfu(100.0, 1e9, 200.0) == pytest.approx(0.5)
    assert mfu.mfu(100.0, 1e9, None) is None


def test_mfu_counts_real_tokens_not_padding() -> None:
    """A pad position is no useful work: MFU from every position fed (tokens_per_s) once passed
    the whole suite, whose other checks only bound MFU between 0 and 1."""
    from ftcore.result import RunResult

    r = RunResult(backend="torch", tokens_per_s=300.0, real_tokens_per_s=200.0, flops_per_token=1e9)
    r.extra["framework_gemm_peak_gflops"] = 800.0
    mfu.record_mfu(r, machine_peak=400.0)
    assert r.mfu == pytest.approx(200.0 * 1e9 / 400e9)  # 0.5; all positions would say 0.75
    assert r.extra["mfu_vs_framework_gemm"] == pytest.approx(0.25)
    assert mfu.achieved_gflops(r) == pytest.approx(200.0)


def test_host_info_never_fails() -> None:
    env = hostinfo.host_info()
    assert env["logical_cores"] >= 1 and 1 <= env["affinity_cores"] <= env["logical_cores"]
    assert env["versions"]["numpy"] == np.__version__
    assert env["git_commit"] is None or len(env["git_commit"]) == 40
    assert env["cpu"]
    assert blas.framework_blas("unknown-framework") == {}  # no BLAS facts, and no exception


def test_gemm_peak_positive_and_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("torch")
    assert gemm_timing.measure_gemm_peak("torch", "fp32", n=256, timing=gemm_timing.Timing(max_time_s=0.2)) > 0
    monkeypatch.setenv("FTCORE_CACHE", str(tmp_path))
    calls = []

    def fake(framework, precision, n=1024, device="cpu", **kw):
        calls.append((framework, precision))
        return 123.0

    monkeypatch.setattr(gemm_peak, "measure_gemm_peak", fake)
    assert gemm_peak.gemm_peak_cached("torch", "fp32") == 123.0
    assert gemm_peak.gemm_peak_cached("torch", "fp32") == 123.0
    assert calls == [("torch", "fp32")]  # the second call read the cache
    cache = json.loads((tmp_path / "gemm_peak.json").read_text())
    (key,) = cache
    assert "|torch|fp32|" in key and cache[key]["gflops"] == 123.0
    gemm_peak.gemm_peak_cached("torch", "bf16")
    assert len(calls) == 2 and len(json.loads((tmp_path / "gemm_peak.json").read_text())) == 2
    # a refresh on a busy machine (a slower probe) never lowers the best figure seen
    monkeypatch.setattr(gemm_peak, "measure_gemm_peak", lambda *a, **kw: 50.0)
    assert gemm_peak.gemm_peak_cached("torch", "fp32", refresh=True) == 123.0
    monkeypatch.setattr(gemm_peak, "measure_gemm_peak", lambda *a, **kw: 200.0)
    assert gemm_peak.gemm_peak_cached("torch", "fp32", refresh=True) == 200.0
    assert gemm_peak.gemm_peak_cached("torch", "fp32") == 200.0


# --- BLAS -----------------------------------------------------------------------------------


def test_find_fast_blas_debian() -> None:
    deb = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0"
    if not os.path.exists(deb) or os.environ.get(blas.PRELOAD_ENV):
        pytest.skip("Debian's libopenblas0-pthread is not installed here (or overridden)")
    assert blas_env.find_fast_blas() == deb


def test_find_fast_blas_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lib = tmp_path / "libmkl_rt.so.2"
    lib.write_bytes(b"")
    monkeypatch.setenv(blas.PRELOAD_ENV, str(lib))
    assert blas_env.find_fast_blas() == (str(lib) if sys.platform == "linux" else None)


def test_child_envs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(blas_env, "find_fast_blas", lambda: "/opt/libopenblas.so.0")
    base = {"LD_PRELOAD": "/x/libfoo.so", "PATH": "/bin", "FTCORE_CACHE": str(tmp_path)}
    env = mlx_env.child_env(base, threads=2)
    assert env["LD_PRELOAD"] == "/opt/libopenblas.so.0:/x/libfoo.so"
    assert env["OPENBLAS_NUM_THREADS"] == env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "2"
    off = mlx_env.child_env({blas_env.NO_PRELOAD_ENV: "1", "FTCORE_CACHE": str(tmp_path)}, threads=1)
    assert "LD_PRELOAD" not in off and off["OPENBLAS_NUM_THREADS"] == "1"
    t = torch_env.child_env(env, threads=2)
    assert t["LD_PRELOAD"] == "/x/libfoo.so" and t["OMP_NUM_THREADS"] == "2"
    assert "LD_PRELOAD" not in torch_env.child_env({"LD_PRELOAD": "/opt/libopenblas.so.0"}, 1)


def test_openblas_kernels_follow_the_cpus_vector_isa(monkeypatch: pytest.MonkeyPatch) -> None:
    """OpenBLAS falls back to SSE3 (Prescott) kernels on a CPU model it does not know; the MLX
    child then gets OPENBLAS_CORETYPE for the CPU's vector ISA, and only then."""
    avx512 = {"fpu", "sse2", "avx", "avx2", "fma", "avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"}
    assert blas_env.cpu_vector_isa(avx512) == "avx512"
    assert blas_env.cpu_vector_isa({"fpu", "sse2", "avx", "avx2", "fma", "avx512f"}) == "avx2"
    assert blas_env.cpu_vector_isa({"fpu", "sse2", "avx", "avx2"}) is None  # no FMA
    assert blas_env.openblas_core_fix("prescott", "avx512") == "SkylakeX"
    assert blas_env.openblas_core_fix("haswell", "avx512") == "SkylakeX"
    assert blas_env.openblas_core_fix("sapphirerapids", "avx512") is None
    assert blas_env.openblas_core_fix("prescott", "avx2") == "Haswell"
    assert blas_env.openblas_core_fix("zen", "avx2") is None
    assert blas_env.openblas_core_fix(None, "avx512") is None and blas_env.openblas_core_fix("prescott", None) is None
    lib = "/opt/openblas-pthread/libopenblas.so.0"
    monkeypatch.setattr(blas_env, "openblas_corename", lambda path: "prescott")
    monkeypatch.setattr(blas_env, "cpu_vector_isa", lambda: "avx512")
    monkeypatch.setattr(blas_env.sys, "platform", "linux")
    assert blas_env.with_core_type({}, lib)[blas_env.CORETYPE_ENV] == "SkylakeX"
    assert blas_env.with_core_type({blas_env.CORETYPE_ENV: "Haswell"}, lib)[blas_env.CORETYPE_ENV] == "Haswell"
    assert blas_env.CORETYPE_ENV not in blas_env.with_core_type({}, "/opt/libmkl_rt.so.2")


def test_blas_warning() -> None:
    assert "reference BLAS" in blas.blas_warning({"reference": True, "gflops": 7.0})
    assert blas.blas_warning({"name": "openblas", "reference": False, "gflops": 240.0}) is None


def test_two_lengths_for_flops_and_gemm_shapes_and_for_the_memory_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run's FLOPs per token and GEMM shapes (the child's, and the parent's when it makes them
    itself) take Batches.seq_len, the steps' mean width, here well below --max-seq-len
    (`longest`); the memory model the widest step's width, Batches.widest, where the peak is."""
    from ftcore.backends.result_fields import start_result
    from ftcore.backends.run_context import BackendRun
    from ftcore.config import RunConfig
    from ftcore.inputs.arch import read_arch
    from ftcore.measure.memory_model import MB
    from ftcore.run import backend_process
    from ftcore.run.preflight import check_run

    prep = check_run(RunConfig(preset="tiny", data="builtin:alpaca-lengths", num_samples=16, eval_samples=0,
                               batch_size=4, steps=4, max_seq_len=256, threads=1))
    b, arch = prep.batches, read_arch(prep.model_dir)
    assert b.seq_len == round(float(b.train["widths"].mean())) < b.widest == int(b.train["widths"].max()) <= 256
    result = start_result(BackendRun(backend="torch", framework="torch", cfg=prep.cfg, model_dir=prep.model_dir,
                              batches=b, out_dir=tmp_path))
    assert result.flops_per_token == flops_per_token(arch, b.seq_len, prep.cfg.lora_targets, 8)["total"]
    assert result.memory_model["logits"] == pytest.approx(2 * 4 * b.widest * arch["vocab_size"] * 4 / MB)
    assert {m for m, _, _ in result.extra["gemm_shapes"]} == {4 * b.seq_len}  # one thread: the whole batch
    seen = []
    monkeypatch.setattr(backend_process, "machine_gemm_peak", lambda *a, shapes, **k: seen.append(shapes) or 1.0)
    backend_process.gemm_peak(prep)
    assert [list(s) for s in seen[0]] == [list(s) for s in result.extra["gemm_shapes"]]

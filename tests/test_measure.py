"""Measurement plumbing: RunResult JSON, peak RSS, FLOPs formula, BLAS probes, GEMM peak cache."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ftcore import blas, measure
from ftcore.measure import PeakRSS, RunResult, StepTimer, flops_per_token

ROOT = Path(__file__).resolve().parent.parent

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


def test_write_json_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "result.json"
    _full_result().write_json(path)
    before = path.read_text()

    def broken_dump(obj, f, **kw):
        f.write('{"half": ')
        raise RuntimeError("disk full")

    monkeypatch.setattr(measure.json, "dump", broken_dump)
    with pytest.raises(RuntimeError):
        RunResult.failed("torch", {}, "x").write_json(path)
    assert path.read_text() == before  # readers never see a half-written file
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_step_timer_excludes_warmup() -> None:
    t = StepTimer(warmup_steps=1)
    for secs, tok, loss_tok in [(3.0, 100, 50), (1.0, 100, 60), (1.0, 100, 40)]:
        t.add(secs, tok, loss_tok)
    r = t.fill(RunResult("torch"))
    assert (r.steps, r.warmup_time_s, r.train_time_s) == (3, 3.0, 2.0)
    assert r.step_times_s == [3.0, 1.0, 1.0]
    assert (r.tokens_per_s, r.loss_tokens_per_s) == (100.0, 50.0)


def test_peak_rss_sees_200mb_allocation() -> None:
    with PeakRSS() as rss:
        a = np.ones(200 * 2**20 // 8)  # ones, not empty: the pages must be touched
        time.sleep(0.15)  # several sampler ticks
        del a
    assert rss.peak_mb - rss.start_mb >= 180, (rss.start_mb, rss.peak_mb)
    assert rss.sampled_peak_mb - rss.start_mb >= 180  # the sampler alone saw it too
    assert rss.samples >= 3
    assert measure.current_rss_mb() < rss.peak_mb


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
    assert flops_per_token(arch, seq, "q_proj,v_proj", 4) == f  # CSV string form


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
    assert measure.mfu(100.0, 1e9, 200.0) == pytest.approx(0.5)
    assert measure.mfu(100.0, 1e9, None) is None


def test_env_info_never_fails() -> None:
    env = measure.env_info("none")
    assert env["logical_cores"] >= 1 and 1 <= env["affinity_cores"] <= env["logical_cores"]
    assert env["versions"]["numpy"] == np.__version__
    assert env["git_commit"] is None or len(env["git_commit"]) == 40
    assert env["cpu"]


def test_gemm_peak_positive_and_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("torch")
    assert measure.measure_gemm_peak("torch", "fp32", n=256, max_time_s=0.2) > 0
    monkeypatch.setenv("FTCORE_CACHE", str(tmp_path))
    calls = []

    def fake(framework, precision, n=1024, device="cpu", **kw):
        calls.append((framework, precision))
        return 123.0

    monkeypatch.setattr(measure, "measure_gemm_peak", fake)
    assert measure.gemm_peak_cached("torch", "fp32") == 123.0
    assert measure.gemm_peak_cached("torch", "fp32") == 123.0
    assert calls == [("torch", "fp32")]  # the second call read the cache
    cache = json.loads((tmp_path / "gemm_peak.json").read_text())
    (key,) = cache
    assert "|torch|fp32|" in key and cache[key]["gflops"] == 123.0
    measure.gemm_peak_cached("torch", "bf16")
    assert len(calls) == 2 and len(json.loads((tmp_path / "gemm_peak.json").read_text())) == 2
    # a refresh on a busy machine (a slower probe) never lowers the best figure seen
    monkeypatch.setattr(measure, "measure_gemm_peak", lambda *a, **kw: 50.0)
    assert measure.gemm_peak_cached("torch", "fp32", refresh=True) == 123.0
    monkeypatch.setattr(measure, "measure_gemm_peak", lambda *a, **kw: 200.0)
    assert measure.gemm_peak_cached("torch", "fp32", refresh=True) == 200.0
    assert measure.gemm_peak_cached("torch", "fp32") == 200.0


# --- BLAS -----------------------------------------------------------------------------------

FAST = blas.find_fast_blas()
needs_openblas = pytest.mark.skipif(
    sys.platform != "linux" or FAST is None,
    reason="no optimised BLAS installed to preload (apt install libopenblas0-pthread)")


def test_find_fast_blas_debian() -> None:
    deb = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0"
    if not os.path.exists(deb) or os.environ.get(blas.PRELOAD_ENV):
        pytest.skip("Debian's libopenblas0-pthread is not installed here (or overridden)")
    assert blas.find_fast_blas() == deb


def test_find_fast_blas_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lib = tmp_path / "libmkl_rt.so.2"
    lib.write_bytes(b"")
    monkeypatch.setenv(blas.PRELOAD_ENV, str(lib))
    assert blas.find_fast_blas() == (str(lib) if sys.platform == "linux" else None)


def test_child_envs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(blas, "find_fast_blas", lambda: "/opt/libopenblas.so.0")
    base = {"LD_PRELOAD": "/x/libfoo.so", "PATH": "/bin", "FTCORE_CACHE": str(tmp_path)}
    env = blas.mlx_child_env(base, threads=2)
    assert env["LD_PRELOAD"] == "/opt/libopenblas.so.0:/x/libfoo.so"
    assert env["OPENBLAS_NUM_THREADS"] == env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "2"
    off = blas.mlx_child_env({blas.NO_PRELOAD_ENV: "1", "FTCORE_CACHE": str(tmp_path)}, threads=1)
    assert "LD_PRELOAD" not in off and off["OPENBLAS_NUM_THREADS"] == "1"
    t = blas.torch_child_env(env, threads=2)
    assert t["LD_PRELOAD"] == "/x/libfoo.so" and t["OMP_NUM_THREADS"] == "2"
    assert "LD_PRELOAD" not in blas.torch_child_env({"LD_PRELOAD": "/opt/libopenblas.so.0"}, 1)


def test_blas_warning() -> None:
    assert "reference BLAS" in blas.blas_warning({"reference": True, "gflops": 7.0})
    assert blas.blas_warning({"name": "openblas", "reference": False, "gflops": 240.0}) is None


@needs_openblas
def test_mlx_blas_probe_with_and_without_preload() -> None:
    pytest.importorskip("mlx.core")
    stock = blas.probe_mlx_blas_subprocess(None)
    fast = blas.probe_mlx_blas_subprocess(FAST)
    assert stock["reference"] and stock["name"] == "reference" and "mlx" in stock["path"]
    assert blas.blas_warning(stock) is not None
    assert fast["name"] in ("openblas", "mkl") and not fast["reference"] and fast["path"] == FAST
    # The speed check is the ground truth: reference ~7 GFLOP/s, OpenBLAS >100 (2 noisy cores)
    assert fast["gflops"] > 5 * stock["gflops"], (stock, fast)


@needs_openblas
def test_preload_interposes_torch_sgemm() -> None:
    """A BLAS preload also captures torch's exported sgemm_ — why torch children must not get it."""
    pytest.importorskip("torch")
    code = "import torch; from ftcore.blas import torch_blas; print(torch_blas())"
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    env["PYTHONPATH"] = str(ROOT)
    plain = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                           timeout=60, check=True).stdout.strip()
    pre = subprocess.run([sys.executable, "-c", code], env={**env, "LD_PRELOAD": FAST},
                         capture_output=True, text=True, timeout=60, check=True).stdout.strip()
    assert "preloaded" not in plain
    assert pre.startswith(("openblas", "mkl")) and "preloaded" in pre

"""ftcore.mlx.jit: the g++ wrapper that builds MLX's JIT CPU kernels with AVX2/FMA flags, and the
written-out CPU softmax/logsumexp/silu (ftcore.mlx.ops) that route exp through those kernels.
That an MLX child really builds its kernels with the flags is checked in test_child_processes.py."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from ftcore.mlx import env as mlx_env
from ftcore.mlx import jit as mlx_jit
from ftcore.mlx.ops import additive_mask, attention, logsumexp, silu

pytestmark = pytest.mark.unit


def test_child_env_puts_the_wrapper_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mlx_jit, "why_not", lambda: None)
    env = mlx_jit.child_env({"PATH": "/usr/bin", "TMPDIR": "/elsewhere"}, tmp_path)
    wrapper_bin = Path(env["PATH"].split(os.pathsep)[0])
    assert env["PATH"].endswith(os.pathsep + "/usr/bin")
    script = (wrapper_bin / "g++").read_text()
    assert all(flag in script for flag in mlx_jit.FLAGS) and '"$@"' in script
    assert os.access(wrapper_bin / "g++", os.X_OK)
    # Kernels built with the flags get their own cache: MLX keys its cache by kernel name only.
    assert Path(env["TMPDIR"]).is_dir() and Path(env["TMPDIR"]).is_relative_to(tmp_path)
    assert env[mlx_jit.NOTE_ENV].startswith("g++ -mavx2")
    # Idempotent: a second child reuses the same wrapper and cache.
    again = mlx_jit.child_env({"PATH": "/usr/bin"}, tmp_path)
    assert again["PATH"] == env["PATH"] and again["TMPDIR"] == env["TMPDIR"]


def test_child_env_off_or_unusable_leaves_path_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    off = mlx_jit.child_env({"PATH": "/usr/bin", mlx_jit.OFF_ENV: "1"}, tmp_path)
    assert off["PATH"] == "/usr/bin" and "TMPDIR" not in off
    assert "off" in off[mlx_jit.NOTE_ENV] and not (tmp_path / "mlx-jit").exists()
    monkeypatch.setattr(mlx_jit, "why_not", lambda: "CPU lacks avx2")
    bare = mlx_jit.child_env({"PATH": "/usr/bin"}, tmp_path)
    assert bare["PATH"] == "/usr/bin" and bare[mlx_jit.NOTE_ENV].endswith("CPU lacks avx2")


def test_mlx_child_env_uses_the_env_s_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mlx_jit, "why_not", lambda: None)
    env = mlx_env.child_env({"PATH": "/usr/bin", "FTCORE_CACHE": str(tmp_path)}, threads=2)
    assert env["PATH"].startswith(str(tmp_path / "mlx-jit"))


@pytest.mark.parametrize("mask_kind", ["causal", "right", "left"])
def test_written_out_attention_equals_mlx_fast_sdpa(mask_kind: str) -> None:
    """The CPU attention (GQA, fp32 softmax) is the function mx.fast computes, values and grads."""
    B, H, KV, L, D = 3, 6, 2, 9, 8
    rng = np.random.default_rng(0)
    q, k, v = (mx.array(rng.standard_normal((B, n, L, D)).astype(np.float32)) for n in (H, KV, KV))
    if mask_kind == "causal":
        mask = "causal"
    else:
        keep = np.ones((B, L), dtype=np.int32)
        keep[1, :4] = 0 if mask_kind == "left" else 1
        keep[2, -3:] = 0 if mask_kind == "right" else 1
        keep[2, :2] = 0 if mask_kind == "left" else 1
        mask = additive_mask(mx.array(keep), L, mx.float32)
    scale = D**-0.5

    def fast(q, k, v):
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)

    def ours(q, k, v):
        return attention(q, k, v, scale, mask)

    assert mx.default_device() == mx.cpu
    np.testing.assert_allclose(np.array(ours(q, k, v)), np.array(fast(q, k, v)), atol=2e-6)
    w = mx.array(rng.standard_normal((B, H, L, D)).astype(np.float32))
    for g_ours, g_fast in zip(
        mx.grad(lambda *a: (ours(*a) * w).sum(), argnums=(0, 1, 2))(q, k, v),
        mx.grad(lambda *a: (fast(*a) * w).sum(), argnums=(0, 1, 2))(q, k, v),
        strict=True,
    ):
        np.testing.assert_allclose(np.array(g_ours), np.array(g_fast), atol=1e-5)
    # bf16 in, bf16 out (softmax in fp32 inside), close to the fp32 result
    bf = ours(q.astype(mx.bfloat16), k.astype(mx.bfloat16), v.astype(mx.bfloat16))
    assert bf.dtype == mx.bfloat16
    np.testing.assert_allclose(np.array(bf.astype(mx.float32)), np.array(fast(q, k, v)), atol=0.05)


def test_written_out_logsumexp_equals_mx_logsumexp_and_is_shift_safe() -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 5, 40)).astype(np.float32) * 4
    x[0] += 2000.0  # exp would overflow without the max shift
    x[1] -= 2000.0  # ... and underflow to log(0)
    xm = mx.array(x)
    ours, ref = logsumexp(xm), mx.logsumexp(xm, axis=-1)
    assert np.isfinite(np.array(ours)).all()
    np.testing.assert_allclose(np.array(ours), np.array(ref), rtol=1e-6, atol=1e-5)
    w = mx.array(rng.standard_normal((3, 5)).astype(np.float32))
    g_ours = mx.grad(lambda a: (logsumexp(a) * w).sum())(xm)
    g_ref = mx.grad(lambda a: (mx.logsumexp(a, axis=-1) * w).sum())(xm)
    np.testing.assert_allclose(np.array(g_ours), np.array(g_ref), atol=1e-6)


def test_written_out_silu_equals_nn_silu_and_stays_finite() -> None:
    """The CPU silu (exp written out, hand-written VJP): nn.silu's values and grads, compiled or not,
    finite where exp(-x) overflows, fp32 inside for bf16."""
    xs = np.concatenate([np.linspace(-30, 30, 601), [0.0, 88.0, -88.7, -89.0, -1000.0, 1000.0]])
    x = mx.array(xs.astype(np.float32))
    w = mx.array(np.random.default_rng(2).standard_normal(x.shape).astype(np.float32))

    def value_and_grad(f):
        return mx.value_and_grad(lambda a: (f(a) * w).sum())

    ref_loss, ref_grad = value_and_grad(nn.silu)(x)
    for fn in (value_and_grad(silu), mx.compile(value_and_grad(silu))):
        loss, grad = fn(x)
        assert np.isfinite(np.array(grad)).all()
        assert abs(loss.item() - ref_loss.item()) <= 1e-5 * abs(ref_loss.item())
        np.testing.assert_allclose(np.array(grad), np.array(ref_grad), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.array(silu(x)), np.array(nn.silu(x)), rtol=1e-6, atol=1e-6)
    # bf16: computed in fp32 from the bf16 input, rounded once to bf16 (relative error <= 2^-8)
    xb = x.astype(mx.bfloat16)
    bf = silu(xb)
    assert bf.dtype == mx.bfloat16
    exact = np.array(nn.silu(xb.astype(mx.float32)))
    np.testing.assert_allclose(np.array(bf.astype(mx.float32)), exact, rtol=2**-8, atol=1e-30)


def test_wrapper_compiles_kernels_against_the_precompiled_preamble(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel source as MLX writes it (the preamble include, then the kernel) built through the
    wrapper with MLX's own flags uses the precompiled header: g++ -H marks it with '!'."""
    if mlx_jit.why_not() is not None or mlx_jit.mlx_include_dir() is None:
        pytest.skip(f"no JIT flags here: {mlx_jit.why_not()}")
    root = mlx_jit.install_wrapper(tmp_path)
    src = tmp_path / "kernel.cpp"
    src.write_text(f'#include "{mlx_jit.PREAMBLE}"\nextern "C" float twice(float x) {{ return 2 * x; }}\n')
    cmd = [str(root / "bin" / "g++"), *mlx_jit.MLX_COMMAND_FLAGS.split(), "-shared", "-I", str(mlx_jit.mlx_include_dir()),
           str(src), "-o", str(tmp_path / "kernel.so"), "-H"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    used = [line for line in out.stderr.splitlines() if line.startswith("! ")]
    assert used and used[0].endswith(mlx_jit.PREAMBLE + ".gch"), out.stderr[:500]


def test_new_kernels_are_counted_with_their_build_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """announce_new_kernels: the libraries built since the snapshot, each one's .so time minus its
    .cpp time summed, one line on stderr; nothing when none was built."""
    monkeypatch.setattr(mlx_jit, "kernel_dir", lambda: tmp_path)
    (tmp_path / "libold.so").write_bytes(b"")
    before = mlx_jit.built_kernels()
    assert mlx_jit.announce_new_kernels(before, "mlx") is None and capsys.readouterr().err == ""
    for name, start, end in (("a", 100.0, 100.5), ("b", 200.0, 201.25)):
        (tmp_path / f"{name}.cpp").write_text("")
        os.utime(tmp_path / f"{name}.cpp", (start, start))
        (tmp_path / f"lib{name}.so").write_bytes(b"")
        os.utime(tmp_path / f"lib{name}.so", (end, end))
    built = mlx_jit.announce_new_kernels(before, "mlx")
    assert built["kernels"] == 2 and built["seconds"] == pytest.approx(1.75)
    assert "MLX built 2 CPU kernels" in capsys.readouterr().err

"""Ops of the MLX Llama written out for the CPU: attention (with its mask), softmax, silu and
logsumexp.

On a GPU each is the library's own fused op. On MLX's CPU, the prebuilt softmax, logsumexp and
Sigmoid kernels run exp scalar on one thread; written out with exp, they are fused by mx.compile
into JIT kernels built with vector flags (ftcore.mlx.jit), and softmax and silu get one-pass
hand-written VJPs.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


def additive_mask(attention_mask: mx.array | None, length: int, dtype: mx.Dtype) -> mx.array | str:
    """Additive (B, 1, L, L) mask: causal AND key is a real token (attention_mask 1 = real, 0 =
    pad).

    Blocked entries get the dtype's most negative finite value (not -inf), so a fully masked row
    (a pad query under left padding) softmaxes to a uniform row instead of NaN.
    """
    if attention_mask is None:
        return "causal"
    causal = mx.tril(mx.ones((length, length), dtype=mx.bool_))  # (L, L)
    keep = causal[None] & (attention_mask[:, None, :] != 0)  # (B, L, L)
    blocked = mx.array(mx.finfo(dtype).min, dtype=dtype)
    return mx.where(keep, mx.array(0, dtype=dtype), blocked)[:, None]


def packed_mask(position_ids: mx.array, attention_mask: mx.array, dtype: mx.Dtype) -> mx.array:
    """Additive (B, 1, L, L) per-document causal mask of packed rows: query i sees key j when
    j <= i, both lie in the same record (a record starts where its position is 0) and j is a real
    token. The torch backend builds the same mask (ftcore.torch.ops.packed_mask)."""
    doc = mx.cumsum((position_ids == 0).astype(mx.int32), axis=-1)  # (B, L): record of each token
    L = doc.shape[1]
    causal = mx.tril(mx.ones((L, L), dtype=mx.bool_))
    keep = causal[None] & (doc[:, :, None] == doc[:, None, :]) & (attention_mask[:, None, :] != 0)
    blocked = mx.array(mx.finfo(dtype).min, dtype=dtype)
    return mx.where(keep, mx.array(0, dtype=dtype), blocked)[:, None]


def rope_at(x: mx.array, positions: mx.array, base: float) -> mx.array:
    """rotate_half RoPE (HF Llama, `traditional=False`) at given positions: x (B, H, L, D),
    positions (B, L). Angles in fp32 as HF computes them: position * base^(-2i/D)."""
    D = x.shape[-1]
    inv_freq = 1.0 / (base ** (mx.arange(0, D, 2, dtype=mx.float32) / D))  # (D/2,)
    angles = positions.astype(mx.float32)[:, None, :, None] * inv_freq  # (B, 1, L, D/2)
    cos, sin = mx.cos(angles).astype(x.dtype), mx.sin(angles).astype(x.dtype)
    x1, x2 = x[..., : D // 2], x[..., D // 2 :]
    return mx.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def writes_exp_out() -> bool:
    """True on MLX's CPU, where softmax, logsumexp and silu are written out with exp: MLX's prebuilt
    CPU kernels (and an unfused Sigmoid) run exp scalar on one thread, while written-out chains
    are fused by mx.compile into JIT kernels built with vector flags (ftcore.mlx.jit). On a GPU
    the library's own fused ops are used."""
    return mx.default_device() == mx.cpu


@mx.custom_function
def _softmax_written_out(x: mx.array) -> mx.array:
    """Softmax over the last axis with exp written out, so mx.compile fuses it (see attention)."""
    e = mx.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@_softmax_written_out.vjp
def _softmax_written_out_vjp(x: mx.array, cotangent: mx.array, probs: mx.array) -> mx.array:
    # dL/dx = p * (g - sum(g * p)): one fused pass over the saved probabilities instead of
    # autodiff's chain through divide, sum and exp (softmax fwd + bwd over (8, 4, 256, 256),
    # one thread: 23 -> 14 ms).
    return probs * (cotangent - (cotangent * probs).sum(axis=-1, keepdims=True))


def attention(
    q: mx.array, k: mx.array, v: mx.array, scale: float, mask: mx.array | str
) -> mx.array:
    """Softmax attention with GQA: q (B, H, L, D), k/v (B, KV, L, D) -> (B, H, L, D); softmax in
    fp32.

    On a GPU this is mx.fast.scaled_dot_product_attention. On the CPU it is written out: the fused
    primitive's CPU fallback runs its softmax (exp) in a prebuilt single-threaded kernel, while
    written-out ops are fused by mx.compile into JIT kernels (see ftcore.mlx.jit), and the softmax
    has a one-pass VJP. Forward + backward for one row (32 heads, 4 kv heads, 256 x 64), one
    thread: 58 ms with autodiff's softmax VJP, 39 ms with the hand-written one.
    """
    if not writes_exp_out():
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    B, H, L, D = q.shape
    kv = k.shape[1]
    if isinstance(mask, str):  # "causal": the additive mask of a batch without padding
        mask = additive_mask(mx.ones((1, L), dtype=mx.int32), L, q.dtype)  # (1, 1, L, L)
    # (B, KV, H/KV, L, D): each kv head serves H/KV query heads, without repeating k and v.
    qg = (q * mx.array(scale, dtype=q.dtype)).reshape(B, kv, H // kv, L, D)
    scores = qg @ k[:, :, None].swapaxes(-1, -2) + mask[:, :, None]  # (B, KV, H/KV, L, L)
    probs = _softmax_written_out(scores.astype(mx.float32)).astype(v.dtype)
    return (probs @ v[:, :, None]).reshape(B, H, L, D)


@mx.custom_function
def _silu_written_out(x: mx.array) -> mx.array:
    xf = x.astype(mx.float32)
    return (xf / (1 + mx.exp(-xf))).astype(x.dtype)


@_silu_written_out.vjp
def _silu_written_out_vjp(x: mx.array, cotangent: mx.array, output: mx.array) -> mx.array:
    # silu'(x) = s (1 + x (1 - s)) with s = sigmoid(x); exp(-x) = inf below x = -88 gives s = 0, a
    # finite 0 (autodiff of x / (1 + exp(-x)) would give inf / inf = NaN there).
    xf = x.astype(mx.float32)
    s = 1 / (1 + mx.exp(-xf))
    return (cotangent * s * (1 + xf * (1 - s))).astype(x.dtype)


def silu(x: mx.array) -> mx.array:
    """x * sigmoid(x). nn.silu on a GPU; on the CPU computed in fp32 with exp written out and a
    hand-written VJP: autodiff of nn.silu shares the Sigmoid primitive's output between two
    products, which leaves it out of mx.compile's fused kernels, in a prebuilt scalar kernel.
    silu(gate) * up, forward + backward over (256, 5632), one thread: 27-35 ms with nn.silu, 5 ms
    with this."""
    if not writes_exp_out():
        return nn.silu(x)
    return _silu_written_out(x)


def logsumexp(x: mx.array) -> mx.array:
    """logsumexp over the last axis. On the CPU written out (max shift, exp, sum) rather than
    mx.logsumexp, whose prebuilt CPU kernel runs exp on one thread without vector units: under
    mx.compile the exp here is fused into a JIT kernel (see ftcore.mlx.jit)."""
    if not writes_exp_out():
        return mx.logsumexp(x, axis=-1)
    shift = mx.stop_gradient(x.max(axis=-1, keepdims=True))
    return mx.log(mx.exp(x - shift).sum(axis=-1)) + shift[..., 0]

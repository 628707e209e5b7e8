"""Converter properties over random configs and dtypes:
- HF -> MLX -> HF is the identity, bit for bit (names, dtypes, shapes, bytes, config), including
  awkward values (-0.0, subnormals, the largest finite value) and sharded sources;
- a dtype cast during conversion rounds exactly as torch's `.to(dtype)` does."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import mlx.core as mx
import pytest
import torch
from helpers import make_hf_model, raw_tensors
from hypothesis import given, note
from hypothesis import strategies as st
from parity_utils import llama_configs
from safetensors import safe_open

from ftcore.mlx.convert import WEIGHTS_FILE, convert_hf_to_mlx, convert_mlx_to_hf
from ftcore.mlx.model import load_model

pytestmark = pytest.mark.parity

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _awkward_values(model, dtype: torch.dtype, seed: int) -> None:
    """Plant -0.0, a subnormal and the largest finite value of `dtype` in random spots."""
    g = torch.Generator().manual_seed(seed)
    info = torch.finfo(dtype)
    specials = torch.tensor([-0.0, info.tiny / 4, -info.tiny / 2, info.max, -info.max], dtype=dtype)
    with torch.no_grad():
        for p in model.parameters():
            flat = p.view(-1)
            idx = torch.randint(0, flat.numel(), (min(5, flat.numel()),), generator=g)
            flat[idx] = specials[: len(idx)]


@given(
    cfg=llama_configs(),
    dtype=st.sampled_from(sorted(DTYPES)),
    shard=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_hf_mlx_hf_round_trip_is_bitwise(cfg, dtype, shard, seed):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = make_hf_model(cfg, seed, DTYPES[dtype])
        _awkward_values(model, DTYPES[dtype], seed)
        model.save_pretrained(tmp / "hf", max_shard_size="24KB" if shard else "1GB")
        n_files = len(list((tmp / "hf").glob("*.safetensors")))
        note(f"{n_files} source file(s)")
        mlx_dir = convert_hf_to_mlx(tmp / "hf", tmp / "mlx")
        back = convert_mlx_to_hf(mlx_dir, tmp / "back")
        original = raw_tensors(tmp / "hf")
        assert raw_tensors(mlx_dir / WEIGHTS_FILE) == original  # MLX keeps HF names and dtypes
        assert raw_tensors(back / "model.safetensors") == original
        assert json.loads((back / "config.json").read_text()) == json.loads(
            (tmp / "hf" / "config.json").read_text()
        )
        _, args = load_model(mlx_dir)  # and the model loads it strictly
        assert args.tie_word_embeddings == cfg["tie_word_embeddings"]
        assert args.rope_theta == pytest.approx(cfg["rope_theta"], rel=1e-12)


@given(
    cfg=llama_configs(max_layers=2),
    pair=st.sampled_from(
        [("fp32", "bf16"), ("fp32", "fp16"), ("bf16", "fp32"), ("fp16", "fp32"), ("bf16", "fp16")]
    ),
    seed=st.integers(0, 2**16),
)
def test_dtype_cast_rounds_like_torch(cfg, pair, seed):
    src, dst = pair
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = make_hf_model(cfg, seed, DTYPES[src])
        model.save_pretrained(tmp / "hf")
        mlx_dir = convert_hf_to_mlx(tmp / "hf", tmp / "mlx", dtype=dst)
        want = {k: v.to(DTYPES[dst]) for k, v in model.state_dict().items()}
        with safe_open(str(mlx_dir / WEIGHTS_FILE), "pt") as h:
            got = {k: h.get_tensor(k) for k in h.keys()}  # noqa: SIM118
        assert set(got) <= set(want)
        for k, t in got.items():
            assert t.dtype == DTYPES[dst], k
            assert torch.equal(t.view(torch.uint8), want[k].contiguous().view(torch.uint8)), (
                k
            )  # bitwise
        assert {v.dtype for v in mx.load(str(mlx_dir / WEIGHTS_FILE)).values()} == {
            {"fp32": mx.float32, "bf16": mx.bfloat16, "fp16": mx.float16}[dst]
        }

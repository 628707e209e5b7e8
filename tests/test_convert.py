"""HF <-> MLX conversion: name map, bitwise round trips, conversion cache, errors, adapter formats."""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from helpers import TINY, raw_tensors, save_hf_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

from ftcore.mlx.adapters import save_mlx_lm_adapter
from ftcore.mlx.convert import (
    MANIFEST_FILE,
    WEIGHTS_FILE,
    ConversionError,
    cached_conversion,
    convert_hf_to_mlx,
    convert_mlx_to_hf,
    is_conversion_current,
)
from ftcore.mlx.lora import apply_lora, load_lora_state, lora_state
from ftcore.mlx.model import load_model
from ftcore.mlx.weight_names import hf_to_mlx_key, mlx_to_hf_key
from ftcore.tolerances import FP32_LOGITS_ATOL

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    return save_hf_model(tmp_path_factory.mktemp("hf") / "tiny")


def test_every_checkpoint_key_is_mapped_or_dropped(hf_dir):
    with safe_open(str(hf_dir / "model.safetensors"), "np") as f:
        keys = list(f.keys())
    assert len(keys) == 3 + 9 * TINY["num_hidden_layers"]
    for k in keys:
        assert hf_to_mlx_key(k) == k  # MLX keeps HF names
        assert mlx_to_hf_key(k) == k
    assert hf_to_mlx_key("model.layers.7.self_attn.rotary_emb.inv_freq") is None
    assert hf_to_mlx_key("lm_head.weight", tie_word_embeddings=True) is None
    for unknown in ("model.layers.0.self_attn.q_proj.bias", "model.rotary_emb.inv_freq", "foo"):
        with pytest.raises(ConversionError):
            hf_to_mlx_key(unknown)


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"]
)
def test_round_trip_is_bitwise(tmp_path, dtype):
    src = save_hf_model(tmp_path / "hf", dtype)
    mlx_dir = convert_hf_to_mlx(src, tmp_path / "mlx")
    back = convert_mlx_to_hf(mlx_dir, tmp_path / "back")
    original = raw_tensors(src / "model.safetensors")
    assert raw_tensors(mlx_dir / WEIGHTS_FILE) == original  # same names, dtype kept
    assert raw_tensors(back / "model.safetensors") == original
    assert json.loads((back / "config.json").read_text()) == json.loads(
        (src / "config.json").read_text()
    )
    if dtype == torch.float32:  # transformers accepts the written file as-is
        reloaded = LlamaForCausalLM.from_pretrained(back)
        assert all(
            torch.equal(a, b)
            for a, b in zip(
                reloaded.state_dict().values(),
                LlamaForCausalLM.from_pretrained(src).state_dict().values(),
                strict=True,
            )
        )


def test_sharded_source_equals_single_file(tmp_path, hf_dir):
    sharded = tmp_path / "sharded"
    LlamaForCausalLM.from_pretrained(hf_dir).save_pretrained(sharded, max_shard_size="40KB")
    assert (sharded / "model.safetensors.index.json").exists()
    a = convert_hf_to_mlx(sharded, tmp_path / "a")
    b = convert_hf_to_mlx(hf_dir, tmp_path / "b")
    assert raw_tensors(a / WEIGHTS_FILE) == raw_tensors(b / WEIGHTS_FILE)
    os.remove(next(sharded.glob("model-00002-*.safetensors")))
    assert not is_conversion_current(sharded, a)
    with pytest.raises(ConversionError, match="missing"):
        convert_hf_to_mlx(sharded, tmp_path / "c")


def test_dtype_cast_and_tied_head(tmp_path):
    src = save_hf_model(tmp_path / "hf", tie_word_embeddings=True)
    with safe_open(str(src / "model.safetensors"), "np") as f:
        assert "lm_head.weight" not in list(f.keys())  # tied: HF stores the embedding only
    out = convert_hf_to_mlx(src, tmp_path / "mlx", dtype="bf16")
    weights = mx.load(str(out / WEIGHTS_FILE))
    assert {v.dtype for v in weights.values()} == {mx.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert is_conversion_current(src, out, "bf16") and not is_conversion_current(src, out)
    model, args = load_model(out)
    assert args.tie_word_embeddings and "lm_head" not in model
    assert model(mx.array([[1, 2, 3]])).shape == (1, 3, TINY["vocab_size"])


def test_cache_reuses_then_detects_stale_source(tmp_path):
    src = save_hf_model(tmp_path / "hf")
    cache = tmp_path / "cache"
    out = cached_conversion(src, cache)
    manifest_mtime = (out / MANIFEST_FILE).stat().st_mtime_ns
    assert cached_conversion(src, cache) == out
    assert (out / MANIFEST_FILE).stat().st_mtime_ns == manifest_mtime  # reused, not redone

    # Same size and mtime, different content: the edge hash catches it.
    weights = src / "model.safetensors"
    st = weights.stat()
    tensors = load_file(str(weights))
    tensors["model.norm.weight"] = tensors["model.norm.weight"] + 1.0
    save_file(tensors, str(weights), metadata={"format": "pt"})
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert weights.stat().st_size == st.st_size
    assert not is_conversion_current(src, out)
    out2 = cached_conversion(src, cache)
    assert out2 == out and is_conversion_current(src, out)
    reconverted = mx.load(str(out / WEIGHTS_FILE))["model.norm.weight"]
    np.testing.assert_array_equal(np.array(reconverted), tensors["model.norm.weight"].numpy())
    assert not list(cache.glob(".*"))  # no temp or old folders left behind

    # An edited config (touch is enough) is a changed source too.
    os.utime(src / "config.json", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert not is_conversion_current(src, out)


@pytest.mark.parametrize(
    "damage", ["no_manifest", "truncated", "key_missing", "no_config", "other_dtype"]
)
def test_incomplete_conversion_is_detected_and_redone(tmp_path, hf_dir, damage):
    cache = tmp_path / "cache"
    out = cached_conversion(hf_dir, cache)
    assert is_conversion_current(hf_dir, out)
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    if damage == "no_manifest":
        (out / MANIFEST_FILE).unlink()
    elif damage == "truncated":
        with open(out / WEIGHTS_FILE, "r+b") as f:
            f.truncate(manifest["weights_size"] - 100)
    elif damage == "key_missing":
        w = mx.load(str(out / WEIGHTS_FILE))
        del w["model.norm.weight"]
        mx.save_safetensors(str(out / WEIGHTS_FILE), w)
        manifest["weights_size"] = (out / WEIGHTS_FILE).stat().st_size
        (out / MANIFEST_FILE).write_text(json.dumps(manifest))
    elif damage == "no_config":
        (out / "config.json").unlink()
    elif damage == "other_dtype":
        manifest["dtype"] = "float16"
        (out / MANIFEST_FILE).write_text(json.dumps(manifest))
    assert not is_conversion_current(hf_dir, out)
    assert cached_conversion(hf_dir, cache) == out
    assert is_conversion_current(hf_dir, out)
    load_model(out)


def test_refuses_to_replace_a_foreign_folder(tmp_path, hf_dir):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(ConversionError, match="refusing"):
        convert_hf_to_mlx(hf_dir, out)
    assert (out / "notes.txt").read_text() == "keep me"


def _copy_config(src: Path, dst: Path, **changes) -> dict:
    dst.mkdir()
    cfg = {**json.loads((src / "config.json").read_text()), **changes}
    (dst / "config.json").write_text(json.dumps(cfg))
    return cfg


def test_bad_sources_give_one_line_errors(tmp_path, hf_dir):
    cases: dict[str, Path] = {}
    cases["no config"] = tmp_path / "empty"
    cases["no config"].mkdir()
    cases["not llama"] = tmp_path / "gpt2"
    _copy_config(hf_dir, cases["not llama"], architectures=["GPT2LMHeadModel"], model_type="gpt2")
    cases["pickle only"] = tmp_path / "pickle"
    _copy_config(hf_dir, cases["pickle only"])
    (cases["pickle only"] / "pytorch_model.bin").write_bytes(b"\x80\x04")
    cases["missing tensor"] = tmp_path / "missing"
    _copy_config(hf_dir, cases["missing tensor"])
    tensors = load_file(str(hf_dir / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(
        tensors, str(cases["missing tensor"] / "model.safetensors"), metadata={"format": "pt"}
    )
    cases["rope scaling"] = tmp_path / "rope"
    _copy_config(
        hf_dir, cases["rope scaling"], rope_parameters={"rope_type": "llama3", "rope_theta": 5e5}
    )
    cases["not safetensors"] = tmp_path / "garbage"
    _copy_config(hf_dir, cases["not safetensors"])
    (cases["not safetensors"] / "model.safetensors").write_bytes(b"garbage")
    expect = {
        "no config": "no config.json",
        "not llama": "not a Llama model",
        "pickle only": "only pickle weights",
        "missing tensor": "missing tensor model.layers.1.mlp.up_proj.weight",
        "rope scaling": "rope type 'llama3'",
        "not safetensors": "cannot read safetensors",
    }
    for case, folder in cases.items():
        with pytest.raises(ConversionError) as e:
            convert_hf_to_mlx(folder, tmp_path / f"out-{folder.name}")
        assert expect[case] in str(e.value), case
        assert "\n" not in str(e.value), case
        assert not (tmp_path / f"out-{folder.name}").exists()


def export_random_adapter(tmp_path: Path, hf_dir: Path):
    """Our model with LoRA on q, v, down (rank 4, alpha 8), random non-zero A and B, exported for mlx-lm."""
    model, args = load_model(convert_hf_to_mlx(hf_dir, tmp_path / "mlx"))
    apply_lora(model, ("q_proj", "v_proj", "down_proj"), rank=4, alpha=8.0)
    state = {
        k: 0.1 * mx.random.normal(v.shape, key=mx.random.key(i))
        for i, (k, v) in enumerate(lora_state(model).items())
    }
    load_lora_state(model, state)
    out = save_mlx_lm_adapter(
        state, {"rank": 4, "alpha": 8.0, "num_layers": args.num_hidden_layers}, tmp_path / "ad"
    )
    return model, state, out


def test_mlx_lm_adapter_format(tmp_path, hf_dir):
    _, state, out = export_random_adapter(tmp_path, hf_dir)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg == {
        "fine_tune_type": "lora",
        "num_layers": 2,
        "lora_parameters": {
            "rank": 4,
            "scale": 2.0,
            "dropout": 0.0,
            "keys": ["mlp.down_proj", "self_attn.q_proj", "self_attn.v_proj"],
        },
    }
    saved = mx.load(str(out / "adapters.safetensors"))
    assert len(saved) == len(state)
    assert saved["model.layers.0.self_attn.q_proj.lora_a"].shape == (64, 4)  # (in, r)
    assert saved["model.layers.1.mlp.down_proj.lora_b"].shape == (4, 64)  # (r, out)
    np.testing.assert_array_equal(
        np.array(saved["model.layers.1.mlp.down_proj.lora_a"]),
        np.array(state["model.layers.1.mlp.down_proj.lora_A"]).T,
    )
    only_first = {k: v for k, v in state.items() if ".layers.0." in k}
    with pytest.raises(ConversionError, match="last N layers"):
        save_mlx_lm_adapter(
            only_first, {"rank": 4, "alpha": 8.0, "num_layers": 2}, tmp_path / "bad"
        )


@pytest.mark.mlx_lm
def test_mlx_lm_loads_our_adapter(tmp_path, hf_dir):
    """mlx-lm's own Llama + load_adapters on our export computes what our model computes."""
    mlx_lm_utils = pytest.importorskip("mlx_lm.utils")
    from mlx_lm.tuner.utils import load_adapters

    model, _, out = export_random_adapter(tmp_path, hf_dir)
    ref, _ = mlx_lm_utils.load_model(hf_dir)
    load_adapters(ref, str(out))
    ids = mx.array([[3, 14, 15, 92, 65, 35]])
    np.testing.assert_allclose(np.array(ref(ids)), np.array(model(ids)), atol=FP32_LOGITS_ATOL, rtol=0)


@pytest.mark.mlx_lm
def test_mlx_lm_loads_the_conversion(tiny_model_dir, tmp_path):
    """`mlx_lm.load(<ftcore convert output>)`: model and tokenizer load; its logits equal ftcore's
    MLX model within 1e-5 in fp32, and its tokenizer encodes as the checkpoint's does."""
    mlx_lm = pytest.importorskip("mlx_lm")
    from ftcore.inputs.tokenizer import load_tokenizer

    out = convert_hf_to_mlx(tiny_model_dir, tmp_path / "mlx")
    theirs, tokenizer = mlx_lm.load(str(out))
    ours, _ = load_model(out)
    text = "### Instruction:\nSpell candle in reverse.\n\n### Response:\n"
    ids = load_tokenizer(tiny_model_dir)(text)["input_ids"]
    assert tokenizer.encode(text) == ids
    x = mx.array([ids])
    diff = np.abs(np.array(theirs(x)) - np.array(ours(x))).max()
    assert diff <= 1e-5, diff

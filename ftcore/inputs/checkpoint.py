"""Checks on a Llama checkpoint folder, made once in the parent before any backend starts, for
every framework alike: a checkpoint either passes all of them or the run stops with one line.

1. config.json is UTF-8 JSON, an object, a Llama config with positive integer sizes, and uses
   nothing ftcore's models do not implement (`ftcore.inputs.arch.unsupported`).
2. The weights are `model.safetensors` or the shards a `model.safetensors.index.json` names (or,
   with --allow-pickle, `pytorch_model*.bin`). Every tensor the config implies is present with
   the implied shape and a float dtype (F32 / BF16 / F16): a missing tensor would otherwise be
   initialised at random by transformers without a word. Unknown tensors are refused too. A
   safetensors file must be as long as its header says (a truncated copy is refused).
3. The weights are finite: every element when the weights total at most FULL_SCAN_BYTES, else
   the first and last SAMPLE_ELEMENTS of every tensor (a sampled check).
4. The tokenizer's vocabulary fits the embedding (`check_vocab`).

The safetensors header is read directly (8-byte little-endian length, then JSON), and the values
through a read-only memory map, so no framework is imported for a safetensors checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ftcore.config import UserError
from ftcore.inputs.arch import (
    linear_shapes,
    module_path,
    normalise_config,
    unsupported,
)
from ftcore.lora_targets import LORA_TARGETS

FULL_SCAN_BYTES = 8 << 30  # TinyLlama-1.1B in fp32 is 4.4 GB: scanned whole (~2 s)
SAMPLE_ELEMENTS = 1 << 20  # per tensor end, above FULL_SCAN_BYTES
SCAN_CHUNK = 1 << 24  # elements per step of the finite scan (bounds its temporaries)
LLAMA_ARCHITECTURES = ("LlamaForCausalLM",)
SIZE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads")  # fmt: skip
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# (bytes per element, the bits that are all ones exactly when a value is inf or nan)
FLOAT_DTYPES = {"F32": (4, None), "BF16": (2, 0x7F80), "F16": (2, 0x7C00)}
TORCH_DTYPES = {"torch.float32": "F32", "torch.bfloat16": "BF16", "torch.float16": "F16"}


@dataclass
class Tensor:
    name: str
    dtype: str  # safetensors name: F32, BF16, ...
    shape: tuple[int, ...]
    file: Path
    start: int = 0  # byte range in `file` (safetensors only)
    end: int = 0


def read_config(model_dir: Path) -> dict[str, Any]:
    """config.json as a normalised Llama config (ftcore.inputs.arch.normalise_config)."""
    path = model_dir / "config.json"
    try:
        cfg = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e.msg})") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{path}: expected a JSON object, found {type(cfg).__name__}")
    archs = cfg.get("architectures") or []
    if cfg.get("model_type") != "llama" and not (
        isinstance(archs, list) and set(archs) & set(LLAMA_ARCHITECTURES)
    ):
        what = (
            ", ".join(map(str, archs))
            if isinstance(archs, list) and archs
            else cfg.get("model_type") or "unknown"
        )
        raise UserError(
            f"{model_dir}: a {what} model; ftcore supports Llama-architecture models only"
        )
    for key in SIZE_FIELDS:
        v = cfg.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise UserError(f"{path}: {key} must be a positive integer, found {v!r}")
    if cfg["hidden_size"] % cfg["num_attention_heads"] and not cfg.get("head_dim"):
        raise UserError(f"{path}: hidden_size is not a multiple of num_attention_heads")
    kv = cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    if not isinstance(kv, int) or cfg["num_attention_heads"] % kv:
        raise UserError(f"{path}: num_key_value_heads {kv!r} does not divide num_attention_heads")
    if why := unsupported(cfg):
        raise UserError(f"{path}: {why}")
    return normalise_config(cfg)


def expected_tensors(arch: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor a Llama checkpoint of this config holds, with its (out, in) / (n,) shape.
    lm_head is left out when the embedding is tied (it is optional then)."""
    h, vocab = arch["hidden_size"], arch["vocab_size"]
    out = {"model.embed_tokens.weight": (vocab, h), "model.norm.weight": (h,)}
    shapes = linear_shapes(arch)
    for i in range(arch["num_hidden_layers"]):
        out[f"model.layers.{i}.input_layernorm.weight"] = (h,)
        out[f"model.layers.{i}.post_attention_layernorm.weight"] = (h,)
        for t in LORA_TARGETS:
            fan_in, fan_out = shapes[t]
            out[f"{module_path(i, t)}.weight"] = (fan_out, fan_in)
    if not arch["tie_word_embeddings"]:
        out["lm_head.weight"] = (vocab, h)
    return out


def _optional(name: str, arch: dict[str, Any]) -> bool:
    """Tensors a checkpoint may hold beyond expected_tensors: RoPE frequencies (old checkpoints;
    recomputed from rope_theta) and a stored copy of a tied head."""
    return name.endswith(".self_attn.rotary_emb.inv_freq") or (
        name == "lm_head.weight" and arch["tie_word_embeddings"]
    )


def _safetensors_header(path: Path) -> list[Tensor]:
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError
            header = json.loads(f.read(n))
    except (struct.error, ValueError, UnicodeDecodeError):
        raise UserError(f"{path}: not a safetensors file (or truncated in its header)") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    tensors, data_end = [], 8 + n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = (8 + n + o for o in info["data_offsets"])
        tensors.append(Tensor(name, info["dtype"], tuple(info["shape"]), path, start, end))
        data_end = max(data_end, end)
    if data_end > size:
        raise UserError(f"{path}: truncated ({size} bytes, its header needs {data_end})")
    return tensors


def _weight_files(model_dir: Path, allow_pickle: bool) -> tuple[list[Path], bool]:
    """(files, is_pickle)."""
    index = model_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            files = sorted({model_dir / f for f in weight_map.values()})
        except (ValueError, KeyError, TypeError, AttributeError):
            raise UserError(f"{index}: not a safetensors index (no weight_map)") from None
        if missing := [f.name for f in files if not f.is_file()]:
            raise UserError(f"{index}: names missing shard(s) {', '.join(missing)}")
        return files, False
    if (model_dir / SINGLE_FILE).is_file():
        return [model_dir / SINGLE_FILE], False
    pickles = sorted(model_dir.glob("pytorch_model*.bin"))
    if pickles and allow_pickle:
        return pickles, True
    raise UserError(f"{model_dir}: no {SINGLE_FILE} or {INDEX_FILE}")


def _pickle_tensors(path: Path) -> dict[str, Any]:
    import torch  # only for --allow-pickle checkpoints

    try:  # weights_only: tensors and containers, no arbitrary code; mmap needs the zip format
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a broken pickle
        raise UserError(f"{path}: cannot load pickle weights ({type(e).__name__}: {e})") from None


def _nonfinite_in(t: Tensor, sampled: bool) -> bool:
    width, exp_bits = FLOAT_DTYPES[t.dtype]
    raw = np.memmap(t.file, dtype=np.uint8, mode="r", offset=t.start, shape=(t.end - t.start,))
    values = raw.view(np.float32 if width == 4 else np.uint16)
    n = values.size
    spans = [(0, n)] if not sampled or n <= 2 * SAMPLE_ELEMENTS else [
        (0, SAMPLE_ELEMENTS), (n - SAMPLE_ELEMENTS, n)]  # fmt: skip
    for lo, hi in spans:
        for a in range(lo, hi, SCAN_CHUNK):
            part = values[a : min(hi, a + SCAN_CHUNK)]
            bad = ~np.isfinite(part) if exp_bits is None else (part & exp_bits) == exp_bits
            if bad.any():
                return True
    return False


def check_checkpoint(model_dir: Path, allow_pickle: bool = False) -> dict[str, Any]:
    """Checks 1-3 of the module docstring; returns the normalised config. One UserError line
    naming the file and the tensor when a check fails."""
    arch = read_config(model_dir)
    files, is_pickle = _weight_files(model_dir, allow_pickle)
    found: dict[str, Tensor] = {}
    pickled = {f: _pickle_tensors(f) for f in files} if is_pickle else {}
    for f in files:
        if is_pickle:
            for name, v in pickled[f].items():
                found[name] = Tensor(
                    name, TORCH_DTYPES.get(str(v.dtype), str(v.dtype)), tuple(v.shape), f
                )
        else:
            found.update({t.name: t for t in _safetensors_header(f)})
    expected = expected_tensors(arch)
    if missing := [k for k in expected if k not in found]:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise UserError(
            f"{model_dir}: the weights lack {missing[0]}{more} (config.json implies them)"
        )
    if unknown := [k for k in found if k not in expected and not _optional(k, arch)]:
        raise UserError(
            f"{model_dir}: tensor {unknown[0]} ({found[unknown[0]].file.name}) is not part of a "
            "Llama model"
        )
    for name, shape in expected.items():
        t = found[name]
        if t.shape != shape:
            raise UserError(
                f"{t.file}: {name} has shape {list(t.shape)}, config.json implies {list(shape)}"
            )
        if t.dtype not in FLOAT_DTYPES:
            raise UserError(f"{t.file}: {name} is {t.dtype}; expected F32, BF16 or F16")
    if is_pickle:
        import torch

        for f, tensors in pickled.items():
            for name, v in tensors.items():
                if v.is_floating_point() and not bool(torch.isfinite(v).all()):
                    raise UserError(f"{f}: {name} holds NaN or Inf values")
        return arch
    sampled = sum(t.end - t.start for t in found.values()) > FULL_SCAN_BYTES
    for name in expected:
        if _nonfinite_in(found[name], sampled):
            raise UserError(f"{found[name].file}: {name} holds NaN or Inf values")
    return arch


def check_vocab(arch: dict[str, Any], tokenizer: Any, model_dir: Path) -> None:
    """Every id the tokenizer can produce must index a row of the embedding."""
    n = len(tokenizer)
    if n > arch["vocab_size"]:
        raise UserError(
            f"{model_dir}: the tokenizer has {n} tokens but the model's embedding only "
            f"{arch['vocab_size']} rows (vocab_size in config.json)"
        )


def weights_sha256(model_dir: Path) -> str:
    """sha256 over the folder's weight files (name and bytes, in name order): equal checksums,
    equal weights, whatever machine made or read them."""
    h = hashlib.sha256()
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()

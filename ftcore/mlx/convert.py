"""HF <-> MLX weights: a checked, cached, atomic conversion of a local Llama checkpoint.

Every source tensor goes through an explicit name table (`HF_TO_MLX`, ftcore.mlx.weight_names): it
is either mapped or deliberately dropped, and an unknown key is an error. MLX uses HF's names, so
the table is mostly identity; it exists so that nothing is copied (or lost) by accident.

A conversion folder holds `model.safetensors`, `config.json` (the HF config), the source's
tokenizer files and `ftcore_conversion.json`, a manifest written last that fingerprints the source
files: the layout `mlx_lm.load(folder)` reads (it picks up `model*.safetensors` and needs the
tokenizer beside the weights), with the tensors bit for bit the HF ones (or cast to --dtype). The
folder is built under a temporary name next to its destination and renamed into place, so a folder
without a matching manifest is never a finished conversion.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten

from ftcore.cache_dir import file_in_the_way
from ftcore.mlx.model import WEIGHTS_FILE, Model, ModelArgs
from ftcore.mlx.weight_names import ConversionError, hf_to_mlx_key, mlx_to_hf_key

FORMAT_VERSION = 2  # 2: weights named model.safetensors, tokenizer files copied (mlx-lm loads it)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                   "special_tokens_map.json", "generation_config.json")  # copied when present
CONFIG_FILE = "config.json"
MANIFEST_FILE = "ftcore_conversion.json"
_INDEX_FILE = "model.safetensors.index.json"
_SINGLE_FILE = "model.safetensors"
_MIB = 1 << 20

_DTYPES = {
    "fp32": mx.float32, "float32": mx.float32,
    "bf16": mx.bfloat16, "bfloat16": mx.bfloat16,
    "fp16": mx.float16, "float16": mx.float16,
}  # fmt: skip
_DTYPE_NAMES = {mx.float32: "float32", mx.bfloat16: "bfloat16", mx.float16: "float16"}


def _normalise_dtype(dtype: str | mx.Dtype | None) -> mx.Dtype | None:
    if dtype is None or isinstance(dtype, mx.Dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ConversionError(f"unknown dtype {dtype!r} (one of {', '.join(_DTYPES)})")
    return _DTYPES[dtype]


def _read_config(hf_dir: Path) -> tuple[dict[str, Any], ModelArgs]:
    path = hf_dir / CONFIG_FILE
    if not path.is_file():
        raise ConversionError(f"{hf_dir}: no config.json (not a Hugging Face model folder)")
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConversionError(f"{path}: unreadable config ({e})") from e
    if (
        "LlamaForCausalLM" not in (cfg.get("architectures") or [])
        and cfg.get("model_type") != "llama"
    ):
        arch = cfg.get("architectures") or cfg.get("model_type")
        raise ConversionError(f"{hf_dir}: not a Llama model (architectures/model_type: {arch})")
    try:
        return cfg, ModelArgs.from_hf_config(cfg)
    except KeyError as e:
        raise ConversionError(f"{path}: config lacks {e}") from e
    except (TypeError, ValueError) as e:
        raise ConversionError(f"{path}: unsupported Llama config: {e}") from e


def _weight_files(hf_dir: Path) -> list[Path]:
    """The safetensors files of a model folder: sharded (via the index) or single."""
    index = hf_dir / _INDEX_FILE
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError) as e:
            raise ConversionError(f"{index}: unreadable index ({e!r})") from e
        files = [hf_dir / n for n in names]
        if missing := [f.name for f in files if not f.is_file()]:
            raise ConversionError(
                f"{hf_dir}: shard(s) named in the index are missing: {', '.join(missing)}"
            )
        return files
    if (hf_dir / _SINGLE_FILE).is_file():
        return [hf_dir / _SINGLE_FILE]
    pickles = sorted(p.name for p in hf_dir.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
    if pickles:
        raise ConversionError(
            f"{hf_dir}: only pickle weights ({', '.join(pickles)}); safetensors required "
            "(re-save with save_pretrained(..., safe_serialization=True))"
        )
    raise ConversionError(f"{hf_dir}: no model.safetensors or {_INDEX_FILE}")


def _source_paths(hf_dir: Path) -> list[Path]:
    """Every file a conversion depends on: config, index (if any), weights."""
    extra = [hf_dir / _INDEX_FILE] if (hf_dir / _INDEX_FILE).is_file() else []
    return [hf_dir / CONFIG_FILE, *extra, *_weight_files(hf_dir)]


def _fingerprint(path: Path) -> dict[str, Any]:
    """Cheap for a multi-GB file, yet catches a replaced or edited one: size, mtime, edge hashes."""
    st = path.stat()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(_MIB))
        if st.st_size > _MIB:
            f.seek(max(_MIB, st.st_size - _MIB))
            h.update(f.read(_MIB))
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "edge_sha256": h.hexdigest()}


def _sources_fingerprint(hf_dir: Path) -> dict[str, dict[str, Any]]:
    return {p.name: _fingerprint(p) for p in _source_paths(hf_dir)}


def _safetensors_keys(path: Path) -> set[str]:
    """Tensor names from a safetensors header; ConversionError if the file is cut short."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n <= 0 or 8 + n > size:
            raise ConversionError(f"{path}: truncated or not safetensors")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    end = max((t["data_offsets"][1] for t in header.values()), default=0)
    if 8 + n + end != size:
        raise ConversionError(f"{path}: size {size} does not match its header ({8 + n + end})")
    return set(header)


def _load_hf_tensors(hf_dir: Path, args: ModelArgs) -> dict[str, mx.array]:
    """All source tensors under MLX names, checked against the model's names and shapes."""
    # Model(args) only builds lazy arrays: names and shapes, no compute, no memory.
    expected = {k: tuple(v.shape) for k, v in tree_flatten(Model(args).parameters())}
    out: dict[str, mx.array] = {}
    for path in _weight_files(hf_dir):
        # mx.load reads safetensors bit-exactly, bf16 included (numpy cannot hold bf16).
        try:
            tensors = mx.load(str(path))
        except Exception as e:  # mlx raises plain RuntimeError/ValueError for a bad file
            raise ConversionError(f"{path}: cannot read safetensors ({e})") from e
        for key, value in tensors.items():
            name = hf_to_mlx_key(key, args.tie_word_embeddings)
            if name is None:
                continue
            if name not in expected:
                raise ConversionError(f"{path.name}: tensor {key!r} does not belong to this config")
            if tuple(value.shape) != expected[name]:
                raise ConversionError(
                    f"{path.name}: {key} has shape {tuple(value.shape)}, config says "
                    f"{expected[name]}"
                )
            if value.dtype not in _DTYPE_NAMES:
                raise ConversionError(
                    f"{path.name}: {key} has dtype {value.dtype}; only fp32/bf16/fp16"
                )
            out[name] = value
    if missing := sorted(expected.keys() - out.keys()):
        raise ConversionError(
            f"{hf_dir}: missing tensor {mlx_to_hf_key(missing[0])} ({len(missing)} missing)"
        )
    return out


def _is_replaceable(out_dir: Path) -> bool:
    """Only an absent folder, an empty one or an earlier conversion may be replaced."""
    if not out_dir.exists():
        return True
    earlier = {WEIGHTS_FILE, "weights.safetensors", CONFIG_FILE, MANIFEST_FILE, *TOKENIZER_FILES}
    # weights.safetensors: format 1
    return out_dir.is_dir() and {p.name for p in out_dir.iterdir()} <= earlier


def convert_hf_to_mlx(
    hf_dir: str | Path, out_dir: str | Path, dtype: str | mx.Dtype | None = None
) -> Path:
    """Convert a local HF Llama folder (safetensors) into an MLX conversion folder; returns out_dir.

    `dtype` (fp32/bf16/fp16) casts every tensor; None keeps the source dtype bit for bit.
    """
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    target = _normalise_dtype(dtype)
    cfg, args = _read_config(hf_dir)
    if not _is_replaceable(out_dir):
        raise ConversionError(
            f"{out_dir} exists and is not an ftcore conversion; refusing to overwrite it"
        )
    if blocker := file_in_the_way(out_dir.parent):
        raise ConversionError(
            f"{out_dir}: {blocker} is a file, not a folder, so the conversion cannot be "
            "written below it; choose an output folder outside it"
        )
    sources = _sources_fingerprint(hf_dir)  # taken first: a source edited meanwhile reads as stale
    weights = _load_hf_tensors(hf_dir, args)
    if target is not None:
        weights = {k: v.astype(target) for k, v in weights.items()}
        cfg["dtype"] = _DTYPE_NAMES[target]
        cfg.pop("torch_dtype", None)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        mx.save_safetensors(str(tmp / WEIGHTS_FILE), weights, metadata={"format": "mlx"})
        if target is None:
            shutil.copyfile(hf_dir / CONFIG_FILE, tmp / CONFIG_FILE)
        else:
            (tmp / CONFIG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")
        for name in TOKENIZER_FILES:
            if (hf_dir / name).is_file():
                shutil.copyfile(hf_dir / name, tmp / name)
        manifest = {
            "format_version": FORMAT_VERSION,
            "source_dir": str(hf_dir.resolve()),
            "dtype": _DTYPE_NAMES[target] if target is not None else None,
            "sources": sources,
            "weights_size": (tmp / WEIGHTS_FILE).stat().st_size,
            "keys": sorted(weights),
        }
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
        if out_dir.exists():  # an earlier (stale or broken) conversion: move aside, then delete
            old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def is_conversion_current(
    hf_dir: str | Path, out_dir: str | Path, dtype: str | mx.Dtype | None = None
) -> bool:
    """True only for a complete conversion of the current source files at this dtype."""
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    target = _normalise_dtype(dtype)
    try:
        manifest = json.loads((out_dir / MANIFEST_FILE).read_text())
        return (
            manifest.get("format_version") == FORMAT_VERSION
            and manifest.get("dtype") == (_DTYPE_NAMES[target] if target is not None else None)
            and (out_dir / CONFIG_FILE).is_file()
            and (out_dir / WEIGHTS_FILE).stat().st_size == manifest["weights_size"]
            and _safetensors_keys(out_dir / WEIGHTS_FILE) == set(manifest["keys"])
            and manifest["sources"] == _sources_fingerprint(hf_dir)
        )
    except (OSError, ValueError, KeyError, TypeError, ConversionError):
        return False


def cached_conversion(
    hf_dir: str | Path, cache_root: str | Path, dtype: str | mx.Dtype | None = None
) -> Path:
    """A current conversion of hf_dir under cache_root, reused when valid, redone otherwise."""
    hf_dir = Path(hf_dir)
    target = _normalise_dtype(dtype)
    tag = hashlib.sha256(str(hf_dir.resolve()).encode()).hexdigest()[:12]
    out_dir = Path(cache_root) / f"{hf_dir.name}-{tag}-{_DTYPE_NAMES.get(target, 'source')}"
    if is_conversion_current(hf_dir, out_dir, target):
        return out_dir
    return convert_hf_to_mlx(hf_dir, out_dir, target)


def convert_mlx_to_hf(mlx_dir: str | Path, out_dir: str | Path) -> Path:
    """Write `model.safetensors` + `config.json` with HF names, same dtype; returns out_dir."""
    mlx_dir, out_dir = Path(mlx_dir), Path(out_dir)
    src = mlx_dir / WEIGHTS_FILE
    if not src.is_file() or not (mlx_dir / CONFIG_FILE).is_file():
        raise ConversionError(
            f"{mlx_dir}: not an MLX conversion folder (needs {WEIGHTS_FILE}, {CONFIG_FILE})"
        )
    weights = {mlx_to_hf_key(k): v for k, v in mx.load(str(src)).items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".tmp-{uuid.uuid4().hex[:8]}.safetensors"  # mlx appends the suffix if absent
    try:
        # transformers refuses safetensors whose metadata lacks format "pt".
        mx.save_safetensors(str(tmp), weights, metadata={"format": "pt"})
        os.replace(tmp, out_dir / _SINGLE_FILE)
    finally:
        tmp.unlink(missing_ok=True)
    shutil.copyfile(mlx_dir / CONFIG_FILE, out_dir / CONFIG_FILE)
    return out_dir

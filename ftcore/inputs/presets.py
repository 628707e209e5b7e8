"""Model presets, offline checkpoint materialisation, and checks on local HF folders.

A preset becomes an ordinary HF checkpoint folder (config.json, model.safetensors, SentencePiece
tokenizer) in the cache: initialised with a fixed seed, with a tokenizer trained locally on the
built-in data, and for `tiny-pretrained` then pretrained on the built-in word tasks
(ftcore.inputs.pretrain, 1-2 minutes on 2 cores, once). Presets:
- `tiny-pretrained` (the default): TinyLlama's structure at width 128, pretrained; the fine-tune
  on the built-in data has a measurable effect (accuracy, eval loss).
- `tiny`: the same architecture, random init; for parity and speed work.
- `tinyllama-1.1b`: TinyLlama-1.1B's architecture exactly, random init (for real weights, --model).
The cache folder's name carries a fingerprint of everything that makes the checkpoint (config,
seeds, the synthetic data and pretraining code), so a changed recipe is never served stale.
Nothing here touches a model hub.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from ftcore.cache_dir import cache_root, file_in_the_way
from ftcore.config import RunConfig, UserError
from ftcore.inputs.checkpoint import check_checkpoint, read_config
from ftcore.inputs.tokenizer import (
    TOKENIZER_CORPUS,
    TOKENIZER_VOCAB,
    load_tokenizer,
    tokenizer_corpus,
    train_sentencepiece,
)

PRESET_INIT_SEED = 0  # weights of a preset are the same for every run seed

# HF LlamaConfig fields. `tinyllama-1.1b` is TinyLlama-1.1B-Chat-v1.0's architecture exactly.
_TINY = dict(
    vocab_size=TOKENIZER_VOCAB,
    hidden_size=128,
    intermediate_size=352,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,  # GQA, as TinyLlama (32 heads, 4 kv heads)
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=False,
)
PRESET_CONFIGS: dict[str, dict[str, Any]] = {
    "tiny-pretrained": _TINY,
    "tiny": _TINY,
    "tinyllama-1.1b": dict(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
    ),
}

PICKLE_WEIGHTS = ("pytorch_model*.bin", "*.pt", "*.pth", "*.ckpt")


def preset_config(preset: str, num_layers: int | None = None) -> dict[str, Any]:
    cfg = dict(PRESET_CONFIGS[preset])
    if num_layers is not None:
        if num_layers > cfg["num_hidden_layers"]:
            raise UserError(
                f"--num-layers {num_layers}: preset {preset} has only {cfg['num_hidden_layers']} "
                "layers"
            )
        cfg["num_hidden_layers"] = num_layers
    return cfg


def hf_llama_config(arch: dict[str, Any]) -> Any:
    """A transformers LlamaConfig from our flat preset dict (rope theta as rope_parameters)."""
    from transformers import LlamaConfig

    arch = dict(arch)
    theta = arch.pop("rope_theta")
    return LlamaConfig(
        **arch,
        rope_parameters={"rope_type": "default", "rope_theta": theta},
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
    )


# ----------------------------------------------------------------------------- checkpoints


PRETRAINED_PRESETS = ("tiny-pretrained",)  # pretrained while materialised (ftcore.inputs.pretrain)
# Checkpoints shipped as package data: made once by `ftcore pretrain`, identical on every machine.
SHIPPED_PRESETS = {
    "tiny-pretrained": Path(__file__).resolve().parents[1] / "presets" / "tiny-pretrained"
}


def preset_fingerprint(preset: str, arch: dict[str, Any]) -> str:
    """Hash of everything that makes the preset's checkpoint: its config, seeds, tokenizer settings
    and corpus, and for a pretrained preset the recipe, its data and its training code
    (ftcore.inputs.pretrain.recipe_inputs). It hashes what the recipe produces (text), not source
    files, so an edit that changes no data and no training code keeps the fingerprint."""
    from ftcore.inputs import pretrain

    h = hashlib.sha256()
    recipe = pretrain.PRETRAIN_RECIPE if preset in PRETRAINED_PRESETS else None
    h.update(
        json.dumps(
            [arch, PRESET_INIT_SEED, TOKENIZER_VOCAB, TOKENIZER_CORPUS, recipe], sort_keys=True
        ).encode()
    )
    h.update(tokenizer_corpus().encode())
    if recipe:
        h.update(pretrain.recipe_inputs().encode())
    return h.hexdigest()[:10]


def shipped_preset(preset: str, arch: dict[str, Any]) -> Path | None:
    """The checkpoint ftcore ships for this preset and architecture (package data, the same bytes
    on every machine), or None: none shipped, another depth, or made by another recipe than this
    code's (then it is made locally, with a notice; the test suite fails on such a mismatch)."""
    folder = SHIPPED_PRESETS.get(preset)
    made_file = folder / "ftcore_preset.json" if folder else None
    if made_file is None or not made_file.is_file():
        return None
    made = json.loads(made_file.read_text())
    if made["arch"] != arch:
        return None
    if made.get("fingerprint") != preset_fingerprint(preset, arch):
        print(f"ftcore: the shipped {preset} weights come from another recipe than this code's; "
              f"making the preset locally (rebuild the shipped copy: ftcore pretrain --out DIR)",
              file=sys.stderr, flush=True)
        return None
    return folder


def materialize_preset(
    preset: str, num_layers: int | None = None, root: Path | None = None
) -> Path:
    """The preset's HF checkpoint folder: the shipped one where there is one (shipped_preset),
    else made once (atomically, one maker at a time: a second process waits on a lock and reuses
    it) and reused from the cache."""
    arch = preset_config(preset, num_layers)
    if root is None and (shipped := shipped_preset(preset, arch)):
        return shipped
    name = f"{preset}-L{arch['num_hidden_layers']}-{preset_fingerprint(preset, arch)}"
    out = (root or cache_root()) / "models" / name
    if (out / "ftcore_preset.json").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    locks = out.parent.parent / "locks"
    locks.mkdir(exist_ok=True)
    with open(locks / f"{name}.lock", "a+") as lock:
        # released when the file closes, or the process dies
        wait_for_lock(lock, f"the {preset} preset")
        if not (out / "ftcore_preset.json").exists():
            build_preset(preset, arch, out)
    return out


def wait_for_lock(lock: Any, what: str) -> None:
    """flock(LOCK_EX) on the open file `lock`; while another process holds it, say so once (with
    its pid, which the holder writes into the file) and, on getting it, how long the wait took."""
    import time

    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "another process"
        print(
            f"ftcore: waiting for process {holder}, which is making {what}",
            file=sys.stderr,
            flush=True,
        )
        t0 = time.monotonic()
        fcntl.flock(lock, fcntl.LOCK_EX)
        print(
            f"ftcore: waited {time.monotonic() - t0:.0f} s for {what}", file=sys.stderr, flush=True
        )
    lock.seek(0)
    lock.truncate()
    lock.write(str(os.getpid()))
    lock.flush()


def build_preset(preset: str, arch: dict[str, Any], out: Path) -> None:
    """Make the preset's checkpoint in `out` (replaced whole, atomically): tokenizer, seeded init,
    and for a pretrained preset the pretraining (ftcore.inputs.pretrain); ftcore_preset.json records
    what ran and the fingerprint."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        import torch
        from transformers import LlamaForCausalLM

        train_sentencepiece(tmp)
        tok = load_tokenizer(tmp)
        if len(tok) > arch["vocab_size"]:
            raise RuntimeError(f"tokenizer has {len(tok)} tokens, model vocab {arch['vocab_size']}")
        tok.save_pretrained(str(tmp))  # adds tokenizer.json for fast loading
        torch.manual_seed(PRESET_INIT_SEED)
        model = LlamaForCausalLM(hf_llama_config(arch)).float()
        made: dict[str, Any] = {"preset": preset, "arch": arch, "init_seed": PRESET_INIT_SEED,
                                "fingerprint": preset_fingerprint(preset, arch)}
        if preset in PRETRAINED_PRESETS:
            from ftcore.inputs.pretrain import PRETRAIN_RECIPE, family_exact_match, pretrain

            print(f"ftcore: pretraining the {preset} preset ({PRETRAIN_RECIPE['steps']} steps, "
                  f"1-2 minutes on 2 cores) into {out}", file=sys.stderr, flush=True)
            made["pretraining"] = {"recipe": PRETRAIN_RECIPE, **pretrain(model, tok)}
            made["exact_match"] = family_exact_match(model, tok)
        model.save_pretrained(str(tmp), safe_serialization=True)
        (tmp / "ftcore_preset.json").write_text(json.dumps(made, indent=2) + "\n")
        if out.exists():  # a half-made folder from a killed run (the lock rules out a live maker)
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_model_dir(path: str | Path, allow_pickle: bool = False) -> Path:
    """Refuse, with one clear message, a folder ftcore cannot train: no config.json, not a Llama,
    no weights, only pickle weights (unless allowed), no tokenizer, or weights that fail
    ftcore.inputs.checkpoint's checks. Returns the resolved path."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise UserError(f"model folder not found: {p}")
    if not (p / "config.json").is_file():
        raise UserError(f"{p}: no config.json (not a Hugging Face model folder)")
    read_config(p)  # a Llama config ftcore can build, or one line saying why not
    if not list(p.glob("*.safetensors")):
        pickles = [f.name for pat in PICKLE_WEIGHTS for f in p.glob(pat)]
        if not pickles:
            raise UserError(f"{p}: no model weights (*.safetensors)")
        if not allow_pickle:
            raise UserError(
                f"{p}: only pickle weights ({', '.join(sorted(pickles))}); loading them can run "
                "arbitrary code - convert to safetensors or pass --allow-pickle"
            )
    if not ((p / "tokenizer.json").is_file() or (p / "tokenizer.model").is_file()):
        raise UserError(f"{p}: no tokenizer (tokenizer.json or tokenizer.model)")
    check_checkpoint(p, allow_pickle)  # every tensor present, shaped, finite
    return p


def resolve_model_dir(cfg: RunConfig) -> Path:
    """The checkpoint folder a run trains: --model if given, else the materialised preset. Both
    pass check_model_dir; a damaged preset says how to get a good one."""
    if cfg.model:
        return check_model_dir(cfg.model, cfg.allow_pickle)
    folder = materialize_preset(cfg.preset, cfg.num_layers)
    try:
        return check_model_dir(folder)
    except UserError as e:
        fix = ("reinstall ftcore" if folder in SHIPPED_PRESETS.values()
               else f"delete {folder} and run again: ftcore makes it anew")
        raise UserError(f"{e} (the {cfg.preset} preset is damaged: {fix})") from None


def check_preset_out(out: Path, replace: bool) -> None:
    """`ftcore pretrain --out`: an empty or new folder (or --replace), not below a file
    (UserError)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not replace:
        raise UserError(f"--out {out}: not an empty folder; pass --replace to rebuild it")
    if blocker := file_in_the_way(out):
        raise UserError(
            f"--out {out}: {blocker} is a file, not a folder; choose an --out outside it"
        )

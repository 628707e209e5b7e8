"""`ftcore generate`: greedy answers from a checkpoint (+ a trained adapter) in torch or MLX.

Both frameworks decode the same way: the prompt once, then one argmax token at a time with a KV
cache (transformers' `generate` for torch, ftcore.mlx.generate for MLX), until EOS or
--max-new-tokens, in fp32. The prompt is rendered in the format the adapter was trained with
(recorded in its folder: ftcore.inputs.records.PROMPT_FORMAT_FILE; `alpaca` without an adapter, or
as --prompt-format says): the Alpaca template (the instruction; --input adds the input section) or
the model's chat template with the generation prompt; --raw sends the prompt as it is.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftcore.config import UserError
from ftcore.inputs.arch import read_arch
from ftcore.inputs.records import read_prompt_format
from ftcore.inputs.token_rows import chat_template_problem, rendered_ids

# PEFT format (what ftcore writes)
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def read_adapter(adapter_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """A PEFT LoRA adapter folder -> (its config, its tensors as numpy); one-line errors."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    if not adapter_dir.is_dir():
        raise UserError(f"adapter folder not found: {adapter_dir}")
    missing = [n for n in ADAPTER_FILES if not (adapter_dir / n).is_file()]
    if missing:
        raise UserError(f"{adapter_dir}: not a PEFT adapter folder (no {', '.join(missing)})")
    try:
        config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
        tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    except (ValueError, UnicodeDecodeError, SafetensorError) as e:
        raise UserError(f"{adapter_dir}: unreadable adapter ({e})") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise UserError(
            f"{adapter_dir}: not a LoRA adapter (peft_type "
            f"{config.get('peft_type') if isinstance(config, dict) else None!r})"
        )
    # other scales / layers than y = Wx + (alpha/r) BAx
    if config.get("use_rslora") or config.get("use_dora"):
        raise UserError(f"{adapter_dir}: rsLoRA and DoRA adapters are not supported")
    return config, tensors


def check_adapter(
    config: dict[str, Any], tensors: dict[str, Any], arch: dict[str, Any], adapter_dir: Path,
    model_dir: Path,
) -> None:
    """Refuse an adapter that would decode garbage or silently act as the base model: non-finite
    or exploded weights (ftcore.run.training_health.EXPLODED), an unusable scale, a LoRA tensor
    that does not match the model (a layer it lacks, or another shape: an adapter of another
    model), or a target module of some layer without its lora_A / lora_B (a partial adapter):
    check_adapter_fits."""
    import numpy as np

    from ftcore.run.training_health import EXPLODED, largest_weight, nonfinite

    if bad := nonfinite(tensors):
        raise UserError(
            f"{adapter_dir}: {bad[0]} holds NaN or Inf ({len(bad)} tensor(s)); the adapter is "
            "broken"
        )
    name, biggest = largest_weight(tensors)
    if biggest > EXPLODED:  # a diverged fine-tune's: it would decode an empty answer
        raise UserError(
            f"{adapter_dir}: {name} holds |w| = {biggest:.3g} (> {EXPLODED:g}); the fine-tune "
            "that wrote it diverged"
        )
    alpha, rank = config.get("lora_alpha"), config.get("r")
    if not (
        isinstance(alpha, int | float)
        and isinstance(rank, int)
        and rank > 0
        and np.isfinite(alpha / rank)
        and abs(alpha / rank) < 1e6
    ):
        raise UserError(
            f"{adapter_dir}: lora_alpha {alpha!r} / r {rank!r} in adapter_config.json is not a "
            "usable scale"
        )
    check_adapter_fits(config, tensors, arch, adapter_dir, model_dir)


def check_adapter_fits(
    config: dict[str, Any], tensors: dict[str, Any], arch: dict[str, Any], adapter_dir: Path,
    model_dir: Path,
) -> None:
    """Each LoRA tensor of a layer the model has, in the shape its linear and r give (else: an
    adapter of another model, named by the tensor, found vs expected shape), and every target
    module of every layer (else: a partial adapter, or a shallower model's when whole layers from
    some k on are absent)."""
    from ftcore.inputs.arch import linear_shapes, module_path

    rank, layers, shapes = config["r"], arch["num_hidden_layers"], linear_shapes(arch)
    base = config.get("base_model_name_or_path")
    other = f"an adapter of another model{f' ({base})' if base else ''}"
    for key, w in sorted(tensors.items()):
        # e.g. base_model.model.model.layers.3.mlp.down_proj.lora_A.weight:
        # A is (r, in), B is (out, r)
        m = re.search(r"model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$", key)
        if not m or m[2] not in shapes:
            continue
        if int(m[1]) >= layers:
            raise UserError(
                f"{adapter_dir}: does not match {model_dir}: it holds {key} (layer {m[1]}), the "
                f"model has {layers} layers; {other}"
            )
        fan_in, fan_out = shapes[m[2]]
        want, r_at = ((rank, fan_in), 0) if m[3] == "A" else ((fan_out, rank), 1)
        if tuple(w.shape) == want:
            continue
        # the folder disagrees with itself, whatever the model
        if w.ndim == 2 and w.shape[r_at] != rank:
            raise UserError(
                f"{adapter_dir}: {key} is {tuple(w.shape)}, of rank {w.shape[r_at]}, but its "
                f"adapter_config.json says r {rank}; the folder's weights and config disagree"
            )
        raise UserError(
            f"{adapter_dir}: does not match {model_dir}: {key} is {tuple(w.shape)}, the model's "
            f"{m[2]} needs {want}; {other}"
        )
    targets = sorted(config.get("target_modules") or ())
    missing = [f"{module_path(i, t)}.{ab}"
               for i in range(layers) for t in targets for ab in ("lora_A", "lora_B")
               if not any(k.endswith(f"{module_path(i, t)}.{ab}.weight") for k in tensors)]
    held = {i for i in range(layers) if any(f"model.layers.{i}." in k for k in tensors)}
    # whole layers 0..k-1: a shallower model's
    if missing and held and max(held) + 1 == len(held) < layers:
        raise UserError(
            f"{adapter_dir}: does not match {model_dir}: it holds LoRA tensors for {len(held)} "
            f"layers, the model has {layers}; {other}"
        )
    if missing:
        raise UserError(
            f"{adapter_dir}: lacks {len(missing)} LoRA tensor(s) its config names, e.g. "
            f"{', '.join(missing[:3])}; a partial adapter would leave those layers as the base "
            "model"
        )


def check_finite(logits: Any, backend: str) -> None:
    """A forward pass whose next-token logits are not all finite cannot give an answer."""
    import numpy as np

    if not np.isfinite(np.asarray(logits, dtype=np.float32)).all():
        raise UserError(f"{backend}: the model's logits are NaN or Inf for this prompt; no answer "
                        "(the checkpoint or adapter is broken)")


def prompt_ids(
    tokenizer: Any, prompt: str, input_text: str, raw: bool, prompt_format: str = "alpaca"
) -> list[int]:
    """The prompt's token ids as training rendered them (the prompt half of rendered_ids); --raw:
    the text as it is."""
    if raw:
        return list(tokenizer(prompt)["input_ids"])
    record = {"instruction": prompt, "input": input_text, "output": ""}
    return list(rendered_ids([record], tokenizer, prompt_format)[0][0])


def resolve_prompt_format(adapter: Path | None, asked: str | None) -> str:
    """The adapter's recorded format; --prompt-format may only repeat it (another format would
    ask the adapter something it was not trained on)."""
    trained = read_prompt_format(adapter) if adapter is not None else None
    if asked and trained and asked != trained:
        raise UserError(
            f"--prompt-format {asked}: {adapter} was trained with --prompt-format {trained}"
        )
    return asked or trained or "alpaca"


def generate_torch(
    model_dir: Path, adapter: Path | None, prompts: list[list[int]], max_new: int, eos: int
) -> list[list[int]]:
    import torch
    from transformers import LlamaForCausalLM

    from ftcore.torch.generate import greedy

    model = LlamaForCausalLM.from_pretrained(
        str(model_dir), dtype=torch.float32, local_files_only=True
    )
    if adapter is not None:
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(model, str(adapter))
        except (ValueError, RuntimeError, KeyError) as e:  # shapes or modules of another model
            why = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
            why = why if len(why) <= 400 else why[:400].rsplit(" ", 1)[0] + " ..."
            raise UserError(
                f"{adapter}: does not fit {model_dir} ({type(e).__name__}: {why})"
            ) from None
    for ids in prompts:
        with torch.no_grad():
            check_finite(
                model(input_ids=torch.tensor([ids])).logits[0, -1].float().numpy(), "torch"
            )
    return [greedy(model, ids, max_new, eos) for ids in prompts]


def generate_mlx(
    model_dir: Path, adapter: Path | None, prompts: list[list[int]], max_new: int, eos: int
) -> list[list[int]]:
    import mlx.core as mx

    from ftcore.cache_dir import cache_root
    from ftcore.mlx.adapters import peft_to_mlx_adapter
    from ftcore.mlx.convert import ConversionError, cached_conversion
    from ftcore.mlx.generate import greedy
    from ftcore.mlx.lora import apply_lora, load_lora_state, lora_state
    from ftcore.mlx.model import load_model

    try:
        model, _ = load_model(cached_conversion(model_dir, cache_root() / "mlx", "float32"))
        if adapter is not None:
            config, tensors = read_adapter(adapter)
            targets = tuple(sorted(config.get("target_modules") or ()))
            apply_lora(model, targets, int(config["r"]), float(config["lora_alpha"]), 0.0)
            state = peft_to_mlx_adapter(tensors)
            expected = lora_state(model)
            if set(state) != set(expected) or any(
                state[k].shape != expected[k].shape for k in state
            ):
                raise UserError(
                    f"{adapter}: its tensors do not fit {model_dir} (names or shapes differ)"
                )
            load_lora_state(model, {k: v.astype(mx.float32) for k, v in state.items()})
    except ConversionError as e:
        raise UserError(str(e)) from None
    for ids in prompts:
        check_finite(model(mx.array([ids]), None)[0, -1].astype(mx.float32), "mlx")
    return [greedy(model, ids, max_new, eos) for ids in prompts]


GENERATORS = {"torch": generate_torch, "mlx": generate_mlx}


@dataclass(frozen=True)
class Prompting:
    """How a prompt becomes token ids: the --input text, --raw (no template), --prompt-format."""

    input_text: str = ""
    raw: bool = False
    prompt_format: str | None = None  # None: the adapter's own (ftcore.inputs.records)


def generate(model_dir: Path, adapter: Path | None, backend: str, prompts: list[str],
             max_new_tokens: int = 64, how: Prompting = Prompting()) -> list[dict[str, Any]]:
    """Per prompt {"backend", "prompt", "tokens" (new token ids, EOS kept), "text" (decoded, EOS
    dropped)}; the model loads once."""
    input_text, raw, prompt_format = how.input_text, how.raw, how.prompt_format
    from ftcore.inputs.tokenizer import load_tokenizer

    if max_new_tokens < 1:
        raise UserError("--max-new-tokens: must be >= 1")
    arch = read_arch(model_dir)
    config: dict[str, Any] = {}
    if adapter is not None:  # a bad folder is one line, before any model loads
        config, tensors = read_adapter(adapter)
        check_adapter(config, tensors, arch, adapter, model_dir)
    fmt = resolve_prompt_format(adapter, prompt_format)
    tokenizer = load_tokenizer(model_dir)
    if fmt == "chat" and not raw and (why := chat_template_problem(tokenizer)):
        # trained on chat prompts (resolve_prompt_format): alpaca is no way out
        if adapter is not None:
            base = config.get("base_model_name_or_path")
            raise UserError(
                f"{adapter} was trained with --prompt-format chat, and {model_dir} {why}: give the "
                f"--model it was trained on{f' ({base})' if base else ''}, whose chat template "
                "renders its prompts, or --raw with the prompt written out as that template "
                "renders it"
            )
        raise UserError(f"--prompt-format chat: {model_dir} {why}; use --prompt-format alpaca")
    ids = [prompt_ids(tokenizer, p, input_text, raw, fmt) for p in prompts]
    limit = arch.get("max_position_embeddings")
    if limit and (longest := max(map(len, ids))) + max_new_tokens > limit:
        raise UserError(
            f"a prompt of {longest} tokens + --max-new-tokens {max_new_tokens} exceeds the model's "
            f"{limit} positions (max_position_embeddings); shorten the prompt"
        )
    eos = int(tokenizer.eos_token_id)
    answers = GENERATORS[backend](model_dir, adapter, ids, max_new_tokens, eos)
    return [
        {"backend": backend, "prompt": p, "tokens": t,
         "text": tokenizer.decode(t, skip_special_tokens=True)}
        for p, t in zip(prompts, answers, strict=True)
    ]

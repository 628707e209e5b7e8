"""`ftcore generate`: greedy answers from a checkpoint (+ a trained LoRA / DoRA adapter; a full
fine-tune's RUN/<backend>/model is a checkpoint) in torch or MLX.

Both frameworks decode the same way: the prompt once, then one argmax token at a time with a KV
cache (transformers' `generate` for torch, ftcore.mlx.generate for MLX), until EOS or
--max-new-tokens, in fp32. The prompt is rendered in the format the fine-tune was trained with
(recorded in the adapter's folder, or a full fine-tune's model folder:
ftcore.inputs.records.PROMPT_FORMAT_FILE; `alpaca` without a record, or as --prompt-format says):
the Alpaca template (the instruction; --input adds the input section) or the model's chat template
with the generation prompt; --raw sends the prompt as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftcore.config import UserError
from ftcore.inputs.arch import read_arch
from ftcore.inputs.records import PROMPT_FORMAT_FILE, read_prompt_format
from ftcore.inputs.token_rows import chat_template_problem, rendered_ids
from ftcore.run.adapter_checks import check_adapter, read_adapter


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


def resolve_prompt_format(adapter: Path | None, asked: str | None, model_dir: Path | None = None,
                          ) -> str:  # fmt: skip
    """The adapter's recorded format (without an adapter: a full fine-tune's, recorded in its
    model folder); --prompt-format may only repeat it (another format would ask the fine-tune
    something it was not trained on)."""
    if adapter is None and model_dir is not None and (model_dir / PROMPT_FORMAT_FILE).is_file():
        adapter = model_dir  # a full fine-tune's checkpoint (RUN/<backend>/model)
    trained = read_prompt_format(adapter) if adapter is not None else None
    if asked and trained and asked != trained:
        raise UserError(
            f"--prompt-format {asked}: {adapter} was trained with --prompt-format {trained}"
        )
    return asked or trained or "alpaca"


def torch_model(model_dir: Path, adapter: Path | None):
    """transformers' Llama in fp32 (+ the adapter through PEFT), as generate_torch decodes."""
    import torch
    from transformers import LlamaForCausalLM

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
    return model.eval()


def generate_torch(
    model_dir: Path, adapter: Path | None, prompts: list[list[int]], max_new: int, eos: int
) -> list[list[int]]:
    import torch

    from ftcore.torch.generate import greedy

    model = torch_model(model_dir, adapter)
    for ids in prompts:
        with torch.no_grad():
            check_finite(
                model(input_ids=torch.tensor([ids])).logits[0, -1].float().numpy(), "torch"
            )
    return [greedy(model, ids, max_new, eos) for ids in prompts]


def mlx_model(model_dir: Path, adapter: Path | None):
    """ftcore's MLX Llama in fp32 on the cached conversion of model_dir (+ the PEFT adapter as
    ftcore's LoRALinear, or DoRALinear when its config says use_dora), as generate_mlx decodes."""
    import mlx.core as mx

    from ftcore.cache_dir import cache_root
    from ftcore.mlx.adapters import peft_to_mlx_adapter
    from ftcore.mlx.convert import ConversionError, cached_conversion
    from ftcore.mlx.lora import apply_lora, load_lora_state, lora_state
    from ftcore.mlx.model import load_model

    try:
        model, _ = load_model(cached_conversion(model_dir, cache_root() / "mlx", "float32"))
        if adapter is not None:
            config, tensors = read_adapter(adapter)
            targets = tuple(sorted(config.get("target_modules") or ()))
            apply_lora(model, targets, int(config["r"]), float(config["lora_alpha"]), 0.0,
                       dora=bool(config.get("use_dora")))  # fmt: skip
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
    return model


def generate_mlx(
    model_dir: Path, adapter: Path | None, prompts: list[list[int]], max_new: int, eos: int
) -> list[list[int]]:
    import mlx.core as mx

    from ftcore.mlx.generate import greedy

    model = mlx_model(model_dir, adapter)
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
    fmt = resolve_prompt_format(adapter, prompt_format, model_dir)
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

"""The input pipeline's second stage: records -> token rows, the same for every backend (the prompt
template rendered and tokenised, labels masked on the prompt when masking, EOS appended, truncated
to max_seq_len). Stage one (ftcore.inputs.records) gives it the run's records; stage three
(ftcore.inputs.batching, ftcore.inputs.batches) packs, orders and pads its rows into batches."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ftcore.config import RunConfig, UserError
from ftcore.inputs.loss_contract import IGNORE_INDEX
from ftcore.inputs.records import (
    chat_messages,
    format_prompt,
)


@dataclass
class Tokenized:
    # prompt + response + EOS (alpaca) or the rendered chat, truncated to max_seq_len
    ids: list[list[int]]
    labels: list[list[int]]  # ids with IGNORE_INDEX on the prompt (when masking)
    dropped: int  # records left with no loss token after truncation
    prompt_lens: list[int] = field(default_factory=list)  # tokens of each kept record's prompt
    # the whole response + EOS fit in max_seq_len
    complete: list[bool] = field(default_factory=list)
    # packed rows only (pack_tokenized): each token's position in its own record, 0 at its start
    positions: list[list[int]] | None = None
    keeps_all_at: int = 0  # the smallest max_seq_len at which no record is dropped (0: none was)
    prompt_only: int = 0  # kept records none of whose answer fits (they train on prompt text only)
    # each kept record's length before truncation
    full_lens: list[int] = field(default_factory=list)


CHAT_TEMPLATE_PLACES = "chat_template in tokenizer_config.json, or chat_template.jinja"


def chat_template_problem(tokenizer: Any) -> str | None:
    """Why `tokenizer` cannot render --prompt-format chat, or None: it has no chat template, or a
    blank one (empty or whitespace, which renders no turn, so no record would keep a loss token)."""
    template = getattr(tokenizer, "chat_template", None)
    if template is None:
        return f"has no chat template ({CHAT_TEMPLATE_PLACES})"
    if not template or (isinstance(template, str) and not template.strip()):
        return (
            "has a blank chat template (empty or whitespace: it renders nothing; "
            f"{CHAT_TEMPLATE_PLACES})"
        )
    return None


def template_length(tokenizer: Any, prompt_format: str = "alpaca") -> int:
    """Tokens the bare prompt takes (empty instruction, no input), BOS or chat markers included."""
    empty = {"instruction": "", "input": "", "output": ""}
    return len(rendered_ids([empty], tokenizer, prompt_format)[0][0])


def rendered_ids(
    records: list[dict[str, str]], tokenizer: Any, prompt_format: str
) -> tuple[list, list]:
    """(prompt ids, full ids) per record, each in two batched calls. alpaca: tokenizer(prompt),
    tokenizer(prompt + output) + EOS, the prompt's token count marking where the loss starts, as
    in Stanford Alpaca's preprocessing. chat: tokenizer.apply_chat_template on the user turn with
    the generation prompt, and on user + assistant, exactly as rendered (the template places BOS
    and EOS); the first must be a prefix of the second."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise UserError("the tokenizer defines no EOS token")
    if prompt_format == "alpaca":
        prompts = [format_prompt(r) for r in records]
        prompt_ids = tokenizer(prompts)["input_ids"]
        fulls = tokenizer([pr + r["output"] for pr, r in zip(prompts, records, strict=True)])[
            "input_ids"
        ]
        return prompt_ids, [list(f) + [eos] for f in fulls]
    import jinja2

    model_dir = tokenizer.name_or_path  # the folder load_tokenizer read
    if why := chat_template_problem(tokenizer):
        raise UserError(f"--prompt-format chat: {model_dir} {why}; use --prompt-format alpaca")
    try:
        prompt_ids = tokenizer.apply_chat_template(
            [chat_messages(r, False) for r in records], add_generation_prompt=True, tokenize=True
        )["input_ids"]
        full_ids = tokenizer.apply_chat_template(
            [chat_messages(r) for r in records], tokenize=True
        )["input_ids"]
    # a syntax error, the template's raise_exception(...), an undefined name
    except jinja2.TemplateError as e:
        line = f" at line {e.lineno}" if getattr(e, "lineno", None) else ""
        what = " ".join(str(getattr(e, "message", None) or e).split())
        raise UserError(
            f"--prompt-format chat: the chat template of {model_dir} fails to render "
            f"({type(e).__name__}{line}: {what}); fix it ({CHAT_TEMPLATE_PLACES}) or use "
            "--prompt-format alpaca"
        ) from None
    for p, f in zip(prompt_ids, full_ids, strict=True):
        if list(f[: len(p)]) != list(p):
            raise UserError(
                "--prompt-format chat: the chat template renders the prompt differently inside the "
                "whole conversation, so the answer's start is unknown; use --prompt-format alpaca"
            )
    return prompt_ids, full_ids


def tokenize_records(
    records: list[dict[str, str]], tokenizer: Any, max_seq_len: int, mask_prompt: bool,
    prompt_format: str = "alpaca",
) -> Tokenized:
    """Records rendered in `prompt_format` (rendered_ids), truncated to max_seq_len; labels with
    IGNORE_INDEX on the prompt when masking. A record is complete when its answer's EOS fits."""
    if not records:
        return Tokenized([], [], 0, [], [])
    eos = tokenizer.eos_token_id
    prompt_ids, full_ids = rendered_ids(records, tokenizer, prompt_format)
    ids_out, labels_out, dropped, prompt_lens, complete, full_lens = [], [], 0, [], [], []
    keeps_all_at = prompt_only = 0
    for p_ids, f_ids in zip(prompt_ids, full_ids, strict=True):
        ids = list(f_ids)[:max_seq_len]
        whole = eos in ids[len(p_ids) :]
        labels = list(ids)
        if mask_prompt:
            n = min(len(p_ids), len(ids))
            labels[:n] = [IGNORE_INDEX] * n
        # position 0 is never a target (labels shift by one), so a loss token must sit at >= 1
        if all(t == IGNORE_INDEX for t in labels[1:]):
            dropped += 1
            # one answer token
            keeps_all_at = max(keeps_all_at, len(p_ids) + 1 if mask_prompt else 2)
            continue
        prompt_only += len(ids) <= len(p_ids)
        ids_out.append(ids)
        labels_out.append(labels)
        prompt_lens.append(len(p_ids))
        complete.append(whole)
        full_lens.append(len(f_ids))
    return Tokenized(ids_out, labels_out, dropped, prompt_lens, complete, keeps_all_at=keeps_all_at,
                     prompt_only=prompt_only, full_lens=full_lens)


def pad_id_of(tokenizer: Any) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if tid is not None:
            return int(tid)
    return 0


def token_rows_for(train: list[dict[str, str]], evals: list[dict[str, str]], tokenizer: Any,
                   cfg: RunConfig) -> tuple[Tokenized, Tokenized]:
    """Stage two: the run's training and eval records as token rows, refused in one line when the
    prompt template leaves no room, every eval record is dropped, or too few training ones
    remain."""
    t_len = template_length(tokenizer, cfg.prompt_format)
    if cfg.max_seq_len <= t_len:
        raise UserError(
            f"--max-seq-len {cfg.max_seq_len} is shorter than the prompt template ({t_len} tokens)"
        )
    train_tok = tokenize_records(
        train, tokenizer, cfg.max_seq_len, cfg.mask_prompt, cfg.prompt_format
    )
    eval_tok = tokenize_records(
        evals, tokenizer, cfg.max_seq_len, cfg.mask_prompt, cfg.prompt_format
    )
    if cfg.eval_samples > 0 and evals and not eval_tok.ids:
        raise UserError(
            f"--eval-samples {cfg.eval_samples}: all {len(evals)} eval records are dropped (no "
            f"answer token fits in --max-seq-len {cfg.max_seq_len}); --max-seq-len "
            f"{eval_tok.keeps_all_at} keeps them, or --eval-samples 0"
        )
    if len(train_tok.ids) < cfg.step_rows:
        raise UserError(
            f"only {len(train_tok.ids)} training records keep a loss token at --max-seq-len "
            f"{cfg.max_seq_len} ({train_tok.dropped} dropped); need at least "
            f"{cfg.step_rows_text}"
        )
    return train_tok, eval_tok

"""Alpaca data pipeline, the same for every backend.

records (ftcore.inputs.records: instruction, input, output) -> Alpaca prompt + response + EOS -> token ids, labels with
-100 on prompt (when masking) and padding -> numpy batches. Every backend consumes the
byte-identical arrays; their sha256 fingerprint goes into every result.

Batching (RunConfig.batching, ftcore.inputs.batching): `padded` (every row at max_seq_len), `longest`
(mlx-lm's trainer: sorted by length, consecutive batches in a seeded order, each padded to
1 + 32 * ceil(longest / 32)) or `packed` (several records per row, first-fit-decreasing, with
`position_ids` restarting at 0 for each record, from which every backend builds the per-document
causal mask), for training and eval batches alike (eval batches keep their order). Batches of one
run may then differ in width: `Batches.step(s)` gives step s at its own width.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ftcore.config import RunConfig, UserError
from ftcore.inputs import length_profile
from ftcore.inputs.batching import (
    batch_width,
    epoch_steps,
    longest_order,
    pack_rows,
    padded_order,
    steps_per_epoch,
)
from ftcore.inputs.loss_contract import IGNORE_INDEX, target_count
from ftcore.inputs.records import (
    SYNTHETIC_SIZE,
    chat_messages,
    format_prompt,
    load_records,
    select_records,
)

# ----------------------------------------------------------------------------- tokenising


@dataclass
class Tokenized:
    ids: list[list[int]]  # prompt + response + EOS (alpaca) or the rendered chat, truncated to max_seq_len
    labels: list[list[int]]  # ids with IGNORE_INDEX on the prompt (when masking)
    dropped: int  # records left with no loss token after truncation
    prompt_lens: list[int] = field(default_factory=list)  # tokens of each kept record's prompt
    complete: list[bool] = field(default_factory=list)  # the whole response + EOS fit in max_seq_len
    # packed rows only (pack_tokenized): each token's position in its own record, 0 at its start
    positions: list[list[int]] | None = None


def template_length(tokenizer: Any, prompt_format: str = "alpaca") -> int:
    """Tokens the bare prompt takes (empty instruction, no input), BOS or chat markers included."""
    empty = {"instruction": "", "input": "", "output": ""}
    return len(rendered_ids([empty], tokenizer, prompt_format)[0][0])


def rendered_ids(records: list[dict[str, str]], tokenizer: Any, prompt_format: str) -> tuple[list, list]:
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
        fulls = tokenizer([pr + r["output"] for pr, r in zip(prompts, records, strict=True)])["input_ids"]
        return prompt_ids, [list(f) + [eos] for f in fulls]
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("--prompt-format chat: the tokenizer has no chat template; use --prompt-format alpaca")
    prompt_ids = tokenizer.apply_chat_template([chat_messages(r, False) for r in records],
                                               add_generation_prompt=True, tokenize=True)["input_ids"]
    full_ids = tokenizer.apply_chat_template([chat_messages(r) for r in records], tokenize=True)["input_ids"]
    for p, f in zip(prompt_ids, full_ids, strict=True):
        if list(f[: len(p)]) != list(p):
            raise UserError("--prompt-format chat: the chat template renders the prompt differently inside the "
                            "whole conversation, so the answer's start is unknown; use --prompt-format alpaca")
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
    ids_out, labels_out, dropped, prompt_lens, complete = [], [], 0, [], []
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
            continue
        ids_out.append(ids)
        labels_out.append(labels)
        prompt_lens.append(len(p_ids))
        complete.append(whole)
    return Tokenized(ids_out, labels_out, dropped, prompt_lens, complete)


def pad_id_of(tokenizer: Any) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if tid is not None:
            return int(tid)
    return 0


def pack_tokenized(tok: Tokenized, capacity: int) -> Tokenized:
    """Records -> packed rows (ftcore.inputs.batching.pack_rows): ids and labels concatenated, each
    record's first label IGNORE_INDEX (the previous record's last token must not predict it; alone,
    position 0 is never a target either), positions restarting at 0 for each record."""
    rows = pack_rows([len(ids) for ids in tok.ids], capacity)
    ids = [[t for i in row for t in tok.ids[i]] for row in rows]
    labels = [[IGNORE_INDEX if k == 0 else y for i in row for k, y in enumerate(tok.labels[i])] for row in rows]
    positions = [[k for i in row for k in range(len(tok.ids[i]))] for row in rows]
    return Tokenized(ids, labels, tok.dropped, positions=positions)


def pad_rows(tok: Tokenized, rows: list[int], width: int, pad_id: int) -> dict[str, np.ndarray]:
    """Right-padded (len(rows), width) int64 arrays for the given example indices; packed rows
    also get `position_ids` (0 on padding)."""
    n = len(rows)
    input_ids = np.full((n, width), pad_id, dtype=np.int64)
    labels = np.full((n, width), IGNORE_INDEX, dtype=np.int64)
    mask = np.zeros((n, width), dtype=np.int64)
    positions = np.zeros((n, width), dtype=np.int64)
    for r, i in enumerate(rows):
        k = len(tok.ids[i])
        input_ids[r, :k] = tok.ids[i]
        labels[r, :k] = tok.labels[i]
        mask[r, :k] = 1
        if tok.positions is not None:
            positions[r, :k] = tok.positions[i]
    out = {"input_ids": input_ids, "labels": labels, "attention_mask": mask}
    if tok.positions is not None:
        out["position_ids"] = positions
    return out


# ----------------------------------------------------------------------------- batches


@dataclass
class Batches:
    """What every backend trains and evaluates on.

    train[k]: (steps, batch, width) int64 for k in input_ids / labels / attention_mask (and
    position_ids when packed: `row_keys`), width the widest step's; train["widths"]: (steps,) each step's own width. Step s is `step(s)`:
    train[k][s, :, :widths[s]] (the columns past it are padding). eval: list of dicts of
    (<=batch, width) arrays.
    answers: the eval records whose whole response fits, for greedy generation and exact-match
    accuracy: prompt_ids (n, P) and answer_ids (n, A) int64 padded with -1, prompt_len and
    answer_len (n,); an answer is the response's tokens plus EOS.
    """

    train: dict[str, np.ndarray]
    eval: list[dict[str, np.ndarray]]
    stats: dict[str, Any] = field(default_factory=dict)
    answers: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def row_keys(self) -> tuple[str, ...]:
        """The per-token arrays of a batch: position_ids too when the rows are packed."""
        keys = ("input_ids", "labels", "attention_mask")
        return (*keys, "position_ids") if "position_ids" in self.train else keys

    @property
    def fingerprint(self) -> str:
        h = hashlib.sha256()
        keys = self.row_keys
        parts = [(self.train, (*keys, "widths")), *((p, keys) for p in self.eval), (self.answers, sorted(self.answers))]
        for part, names in parts:
            for k in names:
                a = np.ascontiguousarray(part[k], dtype=np.int64)
                h.update(k.encode())
                h.update(str(a.shape).encode())
                h.update(a.tobytes())
        return h.hexdigest()[:16]

    def answer_items(self) -> list[tuple[list[int], list[int]]]:
        """(prompt token ids, expected answer token ids ending with EOS) per answerable eval record."""
        a = self.answers
        if not a:
            return []
        return [
            (a["prompt_ids"][i, : a["prompt_len"][i]].tolist(), a["answer_ids"][i, : a["answer_len"][i]].tolist())
            for i in range(len(a["prompt_len"]))
        ]

    def step(self, s: int) -> dict[str, np.ndarray]:
        """Step s's (batch, width) arrays at that step's own width."""
        width = int(self.train["widths"][s])
        return {k: self.train[k][s, :, :width] for k in self.row_keys}

    def step_tokens(self, first: int = 0, stop: int | None = None) -> dict[str, int]:
        """Over steps [first, stop): `padded` positions fed (batch x width, what the step
        computes on), `real` (non-pad) tokens and `loss` tokens (targets the loss is taken over)."""
        widths = self.train["widths"][first:stop]
        rows = self.train["input_ids"].shape[1]
        return {
            "padded": int(widths.sum()) * rows,
            "real": int(self.train["attention_mask"][first:stop].sum()),
            "loss": target_count(self.train["labels"][first:stop]),
        }

    def save(self, path: str | Path) -> None:
        arrays = {f"train_{k}": v for k, v in self.train.items()}
        for i, b in enumerate(self.eval):
            arrays.update({f"eval{i}_{k}": v for k, v in b.items()})
        arrays.update({f"answers_{k}": v for k, v in self.answers.items()})
        arrays["stats"] = np.frombuffer(json.dumps(self.stats).encode(), dtype=np.uint8)
        np.savez(path, **arrays)

    @classmethod
    def load(cls, path: str | Path) -> Batches:
        with np.load(path) as z:
            train = {k[len("train_") :]: z[k] for k in z.files if k.startswith("train_")}
            n_eval = len({k.split("_")[0] for k in z.files if k.startswith("eval")})
            evals = [{k[len(f"eval{i}_") :]: z[k] for k in z.files if k.startswith(f"eval{i}_")} for i in range(n_eval)]
            answers = {k[len("answers_") :]: z[k] for k in z.files if k.startswith("answers_")}
            stats = json.loads(z["stats"].tobytes().decode())
        return cls(train=train, eval=evals, stats=stats, answers=answers)


def build_batches(cfg: RunConfig, tokenizer: Any, records: list[dict[str, str]] | None = None) -> Batches:
    """Records -> subset/split by seed -> tokens -> `cfg.steps` training batches + eval batches,
    batched as cfg.batching says (module docstring)."""
    if records is None:
        records = load_records(cfg.data, seed=cfg.seed)
    if records is None:  # the built-in Alpaca-length profile: lengths in the model's tokens
        def tokens(r: dict[str, str]) -> int:  # prompt + response + EOS
            return len(tokenizer(format_prompt(r) + r["output"])["input_ids"]) + 1

        records = length_profile.alpaca_length_records(tokens, SYNTHETIC_SIZE, seed=cfg.seed)
    t_len = template_length(tokenizer, cfg.prompt_format)
    if cfg.max_seq_len <= t_len:
        raise UserError(
            f"--max-seq-len {cfg.max_seq_len} is shorter than the prompt template ({t_len} tokens)"
        )
    train_recs, eval_recs = select_records(records, cfg.num_samples, cfg.eval_samples, cfg.seed)
    train_tok = tokenize_records(train_recs, tokenizer, cfg.max_seq_len, cfg.mask_prompt, cfg.prompt_format)
    eval_tok = tokenize_records(eval_recs, tokenizer, cfg.max_seq_len, cfg.mask_prompt, cfg.prompt_format)
    n = len(train_tok.ids)
    if n < cfg.batch_size:
        raise UserError(
            f"only {n} training records keep a loss token at --max-seq-len {cfg.max_seq_len} "
            f"({train_tok.dropped} dropped); need at least --batch-size {cfg.batch_size}"
        )
    packed = cfg.batching == "packed"
    # the units batches are cut from: records, or packed rows of records
    units = pack_tokenized(train_tok, cfg.max_seq_len) if packed else train_tok
    eval_units = pack_tokenized(eval_tok, cfg.max_seq_len) if packed else eval_tok
    if len(units.ids) < cfg.batch_size:
        raise UserError(
            f"the {n} training records pack into {len(units.ids)} rows of --max-seq-len {cfg.max_seq_len}; "
            f"need at least --batch-size {cfg.batch_size} rows (more --num-samples, or a smaller --batch-size)"
        )
    pad_id = pad_id_of(tokenizer)
    lengths = [len(ids) for ids in units.ids]
    if cfg.epochs is not None:  # whole passes instead of --steps; the caller takes the steps from here
        cfg = cfg.replace(steps=epoch_steps(cfg.epochs, len(lengths), cfg.batch_size, cfg.batching))
    if cfg.batching == "padded":
        order = padded_order(len(lengths), cfg.batch_size, cfg.steps, cfg.seed)
    else:
        order = longest_order(lengths, cfg.batch_size, cfg.steps, cfg.seed)
    widths = [batch_width([lengths[i] for i in rows], cfg.max_seq_len, cfg.batching) for rows in order]
    train = pad_rows(units, [i for rows in order for i in rows], max(widths), pad_id)
    train = {k: v.reshape(cfg.steps, cfg.batch_size, max(widths)) for k, v in train.items()}
    train["widths"] = np.array(widths, dtype=np.int64)
    n_eval = len(eval_units.ids)
    eval_rows = [list(range(i, min(i + cfg.batch_size, n_eval))) for i in range(0, n_eval, cfg.batch_size)]
    evals = [
        pad_rows(eval_units, rows, batch_width([len(eval_units.ids[i]) for i in rows], cfg.max_seq_len, cfg.batching), pad_id)
        for rows in eval_rows
    ]
    answers = _answers(eval_tok, int(tokenizer.eos_token_id))
    batches = Batches(train=train, eval=evals, answers=answers)
    tokens = batches.step_tokens()
    batches.stats = {
        "train_records": n,
        "eval_records": len(eval_tok.ids),
        "dropped_records": train_tok.dropped + eval_tok.dropped,
        "batching": cfg.batching,
        "packed_rows": len(lengths) if packed else None,  # rows the training records were packed into
        "padded_tokens": tokens["padded"],
        "loss_tokens": tokens["loss"],
        "real_tokens": tokens["real"],
        "padding_share": 1 - tokens["real"] / tokens["padded"],
        # units per epoch as the batching consumes them (`longest`, `packed` leave a remainder out)
        "steps_per_epoch": steps_per_epoch(len(lengths), cfg.batch_size, cfg.batching),
        "distinct_widths": len(set(widths)),
        "answer_records": len(answers.get("prompt_len", ())),
        "eos_id": int(tokenizer.eos_token_id),
    }
    return batches


def _answers(tok: Tokenized, eos: int) -> dict[str, np.ndarray]:
    """Batches.answers from the tokenised eval records whose whole response + EOS fit: the answer
    is the tokens after the prompt up to its first EOS (a chat template may add text after it)."""
    keep = [i for i, whole in enumerate(tok.complete) if whole]
    if not keep:
        return {}
    prompts = [tok.ids[i][: tok.prompt_lens[i]] for i in keep]
    rests = [tok.ids[i][tok.prompt_lens[i] :] for i in keep]
    answers = [rest[: rest.index(eos) + 1] for rest in rests]

    def padded(rows: list[list[int]]) -> np.ndarray:
        out = np.full((len(rows), max(len(r) for r in rows)), -1, dtype=np.int64)
        for j, r in enumerate(rows):
            out[j, : len(r)] = r
        return out

    return {
        "prompt_ids": padded(prompts),
        "prompt_len": np.array([len(r) for r in prompts], dtype=np.int64),
        "answer_ids": padded(answers),
        "answer_len": np.array([len(r) for r in answers], dtype=np.int64),
    }

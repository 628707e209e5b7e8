"""Alpaca data pipeline, the same for every backend.

records (ftcore.inputs.records: instruction, input, output) -> rendered in RunConfig.prompt_format
(ftcore.inputs.token_rows: Alpaca prompt + response + EOS, or the model's chat template) -> token
ids, labels with -100 on prompt (when masking) and padding -> numpy batches. Every backend consumes the
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

from ftcore.config import Batching, RunConfig, UserError
from ftcore.files import atomic_path
from ftcore.inputs import length_profile
from ftcore.inputs.batch_checks import check_batches_fit, data_warnings, steps_of_epochs
from ftcore.inputs.batching import (
    batch_width,
    filled,
    longest_order,
    padded_order,
    steps_per_epoch,
)
from ftcore.inputs.loss_contract import IGNORE_INDEX, target_count, trained_rows
from ftcore.inputs.records import (
    SYNTHETIC_SIZE,
    format_prompt,
    load_records,
    select_records,
)
from ftcore.inputs.token_rows import (
    Tokenized,
    pack_tokenized,
    pad_id_of,
    pad_rows,
    template_length,
    tokenize_records,
)


@dataclass
class Batches:
    """What every backend trains and evaluates on.

    mode: how the rows were batched (RunConfig.batching); `packed` rows carry position_ids, and
    every backend asks the mode (`packed`), not the arrays, whether to build the per-record mask.
    train[k]: (steps, batch, width) int64 for k in input_ids / labels / attention_mask (and
    position_ids when packed: `row_keys`), width the widest step's; train["widths"]: (steps,) each
    step's own width. Step s is `step(s)`: train[k][s, :, :widths[s]] (the columns past it are
    padding). eval: list of dicts of (<=batch, width) arrays.
    answers: the eval records whose whole response fits, for greedy generation and exact-match
    accuracy: prompt_ids (n, P) and answer_ids (n, A) int64 padded with -1, prompt_len and
    answer_len (n,); an answer is the response's tokens up to and including the first EOS.
    """

    train: dict[str, np.ndarray]
    eval: list[dict[str, np.ndarray]]
    mode: Batching
    stats: dict[str, Any] = field(default_factory=dict)
    answers: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def packed(self) -> bool:
        """Several records per row: the loss needs the per-record mask built from position_ids."""
        return self.mode == Batching.PACKED

    @property
    def row_keys(self) -> tuple[str, ...]:
        """The per-token arrays of a batch: position_ids too when the rows are packed."""
        keys = ("input_ids", "labels", "attention_mask")
        return (*keys, "position_ids") if self.packed else keys

    @property
    def steps(self) -> int:
        """Training steps the batches hold: --steps, or what --epochs came to (build_batches), the
        count the run then takes (ftcore.run.preflight)."""
        return len(self.train["widths"])

    @property
    def seq_len(self) -> int:
        """The run's sequence length for work per token: its training steps' mean width, rounded
        (= max_seq_len when `padded`). FLOPs per token and the GEMM shapes take it
        (ftcore.backends.result_fields), from these same arrays in every process."""
        return int(round(float(self.train["widths"].mean())))

    @property
    def widest(self) -> int:
        """The widest training step's width: what peak memory must hold (the memory model)."""
        return int(self.train["widths"].max())

    @property
    def fingerprint(self) -> str:
        """sha256 (16 hex) of the batching mode and every array fed: a packed run whose rows each
        hold one record feeds the same tokens as a `longest` one, yet is another run."""
        h = hashlib.sha256(self.mode.value.encode())
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
        """Over steps [first, stop): `fed` positions (batch x width, padding included: what the
        step computes on), `real` (non-pad) tokens of the rows trained on (a short batch's filler rows
        are computed like padding: ftcore.inputs.batching) and `loss` tokens (targets the loss is
        taken over)."""
        widths = self.train["widths"][first:stop]
        rows = self.train["input_ids"].shape[1]
        trained = trained_rows(self.train["labels"][first:stop])  # (steps, batch)
        return {
            "fed": int(widths.sum()) * rows,
            "real": int((self.train["attention_mask"][first:stop] * trained[..., None]).sum()),
            "loss": target_count(self.train["labels"][first:stop]),
        }

    def save(self, path: str | Path) -> None:
        arrays = {f"train_{k}": v for k, v in self.train.items()}
        for i, b in enumerate(self.eval):
            arrays.update({f"eval{i}_{k}": v for k, v in b.items()})
        arrays.update({f"answers_{k}": v for k, v in self.answers.items()})
        arrays["stats"] = np.frombuffer(json.dumps(self.stats).encode(), dtype=np.uint8)
        arrays["mode"] = np.array(self.mode.value)
        with atomic_path(path) as tmp:
            np.savez(tmp, **arrays)

    @classmethod
    def load(cls, path: str | Path) -> Batches:
        with np.load(path) as z:
            train = {k[len("train_") :]: z[k] for k in z.files if k.startswith("train_")}
            n_eval = len({k.split("_")[0] for k in z.files if k.startswith("eval")})
            evals = [{k[len(f"eval{i}_") :]: z[k] for k in z.files if k.startswith(f"eval{i}_")} for i in range(n_eval)]
            answers = {k[len("answers_") :]: z[k] for k in z.files if k.startswith("answers_")}
            stats = json.loads(z["stats"].tobytes().decode())
            mode = Batching(str(z["mode"]))
        return cls(train=train, eval=evals, mode=mode, stats=stats, answers=answers)


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
    if cfg.eval_samples > 0 and eval_recs and not eval_tok.ids:
        raise UserError(f"--eval-samples {cfg.eval_samples}: all {len(eval_recs)} eval records are dropped (no answer "
                        f"token fits in --max-seq-len {cfg.max_seq_len}); --max-seq-len {eval_tok.keeps_all_at} "
                        "keeps them, or --eval-samples 0")
    n = len(train_tok.ids)
    if n < cfg.batch_size:
        raise UserError(
            f"only {n} training records keep a loss token at --max-seq-len {cfg.max_seq_len} "
            f"({train_tok.dropped} dropped); need at least --batch-size {cfg.batch_size}"
        )
    packed = cfg.batching == Batching.PACKED
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
    if cfg.epochs is not None:  # whole passes instead of --steps; the caller takes Batches.steps
        cfg = cfg.replace(steps=steps_of_epochs(cfg, len(lengths), "packed rows" if packed else "training records"))
    check_batches_fit(cfg, packed)
    if cfg.batching == Batching.PADDED:
        order = padded_order(len(lengths), cfg.batch_size, cfg.steps, cfg.seed)
    else:  # sorted as mlx-lm sorts: records by their whole length, packed rows by their filled one
        sort_keys = lengths if packed else train_tok.full_lens
        order = longest_order(sort_keys, cfg.batch_size, cfg.steps, cfg.seed, whole_epochs=cfg.epochs is not None)
    widths = [batch_width([lengths[i] for i in rows], cfg.max_seq_len, cfg.batching) for rows in order]
    order, real_rows = zip(*(filled(rows, cfg.batch_size) for rows in order), strict=True)
    train = pad_rows(units, [i for rows in order for i in rows], max(widths), pad_id)
    train = {k: v.reshape(cfg.steps, cfg.batch_size, max(widths)) for k, v in train.items()}
    for s, real in enumerate(real_rows):  # a short batch's filler rows: no targets (batching docstring)
        train["labels"][s, real:] = IGNORE_INDEX
    train["widths"] = np.array(widths, dtype=np.int64)
    n_eval = len(eval_units.ids)
    eval_rows = [list(range(i, min(i + cfg.batch_size, n_eval))) for i in range(0, n_eval, cfg.batch_size)]
    evals = [
        pad_rows(eval_units, rows, batch_width([len(eval_units.ids[i]) for i in rows], cfg.max_seq_len, cfg.batching), pad_id)
        for rows in eval_rows
    ]
    answers = _answers(eval_tok, int(tokenizer.eos_token_id))
    batches = Batches(train=train, eval=evals, mode=cfg.batching, answers=answers)
    tokens = batches.step_tokens()
    batches.stats = {
        "train_records": n,
        "eval_records": len(eval_tok.ids),
        "dropped_records": train_tok.dropped + eval_tok.dropped,
        "prompt_only_records": train_tok.prompt_only,
        "data_warnings": data_warnings(train_recs + eval_recs, train_tok, eval_tok, cfg),
        "packed_rows": len(lengths) if packed else None,  # rows the training records were packed into
        "filler_rows": cfg.steps * cfg.batch_size - sum(real_rows),  # short batches' rows with no targets
        "fed_tokens": tokens["fed"],
        "loss_tokens": tokens["loss"],
        "real_tokens": tokens["real"],
        "padding_share": 1 - tokens["real"] / tokens["fed"],
        # steps of one whole pass over the units (`longest`, `packed`: the last batch short)
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

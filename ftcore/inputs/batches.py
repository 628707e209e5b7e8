"""The Alpaca input pipeline, the same for every backend, in three stages, each one module that
takes the previous stage's output and never calls back into it (`build_batches` is the three calls):

1. records (ftcore.inputs.records: load, validate, the seeded train/eval split);
2. token rows (ftcore.inputs.token_rows: rendered in RunConfig.prompt_format, tokenised, labels
   with -100 on the prompt when masking, truncated);
3. batches (ftcore.inputs.batching's rules, arrays here: packed or not, ordered, padded;
   fingerprinted). Every backend consumes the byte-identical arrays; their sha256 fingerprint goes
   into every result.

Batching (RunConfig.batching, ftcore.inputs.batching): `padded` (every row at max_seq_len),
`longest` (mlx-lm's trainer: sorted by length, consecutive batches in a seeded order, each padded to
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
from ftcore.inputs.batch_checks import check_batches_fit, data_warnings, steps_of_epochs
from ftcore.inputs.batching import (
    batch_width,
    epoch_widths,
    filled,
    longest_order,
    pack_tokenized,
    pad_rows,
    padded_order,
    steps_per_epoch,
)
from ftcore.inputs.loss_contract import IGNORE_INDEX, target_count, trained_rows
from ftcore.inputs.records import data_records, load_records, records_for
from ftcore.inputs.token_rows import Tokenized, pad_id_of, token_rows_for


@dataclass
class Batches:
    """What every backend trains and evaluates on.

    mode: how the rows were batched (RunConfig.batching); `packed` rows carry position_ids, and
    every backend asks the mode (`packed`), not the arrays, whether to build the per-record mask.
    train[k]: (steps, step rows, width) int64 for k in input_ids / labels / attention_mask (and
    position_ids when packed: `row_keys`), width the widest step's; train["widths"]: (steps,) each
    step's own width. Step s is `step(s)`: train[k][s, :, :widths[s]] (the columns past it are
    padding). eval: list of dicts of (<=batch, width) arrays.
    answers: the eval records whose whole response fits, for greedy generation and exact-match
    accuracy: prompt_ids (n, P) and answer_ids (n, A) int64 padded with -1, prompt_len and
    answer_len (n,); an answer is the response's tokens up to and including the first EOS.
    micro_batches: --grad-accum, the micro-batches each step's rows are split into
    (ftcore.inputs.loss_contract.micro_batches); eval batches hold --batch-size rows.
    """

    train: dict[str, np.ndarray]
    eval: list[dict[str, np.ndarray]]
    mode: Batching
    stats: dict[str, Any] = field(default_factory=dict)
    answers: dict[str, np.ndarray] = field(default_factory=dict)
    micro_batches: int = 1

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
        hold one record feeds the same tokens as a `longest` one, yet is another run; so is a run
        that splits the same steps into micro-batches (hashed when there are several)."""
        h = hashlib.sha256(self.mode.value.encode())
        if self.micro_batches > 1:
            h.update(f"micro_batches={self.micro_batches}".encode())
        keys = self.row_keys
        parts = [
            (self.train, (*keys, "widths")),
            *((p, keys) for p in self.eval),
            (self.answers, sorted(self.answers)),
        ]
        for part, names in parts:
            for k in names:
                a = np.ascontiguousarray(part[k], dtype=np.int64)
                h.update(k.encode())
                h.update(str(a.shape).encode())
                h.update(a.tobytes())
        return h.hexdigest()[:16]

    def answer_items(self) -> list[tuple[list[int], list[int]]]:
        """(prompt token ids, answer token ids ending with EOS) per answerable eval record."""
        a = self.answers
        if not a:
            return []
        return [(a["prompt_ids"][i, : a["prompt_len"][i]].tolist(),
                 a["answer_ids"][i, : a["answer_len"][i]].tolist())
                for i in range(len(a["prompt_len"]))]  # fmt: skip

    def step(self, s: int) -> dict[str, np.ndarray]:
        """Step s's (step rows, width) arrays at that step's own width (its micro-batches:
        ftcore.inputs.loss_contract.micro_batches)."""
        width = int(self.train["widths"][s])
        return {k: self.train[k][s, :, :width] for k in self.row_keys}

    def step_tokens(self, first: int = 0, stop: int | None = None) -> dict[str, int]:
        """Over steps [first, stop): `fed` positions (batch x width, padding included: what the
        step computes on), `real` (non-pad) tokens of the rows trained on (a short batch's filler
        rows are computed like padding: ftcore.inputs.batching) and `loss` tokens (targets the loss
        is taken over)."""
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
        arrays["micro_batches"] = np.array(self.micro_batches)
        with atomic_path(path) as tmp:
            np.savez(tmp, **arrays)

    @classmethod
    def load(cls, path: str | Path) -> Batches:
        with np.load(path) as z:
            train = {k[len("train_") :]: z[k] for k in z.files if k.startswith("train_")}
            n_eval = len({k.split("_")[0] for k in z.files if k.startswith("eval")})
            evals = [{k[len(f"eval{i}_") :]: z[k] for k in z.files if k.startswith(f"eval{i}_")}
                     for i in range(n_eval)]  # fmt: skip
            answers = {k[len("answers_") :]: z[k] for k in z.files if k.startswith("answers_")}
            stats = json.loads(z["stats"].tobytes().decode())
            mode = Batching(str(z["mode"]))
            micro = int(z["micro_batches"]) if "micro_batches" in z.files else 1  # older files: 1
        return cls(train, evals, mode, stats, answers, micro)


def build_batches(
    cfg: RunConfig, tokenizer: Any, records: list[dict[str, str]] | None = None
) -> Batches:
    """The input pipeline's three stages (module docstring): records -> token rows -> batches."""
    records = load_records(cfg.data, seed=cfg.seed) if records is None else records  # read once
    train_recs, eval_recs = records_for(cfg, tokenizer, records)  # ftcore.inputs.records
    train_tok, eval_tok = token_rows_for(train_recs, eval_recs, tokenizer, cfg)  # inputs.token_rows
    batches = batches_of(train_tok, eval_tok, cfg, tokenizer)  # ftcore.inputs.batching's rules
    batches.stats["data_warnings"] = data_warnings(train_recs + eval_recs, train_tok, eval_tok, cfg)
    batches.stats["data_records"] = data_records(cfg, records)
    return batches


def batches_of(train_tok: Tokenized, eval_tok: Tokenized, cfg: RunConfig, tokenizer: Any,
               ) -> Batches:
    """Stage three: the run's training steps (`cfg.steps`, or what --epochs come to) and eval
    batches, batched as cfg.batching says, with their stats."""
    packed = cfg.batching == Batching.PACKED
    units = pack_tokenized(train_tok, cfg.max_seq_len) if packed else train_tok  # records or rows
    if len(units.ids) < cfg.step_rows:
        raise UserError(
            f"the {len(train_tok.ids)} training records pack into {len(units.ids)} rows of "
            f"--max-seq-len {cfg.max_seq_len}; need at least {cfg.step_rows_text} rows "
            "(more --num-samples, or a smaller --batch-size)"
        )
    lengths = [len(ids) for ids in units.ids]
    if cfg.epochs is not None:  # whole passes instead of --steps; the caller takes Batches.steps
        cfg = cfg.replace(
            steps=steps_of_epochs(
                cfg, len(lengths), "packed rows" if packed else "training records"
            )
        )
    check_batches_fit(cfg, packed)
    # sorted as mlx-lm sorts: records by their whole length, packed rows by their filled one
    sort_keys = lengths if packed else train_tok.full_lens
    if cfg.batching == Batching.PADDED:
        order = padded_order(len(lengths), cfg.step_rows, cfg.steps, cfg.seed)
    else:
        order = longest_order(
            sort_keys, cfg.step_rows, cfg.steps, cfg.seed, whole_epochs=cfg.epochs is not None
        )
    train, real_rows = _train_arrays(units, order, cfg, pad_id_of(tokenizer))
    eval_units = pack_tokenized(eval_tok, cfg.max_seq_len) if packed else eval_tok
    answers = _answers(eval_tok, int(tokenizer.eos_token_id))
    batches = Batches(
        train=train,
        eval=_eval_arrays(eval_units, cfg, pad_id_of(tokenizer)),
        mode=cfg.batching,
        answers=answers,
        micro_batches=cfg.grad_accum,
    )
    tokens = batches.step_tokens()
    batches.stats = {
        "train_records": len(train_tok.ids),
        "eval_records": len(eval_tok.ids),
        "dropped_records": train_tok.dropped + eval_tok.dropped,
        "prompt_only_records": train_tok.prompt_only,
        "packed_rows": len(lengths) if packed else None,  # rows the records were packed into
        # short batches' rows with no targets
        "filler_rows": cfg.steps * cfg.step_rows - sum(real_rows),
        "fed_tokens": tokens["fed"],
        "loss_tokens": tokens["loss"],
        "real_tokens": tokens["real"],
        "padding_share": 1 - tokens["real"] / tokens["fed"],
        # steps of one whole pass over the units (`longest`, `packed`: the last batch short)
        "steps_per_epoch": steps_per_epoch(len(lengths), cfg.step_rows, cfg.batching),
        "epoch_widths": epoch_widths(lengths, sort_keys, cfg),  # that pass's {width: steps}
        "distinct_widths": len(set(train["widths"].tolist())),
        "answer_records": len(answers.get("prompt_len", ())),
        "eos_id": int(tokenizer.eos_token_id),
    }
    return batches


def _train_arrays(units: Tokenized, order: list[list[int]], cfg: RunConfig, pad_id: int,
                  ) -> tuple[dict[str, np.ndarray], list[int]]:
    """The training steps' (steps, batch, width) arrays and `widths`, and each step's real rows
    (a short batch is made up with filler rows: ftcore.inputs.batching)."""
    widths = [
        batch_width([len(units.ids[i]) for i in rows], cfg.max_seq_len, cfg.batching)
        for rows in order
    ]
    full, real_rows = zip(*(filled(rows, cfg.step_rows) for rows in order), strict=True)
    train = pad_rows(units, [i for rows in full for i in rows], max(widths), pad_id)
    train = {k: v.reshape(cfg.steps, cfg.step_rows, max(widths)) for k, v in train.items()}
    for s, real in enumerate(real_rows):  # a short batch's filler rows: no targets
        train["labels"][s, real:] = IGNORE_INDEX
    train["widths"] = np.array(widths, dtype=np.int64)
    return train, list(real_rows)


def _eval_arrays(units: Tokenized, cfg: RunConfig, pad_id: int) -> list[dict[str, np.ndarray]]:
    """Eval batches in record order, each padded as the run's batching pads."""
    n = len(units.ids)
    rows = [list(range(i, min(i + cfg.batch_size, n))) for i in range(0, n, cfg.batch_size)]
    widths = [
        batch_width([len(units.ids[i]) for i in r], cfg.max_seq_len, cfg.batching) for r in rows
    ]
    return [pad_rows(units, r, w, pad_id) for r, w in zip(rows, widths, strict=True)]


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

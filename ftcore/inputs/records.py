"""Alpaca records: loading them (a .json list, a .jsonl file, a `save_to_disk` folder, the
built-in sets), the seeded train/eval split, and the prompt format each record is rendered in
(RunConfig.prompt_format): `alpaca`, the Stanford Alpaca template; `chat`, the model's own chat
template with the record as one user turn (instruction, then a blank line and the input when
there is one) and one assistant turn (output), as mlx-lm renders chat data.

A record is {"instruction", "input", "output"} strings (input may be empty). This is the input
pipeline's first stage (`records_for`: the run's training and eval records);
ftcore.inputs.token_rows turns them into token rows, ftcore.inputs.batches into batches.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ftcore.config import RunConfig, UserError
from ftcore.files import write_atomic
from ftcore.inputs import length_profile
from ftcore.inputs.synthetic import synthetic_records

# The Stanford Alpaca prompt templates (tatsu-lab/stanford_alpaca, train.py).
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)

SYNTHETIC_SIZE = 4096  # records in the built-in set


# Written into every adapter folder a run saves: the format its training records were rendered in,
# so `ftcore generate` wraps prompts the same way.
PROMPT_FORMAT_FILE = "ftcore_prompt_format.json"


def chat_messages(record: dict[str, str], with_answer: bool = True) -> list[dict[str, str]]:
    """The record as a conversation: user = instruction (+ blank line + input), assistant =
    output."""
    user = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
    messages = [{"role": "user", "content": user}]
    return (
        messages + [{"role": "assistant", "content": record["output"]}] if with_answer else messages
    )


def write_prompt_format(adapter_dir: Path, prompt_format: str) -> None:
    write_atomic(
        adapter_dir / PROMPT_FORMAT_FILE,
        (json.dumps({"prompt_format": prompt_format}) + "\n").encode(),
    )


def read_prompt_format(adapter_dir: Path) -> str:
    """The format an adapter was trained with; `alpaca` for a folder without the file (an
    adapter from another tool, or from before the file existed)."""
    path = adapter_dir / PROMPT_FORMAT_FILE
    if not path.is_file():
        return "alpaca"
    try:
        value = json.loads(path.read_text(encoding="utf-8")).get("prompt_format")
    except (ValueError, AttributeError):
        value = None
    if value not in ("alpaca", "chat"):
        raise UserError(f"{path}: unreadable prompt format; delete the file to use alpaca")
    return value


def format_prompt(record: dict[str, str]) -> str:
    """The Alpaca prompt for one record; the variant without `### Input:` when input is empty."""
    if record.get("input", ""):
        return PROMPT_WITH_INPUT.format(instruction=record["instruction"], input=record["input"])
    return PROMPT_NO_INPUT.format(instruction=record["instruction"])


# ----------------------------------------------------------------------------- loading


def load_records(path: str | Path | None, seed: int = 0) -> list[dict[str, str]] | None:
    """Alpaca-format records from a .json list, a .jsonl file or a `save_to_disk` folder.

    None gives the built-in synthetic set; `builtin:alpaca-lengths` gives None here: those records
    are made with the model's tokenizer (ftcore.inputs.length_profile, in build_batches). Every
    record must have string `instruction` and `output`; `input` is optional. Problems raise
    UserError naming the file and record.
    """
    if path is None:
        return synthetic_records(SYNTHETIC_SIZE, seed=seed)
    if path == length_profile.NAME:
        return None
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"data path not found: {p}")
    if p.is_dir():
        rows = _load_saved_dataset(p)
    elif p.suffix.lower() == ".jsonl":  # X.JSONL too
        rows = []
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"{p}: not UTF-8 text (byte {e.start})") from None
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise UserError(f"{p}: line {lineno} is not valid JSON ({e.msg})") from None
    else:
        try:
            rows = json.loads(p.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{p}: not valid JSON ({getattr(e, 'msg', e)})") from None
        if isinstance(rows, dict) and isinstance(rows.get("train"), list):
            rows = rows["train"]
        if not isinstance(rows, list):
            raise UserError(f"{p}: expected a JSON list of Alpaca records")
    if not rows:
        raise UserError(f"{p}: the dataset is empty")
    return [_check_record(r, i, p) for i, r in enumerate(rows)]


def _load_saved_dataset(p: Path) -> list[dict[str, Any]]:
    import datasets  # slow import; only needed for save_to_disk folders

    try:
        ds = datasets.load_from_disk(str(p))
    except Exception as e:  # datasets raises FileNotFoundError / ValueError variants
        raise UserError(f"{p}: not a datasets.save_to_disk folder ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" in ds:
            ds = ds["train"]
        elif len(ds) == 1:
            ds = next(iter(ds.values()))
        else:
            raise UserError(f"{p}: dataset has splits {sorted(ds)}; expected a 'train' split")
    missing = {"instruction", "output"} - set(ds.column_names)
    if missing:
        raise UserError(f"{p}: dataset lacks column(s) {', '.join(sorted(missing))}")
    return ds.to_list()


def _check_record(r: Any, i: int, p: Path) -> dict[str, str]:
    if not isinstance(r, dict):
        raise UserError(f"{p}: record {i} is not an object")
    for key in ("instruction", "output"):
        if not isinstance(r.get(key), str):
            raise UserError(f"{p}: record {i} has no string '{key}'")
    inp = r.get("input")  # absent or null: no input; 0, false, [] are refused like any non-string
    if inp is None:
        inp = ""
    if not isinstance(inp, str):
        raise UserError(f"{p}: record {i} has a non-string 'input' ({type(inp).__name__})")
    return {"instruction": r["instruction"], "input": inp, "output": r["output"]}


ALPACA_RECORDS = 52002  # Stanford Alpaca's alpaca_data.json


def data_records(cfg: RunConfig, records: list[dict[str, str]] | None) -> int:
    """Records one epoch of the user's data holds, what the epoch projection prices unless
    --project-records says (ftcore.measure.projection): Stanford Alpaca's 52,002 for
    builtin:alpaca-lengths (its lengths stand for them); a file's records (`records`, loaded)
    less the held-out eval ones; the --num-samples drawn of the built-in set (made to size)."""
    if cfg.data == length_profile.NAME:
        return ALPACA_RECORDS
    if cfg.data is None or records is None:
        return cfg.num_samples
    return len(records) - cfg.eval_samples


def select_records(
    records: list[dict[str, str]], num_samples: int, eval_samples: int, seed: int
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Deterministic (train, eval) subsets drawn without overlap by a seeded permutation."""
    need = num_samples + eval_samples
    if need > len(records):
        raise UserError(
            f"--num-samples {num_samples} + --eval-samples {eval_samples} = {need} records "
            f"requested, but the data has only {len(records)}"
        )
    order = np.random.default_rng(seed).permutation(len(records))[:need]
    picked = [records[i] for i in order]
    return picked[:num_samples], picked[num_samples:]


def records_for(cfg: RunConfig, tokenizer: Any, records: list[dict[str, str]] | None = None,
                ) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Stage one: the run's (training, eval) records: `records`, or cfg.data loaded (the built-in
    Alpaca-length profile sized in this tokenizer's tokens), then the seeded split."""
    if records is None:
        records = load_records(cfg.data, seed=cfg.seed)
    if records is None:  # the built-in Alpaca-length profile: lengths in the model's tokens
        def tokens(r: dict[str, str]) -> int:  # prompt + response + EOS
            return len(tokenizer(format_prompt(r) + r["output"])["input_ids"]) + 1

        records = length_profile.alpaca_length_records(tokens, SYNTHETIC_SIZE, seed=cfg.seed)
    return select_records(records, cfg.num_samples, cfg.eval_samples, cfg.seed)

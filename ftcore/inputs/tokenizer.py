"""The presets' tokenizer: a Llama-style SentencePiece BPE trained on the built-in data, and loading
any model folder's own tokenizer."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from ftcore.config import UserError

TOKENIZER_VOCAB = 1024  # SentencePiece BPE vocab trained on the built-in data
TOKENIZER_CORPUS = 4000  # built-in records the tokenizer is trained on


def train_sentencepiece(out_dir: Path, vocab_size: int = TOKENIZER_VOCAB) -> Path:
    """Train a Llama-style SentencePiece BPE tokenizer (byte fallback, <unk>=0 <s>=1 </s>=2) on the
    built-in data and write `tokenizer.model` + `tokenizer_config.json` into out_dir."""
    import sentencepiece as spm

    out_dir.mkdir(parents=True, exist_ok=True)
    corpus = tokenizer_corpus()
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "corpus.txt").write_text(corpus, encoding="utf-8")
        spm.SentencePieceTrainer.train(
            input=str(Path(tmp) / "corpus.txt"),
            model_prefix=str(out_dir / "tokenizer"),
            vocab_size=vocab_size,
            model_type="bpe",
            byte_fallback=True,  # any text encodes, as in Llama's tokenizer
            character_coverage=1.0,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            num_threads=1,  # deterministic
            minloglevel=2,
        )
    (out_dir / "tokenizer.vocab").unlink(missing_ok=True)
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "LlamaTokenizer",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "add_bos_token": True,
                "add_eos_token": False,
                "model_max_length": 2048,
            },
            indent=2,
        )
    )
    return out_dir / "tokenizer.model"


def load_tokenizer(model_dir: str | Path) -> Any:
    """The model's own tokenizer, from local files only (tokenizer.json or SentencePiece model)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(
            str(model_dir), local_files_only=True, trust_remote_code=False
        )
    except Exception as e:  # transformers raises many types for broken tokenizer folders
        raise UserError(
            f"{model_dir}: cannot load the tokenizer ({type(e).__name__}: {e})"
        ) from None


def tokenizer_corpus() -> str:
    """The text the presets' SentencePiece tokenizer is trained on: every family's records in the
    Alpaca template (so every word any task uses is in the vocabulary)."""
    from ftcore.inputs.records import format_prompt
    from ftcore.inputs.synthetic import ALL_FAMILIES, synthetic_records

    records = synthetic_records(TOKENIZER_CORPUS, seed=0, families=ALL_FAMILIES)
    return "\n".join(format_prompt(r) + r["output"] for r in records)



# A model folder's tokenizer and generation files: what a fine-tuned checkpoint carries along
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                   "special_tokens_map.json", "generation_config.json")  # fmt: skip


def copy_tokenizer(model_dir: Path, out_dir: Path) -> None:
    """Copy model_dir's tokenizer files into out_dir (a full fine-tune's checkpoint folder, which
    then loads alone in transformers, mlx-lm and `ftcore generate`)."""
    import shutil

    for name in TOKENIZER_FILES:
        if (Path(model_dir) / name).is_file():
            shutil.copyfile(Path(model_dir) / name, Path(out_dir) / name)

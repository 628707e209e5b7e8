"""Root fixtures shared by tests/ and bench/: an isolated model cache, the tiny preset checkpoint,
a checkpoint with a SentencePiece-only tokenizer, small Alpaca files, hypothesis profiles."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

# dev: quick feedback; ci: deterministic, more examples, no deadline (2 shared cores are noisy).
settings.register_profile("dev", max_examples=8, deadline=None, print_blob=True)
settings.register_profile(
    "ci",
    max_examples=20,
    deadline=None,
    derandomize=True,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


@pytest.fixture(scope="session", autouse=True)
def ftcore_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every test (and every child process it starts) uses a fresh cache, never ~/.cache.

    FTCORE_TEST_CACHE keeps one across sessions (e.g. the benchmarks' 1.1B-width checkpoints).
    """
    root = Path(os.environ.get("FTCORE_TEST_CACHE") or tmp_path_factory.mktemp("ftcore-cache"))
    os.environ["FTCORE_CACHE"] = str(root)
    return root


@pytest.fixture(scope="session")
def tiny_model_dir(ftcore_cache: Path) -> Path:
    from ftcore.models import materialize_preset

    return materialize_preset("tiny")


@pytest.fixture(scope="session")
def sentencepiece_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local HF Llama folder laid out like a TinyLlama download whose tokenizer is only a
    SentencePiece `tokenizer.model` (no tokenizer.json): the slow-to-fast conversion path."""
    from ftcore.models import train_sentencepiece

    d = tmp_path_factory.mktemp("sp-llama")
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_model_dir / name, d / name)
    train_sentencepiece(d)
    assert not (d / "tokenizer.json").exists()
    return d


def _write_alpaca(path: Path, records: list[dict], fmt: str = "json") -> Path:
    if fmt == "json":
        path.write_text(json.dumps(records))
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif fmt == "hf":
        import datasets

        datasets.DatasetDict({"train": datasets.Dataset.from_list(records)}).save_to_disk(str(path))
    return path


@pytest.fixture
def write_alpaca():
    """write_alpaca(path, records, fmt): records as a .json list ("json"), a .jsonl file
    ("jsonl") or a datasets.save_to_disk folder ("hf", like the write-up's alpaca_hf)."""
    return _write_alpaca


@pytest.fixture
def alpaca_records() -> list[dict]:
    from ftcore.synthetic import synthetic_records

    return synthetic_records(40, seed=7)


@pytest.fixture
def small_cfg():
    """A RunConfig that trains the tiny preset in a second or two."""
    from ftcore.config import RunConfig

    return RunConfig(num_samples=16, eval_samples=4, max_seq_len=64, batch_size=2, steps=6, warmup_steps=1)

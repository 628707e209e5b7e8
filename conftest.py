"""Root fixtures shared by tests/ and bench/: an isolated model cache, the tiny preset checkpoint,
a checkpoint with a SentencePiece-only tokenizer, small Alpaca files, hypothesis profiles; and the
test tiers of tests/.

Test tiers. Every test under tests/ belongs to exactly one tier, given by its module's `pytestmark`
(a module may carry other markers too, e.g. `slow`, `mlx_lm`); collection fails naming any test
with none or more than one, so a new test file cannot slip outside the tiers. bench/ is not tiered.

- unit: fast and in-process: no child processes, no training beyond a few tiny steps
  (`pytest -m unit tests/` runs in well under a minute on 2 cores);
- parity: numerical parity of the MLX and torch implementations, hypothesis properties included;
- integration: starts ftcore child processes: the CLI, the runner, compare, backends end to end.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

TESTS_DIR = Path(__file__).resolve().parent / "tests"
TIERS = {
    "unit": "fast, in-process tests: no child processes, no training beyond a few tiny steps",
    "parity": "numerical parity between the MLX and torch implementations (hypothesis properties too)",
    "integration": "starts ftcore child processes: CLI, runner, compare, backends end to end",
}


def pytest_configure(config: pytest.Config) -> None:
    for name, text in TIERS.items():
        config.addinivalue_line("markers", f"{name}: test tier: {text}")


@pytest.hookimpl(tryfirst=True)  # before -m deselects anything: every collected test is checked
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Fail collection when a test under tests/ has no tier marker, or more than one."""
    wrong = []
    for item in items:
        if not item.path.resolve().is_relative_to(TESTS_DIR):
            continue
        tiers = sorted({m.name for m in item.iter_markers() if m.name in TIERS})
        if len(tiers) != 1:
            wrong.append(f"  {item.nodeid}: {', '.join(tiers) if tiers else 'no tier'}")
    if wrong:
        raise pytest.UsageError(
            f"{len(wrong)} test(s) under tests/ without exactly one tier marker "
            f"({', '.join(TIERS)}); give each test module one, e.g. "
            "`pytestmark = pytest.mark.unit` (see the root conftest.py):\n" + "\n".join(wrong)
        )

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
def default_model_dir(ftcore_cache: Path) -> Path:
    """The embedded default's checkpoint (`tiny-pretrained`): pretrained once per session cache,
    ~1-2 min on 2 cores."""
    from ftcore.config import RunConfig
    from ftcore.models import materialize_preset

    return materialize_preset(RunConfig().preset)


@pytest.fixture(autouse=True)
def _default_model_made_first(request: pytest.FixtureRequest) -> None:
    """Integration tests run the CLI on the default preset: make it once, up front, so its one-time
    pretraining never counts against one test's subprocess timeout."""
    if request.node.get_closest_marker("integration"):
        request.getfixturevalue("default_model_dir")


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
    ("jsonl") or a datasets.save_to_disk folder ("hf", like a saved Stanford Alpaca dataset)."""
    return _write_alpaca


@pytest.fixture
def alpaca_records() -> list[dict]:
    from ftcore.synthetic import synthetic_records

    return synthetic_records(40, seed=7)


@pytest.fixture
def small_cfg():
    """A RunConfig that trains the tiny preset in a second or two."""
    from ftcore.config import RunConfig

    return RunConfig(preset="tiny", num_samples=16, eval_samples=4, max_seq_len=64, batch_size=2, steps=6, warmup_steps=1)

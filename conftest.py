"""Root fixtures shared by tests/ and bench/: the persistent test cache, the tiny preset checkpoint,
a checkpoint with a SentencePiece-only tokenizer, small Alpaca files, hypothesis profiles; and the
test tiers of tests/.

Test tiers. Every test under tests/ belongs to exactly one tier, given by its module's `pytestmark`
(collection fails naming any test with none or more than one); `slow` marks what takes more than a
few seconds, in any tier. bench/ is not tiered.

- unit: in-process, no child process, no training beyond a few tiny steps: seconds each;
- parity: numerical parity of the MLX and torch implementations, in-process (hypothesis too);
- integration: real `ftcore` child processes: the CLI, the runner, compare, backends end to end.
The inner loop is `pytest -m "unit or parity" tests/` (about 3 minutes on 2 cores).
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
    "unit": "in-process, no child process, no training beyond a few tiny steps: seconds each",
    "parity": "numerical parity between the MLX and torch implementations, in-process (hypothesis too)",
    "integration": "real ftcore child processes: CLI, runner, compare, backends end to end",
}


STUDY = "study"  # repetition studies: 10 compares each, ~10 minutes; run with --study


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--study", action="store_true", default=False,
                     help="also run the tests marked `study` (how often the compare verdict is right "
                          "over 10 compares; ~10 minutes); without it they are deselected")


def pytest_configure(config: pytest.Config) -> None:
    for name, text in TIERS.items():
        config.addinivalue_line("markers", f"{name}: test tier: {text}")
    config.addinivalue_line("markers", f"{STUDY}: a repetition study, deselected unless --study")


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
    if not config.getoption("--study"):
        studies = [item for item in items if item.get_closest_marker(STUDY)]
        if studies:
            config.hook.pytest_deselected(items=studies)
            items[:] = [item for item in items if not item.get_closest_marker(STUDY)]
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


def pytest_report_header(config: pytest.Config) -> list[str]:
    cache = os.environ.get("FTCORE_TEST_CACHE") or DEFAULT_TEST_CACHE
    return [f"ftcore test cache: {cache} ({TEST_CACHE_ENV})",
            f"hypothesis profile: {settings._current_profile} ({settings().max_examples} examples)"]


TEST_CACHE_ENV = "FTCORE_TEST_CACHE"
DEFAULT_TEST_CACHE = Path.home() / ".cache" / "ftcore-test"


@pytest.fixture(scope="session", autouse=True)
def ftcore_cache() -> Path:
    """The model cache of every test and every child process it starts: never the user's
    ~/.cache/ftcore. It is persistent ($FTCORE_TEST_CACHE, default ~/.cache/ftcore-test) and holds
    only artefacts that are fingerprinted and never edited in place: presets (named by recipe
    fingerprint), MLX conversions (checked against their source), MLX's JIT kernels (keyed by CPU
    and flags), GEMM peaks (keyed by CPU, cores, BLAS, threads). So a second run reuses them, and
    CI (which sets a fresh folder) measures a first run. Run folders are always temporary, and a
    test that needs an empty cache makes its own (tmp_path)."""
    root = Path(os.environ.get(TEST_CACHE_ENV) or DEFAULT_TEST_CACHE).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    os.environ["FTCORE_CACHE"] = str(root)
    return root


@pytest.fixture(scope="session")
def default_model_dir(ftcore_cache: Path) -> Path:
    """The embedded default's checkpoint (`tiny-pretrained`), shipped in the package."""
    from ftcore.config import RunConfig
    from ftcore.inputs.presets import materialize_preset

    return materialize_preset(RunConfig().preset)


@pytest.fixture(scope="session")
def tiny_model_dir(ftcore_cache: Path) -> Path:
    from ftcore.inputs.presets import materialize_preset

    return materialize_preset("tiny")


@pytest.fixture(scope="session")
def sentencepiece_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local HF Llama folder laid out like a TinyLlama download whose tokenizer is only a
    SentencePiece `tokenizer.model` (no tokenizer.json): the slow-to-fast conversion path."""
    from ftcore.inputs.presets import train_sentencepiece

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
    from ftcore.inputs.synthetic import synthetic_records

    return synthetic_records(40, seed=7)


@pytest.fixture
def small_cfg():
    """A RunConfig that trains the tiny preset in a second or two."""
    from ftcore.config import RunConfig

    return RunConfig(preset="tiny", num_samples=16, eval_samples=4, max_seq_len=64, batch_size=2, steps=6, warmup_steps=1)

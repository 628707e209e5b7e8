"""The `mlx` and `mlx-lm` backends end to end, each in its real child process (ftcore.run.backend_process):
loss falls, every result field is filled, the saved adapters load in PEFT and mlx-lm and
reproduce the MLX model's logits, the conversion cache is reused, a missing GPU is a clean error."""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from helpers import RESULT_FIELDS, torch_logits
from safetensors.numpy import load_file

from ftcore.backends.mlx_lm import offsets_lengths
from ftcore.config import RunConfig
from ftcore.inputs.arch import read_arch
from ftcore.inputs.lora_init import initial_lora_state, state_fingerprint
from ftcore.inputs.loss_contract import micro_batches, target_count
from ftcore.mlx.adapters import peft_to_mlx_adapter
from ftcore.mlx.lora import apply_lora, load_lora_state
from ftcore.mlx.model import load_model
from ftcore.run.backend_process import run_backend
from ftcore.run.preflight import prepare
from ftcore.tolerances import FP32_GRAD_ACCUM_ATOL, FP32_LOGITS_ATOL, FP32_LOSS_ATOL, LR_RTOL

pytestmark = pytest.mark.integration

# conftest's small_cfg, module-scoped here so that several tests share one run per backend.
CFG = RunConfig(  # the random `tiny` preset: the tests below rebuild its base from tiny_model_dir
    preset="tiny", num_samples=16, eval_samples=4, max_seq_len=64, batch_size=2, steps=8, warmup_steps=1
)


@pytest.fixture(scope="module")
def prep(tiny_model_dir, tmp_path_factory):
    return prepare(CFG, tmp_path_factory.mktemp("mlx-prep"))


@pytest.fixture(scope="module")
def mlx_run(prep, tmp_path_factory):
    out = tmp_path_factory.mktemp("mlx-run")
    return run_backend("mlx", prep, out), out


def mlx_logits(prep, result, adapter: dict[str, mx.array], batch, lora: bool = True) -> np.ndarray:
    """Logits of the run's converted base (+ `adapter`, lora_state keys) in ftcore's MLX model."""
    model, _ = load_model(Path(result.extra["conversion_dir"]))
    if lora:
        apply_lora(model, CFG.lora_targets, CFG.lora_rank, CFG.lora_alpha)
        load_lora_state(model, adapter)
    return np.array(model(mx.array(batch["input_ids"]), mx.array(batch["attention_mask"])))


def test_mlx_run_fills_every_field(mlx_run, prep, tiny_model_dir):
    result, out = mlx_run
    assert result.status == "ok", result.error
    on_disk = json.loads((out / "result.json").read_text())
    assert not [f for f in RESULT_FIELDS if on_disk.get(f) in (None, "")]
    assert len(result.losses) == CFG.steps and all(map(math.isfinite, result.losses))
    assert result.losses[-1] < result.losses[0]
    assert result.eval_loss is not None and math.isfinite(result.eval_loss)
    assert result.tokens_per_s > 0 and result.loss_tokens_per_s > 0 and result.load_time_s > 0
    assert result.peak_rss_mb > result.baseline_rss_mb > 0
    assert result.framework_peak_mb > 0
    assert result.blas and result.extra["blas_probe"]["name"] in result.blas
    assert result.threads == prep.cfg.threads
    # one CPU stream per thread when the batch's rows split evenly (ftcore.mlx.streams)
    threads = prep.cfg.threads
    assert result.extra["cpu_streams"] == (threads if CFG.batch_size % threads == 0 else 1)
    assert 0 < result.cpu_busy_threads <= threads + 0.5
    assert result.optimizer["bias_correction"] is True
    assert isinstance(result.compiled_step, bool)
    init = initial_lora_state(read_arch(tiny_model_dir), CFG.lora_targets, CFG.lora_rank, CFG.seed)
    assert result.initial_adapter_fingerprint == state_fingerprint(init)
    # MLX's one decay on every adapter tensor, under the keys the torch side records too
    assert result.optimizer["weight_decay_per_tensor"] == dict.fromkeys(init, CFG.weight_decay)


def test_peft_adapter_reproduces_mlx_logits(mlx_run, prep, tiny_model_dir):
    """out/adapter loads with PeftModel.from_pretrained on the HF base: same logits as MLX (fp32)."""
    import torch
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    result, out = mlx_run
    peft_state = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert any(
        k.endswith("lora_B.weight") and np.abs(v).max() > 0 for k, v in peft_state.items()
    ), "B never trained"
    # the mlx-lm copy holds the same arrays, transposed
    mlx_lm_state = load_file(str(out / "adapter_mlx_lm" / "adapters.safetensors"))
    for key, value in peft_state.items():
        module, leaf = key.removeprefix("base_model.model.").removesuffix(".weight").rsplit(".", 1)
        np.testing.assert_array_equal(mlx_lm_state[f"{module}.{leaf.lower()}"].T, value)

    batch = prep.batches.step(0)
    ours = mlx_logits(prep, result, peft_to_mlx_adapter(peft_state), batch)
    base = LlamaForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(out / "adapter")).eval()
    theirs = torch_logits(peft_model, batch["input_ids"], batch["attention_mask"])
    np.testing.assert_allclose(ours, theirs, atol=FP32_LOGITS_ATOL, rtol=0)


def test_conversion_cache_reused(mlx_run, prep, tmp_path):
    first, _ = mlx_run
    second = run_backend("mlx", prep, tmp_path / "again")
    assert second.status == "ok", second.error
    assert second.extra["conversion_cache_hit"] is True
    assert second.extra["conversion_dir"] == first.extra["conversion_dir"]
    assert second.losses == first.losses  # same inputs, same numbers


def test_gpu_without_one_is_a_clean_failed_row(small_cfg, tiny_model_dir, tmp_path):
    if mx.is_available(mx.gpu):
        pytest.skip("this MLX build has a GPU")
    prep = prepare(small_cfg.replace(device="gpu"), tmp_path / "prep")
    result = run_backend("mlx", prep, tmp_path / "out")
    assert result.status == "failed"
    assert result.error.startswith("--device gpu:") and "no GPU" in result.error
    assert result.traceback is None


@pytest.mark.mlx_lm
def test_mlx_lm_reference_runs(mlx_run, prep, tiny_model_dir, tmp_path):
    """mlx-lm's own loader, LoRA and trainer on the same batches; its adapter matches our model."""
    pytest.importorskip("mlx_lm", reason="mlx-lm is not installed (optional extra ftcore[mlx-lm])")
    from mlx_lm.tuner.utils import load_adapters
    from mlx_lm.utils import load_model as mlx_lm_load_model

    result = run_backend("mlx-lm", prep, tmp_path / "out")
    assert result.status == "ok", result.error
    assert len(result.losses) == CFG.steps and result.losses[-1] < result.losses[0]
    assert result.tokens_per_s > 0 and result.peak_rss_mb > result.baseline_rss_mb > 0
    assert result.initial_adapter_fingerprint == mlx_run[0].initial_adapter_fingerprint
    assert result.optimizer["bias_correction"] is False
    assert result.optimizer["weight_decay_per_tensor"] == mlx_run[0].optimizer["weight_decay_per_tensor"]
    assert any(n.startswith("numerics differ: ") for n in result.notes)

    # Step 0 runs with B = 0, i.e. the base model: its loss is the mean CE over mlx-lm's targets,
    # which are ours plus the pad target after each untruncated row.
    batch = prep.batches.step(0)
    logits = mlx_logits(prep, mlx_run[0], {}, batch, lora=False)[:, :-1].astype(np.float64)
    m = logits.max(-1, keepdims=True)
    logp = logits - (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))
    ce = -np.take_along_axis(logp, batch["input_ids"][:, 1:, None], -1)[..., 0]  # (B, L-1)
    ol = offsets_lengths(batch)
    positions = np.arange(1, batch["input_ids"].shape[1])[None]
    theirs_mask = (positions >= ol[:, :1]) & (positions <= ol[:, 1:])
    ours_mask = batch["labels"][:, 1:] != -100
    assert theirs_mask.sum() == ours_mask.sum() + (ol[:, 1] < batch["input_ids"].shape[1]).sum()
    assert not (ours_mask & ~theirs_mask).any()
    assert result.losses[0] == pytest.approx(ce[theirs_mask].mean(), abs=FP32_LOSS_ATOL)

    # mlx-lm reads back its own adapter folder; our model with the PEFT copy gives the same logits
    model, _ = mlx_lm_load_model(tiny_model_dir, model_config={"tie_word_embeddings": False})
    load_adapters(model, str(tmp_path / "out" / "adapter_mlx_lm"))
    batch = prep.batches.step(0)
    real = batch["attention_mask"].astype(bool)  # mlx-lm's model takes no padding mask
    theirs = np.array(model(mx.array(batch["input_ids"])))
    peft_state = load_file(str(tmp_path / "out" / "adapter" / "adapter_model.safetensors"))
    ours = mlx_logits(prep, mlx_run[0], peft_to_mlx_adapter(peft_state), batch)
    np.testing.assert_allclose(ours[real], theirs[real], atol=FP32_LOGITS_ATOL, rtol=0)


def test_mlx_compiles_once_per_distinct_width(tmp_path, write_alpaca):
    """`longest` batches of several widths: the compiled step is traced once per distinct width
    (MLX keeps each shape's trace), never once per step."""
    from test_data import _varied_records

    data = write_alpaca(tmp_path / "varied.json", _varied_records(40))
    cfg = CFG.replace(data=str(data), num_samples=30, max_seq_len=256, batch_size=2, steps=12, batching="longest")
    p = prepare(cfg, tmp_path / "prep")
    widths = p.batches.train["widths"].tolist()
    assert len(set(widths)) >= 3 and len(set(widths)) < len(widths)
    result = run_backend("mlx", p, tmp_path / "out")
    assert result.status == "ok", result.error
    assert result.extra["compiled_traces"] == len(set(widths)) == p.batches.stats["distinct_widths"]
    assert 0 < result.real_tokens_per_s < result.tokens_per_s


# --batch-size 8, and --batch-size 2 --grad-accum 4 (the same 8 rows a step), fp32, `longest` over
# records of ~80-180 tokens: several widths, and micro-batches with uneven target counts
ACCUM_SHAPES = {"one": (8, 1), "accum": (2, 4)}  # name: (batch_size, grad_accum)


@pytest.fixture(scope="module")
def mlx_accum(tmp_path_factory, tiny_model_dir):
    """(preps, {name: mlx result}, root) at both ACCUM_SHAPES, the two runs side by side."""
    from concurrent.futures import ThreadPoolExecutor

    from helpers import passive_omp
    from test_data import _varied_records

    root = tmp_path_factory.mktemp("mlx-accum")
    (root / "varied.json").write_text(json.dumps(_varied_records(40)))
    base = CFG.replace(data=str(root / "varied.json"), num_samples=32, eval_samples=0, max_seq_len=256,
                       steps=4, batching="longest")  # fmt: skip
    preps = {n: prepare(base.replace(batch_size=b, grad_accum=g), root / n) for n, (b, g) in ACCUM_SHAPES.items()}
    with passive_omp(), ThreadPoolExecutor(2) as pool:
        futures = {n: pool.submit(run_backend, "mlx", p, root / n / "mlx") for n, p in preps.items()}
        return preps, {n: f.result() for n, f in futures.items()}, root


def test_mlx_grad_accum_equals_one_batch_of_all_rows(mlx_accum, tiny_model_dir):
    """As in torch (tests/test_torch_backends.py): 4 micro-batches of 2 rows, each one's summed
    loss over the step's target count, train as one batch of 8: losses and adapter alike."""
    from parity_utils import initial_peft_adapter, read_adapter

    preps, runs, root = mlx_accum
    one, acc = runs["one"], runs["accum"]
    assert one.status == acc.status == "ok", (one.error, acc.error)
    batches = preps["accum"].batches
    np.testing.assert_array_equal(batches.train["labels"], preps["one"].batches.train["labels"])
    counts = [[target_count(m["labels"]) for m in micro_batches(batches.step(s), 4)] for s in range(4)]
    assert all(len(set(c)) > 1 for c in counts), counts
    assert (one.grad_accum, acc.grad_accum) == (1, 4)
    assert json.loads((root / "accum" / "mlx" / "result.json").read_text())["grad_accum"] == 4
    assert acc.fed_batches_fingerprint == one.fed_batches_fingerprint
    np.testing.assert_allclose(acc.losses, one.losses, rtol=0, atol=FP32_GRAD_ACCUM_ATOL)
    trained, want = read_adapter(root / "accum" / "mlx"), read_adapter(root / "one" / "mlx")
    init = initial_peft_adapter(preps["one"].cfg, tiny_model_dir)
    for k in want:
        np.testing.assert_allclose(trained[k], want[k], rtol=0, atol=FP32_GRAD_ACCUM_ATOL, err_msg=k)
    assert max(np.abs(want[k] - init[k]).max() for k in want) > 100 * FP32_GRAD_ACCUM_ATOL


def test_mlx_grad_accum_traces_once_per_width(mlx_accum):
    """The per-micro-batch gradient function is compiled once per width (the step's count is an
    array input, not a constant), never once per micro-batch: 16 micro-batches, 3+ widths."""
    preps, runs, _ = mlx_accum
    widths = preps["accum"].batches.train["widths"].tolist()
    assert 1 < len(set(widths)) < len(widths) * 4
    assert runs["accum"].extra["compiled_traces"] == len(set(widths))
    assert runs["one"].extra["compiled_traces"] == len(set(widths))


@pytest.mark.mlx_lm
def test_mlx_lm_accumulates_its_own_way(mlx_accum, tmp_path):
    """mlx-lm's own accumulation (grad_accumulation_steps): one report an optimizer step, at the
    LR of that update, the whole step's ids fed once, and a note that it averages micro-batch
    means."""
    pytest.importorskip("mlx_lm", reason="mlx-lm is not installed (optional extra ftcore[mlx-lm])")
    preps, runs, _ = mlx_accum
    cfg = preps["accum"].cfg
    result = run_backend("mlx-lm", preps["accum"], tmp_path / "out")
    assert result.status == "ok", result.error
    assert result.grad_accum == 4 and len(result.losses) == len(result.step_times_s) == cfg.steps
    assert result.fed_batches_fingerprint == runs["accum"].fed_batches_fingerprint
    want = [cfg.lr_at(s) for s in range(cfg.steps)]
    np.testing.assert_allclose(result.optimizer["lr_per_step"], want, rtol=LR_RTOL)
    assert any(n.startswith("numerics differ: --grad-accum 4: mlx-lm averages") for n in result.notes)

"""What `--fine-tune dora` and `--fine-tune full` write, loaded by the tools users load it with
(integration: each backend trains 3 steps of the default preset in a child process, once per
module; the numbers to match are each run's own `probe_logits.npy`, its trained model's logits on
the probe row, ftcore.backends.result_fields.probe_batch).

- DoRA: every backend's adapter/ loads with `PeftModel.from_pretrained` and in ftcore's MLX model
  (what `ftcore generate` decodes with), every backend's adapter_mlx_lm/ with
  `mlx_lm.load(base, adapter_path=...)`, each within FP32_LOGITS_ATOL of the run's probe logits;
  the MLX backends' PEFT files hold exactly the tensor names and config PEFT itself writes.
- full: every backend's model/ (no adapter folders) holds the base checkpoint's tensor names and
  loads with `LlamaForCausalLM.from_pretrained`, `mlx_lm.load` and, after `ftcore convert`,
  ftcore's MLX model, within FP32_LOGITS_ATOL of the probe logits.
- `ftcore generate` from a DoRA adapter and from a full checkpoint (as --model): the same greedy
  tokens in torch and MLX, not the base model's.
"""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor

import mlx.core as mx
import numpy as np
import pytest
from helpers import ftcore_in_process, mlx_logits, passive_omp, torch_logits
from safetensors import safe_open

from ftcore.backends.result_fields import PROBE_FILE, PROBE_POSITIONS, probe_batch
from ftcore.config import RunConfig
from ftcore.run.generate_text import mlx_model, torch_model
from ftcore.tolerances import FP32_LOGITS_ATOL

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BACKENDS = ("torch", "mlx", "mlx-lm")
# 3 steps at lr 1e-2, no warm-up: the DoRA magnitudes move so far that an adapter loaded without
# them (or as plain LoRA) misses the probe logits by >> the tolerance (0.1 already at the default
# 3e-3), and the greedy answers differ from the base model's
RUN = dict(steps=3, warmup_steps=0, lr=1e-2, num_samples=8, eval_samples=0, batch_size=2,
           max_seq_len=64, threads=1)  # fmt: skip
PROMPTS = ("Spell candle in reverse.", "What is 2 + 3?", "Reverse the word forest.")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{"model_dir", "probe" (the probe row), (backend, fine_tune): out_dir}: dora and full in
    every backend, two children at a time on the same prepared batches."""
    from ftcore.run.backend_process import run_backend
    from ftcore.run.preflight import prepare

    root = tmp_path_factory.mktemp("outputs")
    preps = {f: prepare(RunConfig(**RUN, fine_tune=f), root / f) for f in ("dora", "full")}
    jobs = [(b, f) for b in BACKENDS for f in preps]
    with passive_omp(), ThreadPoolExecutor(2) as pool:
        done = {job: pool.submit(run_backend, job[0], preps[job[1]], root / job[1] / job[0])
                for job in jobs}  # fmt: skip
        for job, future in done.items():
            assert future.result().status == "ok", f"{job}: {future.result().error}"
    probe = probe_batch(preps["dora"].batches)
    assert probe["attention_mask"][0, :PROBE_POSITIONS].all()  # mlx-lm's forward takes no mask
    assert probe_batch(preps["full"].batches)["input_ids"].tolist() == probe["input_ids"].tolist()
    return {"model_dir": preps["dora"].model_dir, "probe": probe} | {
        job: root / job[1] / job[0] for job in jobs
    }


def matches_probe(logits: np.ndarray, out, probe) -> float:
    """max |logits - the run's probe logits| over the probe window (real tokens: the fixture);
    logits (1, L, V)."""
    return float(np.abs(logits[0, :PROBE_POSITIONS] - np.load(out / PROBE_FILE)).max())


def hf_logits(model, probe) -> np.ndarray:
    return torch_logits(model, probe["input_ids"], probe["attention_mask"])


def mlx_lm_logits(model, probe) -> np.ndarray:
    """mlx-lm's forward takes no mask: the probe window is all real tokens (the fixture)."""
    return np.array(model(mx.array(probe["input_ids"])).astype(mx.float32))


def tensor_names(path) -> set[str]:
    with safe_open(str(path), "np") as f:
        return set(f.keys())


@pytest.mark.parametrize("backend", BACKENDS)
def test_dora_adapter_loads_in_peft_and_ftcore_mlx(runs, backend):
    out, probe, model_dir = runs[(backend, "dora")], runs["probe"], runs["model_dir"]
    peft = torch_model(model_dir, out / "adapter")  # PeftModel.from_pretrained
    assert peft.base_model.model.model.layers[0].self_attn.q_proj.use_dora["default"]
    got = hf_logits(peft, probe)
    assert matches_probe(got, out, probe) < FP32_LOGITS_ATOL
    assert matches_probe(hf_logits(torch_model(model_dir, None), probe), out, probe) > 1e-2
    mlx = mlx_model(model_dir, out / "adapter")  # ftcore's DoRALinear, as `generate` builds it
    got = mlx_logits(mlx, probe["input_ids"], probe["attention_mask"])
    assert matches_probe(got, out, probe) < FP32_LOGITS_ATOL
    if backend != "torch":  # PEFT's own file's names and DoRA config, not just loadable ones
        peft_dir = runs[("torch", "dora")] / "adapter"
        assert tensor_names(out / "adapter" / "adapter_model.safetensors") == tensor_names(
            peft_dir / "adapter_model.safetensors")
        ours, theirs = (json.loads((d / "adapter_config.json").read_text())
                        for d in (out / "adapter", peft_dir))  # fmt: skip
        for key in ("peft_type", "r", "lora_alpha", "use_dora", "use_rslora", "bias"):
            assert ours[key] == theirs[key], key
        assert sorted(ours["target_modules"]) == sorted(theirs["target_modules"])


@pytest.mark.mlx_lm
@pytest.mark.parametrize("backend", BACKENDS)
def test_dora_adapter_loads_in_mlx_lm(runs, backend):
    import mlx_lm

    out, probe = runs[(backend, "dora")], runs["probe"]
    model, _ = mlx_lm.load(str(runs["model_dir"]), adapter_path=str(out / "adapter_mlx_lm"))
    assert matches_probe(mlx_lm_logits(model, probe), out, probe) < FP32_LOGITS_ATOL


@pytest.mark.mlx_lm
@pytest.mark.parametrize("backend", BACKENDS)
def test_full_checkpoint_loads_in_transformers_mlx_lm_and_after_convert(runs, backend, tmp_path):
    import mlx_lm

    from ftcore.mlx.model import load_model

    out, probe, base = runs[(backend, "full")], runs["probe"], runs["model_dir"]
    assert not (out / "adapter").exists() and not (out / "adapter_mlx_lm").exists()
    assert tensor_names(out / "model" / "model.safetensors") == tensor_names(
        base / "model.safetensors")
    got = hf_logits(torch_model(out / "model", None), probe)  # LlamaForCausalLM.from_pretrained
    assert matches_probe(got, out, probe) < FP32_LOGITS_ATOL
    assert matches_probe(hf_logits(torch_model(base, None), probe), out, probe) > 1e-2
    # mlx-lm reads the RoPE base at the top level only (default 10000, which the tiny preset
    # also uses, so the logits alone would not show a missing one)
    assert json.loads((out / "model" / "config.json").read_text())["rope_theta"] == 10000.0
    model, _ = mlx_lm.load(str(out / "model"))
    assert matches_probe(mlx_lm_logits(model, probe), out, probe) < FP32_LOGITS_ATOL
    converted = ftcore_in_process("convert", "--model", out / "model", "--out", tmp_path / "mlx")
    assert converted.returncode == 0, converted.stderr
    model, _ = load_model(tmp_path / "mlx")
    got = mlx_logits(model, probe["input_ids"], probe["attention_mask"])
    assert matches_probe(got, out, probe) < FP32_LOGITS_ATOL


def generate(*args) -> list[list[int]]:
    """`ftcore generate ... --json` in torch and in MLX: each one's token ids per prompt."""
    prompts = [a for p in PROMPTS for a in ("--prompt", p)]
    tokens = []
    for backend in ("torch", "mlx"):
        r = ftcore_in_process("generate", *args, *prompts, "--backend", backend,
                              "--max-new-tokens", 10, "--json")  # fmt: skip
        assert r.returncode == 0, r.stderr
        tokens.append([json.loads(line)["tokens"] for line in r.stdout.splitlines()])
    assert len(tokens[0]) == len(PROMPTS)
    assert tokens[0] == tokens[1]  # torch == MLX, token for token
    return tokens[0]


@pytest.fixture(scope="module")
def base_answers(runs) -> list[list[int]]:
    return generate("--model", runs["model_dir"])


# one output of each kind, from ftcore's MLX writer and from PEFT / transformers' save_pretrained
# (the other backends' outputs load as these do: the tests above)
@pytest.mark.parametrize("backend, fine_tune", [("mlx", "dora"), ("torch", "full")])
def test_generate_from_a_dora_adapter_or_a_full_checkpoint(runs, base_answers, backend, fine_tune):
    out, model_dir = runs[(backend, fine_tune)], runs["model_dir"]
    if fine_tune == "dora":
        assert generate("--model", model_dir, "--adapter", out / "adapter") != base_answers
    else:  # the checkpoint alone, as a model; its recorded prompt format is the one asked in
        assert generate("--model", out / "model") != base_answers
        r = ftcore_in_process("generate", "--model", out / "model", "--prompt-format", "chat",
                              "--prompt", PROMPTS[0])  # fmt: skip
        assert r.returncode == 2 and "was trained with --prompt-format alpaca" in r.stderr, r.stderr


def _refused(adapter, model_dir) -> str:
    r = ftcore_in_process("generate", "--model", model_dir, "--adapter", adapter, "--prompt", "Hi")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    return lines[0]


def test_generate_refuses_a_dora_adapter_that_would_act_as_another(runs, tmp_path):
    """Magnitudes under use_dora false (PEFT would load plain LoRA and drop them), or a magnitude
    missing (PEFT would start it from the weights: that layer's DoRA undone): one line each."""
    from safetensors.numpy import load_file, save_file

    src, model_dir = runs[("mlx", "dora")] / "adapter", runs["model_dir"]
    lora = shutil.copytree(src, tmp_path / "as-lora")
    config = json.loads((lora / "adapter_config.json").read_text()) | {"use_dora": False}
    (lora / "adapter_config.json").write_text(json.dumps(config))
    assert "says use_dora false; the folder's weights and config disagree" in _refused(
        lora, model_dir)
    partial = shutil.copytree(src, tmp_path / "partial")
    tensors = load_file(str(partial / "adapter_model.safetensors"))
    del tensors["base_model.model.model.layers.1.mlp.up_proj.lora_magnitude_vector"]
    save_file(tensors, str(partial / "adapter_model.safetensors"))
    assert ("lacks 1 LoRA tensor(s) its config names, e.g. "
            "model.layers.1.mlp.up_proj.lora_magnitude_vector") in _refused(partial, model_dir)

"""Helpers shared by the test modules (imported as `helpers`, like `parity_utils`):

- `ftcore(...)`: the command line in a fresh interpreter;
- `ftcore_in_process(...)`: the same `cli.main` in this process, for commands that end before any
  child starts (user errors, exit 2): no interpreter start-up per case;
- `RESULT_FIELDS`: the figures every backend's result.json must hold on an ok run (not None);
- `broken_model(...)`: a copy of a checkpoint folder with one thing wrong;
- `TINY`, `make_hf_model(...)`, `save_hf_model(...)`: tiny random HF Llamas;
- `torch_logits`, `mlx_logits`, `max_err_real`: logits on both sides and their comparison;
- `raw_tensors(...)`: a safetensors file's (or folder's) tensors as raw bytes, for bitwise checks.

torch, MLX and the transformers models are imported inside the functions that need them, so the
tests that only drive the command line do not pay for them.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from ftcore.result import figures

try:  # keep "Writing model shards" bars out of the test output
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as _hf_logging

    disable_progress_bars()
    _hf_logging.disable_progress_bar()
except ImportError:  # pragma: no cover - older versions
    pass

# ----------------------------------------------------------------------------- command line


def ftcore(*args: Any, timeout: float = 300, cwd: str | Path | None = None):
    """`python -m ftcore ARGS...` (arguments str()-ed); the CompletedProcess, output as text."""
    return subprocess.run(
        [sys.executable, "-m", "ftcore", *map(str, args)],
        capture_output=True, text=True, timeout=timeout, cwd=cwd,
    )  # fmt: skip


def passive_omp():
    """OMP_WAIT_POLICY=passive for the children started inside (they copy os.environ). For tests
    that run two children at once on 2 cores: torch's OpenMP threads otherwise spin on the cores
    the other child needs (the trajectory fixture: 98-175 s active, 48 s passive, same losses).
    Timing only, never the numbers; the benchmarks keep the default a user's run has."""
    from unittest import mock

    return mock.patch.dict(os.environ, OMP_WAIT_POLICY="passive")


def ftcore_together(*commands: list[Any], timeout: float = 300) -> list[subprocess.CompletedProcess]:
    """`ftcore(*command)` for each command, two at a time (passive_omp): independent runs whose
    figures do not depend on timing overlap their start-up (imports, one core each) on 2 cores."""
    from concurrent.futures import ThreadPoolExecutor

    with passive_omp(), ThreadPoolExecutor(2) as pool:
        return list(pool.map(lambda cmd: ftcore(*cmd, timeout=timeout), commands))


def ftcore_in_process(*args: Any) -> subprocess.CompletedProcess:
    """`ftcore ARGS...` through `ftcore.cli.main` in this process, stdout and stderr captured; the
    same CompletedProcess shape as `ftcore(...)`. For refusals only: a command that starts
    backends would run them as this process's children. `test_cli.py` proves with a subprocess
    that the real command line takes the same path."""
    import io
    import signal

    from ftcore import cli

    argv = list(map(str, args))
    out, err = io.StringIO(), io.StringIO()
    sigterm = signal.getsignal(signal.SIGTERM)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = cli.main(argv)
            except SystemExit as e:  # argparse's --help
                code = e.code or 0
    finally:
        signal.signal(signal.SIGTERM, sigterm)  # main() installs its own handler
        cli.ACTIVE_RUN = None
    return subprocess.CompletedProcess(["ftcore", *argv], code, out.getvalue(), err.getvalue())


# ----------------------------------------------------------------------------- results and folders

# The figures every backend fills in (result.json) on an ok run: the schema's `required` tag.
RESULT_FIELDS = figures("required")

GPT2_CONFIG = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}


def broken_model(src: Path, root: Path, kind: str) -> Path:
    """A copy of the checkpoint folder `src` at root/kind with one thing wrong: "no-config" (no
    config.json), "gpt2" (a GPT-2 config.json) or "pickle-only" (the same weights as a torch.save
    pickle, pytorch_model.bin, and no safetensors)."""
    d = root / kind
    shutil.copytree(src, d)
    if kind == "no-config":
        (d / "config.json").unlink()
    elif kind == "gpt2":
        (d / "config.json").write_text(json.dumps(GPT2_CONFIG))
    elif kind == "pickle-only":
        import torch
        from safetensors.torch import load_file

        torch.save(load_file(d / "model.safetensors"), d / "pytorch_model.bin")
        (d / "model.safetensors").unlink()
    else:
        raise ValueError(f"unknown kind {kind!r}")
    return d


# ----------------------------------------------------------------------------- tiny HF checkpoints

# A small fixed HF Llama config for the example-based tests (GQA; a 0.02 init hides RoPE bugs).
TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    initializer_range=0.2,
)


def make_hf_model(cfg: dict[str, Any], seed: int, dtype=None, norm_jitter: float = 0.3):
    """A random LlamaForCausalLM in eval mode (init std = cfg's initializer_range; rope_theta, if
    given, becomes default RoPE parameters), RMSNorm weights jittered by N(0, norm_jitter^2)
    (at 1.0 exactly a norm bug could hide). dtype defaults to fp32."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(cfg)
    theta = cfg.pop("rope_theta", 10000.0)
    torch.manual_seed(seed)
    conf = LlamaConfig(**cfg, rope_parameters={"rope_type": "default", "rope_theta": theta})
    model = LlamaForCausalLM(conf)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(norm_jitter * torch.randn_like(p))
    return model.to(dtype or torch.float32).eval()


def save_hf_model(path: Path, dtype=None, seed: int = 0, **overrides) -> Path:
    """TINY (with `overrides`) as a random HF checkpoint folder (safetensors), norm weights jittered
    by 0.2: the fixed checkpoint of the converter and MLX-model tests."""
    make_hf_model({**TINY, **overrides}, seed, dtype, norm_jitter=0.2).save_pretrained(
        path, safe_serialization=True
    )
    return path


# ----------------------------------------------------------------------------- logits and comparisons


def torch_logits(model, ids: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """fp32 numpy logits of a transformers / PEFT model on a numpy batch, without autograd."""
    import torch

    with torch.no_grad():
        am = None if mask is None else torch.from_numpy(mask)
        return model(input_ids=torch.from_numpy(ids), attention_mask=am).logits.float().numpy()


def mlx_logits(model, ids: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """fp32 numpy logits of ftcore's MLX model on a numpy batch."""
    import mlx.core as mx

    out = model(mx.array(ids), None if mask is None else mx.array(mask))
    return np.array(out.astype(mx.float32))


def max_err_real(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """Largest |a - b| over non-pad positions only."""
    return float(np.abs(a - b)[mask.astype(bool)].max())


def raw_tensors(folder_or_file: Path) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    """name -> (dtype, shape, raw bytes) over one safetensors file, or every *.safetensors file of
    a folder (a name in two files is an error)."""
    import torch
    from safetensors import safe_open

    folder_or_file = Path(folder_or_file)
    files = (
        [folder_or_file]
        if folder_or_file.is_file()
        else sorted(folder_or_file.glob("*.safetensors"))
    )
    out = {}
    for f in files:
        with safe_open(str(f), "pt") as h:
            for k in h.keys():  # noqa: SIM118 (safe_open has no __iter__)
                t = h.get_tensor(k)
                assert k not in out, f"{k} in two files"
                out[k] = (
                    str(t.dtype),
                    tuple(t.shape),
                    t.contiguous().view(torch.uint8).numpy().tobytes(),
                )
    return out


# TinyLlama-1.1B-Chat-v1.0's chat template (its tokenizer_config.json), the model ftcore is about.
TINYLLAMA_CHAT_TEMPLATE = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n"
    "{{ '<|user|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'system' %}\n"
    "{{ '<|system|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'assistant' %}\n"
    "{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}"
)


def with_chat_template(src: Path, dst: Path, template: str = TINYLLAMA_CHAT_TEMPLATE) -> Path:
    """A copy of the model folder src whose tokenizer carries `template` (default TinyLlama-Chat's)."""
    shutil.copytree(src, dst)
    config = json.loads((dst / "tokenizer_config.json").read_text())
    config["chat_template"] = template
    (dst / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return dst

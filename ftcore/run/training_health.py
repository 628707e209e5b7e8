"""Did the fine-tune learn, and is the adapter it wrote sane? Checked by the parent after every
backend's run, on what the child wrote (its PEFT adapter file and its per-step losses), so every
backend is held to the same rule, whatever its own loop checks.

- `failed`, "the adapter did not move": every lora_B tensor is exactly 0 after training. B
  starts at 0 in every backend, so this run applied no update at all (e.g. an Adam eps so large
  that every update rounds to 0): its figures describe a fine-tune that did not happen.
- `diverged`, non-finite or exploded weights: an adapter weight is NaN/Inf, or its magnitude
  exceeds EXPLODED (a working LoRA fine-tune keeps them O(1): Adam moves a weight by about the
  learning rate per step).
- `diverged`, collapsed: the last COLLAPSE_STEPS losses all lie within COLLAPSE_ATOL of ln(vocab)
  (the model predicts a uniform distribution) although the first loss did not.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

EXPLODED = 1e4  # |adapter weight| beyond this: diverged (the default moves them by <= ~0.2)
COLLAPSE_STEPS = 3
COLLAPSE_ATOL = 1e-4
ADAPTER_FILE = "adapter_model.safetensors"


def nonfinite(tensors: dict[str, Any]) -> list[str]:
    """Names of the tensors holding NaN or Inf, sorted."""
    return sorted(k for k, v in tensors.items() if not np.isfinite(v).all())


def largest_weight(tensors: dict[str, Any]) -> tuple[str, float]:
    """(name, max |w|) of the tensor with the largest magnitude; ("", 0.0) when there is none."""
    return max(((k, float(np.abs(v).max(initial=0.0))) for k, v in tensors.items()),
               key=lambda kv: kv[1], default=("", 0.0))


def adapter_problem(adapter_dir: Path) -> tuple[str, str] | None:
    """(status, reason) when the adapter in `adapter_dir` did not move or is not sane; None when
    it is fine or there is no adapter file to read."""
    from safetensors.numpy import load_file

    path = adapter_dir / ADAPTER_FILE
    if not path.is_file():
        return None
    tensors = {k: v.astype(np.float32) for k, v in load_file(str(path)).items()}
    if bad := nonfinite(tensors):
        return "diverged", f"the trained adapter holds NaN or Inf ({bad[0]}, {len(bad)} tensor(s))"
    name, biggest = largest_weight(tensors)
    if biggest > EXPLODED:
        return (
            "diverged",
            f"the adapter's weights exploded: max |w| = {biggest:.3g} in {name} (> {EXPLODED:g})",
        )
    b = [v for k, v in tensors.items() if "lora_B" in k]
    if b and all(not v.any() for v in b):
        return "failed", (
            "the adapter did not move: every lora_B is still 0 after training, so no update "
            "was applied (check --lr, --adam-eps, --max-grad-norm)"
        )
    return None


def collapsed(losses: list[float], vocab_size: int) -> str | None:
    """The reason when the losses end pinned at ln(vocab) (uniform output), else None."""
    uniform = math.log(vocab_size)
    tail = losses[-COLLAPSE_STEPS:]
    if len(losses) <= COLLAPSE_STEPS or abs(losses[0] - uniform) <= COLLAPSE_ATOL:
        return None
    if all(isinstance(x, float) and abs(x - uniform) <= COLLAPSE_ATOL for x in tail):
        return (f"collapsed to a uniform output: the last {len(tail)} losses equal ln(vocab) = "
                f"{uniform:.4f} (first loss {losses[0]:.4f})")
    return None

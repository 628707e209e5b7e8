"""The device a torch process runs on and waiting for it (the mirror of ftcore.mlx.runtime)."""

from __future__ import annotations

import torch

from ftcore.config import UserError


def pick_device(device: str) -> torch.device:
    if device == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    raise UserError("--device gpu: torch sees no CUDA or MPS device on this machine")


def sync(device: torch.device) -> None:
    """Wait for queued kernels so a wall-clock reading covers the work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    elif device.type == "mps":
        torch.mps.synchronize()

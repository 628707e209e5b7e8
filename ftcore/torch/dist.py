"""torch.distributed for data-parallel ranks (launched by torchrun; ftcore.process.ranks): gloo on
the CPU, NCCL on CUDA, and one all-reduce of the LoRA gradients and the loss per step."""

from __future__ import annotations

import time
from datetime import timedelta

import torch
import torch.distributed as dist

from ftcore.torch.runtime import sync

# a collective waiting this long fails (the parent's watch is first)
TIMEOUT = timedelta(minutes=10)


def pick_rank_gpu(cfg, local_rank: int) -> None:
    """--device gpu: rank r on GPU r mod the GPUs this machine has (before the model loads)."""
    if cfg.device == "gpu" and torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())


def init(device: torch.device, local_world: int) -> None:
    """NCCL when every rank of this machine has a GPU of its own (NCCL refuses two ranks on one
    GPU), else gloo (which all-reduces CUDA tensors too)."""
    nccl = device.type == "cuda" and torch.cuda.device_count() >= local_world
    dist.init_process_group("nccl" if nccl else "gloo", timeout=TIMEOUT)


def all_reduce_step(params: list[torch.Tensor], loss: torch.Tensor,
                    device: torch.device) -> tuple[float, float]:
    """Sum every rank's gradients (in place) and loss with one all-reduce; each rank's loss is
    already its shard's CE sum over the GLOBAL target count. Returns (global loss, seconds)."""
    grads = [p.grad for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads] + [loss.detach().reshape(1).to(grads[0].dtype)])
    sync(device)
    t0 = time.perf_counter()
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    sync(device)
    seconds = time.perf_counter() - t0
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
    return float(flat[-1].item()), seconds


def close() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()

"""`torch-compile` backend: the `torch` backend's loop and step (backends.torch.TorchRecipe) with
the forward pass and the loss (ftcore.torch.loss.loss_sum_count) under torch.compile (inductor), as
a PyTorch user who wants speed runs it. Backward runs AOTAutograd's compiled backward graph;
clipping and AdamW stay eager (torch.optim's foreach kernels), as in `torch`.

The compile is done before the timed loop, as MLX's kernel build is kept out of the timed steps:
`ready()` runs a forward + backward on the first batch of every distinct width the run will feed
(its first micro-batch with --grad-accum: the micro-batches of a step share its width, so no new
graphs), then drops the gradients (no optimizer step: the weights and AdamW state are untouched,
and the RNG is restored so LoRA dropout draws the masks `torch` draws). Its time is
`compile_time_s`, the graphs compiled `extra["compiled_graphs"]`; a graph compiled inside the timed
steps is a warning. Inductor's caches live under ftcore's cache (ftcore.torch.env), so a second
run compiles warm.
"""

from __future__ import annotations

import time

import torch
import torch._dynamo
import torch._inductor.config

from ftcore.backends.loop import train_with
from ftcore.backends.run_context import BackendRun
from ftcore.backends.torch import TorchRecipe
from ftcore.inputs.loss_contract import micro_batches
from ftcore.result import RunResult
from ftcore.torch.loss import loss_sum_count
from ftcore.torch.runtime import sync

# One static graph per batch width (dynamic=False) rather than one with a symbolic width. Measured
# at the default size (tiny-pretrained, batch 4; the built-in data makes one width, 65), forward +
# backward of both interleaved in one process over 3 x 60 batches on 2 cores shared with other
# jobs (load 3-5): eager 297 ms, static 192 ms, dynamic 188 ms (alike within the noise); compile
# static 7.8 s warm / ~52 s cold, dynamic 40 s warm / 200 s cold. At --max-seq-len 512 `longest`
# feeds up to 16 widths: a graph each, the recompile limit raised to fit them (ready()).
DYNAMIC = False


def compiled_graphs() -> int:
    """Graphs dynamo has compiled in this process so far."""
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


class TorchCompileRecipe(TorchRecipe):
    def ready(self) -> None:
        super().ready()  # train mode: the compiled graphs are traced in it
        run, result = self.run, self.run.result
        first_of_width: dict[int, int] = {}  # width -> the first step that feeds it
        for step in range(run.cfg.steps):
            first_of_width.setdefault(int(run.batches.step(step)["input_ids"].shape[1]), step)
        torch._dynamo.reset()  # this run's graphs only (a test trains several in one process)
        # a recompile past the limit would fall back to eager silently: raise it, and fail loudly
        torch._dynamo.config.recompile_limit = max(8, len(first_of_width) + 1)
        torch._dynamo.config.fail_on_recompile_limit_hit = True
        # random ops (LoRA dropout) call aten's, drawing torch's masks, not inductor's own RNG
        torch._inductor.config.fallback_random = True
        self.loss_fn = torch.compile(loss_sum_count, dynamic=DYNAMIC, fullgraph=True)
        result.compiled_step = True
        t0 = time.perf_counter()
        # the RNG restored after: the timed steps draw the LoRA dropout masks `torch` draws
        with torch.random.fork_rng([self.device] if self.device.type == "cuda" else []):
            for step in first_of_width.values():  # a micro-batch: the shape the steps feed
                micro = micro_batches(run.batches.step(step), run.cfg.grad_accum)[0]
                loss_sum, count = self.loss_fn(self.model, self.batch(micro), run.batches.packed)
                (loss_sum / count.clamp(min=1)).backward()
                self.opt.zero_grad(set_to_none=True)  # no step: weights and AdamW state as loaded
            sync(self.device)
        result.compile_time_s = time.perf_counter() - t0
        self.graphs = compiled_graphs()
        result.extra["compiled_graphs"] = self.graphs
        result.extra["compiled_widths"] = sorted(first_of_width)

    def end_steps(self) -> None:
        super().end_steps()
        if late := compiled_graphs() - self.graphs:
            self.run.result.warn(f"torch.compile compiled {late} graph(s) inside the timed steps")


def train(run: BackendRun) -> RunResult:
    return train_with(run, TorchCompileRecipe(run))

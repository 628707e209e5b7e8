"""Full-parameter pretraining of the `tiny-pretrained` preset, offline, on the built-in word tasks.

Run once when the preset is first materialised (ftcore.models), then cached. The recipe is fixed
(PRETRAIN_RECIPE, part of the preset's cache fingerprint): a fresh seeded model, AdamW, linear
warm-up then cosine decay, gradient clipping, the loss on responses only (prompts masked), each
batch padded to its longest record. 700 steps of 32 records took 106 s on a quiet 2-core VM.
The result learns PRETRAIN_FAMILIES (exact-match accuracy ~0.9-1.0 each) and has never seen
FINETUNE_FAMILIES, which is what the default fine-tune then teaches it.

Same recipe, same torch build and thread count -> the same weights; other thread counts may
change the float summation order, so weights can differ in the last bits between machines.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any

from ftcore.synthetic import PRETRAIN_FAMILIES, synthetic_records

PRETRAIN_RECIPE: dict[str, Any] = dict(
    steps=700,
    batch_size=32,
    max_seq_len=96,
    lr=3e-3,
    warmup_steps=30,
    min_lr_ratio=0.1,  # cosine decays to 10% of lr
    max_grad_norm=1.0,
    data_seed=1,
    families=[f.__name__ for f in PRETRAIN_FAMILIES],
)


def recipe_lr(step: int, r: dict[str, Any] = PRETRAIN_RECIPE) -> float:
    if step < r["warmup_steps"]:
        return r["lr"] * (step + 1) / r["warmup_steps"]
    progress = (step - r["warmup_steps"]) / max(1, r["steps"] - r["warmup_steps"])
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return r["lr"] * (r["min_lr_ratio"] + (1 - r["min_lr_ratio"]) * cosine)


def pretrain(model: Any, tokenizer: Any, recipe: dict[str, Any] = PRETRAIN_RECIPE, log=sys.stderr) -> dict[str, Any]:
    """Train every parameter of the (torch, fp32) `model` in place; returns what happened
    (steps, seconds, first/last loss, threads) for the preset's ftcore_preset.json."""
    import torch

    from ftcore.data import tokenize_records
    from ftcore.loss import IGNORE_INDEX

    r = recipe
    B, L = r["batch_size"], r["max_seq_len"]
    records = synthetic_records(r["steps"] * B, seed=r["data_seed"], families=PRETRAIN_FAMILIES)
    tok = tokenize_records(records, tokenizer, L, mask_prompt=True)
    pad = tokenizer.eos_token_id
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=r["lr"], betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    model.train()
    losses: list[float] = []
    t0 = time.perf_counter()
    for step in range(r["steps"]):
        rows = range(step * B, min((step + 1) * B, len(tok.ids)))  # dropped records shorten the tail
        if not rows:
            break
        width = max(len(tok.ids[i]) for i in rows)  # (B, width): padded to this batch's longest
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, i in enumerate(rows):
            n = len(tok.ids[i])
            ids[j, :n] = torch.tensor(tok.ids[i])
            labels[j, :n] = torch.tensor(tok.labels[i])
            mask[j, :n] = 1
        for g in opt.param_groups:
            g["lr"] = recipe_lr(step, r)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, r["max_grad_norm"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if log is not None and (step + 1) % 100 == 0:
            print(f"  pretraining step {step + 1}/{r['steps']}: loss {losses[-1]:.4f} "
                  f"({time.perf_counter() - t0:.0f} s)", file=log, flush=True)
    model.eval()
    return {
        "steps": len(losses),
        "seconds": round(time.perf_counter() - t0, 1),
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }

"""Full-parameter pretraining of the `tiny-pretrained` preset, offline, on the built-in word tasks.

The weights ftcore uses are made once, by `ftcore pretrain --out DIR`, and shipped in the package
(ftcore/presets/tiny-pretrained, served by ftcore.inputs.presets.shipped_preset): float results of
this recipe depend on the CPU and thread count (summation order), so a preset pretrained on each
user's machine would be a different base model on each. The recipe is fixed (PRETRAIN_RECIPE; it,
its data and this module's training code make the preset's fingerprint, recipe_inputs): a fresh
seeded model, AdamW, linear warm-up then cosine decay, gradient clipping, the loss on responses
only (prompts masked), each batch padded to its longest record. 700 steps of 32 records take
1-2 minutes on 2 cores. The result learns PRETRAIN_FAMILIES and has never seen FINETUNE_FAMILIES,
which is what the default fine-tune then teaches it (family_exact_match measures both).
"""

from __future__ import annotations

import inspect
import math
import random
import sys
import time
from typing import Any

from ftcore.inputs.synthetic import ALL_FAMILIES, PRETRAIN_FAMILIES, synthetic_records

PRETRAIN_RECIPE: dict[str, Any] = dict(
    steps=700,
    batch_size=32,
    max_seq_len=96,
    lr=3e-3,
    warmup_steps=30,
    min_lr_ratio=0.1,  # cosine decays to 10% of lr
    max_grad_norm=1.0,
    # 1 and 2 gave bases that already answer the held-out "Spell W in reverse" (44%, 94%)
    data_seed=3,
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

    from ftcore.inputs.loss_contract import IGNORE_INDEX
    from ftcore.inputs.token_rows import tokenize_records

    r = recipe
    B, L = r["batch_size"], r["max_seq_len"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same float summation order on any core count (not any CPU)
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
    torch.set_num_threads(threads)
    return {
        "steps": len(losses),
        "seconds": round(time.perf_counter() - t0, 1),
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "threads": 1,
        "torch": torch.__version__,
    }


def recipe_inputs(r: dict[str, Any] = PRETRAIN_RECIPE) -> str:
    """What the pretraining's result depends on besides the recipe dict, as text for the preset's
    fingerprint: its records in the Alpaca template, and the training code (this loop and its
    schedule)."""
    from ftcore.inputs.records import format_prompt

    records = synthetic_records(
        r["steps"] * r["batch_size"], seed=r["data_seed"], families=PRETRAIN_FAMILIES
    )
    data = "\n".join(format_prompt(x) + x["output"] for x in records)
    return data + training_code(pretrain) + training_code(recipe_lr)


def training_code(fn: Any) -> str:
    """`fn`'s source without its ftcore import lines: where a helper module lives (a rename, a
    move) is not what the loop computes, so it does not make a new preset."""
    lines = inspect.getsource(fn).splitlines(keepends=True)
    return "".join(
        ln for ln in lines if not ln.lstrip().startswith(("from ftcore", "import ftcore"))
    )


def family_exact_match(
    model: Any, tokenizer: Any, n_per_family: int = 32, seed: int = 7
) -> dict[str, float]:
    """Greedy exact-match share per built-in task family (`n_per_family` records each), computed
    teacher-forced: a greedy answer is the expected one (response + EOS) exactly when, fed the
    expected prefix, the model's argmax is the expected token at every answer position (ties
    aside). So one forward pass per family stands in for a decoding loop."""
    import torch

    from ftcore.inputs.batching import pad_rows
    from ftcore.inputs.loss_contract import IGNORE_INDEX
    from ftcore.inputs.token_rows import pad_id_of, tokenize_records

    shares = {}
    for family in ALL_FAMILIES:
        rng = random.Random(seed)
        tok = tokenize_records(
            [family(rng) for _ in range(n_per_family)], tokenizer, 1024, mask_prompt=True
        )
        rows = pad_rows(
            tok, list(range(len(tok.ids))), max(map(len, tok.ids)), pad_id_of(tokenizer)
        )
        # (n, width)
        ids, labels, mask = (
            torch.from_numpy(rows[k]) for k in ("input_ids", "labels", "attention_mask")
        )
        with torch.no_grad():
            # predicts ids[:, 1:]
            pred = model(input_ids=ids, attention_mask=mask).logits[:, :-1].argmax(-1)
        target = labels[:, 1:]
        right = ((pred == target) | (target == IGNORE_INDEX)).all(dim=1)
        shares[family.__name__] = round(right.float().mean().item(), 4)
    return shares

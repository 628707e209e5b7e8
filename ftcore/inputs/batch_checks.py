"""What a run's batches must satisfy before any array is made, and what about its records a user
must hear: the memory the training batches take, the steps --epochs come to, dropped, prompt-only
and blank records. ftcore.inputs.batches calls these while it builds the batches."""

from __future__ import annotations

from ftcore.config import RunConfig, UserError
from ftcore.inputs.batching import epoch_steps
from ftcore.inputs.token_rows import Tokenized

# Every step's batch is built in Python and written to OUT/batches.npz before the first step, and
# progress is said every 10% of the steps: 200,000 steps took ~30 s and 1.2 GiB before the first
# step here, then ~20,000 steps (about an hour) before the first progress line.
MAX_STEPS = 100_000


def check_batches_fit(cfg: RunConfig, packed: bool) -> None:
    """Refuse, before any array is made, training batches that cannot be made in reasonable time or
    memory: more than MAX_STEPS steps, or more than half of this machine's available memory (steps
    x batch x max_seq_len x their int64 arrays, an upper bound: `longest` batches may be
    narrower). `--steps 10000000` once allocated 19 GiB and died; `--steps 200000` seemed hung."""
    import psutil

    asked = (
        f"--epochs {cfg.epochs} ({cfg.steps} steps)"
        if cfg.epochs is not None
        else f"--steps {cfg.steps}"
    )
    if cfg.steps > MAX_STEPS:
        raise UserError(
            f"{asked}: at most {MAX_STEPS} steps: every step's batch is made and written to the "
            "run folder before the first step, and a benchmark needs far fewer; run fewer steps "
            "or epochs"
        )
    need = cfg.steps * cfg.step_rows * cfg.max_seq_len * 8 * (4 if packed else 3)
    room = psutil.virtual_memory().available / 2
    if need > room:
        raise UserError(
            f"{asked}: the training batches would take up to {need / 2**30:.1f} GiB (steps x batch "
            f"x --max-seq-len x {4 if packed else 3} int64 arrays), more than half of this "
            f"machine's available memory ({2 * room / 2**30:.1f} GiB); run fewer steps or epochs"
        )


def data_warnings(
    records: list[dict[str, str]], train: Tokenized, evals: Tokenized, cfg: RunConfig
) -> list[str]:
    """What about the selected records a user must hear, one line each: records dropped (no answer
    token fits), records that train on prompt text only, empty or whitespace-only fields."""
    out = []
    dropped = train.dropped + evals.dropped
    if dropped:
        out.append(
            f"{dropped} of {len(records)} records dropped ({train.dropped} training, "
            f"{evals.dropped} eval): no answer token fits in --max-seq-len {cfg.max_seq_len}; "
            f"--max-seq-len {max(train.keeps_all_at, evals.keeps_all_at)} keeps them all"
        )
    if train.prompt_only:
        out.append(
            f"{train.prompt_only} training records train on prompt text only: no token of their "
            f"answer fits in --max-seq-len {cfg.max_seq_len} (--no-mask-prompt)"
        )
    empty = sum(
        not r.get("instruction", "").strip() or not r.get("output", "").strip() for r in records
    )
    if empty:
        out.append(
            f"{empty} of {len(records)} records have an empty or whitespace-only instruction or "
            "answer; they train as they are"
        )
    return out


def steps_of_epochs(cfg: RunConfig, n: int, units: str) -> int:
    """The steps --epochs take over n units (epoch_steps), refused in one line when fewer than the
    run needs: more than --timing-warmup-steps (those are left out of the timing) and at least
    --warmup-steps (the LR warm-up), which RunConfig would otherwise blame on those flags."""
    steps = epoch_steps(cfg.epochs, n, cfg.step_rows, cfg.batching)
    need = max(cfg.timing_warmup_steps + 1, cfg.warmup_steps)
    if steps >= need:
        return steps
    enough = next(
        k
        for k in range(cfg.epochs + 1, need + 1)
        if epoch_steps(k, n, cfg.step_rows, cfg.batching) >= need
    )

    def n_steps(k: int) -> str:
        return f"{k} step" + "s" * (k != 1)

    why = []
    if steps <= cfg.timing_warmup_steps:
        why.append(f"the timing leaves out the first {n_steps(cfg.timing_warmup_steps)} as warm-up "
                   f"(--timing-warmup-steps {cfg.timing_warmup_steps})")
    if steps < cfg.warmup_steps:
        why.append(
            f"the learning rate warms up over {n_steps(cfg.warmup_steps)} (--warmup-steps "
            f"{cfg.warmup_steps})"
        )
    raise UserError(
        f"--epochs {cfg.epochs}: {n} {units} at {cfg.step_rows_text} make "
        f"{n_steps(steps)}, too few: {', and '.join(why)}; use --epochs {enough}, more records "
        "(--num-samples) or a smaller --batch-size"
    )

"""The one training skeleton every backend fills in: `train_with(run, recipe)` owns the order of a
run (set-up, eval before, the steps, eval after, the shared result figures) and, for a backend
that owns its steps, the per-step sequence; a backend writes only its `Recipe`.

    setup() -> EvalSchedule | None     load the model and optimizer, fill the model's figures
    rank 0: evals.before()
    ready()                            what waits for the eval before training; train mode
    steps(clock, evals)                the shared loop below, or a trainer that runs its own
    clock.stop(); end_steps()          every rank (close the process group)
    rank 0: evals.after(); finish(); finish_result()     (ranks > 0 hold the same weights)

The shared loop, per step s: the global batch (Batches.step), this rank's shard
(ftcore.process.ranks.shard), `batch(rows)` on the device, `set_lr(cfg.lr_at(s))`, the clock's
feed / lr / begin, `step(batch, count) -> (loss, grad_norm)` ending at its sync point,
clock.end, `after_step(s)`, and on rank 0 the periodic eval and the --target-eval-loss stop.
A trainer that runs its own steps (hf-trainer, mlx-lm) overrides `steps` and calls the clock's
feed / lr / begin / end from its callbacks, so losses, times and LRs are recorded alike.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from ftcore.backends.eval_schedule import EvalSchedule
from ftcore.backends.result_fields import finish_result
from ftcore.backends.run_context import BackendRun
from ftcore.backends.step_clock import StepClock
from ftcore.inputs.loss_contract import target_count
from ftcore.process.ranks import shard
from ftcore.result import RunResult


class Recipe(ABC):
    """What a backend writes: its model, optimizer and steps. `self.run` is the run it trains. A
    backend whose trainer runs its own steps (hf-trainer, mlx-lm) writes `steps`; one whose step
    ftcore's loop drives writes a StepRecipe."""

    def __init__(self, run: BackendRun) -> None:
        self.run = run

    @abstractmethod
    def setup(self) -> EvalSchedule | None:
        """Load the model and optimizer, start run.result (result_fields.start_result); the
        evals to run before, during and after training, or None (the backend evaluates itself)."""

    def ready(self) -> None:  # noqa: B027 (an optional hook: nothing by default)
        """After the eval before training: what must wait for it, and the model in train mode."""

    @abstractmethod
    def steps(self, clock: StepClock, evals: EvalSchedule | None) -> None:
        """Run the training steps, each timed and recorded on `clock`."""

    def end_steps(self) -> None:  # noqa: B027 (an optional hook: nothing by default)
        """Every rank, after the last step."""

    @abstractmethod
    def finish(self) -> None:
        """Rank 0, after the final eval: peak memory, the adapter, probe logits, its own notes."""


class StepRecipe(Recipe):
    """A recipe whose steps ftcore's shared loop drives (`owned_steps`): it writes one step."""

    @abstractmethod
    def batch(self, rows: dict) -> Any:
        """This rank's rows (numpy, (B/W, L)) as the step's input on the device."""

    @abstractmethod
    def set_lr(self, lr: float) -> float:
        """Give the optimizer this step's LR; the LR it holds now, read back."""

    @abstractmethod
    def step(self, batch: Any, count: int) -> tuple[float, float]:
        """One optimizer step, to its sync point: (loss, gradient norm before clipping).
        `count`: the step's global batch's targets (>= 1), which every summed loss is divided by:
        each micro-batch's (--grad-accum), and under data parallel each rank's before the ranks'
        sum (ftcore.inputs.loss_contract)."""

    def after_step(self, step: int) -> None:
        """After step `step` was recorded (every rank)."""

    def steps(self, clock: StepClock, evals: EvalSchedule | None) -> None:
        owned_steps(self, clock, evals)


def owned_steps(recipe: StepRecipe, clock: StepClock, evals: EvalSchedule | None) -> None:
    """The per-step sequence of a loop that owns its steps (see the module's doc)."""
    run = recipe.run
    cfg, batches, ranks = run.cfg, run.batches, run.ranks
    for step in range(cfg.steps):
        fed = batches.step(step)
        mine = shard(fed, ranks.rank, ranks.world) if ranks else fed
        batch, targets = recipe.batch(mine), target_count(mine["labels"])  # this rank's rows
        lr = recipe.set_lr(cfg.lr_at(step))
        clock.feed(fed["input_ids"])  # the global batch, which the ranks split
        clock.lr(lr)
        # the global batch's count: summed over ranks and micro-batches, the losses are the
        # one-batch loss
        count = max(target_count(fed["labels"]), 1)
        clock.begin(step)
        loss, grad_norm = recipe.step(batch, count)
        clock.end(step, loss, grad_norm=grad_norm, targets=targets)
        recipe.after_step(step)
        if not run.lead or evals is None:
            continue  # eval: rank 0 only (the others wait in the next all-reduce)
        if evals.after_step(step, clock.times):
            break  # --target-eval-loss reached (one process only: refused with --nproc > 1)


def train_with(run: BackendRun, recipe: Recipe) -> RunResult:
    """A backend's whole run in this process (see the module's doc)."""
    evals = recipe.setup()
    if run.lead and evals is not None:
        evals.before()  # rank 0 only, as every eval
    recipe.ready()
    clock = StepClock(run)
    recipe.steps(clock, evals)
    clock.stop()
    recipe.end_steps()
    if not run.lead:
        return run.result  # identical weights: rank 0 evaluates and saves
    if evals is not None:
        evals.after(clock.times)
    recipe.finish()
    return finish_result(run, clock.times)

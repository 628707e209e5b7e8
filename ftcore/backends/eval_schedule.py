"""When and how a loop measures what the fine-tune did: eval loss and exact match before the first
step, eval loss every --eval-every steps, both after the last, and the --target-eval-loss stop."""

from __future__ import annotations

import time
from typing import Any

from ftcore.backends.run_context import BackendRun


class EvalSchedule:
    """What the fine-tune did to the model, measured the same way in every loop that owns its steps:
    eval loss and exact-match accuracy of greedy answers before the first step (the adapter's B is
    zero, so this is the base model), eval loss every cfg.eval_every steps, both again after the
    last step; and the stop at --target-eval-loss. Fills run.result.

        # as backends.loop.train_with runs it:
        evals = EvalSchedule(run, evaluate, generate)   # evaluate() -> loss,
        evals.before()                                  # generate(prompt, n, eos) -> ids
        for step ...: <step>; if evals.after_step(step, clock.times): break
        evals.after(clock.times)

    Time to target counts wall time from the first step to the end of the eval that reached the
    target, evals included (as MLPerf counts it); `train_seconds` is the step time alone.
    """

    def __init__(self, run: BackendRun, evaluate: Any, generate: Any) -> None:
        self.cfg, self.batches, self.result = run.cfg, run.batches, run.result
        self.evaluate, self.generate = evaluate, generate
        self.t0 = 0.0
        if self.cfg.target_eval_loss is not None:
            self.result.target = {"eval_loss": self.cfg.target_eval_loss, "reached": False,
                                  "step": None, "seconds": None, "train_seconds": None}  # fmt: skip

    def _answers(self, when: str) -> float | None:
        items = self.batches.answer_items()
        if not (self.cfg.generates and items):
            return None
        eos = int(self.batches.stats["eos_id"])
        outs = [self.generate(prompt, len(answer), eos) for prompt, answer in items]
        self.result.generations[when] = outs
        return sum(o == a for o, (_, a) in zip(outs, items, strict=True)) / len(items)

    def before(self) -> None:
        loss = self.evaluate()
        self.result.eval_loss_before = loss
        if loss is not None:
            self.result.eval_losses.append([0, loss])
        self.result.accuracy_before = self._answers("before")
        self.t0 = time.perf_counter()

    def _eval_at(self, steps_done: int) -> float | None:
        loss = self.evaluate()
        if loss is not None:
            self.result.eval_losses.append([steps_done, loss])
        t = self.result.target
        if t is not None and not t["reached"] and loss is not None and loss <= t["eval_loss"]:
            t.update(reached=True, step=steps_done, seconds=time.perf_counter() - self.t0,
                     train_seconds=sum(self.result.step_times_s[:steps_done]) or None)  # fmt: skip
        return loss

    def after_step(self, step: int, step_times: list[float]) -> bool:
        """After step `step` (0-based): a periodic eval when one is due. True: the target was
        reached, stop training."""
        every, done = self.cfg.eval_every, step + 1
        if not every or done % every or done >= self.cfg.steps:
            return False
        self.result.step_times_s = list(step_times)
        self._eval_at(done)
        return self.result.target is not None and self.result.target["reached"]

    def after(self, step_times: list[float]) -> None:
        """After the last step run: final eval loss (unless the target stop just measured it) and
        accuracy."""
        done = len(step_times)
        self.result.step_times_s = list(step_times)
        last = self.result.eval_losses[-1] if self.result.eval_losses else None
        self.result.eval_loss = (
            last[1] if last and last[0] == done and done > 0 else self._eval_at(done)
        )
        self.result.accuracy_after = self._answers("after")
        self.result.steps = done

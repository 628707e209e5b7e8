"""The `mlx-lm` backend's TrainingCallback (Recorder): mlx-lm's trainer runs the steps, this
records them on ftcore's shared clock (backends.step_clock), one optimizer step per report."""

from __future__ import annotations

import mlx.optimizers as optim
import numpy as np

from ftcore.backends.step_clock import StepClock


class Recorder:
    """mlx-lm TrainingCallback: with steps_per_report = grad_accum (N) each report is one
    optimizer step's loss and time. `batches` is the iterate_batches hook for training, fed the
    micro-batches in order: on a step's first one the step gate waits there, right before mlx-lm
    starts its clock for it; on its last the whole step's ids are fed."""

    def __init__(self, clock: StepClock, opt: optim.Optimizer, grad_accum: int) -> None:
        self.clock, self.opt, self.n = clock, opt, grad_accum
        self.ran = 0  # micro-batches yielded since the last report

    def batches(self, dataset, batch_size, max_seq_length, loop=False, seed=None, comm_group=None):
        ids = []
        for i, batch in enumerate(dataset):
            if i % self.n == 0:
                self.clock.begin(i // self.n)
            ids.append(np.array(batch[0]))
            if len(ids) == self.n:  # the step's (R, L) ids, its micro-batches in order
                self.clock.feed(np.concatenate(ids))
                ids = []
            self.ran += 1
            yield batch

    def on_train_loss_report(self, info: dict) -> None:
        # iterations_per_second = N / the N micro-batches' wall time (each read after mx.eval in
        # mlx-lm's loop): the step's time is N / it
        self.clock.lr(self.opt.learning_rate.item())  # the schedule's value for the step just done
        self.clock.run.result.grad_accum, self.ran = self.ran, 0
        step = len(self.clock.losses)
        self.clock.end(step, float(info["train_loss"]), self.n / info["iterations_per_second"])

    def on_val_loss_report(self, info: dict) -> None:
        pass

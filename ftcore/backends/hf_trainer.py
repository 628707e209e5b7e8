"""`hf-trainer` backend: the path most PyTorch users take, transformers `Trainer`, made comparable.

Same model and PEFT adapter as `torch` (shared loader), the same AdamW and per-step LR
(`cfg.lr_at`), the same loss (`loss_sum_count`), and the same batches in the same order:
the Trainer reads the pre-built rows sequentially, --batch-size rows a micro-batch and
--grad-accum micro-batches an optimizer step, so its step s sees exactly `batches.step(s)`. With
accumulation each micro-batch's summed loss is divided by the Trainer's own `num_items_in_batch`,
the targets (labels[..., 1:] != -100) of all the step's micro-batches (transformers >= 4.46), as
ftcore's contract says. What is left is the Trainer's own machinery, reported as overhead.
"""

from __future__ import annotations

import time

import torch

from ftcore.backends.eval_schedule import EvalSchedule
from ftcore.backends.loop import Recipe, train_with
from ftcore.backends.result_fields import optimizer_record
from ftcore.backends.run_context import BackendRun
from ftcore.backends.step_clock import StepClock
from ftcore.backends.torch_common import eval_schedule, save_torch, start
from ftcore.inputs.batches import Batches
from ftcore.result import RunResult
from ftcore.torch.loss import loss_sum_count
from ftcore.torch.optim import make_optimizer, settings
from ftcore.torch.runtime import sync


class Rows(torch.utils.data.Dataset):
    """The training batches flattened to rows: row i belongs to step i // R (R = step rows,
    --batch-size x --grad-accum) and has that step's width (Batches.step), so the Trainer's
    sequential micro-batches, --grad-accum of them an update, are our steps exactly."""

    def __init__(self, batches: Batches) -> None:
        steps, self.batch, length = batches.train["input_ids"].shape
        self.widths = batches.train["widths"]
        self.arrays = {
            k: torch.from_numpy(batches.train[k].reshape(steps * self.batch, length))
            # position_ids too when packed: loss_sum_count builds the mask
            for k in batches.row_keys
        }

    def __len__(self) -> int:
        return len(self.arrays["input_ids"])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        width = int(self.widths[i // self.batch])
        return {k: v[i, :width] for k, v in self.arrays.items()}


class TrainerRecipe(Recipe):
    """The Trainer runs the steps (`steps`); its callbacks time them on the shared clock."""

    def setup(self) -> EvalSchedule:
        self.model, self.device = start(self.run)
        return eval_schedule(self.run, self.model, self.device)

    def steps(self, clock: StepClock, evals: EvalSchedule | None) -> None:
        from transformers import Trainer, TrainerCallback

        cfg, result, packed, device = (
            self.run.cfg,
            self.run.result,
            self.run.batches.packed,
            self.device,
        )
        micro: list[tuple[torch.Tensor, torch.Tensor]] = []  # this step's (ids, loss) so far

        class LossTrainer(Trainer):
            def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
                loss_sum, count = loss_sum_count(model, inputs, packed)
                # the step's targets over all its micro-batches, counted by the Trainer (which
                # then does not divide by the accumulation steps again: loss_is_scaled_for_ga)
                loss = loss_sum / (count.clamp(min=1) if num_items_in_batch is None
                                   else num_items_in_batch)  # fmt: skip
                micro.append((inputs["input_ids"], loss.detach()))
                return loss

        class StepTimes(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                micro.clear()
                clock.begin(state.global_step)
                clock.lr(opt.param_groups[0]["lr"])  # set by the scheduler for this step

            def on_step_end(self, args, state, control, **kwargs):
                sync(device)
                result.grad_accum = len(micro)  # micro-batches this optimizer step ran
                clock.end(state.global_step - 1, sum(loss.item() for _, loss in micro))
                # the whole step's ids once, its micro-batches in order: (R, L) as `torch` feeds
                clock.feed(torch.cat([ids for ids, _ in micro]).cpu().numpy())

        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = make_optimizer(cfg, params)
        result.optimizer = optimizer_record(settings(opt, self.model), cfg.max_grad_norm)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cfg.lr_at(s) / cfg.lr)
        args = self.arguments()
        result.compiled_step = bool(args.torch_compile)  # the Trainer's own switch; off: eager
        t_init = time.perf_counter()
        trainer = LossTrainer(model=self.model, args=args, train_dataset=Rows(self.run.batches),
                              optimizers=(opt, sched), callbacks=[StepTimes()])  # fmt: skip
        trainer_init_s = time.perf_counter() - t_init
        t_train = time.perf_counter()
        trainer.train()
        train_call_s = time.perf_counter() - t_train
        result.extra.update(
            # the Trainer's own cost next to the plain loop: set-up, and train() time outside
            # the steps
            trainer_init_s=trainer_init_s,
            trainer_train_call_s=train_call_s,
            trainer_overhead_s=train_call_s - sum(clock.times),
        )
        if cfg.eval_every:
            result.note("--eval-every ignored: hf-trainer evaluates before and after training only")

    def arguments(self):
        """TrainingArguments that make the Trainer's steps ours: batch, order, LR, clipping."""
        from transformers import TrainingArguments

        cfg = self.run.cfg
        return TrainingArguments(
            output_dir=str(self.run.out_dir / "trainer"),
            per_device_train_batch_size=cfg.batch_size,
            gradient_accumulation_steps=cfg.grad_accum,
            max_steps=cfg.steps,
            learning_rate=cfg.lr,
            max_grad_norm=cfg.max_grad_norm
            or 0.0,  # 0 disables the Trainer's default clipping at 1.0
            train_sampling_strategy="sequential",  # our batch order, not a shuffle of its own
            dataloader_drop_last=True,
            dataloader_num_workers=0,
            dataloader_pin_memory=False,
            remove_unused_columns=False,
            save_strategy="no",
            eval_strategy="no",
            logging_strategy="no",
            report_to="none",
            disable_tqdm=True,
            use_cpu=self.device.type == "cpu",
            seed=cfg.seed,
        )

    def finish(self) -> None:
        save_torch(self.run, self.model, self.device)


def train(run: BackendRun) -> RunResult:
    return train_with(run, TrainerRecipe(run))

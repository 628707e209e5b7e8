"""RunResult: what one backend's run measured (result.json), and the one schema of its figures.

A reported figure is declared once, as a field made by `figure(default, label, fmt, tags)`, the
way RunConfig's flags are made by `option()`. Its metadata is what every consumer reads:
- the comparison's rows (ftcore.report.comparison) hold every figure tagged `row`;
- `repeated`: a compare takes it as the median over the usable repeats, with its spread;
- `label` / `fmt`: its row in the full table (ftcore.report.table places it by name; `fmt` is a
  format spec, "int" or "text"); `spread`: the table shows "median (min-max)" over repeats;
- `median` / `first`: a benchmark case's extra_info holds it, as the median over the case's
  processes or the first process's value (bench/bench_support.py);
- `required`: an ok run has it (not None or empty), `positive`: and it is > 0 (the bench checks
  every case, the backend tests every backend).
`figures(tag)` lists the fields that carry a tag. Files are written through ftcore.files.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftcore.files import write_json_atomic

# Fields that were keys of `extra` in older result files: read from there when the file has no
# field.
FORMERLY_EXTRA = (
    "device",
    "trainable_params_expected",
    "machine_load",
    "notes",
    "warnings",
    "traceback",
)
TAGS = frozenset({"row", "repeated", "spread", "median", "first", "required", "positive"})


def figure(default: Any = None, label: str | None = None, fmt: str = "", tags: str = "",
           factory: Any = None) -> Any:
    """A RunResult field that is a reported figure (module docstring: what label, fmt and each tag
    mean). `factory` instead of `default` for a list or dict."""
    tagged = frozenset(tags.split())
    if unknown := tagged - TAGS:
        raise ValueError(f"unknown figure tag(s) {sorted(unknown)}")
    meta = {"label": label, "fmt": fmt, "tags": tagged}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class RunResult:
    """One backend's run. ``train_time_s`` and the throughputs cover the timed steps only
    (``step_times_s[warmup:]``); ``warmup_time_s`` is the excluded first steps; ``step_times_s``
    lists every step, warm-up included. Memory figures are in MB (2**20 bytes).

    ``notes`` and ``warnings`` (strings) are printed in the report under the backend's name,
    whatever the backend: the one channel a backend has to say how it ran. ``extra`` holds only
    backend-specific figures (e.g. mlx's ``cpu_streams``); what the report, the bench or a test
    reads for every backend is a field here.
    """

    backend: str
    status: str = "ok"  # "ok" | "failed"
    error: str | None = None
    config: dict = field(default_factory=dict)
    env: dict = field(default_factory=dict)
    load_time_s: float = figure(0.0, "Load/convert time (s)", ".2f", "row repeated median required")
    train_time_s: float = figure(
        0.0, "Training time (s)", ".2f", "row repeated spread median positive"
    )
    warmup_time_s: float = figure(0.0, "Warm-up time (s)", ".2f", "row repeated median")
    # torch.compile's tracing and code generation of every batch width the run feeds, done before
    # the timed steps and in no step's time (torch-compile); None where nothing is compiled up
    # front (mlx's mx.compile traces inside the warm-up step)
    compile_time_s: float | None = figure(None, "Compile time (s)", ".2f", "row repeated median")
    # whether the training step ran as compiled graphs (torch.compile, mx.compile) or op by op
    # (eager), as the backend ran it; None: not recorded
    compiled_step: bool | None = None
    step_times_s: list[float] = figure(factory=list, tags="first")
    steps: int = figure(0, tags="row first")
    # every position fed, padding included / non-pad tokens (what MFU counts) / the loss's
    # tokens, over the timed steps
    tokens_per_s: float = figure(0.0, "Tokens/s (all)", ".1f", "row repeated median positive")
    real_tokens_per_s: float = figure(0.0, "Real tokens/s", ".1f", "row repeated")
    loss_tokens_per_s: float = figure(
        0.0, "Loss tokens/s", ".1f", "row repeated spread median positive"
    )
    # The epoch projection (ftcore.measure.projection): one pass over `epoch_records` records
    # (--project-records, else the data's), priced per width from the timed steps; a compare
    # projects from all its repeats. epoch_widths: {width: steps} of that pass; step_widths: each
    # step's width. With --epochs N, finetune_time_s is all N (the start-up once).
    epoch_time_s: float | None = figure(None, tags="row")
    epoch_time_ci_s: list[float] | None = figure(None, tags="row")  # 95% [low, high]
    epoch_records: int | None = figure(None, tags="row first")
    epoch_steps: float | None = figure(None, tags="row first")
    epoch_method: str | None = figure(None, tags="row first")
    finetune_time_s: float | None = figure(None, tags="row")
    finetune_time_ci_s: list[float] | None = figure(None, tags="row")
    epoch_widths: dict = field(default_factory=dict)
    step_widths: list[int] = field(default_factory=list)
    losses: list[float] = figure(factory=list, tags="first")  # one per step
    # per step, where the loop owns its step (torch, mlx): the targets its loss was taken over (a
    # data-parallel run: summed over ranks; each rank's own in its rank file) and the gradient
    # norm before clipping (of the summed gradients)
    step_targets: list[int] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    final_loss: float | None = figure(None, "Final loss", ".5f", "row median required")
    eval_loss: float | None = figure(None, "Eval loss", ".5f", "row median required")
    # [step, loss]; step 0 = before training
    eval_losses: list[list[float]] = field(default_factory=list)
    # eval loss of the base model (the adapter's B is zero)
    eval_loss_before: float | None = figure(None, "Eval loss before fine-tune", ".5f", "row")
    accuracy_before: float | None = figure(None, tags="row")  # exact-match share of greedy answers
    accuracy_after: float | None = figure(None, tags="row")
    generations: dict = field(default_factory=dict)  # "before"/"after": greedy token ids per record
    # --target-eval-loss: {eval_loss, reached, step, seconds, ...}
    target: dict | None = figure(None, tags="row")
    peak_rss_mb: float = figure(0.0, "Peak RSS (MB)", ".1f", "row repeated spread median positive")
    # RSS after model load
    baseline_rss_mb: float = figure(0.0, tags="row repeated median positive")
    # mx.get_peak_memory / cuda max allocated; None on CPU torch
    framework_peak_mb: float | None = figure(
        None, "Framework peak (MB)", ".1f", "row repeated median"
    )
    trainable_params: int = figure(0, "Trainable params", "int", "row first")
    # what the model trained, from its trainable tensors' names (ftcore.inputs.arch.fine_tune_of)
    fine_tune: str = figure("", "Trained (--fine-tune, as run)", "text", "row first")
    # micro-batches per optimiser step, as the backend's loop or trainer ran them (--grad-accum)
    grad_accum: int = figure(0, "Micro-batches per step", "int", "row first")
    flops_per_token: float = figure(0.0, tags="row first")
    mfu: float | None = figure(None, tags="row repeated median positive")
    # of the checkpoint's weight files (ftcore.inputs.checkpoint.weights_sha256)
    model_sha256: str = ""
    # of the batches file every backend was given
    batch_fingerprint: str = figure("", tags="first required")
    # of the token ids this backend's loop really fed, step by step
    fed_batches_fingerprint: str = ""
    initial_adapter_fingerprint: str = ""
    optimizer: dict = field(default_factory=dict)
    precision: str = figure("", tags="row first")
    # the BLAS this framework really calls
    blas: str = figure("", "BLAS", "text", "row first required")
    # data parallel: all ranks' together
    threads: int = figure(0, "Threads", "int", "row first positive")
    # data parallel (ftcore.process.ranks): ranks, threads of one rank, rank 0's all-reduce time of
    # every step and its mean over the timed steps; peak_rss_mb is then summed over ranks
    world_size: int = figure(1, "World size (processes)", "int", "row first")
    rank_threads: int = figure(0, "Threads per rank", "int", "row first")
    allreduce_times_s: list[float] = field(default_factory=list)
    allreduce_time_s: float | None = figure(None, tags="row first")
    peak_rss_max_rank_mb: float | None = figure(
        None, "Peak RSS, largest rank (MB)", ".1f", "row repeated first"
    )
    # what one process must hold by ftcore.measure.memory_model (MB by component, "total")
    memory_model: dict | None = figure(None, tags="first")
    # this process's CPU seconds / wall seconds, timed steps
    cpu_busy_threads: float | None = figure(None, "CPU threads busy", ".2f", "row repeated median")
    device: str = ""  # what the loop ran on: torch's device ("cpu", "cuda:0"), MLX's device name
    trainable_params_expected: int | None = None  # the closed-form LoRA count (ftcore.inputs.arch)
    # the records that ran: train/eval kept, dropped (no answer token fits), prompt-only
    records: dict | None = None
    # other processes' CPU use on the run's cores over the timed steps
    # (ftcore.measure.machine_load): {..., "busy": bool}; busy shows as BUSY in the report
    machine_load: dict | None = None
    notes: list[str] = field(default_factory=list)  # lines for the report (RunResult.note)
    warnings: list[str] = field(default_factory=list)  # the same, said as warnings (RunResult.warn)
    traceback: str | None = None  # a failed run's Python traceback; `error` says what failed
    extra: dict = field(default_factory=dict)  # backend-specific figures only

    @classmethod
    def failed(cls, backend: str, config: dict | None, error: str) -> RunResult:
        return cls(backend=backend, status="failed", error=error, config=dict(config or {}))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> RunResult:
        names = {f.name for f in dataclasses.fields(cls)}
        known = {k: v for k, v in d.items() if k in names}
        unknown = {k: v for k, v in d.items() if k not in names}
        old = dict(known.get("extra") or {})
        for k in FORMERLY_EXTRA:
            if k in old and k not in known:
                known[k] = old.pop(k)
        known["extra"] = old
        res = cls(**known)
        if unknown:  # newer/older writers: keep what we do not know instead of dropping it
            res.extra = {**res.extra, "unknown_fields": unknown}
        return res

    def note(self, text: str) -> None:
        """Add a line to the report's backend notes."""
        self.notes.append(text)

    def warn(self, text: str) -> None:
        """Add a warning line to the report's backend notes."""
        self.warnings.append(text)

    def write_json(self, path: str | os.PathLike) -> None:
        write_json_atomic(path, self.to_dict())

    @classmethod
    def read_json(cls, path: str | os.PathLike) -> RunResult:
        return cls.from_dict(json.loads(Path(path).read_text()))


def figures(tag: str) -> tuple[str, ...]:
    """The RunResult fields that carry `tag`, in field order; `required` includes `positive`."""
    want = {tag, "positive"} if tag == "required" else {tag}
    return tuple(
        f.name for f in dataclasses.fields(RunResult) if want & f.metadata.get("tags", set())
    )


def _meta(name: str) -> Any:
    return next(f.metadata for f in dataclasses.fields(RunResult) if f.name == name)


def figure_format(name: str) -> tuple[str | None, str]:
    """(table label, format) of a RunResult figure."""
    return _meta(name)["label"], _meta(name)["fmt"]


def figure_tags(name: str) -> frozenset[str]:
    return _meta(name).get("tags", frozenset())

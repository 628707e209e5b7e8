"""Everything checked before any backend starts, in the parent, so that a user's mistake is one
`error:` line with nothing written and never a half-finished run:

* the cache folder ($FTCORE_CACHE) is not blocked by a file (ftcore.cache_dir);
* flags: RunConfig's own validation, and --threads at most the cores this process may use, and
  enough of them for --nproc ranks; a data-parallel run only with backends that support it and
  what their launcher needs for several machines (ftcore.process.ranks);
* the model folder: ftcore.inputs.presets.check_model_dir (files, config, every tensor, finite
  weights);
* the tokenizer: it loads, and its vocabulary fits the embedding
  (ftcore.inputs.checkpoint.check_vocab);
* the data: loads, tokenizes (with --prompt-format chat: the model has a chat template that
  renders, ftcore.inputs.token_rows.rendered_ids) and fills the batches
  (ftcore.inputs.batches.build_batches);
* each backend: its package is installed, and its spec's `check` passes (device present; for
  MLX the cached conversion of this checkpoint is made here, so a conversion error stops the run
  before torch has spent its time).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from ftcore.backends import BACKENDS, get_backend
from ftcore.cache_dir import cache_root
from ftcore.config import Batching, RunConfig, UserError
from ftcore.inputs.arch import read_arch
from ftcore.inputs.batches import Batches, build_batches
from ftcore.inputs.checkpoint import check_vocab, weights_sha256
from ftcore.inputs.presets import resolve_model_dir
from ftcore.inputs.records import load_records
from ftcore.inputs.tokenizer import load_tokenizer
from ftcore.measure.hostinfo import affinity_cores
from ftcore.process.ranks import check_threads

BATCHES_FILE = "batches.npz"


@dataclass
class Prepared:
    cfg: RunConfig  # threads resolved, so every backend uses the same count
    model_dir: Path
    batches: Batches
    batches_path: Path | None = None  # set by save(): what the child processes read

    @cached_property
    def model_sha256(self) -> str:  # read once per run, in the parent
        return weights_sha256(self.model_dir)

    def save(self, work_dir: Path) -> Prepared:
        work_dir.mkdir(parents=True, exist_ok=True)
        self.batches_path = work_dir / BATCHES_FILE
        self.batches.save(self.batches_path)
        return self


def check_cores(cfg: RunConfig) -> int:
    """The cores this process may use, once --threads is checked against them (UserError)."""
    cores = affinity_cores()
    if cfg.threads is not None and cfg.threads > cores:
        raise UserError(
            f"--threads {cfg.threads}: this process may use {cores} cores; more threads than "
            "cores would time the operating system's scheduler, not the framework"
        )
    return cores


def check_run(cfg: RunConfig, backends: list[str] | tuple[str, ...] = ()) -> Prepared:
    """Every check of the module docstring; raises UserError (one line). Writes nothing but the
    cache (a preset checkpoint, the MLX conversion)."""
    cache_root()  # the cache folder can be made (not below a file), before any backend needs it
    cores = check_cores(cfg)
    specs = [get_backend(b) for b in backends]
    check_threads(cfg if cfg.threads is not None else cfg.replace(threads=cores))
    for spec in specs:
        if cfg.world_size > 1 and not spec.data_parallel:
            able = ", ".join(n for n, s in BACKENDS.items() if s.data_parallel)
            raise UserError(f"--nproc/--nnodes: {spec.name} runs in one process only "
                            f"(data-parallel backends: {able})")
        if cfg.world_size > 1:
            spec.check_launch(cfg)
    for spec in specs:
        if why := spec.missing():
            raise UserError(why)
        if cfg.batching == Batching.PACKED and not spec.takes_packed_rows:
            able = ", ".join(n for n, s in BACKENDS.items() if s.takes_packed_rows)
            raise UserError(
                f"--batching packed: the {spec.name} backend's trainer cannot take several "
                f"records per row (backends that can: {able}); use --batching longest"
            )
        if cfg.target_eval_loss is not None and not spec.owns_steps:
            raise UserError(
                f"--target-eval-loss: the {spec.name} backend's trainer runs its own steps and "
                "cannot stop at a target; use backends whose loop ftcore owns"
            )
        if cfg.grad_checkpoint and cfg.lora_dropout > 0 and not spec.checkpoint_keeps_dropout:
            raise UserError(
                f"--grad-checkpoint with --lora-dropout > 0: the {spec.name} backend would draw "
                "other dropout masks when it recomputes a layer; "
                "use --lora-dropout 0"
            )
    records = load_records(cfg.data, seed=cfg.seed)  # bad data is refused before a preset is made
    model_dir = resolve_model_dir(cfg)
    tokenizer = load_tokenizer(model_dir)
    arch = read_arch(model_dir)
    check_vocab(arch, tokenizer, model_dir)
    limit = arch.get("max_position_embeddings")
    if limit and cfg.max_seq_len > limit:
        raise UserError(
            f"--max-seq-len {cfg.max_seq_len}: the model was built for at most {limit} positions "
            f"(max_position_embeddings in {model_dir / 'config.json'}); use --max-seq-len {limit} "
            "or less"
        )
    batches = build_batches(cfg, tokenizer, records)
    for line in batches.stats["data_warnings"]:  # once, before any backend starts
        print(f"warning: {line}", file=sys.stderr, flush=True)
    cfg = cfg.replace(steps=batches.steps)  # what --epochs came to (build_batches); else --steps
    if cfg.threads is None:
        cfg = cfg.replace(threads=cores)
    for spec in specs:
        if spec.check:
            spec.check(cfg, model_dir)
    return Prepared(cfg, model_dir, batches)


def prepare(cfg: RunConfig, work_dir: Path, backends: list[str] | tuple[str, ...] = ()) -> Prepared:
    """check_run, then the batches saved in work_dir for the child processes."""
    return check_run(cfg, backends).save(work_dir)

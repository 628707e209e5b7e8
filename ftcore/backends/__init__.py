"""The backends: one BackendSpec each, in BACKENDS. Everything outside this package (runner, CLI,
report, bench) reads a backend's facts from its spec and never compares backend names.

Adding a backend: write `ftcore/backends/<backend name>.py` with its Recipe (backends.loop) and

    train(run: BackendRun) -> RunResult   # train_with(run, MyRecipe(run)) (backends.run_context)

and add one BackendSpec to BACKENDS. `train` runs inside a fresh process (ftcore.run.child) with
`child_env`'s environment. backends.loop.train_with owns the run's order and the per-step sequence
(batches, shards, LR, step clock, evals, target stop, rank 0's end, the shared result figures);
the recipe loads the checkpoint (LoRA from `ftcore.inputs.lora_init.initial_lora_state`), makes
one optimizer step, and saves the adapter under run.out_dir/adapter. Whatever it wants the
report to say goes in `result.note(...)`.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ftcore.config import RunConfig, UserError
from ftcore.inputs.batches import Batches
from ftcore.mlx import env as mlx_env
from ftcore.result import RunResult
from ftcore.torch import env as torch_env

# The environment of a process that runs each framework (threads, BLAS preload, JIT flags): what
# backends of that framework start from, and what the GEMM-peak probes run in.
FRAMEWORK_ENVS: dict[str, Callable[[dict, int], dict]] = {
    "torch": torch_env.child_env,
    "mlx": mlx_env.child_env,
}


def framework_env(framework: str) -> Callable[[dict, int, RunConfig], dict]:
    """A backend whose environment is its framework's alone (threads, BLAS, JIT flags)."""
    make = FRAMEWORK_ENVS[framework]
    return lambda base_env, threads, cfg: make(base_env, threads)


def convert_for_mlx(cfg: RunConfig, model_dir: Path) -> None:
    """Make the run's cached HF -> MLX conversion in the parent, so the MLX process's load time
    and peak RSS cover loading, not converting."""
    from ftcore.mlx.convert import ConversionError
    from ftcore.mlx.runtime import convert  # imports MLX, only when an MLX backend is next

    try:
        convert(cfg, model_dir)
    except ConversionError as e:
        raise UserError(f"MLX conversion: {e}") from None


def check_torch(cfg: RunConfig, model_dir: Path) -> None:
    """--device gpu needs a device torch can see (torch is imported only then)."""
    if cfg.device != "cpu":
        from ftcore.torch.runtime import pick_device

        pick_device(cfg.device)


def check_torch_compile(cfg: RunConfig, model_dir: Path) -> None:
    """What torch-compile does not run: gradient checkpointing (transformers' checkpoint
    wrapper inside the compiled graph is untested here, so refused rather than guessed); DoRA
    (fullgraph dynamo stops in PEFT's DoRA forward, at its check for a quantized weight:
    `str.startswith`, peft 0.21 / torch 2.13); and --nproc > 1 is refused for it as for every
    one-process backend (no `launch`)."""
    if cfg.grad_checkpoint:
        raise UserError("--grad-checkpoint: the torch-compile backend does not compile "
                        "checkpointed layers; use the torch backend for --grad-checkpoint")
    if cfg.fine_tune == "dora":
        raise UserError("--fine-tune dora: the torch-compile backend cannot compile PEFT's DoRA "
                        "layers; use the torch backend for --fine-tune dora")
    check_torch(cfg, model_dir)


def check_mlx(cfg: RunConfig, model_dir: Path) -> None:
    """The device exists for MLX, and the weights are safetensors (MLX cannot read pickle)."""
    from ftcore.mlx.runtime import pick_device

    pick_device(cfg.device)
    if not list(model_dir.glob("*.safetensors")):
        raise UserError(
            f"{model_dir}: MLX reads safetensors weights only; convert the pickle weights to "
            "safetensors, or run only torch backends with --allow-pickle"
        )


def check_mlx_converted(cfg: RunConfig, model_dir: Path) -> None:
    check_mlx(cfg, model_dir)
    convert_for_mlx(cfg, model_dir)  # a conversion error stops the run before any backend ran


@dataclass(frozen=True)
class BackendSpec:
    name: str
    framework: str  # "torch" | "mlx": its GEMM peak, BLAS probe and base environment
    module: str  # the module (under ftcore.backends) whose train() runs in the child
    package: str  # importable package the child needs; missing -> the backend is unavailable
    install_hint: str
    summary: str  # one line for --help and the README
    # (base environment, threads, run config) -> the child's environment
    child_env: Callable[[dict, int, RunConfig], dict]
    before_spawn: Callable[[RunConfig, Path], None] | None = None  # run in the parent, timed
    # run in the parent before any backend starts (ftcore.run.preflight); raises UserError
    check: Callable[[RunConfig, Path], None] | None = None
    # True: computes the loss contract with AdamW as REFERENCE_BACKEND does, so its fp32
    # per-step losses must equal the reference's within ftcore.tolerances.REFERENCE_LOSS_ATOL
    # (checked by tests and bench)
    same_numerics: bool = True
    # True: its loop owns the steps, so it evaluates every --eval-every steps, stops at
    # --target-eval-loss and measures greedy exact-match accuracy (backends.eval_schedule)
    owns_steps: bool = True
    # True: --grad-checkpoint recomputes a layer with the same LoRA dropout masks (torch replays
    # its RNG); False: new masks (MLX's random state is global), so checkpointing with dropout is
    # refused
    checkpoint_keeps_dropout: bool = True
    # True: trains on packed rows (--batching packed: position_ids, per-document causal mask);
    # False: its trainer builds its own masks from plain rows, so `packed` is refused up front
    takes_packed_rows: bool = True
    # data parallel (--nproc > 1; ftcore.process.ranks): (cfg, child command, out_dir) -> the
    # framework's launcher command, and its parent-side check (UserError); None: one process only
    launch: Callable[[RunConfig, list[str], Path], list[str]] | None = None
    check_launch: Callable[[RunConfig], None] | None = None

    @property
    def data_parallel(self) -> bool:
        return self.launch is not None

    def train(self, cfg: RunConfig, model_dir: Path, batches: Batches, out_dir: Path) -> RunResult:
        """Train this backend in this process (the child's job: ftcore.run.child)."""
        from ftcore.backends.run_context import BackendRun
        from ftcore.process.ranks import RankInfo

        module = importlib.import_module(f"ftcore.backends.{self.module}")
        run = BackendRun(
            self.name,
            self.framework,
            cfg,
            Path(model_dir),
            batches,
            Path(out_dir),
            RankInfo.from_env(),
        )
        return module.train(run)

    def missing(self) -> str | None:
        """Why this backend cannot run here (its package is not installed), or None."""
        if importlib.util.find_spec(self.package) is None:
            return f"{self.name} needs the {self.package} package: {self.install_hint}"
        return None


BACKENDS: dict[str, BackendSpec] = {
    spec.name: spec
    for spec in (
        BackendSpec(
            name="torch", framework="torch", module="torch", package="peft",
            install_hint="pip install ftcore", child_env=framework_env("torch"), check=check_torch,
            launch=torch_env.launch_command, check_launch=torch_env.check_launch,
            summary="transformers LlamaForCausalLM + PEFT LoRA, a plain training loop",
        ),
        BackendSpec(
            name="torch-compile", framework="torch", module="torch_compile", package="peft",
            install_hint="pip install ftcore", child_env=framework_env("torch"),
            check=check_torch_compile,
            summary="the torch backend's loop with its forward and loss under torch.compile",
        ),
        BackendSpec(
            name="hf-trainer", framework="torch", module="hf_trainer", package="transformers",
            install_hint="pip install ftcore", child_env=framework_env("torch"), check=check_torch,
            owns_steps=False,  # Trainer runs the steps; accuracy before/after still measured
            summary="the same model and adapter through transformers Trainer",
        ),
        BackendSpec(
            name="mlx", framework="mlx", module="mlx", package="mlx",
            install_hint="pip install 'mlx[cpu]' (Linux) or 'mlx' (macOS)",
            child_env=mlx_env.row_streams_env, before_spawn=convert_for_mlx,
            check=check_mlx_converted, launch=mlx_env.launch_command,
            check_launch=mlx_env.check_launch, checkpoint_keeps_dropout=False,
            summary=(
                "ftcore's own MLX Llama (ftcore.mlx), weights converted from the same checkpoint"
            ),
        ),
        BackendSpec(
            name="mlx-lm", framework="mlx", module="mlx_lm", package="mlx_lm",
            install_hint="pip install 'ftcore[mlx-lm]'", child_env=framework_env("mlx"),
            check=check_mlx,
            same_numerics=False,  # its own loss normalisation and Adam, as its users get them
            owns_steps=False,  # mlx-lm's trainer runs the steps: eval after training only
            checkpoint_keeps_dropout=False,
            takes_packed_rows=False,  # its iterate_batches / default_loss: one record per row
            summary="mlx-lm's own LoRA layers, loss and trainer, as the MLX yardstick",
        ),
    )
}  # fmt: skip


REFERENCE_BACKEND = "torch"  # the ratios' and loss comparisons' reference by default


def get_backend(name: str) -> BackendSpec:
    if name not in BACKENDS:
        raise UserError(f"unknown backend {name!r} (one of {', '.join(BACKENDS)})")
    return BACKENDS[name]

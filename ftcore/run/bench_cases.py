"""The benchmark case matrix, shared by the pytest-benchmark suite (bench/) and `ftcore bench-diff`:
model size x shape (batch x sequence length) x precision x backend.

A case's id names everything that changes the work of one training step
(`tiny-b4-s128-fp32-torch`); baselines are matched by it, and `-k` expressions select on it.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Sequence
from dataclasses import dataclass

from ftcore.config import RunConfig
from ftcore.inputs.presets import preset_config

# The cases' LoRA targets, fixed (not RunConfig's default) so that the step work stays that of the
# committed baselines in .benchmarks/ and of every revision bench-diff compares.
BENCH_TARGETS = ("q_proj", "v_proj")


@dataclass(frozen=True)
class Size:
    """A model size, with its default shapes and precisions, and how a case is timed: `processes`
    fresh processes one after another, each `warmup` untimed steps (compilation, allocator) then
    `timed` timed steps. Step times vary 20-35% between processes on a quiet 2-core machine
    (torch tiny bf16: 42.7, 52.3, 58.7, 48.9, 45.3 ms in five), so a case pools several."""

    preset: str
    num_layers: int | None  # None: the preset's own depth
    shapes: tuple[tuple[int, int], ...]  # (batch, seq_len)
    precisions: tuple[str, ...]
    warmup: int
    timed: int
    processes: int
    note: str = ""

    @property
    def layers(self) -> int:
        return preset_config(self.preset, self.num_layers)["num_hidden_layers"]


# `tiny` runs by default; the TinyLlama-width sizes are opt-in: their first run materialises a
# 1.2 GB (4 layers) / 4.4 GB (22 layers) fp32 checkpoint in the cache. bf16 is in tiny's defaults
# only: MLX's bf16 matmul on CPU is a scalar fallback (~6 GFLOP/s), a 4-layer TinyLlama bf16 MLX
# step takes minutes.
SIZES: dict[str, Size] = {
    "tiny": Size("tiny", None, ((4, 128),), ("fp32", "bf16"), warmup=3, timed=8, processes=4,
                 note="random-init 4-layer, hidden 128; steps of 30-600 ms"),
    "tinyllama-4l": Size("tinyllama-1.1b", 4, ((2, 256),), ("fp32",), warmup=1, timed=6,
                         processes=1, note="TinyLlama-1.1B width, first 4 layers; steps of ~3 s"),
    "tinyllama-full": Size("tinyllama-1.1b", None, ((2, 256),), ("fp32",), warmup=1, timed=3,
                           processes=1, note="TinyLlama-1.1B, all 22 layers; steps of ~16-30 s"),
}  # fmt: skip


@dataclass(frozen=True)
class Case:
    """One timed configuration: size x shape x precision x backend."""

    size: str
    backend: str
    batch: int
    seq: int
    precision: str
    nproc: int = 1  # data-parallel ranks (ftcore.process.ranks); the same global batch

    @property
    def spec(self) -> Size:
        return SIZES[self.size]

    @property
    def id(self) -> str:
        np = f"-np{self.nproc}" if self.nproc > 1 else ""  # one-process ids as they always were
        return f"{self.size}-b{self.batch}-s{self.seq}-{self.precision}-{self.backend}{np}"

    @property
    def config_id(self) -> str:
        """The case without the backend and process count: they all share batches."""
        return f"{self.size}-b{self.batch}-s{self.seq}-{self.precision}"

    @property
    def group(self) -> str:
        """Backends of one config sit side by side in one pytest-benchmark table."""
        return f"{self.spec.preset}-L{self.spec.layers} b{self.batch} s{self.seq} {self.precision}"

    def config(self, warmup: int | None = None, timed: int | None = None) -> RunConfig:
        """The run: `warmup` untimed steps then `timed` steps (defaults: the size's)."""
        warmup = self.spec.warmup if warmup is None else warmup
        timed = self.spec.timed if timed is None else timed
        return RunConfig(
            preset=self.spec.preset,
            num_layers=self.spec.num_layers,
            batch_size=self.batch,
            max_seq_len=self.seq,
            steps=warmup + timed,
            timing_warmup_steps=warmup,
            precision=self.precision,
            num_samples=max(64, self.batch),
            eval_samples=16,
            lora_targets=BENCH_TARGETS,
            nproc=self.nproc,
            batching="padded",  # fixed shapes: a step's work is the same in every revision and run
        )

    def run_args(self, warmup: int, timed: int, batching_flag: bool = True) -> list[str]:
        """`ftcore run` flags for this case. batching_flag=False leaves out `--batching`, for a
        revision from before it (those always padded, as the case does)."""
        cfg = self.config(warmup, timed)
        args = ["--backend", self.backend, "--preset", cfg.preset, "--batch-size", cfg.batch_size,
                "--max-seq-len", cfg.max_seq_len, "--steps", cfg.steps, "--timing-warmup-steps",
                cfg.timing_warmup_steps, "--precision", cfg.precision, "--num-samples",
                cfg.num_samples, "--eval-samples", cfg.eval_samples, "--lora-targets",
                ",".join(cfg.lora_targets)]
        if cfg.num_layers is not None:
            args += ["--num-layers", cfg.num_layers]
        if cfg.nproc > 1:
            args += ["--nproc", cfg.nproc]
        if batching_flag:
            args += ["--batching", cfg.batching]
        return [str(a) for a in args]


def parse_list(values: Sequence[str] | None) -> list[str]:
    """Options given as repeats and/or comma lists -> flat list, order kept, duplicates dropped."""
    out: list[str] = []
    for v in values or ():
        for item in str(v).split(","):
            item = item.strip()
            if item and item not in out:
                out.append(item)
    return out


def parse_shape(text: str) -> tuple[int, int]:
    """'4x128' -> (batch 4, seq_len 128)."""
    try:
        b, s = text.lower().split("x")
        return int(b), int(s)
    except ValueError:
        raise ValueError(f"bad shape {text!r}: expected BATCHxSEQ, e.g. 4x128") from None


def build_cases(
    sizes: Sequence[str],
    backends: Sequence[str],
    precisions: Sequence[str] | None,
    shapes: Sequence[tuple[int, int]] | None,
    nprocs: Sequence[int] = (1,),
) -> list[Case]:
    """Cartesian product; per-size defaults where an axis is not given. A process count above 1
    only for data-parallel backends and batches it divides."""
    from ftcore.backends import BACKENDS

    return [
        Case(size, backend, batch, seq, precision, nproc)
        for size in sizes
        for batch, seq in shapes or SIZES[size].shapes
        for precision in precisions or SIZES[size].precisions
        for nproc in nprocs
        for backend in backends
        if nproc == 1
        or (backend in BACKENDS and BACKENDS[backend].data_parallel and batch % nproc == 0)
    ]


_WORD = re.compile(r"[\w.\-\[\]]+")


def matches(expr: str | None, name: str) -> bool:
    """pytest's -k rule: words are substrings of `name`, combined with and / or / not / ( )."""
    if not expr or not expr.strip():
        return True
    out = []
    for token in re.findall(r"\(|\)|[^\s()]+", expr):
        if token in ("and", "or", "not", "(", ")"):
            out.append(token)
        elif _WORD.fullmatch(token):
            out.append(repr(token in name))
        else:
            raise ValueError(f"-k {expr!r}: cannot read {token!r}")
    try:
        tree = ast.parse(" ".join(out), mode="eval")
    except SyntaxError:
        raise ValueError(f"-k {expr!r}: not an expression of words, and, or, not, ( )") from None
    return bool(eval(compile(tree, "<-k>", "eval"), {"__builtins__": {}}))  # only True/False/and/or

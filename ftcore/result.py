"""RunResult: what one backend's run measured (result.json), and atomic file writes.

A result file is written atomically (temp file beside it, fsync, rename), so a reader sees the
old file or the complete new one, never half of one; non-finite floats (a diverged loss) are
written as null, so every file is strict JSON. Every file a run writes goes through `atomic_path`
(a file or folder under a temporary name, renamed when complete), and a full disk is raised as
`DiskFull`, one line naming the file and the room left on its filesystem.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Fields that were keys of `extra` in older result files: read from there when the file has no field.
FORMERLY_EXTRA = ("device", "trainable_params_expected", "machine_load", "notes", "warnings", "traceback")


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
    load_time_s: float = 0.0
    train_time_s: float = 0.0
    warmup_time_s: float = 0.0
    step_times_s: list[float] = field(default_factory=list)
    steps: int = 0
    tokens_per_s: float = 0.0  # every position fed, padding included, over timed steps
    real_tokens_per_s: float = 0.0  # non-pad tokens, over timed steps (what MFU counts)
    loss_tokens_per_s: float = 0.0  # tokens that count in the loss, over timed steps
    epoch_time_s: float | None = None  # mean timed step x steps per pass over the training records
    losses: list[float] = field(default_factory=list)  # one per step
    # per step, where the loop owns its step (torch, mlx): the targets its loss was taken over (a
    # data-parallel run: summed over ranks; each rank's own in its rank file) and the gradient
    # norm before clipping (of the summed gradients)
    step_targets: list[int] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    final_loss: float | None = None
    eval_loss: float | None = None
    eval_losses: list[list[float]] = field(default_factory=list)  # [step, loss]; step 0 = before training
    eval_loss_before: float | None = None  # eval loss of the base model (the adapter's B is zero)
    accuracy_before: float | None = None  # exact-match share of greedy answers to the eval records
    accuracy_after: float | None = None
    generations: dict = field(default_factory=dict)  # "before"/"after": greedy token ids per record
    target: dict | None = None  # --target-eval-loss: {eval_loss, reached, step, seconds, train_seconds}
    peak_rss_mb: float = 0.0
    baseline_rss_mb: float = 0.0  # RSS after model load
    framework_peak_mb: float | None = None  # mx.get_peak_memory / cuda max allocated; None on CPU torch
    trainable_params: int = 0
    flops_per_token: float = 0.0
    mfu: float | None = None
    model_sha256: str = ""  # of the checkpoint's weight files (ftcore.inputs.checkpoint.weights_sha256)
    batch_fingerprint: str = ""  # of the batches file every backend was given
    fed_batches_fingerprint: str = ""  # of the token ids this backend's loop really fed, step by step
    initial_adapter_fingerprint: str = ""
    optimizer: dict = field(default_factory=dict)
    precision: str = ""
    blas: str = ""  # what BLAS this framework really calls (ftcore.measure.blas)
    threads: int = 0  # a data-parallel run: all ranks' threads together
    # data parallel (ftcore.process.ranks): ranks, threads of one rank, rank 0's all-reduce time of every
    # step and its mean over the timed steps; peak_rss_mb is then summed over ranks
    world_size: int = 1
    rank_threads: int = 0
    allreduce_times_s: list[float] = field(default_factory=list)
    allreduce_time_s: float | None = None
    peak_rss_max_rank_mb: float | None = None  # the largest single rank's peak RSS
    # what one process must hold by ftcore.measure.memory_model (MB by component, "total"), beside peak RSS
    memory_model: dict | None = None
    cpu_busy_threads: float | None = None  # this process's CPU seconds / wall seconds, timed steps
    device: str = ""  # what the loop ran on: torch's device ("cpu", "cuda:0"), MLX's device name
    trainable_params_expected: int | None = None  # the closed-form LoRA count (ftcore.inputs.arch)
    # the records that ran: train/eval kept, dropped (no answer token fits), prompt-only
    records: dict | None = None
    # other processes' CPU use on the run's cores over the timed steps (ftcore.measure.machine_load):
    # {..., "busy": bool}; busy shows as BUSY in the report
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


def jsonable(obj: Any) -> Any:
    """Plain JSON types only: non-finite floats -> None, tuples -> lists, numpy scalars and arrays
    -> Python values, anything else -> str."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if obj is None or isinstance(obj, str | int | bool):
        return obj
    if hasattr(obj, "item") and getattr(obj, "ndim", 0) == 0:  # numpy scalar
        return jsonable(obj.item())
    if hasattr(obj, "tolist"):  # numpy array
        return jsonable(obj.tolist())
    return str(obj)


def free_space(path: str | os.PathLike) -> str:
    """"free: N MB on MOUNT" for the filesystem that holds `path` (or its nearest existing folder)."""
    at = Path(os.path.abspath(path))
    while not at.exists() and at != at.parent:
        at = at.parent
    mount = at
    while not os.path.ismount(mount) and mount != mount.parent:
        mount = mount.parent
    try:
        return f"free: {shutil.disk_usage(at).free / 2**20:.0f} MB on {mount}"
    except OSError:
        return f"on {mount}"


class DiskFull(OSError):
    """No room left on the disk while writing `filename`; str() is the line a user reads:
    "no space left on device writing OUT/batches.npz (free: 0 MB on /mnt/x)"."""

    def __init__(self, path: str | os.PathLike) -> None:
        super().__init__(errno.ENOSPC, "no space left on device", str(path))
        self.free = free_space(path)

    def __str__(self) -> str:
        return f"no space left on device writing {self.filename} ({self.free})"


def disk_full(exc: BaseException, path: str | os.PathLike) -> bool:
    """Did writing `path` fail for want of room? An OSError says so in its errno; safetensors
    (Rust) says "No space left on device" in its text; MLX (C++) only "Unable to write", so a
    failed write on a filesystem with under 1 MB left counts too."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if not isinstance(exc, Exception):  # KeyboardInterrupt, SystemExit: never a full disk
        return False
    if os.strerror(errno.ENOSPC) in str(exc):
        return True
    try:
        return shutil.disk_usage(Path(path).parent).free < 2**20
    except OSError:
        return False


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary name beside `path` (same folder, same suffix, so np.savez or safetensors keep
    their extension) for a file or a whole folder to be written to; renamed to `path` when the
    block ends, removed when it raises: `path` is never half-written. A full disk is raised as
    DiskFull naming `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as e:
        full = None
        if isinstance(e, DiskFull):  # a file inside the folder being written: its final name
            e.filename = str(e.filename).replace(str(tmp), str(path), 1)
        elif disk_full(e, tmp):  # said before the partial file is removed and frees its room
            full = DiskFull(path)
        shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        if full:
            raise full from e
        raise


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the complete new one."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def json_bytes(data: Any) -> bytes:
    """``data`` as indented strict JSON (see jsonable)."""
    return (json.dumps(jsonable(data), indent=2, allow_nan=False) + "\n").encode()


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """``data`` as indented strict JSON (see jsonable), written atomically."""
    write_atomic(path, json_bytes(data))

"""Files a run writes, written so that a reader never sees half of one: `atomic_path` (a file or a
whole folder under a temporary name beside it, renamed when complete), `write_atomic` /
`write_json_atomic` (fsynced), strict JSON (`jsonable`: non-finite floats as null), and a full disk
said in one line (`DiskFull`: the file and the room left on its filesystem)."""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


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
    """"free: N MB on MOUNT" for the filesystem that holds `path` (or its nearest existing
    folder)."""
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

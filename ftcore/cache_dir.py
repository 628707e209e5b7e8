"""Where ftcore keeps what it makes once per machine: presets, MLX conversions, JIT kernels and the
GEMM-peak cache; and the check that a folder ftcore is to make is not blocked by a file."""

from __future__ import annotations

import os
import pwd
from collections.abc import Mapping
from pathlib import Path

from ftcore.config import UserError


def file_in_the_way(path: Path) -> Path | None:
    """The nearest existing path at or above `path` when it is not a folder (a regular file, say),
    else None: mkdir would fail below it with a bare "File exists" / "Not a directory"."""
    for p in (path, *path.parents):
        if p.exists():
            return None if p.is_dir() else p
    return None


def cache_root(env: Mapping[str, str] | None = None) -> Path:
    """$FTCORE_CACHE (of ``env``, default this process's), else ~/.cache/ftcore, where an empty
    $HOME counts as unset (the home folder in the user database, as Python's Path.home() does
    without HOME) rather than putting the cache at /.cache. Refused in one line when a file is
    where the folder must be."""
    env = os.environ if env is None else env
    if env.get("FTCORE_CACHE"):
        root, named = Path(env["FTCORE_CACHE"]).expanduser(), "FTCORE_CACHE"
    else:
        try:
            home = env.get("HOME") or pwd.getpwuid(os.getuid()).pw_dir
        except KeyError:  # no entry in the user database (some containers)
            home = ""
        if not home:
            raise UserError(
                "HOME is empty or unset and the user database names no home folder; set HOME, "
                "or FTCORE_CACHE to a folder for ftcore's cache"
            )
        root, named = Path(home) / ".cache" / "ftcore", "the cache folder"
    if blocker := file_in_the_way(root):
        what = "is a file" if blocker == root else f"cannot be made: {blocker} is a file"
        raise UserError(f"{named} {root} {what}, not a folder; point FTCORE_CACHE at a folder "
                        "(it is made if missing)")
    return root

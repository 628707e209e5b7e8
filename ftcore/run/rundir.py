"""Run folders: claimed atomically, never mixed with an earlier run, marked with how they ended.

* A new default folder (`runs/compare-<time>`) is created with `mkdir`, which fails if the name
  exists, so two runs started in the same second get `...-<time>` and `...-<time>-1`.
* `--out` at an existing, non-empty folder is refused unless `replace` is set. A replaced run is
  moved aside (`.<name>.replaced-<pid>`), the new run is written in its place, and the old one is
  deleted only once the new one has ended ok; a replacement that failed or was interrupted puts
  the old one back (a failed one is kept beside it as `<name>.failed-<time>-<pid>`).
* `status.json` in the folder says `running` while the run lasts, then `complete`, `failed`
  (a backend did not finish ok, or the disk filled up) or `interrupted`, with the exit code. On a
  full disk it is rewritten in place, where an atomic rewrite has no room.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from ftcore.cache_dir import file_in_the_way
from ftcore.config import UserError
from ftcore.files import DiskFull, json_bytes, write_json_atomic

STATUS_FILE = "status.json"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _dead_run(out: Path) -> str:
    """", whose process (pid N) died without ending it" when status.json still says `running` and
    that process is gone (e.g. SIGKILLed), else ""."""
    import json

    try:
        st = json.loads((out / STATUS_FILE).read_text())
        pid = int(st["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return ""
    if st.get("status") != "running":
        return ""
    try:
        os.kill(pid, 0)  # signal 0: does the process exist?
    except ProcessLookupError:
        return f" whose process (pid {pid}) died without ending it (status.json still says running)"
    except PermissionError:
        pass
    return ""


class RunFolder:
    """The folder one command writes. `claim()` it after every input check has passed (nothing
    is written for a refused run), then `end(status, exit_code)` or `interrupted()`."""

    def __init__(self, out: Path | None, replace: bool = False, root: Path = Path("runs"),
                 prefix: str = "compare") -> None:
        self.requested, self.replace, self.root, self.prefix = out, replace, root, prefix
        self.path: Path | None = None
        self._aside: Path | None = None
        self._status: dict = {}

    @property
    def replacing(self) -> bool:
        return self._aside is not None

    def check(self) -> None:
        """Refuse an --out that holds an earlier run (unless replacing), or is not a folder."""
        out = self.requested
        if out is None:
            return
        if out.exists() and not out.is_dir():
            raise UserError(f"--out {out}: exists and is not a folder")
        if blocker := file_in_the_way(out):
            raise UserError(
                f"--out {out}: {blocker} is a file, not a folder, so the run folder cannot be made "
                "below it; choose an --out outside it"
            )
        if out.is_dir() and any(out.iterdir()) and not self.replace:
            raise UserError(
                f"--out {out}: holds an earlier run{_dead_run(out)}; pass --replace to replace it "
                "whole"
            )

    def claim(self) -> Path:
        self.check()
        try:
            self.path = (
                self._new_default() if self.requested is None else self._take(self.requested)
            )
        except OSError as e:
            raise UserError(f"cannot create the run folder: {e.strerror}: {e.filename}") from None
        self._status = {"status": "running", "pid": os.getpid(), "command": sys.argv,
                        "started_utc": _now()}  # fmt: skip
        self._write_status()
        return self.path

    def _new_default(self) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        base = self.root / time.strftime(f"{self.prefix}-%Y%m%d-%H%M%S")
        for n in range(1000):
            path = base if n == 0 else Path(f"{base}-{n}")
            try:
                path.mkdir()  # atomic: exactly one claimant gets each name
                return path
            except FileExistsError:
                continue
        raise UserError(f"{self.root}: 1000 runs started in one second")

    def _take(self, out: Path) -> Path:
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.is_dir() and any(out.iterdir()):  # replace (check() refused otherwise)
            self._aside = out.with_name(f".{out.name}.replaced-{os.getpid()}")
            os.rename(out, self._aside)
        out.mkdir(exist_ok=True)
        if not os.access(out, os.W_OK | os.X_OK):
            raise UserError(f"--out {out}: not writable")
        return out

    def _write_status(self) -> None:
        path = self.path / STATUS_FILE
        try:
            write_json_atomic(path, self._status)
        except DiskFull as full:
            # no room for a second copy: rewrite it in place, within the block the file already
            # holds (a few hundred bytes), which a full disk does not refuse
            try:
                with open(path, "r+b") as f:
                    f.write(json_bytes(self._status))
                    f.truncate()
            except OSError:
                raise full from None

    def end(self, status: str, exit_code: int) -> None:
        """The run ended (`complete` or `failed`). Complete: the replaced run, if any, is deleted
        now. Failed: the replaced run is put back in its place (it stays until a new run ends
        ok) and this one is kept beside it as `<name>.failed-<time>`, said in one line."""
        self._status.update(status=status, exit_code=exit_code, ended_utc=_now())
        try:
            self._write_status()
        finally:  # a status that cannot be written (a full disk) still puts a replaced run back
            self._put_back(status)

    def mark_failed(self, exit_code: int) -> str:
        """After an OSError (a full disk): status.json says failed. Returns "" or, when even that
        cannot be written, the words that say so, for the same error line."""
        if self.path is None:
            return ""
        try:
            self.end("failed", exit_code)
        except OSError as e:
            return (
                f"; {self.path / STATUS_FILE} could not be marked failed either ({e.strerror or e})"
            )
        return ""

    def _put_back(self, status: str) -> None:
        if self._aside is None:
            return
        if status == "complete":
            shutil.rmtree(self._aside, ignore_errors=True)
        else:
            failed = self.path.with_name(
                f"{self.path.name}.failed-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
            )
            os.rename(self.path, failed)
            os.rename(self._aside, self.path)
            print(
                f"ftcore: this run did not end ok, so {self.path} keeps the earlier run it was to "
                f"replace; this one is in {failed}",
                file=sys.stderr,
            )
        self._aside = None

    def interrupted(self, exit_code: int = 130) -> None:
        """Stopped by a signal: mark the folder, or put back the run it was replacing."""
        if self.path is None:
            return
        if self._aside is not None:  # the earlier, complete run is worth more than half a new one
            shutil.rmtree(self.path, ignore_errors=True)
            os.rename(self._aside, self.path)
            self._aside = None
            return
        self._status.update(status="interrupted", exit_code=exit_code, ended_utc=_now())
        self._write_status()

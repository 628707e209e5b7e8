"""A disk that fills up during `ftcore run` / `ftcore compare`: one `error:` line naming the file
and the room left, no traceback, no half-written file under its final name, status.json `failed`.

The full disk comes from tests/full_disk/sitecustomize.py, a hook that exists only under the test
suite (on the processes' PYTHONPATH with FTCORE_TEST_FULL_DISK; a user's run never has it): the
disk under the test's folder fills up at the first write to a named file, in the parent (the
batches, the report) or in the backend's process (its adapter). The mlx backend is used: its run
writes every file through Python, where the hook sees it (and its process starts in ~1.5 s).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FULL_DISK_HOOK = Path(__file__).resolve().parent / "full_disk"
SHORT = ["--steps", "2", "--eval-samples", "0", "--no-eval-generate"]


def ftcore_on_full_disk(disk: Path, fills_at: str, *args, cow: bool = False) -> subprocess.CompletedProcess:
    """`ftcore ARGS...` whose disk (the folder `disk`) fills up at the first write to `fills_at`;
    `cow`: a copy-on-write disk, where not even a rewrite in place finds room."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(FULL_DISK_HOOK), env.get("PYTHONPATH")]))
    env["FTCORE_TEST_FULL_DISK"] = f"{disk}:{fills_at}" + (":cow" if cow else "")
    return subprocess.run([sys.executable, "-m", "ftcore", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300)  # fmt: skip


def said_once(res: subprocess.CompletedProcess, path: Path, then: str = "") -> None:
    """One `error:` line, naming `path` and the room left (and `then`); no traceback."""
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in res.stderr, res.stderr
    assert re.fullmatch(f"error: no space left on device writing {re.escape(str(path))} "
                        rf"\(free: 0 MB on /[^)]*\){re.escape(then)}", errors[0]), errors[0]


def files(out: Path) -> list[str]:
    """Every file and folder under `out`, hidden ones (a temporary name) too."""
    return sorted(str(p.relative_to(out)) for p in out.rglob("*"))


def status(out: Path) -> dict:
    return json.loads((out / "status.json").read_text())


def test_full_disk_while_the_batches_are_written(tmp_path):
    disk = tmp_path / "disk"
    out = disk / "run"
    res = ftcore_on_full_disk(disk, "batches.npz", "run", "--backend", "mlx", *SHORT, "--out", out)
    assert res.returncode == 2, res.stderr
    said_once(res, out / "batches.npz")
    assert files(out) == ["status.json"]  # no batches.npz, whole or half, nor its temporary file
    assert status(out)["status"] == "failed" and status(out)["exit_code"] == 2


def test_full_disk_in_the_backend_process(tmp_path):
    """The adapter finds no room, then neither the child's nor the parent's result.json: the
    child's last line names the adapter, the parent's error line its result.json; status.json is
    rewritten in place (no room for a second copy)."""
    disk = tmp_path / "disk"
    out = disk / "run"
    res = ftcore_on_full_disk(disk, "adapter_model.safetensors", "run", "--backend", "mlx", *SHORT, "--out", out)
    assert res.returncode == 2, res.stderr
    said_once(res, out / "result.json")
    assert f"[mlx] failed: no space left on device writing {out}/adapter/adapter_model.safetensors (free: 0 MB" in res.stderr
    assert files(out) == ["batches.npz", "status.json"]  # no adapter folder, no result.json, no temporary file
    assert status(out)["status"] == "failed" and status(out)["exit_code"] == 2


def test_full_disk_while_the_report_is_written(tmp_path):
    disk = tmp_path / "disk"
    out = disk / "cmp"
    res = ftcore_on_full_disk(disk, "comparison.json", "compare", "--backends", "mlx", *SHORT, "--out", out)
    assert res.returncode == 2, res.stderr
    said_once(res, out / "comparison.json")
    written = files(out)
    assert "mlx/result.json" in written and "mlx/adapter/adapter_model.safetensors" in written
    assert not [f for f in written if f.startswith(("comparison", "report", "loss_curves", ".")) or "/." in f], written
    assert status(out)["status"] == "failed"


def test_full_copy_on_write_disk_says_status_json_is_not_updated(tmp_path):
    """Where not even status.json can be rewritten, the same error line says so."""
    disk = tmp_path / "disk"
    out = disk / "run"
    res = ftcore_on_full_disk(disk, "batches.npz", "run", "--backend", "mlx", *SHORT, "--out", out, cow=True)
    assert res.returncode == 2, res.stderr
    said_once(res, out / "batches.npz",
              then=f"; {out}/status.json could not be marked failed either (no space left on device)")
    assert files(out) == ["status.json"] and status(out)["status"] == "running"

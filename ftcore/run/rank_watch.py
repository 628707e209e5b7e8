"""Data-parallel runs on the frameworks' own engines, the parent's side: each framework's
`launch_command` (ftcore.torch.env, ftcore.mlx.env) wraps a child's `python -m ftcore.run.child ...`
in its launcher, started `under_launcher` (ftcore.process.ranks, with the rank side);
`RankWatch` ends a launcher whose rank died while the others wait in an all-reduce; `merge_ranks`
folds every rank's file into rank 0's result (peak RSS summed and largest). ftcore writes no
transport of its own.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from pathlib import Path

from ftcore.process.ranks import RANKS_DIR, alive, rank_file
from ftcore.result import RunResult

DEAD_RANK_GRACE_S = 10.0  # a launcher still running this long after a rank died is ended


def merge_ranks(result: RunResult, out_dir: Path, world: int) -> list[int]:
    """Peak RSS over ranks into rank 0's result (summed: `peak_rss_mb`; largest:
    `peak_rss_max_rank_mb`) and each step's loss targets summed over ranks (`step_targets`);
    returns the ranks that left no file (died before their end)."""
    files = {r: rank_file(out_dir, r) for r in range(world)}
    ranks = {r: json.loads(f.read_text()) for r, f in files.items() if f.exists()}
    missing = [r for r in range(world) if r not in ranks]
    peaks = [ranks[r].get("peak_rss_mb") or 0.0 for r in sorted(ranks)]
    result.extra["ranks"] = [ranks[r] for r in sorted(ranks)]
    if peaks and not missing:
        result.peak_rss_mb = sum(peaks)
        result.peak_rss_max_rank_mb = max(peaks)
        per_rank = [ranks[r].get("step_targets") or [] for r in sorted(ranks)]  # (world, steps)
        result.step_targets = [sum(t) for t in zip(*per_rank, strict=False)]
    return missing


def prune_empty_dirs(root: Path) -> None:
    """Remove `root` and the directories under it that hold no file (deepest first, `root`
    last): torchrun makes a tree of per-rank log folders even when it writes no log into them."""
    for folder, _, _ in os.walk(root, topdown=False):
        with contextlib.suppress(OSError):  # not empty: a log worth keeping
            os.rmdir(folder)


class RankWatch:
    """Parent side: ranks announce their pid in out_dir/ranks/started-<r>; a rank whose process is
    gone without its rank file died. Launchers normally end the others; if the launcher is still
    running DEAD_RANK_GRACE_S later (a survivor stuck in a collective), `poll` ends its process
    group and every announced rank, and says which rank died."""

    def __init__(self, out_dir: Path, world: int, launcher_pid: int, stdin=None) -> None:
        self.out_dir, self.world, self.launcher = out_dir, world, launcher_pid
        self.dead_since: float | None = None
        self.dead: list[int] = []
        self.stdin, self.nudged = stdin, False

    def _pids(self) -> dict[int, int]:
        out = {}
        for r in range(self.world):
            with contextlib.suppress(OSError, ValueError):
                out[r] = int((self.out_dir / RANKS_DIR / f"started-{r}").read_text())
        return out

    def poll(self) -> bool:
        """True when it ended the launcher."""
        pids = self._pids()
        if len(pids) == self.world and not self.nudged:
            self._nudge()
        dead = [
            r
            for r, pid in pids.items()
            if not alive(pid) and not rank_file(self.out_dir, r).exists()
        ]
        if not dead:
            return False
        self.dead = sorted(set(self.dead) | set(dead))
        self.dead_since = self.dead_since or time.monotonic()
        if time.monotonic() - self.dead_since < DEAD_RANK_GRACE_S:
            return False
        self.kill(pids)
        return True

    def _nudge(self) -> None:
        """mlx.launch select()s on each rank's stdin pipe as writable and spins a core (measured:
        0.55 of 2) until a write to it fails. Every rank has put /dev/null on its stdin, so one
        byte, which mlx.launch copies to each rank, fails with EPIPE and stops the spin."""
        self.nudged = True
        with contextlib.suppress(OSError, ValueError, AttributeError):
            self.stdin.write("\n")
            self.stdin.flush()

    def kill(self, pids: dict[int, int] | None = None) -> None:
        """SIGKILL the launcher's group (call only while it is unreaped: its pid is still ours)
        and every announced rank."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.launcher, signal.SIGKILL)
        self.kill_ranks(pids)

    def kill_ranks(self, pids: dict[int, int] | None = None) -> None:
        """SIGKILL announced ranks still running (torchrun's workers lead their own sessions);
        a pid is only taken for a rank while it still runs ftcore.run.child."""
        for pid in (pids or self._pids()).values():
            with contextlib.suppress(OSError):
                if b"ftcore.run.child" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.kill(pid, signal.SIGKILL)

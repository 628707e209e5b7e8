"""Data-parallel runs on the frameworks' own engines: torch.distributed launched by torchrun, MLX's
mx.distributed launched by mlx.launch (ring backend). ftcore writes no transport of its own.

Parent side: each framework's `launch_command` (ftcore.torch.env, ftcore.mlx.env) wraps a child's
`python -m ftcore.run.child ...` in its launcher, started `under_launcher`;
`RankWatch` ends a launcher whose rank died while the others wait in an all-reduce; `merge_ranks`
folds every rank's file into rank 0's result (peak RSS summed and largest).
Rank side: `RankInfo.from_env`, `shard` (rank r takes rows [r*B/W, (r+1)*B/W) of every global
batch), rank files.

Loss normalisation: every rank holds the whole global batch, so each divides its shard's summed
cross-entropy by the GLOBAL target count; summing the ranks' losses and gradients (all-reduce SUM)
then gives the one-process loss and gradient exactly, up to float summation order, however
unevenly the targets fall between shards.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ftcore.config import RunConfig, UserError
from ftcore.result import RunResult, write_atomic, write_json_atomic

DIST_ENV = "FTCORE_WORLD_SIZE"  # set by the parent for a launched child: the world it expects
RANKS_DIR = "ranks"  # out_dir/ranks/rank-<r>.json: one file per rank, written at its end
LAUNCHER_LOGS_DIR = "launcher-logs"  # a launcher's log tree (torchrun --log-dir), kept if not empty
RANK_DIR_ENV = "FTCORE_RANK_DIR"  # a rank's out_dir/ranks, set by the runner's child main
DEAD_RANK_GRACE_S = 10.0  # a launcher still running this long after a rank died is ended


def rank_threads(cfg: RunConfig) -> int:
    """Threads each rank gets: the run's threads split over this machine's processes."""
    threads = cfg.threads or 1
    return max(1, threads // cfg.nproc)


def check_threads(cfg: RunConfig) -> None:
    """Refuse a split that leaves a rank without a thread (UserError)."""
    if cfg.threads is not None and cfg.threads < cfg.nproc:
        raise UserError(
            f"--nproc {cfg.nproc}: {cfg.threads} thread(s) cannot be split over {cfg.nproc} "
            "processes on this machine (each rank needs at least one; more would oversubscribe "
            "the cores)"
        )


def hostfile_hosts(path: str) -> list[dict]:
    """The hosts of an mlx.launch JSON hostfile (a list, or {"hosts": [...]}) ; UserError if bad."""
    p = Path(path).expanduser()
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"--hostfile {p}: cannot read it as JSON ({e})") from None
    hosts = data.get("hosts") if isinstance(data, dict) else data
    if not isinstance(hosts, list) or not all(isinstance(h, dict) and "ssh" in h for h in hosts):
        raise UserError(f'--hostfile {p}: expected a list of {{"ssh": HOST, "ips": [IP]}} entries')
    return hosts


def free_ports(n: int) -> int:
    """A base port with n consecutive ports free right now (mlx.launch's ring listens on them)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n > 65535:
            continue
        ok = True
        for p in range(base, base + n):
            with socket.socket() as s, contextlib.suppress(OSError):
                s.bind(("127.0.0.1", p))
                continue
            ok = False
        if ok:
            return base
    raise RuntimeError("no free ports for the MLX ring")


def under_launcher(cmd: list[str]) -> list[str]:
    """A launcher command started through ftcore.run.procs: PR_SET_PDEATHSIG, then exec."""
    return [sys.executable, "-m", "ftcore.run.procs", *cmd]


@dataclass(frozen=True)
class RankInfo:
    rank: int
    world: int
    local_rank: int

    @classmethod
    def from_env(cls) -> RankInfo | None:
        """This rank under a launcher (torchrun: RANK; mlx.launch: MLX_RANK), or None."""
        world = int(os.environ.get(DIST_ENV, "1"))
        if world <= 1:
            return None
        rank = int(os.environ.get("RANK", os.environ.get("MLX_RANK", "0")))
        local = int(os.environ.get("LOCAL_RANK", rank))
        return cls(rank, world, local)


def shard(batch: dict, rank: int, world: int) -> dict:
    """Rank `rank`'s rows of a global batch: (B, L) -> (B / world, L), contiguous."""
    rows = next(iter(batch.values())).shape[0] // world
    return {k: v[rank * rows : (rank + 1) * rows] for k, v in batch.items()}


def rank_file(out_dir: Path, rank: int) -> Path:
    return out_dir / RANKS_DIR / f"rank-{rank}.json"


def write_rank_file(out_dir: Path, rank: int, **fields) -> None:
    write_json_atomic(rank_file(out_dir, rank), {"rank": rank, "pid": os.getpid(),
                                                 "host": socket.gethostname(), **fields})


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
        dead = [r for r, pid in pids.items() if not _alive(pid) and not rank_file(self.out_dir, r).exists()]
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


def announce(out_dir: Path, rank: int) -> None:
    """Rank side, first thing: my pid, for the parent's RankWatch and the other ranks; stdin
    from /dev/null (see RankWatch._nudge)."""
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    (out_dir / RANKS_DIR).mkdir(parents=True, exist_ok=True)
    write_atomic(out_dir / RANKS_DIR / f"started-{rank}", str(os.getpid()).encode())
    os.environ[RANK_DIR_ENV] = str(out_dir / RANKS_DIR)


def sibling_pids() -> list[int]:
    """The other ranks' pids on this machine (their CPU time is the run's, not another load's)."""
    folder = os.environ.get(RANK_DIR_ENV)
    out = []
    for f in Path(folder).glob("started-*") if folder else ():
        with contextlib.suppress(OSError, ValueError):
            if (pid := int(f.read_text())) != os.getpid():
                out.append(pid)
    return out


def _alive(pid: int) -> bool:
    """Running and not a zombie (/proc on Linux; elsewhere: the pid exists)."""
    if not os.path.isdir("/proc/self"):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False

"""Data-parallel ranks, the side that runs under a launcher (torchrun, mlx.launch) and the
launcher's command line; ftcore.run.rank_watch is the parent's side.

Rank side: `RankInfo.from_env`, `shard` (rank r takes rows [r*B/W, (r+1)*B/W) of every global
batch), `announce` (my pid), rank files, `sibling_pids`. Launcher side: `rank_threads`,
`check_threads`, `hostfile_hosts`, `free_ports`, `under_launcher`.

Loss normalisation: every rank holds the whole global batch, so each divides its shard's summed
cross-entropy by the GLOBAL target count; summing the ranks' losses and gradients (all-reduce SUM)
then gives the one-process loss and gradient exactly, up to float summation order, however
unevenly the targets fall between shards.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from ftcore.config import RunConfig, UserError
from ftcore.files import write_atomic, write_json_atomic

DIST_ENV = "FTCORE_WORLD_SIZE"  # set by the parent for a launched child: the world it expects
RANKS_DIR = "ranks"  # out_dir/ranks/rank-<r>.json: one file per rank, written at its end
LAUNCHER_LOGS_DIR = "launcher-logs"  # a launcher's log tree (torchrun --log-dir), kept if not empty
RANK_DIR_ENV = "FTCORE_RANK_DIR"  # a rank's out_dir/ranks, set by the runner's child main


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


def alive(pid: int) -> bool:
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

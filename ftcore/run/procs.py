"""The child processes of a run: started in their own session, stopped together, and never left
behind.

* Own session: a Ctrl-C at the terminal (SIGINT to the foreground process group) reaches only the
  parent, which then stops every child itself (`stop_all`) and marks the run interrupted; the
  children never print a KeyboardInterrupt traceback.
* Never orphaned: a child asks the kernel for SIGTERM when its parent dies (`die_with_parent`,
  Linux PR_SET_PDEATHSIG), so even a SIGKILLed parent leaves no child running.
* Launchers (torchrun, mlx.launch) start through `python -m ftcore.run.procs`, which asks for the
  same death signal and then execs them; their ranks ask for it against the launcher.
* Why a child died: "killed by the kernel's OOM killer" only when the cgroup's oom_kill counter
  rose while it ran, else the signal's name.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

PARENT_ENV = "FTCORE_PARENT_PID"  # the pid a child expects as its parent
_PR_SET_PDEATHSIG = 1
LIVE: set[subprocess.Popen] = set()  # children started and not yet reaped


def spawn(cmd: list[str], env: dict[str, str], **kw) -> subprocess.Popen:
    """Popen in a new session, registered in LIVE until `reaped`."""
    env = {**env, PARENT_ENV: str(os.getpid())}
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, **kw)
    LIVE.add(proc)
    return proc


def reaped(proc: subprocess.Popen) -> None:
    LIVE.discard(proc)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)  # the child leads its own group (start_new_session)


def stop_all(grace_s: float = 3.0) -> None:
    """SIGTERM every live child's process group; SIGKILL what is still there after grace_s."""
    for proc in list(LIVE):
        _signal_group(proc, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for proc in list(LIVE):
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    kill_all()


def kill_all() -> None:
    for proc in list(LIVE):
        _signal_group(proc, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired, ChildProcessError):
            proc.wait(timeout=5)
        reaped(proc)


def die_with_parent() -> None:
    """Child side, first thing: SIGTERM me when my parent dies; exit now if it already has."""
    expected = os.environ.get(PARENT_ENV)
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if expected and os.getppid() != int(expected):  # the parent died before prctl took effect
        os._exit(143)


def oom_kills() -> int | None:
    """This cgroup's count of processes killed by the OOM killer (cgroup v2 or v1), or None."""
    for path, key in (
        ("/sys/fs/cgroup/memory.events", "oom_kill"),
        ("/sys/fs/cgroup/memory/memory.oom_control", "oom_kill"),
    ):
        with contextlib.suppress(OSError, ValueError):
            for line in Path(path).read_text().splitlines():
                name, _, value = line.partition(" ")
                if name == key:
                    return int(value)
    return None


def death_reason(signum: int, oom_before: int | None) -> str:
    """'killed by SIGKILL', or the OOM killer when the kernel's counter says so."""
    name = signal.Signals(signum).name
    after = oom_kills()
    if (
        signum == signal.SIGKILL
        and oom_before is not None
        and after is not None
        and after > oom_before
    ):
        return "killed by the kernel's OOM killer (out of memory)"
    return f"killed by {name}"


def exec_dying_with_parent(argv: list[str]) -> None:
    """`python -m ftcore.run.procs CMD...`: die with the parent, then become CMD (a launcher). The
    death signal survives exec; CMD's children (the ranks) expect this pid as their parent."""
    die_with_parent()
    os.environ[PARENT_ENV] = str(os.getpid())
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    exec_dying_with_parent(sys.argv[1:])

"""Was the machine quiet while we timed? CPU time that other processes (and the hypervisor) took
on this process's cores over a stretch of wall time.

Read from /proc/stat (per-CPU jiffies, for the CPUs this process may run on) and this process's own
CPU time: other = busy time on those CPUs - our own. Torch's OpenMP threads spin while they wait
for a core, so one CPU-hungry process beside a 2-thread torch run can make its steps 30x slower;
a result taken that way is flagged, not reported as a figure of the framework.
Linux only; elsewhere nothing is measured (None).
"""

from __future__ import annotations

import os
import time

from ftcore.measure.hostinfo import affinity_cores

# Other processes busier than this many cores on average, or a hypervisor stealing more than this
# fraction of our cores' time, make a timing "busy": figures can be far off (measured: 0.4 s ->
# 14 s for 9 torch steps with one busy process beside it on 2 cores).
BUSY_OTHER_CORES = 0.25
BUSY_STEAL_FRACTION = 0.10
MIN_WINDOW_S = 0.2  # /proc/stat counts in 10 ms ticks: shorter windows cannot tell


def _cpu_ticks() -> tuple[int, int] | None:
    """(busy, steal) ticks summed over the CPUs this process may use, or None without /proc."""
    try:
        allowed = os.sched_getaffinity(0)
        with open("/proc/stat") as f:
            lines = f.read().splitlines()
    except (AttributeError, OSError):
        return None
    busy = steal = 0
    for line in lines:
        name, *fields = line.split()
        if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in allowed:
            continue
        user, nice, system, _idle, _iowait, irq, softirq, st = (int(v) for v in fields[:8])
        busy += user + nice + system + irq + softirq
        steal += st
    return busy, steal


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _pids_cpu_s(pids: list[int]) -> float:
    """CPU seconds (user + system) of these processes so far; a gone one counts 0."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
        except (OSError, IndexError, ValueError):
            pass
    return total / os.sysconf("SC_CLK_TCK")


class MachineLoad:
    """`start()` then `stop()` around the timed work; `stop()` returns the record (or None).
    `siblings()`: pids whose CPU time is the run's own too (the other ranks of a data-parallel
    run)."""

    def __init__(self, siblings=None) -> None:
        self._start: tuple[float, float, tuple[int, int]] | None = None
        self._siblings = siblings or (lambda: [])
        self._pids: list[int] = []

    def _own(self) -> float:
        return _own_cpu_s() + _pids_cpu_s(self._pids)

    def start(self) -> None:
        ticks = _cpu_ticks()
        self._pids = list(self._siblings())
        self._start = None if ticks is None else (time.monotonic(), self._own(), ticks)

    def stop(self) -> dict | None:
        """{wall_s, cores, other_cores, steal_fraction, busy, reason} over the window."""
        ticks = _cpu_ticks()
        if self._start is None or ticks is None:
            return None
        t0, own0, (busy0, steal0) = self._start
        wall = time.monotonic() - t0
        hz = os.sysconf("SC_CLK_TCK")
        cores = affinity_cores()
        own = self._own() - own0
        other = max(0.0, (ticks[0] - busy0) / hz - own)
        steal = (ticks[1] - steal0) / hz
        record = {
            "wall_s": wall,
            "cores": cores,
            "other_cores": other / wall if wall > 0 else None,
            "steal_fraction": steal / (wall * cores) if wall > 0 else None,
            "busy": None,
            "reason": None,
        }
        return judge(record)


def judge(record: dict) -> dict:
    """Set `busy` and `reason` of a {wall_s, cores, other_cores, steal_fraction} record: too short
    a window cannot tell (busy None); else busy when either share is above its limit."""
    if record["wall_s"] < MIN_WINDOW_S:
        record["busy"], record["reason"] = (
            None,
            f"window {record['wall_s']:.2f} s too short to tell",
        )
        return record
    reasons = []
    if record["other_cores"] > BUSY_OTHER_CORES:
        reasons.append(
            f"other processes kept {record['other_cores']:.2f} of {record['cores']} cores busy"
        )
    if record["steal_fraction"] > BUSY_STEAL_FRACTION:
        reasons.append(f"the hypervisor stole {100 * record['steal_fraction']:.0f}% of CPU time")
    record["busy"] = bool(reasons)
    record["reason"] = "; ".join(reasons) or None
    return record


def busy_warning(record: dict | None) -> str | None:
    """The warning line for a result whose timed steps ran on a busy machine, else None."""
    if not record or not record.get("busy"):
        return None
    return (f"BUSY MACHINE: {record['reason']} during the timed steps "
            f"({record['wall_s']:.1f} s); its timings are not this framework's figures")

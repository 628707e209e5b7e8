"""What machine and software a run ran on: CPU, cores, OS, package versions, git commit.

A leaf module (no ftcore imports), so every other module may use it. Nothing here raises.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path

VERSIONED = ("torch", "transformers", "peft", "mlx", "mlx-lm", "datasets", "numpy")
# Thread and preload settings decide which BLAS runs and how wide: results record them as given.
BLAS_ENV = (
    "LD_PRELOAD",
    "OPENBLAS_CORETYPE",
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if sys.platform == "darwin":
        try:
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"],
                                  capture_output=True, text=True, timeout=5).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine()


def cpu_features() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def affinity_cores() -> int:
    """Cores this process may run on (the container's share, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS has no sched_getaffinity
        return os.cpu_count() or 1


def version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit() -> str | None:
    """HEAD of the checkout that holds this package, or None (not a checkout, no commit, no git)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parents[2],
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    sha = out.stdout.strip()
    return sha if out.returncode == 0 and sha else None


def host_info() -> dict:
    """Machine, OS, versions and git commit for a result row."""
    return {
        "cpu": cpu_model(),
        "machine": platform.machine(),
        "logical_cores": os.cpu_count(),
        "affinity_cores": affinity_cores(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": {d: version(d) for d in VERSIONED},
        "git_commit": git_commit(),
        "blas_env": {k: os.environ.get(k) for k in BLAS_ENV},
    }

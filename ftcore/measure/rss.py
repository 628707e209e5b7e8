"""Resident memory of this process: now, and its peak over a block (PeakRSS).

Peaks are per process, which is why the runner gives every backend a fresh one.
"""

from __future__ import annotations

import resource
import sys
import threading

import psutil


def current_rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def rss_high_water_mb() -> float:
    """Kernel's peak RSS of *this process* since it started (or since reset_rss_high_water):
    VmHWM on Linux, ru_maxrss otherwise (KiB on Linux, bytes on macOS)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2**20 if sys.platform == "darwin" else r / 1024


def reset_rss_high_water() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakRSS:
    """Peak resident memory of this process over a ``with`` block.

    A background thread samples RSS every ``interval_s``; on exit the peak is the max of the
    samples and the kernel's high-water mark, which catches spikes between samples. The
    high-water mark is per process and covers its whole lifetime unless it can be reset: with
    ``reset=True`` we try /proc/self/clear_refs (``hwm_reset`` says if it worked); otherwise
    an earlier peak in the same process leaks in. Child processes are not counted.
    """

    def __init__(self, interval_s: float = 0.02, reset: bool = True) -> None:
        self.interval_s = interval_s
        self.reset = reset
        self.hwm_reset = False
        self.start_mb = 0.0
        self.sampled_peak_mb = 0.0
        self.peak_mb = 0.0
        self.samples = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._proc = psutil.Process()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval_s)

    def _sample(self) -> None:
        mb = self._proc.memory_info().rss / 2**20
        self.sampled_peak_mb = max(self.sampled_peak_mb, mb)
        self.samples += 1

    def __enter__(self) -> PeakRSS:
        if self.reset:
            self.hwm_reset = reset_rss_high_water()
        self.start_mb = current_rss_mb()
        self._sample()
        self._thread = threading.Thread(target=self._run, name="ftcore-peak-rss", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()
        self.peak_mb = max(self.sampled_peak_mb, rss_high_water_mb())

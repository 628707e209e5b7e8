"""Test-only hook, never part of a user's run: with this folder on PYTHONPATH and
FTCORE_TEST_SLOW_STEPS="FACTOR:LABEL" (e.g. "1.3:mlx#2"), the ftcore child processes whose --out
lies under a folder named LABEL take FACTOR times as long for each training step: after the step
ran, StepClock.end sleeps (FACTOR - 1) x the step's own time before reading the clock. Used by
tests/test_compare_repeats.py to check that `ftcore compare` names a slower backend slower.
FTCORE_TEST_FAIL_STEPS="LABEL": those children fail at their first step's end instead (a
RuntimeError); tests/test_sweep.py uses it for a sweep point that fails."""

from __future__ import annotations

import os
import sys

_SPEC = os.environ.get("FTCORE_TEST_SLOW_STEPS")
_FAIL = os.environ.get("FTCORE_TEST_FAIL_STEPS")


def _slowed(out: str, label: str) -> bool:
    from pathlib import Path

    return label in Path(out).parts


def _chosen(label: str) -> bool:
    """Whether this process is an ftcore child whose --out lies under a folder named `label`."""
    argv = sys.argv
    return "--out" in argv and _slowed(argv[argv.index("--out") + 1], label)


def _slow_step_clock(module) -> None:
    import time

    factor_text, label = _SPEC.split(":", 1)
    factor = float(factor_text)
    if not _chosen(label):
        return
    end = module.StepClock.end

    def slowed_end(self, step, loss, seconds=None, **kw):  # kw: what end() records besides the time
        if seconds is None:  # the step ran between begin and end: stretch it
            time.sleep((factor - 1) * (time.perf_counter() - self._t))
        return end(self, step, loss, seconds, **kw)

    module.StepClock.end = slowed_end


def _failing_step_clock(module) -> None:
    if not _chosen(_FAIL):
        return

    def failing_end(self, *args, **kw):
        raise RuntimeError(f"test hook: FTCORE_TEST_FAIL_STEPS={_FAIL}")

    module.StepClock.end = failing_end


if _SPEC or _FAIL:
    import importlib.abc
    import importlib.machinery

    class _StepClockFinder(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != "ftcore.backends.step_clock":
                return None
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            run = spec.loader.exec_module

            def exec_module(module):
                run(module)
                if _SPEC:
                    _slow_step_clock(module)
                if _FAIL:
                    _failing_step_clock(module)

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, _StepClockFinder())

"""The environment of a torch process (set by the parent before it starts; imports no torch).

Every BLAS library is removed from LD_PRELOAD: torch's CPU wheel links MKL statically but calls
sgemm_ through its PLT, so a preloaded OpenBLAS would interpose it (see ftcore.blas).
"""

from __future__ import annotations

from ftcore import blas


def child_env(base_env: dict, threads: int) -> dict:
    """Environment for a torch process: no BLAS preload, every thread count set to `threads`."""
    return blas.with_threads(blas.without_blas_preload(base_env), threads)

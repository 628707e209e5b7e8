"""Measurement by concern: peak RSS, the analytic memory model, the machine and its versions,
which BLAS each framework calls, FLOPs per token, timing a GEMM, the GEMM peak and MFU, and the
machine's load during the timed steps."""

#!/usr/bin/env bash
# One-time setup on a fresh machine: an optimized BLAS for MLX (Linux), a virtual environment
# in .venv with ftcore and its test/benchmark tools. Safe to re-run: a finished install is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# MLX's Linux CPU wheel calls a bundled reference BLAS (~7 GFLOP/s here); ftcore preloads
# OpenBLAS into MLX processes (~250 GFLOP/s) when Debian/Ubuntu's libopenblas0-pthread is present.
if [ "$(uname -s)" = Linux ] && ! ldconfig -p 2>/dev/null | grep -q libopenblas; then
  if command -v apt-get >/dev/null; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq libopenblas0-pthread >/dev/null \
      || echo "setup: could not install libopenblas0-pthread; MLX will run on its slow reference BLAS" >&2
  else
    echo "setup: install OpenBLAS (or set FTCORE_BLAS_PRELOAD) or MLX runs on its slow reference BLAS" >&2
  fi
fi

# Headless Chromium for tests/test_flamegraph.py, which opens a written flamegraph offline
# (Debian's chromium-headless-shell: ~96 MB download, ~11 s to install here).
if [ "$(uname -s)" = Linux ] && ! command -v chromium-headless-shell >/dev/null && ! command -v chromium >/dev/null; then
  if command -v apt-get >/dev/null; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    apt_chromium() { $SUDO apt-get install -y -qq --no-install-recommends chromium-headless-shell >/dev/null; }
    apt_chromium || { $SUDO apt-get update -qq && apt_chromium; } \
      || echo "setup: could not install chromium-headless-shell; tests/test_flamegraph.py will fail" >&2
  else
    echo "setup: install a headless Chromium (or set FTCORE_CHROMIUM) for tests/test_flamegraph.py" >&2
  fi
fi

stamp=.venv/.ftcore-installed
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# uv installs the same versions as pip, ~3x sooner (~25 s instead of ~75 s here); pip stays the
# fallback. torch is pinned and installed first: on Linux an unpinned torch pulls a multi-GB CUDA
# build. uv installs it only from a local wheel folder that pip is configured with (PIP_FIND_LINKS
# or pip's find-links), where the CPU wheel lies; otherwise pip installs it, with its own settings.
links=${PIP_FIND_LINKS:-$(.venv/bin/python -m pip config get global.find-links 2>/dev/null || true)}
if .venv/bin/python -m pip install -q uv 2>/dev/null; then
  uvpip() { .venv/bin/uv pip install -q --compile-bytecode --python .venv/bin/python "$@"; }
  if [ -n "$links" ]; then uvpip --find-links "$links" "torch==2.13.0"
  else .venv/bin/python -m pip install -q "torch==2.13.0"; fi
  uvpip -e ".[dev,mlx-lm]"
else
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q "torch==2.13.0"
  .venv/bin/python -m pip install -q -e ".[dev,mlx-lm]"
fi
echo "$want" > "$stamp"

#!/usr/bin/env bash
# GPU check (under 5 minutes on one NVIDIA GPU): the --device gpu paths of torch (CUDA) and MLX
# (its CUDA build), at tiny size and at TinyLlama width (4 layers), then the data-parallel parity
# tests on the GPU. Prints one PASS/FAIL line per stage; exit 0 only when every stage passed.
#   bash scripts/gpu_check.sh [OUT_DIR]     (default: runs/gpu-check-<time>)
# Needs: an NVIDIA driver; a CUDA torch wheel and `pip install -e '.[cuda]'` (mlx[cuda]) in .venv.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
OUT="${1:-runs/gpu-check-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT"
export FTCORE_CACHE="${FTCORE_CACHE:-$HOME/.cache/ftcore}"
fail=0
stage() {  # stage NAME TIMEOUT_S CMD...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  if timeout "$limit" "$@" >"$OUT/$name.log" 2>&1; then
    echo "PASS $name ($((SECONDS - t0)) s)"
  else
    echo "FAIL $name (exit $?, $((SECONDS - t0)) s): $(tail -n 3 "$OUT/$name.log" | tr '\n' ' ')"
    fail=1
  fi
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
stage devices 60 $PY -c "
import torch, mlx.core as mx
assert torch.cuda.is_available(), 'torch sees no CUDA device (install a CUDA torch wheel)'
assert mx.is_available(mx.gpu), 'MLX sees no GPU (pip install mlx[cuda])'
print(torch.cuda.get_device_name(0), mx.default_device())"
stage tiny-compare 120 $PY -m ftcore compare --device gpu --backends torch,mlx --steps 10 --out "$OUT/tiny"
stage tinyllama-4l-compare 180 $PY -m ftcore compare --device gpu --backends torch,mlx \
  --preset tinyllama-1.1b --num-layers 4 --batch-size 2 --max-seq-len 256 --steps 6 --out "$OUT/tinyllama-4l"
stage tiny-nproc2-compare 180 $PY -m ftcore compare --device gpu --backends torch,mlx --nproc 2 \
  --steps 4 --num-samples 16 --eval-samples 4 --max-seq-len 64 --batch-size 4 --out "$OUT/tiny-nproc2"
# the per-step loss parity of each compare (fp32: within 1e-4 across frameworks, 1e-5 N vs 1 process)
stage parity-check 30 $PY - "$OUT" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
for run in ("tiny", "tinyllama-4l", "tiny-nproc2"):
    comp = json.loads((out / run / "comparison.json").read_text())
    rows = {r["backend"]: r for r in comp["rows"]}
    assert comp["all_ok"], (run, comp["failed_backends"])
    d = comp["loss_diff"]["max_abs_diff"]
    assert d < 1e-4, (run, d)
    for name, r in rows.items():
        assert r["framework_peak_mb"] and r["mfu_percent"] and 0 < r["mfu_percent"] < 100, (run, name, r)
    print(run, "max loss diff", d, {n: (r["tokens_per_s"], r["mfu_percent"]) for n, r in rows.items()})
PY
FTCORE_TEST_DEVICE=gpu stage parity-tests 240 $PY -m pytest -q -x tests/test_data_parallel.py -k losses_equal
echo "logs and runs: $OUT"
exit $fail

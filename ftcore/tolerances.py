"""Every parity tolerance: how far two computations that ftcore says agree may differ (torch vs
MLX, a backend vs the reference backend, N processes vs one, a checkpointed layer vs a kept one,
a packed row vs its records alone). Tests, the bench, the report's fairness check and the docs
read them from here (tests/test_architecture.py: no test or bench file defines its own).

Each comment says what the constant bounds and the worst value measured that it was set from.
Where a `test_tolerance*_are_at_most_10x_the_measured` sits beside a bound (forward logits, loss
and gradients in one process, the training trajectories), it measures the stated cases again and
fails when the bound no longer holds them or is more than 10x above them.
u = fp32 unit roundoff (2^-23); n = a dot product's length.
"""

from __future__ import annotations

# ---------------------------------------------------------------- the run's contract (report,
# bench)

# fp32 per-step and eval losses of a `same_numerics` backend vs REFERENCE_BACKEND's in one run
# (compare, bench, hf-trainer vs torch); measured 2.5e-5 on the default run, ~2e-6 on `tiny`;
# torch vs MLX over 30 steps of --fine-tune dora / full 1.5e-5 (tests/test_parity_training.py)
REFERENCE_LOSS_ATOL = 1e-4

# ---------------------------------------------------------------- fp32 logits (one process)

# logits of one model + adapter computed two ways (MLX vs transformers + peft, mlx-lm vs ftcore's
# MLX model, a saved adapter reloaded), short batches; measured |mlx - torch| <= 1.4e-5 (stated
# cases)
FP32_LOGITS_ATOL = 1e-4
# short random batches: |mlx - ref64| <= RATIO * max(|torch - ref64|, FLOOR), ref64 = the PEFT
# model in float64; measured worst ratio 2.77, median 1.1 (tests/test_parity_forward.py)
FP32_LOGITS_ERROR_RATIO = 10.0
# ~ fp32 rounding of O(10) logits: torch's error when it is almost exact
FP32_LOGITS_ERROR_FLOOR = 1e-6
# long batches (up to 512 tokens): |mlx - peft| at position p <= ATOL * max(1, p / FLAT_POSITIONS)
# (fp32 RoPE angles drift with p); measured over 600 cases worst err/bound 0.41 (3.1e-4 at p ~ 430)
FP32_LONG_LOGITS_ATOL = 1e-4
LONG_LOGITS_FLAT_POSITIONS = 32
# bf16 logits, MLX vs transformers, relative to max |logit|; measured 0.09 at max |logit| 7.4
# (0.012)
BF16_LOGITS_RTOL = 0.03

# ---------------------------------------------------------------- fp32 loss and gradients (one
# process)

# mean loss of one batch (values up to ~10) computed two ways (MLX vs torch, mlx-lm's step 0 vs
# float64 CE of ftcore's MLX logits); measured 1.9e-6 (stated cases), 4.8e-6 over 500 random ones
FP32_LOSS_ATOL = 1e-5
# summed loss of one batch, MLX vs torch, relative (tests/test_loss_definition.py,
# tests/test_packing.py); no measurement recorded
FP32_LOSS_SUM_RTOL = 1e-4
# each framework's summed loss vs the float64 contract (reference_sum_count) on its own logits,
# relative; no measurement recorded
FP32_LOSS_REFERENCE_RTOL = 1e-5
# token-weighted eval loss (torch's and MLX's `evaluate`) vs CE by hand on torch's logits; no
# measurement recorded
FP32_EVAL_LOSS_ATOL = 1e-5
# LoRA gradients per tensor k, MLX vs torch: ||g_mlx_k - g_torch_k|| <= RTOL ||g_torch_k|| + GTOL
# ||g_all|| + ABS sqrt(numel_k); measured worst err/budget 0.157 (stated cases), 0.6 over 500
# random ones, 0.37 over 42 long ones (tests/test_parity_grads.py)
FP32_GRAD_RTOL = 3e-5
FP32_GRAD_GTOL = 3e-6
FP32_GRAD_ABS = 3e-9  # ~ fp32 noise of a gradient that is ~0 in exact arithmetic (u ~ 6e-8)
# a packed row's loss sum and LoRA gradients vs its records' alone, relative; measured loss 1.6e-7,
# gradients 2.8e-6 (MLX; torch 4.6e-8, 9.2e-7), seeds 0-4 (tests/test_packing.py)
FP32_PACKED_RTOL = 1e-5
# the MLX step split over CPU streams vs one pass: loss relative, and gradients relative to each
# tensor's largest |g|; no measurement recorded (tests/test_mlx_streams.py)
FP32_STREAMS_LOSS_RTOL = 1e-6
FP32_STREAMS_GRAD_RTOL = 1e-5

# ---------------------------------------------------------------- LoRA layer, optimizer

# MLX LoRALinear vs PEFT's per output: ATOL + RTOL |y| + DOT_ULPS u sqrt(n) sum|a_i b_i| (the
# probabilistic fp32 dot-product bound); no measurement recorded (tests/test_parity_lora_layer.py)
FP32_LORA_LAYER_ATOL = 1e-5
FP32_LORA_LAYER_RTOL = 1e-4
FP32_DOT_ULPS = 4
# MLX DoRALinear vs PEFT's use_dora Linear, gradients (lora_A, lora_B, magnitude, input): GRAD_ATOL
# + the dot budget above with g's rounding in, the output with the LoRA layer's constants; measured
# worst err/tol 0.12 over 500 random cases (median 0.006; output 0.009)
# (tests/test_parity_lora_layer.py)
FP32_DORA_GRAD_ATOL = 1e-7
# bf16 base, fp32 adapter: output <= one bf16 ulp of |y| and of |W x| + OUTPUT_DOT_RTOL sum|a_i
# b_i|; adapter gradients <= GRAD_ATOL + the fp32 dot budget; measured gradients worst err/tol 0.14
# (200 cases)
BF16_LORA_OUTPUT_DOT_RTOL = 1e-6
BF16_LORA_GRAD_ATOL = 1e-7
# AdamW after `steps` steps, torch and MLX vs the float64 formula and each other, elementwise:
# DECAY_ULPS * steps * u |p| + UPDATE_RTOL * sum(lr) / sqrt(1 - beta2); measured worst err/tol
# 0.36 (torch vs MLX 0.24) over 300 cases (tests/test_parity_optimizer.py)
FP32_ADAMW_DECAY_ULPS = 3
FP32_ADAMW_UPDATE_RTOL = 1e-5
# the learning rate each step used, read back from each optimizer (MLX's is a float32, 6e-8
# relative rounding), vs the other backend's and the documented schedule (ftcore.report.fairness)
LR_RTOL = 1e-6

# ---------------------------------------------------------------- training trajectories (20 steps)

# fp32 per-step and eval losses, torch vs MLX backend; measured 6.2e-6 over the seven fp32 runs
# (tests/test_parity_training.py)
FP32_STEP_LOSS_ATOL = 4e-5
# fp32 final adapter per tensor, ||mlx - torch|| / ||torch|| and relative to the update; measured
# 1.47e-3 on a Zen 2 EPYC (4.3e-4 with AVX-512)
FP32_ADAPTER_RTOL = 3e-3
# bf16 base (LoRA + AdamW fp32): per-step loss diff, measured 2.1e-3 (losses ~6.5)
BF16_STEP_LOSS_ATOL = 4e-3
BF16_EVAL_LOSS_ATOL = 2.2e-3  # bf16 eval loss diff; measured 1.3e-3
BF16_ADAPTER_RTOL = 0.13  # bf16 worst adapter tensor ||mlx - torch|| / ||torch||; measured 0.038
BF16_GLOBAL_RTOL = 0.065  # bf16 all adapter updates together, relative; measured 0.027
BF16_MIN_COSINE = 0.993  # bf16 worst cosine between the two backends' updates; measured 0.9947
BF16_VS_FP32_ATOL = 3e-3  # one backend's bf16 vs fp32 per-step losses; measured 1.9e-3

# ---------------------------------------------------------------- one backend, two ways of running
# it

# fp32 per-step and eval losses, --nproc 2 vs one process; measured <= 1e-6 on the test's tiny run
# (tests/test_data_parallel.py), 4.8e-6 at TinyLlama width, 4 layers, 6 steps
# (docs/data-parallel.md)
FP32_DATA_PARALLEL_LOSS_ATOL = 1e-5
# fp32 gradient norm before clipping, --nproc 2 vs one process, relative; measured <= 5.9e-7
FP32_DATA_PARALLEL_GRAD_NORM_RTOL = 5e-6
# fp32 per-step and eval losses, --grad-checkpoint vs not; no measurement recorded
FP32_GRAD_CHECKPOINT_LOSS_ATOL = 1e-5
# fp32 per-step losses and trained adapter tensors (elementwise), --batch-size 2 --grad-accum 4 vs
# --batch-size 8 in one backend (tests/test_torch_backends.py, tests/test_mlx_backend.py);
# measured on `tiny`, 3 steps: losses 4.8e-7, adapter elements 1.4e-6 (torch); a mean of the
# micro-batches' means instead moves the losses by 0.038
FP32_GRAD_ACCUM_ATOL = 1e-5

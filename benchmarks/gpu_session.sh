#!/usr/bin/env bash
# The prepared check for one short GPU lease (about 10 minutes of device time): correctness of the
# current code on CUDA, then the timings the open GPU targets need (the fused path's time and
# memory, docs/fused_linear.md "GPU measurement"; the loss kernels against the CE kernels,
# docs/benchmarks.md; the training statistics' extra time, README "Training statistics"), all
# output under $OUT. Installs nothing from the network: packages the GPU image lacks (Liger-Kernel,
# Cut Cross-Entropy, TRL) travel as wheels in .whl/ (see the device notes of the tool library).
# Written 2026-11-30 without a GPU at hand: not yet run.
#
#   bash benchmarks/gpu_session.sh            # from the repository root, on the GPU machine
set -u
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
fi
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; git log -1 --format='commit %h %cd';
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } \
    2>&1 | tee "$OUT/env.txt"

# 1. Correctness on CUDA against the float64 reference: both kernel designs, every option and
#    dtype, metrics, the fused path and its memory modes, torch.compile of the Triton path, the
#    whole-gradient rescaling kernel (exact rounding on CUDA) and the options layer.
timeout 200 python3 -m pytest -q -x -rs -p no:cacheprovider tests/test_gem_loss.py tests/test_gem_paths.py \
    tests/test_metrics.py tests/test_fused_linear.py tests/test_fused_memory_modes.py tests/test_compile.py \
    tests/test_grad_scale.py tests/test_options.py \
    2>&1 | tee "$OUT/tests.log"

# 2. Timings: the loss on given logits and the lm_head step at Llama-3 8B, 8,192 tokens, with the
#    half-masked variant, the copy-bandwidth and matmul-rate ceilings measured in the same run.
timeout 420 python3 -m benchmarks --models llama3 --tokens 8192 --no-plots --out "$OUT" 2>&1 | tee "$OUT/bench.log"

# 3. The statistics' extra time (target: at most 5%, README "Training statistics").
timeout 60 python3 -m benchmarks.metrics_cost --skip-traffic 2>&1 | tee "$OUT/metrics_cost.log"

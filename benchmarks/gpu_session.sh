#!/usr/bin/env bash
# One prepared device session (see /work/.library/device), in order of what matters, each step under a time cap:
# the GPU tests (Triton kernels, SyncBatchNorm, the ERF batch sized by memory), the paper's ERF protocol on the GPU
# (RepLKNet-31B, 50 images at 1024^2, auto batch and one image per pass), Table 1 on the GPU in fp32, bf16 and fp16
# (fastconv.bench, cudnn.benchmark on) and the per-op backend choice at K = 31.
# Usage on the GPU machine, from the repository root:  bash benchmarks/gpu_session.sh [SECONDS]   (results under
# $OUT: log.txt and results.tar.gz; SECONDS, default 520, is the whole script's budget: a step starts only with
# time left, and is cut at its cap or the budget). Images: ERF_IMAGES (default .gpu_images, 50 cue-conflict
# stimuli copied beside the checkout, else the built-in set of 8).
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" ERF_LAB_CACHE=/tmp/erf-lab-cache
OUT=${OUT:-gpu_results}; mkdir -p "$OUT"; RES=/tmp/gpu_results; mkdir -p "$RES"
END=$(( $(date +%s) + ${1:-520} ))
if ls .whl/*.whl >/dev/null 2>&1; then      # captum is not in the GPU image: carried as a wheel
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
IMAGES=${ERF_IMAGES:-.gpu_images}; [ -d "$IMAGES" ] || IMAGES=default
step() {  # step CAP_SECONDS TITLE COMMAND...: run with the smaller of its cap and the time left, print its duration
  local cap=$1 title=$2; shift 2; local left=$(( END - $(date +%s) ))
  if [ "$left" -lt 15 ]; then echo "== $title: skipped, budget spent"; return; fi
  echo "== $title"; local t0=$(date +%s)
  timeout $(( cap < left ? cap : left )) "$@"; echo "   [rc $?, $(( $(date +%s) - t0 )) s]"
  tar -czf "$OUT/results.tar.gz" -C "$RES" . 2>/dev/null  # after every step: a run stopped early keeps the rest
}
{
  nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cudnn', torch.backends.cudnn.version())"
  step 110 "pytest -m gpu (Triton; SyncBatchNorm: 2 gloo ranks on 1 GPU vs 1 process; ERF auto batch, halved on OOM)" \
    python3 -m pytest -q -s -m gpu -p no:cacheprovider tests/test_fastconv_triton.py tests/test_train_sync_bn_gpu.py \
      tests/test_erf_gpu.py
  step 120 "ERF, the paper's protocol: replknet_31b, 50 images at 1024^2, auto batch (sized by memory), TF32 off" \
    python3 -m erf_lab compute --model replknet_31b --device cuda --images "$IMAGES" --num-images 50 \
      --input-size 1024 --out "$RES/erf_auto" --quiet
  step 70 "ERF, the same with one image per pass" \
    python3 -m erf_lab compute --model replknet_31b --device cuda --images "$IMAGES" --num-images 50 \
      --input-size 1024 --batch-size 1 --out "$RES/erf_b1" --quiet
  # without the channels_last column: cuDNN's channels_last search takes 20-50 s per K = 31 case (H200, 2026-12-04),
  # and the 2026-11-28 table has it; each (R, K) row is written when done, so a step cut at its cap keeps its rows
  for dt in float32 bfloat16 float16; do
    step 120 "Table 1 on the GPU, $dt" python3 -m fastconv.bench --device cuda --kernels 3,13,31 --resolutions 32,64 \
      --layers 2 --repeats 5 --impls pytorch_nchw,fastconv --dtype $dt --out "$RES/table1_$dt"
  done
  step 40 "per-op backend choice (forward, input gradient, weight gradient), fp32 K=31" python3 -c "
import torch, fastconv
for r in (32, 64):
    x = torch.randn(64, 384, r, r, device='cuda').contiguous(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(384, 1, 31, 31, device='cuda', requires_grad=True)
    print(fastconv.explain(x, w), flush=True)
"
} 2>&1 | grep --line-buffered -v '^fastconv bench:' | tee "$OUT/log.txt"  # line by line: a cut run keeps its log
ls -la "$OUT"

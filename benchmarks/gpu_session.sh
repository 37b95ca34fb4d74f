#!/usr/bin/env bash
# One prepared device session (see /work/.library/device): GPU tests (the Triton backend, SyncBatchNorm), the
# paper's Table 1 on the GPU (fastconv.bench, cudnn.benchmark on), fastconv under torch.compile, optionally the kernel
# sweep, the ERF benchmark on CUDA and torchrun/NCCL.
# Usage on the GPU machine, from the repository root:  bash benchmarks/gpu_session.sh [full]   (results under $OUT)
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-gpu_results}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then      # captum is not in the GPU image: carried as a wheel
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
{
  nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cudnn', torch.backends.cudnn.version())"
  echo "== pytest -m gpu (Triton kernels; --sync-bn: 2 gloo ranks on one GPU against 1 process over the whole batch)"
  timeout 150 python3 -m pytest -q -s -m gpu -p no:cacheprovider tests/test_fastconv_triton.py \
      tests/test_train_sync_bn_gpu.py 2>&1 | grep -E 'passed|failed|error|Error|relative errors|^FAILED' | tail -15
  echo "== Table 1 on the GPU"; timeout 170 python3 -m fastconv.bench --device cuda --kernels 3,13,31 --resolutions 32,64 \
      --layers 2 --repeats 5 --out "$OUT/table1" 2>&1 | grep -v '^fastconv bench'
  echo "== per-op autotune on the GPU (forward + both gradients; explain prints each operation's backend and times)"
  timeout 60 python3 -c "
import torch, fastconv
for k in (3, 13, 31):
    for r in (32, 64):
        x = torch.randn(64, 384, r, r, device='cuda').contiguous(memory_format=torch.channels_last).requires_grad_()
        w = torch.randn(384, 1, k, k, device='cuda', requires_grad=True)
        print(fastconv.explain(x, w).split(chr(10) + '   not ')[0], flush=True)
"
  echo "== torch.compile on the GPU (inductor; fastconv's custom ops against the stock convolution compiled)"
  timeout 120 python3 benchmarks/bench_compile.py --device cuda --batch 64 --kernels 13 31 --rounds 5 --steps 0 \
      --out "$OUT/compile" 2>&1 | grep -E '^(\| [0-9]|K=|Traceback|[A-Za-z]*Error)'
  if [ "${1:-}" = full ]; then
    echo "== kernel sweep"; timeout 170 python3 benchmarks/gpu_fastconv_check.py --ks 31 3 13 27 --resolutions 32 64 \
        --dtypes float32 float16 bfloat16 --budget-s 120 --out "$OUT"
    echo "== ERF benchmark on cuda (TF32 off: fp32 gradients)"; NVIDIA_TF32_OVERRIDE=0 timeout 150 python3 \
        benchmarks/bench_erf.py --device cuda --images 6 --size 448 --repeats 2 --out "$OUT/erf" 2>&1 | tail -60
    echo "== torchrun / NCCL"; timeout 50 torchrun --standalone --nproc_per_node=1 -m erf_lab compute \
        --model replknet_31b --device cuda --num-images 2 --input-size 224 --out /tmp/nccl_run --quiet \
        && cp /tmp/nccl_run/run.json "$OUT/nccl_run.json"
  fi
} 2>&1 | tee "$OUT/log.txt"

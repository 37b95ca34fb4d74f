#!/usr/bin/env bash
# One prepared device session (see /work/.library/device): GPU tests of the Triton kernels, the kernel
# speed/correctness sweep, the ERF benchmark on CUDA (erf-lab vs the official algorithm) and a torchrun/NCCL run.
# Usage on the GPU machine, from the repository root:  bash benchmarks/gpu_session.sh   (results under $OUT)
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
  echo "== pytest -m gpu"; timeout 90 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_fastconv_triton.py 2>&1 | tail -15
  echo "== kernel sweep"; timeout 170 python3 benchmarks/gpu_fastconv_check.py --ks 31 3 13 27 --resolutions 32 64 \
      --dtypes float32 float16 bfloat16 --budget-s 120 --out "$OUT"
  echo "== ERF benchmark on cuda"; timeout 150 python3 benchmarks/bench_erf.py --device cuda --images 6 --size 448 \
      --repeats 2 --out "$OUT/erf" 2>&1 | tail -60
  echo "== torchrun / NCCL"; timeout 50 torchrun --standalone --nproc_per_node=1 -m erf_lab compute --model replknet_31b \
      --device cuda --num-images 2 --input-size 224 --out /tmp/nccl_run --quiet && cp /tmp/nccl_run/run.json "$OUT/nccl_run.json"
} 2>&1 | tee "$OUT/log.txt"

"""ERF measurement on CUDA (run on a GPU machine: ``pytest -m gpu``; skipped elsewhere)."""
import numpy as np
import pytest
import torch

from erf_lab.erf.compute import compute_erf
from erf_lab.models import create_model

TINY_KW = {"channels": (8, 8, 8, 8), "layers": (1, 1, 1, 1)}


@pytest.mark.gpu
def test_auto_batch_is_sized_by_memory_on_cuda_and_gives_the_same_erf():
    """batch_size=None on CUDA: one image in the first pass, then a batch from its peak memory (issue 14). The mean
    map equals one-image passes' in full fp32 (TF32 off in compute_erf) up to summation order."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    model = create_model("replknet_31b", **TINY_KW).eval()
    images = torch.rand(9, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    auto = compute_erf(model, images, batch_size=None, device="cuda", show_progress=False)
    one = compute_erf(model, images, batch_size=1, device="cuda", show_progress=False)
    mem = auto.info["batch_memory"]
    print(f"batch sized by memory: {mem}")
    assert mem["per_image_bytes"] > 0 and mem["available_bytes"] > 0
    assert auto.info["batch_size"] == mem["batch_size"] == 4  # half of the 8 left after the one-image pass
    assert [n for n, _ in auto.info["batch_seconds"]] == [1, 4, 4]
    assert auto.num_used == one.num_used == 9
    err = np.abs(auto.erf - one.erf).max() / np.abs(one.erf).max()
    assert err < 1e-5, err


@pytest.mark.gpu
def test_a_memory_sized_batch_that_runs_out_of_memory_is_halved_on_cuda(fastconv_isolated):
    """A real CUDA out-of-memory: the process may reserve only about three images' memory more than it holds
    (``set_per_process_memory_fraction``), while the batch is sized from the device's free memory, which that
    limit does not lower. The batch of 8 fails, is halved until it fits, and the map is the one-image passes'
    (fastconv tunes in a fresh cache: choices made under the limit are not kept)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    model = create_model("replknet_31b", **TINY_KW).eval()
    # 1024 px: tens of MB per image, well above the caching allocator's block sizes
    images = torch.rand(17, 3, 1024, 1024, generator=torch.Generator().manual_seed(0))
    one = compute_erf(model, images, batch_size=1, device="cuda", show_progress=False)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    compute_erf(model, images[:1], batch_size=1, device="cuda", show_progress=False)
    per_image = torch.cuda.max_memory_allocated() - base
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.empty_cache()
    try:
        torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_reserved() + 3.5 * per_image) / total)
        auto = compute_erf(model, images, batch_size=None, device="cuda", show_progress=False)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    sizes = [n for n, _ in auto.info["batch_seconds"]]
    print(f"per image {per_image / 2**20:.1f} MiB; halved at {auto.info.get('batch_halved_at')}; passes {sizes}")
    assert auto.info["batch_memory"]["batch_size"] == 8  # half of the 16 left: the size the memory did not hold
    assert auto.info["batch_halved_at"][0] == 8 and auto.info["batch_size"] < 8 and max(sizes[1:]) < 8
    assert sizes[0] == 1 and sum(sizes) == 17 and auto.num_used == 17
    err = np.abs(auto.erf - one.erf).max() / np.abs(one.erf).max()
    assert err < 1e-5, err


@pytest.mark.gpu
def test_a_torchrun_job_whose_processes_share_one_gpu_stops_with_one_line(tmp_path):
    """``CUDA_VISIBLE_DEVICES=0 torchrun --nproc_per_node 2 -m erf_lab compute --device cuda``: each process sees one
    GPU, so the launcher check takes it for its own; the GPUs' UUIDs meet over gloo and both ranks stop with exit
    status 2 and one line (before: NCCL's "Duplicate GPU detected" at the first collective)."""
    import os
    import socket
    import subprocess
    import sys

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "0", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2", "--master_addr",
           "127.0.0.1", "--master_port", str(port), "-m", "erf_lab", "compute", "--model", "replknet_31b",
           "--override", "channels=(8,8,8,8)", "--override", "layers=(1,1,1,1)", "--num-images", "2",
           "--input-size", "32", "--device", "cuda", "--out", str(tmp_path / "run"), "--quiet"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if "erf-lab compute: error:" in line]
    assert len(lines) == 2 and "ranks 0 and 1 run on the same GPU (GPU-" in lines[0], proc.stderr[-3000:]
    assert "Duplicate GPU" not in proc.stderr and not (tmp_path / "run" / "run.json").exists()

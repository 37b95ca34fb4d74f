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

"""fastconv with rectangular kernels (SLaK's decomposed 51x5 / 5x51 branches): forward and both gradients of
every backend vs F.conv2d, and the drop-in module's 'same' padding per side."""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

import fastconv

BACKENDS = [b for b in fastconv.BACKENDS if b != "triton"]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
KERNELS = [(51, 5), (5, 51), (13, 3)]


@pytest.fixture(autouse=True)
def _isolated_settings(fastconv_isolated):
    fastconv_isolated.configure(autotune=False)  # the cost model only: these tests check exactness, not choices
    yield


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def _cases():
    for device in DEVICES:
        for backend in (BACKENDS if device == "cpu" else ["native", "channels_last", "triton"]):
            for dtype in (torch.float32, torch.float64):
                if dtype == torch.float64 and (backend == "cpp" or device == "cuda" and backend == "triton"):
                    continue  # cpp: float32 only; Triton on GPU: checked in float32
                for kernel in KERNELS:
                    yield pytest.param(device, backend, dtype, kernel, id=f"{device}-{backend}-{str(dtype)[6:]}-"
                                                                          f"{kernel[0]}x{kernel[1]}")


@pytest.mark.parametrize("device,backend,dtype,kernel", list(_cases()))
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_rectangular_kernel_forward_and_gradients_match_conv2d(device, backend, dtype, kernel, layout):
    g = torch.Generator().manual_seed(kernel[0] * 100 + kernel[1])
    x = torch.randn(2, 6, 19, 23, generator=g, dtype=dtype)  # H, W below and above the kernel sides
    w = torch.randn(6, 1, *kernel, generator=g, dtype=dtype)
    b = torch.randn(6, generator=g, dtype=dtype)
    x, w, b = x.to(device), w.to(device), b.to(device)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    ref_leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    y = fastconv.depthwise_conv2d(*leaves, backend=backend)
    ref = F.conv2d(*ref_leaves, padding=(kernel[0] // 2, kernel[1] // 2), groups=6)
    tol_y, tol_g = (1e-12, 1e-12) if dtype == torch.float64 else (1e-5, 1e-4)
    assert y.shape == ref.shape == (2, 6, 19, 23)
    assert _rel(y, ref) <= tol_y
    gy = torch.randn(ref.shape, generator=g, dtype=dtype).to(device)
    for name, got, exp in zip(("input", "weight", "bias"), torch.autograd.grad(y, leaves, gy),
                              torch.autograd.grad(ref, ref_leaves, gy)):
        assert got.shape == exp.shape and _rel(got, exp) <= tol_g, name


def test_module_pads_each_side_by_its_own_half():
    m = fastconv.DepthwiseConv2d(4, (51, 5), bias=True)
    assert m.kernel_size == (51, 5) and m.padding == (25, 2) and tuple(m.weight.shape) == (4, 1, 51, 5)
    x = torch.randn(1, 4, 30, 30, dtype=torch.float64)
    m = m.double()
    ref = F.conv2d(x, m.weight, m.bias, padding=(25, 2), groups=4)
    with torch.no_grad():
        assert _rel(m(x), ref) <= 1e-12

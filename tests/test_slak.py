"""SLaK: official key layout, strict checkpoint loading, the exact kernel merge, parameter counts of the paper,
feature intermediates and an ERF run."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from erf_lab.erf.runner import ErfSpec, run_erf
from erf_lab.models import create_model, list_models, reparameterize_model
from erf_lab.models.reparam import randomize_bn
from erf_lab.models.slak import SLaKLargeKernel, sparse_param_count

PAPER_PARAMS_M = {"slak_t": 30, "slak_s": 55, "slak_b": 95}  # README / paper Table 2, 40 % sparse
TINY = dict(dims=(8, 8, 16, 16), depths=(1, 1, 2, 1), kernel_size=(13, 11, 9, 7, 3), width_factor=1.0)


def _official_keys(depths, dims, kernel_size, num_classes=1000):
    """Key -> shape of the official ``models/SLaK.py`` (``Decom=True``) state dict, from its module structure."""
    def conv_bn(prefix, c, kh, kw):
        return {f"{prefix}.conv.weight": (c, 1, kh, kw), f"{prefix}.bn.weight": (c,), f"{prefix}.bn.bias": (c,),
                f"{prefix}.bn.running_mean": (c,), f"{prefix}.bn.running_var": (c,),
                f"{prefix}.bn.num_batches_tracked": ()}

    small = kernel_size[-1]
    keys = {"downsample_layers.0.0.weight": (dims[0], 3, 4, 4), "downsample_layers.0.0.bias": (dims[0],),
            "downsample_layers.0.1.weight": (dims[0],), "downsample_layers.0.1.bias": (dims[0],)}
    for i in range(1, 4):
        keys.update({f"downsample_layers.{i}.0.weight": (dims[i - 1],), f"downsample_layers.{i}.0.bias": (dims[i - 1],),
                     f"downsample_layers.{i}.1.weight": (dims[i], dims[i - 1], 2, 2),
                     f"downsample_layers.{i}.1.bias": (dims[i],)})
    for s in range(4):
        c, k = dims[s], kernel_size[s]
        for j in range(depths[s]):
            p = f"stages.{s}.{j}"
            keys.update(conv_bn(f"{p}.large_kernel.LoRA1", c, k, small))
            keys.update(conv_bn(f"{p}.large_kernel.LoRA2", c, small, k))
            keys.update(conv_bn(f"{p}.large_kernel.small_conv", c, small, small))
            keys.update({f"{p}.norm.weight": (c,), f"{p}.norm.bias": (c,), f"{p}.pwconv1.weight": (4 * c, c),
                         f"{p}.pwconv1.bias": (4 * c,), f"{p}.pwconv2.weight": (c, 4 * c), f"{p}.pwconv2.bias": (c,),
                         f"{p}.gamma": (c,)})
    keys.update({"norm.weight": (dims[-1],), "norm.bias": (dims[-1],), "head.weight": (num_classes, dims[-1]),
                 "head.bias": (num_classes,)})
    return keys


def _shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_slak_t_state_dict_is_the_official_layout():
    with torch.device("meta"):
        model = create_model("slak_t")
    expected = _official_keys((3, 3, 9, 3), (124, 249, 499, 998), (51, 49, 47, 13, 5))  # int(1.3 x 96...)
    assert _shapes(model) == expected
    assert len(expected) == 18 * 25 + 16 + 4


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _randomized(seed=0, **kw):
    torch.manual_seed(seed)
    model = create_model("slak_t", num_classes=10, **{**TINY, **kw})
    randomize_bn(model, seed=seed, input_size=64)
    with torch.no_grad():
        for block in model.modules():
            if hasattr(block, "gamma") and isinstance(block.gamma, torch.nn.Parameter):
                block.gamma.uniform_(0.5, 1.5)  # layer scale 1e-6 at init would hide the block
    return model.eval()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
@pytest.mark.parametrize("decompose", [True, False])
def test_kernel_merge_is_exact(dtype, tol, decompose):
    model = _randomized(decompose=decompose).to(dtype)
    x = torch.randn(2, 3, 64, 64, dtype=dtype)
    with torch.no_grad():
        ref = model(x)
        merged = reparameterize_model(model)
        assert _rel(merged(x), ref) < tol
    keys = merged.state_dict().keys()
    assert not any("LoRA" in k or "small_conv" in k or "lkb_origin" in k for k in keys)
    assert tuple(merged.state_dict()["stages.0.0.large_kernel.lkb_reparam.weight"].shape) == (8, 1, 13, 13)
    # the merged layout is what deploy=True builds
    deployed = create_model("slak_t", num_classes=10, deploy=True, **TINY).to(dtype).eval()
    deployed.load_state_dict(merged.state_dict(), strict=True)
    with torch.no_grad():
        assert _rel(deployed(x), ref) < tol


def test_merge_is_idempotent_and_pads_each_branch_to_its_place():
    lk = SLaKLargeKernel(2, 7, 3).eval()
    with torch.no_grad():
        for b in (lk.LoRA1, lk.LoRA2, lk.small_conv):
            b.conv.weight.fill_(1.0)
    k, b = lk.equivalent_kernel_bias()
    bn_scale = 1 / (1 + 1e-5) ** 0.5  # fresh BN: gamma 1, var 1
    expected = torch.zeros(7, 7, dtype=torch.float64)
    expected[:, 2:5] += 1  # 7x3: full height, centre columns
    expected[2:5, :] += 1  # 3x7
    expected[2:5, 2:5] += 1  # 3x3
    assert torch.allclose(k[0, 0], expected * bn_scale, rtol=0, atol=1e-12)
    assert torch.equal(b, torch.zeros(2, dtype=torch.float64))
    lk.reparameterize()
    first = lk.lkb_reparam.weight.clone()
    lk.reparameterize()
    assert torch.equal(lk.lkb_reparam.weight, first)


def test_merge_when_the_small_kernel_is_wider_than_the_stage_kernel():
    """kernel_size (..., 3, 5): the 3 x 5 / 5 x 3 strips merge into a 5 x 5 kernel (cropping them to 3 x 3 would
    drop taps); the cropped taps only read padding on a 2 x 2 map, so the input is large enough to see them."""
    torch.manual_seed(0)
    lk = SLaKLargeKernel(4, 3, 5)
    with torch.no_grad():
        for m in lk.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1), m.running_var.uniform_(0.5, 1.5), m.bias.normal_(0, 0.3)
    lk.eval()
    x = torch.randn(1, 4, 16, 16)
    with torch.no_grad():
        ref = lk(x)
        lk.reparameterize()
        assert tuple(lk.lkb_reparam.weight.shape) == (4, 1, 5, 5) and _rel(lk(x), ref) < 1e-6
    merged = SLaKLargeKernel(4, 3, 5, merged=True)  # what a deploy checkpoint of it loads into
    merged.load_state_dict(lk.state_dict(), strict=True)


@pytest.mark.parametrize("merged", [False, True])
def test_official_layout_checkpoint_loads_strictly(tmp_path, merged):
    src = _randomized()
    if merged:
        src = reparameterize_model(src)
    path = tmp_path / "slak.pth"
    torch.save({"model": src.state_dict()}, path)
    model = create_model("slak_t", weights=str(path), num_classes=10, **TINY).eval()
    assert model.state_dict().keys() == src.state_dict().keys()
    assert all(torch.equal(v, src.state_dict()[k]) for k, v in model.state_dict().items())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), src(x))


@pytest.mark.parametrize("name", ["slak_t", "slak_s", "slak_b"])
def test_parameter_counts_match_the_paper(name):
    """The paper counts the non-zero weights of the 40 %-sparse training-time model (its dense weights are
    1/0.6 more for the sparsified tensors); measured: T 30.47M, S 54.78M, B 94.91M."""
    with torch.device("meta"):
        model = create_model(name)
    dense = sum(p.numel() for p in model.parameters()) / 1e6
    sparse = sparse_param_count(model) / 1e6
    assert abs(sparse - PAPER_PARAMS_M[name]) < 0.5, sparse
    assert dense > 1.5 * PAPER_PARAMS_M[name]


def test_forward_intermediates_and_registry():
    assert {"slak_t", "slak_s", "slak_b"} <= set(list_models())
    model = create_model("slak_s", num_classes=0, **TINY).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        assert [t.shape[1:] for t in inter] == [(8, 16, 16), (8, 8, 8), (16, 4, 4), (16, 2, 2)]
        assert torch.equal(final, model.forward_features(x))
        early = model.forward_intermediates(x, indices=[0], stop_early=True, intermediates_only=True)
        assert torch.equal(early[0], inter[0])


def test_erf_run_through_the_runner(tmp_path):
    spec = ErfSpec("slak_t", overrides=dict(TINY), num_images=1, input_size=64)
    res = run_erf(spec, out=tmp_path / "run", show_progress=False, formats=("png",))
    erf = res["result"].erf
    assert erf.shape == (64, 64) and float(erf.max()) > 0
    assert np.array_equal(np.load(tmp_path / "run" / "erf.npy"), erf)
    # the patchify stem: unit 1 of the 2 x 2 map is centred at 15.5 + 32 = 47.5 -> 48, not 64 // 2
    assert res["run_info"]["erf_centre"] == [48, 48] and res["metrics"]["center"] == [48, 48]
    # 100 px is no multiple of 32: the unpadded stem and downsamplings give 25 -> 12 -> 6 -> 3 (not ceil(100 / 32) =
    # 4, whose unit 2 would be centred at 79.5): unit 1 at 47.5 -> 48
    res = run_erf(ErfSpec("slak_t", overrides=dict(TINY), num_images=1, input_size=100), out=tmp_path / "r100",
                  show_progress=False, formats=("png",))
    assert res["run_info"]["erf_centre"] == [48, 48]


def test_erf_lab_models_describes_the_variants():
    from erf_lab.models.summary import describe_model

    row = describe_model("slak_t")
    assert row["family"] == "slak" and row["kernel_sizes"] == [51, 49, 47, 13]
    assert row["params"] == 50_703_838 and row["deploy_params"] == 60_577_702  # dense: merged 51x51 is larger

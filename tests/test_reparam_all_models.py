"""``reparameterize_model`` gives an exact inference form for EVERY registered model (timm convention):
all conv-BN pairs folded into biased convs (conv-BN fusion, Ding et al. 2021 RepVGG / 2022 RepLKNet Sec. 3),
idempotent, on a copy unless ``inplace=True``. New registered models are covered automatically (parametrized over ``list_models()``)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from erf_lab.models import create_model, list_models, reparameterize_model
from erf_lab.models.deploy import max_relative_error
from erf_lab.models.reparam import randomize_bn
from erf_lab.models.summary import model_family

#: Reduced-width overrides per architecture family (the module file name), to keep the test fast.
TINY = {
    "replknet": dict(channels=(8, 16, 16, 16), layers=(1, 1, 1, 1)),
    "resnet": dict(width=8),
    "mobilenetv2": dict(width_mult=0.25),
    "efficientnet_lite": {},
    # layer scale 1 (1e-6 at init would hide every block behind the residual)
    "unireplknet": dict(dims=(8, 16, 16, 24), depths=(1, 1, 2, 1), kernel_sizes=((3,), (13,), (7, 5), (9,)),
                        layer_scale_init_value=1.0),
    "slak": dict(dims=(8, 8, 16, 16), depths=(1, 1, 1, 1), kernel_size=(13, 11, 9, 7, 3), width_factor=1.0,
                 layer_scale_init_value=1.0),
}
#: Families whose fused form merges parallel branch convs into one (the conv list shrinks, its types stay).
MERGES_BRANCHES = {"replknet", "unireplknet", "slak"}
#: BatchNorms deliberately left by the fused form (documented in the architecture's module).
KEPT_BN = {"replknet": {"norm"}}  # final BN before pooling: nothing after it to fold into (replknet.py)
#: Odd, non-square input: exercises EfficientNet-Lite's asymmetric TF "SAME" padding after fusion.
INPUT = (1, 3, 49, 47)
#: Required fp32 agreement (max |y - y'| / max |y|) of the original and the fused form, or (deep nets whose
#: own fp32 rounding w.r.t. float64 is already ~TOL: ResNet-101/152 with random BN, 1.4e-5 accumulated over
#: 100-150 layers) a fused form whose error w.r.t. float64 is within FLOOR_FACTOR x the original's (measured
#: ratio <= 1.95; a wrong fold gives > 1e-3, i.e. > 15x this bound).
TOL = 1e-5
FLOOR_FACTOR = 4.0


pytestmark = pytest.mark.usefixtures("one_thread")


def family(name: str) -> str:
    with torch.device("meta"):
        return model_family(create_model(name))


def conv_types(model: nn.Module) -> list[type]:
    return [type(m) for m in model.modules() if isinstance(m, nn.Conv2d)]


def outputs(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(feature map, logits) of ``model`` on ``x`` (cast to the model's dtype)."""
    feat = model.forward_features(x.to(next(model.parameters()).dtype))
    return feat, model.forward_head(feat)


def error(ref: tuple[torch.Tensor, torch.Tensor], out: tuple[torch.Tensor, torch.Tensor]) -> float:
    """Max relative error (max |a - b| / max |a|, in float64) over the feature map and the logits."""
    return max(max_relative_error(r, o) for r, o in zip(ref, out))


def check_fused(model: nn.Module, fam: str, x: torch.Tensor) -> tuple[float, float, float]:
    """Fuse a copy of ``model``; assert equivalence (feature map and logits), exactness in float64, idempotence,
    BN removal. Returns (fp32 error, fp32 rounding floor of the original, float64 error)."""
    with torch.no_grad():
        ref = outputs(model, x)
        m64 = copy.deepcopy(model).double()
        ref64 = outputs(m64, x)
        floor = error(ref64, ref)  # fp32 rounding of the ORIGINAL model w.r.t. float64
        # The algebra is exact: in float64 the fused form agrees to rounding.
        err64 = error(ref64, outputs(reparameterize_model(m64), x))
        assert err64 < 1e-12, err64
        fused = reparameterize_model(model)
        assert all(torch.equal(a, b) for a, b in zip(outputs(model, x), ref))  # copy by default: model untouched
        assert fused is not model and any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
        out = outputs(fused, x)
        err = error(ref, out)
        assert err < TOL or error(ref64, out) <= FLOOR_FACTOR * floor, (err, floor)
        # Idempotent: a second call changes neither the state dict nor the output.
        sd = {k: v.clone() for k, v in fused.state_dict().items()}
        reparameterize_model(fused, inplace=True)
        assert fused.state_dict().keys() == sd.keys()
        assert all(torch.equal(v, fused.state_dict()[k]) for k, v in sd.items())
        assert all(torch.equal(a, b) for a, b in zip(outputs(fused, x), out))
    left = {n for n, m in fused.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    assert left == KEPT_BN.get(fam, set()), left
    # Every conv carries its folded bias; conv classes (SameConv2d, fastconv.DepthwiseConv2d) are kept.
    assert all(m.bias is not None for m in fused.modules() if isinstance(m, nn.Conv2d))
    if fam in MERGES_BRANCHES:  # e.g. RepLKNet: two branch convs become one
        assert set(conv_types(fused)) == set(conv_types(model))
        # parallel branches exist (RepLKNet without a small kernel, e.g. replknet_3 / XL, has none to merge)
        if fam != "replknet" or any(getattr(m, "small_conv", None) is not None for m in model.modules()):
            assert len(conv_types(fused)) < len(conv_types(model))
    else:
        assert conv_types(fused) == conv_types(model)
    if fam != "slak":  # SLaK's merge turns Kx5 + 5xK + 5x5 kernels into one KxK: more parameters, one conv
        assert sum(p.numel() for p in fused.parameters()) < sum(p.numel() for p in model.parameters())
    # The tolerance can fail: a wrong fold of the last conv's BN (its bias off by 0.5) is a real error.
    with torch.no_grad():
        broken = copy.deepcopy(fused)
        last = [m for m in broken.modules() if isinstance(m, nn.Conv2d)][-1]
        # one channel: a uniform shift of all channels would vanish in SLaK's channel LayerNorm
        (last.bias[:1] if fam == "slak" else last.bias).add_(0.5)
        assert max_relative_error(ref[0], broken.forward_features(x)) > 1e-3
    return err, floor, err64


@pytest.mark.parametrize("name", list_models())
def test_reparameterize_model_is_exact(name):
    fam = family(name)
    torch.manual_seed(0)
    model = randomize_bn(create_model(name, **TINY.get(fam, {})))
    x = torch.randn(*INPUT, generator=torch.Generator().manual_seed(1))
    err, floor, err64 = check_fused(model, fam, x)
    print(f"\n{name}: fp32 {err:.2e} (fp32 floor {floor:.2e})  fp64 {err64:.2e}")


def test_reparameterize_pretrained_efficientnet_lite0():
    """Real ImageNet weights (lukemelas layout, loaded unfused), then fused: same feature map and logits."""
    model = create_model("efficientnet_lite0", pretrained=True).eval()
    mean = torch.tensor(model.default_cfg["mean"]).reshape(1, 3, 1, 1)
    std = torch.tensor(model.default_cfg["std"]).reshape(1, 3, 1, 1)
    x = (torch.rand(*INPUT, generator=torch.Generator().manual_seed(2)) - mean) / std
    err, floor, err64 = check_fused(model, "efficientnet_lite", x)
    print(f"\nefficientnet_lite0 pretrained: fp32 {err:.2e} (fp32 floor {floor:.2e})  fp64 {err64:.2e}")


def test_mobilenetv2_large_depthwise_uses_fastconv():
    """Stride-1 depthwise convs with K > 5 are fastconv.DepthwiseConv2d; same state dict as plain nn.Conv2d."""
    from fastconv import DepthwiseConv2d, revert_model

    torch.manual_seed(0)
    fast = randomize_bn(create_model("mobilenetv2_k13_last", width_mult=0.25))
    native = create_model("mobilenetv2_k13_last", width_mult=0.25).eval()
    assert revert_model(native) == 3
    native.load_state_dict(fast.state_dict())
    assert fast.state_dict().keys() == native.state_dict().keys()
    dws = [m for m in fast.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    big = [m for m in dws if m.kernel_size == (13, 13)]
    # Stages 5 (3 blocks, first strided) and 6 (1 block) have 13x13 kernels: 3 of the 4 are stride 1.
    assert len(big) == 4 and sum(type(m) is DepthwiseConv2d for m in big) == 3
    assert all(type(m) is nn.Conv2d for m in dws if m.stride != (1, 1) or m.kernel_size[0] <= 5)
    assert not any(isinstance(m, DepthwiseConv2d) for m in native.modules())
    x = torch.randn(*INPUT, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert max_relative_error(native(x), fast(x)) < 1e-5
        reparameterize_model(fast, inplace=True)
        assert sum(type(m) is DepthwiseConv2d for m in fast.modules()) == 3
        assert max_relative_error(native(x), fast(x)) < 1e-5


@pytest.mark.parametrize("name", ["replknet_31b", "unireplknet_a", "slak_t"])
def test_official_deploy_layout_of_each_large_kernel_family(name, tmp_path):
    """The official deploy layout (what ``erf-lab reparam`` writes and the app's Re-param page shows): RepLKNet keeps
    its other conv-BN pairs (``lkb_reparam`` + BNs), UniRepLKNet / SLaK re-parameterize every block; same logits,
    and the written checkpoint loads into the family's deploy model."""
    from erf_lab.models import create_model
    from erf_lab.models.deploy import export_deploy, max_relative_error, official_deploy_layout
    from erf_lab.models.reparam import randomize_bn

    torch.manual_seed(0)
    model = randomize_bn(create_model(name, **TINY[family(name)]), input_size=48)
    deployed = official_deploy_layout(model)
    x = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert max_relative_error(model(x), deployed(x)) < TOL
    keys = set(deployed.state_dict())
    assert len(keys) < len(model.state_dict())
    if name == "replknet_31b":
        assert any(k.endswith("lkb_reparam.weight") for k in keys) and any(".bn." in k for k in keys)
    summary = export_deploy(name, tmp_path / "deploy.pth", show_progress=False, input_size=48, **TINY[family(name)])
    assert summary["max_rel_error"] < TOL and summary["num_keys"] == len(keys)
    reloaded = create_model(name, weights=str(tmp_path / "deploy.pth"), **TINY[family(name)])
    assert set(reloaded.state_dict()) == keys


@pytest.mark.parametrize("name,module", [("unireplknet_a", "unireplknet"), ("slak_t", "slak"),
                                         ("replknet_31b", "replknet")])
def test_reparam_check_sees_every_residual_branch(name, module, tmp_path, monkeypatch):
    """At initialisation (layer scale 1e-6) UniRepLKNet's and SLaK's logits do not see their blocks: a merge with
    its kernels mirrored leaves the logit error at float32 rounding. The per-branch error of ``erf-lab reparam``
    shows it."""
    import importlib

    from erf_lab.models.deploy import export_deploy

    tiny = {k: v for k, v in TINY[family(name)].items() if k != "layer_scale_init_value"}  # the default, 1e-6
    good = export_deploy(name, tmp_path / "good.pth", show_progress=False, input_size=48, **tiny)
    assert good["num_branches"] == (2 * sum(tiny["layers"]) if module == "replknet" else sum(tiny["depths"]))
    assert good["branch_max_rel_error"] < TOL and good["max_rel_error"] < TOL
    arch = importlib.import_module(f"erf_lab.models.{module}")
    merged_conv = arch.merged_conv
    monkeypatch.setattr(arch, "merged_conv", lambda make, w, b: merged_conv(make, w.flip(-1), b))  # a wrong merge
    bad = export_deploy(name, tmp_path / "bad.pth", show_progress=False, input_size=48, **tiny)
    assert bad["branch_max_rel_error"] > 0.05
    if module != "replknet":  # no layer scale in RepLKNet: its logits show the error too
        assert bad["max_rel_error"] < TOL


@pytest.mark.parametrize("inference", [False, True])
def test_bn_fold_writes_over_the_conv_weight_where_it_can(inference):
    """``fold_bn_into_conv`` / ``fold_preceding_bn`` reuse the conv's weight memory (no new tensor to page in), and
    allocate where they cannot: weights made under ``torch.inference_mode`` cannot back a new Parameter in place.
    Either way the folded convs give the conv-BN outputs."""
    from erf_lab.models.reparam import fold_bn_into_conv, fold_preceding_bn

    torch.manual_seed(0)
    x = torch.randn(2, 6, 8, 8)
    with torch.inference_mode(inference):
        model = nn.Sequential(nn.BatchNorm2d(6), nn.Conv2d(6, 8, 1), nn.Conv2d(8, 8, 3, padding=1),
                              nn.BatchNorm2d(8))
        for bn in (model[0], model[3]):  # eval-mode statistics and affine parameters away from the identity
            n = bn.num_features
            bn.running_mean.copy_(torch.randn(n)), bn.running_var.copy_(torch.rand(n) + 0.5)
            bn.weight.data.copy_(torch.rand(n) + 0.5), bn.bias.data.copy_(torch.randn(n))
        model.eval()
        expected = model(x).clone()
    ptrs = [model[1].weight.data_ptr(), model[2].weight.data_ptr()]
    model[0] = fold_preceding_bn(model[0], model[1])
    model[3] = fold_bn_into_conv(model[2], model[3])
    now = [model[1].weight.data_ptr(), model[2].weight.data_ptr()]
    if inference:
        assert now[0] != ptrs[0] and now[1] != ptrs[1]
        assert not any(torch.is_inference(p) for p in (model[1].weight, model[2].weight))
    else:
        assert now == ptrs
    with torch.no_grad():
        assert (model(x) - expected).abs().max().item() <= 1e-5 * expected.abs().max().item()


def test_blocked_float64_fold_equals_the_full_float64_product(monkeypatch):
    """The BN fold's cache-blocked float64 product (issue 14: 2x less fixed cost) gives the numbers of the
    full-size float64 copy bit for bit, for a following BN (output rows) and a preceding one (input columns);
    blocks made small here so that these tensors span many of them, with a ragged last block."""
    from erf_lab.models import reparam
    from erf_lab.models.reparam import _matvec_in_float64, scale_in_float64

    monkeypatch.setattr(reparam, "_BLOCK_ELEMENTS", 5000)

    g = torch.Generator().manual_seed(3)
    for shape, dim in (((300, 257, 1, 1), 0), ((96, 1, 31, 31), 0), ((130, 700, 1, 1), 1)):
        w = torch.randn(*shape, generator=g)
        view = [1] * len(shape)
        view[dim] = shape[dim]
        s = (torch.rand(shape[dim], dtype=torch.float64, generator=g) + 0.5).reshape(view)
        assert torch.equal(scale_in_float64(w, s, torch.float32), torch.mul(w.double(), s).float())
        expected, storage = torch.mul(w.double(), s).float(), w.data_ptr()
        # written into the weight's own memory (the folds reuse it): every block is read before it is written
        assert scale_in_float64(w, s, torch.float32, out=w) is w and w.data_ptr() == storage
        assert torch.equal(w, expected)
    small = torch.randn(4, 3, 3, 3, generator=g)  # below two blocks: the unblocked product, then copied into out
    s = torch.rand(4, 1, 1, 1, dtype=torch.float64, generator=g) + 0.5
    expected = torch.mul(small.double(), s).float()
    assert scale_in_float64(small, s, torch.float32, out=small) is small and torch.equal(small, expected)
    m, v = torch.randn(300, 700, generator=g), torch.randn(700, dtype=torch.float64, generator=g)
    assert (_matvec_in_float64(m, v) - m.double() @ v).abs().max().item() <= 1e-12

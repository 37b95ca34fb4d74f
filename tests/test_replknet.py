"""RepLKNet: paper numbers, official key layout, structural re-parameterization, official checkpoints, CLI."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils._python_dispatch

from erf_lab.errors import CheckpointError, ErfLabError
from erf_lab.models import create_model, list_models, reparameterize_model
from erf_lab.models.constants import IMAGENET_MEAN, IMAGENET_STD
from erf_lab.models.deploy import max_relative_error
from erf_lab.models.flops import count_flops, count_params
from erf_lab.models.reparam import randomize_bn
from erf_lab.models.replknet import VARIANTS, RepLKNet, merge_large_kernels

VARIANT_NAMES = ["replknet_31b", "replknet_31l", "replknet_xl", "replknet_3", "replknet_7", "replknet_13", "replknet_25"]


pytestmark = pytest.mark.usefixtures("one_thread")


TINY = dict(channels=(8, 16, 16, 16), layers=(1, 1, 1, 1))


def tiny(name="replknet_31b", **kw):
    return create_model(name, **{**TINY, **kw})


def randomize(model: nn.Module, seed: int = 0, batch: int = 4) -> nn.Module:
    """Random BN statistics calibrated on 64x64 inputs (:func:`erf_lab.models.reparam.randomize_bn`)."""
    return randomize_bn(model, seed, input_size=64, batch=batch)


# ------------------------------------------------------------------------------------------------- paper numbers
@pytest.mark.slow
@pytest.mark.parametrize("name,paper_m", [("replknet_31b", 79), ("replknet_31l", 172), ("replknet_xl", 335)])
def test_parameter_counts_match_paper_table6(name, paper_m):
    with torch.device("meta"):
        model = create_model(name)
    millions = count_params(model) / 1e6
    assert abs(millions - paper_m) / paper_m < 0.015, millions
    assert VARIANTS[name]["params_m"] == paper_m


@pytest.mark.slow
@pytest.mark.parametrize("name,size,paper_g", [("replknet_31b", 224, 15.3), ("replknet_31l", 384, 96.0),
                                               ("replknet_xl", 320, 128.7)])
def test_flops_match_paper_table6(name, size, paper_g):
    with torch.device("meta"):
        model = create_model(name, deploy=True)
    giga = count_flops(model, size) / 1e9
    assert abs(giga - paper_g) / paper_g < 0.01, giga


@pytest.mark.parametrize("name,paper_m,paper_g", [("replknet_3", 71.8, 12.9), ("replknet_7", 72.2, 13.1),
                                                  ("replknet_13", 73.7, 13.4), ("replknet_25", 78.2, 14.8),
                                                  ("replknet_31b", 79.3, 15.3)])
def test_kernel_size_family_matches_paper_table5(name, paper_m, paper_g):
    """Table 5 (kernel sizes 3-3-3-3 ... 31-29-27-13 at 31B widths, 224 px; checked against the paper's PDF):
    parameters within 0.5 % (the deploy form, which the paper's counts match more closely than the train form's
    extra small-kernel branch: 31B 79.5 vs 79.9 M), FLOPs within 1 % of the paper's, rounded to 0.1 G."""
    with torch.device("meta"):
        model = create_model(name, deploy=True)
    millions, giga = count_params(model) / 1e6, count_flops(model, 224) / 1e9
    assert abs(millions - paper_m) / paper_m < 0.005, millions
    assert abs(giga - paper_g) / paper_g < 0.01, giga
    assert VARIANTS[name]["params_m"] == (79 if name == "replknet_31b" else paper_m)  # 31B: Table 6's 79

def test_count_flops_matches_hand_formula():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 5, padding=2, groups=8), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 10))
    expected = 16 * 16 * 8 * 3 * 9 + 16 * 16 * 8 * 1 * 25 + 8 * 10
    assert count_flops(model, 32, in_channels=3) == expected
    assert model.training and next(model.parameters()).device.type == "cpu"  # untouched


def test_list_models_filters_by_wildcards_as_timm():
    """timm's ``list_models("convnext*")`` is the registry's everyday use; erf-lab's took no argument (TypeError)."""
    assert list_models("replknet_3*") == ["replknet_3", "replknet_31b", "replknet_31l"]
    assert list_models(["slak_?", "resnet1*"], exclude_filters="*52") == ["resnet101", "resnet18", "slak_b",
                                                                           "slak_s", "slak_t"]
    assert list_models(pretrained=True) == ["efficientnet_lite0"]
    assert list_models("vit_*") == [] and list_models("") == list_models() == sorted(list_models())


def test_create_model_takes_timms_explicit_pretrained_false_for_every_model():
    """``create_model(name, pretrained=False)`` (timm's default, written out) was refused as an unknown option by
    every model without published weights; it builds the same random model. ``pretrained=True`` is still refused."""
    for name in ("replknet_31b", "resnet18", "unireplknet_a", "slak_t", "mobilenetv2"):
        with torch.device("meta"):
            m = create_model(name, pretrained=False, num_classes=7)
        assert m.num_classes == 7 and m.get_classifier().out_features == 7
    torch.manual_seed(0)
    a = create_model("replknet_3", channels=(8, 8, 8, 8), layers=(1, 1, 1, 1), pretrained=False)
    torch.manual_seed(0)
    b = create_model("replknet_3", channels=(8, 8, 8, 8), layers=(1, 1, 1, 1))
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())
    with pytest.raises(ErfLabError, match="no published weights"):
        create_model("replknet_31b", pretrained=True)


def test_variants_registered_with_paper_configs():
    assert set(VARIANT_NAMES) <= set(list_models())
    with torch.device("meta"):
        m = create_model("replknet_xl")
    assert isinstance(m, RepLKNet) and m.large_kernel_sizes == (27, 27, 27, 13) and m.small_kernel is None
    assert m.channels[-1] == 2048
    assert m.stages[0].blocks[0].large_kernel.lkb_origin.conv.out_channels == 384  # dw ratio 1.5
    assert m.stages[0].blocks[0].large_kernel.small_conv is None
    with torch.device("meta"):
        m = create_model("replknet_25")
    assert m.large_kernel_sizes == (25, 25, 25, 13) and m.small_kernel == 5 and m.layers == (2, 2, 18, 2)
    assert m.default_cfg == dict(input_size=(3, 224, 224), mean=IMAGENET_MEAN, std=IMAGENET_STD,
                                 interpolation="bicubic", num_classes=1000, architecture="replknet_25")


def test_xl_declares_the_normalization_of_its_official_weights():
    """RepLKNet-XL's only weights (MegData-73M) take pixels to [-1, 1] (official eval: --imagenet_default_mean_and_std
    false; XL downstream configs: mean = std = 127.5): the images fed to it must be normalized so."""
    from erf_lab.erf.images import model_mean_std

    xl = tiny("replknet_xl")
    assert model_mean_std(xl) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert model_mean_std(tiny("replknet_31b")) == (IMAGENET_MEAN, IMAGENET_STD)


# ------------------------------------------------------------------------------------------------ official keys
def _bn_keys(p):
    return [f"{p}.weight", f"{p}.bias", f"{p}.running_mean", f"{p}.running_var", f"{p}.num_batches_tracked"]


def official_keys(layers, merged=False, small=True, head=True, stage_norm=False, classifier=True):
    """Key list (in registration order) of the official RepLKNet definition, written from its source."""
    keys = []
    for i in range(4):
        keys += [f"stem.{i}.conv.weight"] + _bn_keys(f"stem.{i}.bn")
    for s, n in enumerate(layers):
        for b in range(n):
            p = f"stages.{s}.blocks.{2 * b}"
            keys += [f"{p}.pw1.conv.weight"] + _bn_keys(f"{p}.pw1.bn") + [f"{p}.pw2.conv.weight"] + _bn_keys(f"{p}.pw2.bn")
            if merged:
                keys += [f"{p}.large_kernel.lkb_reparam.weight", f"{p}.large_kernel.lkb_reparam.bias"]
            else:
                keys += [f"{p}.large_kernel.lkb_origin.conv.weight"] + _bn_keys(f"{p}.large_kernel.lkb_origin.bn")
                if small:
                    keys += [f"{p}.large_kernel.small_conv.conv.weight"] + _bn_keys(f"{p}.large_kernel.small_conv.bn")
            keys += _bn_keys(f"{p}.prelkb_bn")
            p = f"stages.{s}.blocks.{2 * b + 1}"
            keys += _bn_keys(f"{p}.preffn_bn") + [f"{p}.pw1.conv.weight"] + _bn_keys(f"{p}.pw1.bn")
            keys += [f"{p}.pw2.conv.weight"] + _bn_keys(f"{p}.pw2.bn")
        if stage_norm:
            keys += _bn_keys(f"stages.{s}.norm")
    for t in range(len(layers) - 1):
        for j in range(2):
            keys += [f"transitions.{t}.{j}.conv.weight"] + _bn_keys(f"transitions.{t}.{j}.bn")
    if not classifier:
        return keys
    keys += _bn_keys("norm")
    if head:
        keys += ["head.weight", "head.bias"]
    return keys


@pytest.mark.parametrize("deploy", [False, True])
def test_state_dict_keys_are_official(deploy):
    model = tiny(layers=(1, 2, 1, 1), deploy=deploy)
    assert list(model.state_dict()) == official_keys((1, 2, 1, 1), merged=deploy)
    sd = model.state_dict()
    if deploy:
        assert sd["stages.0.blocks.0.large_kernel.lkb_reparam.weight"].shape == (8, 1, 31, 31)
        assert sd["stages.0.blocks.0.large_kernel.lkb_reparam.bias"].shape == (8,)
    else:
        assert sd["stages.1.blocks.2.large_kernel.lkb_origin.conv.weight"].shape == (16, 1, 29, 29)
        assert sd["stages.1.blocks.2.large_kernel.small_conv.conv.weight"].shape == (16, 1, 5, 5)
    assert sd["stages.3.blocks.1.pw1.conv.weight"].shape == (64, 16, 1, 1)  # ffn ratio 4
    assert sd["transitions.0.1.conv.weight"].shape == (16, 1, 3, 3)
    assert sd["stem.1.conv.weight"].shape == (8, 1, 3, 3) and sd["stem.2.conv.weight"].shape == (8, 8, 1, 1)


def test_xl_keys_without_small_kernel():
    model = tiny("replknet_xl")
    assert list(model.state_dict()) == official_keys((1, 1, 1, 1), small=False)
    assert model.state_dict()["stages.0.blocks.0.pw1.conv.weight"].shape == (12, 8, 1, 1)


def test_downstream_backbone_layout_out_indices_and_stage_norms():
    """Official downstream options: ``out_indices`` (list of stage outputs, no final BN / head keys) and
    ``norm_intermediate_features`` (``stages.i.norm`` BN on each returned map), as the XL COCO/ADE20K backbones."""
    model = randomize(tiny("replknet_xl", num_classes=None, out_indices=(0, 1, 2, 3), norm_intermediate_features=True))
    assert list(model.state_dict()) == official_keys((1, 1, 1, 1), small=False, stage_norm=True, classifier=False)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        outs = model(x)
        assert [tuple(o.shape) for o in outs] == [(2, c, 16 >> i, 16 >> i) for i, c in enumerate(model.channels)]
        plain = copy.deepcopy(model)
        for st in plain.stages:
            st.norm = None
        raw = plain(x)
        for o, r, st in zip(outs, raw, model.stages):  # each returned map is the stage output through its BN
            assert torch.allclose(o, st.norm(r), atol=1e-6) and not torch.allclose(o, r, atol=1e-3)
        fused = reparameterize_model(model)
        for o, f in zip(outs, fused(x)):
            assert (o - f).abs().max() / o.abs().max() < 1e-5
    two = tiny("replknet_31b", num_classes=None, out_indices=[1, 3])
    assert [o.shape[1] for o in two(x)] == [two.channels[1], two.channels[3]]
    with pytest.raises(ErfLabError, match="exclusive"):
        tiny("replknet_31b", out_indices=(0,))
    with pytest.raises(ErfLabError, match="needs out_indices"):
        tiny("replknet_31b", norm_intermediate_features=True)
    with pytest.raises(ErfLabError, match="stages 0..3"):
        tiny("replknet_31b", num_classes=None, out_indices=(4,))


def test_reparam_of_a_downstream_backbone(tmp_path, capsys):
    """``erf-lab reparam`` of the XL detection / segmentation layout (a list of stage maps, no logits): the
    equivalence error is the worst map's, and the merged file loads into the downstream model."""
    from erf_lab.models.deploy import export_deploy

    down = dict(TINY, num_classes=None, out_indices=(0, 1, 2, 3), norm_intermediate_features=True)
    s = export_deploy("replknet_xl", tmp_path / "down.pth", input_size=48, show_progress=False, **down)
    assert s["max_rel_error"] < 1e-5 and s["branch_max_rel_error"] < 1e-5
    merged = create_model("replknet_xl", weights=str(tmp_path / "down.pth"), **down)
    assert merged.is_merged and merged.out_indices == (0, 1, 2, 3)
    a, b = [torch.ones(2, 3)], [torch.ones(2, 3) * 1.5]
    assert max_relative_error([*a, *a], [*a, *b]) == pytest.approx(0.5)

    from erf_lab.cli.main import main  # the console names what was compared: stage maps, not logits

    argv = ["reparam", "--model", "replknet_xl", "--out", str(tmp_path / "down2.pth"), "--check-size", "48"]
    for k, v in down.items():
        argv += ["--override", f"{k}={tuple(v) if isinstance(v, (tuple, list)) else v}"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "(stage feature maps, 2x3x48x48 random batch)" in out and "logits" not in out


def test_forward_intermediates_norm_and_final_features():
    """timm semantics on RepLKNet: final = forward_features (before the final BN); ``norm=True`` puts the last
    stage through the final BN ``norm`` (so ``forward_head`` = pool + linear of it), other stages unchanged;
    with the downstream stage BNs, ``norm=True`` gives exactly the ``out_indices`` outputs. Same in the fused form."""
    model = randomize(tiny())
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        feats = model.forward_features(x)
        final, raw = model.forward_intermediates(x)
        _, normed = model.forward_intermediates(x, norm=True)
        assert torch.equal(final, feats) and torch.equal(raw[-1], feats)
        assert torch.equal(normed[-1], model.norm(feats)) and not torch.allclose(normed[-1], feats, atol=1e-3)
        assert all(torch.equal(a, b) for a, b in zip(normed[:-1], raw[:-1]))
        assert torch.equal(model.head(normed[-1].mean((2, 3))), model.forward_head(feats))
        fused = reparameterize_model(model)
        assert max_relative_error(raw[2], fused.forward_intermediates(x, indices=[2], stop_early=True)[1][0]) < 1e-5
    down = randomize(tiny("replknet_xl", num_classes=None, out_indices=(1, 3), norm_intermediate_features=True))
    with torch.no_grad():
        outs = down(x)
        inter = down.forward_intermediates(x, indices=[1, 3], norm=True, intermediates_only=True)
        plain = down.forward_intermediates(x, indices=[1, 3], intermediates_only=True)
    assert all(torch.equal(a, b) for a, b in zip(inter, outs))
    assert all(torch.equal(a, st.norm(b)) for a, b, st in zip(inter, plain, (down.stages[1], down.stages[3])))


def test_prune_intermediate_layers():
    """timm: stages after the last kept index (and their transitions) are removed; the pruned model gives the
    same intermediates; prune_head / prune_norm drop the classifier / final BN."""
    model = randomize(tiny())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = model.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
        assert model.prune_intermediate_layers([0, 1], prune_norm=True) == [0, 1]
        final, got = model.forward_intermediates(x)
    assert len(model.stages) == 2 and len(model.transitions) == 1 and len(model.feature_info) == 2
    assert model.head is None and isinstance(model.norm, nn.Identity) and model.num_classes == 0
    assert all(torch.equal(a, b) for a, b in zip(got, ref)) and torch.equal(final, ref[-1])
    with torch.no_grad():
        assert torch.equal(model(x), ref[-1].mean((2, 3)))


# --------------------------------------------------------------------------------------------- re-parameterize
@pytest.mark.parametrize("name", VARIANT_NAMES)
def test_reparameterization_is_exact_for_every_variant(name):
    model = randomize(tiny(name))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x)
        merged = merge_large_kernels(model)
        fused = reparameterize_model(model)
        err_merged, err_fused = max_relative_error(ref, merged(x)), max_relative_error(ref, fused(x))
    assert err_merged < 1e-5 and err_fused < 1e-5, (err_merged, err_fused)
    # The algebra is exact: in float64 both forms agree to rounding (~1e-15).
    m64 = copy.deepcopy(model).double()
    with torch.no_grad():
        ref64 = m64(x.double())
        assert max_relative_error(ref64, reparameterize_model(m64)(x.double())) < 1e-12
    assert merged.is_merged and not model.is_merged
    # Fully fused: only the final BN (before pooling) is left; every conv carries a bias.
    assert sum(isinstance(m, nn.BatchNorm2d) for m in fused.modules()) == 1
    assert all(m.bias is not None for m in fused.modules() if isinstance(m, nn.Conv2d))
    assert count_params(fused) < count_params(model)


def test_reparameterization_can_fail_when_bn_ignored():
    """Guard for the tests above: dropping one BN's statistics from the merge must show as a real error."""
    model = randomize(tiny())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        merged = merge_large_kernels(model)
        merged.stages[0].blocks[0].large_kernel.lkb_reparam.bias.zero_()
        assert max_relative_error(ref, merged(x)) > 1e-3


@pytest.mark.slow
def test_full_31b_reparameterization_is_exact():
    model = randomize(create_model("replknet_31b"), batch=2)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(x)
        reparameterize_model(model, inplace=True)
        err = max_relative_error(ref, model(x))
    assert err < 1e-5, err
    assert 79.0e6 < count_params(model) < 79.6e6


def test_reparameterize_is_idempotent():
    model = randomize(tiny())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        merge_large_kernels(model, inplace=True)
        once = {k: v.clone() for k, v in model.state_dict().items()}
        merge_large_kernels(model, inplace=True)
        assert model.state_dict().keys() == once.keys()
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in once.items())
        reparameterize_model(model, inplace=True)
        y1, sd1 = model(x), {k: v.clone() for k, v in model.state_dict().items()}
        reparameterize_model(model, inplace=True)
        assert torch.equal(y1, model(x)) and all(torch.equal(v, model.state_dict()[k]) for k, v in sd1.items())


def test_deploy_round_trip_through_checkpoint(tmp_path):
    model = randomize(tiny())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        merge_large_kernels(model, inplace=True)
        torch.save(model.state_dict(), tmp_path / "deploy.pth")
        assert list(model.state_dict()) == list(tiny(deploy=True).state_dict())
        loaded = create_model("replknet_31b", weights=str(tmp_path / "deploy.pth"), **TINY).eval()  # implies deploy
        assert loaded.is_merged
        assert max_relative_error(ref, loaded(x)) < 1e-5
        # and the train-time checkpoint round trip is bit-exact
        train = randomize(tiny(), seed=3)
        torch.save(train.state_dict(), tmp_path / "train.pth")
        again = create_model("replknet_31b", weights=str(tmp_path / "train.pth"), **TINY).eval()
        assert torch.equal(train(x), again(x))


# --------------------------------------------------------------------------- official-layout checkpoints: exact
KERNELS = (7, 5, 5, 3)


def official_state_dict(layers=(1, 1, 1, 1), channels=(8, 16, 16, 16), kernels=KERNELS, small=3, merged=False,
                        num_classes=10, seed=0):
    """A random state dict with official names and shapes, built without the model under test."""
    g = torch.Generator().manual_seed(seed)
    sd = {}

    def conv(p, cout, cin_per_group, k, bias=False):
        sd[f"{p}.weight"] = torch.randn(cout, cin_per_group, k, k, generator=g) / math.sqrt(cin_per_group * k * k)
        if bias:
            sd[f"{p}.bias"] = torch.randn(cout, generator=g) * 0.1

    def bn(p, n):
        sd[f"{p}.weight"] = torch.rand(n, generator=g) + 0.5
        sd[f"{p}.bias"] = torch.randn(n, generator=g) * 0.2
        sd[f"{p}.running_mean"] = torch.randn(n, generator=g) * 0.3
        sd[f"{p}.running_var"] = torch.rand(n, generator=g) + 0.5
        sd[f"{p}.num_batches_tracked"] = torch.tensor(7)

    def conv_bn(p, cout, cin_per_group, k):
        conv(f"{p}.conv", cout, cin_per_group, k)
        bn(f"{p}.bn", cout)

    c0 = channels[0]
    for i, (cin, k) in enumerate([(3, 3), (1, 3), (c0, 1), (1, 3)]):
        conv_bn(f"stem.{i}", c0, cin, k)
    for s, (n, c, k) in enumerate(zip(layers, channels, kernels)):
        for b in range(n):
            p = f"stages.{s}.blocks.{2 * b}"
            conv_bn(f"{p}.pw1", c, c, 1)
            conv_bn(f"{p}.pw2", c, c, 1)
            if merged:
                conv(f"{p}.large_kernel.lkb_reparam", c, 1, k, bias=True)
            else:
                conv_bn(f"{p}.large_kernel.lkb_origin", c, 1, k)
                conv_bn(f"{p}.large_kernel.small_conv", c, 1, small)
            bn(f"{p}.prelkb_bn", c)
            p = f"stages.{s}.blocks.{2 * b + 1}"
            bn(f"{p}.preffn_bn", c)
            conv_bn(f"{p}.pw1", 4 * c, c, 1)
            conv_bn(f"{p}.pw2", c, 4 * c, 1)
    for t in range(len(layers) - 1):
        conv_bn(f"transitions.{t}.0", channels[t + 1], channels[t], 1)
        conv_bn(f"transitions.{t}.1", channels[t + 1], 1, 3)
    bn("norm", channels[-1])
    sd["head.weight"] = torch.randn(num_classes, channels[-1], generator=g) * 0.1
    sd["head.bias"] = torch.randn(num_classes, generator=g) * 0.1
    return sd


def reference_forward(sd, x):
    """Plain functional RepLKNet forward driven only by the official key names (paper Fig. 4, official code)."""

    def bn(p, t):
        return F.batch_norm(t, sd[f"{p}.running_mean"], sd[f"{p}.running_var"], sd[f"{p}.weight"], sd[f"{p}.bias"],
                            training=False, eps=1e-5)

    def conv(p, t, stride=1, bias=None):
        w = sd[f"{p}.weight"]
        return F.conv2d(t, w, bias, stride=stride, padding=w.shape[-1] // 2, groups=t.shape[1] // w.shape[1])

    def conv_bn(p, t, stride=1, relu=False):
        t = bn(f"{p}.bn", conv(f"{p}.conv", t, stride))
        return F.relu(t) if relu else t

    for i, stride in enumerate((2, 1, 1, 2)):
        x = conv_bn(f"stem.{i}", x, stride, relu=True)
    s = 0
    while f"stages.{s}.blocks.0.prelkb_bn.weight" in sd:
        b = 0
        while f"stages.{s}.blocks.{b}.pw1.conv.weight" in sd:
            p = f"stages.{s}.blocks.{b}"
            if f"{p}.prelkb_bn.weight" in sd:  # RepLK block
                y = conv_bn(f"{p}.pw1", bn(f"{p}.prelkb_bn", x), relu=True)
                lk = f"{p}.large_kernel"
                if f"{lk}.lkb_reparam.weight" in sd:
                    y = conv(f"{lk}.lkb_reparam", y, bias=sd[f"{lk}.lkb_reparam.bias"])
                else:
                    y = conv_bn(f"{lk}.lkb_origin", y) + conv_bn(f"{lk}.small_conv", y)
                x = x + conv_bn(f"{p}.pw2", F.relu(y))
            else:  # ConvFFN
                y = conv_bn(f"{p}.pw1", bn(f"{p}.preffn_bn", x))
                x = x + conv_bn(f"{p}.pw2", F.gelu(y))
            b += 1
        if f"transitions.{s}.0.conv.weight" in sd:
            x = conv_bn(f"transitions.{s}.0", x, relu=True)
            x = conv_bn(f"transitions.{s}.1", x, stride=2, relu=True)
        s += 1
    x = bn("norm", x).mean((2, 3))
    return F.linear(x, sd["head.weight"], sd["head.bias"])


def _official_model(weights, **kw):
    return create_model("replknet_31b", weights=str(weights), channels=(8, 16, 16, 16), layers=(1, 1, 1, 1),
                        kernels=KERNELS, small_kernel=3, num_classes=10, **kw).eval()


@pytest.mark.parametrize("merged", [False, True])
@pytest.mark.parametrize("fmt", ["plain", "wrapped", "safetensors"])
def test_official_layout_checkpoint_gives_exact_logits(tmp_path, merged, fmt):
    sd = official_state_dict(merged=merged)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    if fmt == "plain":
        path = tmp_path / "official.pth"
        torch.save(sd, path)
    elif fmt == "wrapped":
        path = tmp_path / "official_ddp.pth"
        torch.save({"model": {f"module.{k}": v for k, v in sd.items()}, "epoch": 299}, path)
    else:
        from safetensors.torch import save_file

        path = tmp_path / "official.safetensors"
        save_file(sd, str(path))
    import fastconv

    with torch.no_grad():
        ref = reference_forward(sd, x)
        model = _official_model(path)
        assert model.is_merged == merged
        for backend in ("native", "auto"):
            with fastconv.use(backend=backend):
                assert max_relative_error(ref, model(x)) < 1e-4, backend
        if not merged:  # the train-time file re-parameterized must still match the reference
            assert max_relative_error(ref, reparameterize_model(model)(x)) < 1e-4


def test_official_checkpoint_with_21841_class_head(tmp_path):
    sd = official_state_dict(num_classes=21841)
    torch.save(sd, tmp_path / "in22k.pth")
    with pytest.raises(CheckpointError, match="21841"):
        _official_model(tmp_path / "in22k.pth")
    model = _official_model(tmp_path / "in22k.pth", drop_head=True)
    assert model.head.weight.shape == (10, 16)
    assert torch.equal(model.state_dict()["norm.running_var"], sd["norm.running_var"])
    feats = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        sd10 = {**sd, "head.weight": model.head.weight, "head.bias": model.head.bias}
        assert max_relative_error(reference_forward(sd10, feats), model(feats)) < 1e-4


# ----------------------------------------------------------------------------------------- interface, options
def test_forward_features_and_head():
    model = randomize(tiny(num_classes=7))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        f = model.forward_features(x)
        assert f.shape == (2, 16, 2, 2)
        assert torch.allclose(model.forward_head(f), model(x))
        assert model.forward_head(f, pre_logits=True).shape == (2, 16)
    assert model.large_kernel_sizes == (31, 29, 27, 13) and model.small_kernel == 5
    assert model.default_cfg["num_classes"] == 7


def test_overrides_aliases_and_drop_path():
    m = create_model("replknet_31b", kernels=(9, 7, 5, 3), blocks=(1, 2, 1, 1), channels=(8, 8, 16, 16),
                     small_kernel=3, dw_ratio=2, drop_path_rate=0.5)
    assert m.large_kernel_sizes == (9, 7, 5, 3) and m.layers == (1, 2, 1, 1)
    assert m.stages[1].blocks[0].large_kernel.lkb_origin.conv.kernel_size == (7, 7)
    assert m.stages[0].blocks[0].pw1.conv.out_channels == 16
    rates = [blk.drop_path.drop_prob for st in m.stages for blk in st.blocks[::2] if hasattr(blk.drop_path, "drop_prob")]
    assert rates == pytest.approx([0.5 / 4, 1.0 / 4, 1.5 / 4, 0.5])  # linear 0 .. rate over 5 blocks; first is 0
    x = torch.randn(4, 3, 64, 64)
    m.train()
    assert not torch.equal(m(x), m(x))  # stochastic depth active in training
    m.eval()
    assert torch.equal(m(x), m(x))
    with pytest.raises(ErfLabError):
        create_model("replknet_31b", channels=(8, 8), layers=(1, 1, 1, 1))
    with pytest.raises(ErfLabError, match="does not accept"):
        create_model("replknet_31b", colour="red")


def test_activation_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    plain = tiny()
    ckpt = tiny(use_checkpoint=True)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 64, 64)
    grads = []
    for m in (plain, ckpt):
        m.train()
        m(x).square().sum().backward()
        grads.append(m.stages[0].blocks[0].large_kernel.lkb_origin.conv.weight.grad)
    assert grads[0].abs().sum() > 0 and torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-6)



class _AtenLog(torch.utils._python_dispatch.TorchDispatchMode):
    """The aten ops a forward runs (a dispatch mode registers no module hook)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket.__name__))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("deploy", [False, True])
def test_relu_and_residual_add_run_in_place_unless_a_hook_could_see_them(deploy):
    """Blocks apply their ReLUs and residual adds in place (one memory pass less each; issue 14), with the same
    values and gradients as out of place; a forward hook anywhere in the block, or a global one, keeps the tensor
    it saw unchanged, because the block then runs out of place."""
    torch.manual_seed(0)
    model = randomize(tiny()).eval()
    if deploy:
        reparameterize_model(model, inplace=True)
    block, ffn = model.stages[0].blocks[0], model.stages[0].blocks[1]
    x = torch.randn(2, 8, 16, 16, requires_grad=True)

    def run():
        out = ffn(block(x))
        gx, = torch.autograd.grad(out.square().sum(), x)
        return out.detach(), gx

    run()  # the large kernel's backend chooses on its first call (fastconv "auto" measures)
    lk_sum = 0 if deploy else 1  # the train form adds the large and the small kernel's outputs
    with _AtenLog() as log:
        ref_out, ref_gx = run()
    fwd = log.ops[:log.ops.index("pow")]
    assert fwd.count("relu_") == 2 and fwd.count("add_") == 2, fwd
    assert "relu" not in fwd and fwd.count("add") == lk_sum, fwd
    # hooks on pw2: its output is added out of place; equal bit for bit
    out_of_place = nn.Module.register_forward_hook(block.pw2.conv, lambda *a: None)
    ffn_hook = nn.Module.register_forward_hook(ffn.pw2, lambda *a: None)
    with _AtenLog() as log:
        out, gx = run()
    fwd = log.ops[:log.ops.index("pow")]
    assert fwd.count("relu_") == 2 and "add_" not in fwd and fwd.count("add") == 2 + lk_sum, fwd  # ReLUs: in place
    assert torch.equal(out, ref_out) and torch.equal(gx, ref_gx)
    out_of_place.remove()
    ffn_hook.remove()
    # hooks keep what they captured: the conv's output before the ReLU, pw2's output before the residual
    seen = {}

    def keep(name):
        def hook(module, inputs, output):
            seen[name] = (output, output.clone())
        return hook

    hooks = [block.pw1.conv.register_forward_hook(keep("pw1")), block.large_kernel.register_forward_hook(keep("lk")),
             ffn.pw2.register_forward_hook(keep("pw2"))]
    out, gx = run()
    for h in hooks:
        h.remove()
    assert torch.equal(out, ref_out) and torch.equal(gx, ref_gx)
    for name, (kept, copy_then) in seen.items():
        assert (copy_then < 0).any() and torch.equal(kept, copy_then), name
    # a backward hook on a ReLU module (guided backprop, say) runs: the block calls its nn.ReLU then
    fired = []
    handle = block.lk_nonlinear.register_full_backward_hook(lambda module, gin, gout: fired.append(True))
    out, gx = run()
    handle.remove()
    assert fired and torch.equal(out, ref_out) and torch.equal(gx, ref_gx)
    # a global hook turns every in-place step off
    handle = torch.nn.modules.module.register_module_forward_hook(lambda *a: None)
    try:
        with _AtenLog() as log:
            out, gx = run()
    finally:
        handle.remove()
    fwd = log.ops[:log.ops.index("pow")]
    assert "relu_" not in fwd and "add_" not in fwd and torch.equal(out, ref_out) and torch.equal(gx, ref_gx)

def test_large_depthwise_convs_are_fastconv_run_as_fastconv_says(monkeypatch):
    """Models only declare their large depthwise convs (fastconv.DepthwiseConv2d, nn.Conv2d's keys); how they run
    is fastconv.use / configure, never a model keyword or an erf-lab environment variable."""
    import fastconv
    from fastconv import DepthwiseConv2d

    monkeypatch.setenv("ERF_LAB_CONV_BACKEND", "native")  # no longer read by models
    model = randomize(tiny())
    lk = model.stages[0].blocks[0].large_kernel
    assert type(lk.lkb_origin.conv) is DepthwiseConv2d and lk.lkb_origin.conv.backend is None  # 31x31 -> fastconv
    assert type(lk.small_conv.conv) is nn.Conv2d and type(model.stem[1].conv) is nn.Conv2d  # small kernels native
    plain = copy.deepcopy(model)
    assert fastconv.revert_model(plain) == 4 and list(plain.state_dict()) == list(model.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = plain(x)
        with fastconv.use(backend="native"):
            assert torch.equal(model(x), ref)
        for backend in ("channels_last", "fft", "auto"):
            with fastconv.use(backend=backend):
                assert max_relative_error(ref, model(x)) < 1e-5, backend
        merge_large_kernels(model, inplace=True)
        assert isinstance(model.stages[0].blocks[0].large_kernel.lkb_reparam, DepthwiseConv2d)
    with pytest.raises(ErfLabError, match="does not accept"):
        create_model("replknet_31b", conv_backend="native", **TINY)


def test_kernels_above_63_run_forward_and_backward():
    """Issue #13 item 7: any odd kernel runs (only the Triton kernels stop at 63, and the dispatcher skips them)."""
    import fastconv

    model = create_model("replknet_31b", channels=(8, 8, 8, 8), layers=(1, 1, 1, 1), large_kernel_sizes=(65, 3, 3, 3))
    assert model.stages[0].blocks[0].large_kernel.lkb_origin.conv.kernel_size == (65, 65)
    plain = copy.deepcopy(model)
    fastconv.revert_model(plain)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    grads = []
    for m in (model, plain):
        m.train()
        xs = x.clone().requires_grad_()
        m(xs).square().sum().backward()
        grads += [xs.grad, m.stages[0].blocks[0].large_kernel.lkb_origin.conv.weight.grad]
    assert grads[1].abs().sum() > 0
    assert max_relative_error(grads[2], grads[0]) < 1e-4 and max_relative_error(grads[3], grads[1]) < 1e-4


# ------------------------------------------------------------------------------------------------------- CLI
def test_cli_reparam_writes_official_deploy_checkpoint(tmp_path, capsys):
    from erf_lab.cli.main import main

    train = randomize(tiny(), seed=4)
    torch.save({"model": train.state_dict()}, tmp_path / "train.pth")
    out = tmp_path / "deploy.safetensors"
    rc = main(["reparam", "--model", "replknet_31b", "--weights", str(tmp_path / "train.pth"),
               "--override", "channels=(8,16,16,16)", "--override", "layers=(1,1,1,1)",
               "--out", str(out), "--check-size", "64"])
    text = capsys.readouterr().out
    assert rc == 0 and out.is_file() and (tmp_path / "deploy.safetensors.run.json").is_file()
    assert "params" in text and "FLOPs" in text and "max rel err" in text
    assert "non-zero" not in text  # dense weights (the sparse-counting line is for zeros: tests/test_slak.py)
    err = float(text.split("max rel err")[1].split()[0])
    assert err < 1e-5
    deploy = create_model("replknet_31b", weights=str(out), **TINY).eval()
    assert deploy.is_merged and list(deploy.state_dict()) == official_keys((1, 1, 1, 1), merged=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert max_relative_error(train(x), deploy(x)) < 1e-5


def test_cli_reparam_leaves_out_a_classifier_that_drop_head_kept_random(tmp_path, capsys):
    """A 21841-class checkpoint merged with --drop-head into the default 1000-class model: the deploy file held the
    model's seeded-random 1000-class head with no mark, so shape-bias (which classifies with it) read it as trained.
    The head is left out now and the command says so; loading the file asks for --drop-head (or num_classes=0)."""
    from erf_lab.cli.main import main

    train = randomize(tiny(num_classes=21), seed=4)
    torch.save({"model": train.state_dict()}, tmp_path / "train.pth")
    out = tmp_path / "deploy.pth"
    rc = main(["reparam", "--model", "replknet_31b", "--weights", str(tmp_path / "train.pth"), "--drop-head",
               "--override", "channels=(8,16,16,16)", "--override", "layers=(1,1,1,1)",
               "--out", str(out), "--check-size", "64"])
    text = capsys.readouterr().out
    assert rc == 0 and "the classifier (head.bias, head.weight) was not in --weights' form" in text
    keys = set(torch.load(out, weights_only=True))
    assert keys == set(official_keys((1, 1, 1, 1), merged=True)) - {"head.weight", "head.bias"}
    with pytest.raises(CheckpointError, match="drop_head"):
        create_model("replknet_31b", weights=str(out), **TINY)
    body = create_model("replknet_31b", weights=str(out), num_classes=0, **TINY).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert max_relative_error(train.forward_features(x), body.forward_features(x)) < 1e-5
    # a classifier that fits is loaded and written as before
    rc = main(["reparam", "--model", "replknet_31b", "--weights", str(tmp_path / "train.pth"), "--drop-head",
               "--override", "channels=(8,16,16,16)", "--override", "layers=(1,1,1,1)", "--override",
               "num_classes=21", "--out", str(tmp_path / "same.pth"), "--check-size", "64"])
    assert rc == 0 and "the classifier" not in capsys.readouterr().out
    assert {"head.weight", "head.bias"} <= set(torch.load(tmp_path / "same.pth", weights_only=True))


def test_cli_reparam_refuses_a_checkpoint_already_in_deploy_form(tmp_path, capsys):
    """A file `erf-lab reparam` wrote, given to it again, was merged a second time (nothing to merge) and written
    again with "max rel err 0.00"; it is refused with one line naming the file, and nothing is written."""
    from erf_lab.cli.main import main

    ov = ["--override", "channels=(8,16,16,16)", "--override", "layers=(1,1,1,1)", "--check-size", "64"]
    deploy = tmp_path / "deploy.pth"
    assert main(["reparam", "--model", "replknet_31b", *ov, "--out", str(deploy)]) == 0
    capsys.readouterr()
    again = tmp_path / "d2.pth"
    assert main(["reparam", "--model", "replknet_31b", *ov, "--weights", str(deploy), "--out", str(again)]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"{deploy} is already in the deploy (re-parameterized) form; nothing to merge; use it as it is" in err
    assert "max rel err" not in captured.out and not again.exists() and not (tmp_path / "d2.pth.run.json").exists()


@pytest.mark.parametrize("name, ov", [
    ("replknet_31b", ["channels=(8,16,16,16)", "layers=(1,1,1,1)"]),
    ("unireplknet_a", ["dims=(8,16,16,16)"]),
])
def test_cli_reparam_refuses_a_model_built_in_deploy_form(name, ov, tmp_path, capsys):
    """``--override deploy=True`` without weights built a random network already merged; reparam "merged" nothing,
    reported "max rel err 0.00" and wrote it as a deploy checkpoint. Refused with one line naming the override."""
    from erf_lab.cli.main import main

    out = tmp_path / "d.pth"
    args = [a for o in [*ov, "deploy=True"] for a in ("--override", o)]
    assert main(["reparam", "--model", name, *args, "--check-size", "64", "--out", str(out)]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"{name} built with deploy=True is already in the deploy (re-parameterized) form; nothing to merge" in err
    assert "max rel err" not in captured.out and not out.exists() and not (tmp_path / "d.pth.run.json").exists()


def test_cli_reparam_errors_are_one_line(tmp_path, capsys):
    from erf_lab.cli.main import main

    assert main(["reparam", "--model", "replknet_31x", "--out", str(tmp_path / "d.pth")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown model 'replknet_31x'" in err and "replknet_31b" in err
    bad = tmp_path / "corrupt.pth"
    bad.write_bytes(b"\x80\x02not a checkpoint at all" * 10)
    assert main(["reparam", "--model", "replknet_31b", "--weights", str(bad), "--out", str(tmp_path / "d.pth")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "corrupt" in err and str(bad) in err
    assert not (tmp_path / "d.pth").exists()


@pytest.mark.parametrize("ratio", ["dw_ratio", "ffn_ratio"])
def test_ratios_that_leave_a_block_without_channels_are_refused(ratio):
    """int(width * ratio) = 0 built a block with no channels: dw_ratio failed inside nn.Conv2d, ffn_ratio only at
    the forward, where the CLI blamed the input size ('input size 64 does not fit RepLKNet')."""
    with pytest.raises(ErfLabError, match=f"{ratio}=0.01.* leave a block with no channels"):
        create_model("replknet_31b", layers=(1, 1, 1, 1), channels=(8, 8, 8, 8), **{ratio: 0.01})
    create_model("replknet_31b", layers=(1, 1, 1, 1), channels=(8, 8, 8, 8), **{ratio: 0.125})  # 1 channel: fine


def test_cli_reparam_that_fails_leaves_no_empty_folder(tmp_path, capsys):
    """--out in folders that do not exist yet: a failed reparam (here an unreadable --weights) removed none of the
    folders it had made for the file; an existing folder, and one that holds anything, stay."""
    from erf_lab.cli.main import main

    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    out = tmp_path / "new" / "deeper" / "d.pth"
    assert main(["reparam", "--model", "replknet_31b", "--weights", str(bad), "--out", str(out)]) == 2
    assert "cannot read checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "new").exists() and tmp_path.is_dir()
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "keep.txt").write_text("x")
    assert main(["reparam", "--model", "replknet_31b", "--weights", str(bad), "--out", str(out)]) == 2
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["keep.txt"]

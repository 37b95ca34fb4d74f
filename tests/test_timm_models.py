"""Any timm model (``timm/<name>``): CNNs and transformers, randomly initialised, saved and loaded through
``--weights``; the ERF of the library equals an independent plain-autograd computation of the same definition
(target = sum_c ReLU(M[c, h//2, w//2]) of the spatial map M; map = sum_rgb ReLU(d target / d input)).

The token / NHWC arrangement is written out here independently of ``erf_lab.erf.tokens``: a ViT's patch tokens
after its ``num_prefix_tokens`` on the (H/16, W/16) grid, a Swin's (B, H, W, C) permuted to NCHW.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from erf_lab.errors import ErfLabError
from erf_lab.models import create_model
from erf_lab.models import timm_models
from erf_lab.models.timm_models import INSTALL_HINT, import_timm

try:
    import_timm()
    TIMM_ERROR = None
except ErfLabError as e:  # not installed, or installed beside a torchvision that cannot load
    TIMM_ERROR = str(e)
needs_timm = pytest.mark.skipif(TIMM_ERROR is not None, reason=f"timm unavailable: {TIMM_ERROR}")

# name, constructor overrides (small ViT / Swin inputs), input side, how forward_features is arranged
CASES = {
    "resnet50": ({}, 64, "nchw"),
    "convnext_tiny": ({}, 64, "nchw"),
    "vit_tiny_patch16_224": ({"img_size": 64}, 64, "tokens"),
    "swin_tiny_patch4_window7_224": ({"img_size": 64, "window_size": 4}, 64, "nhwc"),
}


def reference_map(model: nn.Module, x: torch.Tensor, kind: str, module: nn.Module | None = None) -> torch.Tensor:
    """The ERF map of one image by plain autograd: forward_features (or ``module``'s output), arranged as NCHW."""
    x = x.clone().requires_grad_(True)
    if module is None:
        out = model.forward_features(x)
    else:
        captured = []
        handle = module.register_forward_hook(lambda m, i, o: captured.append(o))
        try:
            model(x)
        finally:
            handle.remove()
        out = captured[0]
    if kind == "tokens":
        patches = out[:, model.num_prefix_tokens:, :]
        gh, gw = x.shape[-2] // 16, x.shape[-1] // 16
        out = patches.reshape(x.shape[0], gh, gw, -1).permute(0, 3, 1, 2)
    elif kind == "nhwc":
        out = out.permute(0, 3, 1, 2)
    h, w = out.shape[-2:]
    target = F.relu(out[:, :, h // 2, w // 2]).sum()
    (grad,) = torch.autograd.grad(target, x)
    return F.relu(grad).sum(1)


def max_rel_err(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def save_weights(model: nn.Module, path) -> None:
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(sd, str(path))
    else:
        torch.save(sd, path)


def test_timm_not_installed_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm -> ImportError
    with pytest.raises(ErfLabError, match=r"pip install -e '\.\[timm\]'"):
        create_model("timm/resnet50")
    assert INSTALL_HINT == "pip install -e '.[timm]'"


@needs_timm
@pytest.mark.parametrize("name", list(CASES))
def test_weights_round_trip_and_erf_equals_plain_autograd(name, tmp_path, capsys):
    """Saved weights (safetensors, or a weights-only .pth for the ViT) load strictly into a fresh model; the
    whole measurement (``erf-lab compute`` for the ResNet-50, ``run_erf`` for the others: re-parameterized copy,
    channels_last, fastconv) gives the reference map, and run.json records the model's own preprocessing."""
    from erf_lab.cli.main import main
    from erf_lab.erf.images import load_images, model_data_config
    from erf_lab.erf.runner import ErfSpec, run_erf

    overrides, size, kind = CASES[name]
    torch.manual_seed(0)
    src = create_model(f"timm/{name}", **overrides).eval()
    path = tmp_path / ("w.pth" if kind == "tokens" else "w.safetensors")
    save_weights(src, path)
    model = create_model(f"timm:{name}", weights=str(path), **overrides).eval()
    for k, v in src.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k

    out = tmp_path / "run"
    if name == "resnet50":
        code = main(["compute", "--model", "timm/resnet50", "--weights", str(path), "--input-size", str(size),
                     "--num-images", "1", "--out", str(out), "--quiet"])
        assert code == 0, capsys.readouterr().err
    else:
        run_erf(ErfSpec(model=f"timm/{name}", weights=str(path), overrides=overrides, input_size=size,
                        num_images=1), out=out, show_progress=False, formats=())
    cfg = model_data_config(model)
    source = load_images(None, num_images=1, input_size=size, mean=cfg["mean"], std=cfg["std"])
    x = source.load(source.files[0]).unsqueeze(0)
    ref = reference_map(model, x, kind)[0]
    erf = np.load(out / "erf.npy")
    assert erf.shape == (size, size)
    assert float(ref.abs().max()) > 0
    assert max_rel_err(erf, ref.numpy()) < 1e-5
    info = json.loads((out / "run.json").read_text())
    assert info["layer"] == "forward_features" and info["weights_sha256"] and not info["random_init"]
    pre = model.pretrained_cfg
    assert info["mean"] == pytest.approx(list(pre["mean"])) and info["std"] == pytest.approx(list(pre["std"]))
    assert info["model_preprocessing"]["interpolation"] == pre["interpolation"]
    assert info["model_preprocessing"]["crop_pct"] == pytest.approx(pre["crop_pct"])
    # weights saved from an untrained model into a file with no training record: the pretrained_cfg's size is that
    # of timm's published weights, not of these, so the training resolution is unknown
    assert info["train_size"] is None and info["train_size_source"].startswith("unknown: ")
    if kind == "nchw":
        assert isinstance(info["theoretical_rf"], int) and info["theoretical_rf"] > size
    else:
        assert info["theoretical_rf"] is None  # after attention: no kernel-defined RF
    if name == "resnet50":
        assert info["feature_shape"] == [2048, 2, 2]


@needs_timm
@pytest.mark.parametrize("name,layer", [("vit_tiny_patch16_224", "blocks.1"),  # forward_intermediates
                                        ("vit_tiny_patch16_224", "blocks.1.mlp"),  # forward hook, tokens
                                        ("swin_tiny_patch4_window7_224", "layers.1.blocks.0")])  # hook, NHWC
def test_intermediate_token_layers_equal_plain_autograd(name, layer):
    from erf_lab.erf.attribution import EffectiveReceptiveField

    overrides, size, kind = CASES[name]
    torch.manual_seed(1)
    model = create_model(f"timm/{name}", **overrides).eval()
    x = torch.randn(2, 3, size, size)
    erf = EffectiveReceptiveField(model, layer=layer).attribute(x)
    ref = reference_map(model, x, kind, dict(model.named_modules())[layer])
    assert max_rel_err(erf.detach().numpy(), ref.numpy()) < 1e-5
    if kind == "nhwc":  # inside a block, window attention runs on windows, not images: refused
        with pytest.raises(ErfLabError, match="one map per image"):
            EffectiveReceptiveField(model, layer=f"{layer}.attn").attribute(x)


@needs_timm
def test_prefix_tokens_are_dropped():
    """Register tokens too (num_prefix_tokens = 1 class + 3 registers): the grid holds only patch tokens."""
    from erf_lab.erf.tokens import to_spatial

    model = create_model("timm/vit_tiny_patch16_224", img_size=64, reg_tokens=3).eval()
    assert model.num_prefix_tokens == 4
    tokens = torch.arange(4 + 16, dtype=torch.float32).view(1, 20, 1).repeat(1, 1, 2)
    m = to_spatial(tokens, model, (64, 64))
    assert m.shape == (1, 2, 4, 4)
    assert m[0, 0].flatten().tolist() == list(range(4, 20))  # row-major patch order, prefix gone
    x = torch.randn(1, 3, 64, 64)
    from erf_lab.erf.attribution import EffectiveReceptiveField

    erf = EffectiveReceptiveField(model).attribute(x)
    assert max_rel_err(erf.detach().numpy(), reference_map(model, x, "tokens").numpy()) < 1e-5


@needs_timm
def test_layers_of_cnn_vit_and_swin(capsys):
    from erf_lab.cli.commands.layers import layer_table
    from erf_lab.cli.main import main

    rows = {r["name"]: r for r in layer_table("timm/resnet50", 64)}
    assert list(rows)[-1] == "forward_features"
    assert rows["forward_features"]["shape"] == [2048, 2, 2] and rows["forward_features"]["stride"] == 32
    assert rows["layer1"]["theoretical_rf"] < rows["layer4"]["theoretical_rf"]
    assert main(["layers", "--model", "timm/resnet50", "--input-size", "64", "--filter", "layer4"]) == 0
    assert "layer4" in capsys.readouterr().out

    vit = {r["name"]: r for r in layer_table("timm/vit_tiny_patch16_224", 64, {"img_size": 64})}
    # a 16 x 16 stride-16 patch: unit 0's receptive field is pixels 0..15, centred at 7.5
    assert vit["patch_embed.proj"] == {"name": "patch_embed.proj", "shape": [192, 4, 4], "theoretical_rf": 16,
                                       "stride": 16, "rf_start": [7.5, 7.5], "stride_hw": [16, 16],
                                       "rf_global": False, "kernel_rf": 16, "size_dependent": False}
    assert vit["blocks.0"]["shape"] == [192, 4, 4] and vit["blocks.0"]["theoretical_rf"] is None
    assert "blocks.0.attn.q_norm" not in vit  # per-head (B, heads, N, d): no spatial map
    assert vit["forward_features"]["stride"] == 16
    swin = {r["name"]: r for r in layer_table("timm/swin_tiny_patch4_window7_224", 64,
                                              {"img_size": 64, "window_size": 4})}
    assert swin["forward_features"]["shape"] == [768, 2, 2] and swin["forward_features"]["stride"] == 32
    # the patch-embedding conv is NCHW, the embedding's output NHWC: both listed as (C, H, W)
    assert swin["patch_embed.proj"]["shape"] == swin["patch_embed"]["shape"] == [96, 16, 16]
    assert swin["patch_embed"]["theoretical_rf"] == 4 and swin["layers.1"]["stride"] == 8
    with pytest.raises(ErfLabError, match="img_size"):
        layer_table("timm/vit_tiny_patch16_224", 64)  # built for 224 px


@needs_timm
def test_layers_of_maxvit_and_gcvit_blocks_are_chw():
    """MaxViT and GC ViT switch to channels-last with a permute and return the window attention's map through a
    function: their blocks and ``ls1`` were listed H x W x C (and measured at the wrong unit)."""
    from erf_lab.cli.commands.layers import layer_table

    maxvit = {r["name"]: r for r in layer_table("timm/maxvit_rmlp_pico_rw_256", 256, {"img_size": 256})}
    for name in ("attn_block", "attn_block.ls1", "attn_block.norm1", "attn_grid", "attn_grid.ls1"):
        assert maxvit[f"stages.1.blocks.0.{name}"]["shape"] == [64, 32, 32], name
    gcvit = {r["name"]: r for r in layer_table("timm/gcvit_xxtiny", 224)}
    for name in ("blocks.0", "blocks.0.ls1", "blocks.0.norm1", "global_norm", "norm"):
        want = [64, 7, 7] if name == "global_norm" else [64, 56, 56]
        assert gcvit[f"stages.0.{name}"]["shape"] == want, name


@needs_timm
def test_pretrained_passes_through_to_timm(monkeypatch):
    """Offline: the code path of pretrained=True reaches timm.create_model with pretrained=True, and a failed
    download is one ErfLabError pointing at --weights."""
    timm = import_timm()
    calls = []
    real = timm.create_model

    def recording(name, pretrained=False, **kw):
        calls.append((name, pretrained, kw))
        return real(name, pretrained=False, **kw)

    monkeypatch.setattr(timm, "create_model", recording)
    monkeypatch.setattr(timm_models, "check_hub_weights", lambda *a: None)  # whether they can be fetched: below
    model = create_model("timm/resnet18", pretrained=True, num_classes=10)
    assert calls == [("resnet18", True, {"num_classes": 10})]
    assert model.fc.out_features == 10 and model.head_names == ("fc",)

    def offline(name, pretrained=False, **kw):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(ErfLabError, match="--weights FILE"):
        create_model("timm/resnet18", pretrained=True)


def _hub_unreachable(monkeypatch, tmp_path) -> Path:
    """An empty Hugging Face cache under ``tmp_path`` (returned) and a hub that cannot be reached: every request goes
    through a proxy on a local port nobody listens on (connection refused at once; never the real network)."""
    import socket

    import huggingface_hub
    import huggingface_hub.constants as hub_constants

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(name, f"http://127.0.0.1:{port}")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    huggingface_hub.close_session()  # the next request builds a client that reads the proxy variables
    return tmp_path / "hub"


@needs_timm
def test_pretrained_weights_offline_fail_at_once_unless_cached(tmp_path, monkeypatch, caplog):
    """pretrained=True without a network: huggingface_hub retried for about 50 s, printing some 20 'Retrying' lines,
    before erf-lab's error. Weights not in the local Hugging Face cache and a hub that cannot be reached (or
    HF_HUB_OFFLINE) are now one line at once, after one request; weights in the cache still load offline."""
    import huggingface_hub
    import huggingface_hub.constants as hub_constants
    from safetensors.torch import save_file

    cache = _hub_unreachable(monkeypatch, tmp_path)
    try:
        with caplog.at_level("INFO"), pytest.raises(ErfLabError) as err:
            create_model("timm/test_resnet", pretrained=True)
        assert "Retry" not in caplog.text
        msg = str(err.value)
        assert "\n" not in msg and msg.startswith("cannot get the pretrained weights of timm/test_resnet: timm/"
                                                  f"test_resnet.r160_in1k is not in the local Hugging Face cache "
                                                  f"({cache}) and the hub cannot be reached (")
        assert msg.endswith("pass --weights FILE instead")
        monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
        with pytest.raises(ErfLabError, match=r"not in the local Hugging Face cache .* and HF_HUB_OFFLINE is set"):
            create_model("timm/test_resnet", pretrained=True)
        monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)

        # the same weights in the cache (as a download on a network leaves them): read from there, offline
        torch.manual_seed(0)
        published = create_model("timm/test_resnet").state_dict()
        repo = cache / "models--timm--test_resnet.r160_in1k"
        snapshot = repo / "snapshots" / ("0" * 40)
        snapshot.mkdir(parents=True)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text("0" * 40)
        save_file({k: v.contiguous() for k, v in published.items()}, snapshot / "model.safetensors")
        caplog.clear()
        with caplog.at_level("INFO"):
            model = create_model("timm/test_resnet", pretrained=True)
        assert "Retry" not in caplog.text
        for key, value in model.state_dict().items():
            assert torch.equal(value, published[key]), key
    finally:
        huggingface_hub.close_session()


@needs_timm
def test_unknown_timm_name_and_shape_bias_preprocessing():
    from erf_lab.shape_bias.stimuli import Preprocess

    with pytest.raises(ErfLabError, match="did you mean timm/resnet50"):
        create_model("timm/resnet5O")
    model = create_model("timm/convnext_tiny")
    pre = Preprocess.from_model(model)
    cfg = model.pretrained_cfg
    assert pre.size == tuple(cfg["input_size"][-2:]) and pre.crop_pct == 1.0  # model-vs-human: stimuli whole
    assert Preprocess.from_model(model, crop_pct=None).crop_pct == cfg["crop_pct"] < 1
    assert pre.interpolation == cfg["interpolation"] and pre.mean == tuple(cfg["mean"])


@needs_timm
def test_app_erf_explorer_takes_timm_names(tmp_path, monkeypatch):
    """The model picker takes any timm name: a ViT is built at the page's input size (its fixed_input_size)
    and measured; a name timm does not know is refused."""
    from pathlib import Path

    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("ERF_LAB_APP_RUNS", str(tmp_path / "app-runs"))
    monkeypatch.setenv("ERF_LAB_APP_ROOTS", str(tmp_path))
    at = AppTest.from_file(str(Path(__file__).resolve().parents[1] / "app" / "main.py"), default_timeout=240).run()
    at.radio(key="erf-init-0").set_value("random").run()  # the landing view shows the shipped trained models
    assert "timm/vit_tiny_patch16_224" in at.selectbox(key="erf-model-0").options
    at.selectbox(key="erf-model-0").set_value("timm/vit_tiny_patch16_224").run()
    assert not at.exception, [e.value for e in at.exception]
    layers = at.selectbox(key="erf-layer-0").options
    assert "blocks.11" in layers and layers[-1] == "forward_features"
    at.button(key="erf-run").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert float([m.value for m in at.metric if m.label == "r_rms (px)"][0]) > 0
    assert any("theoretical RF global (16 px)" in c.value for c in at.caption)  # attention over every patch

    from app import models  # AppTest cannot type a new option; the page checks typed names with this

    models.check_registered("timm:resnet18")
    for bad in ("timm/not_a_model", "os:system"):
        with pytest.raises(ErfLabError, match="unknown model"):
            models.check_registered(bad)


def test_pretrained_with_another_class_count_marks_the_random_classifier(monkeypatch):
    """timm keeps the published weights but draws a new classifier when ``num_classes`` differs from theirs: its
    keys are listed in ``random_init_keys`` (shape-bias refuses such a model); the published head is not. Runs
    without timm: a stand-in module gives timm's interface (``create_model``, ``is_model``, ``pretrained_cfg``)."""
    import types

    import erf_lab.models.timm_models as tm

    def fake_create_model(name, pretrained=False, num_classes=1000):
        model = nn.Sequential()
        model.add_module("body", nn.Conv2d(3, 4, 3))
        model.add_module("fc", nn.Linear(4, num_classes))
        model.pretrained_cfg = {"classifier": "fc", "num_classes": 1000}
        return model

    fake = types.SimpleNamespace(create_model=fake_create_model, is_model=lambda name: True, list_models=lambda: [])
    monkeypatch.setattr(tm, "import_timm", lambda: fake)
    assert create_model("timm/fakenet", pretrained=True, num_classes=16).random_init_keys == ["fc.bias", "fc.weight"]
    assert getattr(create_model("timm/fakenet", pretrained=True), "random_init_keys", []) == []
    assert getattr(create_model("timm/fakenet", pretrained=True, num_classes=1000), "random_init_keys", []) == []
    assert getattr(create_model("timm/fakenet", num_classes=16), "random_init_keys", []) == []  # all random: no file


@needs_timm
@pytest.mark.parametrize("fused", [True, False])
def test_vit_self_attention_is_a_global_rf_on_the_patch_grid(fused):
    """Every ViT token attends to every patch (fused scaled_dot_product_attention, or softmax(q k^T) v): the layers
    after the first attention have a global theoretical RF, the kernels' 16 px patch kept with the patch grid
    (they were n/a, unplaced); qkv before it is the patch's. A Swin's window attention is no global one: n/a."""
    from erf_lab.erf.receptive_field import list_layers

    model = create_model("timm/vit_tiny_patch16_224", img_size=64, reg_tokens=2).eval()
    for block in model.blocks:
        block.attn.fused_attn = fused
    rows = {r["name"]: r for r in list_layers(model, 64)}
    assert rows["blocks.0.attn.qkv"]["theoretical_rf"] == 16 and not rows["blocks.0.attn.qkv"]["rf_global"]
    for name in ("blocks.0.attn", "blocks.0", "blocks.11", "forward_features"):
        row = rows[name]
        assert (row["theoretical_rf"], row["rf_global"], row["kernel_rf"]) == (None, True, 16), name
        assert row["rf_start"] == [7.5, 7.5] and row["stride_hw"] == [16, 16] and row["stride"] == 16, name

    swin = create_model("timm/swin_tiny_patch4_window7_224", img_size=64, window_size=4).eval()
    ff = list_layers(swin, 64)[-1]
    assert ff["name"] == "forward_features" and ff["theoretical_rf"] is None and not ff["rf_global"]


@needs_timm
def test_vit_erf_metrics_centred_on_the_measured_token(tmp_path):
    """A 4 x 4 token grid at 64 px: the measured token (2, 2) is the patch of pixels 32..47, centred at 39.5; the
    metrics took the map's middle (32, 32), a patch away from where its ERF peaks."""
    from erf_lab.erf.runner import ErfSpec, run_erf

    out = tmp_path / "vit"
    run_erf(ErfSpec(model="timm/vit_tiny_patch16_224", overrides={"img_size": 64}, input_size=64, num_images=1),
            out=out, show_progress=False, formats=())
    info = json.loads((out / "run.json").read_text())
    assert info["rf_global"] and info["kernel_rf"] == 16 and info["theoretical_rf"] is None
    assert info["erf_centre"] == [40, 40]
    assert json.loads((out / "metrics.json").read_text())["center"] == [40, 40]
    erf = np.load(out / "erf.npy")
    assert erf[32:48, 32:48].sum() > 2 * erf[24:40, 24:40].sum()  # the measured patch, not the map's middle


@needs_timm
def test_pvt_keys_from_a_strided_conv_keep_the_queries_grid(tmp_path):
    """PVT v2's keys and values come from a conv of stride 8 (sr_ratio): the attention's output took their stride,
    compounding to 131072 px at the last stage, so compute refused 64 px as 'too small'. The output is on the
    queries' grid (strides 4, 8, 16, 32) and global: the 2 x 2 keys cover the whole map."""
    from erf_lab.cli.commands.layers import layer_table
    from erf_lab.erf.runner import ErfSpec, run_erf

    rows = {r["name"]: r for r in layer_table("timm/pvt_v2_b0", 64)}
    for stage, stride in enumerate((4, 8, 16, 32)):
        row = rows[f"stages.{stage}"]
        assert row["stride"] == stride and row["stride_hw"] == [stride, stride] and row["rf_global"], row
        assert row["shape"][1:] == [64 // stride] * 2
    assert rows["stages.0.blocks.0.attn.sr"]["theoretical_rf"] == 7 + 7 * 4  # 8 x 8 stride-8 conv at stride 4
    run_erf(ErfSpec(model="timm/pvt_v2_b0", input_size=64, num_images=1), out=tmp_path / "pvt",
            show_progress=False, formats=())
    info = json.loads((tmp_path / "pvt" / "run.json").read_text())
    assert info["feature_shape"] == [256, 2, 2] and info["rf_global"] and info["kernel_rf"] == rows["stages.3"][
        "kernel_rf"]


@needs_timm
def test_vit_size_not_a_multiple_of_the_patch_names_dynamic_img_pad():
    """With dynamic_img_size=True already set, a size that is no multiple of 16 pointed back at dynamic_img_size;
    timm pads it with dynamic_img_pad=True (7 x 7 tokens at 100 px, the patch grid still from pixel 0)."""
    from erf_lab.erf.receptive_field import list_layers

    with pytest.raises(ErfLabError, match=r"dynamic_img_pad=True$"):
        list_layers(create_model("timm/vit_tiny_patch16_224", dynamic_img_size=True).eval(), 100)
    padded = create_model("timm/vit_tiny_patch16_224", dynamic_img_size=True, dynamic_img_pad=True).eval()
    row = list_layers(padded, 100)[-1]
    assert row["shape"] == [192, 7, 7] and row["rf_global"] and row["rf_start"] == [7.5, 7.5]


@needs_timm
def test_swin_tokens_after_window_attention_keep_their_places(tmp_path):
    """After window attention the RF is n/a, but each token keeps its place: on the 4 px patch grid, and after
    each patch merging (a reshape of 2 x 2 tokens, which no kernel tracks) on a twice coarser one centred on the
    merged tokens. The metrics took the map's middle (32, 32); the measured unit (1, 1) of the 2 x 2 map at 64 px
    covers pixels 32..63 (centre 47.5), where the ERF lies."""
    from erf_lab.cli.commands.layers import layer_table
    from erf_lab.erf.runner import ErfSpec, run_erf

    overrides, size, _ = CASES["swin_tiny_patch4_window7_224"]
    rows = {r["name"]: r for r in layer_table("timm/swin_tiny_patch4_window7_224", size, overrides)}
    for name, stride in (("layers.0", 4), ("layers.1", 8), ("layers.2", 16), ("layers.3", 32),
                         ("forward_features", 32)):
        row = rows[name]
        assert row["theoretical_rf"] is None and not row["rf_global"], name
        assert row["stride_hw"] == [stride, stride] and row["rf_start"] == [(stride - 1) / 2] * 2, name
    out = tmp_path / "swin"
    run_erf(ErfSpec(model="timm/swin_tiny_patch4_window7_224", overrides=overrides, input_size=size, num_images=1),
            out=out, show_progress=False, formats=())
    assert json.loads((out / "run.json").read_text())["erf_centre"] == [48, 48]
    assert json.loads((out / "metrics.json").read_text())["center"] == [48, 48]
    erf = np.load(out / "erf.npy")
    assert erf[32:, 32:].sum() > 2 * erf[:32, :32].sum()


@needs_timm
def test_hiera_blocks_are_rolled_back_to_the_image_grid():
    """Hiera keeps its tokens unrolled (mask-unit order) between blocks: a block outside feature_info (reached by a
    hook) was reshaped row-major, so its 'centre unit' was another token (at 224 px blocks.1 measured pixels
    (69..79, 0..7)). Through the hook, a block now equals timm's own rolled-back intermediate (blocks.2, the end of
    stage 1: forward_intermediates' index 1); a module inside a block is refused."""
    from erf_lab.cli.commands.layers import layer_table
    from erf_lab.erf.attribution import EffectiveReceptiveField

    torch.manual_seed(2)
    model = create_model("timm/hiera_tiny_224", img_size=64).eval()
    x = torch.randn(1, 3, 64, 64, requires_grad=True)
    out = model.forward_intermediates(x, indices=[1], intermediates_only=True)[0]  # (1, 192, 8, 8), timm's reroll
    (grad,) = torch.autograd.grad(F.relu(out[:, :, 4, 4]).sum(), x)
    model.feature_info = [f for f in model.feature_info if f["module"] != "blocks.2"]  # measured through a hook
    erf = EffectiveReceptiveField(model, layer="blocks.2").attribute(x.detach())
    assert max_rel_err(erf.detach().numpy(), F.relu(grad).sum(1).numpy()) < 1e-5
    with pytest.raises(ErfLabError, match="unrolled"):
        EffectiveReceptiveField(model, layer="blocks.1.mlp").attribute(x.detach())
    rows = {r["name"]: r for r in layer_table("timm/hiera_tiny_224", 64, {"img_size": 64})}
    # a 7 x 7 stride-4 patch conv padded by 3 centres token i at 4 i; the pooled unit j on tokens 2 j, 2 j + 1
    assert rows["blocks.1"]["shape"] == [192, 8, 8] and rows["blocks.1"]["rf_start"] == [2.0, 2.0]
    assert "blocks.1.mlp" not in rows


@needs_timm
def test_vit_weights_of_another_size_name_dynamic_img_size(tmp_path):
    """Weights saved at 224 px do not load into a ViT built with img_size=64 (its position embedding has 17, not 197
    rows): the error said only 'shape mismatch'; it names dynamic_img_size=True, with which they load unchanged and
    the embedding is interpolated to 64 px."""
    torch.manual_seed(3)
    src = create_model("timm/vit_tiny_patch16_224").eval()
    path = tmp_path / "vit224.safetensors"
    save_weights(src, path)
    with pytest.raises(ErfLabError, match=r"pos_embed is \(1, 197, 192\).*dynamic_img_size=True, not img_size"):
        create_model("timm/vit_tiny_patch16_224", weights=str(path), img_size=64)
    model = create_model("timm/vit_tiny_patch16_224", weights=str(path), dynamic_img_size=True).eval()
    assert torch.equal(model.pos_embed, src.pos_embed)
    assert model.forward_features(torch.randn(1, 3, 64, 64)).shape == (1, 17, 192)

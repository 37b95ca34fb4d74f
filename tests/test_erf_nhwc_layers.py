"""ConvNeXt-style blocks (UniRepLKNet, SLaK) run their MLP channels-last: the (B, H, W, C) outputs of their
LayerNorm / Linear / activation modules are listed as (C, H, W) and measured at the centre unit, like any NCHW map
(before: listed as H x W x C, and the ERF target summed the map's rows at (x = W/2, channel C/2))."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from erf_lab.erf.attribution import EffectiveReceptiveField
from erf_lab.erf.receptive_field import list_layers
from erf_lab.models import create_model

UNI = dict(depths=(1, 1, 2, 1), dims=(8, 16, 16, 16), kernel_sizes=((3,), (13,), (13, 3), (13,)))
SLAK = dict(depths=(1, 1, 1, 1), dims=(8, 16, 16, 16), width_factor=1.0)
CASES = [("unireplknet_a", UNI, "stages.1.0.pwconv1", 64), ("unireplknet_a", UNI, "stages.1.0.act", 64),
         ("slak_t", SLAK, "stages.1.0.norm", 16), ("slak_t", SLAK, "stages.1.0.pwconv1", 64)]


@pytest.mark.parametrize("name,kw,layer,channels", CASES)
def test_channels_last_block_layers_are_listed_and_measured_as_chw(name, kw, layer, channels):
    torch.manual_seed(0)
    model = create_model(name, **kw).eval()
    rows = {r["name"]: r for r in list_layers(model, 64)}
    assert rows[layer]["shape"] == [channels, 8, 8]

    def centre(out):  # (B, H, W, C): every channel at the centre unit (h // 2, w // 2)
        assert out.shape[-1] == channels
        return out[:, 4, 4, :]

    _assert_erf_is_the_centre_gradient(model, layer, centre)


def _assert_erf_is_the_centre_gradient(model, layer, centre):
    """The ERF of ``layer`` equals the input gradient of ReLU(``centre(output)``) summed, computed by hand."""
    x = torch.randn(2, 3, 64, 64)
    maps = EffectiveReceptiveField(model, layer).attribute(x)
    captured = []
    handle = dict(model.named_modules())[layer].register_forward_hook(lambda m, i, o: captured.append(o))
    xr = x.clone().requires_grad_(True)
    model(xr)
    handle.remove()
    (grad,) = torch.autograd.grad(F.relu(centre(captured[0])).sum(), xr)
    torch.testing.assert_close(maps, F.relu(grad).sum(1), rtol=1e-5, atol=1e-8)


class _WidthMix(torch.nn.Module):
    """A Linear along the width of an NCHW map (token mixing, MLP-Mixer / ViP style) and a LayerNorm over (C, H, W):
    NCHW outputs that a Linear / LayerNorm makes."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, stride=4, padding=1)  # (B, 8, 16, 16) at 64 px
        self.mix = torch.nn.Linear(16, 16)
        self.act = torch.nn.GELU()
        self.norm = torch.nn.LayerNorm([8, 16, 16])
        self.head = torch.nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(self.norm(self.act(self.mix(self.conv(x)))))


@pytest.mark.parametrize("layer", ["mix", "act", "norm"])
def test_a_linear_or_layernorm_over_an_nchw_map_stays_nchw(layer):
    """Not every 4-D Linear / LayerNorm output is NHWC: over the width of a map a conv made (known NCHW), or a
    LayerNorm over (C, H, W), the map is listed as it is and measured at its centre unit (before: tagged NHWC,
    listed as (16, 8, 16) and the ERF target was row 8 of channel 8 instead of the centre)."""
    torch.manual_seed(0)
    model = _WidthMix().eval()
    rows = {r["name"]: r for r in list_layers(model, 64)}
    assert rows[layer]["shape"] == [8, 16, 16]

    _assert_erf_is_the_centre_gradient(model, layer, lambda out: out[:, :, 8, 8])  # the NCHW map's centre unit


class _LayerScale(torch.nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.gamma = torch.nn.Parameter(torch.linspace(0.5, 1.5, dim))

    def forward(self, x):
        return x * self.gamma


class _WindowBlock(torch.nn.Module):
    """A channels-last block as timm's MaxViT / GC ViT run it: (B, H, W, C) in; LayerNorm; window partition, a
    Linear per window and the window reverse as functions; a LayerScale on the reversed map; a residual add."""

    def __init__(self, dim, window=4):
        super().__init__()
        self.window = window
        self.norm1 = torch.nn.LayerNorm(dim)
        self.proj = torch.nn.Linear(dim, dim)
        self.ls1 = _LayerScale(dim)

    def forward(self, x):
        b, h, w, c = x.shape
        s = self.window
        win = self.norm1(x).view(b, h // s, s, w // s, s, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, s, s, c)
        win = self.proj(win)
        back = win.view(b, h // s, w // s, s, s, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)
        return x + self.ls1(back)


class _ChannelsLastStage(torch.nn.Module):
    """NCHW conv, ``permute(0, 2, 3, 1)`` to channels-last (a function), the window block, and back."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 12, 3, stride=4, padding=1)  # (B, 12, 16, 16) at 64 px
        self.block = _WindowBlock(12)
        self.head = torch.nn.Conv2d(12, 4, 1)

    def forward(self, x):
        return self.head(self.block(self.stem(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2))


@pytest.mark.parametrize("layer", ["block", "block.ls1", "block.norm1"])
def test_maps_made_by_permutes_and_window_functions_are_read_as_chw(layer):
    """MaxViT / GC ViT: the block's input is channels-last by a permute (a function), and ``ls1`` scales a map that
    the window reverse (a function) made: both were read as NCHW (listed 16x16x12, the ERF target a stripe). The
    tags now follow permutes and same-shape functions, and a function's map takes its block's input layout."""
    torch.manual_seed(0)
    model = _ChannelsLastStage().eval()
    rows = {r["name"]: r for r in list_layers(model, 64)}
    assert rows[layer]["shape"] == [12, 16, 16]
    assert rows["stem"]["shape"] == [12, 16, 16] and rows["head"]["shape"] == [4, 16, 16]

    def centre(out):  # (B, H, W, C): every channel at the centre unit
        assert out.shape[1:] == (16, 16, 12)
        return out[:, 8, 8, :]

    _assert_erf_is_the_centre_gradient(model, layer, centre)

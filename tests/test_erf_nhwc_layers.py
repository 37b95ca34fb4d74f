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

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

    x = torch.randn(2, 3, 64, 64)
    maps = EffectiveReceptiveField(model, layer).attribute(x)

    captured = []
    handle = dict(model.named_modules())[layer].register_forward_hook(lambda m, i, o: captured.append(o))
    xr = x.clone().requires_grad_(True)
    model(xr)
    handle.remove()
    out = captured[0]  # (B, H, W, C)
    assert out.shape[-1] == channels
    target = F.relu(out[:, 4, 4, :]).sum()  # every channel at the centre unit (h // 2, w // 2)
    (grad,) = torch.autograd.grad(target, xr)
    torch.testing.assert_close(maps, F.relu(grad).sum(1), rtol=1e-5, atol=1e-8)

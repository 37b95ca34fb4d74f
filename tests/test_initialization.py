"""Random initialization on all threads (erf_lab.models.initialization): PyTorch's own distributions, values set
by torch.manual_seed alone, nothing left uninitialized."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from erf_lab.models import create_model
from erf_lab.models.initialization import _reset, init_default_, materialize, trunc_normal_conv_linear

TINY = dict(channels=(8, 16, 16, 16), layers=(1, 1, 1, 1))


@pytest.mark.parametrize("make", [
    lambda: nn.Conv2d(6, 10, 3),
    lambda: nn.Conv2d(8, 8, 5, padding=2, groups=8, bias=False),
    lambda: nn.Conv2d(4, 6, (3, 7), groups=2),
    lambda: nn.Linear(12, 7),
    lambda: nn.Linear(12, 7, bias=False),
], ids=["conv", "depthwise-nobias", "grouped-rect", "linear", "linear-nobias"])
def test_reset_draws_exactly_what_torch_reset_parameters_draws(make):
    """The same generator state gives bit-identical weights and biases through torch's own reset_parameters
    (global generator) and through _reset (an explicit one): the formula is PyTorch's, not an approximation."""
    a, b = make(), make()
    torch.manual_seed(123)
    a.reset_parameters()
    _reset(b, torch.Generator().manual_seed(123))
    assert torch.equal(a.weight, b.weight)
    assert (a.bias is None) == (b.bias is None)
    if a.bias is not None:
        assert torch.equal(a.bias, b.bias)


def test_reset_matches_torch_for_fastconv_depthwise():
    from fastconv import DepthwiseConv2d

    a, b = DepthwiseConv2d(16, 13), DepthwiseConv2d(16, 13)
    torch.manual_seed(7)
    a.reset_parameters()
    _reset(b, torch.Generator().manual_seed(7))
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)


def test_replknet_values_follow_the_seed_not_the_thread_count():
    torch.manual_seed(0)
    a = create_model("replknet_31b", **TINY)
    torch.manual_seed(0)
    b = create_model("replknet_31b", **TINY)
    torch.manual_seed(1)
    c = create_model("replknet_31b", **TINY)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["head.weight"], sc["head.weight"])
    # the same draw on one and on two threads (each module has its own generator); large enough to go parallel
    with torch.device("meta"):
        m1 = nn.Sequential(nn.Conv2d(64, 256, 3), nn.Conv2d(256, 64, 3), nn.BatchNorm2d(64), nn.Linear(300, 300))
        m2 = nn.Sequential(nn.Conv2d(64, 256, 3), nn.Conv2d(256, 64, 3), nn.BatchNorm2d(64), nn.Linear(300, 300))
    torch.manual_seed(5)
    init_default_(materialize(m1), threads=1)
    torch.manual_seed(5)
    init_default_(materialize(m2), threads=2)
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    twins = init_default_(nn.Sequential(nn.Conv2d(8, 8, 3), nn.Conv2d(8, 8, 3)))  # each module its own stream
    assert not torch.equal(twins[0].weight, twins[1].weight)


def test_replknet_has_torch_default_distributions_everywhere():
    """Every conv / linear weight of a full-width stage is U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (max close to the
    bound, variance bound^2/3), BN starts at weight 1, bias 0, running mean 0, var 1: no uninitialized memory."""
    torch.manual_seed(0)
    model = create_model("replknet_31b", channels=(32, 64, 128, 128), layers=(1, 1, 2, 1))
    n_conv = 0
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            fan_in = mod.weight[0].numel()
            bound = 1 / math.sqrt(fan_in)
            w = mod.weight.detach()
            assert w.abs().max() <= bound, name
            if w.numel() >= 64:  # drawn, not left at zero: P(max < bound / 2) = 2^-64
                assert w.abs().max() > 0.5 * bound, name
            if w.numel() >= 4096:
                assert w.abs().max() > 0.99 * bound, name
                assert abs(w.var().item() / (bound ** 2 / 3) - 1) < 0.1, name
            if mod.bias is not None:
                assert mod.bias.abs().max() <= bound and mod.bias.abs().max() > 0, name
            n_conv += 1
        elif isinstance(mod, nn.BatchNorm2d):
            assert torch.all(mod.weight == 1) and torch.all(mod.bias == 0), name
            assert torch.all(mod.running_mean == 0) and torch.all(mod.running_var == 1), name
            assert int(mod.num_batches_tracked) == 0, name
    assert n_conv > 20
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("options", [{}, {"deploy": True}, {"num_classes": 0},
                                     {"num_classes": None, "out_indices": (1, 3), "norm_intermediate_features": True}],
                         ids=["train-form", "deploy", "no-head", "backbone"])
def test_init_default_leaves_no_tensor_uninitialized(options, monkeypatch):
    """Every parameter and buffer that RepLKNet's build draws or resets is written: its memory starts as NaN here
    (``materialize``'s ``torch.empty`` filled), and none is left."""
    from erf_lab.models import initialization

    real_empty = torch.empty

    def poisoned_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan") if t.is_floating_point() else -7)

    monkeypatch.setattr(initialization.torch, "empty", poisoned_empty)
    model = create_model("replknet_31b", channels=(8, 16, 16, 16), layers=(1, 2, 1, 1), **options)
    monkeypatch.undo()
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers())
            if (torch.isnan(t).any() if t.is_floating_point() else (t == -7).any())]
    assert not left and len(model.state_dict()) > 40


def test_replknet_stays_on_the_meta_device_inside_a_meta_block():
    with torch.device("meta"):
        model = create_model("replknet_31b", **TINY)
    assert all(t.is_meta for t in (*model.parameters(), *model.buffers()))


def test_init_default_refuses_a_module_it_cannot_initialize():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.gamma = nn.Parameter(torch.empty(4))

    with pytest.raises(RuntimeError, match="Scale holds tensors but has no reset_parameters"):
        init_default_(nn.Sequential(nn.Conv2d(4, 4, 1), Scale()))


# UniRepLKNet / SLaK: the official ``_init_weights`` (truncated normal, std 0.02) drawn the same way
CONVNEXT_FAMILY = [
    ("unireplknet_t", dict(dims=(16, 32, 64, 64), depths=(1, 1, 2, 1), kernel_sizes=((3,), (13,), (7, 5), (9,)),
                           num_classes=10, layer_scale_init_value=0.25)),
    ("slak_t", dict(dims=(16, 32, 64, 64), depths=(1, 1, 2, 1), kernel_size=(13, 11, 9, 7, 3), width_factor=1.0,
                    num_classes=10, layer_scale_init_value=0.25)),
]


@pytest.mark.parametrize("name,kw", CONVNEXT_FAMILY, ids=["unireplknet", "slak"])
def test_convnext_family_draws_the_official_init_everywhere(name, kw, monkeypatch):
    """Built on the meta device and drawn once: conv / linear weights N(0, 0.02) (std within 3 %, the max where a
    normal's puts it), biases 0; layer scale, GRN, BN and LayerNorm at their constructor values; the head scaled
    by ``head_init_scale``; no tensor left uninitialized (fresh memory poisoned with NaN); the seed, not the
    thread count, decides the values."""
    from erf_lab.models import initialization

    real_empty = torch.empty
    monkeypatch.setattr(initialization.torch, "empty", lambda *a, **k: (
        lambda t: t.fill_(float("nan") if t.is_floating_point() else -7))(real_empty(*a, **k)))
    torch.manual_seed(0)
    model = create_model(name, head_init_scale=0.5, **kw)
    monkeypatch.undo()
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers())
            if (torch.isnan(t).any() if t.is_floating_point() else (t == -7).any())]
    assert not left
    drawn = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(drawn) > 10
    body = torch.cat([m.weight.detach().flatten() for m in drawn if m is not model.head])
    assert abs(body.std().item() / 0.02 - 1) < 0.03 and abs(body.mean().item()) < 1e-3
    assert 3.5 * 0.02 < body.abs().max().item() < 7 * 0.02  # a normal's max over ~1e5 draws, far inside +-2
    assert all(torch.all(m.bias == 0) for m in drawn if m.bias is not None and m is not model.head)
    assert abs(model.head.weight.std().item() / 0.01 - 1) < 0.15  # 0.5 x 0.02
    gammas = [m.gamma for m in model.modules() if type(m).__name__ in ("UniRepLKNetBlock", "SLaKBlock")]
    assert gammas and all(torch.all(g == 0.25) for g in gammas)
    for mod in model.modules():
        if type(mod).__name__ == "GRN":
            assert torch.all(mod.gamma == 0) and (mod.beta is None or torch.all(mod.beta == 0))
        elif isinstance(mod, nn.BatchNorm2d):
            assert torch.all(mod.weight == 1) and torch.all(mod.running_var == 1) and torch.all(mod.bias == 0)
        elif isinstance(mod, nn.LayerNorm):
            assert torch.all(mod.weight == 1) and torch.all(mod.bias == 0)
    monkeypatch.setattr(initialization, "PARALLEL_MIN_ELEMENTS", 1)  # every draw on the pool: 2 threads, then 1
    threads, built = torch.get_num_threads(), []
    try:
        for n in (2, 1):
            torch.set_num_threads(n)
            torch.manual_seed(0)
            built.append(create_model(name, head_init_scale=0.5, **kw).state_dict())
    finally:
        torch.set_num_threads(threads)
    first = model.state_dict()
    assert all(torch.equal(first[k], sd[k]) for sd in built for k in first)
    with torch.device("meta"):
        assert all(t.is_meta for t in create_model(name, **kw).parameters())


def test_trunc_normal_draw_truncates_where_the_bounds_are_near():
    """Bounds within 10 std are a real truncation (``trunc_normal_``), beyond them a plain normal draw."""
    wide = nn.Linear(1000, 1000)
    trunc_normal_conv_linear(wide, torch.Generator().manual_seed(0), std=1.0)
    w = wide.weight.detach()
    assert w.abs().max() <= 2.0 and w.abs().max() > 1.99 and torch.all(wide.bias == 0)
    assert abs(w.std().item() - 0.880) < 0.01  # the std of N(0, 1) truncated to [-2, 2]
    trunc_normal_conv_linear(wide, torch.Generator().manual_seed(0), std=0.02)
    assert abs(wide.weight.std().item() / 0.02 - 1) < 0.01

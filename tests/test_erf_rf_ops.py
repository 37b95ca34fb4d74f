"""The theoretical RF of ops beyond plain convolutions and poolings, against the true dependency region: the input
pixels that the gradient of the centre unit reaches (exact zeros elsewhere), on random float64 inputs."""
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from erf_lab.erf.receptive_field import list_layers, theoretical_rf
from erf_lab.errors import ErfLabError


class _Fn(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def _stem(out=4):
    return nn.Conv2d(3, out, 3, padding=1)


class _Unpool(nn.Module):
    """SegNet's decoder: max pooling with indices, then max unpooling."""

    def __init__(self):
        super().__init__()
        self.conv, self.pool, self.unpool = _stem(), nn.MaxPool2d(2, return_indices=True), nn.MaxUnpool2d(2)

    def forward(self, x):
        return self.unpool(*self.pool(self.conv(x)))


class _Shift(nn.Module):
    """A shift block (ShiftViT, AS-MLP): four channel groups rolled by one pixel up, down, left and right, then a
    1 x 1 conv: a 3 x 3 cross."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        g = self.a(x).chunk(4, 1)
        return self.b(torch.cat([torch.roll(g[0], 1, 2), torch.roll(g[1], -1, 2), torch.roll(g[2], 1, 3),
                                 torch.roll(g[3], -1, 3)], 1))


class _FoldBack(nn.Module):
    """F.unfold of 3 x 3 windows (padding 1, ``stride``), a mixing within each window (an involution's or local
    attention's weights), F.fold of the windows back onto the map (overlap-add)."""

    def __init__(self, stride):
        super().__init__()
        self.stride, self.mix = stride, nn.Conv1d(36, 36, 1)

    def forward(self, x):
        cols = self.mix(F.unfold(x, 3, padding=1, stride=self.stride))
        return F.fold(cols, x.shape[-2:], 3, padding=1, stride=self.stride)


class _CoordAtt(nn.Module):
    """Coordinate attention (Hou et al. 2021, MobileNet / EfficientNet variants): the map pooled along x and along y,
    the two strips concatenated and mixed, split, and the map scaled by both: every unit sees its whole row and
    column (v9: the stem's 3 px)."""

    def __init__(self):
        super().__init__()
        self.stem, self.mix = _stem(), nn.Conv2d(4, 4, 1)
        self.pool_h, self.pool_w = nn.AdaptiveAvgPool2d((None, 1)), nn.AdaptiveAvgPool2d((1, None))

    def forward(self, x):
        y = self.stem(x)
        h, w = y.shape[2:]
        strips = self.mix(torch.cat([self.pool_h(y), self.pool_w(y).permute(0, 1, 3, 2)], 2))
        a_h, a_w = strips.split([h, w], 2)
        return y * torch.sigmoid(a_h) * torch.sigmoid(a_w.permute(0, 1, 3, 2))


def _space_to_depth(x, block=2):
    """timm TResNet's SpaceToDepth: (N, C, H, W) -> (N, C block^2, H / block, W / block) by view and permute."""
    n, c, h, w = x.shape
    x = x.view(n, c, h // block, block, w // block, block).permute(0, 3, 5, 1, 2, 4).contiguous()
    return x.view(n, c * block * block, h // block, w // block)


def _focus(x):
    """YOLOv5's Focus: the four pixels of each 2 x 2 block, by strided slices, side by side in the channels."""
    return torch.cat([x[..., ::2, ::2], x[..., 1::2, ::2], x[..., ::2, 1::2], x[..., 1::2, 1::2]], 1)


def _support(net: nn.Module, size: int, draws: int = 4):
    """(centre unit (i, j), rows (first, last), columns (first, last)) of the input pixels that the gradient of the
    centre unit of ``net``'s output reaches on any of ``draws`` random float64 inputs (a max pooling passes one
    pixel per window on each)."""
    torch.manual_seed(0)
    net = net.double().eval()
    reached = None
    for _ in range(draws):
        x = torch.randn(1, 3, size, size, dtype=torch.float64, requires_grad=True)
        out = net(x)
        centre = (out.shape[2] // 2, out.shape[3] // 2)
        weights = torch.randn(out.shape[1], dtype=torch.float64)
        (g,) = torch.autograd.grad((out[0, :, centre[0], centre[1]] * weights).sum(), x)
        reached = (g != 0).any(1)[0] | (False if reached is None else reached)
    ys, xs = np.nonzero(reached.numpy())
    return centre, (int(ys.min()), int(ys.max())), (int(xs.min()), int(xs.max()))


def _reported(row: dict, centre, size: int):
    """The (rows, columns) that the listed RF, centre and stride give the unit ``centre``, cut at the image."""
    half = (row["theoretical_rf"] - 1) / 2
    mid = [row["rf_start"][a] + row["stride_hw"][a] * centre[a] for a in range(2)]
    return tuple((max(mid[a] - half, 0), min(mid[a] + half, size - 1)) for a in range(2))


class _PadNHWC(nn.Module):
    """A channels-last map (after a LayerNorm over C, ConvNeXt-style) padded by F.pad: its pairs run (C, x, y)."""

    def __init__(self):
        super().__init__()
        self.stem, self.norm, self.out = _stem(), nn.LayerNorm(4), nn.Conv2d(4, 4, 3)

    def forward(self, x):
        y = F.pad(self.norm(self.stem(x).permute(0, 2, 3, 1)), (0, 0, 2, 0, 1, 0))  # x: 2 before, y: 1 before
        return self.out(y.permute(0, 3, 1, 2))


GRID_CASES = {
    # (model, input size, expected (theoretical RF, rf_start, stride_hw) of its output)
    # a VGG head's AdaptiveAvgPool2d(7) on a 14 x 14 map: 2 x 2 bins of stride 2 (v9: not counted, RF 7, stride 2)
    "adaptive_avg_7_of_14": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1), nn.AdaptiveAvgPool2d(7),
                                                   nn.Conv2d(4, 4, 3, padding=1)), 28, (13, [1.0, 1.0], [4, 4])),
    # 7 -> 2: overlapping bins 0..3 and 3..6 (4 wide, stride 3)
    "adaptive_max_2_of_7": (lambda: nn.Sequential(_stem(), nn.AdaptiveMaxPool2d((2, 2)), nn.Conv2d(4, 4, 1)), 7,
                            (6, [1.5, 1.5], [3, 3])),
    # 8 -> 7: bins 2 wide of stride 1
    "adaptive_avg_7_of_8": (lambda: nn.Sequential(_stem(), nn.AdaptiveAvgPool2d(7), nn.Conv2d(4, 4, 3, padding=1)), 8,
                            (6, [0.5, 0.5], [1, 1])),
    # a stride-1 transposed conv of dilation 2, padding 0: the conv of padding 4 (v9 took dilation from
    # output_padding: 0, and kept the centre)
    "conv_transpose_dilated": (lambda: nn.Sequential(_stem(), nn.ConvTranspose2d(4, 4, 3, dilation=2),
                                                     nn.Conv2d(4, 4, 3, padding=1)), 17, (9, [-2.0, -2.0], [1, 1])),
    # im2col of 2 x 2 patches of stride 2, viewed as a map (a local-attention / involution layer's unfold)
    "F.unfold": (lambda: nn.Sequential(_stem(), _Fn(lambda x: F.unfold(x, 2, stride=2).view(
        x.shape[0], -1, x.shape[2] // 2, x.shape[3] // 2)), nn.Conv2d(16, 4, 1)), 16, (4, [0.5, 0.5], [2, 2])),
    # 3 x 3 windows, mixed within each, folded back (overlap-add): each pixel gathers the windows that cover it, 5 x 5
    # of the stem's map (v9: F.unfold and F.fold left out, RF 3)
    "F.fold": (lambda: nn.Sequential(_stem(), _FoldBack(1), nn.Conv2d(4, 4, 1)), 16, (7, [0.0, 0.0], [1, 1])),
    "Tensor.unfold": (lambda: nn.Sequential(_stem(), _Fn(lambda x: x.unfold(2, 3, 1).unfold(3, 3, 1).sum((-2, -1))),
                                            nn.Conv2d(4, 4, 1)), 16, (5, [1.0, 1.0], [1, 1])),
    "lp_pool": (lambda: nn.Sequential(_stem(), nn.LPPool2d(2, 3, 2), nn.Conv2d(4, 4, 3, padding=1)), 17,
                (9, [1.0, 1.0], [2, 2])),
    "pixel_unshuffle": (lambda: nn.Sequential(_stem(), nn.PixelUnshuffle(2), nn.Conv2d(16, 4, 3, padding=1)), 16,
                        (8, [0.5, 0.5], [2, 2])),
    # a space to depth by view and permute (timm TResNet's stem): a 2 x 2 kernel of stride 2 (v9: not seen, RF 5,
    # stride 1); YOLOv5's Focus (four strided slices, concatenated): the same, by the union of the four
    "space_to_depth_view": (lambda: nn.Sequential(_stem(3), _Fn(_space_to_depth), nn.Conv2d(12, 4, 3, padding=1)), 16,
                            (8, [0.5, 0.5], [2, 2])),
    "focus_slices": (lambda: nn.Sequential(_stem(3), _Fn(_focus), nn.Conv2d(12, 4, 3, padding=1)), 16,
                     (8, [0.5, 0.5], [2, 2])),
    # unit i of a map rolled by 3 is unit i - 3's (v9: the centre unchanged)
    "roll": (lambda: nn.Sequential(_stem(), _Fn(lambda x: torch.roll(x, (3, 3), (2, 3))),
                                   nn.Conv2d(4, 4, 3, padding=1)), 16, (5, [-3.0, -3.0], [1, 1])),
    "shift_block": (_Shift, 16, (3, [0.0, 0.0], [1, 1])),
    # U-Net's crop of a skip connection, a strided slice
    "crop": (lambda: nn.Sequential(_stem(), _Fn(lambda x: x[..., 2:, 2:]), nn.Conv2d(4, 4, 3, padding=1)), 16,
             (5, [2.0, 2.0], [1, 1])),
    "strided_slice": (lambda: nn.Sequential(_stem(), _Fn(lambda x: x[:, :, ::2, ::2]), nn.Conv2d(4, 4, 3, padding=1)),
                      16, (7, [0.0, 0.0], [2, 2])),
    # v12 read a channels-last map's pairs as NCHW's (the channels' as x, x's as y): start [-1, 1], 1 and 2 px off
    "pad_nhwc": (_PadNHWC, 16, (5, [0.0, -1.0], [1, 1])),
    "pad_nchw": (lambda: nn.Sequential(_stem(), _Fn(lambda x: F.pad(x, (2, 0, 1, 0))), nn.Conv2d(4, 4, 3)), 16,
                 (5, [0.0, -1.0], [1, 1])),
    "narrow": (lambda: nn.Sequential(_stem(), _Fn(lambda x: x.narrow(3, 3, 10).narrow(2, 1, 12)), nn.Conv2d(4, 4, 1)),
               16, (3, [1.0, 3.0], [1, 1])),
}


@pytest.mark.parametrize("case", list(GRID_CASES))
def test_the_theoretical_rf_of_an_op_is_where_the_centre_units_gradient_reaches(case):
    """Each op was left out (or misread) by the RF recursion, so every layer after it got a wrong RF or centre; now
    the listed RF, centre and stride give the centre unit exactly the pixels its gradient reaches."""
    make, size, expected = GRID_CASES[case]
    torch.manual_seed(0)
    row = list_layers(make(), size)[-1]
    centre, ys, xs = _support(make(), size)
    assert (row["theoretical_rf"], row["rf_start"], row["stride_hw"]) == expected
    assert _reported(row, centre, size) == (ys, xs)


NO_GRID_CASES = {
    # 8 -> 3: bins 0..2, 2..5, 5..7 of two widths (v9: RF 3)
    "adaptive_avg_3_of_8": (lambda: nn.Sequential(_stem(), nn.AdaptiveAvgPool2d(3), nn.Conv2d(4, 4, 1)), 8),
    "fractional_max_pool": (lambda: nn.Sequential(_stem(), nn.FractionalMaxPool2d(3, output_size=6),
                                                  nn.Conv2d(4, 4, 1)), 16),
    "max_unpool": (_Unpool, 16),  # v9: "only one element tensors can be converted to Python scalars"
    "flip": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), _Fn(lambda x: x.flip(-1)), nn.Conv2d(4, 4, 1)), 16),
    "gathered_rows": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), _Fn(lambda x: x[:, :, torch.arange(13, -1, -1)]),
                                            nn.Conv2d(4, 4, 1)), 16),  # the rows reversed by an index tensor
    "transpose": (lambda: nn.Sequential(nn.Conv2d(3, 4, (1, 3)), _Fn(lambda x: x.transpose(2, 3)),
                                        nn.Conv2d(4, 4, 1)), 16),
    "strided_fold": (lambda: nn.Sequential(_stem(), _FoldBack(2), nn.Conv2d(4, 4, 1)), 16),
    "permute_y_x": (lambda: nn.Sequential(nn.Conv2d(3, 4, (1, 3)), _Fn(lambda x: x.permute(0, 1, 3, 2)),
                                          nn.Conv2d(4, 4, 1)), 16),
    "coordinate_attention": (lambda: _CoordAtt(), 16),
    # the blocks' pixels made the map, the blocks the channels: each unit gathers a pixel of every block
    "blocks_to_depth": (lambda: nn.Sequential(_stem(3), _Fn(lambda x: x.view(1, 3, 4, 4, 4, 4).permute(0, 1, 2, 4, 3, 5)
                                                         .reshape(1, 48, 4, 4)), nn.Conv2d(48, 4, 1)), 16),
    "cat_along_width": (lambda: nn.Sequential(_stem(), _Fn(lambda x: torch.cat([x, x], 3)), nn.Conv2d(4, 4, 1)), 16),
}


@pytest.mark.parametrize("case", list(NO_GRID_CASES))
def test_after_an_op_that_leaves_no_grid_of_units_the_rf_is_none_not_a_wrong_one(case):
    """Bins of two widths, pseudo-random pooling regions, an unpooling, a flip, a gather of rows, a swap of y and x,
    two maps side by side, a map's blocks regrouped: the units lie on no grid of input pixels, and the kernels' RF
    and centre (v9's) missed the pixels the centre unit's gradient reaches. No theoretical RF (as after a
    resampling), said so."""
    make, size = NO_GRID_CASES[case]
    torch.manual_seed(0)
    row = list_layers(make(), size)[-1]
    assert (row["theoretical_rf"], row["rf_start"], row["rf_global"]) == (None, None, False)
    with pytest.raises(ErfLabError, match="no theoretical receptive field.*resampling"):
        theoretical_rf(make(), None, size)
    centre, ys, xs = _support(make(), size)
    assert (ys[1] - ys[0] + 1) * (xs[1] - xs[0] + 1) >= 3  # the unit does depend on a region of the input


def test_a_linear_over_a_flattened_map_makes_the_rf_global():
    """Flatten -> Linear -> Unflatten (an autoencoder's bottleneck) makes every unit depend on every pixel; v9 kept
    the stem's 3 px. A Linear over a pooled map (a classifier's head) or over the channels stays per unit."""
    def net(pool):
        return nn.Sequential(_stem(), nn.AdaptiveAvgPool2d(1) if pool else nn.Identity(), nn.Flatten(),
                             nn.Linear(4 if pool else 4 * 8 * 8, 4 * 8 * 8), nn.Unflatten(1, (4, 8, 8)),
                             nn.Conv2d(4, 4, 1))

    row = list_layers(net(False), 8)[-1]
    assert (row["theoretical_rf"], row["rf_global"], row["kernel_rf"]) == (None, True, 3)
    with pytest.raises(ErfLabError, match="global theoretical receptive field.*a Linear over the flattened map"):
        theoretical_rf(net(False), None, 8)
    _, ys, xs = _support(net(False), 8)
    assert ys == xs == (0, 7)
    pooled = list_layers(net(True), 8)[-1]  # global through the pooling already; the Linear adds nothing
    assert (pooled["rf_global"], pooled["rf_start"]) == (True, None)
    per_pixel = nn.Sequential(_stem(), _Fn(lambda x: x.permute(0, 2, 3, 1)), nn.Linear(4, 4),
                              _Fn(lambda x: x.permute(0, 3, 1, 2)), nn.Conv2d(4, 4, 1))
    assert (list_layers(per_pixel, 8)[-1]["theoretical_rf"], list_layers(per_pixel, 8)[-1]["rf_global"]) == (3, False)


def test_the_geometry_after_an_adaptive_pooling_is_probed_at_the_input_size(tmp_path, monkeypatch):
    """A 16 x 16 patchify stem, AdaptiveAvgPool2d(7) (a VGG / AlexNet head), a 3 x 3 conv. At 224 px the pooling
    takes 2 x 2 bins of the 14 x 14 map (RF 96 px, stride 32), at 112 px it is the identity (RF 48, stride 16), at
    the 64 px probe it upsamples 4 -> 7 (no grid): the geometry, probed at 64 px, must be taken at the input's own
    size. v9 gave RF 48 and stride 16 at every size."""
    from erf_lab.erf.runner import erf_centre, layer_geometry

    monkeypatch.setenv("ERF_LAB_CACHE", str(tmp_path / "cache"))  # measured here, not read from an earlier entry

    def net():
        return nn.Sequential(nn.Conv2d(3, 2, 16, stride=16), nn.AdaptiveAvgPool2d(7), nn.Conv2d(2, 2, 3, padding=1))

    geom = layer_geometry(net(), None, 224)
    assert (geom["theoretical_rf"], geom["stride"], geom["rf_start"], geom["feature_shape"]) == (
        96, 32, [15.5, 15.5], [2, 7, 7])
    centre, ys, xs = _support(net(), 224, draws=1)
    assert centre == (3, 3) and ys == xs == (15.5 + 32 * 3 - 47.5, 15.5 + 32 * 3 + 47.5)
    assert erf_centre(geom, 224, (7, 7)) == [112, 112]  # pixel 111.5, as any half-pixel centre
    small = layer_geometry(net(), None, 112)
    assert (small["theoretical_rf"], small["stride"], small["rf_start"]) == (48, 16, [7.5, 7.5])
    rows = {r["name"]: r for r in list_layers(net(), 224)}
    assert [rows[n]["size_dependent"] for n in ("0", "1", "2")] == [False, True, True]


class _Mixer(nn.Module):
    """A 4 x 4 patchify conv, one MLP-Mixer block (``tokens``: its token-mixing MLP over the token axis, as timm's
    ``mlp_tokens(norm(x).transpose(1, 2)).transpose(1, 2)``; its channel MLP over the channels), back to a map."""

    def __init__(self, tokens: bool, n: int = 16):
        super().__init__()
        self.tokens = tokens
        self.stem, self.norm = nn.Conv2d(3, 8, 4, stride=4), nn.LayerNorm(8)
        self.mlp_tokens = nn.Sequential(nn.Linear(n, 12), nn.GELU(), nn.Linear(12, n))
        self.mlp_channels = nn.Sequential(nn.Linear(8, 8), nn.GELU())

    def forward(self, x):
        y = self.stem(x)
        b, c, h, w = y.shape
        t = y.flatten(2).transpose(1, 2)  # (B, N, C)
        if self.tokens:
            t = t + self.mlp_tokens(self.norm(t).transpose(1, 2)).transpose(1, 2)
        t = t + self.mlp_channels(self.norm(t))
        return t.transpose(1, 2).reshape(b, c, h, w)


def test_an_mlp_mixers_token_mixing_makes_the_rf_global():
    """MLP-Mixer's token-mixing MLP (a Linear over the token axis) makes every token depend on every patch: v9 kept
    the patch's 4 px (a documented gap), while the centre unit's gradient reaches the image's corners. The channel
    MLP alone (a Linear over the channels of each token) keeps the patch's RF."""
    row = list_layers(_Mixer(tokens=True), 16)[-1]
    assert (row["theoretical_rf"], row["rf_global"], row["kernel_rf"], row["rf_start"]) == (None, True, 4, [1.5, 1.5])
    _, ys, xs = _support(_Mixer(tokens=True), 16)
    assert ys == xs == (0, 15)
    row = list_layers(_Mixer(tokens=False), 16)[-1]
    assert (row["theoretical_rf"], row["rf_global"], row["rf_start"]) == (4, False, [1.5, 1.5])
    centre, ys, xs = _support(_Mixer(tokens=False), 16)
    assert _reported(row, centre, 16) == (ys, xs) == ((8, 11), (8, 11))


class _Attention(nn.Module):
    """Two-head self-attention over the tokens of an NCHW map (timm's: softmax(q k^T) v per head, the heads joined,
    an output projection, a residual), over every token or within ``window`` x ``window`` windows (Swin's partition
    and reverse)."""

    def __init__(self, window: int | None = None, c: int = 4):
        super().__init__()
        self.window, self.qkv, self.proj = window, nn.Linear(c, 3 * c), nn.Linear(c, c)

    def forward(self, x):
        b, c, h, w = x.shape
        ws = self.window
        t = x.flatten(2).transpose(1, 2) if ws is None else \
            x.view(b, c, h // ws, ws, w // ws, ws).permute(0, 2, 4, 3, 5, 1).reshape(-1, ws * ws, c)
        q, k, v = self.qkv(t).reshape(t.shape[0], t.shape[1], 3, 2, c // 2).permute(2, 0, 3, 1, 4)
        o = self.proj(((q @ k.transpose(-2, -1)).softmax(-1) @ v).transpose(1, 2).reshape(t.shape))
        o = o.transpose(1, 2).reshape(b, c, h, w) if ws is None else \
            o.view(b, h // ws, w // ws, ws, ws, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, h, w)
        return x + o


class _SE(nn.Module):
    def __init__(self, c: int = 4):
        super().__init__()
        self.fc = nn.Conv2d(c, c, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.fc(x.mean((2, 3), keepdim=True)))


GLOBAL_UNTRACKED_CASES = {
    # (model, rf_start, stride_hw of its output): each unit depends on every pixel, while window attention or a
    # resampling leaves the kernels no RF
    "se_after_window_attention": (lambda: nn.Sequential(nn.Conv2d(3, 4, 2, 2), _Attention(2), _SE()), [0.5, 0.5],
                                  [2, 2]),  # a MaxViT block: the window attention after the MBConv's SE, or before
    "se_before_window_attention": (lambda: nn.Sequential(nn.Conv2d(3, 4, 2, 2), _SE(), _Attention(2)), [0.5, 0.5],
                                   [2, 2]),
    "global_after_window_attention": (lambda: nn.Sequential(nn.Conv2d(3, 4, 2, 2), _Attention(2), _Attention()),
                                      [0.5, 0.5], [2, 2]),  # ViTDet's / SAM's image encoder
    "window_after_global_attention": (lambda: nn.Sequential(nn.Conv2d(3, 4, 2, 2), _Attention(), _Attention(2)),
                                      [0.5, 0.5], [2, 2]),
    "upsampled_after_se": (lambda: nn.Sequential(nn.Conv2d(3, 4, 2, 2), _SE(), nn.Upsample(scale_factor=2)), None,
                           None),
}


@pytest.mark.parametrize("case", list(GLOBAL_UNTRACKED_CASES))
def test_a_global_rf_stays_global_after_window_attention_or_a_resampling(case):
    """Once every pixel reaches a unit, every unit after it is reached by all of them: v11 called the layers after
    window attention or a resampling 'no theoretical RF' (n/a, not global), so in a MaxViT the SE-global MBConv's
    RF shrank to n/a at the attention after it. Now global, with no kernels' RF to name; the tokens stay placed."""
    from erf_lab.erf.tables import global_rf_note, rf_text

    make, start, stride_hw = GLOBAL_UNTRACKED_CASES[case]
    torch.manual_seed(0)
    row = list_layers(make(), 16)[-1]
    assert (row["theoretical_rf"], row["rf_global"], row["kernel_rf"]) == (None, True, None)
    assert (row["rf_start"], row["stride_hw"]) == (start, stride_hw)
    assert rf_text(row) == "global"  # v11: n/a (and 'global (None)' where flagged)
    assert global_rf_note([("net", row)]).startswith("trf -: the theoretical RF is the whole image for net: every")
    with pytest.raises(ErfLabError, match=r"global theoretical receptive field: .*flattened map$"):
        theoretical_rf(make(), None, 16)
    _, ys, xs = _support(make(), 16)
    assert ys == xs == (0, 15)


def test_window_attention_alone_is_no_global_rf():
    """The per-head output of window attention, (windows, N, heads, d) reshaped to (windows, N, C), was read as a
    flattened (N, C, H, W) map, so its output projection (a Linear over C) counted as a Linear over the map's units:
    global, where a unit sees its window alone (the 2 x 2 tokens' 4 x 4 px). No theoretical RF, placed tokens."""
    net = nn.Sequential(nn.Conv2d(3, 4, 2, 2), _Attention(2))
    row = list_layers(net, 16)[-1]
    assert (row["theoretical_rf"], row["rf_global"], row["kernel_rf"]) == (None, False, None)
    assert (row["rf_start"], row["stride_hw"]) == ([0.5, 0.5], [2, 2])
    centre, ys, xs = _support(net, 16)
    assert centre == (4, 4) and ys == xs == (8, 11)

"""ERF engine: theory (Luo et al. 2016), re-parameterization / backend / batching invariance, layers, images."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from erf_lab.errors import ErfLabError
from erf_lab.erf.attribution import EffectiveReceptiveField, TruncatedForward
from erf_lab.erf.compute import compute_erf
from erf_lab.erf.images import PAPER_INPUT_SIZE, load_images, preprocess
from erf_lab.erf.receptive_field import list_layers, theoretical_rf
from erf_lab.models import create_model


def _uniform_stack(n, k, channels=1):
    convs = [nn.Conv2d(3 if i == 0 else channels, channels, k, padding=k // 2, bias=False) for i in range(n)]
    for c in convs:
        nn.init.constant_(c.weight, 1.0)
    return nn.Sequential(*convs)


def _axis_variance(erf):
    p = erf.sum(1) / erf.sum()
    i = np.arange(len(p))
    mu = (p * i).sum()
    return (p * (i - mu) ** 2).sum()


def _tiny_replknet(seed=0, **kw):
    torch.manual_seed(seed)
    m = create_model("replknet_31b", channels=(8, 8, 8, 8), layers=(1, 1, 1, 1), **kw)
    g = torch.Generator().manual_seed(seed)
    for mod in m.modules():  # non-trivial BN statistics so that fusing BN is really tested
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.copy_(torch.rand(mod.num_features, generator=g) * 0.4 - 0.2)
            mod.running_var.copy_(torch.rand(mod.num_features, generator=g) * 1.5 + 0.5)
            mod.weight.data.copy_(torch.rand(mod.num_features, generator=g) + 0.5)
            mod.bias.data.copy_(torch.rand(mod.num_features, generator=g) * 0.4 - 0.2)
    return m.eval()


@pytest.mark.parametrize("n,k", [(4, 5), (6, 3)])
def test_luo_theory_variance_of_uniform_linear_stack(n, k):
    """n uniform k x k linear convs: the ERF is the n-fold box convolution, per-axis variance n(k^2-1)/12."""
    x = torch.rand(2, 3, 81, 81) + 0.1  # positive input and weights: the centre output is > 0 (ReLU exact)
    res = compute_erf(_uniform_stack(n, k), x, show_progress=False)
    theory = n * (k * k - 1) / 12
    assert res.num_used == 2 and res.num_skipped == 0
    assert abs(_axis_variance(res.erf) - theory) / theory < 0.01
    assert abs(_axis_variance(res.erf.T) - theory) / theory < 0.01
    # the 1-D profile is exactly the n-fold convolution of a length-k box (times the 3 input channels)
    box = np.ones(k)
    prof = box
    for _ in range(n - 1):
        prof = np.convolve(prof, box)
    c = 40
    half = len(prof) // 2
    np.testing.assert_allclose(res.erf[c, c - half:c + half + 1], 3 * prof[half] * prof, rtol=1e-6)


def test_single_conv_has_exact_k_by_k_support():
    k = 7
    res = compute_erf(_uniform_stack(1, k), torch.rand(1, 3, 33, 33) + 0.1, show_progress=False)
    ys, xs = np.nonzero(res.erf)
    assert (ys.max() - ys.min() + 1, xs.max() - xs.min() + 1) == (k, k)
    assert (ys.min(), xs.min()) == (16 - k // 2, 16 - k // 2)
    assert np.allclose(res.erf[res.erf > 0], 3.0)  # d(sum of 3*k*k inputs)/dx = 1 per channel, summed over RGB


def test_images_of_different_sizes_are_one_clear_error():
    """The mean map needs one size: images of another size in one batch ended in torch.stack's RuntimeError, in a
    later batch in numpy's broadcast ValueError, and after a resumed state of another size the same."""
    from erf_lab.erf.compute import Accumulator

    m = _uniform_stack(1, 3)
    small, large = torch.rand(1, 3, 16, 16), torch.rand(1, 3, 20, 20)
    for batch_size in (1, 2):
        with pytest.raises(ErfLabError, match="image 1 is 20 x 20 px where the images before it are 16 x 16"):
            compute_erf(m, [small, large], batch_size=batch_size, show_progress=False)
    state = Accumulator(sum=np.zeros((16, 16)), count=1, processed=["old"])
    with pytest.raises(ErfLabError, match="image 0 is 20 x 20 px where the images before it are 16 x 16"):
        compute_erf(m, [large], state=state, show_progress=False)
    assert compute_erf(m, [small, small], batch_size=2, show_progress=False).erf.shape == (16, 16)


def test_abs_aggregate_differs_from_relu_on_signed_weights():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 5, padding=2), nn.ReLU(), nn.Conv2d(4, 4, 5, padding=2))
    x = torch.randn(2, 3, 32, 32)
    r = compute_erf(m, x, aggregate="relu", show_progress=False).erf
    a = compute_erf(m, x, aggregate="abs", show_progress=False).erf
    assert (a >= r - 1e-12).all() and a.sum() > r.sum() * 1.01


def test_reparameterized_equals_train_time_replknet():
    m = _tiny_replknet()
    x = torch.randn(2, 3, 64, 64)
    train = compute_erf(m, x, reparameterize=False, channels_last=False, conv_backend="native", show_progress=False)
    fast = compute_erf(m, x, reparameterize=True, channels_last=True, conv_backend="fastconv", show_progress=False)
    assert train.erf.sum() > 0
    rel = np.abs(train.erf - fast.erf).max() / np.abs(train.erf).max()
    assert rel < 1e-4, rel
    assert fast.info["reparameterized"] and fast.info["fastconv_modules"] >= 4
    assert any(n.endswith("small_conv") for n, _ in m.named_modules())  # the caller's model is untouched


def test_fastconv_and_native_backends_give_same_erf(backend_spy):
    from fastconv import cpu_kernels

    ran = backend_spy
    m = _tiny_replknet(1)
    x = torch.randn(2, 3, 64, 64)
    a = compute_erf(m, x, conv_backend="fastconv", show_progress=False)
    ran_fast, ran[:] = list(ran), []
    b = compute_erf(m, x, conv_backend="native", show_progress=False)
    assert a.info["fastconv_modules"] == 4 and b.info["fastconv_modules"] == 0
    assert set(ran) == {"native"}  # --conv-backend native: every depthwise conv through F.conv2d
    assert np.abs(a.erf - b.erf).max() / np.abs(a.erf).max() < 1e-5
    # kernels 31/29/27/13: the C++ kernel from K=9 when it is built and multi-threaded, for float32 only
    if cpu_kernels.cpp_multithreaded():
        assert set(ran_fast) == {"cpp"}
    ran[:] = []
    d = compute_erf(m.double(), x.double(), show_progress=False)  # a float64 reference run takes oneDNN
    assert set(ran) == {"native"}
    assert np.abs(d.erf - b.erf).max() / np.abs(d.erf).max() < 1e-4


def test_foreign_model_depthwise_convs_run_through_fastconv():
    """A plain nn.Conv2d depthwise 9x9 of a user's model is converted on the measured copy only."""
    from fastconv import DepthwiseConv2d
    from erf_lab.erf.prepare import prepare_model

    conv = nn.Conv2d(3, 3, 9, padding=4, groups=3)
    m = nn.Sequential(conv, nn.Conv2d(3, 3, 3, padding=1, groups=3))
    prepared, info = prepare_model(m)
    assert type(prepared[0]) is DepthwiseConv2d and type(prepared[1]) is nn.Conv2d and info["modules_converted"] == 1
    assert type(m[0]) is nn.Conv2d  # the caller's model is untouched
    x = torch.randn(2, 3, 20, 20)
    np.testing.assert_allclose(compute_erf(m, x, show_progress=False).erf,
                               compute_erf(m, x, conv_backend="native", show_progress=False).erf, rtol=1e-5)


def test_attribution_object_returns_one_map_per_image():
    """captum-style: ``attribute`` gives (B, H, W); for a linear 5x5 box filter the map is the box itself."""
    conv = nn.Conv2d(3, 1, 5, padding=2, bias=False)
    nn.init.constant_(conv.weight, 1.0)
    x = torch.rand(3, 3, 21, 21) + 0.1
    maps = EffectiveReceptiveField(nn.Sequential(conv), aggregate="abs").attribute(x)
    assert maps.shape == (3, 21, 21)
    expected = torch.zeros(21, 21)
    expected[8:13, 8:13] = 3.0  # 5x5 support, 1 per RGB channel
    assert torch.equal(maps[0], expected) and torch.equal(maps[2], expected)


@pytest.mark.parametrize("layer", [None, "stages.1", "stages.1.blocks.0"])  # forward_features, feature_info, hook
def test_attribute_inside_inference_mode_and_on_inference_tensors(layer):
    """A notebook cell under ``torch.inference_mode()`` (or images made there) failed with torch's "element 0 of
    tensors does not require grad" / "Setting requires_grad=True on inference tensor": the maps are the same as
    outside it, as they already were under ``torch.no_grad()``."""
    from erf_lab.models import create_model

    torch.manual_seed(0)
    m = create_model("replknet_31b", channels=(8, 8, 8, 8), layers=(1, 1, 1, 1), large_kernel_sizes=(7, 7, 5, 5),
                     num_classes=0).eval()
    x = torch.randn(2, 3, 40, 48)
    erf = EffectiveReceptiveField(m, layer=layer)
    ref = erf.attribute(x)
    assert ref.shape == (2, 40, 48) and ref.sum() > 0
    with torch.inference_mode():
        inside = erf.attribute(x)
        made_there = x.clone()
    assert made_there.is_inference()
    assert torch.equal(inside, ref) and torch.equal(erf.attribute(made_there), ref)
    with torch.no_grad():
        assert torch.equal(erf.attribute(x), ref)


def test_attribute_refuses_what_is_not_a_batch_in_one_line():
    """One image (C, H, W) reached the model unbatched: BatchNorm's "expected 4D input" ValueError, or, through a
    bare conv, an ErfLabError blaming the layer's output; a numpy array an AttributeError. Now one ErfLabError."""
    from erf_lab.models import create_model

    m = create_model("replknet_31b", channels=(8, 8, 8, 8), layers=(1, 1, 1, 1), large_kernel_sizes=(7, 7, 5, 5),
                     num_classes=0).eval()
    conv = nn.Sequential(nn.Conv2d(3, 2, 3, padding=1))
    for model in (m, conv):
        erf = EffectiveReceptiveField(model)
        for bad in (torch.rand(3, 32, 32), torch.rand(1, 1, 3, 32, 32), np.random.rand(1, 3, 32, 32)):
            with pytest.raises(ErfLabError, match=r"inputs must be a \(B, C, H, W\) batch"):
                erf.attribute(bad)
        assert erf.attribute(torch.rand(1, 3, 32, 32)).shape == (1, 32, 32)


def test_compute_erf_takes_a_dataloaders_image_label_batches():
    """A DataLoader over a (images, labels) dataset, the everyday notebook input, yields [x, y] lists (and
    TensorDataset(x) yields [x]): compute_erf failed with "'list' object has no attribute 'dim'"; the images are
    used, and anything else is one ErfLabError."""
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 5, padding=2), nn.ReLU(), nn.Conv2d(4, 4, 5, padding=2))
    x, y = torch.rand(5, 3, 24, 24), torch.arange(5)
    ref = compute_erf(m, x, show_progress=False)
    for loader in (DataLoader(TensorDataset(x, y), batch_size=2), DataLoader(TensorDataset(x), batch_size=3)):
        got = compute_erf(m, loader, show_progress=False)
        assert got.num_used == 5 and got.processed == ref.processed
        np.testing.assert_array_equal(got.erf, ref.erf)
    with pytest.raises(ErfLabError, match="each item must be"):
        compute_erf(m, [np.zeros((3, 24, 24))], show_progress=False)


def test_a_wrapped_or_featureless_model_is_told_why_its_output_is_no_map():
    """nn.DataParallel(model) has no forward_features, so the default layer was its logits: the error named
    'forward_features' as if it had run. It now says the wrapper hides the model (or that forward() was taken)."""
    from erf_lab.models import create_model

    m = create_model("replknet_31b", channels=(8, 8, 8, 8), layers=(1, 1, 1, 1), large_kernel_sizes=(7, 7, 5, 5),
                     num_classes=5).eval()
    x = torch.rand(1, 3, 32, 32)
    with pytest.raises(ErfLabError, match=r"DataParallel wraps the model: pass model\.module"):
        EffectiveReceptiveField(nn.DataParallel(m)).attribute(x)
    with pytest.raises(ErfLabError, match="no forward_features, so its forward"):
        EffectiveReceptiveField(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten())).attribute(x)
    assert EffectiveReceptiveField(nn.DataParallel(m).module).attribute(x).shape == (1, 32, 32)


def test_feature_info_layer_stops_through_forward_intermediates(monkeypatch):
    """A RepLKNet stage named in ``feature_info`` is reached by ``forward_intermediates(stop_early=True)`` (no
    hook exception); the result equals the hook path on a model without that interface."""
    import erf_lab.erf.attribution as attribution

    m = _tiny_replknet(3)
    x = torch.randn(2, 3, 64, 64)
    if attribution.intermediate_index(m, "stages.1") is None:
        pytest.fail("RepLKNet must expose feature_info / forward_intermediates with stages.1")
    calls = []
    real = type(m).forward_intermediates
    monkeypatch.setattr(type(m), "forward_intermediates", lambda self, *a, **k: calls.append(k) or real(self, *a, **k))
    via_intermediates = compute_erf(m, x, layer="stages.1", show_progress=False).erf
    assert calls and calls[0]["stop_early"] is True
    monkeypatch.setattr(attribution, "intermediate_index", lambda model, name: None)
    via_hook = compute_erf(m, x, layer="stages.1", show_progress=False).erf
    np.testing.assert_array_equal(via_intermediates, via_hook)


def test_batch_size_and_order_do_not_change_result():
    m = _tiny_replknet(2)
    x = torch.randn(5, 3, 64, 64)
    one = compute_erf(m, x, batch_size=1, show_progress=False).erf
    three = compute_erf(m, x, batch_size=3, show_progress=False).erf
    rev = compute_erf(m, x.flip(0), batch_size=2, show_progress=False).erf
    scale = np.abs(one).max()
    assert np.abs(one - three).max() / scale < 1e-5
    assert np.abs(one - rev).max() / scale < 1e-5


def test_image_order_and_torchrun_shards_change_the_mean_by_float64_rounding_only():
    """The README's promise: the mean is a float64 sum of float32 maps, so reversing the images or splitting them
    as torchrun's ranks do (``shard``, partial sums added as the all-reduce adds them) changes it by float64
    rounding at most (one image per pass; a float32 sum would move it by ~1e-7)."""
    from erf_lab.erf.compute import Accumulator
    from erf_lab.erf.distributed import DistInfo, shard

    m = _tiny_replknet(3)
    x = torch.rand(9, 3, 48, 48, generator=torch.Generator().manual_seed(3))
    items = [(str(i), x[i]) for i in range(len(x))]
    one = compute_erf(m, items, batch_size=1, show_progress=False).erf
    rev = compute_erf(m, items[::-1], batch_size=1, show_progress=False).erf
    assert np.abs(rev - one).max() <= 1e-15 * one.max()
    for world in (2, 3):
        accs = [Accumulator() for _ in range(world)]
        for r, acc in enumerate(accs):
            compute_erf(m, shard(items, DistInfo(rank=r, world_size=world)), batch_size=1, state=acc,
                        show_progress=False)
        merged = sum(a.sum for a in accs) / sum(a.count for a in accs)
        assert sum(a.count for a in accs) == 9 and np.abs(merged - one).max() <= 1e-15 * one.max()


def test_erf_is_mean_of_per_image_maps():
    x = torch.randn(3, 3, 17, 17)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 2, 3, padding=1), nn.ReLU(), nn.Conv2d(2, 2, 3, padding=1))
    maps = [compute_erf(net, x[i:i + 1], show_progress=False).erf for i in range(3)]
    assert not np.allclose(maps[0], maps[1])  # input-dependent maps (ReLU net)
    assert np.allclose(compute_erf(net, x, batch_size=2, show_progress=False).erf, np.mean(maps, 0), atol=1e-12)


class _NaNOnBright(nn.Module):
    def forward(self, x):
        bright = (x.mean(dim=(1, 2, 3), keepdim=True) > 0.5).float()
        return x * torch.where(bright > 0, torch.tensor(float("nan")), torch.tensor(1.0))


def test_non_finite_maps_are_skipped_and_counted():
    net = nn.Sequential(_NaNOnBright(), nn.Conv2d(3, 2, 3, padding=1), nn.Conv2d(2, 2, 3, padding=1))
    x = torch.rand(4, 3, 16, 16) * 0.2
    x[2] += 1.0
    res = compute_erf(net, x, batch_size=2, show_progress=False)
    assert (res.num_used, res.num_skipped) == (3, 1)
    assert res.skipped[0][0] == "2" and "NaN" in res.skipped[0][1]
    assert np.isfinite(res.erf).all()


class _Boom(nn.Module):
    def forward(self, x):
        raise AssertionError("the forward must stop at the chosen layer")


def test_named_layer_truncates_forward_and_matches_prefix_model():
    torch.manual_seed(0)
    head = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 5, padding=2))
    full = nn.Sequential(*head, _Boom())
    x = torch.randn(2, 3, 24, 24)
    res = compute_erf(full, x, layer="2", show_progress=False)
    ref = compute_erf(head, x, show_progress=False)
    assert res.layer == "2"
    np.testing.assert_allclose(res.erf, ref.erf, rtol=1e-6, atol=1e-12)
    out = TruncatedForward(full, full[2], "2")(x)
    assert out.shape == (2, 4, 24, 24)


def test_unknown_layer_lists_close_names():
    m = _tiny_replknet()
    with pytest.raises(ErfLabError, match=r"unknown layer 'stages\.3\.blockz'.*stages\.3\.blocks"):
        compute_erf(m, torch.randn(1, 3, 64, 64), layer="stages.3.blockz", show_progress=False)


def test_theoretical_rf_formula_strides_dilation_pool_and_parallel_max():
    m = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.Conv2d(4, 4, 3, padding=2, dilation=2),
                      nn.MaxPool2d(2), nn.Conv2d(4, 4, 5, padding=2))
    # rf: 1 -> 3 (j=2) -> 3 + 2*2*2 = 11 -> 11 + 1*2 = 13 (j=4) -> 13 + 4*4 = 29
    assert theoretical_rf(m) == 29
    assert [r["theoretical_rf"] for r in list_layers(m, 32)] == [3, 11, 13, 29, 29]

    class Par(nn.Module):
        def __init__(self):
            super().__init__()
            self.big, self.small = nn.Conv2d(3, 3, 13, padding=6), nn.Conv2d(3, 3, 5, padding=2)

        def forward_features(self, x):
            return self.big(x) + self.small(x) + x

    assert theoretical_rf(Par()) == 13  # parallel branches: max, not sum


def test_replknet_31b_theoretical_rf_matches_hand_count():
    m = _tiny_replknet()
    # stem 3/2, dw3, 1x1, dw3/2 -> 11 (j 4); stage kernels 31, 29, 27, 13 with 3x3/2 transitions
    rf, j = 11, 4
    for i, k in enumerate((31, 29, 27, 13)):
        rf += (k - 1) * j
        if i < 3:
            rf += 2 * j
            j *= 2
    assert theoretical_rf(m) == rf == 1211


def test_builtin_default_images_are_licensed_and_load():
    src = load_images(None, input_size=32)
    assert 6 <= len(src) <= 12 and src.name == "default" and not src.skipped
    lic = (src.root / "LICENSE.md").read_text()
    for i in src.ids:
        assert i in lic
    x = src.load(src.files[0])
    assert x.shape == (3, 32, 32) and abs(float(x.mean())) < 3
    assert PAPER_INPUT_SIZE == 1024
    assert len(load_images(None, num_images=2, input_size=32)) == 2


def test_image_folder_recursive_with_bad_files(tmp_path):
    from PIL import Image

    (tmp_path / "a" / "b").mkdir(parents=True)
    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "a" / "b" / "red.png")
    Image.new("L", (20, 20), 128).save(tmp_path / "gray.jpg")
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.warns(UserWarning, match="unreadable"):
        src = load_images(tmp_path, input_size=16)
    assert src.ids == ["a/b/red.png", "gray.jpg"]
    assert {s[0] for s in src.skipped} == {"broken.jpg", "notes.txt"}
    red = src.load(src.files[0])
    ref = preprocess(Image.new("RGB", (16, 16), (200, 10, 10)), 16)
    assert torch.allclose(red, ref, atol=1e-5) and red[0].mean() > 1.0 > red[1].mean()


def test_a_linked_sub_folder_is_followed_and_a_link_loop_is_not(tmp_path):
    """A symlinked sub-folder of an image folder was left out without a word, where torchvision's ImageFolder follows
    it. Now it is followed (one leaving the folder too, as links to files are); a link to the folder holding it
    (itself, one above it, or back from a linked folder) is a loop: not followed, skipped with why."""
    from PIL import Image

    from erf_lab.erf.images import LINK_LOOP, list_image_files

    elsewhere, imgs = tmp_path / "elsewhere", tmp_path / "imgs"
    elsewhere.mkdir()
    (imgs / "cat").mkdir(parents=True)
    Image.new("RGB", (40, 30), (200, 10, 10)).save(elsewhere / "red.png")
    Image.new("L", (20, 20), 128).save(imgs / "cat" / "gray.jpg")
    (imgs / "cat" / "more").symlink_to(elsewhere)
    (imgs / "cat" / "self").symlink_to(imgs / "cat")
    (imgs / "up").symlink_to(tmp_path)  # holds imgs: walking it would list imgs again
    (elsewhere / "back").symlink_to(imgs)
    images, others = list_image_files(imgs)
    assert [p.relative_to(imgs).as_posix() for p in images] == ["cat/gray.jpg", "cat/more/red.png"]
    assert sorted(p.relative_to(imgs).as_posix() for p in others) == ["cat/more/back", "cat/self", "up"]
    with pytest.warns(UserWarning, match="ignored 3 non-image file"):
        src = load_images(imgs, input_size=16)
    assert src.ids == ["cat/gray.jpg", "cat/more/red.png"]
    assert sorted(src.skipped) == [("cat/more/back", LINK_LOOP), ("cat/self", LINK_LOOP), ("up", LINK_LOOP)]
    red = src.load(src.files[1])
    assert torch.allclose(red, preprocess(Image.new("RGB", (16, 16), (200, 10, 10)), 16), atol=1e-5)


def _cut_jpeg(path, keep=3000):
    """A JPEG cut short (an interrupted download): its header passes PIL's verify(), its data does not decode."""
    from erf_lab.erf.images import default_images_dir

    path.write_bytes((default_images_dir() / "astronaut.jpg").read_bytes()[:keep])
    return path


def test_a_cut_jpeg_is_skipped_while_choosing_and_the_next_image_takes_its_place(tmp_path):
    """User test: a truncated JPEG passed verify(), took the only --num-images place and failed when measured
    ("no usable image: 1 skipped"); now it is skipped while the images are chosen, counted once, and the next
    readable image is used."""
    from PIL import Image

    _cut_jpeg(tmp_path / "a_trunc.jpg")
    (tmp_path / "notes.txt").write_text("not an image")
    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "b_good.png")
    with pytest.warns(UserWarning) as rec:
        src = load_images(tmp_path, num_images=1, input_size=16)
    assert src.ids == ["b_good.png"]
    assert [s[0] for s in src.skipped] == ["notes.txt", "a_trunc.jpg"]
    assert src.skipped[1][1].startswith("OSError: image file is truncated")
    assert sorted(str(w.message).split(" in ")[0] for w in rec) == [
        "ignored 1 non-image file(s)", "skipped 1 unreadable image file(s)"]  # 1 + 1 = the 2 skipped


def test_no_readable_image_error_counts_every_skipped_file(tmp_path, capsys):
    """A folder of one non-image file and one cut JPEG: one error line, exit 2, both files counted (was: a warning,
    then 'no usable image: 1 skipped')."""
    from erf_lab.cli.main import main

    imgs = tmp_path / "imgs"  # the --out beside it: one inside the image folder is refused
    imgs.mkdir()
    _cut_jpeg(imgs / "trunc.jpg")
    (imgs / "notes.txt").write_text("not an image")
    code = main(["compute", "--model", "replknet_31b", "--override", "channels=(8,8,8,8)", "--override",
                 "layers=(1,1,1,1)", "--input-size", "32", "--images", str(imgs), "--num-images", "1",
                 "--out", str(tmp_path / "run"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert (f"no readable images found in {imgs}: 2 skipped: 1 unreadable image(s), 1 non-image file(s) "
            "(trunc.jpg: OSError: image file is truncated") in err
    assert "notes.txt: not an image file (extension))" in err


def test_no_usable_image_counts_the_files_skipped_while_choosing(tmp_path):
    """The images chosen fail only when measured (here: rewritten in between): the error counts them together with
    the files already skipped while choosing, as run.json's "skipped" does (was: only the measured ones)."""
    from PIL import Image

    (tmp_path / "fake.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (tmp_path / "notes.txt").write_text("not an image")
    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "good.png")
    with pytest.warns(UserWarning):
        src = load_images(tmp_path, input_size=32)
    assert src.ids == ["good.png"] and len(src.skipped) == 2
    (tmp_path / "good.png").write_bytes((tmp_path / "good.png").read_bytes()[:60])
    with pytest.raises(ErfLabError) as e:
        compute_erf(_tiny_replknet(), src, show_progress=False)
    assert str(e.value).startswith("no usable image: 3 skipped: 2 unreadable image(s), 1 non-image file(s) "
                                   "(good.png: unreadable: OSError; fake.jpg: "), str(e.value)
    assert str(e.value).endswith("; notes.txt: not an image file (extension))")


def test_a_broken_link_is_counted_once(tmp_path):
    """A dangling link under an image's name is one ignored non-image file, not also an unreadable image."""
    import os
    import warnings

    from PIL import Image

    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "a.png")
    os.symlink(tmp_path / "gone.png", tmp_path / "dangling.png")
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        src = load_images(tmp_path, input_size=16)
    assert [str(w.message).split(" in ")[0] for w in rec] == ["ignored 1 non-image file(s)"]
    assert [list(s) for s in src.skipped] == [["dangling.png", "a broken link"]]


def test_image_folder_errors(tmp_path):
    with pytest.raises(ErfLabError, match="not found"):
        load_images(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ErfLabError, match="no image files"):
        load_images(tmp_path / "empty")


def test_branch_removed_by_reparam_needs_no_reparam():
    m = _tiny_replknet()
    x = torch.randn(1, 3, 32, 32)
    name = "stages.0.blocks.0.large_kernel.small_conv"
    with pytest.raises(ErfLabError, match="--no-reparam"):
        compute_erf(m, x, layer=name, show_progress=False)
    res = compute_erf(m, x, layer=name, reparameterize=False, show_progress=False)
    ys, xs = np.nonzero(res.erf)  # theory: small 5x5 branch after the stem's 11 px RF at stride 4 -> 27 px
    assert ys.max() - ys.min() + 1 <= theoretical_rf(m, name) == 27
    with pytest.raises(ErfLabError, match="folded into 'stages.0.blocks.0.large_kernel'"):
        compute_erf(m, x, layer=name, show_progress=False, inplace=True)  # the CLI's path
    m = _tiny_replknet()
    deploy_only = "stages.0.blocks.0.large_kernel.lkb_reparam"  # measured where the deploy form is
    assert compute_erf(m, x, layer=deploy_only, show_progress=False).erf.shape == (32, 32)
    with pytest.raises(ErfLabError, match=f"unknown layer '{deploy_only}'"):
        compute_erf(m, x, layer=deploy_only, reparameterize=False, show_progress=False)


def test_list_layers_restores_training_mode_and_bn_statistics():
    m = _tiny_replknet().train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    rows = list_layers(m, 32)
    assert m.training and all(mod.training for mod in m.modules())
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert rows[-1]["name"] == "forward_features" and rows[-1]["stride"] == 32



def test_list_layers_leaves_no_hook_behind_when_the_model_fails_before_its_forward():
    """A module whose ``train()`` raises (the listing puts the model in eval mode before its forward): the error
    comes out, and no forward hook of the listing or of its layout tags stays on the model (it would tag every
    later forward and keep the blocks from running in place)."""
    class Refuses(nn.Module):
        def train(self, mode=True):
            if not mode:
                raise RuntimeError("this model stays in training mode")
            return super().train(mode)

    m = _tiny_replknet().train()
    m.stem.append(Refuses())
    with pytest.raises(RuntimeError, match="stays in training mode"):
        list_layers(m, 32)
    assert not any(mod._forward_hooks or mod._forward_pre_hooks for mod in m.modules())
    assert all(mod.training for mod in m.modules())

def test_full_fp32_switches_tf32_off_on_cuda_only_and_restores():
    from erf_lab.erf.prepare import full_fp32

    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    try:
        with full_fp32(torch.device("cuda")):  # flags only: no CUDA device needed
            assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
        with full_fp32(torch.device("cuda"), allow_tf32=True), full_fp32(torch.device("cpu")):
            assert torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before
    res = compute_erf(_tiny_replknet(2), torch.randn(1, 3, 64, 64), show_progress=False)
    assert res.info["tf32"] is None  # CPU run: not applicable


def test_keep_freed_memory_cuts_the_page_faults_of_large_tensors():
    """compute_erf tells glibc to keep freed memory in its heap instead of handing every tensor over 32 MB fresh,
    zero-filled pages (1.3-1.5x faster at 1024 px). In child processes: the setting takes and is idempotent, and
    40 rounds of allocate-fill-free of a 64 MB tensor fault in 16384 pages every round by default but far fewer
    once the heap has settled (its first 6-11 rounds still grow the heap, depending on where small allocations land,
    so the last 20 rounds are compared); ERF_LAB_KEEP_FREED_MEMORY=0 turns it off."""
    import os
    import subprocess
    import sys

    code = ("import resource, torch\nfrom erf_lab.erf.prepare import keep_freed_memory\n"
            "torch.set_num_threads(1)\nok = keep_freed_memory(); assert keep_freed_memory() == ok\n"
            "faults = []\n"
            "for _ in range(40):\n    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
            "    a = torch.empty(16 << 20); a.fill_(1.0); del a\n"
            "    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n"
            "print(ok, *faults)\n")

    def run(env):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={**os.environ, **env}).stdout.split()
        return out[0] == "True", [int(n) for n in out[1:]]

    kept_ok, kept = run({})
    off_ok, default = run({"ERF_LAB_KEEP_FREED_MEMORY": "0"})
    assert not off_ok and len(kept) == len(default) == 40
    try:
        glibc = sys.platform.startswith("linux") and os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
    except (ValueError, OSError, AttributeError):
        glibc = False
    assert kept_ok == glibc  # the setting exists only in glibc's malloc
    if glibc:
        assert sorted(default)[len(default) // 2] >= 16000, default  # fresh pages every round
        assert sum(kept[20:]) < sum(default[20:]) / 4, (kept, default)


@pytest.mark.parametrize("stack,size,expected", [
    # RepLKNet-style "same" padding, three stride-2 stages: a 7 x 7 map at 56 px, unit 3 centred at 8 * 3 = 24
    ([(3, 2, 1), (3, 2, 1), (3, 2, 1)], 56, 24.0),
    # a 4 x 4 stride-4 patchify stem and a 2 x 2 stride-2 downsampling (ConvNeXt / SLaK): 3.5 + 8 * 3 = 27.5
    ([(4, 4, 0), (2, 2, 0)], 48, 27.5),
    # "valid" 5 x 5 then a stride-2 3 x 3: unit 0 at 2 + 1 = 3, jump 2; map (44 - 3) // 2 + 1 = 21, unit 10: 23
    ([(5, 1, 0), (3, 2, 0)], 48, 23.0),
    # the patchify stack at 44 px (not a multiple of its stride): map 11 -> 5 (not ceil(44 / 8) = 6), unit 2: 19.5
    ([(4, 4, 0), (2, 2, 0)], 44, 19.5),
])
def test_rf_centre_is_where_the_gradient_of_the_centre_unit_lies(stack, size, expected):
    """The metrics centre on the measured unit's receptive-field centre (``rf_start + jump * (h // 2)``): a stack
    of uniform, linear convs has a gradient map symmetric about it (Luo et al. 2016), so its centre of mass is
    exactly there, and not the map's middle wherever the feature map's side is odd or the stem patchifies."""
    import torch.nn as nn

    from erf_lab.erf.metrics import compute_metrics, distribution_stats, target_centre
    from erf_lab.erf.receptive_field import list_layers

    layers = []
    for k, s, p in stack:
        conv = nn.Conv2d(1 if layers else 3, 1, k, stride=s, padding=p, bias=False)
        nn.init.constant_(conv.weight, 1.0)
        layers.append(conv)
    net = nn.Sequential(*layers)
    row = list_layers(net, size)[-1]
    stride, h = row["stride"], row["shape"][-1]
    assert row["rf_start"][0] == row["rf_start"][1] and row["rf_start"][0] + stride * (h // 2) == expected
    x = torch.zeros(1, 3, size, size, requires_grad=True)
    y = net(x)
    y[0, 0, h // 2, h // 2].backward()
    erf = x.grad[0].sum(0).numpy()
    assert distribution_stats(erf)["center_of_mass"] == pytest.approx([expected, expected], abs=1e-9)
    centre = target_centre(row["rf_start"], stride, size, feature_hw=(h, h))  # the measured map's own size
    assert centre == [math.floor(expected + 0.5)] * 2
    m = compute_metrics(erf, centre=centre, gaussian=False)
    assert m["center"] == centre and ("centre_off_map_middle" in m["flags"]) == (centre[0] != size // 2)
    # the disks about the true centre hold more of the map than the ones about the map's middle
    off = compute_metrics(erf, gaussian=False)["mass_within_radius"]
    assert m["mass_within_radius"]["5"] > off["5"]


def test_rf_centre_off_the_image_falls_back_to_the_map_middle():
    """SLaK's patchify geometry (unit 0 at 15.5, stride 32) at 40 px: its one unit sits at 15.5, inside; a map
    side taken as ceil(40 / 32) = 2 would put unit 1 at 47.5, outside the image: no centre (the map's middle)."""
    from erf_lab.erf.metrics import target_centre

    assert target_centre([15.5, 15.5], 32, 40, feature_hw=(1, 1)) == [16, 16]
    assert target_centre([15.5, 15.5], 32, 40) is None


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
def test_rf_start_follows_f_pad_and_same_padding():
    import torch.nn.functional as F

    from erf_lab.erf.receptive_field import list_layers

    class Net(nn.Module):
        def forward(self, x):
            x = F.pad(x, (2, 1, 3, 0))  # 2 left, 3 top: unit 0 now sits 3 / 2 px before the image
            x = F.conv2d(x, torch.ones(1, 3, 3, 3), stride=2)  # centre +1 (of the padded grid)
            return F.conv2d(x, torch.ones(1, 1, 4, 4), padding="same")  # even 'same': 1 before, 2 after: +0.5 * 2

    row = list_layers(Net(), 32)[-1]
    assert row["rf_start"] == [-3 + 1 + 1.0, -2 + 1 + 1.0] and row["stride"] == 2


def test_rf_start_of_a_conv_module_that_pads_inside_its_forward():
    """EfficientNet-Lite's TF-'SAME' SameConv2d (an nn.Conv2d with padding 0 that calls F.pad in its forward): the
    module hook took its padding as 0 over the interceptor's F.pad, so each stride-1 5x5 moved the centre 2 px down,
    and efficientnet_lite0's forward_features listed unit 0 at 425 px (at 1024 px the metrics' squares sat at 937,
    beside the corner). The linear stack's gradient says where the centre unit's receptive field is."""
    from erf_lab.erf.metrics import distribution_stats
    from erf_lab.models.efficientnet_lite import SameConv2d

    layers = [SameConv2d(3, 1, 3, stride=2), SameConv2d(1, 1, 5), SameConv2d(1, 1, 5, stride=2), SameConv2d(1, 1, 3)]
    for conv in layers:
        nn.init.constant_(conv.weight, 1.0)
    net = nn.Sequential(*layers)
    size = 64
    row = list_layers(net, size)[-1]
    h = row["shape"][-1]
    x = torch.zeros(1, 3, size, size, requires_grad=True)
    net(x)[0, 0, h // 2, h // 2].backward()
    centre = distribution_stats(x.grad[0].sum(0).numpy())["center_of_mass"]
    assert [row["rf_start"][a] + row["stride_hw"][a] * (h // 2) for a in range(2)] == pytest.approx(centre, abs=1e-9)
    start = {r["name"]: r["rf_start"] for r in list_layers(create_model("efficientnet_lite0"), 32)}
    assert start["_conv_stem"] == [1.0, 1.0] and start["forward_features"] == [31.0, 31.0]  # +j per stride 2


def _squared_conv():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 2, 3, padding=1)

    class Squared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = conv

        def forward(self, x):
            return self.conv(x) ** 2  # the gradient depends on the input: its precision shows in the map

    return Squared().eval()


def test_a_float64_model_is_measured_on_float64_images():
    """The images go through the model in its own precision: float64 images were rounded to float32 first
    (1.2e-8 off the float64 autograd map, relative 4e-8, where float64 agrees to 1e-16)."""
    m = _squared_conv().double()
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 1.1
    maps = []
    for xi in x:
        xi = xi[None].clone().requires_grad_(True)
        out = m(xi)
        g, = torch.autograd.grad(torch.relu(out[0, :, 4, 4]).sum(), xi)
        maps.append(torch.relu(g)[0].sum(0))
    ref = torch.stack(maps).mean(0).numpy()
    erf = compute_erf(m, x, show_progress=False).erf
    assert np.abs(erf - ref).max() <= 1e-14 * np.abs(ref).max()


def test_a_half_precision_model_is_measured_in_its_precision_and_says_so():
    """A bfloat16 / float16 model (a model factory of one's own, a Python caller's .half()) is measured in its own
    precision: the map moved by several % of its maximum against float32 here, and nothing said so. Now a warning
    names the precision and ``info["dtype"]`` records it; float32 and float64 models measure without one."""
    import warnings

    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 1.1
    ref = compute_erf(_squared_conv(), x, show_progress=False)
    assert ref.info["dtype"] == "float32"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no precision warning for float32 / float64
        assert compute_erf(_squared_conv().double(), x.double(), show_progress=False).info["dtype"] == "float64"
    for dtype, name in ((torch.bfloat16, "bfloat16"), (torch.float16, "float16")):
        with pytest.warns(UserWarning, match=rf"the ERF is measured in {name}, the model's parameter precision"):
            low = compute_erf(_squared_conv().to(dtype), x, show_progress=False)
        assert low.info["dtype"] == name
        assert np.abs(low.erf - ref.erf).max() > 1e-4 * ref.erf.max()  # what the warning is about


class _DictOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return {"feat": y, "logits": y.mean((2, 3))}


def test_a_model_or_layer_that_returns_a_dict_is_one_clear_error():
    """A forward that returns a dict ended in captum's AttributeError ('dict' object has no attribute 'clone');
    now the ErfLabError naming the layer that tuples and logits get, and a layer inside it still measures."""
    x = torch.rand(1, 3, 8, 8)
    with pytest.raises(ErfLabError, match="'forward_features' output is not a .N, C, H, W. feature map .got dict"):
        EffectiveReceptiveField(_DictOut()).attribute(x)
    assert EffectiveReceptiveField(_DictOut(), layer="conv").attribute(x).shape == (1, 8, 8)


def _rf_by_hand(stem_rf, stem_jump, stages, transition_k=3):
    """(rf, jump) by hand: ``stages`` = [(kernels of the blocks' spatial convs at that stage)]; a stride-2
    ``transition_k`` conv (RepLKNet's transition, ResNet / MobileNetV2's first 3x3 of a stage) before every
    stage but the first, at the incoming jump."""
    rf, jump = stem_rf, stem_jump
    for i, kernels in enumerate(stages):
        if i:
            rf, jump = rf + (transition_k - 1) * jump, jump * 2
        rf += sum((k - 1) * jump for k in kernels)
    return rf, jump


@pytest.mark.parametrize("name,overrides,expected", [
    # ResNet v1.5 (stride in the 3x3): stem 7x7/2 + maxpool 3x3/2 -> (11, 4); a stage's first block strides
    ("resnet50", {}, _rf_by_hand(11, 4, [[3] * 3, [3] * 3, [3] * 5, [3] * 2])),  # 427
    ("resnet101", {}, _rf_by_hand(11, 4, [[3] * 3, [3] * 3, [3] * 22, [3] * 2])),  # 971
    # MobileNetV2: stem 3x3/2 + the t=1 block's 3x3 -> (7, 2); then the blocks after each strided first one:
    # 24 (1), 32 (2), 64 (3) + 96 (3), 160 (2) + 320 (1)
    ("mobilenetv2", {}, _rf_by_hand(7, 2, [[], [3], [3] * 2, [3] * 6, [3] * 3])),  # 491
    # RepLKNet-31B: stem 3x3/2, dw 3x3, 1x1, dw 3x3/2 -> (11, 4); blocks 2-2-18-2 of kernels 31-29-27-13
    ("replknet_31b", {"channels": (8, 8, 8, 8)},
     _rf_by_hand(11, 4, [[31] * 2, [29] * 2, [27] * 18, [13] * 2])),  # 9011
])
def test_theoretical_rf_of_the_papers_networks_matches_the_hand_computation(name, overrides, expected):
    """The theoretical RF and stride of forward_features (Araujo et al. 2019's recursion) for the networks of
    Ding et al. 2022's ERF figure and Table 10, against the arithmetic done by hand; the RF does not depend on the
    widths, so RepLKNet-31B is built 8 channels wide."""
    rf, jump = expected
    assert (rf, jump) == {"resnet50": (427, 32), "resnet101": (971, 32), "mobilenetv2": (491, 32),
                          "replknet_31b": (9011, 32)}[name]
    row = list_layers(create_model(name, **overrides), 32)[-1]
    assert (row["name"], row["theoretical_rf"], row["stride_hw"], row["rf_start"]) == (
        "forward_features", rf, [jump, jump], [0.0, 0.0])  # every padding "same": unit i centred at 32 i


def test_list_layers_and_theoretical_rf_of_a_float64_model():
    """The probe input takes the model's dtype: a float64 model was 'input size 16 does not fit Sequential:
    expected scalar type Float but found Double' in list_layers, theoretical_rf, 'erf-lab layers' and 'compute'."""
    m = _uniform_stack(2, 3).double()
    rows = {r["name"]: r for r in list_layers(m, 16)}
    assert rows["1"]["theoretical_rf"] == 5 and rows["forward_features"]["shape"] == [1, 16, 16]
    assert theoretical_rf(m, "0", 16) == 3


@pytest.mark.parametrize("channels", [1, 4])
def test_a_model_with_other_input_channels_is_measured_in_python(channels):
    """A grayscale (1-channel) or RGBA (4-channel) model: compute_erf refused its images ('image 0 must be (3, H,
    W)') and list_layers probed it with 3 channels ('input size 16 does not fit'); the map sums the gradient over
    the model's own input channels (3 x 3 ones: `channels` on the centre's 3 x 3 square)."""
    m = nn.Conv2d(channels, 2, 3, padding=1, bias=False)
    nn.init.ones_(m.weight)
    x = torch.rand(2, channels, 16, 16) + 0.1
    erf = compute_erf(m, x, show_progress=False).erf
    expected = np.zeros((16, 16))
    expected[7:10, 7:10] = 2 * channels
    assert np.array_equal(erf, expected)
    assert theoretical_rf(m, None, 16) == 3 and list_layers(m, 16)[-1]["shape"] == [2, 16, 16]


def test_input_channels_follow_the_forward_where_the_head_is_registered_first():
    """A model that registers its head (a 16-channel conv) before its RGB stem still takes RGB images: the first
    convolution the forward calls decides, not the first one registered; a grayscale stem still gives 1."""
    from erf_lab.erf.receptive_field import input_channels

    class HeadFirst(nn.Module):
        def __init__(self, stem_in=3):
            super().__init__()
            self.head = nn.Conv2d(16, 4, 1)
            self.stem = nn.Conv2d(stem_in, 16, 3, padding=1)

        def forward(self, x):
            return self.head(self.stem(x))

    m = HeadFirst().train()
    assert input_channels(m) == 3 and input_channels(HeadFirst(1)) == 1
    assert m.training and not any(mod._forward_pre_hooks for mod in m.modules())
    erf = compute_erf(m, torch.rand(2, 3, 16, 16), show_progress=False).erf
    assert erf.shape == (16, 16) and erf[7:10, 7:10].max() > 0 and erf.sum() == erf[7:10, 7:10].sum()
    assert list_layers(m, 16)[-1]["shape"] == [4, 16, 16]

def test_layers_after_a_resampling_have_no_theoretical_rf_rather_than_a_wrong_one():
    """conv 3x3 stride 2, nearest upsampling x2, conv 3x3 at 16 px: the last unit's support is 5 px wide around
    pixel 7 (the gradient says so), where `layers` gave RF 7 and stride 2 (the coarse map's). After a resampling
    (interpolate, a strided transposed conv) the units lie on no integer grid: RF None, as after attention, the
    stride from the map's side, and the metrics centred on the map's middle; the map itself is the gradient's."""
    torch.manual_seed(0)  # the ReLU of the centre unit was 0 (no gradient, no support) on some draws
    net = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.Upsample(scale_factor=2),
                        nn.Conv2d(4, 4, 3, padding=1), nn.ConvTranspose2d(4, 4, 2, stride=2))
    rows = {r["name"]: r for r in list_layers(net, 16)}
    assert rows["0"]["theoretical_rf"] == 3 and rows["0"]["stride"] == 2
    for name, stride in (("1", 1), ("2", 1), ("3", 1)):
        assert rows[name]["theoretical_rf"] is None and rows[name]["rf_start"] is None, rows[name]
        assert rows[name]["stride"] == stride, rows[name]
    x = torch.rand(1, 3, 16, 16, requires_grad=True)
    out = net[:3](x)
    (g,) = torch.autograd.grad(out[:, :, 8, 8].sum(), x)
    cols = np.nonzero(g.abs().sum((0, 1)).numpy().any(0))[0]
    assert cols.min() >= 5 and cols.max() <= 9  # 5 px at most, not the 7 that was reported

def test_the_cli_names_a_model_that_does_not_take_rgb(tmp_path, monkeypatch, capsys):
    """erf-lab's image sets are RGB: 'compute' of a 1-channel model is one line saying so (it was 'input size 32
    does not fit Conv2d: ... expected input[1, 3, 32, 32] to have 1 channels')."""
    import sys

    from erf_lab.cli.main import main

    (tmp_path / "erf_gray_net.py").write_text("import torch.nn as nn\n\n\ndef net():\n"
                                              "    return nn.Conv2d(1, 2, 3, padding=1)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "erf_gray_net", raising=False)
    code = main(["compute", "--model", "erf_gray_net:net", "--input-size", "32", "--num-images", "1", "--out",
                 str(tmp_path / "run"), "--quiet"])
    _, err = capsys.readouterr()
    assert code == 2 and err.count("\n") == 1 and "1 input channel" in err and "compute_erf" in err, err
    assert not (tmp_path / "run").exists()


def test_a_non_square_input_is_recorded_with_both_sides_and_its_centre_found():
    """``ErfResult.input_size`` was the height of a non-square input, and ``target_centre`` took that one number for
    both sides: on 40 x 72 images (a 5 x 9 map after three stride-2 convs) it put the unit's centre at x = 16 (the
    middle of a 40-px-wide image's 5 units) instead of 32. The result now carries ``input_hw`` (``input_size`` is
    None, the side of square images as before), and the centre is computed per axis: where the map's mass is."""
    import torch.nn as nn

    from erf_lab.erf.metrics import compute_metrics, distribution_stats, target_centre
    from erf_lab.erf.receptive_field import list_layers

    convs = [nn.Conv2d(3 if i == 0 else 1, 1, 3, stride=2, padding=1, bias=False) for i in range(3)]
    for c in convs:
        nn.init.constant_(c.weight, 1.0)
    net = nn.Sequential(*convs)
    res = compute_erf(net, torch.rand(2, 3, 40, 72) + 0.1, show_progress=False)
    assert res.input_hw == (40, 72) and res.input_size is None and res.info["feature_hw"] == [5, 9]
    assert compute_erf(net, torch.rand(1, 3, 40, 40) + 0.1, show_progress=False).input_size == 40  # square: as before
    row = list_layers(net, 40)[-1]
    centre = target_centre(row["rf_start"], row["stride"], res.input_hw)
    assert centre == [16, 32] == target_centre(row["rf_start"], row["stride"], res.input_hw, res.info["feature_hw"])
    assert distribution_stats(res.erf)["center_of_mass"] == pytest.approx(centre, abs=1e-9)
    m = compute_metrics(res.erf, centre=centre, gaussian=False)
    assert m["center"] == [16, 32] and {"centre_off_map_middle", "non_square_map"} <= set(m["flags"])
    # the bounds per axis too: x = 32 lies inside a 40-px height but outside a 30-px width
    assert target_centre(row["rf_start"], row["stride"], (40, 30), feature_hw=(5, 9)) is None


class _SqueezeExcite(nn.Module):
    """conv 3x3, then x * sigmoid(1x1(avgpool(x))) (``pool``: adaptive pooling or a mean over H and W), then conv
    3x3; ``grn``: a GRN-style norm over H and W of the NHWC map instead; ``groupnorm``: GroupNorm's statistics over
    the map; ``channel``: a CBAM-style mean over the channels (per pixel: no global context)."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = self.a(x)
        if self.kind == "pool":
            y = y * torch.sigmoid(self.fc(torch.nn.functional.adaptive_avg_pool2d(y, 1)))
        elif self.kind == "mean":
            y = y * torch.sigmoid(self.fc(y.mean((2, 3), keepdim=True)))
        elif self.kind == "groupnorm":
            y = torch.nn.functional.group_norm(y, 2)
        elif self.kind == "grn":
            t = y.permute(0, 2, 3, 1)
            g = torch.linalg.vector_norm(t, ord=2, dim=(1, 2), keepdim=True)
            y = (t * (g / (g.mean(-1, keepdim=True) + 1e-6)) + t).permute(0, 3, 1, 2)
        else:
            y = y * torch.sigmoid(y.mean(1, keepdim=True))
        return self.b(y)


@pytest.mark.parametrize("kind", ["pool", "mean", "grn", "groupnorm", "channel"])
def test_a_reduction_over_the_whole_map_gives_a_global_theoretical_rf(kind):
    """Squeeze-and-excitation (UniRepLKNet's blocks, timm's SE), GRN and GroupNorm pool over the whole map, so every
    input pixel reaches every later unit: `layers` gave such a layer its kernels' RF (here 5 px, UniRepLKNet-A's
    first block 15), while the centre unit's gradient covers the whole image. The RF is now global (None, rf_global,
    with the kernels' RF and centre kept); a mean over the channels (CBAM's spatial attention) is per pixel and keeps
    5 px."""
    torch.manual_seed(0)
    net = _SqueezeExcite(kind).eval()
    row = list_layers(net, 17)[-1]
    x = torch.rand(1, 3, 17, 17, requires_grad=True)
    (g,) = torch.autograd.grad(torch.relu(net(x)[:, :, 8, 8]).sum(), x)
    support = np.argwhere(g.abs().sum((0, 1)).numpy() > 0)
    assert (row["kernel_rf"], row["rf_start"], row["stride_hw"]) == (5, [0.0, 0.0], [1, 1])
    if kind == "channel":
        assert (row["theoretical_rf"], row["rf_global"]) == (5, False) and theoretical_rf(net, None, 17) == 5
        assert list_layers(net, 1)[-1]["rf_global"] is False  # a 1 x 1 map's channel mean is no spatial one either
        assert support.min() == 6 and support.max() == 10  # the 5 x 5 square about pixel 8
        return
    assert (row["theoretical_rf"], row["rf_global"]) == (None, True)
    assert support.min() == 0 and support.max() == 16  # the gradient reaches the image's corners
    with pytest.raises(ErfLabError, match="global theoretical receptive field.*kernels alone reach 5 px"):
        theoretical_rf(net, None, 17)


class _LateGlobal(nn.Module):
    """A ``stride`` x ``stride`` patchify conv, then the only reduction over the map: an SE (``se``) or a LayerNorm
    over (C, H, W) (``layernorm``), then a 1 x 1 conv."""

    def __init__(self, kind, stride=32):
        super().__init__()
        self.kind = kind
        self.stem, self.fc, self.head = nn.Conv2d(3, 4, stride, stride=stride), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = self.stem(x)
        if self.kind == "se":
            y = y * torch.sigmoid(self.fc(torch.nn.functional.adaptive_avg_pool2d(y, 1)))
        else:
            y = torch.nn.functional.layer_norm(y, y.shape[1:])
        return self.head(y)


@pytest.mark.parametrize("kind", ["se", "layernorm"])
def test_a_reduction_over_the_whole_map_in_the_stride_32_stage_is_global(kind, monkeypatch, tmp_path):
    """The geometry was probed at 32 px, where a stride-32 stage's map is 1 x 1: an SE there (its only reduction
    over the map) pooled nothing and the layer kept its kernels' RF (32 px), while at 96 px (a 3 x 3 map) the centre
    unit's gradient reaches the image's corners. A LayerNorm over (C, H, W) was not recognised at all. Both are
    global now, at the input size the run measures."""
    from erf_lab.erf.runner import layer_geometry

    monkeypatch.setenv("ERF_LAB_CACHE", str(tmp_path / "cache"))  # measured here, not read from an earlier entry
    torch.manual_seed(0)
    net = _LateGlobal(kind).eval()
    x = torch.rand(1, 3, 96, 96, requires_grad=True)
    (g,) = torch.autograd.grad(torch.relu(net(x)[:, :, 1, 1]).sum(), x)
    support = np.argwhere(g.abs().sum((0, 1)).numpy() > 0)
    assert support.min() == 0 and support.max() == 95  # every pixel reaches the centre unit
    geom = layer_geometry(net, None, 96)
    assert (geom["theoretical_rf"], geom["rf_global"], geom["kernel_rf"], geom["stride"]) == (None, True, 32, 32)
    assert (list_layers(net, 96)[-1]["rf_global"], list_layers(net, 32)[-1]["rf_global"]) == (True, False)
    assert layer_geometry(net, None, 32)["rf_global"] is False  # measured at 32 px the map is 1 x 1: nothing pooled
    # a stride-64 stage is 1 x 1 at the first probe (64 px) too: probed again at 128 px
    geom = layer_geometry(_LateGlobal(kind, stride=64), None, 192)
    assert (geom["theoretical_rf"], geom["rf_global"], geom["kernel_rf"], geom["stride"]) == (None, True, 64, 64)


def test_unireplknet_layers_after_its_first_se_are_global_and_keep_their_centre(tmp_path, capsys):
    """UniRepLKNet's depthwise conv has a 15 px RF at its first block, its SE and everything after it a global one
    (`layers` said 15 .. 2191 px); a run at 97 px records rf_global and the kernels' RF, and still centres the
    metrics on the measured unit (unit 2 of stages.3's 4 x 4 map, at 64 px, not the map's middle 48)."""
    from erf_lab.cli.main import main
    from erf_lab.erf.runner import ErfSpec, run_erf

    from erf_lab.erf.runner import erf_centre, layer_geometry

    tiny = dict(dims=(8, 16, 16, 24), depths=(1, 1, 1, 1), kernel_sizes=((3,), (13,), (7,), (9,)))
    model = create_model("unireplknet_t", **tiny)
    rows = {r["name"]: r for r in list_layers(model, 97)}
    assert (rows["stages.0.0.dwconv"]["theoretical_rf"], rows["stages.0.0.dwconv"]["rf_global"]) == (15, False)
    assert (rows["stages.0.0.se"]["theoretical_rf"], rows["stages.0.0.se"]["rf_global"]) == (None, True)
    assert rows["stages.0.0.se"]["kernel_rf"] == 15 and rows["stages.0.0.se"]["rf_start"] == [0.0, 0.0]
    # the squeeze itself (one value per channel, 1 x 1) lies on no grid of units: not centred on pixel 0 but on the
    # image's middle, as the metrics take it without a centre
    assert rows["stages.0.0.se.down"]["rf_start"] is None and rows["stages.0.0.se.down"]["shape"][1:] == [1, 1]
    assert erf_centre(layer_geometry(model, "stages.0.0.se.down", 97), 97, (1, 1)) is None
    spec = ErfSpec("unireplknet_t", overrides=tiny, num_images=1, input_size=97, layer="stages.3")
    info = run_erf(spec, out=tmp_path / "run", show_progress=False, formats=("png",))["run_info"]
    assert (info["theoretical_rf"], info["rf_global"], info["erf_centre"]) == (None, True, [64, 64])
    assert info["kernel_rf"] == rows["stages.3"]["kernel_rf"] > 97
    capsys.readouterr()
    options = [x for k, v in tiny.items() for x in ("--override", f"{k}={v!r}".replace(" ", ""))]
    assert main(["layers", "--model", "unireplknet_t", *options, "--input-size", "33", "--filter", "stages.0.0"]) == 0
    out = capsys.readouterr().out
    assert "global (15)" in out and "squeeze-and-excitation" in out

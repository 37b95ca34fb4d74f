"""cue-world: determinism, resolution independence, probe semantics, distinct cues, speed, figure."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from erf_lab.errors import ErfLabError
from erf_lab.train import cue_world as cw


def test_same_index_split_seed_gives_the_same_tensor():
    a = cw.CueWorld("train", 20, 48, seed=3)
    b = cw.CueWorld("train", 20, 48, seed=3)
    for i in (0, 7, 19):
        assert torch.equal(a[i][0], b[i][0]) and a[i][1] == b[i][1]
    assert torch.equal(cw.render_batch("train", [7], 48, seed=3)[0], a[7][0])
    other_seed = cw.CueWorld("train", 20, 48, seed=4)
    assert (other_seed[7][0] - a[7][0]).abs().mean() > 0.05
    val = cw.CueWorld("val", 20, 48, seed=3)  # another seed stream than train
    assert all((val[i][0] - a[i][0]).abs().mean() > 0.05 for i in range(5))
    x, y = a[0]
    assert x.shape == (3, 48, 48) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1


def test_rendering_is_resolution_free():
    """The same scene at 256 px, box-downsampled to 64 px, matches the 64 px rendering (only anti-aliasing of
    edges differs)."""
    for split in ("train", "cue-conflict", "shape-only"):
        for i in range(3):
            sc = cw.draw_scene(split, i)
            hi = torch.from_numpy(cw.render_scene(sc, 256))[None]
            lo = torch.from_numpy(cw.render_scene(sc, 64))
            down = F.avg_pool2d(hi, 4)[0]
            assert (down - lo).abs().mean() < 0.04, (split, i)


def test_probe_splits_separate_the_cues():
    n = 10
    train = cw.CueWorld("train", 200, 32, num_classes=n)
    conflict = cw.CueWorld("cue-conflict", 200, 32, num_classes=n)
    shape_only = cw.CueWorld("shape-only", 50, 32, num_classes=n)
    texture_only = cw.CueWorld("texture-only", 50, 32, num_classes=n)
    assert all(s == t for s, t in map(train.cues, range(200)))
    assert sorted(set(train.targets)) == list(range(n))  # every class appears in 200 draws
    assert all(s != t and 0 <= s < n and 0 <= t < n for s, t in map(conflict.cues, range(200)))
    assert conflict.targets == [conflict.cues(i)[0] for i in range(200)]  # label = shape class
    assert all(t == -1 for _, t in map(shape_only.cues, range(50)))
    assert all(s == -1 for s, _ in map(texture_only.cues, range(50)))
    assert texture_only.targets == [texture_only.cues(i)[1] for i in range(50)]
    # shape-only: the silhouette is one flat colour -> no fine structure inside; texture-only fills the frame
    for i in range(10):
        sc = cw.draw_scene("shape-only", i, n)
        img = cw.render_scene(sc, 64)
        x, y = cw._grid(64)
        c, s = np.cos(sc.rotation), np.sin(sc.rotation)
        dx, dy = (x - sc.center[0]) / sc.radius, (y - sc.center[1]) / sc.radius
        inside = cw.shape_sdf(cw.SHAPES[sc.shape], c * dx + s * dy, -s * dx + c * dy) * sc.radius < -0.06
        assert inside.sum() > 20 and img[:, inside].std(axis=1).max() < 1e-5
        tex = cw.render_scene(cw.draw_scene("texture-only", i, n), 64)
        assert tex.std() > 0.1 and min(tex[:, :8].std(), tex[:, -8:].std()) > 0.05  # texture everywhere


def test_shapes_are_distinct_silhouettes():
    """Every pair of silhouettes overlaps by IoU < 0.85 at the best of 24 relative rotations (shapes are drawn
    at random rotations, so rotation must not make two classes the same)."""
    x, y = np.meshgrid(np.linspace(-1, 1, 96), np.linspace(-1, 1, 96))
    masks = {n: cw.shape_sdf(n, x, y) < 0 for n in cw.SHAPES}
    for n, m in masks.items():
        assert 0.08 < m.mean() < 0.75, n  # non-empty and inside the frame
        assert not m[0].any() and not m[-1].any() and not m[:, 0].any() and not m[:, -1].any(), n
    names = list(masks)
    for j, b in enumerate(names):
        for t in np.linspace(0, 2 * np.pi, 24, endpoint=False):
            mb = cw.shape_sdf(b, np.cos(t) * x + np.sin(t) * y, -np.sin(t) * x + np.cos(t) * y) < 0
            for a in names[:j]:
                iou = (masks[a] & mb).sum() / (masks[a] | mb).sum()
                assert iou < 0.85, (a, b, t, iou)


def test_textures_are_distinct_patterns():
    x, y = cw._grid(96)
    pats = {n: cw.texture_value(n, x, y, 0.24, 0.0, np.random.default_rng(1)) for n in cw.TEXTURES}
    spectra = {}
    for n, p in pats.items():
        assert 0.0 <= p.min() and p.max() <= 1.0 and p.std() > 0.2, n
        s = np.abs(np.fft.fftshift(np.fft.fft2(p - p.mean())))
        spectra[n] = s.ravel() / np.linalg.norm(s)
    names = list(spectra)
    for i, a in enumerate(names):
        for b in names[i + 1:]:  # phase-free: power spectra of two textures differ
            assert spectra[a] @ spectra[b] < 0.9, (a, b)
    # gratings: the dominant frequency is along the named angle (x right, y down)
    for angle in (0, 45, 90, 135):
        s = np.abs(np.fft.fftshift(np.fft.fft2(pats[f"grating-{angle}"] - 0.5)))
        ky, kx = np.unravel_index(np.argmax(s), s.shape)
        est = np.degrees(np.arctan2(ky - 48, kx - 48)) % 180
        assert min(abs(est - angle), 180 - abs(est - angle)) < 8, (angle, est)


def test_disk_cache_is_bit_identical_to_rendering(tmp_path, monkeypatch):
    monkeypatch.setenv("ERF_LAB_CACHE", str(tmp_path))
    cached = cw.CueWorld("val", 12, 32, seed=1, cache=True)
    plain = cw.CueWorld("val", 12, 32, seed=1)
    files = list((tmp_path / "cue-world").glob("*.npy"))
    assert len(files) == 1 and cw.renderer_version() in files[0].name and cached.cached and not plain.cached
    again = cw.CueWorld("val", 12, 32, seed=1, cache=True)  # read back from disk (memory-mapped)
    for i in range(12):
        assert torch.equal(cached[i][0], plain[i][0]) and torch.equal(again[i][0], plain[i][0])
        assert cached[i][1] == plain[i][1]
    files[0].write_bytes(b"not an array")  # a damaged cache file is rendered again, not trusted
    assert torch.equal(cw.CueWorld("val", 12, 32, seed=1, cache=True)[3][0], plain[3][0])


def test_cache_parallel_render_and_resample(tmp_path, monkeypatch):
    monkeypatch.setenv("ERF_LAB_CACHE", str(tmp_path))
    big = cw.CueWorld("train", 300, 64, cache=True)  # large enough for worker processes
    for i in (0, 157, 299):
        assert torch.equal(big[i][0], torch.from_numpy(cw.render_scene(cw.draw_scene("train", i), 64)))
    stream = cw.CueWorld("train", 300, 64, cache=True, resample=True)
    stream.set_epoch(1)  # later epochs of a resampled set are new images, rendered on the fly
    assert torch.equal(stream[5][0], torch.from_numpy(cw.render_scene(cw.draw_scene("train", 305), 64)))
    monkeypatch.setattr(cw, "CACHE_MAX_BYTES", 1000)
    assert not cw.CueWorld("val", 4, 32, cache=True).cached  # too big for the cache: rendered on the fly


def test_examples_figure(tmp_path):
    paths = cw.plot_examples(tmp_path / "world", num_classes=3, input_size=32, per_class=1)
    assert [p.name for p in paths] == ["world.png", "world.pdf"]
    assert all(p.stat().st_size > 1000 for p in paths)


@pytest.mark.parametrize("kwargs", [dict(split="test"), dict(num_classes=13), dict(num_classes=1), dict(size=0),
                                    dict(input_size=4), dict(size=cw.MAX_SPLIT_SIZE + 1), dict(size=10 ** 20)])
def test_bad_parameters(kwargs):
    with pytest.raises(ErfLabError):
        cw.CueWorld(**{"split": "train", "size": 4, **kwargs})


def test_resample_draws_new_images_each_epoch():
    ds = cw.CueWorld("train", 5, 32, resample=True)
    fixed = cw.CueWorld("train", 5, 32)
    first = [ds[i][0] for i in range(5)]
    assert all(torch.equal(a, fixed[i][0]) for i, a in enumerate(first))  # epoch 0 = the fixed set
    ds.set_epoch(2)
    assert all(torch.equal(ds[i][0], cw.render_batch("train", [10 + i], 32)[0]) for i in range(5))
    assert ds.label(3) == cw.draw_scene("train", 13).shape
    fixed.set_epoch(2)
    assert all(torch.equal(fixed[i][0], first[i]) for i in range(5))  # without resample: the same images


def test_scenes_are_drawn_on_demand_so_a_split_of_the_largest_size_costs_no_memory():
    """A split used to draw all its scenes up front: --train-size 1e20 grew to 19 GB before the first step."""
    import tracemalloc

    tracemalloc.start()
    try:
        big = cw.CueWorld("train", cw.MAX_SPLIT_SIZE, 32)
        last = big[cw.MAX_SPLIT_SIZE - 1]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 5 << 20, peak
    assert torch.equal(last[0], torch.from_numpy(cw.render_scene(cw.draw_scene("train", cw.MAX_SPLIT_SIZE - 1), 32)))
    assert big.cues(-1) == big.cues(cw.MAX_SPLIT_SIZE - 1)  # negative indices count from the end, like a list
    with pytest.raises(IndexError):
        big[cw.MAX_SPLIT_SIZE]
    assert [x.shape for x, _ in cw.CueWorld("val", 3, 16)] == [(3, 16, 16)] * 3  # iteration stops at the end


@pytest.mark.parametrize("split", cw.SPLITS)
def test_labels_are_the_scenes_classes_without_drawing_the_scenes(split, monkeypatch):
    """A label is its scene's class (shape; texture in texture-only images), drawn alone and kept for the fixed
    images: a batch costs no scene draws (drawing them cost the training loop 11.5 % over a bare loop)."""
    want = [(lambda s: s.shape if s.shape >= 0 else s.texture)(cw.draw_scene(split, i, 7, 3)) for i in range(60)]
    assert [cw.draw_class(split, i, 7, 3) for i in range(60)] == want
    ds = cw.CueWorld(split, 20, 16, num_classes=7, seed=3, resample=True)
    monkeypatch.setattr(cw, "draw_scene", lambda *a: pytest.fail("a label drew a whole scene"))
    assert ds.targets == want[:20] and [ds.label(-i) for i in range(1, 4)] == want[17:20][::-1]
    drawn = []
    monkeypatch.setattr(cw, "draw_class", lambda *a: drawn.append(a) or want[a[1]])
    assert ds.targets == want[:20] and not drawn  # kept
    ds.set_epoch(2)  # a resampled epoch: new images, new labels
    assert [ds.label(i) for i in range(20)] == want[40:60] and len(drawn) == 20
    monkeypatch.setattr(cw, "LABEL_MEMO_MAX", 10)  # a split too large to keep its labels draws them each time
    big = cw.CueWorld(split, 20, 16, num_classes=7, seed=3)
    for _ in range(2):
        assert [big.label(i) for i in range(20)] == want[:20]
    assert big._labels is None and len(drawn) == 60


def test_probe_predictions_give_the_model_back_in_its_modes_also_when_they_fail():
    """``predict`` (the cue-world probes) set the whole model back to one mode with ``model.train(was)``, so a
    frozen BN inside a model in training came back training; a failed batch (NaN outputs) left it in eval."""
    from erf_lab.train.probes import predict

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(4, 10)).train()
    model[1].eval()  # frozen statistics
    images = torch.rand(5, 3, 16, 16)
    pred = predict(model, images, batch_size=2)
    assert pred.shape == (5,) and [m.training for m in model] == [True, False, True, True, True]
    with torch.no_grad():
        model[4].bias.fill_(float("nan"))
    with pytest.raises(ErfLabError, match="not finite"):
        predict(model, images, batch_size=2)
    assert [m.training for m in model] == [True, False, True, True, True]


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_probe_predictions_of_a_model_in_another_precision(dtype):
    """A float64 / bfloat16 model failed in its first layer (float32 inputs); it now predicts as in float32."""
    from erf_lab.train.probes import predict

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 5, stride=4), torch.nn.Flatten(), torch.nn.Linear(8 * 9 * 9, 10))
    images = torch.rand(16, 3, 40, 40)
    ref = predict(model, images)
    got = predict(model.to(dtype), images)
    assert len(set(ref.tolist())) > 2  # predictions that differ between images
    assert (got == ref).mean() >= (1.0 if dtype == torch.float64 else 0.8)

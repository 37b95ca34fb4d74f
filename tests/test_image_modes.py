"""Every PIL mode loads at its real range into [0, 1] (erf_lab.erf.images.to_rgb), for the ERF input and the
shape-bias stimuli alike: a gradient saved in each mode comes back as the expected values, not clipped at 255."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from erf_lab.erf.images import load_images, preprocess
from erf_lab.shape_bias.stimuli import Preprocess

W = 256
RAMP8 = np.tile(np.arange(W, dtype=np.uint8), (4, 1))  # 4 x 256, 0..255 along x


def loaded(image: Image.Image) -> np.ndarray:
    """(3, W, W) in [0, 1] as the ERF input sees it: same size, so no resampling; mean 0, std 1."""
    assert image.size == (W, W)
    return preprocess(image, W, (0, 0, 0), (1, 1, 1)).numpy()


def square(a: np.ndarray) -> np.ndarray:
    """Repeat a (4, 256) ramp to (256, 256) so the loader keeps the size."""
    return np.repeat(a, W // a.shape[0], axis=0)


def roundtrip(image: Image.Image, tmp_path, fmt: str) -> Image.Image:
    path = tmp_path / f"img.{fmt}"
    image.save(path)
    out = Image.open(path)
    out.load()
    return out


GRAY = square(RAMP8) / 255.0


@pytest.mark.parametrize("fmt", ["png", "tiff"])
def test_16_bit_ramp_is_linear_not_clipped(tmp_path, fmt):
    ramp = square(np.tile(np.linspace(0, 65535, W).round().astype(np.uint16), (4, 1)))
    im = roundtrip(Image.fromarray(ramp), tmp_path, fmt)
    assert im.mode == "I;16"
    x = loaded(im)
    np.testing.assert_allclose(x, np.broadcast_to(ramp / 65535.0, x.shape), atol=1e-7)
    assert (x == 1.0).mean() == pytest.approx(1 / W)  # convert("RGB") saturated 255/256 of these pixels
    assert np.asarray(im.convert("RGB")).astype(bool).mean() > 0.99  # (what the old loader saw)


@pytest.mark.parametrize("mode,dtype", [("I;16B", ">u2"), ("I;16L", "<u2"), ("I;16N", "=u2")])
def test_16_bit_byte_orders(mode, dtype):
    ramp = square(np.tile(np.linspace(0, 65535, W).round().astype(np.uint16), (4, 1)))
    im = Image.frombytes(mode, (W, W), ramp.astype(dtype).tobytes())
    np.testing.assert_allclose(loaded(im), np.broadcast_to(ramp / 65535.0, (3, W, W)), atol=1e-7)


def test_32_bit_int_in_16_bit_range(tmp_path):
    ramp = square(np.tile(np.linspace(0, 65535, W).round().astype(np.int32), (4, 1)))
    im = roundtrip(Image.fromarray(ramp, mode="I"), tmp_path, "tiff")
    assert im.mode == "I"
    np.testing.assert_allclose(loaded(im), np.broadcast_to(ramp / 65535.0, (3, W, W)), atol=1e-7)


@pytest.mark.parametrize("bad", [70000, -1])
def test_32_bit_int_outside_16_bit_is_refused(bad):
    a = np.zeros((W, W), np.int32)
    a[0, 0] = bad
    with pytest.raises(ValueError, match=r"32-bit integer image \(mode I\) with values in .*save it as 8- or 16-bit"):
        loaded(Image.fromarray(a, mode="I"))


def test_float_in_unit_range(tmp_path):
    ramp = square(np.tile(np.linspace(0, 1, W, dtype=np.float32), (4, 1)))
    im = roundtrip(Image.fromarray(ramp, mode="F"), tmp_path, "tiff")
    assert im.mode == "F"
    np.testing.assert_array_equal(loaded(im), np.broadcast_to(ramp, (3, W, W)))


@pytest.mark.parametrize("value", [2.0, -0.5, np.nan, np.inf])
def test_float_outside_unit_range_is_refused(value):
    a = np.zeros((W, W), np.float32)
    a[3, 3] = value
    with pytest.raises(ValueError, match=r"float image \(mode F\) with values in"):
        loaded(Image.fromarray(a, mode="F"))


def test_one_bit(tmp_path):
    bits = square(RAMP8 >= 128)
    im = roundtrip(Image.fromarray(bits).convert("1"), tmp_path, "png")
    assert im.mode == "1"
    np.testing.assert_array_equal(loaded(im), np.broadcast_to(bits.astype(np.float32), (3, W, W)))


def test_gray_8_bit(tmp_path):
    im = roundtrip(Image.fromarray(square(RAMP8)), tmp_path, "png")
    assert im.mode == "L"
    np.testing.assert_allclose(loaded(im), np.broadcast_to(GRAY, (3, W, W)), atol=1e-7)


def test_rgb_8_bit(tmp_path):
    rgb = np.stack([square(RAMP8), 255 - square(RAMP8), np.full((W, W), 51, np.uint8)], -1)
    im = roundtrip(Image.fromarray(rgb), tmp_path, "png")
    assert im.mode == "RGB"
    np.testing.assert_allclose(loaded(im), rgb.transpose(2, 0, 1) / 255.0, atol=1e-7)


def test_palette_with_and_without_transparency(tmp_path):
    palette = [v for i in range(256) for v in (i, 255 - i, 0)]
    im = Image.frombytes("P", (W, W), square(RAMP8).tobytes())
    im.putpalette(palette)
    p = roundtrip(im, tmp_path, "png")
    assert p.mode == "P"
    expected = np.stack([GRAY, 1 - GRAY, np.zeros_like(GRAY)])
    np.testing.assert_allclose(loaded(p), expected, atol=1e-7)
    im.info["transparency"] = 0  # index 0 (the x = 0 column) transparent: white there
    t = roundtrip(im, tmp_path, "png")
    assert "transparency" in t.info
    expected[:, :, 0] = 1.0
    np.testing.assert_allclose(loaded(t), expected, atol=1e-7)


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_composited_over_white(tmp_path, mode):
    alpha = square(RAMP8)  # fully transparent at x = 0, opaque at x = 255
    if mode == "RGBA":
        a = np.stack([np.zeros((W, W), np.uint8), np.full((W, W), 200, np.uint8), np.zeros((W, W), np.uint8), alpha], -1)
        colour = np.array([0, 200, 0])[:, None, None] / 255.0
    else:
        a = np.stack([np.full((W, W), 100, np.uint8), alpha], -1)
        colour = np.full((3, 1, 1), 100 / 255.0)
    im = roundtrip(Image.fromarray(a, mode=mode), tmp_path, "png")
    assert im.mode == mode
    a_ = alpha / 255.0
    expected = colour * a_ + 1.0 * (1 - a_)
    np.testing.assert_allclose(loaded(im), expected, atol=1.01 / 255)
    assert loaded(im)[:, :, 0].min() == 1.0  # transparent column: white, not the hidden colour


def test_cmyk(tmp_path):
    zero = np.zeros((W, W), np.uint8)
    im = roundtrip(Image.fromarray(np.stack([square(RAMP8), zero, zero, zero], -1), mode="CMYK"), tmp_path, "tiff")
    assert im.mode == "CMYK"
    np.testing.assert_allclose(loaded(im), np.stack([1 - GRAY, np.ones_like(GRAY), np.ones_like(GRAY)]), atol=1e-7)


def test_ycbcr(tmp_path):
    mid = np.full((W, W), 128, np.uint8)
    im = roundtrip(Image.fromarray(np.stack([square(RAMP8), mid, mid], -1), mode="YCbCr"), tmp_path, "tiff")
    assert im.mode == "YCbCr"
    np.testing.assert_allclose(loaded(im), np.broadcast_to(GRAY, (3, W, W)), atol=1.01 / 255)


def test_hsv_in_memory():
    zero = np.zeros((W, W), np.uint8)
    im = Image.fromarray(np.stack([zero, zero, square(RAMP8)], -1), mode="HSV")  # no file format stores HSV
    np.testing.assert_allclose(loaded(im), np.broadcast_to(GRAY, (3, W, W)), atol=1e-7)


def test_8_bit_rgb_resized_exactly_as_before():
    """ERF inputs stay bit-identical: 8-bit images resize in PIL at 8 bits, then /255, as the original code."""
    rng = np.random.default_rng(0)
    im = Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8))
    old = torch.from_numpy(np.asarray(im.convert("RGB").resize((64, 64), Image.BICUBIC), dtype=np.float32).copy()
                           ).permute(2, 0, 1).div_(255.0)
    assert torch.equal(preprocess(im, 64, (0, 0, 0), (1, 1, 1)), old)


def test_16_bit_stimulus_and_erf_folder(tmp_path):
    """The shape-bias stimulus loader uses the same conversion; an ERF folder skips what is refused."""
    ramp = np.tile(np.linspace(0, 65535, 16).round().astype(np.uint16), (16, 1))
    im = Image.fromarray(ramp)
    x = Preprocess(size=(16, 16), mean=(0, 0, 0), std=(1, 1, 1))(im)
    np.testing.assert_allclose(x.numpy(), np.broadcast_to(ramp / 65535.0, (3, 16, 16)), atol=1e-7)
    im.save(tmp_path / "a16.png")
    Image.fromarray(np.full((16, 16), 3.0, np.float32), mode="F").save(tmp_path / "b_float.tiff")
    with pytest.warns(UserWarning, match="skipped 1 unreadable image file"):
        src = load_images(tmp_path, input_size=16)
    # refused while the images are chosen (not when measured, after taking one of the --num-images places)
    assert [p.name for p in src.files] == ["a16.png"]
    ((name, reason),) = src.skipped
    assert name == "b_float.tiff" and reason.startswith("ValueError: float image (mode F) with values in [3, 3]")
    np.testing.assert_allclose(src.load(src.files[0])[0].numpy(), (ramp / 65535.0 - 0.485) / 0.229, atol=1e-5)
    with pytest.raises(ValueError, match="values in \\[3, 3\\]"):
        src.load(tmp_path / "b_float.tiff")

"""ERF display presets (RepLKNet / SLaK / VMamba-style power) and the OpenERF-style mass-within-radius metric."""
import json
import math

import numpy as np
import pytest

from erf_lab.cli.main import main
from erf_lab.erf.metrics import compute_metrics, mass_within_radii, summary
from erf_lab.erf.plotting import DISPLAY_PRESETS, comparison_figure, display_map, erf_figure
from erf_lab.erf.rundir import write_run_dir
from erf_lab.errors import ErfLabError


def gaussian_map(n=201, s=12.0, amp=80.0):
    y, x = np.mgrid[:n, :n]
    return amp * np.exp(-((y - n // 2) ** 2 + (x - n // 2) ** 2) / (2 * s ** 2))


def test_preset_formulas():
    a = np.array([[0.0, 1.0], [9.0, 99.0]])
    np.testing.assert_allclose(display_map(a), [[0, math.log10(2) / 2], [0.5, 1.0]])  # log10(A+1)/max
    np.testing.assert_allclose(display_map(a, "slak"), a / 99)
    np.testing.assert_allclose(display_map(a, "power"), a ** 0.25 / 99 ** 0.25)
    assert np.all(display_map(np.zeros((3, 3)), "power") == 0)
    with pytest.raises(ErfLabError, match="unknown display preset"):
        display_map(a, "viridis")


def test_figures_show_and_name_the_preset():
    maps = [gaussian_map(48, 3.0), gaussian_map(48, 8.0) * 5]
    for name, (formula, _, _) in DISPLAY_PRESETS.items():
        fig = comparison_figure(maps, ["a", "b"], display=name)
        meshes = [ax.collections[0] for ax in fig.axes if ax.get_title() in ("a", "b")]
        for mesh, m in zip(meshes, maps):
            np.testing.assert_allclose(np.asarray(mesh.get_array()).reshape(m.shape), display_map(m, name))
        labels = [ax.get_xlabel() for ax in fig.axes] + [ax.get_ylabel() for ax in fig.axes]
        assert any(formula in lab for lab in labels), labels
    joint = comparison_figure(maps, ["a", "b"], normalize="joint", display="slak")
    shown = [np.asarray(ax.collections[0].get_array()).max() for ax in joint.axes if ax.get_title() in ("a", "b")]
    assert shown == pytest.approx([maps[0].max() / maps[1].max(), 1.0])  # A / joint max
    # and the colour bar says so: "A/max" read as each map's own max, which only the "each" figure shows
    captions = {n: [ax.get_xlabel() for ax in comparison_figure(maps, ["a", "b"], normalize=n).axes
                    if ax.get_xlabel()] for n in ("each", "joint")}
    assert captions == {"each": ["log10(A+1)/max (RepLKNet, Ding et al., CVPR 2022)"],
                        "joint": ["log10(A+1)/max over all maps (RepLKNet, Ding et al., CVPR 2022)"]}
    assert "log10(A+1)/max" in erf_figure(maps[0]).axes[1].get_xlabel()  # default: RepLKNet


def test_data_and_metrics_do_not_depend_on_the_preset(tmp_path, capsys):
    erf = gaussian_map(64, 6.0)
    info = {"model": "toy", "input_size": 64}
    out = {}
    for name in DISPLAY_PRESETS:
        write_run_dir(tmp_path / name, erf, info, theoretical_rf=50, display=name)
        out[name] = ((tmp_path / name / "erf.npy").read_bytes(), (tmp_path / name / "metrics.json").read_text())
    assert len(set(out.values())) == 1
    assert (tmp_path / "slak" / "erf.png").read_bytes() != (tmp_path / "replknet" / "erf.png").read_bytes()
    assert main(["analyze", str(tmp_path / "replknet"), "--display", "power", "--out", str(tmp_path / "a")]) == 0
    assert (tmp_path / "a" / "metrics.json").read_text() == out["replknet"][1]
    assert json.loads((tmp_path / "a" / "analysis.json").read_text())["parameters"]["display"] == "power"
    assert main(["compare", str(tmp_path / "slak"), str(tmp_path / "power"), "--display", "slak",
                 "--out", str(tmp_path / "c"), "--formats", "png"]) == 0
    capsys.readouterr()
    assert main(["analyze", str(tmp_path / "slak"), "--display", "nope", "--out", str(tmp_path / "b")]) == 2
    assert "unknown display preset" in capsys.readouterr().err


def test_mass_within_radius_hand_computed():
    a = np.zeros((5, 5))
    a[2, 2], a[2, 3], a[0, 0] = 1.0, 2.0, 3.0  # centre, distance 1, distance sqrt(8)
    assert mass_within_radii(a, radii=(0.5, 1, 2, 3)) == {"0.5": 1 / 6, "1": 0.5, "2": 0.5, "3": 1.0}
    assert mass_within_radii(np.zeros((4, 4))) is None


def test_mass_within_radius_of_a_gaussian():
    """Isotropic Gaussian: mass within r = 1 - exp(-r^2 / (2 s^2)) (Rayleigh CDF); the pixel lattice is within
    0.01 of it at s = 12 px, and beyond the map edge the share is 1."""
    s = 12.0
    m = compute_metrics(gaussian_map(201, s))
    curve = m["mass_within_radius"]
    assert list(curve) == ["5", "10", "20", "40", "80"]
    for r, v in curve.items():
        assert v == pytest.approx(1 - math.exp(-float(r) ** 2 / (2 * s * s)), abs=0.01), r
    flat = summary(m)
    assert flat["mass@20px"] == curve["20"] and flat["mass@80px"] == curve["80"]
    assert "mass@5px" not in flat  # the table stays narrow

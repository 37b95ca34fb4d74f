"""ERF across input sizes (Luo et al., NeurIPS 2016): on a network with a known analytic ERF, the size-free
metrics stay constant while the paper's area ratios scale as 1 / image area."""
import csv
import io
import json

import numpy as np
import pytest
import torch
import torch.nn as nn

from erf_lab.erf.compute import compute_erf
from erf_lab.erf.metrics import compute_metrics, summary
from erf_lab.erf.sweep import parse_sizes, run_sweep
from erf_lab.errors import ErfLabError


def _uniform_stack(n=4, k=5):
    convs = [nn.Conv2d(3 if i == 0 else 1, 1, k, padding=k // 2, bias=False) for i in range(n)]
    for c in convs:
        nn.init.constant_(c.weight, 1.0)
    return nn.Sequential(*convs)


def test_size_free_metrics_constant_area_ratios_scale_with_inverse_area():
    """n = 4 uniform 5x5 linear convs: the ERF is the 4-fold box convolution (support 17 px) at every size that
    contains it, so r_rms, r50, r99 and sigma are equal and area ratios are side^2 / S^2."""
    torch.manual_seed(0)
    net = _uniform_stack()
    rows = {}
    for s in (33, 65, 129):
        erf = compute_erf(net, torch.rand(2, 3, s, s) + 0.1, show_progress=False).erf
        rows[s] = summary(compute_metrics(erf))
        ys, xs = np.nonzero(erf)
        assert ys.max() - ys.min() + 1 == 17 and xs.max() - xs.min() + 1 == 17
    theory = np.sqrt(2 * 4 * (5 * 5 - 1) / 12)  # r_rms of the 4-fold box: sqrt(2 n (k^2 - 1) / 12)
    for s, r in rows.items():
        assert r["r_rms"] == pytest.approx(theory, rel=1e-9)
        for key in ("r20", "r50", "r99"):
            assert r[key] == pytest.approx(rows[33][key], rel=1e-9), (s, key)
        for key in ("gauss_sigma_x", "gauss_sigma_y"):  # a least-squares fit over the whole map: 1 % (0.2 % seen)
            assert r[key] == pytest.approx(rows[33][key], rel=1e-2), (s, key)
        for t in ("20", "50", "99"):
            side = r[f"side@{t}%"]
            assert side == rows[33][f"side@{t}%"]  # the same square in pixels ...
            assert r[f"area@{t}%"] == pytest.approx(100.0 * side * side / (s * s), rel=1e-12)  # ... of a bigger image
    assert rows[129]["area@50%"] == pytest.approx(rows[33]["area@50%"] * (33 / 129) ** 2, rel=1e-12)


def test_parse_sizes_rejects_bad_input():
    assert parse_sizes("224,384") == [224, 384]
    for bad, pattern in (("abc", "comma-separated"), ("0,5", "between 1"), ("-5", "between 1"), ("", "empty"),
                         ("224,224", "duplicate"), ("100000", "between 1")):
        with pytest.raises(ErfLabError, match=pattern):
            parse_sizes(bad)


def test_input_size_sweep_writes_rows_curves_and_the_note(tmp_path):
    res = run_sweep(input_sizes="32,64", model="replknet_31b", reparam="deploy", num_images=1,
                    overrides={"channels": (8, 8, 8, 8), "layers": (1, 1, 1, 1)}, out=tmp_path / "s",
                    formats=("png",), show_progress=False)
    out = tmp_path / "s"
    assert [(r["input_size"], r["reparam"]) for r in res["rows"]] == [(32, "deploy"), (64, "deploy")]
    for name in ("S32-deploy", "S64-deploy"):
        info = json.loads((out / name / "run.json").read_text())
        assert info["tags"]["sweep"]["input_size"] == int(name[1:3]) and info["input_size"] == int(name[1:3])
    rows = list(csv.DictReader(io.StringIO((out / "sweep.csv").read_text())))
    assert [r["input_size"] for r in rows] == ["32", "64"] and "r50" in rows[0]
    assert "size-free" not in rows[0] and "compare r_rms" in (out / "sweep.md").read_text()
    assert (out / "grid.png").is_file() and (out / "growth.png").is_file()
    with pytest.raises(ErfLabError, match="between 1"):
        run_sweep(input_sizes="0,32", out=tmp_path / "bad", show_progress=False)
    with pytest.raises(ErfLabError, match="too small"):
        run_sweep(input_sizes="8", model="replknet_31b", reparam="deploy", num_images=1,
                  overrides={"channels": (8, 8, 8, 8), "layers": (1, 1, 1, 1)}, out=tmp_path / "small",
                  show_progress=False)


def test_kernels_and_input_sizes_together(tmp_path):
    """--kernels with --input-sizes: one run per (K, size); rows grouped by kernel, curves against input size."""
    res = run_sweep([3, 7], input_sizes=[32, 64], reparam="deploy", num_images=1,
                    overrides={"channels": (8, 8, 8, 8), "layers": (1, 1, 1, 1)}, out=tmp_path / "s",
                    formats=("png",), show_progress=False)
    assert [(r["kernel"], r["input_size"]) for r in res["rows"]] == [(3, 32), (3, 64), (7, 32), (7, 64)]
    assert sorted(p.name for p in (tmp_path / "s").iterdir() if p.is_dir()) == [
        "K3-S32-deploy", "K3-S64-deploy", "K7-S32-deploy", "K7-S64-deploy"]
    trf = {(r["kernel"], r["input_size"]): r["trf"] for r in res["rows"]}
    assert trf[(3, 32)] == trf[(3, 64)] < trf[(7, 32)] == trf[(7, 64)]  # the theoretical RF ignores the image size


def test_sweep_tables_give_both_gaussian_sigmas(tmp_path):
    """sweep.csv / sweep.md gave the Gaussian fit's sigma_x alone (beside std_y and std_x): an anisotropic ERF
    (SLaK's 51x5 + 5x51 kernels) lost its other axis, and the README's input-size table (the mean of the two sigmas)
    could not be made from the sweep's own table. Both sigmas are columns now, as in compute's and compare's."""
    run_sweep(input_sizes="32,64", model="replknet_31b", reparam="deploy", num_images=1,
              overrides={"channels": (8, 8, 8, 8), "layers": (1, 1, 1, 1)}, out=tmp_path / "s",
              formats=("png",), show_progress=False)
    out = tmp_path / "s"
    rows = list(csv.DictReader(io.StringIO((out / "sweep.csv").read_text())))
    assert [r["run_dir"] for r in rows] == ["S32-deploy", "S64-deploy"]
    for r in rows:
        fit = json.loads((out / r["run_dir"] / "metrics.json").read_text())["gaussian_fit"]
        assert float(r["gauss_sigma_y"]) == pytest.approx(fit["sigma_y"])
        assert float(r["gauss_sigma_x"]) == pytest.approx(fit["sigma_x"])
    header = (out / "sweep.md").read_text().splitlines()[0]
    assert "| gauss_sigma_y | gauss_sigma_x |" in header

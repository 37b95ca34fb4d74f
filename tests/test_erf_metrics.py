"""ERF metrics against analytic answers and independent brute-force implementations."""
import json
import math

import numpy as np
import pytest
from scipy.signal import convolve2d

from erf_lab.erf.metrics import (PAPER_TABLE10, THRESHOLDS, compute_metrics, distribution_stats, fit_gaussian,
                                 high_contribution_area_ratio, log_normalize, summary)
from erf_lab.errors import ErfLabError
from erf_lab.paths import data_dir


def brute_force(a, t):
    """Independent reference: grow a centred square pixel by pixel with explicit loops."""
    h, w = a.shape
    cy, cx = h // 2, w // 2
    total = 0.0
    for y in range(h):
        for x in range(w):
            total += a[y, x]
    i = 0
    while cy - i >= 0 and cx - i >= 0 and cy + i < h and cx + i < w:
        s = 0.0
        for y in range(cy - i, cy + i + 1):
            for x in range(cx - i, cx + i + 1):
                s += a[y, x]
        if total > 0 and s / total > t:
            return 2 * i + 1
        i += 1
    return None


def official_get_rectangle(data, thresh):
    """The loop of the official erf/analyze_erf.py (starts at side 3, stops before i = h // 2)."""
    h, w = data.shape
    all_sum = np.sum(data)
    for i in range(1, h // 2):
        sel = data[h // 2 - i:h // 2 + 1 + i, w // 2 - i:w // 2 + 1 + i]
        if np.sum(sel) / all_sum > thresh:
            return i * 2 + 1, (i * 2 + 1) / h * (i * 2 + 1) / w
    return None


@pytest.mark.parametrize("shape", [(9, 9), (10, 10), (12, 9), (15, 20)])
def test_area_ratio_matches_brute_force(shape):
    rng = np.random.default_rng(sum(shape))
    y, x = np.mgrid[:shape[0], :shape[1]]
    a = rng.exponential(size=shape) * np.exp(-((y - shape[0] / 2) ** 2 + (x - shape[1] / 2) ** 2) / 20)
    for t in (0.05, 0.2, 0.3, 0.5, 0.8, 0.99):
        for pre in (False, True):
            ref_in = log_normalize(a) if pre else a
            got = high_contribution_area_ratio(a, t, preprocess=pre)
            side = brute_force(ref_in, t)
            assert got["side"] == side and got["reached"] == (side is not None)
            if side is not None:
                assert got["area_ratio"] == pytest.approx(side * side / (shape[0] * shape[1]), rel=1e-15)


@pytest.mark.parametrize("n", [64, 65])
def test_matches_official_script_wherever_it_answers(n):
    rng = np.random.default_rng(n)
    y, x = np.mgrid[:n, :n]
    raw = rng.gamma(2.0, size=(n, n)) * 50 * np.exp(-((y - n / 2) ** 2 + (x - n / 2) ** 2) / (2 * 9.0 ** 2))
    data = np.log10(raw + 1)  # the official preprocessing, written as the script writes it
    data = data / np.max(data)
    np.testing.assert_allclose(log_normalize(raw), data, rtol=0, atol=1e-15)  # the official form: to 2e-17
    answered = 0
    for t in (0.2, 0.3, 0.5, 0.9, 0.99):
        off = official_get_rectangle(data, t)
        got = high_contribution_area_ratio(raw, t)
        if off is not None:
            answered += 1
            assert (got["side"], got["area_ratio"]) == pytest.approx(off, rel=1e-15)
    assert answered >= 4


def test_log_normalize_of_a_map_of_tiny_values_is_not_rounded_away():
    """log10(A + 1) of A ~ 1e-17 (a deep untrained network's map can be that small) was 0 everywhere, as 1 + A
    rounds to 1: the map looked empty and no threshold was reached. For tiny A, log10(1 + A) = A / ln 10 to
    first order, so the preprocessed map is A / max and the area ratios are those of the raw map."""
    y, x = np.mgrid[:33, :33]
    g = np.exp(-((y - 16) ** 2 + (x - 16) ** 2) / (2 * 4.0 ** 2))
    for scale in (1e-17, 1e-15):
        np.testing.assert_allclose(log_normalize(scale * g), g, rtol=1e-9)
        for t in THRESHOLDS:
            assert high_contribution_area_ratio(scale * g, t) == high_contribution_area_ratio(g, t, preprocess=False)


def test_uniform_map_side_grows_as_sqrt_t():
    n = 101
    a = np.full((n, n), 3.0)
    for t in (0.2, 0.25, 0.3, 0.5, 0.9, 0.99):
        s = high_contribution_area_ratio(a, t)["side"]
        expected = math.floor(n * math.sqrt(t)) + 1  # smallest odd side s with s / n > sqrt(t)
        expected += 1 - expected % 2
        assert s == expected
        assert (s / n) ** 2 > t >= ((s - 2) / n) ** 2
    assert high_contribution_area_ratio(a, 0.25)["side"] == 51  # 51^2 / 101^2 = 0.255 > 0.25 >= 49^2/101^2


def test_delta_gives_side_one():
    for shape in [(7, 7), (8, 8), (33, 21)]:
        a = np.zeros(shape)
        a[shape[0] // 2, shape[1] // 2] = 5.0
        for t in (0.2, 0.99):
            r = high_contribution_area_ratio(a, t)
            assert r["side"] == 1 and r["area_ratio"] == 1 / (shape[0] * shape[1])


def test_strictly_greater_at_exact_boundary():
    a = np.ones((5, 5))
    a[2, 2] = 24.0  # centre holds exactly 24 / 48 = 0.5 of the total
    assert high_contribution_area_ratio(a, 0.5, preprocess=False)["side"] == 3  # 0.5 is not > 0.5
    assert high_contribution_area_ratio(a, 0.4999, preprocess=False)["side"] == 1
    assert high_contribution_area_ratio(a, 1.0, preprocess=False)["reached"] is False  # full map share == 1.0


def test_threshold_never_reached_on_even_map():
    # Even 4x4: centre (2, 2) as in the official script, so the largest centred square is rows/cols 1..3 and
    # row 0 / column 0 are never inside it. Put exactly half of the mass there: share tops out at 0.5.
    a = np.full((4, 4), 9.0)
    a[1:, 1:] = 7.0
    r = high_contribution_area_ratio(a, 0.5, preprocess=False)
    assert r == {"threshold": 0.5, "side": None, "area_ratio": None, "reached": False}
    assert high_contribution_area_ratio(a, 0.49, preprocess=False)["side"] == 3
    # all the mass on the border row: nothing is ever reached, and compute_metrics flags it without crashing
    b = np.zeros((6, 6))
    b[0, :] = 100.0
    m = compute_metrics(b)
    assert [e["reached"] for e in m["high_contribution"]] == [False] * 4
    assert "threshold_0.99_not_reached" in m["flags"]
    assert json.loads(json.dumps(m))["high_contribution"][3]["side"] is None


def test_empty_map_is_flagged_not_crashing():
    m = compute_metrics(np.zeros((8, 8)), theoretical_rf=20)
    assert "empty_map" in m["flags"] and m["distribution"] is None and m["gaussian_fit"] is None
    assert m["erf_to_trf"]["rms_diameter"] is None


def test_gaussian_fit_recovers_sigmas_within_1_percent():
    rng = np.random.default_rng(0)
    h, w = 96, 80
    y, x = np.mgrid[:h, :w]
    sy, sx = 7.5, 12.0
    g = 40.0 * np.exp(-((y - 50.3) ** 2 / (2 * sy ** 2) + (x - 37.6) ** 2 / (2 * sx ** 2)))
    noisy = np.clip(g + rng.normal(0, 0.2, g.shape), 0, None)
    fit = fit_gaussian(noisy)
    assert fit["converged"]
    assert fit["sigma_y"] == pytest.approx(sy, rel=0.01) and fit["sigma_x"] == pytest.approx(sx, rel=0.01)
    assert fit["center"] == pytest.approx([50.3, 37.6], abs=0.1)
    assert fit["r2"] > 0.99
    assert fit_gaussian(np.ones((20, 20)) + np.eye(20))["r2"] < 0.5  # a non-Gaussian map fits badly


def _scipy_gaussian_fit(a):
    """Reference: the same model, start and bounds through scipy's dense trust-region least squares."""
    from scipy.optimize import least_squares

    z = a / a.max()
    h, w = z.shape
    ys, xs = np.arange(h, dtype=float), np.arange(w, dtype=float)
    st = distribution_stats(a)
    p0 = [1.0, *st["center_of_mass"], max(st["std"]["y"], 0.5), max(st["std"]["x"], 0.5), 0.0]

    def resid(p):
        amp, y0, x0, sy, sx, c = p
        return (amp * np.outer(np.exp(-0.5 * ((ys - y0) / sy) ** 2), np.exp(-0.5 * ((xs - x0) / sx) ** 2))
                + c - z).ravel()

    res = least_squares(resid, p0, bounds=([0, -h, -w, 1e-3, 1e-3, -1], [np.inf, 2 * h, 2 * w, 10 * h, 10 * w, 1]),
                        x_scale="jac", ftol=1e-12, xtol=1e-12, gtol=1e-12, max_nfev=2000)
    return res.x, 1 - np.sum(res.fun ** 2) / np.sum((z - z.mean()) ** 2)


@pytest.mark.parametrize("case", ["gaussian_offset", "heavy_tailed", "luo_stack", "noise"])
def test_separable_gaussian_fit_finds_the_dense_least_squares_optimum(case):
    """fit_gaussian's separable Levenberg-Marquardt reaches the optimum of scipy's dense least squares."""
    rng = np.random.default_rng(7)
    y, x = np.mgrid[:70, :90].astype(float)
    if case == "gaussian_offset":
        a = 3 * np.exp(-((y - 30.2) ** 2 / 50 + (x - 51.7) ** 2 / 200)) + 0.4
    elif case == "heavy_tailed":  # an ERF-like core with 1/r^2 tails, plus noise
        a = 1 / (1 + ((y - 35) ** 2 + (x - 45) ** 2) / 30) + np.exp(-((y - 35) ** 2 + (x - 45) ** 2) / 8)
        a = np.abs(a + rng.normal(0, 0.01, a.shape))
    elif case == "luo_stack":  # a box convolved 5 times (Luo et al.): nearly Gaussian
        a = np.zeros((70, 90))
        a[35, 45] = 1.0
        for _ in range(5):
            a = convolve2d(a, np.ones((7, 9)), mode="same")
    else:
        a = rng.random((70, 90))
    fit = fit_gaussian(a)
    ref, ref_r2 = _scipy_gaussian_fit(a)
    got = np.array([fit["amplitude"], *fit["center"], fit["sigma_y"], fit["sigma_x"], fit["offset"]])
    if case == "noise":  # no Gaussian in it: both fits explain (almost) nothing
        assert fit["r2"] < 0.01 and ref_r2 < 0.01
        return
    assert fit["converged"]
    assert fit["r2"] >= ref_r2 - 1e-9  # never a worse optimum
    assert np.allclose(got, ref, rtol=1e-4, atol=1e-6), (got, ref)  # a well-posed fit: the same parameters


@pytest.mark.parametrize("ky,kx,n", [(5, 5, 4), (3, 7, 3)])
def test_std_of_box_convolution_matches_theory(ky, kx, n):
    """n stacked uniform ky x kx kernels: variance n (k^2 - 1) / 12 per axis (Luo et al. 2016)."""
    size = 2 * n * max(ky, kx) + 11
    a = np.zeros((size, size))
    a[size // 2, size // 2] = 1.0
    box = np.ones((ky, kx)) / (ky * kx)
    for _ in range(n):
        a = convolve2d(a, box, mode="same")
    d = distribution_stats(a)
    assert d["std"]["y"] == pytest.approx(math.sqrt(n * (ky ** 2 - 1) / 12), rel=1e-9)
    assert d["std"]["x"] == pytest.approx(math.sqrt(n * (kx ** 2 - 1) / 12), rel=1e-9)
    assert d["r_rms"] == pytest.approx(math.hypot(d["std"]["y"], d["std"]["x"]), rel=1e-12)
    assert d["center_of_mass"] == pytest.approx([size // 2, size // 2], abs=1e-9)


def test_r50_of_isotropic_gaussian():
    s = 10.0
    y, x = np.mgrid[:121, :121]
    g = np.exp(-((y - 60) ** 2 + (x - 60) ** 2) / (2 * s ** 2))
    d = distribution_stats(g)
    assert d["r50"] == pytest.approx(s * math.sqrt(2 * math.log(2)), abs=0.6)  # Rayleigh median
    assert d["r90"] == pytest.approx(s * math.sqrt(2 * math.log(10)), abs=0.6)
    assert d["r_rms"] == pytest.approx(s * math.sqrt(2), rel=1e-3)


def test_erf_to_theoretical_rf_ratio():
    y, x = np.mgrid[:64, :64]
    g = 100 * np.exp(-((y - 32) ** 2 + (x - 32) ** 2) / (2 * 6.0 ** 2))
    m = compute_metrics(g, theoretical_rf=99)
    r = m["erf_to_trf"]
    assert r["rms_diameter"] == pytest.approx(2 * m["distribution"]["r_rms"] / 99, rel=1e-12)
    for e in m["high_contribution"]:
        assert r[f"side_at_{e['threshold']:g}"] == pytest.approx(e["side"] / 99)
    s = summary(m)
    assert s["erf/trf"] == r["rms_diameter"] and s["area@50%"] == pytest.approx(100 * m["high_contribution"][2]["area_ratio"])
    with pytest.raises(ErfLabError):
        compute_metrics(g, theoretical_rf=0)
    # a theoretical RF wider than the image (31B at 1024 px: 9011 px): the ERF is cut by the image's edge, so the
    # ratios are bounded by the input size; flagged, where 99 px on this 64 px map had been as unmarked as 63 px
    assert "theoretical_rf_exceeds_map" in m["flags"]
    assert "theoretical_rf_exceeds_map" not in compute_metrics(g, theoretical_rf=63)["flags"]
    assert "theoretical_rf_exceeds_map" not in compute_metrics(g)["flags"]
    # a non-square map is cut along its shorter side: 63 px on 32 x 128 does not fit its 32 rows
    y, x = np.mgrid[:32, :128]
    wide = np.exp(-((y - 16) ** 2 + (x - 64) ** 2) / 50.0)
    assert "theoretical_rf_exceeds_map" in compute_metrics(wide, theoretical_rf=63)["flags"]
    assert "theoretical_rf_exceeds_map" not in compute_metrics(wide, theoretical_rf=31)["flags"]


@pytest.mark.parametrize("bad", [np.full((4, 4), np.nan), np.zeros((2, 3, 3)), -np.ones((4, 4)), np.zeros((0, 5))])
def test_bad_maps_raise_clear_errors(bad):
    with pytest.raises(ErfLabError):
        compute_metrics(bad)


def test_bad_threshold():
    with pytest.raises(ErfLabError):
        high_contribution_area_ratio(np.ones((5, 5)), 1.5)


def test_paper_reference_lines_up_with_our_metrics():
    """Table 10's columns are the thresholds compute_metrics uses, in its order, in the unit summary() reports:
    a uniform 1024^2 map (the paper's input size) gives sides by hand (smallest odd s with s^2 > t * 1024^2)."""
    ref = json.loads((data_dir() / "paper_reference.json").read_text())
    assert "CVPR 2022" in ref["source"] and "Table 10" in ref["source"] and ref["input_size"] == 1024
    assert tuple(ref["thresholds"]) == THRESHOLDS
    assert PAPER_TABLE10["RepLKNet-31"] == [15.0, 23.4, 41.4, 98.6]  # the paper's: see test_table10_is_the_papers_*
    n = ref["input_size"]
    s = summary(compute_metrics(np.ones((n, n)), gaussian=False))
    sides = [459, 561, 725, 1019]
    for t, side in zip(ref["thresholds"], sides):
        assert side % 2 == 1 and (side - 2) ** 2 <= t * n * n < side ** 2  # hand-derived, checked here
        key = f"{round(t * 100)}%"
        assert s[f"side@{key}"] == side and s[f"area@{key}"] == pytest.approx(100 * side ** 2 / n ** 2, rel=1e-12)
    # a delta: everything in the centre pixel, the smallest possible area at every threshold
    delta = np.zeros((n, n))
    delta[n // 2, n // 2] = 5.0
    d = summary(compute_metrics(delta, gaussian=False))
    assert [d[f"area@{round(t * 100)}%"] for t in ref["thresholds"]] == [100 / n ** 2] * 4


def test_table10_is_the_papers_and_a_caveat_shows_only_while_a_transcription_is_unchecked(monkeypatch):
    """The shipped Table 10 is the paper's: every cell as printed on page 8 of the arXiv version the authors put in
    their repository (read 2026-12-05), so outputs show it without a caveat; a table marked unchecked in the data
    would carry its caveat into every output that shows it."""
    import erf_lab.erf.metrics as M
    from erf_lab.erf.tables import metrics_text

    assert PAPER_TABLE10 == {"ResNet-101": [1.0, 1.7, 3.5, 23.4], "ResNet-152": [1.3, 2.1, 4.5, 34.9],
                             "RepLKNet-13": [10.2, 15.8, 28.5, 96.3], "RepLKNet-31": [15.0, 23.4, 41.4, 98.6]}
    ref = M.paper_reference()
    t = ref["transcription"]
    assert t["checked_against_paper"] is True and "page 8" in t["checked"] and M.paper_caveat() == ""
    (d,) = t["resolved_disagreements"]  # a third-party reading that disagreed: the paper's cell is shipped
    assert PAPER_TABLE10[d["model"]][ref["thresholds"].index(d["threshold"])] == d["paper"] != d["elsewhere"]
    text = metrics_text(compute_metrics(np.ones((64, 64)), gaussian=False))
    assert "98.6" in text and "not yet checked" not in text
    unchecked = {**ref, "transcription": {"checked_against_paper": False, "caveat": "paper rows: not yet checked"}}
    monkeypatch.setattr(M, "_load_paper_reference", lambda: unchecked)
    assert M.paper_caveat() == "paper rows: not yet checked"
    assert "paper rows: not yet checked" in metrics_text(compute_metrics(np.ones((64, 64)), gaussian=False))


def _noisy_plateau(n=64, seed=0):
    """A near-flat map with noise (a random-init ERF at a small input size looks like this): no Gaussian in it."""
    return 1.0 + 0.1 * np.random.default_rng(seed).random((n, n))


def test_a_gaussian_fit_of_a_noisy_plateau_is_flagged_not_meaningful_and_keeps_its_numbers():
    from erf_lab.erf.tables import markdown_table, metrics_text, table_rows

    m = compute_metrics(_noisy_plateau())
    g = m["gaussian_fit"]
    assert g["meaningful"] is False and "gaussian_fit_not_meaningful" in m["flags"]
    assert g["r2"] < 0.01 and f"R^2 {g['r2']:.3f} < 0.5" in g["reason"]  # explains nothing of the map
    assert max(g["sigma_y"], g["sigma_x"]) > 64 and "exceeds the map's" in g["reason"]  # wider than the map
    assert "at its" in g["reason"] and "bound" in g["reason"]  # the optimizer ran into a bound
    assert isinstance(g["sigma_x"], float) and g["sigma_x"] > 0  # the numbers are kept
    text = metrics_text(m)
    assert "Gaussian fit NOT MEANINGFUL" in text and "Gaussian fit: sigma" not in text
    s = summary(m)
    assert s["gauss_fit"] == "n/m" and s["gauss_sigma_x"] == g["sigma_x"]
    row = markdown_table(table_rows([("flat", m)], with_paper=False)).splitlines()[2]
    assert f"n/m ({g['sigma_x']:.4g})" in row and f"n/m ({g['r2']:.4g})" in row


def test_a_gaussian_fit_of_a_gaussian_stays_valid_and_unflagged():
    from erf_lab.erf.tables import gauss_note, metrics_text

    y, x = np.mgrid[:64, :64]
    a = 50.0 * np.exp(-((y - 32) ** 2 / (2 * 5.0 ** 2) + (x - 32) ** 2 / (2 * 8.0 ** 2)))
    a = np.clip(a + np.random.default_rng(1).normal(0, 0.2, a.shape), 0, None)
    m = compute_metrics(a)
    g = m["gaussian_fit"]
    assert g["meaningful"] is True and g["reason"] is None and "gaussian_fit_not_meaningful" not in m["flags"]
    assert g["sigma_y"] == pytest.approx(5.0, rel=0.02) and g["sigma_x"] == pytest.approx(8.0, rel=0.02)
    assert summary(m)["gauss_fit"] == "ok" and gauss_note([("g", m)]) == ""
    assert f"Gaussian fit: sigma (y, x) = {g['sigma_y']:.2f}, {g['sigma_x']:.2f} px" in metrics_text(m)


def test_gaussian_fit_problems_one_reason_each():
    """Each check alone: a parameter on its bound, a sigma wider than the map (even with R^2 = 1), a low R^2."""
    from erf_lab.erf.metrics import gaussian_fit_problems

    lo, hi = [0, -40, -40, 1e-3, 1e-3, -1], [np.inf, 80, 80, 400, 400, 1]
    good = [1.0, 20.0, 20.0, 4.0, 6.0, 0.0]
    assert gaussian_fit_problems(good, lo, hi, (40, 40), 0.95) == []
    assert gaussian_fit_problems(good[:5] + [-1.0], lo, hi, (40, 40), 0.95) == ["offset at its lower bound -1"]
    assert gaussian_fit_problems([0.0] + good[1:], lo, hi, (40, 40), 0.95) == ["amplitude at its lower bound 0"]
    assert gaussian_fit_problems(good, lo, hi, (40, 40), 0.49) == ["R^2 0.490 < 0.5"]
    assert gaussian_fit_problems(good, lo, hi, (40, 40), 0.5) == []  # the threshold itself passes
    wide = good[:4] + [41.0, 0.0]
    assert gaussian_fit_problems(wide, lo, hi, (40, 40), 1.0) == ["sigma_x 41.0 px exceeds the map's width 40 px"]
    # a perfect but wider-than-the-map bell: the map shows only its top, the sigma is an extrapolation
    y, x = np.mgrid[:64, :64]
    broad = fit_gaussian(np.exp(-((y - 32) ** 2 + (x - 32) ** 2) / (2 * 80.0 ** 2)))
    assert broad["r2"] > 0.999 and broad["meaningful"] is False and "exceeds the map's height 64 px" in broad["reason"]
    narrow = good[:3] + [0.3, 6.0, 0.0]
    assert gaussian_fit_problems(narrow, lo, hi, (40, 40), 0.95) == [
        "sigma_y 0.30 px is under half a pixel: narrower than the map's sampling"]
    # a delta (all the ERF in one pixel) fits any bell narrower than a pixel: it was "meaningful", sigma 0.12 px
    delta = np.zeros((33, 33))
    delta[16, 16] = 1.0
    fit = fit_gaussian(delta)
    assert fit["meaningful"] is False and "under half a pixel" in fit["reason"], fit


def test_the_console_text_shows_a_small_reached_area_as_a_number_not_as_zero():
    """A delta ERF on a 512 px map: side 1, 1 / 512^2 = 3.8e-4 % of the map. The text of ``erf-lab analyze``
    printed it as "0.00" (two decimals), an area of zero beside "side 1"; now as the tables print it (4 digits)."""
    from erf_lab.erf.tables import metrics_text

    a = np.zeros((512, 512))
    a[256, 256] = 1.0
    lines = [ln.split() for ln in metrics_text(compute_metrics(a, gaussian=False)).splitlines()]
    rows = [ln for ln in lines if ln and ln[0] in ("20%", "30%", "50%", "99%")]
    assert len(rows) == 4 and all(r[1] == "1" and r[2] == f"{100 / 512 ** 2:.4g}" == "0.0003815" for r in rows)
    text = metrics_text(compute_metrics(np.ones((65, 65)), gaussian=False))  # an ordinary area: as before
    assert ["20%", "31", "22.75", "|"] == [ln.split()[:4] for ln in text.splitlines() if ln.split()[:1] == ["20%"]][0]


def test_a_torch_map_that_requires_grad_or_is_bfloat16_gives_the_numpy_maps_metrics():
    """A map straight from a notebook's autograd (requires_grad) raised torch's "Can't call numpy() on Tensor that
    requires grad", a bfloat16 / float16 one "Got unsupported ScalarType BFloat16"; they are the same map."""
    import torch

    y, x = np.mgrid[:33, :41]
    a = np.exp(-((y - 16) ** 2 + (x - 20) ** 2) / 50.0)
    a = torch.tensor(a, dtype=torch.bfloat16).double().numpy()  # values a bfloat16 holds exactly
    ref = compute_metrics(a)
    for t in (torch.tensor(a, requires_grad=True), torch.tensor(a).to(torch.bfloat16),
              torch.tensor(a).half(), torch.tensor(a).float().requires_grad_(True)):
        got = compute_metrics(t)
        assert got["high_contribution"] == ref["high_contribution"]
        # float16 flushes the tails below 6e-8 to zero: equal to 1e-6
        assert got["distribution"]["r_rms"] == pytest.approx(ref["distribution"]["r_rms"], rel=1e-6)
        assert got["peak"] == ref["peak"] and got["total"] == pytest.approx(ref["total"], rel=1e-6)
    with pytest.raises(ErfLabError, match="2-D"):
        compute_metrics(torch.zeros(2, 3, 4, requires_grad=True))

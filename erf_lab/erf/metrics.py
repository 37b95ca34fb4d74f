"""Quantitative ERF measures: the RepLKNet high-contribution area ratio plus spread, radius and Gaussian fit.

The area ratio follows Ding et al., "Scaling Up Your Kernels to 31x31", CVPR 2022, Appendix (Table 10) and the
official ``erf/analyze_erf.py``: the contribution map A is rescaled to A' = log10(A + 1) / max(log10(A + 1)),
then for a threshold t the smallest centred square whose sum exceeds t of the total is reported.
The spread measures follow Luo et al., "Understanding the Effective Receptive Field", NeurIPS 2016.
"""
from __future__ import annotations

import json
import math
from functools import lru_cache

import numpy as np

from erf_lab.errors import ErfLabError

THRESHOLDS = (0.2, 0.3, 0.5, 0.99)
RADIUS_SHARES = (0.2, 0.5, 0.9, 0.99)
MASS_RADII = (5, 10, 20, 40, 80)  # px, the OpenERF-style mass-within-radius curve
SUMMARY_MASS_RADII = (20, 80)
#: a Gaussian fit of A / max with R^2 below this explains less than half of the map's variance: its sigma then
#: describes the fitted curve, not the map, and is reported as not meaningful (with its numbers kept)
GAUSS_MIN_R2 = 0.5
#: the marker of a not-meaningful Gaussian fit in tables (``gauss_fit`` column and beside the sigmas)
NOT_MEANINGFUL = "n/m"
#: why a layer's theoretical RF is global (``rf_global``), as every table, page and message says it
GLOBAL_RF_REASON = ("every input pixel reaches the measured layer through a pooling, normalization or attention over "
                    "the whole map (squeeze-and-excitation, GRN, GroupNorm, a ViT's self-attention) or a Linear over "
                    "the flattened map")
#: why a ratio to the theoretical RF (``erf/trf``) is no property of the network where that RF is wider than the
#: image (flag ``theoretical_rf_exceeds_map``); sweep.md and the app say it beside such a ratio
TRF_EXCEEDS_MAP_NOTE = ("the ERF is cut by the image's edge, so the ratio is bounded by the input size, not a "
                        "property of the network alone")


def kernels_alone(info: dict) -> str:
    """The clause after :data:`GLOBAL_RF_REASON` naming the RF of a global layer's kernels alone (``kernel_rf`` of a
    layer row or a run.json): "; its kernels alone reach N px", or "" where they have none (the layer follows window
    attention or a resampling: an SE or a ViTDet's global attention after windowed blocks)."""
    return f"; its kernels alone reach {info['kernel_rf']} px" if info.get("kernel_rf") is not None else ""


def validate_erf(erf) -> np.ndarray:
    """Return ``erf`` as a 2-D float64 array; ErfLabError for wrong rank, empty, non-finite or negative maps.
    A torch tensor may be on any device, in any dtype (bfloat16 / float16 too) and require grad."""
    from erf_lab.io import as_array

    a = as_array(erf)
    if a.dtype == object or not np.issubdtype(a.dtype, np.number) or np.iscomplexobj(a):
        raise ErfLabError(f"ERF map must be numeric, got dtype {a.dtype}")
    a = a.astype(np.float64, copy=False)
    if a.ndim != 2:
        raise ErfLabError(f"ERF map must be 2-D (H, W), got shape {tuple(a.shape)}")
    if a.size == 0:
        raise ErfLabError("ERF map is empty (size 0)")
    if not np.isfinite(a).all():
        raise ErfLabError(f"ERF map has {int((~np.isfinite(a)).sum())} non-finite values (NaN/inf)")
    if a.min() < 0:
        raise ErfLabError(f"ERF map has negative values (min {a.min():.3g}); metrics need a non-negative "
                          "contribution map (aggregate 'relu' or 'abs')")
    return a


def log10_1p(a) -> np.ndarray:
    """log10(A + 1), computed as log1p(A) / ln 10: the official ``np.log10(A + 1)`` to an ulp for ordinary maps, but
    exact where A is under ~1e-12 (an untrained network's map can be: 1 + A rounds A to a multiple of 2.2e-16, so
    a map of 1e-17 became all zero and one of 1e-15 a few steps)."""
    return np.log1p(np.asarray(a, dtype=np.float64)) / np.log(10.0)


def log_normalize(erf) -> np.ndarray:
    """A' = log10(A + 1) / max (Ding et al. 2022, App.; official analyze_erf.py; :func:`log10_1p`). An all-zero
    map stays zero."""
    a = log10_1p(erf)
    m = a.max()
    return a / m if m > 0 else a


def _centre_and_max_half(h: int, w: int, centre=None) -> tuple[int, int, int]:
    """The squares' centre: ``centre`` (y, x), else (h//2, w//2) as in the official script; and the largest
    half-width i whose square fits in the map."""
    cy, cx = (h // 2, w // 2) if centre is None else (int(centre[0]), int(centre[1]))
    if not (0 <= cy < h and 0 <= cx < w):
        raise ErfLabError(f"ERF centre ({cy}, {cx}) lies outside the {h} x {w} map")
    return cy, cx, min(cy, cx, h - 1 - cy, w - 1 - cx)


def target_centre(rf_start, stride, input_size, feature_hw=None) -> list[int] | None:
    """The input pixel (y, x) at the centre of the measured unit's receptive field: the unit (h//2, w//2) of the
    layer's h x w map (``feature_hw``; without it the "same"-padded side ceil(S / stride) per axis; ``input_size``:
    the side S of a square input or its (H, W)), centred at
    ``rf_start + stride * (h // 2)`` per axis (``stride``: one number or (y, x); ``erf_lab.erf.receptive_field``),
    rounded half up; None when that falls
    outside the image (then the metrics take the map's middle). For RepLKNet at 1024 px (a 32 x 32 map: unit 16 at
    512) it is the official script's S // 2; where the map's side is odd (224 px: unit 3 of 7, at 96) or the stem
    patchifies (a 4 x 4 stride-4 stem: 15.5 + 32 i) the map's middle misses the ERF by up to stride / 2 px."""
    strides = [int(v) for v in stride] if isinstance(stride, (list, tuple)) else [int(stride)] * 2
    sizes = [int(v) for v in input_size] if isinstance(input_size, (list, tuple)) else [int(input_size)] * 2
    hw = feature_hw if feature_hw is not None else [-(-n // s) for n, s in zip(sizes, strides)]
    centre = [int(math.floor(float(s) + j * (int(n) // 2) + 0.5)) for s, j, n in zip(rf_start, strides, hw)]
    return centre if all(0 <= c < n for c, n in zip(centre, sizes)) else None


def contribution_curve(erf, *, preprocess: bool = True, centre=None) -> np.ndarray:
    """share[i] = sum of the centred (2i+1)^2 square / total sum, for i = 0 .. largest square that fits.

    Squares are centred on ``centre`` (y, x): the measured unit's receptive-field centre (:func:`target_centre`)
    where known, else (H//2, W//2) like the official script, so for even sizes the centre is the
    lower-right of the four central pixels and the largest square has side H-1 (the first row and column
    are never inside any square, exactly as in the official ``get_rectangle``).
    """
    a = validate_erf(erf)
    if preprocess:
        a = log_normalize(a)
    h, w = a.shape
    cy, cx, imax = _centre_and_max_half(h, w, centre)
    total = np.sum(a)
    sums = np.array([np.sum(a[cy - i:cy + i + 1, cx - i:cx + i + 1]) for i in range(imax + 1)])
    if total <= 0:
        return np.zeros_like(sums)
    return sums / total


def high_contribution_area_ratio(erf, t: float, *, preprocess: bool = True, centre=None) -> dict:
    """Smallest centred odd square whose share of the total is strictly greater than ``t``.

    Returns ``{"threshold", "side", "area_ratio", "reached"}`` with area_ratio = side^2 / (H W)
    (Ding et al. 2022, Table 10: r = side^2 / area). When no square that fits in the map exceeds ``t``
    (e.g. t >= 1, an all-zero map, or mass on the border row of an even-sized map), side and area_ratio
    are None and reached is False. ``preprocess`` applies A' = log10(A+1)/max first (the paper's setting).

    Matches the official ``get_rectangle`` wherever its loop gives an answer, except where the centre pixel
    alone holds more than ``t``: it also tests side 1 (the official loop starts at side 3), so a delta map gives
    side 1 instead of 3; and, for odd sizes, the full map (the official loop stops two pixels short).
    """
    t = float(t)
    if not 0 <= t <= 1:
        raise ErfLabError(f"threshold must be in [0, 1], got {t}")
    curve = contribution_curve(erf, preprocess=preprocess, centre=centre)
    h, w = np.shape(erf)
    hits = np.nonzero(curve > t)[0]
    if hits.size == 0:
        return {"threshold": t, "side": None, "area_ratio": None, "reached": False}
    side = 2 * int(hits[0]) + 1
    return {"threshold": t, "side": side, "area_ratio": side * side / (h * w), "reached": True}


def distribution_stats(erf, shares=RADIUS_SHARES) -> dict | None:
    """Spread of the raw map treated as a 2-D distribution p = A / sum(A) (Luo et al. 2016).

    - ``center_of_mass`` (y, x) and ``std`` per axis about it (pixels); for n stacked k x k uniform
      kernels the theory gives std = sqrt(n (k^2 - 1) / 12) per axis.
    - ``r_rms`` = sqrt(E[(y-cy)^2 + (x-cx)^2]) = sqrt(std_y^2 + std_x^2), the effective radius.
    - ``r{NN}`` = radius of the smallest disk about the centre of mass holding at least NN% of the mass.
    Returns None for an all-zero map.
    """
    a = validate_erf(erf)
    total = a.sum()
    if total <= 0:
        return None
    p = a / total
    h, w = a.shape
    py, px = p.sum(axis=1), p.sum(axis=0)
    ys, xs = np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64)
    cy, cx = float(py @ ys), float(px @ xs)
    vy, vx = float(py @ (ys - cy) ** 2), float(px @ (xs - cx) ** 2)
    out = {"center_of_mass": [cy, cx], "std": {"y": math.sqrt(vy), "x": math.sqrt(vx)},
           "r_rms": math.sqrt(vy + vx)}
    d2 = (ys[:, None] - cy) ** 2 + (xs[None, :] - cx) ** 2
    order = np.argsort(d2, axis=None, kind="stable")
    cum = np.cumsum(p.ravel()[order])
    for s in shares:
        k = min(int(np.searchsorted(cum, s - 1e-12)), cum.size - 1)
        out[f"r{round(s * 100)}"] = math.sqrt(float(d2.ravel()[order[k]]))
    return out


def mass_within_radii(erf, radii=MASS_RADII, centre=None) -> dict[str, float] | None:
    """Share of the raw ERF mass on pixels within Euclidean distance r (px) of ``centre`` (default (H//2, W//2)),
    for each r: ``{"5": 0.12, ...}`` (OpenERF-style curve; pixels count by their centre). None for an all-zero map.
    Size-free like r50, unlike the paper's area ratios (fractions of the map area)."""
    a = validate_erf(erf)
    total = a.sum()
    if total <= 0:
        return None
    h, w = a.shape
    cy, cx, _ = _centre_and_max_half(h, w, centre)
    ys, xs = np.arange(h) - cy, np.arange(w) - cx
    d2 = ys[:, None] ** 2 + xs[None, :] ** 2
    return {f"{r:g}": float(a[d2 <= r * r].sum() / total) for r in radii}


def fit_gaussian(erf, stats: dict | None = None) -> dict | None:
    """Least-squares fit of an axis-aligned 2-D Gaussian a exp(-(x-x0)^2/2sx^2 - (y-y0)^2/2sy^2) + c to A / max.

    Returns sigma_y, sigma_x (pixels), center (y, x), amplitude, offset, R^2 (on A / max) and whether the
    optimizer converged; None for an all-zero map. Luo et al. (2016) show ERFs are approximately Gaussian.
    ``meaningful`` is False and ``reason`` says why when the fit is degenerate (:func:`gaussian_fit_problems`).
    ``stats``: the map's ``distribution_stats`` when the caller has them (the start point), else computed.

    Levenberg-Marquardt on the separable structure: every Jacobian column is an outer product u_k v_k^T, so
    J^T J = (U^T U) * (V^T V) and J^T r = diag(U^T R V) cost O(H W) per step without forming the (H W x 6)
    Jacobian (a 1024^2 map: ~0.2 s instead of 7 s through scipy's dense least_squares, same optimum).
    """
    a = validate_erf(erf)
    m = a.max()
    if m <= 0:
        return None
    z = a / m
    h, w = z.shape
    stats = stats or distribution_stats(a)
    cy, cx = stats["center_of_mass"]
    p0 = np.array([1.0, cy, cx, max(stats["std"]["y"], 0.5), max(stats["std"]["x"], 0.5), 0.0])
    lo = np.array([0.0, -h, -w, 1e-3, 1e-3, -1.0])
    hi = np.array([np.inf, 2 * h, 2 * w, 10 * h, 10 * w, 1.0])
    p, resid, converged = _separable_gaussian_lm(z, p0, lo, hi)
    amp, y0, x0, sy, sx, c = (float(v) for v in p)
    ss_res = float(np.sum(resid ** 2))
    ss_tot = float(np.sum((z - z.mean()) ** 2))
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else None
    problems = gaussian_fit_problems(p, lo, hi, (h, w), r2)
    return {"sigma_y": sy, "sigma_x": sx, "center": [y0, x0], "amplitude": amp, "offset": c,
            "r2": r2, "converged": bool(converged), "meaningful": not problems,
            "reason": "; ".join(problems) if problems else None}


_GAUSS_PARAMS = ("amplitude", "centre y", "centre x", "sigma_y", "sigma_x", "offset")


def gaussian_fit_problems(p, lo, hi, shape, r2) -> list[str]:
    """Why a fitted Gaussian (p = amp, y0, x0, sy, sx, c within [lo, hi]) does not describe the map (empty: it does).

    - a parameter at its bound: the optimum lies outside the model's allowed range, so the fit is degenerate
      (e.g. offset -1 with a huge amplitude and sigma: a flat map fitted by the top of a very wide bell);
    - a sigma larger than the map's side: the bell is wider than the map, only its flat top was seen;
    - a sigma under half a pixel: the bell is narrower than the map's sampling (a delta fits any such sigma);
    - R^2 < :data:`GAUSS_MIN_R2` (or undefined for a constant map): the Gaussian explains too little of the map.
    """
    h, w = shape
    out = []
    for name, v, a, b in zip(_GAUSS_PARAMS, p, lo, hi):
        for side, bound in (("lower", a), ("upper", b)):
            if np.isfinite(bound) and abs(float(v) - float(bound)) <= 1e-6 * max(1.0, abs(float(bound))):
                out.append(f"{name} at its {side} bound {float(bound):g}")
    for name, v, side in (("sigma_y", p[3], h), ("sigma_x", p[4], w)):
        if v > side:
            out.append(f"{name} {float(v):.1f} px exceeds the map's {'height' if name == 'sigma_y' else 'width'} "
                       f"{side} px")
        elif v < 0.5:
            out.append(f"{name} {float(v):.2f} px is under half a pixel: narrower than the map's sampling")
    if r2 is None:
        out.append("R^2 undefined (constant map)")
    elif r2 < GAUSS_MIN_R2:
        out.append(f"R^2 {r2:.3f} < {GAUSS_MIN_R2:g}")
    return out


def gaussian_fit_ok(fit: dict | None) -> bool | None:
    """True for a meaningful Gaussian fit, False for a flagged one, None without a fit. Fits stored before the
    ``meaningful`` key existed count as meaningful only when R^2 >= :data:`GAUSS_MIN_R2`."""
    if not fit:
        return None
    if "meaningful" in fit:
        return bool(fit["meaningful"])
    return fit.get("r2") is not None and fit["r2"] >= GAUSS_MIN_R2


def _separable_gaussian_lm(z: np.ndarray, p: np.ndarray, lo: np.ndarray, hi: np.ndarray, max_iter: int = 500,
                           tol: float = 1e-12) -> tuple[np.ndarray, np.ndarray, bool]:
    """Minimize ||amp gy gx^T + c - z||^2 over p = (amp, y0, x0, sy, sx, c) within [lo, hi] (see fit_gaussian);
    returns (p, residual map, converged). The widths are optimized as log(sigma) (positive by construction, no
    collapse onto the lower bound from a far start)."""
    h, w = z.shape
    ys, xs = np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64)
    widths = slice(3, 5)                                      # sy, sx are held as logarithms

    def to_q(v):
        q = np.array(v, dtype=np.float64)
        q[widths] = np.log(q[widths])
        return q

    def params(q):
        v = q.copy()
        v[widths] = np.exp(q[widths])
        return v

    qlo, qhi = to_q(lo), to_q(hi)

    def evaluate(q):
        amp, y0, x0, sy, sx, c = params(q)
        dy, dx = ys - y0, xs - x0
        gy, gx = np.exp(-0.5 * (dy / sy) ** 2), np.exp(-0.5 * (dx / sx) ** 2)
        r = amp * np.outer(gy, gx) + (c - z)
        return r, float(np.vdot(r, r)), (gy, gx, dy, dx)

    q = to_q(np.clip(p, lo, hi))
    r, cost, parts = evaluate(q)
    lam, converged = 1e-2, False
    one_h, one_w = np.ones(h), np.ones(w)
    for _ in range(max_iter):
        gy, gx, dy, dx = parts
        amp, _, _, sy, sx, _ = params(q)
        # Jacobian columns u_k v_k^T w.r.t. (amp, y0, x0, log sy, log sx, c)
        u = np.stack([gy, amp * gy * dy / sy ** 2, gy, amp * gy * dy ** 2 / sy ** 2, gy, one_h], axis=1)
        v = np.stack([gx, gx, amp * gx * dx / sx ** 2, gx, amp * gx * dx ** 2 / sx ** 2, one_w], axis=1)
        jtj = (u.T @ u) * (v.T @ v)
        jtr = np.einsum("kw,wk->k", u.T @ r, v)
        diag = np.maximum(np.diag(jtj), 1e-12)
        while True:
            try:
                step = np.linalg.solve(jtj + lam * np.diag(diag), -jtr)
            except np.linalg.LinAlgError:
                step = None
            if step is not None:
                q_new = np.clip(q + step, qlo, qhi)
                r_new, cost_new, parts_new = evaluate(q_new)
                if cost_new <= cost:
                    break
            lam *= 4.0
            if lam > 1e12:
                return params(q), r, converged
        done = (cost - cost_new <= tol * max(cost, 1e-30)
                or np.all(np.abs(q_new - q) <= tol ** 0.5 * (np.abs(q) + tol ** 0.5)))
        q, r, cost, parts = q_new, r_new, cost_new, parts_new
        lam = max(lam / 3.0, 1e-12)
        if done:
            converged = True
            break
    return params(q), r, converged


def theoretical_rf_exceeds_map(theoretical_rf: int | None, shape) -> bool:
    """Whether a theoretical RF (pixels) is wider than the map of ``shape`` (H, W) along either side: the ERF
    cannot reach past the image, so its ratios to the theoretical RF depend on the image's size."""
    return theoretical_rf is not None and theoretical_rf > min(shape)


def compute_metrics(erf, theoretical_rf: int | None = None, thresholds=THRESHOLDS, *,
                    gaussian: bool = True, centre=None) -> dict:
    """All metrics of one ERF map as a JSON-ready dict (written as ``metrics.json``).

    ``high_contribution``: the paper's area ratios (Ding et al. 2022, Table 10) on log10(A+1)/max.
    ``distribution``: centre of mass, per-axis std, r_rms, r50/r90 of the raw map (Luo et al. 2016).
    ``mass_within_radius``: share of the raw mass within r = 5, 10, 20, 40, 80 px of the centre (OpenERF-style).
    ``gaussian_fit``: 2-D Gaussian fit of A / max with R^2; ``meaningful`` False and ``reason`` set (flag
    ``gaussian_fit_not_meaningful``) when a parameter sits at a bound, a sigma exceeds the map or R^2 < 0.5
    (:func:`gaussian_fit_problems`): the numbers are kept but describe a degenerate fit, not the ERF.
    ``erf_to_trf``: with ``theoretical_rf`` T (pixels): ``rms_diameter`` = 2 r_rms / T and
    ``side_at_<t>`` = side(t) / T -- the share of the theoretical RF the ERF actually covers. Where T exceeds a
    side of the map (flag ``theoretical_rf_exceeds_map``) the ERF is cut by the image's edge, so these shares are
    bounded by the input size and compare networks only at one input size.
    ``flags`` lists anything unusual (e.g. ``threshold_0.99_not_reached``, ``empty_map``,
    ``centre_off_map_middle``: the squares and disks are centred on ``centre``, the measured unit's receptive-field
    centre (:func:`target_centre`), which is not (H//2, W//2) where the official script centres them).
    """
    a = validate_erf(erf)
    h, w = a.shape
    flags = []
    cy, cx, _ = _centre_and_max_half(h, w, centre)
    if (cy, cx) != (h // 2, w // 2):
        flags.append("centre_off_map_middle")
    curve = contribution_curve(a, centre=(cy, cx))
    hc = []
    for t in thresholds:
        hits = np.nonzero(curve > t)[0]
        if hits.size:
            side = 2 * int(hits[0]) + 1
            hc.append({"threshold": float(t), "side": side, "area_ratio": side * side / (h * w), "reached": True})
        else:
            hc.append({"threshold": float(t), "side": None, "area_ratio": None, "reached": False})
            flags.append(f"threshold_{t:g}_not_reached")
    total = float(a.sum())
    if total <= 0:
        flags.append("empty_map")
    if h != w:
        flags.append("non_square_map")
    dist = distribution_stats(a)
    gauss = fit_gaussian(a, dist) if gaussian and total > 0 else None
    if gauss is not None and not gauss["meaningful"]:
        flags.append("gaussian_fit_not_meaningful")
    peak = np.unravel_index(int(np.argmax(a)), a.shape)
    out = {
        "shape": [h, w],
        "center": [cy, cx],
        "preprocessing": "A' = log10(A + 1) / max (Ding et al., CVPR 2022, Appendix)",
        "high_contribution": hc,
        "peak": {"value": float(a.max()), "position": [int(peak[0]), int(peak[1])]},
        "total": total,
        "distribution": dist,
        "mass_within_radius": mass_within_radii(a, centre=(cy, cx)),
        "gaussian_fit": gauss,
        "theoretical_rf": int(theoretical_rf) if theoretical_rf is not None else None,
        "erf_to_trf": None,
        "flags": flags,
    }
    if theoretical_rf is not None:
        if theoretical_rf <= 0:
            raise ErfLabError(f"theoretical receptive field must be positive, got {theoretical_rf}")
        ratio = {"rms_diameter": 2 * dist["r_rms"] / theoretical_rf if dist else None}
        for e in hc:
            ratio[f"side_at_{e['threshold']:g}"] = e["side"] / theoretical_rf if e["reached"] else None
        out["erf_to_trf"] = ratio
        if theoretical_rf_exceeds_map(theoretical_rf, (h, w)):
            flags.append("theoretical_rf_exceeds_map")
    return out


def summary(metrics: dict) -> dict:
    """Flat one-line summary of a metrics dict (for run.json, tables and CSV)."""
    s = {"shape": "x".join(str(v) for v in metrics["shape"])}
    for e in metrics["high_contribution"]:
        key = f"{round(e['threshold'] * 100)}"
        s[f"side@{key}%"] = e["side"]
        s[f"area@{key}%"] = None if e["area_ratio"] is None else 100.0 * e["area_ratio"]
    d = metrics.get("distribution") or {}
    s["std_y"] = d.get("std", {}).get("y")
    s["std_x"] = d.get("std", {}).get("x")
    s["r_rms"] = d.get("r_rms")
    for share in RADIUS_SHARES:
        s[f"r{round(share * 100)}"] = d.get(f"r{round(share * 100)}")
    mass = metrics.get("mass_within_radius") or {}
    for r in SUMMARY_MASS_RADII:
        s[f"mass@{r}px"] = mass.get(f"{r:g}")
    g = metrics.get("gaussian_fit") or {}
    s["gauss_sigma_y"], s["gauss_sigma_x"], s["gauss_r2"] = g.get("sigma_y"), g.get("sigma_x"), g.get("r2")
    ok = gaussian_fit_ok(metrics.get("gaussian_fit"))
    s["gauss_fit"] = None if ok is None else ("ok" if ok else NOT_MEANINGFUL)
    s["trf"] = metrics.get("theoretical_rf")
    s["erf/trf"] = (metrics.get("erf_to_trf") or {}).get("rms_diameter")
    return s


@lru_cache(maxsize=1)
def _load_paper_reference() -> dict:
    from erf_lab.paths import data_dir

    return json.loads((data_dir() / "paper_reference.json").read_text(encoding="utf-8"))


def paper_reference() -> dict:
    """The shipped reference data (data/paper_reference.json: Ding et al. 2022, Table 10, with citation)."""
    return _load_paper_reference()


def paper_caveat() -> str:
    """How far the shipped Table 10 numbers can be trusted, in one line for every output that shows them ("" once
    they are checked against the paper; data/paper_reference.json "transcription")."""
    t = _load_paper_reference().get("transcription", {})
    return "" if t.get("checked_against_paper", False) else t["caveat"]


PAPER_TABLE10: dict[str, list[float]] = {
    name: list(entry["area_ratio_percent"]) for name, entry in _load_paper_reference()["models"].items()
}
"""``{model: [r@20%, r@30%, r@50%, r@99%]}`` in percent (Ding et al. 2022, Table 10; 1024x1024, trained)."""

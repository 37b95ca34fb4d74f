"""Paper-style figures and run directories (write_run_dir / load_run)."""
import json

import numpy as np
import pytest
from PIL import Image

from erf_lab.erf.metrics import compute_metrics
from erf_lab.erf.plotting import (comparison_figure, display_map, erf_figure, parse_formats, plot_comparison, plot_erf,
                                  plot_grid, plot_growth)
from erf_lab.erf.rundir import load_run, write_run_dir
from erf_lab.errors import ErfLabError


def gaussian_map(n=48, s=6.0, amp=80.0):
    y, x = np.mgrid[:n, :n]
    return amp * np.exp(-((y - n // 2) ** 2 + (x - n // 2) ** 2) / (2 * s ** 2))


def check_png(path, min_px=600, max_px=6000):
    with Image.open(path) as im:
        im.load()
        assert im.format == "PNG"
        assert min_px <= im.size[0] <= max_px and min_px <= im.size[1] <= max_px, im.size
        return im.size


def check_pdf(path):
    data = path.read_bytes()
    assert data.startswith(b"%PDF") and b"%%EOF" in data[-64:]
    return len(data)


def test_plot_erf_png_pdf_svg(tmp_path):
    paths = plot_erf(gaussian_map(96), tmp_path / "erf", title="RepLKNet-31B", formats=("png", "pdf", "svg"))
    assert [p.suffix for p in paths] == [".png", ".pdf", ".svg"]
    w, h = check_png(paths[0])
    assert h > w  # colour bar on top of a square heatmap
    # heatmap cells are rasterized inside the vector PDF: 96^2 quads would otherwise make it huge
    assert check_pdf(paths[1]) < 300_000
    svg = paths[2].read_text()
    assert "<svg" in svg and "RepLKNet-31B" in svg  # text kept as text (svg.fonttype none)
    assert not list(tmp_path.glob(".*tmp*"))  # atomic writes leave no temporaries


def test_comparison_on_one_colour_scale(tmp_path):
    small, large = gaussian_map(s=3.0), gaussian_map(s=10.0)
    paths = plot_comparison([small, large, large * 5], ["ResNet-101", "RepLKNet-13", "RepLKNet-31"],
                            tmp_path / "cmp", formats=("png", "pdf"))
    w, h = check_png(paths[0], max_px=12000)
    assert w > 2 * h  # three panels side by side
    check_pdf(paths[1])
    plot_comparison([small, large], ["a", "b"], tmp_path / "joint", formats=("png",), normalize="joint")
    with pytest.raises(ErfLabError):
        plot_comparison([small], ["a", "b"], tmp_path / "x")
    with pytest.raises(ErfLabError):
        plot_comparison([small], ["a"], tmp_path / "x", normalize="nope")


def test_one_colour_scale_and_paper_normalisation():
    maps = [gaussian_map(s=3.0), gaussian_map(s=10.0) * 7]
    fig = comparison_figure(maps, ["a", "b"])
    meshes = [ax.collections[0] for ax in fig.axes if ax.get_title() in ("a", "b")]
    assert len(meshes) == 2 and len(fig.axes) == 3  # two panels + ONE colour bar
    for mesh, m in zip(meshes, maps):
        assert (mesh.norm.vmin, mesh.norm.vmax) == (0.0, 1.0)
        np.testing.assert_array_equal(mesh.cmap(np.linspace(0, 1, 64)), meshes[0].cmap(np.linspace(0, 1, 64)))
        shown = np.asarray(mesh.get_array()).reshape(m.shape)
        np.testing.assert_allclose(shown, np.log10(m + 1) / np.log10(m + 1).max(), atol=1e-15)  # log10(A+1)/max
    # RdYlGn centred at 0 as in the official script: 0 -> yellow (upper half start), 1 -> dark green
    lo, hi = meshes[0].cmap(0.0), meshes[0].cmap(1.0)
    assert lo[0] > 0.9 and lo[1] > 0.9 and hi[1] > hi[0] and hi[1] > hi[2]
    single = erf_figure(maps[0], "x")
    assert len(single.axes) == 2 and not single.axes[0].get_xticklabels()


def test_grid_and_growth(tmp_path):
    m = gaussian_map(32)
    grid = plot_grid([[m, m * 2], [m, None]], ["train", "deploy"], ["K = 3", "K = 7"], tmp_path / "grid")
    check_png(grid[0])
    check_pdf(grid[1])
    rows = [{"kernel": k, "reparam": mode, "area@20%": 0.1 * k, "area@50%": 0.3 * k,
             "area@99%": None if k > 7 else k, "r_rms": float(k)} for k in (3, 7, 13) for mode in ("train", "deploy")]
    growth = plot_growth(rows, tmp_path / "growth", formats=("png", "pdf", "svg"))
    w, h = check_png(growth[0], min_px=500, max_px=8000)
    assert w > 2 * h
    with pytest.raises(ErfLabError):
        plot_grid([[m]], ["a", "b"], ["c"], tmp_path / "bad")


def test_growth_axes_name_what_they_plot(tmp_path, monkeypatch):
    """The sweep's size-free panel plots gauss_sigma_x, the x-axis sigma, which it labelled 'Gaussian sigma'
    (an anisotropic ERF's sigma_y is another number)."""
    from erf_lab.erf import plotting
    from erf_lab.erf.sweep import AREA_METRICS, SIZE_FREE_METRICS

    figures = []
    monkeypatch.setattr(plotting, "save_figure", lambda fig, stem, formats: figures.append(fig) or [])
    rows = [{"input_size": s, "reparam": "deploy", "area@20%": 1.0, "area@50%": 2.0, "area@99%": 3.0, "r_rms": 4.0,
             "gauss_sigma_x": 5.0, "gauss_sigma_y": 9.0, "r50": 6.0, "r99": 7.0} for s in (32, 64)]
    plot_growth(rows, tmp_path / "g", x="input_size", metrics=AREA_METRICS + SIZE_FREE_METRICS)
    panels = {ax.get_ylabel(): ax.lines[0].get_ydata()[0] for ax in figures[0].axes}
    assert panels["Gaussian sigma_x (px)"] == 5.0 and "Gaussian sigma (px)" not in panels


def test_parse_formats():
    assert parse_formats("png, PDF,svg") == ("png", "pdf", "svg")
    assert parse_formats(None) == ("png", "pdf")
    with pytest.raises(ErfLabError, match="jpeg"):
        parse_formats("png,jpeg")


def _record_renames(monkeypatch, stop_at: str | None = None) -> list[str]:
    """Record the target names of every atomic rename (``os.replace``); interrupt before ``stop_at``."""
    import os

    done, real = [], os.replace

    def replace(src, dst):
        if os.path.basename(dst) == stop_at:
            raise KeyboardInterrupt
        real(src, dst)
        done.append(os.path.basename(dst))

    monkeypatch.setattr(os, "replace", replace)
    return done


def test_write_run_dir_and_load_run(tmp_path, monkeypatch):
    erf = gaussian_map(40, s=5.0)
    info = {"model": "toy", "input_size": 40, "command": ["erf-lab", "compute"]}
    renames = _record_renames(monkeypatch)
    metrics = write_run_dir(tmp_path / "run", erf, info, theoretical_rf=77)
    monkeypatch.undo()
    d = tmp_path / "run"
    # every file appears by one atomic rename, and run.json last: its presence marks a complete directory
    assert renames == ["erf.npy", "metrics.json", "erf.png", "erf.pdf", "run.json"]
    assert sorted(p.name for p in d.iterdir()) == sorted(renames)
    run_json = json.loads((d / "run.json").read_text())
    assert run_json["model"] == "toy" and run_json["command"] == ["erf-lab", "compute"]
    assert run_json["metrics_summary"]["trf"] == 77 and run_json["files"] == renames[:-1]
    # metrics.json holds the metrics of the map as stored in erf.npy, and those are the known ones of the map
    stored = json.loads((d / "metrics.json").read_text())
    assert stored == json.loads(json.dumps(compute_metrics(np.load(d / "erf.npy"), theoretical_rf=77)))
    assert stored["distribution"]["center_of_mass"] == pytest.approx([20, 20], abs=1e-3)  # row -20 has no mirror
    assert stored["distribution"]["r_rms"] == pytest.approx(5.0 * 2 ** 0.5, rel=2e-3)  # sqrt(2) sigma
    assert stored["gaussian_fit"]["sigma_y"] == pytest.approx(5.0, rel=1e-3)
    assert stored["peak"] == {"value": 80.0, "position": [20, 20]} and stored["erf_to_trf"]["rms_diameter"] == \
        pytest.approx(2 * 5.0 * 2 ** 0.5 / 77, rel=2e-3)
    assert metrics["total"] == stored["total"] == pytest.approx(erf.sum())
    run = load_run(d)
    np.testing.assert_array_equal(run.erf, erf)
    assert run.theoretical_rf == 77 and run.label == "toy" and run.metrics["shape"] == [40, 40]
    bare = load_run(d / "erf.npy")
    assert bare.run_dir == d
    check_png(d / "erf.png")


def test_interrupted_run_dir_has_no_run_json(tmp_path, monkeypatch):
    """Ctrl-C after three files: those three are whole, nothing half-written, no run.json claims completeness."""
    renames = _record_renames(monkeypatch, stop_at="erf.pdf")
    with pytest.raises(KeyboardInterrupt):
        write_run_dir(tmp_path / "run", gaussian_map(40), {"model": "toy"})
    monkeypatch.undo()
    assert renames == ["erf.npy", "metrics.json", "erf.png"]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == sorted(renames)  # temp file removed too
    np.testing.assert_array_equal(np.load(tmp_path / "run" / "erf.npy"), gaussian_map(40))


def test_load_run_errors(tmp_path):
    with pytest.raises(ErfLabError, match="no such"):
        load_run(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ErfLabError, match="no erf.npy"):
        load_run(tmp_path / "empty")
    (tmp_path / "corrupt.npy").write_bytes(b"\x93NUMPY garbage" + bytes(range(50)))
    with pytest.raises(ErfLabError, match="corrupt"):
        load_run(tmp_path / "corrupt.npy")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ErfLabError, match="pickle"):
        load_run(tmp_path / "obj.npy")
    np.save(tmp_path / "cube.npy", np.zeros((2, 3, 3)))
    with pytest.raises(ErfLabError, match="2-D"):
        load_run(tmp_path / "cube.npy")
    (tmp_path / "r").mkdir()
    np.save(tmp_path / "r" / "erf.npy", gaussian_map(16))
    (tmp_path / "r" / "run.json").write_text("{not json")
    with pytest.raises(ErfLabError, match="corrupt JSON"):
        load_run(tmp_path / "r")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(ErfLabError, match=".npy"):
        load_run(tmp_path / "x.txt")


def test_large_maps_are_one_image_with_the_same_pixels(tmp_path, monkeypatch):
    """Above ``QUADMESH_MAX_CELLS`` the map is drawn as one image instead of one quad per cell (a 1024 px map
    saves in half the time): the same values, and the same pixels in the PNG."""
    from erf_lab.erf import plotting

    big = gaussian_map(300, 40.0)
    big[20, 250] = 500.0  # a lone bright cell: a misplaced row or column would show
    fig = erf_figure(big, "big")
    assert not fig.axes[0].collections and len(fig.axes[0].images) == 1
    np.testing.assert_allclose(fig.axes[0].images[0].get_array(), display_map(big))
    as_image = plot_erf(big, tmp_path / "image", formats=("png",))[0]
    monkeypatch.setattr(plotting, "QUADMESH_MAX_CELLS", 300 * 300)
    assert len(erf_figure(big, "big").axes[0].collections) == 1  # now a QuadMesh
    as_quads = plot_erf(big, tmp_path / "quads", formats=("png",))[0]
    with Image.open(as_image) as a, Image.open(as_quads) as b:
        pa, pb = np.asarray(a.convert("RGB"), dtype=int), np.asarray(b.convert("RGB"), dtype=int)
    assert pa.shape == pb.shape and np.abs(pa - pb).max() <= 2  # rounding of the colour blend at cell edges


def test_growth_legend_on_the_first_panel_with_lines(tmp_path):
    """A metric never reached (area@20% of a tiny map) draws no line: the legend goes to a panel that has one."""
    import warnings

    from erf_lab.erf.plotting import plot_growth

    rows = [{"kernel": k, "reparam": mode, "area@20%": None, "r_rms": 1.0 + k + (mode == "deploy")}
            for k in (3, 7) for mode in ("train", "deploy")]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib warns "No artists with labels found" for a legend of nothing
        files = plot_growth(rows, tmp_path / "growth", metrics=[("area@20%", "area"), ("r_rms", "r_rms")])
    assert sorted(p.suffix for p in files) == [".pdf", ".png"]


def pdf_font_types(path) -> set:
    """The /Subtype of every font in a PDF (matplotlib writes its font dictionaries uncompressed)."""
    import re

    data = path.read_bytes()
    fonts = re.findall(rb"/Type\s*/Font\b[^>]*?/Subtype\s*/(\w+)|/Subtype\s*/(\w+)[^>]*?/Type\s*/Font\b", data)
    return {(a or b).decode() for a, b in fonts}


def shape_bias_summary():
    from erf_lab.shape_bias.categories import CATEGORIES

    return {"model": "resnet18", "label": "resnet18", "shape_bias": 0.4,
            "per_category": {c: {"shape_bias": 0.4, "n": 5, "shape_hits": 2, "texture_hits": 3} for c in CATEGORIES}}


def test_every_figure_pdf_embeds_truetype_not_type3(tmp_path):
    """The shape-bias and training figures are drawn with pyplot's defaults, where pdf.fonttype is 3 (glyphs as
    Type 3 procedures, which journals' PDF checks reject); every figure erf-lab writes embeds TrueType (42), as the
    ERF figures always did."""
    from erf_lab.shape_bias.plotting import plot_shape_bias
    from erf_lab.train.loop import plot_curves

    rows = [{"epoch": e, "train_loss": 2.0 / e, "val_loss": 2.1 / e, "train_acc": 0.1 * e, "val_acc": 0.1 * e}
            for e in (1, 2, 3)]
    pdfs = [plot_shape_bias([shape_bias_summary()], tmp_path / "shape_bias")[1],
            plot_curves(rows, tmp_path / "curves")[1],
            plot_erf(gaussian_map(), tmp_path / "erf", title="x", formats=("pdf",))[0]]
    for pdf in pdfs:
        types = pdf_font_types(pdf)
        assert types and "Type3" not in types, (pdf.name, types)
        assert b"/FontFile2" in pdf.read_bytes(), pdf.name  # the TrueType program is embedded


def test_the_same_figure_twice_gives_the_same_bytes(tmp_path, monkeypatch):
    """matplotlib writes the time of saving into a PDF (CreationDate) and an SVG (dc:date) and salts the SVG's ids
    at random: two renders of one figure differed in bytes (a re-run study's shipped family.pdf changed with nothing
    changed). Every format now gives identical files; the second save runs 400 days later (SOURCE_DATE_EPOCH,
    the clock matplotlib's dates read)."""
    import time

    from erf_lab.shape_bias.plotting import plot_shape_bias

    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    first = plot_erf(gaussian_map(), tmp_path / "a", title="x", formats=("png", "pdf", "svg"))
    first += plot_shape_bias([shape_bias_summary()], tmp_path / "sa")
    monkeypatch.setenv("SOURCE_DATE_EPOCH", str(int(time.time()) + 86400 * 400))
    second = plot_erf(gaussian_map(), tmp_path / "b", title="x", formats=("png", "pdf", "svg"))
    second += plot_shape_bias([shape_bias_summary()], tmp_path / "sb")
    assert [p.suffix for p in first] == [".png", ".pdf", ".svg", ".png", ".pdf"]
    for a, b in zip(first, second):
        assert a.read_bytes() == b.read_bytes(), a.name


def test_run_figure_says_what_was_measured(tmp_path, monkeypatch):
    """erf.png / erf.pdf of a run (compute, and analyze of the run) named only the model: a figure that travels
    without its run.json did not say which layer, input size or how many images it shows. A line under the map
    now says it; a bare .npy, with no record, gets none."""
    from erf_lab.erf import plotting
    from erf_lab.erf.analysis import analyze

    figures = []
    real = plotting.erf_figure
    monkeypatch.setattr(plotting, "erf_figure", lambda *a, **k: figures.append(real(*a, **k)) or figures[-1])
    info = {"model": "toy", "layer": "stages.2", "input_size": 40, "num_used": 3, "random_init": True}
    write_run_dir(tmp_path / "run", gaussian_map(40), info)
    analyze(tmp_path / "run", out=tmp_path / "again", formats=("png",))
    np.save(tmp_path / "bare.npy", gaussian_map(40))
    analyze(tmp_path / "bare.npy", formats=("png",))
    shown = [(fig.axes[0].get_title(), fig.axes[0].get_xlabel()) for fig in figures]
    assert shown[0] == shown[1] == ("toy (random init)", "stages.2, 40x40 px, 3 images")
    assert shown[2][1] == ""


def pdf_fonts(data: bytes) -> set:
    """The fonts a PDF uses (its /BaseFont names, without a subset's ``ABCDEF+`` prefix)."""
    import re

    return {re.sub(rb"^[A-Z]{6}\+", b"", f).decode() for f in re.findall(rb"/BaseFont\s*/([^\s/<>\[\]]+)", data)}


def test_every_figure_writer_uses_the_one_font_and_dpi(tmp_path):
    """The ERF figures were set in a serif (Times), the shape-bias, training, cue-world and app figures in pyplot's
    DejaVu Sans; the app's PNGs were 200 dpi, the library's 300. Every figure now has erf_lab.io's FIGURE_FONT and
    FIGURE_DPI: the one font in every PDF, the one resolution in every PNG; and nothing writes a figure but
    erf_lab.io.write_figure (which save_figure and the app's downloads use)."""
    import io
    import re
    from pathlib import Path

    from matplotlib import font_manager
    from matplotlib.ft2font import FT2Font

    from app.figures import bench_figure, figure_bytes, kernels_figure
    from erf_lab.io import FIGURE_DPI, FIGURE_FONT
    from erf_lab.shape_bias.plotting import plot_shape_bias
    from erf_lab.train.cue_world import plot_examples
    from erf_lab.train.loop import plot_curves
    from erf_lab.train.probes import plot_probe

    font = FT2Font(font_manager.findfont(font_manager.FontProperties(family=FIGURE_FONT["font.serif"])))
    font = font.postscript_name  # the first of FIGURE_FONT's serifs installed here
    rows = [{"epoch": e, "train_loss": 2.0 / e, "val_loss": 2.1 / e, "train_acc": 0.1 * e, "val_acc": 0.1 * e}
            for e in (1, 2, 3)]
    probe = {"per_class": {"0": {"shape_hits": 2, "texture_hits": 1}, "1": {"shape_hits": 0, "texture_hits": 3}},
             "shape_bias": 0.33, "shape_only_accuracy": 0.9, "texture_only_accuracy": 0.5}
    files = {"erf": plot_erf(gaussian_map(), tmp_path / "erf", title="x"),
             "comparison": plot_comparison([gaussian_map(), gaussian_map(s=3.0)], ["a", "b"], tmp_path / "cmp"),
             "shape-bias": plot_shape_bias([shape_bias_summary()], tmp_path / "sb"),
             "curves": plot_curves(rows, tmp_path / "curves"),
             "cue-world": plot_examples(tmp_path / "world", num_classes=2, input_size=16, per_class=1),
             "probe": plot_probe(probe, tmp_path / "probe", ["circle", "square"])}
    made = {name: {p.suffix: p.read_bytes() for p in paths} for name, paths in files.items()}
    bench = [{"R": 16, "K": k, "fwd_pytorch_nchw_ms": 1.0 + k, "fwd_fastconv_ms": 0.5 + k} for k in (3, 7)]
    for name, fig in (("app latency", bench_figure(bench)), ("app kernels", kernels_figure([("k", np.eye(3))]))):
        made[name] = {f".{fmt}": figure_bytes(fig, fmt) for fmt in ("png", "pdf")}
    for name, data in made.items():
        assert pdf_fonts(data[".pdf"]) == {font}, (name, pdf_fonts(data[".pdf"]))
        dpi = Image.open(io.BytesIO(data[".png"])).info["dpi"]
        assert [round(v) for v in dpi] == [FIGURE_DPI] * 2, (name, dpi)
    root = Path(__file__).resolve().parent.parent
    writers = [str(p.relative_to(root)) for folder in ("erf_lab", "app", "fastconv")
               for p in (root / folder).rglob("*.py") if re.search(r"\.savefig\(", p.read_text(encoding="utf-8"))]
    assert writers == ["erf_lab/io.py"]


def test_multi_panel_figures_fit_a_page_at_readable_sizes(tmp_path, monkeypatch):
    """compare's grid (6 runs), a sweep's grid (8 members) and the input-size sweep's growth curves (7 metrics)
    were drawn 3 in per panel (12.8 in, 19.8 in, 21 in wide): printed at a paper's text width (CVPR: 6.875 in)
    their 7-12 pt labels shrank to 2.4-4 pt. Each is now at most the page width, in no text under 6 pt, with no
    two titles or axis labels overlapping (a long model name wraps instead of running into its neighbour's)."""
    from matplotlib.text import Text

    from erf_lab.erf import plotting
    from erf_lab.erf.sweep import AREA_METRICS, SIZE_FREE_METRICS

    figures = []
    monkeypatch.setattr(plotting, "save_figure", lambda fig, stem, formats: figures.append(fig) or [])
    m = gaussian_map(24)
    names = ["replknet_31B_in22k_to_in1k_384_finetuned_with_a_long_run_name", "unireplknet_tiny.in1k",
             "slak_tiny_51x51", "resnet101.tv_in1k", "mobilenetv2_100", "efficientnet_lite0.ra_in1k"]
    plotting.plot_comparison([m] * 6, names, tmp_path / "cmp")
    sizes = [32, 64, 96, 128, 160, 192, 224, 256]
    series = ["K=31 deploy (random init)", "K=3 deploy (random init)", "K=13 train"]
    plotting.plot_grid([[m] * 8] * 3, series, [f"{s}px" for s in sizes], tmp_path / "grid")
    rows = [{"input_size": s, "series": g, **{k: s * 0.1 for k, _ in AREA_METRICS + SIZE_FREE_METRICS}}
            for s in sizes for g in series]
    plotting.plot_growth(rows, tmp_path / "growth", x="input_size", group="series",
                         metrics=AREA_METRICS + SIZE_FREE_METRICS)
    assert len(figures) == 3
    for fig in figures:
        assert fig.get_size_inches()[0] <= 7.0, fig.get_size_inches()
        fig.draw_without_rendering()
        texts = [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]
        assert min(t.get_fontsize() for t in texts) >= 6.0
        labels = [t for ax in fig.axes for t in (ax.title, ax.xaxis.label, ax.yaxis.label) if t.get_text()]
        boxes = [t.get_window_extent() for t in labels]
        for i, a in enumerate(boxes):
            for j in range(i):
                assert not a.overlaps(boxes[j]), (labels[i].get_text(), labels[j].get_text())
    cmp_titles = [ax.get_title() for ax in figures[0].axes if ax.get_title()]
    assert cmp_titles[0].replace("\n", "") == names[0] and "\n" in cmp_titles[0]  # wrapped, every character kept
    assert cmp_titles[1:] == names[1:]
    assert [ax.get_ylabel() for ax in figures[2].axes] == [label for _, label in AREA_METRICS + SIZE_FREE_METRICS]
    assert figures[2].legends and [t.get_text() for t in figures[2].legends[0].get_texts()] == series


def test_one_map_figure_reads_at_a_column_width():
    """Printed at a paper's column width (3.3 in), the one-map figure's colour-bar label, the only statement of
    its normalisation, came out at 5.8 pt (7 pt on a 4 in figure); every text is 6 pt or more there now."""
    from matplotlib.text import Text

    fig = erf_figure(gaussian_map(32), "replknet_31B (random init)", caption="stages.3, 64x64 px, 2 images")
    scale = 3.3 / fig.get_size_inches()[0]
    texts = [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]
    assert any(t.get_text().startswith("log10(A+1)/max") for t in texts)
    assert min(t.get_fontsize() * scale for t in texts) >= 6.0, sorted((t.get_fontsize(), t.get_text()) for t in texts)


def test_probe_figure_legend_is_off_the_points(tmp_path, monkeypatch, saved_figures):
    """The cue-world probe's legend stood in the lower left, where a last class with mostly shape decisions has
    its point: the legend covered it. It is under the axes now (as the shape-bias figure's)."""
    import matplotlib.pyplot as plt

    from erf_lab.train.probes import plot_probe

    figs = saved_figures
    monkeypatch.setattr(plt, "close", lambda fig: None)
    probe = {"per_class": {str(k): {"shape_hits": k, "texture_hits": 9 - k} for k in range(8)}, "shape_bias": 0.45,
             "label": "replknet_31b", "shape_only_accuracy": 0.3, "texture_only_accuracy": 0.9}
    plot_probe(probe, tmp_path / "probe", [f"class {k}" for k in range(8)])
    ax = figs[0].axes[0]
    figs[0].draw_without_rendering()
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["replknet_31b: 0.450"]
    assert not ax.get_legend().get_window_extent().overlaps(ax.get_window_extent())


def test_grid_names_a_row_and_a_column_whose_first_cell_is_missing(tmp_path, monkeypatch):
    """plot_grid named the rows on the first column and the columns on the first row: a missing map there (a
    member not measured) left its whole row or column unnamed. Each label is on its row's / column's first map."""
    from erf_lab.erf import plotting

    figures = []
    monkeypatch.setattr(plotting, "save_figure", lambda fig, stem, formats: figures.append(fig) or [])
    m = gaussian_map(16)
    plotting.plot_grid([[None, m], [m, m]], ["train", "deploy"], ["K = 3", "K = 7"], tmp_path / "grid")
    axes = figures[0].axes[:4]
    assert [ax.get_title() for ax in axes] == ["", "K = 7", "K = 3", ""]
    assert [ax.get_ylabel() for ax in axes] == ["", "train", "deploy", ""]


def test_app_latency_figure_labels_its_log_axis_in_plain_milliseconds():
    """The Table-1 latency figure's log y axis read '2x10^0', '3x10^0', '4x10^0' (matplotlib's default for a span
    under a decade) and '10^1': now the milliseconds themselves, at the ticks matplotlib labels, as over decades."""
    from app.figures import bench_figure

    for scale in (1.0, 0.01, 100.0):  # under a decade (2-6 ms), and spans with decimals or thousands
        rows = [{"R": 16, "K": k, "fwd_pytorch_nchw_ms": scale * (2 + k / 8), "fwd_fastconv_ms": scale * (2 + k / 49)}
                for k in (3, 7, 13, 31)]
        fig = bench_figure(rows)
        fig.draw_without_rendering()
        ax = fig.axes[0]
        low, high = ax.get_ylim()
        shown = [(t.get_position()[1], t.get_text()) for t in ax.get_yticklabels() + ax.get_yticklabels(minor=True)
                 if t.get_text() and low <= t.get_position()[1] <= high]
        assert len(shown) >= 2 and all(text == f"{y:g}" for y, text in shown), shown
        if scale == 1.0:
            assert {"3", "4"} <= {text for _, text in shown}, shown


def test_app_figures_are_drawn_as_the_cli_figures(tmp_path):
    """The app's own figures (the Table-1 latency figure of the Kernels page, the re-param page's kernels) were
    3.6 / 3 in per panel (two resolutions 7.2 in, five kernels 15 in) in matplotlib's 10 pt, the latency legend
    inside the last panel over its lines. They are drawn as the CLI's multi-panel figures now: at most a page's
    text width, 7-8 pt type, the legend above the panels, labels with their units, TrueType in the PDF."""
    import io

    from matplotlib.text import Text

    from app.figures import bench_figure, figure_bytes, kernels_figure
    from erf_lab.erf.plotting import _PRINT_RC, MIN_PRINT_PT, PAGE_WIDTH_IN
    from erf_lab.io import FIGURE_DPI

    bench = [{"R": r, "K": k, "fwd_pytorch_nchw_ms": 0.1 * k * r, "fwd_pytorch_cl_ms": 0.08 * k * r,
              "fwd_fastconv_ms": 0.05 * k * r, "paper_pytorch_ms": 0.2 * k * r, "paper_ours_ms": 0.15 * k * r}
             for r in (16, 32) for k in (3, 7, 13, 31)]
    latency = bench_figure(bench)
    kernels = kernels_figure([(name, np.random.default_rng(0).normal(size=(31, 31))) for name in
                              ("large kernel", "small kernel", "large, BN-fused", "small, BN-fused", "merged (deploy)")])
    largest = max(_PRINT_RC.values())
    for fig in (latency, kernels):
        assert fig.get_size_inches()[0] <= PAGE_WIDTH_IN + 1e-9, fig.get_size_inches()
        png = figure_bytes(fig, "png")  # as the app shows and downloads it
        # saved with bbox_inches="tight", as every figure: the page width and savefig's 0.1 in pad each side
        assert Image.open(io.BytesIO(png)).size[0] <= round((PAGE_WIDTH_IN + 0.2) * FIGURE_DPI)
        texts = [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]
        sizes = sorted({t.get_fontsize() for t in texts})
        assert MIN_PRINT_PT <= sizes[0] and sizes[-1] <= largest, sizes
        pdf = tmp_path / "figure.pdf"
        pdf.write_bytes(figure_bytes(fig, "pdf"))
        types = pdf_font_types(pdf)  # TrueType outlines (CIDFontType2 inside a Type0 font), embedded; no Type 3
        assert types and types <= {"TrueType", "Type0", "CIDFontType2"} and b"/FontFile2" in pdf.read_bytes(), types
    ax = latency.axes
    assert [a.get_title() for a in ax] == ["16 x 16 px", "32 x 32 px"]
    assert {a.get_xlabel() for a in ax} == {"kernel size K (px)"} and ax[0].get_ylabel() == "forward latency (ms)"
    assert all(a.get_legend() is None for a in ax) and len(latency.legends) == 1
    legend = latency.legends[0]
    assert [t.get_text() for t in legend.get_texts()] == ["pytorch_nchw", "pytorch_cl", "fastconv", "paper: PyTorch",
                                                           "paper: block-wise"]
    box = legend.get_window_extent()
    assert not any(box.overlaps(a.get_window_extent()) for a in ax)  # off the data
    assert [a.get_title() for a in kernels.axes[:2]] == ["large kernel\n31 x 31", "small kernel\n31 x 31"]
    assert kernels.axes[-1].get_ylabel() == "kernel weight"  # the colour bar


def test_display_levels_keep_a_heatmaps_colours():
    """A shipped timeline keeps its strip's maps as display levels (1 byte a cell, not the float maps of every
    checkpoint): levels_map gives back a map drawn in exactly the colours of the original, and refuses what is no
    map's levels."""
    from erf_lab.erf.plotting import display_levels, levels_map, paper_cmap

    rng = np.random.default_rng(0)
    for erf in (gaussian_map(40), rng.gamma(0.3, 50.0, (33, 47)), np.pad(gaussian_map(8), 16)):
        levels = display_levels(erf)
        assert levels.dtype == np.uint8 and levels.max() == 255 and levels.min() < 64
        again = levels_map(levels)
        assert np.array_equal(paper_cmap()(display_map(again)), paper_cmap()(display_map(erf)))
        assert np.array_equal(display_levels(again), levels)
    for bad in (np.zeros((4, 4), np.uint8), np.full((4, 4), 255.0), np.full(4, 255, np.uint8)):
        with pytest.raises(ErfLabError, match="not the display levels of a map"):
            levels_map(bad)

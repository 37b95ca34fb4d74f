"""``erf-lab analyze`` / ``compare`` / ``sweep`` end to end (tiny maps and tiny RepLKNets)."""
import csv
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import held_by_another_process
from erf_lab.cli.main import main
from erf_lab.erf.metrics import compute_metrics
from erf_lab.erf.rundir import write_run_dir

TINY = ["--override", "channels=(8,8,8,8)", "--override", "layers=(1,1,1,1)", "--input-size", "64",
        "--num-images", "1", "--quiet"]


def gaussian_map(n=40, s=5.0):
    y, x = np.mgrid[:n, :n]
    return 60.0 * np.exp(-((y - n // 2) ** 2 + (x - n // 2) ** 2) / (2 * s ** 2))


def run_cli(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc, err, command):
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"erf-lab {command}: error:"), err
    assert "Traceback" not in err


@pytest.fixture()
def two_runs(tmp_path):
    a, b = tmp_path / "small", tmp_path / "large"
    write_run_dir(a, gaussian_map(s=3.0), {"model": "small_k", "label": "small"}, theoretical_rf=30)
    write_run_dir(b, gaussian_map(s=8.0), {"model": "large_k", "label": "large"}, theoretical_rf=90)
    return a, b


def test_analyze_run_dir(capsys, two_runs):
    a, _ = two_runs
    (a / "metrics.json").unlink()
    (a / "erf.png").unlink()
    rc, out, err = run_cli(capsys, "analyze", str(a), "--formats", "png,pdf,svg")
    assert rc == 0, err
    for name in ("metrics.json", "erf.png", "erf.pdf", "erf.svg", "analysis.json"):
        assert (a / name).is_file()
    metrics = json.loads((a / "metrics.json").read_text())
    expected = compute_metrics(gaussian_map(s=3.0), theoretical_rf=30)  # TRF taken from run.json
    assert metrics["high_contribution"] == expected["high_contribution"] and metrics["theoretical_rf"] == 30
    assert "RepLKNet-31" in out and "98.6" in out and "23.4" in out  # paper Table 10 beside the results
    assert "not yet checked" not in out  # the shipped table is checked against the paper (data/paper_reference.json)
    side50 = expected["high_contribution"][2]["side"]
    assert f"{100 * side50 ** 2 / 1600:.2f}" in out
    analysis = json.loads((a / "analysis.json").read_text())
    assert analysis["command"] == "analyze" and "versions" in analysis and analysis["source_run"]["model"] == "small_k"


def test_analyze_bare_npy_and_out(capsys, tmp_path):
    np.save(tmp_path / "map.npy", gaussian_map(33))
    rc, out, err = run_cli(capsys, "analyze", str(tmp_path / "map.npy"))
    assert rc == 0, err
    assert (tmp_path / "map.metrics.json").is_file() and (tmp_path / "map.png").is_file()
    rc, out, err = run_cli(capsys, "analyze", str(tmp_path / "map.npy"), "--out", str(tmp_path / "o"),
                           "--json", "--theoretical-rf", "50")
    assert rc == 0, err
    printed = json.loads(out)
    assert printed["theoretical_rf"] == 50
    assert json.loads((tmp_path / "o" / "map.metrics.json").read_text()) == printed


def test_analyze_again_into_its_folder_leaves_no_figure_of_the_earlier_analysis(capsys, tmp_path, two_runs):
    """`analyze A --out D --formats png,svg`, then `analyze B --out D --formats pdf`: D held B's metrics and PDF
    beside A's PNG and SVG under the same names. The earlier analysis's files that are not written again
    (analysis.json lists them) are now removed; in a run folder its own figures (run.json's files) stay."""
    a, b = two_runs
    out_dir = tmp_path / "d"
    assert run_cli(capsys, "analyze", str(a), "--out", str(out_dir), "--formats", "png,svg")[0] == 0
    assert run_cli(capsys, "analyze", str(b), "--out", str(out_dir), "--formats", "pdf")[0] == 0
    assert sorted(p.name for p in out_dir.iterdir()) == ["analysis.json", "erf.pdf", "metrics.json"]
    own = sorted(p.name for p in a.iterdir())  # in place: the run's erf.png / erf.pdf are its own
    assert run_cli(capsys, "analyze", str(a), "--formats", "svg")[0] == 0
    assert run_cli(capsys, "analyze", str(a), "--formats", "png")[0] == 0
    assert sorted(p.name for p in a.iterdir()) == sorted({*own, "analysis.json"})


def test_analyze_in_place_draws_the_runs_own_figures_again(capsys, tmp_path):
    """User test: `analyze RUN --display slak --formats png` redrew erf.png with the SLaK display but left the run's
    erf.pdf as compute drew it (RepLKNet display): the PNG and PDF of one figure disagreed. The run's own figure
    formats are drawn again with the asked ones."""
    run = tmp_path / "run"
    write_run_dir(run, gaussian_map(s=3.0), {"model": "small_k", "label": "small"}, theoretical_rf=30,
                  formats=("png", "pdf", "svg"))
    svg = (run / "erf.svg").read_text()
    assert "RepLKNet, Ding et al." in svg and "SLaK" not in svg  # (SVG keeps its text as text)
    pdf = (run / "erf.pdf").read_bytes()
    rc, out, err = run_cli(capsys, "analyze", str(run), "--display", "slak", "--formats", "png")
    assert rc == 0, err
    assert f"wrote {run / 'metrics.json'}, {run / 'erf.png'}, {run / 'erf.pdf'}, {run / 'erf.svg'}," in out
    analysis = json.loads((run / "analysis.json").read_text())
    assert analysis["files"] == ["metrics.json", "erf.png", "erf.pdf", "erf.svg"]
    assert analysis["parameters"]["formats"] == ["png", "pdf", "svg"] and analysis["parameters"]["display"] == "slak"
    svg = (run / "erf.svg").read_text()
    assert "A/max (SLaK, Liu et al., ICLR 2023)" in svg and "RepLKNet, Ding et al." not in svg
    assert (run / "erf.pdf").read_bytes() != pdf
    assert sorted(p.name for p in run.iterdir()) == ["analysis.json", "erf.npy", "erf.pdf", "erf.png", "erf.svg",
                                                    "metrics.json", "run.json"]


def test_analyze_with_a_theoretical_rf_brings_run_json_along(capsys, tmp_path, monkeypatch):
    """User test: `analyze RUN --theoretical-rf 40` rewrote metrics.json (erf_to_trf, the flag
    theoretical_rf_exceeds_map) but left run.json's theoretical_rf and metrics_summary as measured, and compare,
    a sweep's rows and the app read the TRF from run.json: `compare RUN` still showed the old TRF and ERF / TRF.
    In its run folder analyze now rewrites those fields (the analyze command and the values it replaced recorded in
    run.json's analyses); with --out elsewhere run.json stays as it was."""
    run = tmp_path / "run"
    rc, _, err = run_cli(capsys, "compute", "--model", "replknet_31b", *TINY, "--out", str(run))
    assert rc == 0, err
    measured = json.loads((run / "run.json").read_text())
    old_trf = measured["theoretical_rf"]
    assert old_trf > 64 and "theoretical_rf_exceeds_map" in json.loads((run / "metrics.json").read_text())["flags"]
    rc, _, err = run_cli(capsys, "analyze", str(run), "--out", str(tmp_path / "elsewhere"), "--theoretical-rf", "40")
    assert rc == 0, err
    assert json.loads((run / "run.json").read_text()) == measured
    argv = ["analyze", str(run), "--theoretical-rf", "40", "--formats", "png"]
    monkeypatch.setattr("sys.argv", ["erf-lab", *argv])
    rc, out, err = run_cli(capsys, *argv)
    assert rc == 0, err
    metrics = json.loads((run / "metrics.json").read_text())
    info = json.loads((run / "run.json").read_text())
    assert metrics["theoretical_rf"] == info["theoretical_rf"] == 40
    assert "theoretical_rf_exceeds_map" not in metrics["flags"]
    assert out.rstrip().endswith(f"{run / 'analysis.json'}, {run / 'run.json'}")
    erf = np.load(run / "erf.npy")
    expected = compute_metrics(erf, theoretical_rf=40, centre=measured["erf_centre"])
    assert info["metrics_summary"]["trf"] == 40
    assert info["metrics_summary"]["erf/trf"] == pytest.approx(expected["erf_to_trf"]["rms_diameter"])
    assert info["metrics_summary"]["erf/trf"] == pytest.approx(measured["metrics_summary"]["erf/trf"] * old_trf / 40)
    assert {k: v for k, v in info.items() if k not in ("theoretical_rf", "metrics_summary", "analyses")} == \
        {k: v for k, v in measured.items() if k not in ("theoretical_rf", "metrics_summary")}
    [record] = info["analyses"]
    assert record["argv"] == ["erf-lab", *argv] and record["parameters"]["theoretical_rf"] == 40
    assert record["before"] == {"theoretical_rf": old_trf, "metrics_summary": measured["metrics_summary"]}
    # a reader of run.json: compare's table shows the TRF the run now has
    rc, _, err = run_cli(capsys, "compare", str(run), "--out", str(tmp_path / "cmp"), "--formats", "png")
    assert rc == 0, err
    row = next(csv.DictReader(io.StringIO((tmp_path / "cmp" / "compare.csv").read_text())))
    assert int(row["trf"]) == 40 and float(row["erf/trf"]) == pytest.approx(info["metrics_summary"]["erf/trf"])
    # the same analysis again changes nothing in run.json (no second record)
    assert run_cli(capsys, *argv)[0] == 0
    assert json.loads((run / "run.json").read_text()) == info


def test_analyze_and_compare_record_the_command_as_the_user_runs_it(capsys, two_runs, tmp_path, monkeypatch):
    """User test: analysis.json and compare.json recorded sys.argv as it was, whose first word is the console
    script's path, or '.../erf_lab/__main__.py' under 'python -m erf_lab' (no command anyone types), while the
    ERF and training runs record 'erf-lab ...'. Every command's record now names it 'erf-lab'."""
    a, b = two_runs
    for argv, record in ((["analyze", str(a), "--out", str(tmp_path / "an"), "--formats", "png"],
                          tmp_path / "an" / "analysis.json"),
                         (["compare", str(a), str(b), "--out", str(tmp_path / "cmp"), "--formats", "png"],
                          tmp_path / "cmp" / "compare.json")):
        monkeypatch.setattr("sys.argv", ["/venv/lib/python3.11/site-packages/erf_lab/__main__.py", *argv])
        assert run_cli(capsys, *argv)[0] == 0
        assert json.loads(record.read_text())["argv"] == ["erf-lab", *argv]


def test_compare_names_runs_of_one_model_by_their_folders(capsys, tmp_path):
    """User test: two runs of one model (two layers, two input sizes, ...) were labelled 'm (1)' and 'm (2)' in the
    table, the figure and compare.json: which was which only compare.json's run list said. They now carry their
    folder's name; runs whose folders share a name too are still numbered."""
    for folder, s in (("stem", 2.0), ("last_stage", 6.0), ("a/run", 3.0), ("b/run", 4.0)):
        write_run_dir(tmp_path / folder, gaussian_map(s=s), {"model": "m"}, theoretical_rf=30)
    rc, out, err = run_cli(capsys, "compare", str(tmp_path / "stem"), str(tmp_path / "last_stage"), "--out",
                           str(tmp_path / "c1"), "--formats", "png")
    assert rc == 0, err
    assert json.loads((tmp_path / "c1" / "compare.json").read_text())["parameters"]["labels"] == \
        ["m (stem)", "m (last_stage)"]
    assert "| m (stem) | measured |" in out and "| m (last_stage) | measured |" in out
    rows = (tmp_path / "c1" / "compare.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:3]] == ["m (stem)", "m (last_stage)"]
    rc, out, err = run_cli(capsys, "compare", str(tmp_path / "a/run"), str(tmp_path / "b/run"), "--out",
                           str(tmp_path / "c2"), "--formats", "png")
    assert rc == 0, err
    assert json.loads((tmp_path / "c2" / "compare.json").read_text())["parameters"]["labels"] == ["m (1)", "m (2)"]


def test_sweep_and_shape_bias_record_the_command_as_the_user_runs_it(capsys, tmp_path, monkeypatch):
    """sweep.json and the shape-bias run's summary recorded sys.argv as it was (the console script's path first), as
    analyze and compare did; they now name it 'erf-lab' too (``cli.options.command_line``)."""
    sweep = ["sweep", "--kernels", "3", "--reparam", "deploy", "--out", str(tmp_path / "sw"), "--formats", "png",
             *TINY]
    probe = ["shape-bias", "--model", "replknet_31b", "--override", "channels=(8,8,8,8)", "--override",
             "layers=(1,1,1,1)", "--override", "num_classes=4", "--allow-random", "--stimuli", "cue-world",
             "--limit", "4", "--out", str(tmp_path / "sb")]
    for argv, record, key in ((sweep, tmp_path / "sw" / "sweep.json", "argv"),
                              (probe, tmp_path / "sb" / "summary.json", "command")):
        monkeypatch.setattr("sys.argv", ["/venv/bin/erf-lab", *argv])
        assert run_cli(capsys, *argv)[0] == 0
        assert json.loads(record.read_text())[key] == ["erf-lab", *argv]


def test_compare_two_runs(capsys, two_runs, tmp_path):
    a, b = two_runs
    out_dir = tmp_path / "cmp"
    rc, out, err = run_cli(capsys, "compare", str(a), str(b / "erf.npy"), "--labels", "ResNet-like",
                           "RepLK-like", "--out", str(out_dir))
    assert rc == 0, err
    for name in ("compare.png", "compare.pdf", "compare.md", "compare.csv", "compare.json"):
        assert (out_dir / name).is_file()
    with Image.open(out_dir / "compare.png") as im:
        assert im.size[0] > 1.5 * im.size[1]
    rows = list(csv.DictReader(io.StringIO((out_dir / "compare.csv").read_text())))
    assert [r["label"] for r in rows] == ["ResNet-like", "RepLK-like", "ResNet-101", "ResNet-152", "RepLKNet-13",
                                         "RepLKNet-31"]
    for r, s in zip(rows[:2], (3.0, 8.0)):
        m = compute_metrics(gaussian_map(s=s))
        assert float(r["area@50%"]) == pytest.approx(100 * m["high_contribution"][2]["area_ratio"])
    assert float(rows[1]["area@20%"]) > float(rows[0]["area@20%"])  # wider Gaussian -> larger area
    assert float(rows[5]["area@99%"]) == 98.6
    assert "| RepLK-like |" in out and "Table 10" in out
    md = (out_dir / "compare.md").read_text()
    assert "Paper rows: Ding et al., CVPR 2022, Table 10 (1024x1024, trained weights)." in md
    assert "not yet checked" not in md  # the shipped table is checked against the paper


def test_compare_mixed_sizes(capsys, tmp_path, two_runs):
    a, _ = two_runs
    np.save(tmp_path / "big.npy", gaussian_map(64))
    rc, out, err = run_cli(capsys, "compare", str(a), str(tmp_path / "big.npy"), "--out", str(tmp_path / "c"))
    assert rc == 0, err  # size-free metrics side by side, area ratios marked not comparable, no heatmaps
    assert "differ in size" in out and "40x40" in out and "64x64" in out and "n/c" in out
    assert not list((tmp_path / "c").glob("compare.p*"))
    header = next(line for line in out.splitlines() if line.startswith("| label"))
    assert header.index("r_rms") < header.index("area@20%") and "r50" in header
    rc, out, err = run_cli(capsys, "compare", str(a), str(tmp_path / "big.npy"), "--out", str(tmp_path / "c2"),
                           "--allow-mixed-sizes", "--formats", "png")
    assert rc == 0, err
    assert "| 64x64 |" in out and "| 40x40 |" in out and "n/c" not in out
    assert (tmp_path / "c2" / "compare.png").is_file()


def test_compare_again_into_its_folder_leaves_no_figure_of_the_earlier_comparison(capsys, tmp_path, two_runs):
    """A second compare into the same --out that draws no figure (maps of other sizes) or other formats left the
    first one's compare.png/.pdf beside the new table: a heatmap of other runs under the new comparison's name.
    The earlier comparison's files that are not written again (compare.json lists them) are now removed."""
    a, b = two_runs
    np.save(tmp_path / "big.npy", gaussian_map(64))
    out_dir = tmp_path / "c"
    (out_dir).mkdir()
    (out_dir / "notes.txt").write_text("mine")  # a file no comparison wrote: kept
    assert run_cli(capsys, "compare", str(a), str(b), "--out", str(out_dir))[0] == 0
    assert (out_dir / "compare.png").is_file() and (out_dir / "compare.pdf").is_file()
    assert run_cli(capsys, "compare", str(a), str(b), "--out", str(out_dir), "--formats", "svg")[0] == 0
    assert sorted(p.name for p in out_dir.iterdir()) == ["compare.csv", "compare.json", "compare.md", "compare.svg",
                                                          "notes.txt"]
    assert run_cli(capsys, "compare", str(a), str(tmp_path / "big.npy"), "--out", str(out_dir))[0] == 0
    assert sorted(p.name for p in out_dir.iterdir()) == ["compare.csv", "compare.json", "compare.md", "notes.txt"]
    assert json.loads((out_dir / "compare.json").read_text())["files"] == ["compare.md", "compare.csv"]


def test_compare_does_not_recommend_a_degenerate_gaussian_sigma(capsys, tmp_path, two_runs):
    """Maps of different sizes: the Gaussian sigma is recommended only while every fit is meaningful; a flat noisy map
    (its fit: sigma wider than the map, R^2 ~ 0) is shown n/m with the reason, its numbers kept in the CSV."""
    a, _ = two_runs
    np.save(tmp_path / "big.npy", gaussian_map(64))
    rc, out, err = run_cli(capsys, "compare", str(a), str(tmp_path / "big.npy"), "--out", str(tmp_path / "ok"))
    assert rc == 0, err  # two real Gaussians: the sigma is recommended, nothing flagged
    assert "r50/r99 (radius holding that share of the mass) and the Gaussian sigma, all in pixels" in out
    assert "n/m" not in out
    flat = 1.0 + 0.1 * np.random.default_rng(0).random((64, 64))
    np.save(tmp_path / "flat.npy", flat)
    rc, out, err = run_cli(capsys, "compare", str(a), str(tmp_path / "flat.npy"), "--out", str(tmp_path / "bad"))
    assert rc == 0, err
    assert "and the Gaussian sigma, all in pixels" not in out
    assert "not the Gaussian sigma, whose fit is not meaningful for flat" in out
    fit = compute_metrics(flat)["gaussian_fit"]
    assert f"flat: {fit['reason']}" in out and f"| n/m ({fit['sigma_x']:.4g}) |" in out
    rows = list(csv.DictReader(io.StringIO((tmp_path / "bad" / "compare.csv").read_text())))
    assert [r["gauss_fit"] for r in rows] == ["ok", "n/m"]
    assert float(rows[1]["gauss_sigma_x"]) == pytest.approx(fit["sigma_x"])
    rc, out, err = run_cli(capsys, "analyze", str(tmp_path / "flat.npy"), "--formats", "png")
    assert rc == 0, err
    assert f"Gaussian fit NOT MEANINGFUL ({fit['reason']})" in out and "gaussian_fit_not_meaningful" in out
    stored = json.loads((tmp_path / "flat.metrics.json").read_text())
    assert stored["gaussian_fit"]["meaningful"] is False and stored["gaussian_fit"]["reason"] == fit["reason"]


def test_cli_errors_are_one_line(capsys, tmp_path):
    rc, _, err = run_cli(capsys, "analyze", str(tmp_path / "nope"))
    assert_one_line_error(rc, err, "analyze")
    (tmp_path / "bad.npy").write_bytes(b"not a numpy file at all")
    rc, _, err = run_cli(capsys, "analyze", str(tmp_path / "bad.npy"))
    assert_one_line_error(rc, err, "analyze")
    assert "corrupt" in err
    np.save(tmp_path / "ok.npy", gaussian_map(16))
    rc, _, err = run_cli(capsys, "analyze", str(tmp_path / "ok.npy"), "--formats", "png,gif")
    assert_one_line_error(rc, err, "analyze")
    rc, _, err = run_cli(capsys, "compare", str(tmp_path / "ok.npy"), str(tmp_path / "bad.npy"))
    assert_one_line_error(rc, err, "compare")
    rc, _, err = run_cli(capsys, "compare", str(tmp_path / "ok.npy"), "--labels", "a", "b")
    assert_one_line_error(rc, err, "compare")
    rc, _, err = run_cli(capsys, "sweep", "--kernels", "3,8", "--out", str(tmp_path / "s"))
    assert_one_line_error(rc, err, "sweep")
    rc, _, err = run_cli(capsys, "sweep", "--kernels", "3", "--init", "weights", "--out", str(tmp_path / "s"))
    assert_one_line_error(rc, err, "sweep")
    rc, _, err = run_cli(capsys, "sweep", "--kernels", "3", "--override", "large_kernel_sizes=(3,3,3,3)",
                         "--out", str(tmp_path / "s"), *TINY)
    assert_one_line_error(rc, err, "sweep")


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    """One tiny sweep (K = 3, 7; train + deploy) shared by the sweep tests."""
    out_dir = tmp_path_factory.mktemp("sweep") / "sweep"
    rc = main(["sweep", "--kernels", "3,7", "--reparam", "both", "--out", str(out_dir), "--formats", "png,pdf", *TINY])
    assert rc == 0
    return out_dir


def test_sweep_tiny(capsys, tiny_sweep):
    out_dir = tiny_sweep
    for name in ("grid.png", "grid.pdf", "growth.png", "growth.pdf", "sweep.csv", "sweep.md", "sweep.json"):
        assert (out_dir / name).is_file(), name
    for k in (3, 7):
        for mode in ("train", "deploy"):
            sub = out_dir / f"K{k}-{mode}"
            assert {"erf.npy", "metrics.json", "erf.png", "erf.pdf", "run.json"} <= {p.name for p in sub.iterdir()}
    record = json.loads((out_dir / "sweep.json").read_text())
    assert record["parameters"]["kernels"] == [3, 7] and record["parameters"]["overrides"]["channels"] == [8] * 4
    rows = list(csv.DictReader(io.StringIO((out_dir / "sweep.csv").read_text())))
    assert [(r["kernel"], r["reparam"]) for r in rows] == [("3", "train"), ("3", "deploy"), ("7", "train"),
                                                           ("7", "deploy")]
    assert rows[0]["model"] == "replknet_3" and rows[2]["model"] == "replknet_7"
    assert int(rows[2]["trf"]) > int(rows[0]["trf"])  # the theoretical RF grows with the kernel
    # a theoretical RF wider than the 64 px image (187 and 427 px here) bounds erf/trf by the input size: named
    beyond = [r["run_dir"] for r in rows if int(r["trf"]) > 64]
    note = [p for p in (out_dir / "sweep.md").read_text().split("\n\n") if p.startswith("erf/trf:")]
    assert beyond and note == [f"erf/trf: the theoretical RF exceeds the image for {', '.join(beyond)}; there the ERF "
                               "is cut by the image's edge, so the ratio is bounded by the input size, not a property "
                               "of the network alone."]
    # re-parameterization is exact: the deploy ERF equals the train-time ERF up to float rounding
    assert [d["kernel"] for d in record["reparam_diff"]] == [3, 7]
    for d in record["reparam_diff"]:
        assert d["max_rel_diff"] < 1e-5
    e3 = np.load(out_dir / "K3-train" / "erf.npy")
    e7 = np.load(out_dir / "K7-train" / "erf.npy")
    assert e3.shape == e7.shape == (64, 64) and not np.allclose(e3, e7)
    d7 = np.load(out_dir / "K7-deploy" / "erf.npy")
    assert np.abs(d7 - e7).max() == pytest.approx(record["reparam_diff"][1]["max_abs_diff"], rel=1e-12, abs=1e-300)
    assert "train vs deploy" in (out_dir / "sweep.md").read_text()
    with Image.open(out_dir / "grid.png") as im:
        assert im.size[0] > 800 and im.size[1] > 800

    # a second run with the same settings reuses the finished sub-runs
    before = (out_dir / "K7-deploy" / "erf.npy").stat().st_mtime_ns
    rc, out, err = run_cli(capsys, "sweep", "--kernels", "3,7", "--out", str(out_dir), "--formats", "png", *TINY)
    assert rc == 0, err
    assert (out_dir / "K7-deploy" / "erf.npy").stat().st_mtime_ns == before
    assert "| 7 | deploy | replknet_7 | random |" in out
    assert "weights = random: seeded random initialization, not trained weights" in out
    assert {r["weights"] for r in rows} == {"random"}


def test_sweep_with_weights_dir(capsys, tmp_path, tiny_sweep):
    from erf_lab.models import create_model

    torch.manual_seed(0)  # the same seed the sweep uses for random init -> identical weights
    model = create_model("replknet_3", channels=(8, 8, 8, 8), layers=(1, 1, 1, 1))
    wdir = tmp_path / "weights"
    wdir.mkdir()
    torch.save(model.state_dict(), wdir / "replknet_3.pth")
    rc, out, err = run_cli(capsys, "sweep", "--kernels", "3", "--reparam", "train",  # --weights-dir: --init weights
                           "--weights-dir", str(wdir), "--out", str(tmp_path / "w"), "--formats", "png", *TINY)
    assert rc == 0, err
    assert "| 3 | train | replknet_3 | replknet_3.pth |" in out and "random" not in out
    np.testing.assert_allclose(np.load(tmp_path / "w" / "K3-train" / "erf.npy"),
                               np.load(tiny_sweep / "K3-train" / "erf.npy"), rtol=1e-10)
    run_json = json.loads((tmp_path / "w" / "K3-train" / "run.json").read_text())
    assert run_json["weights"].endswith("replknet_3.pth") and run_json["tags"]["sweep"]["kernel"] == 3
    assert run_json["random_init"] is False
    rc, _, err = run_cli(capsys, "sweep", "--kernels", "7", "--init", "weights", "--weights-dir", str(wdir),
                         "--out", str(tmp_path / "x"), *TINY)
    assert_one_line_error(rc, err, "sweep")
    assert "no checkpoint for kernel 7" in err
    rc, _, err = run_cli(capsys, "sweep", "--kernels", "3,7,13", "--weights-dir", str(wdir),
                         "--out", str(tmp_path / "y"), *TINY)
    assert_one_line_error(rc, err, "sweep")
    assert f"no checkpoint for kernels 7, 13 in {wdir} (expected" in err  # every one missing, in one line


def test_sweep_refuses_to_overwrite_members_of_other_settings(capsys, tmp_path):
    """A member folder with a complete run of another configuration is kept unless --force (like compute)."""
    out_dir = tmp_path / "s"
    args = ["sweep", "--kernels", "3", "--reparam", "train", "--num-images", "1", "--formats", "png",
            "--out", str(out_dir), *TINY]
    assert run_cli(capsys, *args, "--input-size", "32")[0] == 0
    before = (out_dir / "K3-train" / "erf.npy").read_bytes()
    rc, out, err = run_cli(capsys, *args, "--input-size", "48")
    assert_one_line_error(rc, err, "sweep")
    assert "K3-train already holds a complete run with other settings (input_size); use --force" in err
    assert json.loads((out_dir / "K3-train" / "run.json").read_text())["input_size"] == 32
    assert (out_dir / "K3-train" / "erf.npy").read_bytes() == before
    rc, out, err = run_cli(capsys, *args, "--input-size", "48", "--force")
    assert rc == 0, err
    assert json.loads((out_dir / "K3-train" / "run.json").read_text())["input_size"] == 48


def test_sweep_says_its_warnings_in_one_line_each(capsys, tmp_path):
    """A sweep over a folder with an unreadable and a non-image file: Python's own warning format came out
    ('/path/erf_lab/erf/runner.py:606: UserWarning: ...' and the source line under it). Now one line each, as
    compute and train say theirs."""
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    Image.fromarray(np.full((40, 40, 3), 90, dtype=np.uint8)).save(imgs / "a.png")
    (imgs / "bad.png").write_text("not an image")
    (imgs / "notes.txt").write_text("hello")
    rc, out, err = run_cli(capsys, "sweep", "--input-sizes", "32", "--model", "replknet_31b", "--reparam", "deploy",
                           "--images", str(imgs), "--formats", "png", "--out", str(tmp_path / "s"), *TINY[:4],
                           "--quiet")
    assert rc == 0, err
    assert err.strip().splitlines() == [
        f"erf-lab sweep: warning: skipped 1 unreadable image file(s) in {imgs}: bad.png",
        f"erf-lab sweep: warning: ignored 1 non-image file(s) in {imgs}"], err


def test_sweep_measures_again_a_member_whose_erf_npy_is_damaged(capsys, tmp_path):
    """A complete member (run.json) whose erf.npy is truncated is measured again by the same sweep; before, the
    sweep reused it and then stopped on the unreadable file, with --force too (the folder had to be deleted)."""
    out_dir = tmp_path / "s"
    args = ["sweep", "--kernels", "3", "--reparam", "train", "--formats", "png", "--out", str(out_dir), *TINY]
    assert run_cli(capsys, *args)[0] == 0
    good = np.load(out_dir / "K3-train" / "erf.npy")
    (out_dir / "K3-train" / "erf.npy").write_bytes((out_dir / "K3-train" / "erf.npy").read_bytes()[:100])
    rc, out, err = run_cli(capsys, *args)
    assert rc == 0, err
    np.testing.assert_array_equal(np.load(out_dir / "K3-train" / "erf.npy"), good)
    assert json.loads((out_dir / "sweep.json").read_text())["rows"][0]["reused"] is False


def test_sweep_rows_of_reused_members_come_from_erf_npy(capsys, tmp_path):
    """A reused member's row is computed from its erf.npy: a damaged metrics.json was a TypeError traceback, and a
    stale one (here: no area ratios) put numbers in sweep.csv that did not match the saved map."""
    out_dir = tmp_path / "s"
    args = ["sweep", "--kernels", "3", "--reparam", "train", "--formats", "png", "--out", str(out_dir), *TINY]
    assert run_cli(capsys, *args)[0] == 0
    first = (out_dir / "sweep.csv").read_text()
    erf = np.load(out_dir / "K3-train" / "erf.npy")
    area50 = compute_metrics(erf, centre=json.loads((out_dir / "K3-train" / "run.json").read_text())["erf_centre"])[
        "high_contribution"][2]["area_ratio"] * 100
    for damaged in ('{"shape": [64', '{"shape": [64, 64], "high_contribution": []}'):
        (out_dir / "K3-train" / "metrics.json").write_text(damaged)
        rc, out, err = run_cli(capsys, *args)
        assert rc == 0 and "Traceback" not in err, err
        assert (out_dir / "sweep.csv").read_text() == first
        row = next(csv.DictReader(io.StringIO(first)))
        assert float(row["area@50%"]) == pytest.approx(area50)


def test_sweep_measures_a_reused_members_metrics_once(capsys, tmp_path, monkeypatch):
    """run_erf already returns a reused run's metrics recomputed from its erf.npy; the sweep computed them a second
    time on its own (a second Gaussian fit per member, in a second place that had to agree with the first)."""
    from erf_lab.erf import metrics as metrics_module

    out_dir = tmp_path / "s"
    args = ["sweep", "--kernels", "3", "--reparam", "train", "--formats", "png", "--out", str(out_dir), *TINY]
    assert run_cli(capsys, *args)[0] == 0
    calls, real = [], metrics_module.contribution_curve  # once per compute_metrics, wherever it was imported
    monkeypatch.setattr(metrics_module, "contribution_curve", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    def table():
        return [{k: v for k, v in r.items() if k != "reused"}
                for r in csv.DictReader(io.StringIO((out_dir / "sweep.csv").read_text()))]

    first = table()
    assert run_cli(capsys, *args)[0] == 0
    assert table() == first and len(calls) == 1, len(calls)


def test_sweep_figures_of_random_init_members_say_so(capsys, tmp_path, monkeypatch):
    """grid.<fmt> and growth.<fmt> of untrained members carry the (random init) mark, as compute's and compare's
    figures do; before, only the tables said so and the figures (which travel alone) did not."""
    from erf_lab.erf import plotting

    seen = {}
    grid, growth = plotting.plot_grid, plotting.plot_growth

    def spy_grid(erfs, row_labels, *a, **kw):
        seen["rows"] = list(row_labels)
        return grid(erfs, row_labels, *a, **kw)

    def spy_growth(rows, *a, **kw):
        seen["groups"] = sorted({r[kw.get("group", "reparam")] for r in rows})
        return growth(rows, *a, **kw)

    monkeypatch.setattr(plotting, "plot_grid", spy_grid)
    monkeypatch.setattr(plotting, "plot_growth", spy_growth)
    args = ["sweep", "--kernels", "3", "--reparam", "train", "--formats", "png", "--out", str(tmp_path / "s"), *TINY]
    rc, out, err = run_cli(capsys, *args)
    assert rc == 0, err
    assert seen["rows"] == ["train (random init)"] and seen["groups"] == ["train (random init)"]


def test_a_run_whose_erf_npy_is_not_its_input_size_is_refused(capsys, tmp_path):
    """An erf.npy replaced by another run's map (another size) was compared under this run's label ("64px") and
    centred on this run's erf_centre; now one error line, in analyze and compare."""
    run, other = tmp_path / "run", tmp_path / "other"
    write_run_dir(run, gaussian_map(n=40), {"model": "m", "input_size": 40}, theoretical_rf=30)
    write_run_dir(other, gaussian_map(n=40), {"model": "m", "input_size": 40}, theoretical_rf=30)
    np.save(run / "erf.npy", gaussian_map(n=64))
    for argv in (["analyze", str(run)], ["compare", str(run), str(other), "--out", str(tmp_path / "c")]):
        rc, out, err = run_cli(capsys, *argv)
        assert_one_line_error(rc, err, argv[0])
        assert "a 64x64 map, but" in err and "input_size 40" in err
    assert not (tmp_path / "c").exists()


def test_a_sweep_refused_by_its_first_member_leaves_no_folder(capsys, tmp_path):
    """An unknown --layer or an image folder without images is found when the first member starts: the sweep's
    --out stayed behind, empty."""
    (tmp_path / "no-images").mkdir()
    for extra, words in ((["--layer", "bogus"], "unknown layer 'bogus'"),
                         (["--images", str(tmp_path / "no-images")], "no image files")):
        out_dir = tmp_path / "s"
        rc, out, err = run_cli(capsys, "sweep", "--kernels", "3", "--reparam", "train", "--out", str(out_dir),
                               *TINY, *extra)
        assert_one_line_error(rc, err, "sweep")
        assert words in err and not out_dir.exists()


def test_fewer_images_than_asked_for_are_said(capsys, tmp_path):
    """--num-images 30 on the 8 built-in images measured 8 without a word (compute: "over 8 image(s)"; sweep: the
    num_used column only); both now say that fewer were used than asked for."""
    tiny = [a for a in TINY if a not in ("--num-images", "1")]
    rc, out, err = run_cli(capsys, "compute", "--model", "replknet_31b", *tiny, "--num-images", "30", "--out",
                           str(tmp_path / "c"))
    assert rc == 0, err
    assert "note: 30 images asked for (--num-images), 8 used" in out
    rc, out, err = run_cli(capsys, "sweep", "--kernels", "3", "--reparam", "train", "--formats", "png", "--out",
                           str(tmp_path / "s"), *tiny, "--num-images", "30")
    assert rc == 0, err
    assert "30 images asked for (--num-images), fewer used by K3-train" in (tmp_path / "s" / "sweep.md").read_text()
    rc, out, err = run_cli(capsys, "compute", "--model", "replknet_31b", *tiny, "--num-images", "8", "--out",
                           str(tmp_path / "c8"))
    assert rc == 0 and "asked for" not in out


def test_compare_says_when_maps_were_not_made_alike(capsys, tmp_path):
    """Runs of another gradient aggregation (relu / abs) or of other images were compared without a word."""
    def run(name, aggregate, sha):
        write_run_dir(tmp_path / name, gaussian_map(), {"model": "m", "label": name, "aggregate": aggregate,
                                                        "config": {"images_sha256": sha}}, theoretical_rf=30)
        return str(tmp_path / name)

    a, b, c = run("a", "relu", "1" * 64), run("b", "abs", "1" * 64), run("c", "relu", "2" * 64)
    rc, out, err = run_cli(capsys, "compare", a, b, "--out", str(tmp_path / "ab"), "--formats", "png")
    assert rc == 0, err
    assert "Not like with like: the gradient aggregation differs (a: relu, b: abs)" in out
    assert "Not like with like" in (tmp_path / "ab" / "compare.md").read_text()
    rc, out, err = run_cli(capsys, "compare", a, c, "--out", str(tmp_path / "ac"), "--formats", "png")
    assert "Not like with like: the maps were measured on different images" in out
    rc, out, err = run_cli(capsys, "compare", a, a, "--out", str(tmp_path / "aa"), "--formats", "png")
    assert rc == 0 and "Not like with like" not in out


def test_runs_not_made_as_the_paper_rows_are_named_beside_them(capsys, tmp_path):
    """compute, analyze and compare show the paper's Table 10 rows (ReLU aggregation at forward_features) beside
    the measured ones; a run with --aggregate abs or another --layer was shown there without a word."""
    def run(name, **how):
        write_run_dir(tmp_path / name, gaussian_map(), {"model": "m", "label": name, **how}, theoretical_rf=30)
        return str(tmp_path / name)

    paper, absolute = run("paper", aggregate="relu", layer="forward_features"), run("absolute", aggregate="abs")
    inner = run("inner", aggregate="relu", layer="stages.1")
    rc, out, err = run_cli(capsys, "compare", paper, absolute, inner, "--out", str(tmp_path / "c"), "--formats", "png")
    expected = ("The paper rows are ReLU-aggregated gradients at forward_features (the last stage's output); not "
                "comparable to them: absolute (aggregate abs); inner (layer stages.1).")
    assert rc == 0 and expected in out and expected in (tmp_path / "c" / "compare.md").read_text()
    rc, out, err = run_cli(capsys, "analyze", absolute, "--out", str(tmp_path / "a"), "--formats", "png")
    assert rc == 0 and "not comparable to them: absolute (aggregate abs)." in out
    rc, out, err = run_cli(capsys, "analyze", paper, "--out", str(tmp_path / "p"), "--formats", "png")
    assert rc == 0 and "not comparable" not in out


def test_a_sweep_folder_given_as_a_run_points_to_its_members(capsys, tmp_path):
    """'compare SWEEP_DIR' said '(incomplete run? it has no run.json either)', as if the sweep were a broken run."""
    sweep = tmp_path / "sweep"
    write_run_dir(sweep / "K3-train", gaussian_map(), {"model": "m"}, theoretical_rf=30)
    (sweep / "sweep.json").write_text(json.dumps({"complete": True, "command": "sweep", "rows": []}))
    for argv in (["compare", str(sweep), str(sweep / "K3-train"), "--out", str(tmp_path / "c")],
                 ["analyze", str(sweep)]):
        rc, out, err = run_cli(capsys, *argv)
        assert_one_line_error(rc, err, argv[0])
        assert f"(it holds an ERF sweep; its ERF runs are its sub-folders, e.g. {sweep / 'K3-train'})" in err
        assert "incomplete run" not in err


def test_compare_names_an_empty_map(capsys, tmp_path):
    """An all-zero map's row (n/r and - everywhere) was tabled without a word on why."""
    write_run_dir(tmp_path / "zero", np.zeros((40, 40)), {"model": "m", "label": "zero"}, theoretical_rf=30)
    write_run_dir(tmp_path / "g", gaussian_map(), {"model": "m", "label": "g"}, theoretical_rf=30)
    rc, out, err = run_cli(capsys, "compare", str(tmp_path / "zero"), str(tmp_path / "g"), "--out",
                           str(tmp_path / "c"), "--formats", "png")
    assert rc == 0, err
    assert "Empty map (all zero: no gradient reached the input" in out and "): zero." in out


def test_a_random_init_run_is_marked_in_metrics_json_and_in_analyze(capsys, tmp_path):
    """metrics.json of an untrained run says so by itself (a copy of the file alone stays marked), and
    ``erf-lab analyze`` marks its console report, its metrics.json and its figure (before: only the figure)."""
    run, trained = tmp_path / "rand", tmp_path / "trained"
    write_run_dir(run, gaussian_map(), {"model": "m", "label": "net", "random_init": True}, theoretical_rf=30)
    write_run_dir(trained, gaussian_map(), {"model": "m", "label": "net", "random_init": False}, theoretical_rf=30)
    assert json.loads((run / "metrics.json").read_text())["random_init"] is True
    assert "random_init" not in json.loads((trained / "metrics.json").read_text())
    rc, out, err = run_cli(capsys, "analyze", str(run))
    assert rc == 0, err
    assert out.splitlines()[0].startswith("ERF net (random init)")
    assert json.loads((run / "metrics.json").read_text())["random_init"] is True
    rc, out, err = run_cli(capsys, "analyze", str(trained))
    assert rc == 0 and "random init" not in out


def test_a_sweep_drawn_again_in_another_format_leaves_no_earlier_figure(capsys, tmp_path):
    """A sweep rerun into its --out with --formats svg (e.g. after adding a kernel) left the earlier grid/growth
    .png/.pdf beside the new figures: plots of other members under the sweep's names. They are now removed."""
    out = tmp_path / "s"
    args = ["sweep", "--kernels", "3", "--reparam", "deploy", "--override", "channels=(8,8,8,8)", "--override",
            "layers=(1,1,1,1)", "--input-size", "32", "--num-images", "1", "--quiet", "--out", str(out)]
    assert run_cli(capsys, *args)[0] == 0
    assert {p.name for p in out.glob("g*.*")} == {"grid.png", "grid.pdf", "growth.png", "growth.pdf"}
    assert run_cli(capsys, *args, "--formats", "svg")[0] == 0
    assert {p.name for p in out.glob("g*.*")} == {"grid.svg", "growth.svg"}


_TRY_LOCK = ("import fcntl, os, sys\nfd = os.open(sys.argv[1], os.O_RDONLY)\ntry:\n    fcntl.flock(fd, fcntl.LOCK_EX | "
             "fcntl.LOCK_NB)\nexcept OSError:\n    sys.exit(3)\n")


def _files(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _refused_while_held(capsys, command, folder, *argv):
    """``erf-lab command *argv`` while another erf-lab process holds ``folder``: one line naming it, exit 2, and
    nothing in the folder written or removed."""
    before = _files(folder)
    with held_by_another_process(folder):
        rc, _, err = run_cli(capsys, command, *argv)
    assert_one_line_error(rc, err, command)
    assert f"error: --out {folder} is in use: another erf-lab process is writing a run there now" in err, err
    assert _files(folder) == before


def test_analyze_into_a_folder_another_process_writes_is_refused(capsys, tmp_path, two_runs):
    """Two analyses into one folder (two shells, a loop), or one beside a run measured there, wrote the same
    metrics.json and figures at once; analyze now holds the folder it writes (its --out, else the run's)."""
    a, b = two_runs
    out_dir = tmp_path / "d"
    out_dir.mkdir()
    _refused_while_held(capsys, "analyze", out_dir, str(a), "--out", str(out_dir))
    _refused_while_held(capsys, "analyze", a, str(a), "--formats", "svg")
    rc, _, err = run_cli(capsys, "analyze", str(a), "--out", str(out_dir))
    assert rc == 0, err
    assert json.loads((out_dir / "metrics.json").read_text()) == json.loads(
        json.dumps(compute_metrics(gaussian_map(s=3.0), theoretical_rf=30)))
    assert run_cli(capsys, "analyze", str(a), "--formats", "svg")[0] == 0 and (a / "erf.svg").is_file()


def test_compare_into_a_folder_another_process_writes_is_refused(capsys, tmp_path, two_runs):
    """Two comparisons into one --out at once mixed their figures and tables; compare now holds its folder."""
    a, b = two_runs
    out_dir = tmp_path / "cmp"
    out_dir.mkdir()
    _refused_while_held(capsys, "compare", out_dir, str(a), str(b), "--out", str(out_dir))
    rc, _, err = run_cli(capsys, "compare", str(a), str(b), "--out", str(out_dir))
    assert rc == 0, err
    rows = list(csv.DictReader(io.StringIO((out_dir / "compare.csv").read_text())))
    assert [r["label"] for r in rows[:2]] == ["small", "large"]
    assert json.loads((out_dir / "compare.json").read_text())["complete"] is True


def test_a_sweep_holds_its_folder_and_its_members(capsys, tmp_path, monkeypatch):
    """Two sweeps into one --out (a shell loop, two terminals) measured and wrote the same members, tables and
    figures beside each other. The sweep now holds its folder from the start to sweep.json's completion, and each
    member run (its sub-folder) too: the same process holding both neither waits for nor refuses itself."""
    import subprocess
    import sys

    import erf_lab.erf.runner as runner

    out = tmp_path / "s"
    out.mkdir()
    args = ["sweep", "--kernels", "3", "--reparam", "deploy", "--override", "channels=(8,8,8,8)", "--override",
            "layers=(1,1,1,1)", "--input-size", "32", "--num-images", "1", "--quiet", "--out", str(out)]
    _refused_while_held(capsys, "sweep", out, *args[1:])
    assert list(out.iterdir()) == []  # no member begun, no sweep.json
    real, tries = runner.run_erf, []

    def run_erf(spec, *, out, **kw):  # another process cannot take the sweep's folder, nor the member's meanwhile
        def held():
            tries.append([subprocess.run([sys.executable, "-c", _TRY_LOCK, str(d)]).returncode for d in (out.parent,
                                                                                                          out)])
        res = real(spec, out=out, on_batch=lambda acc: held(), **kw)
        held()
        return res

    monkeypatch.setattr(runner, "run_erf", run_erf)
    rc, _, err = run_cli(capsys, *args)
    assert rc == 0, err
    assert tries and tries[0] == [3, 3] and tries[-1] == [3, 0]  # the member's folder let go when it is done
    assert json.loads((out / "sweep.json").read_text())["complete"] is True
    assert subprocess.run([sys.executable, "-c", _TRY_LOCK, str(out)]).returncode == 0  # let go at the end
    assert [r["run_dir"] for r in csv.DictReader(io.StringIO((out / "sweep.csv").read_text()))] == ["K3-deploy"]


def test_analyze_and_compare_say_when_the_theoretical_rf_exceeds_the_image(capsys, tmp_path):
    """A theoretical RF wider than the map bounds erf/trf by the image (ResNet-18's 435 px on a 40 px map): metrics.json
    flagged it and sweep.md said why, but 'analyze' only listed the flag and 'compare' tabled the ratio without a
    word; both now say it in one line, naming only that run."""
    write_run_dir(tmp_path / "wide", gaussian_map(), {"model": "resnet18", "label": "wide"}, theoretical_rf=435)
    write_run_dir(tmp_path / "narrow", gaussian_map(), {"model": "m", "label": "narrow"}, theoretical_rf=30)
    rc, out, err = run_cli(capsys, "analyze", str(tmp_path / "wide"), "--formats", "png")
    assert rc == 0, err
    assert "note: erf/trf: the theoretical RF exceeds the image for wide; there the ERF is cut by the image's" in out
    rc, out, err = run_cli(capsys, "analyze", str(tmp_path / "narrow"), "--formats", "png")
    assert rc == 0 and "exceeds the image" not in out
    rc, out, err = run_cli(capsys, "compare", str(tmp_path / "wide"), str(tmp_path / "narrow"), "--out",
                           str(tmp_path / "c"), "--formats", "png")
    assert rc == 0, err
    assert "erf/trf: the theoretical RF exceeds the image for wide; there" in out
    assert "exceeds the image for wide; there" in (tmp_path / "c" / "compare.md").read_text()


def test_a_threshold_not_reached_about_a_centre_near_the_edge_is_said(capsys, tmp_path):
    """At 33 px and stride 32 (ResNet-18) the measured unit, 1 of a 2 x 2 map, is centred on pixel 32, the image's
    last: the largest square about it is 1 px, so every area ratio was n/r, read as an ERF wider than the image with no
    word on why. analyze, compare and compute now give the largest square's side; a centred map gets no such note."""
    write_run_dir(tmp_path / "edge", gaussian_map(), {"model": "m", "label": "edge", "erf_centre": [36, 30]},
                  centre=[36, 30])
    write_run_dir(tmp_path / "mid", gaussian_map(), {"model": "m", "label": "mid"})
    rc, out, err = run_cli(capsys, "analyze", str(tmp_path / "edge"), "--formats", "png")
    assert rc == 0, err
    assert "note: n/r: the squares are centred on the measured unit's receptive field" in out
    assert "edge (centre (36, 30) of 40x40: 7 px); a threshold not reached is bounded by that square" in out
    rc, out, err = run_cli(capsys, "compare", str(tmp_path / "edge"), str(tmp_path / "mid"), "--out",
                           str(tmp_path / "c"), "--formats", "png")
    assert rc == 0, err
    assert "smaller than the map for edge (centre (36, 30) of 40x40: 7 px);" in out and "mid (" not in out
    rc, out, err = run_cli(capsys, "analyze", str(tmp_path / "mid"), "--formats", "png")
    assert rc == 0 and "n/r: the squares" not in out
    rc, out, err = run_cli(capsys, "compute", "--model", "resnet18", "--input-size", "33", "--num-images", "1",
                           "--out", str(tmp_path / "r18"), "--quiet")
    assert rc == 0, err
    assert "| 33x33 | n/r | n/r | n/r | n/r |" in out
    assert "smaller than the map for resnet18 (centre (32, 32) of 33x33: 1 px)" in out


def test_a_global_theoretical_rf_is_said_where_the_tables_show_no_trf(capsys, tmp_path):
    """A layer after squeeze-and-excitation (UniRepLKNet) has a global theoretical RF: its trf and erf/trf columns are
    '-' as for a run without any, and analyze, compare and sweep.md now say why (with the kernels' own RF)."""
    write_run_dir(tmp_path / "uni", gaussian_map(), {"model": "unireplknet_t", "label": "uni", "rf_global": True,
                                                     "kernel_rf": 2191})
    write_run_dir(tmp_path / "plain", gaussian_map(), {"model": "m", "label": "plain"}, theoretical_rf=30)
    rc, out, err = run_cli(capsys, "analyze", str(tmp_path / "uni"), "--formats", "png")
    assert rc == 0, err
    assert "note: trf -: the theoretical RF is the whole image for uni (its kernels alone: 2191 px)" in out
    rc, out, err = run_cli(capsys, "analyze", str(tmp_path / "uni"), "--formats", "png", "--theoretical-rf", "99")
    assert rc == 0 and "trf -:" not in out  # a theoretical RF given by the user is shown instead
    write_run_dir(tmp_path / "uni2", gaussian_map(), {"model": "unireplknet_t", "label": "uni2", "rf_global": True,
                                                      "kernel_rf": 2191})
    rc, out, err = run_cli(capsys, "compare", str(tmp_path / "uni2"), str(tmp_path / "plain"), "--out",
                           str(tmp_path / "c"), "--formats", "png")
    assert rc == 0, err
    assert ("trf -: the theoretical RF is the whole image for uni2 (its kernels alone: 2191 px): every input "
            "pixel") in out
    assert "plain (" not in out.split("trf -:")[1]
    rc, out, err = run_cli(capsys, "sweep", "--input-sizes", "33", "--model", "unireplknet_t", "--override",
                           "dims=(8,16,16,24)", "--override", "depths=(1,1,1,1)", "--override",
                           "kernel_sizes=((3,),(13,),(7,),(9,))", "--num-images", "1", "--reparam", "deploy", "--out",
                           str(tmp_path / "sw"), "--formats", "png", "--quiet")
    assert rc == 0, err
    md = (tmp_path / "sw" / "sweep.md").read_text()
    assert "trf -: the theoretical RF is the whole image for S33-deploy (its kernels alone: 519 px)" in md

"""`erf-lab shape-bias`: outputs, --compare, and one-line errors (exit 2). Tiny models, --limit runs."""
from __future__ import annotations

import csv
import json
import shutil
import textwrap

import pytest

from conftest import held_by_another_process
from erf_lab.cli.main import main
from erf_lab.shape_bias import shape_bias_from_csv
from erf_lab.shape_bias.analysis import human_csvs
from erf_lab.shape_bias.plotting import analyse_csvs

TINY = textwrap.dedent('''
    import torch, torch.nn as nn

    class Tiny(nn.Module):
        def __init__(self, num_classes=1000):
            super().__init__()
            torch.manual_seed(num_classes)
            self.conv = nn.Conv2d(3, 8, 16, stride=16)
            self.fc = nn.Linear(8, num_classes)
            self.default_cfg = {"input_size": (3, 64, 64), "mean": (0.5,) * 3, "std": (0.5,) * 3,
                                "interpolation": "bilinear", "crop_pct": 0.875}

        def forward(self, x):
            return self.fc(self.conv(x).mean((2, 3)))

    def tiny(num_classes=1000, seed=0):
        torch.manual_seed(seed)
        return Tiny(num_classes)

    class Oven(nn.Module):  # answers ImageNet class 766 (oven) for every image
        default_cfg = {"input_size": (3, 32, 32)}

        def forward(self, x):
            out = torch.zeros(x.shape[0], 1000)
            out[:, 766] = 9.0
            return out

    def oven():
        return Oven()
''')


@pytest.fixture()
def tiny_model(tmp_path, monkeypatch):
    (tmp_path / "sb_tiny_models.py").write_text(TINY)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "sb_tiny_models:tiny"


def _one_error_line(err: str) -> list[str]:
    return [line for line in err.replace("\r", "\n").splitlines() if "error:" in line]


def test_run_writes_all_outputs(tiny_model, tmp_path, datasets, capsys):
    out = tmp_path / "run"
    n = min(32, sum(1 for _ in (datasets / "cue-conflict").rglob("*.png")))
    rc = main(["shape-bias", "--model", tiny_model, "--stimuli", str(datasets / "cue-conflict"), "--allow-random",
               "--limit", "32", "--batch-size", "8", "--workers", "1", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert "shape bias" in capsys.readouterr().out
    for name in ("decisions.csv", "summary.json", "run.json", "shape_bias.png", "shape_bias.pdf",
                 "cue-conflict_sb-tiny-models-tiny-random-init_session-1.csv"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    s = json.loads((out / "summary.json").read_text())
    with open(out / "decisions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    cue = [r for r in rows if r["set"] == "cue-conflict"]
    assert len(cue) == n and s["n_images"]["cue-conflict"] == n
    assert {r["set"] for r in rows} == {"cue-conflict", "edges", "silhouettes"}
    assert {f"score_{c}" for c in ("airplane", "truck")} <= set(rows[0]) and rows[0]["top_class"]
    # decisions.csv, summary.json and the model-vs-human CSV all agree
    shape = sum(r["decision"] == r["shape"] for r in cue if r["shape"] != r["texture"])
    texture = sum(r["decision"] == r["texture"] for r in cue if r["shape"] != r["texture"])
    assert (s["shape_hits"], s["texture_hits"]) == (shape, texture)
    mvh = shape_bias_from_csv(out / "cue-conflict_sb-tiny-models-tiny-random-init_session-1.csv")
    assert (mvh["shape_hits"], mvh["texture_hits"]) == (shape, texture)
    assert s["preprocessing"]["input_size"] == [64, 64]
    assert s["preprocessing"]["crop_pct"] == 1.0  # the model's 0.875 only with --crop-pct model
    assert s["human_reference"]["shape_bias"] == shape_bias_from_csv(human_csvs(datasets))["shape_bias"]
    assert len(s["state_dict_sha256"]) == 64 and s["versions"]["torch"] and s["command"]
    assert json.loads((out / "run.json").read_text())["limit"] == 32
    # one model-vs-human CSV per set, read back by --from-csv to the same consistency numbers
    csvs = [out / f"{ds}_sb-tiny-models-tiny-random-init_session-1.csv" for ds in ("cue-conflict", "edge", "silhouette")]
    again = analyse_csvs(csvs, tmp_path / "again", near=datasets)[0]
    assert again["consistency"] == s["consistency"] and s["edge_accuracy"] == s["consistency"]["edge"]["accuracy"]
    assert (out / "error_consistency.png").stat().st_size > 0


def test_the_help_says_what_limit_and_a_run_write(tiny_model, tmp_path, datasets):
    """--limit N takes N cue-conflict images but N/8 (at least 16) of edges and silhouettes, and a run writes a
    model-vs-human CSV per set and the error-consistency figure: the help said N images and one CSV."""
    from erf_lab.cli.main import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["shape-bias"]
    limit_help = next(a.help for a in sub._actions if a.dest == "limit")
    assert "edges and silhouettes: N/8 each, at least 16" in limit_help
    assert "a model-vs-human CSV per set" in sub.description and "error_consistency.png/pdf" in sub.description
    out = tmp_path / "run"
    assert main(["shape-bias", "--model", tiny_model, "--stimuli", str(datasets), "--allow-random", "--limit", "160",
                 "--workers", "0", "--no-humans", "--out", str(out)]) == 0
    n = json.loads((out / "summary.json").read_text())["n_images"]
    for name in ("edges", "silhouettes"):
        assert n[name] == min(20, sum(1 for _ in (datasets / name).rglob("*.png")))  # 160 // 8


def test_no_humans_leaves_the_human_data_out_of_a_model_run(tiny_model, tmp_path, datasets, capsys):
    out = tmp_path / "run"
    assert main(["shape-bias", "--model", tiny_model, "--stimuli", str(datasets / "cue-conflict"), "--allow-random",
                 "--limit", "16", "--workers", "0", "--no-humans", "--out", str(out)]) == 0
    assert "humans:" not in capsys.readouterr().out
    s = json.loads((out / "summary.json").read_text())
    assert "human_reference" not in s and s["consistency"]["cue-conflict"]["vs_humans"] is None
    assert s["consistency"]["cue-conflict"]["accuracy"] is not None and (out / "shape_bias.png").is_file()



def test_a_rerun_in_the_same_folder_leaves_none_of_the_earlier_runs_files(tiny_model, tmp_path, fixture_datasets,
                                                                         capsys):
    """A run in a folder that holds an earlier shape-bias run removes the files of that run it does not write
    again: --no-humans after a run with humans had kept (and named on the console) the other run's
    error-consistency figure, another model its model-vs-human CSVs, a cue-world probe both."""
    out = tmp_path / "run"
    base = ["shape-bias", "--allow-random", "--stimuli", str(fixture_datasets), "--workers", "0", "--out", str(out)]
    tiny_csv = "cue-conflict_sb-tiny-models-tiny-random-init_session-1.csv"
    assert main([*base, "--model", tiny_model]) == 0
    assert "error_consistency.png/pdf" in capsys.readouterr().out and (out / "error_consistency.png").is_file()
    assert main([*base, "--model", tiny_model, "--no-humans"]) == 0
    assert "error_consistency" not in capsys.readouterr().out
    assert not (out / "error_consistency.png").exists() and not (out / "error_consistency.pdf").exists()
    assert (out / tiny_csv).is_file()
    assert main([*base, "--model", "sb_tiny_models:oven", "--no-humans"]) == 0
    oven_csv = "cue-conflict_sb-tiny-models-oven-random-init_session-1.csv"
    assert not (out / tiny_csv).exists() and (out / oven_csv).is_file()
    listed = json.loads((out / "run.json").read_text())["outputs"]
    assert sorted(p.name for p in out.iterdir() if p.is_file() and p.name != "run.json") == sorted(listed)

def test_compare_two_runs(tiny_model, tmp_path, datasets, capsys):
    runs = []
    for seed in (0, 1):
        out = tmp_path / f"run{seed}"
        assert main(["shape-bias", "--model", tiny_model, "--override", f"seed={seed}", "--limit", "16", "--allow-random",
                     "--workers", "0", "--stimuli", str(datasets), "--out", str(out)]) == 0  # root works too
        runs.append(str(out))
    capsys.readouterr()
    cmp_dir = tmp_path / "cmp"
    assert main(["shape-bias", "--compare", *runs, "--out", str(cmp_dir)]) == 0
    md = (cmp_dir / "comparison.md").read_text()
    humans = shape_bias_from_csv(human_csvs(datasets))["shape_bias"]
    assert f"| humans | {humans:.3f} |" in md and "CC BY 4.0" in md
    assert sum(line.startswith("| sb_tiny_models:tiny") for line in md.splitlines()) == 2
    assert "random initial weights (untrained)" in md  # the note under the table: both are random init
    with open(cmp_dir / "comparison.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["model"] for r in rows][0] == "humans" and len(rows) == 3
    assert round(float(rows[0]["fraction_correct_shape"]), 4) == round(shape_bias_from_csv(human_csvs(datasets))[
        "fraction_correct_shape"], 4)
    for r, d in zip(rows[1:], runs):
        s = json.loads((tmp_path / d / "summary.json").read_text())
        assert float(r["shape_bias"] or "nan") == pytest.approx(s["shape_bias"] or float("nan"), nan_ok=True)
        assert float(r["fraction_correct_shape"]) == pytest.approx(s["shape_hits"] / s["n_trials"])
    assert (cmp_dir / "shape_bias_comparison.png").is_file() and (cmp_dir / "shape_bias_comparison.pdf").is_file()
    assert (cmp_dir / "error_consistency_comparison.png").stat().st_size > 0


@pytest.mark.parametrize("make_args,needle", [
    (lambda t, m: ["--model", m, "--allow-random", "--stimuli", str(t / "nope")], "stimulus folder not found"),
    (lambda t, m: ["--model", m, "--allow-random", "--stimuli", str(t)], "no stimulus images"),
    (lambda t, m: ["--model", m, "--allow-random", "--override", "num_classes=10", "--limit", "4"], "10 outputs"),
    (lambda t, m: ["--stimuli", str(t)], "--model is required"),
    (lambda t, m: ["--compare", str(t)], "no summary.json"),
    (lambda t, m: ["--model", "no_such_model", "--allow-random", "--limit", "4"], "unknown model"),
    (lambda t, m: ["--model", m, "--limit", "4"], "has no trained weights"),
    (lambda t, m: ["--model", m, "--allow-random", "--crop-pct", "0"], "--crop-pct must be a fraction"),
    (lambda t, m: ["--model", m, "--allow-random", "--crop-pct", "most"], "--crop-pct must be a fraction"),
    (lambda t, m: ["--compare", str(t), "--model", m], "--compare draws finished runs only; drop --model"),
    (lambda t, m: ["--compare", str(t), "--seed", "1"], "--compare draws finished runs only; drop --seed"),
    (lambda t, m: ["--from-csv", str(t / "a.csv"), "--crop-pct", "model"], "without a model; drop --crop-pct"),
    (lambda t, m: ["--model", m, "--allow-random", "--stimuli", "cue-world", "--crop-pct", "0.9"],
     "--crop-pct is for the cue-conflict stimuli"),
    (lambda t, m: ["--from-csv", str(t / "a.csv"), "--pretrained"], "--from-csv analyses CSV files without a model"),
    (lambda t, m: ["--model", m, "--allow-random", "--limit", "4", "--workers", "-1"], "--workers must be >= 0"),
])
def test_errors_exit_2_with_one_line(tiny_model, tmp_path, capsys, make_args, needle):
    args = make_args(tmp_path, tiny_model)
    workers = [] if {"--compare", "--from-csv"} & set(args) else ["--workers", "0"]  # a model-run option
    rc = main(["shape-bias", *workers, "--out", str(tmp_path / "o"), *args])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    lines = _one_error_line(err)
    assert len(lines) == 1 and needle in lines[0], err


def test_unwritable_out_fails_before_any_image_is_read(tiny_model, tmp_path, capsys, monkeypatch, datasets):
    import erf_lab.shape_bias.evaluate as evaluate_module

    monkeypatch.setattr(evaluate_module, "evaluate", lambda *a, **k: pytest.fail("evaluated before --out was checked"))
    (tmp_path / "file").write_text("x")
    for out in (tmp_path / "file" / "o", tmp_path / "file"):
        rc = main(["shape-bias", "--model", tiny_model, "--allow-random", "--stimuli", str(datasets),
                   "--out", str(out)])
        lines = _one_error_line(capsys.readouterr().err)
        assert rc == 2 and len(lines) == 1 and "choose a folder" in lines[0]


def test_a_full_disk_is_one_error_line(tiny_model, tmp_path, capsys, monkeypatch, datasets):
    import errno

    import erf_lab.shape_bias.evaluate as evaluate_module

    def full(path, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(evaluate_module, "write_decisions_csv", full)
    rc = main(["shape-bias", "--model", tiny_model, "--allow-random", "--limit", "4", "--workers", "0",
               "--stimuli", str(datasets), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    lines = _one_error_line(err)
    assert rc == 2 and "Traceback" not in err and len(lines) == 1, err
    assert "No space left on device: " + str(tmp_path / "o" / "decisions.csv") in lines[0]


def test_a_reparameterized_random_init_is_not_taken_for_trained_weights(tmp_path, capsys, datasets):
    tiny = ["--model", "replknet_31b", "--override", "channels=(8,8,8,8)", "--override", "layers=(1,1,1,1)"]
    deploy = tmp_path / "deploy.safetensors"
    assert main(["reparam", *tiny, "--check-size", "32", "--out", str(deploy)]) == 0
    base = ["shape-bias", *tiny, "--weights", str(deploy), "--limit", "4", "--workers", "0", "--stimuli",
            str(datasets), "--out", str(tmp_path / "sb")]
    capsys.readouterr()
    assert main(base) == 2
    lines = _one_error_line(capsys.readouterr().err)
    assert len(lines) == 1 and f"{deploy} holds a random initialisation" in lines[0]
    assert not (tmp_path / "sb").exists()
    assert main(base + ["--allow-random"]) == 0
    s = json.loads((tmp_path / "sb" / "summary.json").read_text())
    assert s["random_weights"] is True and s["seed"] == 0 and s["label"].endswith("(random init)")
    # a .pth copied alone to another folder is still refused (before: its mark was only in the .run.json beside it)
    assert main(["reparam", *tiny, "--check-size", "32", "--out", str(tmp_path / "deploy.pth")]) == 0
    (tmp_path / "elsewhere").mkdir()
    alone = shutil.copy(tmp_path / "deploy.pth", tmp_path / "elsewhere" / "deploy.pth")
    capsys.readouterr()
    assert main([*base[:base.index("--weights") + 1], str(alone), *base[base.index("--weights") + 2:-1],
                 str(tmp_path / "sb2")]) == 2
    lines = _one_error_line(capsys.readouterr().err)
    assert len(lines) == 1 and f"{alone} holds a random initialisation" in lines[0]


def test_random_init_is_seeded_and_recorded(tmp_path, capsys, datasets):
    sha, printed_ci = {}, 0
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        out = tmp_path / name
        assert main(["shape-bias", "--model", "replknet_31b", "--override", "channels=(8,8,8,8)", "--override",
                     "layers=(1,1,1,1)", "--allow-random", "--seed", str(seed), "--limit", "16", "--workers", "0",
                     "--stimuli", str(datasets), "--out", str(out)]) == 0
        s = json.loads((out / "summary.json").read_text())
        assert s["seed"] == seed and json.loads((out / "run.json").read_text())["seed"] == seed
        sha[name] = s["state_dict_sha256"]
        # the interval is printed exactly when there is one (a random model may hit neither cue)
        ci, text = s.get("shape_bias_ci95"), capsys.readouterr().out
        assert (f"(95% CI {ci[0]:.3f}-{ci[1]:.3f})" in text) if ci else ("95% CI" not in text), text
        printed_ci += bool(ci)
    assert sha["a"] == sha["b"] != sha["c"]
    assert printed_ci  # these seeds hit a cue: the interval's line is exercised


def test_missing_data_tells_how_to_get_it(tiny_model, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ERF_LAB_DATA", str(tmp_path))  # a root without cue-conflict/
    rc = main(["shape-bias", "--model", tiny_model, "--allow-random", "--out", str(tmp_path / "o")])
    lines = _one_error_line(capsys.readouterr().err)
    assert rc == 2 and len(lines) == 1 and "erf-lab data download" in lines[0] and "ERF_LAB_DATA" in lines[0]


def test_an_erf_lab_data_that_is_no_folder_is_refused_not_passed_over(tiny_model, tmp_path, monkeypatch, capsys,
                                                                      fixture_datasets):
    """$ERF_LAB_DATA pointing nowhere (a typo) is one error line, as in 'erf-lab data info': the run does not go on
    with the data sets of the download cache instead of the ones pointed at."""
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "datasets").symlink_to(fixture_datasets)  # data in the cache: datasets_root() would fall back there
    monkeypatch.setenv("ERF_LAB_CACHE", str(cache))
    monkeypatch.setenv("ERF_LAB_DATA", str(tmp_path / "typo"))
    csvs = [str(p) for p in human_csvs(fixture_datasets)[:2]]
    for argv in (["--model", tiny_model, "--allow-random", "--limit", "4", "--workers", "0"], ["--from-csv", *csvs]):
        rc = main(["shape-bias", *argv, "--out", str(tmp_path / "o")])
        lines = _one_error_line(capsys.readouterr().err)
        assert rc == 2 and lines == [f"erf-lab shape-bias: error: ERF_LAB_DATA={tmp_path / 'typo'} is not a folder; "
                                     "point it at the folder holding cue-conflict/ or unset it"], lines
        assert not (tmp_path / "o").exists()


def test_untrained_model_is_refused_with_how_to_get_weights(tmp_path, capsys):
    rc = main(["shape-bias", "--model", "efficientnet_lite0", "--limit", "4", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    lines = _one_error_line(err)
    assert rc == 2 and "Traceback" not in err and len(lines) == 1, err
    for needle in ("efficientnet_lite0 has no trained weights", "--pretrained", "--weights FILE", "--allow-random"):
        assert needle in lines[0], needle
    assert not (tmp_path / "o").exists()


def test_allow_random_marks_every_output(tiny_model, tmp_path, fixture_datasets, capsys, monkeypatch):
    from erf_lab.shape_bias import plotting

    plotted = []
    real_plot = plotting.plot_shape_bias
    monkeypatch.setattr(plotting, "plot_shape_bias", lambda s, *a, **k: plotted.extend(x["label"] for x in s) or
                        real_plot(s, *a, **k))
    out = tmp_path / "run"
    assert main(["shape-bias", "--model", tiny_model, "--allow-random", "--stimuli", str(fixture_datasets),
                 "--workers", "0", "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "UNTRAINED" in stdout and "sb_tiny_models:tiny (random init): shape bias" in stdout
    s = json.loads((out / "summary.json").read_text())
    assert s["random_weights"] is True and s["label"] == "sb_tiny_models:tiny (random init)"
    assert plotted == ["sb_tiny_models:tiny (random init)"]  # the figure's label
    with open(out / "cue-conflict_sb-tiny-models-tiny-random-init_session-1.csv", newline="") as f:
        assert {r["subj"] for r in csv.DictReader(f)} == {"sb_tiny_models:tiny-random-init"}


def test_weights_file_is_a_trained_run(tiny_model, tmp_path, fixture_datasets, capsys):
    import torch

    from sb_tiny_models import tiny

    torch.save(tiny().state_dict(), tmp_path / "tiny.pth")
    out = tmp_path / "run"
    assert main(["shape-bias", "--model", tiny_model, "--weights", str(tmp_path / "tiny.pth"), "--stimuli",
                 str(fixture_datasets), "--workers", "0", "--out", str(out)]) == 0
    assert "UNTRAINED" not in capsys.readouterr().out
    s = json.loads((out / "summary.json").read_text())
    assert s["random_weights"] is False and s["label"] == "sb_tiny_models:tiny (tiny.pth)"
    assert (out / "cue-conflict_sb-tiny-models-tiny_session-1.csv").is_file()


def test_weights_trained_on_a_folder_of_other_classes_are_refused(tiny_model, tmp_path, fixture_datasets, capsys):
    """A 16-way head that 'erf-lab train' fitted to a folder of 16 other classes was read as model-vs-human's
    categories (its class 0 as 'airplane') and a shape bias reported. The weights name their classes now: refused,
    one line, nothing written; a folder of exactly the 16 categories is measured."""
    from sb_tiny_models import tiny

    from erf_lab.shape_bias import CATEGORIES
    from erf_lab.train import checkpoints as C

    sd = tiny(16).state_dict()
    C.save_weights(sd, tmp_path / "other", classes=[f"class{i:02d}" for i in range(16)])
    C.save_weights(sd, tmp_path / "mvh", "safetensors", classes=list(CATEGORIES))
    args = ["shape-bias", "--model", tiny_model, "--override", "num_classes=16", "--stimuli", str(fixture_datasets),
            "--workers", "0", "--limit", "2", "--no-humans"]
    for name in ("other.pth", "other.safetensors"):
        out = tmp_path / f"run-{name}"
        assert main([*args, "--weights", str(tmp_path / name), "--out", str(out)]) == 2
        lines = _one_error_line(capsys.readouterr().err)
        assert len(lines) == 1 and "was trained on a folder whose 16 classes (class00, class01, class02, ...;" in \
            lines[0] and "would read its class 'class00' as 'airplane'" in lines[0], lines
        assert not out.exists()
    assert main([*args, "--weights", str(tmp_path / "mvh.safetensors"), "--out", str(tmp_path / "run-mvh")]) == 0


def test_a_thousand_way_head_of_a_folder_run_must_be_imagenets_synsets(tmp_path):
    """A 1000-way head is read through ImageNet-1k's class indices: a folder run of the 1000 synset folders
    (n########, sorted as ImageNet numbers them) passes, one of 1000 other classes is refused."""
    import torch

    from erf_lab.errors import ErfLabError
    from erf_lab.shape_bias.evaluate import refuse_other_classes
    from erf_lab.train import checkpoints as C

    sd = {"fc.weight": torch.zeros(1000, 2)}
    C.save_weights(sd, tmp_path / "imagenet", "safetensors", classes=[f"n{i:08d}" for i in range(1000)])
    C.save_weights(sd, tmp_path / "other", "safetensors", classes=[f"class{i:04d}" for i in range(1000)])
    refuse_other_classes(str(tmp_path / "imagenet.safetensors"))
    with pytest.raises(ErfLabError, match=r"1000 classes \(class0000, class0001, class0002, \.\.\.; from the "
                                          r"safetensors metadata of other\.safetensors\) are not ImageNet-1k's"):
        refuse_other_classes(str(tmp_path / "other.safetensors"))


def test_degenerate_run_is_flagged(tiny_model, tmp_path, fixture_datasets, capsys):
    out = tmp_path / "run"
    assert main(["shape-bias", "--model", "sb_tiny_models:oven", "--allow-random", "--stimuli",
                 str(fixture_datasets), "--workers", "0", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    s = json.loads((out / "summary.json").read_text())
    # fixture: 12 images, all answered 'oven'; of the 11 conflict images one has texture oven (bottle5-oven2)
    assert s["warnings"] == ["degenerate run: 12 of 12 cue-conflict images (100%) are classified 'oven'",
                             "shape-or-texture hits on 0.091 of the conflict images, below chance (0.125): "
                             "the shape bias is noise",
                             "shape bias from only 1 shape-or-texture decisions: its 95% interval is 0.00-0.79",
                             # 12 stimuli against the subjects' full 1280 trials: a subset's consistency is flagged
                             "cue-conflict: accuracy and consistency from 12 of the subjects' 1280 trials (a subset "
                             "of the stimuli): model-vs-human compares whole sets, and an error consistency over few "
                             "trials varies widely from subset to subset",
                             # the fixture holds the humans of cue-conflict only
                             *(f"no human responses for {ds} (no human-{ds}/ CSVs in {fixture_datasets}): its "
                               "accuracy has no comparison with the subjects; 'erf-lab data download' fetches them"
                               for ds in ("edge", "silhouette"))]
    assert (s["shape_hits"], s["texture_hits"], s["n_conflict"]) == (0, 1, 11)
    assert [line.strip() for line in err.splitlines() if line.strip().startswith("warning:")] == \
        [f"warning: {w}" for w in s["warnings"]]


def test_a_model_whose_outputs_are_nan_is_refused(tiny_model, tmp_path, fixture_datasets, capsys):
    """NaN weights: one error line and no summary (before: every NaN row read as category 0 and a shape bias with
    its interval reported, exit 0)."""
    import torch

    from sb_tiny_models import tiny

    torch.save({k: torch.full_like(v, float("nan")) for k, v in tiny().state_dict().items()}, tmp_path / "nan.pth")
    out = tmp_path / "run"
    assert main(["shape-bias", "--model", tiny_model, "--weights", str(tmp_path / "nan.pth"), "--stimuli",
                 str(fixture_datasets), "--workers", "0", "--out", str(out)]) == 2
    err = _one_error_line(capsys.readouterr().err)
    assert len(err) == 1 and \
        "the model's outputs are not finite (NaN or inf) on 12 of 12 cue-conflict image(s) in a batch" in err[0]
    assert not (out / "summary.json").exists()


def test_no_cache_decodes_and_writes_no_cache(tiny_model, tmp_path, fixture_datasets, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("ERF_LAB_CACHE", str(cache))
    args = ["shape-bias", "--model", tiny_model, "--allow-random", "--stimuli", str(fixture_datasets), "--workers",
            "0"]
    assert main([*args, "--no-cache", "--out", str(tmp_path / "a")]) == 0
    assert not (cache / "stimuli").exists()
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    assert len(list((cache / "stimuli").glob("*.u8.npy"))) == 3  # cue-conflict, edges, silhouettes
    assert main([*args, "--out", str(tmp_path / "c")]) == 0  # from the cache: the same decisions
    for run in ("b", "c"):
        assert (tmp_path / run / "decisions.csv").read_text() == (tmp_path / "a" / "decisions.csv").read_text()


_TRY_LOCK = ("import fcntl, os, sys\nfd = os.open(sys.argv[1], os.O_RDONLY)\ntry:\n    fcntl.flock(fd, fcntl.LOCK_EX | "
             "fcntl.LOCK_NB)\nexcept OSError:\n    sys.exit(3)\n")


def test_a_run_holds_its_folder_and_removes_a_killed_writes_temporary_files(tiny_model, tmp_path, fixture_datasets,
                                                                            capsys, monkeypatch):
    """The same command again is how a shape-bias run resumes; typed in a second shell while the first still runs,
    both wrote the same partial scores and outputs. The run now holds its folder (as compute and train do): the
    second gets one line, exit 2, and writes nothing. A run killed while it wrote a figure or table (SIGTERM outside
    the inference, SIGKILL) left that write's temporary file: the next run removes it; other files stay."""
    import subprocess
    import sys

    pytest.importorskip("fcntl")
    out = tmp_path / "run"
    out.mkdir()
    (out / ".shape_bias.pdf.k1lled00.tmp.pdf").write_bytes(b"%PDF-1.4")  # as a kill while writing the figure leaves
    (out / ".notes.tmp").write_text("mine")
    args = ["shape-bias", "--model", tiny_model, "--stimuli", str(fixture_datasets), "--allow-random", "--limit", "8",
            "--batch-size", "4", "--workers", "0", "--no-cache", "--out", str(out)]
    holder = subprocess.Popen([sys.executable, "-c", _TRY_LOCK + "print('held', flush=True)\nsys.stdin.read()\n",
                               str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(args) == 2
        err = capsys.readouterr().err
        assert _one_error_line(err) == [f"erf-lab shape-bias: error: --out {out} is in use: another erf-lab process "
                                        "is writing a run there now; wait for it to end (or stop it) and run the "
                                        "command again, or choose another --out"], err
        assert sorted(p.name for p in out.iterdir()) == [".notes.tmp", ".shape_bias.pdf.k1lled00.tmp.pdf"]
    finally:
        holder.communicate("")
    tries = []
    import erf_lab.shape_bias.evaluate as ev

    real = ev.write_decisions_csv

    def check_held(path, sets):  # while it writes, another process cannot take the folder
        tries.append(subprocess.run([sys.executable, "-c", _TRY_LOCK, str(out)]).returncode)
        return real(path, sets)

    monkeypatch.setattr(ev, "write_decisions_csv", check_held)
    assert main(args) == 0, capsys.readouterr().err
    assert tries == [3]
    names = {p.name for p in out.iterdir()}
    assert ".notes.tmp" in names and not [n for n in names if ".tmp." in n] and "run.json" in names


def test_compare_and_from_csv_hold_their_folders(tiny_model, tmp_path, fixture_datasets, capsys):
    """--compare and --from-csv wrote their tables and figures unguarded: two of them into one --out at once (a shell
    loop, a second terminal) mixed or replaced each other's files. They now hold the folder as a model run does: the
    second gets one line, exit 2, and writes nothing; once the first is done the same command runs."""
    run = tmp_path / "run"
    assert main(["shape-bias", "--model", tiny_model, "--stimuli", str(fixture_datasets), "--allow-random", "--limit",
                 "8", "--batch-size", "4", "--workers", "0", "--no-cache", "--out", str(run)]) == 0
    mvh = run / "cue-conflict_sb-tiny-models-tiny-random-init_session-1.csv"
    for argv, first in ((["--compare", str(run)], "comparison.csv"), (["--from-csv", str(mvh)], "summary.json")):
        out = tmp_path / argv[0].strip("-")
        out.mkdir()
        capsys.readouterr()
        with held_by_another_process(out):
            assert main(["shape-bias", *argv, "--out", str(out)]) == 2
        assert _one_error_line(capsys.readouterr().err) == [
            f"erf-lab shape-bias: error: --out {out} is in use: another erf-lab process is writing a run there now; "
            "wait for it to end (or stop it) and run the command again, or choose another --out"]
        assert list(out.iterdir()) == []
        assert main(["shape-bias", *argv, "--out", str(out)]) == 0, capsys.readouterr().err
        assert (out / first).is_file() and json.loads((out / "run.json").read_text())["what"] == \
            f"erf-lab shape-bias {argv[0]}"
    rows = list(csv.DictReader(open(tmp_path / "compare" / "comparison.csv", newline="")))
    assert [r["model"] for r in rows][1:] == ["sb_tiny_models:tiny (random init)"]
    summary = json.loads((run / "summary.json").read_text())
    again = json.loads((tmp_path / "from-csv" / "summary.json").read_text())
    assert (again["shape_hits"], again["texture_hits"]) == (summary["shape_hits"], summary["texture_hits"])


def test_a_bad_human_csv_is_refused_before_out_is_made(tiny_model, fixture_datasets, tmp_path, monkeypatch, capsys):
    """A human CSV with a category outside the 16 (under the datasets root, beside the stimuli) was refused by
    --compare only after --out was made (an empty folder left behind), and by a model run only after its inference
    (minutes at full size), with --out made. Both now read the human data first: one line, exit 2, nothing made."""
    data = tmp_path / "data"
    shutil.copytree(fixture_datasets / "cue-conflict", data / "cue-conflict")
    src = fixture_datasets / "human-cue-conflict" / "cue-conflict_subject-01_session_1.csv"
    with open(src, newline="") as f:
        rows = list(csv.DictReader(f))

    def write(path, rows):
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, list(rows[0]))
            w.writeheader()
            w.writerows(rows)

    model = tmp_path / "cue-conflict_m_session-1.csv"  # the subject's answers as a model's: a run to compare
    write(model, [dict(r, subj="m") for r in rows])
    run = tmp_path / "run"
    assert main(["shape-bias", "--from-csv", str(model), "--no-humans", "--out", str(run)]) == 0
    rows[9]["object_response"] = "tiger"  # the 10th trial: line 11 of the file
    bad = data / "human-cue-conflict" / src.name
    write(bad, rows)
    monkeypatch.setenv("ERF_LAB_DATA", str(data))
    capsys.readouterr()
    new = tmp_path / "new"
    for argv in (["--compare", str(run)], ["--model", tiny_model, "--allow-random", "--stimuli",
                                           str(data / "cue-conflict"), "--limit", "8", "--workers", "0"]):
        assert main(["shape-bias", *argv, "--out", str(new / "out")]) == 2
        lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert len(lines) == 1 and f"{bad}, line 11: object_response is 'tiger', not one of the 16" in lines[0], lines
        assert not new.exists()
    rows[9]["object_response"] = "bird"  # mended: both run
    write(bad, rows)
    assert main(["shape-bias", "--compare", str(run), "--out", str(new / "cmp")]) == 0
    assert (new / "cmp" / "comparison.csv").read_text().splitlines()[1].startswith("humans,")


def test_summary_records_which_weights_of_the_file_were_measured(tiny_model, tmp_path, capsys, datasets):
    """User test: a timm checkpoint holds raw and EMA weights; summary.json named the file's SHA-256 only, not
    which of the two was measured. It now records the entry loaded, the set passed over and the prefix stripped."""
    import torch

    from erf_lab.models import create_model

    raw = create_model(tiny_model).state_dict()
    ema = {k: v + 0.1 for k, v in raw.items()}
    weights = tmp_path / "timm.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in raw.items()},
                "state_dict_ema": {f"module.{k}": v for k, v in ema.items()}}, weights)
    assert main(["shape-bias", "--model", tiny_model, "--weights", str(weights), "--limit", "4", "--workers", "0",
                 "--stimuli", str(datasets), "--no-humans", "--out", str(tmp_path / "sb")]) == 0
    expected = {"entry": ["state_dict"], "passed_over": ["state_dict_ema"], "prefix_stripped": ["module."],
                "part": None, "left_out": 0}
    assert json.loads((tmp_path / "sb" / "summary.json").read_text())["weights_selection"] == expected
    assert json.loads((tmp_path / "sb" / "run.json").read_text())["weights_selection"] == expected


def test_quiet_turns_the_progress_bars_off(tiny_model, tmp_path, fixture_datasets, capsys):
    """`--quiet`, as in compute, sweep, train, timeline and study: shape-bias had none, so its decoding and
    per-set bars filled a batch job's log; the results are the same either way."""
    args = ["shape-bias", "--model", tiny_model, "--allow-random", "--stimuli", str(fixture_datasets), "--workers",
            "0", "--limit", "16"]
    assert main([*args, "--out", str(tmp_path / "bars")]) == 0
    assert "img/s" in capsys.readouterr().err
    assert main([*args, "--quiet", "--out", str(tmp_path / "quiet")]) == 0
    out, err = capsys.readouterr()
    assert "img/s" not in err and "%|" not in err and "shape bias" in out
    assert (tmp_path / "quiet" / "decisions.csv").read_text() == (tmp_path / "bars" / "decisions.csv").read_text()

"""model-vs-human consistency metrics (erf_lab.shape_bias.consistency).

How the definitions were checked against model-vs-human (bethgelab/model-vs-human, read, not copied):
``plotting/analyses.py`` (``SixteenClassAccuracy``: response == category over all trials; ``ErrorConsistency``:
trials sorted by image id, c_obs, c_exp = p1 p2 + (1-p1)(1-p2), kappa with c_obs == 1 -> 1), ``helper/
plotting_helper.py`` (``get_short_imagename``: the trial key), ``plotting/plot.py`` (``get_raw_matrix`` /
``get_raw_benchmark_df``: all trials of a subject, cue-conflict included without dropping shape == texture;
human-human over pairs j > i). Below: hand-computed values on constructed responses, and an independent
re-implementation (numpy, written from the paper's Eqs. 1-3) on the real human CSVs.
"""
from __future__ import annotations

import csv
import json
import os
import re
import statistics
from itertools import combinations

import numpy as np
import pytest

from erf_lab.cli.main import main
from erf_lab.errors import ErfLabError
from erf_lab.shape_bias.consistency import MVH_COLUMNS
from erf_lab.shape_bias.plotting import analyse_csvs
from erf_lab.shape_bias.consistency import (MVH_DATASETS, accuracy, consistency, human_trials, human_vs_human,
                                            image_id, read_trials, texture_accuracy, versus_humans)


def _write(path, subject, rows):
    """rows: (imagename, category, response)."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(MVH_COLUMNS)
        for i, (img, cat, resp) in enumerate(rows, 1):
            w.writerow([subject, 1, i, 0.5, resp, cat, 0, img])
    return path


def test_image_id_is_model_vs_humans_trial_key():
    assert image_id("0001_s5n_s01_0_bird_00_bird3-bird2.png") == "bird3-bird2.png"
    assert image_id("0001_edg_s01_0_oven_00_oven10.png") == "oven10.png"
    assert image_id("oven10.png") == "oven10.png"
    assert image_id("0000_cl_s01_bw_boat_40_n02951358_5952.JPEG") == "n02951358_5952.JPEG"


def test_hand_computed_kappa_trials_matched_by_image_not_order():
    # correctness A = [1, 1, 1, 0], B = [1, 1, 0, 0] on images i1..i4; B listed in another order
    a = {"i1": ("cat", "cat"), "i2": ("dog", "dog"), "i3": ("car", "car"), "i4": ("oven", "knife")}
    b = {"i4": ("oven", "na"), "i2": ("dog", "dog"), "i3": ("car", "boat"), "i1": ("cat", "cat")}
    r = consistency(a, b)
    # p1 = .75, p2 = .5 -> c_exp = .375 + .125 = .5; c_obs = 3/4; kappa = (.75 - .5) / .5 = .5
    # accuracy difference (model-vs-human's SixteenClassAccuracyDifference, norm=np.square): (.75 - .5)^2
    assert r == {"observed_consistency": 0.75, "expected_consistency": 0.5, "error_consistency": 0.5,
                 "accuracy_difference": 0.0625, "n_trials": 4}
    # independent errors: A = [1,1,0,0], B = [1,0,1,0] -> c_obs = c_exp = .5, kappa 0
    c = {"i1": ("cat", "cat"), "i2": ("dog", "dog"), "i3": ("car", "x"), "i4": ("oven", "x")}
    d = {"i1": ("cat", "cat"), "i2": ("dog", "x"), "i3": ("car", "car"), "i4": ("oven", "x")}
    assert consistency(c, d)["error_consistency"] == 0.0
    # opposite errors: kappa -1
    e = {k: (v[0], "x" if v[0] == v[1] else v[0]) for k, v in c.items()}
    assert consistency(c, e)["error_consistency"] == -1.0
    # c_obs == 1 with c_exp == 1 (both always right): model-vs-human defines kappa = 1
    assert consistency(a, a)["error_consistency"] == 1.0
    assert consistency(d, d)["expected_consistency"] == 0.5 and consistency(d, d)["error_consistency"] == 1.0
    # only the images both saw count (a --limit run)
    assert consistency(a, {"i1": ("cat", "cat"), "i4": ("oven", "oven")})["n_trials"] == 2
    with pytest.raises(ErfLabError, match="share no image"):
        consistency(a, {"zz": ("cat", "cat")})


def test_accuracies_count_every_cue_conflict_trial():
    t = {"bird3-bird2.png": ("bird", "bird"),      # shape == texture: counts for accuracy (not for shape bias)
         "cat1-dog2.png": ("cat", "dog"),          # texture answer
         "car1-boat3.png": ("car", "car"),         # shape answer
         "oven2-knife1.png": ("oven", "na")}       # no answer: wrong
    assert accuracy(t) == 0.5
    assert texture_accuracy(t) == 0.5   # bird (texture bird) and dog


def test_spread_over_subjects_hand_computed():
    model = {"i1": ("a", "a"), "i2": ("b", "b"), "i3": ("c", "x"), "i4": ("d", "x")}  # [1,1,0,0]
    humans = {"subject-01": dict(model), "subject-02": {"i1": ("a", "a"), "i2": ("b", "x"), "i3": ("c", "c"),
                                                         "i4": ("d", "x")}}
    v = versus_humans(model, humans)
    assert v["per_subject"]["subject-01"]["error_consistency"] == 1.0
    assert v["per_subject"]["subject-02"]["error_consistency"] == 0.0
    assert v["error_consistency"]["mean"] == 0.5 and v["error_consistency"]["sd"] == pytest.approx(0.5 ** 0.5)
    h = human_vs_human(humans)
    assert h["n_pairs"] == 1 and h["pairs"]["subject-01|subject-02"]["error_consistency"] == 0.0


def _kappa_reference(rows_a, rows_b):
    """Independent: correctness vectors aligned by np.argsort on the short image name, Eqs. 1-3 of Geirhos,
    Meding & Wichmann (2020)."""
    def vec(rows):
        names = np.array([r["imagename"].split("_")[-1] for r in rows])
        ok = np.array([r["object_response"] == r["category"] for r in rows])
        return names[np.argsort(names)], ok[np.argsort(names)]
    na, ca = vec(rows_a)
    nb, cb = vec(rows_b)
    assert (na == nb).all()
    p1, p2 = ca.mean(), cb.mean()
    c_exp = p1 * p2 + (1 - p1) * (1 - p2)
    c_obs = (ca == cb).mean()
    return c_obs, c_exp, 1.0 if c_obs == 1 else (c_obs - c_exp) / (1 - c_exp)


# Measured on the 10 subjects of model-vs-human (mean over the 45 pairs): cue-conflict, edge, silhouette
HUMAN_HUMAN_KAPPA = {"cue-conflict": 0.3311, "edge": 0.3184, "silhouette": 0.4757}
# ... and the mean squared accuracy difference over the same pairs (model-vs-human's "accuracy diff." for humans)
HUMAN_HUMAN_ACCURACY_DIFFERENCE = {"cue-conflict": 0.011554, "edge": 0.020351, "silhouette": 0.008477}


@pytest.mark.parametrize("dataset", list(MVH_DATASETS.values()))
def test_human_vs_human_matches_independent_implementation(shared_datasets, dataset):
    files = sorted((shared_datasets / f"human-{dataset}").glob("*.csv"))
    assert len(files) == 10
    raw = {f: list(csv.DictReader(f.read_text().splitlines())) for f in files}
    h = human_vs_human(human_trials(shared_datasets)[dataset])
    assert h["n_pairs"] == 45
    kappas, acc_diffs = [], []
    for fa, fb in combinations(files, 2):
        ref = _kappa_reference(raw[fa], raw[fb])
        got = h["pairs"][f"{raw[fa][0]['subj']}|{raw[fb][0]['subj']}"]
        assert got["n_trials"] == len(raw[fa]) == (1280 if dataset == "cue-conflict" else 160)
        assert abs(got["observed_consistency"] - ref[0]) < 1e-12
        assert abs(got["expected_consistency"] - ref[1]) < 1e-12
        assert abs(got["error_consistency"] - ref[2]) < 1e-12
        kappas.append(ref[2])
        # model-vs-human's accuracy difference: each observer's accuracy over its own trials, squared difference
        pa, pb = (np.mean([r["object_response"] == r["category"] for r in raw[f]]) for f in (fa, fb))
        assert abs(got["accuracy_difference"] - (pa - pb) ** 2) < 1e-12
        acc_diffs.append((pa - pb) ** 2)
    assert h["error_consistency"]["mean"] == pytest.approx(statistics.mean(kappas), abs=1e-12)
    assert h["accuracy_difference"]["mean"] == pytest.approx(statistics.mean(acc_diffs), abs=1e-12)
    assert h["accuracy_difference"]["mean"] == pytest.approx(HUMAN_HUMAN_ACCURACY_DIFFERENCE[dataset], abs=5e-7)
    assert h["error_consistency"]["sd"] == pytest.approx(statistics.stdev(kappas), abs=1e-12)
    assert h["error_consistency"]["mean"] == pytest.approx(HUMAN_HUMAN_KAPPA[dataset], abs=5e-5)


def test_from_csv_copy_of_a_subject(shared_datasets, tmp_path, capsys):
    """A 'model' answering exactly like subject-01: kappa 1 with subject-01, and with every other subject the
    human-human value of (subject-01, that subject); accuracies equal subject-01's."""
    humans = human_trials(shared_datasets)
    files = []
    for ds in MVH_DATASETS.values():
        src = next((shared_datasets / f"human-{ds}").glob("*subject-01_*.csv"))
        rows = [(r["imagename"].split("_")[-1], r["category"], r["object_response"])
                for r in csv.DictReader(src.read_text().splitlines())]
        files.append(str(_write(tmp_path / f"{ds}_copycat_session-1.csv", "copycat", rows[::-1])))
    out = tmp_path / "out"
    assert main(["shape-bias", "--from-csv", *files, "--stimuli", str(shared_datasets), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "error consistency with humans" in printed and "accuracy difference" in printed
    s = json.loads((out / "summary.json").read_text())
    for ds in MVH_DATASETS.values():
        r = s["consistency"][ds]
        assert r["accuracy"] == accuracy(humans[ds]["subject-01"])
        per = r["vs_humans"]["per_subject"]
        assert per["subject-01"]["error_consistency"] == 1.0 and per["subject-01"]["accuracy_difference"] == 0.0
        assert f"  {ds}: accuracy" in printed and f"; {r['n_trials']} trials" in printed
        for subj in humans[ds]:
            if subj != "subject-01":
                ref = r["human_vs_human"]["pairs"][f"subject-01|{subj}"]
                assert per[subj]["error_consistency"] == pytest.approx(ref["error_consistency"], abs=1e-12)
                assert per[subj]["accuracy_difference"] == pytest.approx(ref["accuracy_difference"], abs=1e-15)
    assert s["edge_accuracy"] == s["consistency"]["edge"]["accuracy"]
    assert not any("subset" in w for w in s.get("warnings", []))  # whole sets: no subset flag
    from erf_lab.shape_bias import shape_bias_from_csv
    assert s["shape_bias"] == shape_bias_from_csv(files[0])["shape_bias"]
    for name in ("shape_bias.png", "shape_bias.pdf", "error_consistency.png", "error_consistency.pdf"):
        assert (out / name).stat().st_size > 0


def test_from_csv_errors(tmp_path, fixture_datasets):
    bad = _write(tmp_path / "results.csv", "m", [("cat1-dog2.png", "cat", "cat")])
    with pytest.raises(ErfLabError, match="dataset from the file name"):
        read_trials([bad])
    human = _write(tmp_path / "edge_subject-01_session_1.csv", "subject-01", [("cat1.png", "cat", "cat")])
    with pytest.raises(ErfLabError, match="no model"):
        analyse_csvs([human], tmp_path / "o")
    twice = _write(tmp_path / "edge_m_session-1.csv", "m", [("cat1.png", "cat", "cat")] * 2)
    with pytest.raises(ErfLabError, match="twice"):
        read_trials([twice])


def test_subjects_without_common_trials_are_skipped_and_named():
    model = {"i1": ("cat", "cat"), "i2": ("dog", "x")}
    humans = {"subject-01": {"i1": ("cat", "cat"), "i2": ("dog", "dog")}, "subject-02": {"i9": ("car", "car")},
              "subject-03": {"i8": ("car", "x")}}
    r = versus_humans(model, humans)
    assert r["n_subjects"] == 1 and list(r["per_subject"]) == ["subject-01"]
    assert r["subjects_without_common_trials"] == ["subject-02", "subject-03"]
    # p1 = .5, p2 = 1 -> c_exp = .5, c_obs = .5 -> kappa 0
    assert r["error_consistency"]["mean"] == 0.0
    assert versus_humans(model, {"subject-02": humans["subject-02"]}) is None
    hh = human_vs_human(humans)  # only subject-02 and subject-03 share nothing with anyone: no pair at all
    assert hh is None
    humans["subject-04"] = {"i9": ("car", "x")}
    hh = human_vs_human(humans)
    assert hh["n_pairs"] == 1 and list(hh["pairs"]) == ["subject-02|subject-04"]
    # opposite correctness on the one common image: c_obs = 0, p1 = 1, p2 = 0 -> c_exp = 0, kappa = 0
    assert hh["pairs"]["subject-02|subject-04"] == {"observed_consistency": 0.0, "expected_consistency": 0.0,
                                                    "error_consistency": 0.0, "accuracy_difference": 1.0,
                                                    "n_trials": 1}


def test_model_trials_keyed_like_the_humans_and_csv_names_flat(tmp_path):
    from erf_lab.shape_bias.analysis import shape_bias_from_csv
    from erf_lab.shape_bias.categories import CATEGORIES
    from erf_lab.shape_bias.evaluate import SetResult, model_trials, write_mvh_csvs
    from erf_lab.shape_bias.stimuli import Stimulus, parse_name

    names = ["0001_s5n_s01_0_bird_00_bird3-cat2.png", "0002_s5n_s01_0_cat_00_cat1-bird4.png"]
    stimuli = [Stimulus(tmp_path / n, *parse_name(n)) for n in names]
    scores = np.eye(16)[[CATEGORIES.index("bird")] * 2]  # a shape hit on the first image, a texture hit on the 2nd
    r = SetResult("cue-conflict", stimuli, scores, np.zeros(2, int), np.ones(2, bool))
    trials = model_trials({"cue-conflict": r})["cue-conflict"]
    assert trials == {"bird3-cat2.png": ("bird", "bird"), "cat1-bird4.png": ("cat", "bird")}
    human = _write(tmp_path / "cue-conflict_subject-01_session-1.csv", "subject-01",
                   [(n, n.split("_")[4], "bird") for n in names])
    assert consistency(trials, read_trials([human])["cue-conflict"]["subject-01"])["n_trials"] == 2
    # a subject with a path separator (timm/<name>) gives one flat file name that --from-csv reads back
    files = write_mvh_csvs(tmp_path, "timm/resnet18", {"cue-conflict": r})
    assert files == ["cue-conflict_timm-resnet18_session-1.csv"] and (tmp_path / files[0]).is_file()
    back = read_trials([tmp_path / files[0]])["cue-conflict"]
    assert back == {"timm/resnet18": trials}
    with open(tmp_path / files[0], newline="") as f:
        assert [row["imagename"] for row in csv.DictReader(f)] == names  # the full file names, as written
    assert shape_bias_from_csv(tmp_path / files[0])["shape_bias"] == 0.5


def test_human_reference_leaves_model_csvs_out(shared_datasets, tmp_path):
    """A copy of model-vs-human's raw-data/cue-conflict/ holds models' CSVs beside the humans': the human
    reference (0.95869 from the 10 subjects) must not pool them."""
    import shutil

    from erf_lab.shape_bias.analysis import add_consistency, human_csvs, shape_bias_from_csv

    folder = tmp_path / "human-cue-conflict"
    folder.mkdir()
    for p in human_csvs(shared_datasets):
        shutil.copy(p, folder)
    rows = []
    with open(human_csvs(shared_datasets)[0], newline="") as f:
        for r in csv.DictReader(f):  # a texture-biased "model": answers the texture of every image
            rows.append((r["imagename"], r["category"], "".join(c for c in r["imagename"].split("-")[-1][:-4]
                                                                if c.isalpha())))
    _write(folder / "cue-conflict_resnet50_session-1.csv", "resnet50", rows)
    paths = human_csvs(tmp_path)
    assert len(paths) == 11
    assert shape_bias_from_csv(paths)["shape_bias"] < 0.9  # everything pooled: not the human number
    h = shape_bias_from_csv(paths, only_humans=True)
    assert round(h["shape_bias"], 5) == 0.95869 and len(h["per_subject"]) == 10
    summary = {}
    add_consistency(summary, {"cue-conflict": {}}, tmp_path)
    assert round(summary["human_reference"]["shape_bias"], 5) == 0.95869
    assert summary["human_reference"]["n_subjects"] == 10


def test_compare_table_gives_the_humans_edge_and_silhouette_accuracy(tmp_path):
    """--compare's humans row: the mean accuracy of the subjects on edge / silhouette when their CSVs lie beside
    the cue-conflict ones (it was left blank although the data were there)."""
    from erf_lab.shape_bias.analysis import human_csvs
    from erf_lab.shape_bias.plotting import compare_runs

    root = tmp_path / "data"
    for d in ("human-cue-conflict", "human-edge", "human-silhouette"):
        (root / d).mkdir(parents=True)
    cue = [("0001_x_bird1-cat2.png", "bird"), ("0002_x_cat1-dog2.png", "cat")]
    _write(root / "human-cue-conflict" / "cue-conflict_subject-01_session_1.csv", "subject-01",
           [(img, c, c) for img, c in cue])
    edge = [("0001_edg_s01_0_oven_00_oven1.png", "oven"), ("0002_edg_s01_0_cat_00_cat1.png", "cat"),
            ("0003_edg_s01_0_dog_00_dog1.png", "dog"), ("0004_edg_s01_0_car_00_car1.png", "car")]
    _write(root / "human-edge" / "edge_subject-01_session_1.csv", "subject-01",
           [(img, c, c) for img, c in edge])                                    # 4 of 4
    _write(root / "human-edge" / "edge_subject-02_session_1.csv", "subject-02",
           [(img, c, c if i == 0 else "na") for i, (img, c) in enumerate(edge)])  # 1 of 4
    _write(root / "human-silhouette" / "silhouette_subject-01_session_1.csv", "subject-01",
           [(img.replace("edg", "sil"), c, "na") for img, c in edge])            # 0 of 4
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"model": "m", "label": "m", "shape_bias": 0.5, "per_category": {},
                                                  "edge_accuracy": 0.25, "silhouette_accuracy": 0.5}))
    rows = compare_runs([run], tmp_path / "cmp", human_csv_paths=human_csvs(root))["rows"]
    assert rows[0]["model"] == "humans" and rows[0]["shape_bias"] == 1.0
    assert rows[0]["edge_accuracy"] == pytest.approx((1.0 + 0.25) / 2) and rows[0]["silhouette_accuracy"] == 0.0
    assert rows[1]["edge_accuracy"] == 0.25


def test_a_truncated_row_is_refused_not_a_phantom_correct_trial(tmp_path):
    """A short row (an interrupted write) had None as image, category and response: read as one more trial, image
    'None', counted correct (None == None), so 0 of 2 became an accuracy of 1/3; shape_bias_from_csv raised a
    TypeError. Now one error line names the file and line."""
    from erf_lab.shape_bias.analysis import shape_bias_from_csv

    p = _write(tmp_path / "edge_m_session-1.csv", "m", [("0001_edg_s01_0_oven_00_oven1.png", "oven", "knife"),
                                                        ("0002_edg_s01_0_cat_00_cat1.png", "cat", "dog")])
    with open(p, "a") as f:
        f.write("m,1,3,NaN\n")
    with pytest.raises(ErfLabError, match="line 4: no object_response, category, imagename"):
        read_trials([p])
    q = _write(tmp_path / "cue-conflict_m_session-1.csv", "m", [("cat1-dog2.png", "cat", "cat")])
    with open(q, "a") as f:
        f.write("m,1,2,NaN,cat,,0,\n")  # no category, no image: no trial either
    with pytest.raises(ErfLabError, match="line 3: no category, imagename"):
        shape_bias_from_csv(q)


def test_a_csv_with_a_byte_order_mark_is_read(tmp_path):
    """A CSV saved with a UTF-8 byte-order mark (Excel's 'CSV UTF-8'; pandas, which model-vs-human reads with,
    skips it) was refused: its first column read as '\\ufeffsubj', 'missing columns subj'."""
    p = _write(tmp_path / "edge_m_session-1.csv", "m", [("0001_edg_s01_0_oven_00_oven1.png", "oven", "oven"),
                                                        ("0002_edg_s01_0_cat_00_cat1.png", "cat", "dog")])
    p.write_bytes(b"\xef\xbb\xbf" + p.read_bytes())
    t = read_trials([p])["edge"]["m"]
    assert accuracy(t) == 0.5 and set(t) == {"oven1.png", "cat1.png"}


def test_compare_and_from_csv_record_versions_and_time(tmp_path):
    """The run.json of 'shape-bias --compare' and '--from-csv' held only the command (and runs / CSVs): no
    erf-lab / package versions, no working folder, no time, unlike every other erf-lab record."""
    import erf_lab
    from erf_lab.shape_bias.plotting import compare_runs

    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"model": "m", "label": "m", "shape_bias": 0.5, "per_category": {}}))
    compare_runs([run], tmp_path / "cmp")
    p = _write(tmp_path / "cue-conflict_m_session-1.csv", "m", [("0001_x_bird1-cat2.png", "bird", "bird")])
    analyse_csvs([p], tmp_path / "csv", humans=False)
    for rec in (tmp_path / "cmp" / "run.json", tmp_path / "csv" / "run.json"):
        info = json.loads(rec.read_text())
        assert info["versions"]["erf_lab"] == erf_lab.__version__ and info["versions"]["numpy"], rec
        assert info["cwd"] == os.getcwd() and info["time_utc"][:2] == "20", rec


def test_compare_says_when_runs_used_other_stimuli_or_crop(tmp_path):
    """--compare put a 32-image --limit run and a full run (or a cropped and a whole-stimulus run) in one table and
    figure without a word; the table (printed and comparison.md) and run.json now say what differs."""
    from erf_lab.shape_bias.plotting import compare_runs

    def run(name, n, crop):
        d = tmp_path / name
        d.mkdir()
        (d / "summary.json").write_text(json.dumps({
            "model": name, "label": name, "shape_bias": 0.5, "per_category": {},
            "n_images": {"cue-conflict": n, "edges": max(16, n // 8)}, "preprocessing": {"crop_pct": crop}}))
        return d

    a, b, c = run("a", 1280, 1.0), run("b", 32, 1.0), run("c", 1280, 0.875)
    same = compare_runs([a, a], tmp_path / "same")
    assert same["note"] == "" and "Not like with like" not in same["markdown"]
    res = compare_runs([a, b], tmp_path / "limit")
    assert "different numbers of stimuli (a: 1280 cue-conflict, 160 edges; b: 32 cue-conflict, 16 edges)" in res["note"]
    assert "crop" not in res["note"]
    assert res["note"] in (tmp_path / "limit" / "comparison.md").read_text()
    assert json.loads((tmp_path / "limit" / "run.json").read_text())["not_like_with_like"] == res["note"]
    res = compare_runs([a, c], tmp_path / "crop")
    assert "the crop fraction differs (a: 1.0, c: 0.875)" in res["markdown"] and "numbers" not in res["note"]


def test_shape_bias_figure_says_how_many_decisions_it_rests_on(tmp_path, monkeypatch, saved_figures):
    """The legend gave a model's shape bias as '0.667' whether it came from 6 decisions (--limit 32, 95 % interval
    0.30-0.90) or from 800; the summary has the counts and the interval, and the legend now shows them."""
    import matplotlib.pyplot as plt

    from erf_lab.shape_bias.plotting import plot_shape_bias

    figs = saved_figures
    monkeypatch.setattr(plt, "close", lambda fig: None)
    s = {"model": "m", "label": "m (random init)", "shape_bias": 4 / 6, "shape_hits": 4, "texture_hits": 2,
         "shape_bias_ci95": [0.3, 0.903], "per_category": {}}
    plot_shape_bias([s], tmp_path / "sb")
    legend = [t.get_text() for t in figs[0].axes[0].get_legend().get_texts()]
    assert legend == ["m (random init): 0.667 (6 decisions, 95% CI 0.30-0.90)"]


def test_compare_runs_without_a_name_or_with_a_number_as_label(tmp_path):
    """A summary.json whose model is null (no label) raised a TypeError in the error-consistency figure (None +
    str); one whose label is a number did too. The nameless run is drawn as 'model 0'; a label or model that is no
    text, or a random_weights flag that is no bool, is refused as a damaged file in one line."""
    from erf_lab.shape_bias.plotting import compare_runs

    vs = {"per_subject": {"subject-01": {"error_consistency": 0.1}}, "error_consistency": {"mean": 0.1}}
    base = {"shape_bias": 0.5, "per_category": {}, "consistency": {"cue-conflict": {"vs_humans": vs}}}
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({**base, "model": None}))
    compare_runs([run], tmp_path / "cmp")
    assert (tmp_path / "cmp" / "error_consistency_comparison.png").stat().st_size > 0
    for change, field in (({"label": 3}, "label is 3"), ({"model": ["m"]}, 'model is ["m"]'),
                          ({"random_weights": "yes"}, 'random_weights is "yes"')):
        (run / "summary.json").write_text(json.dumps({**base, "model": "m", **change}))
        with pytest.raises(ErfLabError, match=re.escape(f"{field}: not a value an 'erf-lab shape-bias' run writes")):
            compare_runs([run], tmp_path / "cmp2")


def test_a_rerun_without_humans_removes_the_earlier_error_consistency_figures(shared_datasets, tmp_path):
    """`--from-csv` / `--compare` again into the same --out with --no-humans drew no error-consistency figure but
    left the earlier run's (the consistency of another run beside the new summary). Both now remove the earlier
    run's files they do not write again (run.json 'outputs'), as a model run does."""
    src = next((shared_datasets / "human-cue-conflict").glob("*subject-01_*.csv"))
    with open(src, newline="") as f:
        rows = [(r["imagename"], r["category"], r["object_response"]) for r in csv.DictReader(f)][:40]
    model = _write(tmp_path / "cue-conflict_m_session-1.csv", "m", rows)
    run, cmp = tmp_path / "run", tmp_path / "cmp"
    assert main(["shape-bias", "--from-csv", str(model), "--out", str(run)]) == 0
    assert main(["shape-bias", "--compare", str(run), "--out", str(cmp)]) == 0
    assert (run / "error_consistency.png").is_file() and (cmp / "error_consistency_comparison.png").is_file()
    assert main(["shape-bias", "--from-csv", str(model), "--no-humans", "--out", str(run)]) == 0
    assert main(["shape-bias", "--compare", str(run), "--no-humans", "--out", str(cmp)]) == 0
    assert not list(run.glob("error_consistency*")) and not list(cmp.glob("error_consistency*"))
    assert (run / "shape_bias.png").is_file() and (cmp / "shape_bias_comparison.png").is_file()
    assert json.loads((cmp / "run.json").read_text())["outputs"] == [
        "comparison.csv", "comparison.md", "shape_bias_comparison.png", "shape_bias_comparison.pdf"]


def _fixture_as_model(fixture_datasets, path, edit=None):
    """The shipped subject's cue-conflict CSV as a model's ('m'); ``edit(rows)`` changes its rows (dicts) first."""
    src = fixture_datasets / "human-cue-conflict" / "cue-conflict_subject-01_session_1.csv"
    with open(src, newline="") as f:
        rows = [dict(r, subj="m") for r in csv.DictReader(f)]
    if edit:
        edit(rows)
    path.parent.mkdir(exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, MVH_COLUMNS)
        w.writeheader()
        w.writerows(rows)
    return path, rows


def test_from_csv_refuses_a_category_outside_the_16_and_keeps_na(fixture_datasets, tmp_path, capsys):
    """A response outside the 16 categories (a 1000-class label, a typo) was counted silently as a wrong trial; it
    is refused with the file, line and value before anything is written. 'na' (a subject's no answer, 27 rows of
    the shipped subject) stays a response that is neither the shape nor the texture."""
    from erf_lab.shape_bias.analysis import shape_bias_from_csv

    good, rows = _fixture_as_model(fixture_datasets, tmp_path / "cue-conflict_m_session-1.csv")
    na = [r for r in rows if r["object_response"] == "na"]
    assert len(na) == 27 and len(rows) == 1280
    conflict = [(r["category"], r["imagename"].rsplit("-", 1)[1].split(".")[0].rstrip("0123456789"),
                 r["object_response"]) for r in rows]
    conflict = [(s, t, d) for s, t, d in conflict if s != t]
    out = tmp_path / "out"
    assert main(["shape-bias", "--from-csv", str(good), "--no-humans", "--out", str(out)]) == 0
    s = json.loads((out / "summary.json").read_text())
    shape, texture = sum(d == sh for sh, _, d in conflict), sum(d == t for _, t, d in conflict)
    assert (s["n_trials"], s["n_conflict"], s["shape_hits"], s["texture_hits"]) == (1280, 1200, shape, texture)
    assert s["shape_bias"] == shape / (shape + texture) == shape_bias_from_csv(good)["shape_bias"]
    assert s["consistency"]["cue-conflict"]["accuracy"] == sum(r["object_response"] == r["category"]
                                                                for r in rows) / 1280
    capsys.readouterr()

    def response(rows):
        rows[9]["object_response"] = "tiger"  # the 10th trial: line 11 of the file

    bad, _ = _fixture_as_model(fixture_datasets, tmp_path / "bad" / "cue-conflict_m_session-1.csv", response)
    out2 = tmp_path / "out2"
    assert main(["shape-bias", "--from-csv", str(bad), "--no-humans", "--out", str(out2)]) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and f"{bad}, line 11: object_response is 'tiger', not one of the 16 categories" in lines[0]
    assert not out2.exists()

    def category(rows):
        rows[0]["category"] = "na"  # 'na' is a response, never the object's category

    def texture_name(rows):
        rows[4]["imagename"] = rows[4]["imagename"].rsplit("-", 1)[0] + "-tiger1.png"

    for edit, needle in ((category, "line 2: category is 'na'"), (texture_name, "line 6: the texture category in "
                                                                                "the image name")):
        p, _ = _fixture_as_model(fixture_datasets, tmp_path / "bad" / "cue-conflict_m_session-1.csv", edit)
        for read in (read_trials, shape_bias_from_csv):
            with pytest.raises(ErfLabError, match=re.escape(needle)):
                read([p])


def test_from_csv_refuses_a_bad_csv_before_its_out_folder_is_made(fixture_datasets, tmp_path, capsys):
    """A human CSV with a category outside the 16 (found beside --stimuli) was refused only after --out was made,
    and so was a subject's cue-conflict trial whose image name does not parse: the refused run left an empty --out
    (and its missing parents) behind. Every CSV is now read before --out is made: one line, exit 2, nothing left."""
    good, _ = _fixture_as_model(fixture_datasets, tmp_path / "cue-conflict_m_session-1.csv")
    humans = tmp_path / "stimuli"  # its human data (--stimuli) as erf-lab data download lays them out
    humans.mkdir()

    def human_response(rows):  # the shipped subject again, with one answer outside the 16
        for r in rows:
            r["subj"] = "subject-01"
        rows[9]["object_response"] = "tiger"  # the 10th trial: line 11 of the file

    bad_human, _ = _fixture_as_model(fixture_datasets, humans / "human-cue-conflict" / "cue-conflict_subject-01_"
                                     "session_1.csv", human_response)

    def image_name(rows):
        rows[2]["imagename"] = "photo.png"  # line 4: no <shape><i>-<texture><j> stimulus name

    bad_name, _ = _fixture_as_model(fixture_datasets, tmp_path / "named" / "cue-conflict_m_session-1.csv", image_name)
    out = tmp_path / "new" / "out"
    for argv, needle in (
            ([str(good), "--stimuli", str(humans)],
             f"{bad_human}, line 11: object_response is 'tiger', not one of the 16 categories"),
            ([str(bad_name), "--no-humans"], f"{bad_name}, line 4: image 'photo.png' is not named as a cue-conflict "
                                              "stimulus (<shape><i>-<texture><j>.png)")):
        assert main(["shape-bias", "--from-csv", *argv, "--out", str(out)]) == 2
        lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert len(lines) == 1 and needle in lines[0], lines
        assert not (tmp_path / "new").exists()
    assert main(["shape-bias", "--from-csv", str(good), "--no-humans", "--out", str(out)]) == 0  # the good CSV
    assert json.loads((out / "summary.json").read_text())["n_trials"] == 1280


def test_from_csv_prints_the_warnings_a_model_run_prints(fixture_datasets, tmp_path, capsys, monkeypatch):
    """`--from-csv` ("the same analysis", README) never flagged a shape bias from few decisions or a degenerate run
    as a model run does, and printed none of its warnings (a set without human data went into summary.json only):
    20 trials read as a firm result. It now flags them as a model run does and prints each `warning:` line."""
    src = fixture_datasets / "human-cue-conflict" / "cue-conflict_subject-01_session_1.csv"
    with open(src, newline="") as f:
        rows = [(r["imagename"], r["category"], r["object_response"]) for r in csv.DictReader(f)][:20]
    model = _write(tmp_path / "cue-conflict_m_session-1.csv", "m", rows)
    monkeypatch.delenv("ERF_LAB_DATA")  # no human data anywhere (an empty cache): the run says so
    monkeypatch.setenv("ERF_LAB_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["shape-bias", "--from-csv", str(model), "--out", str(out)]) == 0
    warnings = json.loads((out / "summary.json").read_text())["warnings"]
    err = capsys.readouterr().err
    assert any("shape-or-texture decisions" in w for w in warnings)
    assert any(w.startswith("no human responses for cue-conflict") for w in warnings)
    assert [ln for ln in err.splitlines() if ln.startswith("  warning: ")] == [f"  warning: {w}" for w in warnings]


def test_from_csv_refuses_swapped_columns_another_sets_csv_and_csvs_without_trials(fixture_datasets, tmp_path,
                                                                                   capsys):
    """Four CSVs that were analysed wrongly or refused with a wrong reason, each now one line naming the file (and
    line), exit 2, nothing written: a model's CSV with object_response and category swapped (read as the model's
    answers being the shapes: shape bias 0.980 for a 0.962 subject on the full set); an edge CSV under a
    cue-conflict file name (160 'cue-conflict' trials without a conflict) and a cue-conflict CSV under an edge one
    (no trial in common with the humans); a CSV with a header and no rows ("every subject is a human") and an
    empty file ("missing columns")."""
    def swap(rows):  # a model never answers 'na': without those rows only the shape check can see the swap
        rows[:] = [dict(r, object_response=r["category"], category=r["object_response"]) for r in rows
                   if r["object_response"] != "na"]

    swapped, rows = _fixture_as_model(fixture_datasets, tmp_path / "swap" / "cue-conflict_m_session-1.csv", swap)
    line, r = next((i, r) for i, r in enumerate(rows, 2) if r["category"] != r["object_response"])
    shape = r["object_response"]
    edge_rows = [("oven10.png", "oven", "oven"), ("0002_edg_s01_0_cat_00_cat3.png", "cat", "dog")]
    (tmp_path / "edge").mkdir()
    edge_as_cue = _write(tmp_path / "edge" / "cue-conflict_m_session-1.csv", "m", edge_rows)
    cue_as_edge = _write(tmp_path / "edge" / "edge_m_session-1.csv", "m", [("cat1-dog2.png", "cat", "cat")])
    header_only = _write(tmp_path / "cue-conflict_m_session-1.csv", "m", [])
    empty = tmp_path / "edge_m2_session-1.csv"
    empty.write_bytes(b"")
    cases = [(swapped, f"{swapped}, line {line}: category is {r['category']!r}, but the image {r['imagename']!r} "
                       f"has the shape {shape!r}"),
             (edge_as_cue, f"{edge_as_cue}, line 2: image 'oven10.png' is not named as a cue-conflict stimulus "
                           f"(<shape><i>-<texture><j>.png) but as an edge or silhouette one"),
             (cue_as_edge, f"{cue_as_edge}, line 2: image 'cat1-dog2.png' is not named as an edge stimulus "
                           f"(<shape><i>.png) but as a cue-conflict one"),
             (header_only, f"{header_only}: no trials (a header without rows)"),
             (empty, f"{empty}: an empty file, not a model-vs-human CSV")]
    out = tmp_path / "new" / "out"
    for path, needle in cases:
        assert main(["shape-bias", "--from-csv", str(path), "--no-humans", "--out", str(out)]) == 2
        lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert len(lines) == 1 and needle in lines[0], lines
        assert not (tmp_path / "new").exists()
    # the same rows in their own columns and sets are analysed
    _write(tmp_path / "edge" / "edge_m_session-1.csv", "m", edge_rows)
    t = read_trials([tmp_path / "edge" / "edge_m_session-1.csv",
                     _fixture_as_model(fixture_datasets, tmp_path / "cue-conflict_m_session-1.csv")[0]])
    assert accuracy(t["edge"]["m"]) == 0.5 and len(t["cue-conflict"]["m"]) == 1280


def test_from_csv_says_when_the_models_images_are_not_the_subjects(fixture_datasets, tmp_path, capsys):
    """Trials are matched by image name, suffix included (model-vs-human's key). A model's CSV of the stimuli saved
    as .jpg matched no subject: its error consistency and accuracy difference were left out without a word (only
    the human-human value printed), and a few unmatched images went unsaid. Each is now a warning line."""
    def as_jpg(k):
        def edit(rows):
            for r in rows[:k]:
                r["imagename"] = r["imagename"][:-4] + ".jpg"
        return edit

    for k, tail in ((1280, "no accuracy difference or error consistency with the subjects"),
                    (3, "its accuracy counts them, the error consistency and accuracy difference with the subjects "
                        "do not")):
        model, rows = _fixture_as_model(fixture_datasets, tmp_path / f"jpg{k}" / "cue-conflict_m_session-1.csv",
                                        as_jpg(k))
        out = tmp_path / f"out{k}"
        assert main(["shape-bias", "--from-csv", str(model), "--stimuli", str(fixture_datasets), "--out",
                     str(out)]) == 0
        err = capsys.readouterr().err
        s = json.loads((out / "summary.json").read_text())
        first = sorted(image_id(r["imagename"]) for r in rows[:k])[0]
        warning = (f"cue-conflict: {k} of the model's 1280 images (e.g. {first!r}) are not among the subjects' "
                   f"(e.g. 'airplane1-bicycle2.png'; trials are matched by image name as model-vs-human matches "
                   f"them, suffix included): {tail}")
        assert s["warnings"] == [warning] and f"  warning: {warning}" in err.splitlines()
        vs = s["consistency"]["cue-conflict"]["vs_humans"]
        assert (vs is None) if k == 1280 else vs["per_subject"]["subject-01"]["n_trials"] == 1280 - k


def test_from_csv_names_the_file_given_twice_and_the_other_file_of_a_repeated_trial(tmp_path, capsys, monkeypatch):
    """The same CSV given twice (a shell glob and a name, ./a.csv and a.csv) and a subject's trials in two files were
    both "saw image ... twice", naming the second file only: which two files, or that one file came twice, the
    user had to find out. The first is now "given twice" (with the other spelling), the second names both files."""
    monkeypatch.chdir(tmp_path)
    rows = [("cat1-dog2.png", "cat", "cat"), ("dog3-cat1.png", "dog", "cat")]
    a = _write(tmp_path / "cue-conflict_m_session-1.csv", "m", rows)
    (tmp_path / "copy").mkdir()
    b = _write(tmp_path / "copy" / "cue-conflict_m_session-2.csv", "m", rows[1:])
    for argv, needle in ((["cue-conflict_m_session-1.csv", "cue-conflict_m_session-1.csv"],
                          "cue-conflict_m_session-1.csv: given twice: its trials would count twice"),
                         ([str(a), "./cue-conflict_m_session-1.csv"],
                          f"./cue-conflict_m_session-1.csv: given twice (also as {a}): its trials would count twice"),
                         ([str(a), str(b)], f"{b}: subject m saw image dog3-cat1.png twice (in {a} too)")):
        assert main(["shape-bias", "--from-csv", *argv, "--no-humans", "--out", str(tmp_path / "out")]) == 2
        lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].endswith(needle), lines
    with pytest.raises(ErfLabError, match=re.escape("saw image cat1-dog2.png twice") + "$"):  # within one file
        read_trials([_write(tmp_path / "cue-conflict_n_session-1.csv", "n", rows * 2)])


def test_from_csv_refuses_two_models_that_would_share_one_folder(tmp_path, capsys):
    """Several models in the CSVs go to one folder each, named as their model-vs-human CSVs are (subject_tag):
    'timm/r18' and 'timm:r18' both went to timm-r18/, the second's summary and figures over the first's, and a
    subject '..' wrote beside --out. Both are refused before --out is made; distinct names each get their folder."""
    rows = [("cat1-dog2.png", "cat", "cat"), ("dog3-cat1.png", "dog", "cat"), ("bird1-cat2.png", "bird", "bird")]
    out = tmp_path / "new" / "out"
    for subjects, needle in ((("timm/r18", "timm:r18"), "model subjects 'timm/r18' and 'timm:r18' would both be "
                                                        "written to the folder 'timm-r18' of --out"),
                             (("..", "m"), "model subject '..' names no folder of its own in --out ('..')")):
        files = [str(_write(tmp_path / f"cue-conflict_m{i}_session-1.csv", s, rows)) for i, s in enumerate(subjects)]
        assert main(["shape-bias", "--from-csv", *files, "--no-humans", "--out", str(out)]) == 2
        lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert len(lines) == 1 and needle in lines[0], lines
        assert not (tmp_path / "new").exists()
    files = [str(_write(tmp_path / f"cue-conflict_m{i}_session-1.csv", s, rows[:k]))
             for i, (s, k) in enumerate((("timm/r18", 3), ("my model", 2)))]
    assert main(["shape-bias", "--from-csv", *files, "--no-humans", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["my-model", "timm-r18"]
    assert [json.loads((out / d / "summary.json").read_text())["n_trials"] for d in ("timm-r18", "my-model")] == [3, 2]


def test_from_csv_says_how_many_responses_are_blank_and_refuses_a_csv_of_blanks(fixture_datasets, tmp_path, capsys):
    """A blank object_response was counted as a wrong trial (model-vs-human reads it as NaN: kept) without a word,
    and a CSV of nothing but blanks (a script that wrote no decisions) was analysed as a model that is always wrong.
    Now each file and subject with blanks is a warning saying how many, and a subject with more than half of its
    responses blank is refused in one line before --out is made."""
    def blank(k):
        def edit(rows):
            for r in rows[:k]:
                r["object_response"] = ""
        return edit

    few, rows = _fixture_as_model(fixture_datasets, tmp_path / "few" / "cue-conflict_m_session-1.csv", blank(40))
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["shape-bias", "--from-csv", str(few), "--no-humans", "--out", str(out)]) == 0
    s = json.loads((out / "summary.json").read_text())
    said = f"{few}: 40 of the 1280 cue-conflict responses of m are blank: counted as wrong trials"
    assert [w for w in s["warnings"] if "blank" in w] == [w for w in s["warnings"] if w.startswith(said)] != []
    assert f"  warning: {said}" in capsys.readouterr().err
    assert s["consistency"]["cue-conflict"]["accuracy"] == sum(r["object_response"] == r["category"]
                                                                for r in rows) / 1280  # blanks: wrong trials
    for k in (641, 1280):  # most, all
        many, _ = _fixture_as_model(fixture_datasets, tmp_path / f"b{k}" / "cue-conflict_m_session-1.csv", blank(k))
        assert main(["shape-bias", "--from-csv", str(many), "--no-humans", "--out", str(tmp_path / f"o{k}")]) == 2
        lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert len(lines) == 1 and f"{many}: {k} of the 1280 cue-conflict responses of m are blank" in lines[0], lines
        assert not (tmp_path / f"o{k}").exists()
    half, _ = _fixture_as_model(fixture_datasets, tmp_path / "half" / "cue-conflict_m_session-1.csv", blank(640))
    assert main(["shape-bias", "--from-csv", str(half), "--no-humans", "--out", str(tmp_path / "o640")]) == 0


def test_compare_takes_the_top_folder_of_a_multi_model_from_csv_output(tmp_path, capsys):
    """`--compare` of the top folder of a `--from-csv` output of several models said 'no summary.json' and nothing of
    the per-model folders it holds; it now compares those folders (and says which), and a folder that holds model
    runs of another kind names its sub-folders to pass."""
    rows = [("cat1-dog2.png", "cat", "cat"), ("dog3-cat1.png", "dog", "cat"), ("bird1-cat2.png", "bird", "bird"),
            ("cat2-bird1.png", "cat", "bird")]
    files = [str(_write(tmp_path / f"cue-conflict_m{i}_session-1.csv", s, rows[:k]))
             for i, (s, k) in enumerate((("a", 4), ("b", 3)))]
    top, cmp = tmp_path / "csv", tmp_path / "cmp"
    assert main(["shape-bias", "--from-csv", *files, "--no-humans", "--out", str(top)]) == 0
    capsys.readouterr()
    assert main(["shape-bias", "--compare", str(top), "--no-humans", "--out", str(cmp)]) == 0
    assert f"compared 2 runs: {top / 'a'}, {top / 'b'}" in capsys.readouterr().out
    with open(cmp / "comparison.csv", newline="") as f:
        table = [(r["model"], r["shape_bias"], r["run"]) for r in csv.DictReader(f)]
    assert table == [("a", str(2 / 4), str(top / "a")), ("b", str(2 / 3), str(top / "b"))]
    assert json.loads((cmp / "run.json").read_text())["runs"] == [str(top / "a"), str(top / "b")]
    (top / "b" / "run.json").write_text(json.dumps({"what": "erf-lab shape-bias", "model": "b"}))  # a model run
    assert main(["shape-bias", "--compare", str(top), "--no-humans", "--out", str(tmp_path / "cmp2")]) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].endswith(f"{top}: no summary.json (not an 'erf-lab shape-bias' output "
                                                 f"folder); its sub-folders a, b are shape-bias results: pass them")


def test_compare_notes_untrained_older_and_unmatched_runs_and_draws_the_note(tmp_path, monkeypatch, saved_figures):
    """--compare put a random-init run beside trained ones, a run of an older erf-lab (no random_weights recorded,
    no weights given: random init then) and a run without consistency with the humans (left out of the
    error-consistency figure) side by side without a word, said nothing of another input size, and called a full
    model run and a full --from-csv run (whose sets are named edge, not edges) 'different numbers of stimuli'. The
    table's note now says each, and both figures print it."""
    import matplotlib.pyplot as plt

    from erf_lab.shape_bias.plotting import compare_runs

    vs = {"per_subject": {"subject-01": {"error_consistency": 0.1}}, "error_consistency": {"mean": 0.1}}

    def run(name, **fields):
        d = tmp_path / name
        d.mkdir()
        (d / "summary.json").write_text(json.dumps({"model": name, "label": name, "shape_bias": 0.5,
                                                    "per_category": {}, **fields}))
        return d

    full = {"n_images": {"cue-conflict": 1280, "edges": 160, "silhouettes": 160}, "weights": "w.pth",
            "random_weights": False, "preprocessing": {"crop_pct": 1.0, "input_size": [224, 224]},
            "consistency": {"cue-conflict": {"vs_humans": vs}}}
    trained = run("trained", **full)
    csv_run = run("csv", n_images={"cue-conflict": 1280, "edge": 160}, from_csv=["x.csv"],
                  consistency={"cue-conflict": {"vs_humans": vs}})
    assert compare_runs([trained, csv_run], tmp_path / "c1")["note"] == ""
    random = run("random", **{**full, "weights": None, "random_weights": True})
    older = run("older", **{k: v for k, v in full.items() if k not in ("random_weights", "consistency", "weights")},
                pretrained=False, weights=None)
    small = run("small", **{**full, "preprocessing": {"crop_pct": 1.0, "input_size": [64, 64]}})
    figs = saved_figures
    figs.clear()  # the second comparison's figures only
    monkeypatch.setattr(plt, "close", lambda fig: None)
    note = compare_runs([trained, random, older, small], tmp_path / "c2")["note"]
    assert note == ("the input size differs (trained: [224, 224], random: [224, 224], older: [224, 224], small: "
                    "[64, 64]); random: random initial weights (untrained), numbers that describe no trained model; "
                    "older: written by an older erf-lab that did not record random initial weights, with neither "
                    "--weights nor --pretrained recorded: perhaps untrained; older: no error consistency with the "
                    "humans (an older erf-lab, or run without human data), not in the error-consistency figure.")
    assert f"**Not like with like:** {note}" in (tmp_path / "c2" / "comparison.md").read_text()
    assert len(figs) == 2 and all(any(t.get_text().startswith(f"Not like with like: {note}\n") for t in f.texts)
                                  for f in figs)


def test_consistency_figure_names_every_model_and_keeps_its_legend_off_the_data(tmp_path, monkeypatch, saved_figures):
    """A model was named in the legend only at its marker on the first dataset: a run measured on edges alone
    (beside one on cue-conflict) was drawn unnamed. Its legend stood at the axes' right, six model names making
    the figure 7.4 in wide, half of it legend, and the credit line was 5.5 pt. Every model is named now, the
    legend is under the axes, the figure fits a page's text width and no text is under 6 pt."""
    import matplotlib.pyplot as plt
    import matplotlib.text

    from erf_lab.shape_bias.plotting import plot_error_consistency

    figs = saved_figures
    monkeypatch.setattr(plt, "close", lambda fig: None)

    def run(name, datasets):
        vs = {"per_subject": {"subject-01": {"error_consistency": 0.2}, "subject-02": {"error_consistency": 0.3}},
              "error_consistency": {"mean": 0.25}}
        hh = {"error_consistency": {"min": 0.1, "max": 0.6, "mean": 0.4}}
        return {"model": name, "label": name, "consistency": {d: {"vs_humans": vs, "human_vs_human": hh}
                                                              for d in datasets}}

    plot_error_consistency([run("replknet_31b", ["cue-conflict"]), run("resnet50_edges", ["edge"])], tmp_path / "a")
    legend = [t.get_text() for t in figs[0].axes[0].get_legend().get_texts()]
    assert [any(t.startswith(n) for t in legend) for n in ("replknet_31b", "resnet50_edges")] == [True, True], legend
    names = ["replknet_31B_in22k_to_in1k_384", "unireplknet_tiny.in1k", "slak_tiny_51x51", "resnet101.tv_in1k",
             "mobilenetv2_100", "efficientnet_lite0.ra_in1k"]
    plot_error_consistency([run(n, ["cue-conflict", "edge", "silhouette"]) for n in names], tmp_path / "b")
    fig = figs[1]
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()][2:] == names
    assert fig.get_size_inches()[0] <= 7.0, fig.get_size_inches()
    fig.draw_without_rendering()
    assert not ax.get_legend().get_window_extent().overlaps(ax.get_window_extent())
    texts = [t for t in fig.findobj(matplotlib.text.Text) if t.get_visible() and t.get_text().strip()]
    assert min(t.get_fontsize() for t in texts) >= 6.0

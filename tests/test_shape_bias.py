"""Shape-bias probes: 16-class mapping, name parsing, shape-bias arithmetic, human reference, real lite0 numbers."""
from __future__ import annotations

import contextlib
import csv
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from erf_lab.errors import ErfLabError
from erf_lab.shape_bias import CATEGORIES, imagenet_to_16, parse_name, shape_bias_from_csv, shape_bias_from_decisions
from erf_lab.shape_bias.analysis import human_csvs, write_mvh_csv
from erf_lab.shape_bias.categories import category_table
from erf_lab.shape_bias.analysis import degenerate_warnings
from erf_lab.shape_bias.evaluate import evaluate, logits_to_scores16, write_decisions_csv
from erf_lab.shape_bias.stimuli import Preprocess, list_stimuli


class Tiny(nn.Module):
    """A cheap classifier (stride-16 conv, pooled) with a ``num_classes``-way head."""

    def __init__(self, num_classes=1000, size=64):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 16, stride=16)
        self.fc = nn.Linear(8, num_classes)
        self.default_cfg = {"input_size": (3, size, size), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
                            "interpolation": "bilinear", "crop_pct": 1.0}

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


class Constant16(nn.Module):
    """16-way head that always prefers one category (tests the direct 16-class path)."""

    def __init__(self, category):
        super().__init__()
        self.k = CATEGORIES.index(category)
        self.default_cfg = {"input_size": (3, 32, 32)}

    def forward(self, x):
        out = torch.zeros(x.shape[0], 16)
        out[:, self.k] = 5.0
        return out


# ---------------------------------------------------------------- 16-class table and decision mapping

def test_category_table_matches_model_vs_human():
    t = category_table()
    assert tuple(t) == CATEGORIES
    assert t["airplane"] == [404] and t["bear"] == [294, 295, 296, 297] and t["knife"] == [499]
    assert t["oven"] == [766] and t["elephant"] == [385, 386] and t["keyboard"] == [508, 878]
    assert len(t["bird"]) == 49 and len(t["dog"]) == 109
    all_idx = [i for v in t.values() for i in v]
    assert len(all_idx) == len(set(all_idx)) == 207  # disjoint categories


def test_mean_probability_mapping_hand_computed():
    """Bird holds more total mass (49 x 0.01 = 0.49) but airplane's single class (0.3) has the higher *mean*."""
    p = np.zeros((1, 1000))
    p[0, 404] = 0.30                       # airplane
    p[0, category_table()["bird"]] = 0.01  # bird: mean 0.01
    p[0, [294, 295]] = [0.08, 0.04]        # bear: (0.08 + 0.04 + 0 + 0) / 4 = 0.03
    p[0, 0] = 1 - p.sum()                  # tench: in no category
    s = imagenet_to_16(p)[0]
    assert s[CATEGORIES.index("airplane")] == pytest.approx(0.30)
    assert s[CATEGORIES.index("bird")] == pytest.approx(0.01)
    assert s[CATEGORIES.index("bear")] == pytest.approx(0.03)
    assert s[CATEGORIES.index("dog")] == 0.0
    assert CATEGORIES[int(np.argmax(s))] == "airplane"
    assert p[0, category_table()["bird"]].sum() > p[0, 404]  # a sum-aggregation would pick bird instead


def test_mapping_takes_a_models_torch_output_as_it_comes():
    """``imagenet_to_16(model(x).softmax(-1))`` in a notebook (outputs that require grad; bfloat16 outputs) raised
    torch's numpy() errors; a wrong shape raised a bare ValueError. Same scores as the numpy probabilities."""
    torch.manual_seed(0)
    logits = torch.randn(3, 1000, requires_grad=True)
    probs = logits.softmax(-1)
    ref = imagenet_to_16(probs.detach().double().numpy())
    np.testing.assert_allclose(imagenet_to_16(probs), ref, rtol=1e-6)
    np.testing.assert_allclose(imagenet_to_16(probs.to(torch.bfloat16)), ref, rtol=1e-2)
    with pytest.raises(ErfLabError, match=r"expected \(N, 1000\)"):
        imagenet_to_16(probs[0])


def test_logits_heads():
    logits = torch.zeros(2, 1000)
    logits[:, 404] = 10.0
    assert CATEGORIES[logits_to_scores16(logits).argmax(1)[0]] == "airplane"
    l16 = torch.randn(3, 16)
    assert np.allclose(logits_to_scores16(l16), torch.softmax(l16, -1).numpy(), atol=1e-6)
    with pytest.raises(ErfLabError, match="10 outputs"):
        logits_to_scores16(torch.zeros(1, 10))


def test_scores_of_a_confident_non_category_class_do_not_underflow_into_a_tie():
    """Top logit 120 on tench (in no category), 10 on every dog class, 0 elsewhere: dog's mean probability is
    e^-110 / 109 ~ 1.6e-50, every other category's e^-120 ~ 7.7e-53 (or less). A float32 softmax rounded all 16
    scores to exactly 0 and argmax gave the tie to "airplane"; model-vs-human's mean probability decides "dog"."""
    logits = torch.zeros(2, 1000)
    logits[:, 0] = 120.0
    logits[:, category_table()["dog"]] = 10.0
    logits[1, 404] = 12.0  # and airplane above dog: airplane (e^-108)
    s = logits_to_scores16(logits)
    assert [CATEGORIES[k] for k in s.argmax(1)] == ["dog", "airplane"]
    assert s[0, CATEGORIES.index("dog")] == pytest.approx(math.exp(-110.0), rel=1e-12)
    assert s[0, CATEGORIES.index("cat")] == pytest.approx(math.exp(-120.0), rel=1e-12)
    # ordinary logits: the same mean probabilities as a float64 reference, to float32 rounding of the logits
    rnd = torch.randn(4, 1000, generator=torch.Generator().manual_seed(0)) * 5
    ref = imagenet_to_16(torch.softmax(rnd.double(), -1).numpy())
    np.testing.assert_allclose(logits_to_scores16(rnd), ref, rtol=1e-12)


# ---------------------------------------------------------------- names and arithmetic

@pytest.mark.parametrize("name,expected", [
    ("bird1-bear2.png", ("bird", "bear")),
    ("airplane10-knife3.png", ("airplane", "knife")),
    ("cat7.png", ("cat", "cat")),
    ("0001_s5n_s01_0_bird_00_bird3-bird2.png", ("bird", "bird")),
    ("0002_s5n_s02_0_clock_00_clock4-chair1.png", ("clock", "chair")),
])
def test_parse_name(name, expected):
    assert parse_name(name) == expected


@pytest.mark.parametrize("name", ["bird-bear.png", "Bird1-bear2.png", "zebra1-bear2.png", "notes.png", "bird1-bear2-cat3.png"])
def test_parse_name_rejects(name):
    with pytest.raises(ValueError):
        parse_name(name)


def test_shape_bias_arithmetic():
    rows = [("cat", "dog", "cat"), ("cat", "dog", "dog"), ("cat", "bird", "cat"), ("cat", "bird", "knife"),
            ("dog", "cat", "cat"), ("dog", "dog", "dog")]  # last row: no conflict, excluded
    r = shape_bias_from_decisions(rows)
    assert (r["n_conflict"], r["shape_hits"], r["texture_hits"]) == (5, 2, 2)
    assert r["shape_bias"] == 0.5 and r["fraction_shape_hits"] == 0.4 and r["fraction_texture_hits"] == 0.4
    # model-vs-human's fraction-correct-shape / -texture: over all 6 trials, the one without conflict included
    assert r["n_trials"] == 6 and r["fraction_correct_shape"] == r["fraction_correct_texture"] == 2 / 6
    assert r["per_category"]["cat"]["shape_bias"] == pytest.approx(2 / 3)
    assert r["per_category"]["dog"]["shape_bias"] == 0.0
    assert shape_bias_from_decisions([("cat", "dog", "knife")])["shape_bias"] is None

    from erf_lab.shape_bias.plotting import _correct_fractions

    older = {"shape_hits": 3, "texture_hits": 1, "n_images": {"cue-conflict": 12},
             "undecodable_files": [{"set": "cue-conflict"}, {"set": "edges"}]}  # a summary without them
    assert _correct_fractions(older) == {"fraction_correct_shape": 3 / 11, "fraction_correct_texture": 1 / 11}


def test_humans_0_95869_pooled_and_per_subject(shared_datasets):
    paths = human_csvs(shared_datasets)
    assert len(paths) == 10
    r = shape_bias_from_csv(paths)
    assert round(r["shape_bias"], 5) == 0.95869
    assert r["n_conflict"] == 12000 and r["unparsed_rows"] == 0
    # model-vs-human's ShapeBias.analysis on these CSVs: fraction-correct-shape 0.7216, -texture 0.0311
    assert (r["shape_hits"], r["texture_hits"], r["n_trials"]) == (9236, 398, 12800)
    assert (round(r["fraction_correct_shape"], 4), round(r["fraction_correct_texture"], 4)) == (0.7216, 0.0311)
    lo, hi = r["shape_bias_ci95"]  # 9634 decisions: a narrow interval
    assert lo < r["shape_bias"] < hi and round(lo, 4) == 0.9545 and round(hi, 4) == 0.9625
    assert len(r["per_subject"]) == 10
    vals = list(r["per_subject"].values())
    assert 0.91 < min(vals) < max(vals) < 0.99  # every subject strongly shape-biased
    one = shape_bias_from_csv(paths[0])
    assert one["per_subject"] == {"subject-01": pytest.approx(r["per_subject"]["subject-01"])}


def test_human_shape_bias_on_fixture_csv_counted_by_hand(fixture_datasets):
    """The shipped subject's CSV, counted independently: texture = last '-' part of the image name, digits off."""
    path = fixture_datasets / "human-cue-conflict" / "cue-conflict_subject-01_session_1.csv"
    assert human_csvs(fixture_datasets) == [path]
    shape = texture = conflict = 0
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            tex = row["imagename"].rsplit("-", 1)[1].split(".")[0].rstrip("0123456789")
            if tex == row["category"]:
                continue
            conflict += 1
            shape += row["object_response"] == row["category"]
            texture += row["object_response"] == tex
    r = shape_bias_from_csv(path)
    assert conflict == 1200 and (r["n_conflict"], r["shape_hits"], r["texture_hits"]) == (conflict, shape, texture)
    assert r["shape_bias"] == shape / (shape + texture) and r["per_subject"] == {"subject-01": r["shape_bias"]}
    assert 0.9 < r["shape_bias"] < 1.0


def test_mvh_csv_round_trip(tmp_path, datasets):
    stim, _ = list_stimuli(datasets / "cue-conflict")
    rng = np.random.default_rng(0)
    decisions = [str(rng.choice([s.shape, s.texture, "knife"])) for s in stim]
    p = tmp_path / "cue-conflict_model_session-1.csv"
    write_mvh_csv(p, "model", [s.name for s in stim], [s.shape for s in stim], decisions)
    with open(p, newline="") as f:
        header = next(csv.reader(f))
    assert header == ["subj", "session", "trial", "rt", "object_response", "category", "condition", "imagename"]
    back = shape_bias_from_csv(p)
    direct = shape_bias_from_decisions([(s.shape, s.texture, d) for s, d in zip(stim, decisions)])
    assert back["shape_bias"] == direct["shape_bias"] and back["texture_hits"] == direct["texture_hits"]
    assert back["n_conflict"] == direct["n_conflict"] == sum(s.shape != s.texture for s in stim)
    assert direct["n_conflict"] in (1200, 11)  # full set, or the fixture (12 images, one without conflict)


# ---------------------------------------------------------------- preprocessing and evaluation

def test_preprocess_from_default_cfg():
    m = Tiny(size=40)
    m.default_cfg.update(mean=(0.25, 0.5, 0.75), std=(0.5, 0.25, 0.125), crop_pct=0.5)
    pp = Preprocess.from_model(m, crop_pct=None)  # the model's own ImageNet-evaluation crop
    assert pp.size == (40, 40) and pp.crop_pct == 0.5
    img = Image.new("RGB", (224, 224), (255, 0, 51))
    x = pp(img)
    assert x.shape == (3, 40, 40)
    assert torch.allclose(x[:, 20, 20], torch.tensor([(1 - 0.25) / 0.5, (0 - 0.5) / 0.25, (0.2 - 0.75) / 0.125]),
                          atol=1e-5)
    assert Preprocess.from_model(nn.Identity()).size == (224, 224)  # no default_cfg: ImageNet defaults
    with pytest.raises(ErfLabError, match="crop_pct"):
        Preprocess.from_model(m, crop_pct=1.5)


def test_stimuli_go_in_whole_as_in_model_vs_human():
    """model-vs-human feeds the 224 px stimuli through ToTensor + Normalize only: by default a 224 px model sees
    every pixel unchanged whatever its ImageNet crop, and a model of another size the whole stimulus resized."""
    m = Tiny(size=224)
    m.default_cfg.update(crop_pct=0.875, mean=(0.5,) * 3, std=(0.25,) * 3)
    pp = Preprocess.from_model(m)
    assert pp.crop_pct == 1.0 and pp.as_dict()["model_vs_human_geometry"]
    rgb = np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    x = pp(Image.fromarray(rgb))
    expected = (torch.from_numpy(rgb).permute(2, 0, 1).float() / 255 - 0.5) / 0.25
    assert torch.equal(x, expected)
    cropped = Preprocess.from_model(m, crop_pct=None)
    assert cropped.crop_pct == 0.875 and not cropped.as_dict()["model_vs_human_geometry"]
    # resize to 256, centre-crop 224: the border is gone and the middle enlarged
    assert not torch.equal(cropped(Image.fromarray(rgb)), expected)
    small = Tiny(size=112)
    small.default_cfg.update(crop_pct=0.875, mean=(0,) * 3, std=(1,) * 3)
    img = Image.new("RGB", (224, 224), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 2, 224))  # a white 2 px left border survives a whole-image resize only
    assert Preprocess.from_model(small)(img)[:, :, 0].min() > 0.4
    assert not Preprocess.from_model(small).as_dict()["model_vs_human_geometry"]  # resized: not their geometry
    assert Preprocess.from_model(small, crop_pct=None)(img)[:, :, 0].max() == 0


def test_crop_scale_size_floors_like_timm():
    """timm's eval transform resizes to floor(size / crop_pct) (224 / 0.9 -> 248, not 249): an image of exactly
    that size is only centre-cropped, pixel for pixel."""
    pp = Preprocess(size=(224, 224), mean=(0.0,) * 3, std=(1.0,) * 3, crop_pct=0.9)
    rgb = np.random.default_rng(0).integers(0, 256, (248, 248, 3), dtype=np.uint8)
    out = np.asarray(pp.pixels(Image.fromarray(rgb)))
    assert out.shape == (224, 224, 3) and np.array_equal(out, rgb[12:236, 12:236])


def test_sixteen_way_head_used_directly(datasets, tmp_path, monkeypatch):
    from erf_lab.erf import prepare

    kept = []  # CPU inference keeps freed memory in the heap (no fresh pages for every layer's activations)
    monkeypatch.setattr(prepare, "keep_freed_memory", lambda: kept.append(True) or True)
    r = evaluate(Constant16("bird"), datasets / "cue-conflict", limit=160, workers=0, show_progress=False)
    s = r["summary"]
    assert kept == [True] * 3  # one call per stimulus set
    stim = r["sets"]["cue-conflict"].stimuli
    assert s["warnings"][0] == f"degenerate run: {len(stim)} of {len(stim)} cue-conflict images (100%) are classified 'bird'"
    shape_hits = sum(1 for x in stim if x.shape == "bird" and x.texture != "bird")
    texture_hits = sum(1 for x in stim if x.texture == "bird" and x.shape != "bird")
    assert (s["shape_hits"], s["texture_hits"]) == (shape_hits, texture_hits) and shape_hits + texture_hits > 0
    for name, key in (("edges", "edge_accuracy"), ("silhouettes", "silhouette_accuracy")):
        shapes = [x.shape for x in r["sets"][name].stimuli]
        assert len(set(shapes)) == len(list((datasets / name).iterdir())) >= 8  # spread over every category
        assert s[key] == pytest.approx(shapes.count("bird") / len(shapes))
    write_decisions_csv(tmp_path / "d.csv", r["sets"])
    with open(tmp_path / "d.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == sum(len(x.stimuli) for x in r["sets"].values())
    assert {(row["decision"], row["top_class"]) for row in rows} == {("bird", "bird")}


def test_degenerate_warnings_at_their_thresholds():
    """One category for >= 90% of the images; shape-or-texture hits below 2/16 of the conflict images."""
    def warnings(rows):
        return [w for w in degenerate_warnings(rows) if "decisions" not in w]  # the few-decisions flag: below

    ten = [("cat", "oven", "oven")] * 9 + [("cat", "oven", "cat")]  # all hits, but 90% one answer
    assert warnings(ten) == ["degenerate run: 9 of 10 cue-conflict images (90%) are classified 'oven'"]
    assert warnings([("cat", "oven", "oven")] * 8 + [("cat", "oven", "cat"), ("cat", "oven", "dog")]) == []
    # 16 conflict rows over 16 different answers: 2 hits is exactly chance (no warning), 1 hit is below
    others = [c for c in CATEGORIES if c not in ("cat", "dog")]
    two = [("cat", "dog", "cat"), ("cat", "dog", "dog")] + [("cat", "dog", c) for c in others]
    assert len(two) == 16 and warnings(two) == []
    one = [("cat", "dog", "cat"), ("cat", "dog", "knife")] + [("cat", "dog", c) for c in others]
    assert warnings(one + [("dog", "dog", "dog")]) == [  # the non-conflict row does not count as a hit
        "shape-or-texture hits on 0.062 of the conflict images, below chance (0.125): the shape bias is noise"]
    assert degenerate_warnings([]) == []


def test_few_decisions_give_the_shape_bias_with_its_wilson_interval():
    from erf_lab.shape_bias.analysis import wilson_interval

    # Wilson (1927) at z = 1.96, by hand: 1 of 10 -> 0.0179-0.4042; 2 of 2 -> 0.3424-1
    assert [round(v, 4) for v in wilson_interval(1, 10)] == [0.0179, 0.4042]
    assert [round(v, 4) for v in wilson_interval(2, 2)] == [0.3424, 1.0] and wilson_interval(0, 0) is None
    two = [("cat", "dog", "cat"), ("bird", "dog", "bird")] + [("cat", "dog", c) for c in CATEGORIES[:14]
                                                              if c not in ("cat", "dog")]
    assert degenerate_warnings(two) == [
        "shape bias from only 2 shape-or-texture decisions: its 95% interval is 0.34-1.00"]
    assert shape_bias_from_decisions(two)["shape_bias_ci95"] == wilson_interval(2, 2)
    many = [("cat", "dog", "cat")] * 20 + [("cat", "dog", "dog")] * 10  # 30 decisions: no flag
    assert degenerate_warnings(many) == []


def test_bad_files_are_counted_not_silent(tmp_path, datasets):
    src = datasets / "cue-conflict"
    n_good = 0
    for cat in ("bird", "cat"):
        (tmp_path / "cc" / cat).mkdir(parents=True)
        for p in sorted((src / cat).glob("*.png"))[:6]:
            shutil.copy(p, tmp_path / "cc" / cat / p.name)
            n_good += 1
    (tmp_path / "cc" / "bird" / "bird9-cat9.png").write_bytes(b"not a png")
    (tmp_path / "cc" / "cat" / "kitten.png").write_bytes(b"x")
    with pytest.warns(UserWarning, match="cannot decode"):
        r = evaluate(Tiny(), tmp_path / "cc", workers=0, show_progress=False)
    s = r["summary"]
    assert [u["file"].endswith("bird9-cat9.png") for u in s["undecodable_files"]] == [True]
    assert [k["file"] for k in s["skipped_files"]] == ["cat/kitten.png"]
    assert s["n_skipped"] == 2
    good = [x for x, ok in zip(r["sets"]["cue-conflict"].stimuli, r["sets"]["cue-conflict"].ok) if ok]
    assert len(good) == n_good >= 2 and s["n_images"] == {"cue-conflict": n_good + 1}
    assert s["n_conflict"] == sum(x.shape != x.texture for x in good)


def test_wrong_head_size_is_an_error(fixture_datasets):
    with pytest.raises(ErfLabError, match="10 outputs"):
        evaluate(Tiny(num_classes=10), fixture_datasets / "cue-conflict", limit=4, workers=0, show_progress=False)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_a_model_in_another_precision_gets_its_inputs_in_it(fixture_datasets, dtype):
    """A float64 / bfloat16 model (model.double() in a notebook) failed with torch's 'Input type (FloatTensor) and
    weight type ... should be the same': its inputs now come in its precision, as the ERF measurement's do."""
    kw = dict(limit=6, workers=0, show_progress=False, cache=False)
    ref = evaluate(Tiny(), fixture_datasets / "cue-conflict", **kw)["sets"]["cue-conflict"]
    got = evaluate(Tiny().to(dtype), fixture_datasets / "cue-conflict", **kw)["sets"]["cue-conflict"]
    rtol = 1e-6 if dtype == torch.float64 else 0.02  # bfloat16 keeps 8 bits of mantissa
    np.testing.assert_allclose(got.scores16, ref.scores16, rtol=rtol, atol=0)
    assert got.ok.all() and len(got.ok) == 6 and ref.scores16.std() > 1e-5  # scores that differ between images


@pytest.mark.parametrize("num_classes", [1000, 10])  # 10: the run fails (head size) after the first batch
def test_the_model_comes_back_in_the_train_eval_modes_it_was_given(fixture_datasets, num_classes):
    """evaluate() from a notebook mid-training left the model in eval mode (BN then stops learning its statistics,
    dropout is off): each module now gets its own mode back (a frozen sub-module stays in eval), also on error."""
    model = Tiny(num_classes=num_classes).train()
    model.fc.eval()  # e.g. a frozen part
    with contextlib.nullcontext() if num_classes == 1000 else pytest.raises(ErfLabError, match="10 outputs"):
        evaluate(model, fixture_datasets / "cue-conflict", limit=4, workers=0, show_progress=False, cache=False)
    assert [m.training for m in model.modules()] == [True, True, False]


def test_pretrained_weights_with_another_class_count_are_refused(fixture_datasets, tmp_path):
    """``--pretrained --override num_classes=16`` keeps the published features but draws a new classifier: its
    shape bias is that of a random head (it ran unmarked, as a trained model's); refused before any output."""
    from erf_lab.shape_bias.evaluate import run_shape_bias

    out = tmp_path / "run"
    with pytest.raises(ErfLabError, match=r"classifier of efficientnet_lite0 \(_fc.bias, _fc.weight\) is at its "
                                          r"random initialisation"):
        run_shape_bias("efficientnet_lite0", out=out, pretrained=True, overrides={"num_classes": 16},
                       stimuli=fixture_datasets, limit=2, workers=0, show_progress=False)
    assert not out.exists()


def test_empty_folder_is_an_error(tmp_path):
    (tmp_path / "bird").mkdir()
    with pytest.raises(ErfLabError, match="erf-lab data download"):
        list_stimuli(tmp_path)



def test_a_stimulus_of_another_file_type_is_skipped_with_a_reason_not_dropped_unseen(tmp_path):
    """A stimulus saved as .webp / .gif / .tif was left out of the run and of the skipped list (n_skipped 0);
    files that are no stimulus (MANIFEST.json, README.md) are still no stimulus."""
    from PIL import Image

    (tmp_path / "bird").mkdir()
    for name in ("bird1-clock2.png", "bird2-clock1.webp", "bird3-cat1.gif", "bird4.TIF", "notes.txt"):
        Image.new("RGB", (8, 8)).save(tmp_path / "bird" / name, format="PNG")
    (tmp_path / "MANIFEST.json").write_text("{}")
    stimuli, skipped = list_stimuli(tmp_path)
    assert [s.name for s in stimuli] == ["bird1-clock2.png"]
    assert {d["file"]: d["reason"] for d in skipped} == {
        f"bird/{n}": f"a {Path(n).suffix} file: stimuli are read from .png/.jpg/.jpeg files"
        for n in ("bird2-clock1.webp", "bird3-cat1.gif", "bird4.TIF")}

# ---------------------------------------------------------------- the real ImageNet-trained EfficientNet-Lite0

@pytest.fixture(scope="module")
def lite0_full(shared_datasets):
    from erf_lab.models import create_model

    model = create_model("efficientnet_lite0", pretrained=True)
    return evaluate(model, shared_datasets / "cue-conflict", batch_size=64, show_progress=False)["summary"]


def test_lite0_shape_bias_in_cnn_band(lite0_full):
    s = lite0_full
    assert s["n_images"] == {"cue-conflict": 1280, "edges": 160, "silhouettes": 160}
    assert s["n_conflict"] == 1200 and s["n_skipped"] == 0
    assert 0.20 <= s["shape_bias"] <= 0.32  # ImageNet CNNs are texture-biased (Geirhos et al. 2019: ResNet-50 0.22)
    # the exact result measured with model-vs-human's whole 224 px stimuli (with the model's 0.875 crop it was
    # 173 vs 615, 0.2195; edges 0.325, silhouettes 0.425)
    assert (s["shape_hits"], s["texture_hits"]) == (197, 622) and round(s["shape_bias"], 4) == 0.2405
    assert (s["edge_accuracy"], s["silhouette_accuracy"]) == (57 / 160, 81 / 160)
    assert s["preprocessing"]["interpolation"] == "bicubic" and s["preprocessing"]["crop_pct"] == 1.0


def test_lite0_far_above_chance(lite0_full):
    s = lite0_full
    chance = 2 / 16  # shape or texture category by guessing
    assert s["fraction_shape_or_texture_hits"] > 4 * chance
    assert s["edge_accuracy"] > 2 / 16 and s["silhouette_accuracy"] > 4 / 16


# ---------------------------------------------------------------- decoded-stimulus cache

def _copy_stimuli(src_root, dst, n=12):
    """``n`` fixture stimuli copied into ``dst`` (so that a test may touch or break them)."""
    stim, _ = list_stimuli(src_root / "cue-conflict", n)
    for s in stim:
        (dst / s.shape).mkdir(parents=True, exist_ok=True)
        shutil.copy(s.path, dst / s.shape / s.path.name)
    return list_stimuli(dst)[0]


def _count_decodes(monkeypatch):
    import erf_lab.shape_bias.stimuli as stimuli_module

    calls = []
    real_open = stimuli_module.Image.open

    def counting_open(path, *a, **k):
        calls.append(path)
        return real_open(path, *a, **k)

    monkeypatch.setattr(stimuli_module.Image, "open", counting_open)
    return calls


def test_decoded_cache_gives_bit_identical_inputs_without_decoding(fixture_datasets, tmp_path, monkeypatch):
    from erf_lab.shape_bias.evaluate import run_set
    from erf_lab.shape_bias.stimuli import DecodedCache, StimulusDataset

    monkeypatch.setenv("ERF_LAB_CACHE", str(tmp_path / "cache"))
    stim = _copy_stimuli(fixture_datasets, tmp_path / "stim")
    model = Tiny(size=40).eval()
    pp = Preprocess.from_model(model)
    pp = Preprocess(size=(40, 40), mean=pp.mean, std=pp.std, interpolation="bicubic", crop_pct=0.875)
    decodes = _count_decodes(monkeypatch)
    first = run_set(model, "cue", stim, pp, batch_size=5, workers=0, show_progress=False)
    assert len(decodes) == len(stim)
    cache = DecodedCache(stim, pp)
    pixels = np.load(cache.path)
    assert pixels.shape == (len(stim), 3, 40, 40) and pixels.dtype == np.uint8
    # the cached pixels are the decoder's own, and the model inputs built from them are bit for bit the same
    direct = torch.stack([StimulusDataset(stim, pp)[i][0] for i in range(len(stim))])
    decodes.clear()
    assert torch.equal(torch.from_numpy(pixels).float().div_(255.0), direct)
    second = run_set(model, "cue", stim, pp, batch_size=5, workers=0, show_progress=False)
    assert decodes == []  # nothing decoded: read from the cache
    np.testing.assert_array_equal(second.scores16, first.scores16)
    np.testing.assert_array_equal(second.top_index, first.top_index)
    assert second.ok.all() and second.errors == {}
    # per image through Preprocess.__call__ (the path of a single image) gives the same model input
    from erf_lab.shape_bias.evaluate import _pixel_batch

    x = _pixel_batch(pixels, {}, {}, 0, 3)[0]
    for i in range(3):
        with Image.open(stim[i].path) as img:
            assert torch.equal(pp.normalize(x[i]), pp(img))


def test_decoded_cache_follows_changed_files_and_survives_a_broken_cache(fixture_datasets, tmp_path, monkeypatch):
    import os

    from erf_lab.shape_bias.evaluate import run_set
    from erf_lab.shape_bias.stimuli import DecodedCache

    monkeypatch.setenv("ERF_LAB_CACHE", str(tmp_path / "cache"))
    stim = _copy_stimuli(fixture_datasets, tmp_path / "stim", n=6)
    model, pp = Tiny(size=32).eval(), Preprocess(size=(32, 32))
    decodes = _count_decodes(monkeypatch)
    run_set(model, "cue", stim, pp, batch_size=4, workers=0, show_progress=False)
    old = DecodedCache(stim, pp).path
    # an image replaced by another one (new contents, new mtime): a new key, decoded again
    shutil.copy(stim[1].path, stim[0].path)
    os.utime(stim[0].path, ns=(1, 1))
    decodes.clear()
    changed = run_set(model, "cue", stim, pp, batch_size=4, workers=0, show_progress=False)
    assert len(decodes) == len(stim) and DecodedCache(stim, pp).path != old
    np.testing.assert_array_equal(changed.scores16[0], changed.scores16[1])  # the new pixels were used
    # a truncated cache file is decoded again and rewritten, not an error
    path = DecodedCache(stim, pp).path
    path.write_bytes(path.read_bytes()[:100])
    decodes.clear()
    again = run_set(model, "cue", stim, pp, batch_size=4, workers=0, show_progress=False)
    assert len(decodes) == len(stim)
    np.testing.assert_array_equal(again.scores16, changed.scores16)
    assert np.load(path).shape == (len(stim), 3, 32, 32)
    # another geometry of the same files is another cache
    assert DecodedCache(stim, Preprocess(size=(48, 48))).path != path


def test_decoded_cache_skips_undecodable_sets_and_can_be_turned_off(fixture_datasets, tmp_path, monkeypatch):
    from erf_lab.shape_bias.evaluate import run_set

    cache = tmp_path / "cache"
    monkeypatch.setenv("ERF_LAB_CACHE", str(cache))
    stim = _copy_stimuli(fixture_datasets, tmp_path / "stim", n=6)
    model, pp = Tiny(size=32).eval(), Preprocess(size=(32, 32))
    run_set(model, "cue", stim, pp, batch_size=4, workers=0, show_progress=False, cache=False)
    assert not (cache / "stimuli").exists()
    stim[2].path.write_bytes(b"not a png")
    with pytest.warns(UserWarning, match="cannot decode"):
        res = run_set(model, "cue", stim, pp, batch_size=4, workers=0, show_progress=False)
    assert not res.ok[2] and res.ok.sum() == 5 and 2 in res.errors
    assert not list((cache / "stimuli").glob("*.npy"))  # a set with an undecodable image is never cached
    # an unwritable cache: the run works and writes nothing
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("ERF_LAB_CACHE", str(blocker))
    stim[2].path.write_bytes((fixture_datasets / "cue-conflict").rglob("*.png").__next__().read_bytes())
    ok = run_set(model, "cue", stim, pp, batch_size=4, workers=0, show_progress=False)
    assert ok.ok.all()


def test_decoding_first_and_streaming_give_the_same_result_high_bit_depth_too(fixture_datasets, tmp_path,
                                                                              monkeypatch):
    import erf_lab.shape_bias.stimuli as stimuli_module
    from erf_lab.shape_bias.evaluate import _pixel_batch, decode_all, run_set
    from erf_lab.shape_bias.stimuli import StimulusDataset

    cache = tmp_path / "cache"
    monkeypatch.setenv("ERF_LAB_CACHE", str(cache))
    stim = _copy_stimuli(fixture_datasets, tmp_path / "stim", n=8)
    # one stimulus as a 16-bit grayscale PNG: decoded to float pixels that uint8 cannot hold
    with Image.open(stim[3].path) as img:
        gray16 = (np.asarray(img.convert("L"), dtype=np.uint16) * 257 + 3).astype(np.uint16)
    Image.fromarray(gray16).save(stim[3].path)
    with Image.open(stim[3].path) as img:
        assert img.mode.startswith("I")
    model, pp = Tiny(size=32).eval(), Preprocess(size=(32, 32))
    pixels, others, failed = decode_all(stim, pp, workers=2)
    assert list(others) == [3] and failed == {}
    direct = torch.stack([StimulusDataset(stim, pp)[i][0] for i in range(len(stim))])
    assert torch.equal(_pixel_batch(pixels, others, failed, 0, len(stim))[0], direct)
    assert not (direct[3] * 255 - (direct[3] * 255).round()).abs().max() < 1e-3  # not 8-bit values
    first = run_set(model, "cue", stim, pp, batch_size=3, workers=2, show_progress=False)
    assert first.ok.all() and not list(cache.rglob("*.npy"))  # not cached: uint8 cannot hold image 3
    monkeypatch.setattr(stimuli_module, "DECODED_CACHE_MAX_BYTES", 0)  # too big to hold: streamed
    streamed = run_set(model, "cue", stim, pp, batch_size=3, workers=0, show_progress=False)
    np.testing.assert_array_equal(streamed.scores16, first.scores16)
    np.testing.assert_array_equal(streamed.top_index, first.top_index)


def test_shape_bias_benchmark_runs_and_leaves_the_cache_alone(fixture_datasets, tmp_path, monkeypatch):
    import importlib.util
    import os

    from conftest import REPO_ROOT

    spec = importlib.util.spec_from_file_location("bench_shape_bias", REPO_ROOT / "benchmarks" / "bench_shape_bias.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setenv("ERF_LAB_CACHE", str(tmp_path / "cache"))
    res = bench.main(["--stimuli", str(fixture_datasets), "--images", "12", "--batch-size", "8", "--repeats", "1",
                      "--workers", "0", "--out", str(tmp_path / "out")])
    assert res["images"] == 12 and len(res["pure_inference_s"]) == len(res["pipeline_s"]) == len(res["decoding_s"])
    assert res["overhead_ratio_best"] > 0 and res["decoding_overhead_ratio_best"] > 0
    assert res["machine"]["cpu_count"] == os.cpu_count()
    assert os.environ["ERF_LAB_CACHE"] == str(tmp_path / "cache") and not (tmp_path / "cache").exists()
    assert (tmp_path / "out" / "results.json").is_file()


def test_many_high_bit_depth_images_from_worker_processes_hold_no_file_descriptors(fixture_datasets, tmp_path):
    """Float pixels come back from decode workers as arrays: a tensor from a worker keeps a file descriptor open
    while it lives (a full set of 16-bit images would run out of them)."""
    import os

    from erf_lab.shape_bias.evaluate import decode_all

    def open_fds() -> int:  # Linux (CI): the process's open file descriptors; elsewhere only the results count
        return len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else 0

    src = next((fixture_datasets / "cue-conflict").rglob("*.png"))
    with Image.open(src) as img:
        gray16 = (np.asarray(img.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    (tmp_path / "bear").mkdir()
    for i in range(40):
        Image.fromarray(gray16).save(tmp_path / "bear" / f"bear{i}-cat{i}.png")
    stim = list_stimuli(tmp_path)[0]
    before = open_fds()
    pixels, others, failed = decode_all(stim, Preprocess(size=(24, 24)), workers=2)
    assert len(others) == 40 and failed == {} and not pixels.any()
    assert open_fds() - before < 10


def test_decoded_cache_key_folder_trim_and_unreadable_files(fixture_datasets, tmp_path, monkeypatch):
    import PIL

    import erf_lab.shape_bias.stimuli as stimuli_module
    from erf_lab.shape_bias.stimuli import DecodedCache

    monkeypatch.setenv("ERF_LAB_CACHE", str(tmp_path / "cache"))
    stim = _copy_stimuli(fixture_datasets, tmp_path / "stim", n=4)
    cache = DecodedCache(stim, Preprocess(size=(16, 16)))
    path = cache.path
    monkeypatch.setattr(PIL, "__version__", "0.0-other")
    assert cache.path != path  # another Pillow may decode or resize differently
    monkeypatch.undo()
    monkeypatch.setenv("ERF_LAB_CACHE", str(tmp_path / "cache"))
    path.parent.mkdir(parents=True)
    path.write_bytes(b"")  # an empty file (a full disk): decoded again, not an error
    assert cache.load() is None
    pixels = np.arange(4 * 3 * 16 * 16, dtype=np.uint8).reshape(4, 3, 16, 16)
    np.testing.assert_array_equal(cache.save(pixels), pixels)
    np.testing.assert_array_equal(cache.load(), pixels)
    # the folder keeps the most recently used sets within the budget
    old = path.parent / "old.u8.npy"
    np.save(old, np.zeros(4096, np.uint8))
    os_time = path.stat().st_mtime_ns
    import os

    os.utime(old, ns=(os_time - 10**9, os_time - 10**9))
    stimuli_module._trim(path.parent, keep=path, budget=path.stat().st_size + 100)
    assert path.exists() and not old.exists()


class CountingTiny(Tiny):
    """Tiny that counts the images it sees and can stop the run (Ctrl-C) at its ``stop_at``-th batch."""

    def __init__(self, stop_at=None):
        super().__init__(size=32)
        self.seen, self.calls, self.stop_at = 0, 0, stop_at

    def forward(self, x):
        self.calls += 1
        if self.calls == self.stop_at:
            raise KeyboardInterrupt
        self.seen += len(x)
        return super().forward(x)


def test_interrupted_run_resumes_where_it_stopped(fixture_datasets, tmp_path):
    """Ctrl-C keeps the scores of the finished batches in --out; a rerun with the same weights runs only the
    rest and ends with the decisions of an uninterrupted run. Other weights start again."""
    from erf_lab.shape_bias.evaluate import run_shape_bias

    def run(model, out):
        return run_shape_bias("tiny", out=out, model=model, allow_random=True, stimuli=fixture_datasets,
                              batch_size=4, workers=0, show_progress=False)

    whole = run(CountingTiny(), tmp_path / "whole")
    n = sum(whole["n_images"].values())
    with pytest.raises(KeyboardInterrupt):
        run(CountingTiny(stop_at=3), tmp_path / "run")  # two batches of 4 cue-conflict images done
    assert (tmp_path / "run" / ".partial-cue-conflict.npz").is_file()
    again = CountingTiny()
    resumed = run(again, tmp_path / "run")
    assert resumed["resumed_images"] == {"cue-conflict": 8, "edges": 0, "silhouettes": 0}
    assert again.seen == n - 8 and not list((tmp_path / "run").glob(".partial-*"))
    drop = ("resumed_images", "seconds", "images_per_second", "time_utc", "command", "workers", "start_time",
            "end_time", "wall_seconds")
    assert {k: v for k, v in resumed.items() if k not in drop} == {k: v for k, v in whole.items() if k not in drop}
    assert (tmp_path / "run" / "decisions.csv").read_text() == (tmp_path / "whole" / "decisions.csv").read_text()
    with pytest.raises(KeyboardInterrupt):  # stopped in the edges: the finished cue-conflict set is kept too
        run(CountingTiny(stop_at=5), tmp_path / "later")
    later = CountingTiny()
    assert run(later, tmp_path / "later")["resumed_images"] == {"cue-conflict": 12, "edges": 4, "silhouettes": 0}
    assert later.seen == n - 16
    with pytest.raises(KeyboardInterrupt):
        run(CountingTiny(stop_at=3), tmp_path / "other")
    changed = CountingTiny()
    with torch.no_grad():
        changed.fc.bias.add_(1.0)  # other weights: the saved scores are not theirs
    assert run(changed, tmp_path / "other")["resumed_images"]["cue-conflict"] == 0 and changed.seen == n


@pytest.mark.parametrize("after_images", [0, 160])
def test_ctrl_c_while_worker_processes_decode_ends_with_one_line_and_no_process_left(fixture_datasets, tmp_path,
                                                                                     after_images):
    """A real SIGINT to the whole process group (what Ctrl-C in a terminal sends) while the decode workers of
    ``decode_all`` start (``after_images=0``: the bar is up, the workers are being forked) or run: exit status 130,
    one line after the progress bar, no traceback (neither the main process's nor a worker's), no process of the
    group left running and no output file but the (empty) --out folder. Before, a stop while the workers started
    printed the DataLoader iterator's failing ``__del__``, and with stops held over the start, left the workers
    running after the process had ended."""
    import os
    import re
    import signal
    import subprocess
    import sys
    import time

    stimuli = tmp_path / "stimuli"  # 3600 cue-conflict images (300 links to each fixture image): seconds of decoding
    stimuli.mkdir()
    for name in ("edges", "silhouettes", "human-cue-conflict"):
        (stimuli / name).symlink_to(fixture_datasets / name)
    for f in sorted((fixture_datasets / "cue-conflict").rglob("*.png")):
        shape, texture = f.stem.split("-")
        (stimuli / "cue-conflict" / f.parent.name).mkdir(parents=True, exist_ok=True)
        for i in range(300):
            (stimuli / "cue-conflict" / f.parent.name / f"{shape}{i}-{texture}.png").symlink_to(f)
    out = tmp_path / "out"
    p = subprocess.Popen([sys.executable, "-m", "erf_lab", "shape-bias", "--model", "resnet18", "--allow-random",
                          "--stimuli", str(stimuli), "--workers", "2", "--out", str(out)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                         env={**os.environ, "ERF_LAB_CACHE": str(tmp_path / "cache")},
                         # as a terminal's foreground job: the suite may run in a background job, whose SIGINT the
                         # shell set to ignored (inherited, and erf-lab then rightly leaves Ctrl-C alone)
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    err, deadline = b"", time.monotonic() + 120
    try:
        def decoded():
            last = err.rsplit(b"decoding:", 1)[-1].split(b"/3600 [")[0] if b"decoding:" in err else b""
            return int(last.rsplit(b"|", 1)[-1]) if b"/3600 [" in err.rsplit(b"decoding:", 1)[-1] else -1

        while decoded() < after_images:
            chunk = os.read(p.stderr.fileno(), 4096)
            assert chunk and time.monotonic() < deadline, err.decode(errors="replace")[-2000:]
            err += chunk
        at = decoded()
        os.killpg(p.pid, signal.SIGINT)
        _, rest = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    text = (err + rest).decode(errors="replace")
    assert p.returncode == 130, text[-2000:]
    assert at < 3600, "the decoding had finished before the interrupt: the test did not test it"
    # what is not the bar (a stop that lands while the bar is being created leaves its first text unended, and the
    # line follows it on the terminal's line: a rare race, left as it is)
    rest = [re.sub(r"^.*decoding:.*?\]", "", s).strip() for s in text.replace("\r", "\n").splitlines()]
    assert [s for s in rest if s] == ["erf-lab shape-bias: interrupted"], repr(text[-1500:])
    time.sleep(0.5)
    with pytest.raises(ProcessLookupError):  # the workers went with the main process
        os.killpg(p.pid, 0)
    assert not out.exists() or not list(out.iterdir())


def test_a_stop_during_inference_from_worker_processes_shuts_them_down_at_once(fixture_datasets, monkeypatch):
    """The path that decodes in DataLoader workers beside inference (CUDA, or a set too large to decode first):
    a stop raised in the loop body (here the model) ends the workers before ``run_set`` returns, while the
    exception, its traceback and the frames in it are still alive (a process that then ends with ``exit_now``
    left them running before)."""
    import multiprocessing

    from erf_lab.shape_bias.evaluate import run_set
    from erf_lab.shape_bias.stimuli import DecodedCache

    monkeypatch.setattr(DecodedCache, "fits", property(lambda self: False))  # as a set over the cache's budget
    stimuli, _ = list_stimuli(fixture_datasets / "cue-conflict")
    model = CountingTiny(stop_at=2)
    with pytest.raises(KeyboardInterrupt) as stopped:
        run_set(model, "cue-conflict", stimuli, Preprocess(size=(32, 32)), batch_size=2, workers=2,
                show_progress=False, cache=False)
    assert model.seen == 2 and stopped.value.__traceback__ is not None
    assert multiprocessing.active_children() == []


_DECODE_THEN_WAIT = """
import multiprocessing, sys, time
import erf_lab.io
from erf_lab.shape_bias.evaluate import decode_all
from erf_lab.shape_bias.stimuli import Preprocess, list_stimuli

class Bar:  # the first batch arrives: say which workers decode, then wait there (the test kills this process)
    def __init__(self, *a, **k): pass
    def __enter__(self): return self
    def __exit__(self, *a): return False
    def update(self, n):
        print(" ".join(str(p.pid) for p in multiprocessing.active_children()), flush=True)
        time.sleep(300)

erf_lab.io.progress = Bar
stim = list_stimuli(sys.argv[1])[0]
decode_all(stim * 40, Preprocess(size=(224, 224)), workers=2)
"""


def test_decode_workers_end_when_their_run_is_killed(fixture_datasets):
    """SIGKILL of a shape-bias run while its workers decode (no stop reaches them): each worker's decoded batches
    filled the pipe to the dead run, and its exit waited on writing them for good (two processes left per kill,
    found by killing runs at random). They now end with the run (Linux: PR_SET_PDEATHSIG)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    if not sys.platform.startswith("linux"):
        pytest.skip("the parent-death signal is Linux's")
    proc = subprocess.Popen([sys.executable, "-c", _DECODE_THEN_WAIT, str(fixture_datasets / "cue-conflict")],
                            stdout=subprocess.PIPE, text=True)
    workers = []
    try:
        workers = [int(p) for p in proc.stdout.readline().split()]
        assert len(workers) == 2
        time.sleep(1)  # the workers decode ahead meanwhile, more than the pipe holds
        proc.kill()
        proc.wait(timeout=30)
        deadline = time.time() + 20  # a worker's own check of its parent runs every 5 s
        while time.time() < deadline and any(os.path.exists(f"/proc/{w}") and
                                             "Z" not in _proc_state(w) for w in workers):
            time.sleep(0.2)
        assert not [w for w in workers if os.path.exists(f"/proc/{w}") and "Z" not in _proc_state(w)]
    finally:
        proc.kill()
        for w in workers:
            try:
                os.kill(w, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _proc_state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def test_evaluate_gives_the_callers_model_back_where_it_was(fixture_datasets):
    """evaluate(model, device=...) moved the caller's model there for good (a CPU model evaluated on a GPU stayed
    on the GPU). Its parameters, gradients and buffers are now the caller's own tensors again afterwards, also when
    the run fails: here on the meta device (no second device on the CPU test machine), where the first batch's
    scores cannot be read; the float64 model is back on the CPU with its values."""
    from erf_lab.train.probes import predict

    for run in (lambda m: evaluate(m, fixture_datasets / "cue-conflict", limit=2, workers=0, show_progress=False,
                                   cache=False, device="meta"),
                lambda m: predict(m, torch.rand(2, 3, 32, 32), device="meta")):  # the cue-world probes' inference
        model = Tiny(num_classes=16).double()
        model.conv.weight.grad = torch.ones_like(model.conv.weight)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        weight = model.conv.weight
        with pytest.raises(RuntimeError, match="meta tensors"):  # after the forward: the scores cannot be read
            run(model)
        assert {p.device.type for p in model.parameters()} == {"cpu"} and model.conv.weight is weight
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        assert model.conv.weight.dtype == torch.float64 and model.conv.weight.grad.sum().item() == weight.numel()

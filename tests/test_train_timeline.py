"""Cue-world probes (shape bias by the model-vs-human formula), the training timeline (cached per checkpoint),
builtin: weights, and their bad inputs."""
import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn as nn

from conftest import held_by_another_process
from erf_lab.cli.main import main
from erf_lab.errors import ErfLabError
from erf_lab.models import create_model
from erf_lab.train.cue_world import draw_scene
from erf_lab.train.loop import train
from erf_lab.train.probes import ProbeSpec, probe, shape_bias_counts
from erf_lab.train.recipe import Recipe

TINY = {"channels": (8, 8, 16, 16), "layers": (1, 1, 1, 1), "large_kernel_sizes": (7, 7, 7, 3)}


class _Always(nn.Module):
    """Answers class ``k`` for every image."""

    def __init__(self, k: int, n: int = 4):
        super().__init__()
        self.k, self.n = k, n
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        out = torch.zeros(len(x), self.n)
        out[:, self.k] = 1.0
        return out


def test_shape_bias_formula_on_constructed_decisions():
    shapes, textures = [0, 1, 2, 3, 0, 1], [1, 2, 3, 0, 2, 3]
    preds = [0, 2, 2, 0, 1, 1]  # shape hits: 0, 2, 1 -> 3; texture hits: 2, 0 -> 2; one neither
    r = shape_bias_counts(shapes, textures, preds)
    assert (r["shape_hits"], r["texture_hits"], r["n_conflict"]) == (3, 2, 6)
    assert r["shape_bias"] == pytest.approx(3 / 5) and r["fraction_shape_hits"] == pytest.approx(0.5)
    assert shape_bias_counts([0], [1], [3])["shape_bias"] is None
    with pytest.raises(ErfLabError, match="shape != texture"):
        shape_bias_counts([1], [1], [1])


def test_probe_counts_of_a_constant_model():
    spec = ProbeSpec(input_size=16, size=40, num_classes=4, seed=3)
    res = probe(_Always(2), spec)["summary"]
    conflict = [draw_scene("cue-conflict", i, 4, 3) for i in range(40)]
    n_shape, n_tex = sum(s.shape == 2 for s in conflict), sum(s.texture == 2 for s in conflict)
    assert n_shape > 0 and n_tex > 0
    assert (res["shape_hits"], res["texture_hits"]) == (n_shape, n_tex)
    assert res["shape_bias"] == pytest.approx(n_shape / (n_shape + n_tex))
    shape_only = [draw_scene("shape-only", i, 4, 3).shape for i in range(40)]
    texture_only = [draw_scene("texture-only", i, 4, 3).texture for i in range(40)]
    assert res["shape_only_accuracy"] == pytest.approx(np.mean(np.array(shape_only) == 2))
    assert res["texture_only_accuracy"] == pytest.approx(np.mean(np.array(texture_only) == 2))
    assert sum(c["shape_hits"] for c in res["per_class"].values()) == n_shape
    with pytest.raises(ErfLabError, match="outside cue-world"):
        probe(_Always(5, n=6), spec)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("timeline") / "run"
    train("replknet_31b", "cue-world", out=out, overrides=TINY, show_progress=False, input_size=32, train_size=32,
          val_size=16, num_classes=4, recipe=Recipe(epochs=2, batch_size=8, warmup_epochs=0.5))
    return out


def test_timeline_measures_each_checkpoint_once(tiny_run, tmp_path, capsys):
    from erf_lab.shape_bias.analysis import at_chance
    from erf_lab.train.timeline import UNTRAINED_NOTE, timeline

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    aside = tmp_path / "aside"
    aside.mkdir()
    for p in run.glob("checkpoints/epoch_002.*"):  # as if the run had reached epoch 1 only
        shutil.move(p, aside / p.name)
    # at 64 px the 2 x 2 map's unit 1 is centred at 32 = 64 // 2 (at the training size, 32 px, the one unit of a
    # 1 x 1 map is centred at the corner pixel: no centred square fits, every area ratio is "not reached")
    kw = dict(num_images=2, probe_size=12, show_progress=False, formats=("png",), input_size=64)
    first = timeline(run, **kw)
    assert first["measured"] == {"erf": 2, "probe": 2}
    assert [r["epoch"] for r in first["rows"]] == [0, 1]
    for p in aside.iterdir():
        shutil.move(p, run / "checkpoints" / p.name)
    second = timeline(run, **kw)
    assert second["measured"] == {"erf": 1, "probe": 1}  # only the new checkpoint
    assert second["rows"][:2] == first["rows"]
    assert timeline(run, **kw)["measured"] == {"erf": 0, "probe": 0}
    rows = second["rows"]
    metrics = [line.split(",") for line in (run / "metrics.csv").read_text().splitlines()[1:]]
    assert rows[0]["val_acc"] is None and rows[2]["val_acc"] == pytest.approx(float(metrics[1][6]))
    for r in rows:
        assert 0 < r["area@50%"] <= 100 and r["r_rms"] > 0 and 0 <= r["shape_only_accuracy"] <= 1
    # a shape bias of the initialisation or of a model at chance is marked (as in the study's tables)
    assert rows[0]["untrained"] is True
    assert [r["untrained"] for r in rows[1:]] == [at_chance(r["val_acc"], 4, 16) for r in rows[1:]]
    capsys.readouterr()
    assert main(["timeline", str(run), "--num-images", "2", "--probe-size", "12", "--input-size", "64", "--formats",
                 "png", "--quiet"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[1].split()[0] == "0" and printed[1].split()[-2] == "†" and UNTRAINED_NOTE in printed
    assert "measured 0 ERF(s) and 0 probe(s) of 3 checkpoint(s); the rest came from the cache" in printed
    # a first call measures every checkpoint: nothing came from a cache, and the line does not say so
    assert main(["timeline", str(run), "--num-images", "2", "--probe-size", "12", "--input-size", "64", "--formats",
                 "png", "--quiet", "--out", str(tmp_path / "fresh")]) == 0
    assert "measured 3 ERF(s) and 3 probe(s) of 3 checkpoint(s)" in capsys.readouterr().out.splitlines()
    erf_json = json.loads((run / "timeline" / "erf-64px" / "epoch_001" / "run.json").read_text())
    assert erf_json["input_size"] == 64 and erf_json["num_used"] == 2 and erf_json["erf_centre"] == [32, 32]
    assert (run / "timeline" / "timeline.png").is_file()
    lines = (run / "timeline" / "timeline.csv").read_text().splitlines()
    assert len(lines) == 4 and lines[0].startswith("epoch,area@20%")
    elsewhere = tmp_path / "elsewhere"  # --out: the caches and results of a read-only run in another folder
    shutil.copytree(run / "timeline", elsewhere)
    (elsewhere / "timeline.csv").unlink()
    moved = timeline(run, out=elsewhere, **kw)
    assert moved["measured"] == {"erf": 0, "probe": 0} and moved["out_dir"] == elsewhere
    assert (elsewhere / "timeline.csv").read_text().splitlines() == lines


def test_timeline_names_the_model_and_training_it_summarises(tiny_run, tmp_path):
    """timeline.json's derived_from named the training run by its folder only: a run retrained into the same folder
    (another seed, kernel size or model) could not be told from the one summarised. It now says the model, its kernel
    sizes and seed, and the SHA-256 of the training run's run.json; for a run still in progress (no run.json), what
    its resume state says, with the kernel sizes of the model it builds."""
    from erf_lab.io import sha256_file
    from erf_lab.train.checkpoints import STATE_FILE
    from erf_lab.train.timeline import timeline

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    kw = dict(num_images=1, probe_size=8, show_progress=False, formats=("png",), out=tmp_path / "t")
    timeline(run, **kw)
    source = json.loads((tmp_path / "t" / "timeline.json").read_text())["derived_from"]
    assert len(source) == 1 and source[0]["path"] == str(run.resolve())
    trained = json.loads((run / "run.json").read_text())
    assert (source[0]["model"], source[0]["kernel_sizes"], source[0]["seed"]) == ("replknet_31b", [7, 7, 7, 3], 0)
    assert trained["model_config"]["kernel_sizes"] == [7, 7, 7, 3]
    assert source[0]["files"] == [{"path": str((run / "run.json").resolve()), "sha256": sha256_file(run / "run.json")}]
    assert source[0]["time"] == trained["start_time"] and "in_progress" not in source[0]
    # a run in progress: its settings from the resume state, no record to digest
    torch.save({"settings": {**trained["settings"], "seed": 5}}, run / STATE_FILE)
    (run / "run.json").unlink()
    timeline(run, **kw)
    source = json.loads((tmp_path / "t" / "timeline.json").read_text())["derived_from"][0]
    assert (source["model"], source["kernel_sizes"], source["seed"], source["in_progress"]) == \
        ("replknet_31b", [7, 7, 7, 3], 5, True)
    assert "files" not in source


def test_timeline_bad_input(tiny_run, tmp_path, capsys):
    empty = tmp_path / "not-a-run"
    empty.mkdir()
    no_ckpt = tmp_path / "no-ckpt"
    no_ckpt.mkdir()
    shutil.copy(tiny_run / "run.json", no_ckpt / "run.json")
    for path, pattern in ((empty, "not an erf-lab training run"), (no_ckpt, "holds no checkpoint"),
                          (tmp_path / "missing", "no such training run folder")):
        assert main(["timeline", str(path), "--quiet"]) == 2
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and "error:" in lines[0] and pattern in lines[0], err
    assert not (no_ckpt / "timeline").exists()
    (tmp_path / "file").write_text("x")
    for extra, pattern in ((["--input-size", "-1"], "--input-size must be in [1, 4096], got -1"),
                           (["--input-size", "0"], "--input-size must be in [1, 4096], got 0"),
                           (["--input-size", "100000"], "--input-size must be in [1, 4096], got 100000"),
                           (["--out", str(tmp_path / "file" / "t")], f"lies under a file ({tmp_path / 'file'})")):
        assert main(["timeline", str(tiny_run), "--quiet", *extra]) == 2
        err = capsys.readouterr().err
        assert err.count("error:") == 1 and pattern in err and "Traceback" not in err, err


def test_timeline_of_a_folder_run_names_the_command_that_measures_its_checkpoints(tmp_path, capsys, monkeypatch):
    """A run trained on an image folder has no cue-world probe: the timeline stopped at 'needs a cue-world run' and
    left the user there. Its line now names the erf-lab compute command of one checkpoint (the model as trained, its
    class count, the folder's val/ images, the training size), which runs as it is, for a finished run and for one
    still in progress (its resume state: the class count from the checkpoint)."""
    import shlex

    from PIL import Image

    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    for split, k in (("train", 4), ("val", 2)):
        for c in ("a", "b", "c"):
            (tmp_path / "data" / split / c).mkdir(parents=True)
            for i in range(k):
                Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(
                    tmp_path / "data" / split / c / f"{i}.png")
    train("replknet_31b", "data", out=tmp_path / "run", overrides=TINY, input_size=32, show_progress=False,
          recipe=Recipe(epochs=1, batch_size=4, warmup_epochs=0))
    assert main(["timeline", "run", "--quiet"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("erf-lab timeline: error: run: the timeline's shape-bias probe "
                                                   "needs a cue-world run (this one: data); measure"), lines
    command = shlex.split(lines[0].split("e.g. epoch 1's: ", 1)[1])
    assert command[:2] == ["erf-lab", "compute"] and "num_classes=3" in command, command
    assert command[command.index("--images") + 1] == str(tmp_path / "data" / "val")
    assert main([*command[1:], "--out", "erf", "--quiet"]) == 0
    info = json.loads((tmp_path / "erf" / "run.json").read_text())
    assert info["num_used"] == 6 and info["weights"] == str(tmp_path / "run" / "checkpoints" / "epoch_001.safetensors")
    torch.save({"settings": json.loads((tmp_path / "run" / "run.json").read_text())["settings"]},
               tmp_path / "run" / ".train_state.pt")  # as a run in progress holds its settings
    (tmp_path / "run" / "run.json").unlink()
    assert main(["timeline", "run", "--quiet"]) == 2
    assert "--override num_classes=3 --weights run/checkpoints/epoch_001.safetensors" in capsys.readouterr().err


def test_timeline_of_a_run_with_a_damaged_metrics_csv_is_one_line(tiny_run, tmp_path, capsys):
    """A metrics.csv that is not what 'erf-lab train' writes (text in a number column, no epoch column, not UTF-8)
    is one error line naming the file (before: a ValueError / KeyError traceback)."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    for text in (b"epoch,step,val_acc\nx,1,abc\n", b"foo,bar\n1,2\n", b"\xff\xfe\x00bad"):
        (run / "metrics.csv").write_bytes(text)
        assert main(["timeline", str(run), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err.count("error:") == 1 and f"{run / 'metrics.csv'} is damaged" in err and "Traceback" not in err, err
    assert not (run / "timeline").exists()


def test_timeline_of_a_read_only_run_points_to_out(tiny_run, capsys, monkeypatch):
    import erf_lab.io as io

    def refuse(*a, **k):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(io.tempfile, "mkstemp", refuse)
    assert main(["timeline", str(tiny_run), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (f"erf-lab timeline: error: --out {tiny_run / 'timeline'} is not writable: Read-only file "
                           "system; pass --out FOLDER to write elsewhere")


def test_shape_bias_cli_on_cue_world(tiny_run, tmp_path, capsys):
    out = tmp_path / "sb"
    assert main(["shape-bias", "--model", "replknet_31b", "--weights", str(tiny_run / "model.safetensors"),
                 "--stimuli", "cue-world", "--limit", "20", "--out", str(out)]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["probe"] == {"input_size": 32, "size": 20, "num_classes": 4, "seed": 0,
                          "splits": ["cue-conflict", "shape-only", "texture-only"]}
    net = create_model("replknet_31b", weights=str(tiny_run / "model.safetensors"), num_classes=4, **TINY)
    again = probe(net, ProbeSpec(32, 20, 4, 0))["summary"]
    assert (s["shape_hits"], s["texture_hits"]) == (again["shape_hits"], again["texture_hits"])
    assert len((out / "decisions.csv").read_text().splitlines()) == 1 + 3 * 20
    assert (out / "shape_bias.png").is_file() and (out / "shape_bias.pdf").is_file()
    assert s["shape_bias_ci95"] is not None and s["chance_shape_or_texture"] == 0.5 and isinstance(s["warnings"], list)
    err = capsys.readouterr().err
    assert [line.strip() for line in err.splitlines() if "warning:" in line] == [f"warning: {w}" for w in s["warnings"]]
    assert main(["shape-bias", "--model", "replknet_31b", "--stimuli", "cue-world", "--out", str(tmp_path / "r")]) == 2
    assert "random weights means nothing" in capsys.readouterr().err


def test_cue_world_probe_of_a_model_that_learned_nothing_is_flagged():
    """A model answering class 0 for every image: the cue-world summary records the shape bias's 95 % interval and
    the warnings of the cue-conflict path (one class for every image, few decisions) plus single-cue accuracies at
    chance, as the Geirhos path flags its runs (before: a bare shape bias of 1.0 or 0.0)."""
    from erf_lab.shape_bias.analysis import wilson_interval
    from erf_lab.train.cue_world import class_names
    from erf_lab.train.probes import probe_warnings

    class Zero(nn.Module):
        def forward(self, x):
            out = torch.zeros(x.shape[0], 4)
            out[:, 0] = 1.0
            return out

    res = probe(Zero(), ProbeSpec(32, 40, 4, 0))
    s = res["summary"]
    flags = probe_warnings(res, class_names(4))
    hits = s["shape_hits"] + s["texture_hits"]
    assert flags["shape_bias_ci95"] == wilson_interval(s["shape_hits"], hits) and 0 < hits < 30
    name = class_names(4)[0]
    assert flags["warnings"][0] == f"degenerate run: 40 of 40 cue-conflict images (100%) are classified '{name}'"
    assert flags["warnings"][-1] == (
        f"shape-only and texture-only accuracies ({s['shape_only_accuracy']:.3f}, {s['texture_only_accuracy']:.3f}) "
        "are at chance (1/4): the model has learned neither cue, and its shape bias means nothing")
    assert any(w.startswith(f"shape bias from only {hits} shape-or-texture decisions") for w in flags["warnings"])


def test_shape_bias_of_weights_that_output_nan_is_refused(tiny_run, tmp_path, capsys):
    """All-NaN weights (a diverged run): one error line, exit 2, no summary (before: argmax(NaN) read as class 0
    and a shape bias reported)."""
    from safetensors.torch import load_file, save_file

    run = tmp_path / "nan_run"
    run.mkdir()
    shutil.copy(tiny_run / "run.json", run / "run.json")
    state = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
             for k, v in load_file(str(tiny_run / "model.safetensors")).items()}
    save_file(state, str(run / "model.safetensors"))
    out = tmp_path / "sb"
    assert main(["shape-bias", "--model", "replknet_31b", "--weights", str(run / "model.safetensors"),
                 "--stimuli", "cue-world", "--limit", "20", "--out", str(out)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert err == ["erf-lab shape-bias: error: the model's outputs are not finite (NaN or inf) on 20 of 20 cue-world "
                   "probe image(s) in a batch (the run stops at the first such batch): its weights compute nothing "
                   "usable (a diverged training run or a corrupt checkpoint?)"]
    assert not (out / "summary.json").exists()


def test_builtin_weights_resolve_with_their_overrides(tiny_run, tmp_path, monkeypatch):
    import erf_lab.paths

    root = tmp_path / "data"
    (root / "trained" / "cue-world").mkdir(parents=True)
    shutil.copy(tiny_run / "model.safetensors", root / "trained" / "cue-world" / "tiny.safetensors")
    (root / "trained" / "cue-world" / "tiny.json").write_text(json.dumps(
        {"model": "replknet_31b", "overrides": {k: list(v) for k, v in TINY.items()}, "num_classes": 4,
         "input_size": 32}))
    monkeypatch.setattr(erf_lab.paths, "data_dir", lambda: root)
    net = create_model("replknet_31b", weights="builtin:cue-world/tiny")
    ref = create_model("replknet_31b", weights=str(tiny_run / "model.safetensors"), num_classes=4, **TINY)
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(net.eval()(x), ref.eval()(x)) and net.large_kernel_sizes == (7, 7, 7, 3)
    with pytest.raises(ErfLabError, match="shipped: builtin:cue-world/tiny"):
        create_model("replknet_31b", weights="builtin:cue-world/nope")
    with pytest.raises(ErfLabError, match="no shipped weights"):
        create_model("replknet_31b", weights="builtin:../../etc/passwd")
    with pytest.raises(ErfLabError, match="weights of 'replknet_31b', not of 'replknet_3'"):
        create_model("replknet_3", weights="builtin:cue-world/tiny")


def test_cue_world_images_follow_the_world_they_are_of(tmp_path):
    """A run retrained with another seed into the same folder: its timeline must not measure the old world's
    images (the ERF cache keys on the images, so it would not notice)."""
    from PIL import Image

    from erf_lab.train.timeline import cue_world_images

    def pixels(folder):
        return [np.asarray(Image.open(p)) for p in sorted(folder.glob("val_*.png"))]

    folder = cue_world_images(tmp_path / "images", 3, 32, 4, seed=0)
    seed0 = pixels(folder)
    assert len(seed0) == 3 and json.loads((tmp_path / "images.json").read_text())["seed"] == 0
    stamp = (folder / "val_00000.png").stat().st_mtime_ns
    assert cue_world_images(folder, 3, 32, 4, seed=0) == folder  # the same world: nothing rendered again
    assert (folder / "val_00000.png").stat().st_mtime_ns == stamp
    cue_world_images(folder, 2, 32, 4, seed=1)
    seed1 = pixels(folder)
    fresh = pixels(cue_world_images(tmp_path / "fresh", 2, 32, 4, seed=1))
    assert len(seed1) == 2 and all(np.array_equal(a, b) for a, b in zip(seed1, fresh))
    assert not np.array_equal(seed1[0], seed0[0])
    cue_world_images(folder, 2, 32, 5, seed=1)  # another class count is another world too
    assert json.loads((tmp_path / "images.json").read_text())["num_classes"] == 5


def test_cue_world_images_are_written_under_a_hold_that_removes_a_killed_writes_leftovers(tmp_path):
    """``<folder>.json`` was written beside the folder without holding it: a write killed there left its temporary
    for good (the app's stored cue-world folders), and a second writer could write at once. Now the record and the
    folder are held: the temporaries a kill left go, other files stay, and a folder another process holds is
    refused."""
    pytest.importorskip("fcntl")
    from erf_lab.errors import FolderInUseError
    from erf_lab.train.timeline import cue_world_images

    folder = tmp_path / "images"
    folder.mkdir()
    killed = [tmp_path / ".images.json.k1lled00.tmp.json", folder / ".val_00000.png.k1lled00.tmp.png"]
    kept = [tmp_path / ".other.json.k1lled00.tmp.json", folder / "notes.txt"]
    for f in killed + kept:
        f.write_text("x")
    cue_world_images(folder, 2, 32, 4, seed=0)
    assert [f for f in killed if f.exists()] == [] and all(f.read_text() == "x" for f in kept)
    assert json.loads((tmp_path / "images.json").read_text())["seed"] == 0
    assert not (tmp_path / ".images.json.lock").exists()  # the hold's lock goes with it
    with held_by_another_process(folder), pytest.raises(FolderInUseError, match="is in use"):
        cue_world_images(folder, 3, 32, 4, seed=1)
    assert json.loads((tmp_path / "images.json").read_text())["seed"] == 0  # nothing written meanwhile
    # written whole, the images are read while another process holds them (two study --jobs workers measuring at
    # once: the second was refused, and the study stopped)
    with held_by_another_process(folder):
        assert cue_world_images(folder, 2, 32, 4, seed=0) == folder


def test_timeline_unknown_device_is_refused_before_any_folder_is_made(tiny_run, tmp_path, capsys):
    """--device tpu was refused only after the output folder and its cue-world images had been made."""
    out = tmp_path / "tl"
    assert main(["timeline", str(tiny_run), "--device", "tpu", "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "unknown device 'tpu'" in err and "Traceback" not in err, err
    assert not out.exists()


def test_timeline_rows_of_cached_erfs_come_from_erf_npy(tiny_run, tmp_path):
    """A cached checkpoint ERF whose metrics.json is damaged (a TypeError traceback before) or stale (its numbers
    were put in the timeline, not the saved map's) is read from its erf.npy."""
    from erf_lab.train.timeline import timeline

    out = tmp_path / "tl"
    kw = dict(num_images=2, probe_size=12, show_progress=False, formats=("png",), input_size=64, out=out)
    first = timeline(tiny_run, **kw)
    cached = sorted(out.glob("erf-64px/epoch_*/metrics.json"))
    cached[0].write_text('{"shape": [64')
    cached[1].write_text('{"shape": [64, 64], "high_contribution": [], "distribution": {"r_rms": 1234.0}}')
    again = timeline(tiny_run, **kw)
    assert again["measured"] == {"erf": 0, "probe": 0}
    assert again["rows"] == first["rows"]


def test_timeline_table_says_not_reached_for_area_ratios_not_reached(tiny_run, tmp_path, capsys):
    """At the training size (32 px: a 1 x 1 map centred on the corner pixel) no area ratio is reached; the table
    printed them as 'n/a' with no word on why, as if nothing had been measured."""
    assert main(["timeline", str(tiny_run), "--num-images", "1", "--probe-size", "12", "--formats", "png",
                 "--out", str(tmp_path / "tl"), "--quiet"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.split() and line.split()[0].isdigit()]
    assert rows and all(r[1:4] == ["n/r", "n/r", "n/r"] for r in rows), out
    assert "n/r: not reached" in out


def _figure_texts(fig) -> list[str]:
    import matplotlib.text

    return [t.get_text() for t in fig.findobj(matplotlib.text.Text) if t.get_text()]


def test_timeline_and_family_heatmaps_say_what_their_colours_are(tmp_path, monkeypatch, saved_figures):
    """The timeline's and the study's ERF strips had no colour bar: nothing said the colours are log10(A+1) over each
    map's own max (every other ERF figure says it). Both now carry the colour bar with its caption."""
    from erf_lab.train.study import StudySettings, plot_family
    from erf_lab.train.timeline import plot_timeline

    figs = saved_figures
    y, x = np.mgrid[:16, :16]
    erf = np.exp(-((y - 8) ** 2 + (x - 8) ** 2) / 10.0)
    rows = [{"epoch": e, "area@20%": 1.0 + e, "area@30%": 2.0, "area@50%": 5.0, "area@99%": 50.0, "r_rms": 5.0,
             "r50": 4.0, "shape_bias": 0.5, "val_acc": 0.1 * e} for e in range(3)]
    plot_timeline(rows, {e: erf * (e + 1) for e in range(3)}, tmp_path / "timeline", title="t")
    settings = StudySettings(erf_input_size=16)
    fam = []
    for k in (3, 7):
        (tmp_path / "erf-16px" / f"K{k}").mkdir(parents=True)
        np.save(tmp_path / "erf-16px" / f"K{k}" / "erf.npy", erf)
        fam.append({"name": f"K{k}", "kernel": k, "seed": 0, "area@50%": 5.0, "r_rms": 4.0, "shape_bias": 0.3,
                    "val_acc": 0.5})
    plot_family(tmp_path, fam, settings)
    assert len(figs) == 2
    for fig in figs:
        assert any(t.startswith("log10(A+1)/max") for t in _figure_texts(fig)), _figure_texts(fig)


def test_timeline_figure_marks_the_shape_bias_of_untrained_checkpoints(tmp_path, monkeypatch, saved_figures):
    """The table marks the shape bias of epoch 0 and of checkpoints at chance with † (it means nothing there); the
    figure drew those points like any other, so the figure alone showed a random network's 0.5 as a result. They are
    drawn hollow now, with a legend entry that says so; a timeline without such rows has none."""
    from erf_lab.train.timeline import plot_timeline

    figs = saved_figures
    erf = np.ones((8, 8))
    rows = [{"epoch": e, "r_rms": 5.0, "r50": 4.0, "shape_bias": sb, "val_acc": acc, "untrained": bad}
            for e, sb, acc, bad in ((0, 0.6, None, True), (1, 0.55, 0.1, True), (2, 0.3, 0.6, False))]
    plot_timeline(rows, {0: erf}, tmp_path / "t")
    plot_timeline([dict(r, untrained=False) for r in rows[2:]], {2: erf}, tmp_path / "u")
    import matplotlib.axes

    axes = {id(ax): ax for ax in figs[0].findobj(matplotlib.axes.Axes)}.values()
    marked = [line for ax in axes for line in ax.get_lines() if "untrained" in line.get_label()]
    assert len(marked) == 1 and list(marked[0].get_xdata()) == [0, 1] and list(marked[0].get_ydata()) == [0.6, 0.55]
    assert marked[0].get_markerfacecolor() == "white"
    assert not any("untrained" in t for t in _figure_texts(figs[1]))


def test_family_figure_marks_the_shape_bias_of_models_at_chance(tmp_path, monkeypatch, saved_figures):
    """results.md marks the shape bias of a model whose val accuracy is at chance with † (it means nothing); the
    study's figure plotted it like the others. It is drawn hollow now, named in a legend."""
    import matplotlib.axes

    from erf_lab.train.study import StudySettings, plot_family

    figs = saved_figures
    fam = []
    for k, chance in ((3, False), (7, True)):
        (tmp_path / "erf-16px" / f"K{k}").mkdir(parents=True)
        np.save(tmp_path / "erf-16px" / f"K{k}" / "erf.npy", np.ones((16, 16)))
        fam.append({"name": f"K{k}", "kernel": k, "seed": 0, "area@50%": 5.0, "r_rms": 4.0, "shape_bias": 0.2 + k / 10,
                    "val_acc": 0.1 if chance else 0.7, "at_chance": chance})
    plot_family(tmp_path, fam, StudySettings(erf_input_size=16))
    plot_family(tmp_path, [dict(r, at_chance=False) for r in fam], StudySettings(erf_input_size=16))
    marked = [[line for ax in {id(a): a for a in fig.findobj(matplotlib.axes.Axes)}.values()
               for line in ax.get_lines() if "at chance" in line.get_label()] for fig in figs]
    assert len(marked[0]) == 1 and list(marked[0][0].get_xdata()) == [7]
    assert list(marked[0][0].get_ydata()) == [pytest.approx(0.9)] and marked[1] == []


def test_timeline_and_family_figures_fit_a_page_and_keep_legends_off_the_data(tmp_path, monkeypatch, saved_figures):
    """The timeline and the study's family figure were 9-11 in wide (their 7 pt legends printed at 4 pt in a paper's
    6.875 in), their legends sat inside the panels over the curves (the † entry over the shape-bias points and its
    tick labels) and the third timeline panel had no y label. Both are now a page wide in no text under 6 pt, with
    no legend over a panel, and every panel says what it plots."""
    import matplotlib.axes
    import matplotlib.legend
    import matplotlib.text

    from erf_lab.train.study import StudySettings, plot_family
    from erf_lab.train.timeline import plot_timeline

    figs = saved_figures
    erf = np.ones((16, 16))
    rows = [{"epoch": e, "area@20%": 1.0 + e, "area@30%": 2.0 + e, "area@50%": 5.0 + e, "area@99%": 50.0, "r_rms": 5.0,
             "r50": 4.0, "shape_bias": 0.5, "val_acc": 0.1 * e, "shape_only_accuracy": 0.3,
             "texture_only_accuracy": 0.4, "untrained": e == 0} for e in range(12)]
    plot_timeline(rows, {e: erf for e in range(12)}, tmp_path / "timeline", title="replknet_31b, seed 0")
    fam = []
    for k in (3, 7, 13, 31):
        (tmp_path / "erf-16px" / f"K{k}").mkdir(parents=True)
        np.save(tmp_path / "erf-16px" / f"K{k}" / "erf.npy", erf)
        fam.append({"name": f"K{k}", "kernel": k, "seed": 0, "area@50%": 5.0, "r_rms": 4.0, "shape_bias": 0.2 + k / 50,
                    "val_acc": 0.5, "at_chance": k == 31})
    plot_family(tmp_path, fam, StudySettings(erf_input_size=16))
    assert len(figs) == 2
    for fig in figs:
        assert fig.get_size_inches()[0] <= 7.0, fig.get_size_inches()
        fig.draw_without_rendering()
        texts = [t for t in fig.findobj(matplotlib.text.Text) if t.get_visible() and t.get_text().strip()]
        assert min(t.get_fontsize() for t in texts) >= 6.0
        axes = [ax for ax in {id(a): a for a in fig.findobj(matplotlib.axes.Axes)}.values() if ax.lines]
        legends = list(fig.findobj(matplotlib.legend.Legend))
        assert legends and axes
        for legend in legends:
            for ax in axes:
                assert not legend.get_window_extent().overlaps(ax.get_window_extent()), legend.get_texts()[0]
        assert all(ax.get_ylabel() for ax in axes)
    # the area ratios' log axis in plain percentages (matplotlib's default labelled them 10^0, 2x10^1)
    area = next(ax for ax in figs[0].findobj(matplotlib.axes.Axes) if ax.get_ylabel() == "area ratio (%)")
    labels = [t for t in area.get_yticklabels() + area.get_yticklabels(minor=True) if t.get_text()]
    assert labels and all(t.get_text() == f"{t.get_position()[1]:g}" for t in labels), [t.get_text() for t in labels]
    assert any(t.get_text() == "† at chance: means nothing" for t in figs[1].findobj(matplotlib.text.Text))


def test_the_probes_of_a_run_with_an_ema_say_which_weights_they_measured(tiny_run, tmp_path, capsys):
    """A run trained with --ema keeps two sets of weights; the timeline and shape-bias of model.safetensors measured
    the raw ones without a word of it. They now record which (``weights_kind``) and say where the EMA ones are;
    --weights RUN/model_ema.safetensors measures those (recorded as "ema")."""
    from erf_lab.checkpoint import training_weights

    torch.set_num_threads(1)
    run = tmp_path / "ema-run"
    train("replknet_31b", "cue-world", out=run, overrides=TINY, show_progress=False, input_size=32, train_size=16,
          val_size=8, num_classes=4, recipe=Recipe(epochs=1, batch_size=8, warmup_epochs=0, ema=0.5))
    sb = ["shape-bias", "--model", "replknet_31b", "--stimuli", "cue-world", "--limit", "8"]
    assert main([*sb, "--weights", str(run / "model.safetensors"), "--out", str(tmp_path / "raw")]) == 0
    raw = json.loads((tmp_path / "raw" / "summary.json").read_text())
    assert (raw["weights_kind"], raw["ema_decay"]) == ("raw", 0.5) and "model_ema.safetensors" in raw["weights_note"]
    assert f"note: {raw['weights_note']}" in capsys.readouterr().out
    assert json.loads((tmp_path / "raw" / "run.json").read_text())["weights_kind"] == "raw"
    assert main([*sb, "--weights", str(run / "model_ema.safetensors"), "--out", str(tmp_path / "ema")]) == 0
    ema = json.loads((tmp_path / "ema" / "summary.json").read_text())
    assert (ema["weights_kind"], ema["weights_note"]) == ("ema", None) and "note:" not in capsys.readouterr().out
    net = create_model("replknet_31b", weights=str(run / "model_ema.safetensors"), num_classes=4, **TINY)
    again = probe(net, ProbeSpec(32, 8, 4, 0))["summary"]
    assert (ema["shape_hits"], ema["texture_hits"]) == (again["shape_hits"], again["texture_hits"])
    assert training_weights(tiny_run / "model.safetensors") == {"weights_kind": "raw", "ema_decay": None,
                                                                 "weights_note": None}  # no EMA kept: nothing to say
    assert main(["timeline", str(run), "--num-images", "1", "--probe-size", "4", "--formats", "png", "--quiet"]) == 0
    record = json.loads((run / "timeline" / "timeline.json").read_text())
    assert record["weights_kind"] == "raw" and record["ema_decay"] == 0.5
    assert "raw training weights" in record["weights_note"] and "model_ema.safetensors" in record["weights_note"]
    assert f"note: {record['weights_note']}" in capsys.readouterr().out


def test_a_timeline_in_another_format_leaves_no_earlier_figure(tiny_run, tmp_path):
    """A timeline drawn again with --formats svg (after more epochs, say) left the earlier timeline.png / .pdf
    beside it: a figure of fewer checkpoints under the folder's name. The formats not drawn now are removed."""
    from erf_lab.train.timeline import timeline

    out = tmp_path / "tl"
    kw = dict(num_images=1, probe_size=8, show_progress=False, input_size=64, out=out)
    timeline(tiny_run, formats=("png", "pdf"), **kw)
    assert (out / "timeline.png").is_file() and (out / "timeline.pdf").is_file()
    (out / "notes.png").write_text("mine")
    timeline(tiny_run, formats=("svg",), **kw)
    assert sorted(p.name for p in out.glob("*.*") if p.suffix in (".png", ".pdf", ".svg")) == ["notes.png",
                                                                                               "timeline.svg"]


def test_timeline_and_cue_world_probe_hold_their_folders(tiny_run, tmp_path, capsys):
    """The same timeline in two shells (or the app beside a shell) measured and wrote the same caches, rows and
    figure at once; so did two cue-world probes into one --out. Both now hold their folder: the second gets one
    line, exit 2, and writes nothing; once the first is done the same command runs."""
    tl, sb = tmp_path / "tl", tmp_path / "sb"
    commands = {tl: ["timeline", str(tiny_run), "--num-images", "2", "--probe-size", "12", "--formats", "png",
                     "--quiet", "--out", str(tl)],
                sb: ["shape-bias", "--model", "replknet_31b", "--weights", str(tiny_run / "model.safetensors"),
                     "--stimuli", "cue-world", "--limit", "12", "--out", str(sb)]}
    for out, argv in commands.items():
        out.mkdir()
        capsys.readouterr()
        with held_by_another_process(out):
            assert main(argv) == 2
        lines = [s for s in capsys.readouterr().err.replace("\r", "\n").splitlines() if s.strip()]
        assert lines == [f"erf-lab {argv[0]}: error: --out {out} is in use: another erf-lab process is writing a run "
                         "there now; wait for it to end (or stop it) and run the command again, or choose another "
                         "--out"], lines
        assert list(out.iterdir()) == []
        assert main(argv) == 0, capsys.readouterr().err
    record = json.loads((tl / "timeline.json").read_text())
    assert record["complete"] is True and [r["epoch"] for r in record["rows"]] == [0, 1, 2]
    summary = json.loads((sb / "summary.json").read_text())
    net = create_model("replknet_31b", weights=str(tiny_run / "model.safetensors"), num_classes=4, **TINY)
    again = probe(net, ProbeSpec(32, 12, 4, 0))["summary"]
    assert (summary["shape_hits"], summary["texture_hits"]) == (again["shape_hits"], again["texture_hits"])


def test_timeline_of_the_ema_weights(tiny_run, tmp_path, capsys):
    """A run trained with --ema kept the EMA per epoch only inside the .pth files (none in a safetensors-only run),
    and the timeline could measure the raw weights alone. Each epoch's EMA is now saved as
    epoch_NNN_ema.safetensors, and ``timeline --ema`` measures it (epoch 0: the initialisation, where the EMA
    starts); a run of an earlier erf-lab is read from its .pth files, with the same numbers."""
    from erf_lab.checkpoint import training_weights
    from erf_lab.train.loop import _format_on_disk
    from erf_lab.train.timeline import timeline

    torch.set_num_threads(1)
    run = tmp_path / "ema-run"
    train("replknet_31b", "cue-world", out=run, overrides=TINY, show_progress=False, input_size=32, train_size=16,
          val_size=8, num_classes=4, recipe=Recipe(epochs=2, batch_size=8, warmup_epochs=0, ema=0.5),
          checkpoint_format="pth")
    ckpt = run / "checkpoints"
    assert sorted(p.name for p in ckpt.glob("*_ema.*")) == ["epoch_001_ema.safetensors", "epoch_002_ema.safetensors"]
    assert _format_on_disk(run) == "pth"  # the EMA's files are not taken for the weights' format
    from safetensors.torch import load_file

    for epoch in (1, 2):
        saved = load_file(ckpt / f"epoch_{epoch:03d}_ema.safetensors")
        pth = torch.load(ckpt / f"epoch_{epoch:03d}.pth", map_location="cpu", weights_only=True)
        assert saved.keys() == pth["model_ema"].keys()
        assert all(torch.equal(saved[k], pth["model_ema"][k]) for k in saved)
        assert any(not torch.equal(saved[k], pth["model"][k]) for k in saved)  # not the raw weights
    assert training_weights(ckpt / "epoch_001_ema.safetensors")["weights_kind"] == "ema"
    assert training_weights(ckpt / "epoch_001.pth")["weights_kind"] == "raw"

    kw = dict(num_images=1, probe_size=8, show_progress=False, formats=("png",), input_size=64)
    ema = timeline(run, ema=True, **kw)
    assert ema["out_dir"] == run / "timeline-ema" and ema["measured"] == {"erf": 3, "probe": 3}
    assert [r["checkpoint"] for r in ema["rows"]] == ["checkpoints/epoch_000.pth",
                                                      "checkpoints/epoch_001_ema.safetensors",
                                                      "checkpoints/epoch_002_ema.safetensors"]
    record = json.loads((run / "timeline-ema" / "timeline.json").read_text())
    assert record["weights_kind"] == "ema" and record["ema_decay"] == 0.5 and "EMA of the weights" in record[
        "weights_note"]
    raw = timeline(run, **kw)
    assert raw["out_dir"] == run / "timeline" and raw["rows"][0]["r_rms"] == ema["rows"][0]["r_rms"]  # the init
    assert [r["r_rms"] for r in raw["rows"][1:]] != [r["r_rms"] for r in ema["rows"][1:]]
    assert "timeline --ema" in raw["weights_note"]

    # a run of an earlier erf-lab: the EMA inside the .pth files only
    aside = tmp_path / "aside"
    aside.mkdir()
    for p in ckpt.glob("*_ema.safetensors"):
        shutil.move(p, aside / p.name)
    old = timeline(run, ema=True, out=tmp_path / "from-pth", **kw)
    assert old["measured"] == {"erf": 3, "probe": 3}
    assert [r["checkpoint"] for r in old["rows"]] == [f"checkpoints/epoch_00{e}.pth" for e in range(3)]
    assert [{k: v for k, v in r.items() if k != "checkpoint"} for r in old["rows"]] == \
        [{k: v for k, v in r.items() if k != "checkpoint"} for r in ema["rows"]]

    # bad input: one line, exit 2, nothing written
    def refused(args, message):
        capsys.readouterr()
        assert main(["timeline", *args, "--num-images", "1", "--probe-size", "8", "--quiet"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err

    refused([str(run), "--ema", "--out", str(run / "timeline")], "holds the timeline of the raw weights")
    refused([str(run), "--out", str(run / "timeline-ema")], "holds the timeline of the EMA of the weights")
    refused([str(tiny_run), "--ema", "--out", str(tmp_path / "none")], "was trained without an EMA of its weights")
    sd = torch.load(ckpt / "epoch_002.pth", map_location="cpu", weights_only=True)
    torch.save({"model": sd["model"]}, ckpt / "epoch_002.pth")  # as a safetensors-only run keeps no EMA
    refused([str(run), "--ema", "--out", str(tmp_path / "none")], "no EMA weights for epoch(s) 2")
    assert not (tmp_path / "none").exists()


def test_a_stopped_timeline_says_what_it_keeps_and_how_to_go_on(tiny_run, tmp_path, capsys, monkeypatch):
    """User test: Ctrl-C in 'erf-lab timeline' said only 'interrupted' (compute and train say where their progress
    is); it now says how many checkpoints are kept and where, and the same command measures only the rest."""
    from erf_lab.train import timeline as T

    real, calls = T.measure_checkpoint, []

    def stopped_at_the_second(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **kw)

    out = tmp_path / "tl"
    argv = ["timeline", str(tiny_run), "--num-images", "2", "--probe-size", "12", "--input-size", "64", "--formats",
            "png", "--quiet", "--out", str(out)]
    monkeypatch.setattr(T, "measure_checkpoint", stopped_at_the_second)
    assert main(argv) == 130
    assert capsys.readouterr().err.splitlines() == [
        f"stopped after 1 of 3 checkpoints: those are kept in {out}; the same command measures the rest",
        "erf-lab timeline: interrupted"]
    assert json.loads((out / "timeline.json").read_text())["complete"] is False
    monkeypatch.setattr(T, "measure_checkpoint", real)
    assert main(argv) == 0
    said = capsys.readouterr().out
    assert "measured 2 ERF(s) and 2 probe(s) of 3 checkpoint(s); the rest came from the cache" in said


_KILL_OPTS = ["--num-images", "2", "--probe-size", "12", "--input-size", "64", "--formats", "png", "--quiet"]


@pytest.fixture(scope="module")
def whole_timeline(tiny_run, tmp_path_factory):
    """The timeline of ``tiny_run`` with :data:`_KILL_OPTS`, never stopped."""
    out = tmp_path_factory.mktemp("whole") / "timeline"
    assert main(["timeline", str(tiny_run), *_KILL_OPTS, "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("killed_at, measured", [("epoch_001.json", "1 ERF(s) and 2 probe(s)"),
                                                 ("timeline.png", "0 ERF(s) and 0 probe(s)")])
def test_a_timeline_killed_while_it_writes_leaves_nothing_behind(tiny_run, whole_timeline, tmp_path, capsys,
                                                                 killed_at, measured):
    """'erf-lab timeline' SIGKILLed in the middle of a write (epoch 1's probe cache; the figure, once every
    checkpoint was measured) and run again: only what was not finished is measured again, no temporary file or lock
    of its writes is left, its table, figure and caches are those of a timeline never stopped, and the training
    run it measured (the folder it writes into) keeps every file as it was."""
    from conftest import killed_at_write, write_leftovers
    from erf_lab.io import sha256_file

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    before = {p: sha256_file(p) for p in run.rglob("*") if p.is_file()}
    killed_at_write(f"from erf_lab.cli.main import main\nmain({['timeline', str(run), *_KILL_OPTS]!r})",
                    killed_at)
    out = run / "timeline"
    assert json.loads((out / "timeline.json").read_text())["complete"] is False
    assert [p.name for p in out.rglob(f".{killed_at}.*")] and not list(out.rglob(killed_at))  # killed mid-write
    capsys.readouterr()
    assert main(["timeline", str(run), *_KILL_OPTS]) == 0
    assert f"measured {measured} of 3 checkpoint(s)" in capsys.readouterr().out
    assert write_leftovers(run) == []
    assert {p: sha256_file(p) for p in before} == before

    def files(folder):
        return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())

    assert files(out) == files(whole_timeline)
    assert json.loads((out / "timeline.json").read_text())["complete"] is True
    assert json.loads((out / "timeline.json").read_text())["rows"] == json.loads(
        (whole_timeline / "timeline.json").read_text())["rows"]
    for name in files(whole_timeline):
        if name.endswith((".csv", ".png", ".npy")) or name.startswith("probe-"):
            assert (out / name).read_bytes() == (whole_timeline / name).read_bytes(), name

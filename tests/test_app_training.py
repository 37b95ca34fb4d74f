"""The app's Training page: the shipped timeline and the timeline of a user's run, through AppTest."""
from __future__ import annotations

import json
import shlex
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from streamlit.testing.v1 import AppTest

from erf_lab.paths import data_dir
from erf_lab.train.loop import train
from erf_lab.train.recipe import Recipe

APP = Path(__file__).resolve().parents[1] / "app" / "main.py"
TINY = {"channels": (8, 8, 16, 16), "layers": (1, 1, 1, 1), "large_kernel_sizes": (7, 7, 7, 3)}


def _page() -> AppTest:
    at = AppTest.from_file(str(APP), default_timeout=240).run()
    at.switch_page("views/training.py").run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def test_training_page_shows_the_shipped_timeline(app_env):
    at = _page()
    shipped = sorted((data_dir() / "trained" / "cue-world" / "timeline").glob("*/timeline.json"))
    assert shipped, "no shipped timeline"
    rows = json.loads(shipped[0].read_text())["rows"]
    table = at.dataframe[0].value
    assert list(table["epoch"]) == [r["epoch"] for r in rows] and rows[0]["epoch"] == 0
    assert list(table["shape_bias"]) == pytest.approx([r["shape_bias"] for r in rows], nan_ok=True)
    # the initialisation and the at-chance epoch 1 are marked: their shape bias means nothing
    assert list(table["untrained"][:3]) == [True, True, False]
    assert any("has not learned the task" in c.value for c in at.caption)
    assert not at.error
    labels = {b.proto.label for b in at.get("download_button")}
    assert {"timeline.png", "timeline.pdf"} <= labels, labels
    # the kernel-family figure and tables are downloadable too (family.pdf where the shipped study has it)
    shipped = data_dir() / "trained" / "cue-world"
    assert {"family.png", "family.csv", "results.md"} <= labels, labels
    assert ("family.pdf" in labels) == (shipped / "family.pdf").is_file()


def test_training_page_measures_a_users_run_and_refuses_a_non_run(app_env, monkeypatch):
    """Also: measuring a timeline (an ERF and the probes per checkpoint: minutes for a long run) showed only a
    spinner; the page shows a progress bar that moves per checkpoint ('checkpoint 1 of 2 measured', ...)."""
    from streamlit.delta_generator import DeltaGenerator

    texts, real = [], DeltaGenerator.progress

    def spy(self, value, text=None, **kw):
        texts.append((value, text))
        return real(self, value, text=text, **kw)

    monkeypatch.setattr(DeltaGenerator, "progress", spy)
    torch.set_num_threads(1)
    run, at = _tiny_run_on_the_page(app_env)
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert any("Measure the timeline" in i.value for i in at.info)  # measured on a click only
    at.button(key="tr-measure").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert not (run / "timeline").exists()  # the user's run folder is only read; the app writes to its run area
    csv_rows = next((app_env / "app-runs").glob("timeline-*/timeline.csv")).read_text().splitlines()
    assert len(csv_rows) == 3  # header, epoch 0, epoch 1
    shown = [df.value for df in at.dataframe if "area@50%" in df.value.columns][-1]
    assert list(shown["epoch"]) == [0, 1]
    assert any("measured 2 ERF(s) and 2 probe(s)" in c.value for c in at.caption)
    assert [(v, t) for v, t in texts if t and t.startswith("checkpoint ")] == [
        (0.5, "checkpoint 1 of 2 measured"), (1.0, "checkpoint 2 of 2 measured")], texts
    (app_env / "empty").mkdir()
    at.text_input(key="tr-run").input(str(app_env / "empty")).run()
    assert any("not an erf-lab training run" in e.value for e in at.error)


def test_training_page_refuses_a_run_not_on_cue_world_before_the_button(app_env):
    """A run trained on an image folder has no cue-world probe: it was asked to press 'Measure the timeline' and
    refused only then; it is refused at once, in one line naming the command that measures its checkpoints' ERFs,
    with no button."""
    torch.set_num_threads(1)
    run = app_env / "run"
    train("replknet_31b", "cue-world", out=run, overrides=TINY, show_progress=False, input_size=32, train_size=16,
          val_size=8, num_classes=4, recipe=Recipe(epochs=1, batch_size=8, warmup_epochs=0.5))
    info = json.loads((run / "run.json").read_text())
    info["settings"]["data"] = str(app_env / "images")
    (run / "run.json").write_text(json.dumps(info))
    at = _page()
    at.text_input(key="tr-run").input(str(run)).run()
    assert not at.exception
    # and the way on: the erf-lab compute command of its last checkpoint, the model as it was trained
    weights, images = shlex.quote(str(run / "checkpoints" / "epoch_001.safetensors")), shlex.quote(
        str(app_env / "images" / "val"))
    assert [e.value for e in at.error] == [
        f"Timeline: {run}: the timeline's shape-bias probe needs a cue-world run (this one: {app_env / 'images'}); "
        "measure the ERF of its checkpoints one at a time instead, e.g. epoch 1's: erf-lab compute --model "
        "replknet_31b --override 'channels=(8,8,16,16)' --override 'layers=(1,1,1,1)' --override "
        f"'large_kernel_sizes=(7,7,7,3)' --override num_classes=4 --weights {weights} --images {images} "
        "--input-size 32"], [e.value for e in at.error]
    assert not [b for b in at.button if b.key == "tr-measure"]


def test_training_page_marks_an_area_not_reached(app_env, monkeypatch):
    """A timeline row whose area threshold is not reached inside the image (None in timeline.json; the CLI prints
    n/r) was shown as 'None' in the page's table; it is 'n/r' now, explained, as on the other pages."""
    import erf_lab.train.timeline as tl

    def fake_timeline(run, *, out, **kw):
        out.mkdir(parents=True, exist_ok=True)
        rows = [{"epoch": 0, "area@20%": 5.0, "area@99%": None, "r_rms": 20.0, "shape_bias": 0.5, "untrained": True}]
        (out / "timeline.json").write_text(json.dumps({"model": "m", "erf_input_size": 96, "num_images": 1,
                                                       "train_input_size": 64, "rows": rows}))
        return {"rows": rows, "out_dir": out, "measured": {"erf": 1, "probe": 1}}

    monkeypatch.setattr(tl, "cue_world_run", lambda run: SimpleNamespace(settings={}))  # a run without an EMA
    monkeypatch.setattr(tl, "timeline", fake_timeline)
    (app_env / "run").mkdir()
    at = _page()
    at.text_input(key="tr-run").input(str(app_env / "run")).run()
    at.button(key="tr-measure").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    shown = [df.value for df in at.dataframe if "area@99%" in df.value.columns][-1]
    assert list(shown["area@99%"]) == ["n/r"] and float(shown["area@20%"][0]) == 5.0
    assert any(c.value.startswith("n/r: ") for c in at.caption)


def test_training_page_sends_a_column_of_numbers_and_n_r_as_text(app_env, monkeypatch):
    """A timeline whose area@99% is reached at one epoch and not at the next (n/r) made a column of floats and text:
    Streamlit could not serialise it to Arrow, logged a traceback on every render and converted it itself (96.8994140625
    shown whole); the column is now text, numbers as the explorer and Results page show them."""
    import logging

    import erf_lab.train.timeline as tl

    def fake_timeline(run, *, out, **kw):
        out.mkdir(parents=True, exist_ok=True)
        rows = [{"epoch": 0, "area@20%": 5.0, "area@99%": 96.8994140625, "r_rms": 20.0, "untrained": True},
                {"epoch": 1, "area@20%": 6.0, "area@99%": None, "r_rms": 23.5, "untrained": True}]
        (out / "timeline.json").write_text(json.dumps({"model": "m", "erf_input_size": 96, "num_images": 1,
                                                       "train_input_size": 64, "rows": rows}))
        return {"rows": rows, "out_dir": out, "measured": {"erf": 2, "probe": 2}}

    monkeypatch.setattr(tl, "cue_world_run", lambda run: SimpleNamespace(settings={}))
    monkeypatch.setattr(tl, "timeline", fake_timeline)
    (app_env / "run").mkdir()
    logged = []
    handler = logging.Handler()
    handler.emit = lambda record: logged.append(record.getMessage())
    log = logging.getLogger("streamlit.dataframe_util")
    log.addHandler(handler)
    try:
        at = _page()
        at.text_input(key="tr-run").input(str(app_env / "run")).run()
        at.button(key="tr-measure").click().run()
    finally:
        log.removeHandler(handler)
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert not [m for m in logged if "Arrow" in m], logged
    shown = [df.value for df in at.dataframe if "area@99%" in df.value.columns][-1]
    assert list(shown["area@99%"]) == ["96.9", "n/r"] and list(shown["r_rms"]) == [20.0, 23.5]


def _tiny_run_on_the_page(app_env, ema: float = 0.0):
    """A one-epoch tiny training run, and the Training page with it entered (1 ERF image, 10 probe images)."""
    run = app_env / "run"
    train("replknet_31b", "cue-world", out=run, overrides=TINY, show_progress=False, input_size=32, train_size=16,
          val_size=8, num_classes=4, recipe=Recipe(epochs=1, batch_size=8, warmup_epochs=0.5, ema=ema))
    at = _page()
    at.number_input(key="tr-nimg").set_value(1)
    at.number_input(key="tr-probe").set_value(10)
    at.text_input(key="tr-run").input(str(run)).run()
    return run, at


def test_training_page_says_when_the_timeline_folder_is_in_use(app_env):
    """The timeline of a run measured by the app while another erf-lab process writes into the same folder (a second
    app server, 'erf-lab timeline' into the app's run area) is refused with one readable error, not a traceback, and
    the folder is left as it was; once that process is done, the same button measures again. The error is said in
    the app's terms: it repeated the CLI's line ("--out ... or choose another --out"), an option the app has not."""
    from conftest import held_by_another_process

    torch.set_num_threads(1)
    run, at = _tiny_run_on_the_page(app_env)
    at.button(key="tr-measure").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    out = next((app_env / "app-runs").glob("timeline-*"))
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with held_by_another_process(out):
        at.button(key="tr-measure").click().run()
    assert not at.exception
    assert [e.value for e in at.error] == [f"Timeline: the output folder {out} is in use: another erf-lab process is "
                                           "writing a run there now; wait for it to end (or stop it) and try again"], \
        [e.value for e in at.error]
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    at.button(key="tr-measure").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert any("measured 0 ERF(s) and 0 probe(s)" in c.value for c in at.caption)


def test_training_page_measures_the_ema_of_a_run_that_kept_one(app_env):
    """The timeline of a run trained with --ema: the page offers the EMA of the weights (timeline --ema), measured
    into its own folder, and says which weights it measured; a run without an EMA shows no such choice."""
    torch.set_num_threads(1)
    run, at = _tiny_run_on_the_page(app_env, ema=0.5)
    assert not at.exception and not at.error, [e.value for e in at.error]
    box = at.checkbox(key="tr-ema")
    assert "decay 0.5" in box.label and box.value is False
    box.check().run()
    at.button(key="tr-measure").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    folder = next((app_env / "app-runs").glob("timeline-*-ema"))
    record = json.loads((folder / "timeline.json").read_text())
    assert record["weights_kind"] == "ema" and record["complete"] is True
    assert [r["checkpoint"] for r in record["rows"]] == ["checkpoints/epoch_000.safetensors",
                                                         "checkpoints/epoch_001_ema.safetensors"]
    assert any(c.value.endswith("--num-images 20 --ema") for c in at.code), [c.value for c in at.code]
    plain = app_env / "plain-run"
    train("replknet_31b", "cue-world", out=plain, overrides=TINY, show_progress=False, input_size=32, train_size=16,
          val_size=8, num_classes=4, recipe=Recipe(epochs=1, batch_size=8, warmup_epochs=0.5))
    at.text_input(key="tr-run").input(str(plain)).run()
    assert not at.exception and not [b for b in at.checkbox if b.key == "tr-ema"]

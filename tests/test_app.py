"""Streamlit app (app/main.py): every page through AppTest, the input policy, and the 127.0.0.1 default.

The landing page must render an ERF without any click; numbers shown are checked against the library.
"""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import stop_process
from streamlit.testing.v1 import AppTest

from app import models, safety
from erf_lab.errors import ErfLabError

REPO_ROOT = Path(__file__).resolve().parents[1]
APP = REPO_ROOT / "app" / "main.py"


def new_app() -> AppTest:
    return AppTest.from_file(str(APP), default_timeout=240)


def ok(at: AppTest) -> AppTest:
    assert not at.exception, [e.value for e in at.exception]
    return at


def metric(at: AppTest, label: str, index: int = 0) -> str:
    vals = [m.value for m in at.metric if m.label == label]
    assert len(vals) > index, f"metric {label!r} not shown; have {[m.label for m in at.metric]}"
    return vals[index]


def errors(at: AppTest) -> list[str]:
    return [e.value for e in at.error]


# ------------------------------------------------------------------------------------------- ERF explorer
def test_landing_page_renders_default_erf_without_click(app_env):
    """First load shows the shipped trained K = 3 and K = 31 models side by side on cue-world val images at 128 px;
    the shown r_rms / area@50% equal the library's own values, and the K = 31 map is the wider one."""
    at = ok(new_app().run())
    assert not errors(at), errors(at)
    assert len(at.image) >= 1  # the ERF figure (PNG rendered by erf_lab.erf.plotting.plot_comparison)
    table = at.dataframe[0].value
    assert list(table["configuration"]) == ["K3-seed0 · trained (cue-world) · re-param",
                                            "K31-seed0 · trained (cue-world) · re-param"]
    assert any("erf-lab compute --model replknet_3" in c.value and "--weights builtin:cue-world/K3-seed0" in c.value
               for c in at.code)
    # K = 31's map does not hold 99 % inside any centred square of the 128 px image: marked n/r (not reached) as
    # `erf-lab compare` writes it, not an unexplained NaN / None
    assert list(table["area@99%"])[1] == "n/r" and float(table["area@99%"][0]) > 90
    assert list(table["side@99%"])[1] == "n/r"
    shown = [(float(metric(at, "r_rms (px)", i)), float(metric(at, "Area @50%", i).rstrip("%"))) for i in (0, 1)]
    assert shown[1][0] > shown[0][0] + 1.0 and shown[1][1] > shown[0][1] + 3.0, shown  # K = 31 sees further

    # The same measurement straight from the library (shipped weights, first 4 cue-world val images, 128 px).
    from erf_lab.erf.compute import compute_erf
    from erf_lab.erf.images import load_images
    from erf_lab.erf.metrics import compute_metrics, summary
    from erf_lab.models import create_model
    from erf_lab.train.timeline import cue_world_images

    folder = cue_world_images(app_env / "cue-val", 4, 128, 10, 0)
    for (r_shown, a50), (model, name) in zip(shown, [("replknet_3", "K3-seed0"), ("replknet_31b", "K31-seed0")]):
        net = create_model(model, weights=f"builtin:cue-world/{name}").eval()
        s = summary(compute_metrics(compute_erf(net, load_images(str(folder), num_images=4, input_size=128),
                                                show_progress=False).erf))
        assert r_shown == pytest.approx(s["r_rms"], abs=0.051), name
        assert a50 == pytest.approx(s["area@50%"], abs=0.051), name


def test_explorer_says_when_the_theoretical_rf_exceeds_the_image(app_env):
    """The landing page showed 'ERF / TRF 0.08' for K = 31 beside 0.45 for K = 3 with no word that both theoretical
    RFs (1211 and 187 px) are wider than the 128 px image, where the ratio is bounded by the input size (the
    metrics' flag theoretical_rf_exceeds_map; sweep.md says it); now each such ratio says so, and one of a layer
    whose theoretical RF fits the image does not (the growth page: test_growth_page_says_when_...)."""
    from erf_lab.erf.metrics import TRF_EXCEEDS_MAP_NOTE

    def notes():
        return [c.value for c in at.caption if c.value.startswith("ERF / TRF:")]

    at = ok(new_app().run())
    assert not errors(at), errors(at)
    assert notes() == [f"ERF / TRF: the theoretical RF ({trf} px) is wider than the 128 px image; "
                       f"{TRF_EXCEEDS_MAP_NOTE}." for trf in (187, 1211)], notes()
    at.selectbox(key="erf-layer-0").set_value("stages.1").run()  # K = 3 up to stage 2: theoretical RF 43 px
    ok(at)
    assert not errors(at), errors(at)
    assert any("layer `stages.1` · theoretical RF 43 px" in c.value for c in at.caption)
    assert float(metric(at, "ERF / TRF", 0)) > 0 and notes() == [
        f"ERF / TRF: the theoretical RF (1211 px) is wider than the 128 px image; {TRF_EXCEEDS_MAP_NOTE}."], notes()


def test_explorer_says_a_global_theoretical_rf(app_env):
    """UniRepLKNet's squeeze-and-excitation blocks pool the whole map, so every input pixel reaches the layers after
    the first one: the page said 'theoretical RF n/a px' and 'ERF / TRF n/a' with no word why; now it names the RF
    global, with its kernels' RF, as `erf-lab layers` and compute's header do."""
    at = ok(new_app().run())
    at.radio(key="erf-init-0").set_value("random").run()
    at.selectbox(key="erf-model-0").set_value("unireplknet_a").run()
    at.button(key="erf-run").click().run()  # not a tiny RepLKNet: measured on a click
    ok(at)
    assert not errors(at), errors(at)
    caps = [c.value for c in at.caption]
    head = next(c for c in caps if "layer `forward_features`" in c)
    kernel_rf = int(head.split("theoretical RF global (")[1].split(" px)")[0])
    assert kernel_rf > 128, head  # the kernels' RF of the last stage, wider than the image
    assert metric(at, "ERF / TRF", 0) == "n/a"
    assert (f"ERF / TRF: none, the theoretical RF is the whole image: every input pixel reaches the measured layer "
            f"through a pooling, normalization or attention over the whole map (squeeze-and-excitation, GRN, "
            f"GroupNorm, a ViT's self-attention) or a Linear over the flattened map; its kernels alone reach "
            f"{kernel_rf} px.") in caps, caps


def test_side_by_side_kernel_31_vs_3_and_bad_input(app_env):
    """Random init one click away per configuration: the 31-29-27-13 network has the wider ERF than the 3x3 one
    (RepLKNet's central claim, here at random init); bad kernel text gives one readable error, no traceback."""
    at = ok(new_app().run())
    at.radio(key="erf-init-0").set_value("random").run()
    at.radio(key="erf-init-1").set_value("random").run()
    ok(at)
    assert not errors(at), errors(at)
    r3, r31 = float(metric(at, "r_rms (px)", 0)), float(metric(at, "r_rms (px)", 1))
    assert r31 > r3 + 1.0, (r31, r3)
    assert list(at.dataframe[0].value["configuration"]) == [  # untrained, and the labels say so
        "replknet_31b · K3 · tiny · re-param (random init)",
        "replknet_31b · K31-29-27-13 · tiny · re-param (random init)"]

    at.text_input(key="erf-k-0").set_value("30").run()
    ok(at)
    assert any("odd" in e for e in errors(at)), errors(at)
    at.text_input(key="erf-k-0").set_value("abc").run()
    ok(at)
    assert any("comma-separated integers" in e for e in errors(at)), errors(at)
    assert len(at.image) >= 1  # configuration 2 still renders


def test_uploaded_images_are_verified_then_used(app_env):
    """A fake image upload is refused with one line naming the file; one corrupt image among three is skipped
    and counted like the CLI does, and the ERF over the other two equals the one of the same two photos taken
    from the built-in set."""
    at = ok(new_app().run())
    at.radio(key="erf-img-kind").set_value("Upload").run()
    ok(at)
    at.file_uploader(key="erf-img-up").set_value([("cat.jpg", b"GIF89a not really", "image/jpeg")]).run()
    ok(at)
    assert any("cat.jpg: not a valid image" in e for e in errors(at)), errors(at)
    assert not any("BytesIO" in e or "/tmp" in e for e in errors(at)), errors(at)
    photos = [(n, (REPO_ROOT / "data" / "default_images" / n).read_bytes(), "image/jpeg")
              for n in ("astronaut.jpg", "brick.jpg")]
    at.file_uploader(key="erf-img-up").set_value(photos[:1] + [("broken.png", photos[1][1][:600], "image/png")]
                                                 + photos[1:]).run()
    ok(at)
    assert not errors(at), errors(at)
    assert any(c.value.startswith("2 image(s), 1 skipped") for c in at.caption), [c.value for c in at.caption]
    warnings = [w.value for w in at.warning]
    assert any(w.startswith("1 of 3 images skipped: broken.png: not a valid image") for w in warnings), warnings
    assert not any("BytesIO" in w or "/tmp" in w for w in warnings), warnings
    r_upload = float(metric(at, "r_rms (px)"))
    at.radio(key="erf-img-kind").set_value("Built-in").run()
    at.multiselect(key="erf-img-builtin").set_value(["astronaut.jpg", "brick.jpg"]).run()
    ok(at)
    assert any(c.value.startswith("2 image(s), 0 skipped") for c in at.caption)
    assert float(metric(at, "r_rms (px)")) == pytest.approx(r_upload, abs=0.051)
    at.multiselect(key="erf-img-builtin").set_value(["astronaut.jpg"]).run()
    assert float(metric(at, "r_rms (px)")) != pytest.approx(r_upload, abs=0.051)  # the two-image mean differs


def test_explorer_command_line_reproduces_the_shown_erf(app_env, monkeypatch):
    """"This configuration from the command line" gives the ERF the page shows: a chosen built-in photo that is
    not the first of the set (the images the app read, not the first n of the default set) and an uploaded
    checkpoint (loaded by name, without its classifier, as the app does), not a random init on other photos."""
    import io
    import json
    import shlex

    import torch

    from erf_lab.cli.main import main
    from erf_lab.models import create_model

    torch.manual_seed(1)
    net = create_model("replknet_31b", large_kernel_sizes=(7, 7, 7, 7), small_kernel=5,
                       channels=models.TINY_CHANNELS, layers=models.TINY_LAYERS)
    buf = io.BytesIO()
    torch.save(net.state_dict(), buf)
    (app_env / "mine.pth").write_bytes(buf.getvalue())
    at = ok(new_app().run())
    at.number_input(key="erf-ncfg").set_value(1).run()
    at.radio(key="erf-init-0").set_value("random").run()
    at.text_input(key="erf-k-0").set_value("7").run()
    at.radio(key="erf-img-kind").set_value("Built-in").run()
    at.multiselect(key="erf-img-builtin").set_value(["brick.jpg"]).run()
    at.file_uploader(key="erf-ckpt-0").set_value([("mine.pth", buf.getvalue(), "application/octet-stream")]).run()
    at.button(key="erf-run").click().run()
    ok(at)
    assert not errors(at), errors(at)
    shown = float(metric(at, "r_rms (px)"))
    assert list(at.dataframe[0].value["configuration"]) == ["replknet_31b · K7 · tiny · re-param · mine"]
    hint = next(c.value for c in at.code if "--input-size 128" in c.value)
    argv = shlex.split(hint)[1:]
    assert argv[argv.index("--weights") + 1:argv.index("--weights") + 3] == ["mine.pth", "--drop-head"], argv
    argv[argv.index("--out") + 1] = str(app_env / "cli")
    monkeypatch.chdir(app_env)
    assert main(argv + ["--quiet"]) == 0
    record = json.loads((app_env / "cli" / "run.json").read_text())
    assert record["image_list"] == ["brick.jpg"] and not record.get("random_init")
    assert record["metrics_summary"]["r_rms"] == pytest.approx(shown, abs=0.051)


def _cli_erf(app_env, monkeypatch, hint: str, args: list[str]) -> dict:
    """``erf-lab compute ARGS`` on the images the app read (the ``--images`` / ``--num-images`` of its command hint
    ``hint``) at its input size: the run.json's metrics summary."""
    import json
    import shlex

    from erf_lab.cli.main import main

    shown = shlex.split(hint)
    images = [a for opt in ("--images", "--num-images", "--input-size") for a in (opt, shown[shown.index(opt) + 1])]
    out = app_env / f"cli-{len(list(app_env.glob('cli-*')))}"
    monkeypatch.chdir(app_env)
    assert main(["compute", *args, *images, "--out", str(out), "--quiet"]) == 0
    return json.loads((out / "run.json").read_text())["metrics_summary"]


def test_explorer_measures_an_upload_of_the_shipped_family_as_it_was_trained(app_env, monkeypatch):
    """An uploaded K3-seed0.safetensors (16-128 channels, one block per stage: neither of the page's widths) was
    refused ("does not match RepLKNet ... missing keys"): the shipped file is recognised by its bytes and measured
    with its record's model and options, named on the page and in the command hint; the ERF is the CLI's for
    --weights builtin:cue-world/K3-seed0."""
    shipped = REPO_ROOT / "data" / "trained" / "cue-world" / "K3-seed0.safetensors"
    at = ok(new_app().run())
    at.number_input(key="erf-ncfg").set_value(1).run()
    at.number_input(key="erf-img-cue").set_value(2).run()
    at.radio(key="erf-init-0").set_value("random").run()
    at.text_input(key="erf-k-0").set_value("3").run()
    at.file_uploader(key="erf-ckpt-0").set_value([("K3-seed0.safetensors", shipped.read_bytes(),
                                                   "application/octet-stream")]).run()
    ok(at)
    assert not errors(at), errors(at)
    note = next(i.value for i in at.info if "K3-seed0.safetensors is the shipped" in i.value)
    assert "replknet_3 channels=(16,32,64,128) layers=(1,1,1,1) num_classes=10" in note, note
    hint = next(c.value for c in at.code if "--input-size 128" in c.value)
    assert "--weights builtin:cue-world/K3-seed0" in hint and "--override 'layers=(1,1,1,1)'" in hint, hint
    cli = _cli_erf(app_env, monkeypatch, hint, ["--model", "replknet_3", "--weights", "builtin:cue-world/K3-seed0"])
    assert float(metric(at, "r_rms (px)")) == pytest.approx(cli["r_rms"], abs=0.051)
    assert float(metric(at, "Area @50%").rstrip("%")) == pytest.approx(cli["area@50%"], abs=0.051)


def test_explorer_measures_an_upload_of_a_training_run_with_its_model_options(app_env, monkeypatch):
    """A checkpoint of an `erf-lab train` run at 8-64 channels, one block per stage fits neither width the page offers:
    its options typed under "Model options" (as --override takes them) build that architecture, the command hint
    names them, and the ERF is the CLI's for the run's own file and options; a malformed field is one line."""
    from erf_lab.cli.main import main

    run = app_env / "train-run"
    options = ["--override", "channels=(8,16,32,64)", "--override", "layers=(1,1,1,1)"]
    assert main(["train", "--model", "replknet_7", *options, "--train-size", "8", "--val-size", "4", "--epochs", "1",
                 "--batch-size", "8", "--input-size", "32", "--num-classes", "2", "--out", str(run), "--quiet"]) == 0
    at = ok(new_app().run())
    at.number_input(key="erf-ncfg").set_value(1).run()
    at.number_input(key="erf-img-cue").set_value(2).run()
    at.radio(key="erf-init-0").set_value("random").run()
    at.selectbox(key="erf-model-0").set_value("replknet_7").run()
    at.text_input(key="erf-k-0").set_value("7").run()
    at.file_uploader(key="erf-ckpt-0").set_value([("model.safetensors", (run / "model.safetensors").read_bytes(),
                                                   "application/octet-stream")]).run()
    at.button(key="erf-run").click().run()
    assert any("does not match" in m and "model.safetensors" in m for m in errors(at)), errors(at)
    at.text_input(key="erf-opts-0").set_value("channels=(8,16,32,64) layers=(1,").run()
    assert any("model options: 'layers=(1,': not a Python literal" in m for m in errors(at)), errors(at)
    at.text_input(key="erf-opts-0").set_value("--override 'channels=(8, 16, 32, 64)' layers=(1,1,1,1)").run()
    at.button(key="erf-run").click().run()
    ok(at)
    assert not errors(at), errors(at)
    hint = next(c.value for c in at.code if "--input-size 128" in c.value)
    assert "--override 'channels=(8,16,32,64)'" in hint and "--override 'layers=(1,1,1,1)'" in hint, hint
    cli = _cli_erf(app_env, monkeypatch, hint, ["--model", "replknet_7", *options, "--override", "num_classes=2",
                                                "--weights", str(run / "model.safetensors")])
    assert float(metric(at, "r_rms (px)")) == pytest.approx(cli["r_rms"], abs=0.051)
    assert float(metric(at, "Area @50%").rstrip("%")) == pytest.approx(cli["area@50%"], abs=0.051)


def test_explorer_measures_again_after_its_run_folders_were_deleted(app_env, monkeypatch):
    """The app's results outlived its run folders in memory: with $ERF_LAB_APP_RUNS cleared (or another run written
    in a folder's place) the explorer showed the old maps, its command hint named a deleted image folder and the
    Results page listed none of them. A remembered result now stands only while its folder holds that run."""
    import json
    import shlex
    import shutil

    from erf_lab.erf.metrics import summary
    from erf_lab.erf.rundir import load_run, run_metrics

    runs = app_env / "app-runs"
    at = ok(new_app().run())
    shown = [float(metric(at, "r_rms (px)", i)) for i in range(2)]
    shutil.rmtree(runs)
    at = ok(new_app().run())
    assert not errors(at), errors(at)
    hint = shlex.split(next(c.value for c in at.code if "--images" in c.value and "IMAGENET" not in c.value))
    assert Path(hint[hint.index("--images") + 1]).is_dir(), hint
    records = [json.loads(p.read_text()) for p in runs.glob("erf-*/run.json")]
    assert sorted(r["metrics_summary"]["r_rms"] for r in records) == pytest.approx(sorted(shown), abs=0.051)
    assert [float(metric(at, "r_rms (px)", i)) for i in range(2)] == pytest.approx(shown, abs=1e-9)
    # another map in a folder's place (its erf.npy rewritten): read again, the map shown is the folder's
    k3 = next(p.parent for p, r in zip(runs.glob("erf-*/run.json"), records) if r["model"] == "replknet_3")
    np.save(k3 / "erf.npy", np.roll(np.load(k3 / "erf.npy"), 9, axis=0))
    run = load_run(k3)
    now = summary(run_metrics(run.erf, run.run_info, theoretical_rf=run.theoretical_rf, centre=run.centre))["r_rms"]
    assert now != pytest.approx(shown[0], abs=0.051)
    at = ok(new_app().run())
    assert not errors(at), errors(at)
    assert float(metric(at, "r_rms (px)", 0)) == pytest.approx(now, abs=0.051)


def test_explorer_lists_the_layers_of_the_form_it_measures(app_env):
    """The layer list follows the re-parameterization toggle (the deploy form's ``lkb_reparam`` or the train-time
    branches): a layer picked in one form that the other lacks goes back to the default, not to an error."""
    at = ok(new_app().run())
    at.number_input(key="erf-ncfg").set_value(1).run()
    at.radio(key="erf-init-0").set_value("random").run()
    at.text_input(key="erf-k-0").set_value("7").run()
    at.checkbox(key="erf-all-0").check().run()
    deploy = at.selectbox(key="erf-layer-0").options
    assert "stages.0.blocks.0.large_kernel.lkb_reparam" in deploy
    assert not any("small_conv" in n or "lkb_origin" in n for n in deploy)
    at.toggle(key="erf-rep-0").set_value(False).run()
    train = at.selectbox(key="erf-layer-0").options
    assert "stages.0.blocks.0.large_kernel.small_conv" in train and not any("lkb_reparam" in n for n in train)
    at.selectbox(key="erf-layer-0").set_value("stages.0.blocks.0.large_kernel.small_conv").run()
    ok(at)
    assert not errors(at), errors(at)
    at.toggle(key="erf-rep-0").set_value(True).run()
    ok(at)
    assert not errors(at), errors(at)
    assert at.selectbox(key="erf-layer-0").value == "forward_features"


def explore_folder(at, folder):
    """One random-init panel of the ERF explorer measured on the images of ``folder``, without an error."""
    at.number_input(key="erf-ncfg").set_value(1).run()
    at.radio(key="erf-init-0").set_value("random").run()
    at.radio(key="erf-img-kind").set_value("Folder").run()
    at.text_input(key="erf-img-folder").set_value(str(folder)).run()
    ok(at)
    assert not errors(at), errors(at)
    return at


def test_explorer_reads_a_folder_of_class_subfolders(app_env):
    """An ImageNet-style folder (images in class sub-folders, as `erf-lab compute --images` reads it) is accepted
    and counted like the runner reads it; a folder without any image gets one readable line."""
    import shutil

    for cls, name in (("n01", "astronaut.jpg"), ("n02", "brick.jpg")):
        (app_env / "val" / cls).mkdir(parents=True)
        shutil.copyfile(REPO_ROOT / "data" / "default_images" / name, app_env / "val" / cls / name)
    (app_env / "val" / "README.txt").write_text("not an image")
    at = explore_folder(ok(new_app().run()), app_env / "val")
    captions = [c.value for c in at.caption]
    assert any(c.startswith("2 image(s) in ") for c in captions), captions
    assert any(c.startswith("2 image(s), 0 skipped") for c in captions), captions
    (app_env / "none" / "sub").mkdir(parents=True)
    at.text_input(key="erf-img-folder").set_value(str(app_env / "none")).run()
    ok(at)
    assert len(errors(at)) == 1 and errors(at)[0].startswith("Images: no images"), errors(at)


def test_explorer_refuses_a_folder_image_linking_outside_it(app_env):
    """The runner reads the typed folder itself; an image in it that is a symlink to a file elsewhere on the server
    was left out of the page's count ('1 image(s)') but read and measured all the same (2 images used). Such a
    folder is refused in one line naming the link, not its target, and nothing is measured."""
    outside = app_env / "elsewhere"
    outside.mkdir()
    src = REPO_ROOT / "data" / "default_images"
    (outside / "private.jpg").write_bytes((src / "brick.jpg").read_bytes())
    folder = app_env / "mine"
    folder.mkdir()
    (folder / "a.jpg").write_bytes((src / "astronaut.jpg").read_bytes())
    (folder / "b.jpg").symlink_to(outside / "private.jpg")
    at = ok(new_app().run())
    at.number_input(key="erf-ncfg").set_value(1).run()
    at.radio(key="erf-init-0").set_value("random").run()
    at.radio(key="erf-img-kind").set_value("Folder").run()
    at.text_input(key="erf-img-folder").set_value(str(folder)).run()
    ok(at)
    assert errors(at) == ["Images: b.jpg in the image folder is a link to a file outside it; the app reads only "
                          "files inside the folder you typed (copy the image in)"], errors(at)
    assert not [m for m in at.metric if m.label == "r_rms (px)"]
    (folder / "b.jpg").unlink()
    at.text_input(key="erf-img-folder").set_value(str(folder) + "/").run()
    ok(at)
    assert not errors(at), errors(at)
    assert any(c.value.startswith("1 image(s), 0 skipped") for c in at.caption), [c.value for c in at.caption]


def test_explorer_measures_a_changed_folder_again(app_env):
    """The map of a typed folder follows its contents: an image added or replaced after a measurement gives a new
    measurement (not the stored map of the old contents, in this session or a new one), in a new run directory
    (the earlier one is kept)."""
    import os
    import shutil

    photos = REPO_ROOT / "data" / "default_images"
    (app_env / "imgs").mkdir()
    shutil.copyfile(photos / "astronaut.jpg", app_env / "imgs" / "a.jpg")

    def measure(at=None):
        at = explore_folder(at or ok(new_app().run()), app_env / "imgs")
        return at, [c.value for c in at.caption if " skipped · layer" in c.value], metric(at, "r_rms (px)")

    at, shown, r_one = measure()
    assert shown[0].startswith("1 image(s), 0 skipped"), shown
    shutil.copyfile(photos / "brick.jpg", app_env / "imgs" / "b.jpg")
    at.run()
    shown = [c.value for c in at.caption if " skipped · layer" in c.value]
    assert shown[0].startswith("2 image(s), 0 skipped"), shown  # the same session sees the new image
    _, shown, r_two = measure()
    assert shown[0].startswith("2 image(s), 0 skipped"), shown  # and so does a new one
    (app_env / "imgs" / "b.jpg").unlink()
    shutil.copyfile(photos / "grass.jpg", app_env / "imgs" / "a.jpg")  # same name, another photo
    os.utime(app_env / "imgs" / "a.jpg", ns=(1, 1))
    _, shown, r_grass = measure()
    assert shown[0].startswith("1 image(s), 0 skipped") and r_grass != r_one, (shown, r_grass, r_one)
    assert len(list((app_env / "app-runs").glob("erf-*/run.json"))) >= 3  # earlier runs are kept


def test_uploads_over_the_limit_are_counted_as_skipped(app_env):
    """Uploads beyond the per-measurement limit are not dropped silently: counted and named like unusable ones."""
    import io

    from PIL import Image

    files = []
    for i in range(safety.MAX_IMAGES + 2):
        buf = io.BytesIO()
        Image.new("RGB", (32, 32), (4 * i, 100, 200)).save(buf, format="PNG")
        files.append((f"img{i:03d}.png", buf.getvalue(), "image/png"))
    at = ok(new_app().run())
    at.number_input(key="erf-ncfg").set_value(1).run()
    at.radio(key="erf-init-0").set_value("random").run()
    at.select_slider(key="erf-size").set_value(64).run()
    at.radio(key="erf-img-kind").set_value("Upload").run()
    at.file_uploader(key="erf-img-up").set_value(files).run()
    ok(at)
    assert not errors(at), errors(at)
    n = safety.MAX_IMAGES
    assert any(c.value.startswith(f"{n} image(s), 2 skipped") for c in at.caption), [c.value for c in at.caption]
    assert any(w.value.startswith(f"2 of {n + 2} images skipped: img{n:03d}.png: over the {n}-image limit")
               for w in at.warning), [w.value for w in at.warning]


@pytest.mark.parametrize("content", [b"hello, these are not weights\n", b"(ello, these are not weights\n"],
                         ids=["unpickling-error", "index-error"])
def test_uploaded_checkpoint_errors_name_the_users_file(app_env, content):
    """A text file uploaded as weights: one error naming the uploaded file, never the server's temporary copy
    (``/tmp/...``) or an object repr; both failure modes of torch's weights-only unpickler (issue #13)."""
    at = ok(new_app().run())
    at.radio(key="erf-init-0").set_value("random").run()
    at.file_uploader(key="erf-ckpt-0").set_value([("my notes.pth", content, "application/octet-stream")]).run()
    at.button(key="erf-run").click().run()
    ok(at)
    msgs = errors(at)
    assert len(msgs) == 1 and "my notes.pth" in msgs[0], msgs
    assert "cannot read checkpoint" in msgs[0] and "/tmp" not in msgs[0] and "BytesIO" not in msgs[0], msgs
    assert "upload.pth" not in msgs[0], msgs


# ----------------------------------------------------------------------------------------- other pages
def test_growth_page_train_equals_deploy(app_env):
    """Default: the shipped trained family K = 3, 7, 13, 31 at 128 px; train-time and re-parameterized ERFs agree
    (same function); runs are recorded; random init beside on request, and random init alone one click away."""
    at = ok(new_app().run())
    runs = app_env / "app-runs"
    landing = len(list(runs.rglob("run.json")))  # the landing view's K3 / K31 runs (none if cached by an earlier test)
    at.switch_page("views/growth.py").run()
    ok(at)
    assert not errors(at), errors(at)
    worst = float(metric(at, "train vs deploy ERF: largest relative difference"))
    assert worst < 1e-4
    table = at.dataframe[0].value
    assert sorted(zip(table["kernel"], table["reparam"])) == [(k, m) for k in (3, 7, 13, 31)
                                                              for m in ("deploy", "train")]
    assert set(table["init"]) == {"trained"} and set(table["input_size"]) == {128}
    assert list(table["model"][::2]) == ["replknet_3", "replknet_7", "replknet_13", "replknet_31b"]
    area = dict(zip(table["kernel"], table["area@50%"]))
    assert area[31] > area[3] + 3.0, area  # the trained K = 31 map is wider than the K = 3 one
    assert len(at.image) == 2  # growth curves + heatmap grid
    assert len(list(runs.rglob("run.json"))) - landing == 8

    at.text_input(key="g-kernels").set_value("3,31").run()
    at.selectbox(key="g-reparam").set_value("deploy").run()
    at.toggle(key="g-beside").set_value(True).run()
    ok(at)
    assert not errors(at), errors(at)
    table = at.dataframe[0].value
    assert sorted(zip(table["init"], table["kernel"])) == [("random", 3), ("random", 31), ("trained", 3),
                                                           ("trained", 31)]
    trained = table[table["init"] == "trained"]
    assert list(trained["area@50%"]) == pytest.approx([area[3], area[31]])  # the same runs, reused

    at.radio(key="g-init").set_value("random").run()
    ok(at)
    assert not errors(at), errors(at)
    table = at.dataframe[0].value
    assert sorted(zip(table["kernel"], table["reparam"])) == [(3, "deploy"), (31, "deploy")]
    assert "init" not in table.columns  # the kernel-family sweep on the built-in photos, as before


def test_growth_page_marks_a_threshold_not_reached(app_env):
    """The growth table showed K = 31's area@99% (no centred square inside the 128 px image holds 99 % of its ERF)
    as a bare NaN, where the explorer, the Results page and erf-lab compare / sweep.md write n/r; now n/r, explained
    under the table, and the reached ones keep their numbers."""
    from app.erf_maps import NOT_REACHED_NOTE

    at = ok(new_app().run())
    at.switch_page("views/growth.py").run()
    ok(at)
    assert not errors(at), errors(at)
    table = at.dataframe[0].value
    k31, k3 = table[table["kernel"] == 31], table[table["kernel"] == 3]
    assert len(k31) == 2 and (k31["area@99%"] == "n/r").all() and (k31["side@99%"] == "n/r").all(), k31
    assert (k3["area@99%"].astype(float) > 90).all() and (k3["side@99%"].astype(float) == 127).all(), k3
    assert NOT_REACHED_NOTE in [c.value for c in at.caption]


def test_growth_page_refuses_bad_kernel_sizes(app_env):
    """Kernel text that is not integers, or a size outside the odd 3..31 the page offers (K = 1 included), gets
    one readable line and measures nothing."""
    at = ok(new_app().run())
    at.switch_page("views/growth.py").run()
    at.radio(key="g-init").set_value("random").run()
    for text, expect in (("3,x", "Settings: kernel sizes: expected comma-separated integers, got '3,x'"),
                         ("1,3", "Settings: kernel sizes must be odd integers in 3..31, got '1,3'"),
                         ("3,7,3", "Settings: kernel sizes: each once, got '3,7,3'")):
        at.text_input(key="g-kernels").set_value(text).run()
        ok(at)
        assert errors(at) == [expect], errors(at)
        assert not at.dataframe


def test_growth_page_refused_checkpoint_folder_measures_nothing(app_env):
    """Weights from a folder: a typed folder the app refuses (missing) gives its one line and no sweep, not one more
    error per kernel size in the command line's words ('--init weights needs --weights-dir')."""
    at = ok(new_app().run())
    at.switch_page("views/growth.py").run()
    at.text_input(key="g-kernels").set_value("3,7").run()
    at.radio(key="g-init").set_value("weights").run()
    ok(at)
    assert not errors(at) and any("one checkpoint per kernel size" in i.value for i in at.info)
    at.text_input(key="g-wdir").set_value(str(app_env / "no-such-folder")).run()
    ok(at)
    assert errors(at) == ["Settings: " + refusal("checkpoint folder", str(app_env / "no-such-folder"))], errors(at)
    assert not at.dataframe and not at.metric
    (app_env / "ckpts").mkdir()
    at.text_input(key="g-wdir").set_value(str(app_env / "ckpts")).run()
    ok(at)
    # one line for the folder (the library's finder, as the sweep's), not one per kernel size
    assert errors(at) == [f"Settings: no checkpoint for kernels 3, 7 in {app_env / 'ckpts'} (expected "
                          "replknet_<K>.pth / .safetensors, K<K>.pth or <K>.pth for each)"], errors(at)
    assert not at.dataframe and not at.metric


def test_the_growth_pages_redraw_killed_while_it_writes_leaves_nothing_behind(app_env, one_thread):
    """The Growth page's ERF vs input size draws its sweep's figures again into the app's run area on every visit
    (the measured sizes reused). A server SIGKILLed in the middle of that redraw (here: writing growth.pdf) keeps
    the figures drawn before whole, and the next visit leaves no temporary file or lock anywhere in the run area,
    with figures and table equal to those of a redraw never stopped."""
    import json
    import shutil

    from conftest import killed_at_write, write_leftovers

    from app import erf_maps

    sweep = dict(sizes=(64, 96), model="replknet_3", overrides_json=models.tiny_overrides(), num_images=1)
    out = Path(erf_maps.size_sweep(sweep.pop("sizes"), **sweep)["out_dir"])
    drawn = app_env / "drawn"
    shutil.copytree(out, drawn)
    killed_at_write(f"from app.erf_maps import size_sweep\nsize_sweep((64, 96), **{sweep!r})", "growth.pdf")
    assert [p.name for p in out.glob(".growth.pdf.*")] and (out / "growth.pdf").read_bytes() == (
        drawn / "growth.pdf").read_bytes()  # killed mid-write: the figure drawn before stays whole
    assert json.loads((out / "sweep.json").read_text())["complete"] is False
    erf_maps.size_sweep((64, 96), **sweep)
    assert write_leftovers(app_env / "app-runs") == []

    def files(folder):
        return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())

    assert files(out) == files(drawn)
    assert json.loads((out / "sweep.json").read_text())["complete"] is True
    for name in ("growth.png", "growth.pdf", "grid.png", "grid.pdf", "sweep.csv", "S64-deploy/erf.npy"):
        assert (out / name).read_bytes() == (drawn / name).read_bytes(), name


def test_growth_page_says_when_the_theoretical_rf_exceeds_the_image(app_env):
    """The growth table's erf/trf of the shipped family at 128 px (theoretical RFs 187 to 1211 px) came without the
    note sweep.md writes: the ratio is bounded by the input size there; now the page says it, naming each K."""
    from erf_lab.erf.metrics import TRF_EXCEEDS_MAP_NOTE

    at = ok(new_app().run())
    at.switch_page("views/growth.py").run()
    ok(at)
    assert not errors(at), errors(at)
    table = at.dataframe[0].value
    assert sorted(set(table["trf"])) == [187, 427, 787, 1211], table["trf"]
    assert [c.value for c in at.caption if c.value.startswith("erf/trf:")] == [
        f"erf/trf: the theoretical RF exceeds the 128 px image for K = 3, 7, 13, 31; there {TRF_EXCEEDS_MAP_NOTE}."]


def test_growth_page_vs_depth_says_random_init(app_env, monkeypatch):
    """The depth and input-size tabs measure an untrained network, and say so (captions and heatmap labels)."""
    from app import figures
    from erf_lab.erf.rundir import RANDOM_MARK

    drawn = []
    real = figures.render_figure
    monkeypatch.setattr(figures, "render_figure", lambda kind, fmt, args, kw="{}": drawn.append((kind, args))
                        or real(kind, fmt, args, kw))
    at = ok(new_app().run())
    at.switch_page("views/growth.py").run()
    at.button(key="d-run").click().run()
    ok(at)
    assert not errors(at), errors(at)
    assert [r for r in at.dataframe[-1].value["depth"]] == [1, 2, 3, 4]
    untrained = [c.value for c in at.caption if "at random init (seed 0), untrained" in c.value]
    assert len(untrained) == 1, [c.value for c in at.caption]
    assert any("at random init, seed 0, untrained" in c.value for c in at.caption)
    depth = [args[1] for kind, args in drawn if kind == "erf_comparison" and args[1][0].startswith("stage")]
    assert depth and len(depth[-1]) == 4 and all(RANDOM_MARK in label for label in depth[-1]), depth


def test_random_init_erfs_carry_a_warning(app_env):
    """An ERF of seeded random weights was marked only by '(random init)' in a label (explorer) or 'random' in a
    table column (growth), where `erf-lab sweep` writes a note that it describes no trained network; both pages now
    show that note beside it, and none for the shipped trained models."""
    from app.erf_maps import RANDOM_INIT_NOTE

    at = ok(new_app().run())
    assert not any(RANDOM_INIT_NOTE in w.value for w in at.warning)  # the shipped trained default
    at.number_input(key="erf-ncfg").set_value(1).run()
    at.radio(key="erf-init-0").set_value("random").run()
    ok(at)
    assert not errors(at), errors(at)
    assert [w.value for w in at.warning] == [RANDOM_INIT_NOTE], [w.value for w in at.warning]
    at.switch_page("views/growth.py").run()
    ok(at)
    assert not any(RANDOM_INIT_NOTE in w.value for w in at.warning)
    at.text_input(key="g-kernels").set_value("3").run()
    at.number_input(key="g-nimg-True").set_value(1).run()
    at.toggle(key="g-beside").set_value(True).run()
    ok(at)
    assert not errors(at), errors(at)
    assert [w.value for w in at.warning if RANDOM_INIT_NOTE in w.value], [w.value for w in at.warning]


def test_growth_page_vs_input_size(app_env):
    """The 'vs input size' tab runs the library's input-size sweep: one row per size, and each row's area ratio
    is the side^2 / S^2 of its own map (a fraction of the image), recorded as sweep run directories."""
    from streamlit.delta_generator import DeltaGenerator

    texts, real = [], DeltaGenerator.progress

    def spy(self, value, text=None, **kw):
        texts.append((value, text))
        return real(self, value, text=text, **kw)

    at = ok(new_app().run())
    at.switch_page("views/growth.py").run()
    at.multiselect(key="s-sizes").set_value([64, 128]).run()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(DeltaGenerator, "progress", spy)
        at.button(key="s-run").click().run()
    ok(at)
    assert not errors(at), errors(at)
    # a progress bar per input size measured (the sweep only showed a spinner)
    assert [(v, t) for v, t in texts if t and t.startswith("input size ")] == [
        (0.5, "input size 1 of 2 measured"), (1.0, "input size 2 of 2 measured")], texts
    table = at.dataframe[-1].value
    assert list(table["input_size"]) == [64, 128]
    sweeps = list((app_env / "app-runs").glob("size-sweep-*/sweep.json"))
    assert len(sweeps) == 1
    import json

    rows = json.loads(sweeps[0].read_text())["rows"]
    for row, shown in zip(rows, table["area@50%"]):
        side = row["side@50%"]
        assert shown == pytest.approx(100.0 * side * side / row["input_size"] ** 2)
    for axis in ("y", "x"):  # both sigmas of the Gaussian fit, as sweep.csv (the page showed sigma_x alone)
        assert list(table[f"gauss_sigma_{axis}"]) == pytest.approx([r[f"gauss_sigma_{axis}"] for r in rows])
    assert len(at.image) == 4  # kernel tab (2) + growth curves and heatmaps of the size tab
    labels = {b.proto.label for b in at.get("download_button")}
    assert {"growth.png", "growth.pdf", "grid.png", "grid.pdf", "sweep.csv"} <= labels, labels  # PNG + PDF each


def test_reparam_page_equivalence_and_counts(app_env):
    at = ok(new_app().run())
    at.switch_page("views/reparam.py").run()
    ok(at)
    assert not errors(at), errors(at)
    err_merged = float(metric(at, "max relative output error", 0))
    err_fused = float(metric(at, "max relative output error", 1))
    assert err_merged < 1e-5 and err_fused < 1e-5
    p_train = float(metric(at, "train-time: params").split()[0])
    p_merged = float(metric(at, "merged (official deploy layout): params").split()[0])
    assert p_merged < p_train  # the small-kernel branch and its BN are gone
    forms = at.dataframe[0].value
    assert forms["flops"].iloc[1] < forms["flops"].iloc[0]
    assert len(at.image) == 1  # kernel heatmaps
    untrained = [c.value for c in at.caption if "at random init (seed 0), untrained" in c.value]
    assert untrained and untrained[0].startswith("replknet_31b at random init"), [c.value for c in at.caption]
    at.number_input(key="rp-ch").set_value(5).run()
    ok(at)
    assert len(at.image) == 1


def test_reparam_page_refuses_an_upload_already_in_deploy_form(app_env):
    """An uploaded deploy checkpoint (merged lkb_reparam) was shown as three identical "forms" with error 0; the page
    says, in the CLI's one line naming the user's file, that there is nothing to merge, and shows no forms."""
    import io

    import torch

    from erf_lab.models import create_model

    net = create_model("replknet_31b", deploy=True, channels=models.TINY_CHANNELS, layers=models.TINY_LAYERS)
    buf = io.BytesIO()
    torch.save(net.state_dict(), buf)
    at = ok(new_app().run())
    at.switch_page("views/reparam.py").run()
    at.file_uploader(key="rp-ckpt").set_value([("merged.pth", buf.getvalue(), "application/octet-stream")]).run()
    at.button(key="rp-run").click().run()
    ok(at)
    msgs = errors(at)
    assert len(msgs) == 1 and msgs[0].endswith("merged.pth is already in the deploy (re-parameterized) form; "
                                               "nothing to merge; use it as it is"), msgs
    assert not [m for m in at.metric if m.label == "max relative output error"] and not at.dataframe


def test_reparam_page_waits_for_a_click_beyond_the_tiny_default(app_env):
    """Paper-size networks and uploads are built only on 'Compare the forms' (not on every widget change); the
    merged and fused forms of an uploaded tiny checkpoint then match it."""
    import io

    import torch

    from erf_lab.models import create_model

    at = ok(new_app().run())
    at.switch_page("views/reparam.py").run()
    metric(at, "max relative output error")
    at.toggle(key="rp-tiny").set_value(False).run()
    ok(at)
    assert not [m for m in at.metric if m.label == "max relative output error"] and not errors(at), errors(at)
    assert any("press **Compare the forms**" in i.value for i in at.info)
    at.toggle(key="rp-tiny").set_value(True).run()
    torch.manual_seed(3)
    net = create_model("replknet_31b", channels=models.TINY_CHANNELS, layers=models.TINY_LAYERS)
    with torch.no_grad():
        net.stages[0].blocks[0].large_kernel.lkb_origin.conv.weight.mul_(7.0)
    buf = io.BytesIO()
    torch.save(net.state_dict(), buf)
    at.file_uploader(key="rp-ckpt").set_value([("mine.pth", buf.getvalue(), "application/octet-stream")]).run()
    assert not [m for m in at.metric if m.label == "max relative output error"]
    at.button(key="rp-run").click().run()
    ok(at)
    assert not errors(at), errors(at)
    assert float(metric(at, "max relative output error", 0)) < 1e-5
    assert float(metric(at, "max relative output error", 1)) < 1e-5
    assert not [c.value for c in at.caption if "untrained" in c.value]  # the uploaded weights are not random


def test_reparam_page_random_bn_does_not_apply_to_an_upload(app_env):
    """"Random BN statistics" stayed on after an upload, silently ignored (the upload keeps its own statistics): for
    an upload it is off and disabled, and the report is the upload's as it is; without one it is back on."""
    import io

    import torch

    from erf_lab.models import create_model

    at = ok(new_app().run())
    at.switch_page("views/reparam.py").run()
    assert at.toggle(key="rp-bn").value is True and not at.toggle(key="rp-bn").disabled
    torch.manual_seed(4)
    net = create_model("replknet_31b", channels=models.TINY_CHANNELS, layers=models.TINY_LAYERS)
    buf = io.BytesIO()
    torch.save(net.state_dict(), buf)
    at.file_uploader(key="rp-ckpt").set_value([("mine.pth", buf.getvalue(), "application/octet-stream")]).run()
    at.button(key="rp-run").click().run()
    ok(at)
    assert not errors(at), errors(at)
    off = at.toggle(key="rp-bn-upload")
    assert off.value is False and off.disabled and "own BN statistics" in off.help
    assert float(metric(at, "max relative output error", 1)) < 1e-5
    at.file_uploader(key="rp-ckpt").set_value(None).run()
    ok(at)
    assert at.toggle(key="rp-bn").value is True and not at.toggle(key="rp-bn").disabled
    assert any("BN statistics randomized" in c.value for c in at.caption)


def test_reparam_page_says_which_weights_an_upload_is(app_env):
    """The re-parameterization page said nothing of what an upload held: of a file with raw and EMA weights it
    showed the raw ones' kernels (a server-log warning said so), of a file erf-lab marked as an untrained
    initialisation (epoch 0 of a train run) no word that the kernels are no trained network's, and its command hint
    named CHECKPOINT.pth. Each is said now, and the hint names the uploaded file."""
    import io

    import torch

    from erf_lab.models import create_model
    from erf_lab.train.checkpoints import save_weights

    torch.manual_seed(4)
    raw, ema = (create_model("replknet_31b", channels=models.TINY_CHANNELS, layers=models.TINY_LAYERS).state_dict()
                for _ in range(2))
    buf = io.BytesIO()
    torch.save({"model": raw, "model_ema": ema}, buf)
    at = ok(new_app().run())
    at.switch_page("views/reparam.py").run()
    at.file_uploader(key="rp-ckpt").set_value([("raw-and-ema.pth", buf.getvalue(), "application/octet-stream")]).run()
    at.button(key="rp-run").click().run()
    ok(at)
    assert not errors(at), errors(at)
    captions = [c.value for c in at.caption]
    assert "Weights loaded: checkpoint['model'] (passed over: 'model_ema')" in captions, captions
    assert not any("untrained" in c for c in captions), captions
    assert any("reparam --model replknet_31b --weights raw-and-ema.pth" in c.value for c in at.code)
    path = save_weights(raw, app_env / "epoch_000", "safetensors", random_init_seed=4)[0]
    at.file_uploader(key="rp-ckpt").set_value([(path.name, path.read_bytes(), "application/octet-stream")]).run()
    at.button(key="rp-run").click().run()
    ok(at)
    assert not errors(at), errors(at)
    captions = [c.value for c in at.caption]
    assert any(c.startswith("epoch_000.safetensors is marked as an untrained initialisation (random init, seed 4)")
               for c in captions) and not any(c.startswith("Weights loaded") for c in captions), captions


def test_reparam_page_builds_an_upload_as_it_was_trained(app_env):
    """An upload of another width / depth than the page's two was refused (missing keys): the shipped K3-seed0 is
    built from its record, a training run's weights from the options typed under "Model options"; the parameters
    shown are those architectures' and the command hint names their options."""
    import io

    import torch

    from erf_lab.models import create_model
    from erf_lab.models.flops import count_params

    shipped = REPO_ROOT / "data" / "trained" / "cue-world" / "K3-seed0.safetensors"
    at = ok(new_app().run())
    at.switch_page("views/reparam.py").run()
    at.file_uploader(key="rp-ckpt").set_value([("K3-seed0.safetensors", shipped.read_bytes(),
                                               "application/octet-stream")]).run()
    at.button(key="rp-run").click().run()
    ok(at)
    assert not errors(at), errors(at)
    assert any("replknet_3 channels=(16,32,64,128) layers=(1,1,1,1) num_classes=10" in i.value for i in at.info)
    assert metric(at, "train-time: params") == "0.241 M"  # 240874, the record's count
    assert float(metric(at, "max relative output error", 1)) < 1e-5
    assert any("--weights builtin:cue-world/K3-seed0" in c.value and "--override 'layers=(1,1,1,1)'" in c.value
               for c in at.code)
    torch.manual_seed(2)
    net = create_model("replknet_31b", channels=(8, 16, 32, 64), layers=(1, 1, 1, 1))
    buf = io.BytesIO()
    torch.save(net.state_dict(), buf)
    at.file_uploader(key="rp-ckpt").set_value([("narrow.pth", buf.getvalue(), "application/octet-stream")]).run()
    at.button(key="rp-run").click().run()
    assert any("narrow.pth" in m and "does not match" in m for m in errors(at)), errors(at)
    at.text_input(key="rp-opts").set_value("channels=(8,16,32,64) layers=(1,1,1,1)").run()
    at.button(key="rp-run").click().run()
    ok(at)
    assert not errors(at), errors(at)
    assert metric(at, "train-time: params") == f"{count_params(net) / 1e6:.3f} M"
    assert float(metric(at, "max relative output error", 1)) < 1e-5
    assert any("--override 'channels=(8,16,32,64)'" in c.value for c in at.code)


def test_growth_page_weights_folder_with_model_options(app_env, monkeypatch):
    """A folder of the shipped family's checkpoints (16-128 channels, one block per stage) did not load into either
    width the page offers: with their options under "Model options" each K measures the CLI's ERF of that shipped
    model, and the command hint carries the options."""
    import json

    from erf_lab.cli.main import main

    shipped = REPO_ROOT / "data" / "trained" / "cue-world"
    folder = app_env / "ckpts"
    folder.mkdir()
    for k in (3, 7):
        (folder / f"K{k}.safetensors").write_bytes((shipped / f"K{k}-seed0.safetensors").read_bytes())
    at = ok(new_app().run())
    at.switch_page("views/growth.py").run()
    at.text_input(key="g-kernels").set_value("3,7").run()
    at.selectbox(key="g-reparam").set_value("deploy").run()
    at.select_slider(key="g-size").set_value(64).run()
    at.radio(key="g-init").set_value("weights").run()
    at.text_input(key="g-wdir").set_value(str(folder)).run()
    assert any("does not match" in m for m in errors(at)), errors(at)
    at.text_input(key="g-opts").set_value("channels=(16,32,64,128) layers=(1,1,1,1) num_classes=10").run()
    ok(at)
    assert not errors(at), errors(at)
    table = at.dataframe[0].value
    assert list(table["kernel"]) == [3, 7] and list(table["weights"]) == ["K3.safetensors", "K7.safetensors"]
    monkeypatch.chdir(app_env)
    for k, model, r_rms in zip((3, 7), ("replknet_3", "replknet_7"), table["r_rms"]):
        out = app_env / f"cli-K{k}"
        assert main(["compute", "--model", model, "--weights", f"builtin:cue-world/K{k}-seed0", "--input-size", "64",
                     "--num-images", "1", "--out", str(out), "--quiet"]) == 0
        assert float(r_rms) == pytest.approx(json.loads((out / "run.json").read_text())["metrics_summary"]["r_rms"],
                                             abs=1e-3)
    assert any("--override 'layers=(1,1,1,1)'" in c.value and "--weights-dir" in c.value for c in at.code)


def test_growth_page_says_which_weights_of_each_checkpoint_loaded(app_env):
    """A folder checkpoint holding raw and EMA weights (as `erf-lab train --ema`'s epoch .pth files and timm's do) is
    measured by its raw weights, which its run.json records; the growth page said nothing of it. It says so now,
    for each K, as erf-lab compare's note does."""
    import torch
    from safetensors.torch import load_file

    sd = load_file(REPO_ROOT / "data" / "trained" / "cue-world" / "K3-seed0.safetensors")
    folder = app_env / "ckpts"
    folder.mkdir()
    torch.save({"model": sd, "model_ema": sd}, folder / "K3.pth")
    at = ok(new_app().run())
    at.switch_page("views/growth.py").run()
    at.text_input(key="g-kernels").set_value("3").run()
    at.selectbox(key="g-reparam").set_value("deploy").run()
    at.select_slider(key="g-size").set_value(64).run()
    at.radio(key="g-init").set_value("weights").run()
    at.text_input(key="g-opts").set_value("channels=(16,32,64,128) layers=(1,1,1,1) num_classes=10").run()
    at.text_input(key="g-wdir").set_value(str(folder)).run()
    ok(at)
    assert not errors(at), errors(at)
    assert "Weights loaded from the checkpoint files: K = 3: checkpoint['model'] (passed over: 'model_ema')." in [
        c.value for c in at.caption], [c.value for c in at.caption]


def test_shape_bias_page_runs_and_shows_humans(app_env, shared_datasets):
    """Pretrained EfficientNet-Lite0 on 16 cue-conflict images; humans' value is the model-vs-human one."""
    from erf_lab.shape_bias.analysis import human_csvs, shape_bias_from_csv

    at = ok(new_app().run())
    at.switch_page("views/shape_bias.py").run()
    ok(at)
    assert not errors(at), errors(at)
    sb = float(metric(at, "Shape bias"))
    assert 0.0 <= sb <= 1.0
    humans = shape_bias_from_csv(human_csvs(shared_datasets))["shape_bias"]
    assert float(metric(at, "Humans")) == pytest.approx(humans, abs=5e-4)
    assert humans > 0.9  # Geirhos et al.: humans decide by shape
    assert int(metric(at, "Conflict images")) >= 14
    # 16 images give fewer than 30 shape-or-texture decisions: the page shows the run's flag with its interval
    assert any("shape-or-texture decisions: its 95% interval" in w.value for w in at.warning), at.warning
    per_cat = at.dataframe[0].value
    assert set(per_cat.columns) >= {"category", "shape bias", "humans"}
    assert len(at.image) >= 3  # the two model-vs-human figures and stimulus thumbnails
    from erf_lab.shape_bias.consistency import human_trials, human_vs_human
    table = at.dataframe[1].value  # consistency with the humans, one row per dataset
    assert list(table["dataset"]) == ["cue-conflict", "edge", "silhouette"] and (table["trials"] == 16).all()
    hh = human_vs_human(human_trials(shared_datasets)["edge"])["error_consistency"]["mean"]
    assert table["human-human"].iloc[1] == pytest.approx(hh, abs=1e-12)
    assert ((table["error consistency"] >= -1) & (table["error consistency"] <= 1)).all()
    ad = human_vs_human(human_trials(shared_datasets)["edge"])["accuracy_difference"]["mean"]
    assert table["accuracy difference human-human"].iloc[1] == pytest.approx(ad, abs=1e-12)  # 0.020351
    assert ((table["accuracy difference"] >= 0) & (table["accuracy difference"] <= 1)).all()
    assert any("CC BY 4.0" in c.value for c in list(at.caption) + list(at.markdown))


def test_shape_bias_page_waits_for_a_click_beyond_the_default(app_env):
    """The default (16 images of a listed model) shows at once; more images wait for the button, as the README
    says of every computation beyond the interactive default, and a finished run shows again without one."""
    at = ok(new_app().run())
    at.switch_page("views/shape_bias.py").run()
    ok(at)
    assert not errors(at), errors(at)
    metric(at, "Shape bias")
    at.number_input(key="sb-limit").set_value(32).run()
    ok(at)
    assert not [m for m in at.metric if m.label == "Shape bias"] and not errors(at), errors(at)
    assert any("press **Run shape-bias evaluation**" in i.value for i in at.info)
    assert len(list((app_env / "app-runs").glob("shape-bias-*"))) == 1  # nothing ran for 32 images
    at.button(key="sb-run").click().run()
    ok(at)
    assert not errors(at), errors(at)
    metric(at, "Shape bias")
    assert len(list((app_env / "app-runs").glob("shape-bias-*/summary.json"))) == 2
    at.number_input(key="sb-limit").set_value(16).run()
    at.number_input(key="sb-limit").set_value(32).run()
    ok(at)
    metric(at, "Shape bias")  # finished: shown without another click


def test_shape_bias_page_pretrained_only_where_weights_exist(app_env):
    """Switching from efficientnet_lite0 (pretrained by default) to a model without packaged weights left the
    toggle on (disabled) and the command hint at '--pretrained', a command the CLI refuses ('no published
    weights'), while the page ran random init; now the toggle is off, and the hint asks for a checkpoint. The random
    init is said once (UNTRAINED_NOTE), not twice in two wordings."""
    def toggle():  # the one "Pretrained" toggle the page shows
        shown = [t for t in at.toggle if t.label == "Pretrained ImageNet weights"]
        assert len(shown) == 1, shown
        return shown[0]

    at = ok(new_app().run())
    at.switch_page("views/shape_bias.py").run()
    ok(at)
    assert toggle().value is True
    assert any("shape-bias --model efficientnet_lite0 --pretrained" in c.value for c in at.code)
    at.selectbox(key="sb-model").set_value("mobilenetv2").run()
    ok(at)
    assert not errors(at), errors(at)
    assert toggle().value is False and toggle().proto.disabled
    hints = [c.value for c in at.code if "shape-bias --model" in c.value]
    assert hints == ["erf-lab shape-bias --model mobilenetv2 --weights CHECKPOINT.pth --out runs/shape-bias"], hints
    # the run it shows is random init, said once (it also said 'Random-init weights: ...', the same in other words)
    from app.runs import UNTRAINED_NOTE

    said = [w.value for w in at.warning if "untrained" in w.value.lower() or "random" in w.value.lower()]
    assert said == [UNTRAINED_NOTE], said
    at.selectbox(key="sb-model").set_value("efficientnet_lite0").run()
    ok(at)
    assert toggle().value is True and not any(w.value.startswith("UNTRAINED") for w in at.warning)


def test_shape_bias_page_shows_progress_while_classifying(app_env, monkeypatch):
    """A shape-bias run (up to 1280 images x 3 sets, minutes on a CPU) showed only a spinner; the page now shows a
    progress bar that moves per batch with the set and the count of images done (erf_lab's own on_progress)."""
    from streamlit.delta_generator import DeltaGenerator

    texts, real = [], DeltaGenerator.progress

    def spy(self, value, text=None, **kw):
        texts.append((value, text))
        return real(self, value, text=text, **kw)

    monkeypatch.setattr(DeltaGenerator, "progress", spy)
    at = ok(new_app().run())
    at.switch_page("views/shape_bias.py").run()
    ok(at)
    assert not errors(at), errors(at)
    metric(at, "Shape bias")
    done = [(v, t) for v, t in texts if t and t.startswith("cue-conflict: ")]
    # 16 images with ../shared, the fixture's 12 without: the bar ends full, at every image of the set
    assert done and done[-1][0] == 1.0 and re.fullmatch(r"cue-conflict: (\d+) of \1 images", done[-1][1]), texts
    assert [v for v, _ in done] == sorted(v for v, _ in done)
    assert any(t and t.startswith(("edges: ", "silhouettes: ")) for _, t in texts), texts


def test_shape_bias_page_builds_an_upload_with_its_model_options(app_env):
    """The Shape bias page, unlike the ERF explorer, had no "Model options" field: a checkpoint of a RepLKNet at
    another width than the paper's was refused ("does not match ... check the model name and its options") with no
    option to give. Its options typed there build that architecture, the command hint names them and the file,
    and the page says which part of the file loaded (its raw weights, not the EMA beside them)."""
    import io
    import json

    import torch

    from erf_lab.models import create_model

    torch.manual_seed(0)
    raw, ema = (create_model("replknet_3", channels=(8, 16, 32, 64), layers=(1, 1, 1, 1)).state_dict()
                for _ in range(2))  # ImageNet's 1000 classes, as the cue-conflict stimuli take them
    buf = io.BytesIO()
    torch.save({"state_dict": raw, "state_dict_ema": ema}, buf)
    at = ok(new_app().run())
    at.switch_page("views/shape_bias.py").run()
    at.selectbox(key="sb-model").set_value("replknet_3").run()
    at.file_uploader(key="sb-ckpt").set_value([("narrow.pth", buf.getvalue(), "application/octet-stream")]).run()
    at.button(key="sb-run").click().run()
    ok(at)
    assert len(errors(at)) == 1 and "narrow.pth does not match RepLKNet" in errors(at)[0], errors(at)
    at.text_input(key="sb-opts").set_value("channels=(8,16,32,64) layers=(1,1,1,1)").run()
    assert any("press **Run shape-bias evaluation**" in i.value for i in at.info)  # an upload waits for the click
    at.button(key="sb-run").click().run()
    ok(at)
    assert not errors(at), errors(at)
    assert 0.0 <= float(metric(at, "Shape bias")) <= 1.0
    assert not any(w.value.startswith("UNTRAINED") for w in at.warning)  # the upload's weights, not random init
    assert "Weights loaded: checkpoint['state_dict'] (passed over: 'state_dict_ema')" in [c.value for c in at.caption]
    hints = [c.value for c in at.code if "shape-bias --model" in c.value]
    assert hints == ["erf-lab shape-bias --model replknet_3 --override 'channels=(8,16,32,64)' --override "
                     "'layers=(1,1,1,1)' --weights narrow.pth --out runs/shape-bias"], hints
    summary = json.loads(next((app_env / "app-runs").glob("shape-bias-replknet_3-*/summary.json")).read_text())
    assert summary["random_weights"] is False and summary["weights_selection"]["passed_over"] == ["state_dict_ema"]


def test_shape_bias_page_names_an_upload_of_the_shipped_cue_world_family(app_env):
    """An upload of a shipped cue-world model (K3-seed0.safetensors, which the ERF explorer and re-parameterization
    pages recognise) was refused as a RepLKNet of another size ("does not match ... 660 missing keys"), and built
    with its options it fails as a 10-way head: it is named now, with why the stimuli cannot take it and the command
    that measures its shape bias on cue-world's own cue-conflict images (which runs)."""
    import shlex

    from erf_lab.cli.main import main

    shipped = REPO_ROOT / "data" / "trained" / "cue-world" / "K3-seed0.safetensors"
    at = ok(new_app().run())
    at.switch_page("views/shape_bias.py").run()
    at.selectbox(key="sb-model").set_value("replknet_3").run()
    at.file_uploader(key="sb-ckpt").set_value([(shipped.name, shipped.read_bytes(), "application/octet-stream")]).run()
    ok(at)
    assert len(errors(at)) == 1, errors(at)
    command = "erf-lab shape-bias --stimuli cue-world --model replknet_3 --weights builtin:cue-world/K3-seed0"
    assert errors(at)[0] == ("Shape-bias evaluation: K3-seed0.safetensors is the shipped builtin:cue-world/K3-seed0, "
                             "a classifier of cue-world's 10 classes: the cue-conflict stimuli need an ImageNet "
                             f"(1000-way) or 16-way classifier. Its shape bias on cue-world's own cue-conflict images: "
                             f"{command}"), errors(at)
    assert not at.metric and not any("press **Run" in i.value for i in at.info)
    assert main([*shlex.split(command)[1:], "--limit", "2", "--out", str(app_env / "cw")]) == 0


def test_shape_bias_page_marks_an_upload_of_an_untrained_initialisation(app_env):
    """An upload of epoch 0 of an `erf-lab train` run (the untrained initialisation, marked so in the file, as
    `erf-lab reparam` of a random init is) was shown as a trained model's shape bias, with no word of random
    weights: the CLI refuses that file without --allow-random and marks it with it. The page marks the run untrained
    now, with the file's own seed, as it marks random init, and its command hint has --allow-random."""
    import json

    import torch

    from erf_lab.models import create_model
    from erf_lab.train.checkpoints import save_weights

    torch.manual_seed(5)
    path = save_weights(create_model("replknet_3", channels=(8, 16, 32, 64), layers=(1, 1, 1, 1)).state_dict(),
                        app_env / "epoch_000", "safetensors", random_init_seed=5)[0]
    at = ok(new_app().run())
    at.switch_page("views/shape_bias.py").run()
    at.selectbox(key="sb-model").set_value("replknet_3").run()
    at.file_uploader(key="sb-ckpt").set_value([(path.name, path.read_bytes(), "application/octet-stream")]).run()
    at.text_input(key="sb-opts").set_value("channels=(8,16,32,64) layers=(1,1,1,1)").run()
    at.button(key="sb-run").click().run()
    ok(at)
    assert not errors(at), errors(at)
    metric(at, "Shape bias")
    assert any(w.value.startswith("UNTRAINED") for w in at.warning), [w.value for w in at.warning]
    summary = json.loads(next((app_env / "app-runs").glob("shape-bias-replknet_3-*/summary.json")).read_text())
    assert summary["random_weights"] is True and summary["seed"] == 5 and summary["label"].endswith("(random init)")
    hint = next(c.value for c in at.code if "shape-bias --model" in c.value)  # the CLI refuses it without the option
    assert hint.endswith("--weights epoch_000.safetensors --allow-random --out runs/shape-bias"), hint


def _shape_bias_results_page() -> AppTest:
    """The Shape bias page, switched to 'Load results'."""
    at = ok(new_app().run())
    at.switch_page("views/shape_bias.py").run()
    at.radio(key="sb-mode").set_value("Load results").run()
    return at


def test_shape_bias_page_load_results_bad_folders(app_env):
    """Loading a folder that is no shape-bias run gives one readable line (no NameError / FileNotFoundError from
    the sections that need the summary); a summary of an older version without decisions.csv or stimulus folder
    still shows its numbers, and the stimulus browser says in one line what it lacks."""
    import json

    at = _shape_bias_results_page()
    (app_env / "empty").mkdir()
    (app_env / "broken").mkdir()
    (app_env / "broken" / "summary.json").write_text("{not json")
    for name in ("empty", "broken"):
        at.text_input(key="sb-dir").set_value(str(app_env / name)).run()
        ok(at)
        assert len(errors(at)) == 1 and errors(at)[0].startswith("Shape-bias results: "), errors(at)
    (app_env / "old").mkdir()
    (app_env / "old" / "summary.json").write_text(json.dumps({"shape_bias": 0.25, "n_conflict": 12}))
    at.text_input(key="sb-dir").set_value(str(app_env / "old")).run()
    ok(at)
    assert metric(at, "Shape bias") == "0.250" and metric(at, "Conflict images") == "12"
    assert errors(at) == ["Stimulus browser: this run has no decisions.csv (written by erf-lab shape-bias with "
                          "each run)"], errors(at)


def test_shape_bias_page_loads_a_cue_world_probe_run(app_env):
    """A run of `erf-lab shape-bias --stimuli cue-world` (the command the page gives for a shipped model) loaded as
    Geirhos results: "Humans n/a", no hits, an empty per-category table, "no consistency results (older run, or no
    human data found)" and a stimulus browser error calling its decisions.csv "not an erf-lab decisions.csv". It is
    shown as the probe it is: its shape-only / texture-only accuracies, its per-class hits, and one line on why no
    human sections follow."""
    import json

    from erf_lab.cli.main import main

    out = app_env / "cue-world-run"
    assert main(["shape-bias", "--stimuli", "cue-world", "--model", "replknet_3", "--weights",
                 "builtin:cue-world/K3-seed0", "--limit", "16", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    at = _shape_bias_results_page()
    at.text_input(key="sb-dir").set_value(str(out)).run()
    ok(at)
    assert not errors(at), errors(at)
    assert metric(at, "Shape bias") == f"{summary['shape_bias']:.3f}"
    assert metric(at, "Shape-only accuracy") == f"{summary['shape_only_accuracy']:.1%}"
    assert metric(at, "Texture-only accuracy") == f"{summary['texture_only_accuracy']:.1%}"
    assert not [m for m in at.metric if m.label == "Humans"]
    assert any(i.value.startswith("A cue-world probe") for i in at.info), [i.value for i in at.info]
    table = at.dataframe[0].value
    assert len(table) == len(summary["per_class"]) and table["shape hits"].sum() == summary["shape_hits"]
    assert table["texture hits"].sum() == summary["texture_hits"] and table["class"][0] == summary["classes"][0]
    assert not any("Consistency" in h.value or "Stimuli" in h.value for h in at.subheader)


def test_shape_bias_page_names_a_damaged_decisions_csv(app_env):
    """A decisions.csv that is not UTF-8 text, or has none of the columns erf-lab writes, is one line naming the
    file in the stimulus browser (it was 'failed: UnicodeDecodeError' without the file, or silently 0 images);
    the summary's numbers are still shown."""
    import json

    at = _shape_bias_results_page()
    for name, data in (("binary", b"set,image\n\x00\xff\xfe junk"), ("columns", b"a,b\n1,2\n")):
        d = app_env / name
        d.mkdir()
        (d / "summary.json").write_text(json.dumps({"shape_bias": 0.25, "n_conflict": 12}))
        (d / "decisions.csv").write_bytes(data)
        at.text_input(key="sb-dir").set_value(str(d)).run()
        ok(at)
        assert metric(at, "Shape bias") == "0.250"
        assert len(errors(at)) == 1, errors(at)
        assert errors(at)[0].startswith("Stimulus browser: ") and "decisions.csv: not an erf-lab decisions.csv" \
            in errors(at)[0] and "failed" not in errors(at)[0], errors(at)


def test_shape_bias_page_offers_no_symlinked_file(app_env):
    """A loaded results folder whose decisions.csv / shape_bias.pdf are symlinks to other server files offered them
    as downloads (the Results page offers no symlink); now only the folder's own files are shown and offered."""
    import json

    secret = app_env / "secret.txt"
    secret.write_text("not for download")
    d = app_env / "linked"
    d.mkdir()
    (d / "summary.json").write_text(json.dumps({"shape_bias": 0.25, "n_conflict": 12}))
    (d / "shape_bias.png").write_bytes((REPO_ROOT / "data" / "trained" / "cue-world" / "family.png").read_bytes())
    (d / "shape_bias.pdf").symlink_to(secret)
    (d / "decisions.csv").symlink_to(secret)
    at = _shape_bias_results_page()
    at.text_input(key="sb-dir").set_value(str(d)).run()
    ok(at)
    assert metric(at, "Shape bias") == "0.250"
    labels = {b.proto.label for b in at.get("download_button")}
    assert "shape_bias.png" in labels and not labels & {"shape_bias.pdf", "decisions.csv"}, labels


def test_shape_bias_page_browses_no_symlinked_decisions_csv(app_env):
    """The stimulus browser read a decisions.csv that is a symlink (to another folder's decisions.csv, anywhere on
    the server) and listed its rows, although the page shows and offers no symlinked file; it is refused now."""
    import json

    stim = app_env / "stim" / "cat"
    stim.mkdir(parents=True)
    other = app_env / "other"
    other.mkdir()
    (other / "decisions.csv").write_text("set,image,shape,texture,decision\ncue-conflict,cat1-dog2.png,cat,dog,cat\n")
    d = app_env / "linked-decisions"
    d.mkdir()
    (d / "summary.json").write_text(json.dumps({"shape_bias": 0.25, "n_conflict": 12,
                                                "stimuli_dir": str(app_env / "stim")}))
    (d / "decisions.csv").symlink_to(other / "decisions.csv")
    at = _shape_bias_results_page()
    at.text_input(key="sb-dir").set_value(str(d)).run()
    ok(at)
    assert metric(at, "Shape bias") == "0.250"
    assert errors(at) == ["Stimulus browser: this run has no decisions.csv (written by erf-lab shape-bias with "
                          "each run): it is a symlink, not the folder's own file"], errors(at)
    assert not any("of 1 images" in c.value for c in at.caption), [c.value for c in at.caption]


def test_shape_bias_page_refuses_impossible_numbers(app_env):
    """A summary.json holding values no run writes (a shape bias or hit fraction outside [0, 1], NaN, a negative
    count, a malformed interval or table) is refused in one line naming the field, before any number is shown,
    instead of showing 'Shape bias 1.700' and '250.0 %' hits, or failing with a ValueError / IndexError."""
    import json

    at = _shape_bias_results_page()
    good = {"shape_bias": 0.25, "n_conflict": 12, "shape_bias_ci95": [0.1, 0.5],
            "per_category": {"cat": {"n": 3, "shape_hits": 1, "texture_hits": 2, "shape_bias": 1 / 3}}}
    for name, change, field in (("above", {"shape_bias": 1.7}, "shape_bias is 1.7"),
                                ("nan", {"shape_bias": float("nan")}, "shape_bias is NaN"),
                                ("hits", {"fraction_shape_or_texture_hits": 2.5},
                                 "fraction_shape_or_texture_hits is 2.5"),
                                ("count", {"n_conflict": -3}, "n_conflict is -3"),
                                ("ci", {"shape_bias_ci95": [0.1]}, "shape_bias_ci95 is [0.1]"),
                                ("cat", {"per_category": {"cat": {"n": 3, "shape_bias": 1.5}}},
                                 "per_category.cat.shape_bias is 1.5"),
                                ("human", {"human_reference": "x"}, 'human_reference is "x"')):
        (app_env / name).mkdir()
        (app_env / name / "summary.json").write_text(json.dumps({**good, **change}))
        at.text_input(key="sb-dir").set_value(str(app_env / name)).run()
        ok(at)
        assert errors(at) == [f"Shape-bias results: {app_env / name / 'summary.json'}: {field}: not a value an "
                              "'erf-lab shape-bias' run writes (a damaged or edited file)"], errors(at)
        assert not at.metric
    (app_env / "good").mkdir()
    (app_env / "good" / "summary.json").write_text(json.dumps(good))
    at.text_input(key="sb-dir").set_value(str(app_env / "good")).run()
    ok(at)
    assert metric(at, "Shape bias") == "0.250" and metric(at, "Conflict images") == "12"


def test_kernels_page_explain_and_small_benchmark(app_env):
    at = ok(new_app().run())
    at.switch_page("views/kernels.py").run()
    ok(at)
    assert any("-> backend" in c.value for c in at.code)
    at.text_input(key="kb-ks").set_value("3,31,3")  # a repeated size is measured once
    at.text_input(key="kb-res").set_value("16")
    at.select_slider(key="kb-ch").set_value(16)
    at.button(key="kb-run").click().run()
    ok(at)
    assert not errors(at), errors(at)
    table = at.dataframe[0].value
    assert list(table["K"]) == [3, 31]
    assert (table["fwd_fastconv_ms"] > 0).all()
    assert len(at.image) == 1
    assert not at.info
    # R = 16, K = 31: (16 / 31)^2 of the nominal products meet the map; the rates say so, as the CLI's table does
    assert any("at R=16, K=31 only 26.6 % of them meet the map" in c.value for c in at.caption), at.caption
    # settings changed without a new run: the table shown is the last run's, and the page says so (it did not)
    at.text_input(key="kb-ks").set_value("5").run()
    ok(at)
    assert list(at.dataframe[0].value["K"]) == [3, 31]
    assert [i.value for i in at.info] == ["Shown: the last benchmark run (kernel sizes 3,31, resolutions 16, 16 "
                                          "channels), not the settings above; press **Run benchmark** to measure "
                                          "those."], [i.value for i in at.info]


def test_kernels_page_bounds_the_live_benchmark(app_env):
    """An even or huge kernel, or a resolution whose tensors would fill the server's memory (a typo such as
    '1632'), gets one readable line instead of a ValueError or an hour-long / out-of-memory run."""
    at = ok(new_app().run())
    at.switch_page("views/kernels.py").run()
    for ks, rs in (("3,4", "16"), ("3,301", "16"), ("3", "1632")):
        at.text_input(key="kb-ks").set_value(ks)
        at.text_input(key="kb-res").set_value(rs).run()
        ok(at)
        assert [e for e in errors(at) if e.startswith("Benchmark: the live benchmark takes odd kernel sizes up to 31 "
                                                      "and resolutions up to 128")], errors(at)
        assert not at.dataframe


def test_kernels_page_loads_saved_results_and_refuses_damaged_ones(app_env):
    """Saved `fastconv.bench --out` results show as table and figure; a results.json whose rows lack R / K, hold no
    rows, or a latency that is no positive number gets one line naming the row, not 'Benchmark failed: KeyError: 'R''
    or a log-scale figure of negative times."""
    import json

    from fastconv import bench

    bench.write_results(bench.run(kernels=(3,), resolutions=(8,), channels=4, layers=1, repeats=1, warmup=0,
                                  modes=("fwd",), show_progress=False), app_env / "bench")
    at = ok(new_app().run())
    at.switch_page("views/kernels.py").run()
    at.radio(key="kb-mode").set_value("Load saved results").run()
    at.text_input(key="kb-dir").set_value(str(app_env / "bench")).run()
    ok(at)
    assert not errors(at), errors(at)
    assert list(at.dataframe[0].value["K"]) == [3] and len(at.image) == 1
    saved = json.loads((app_env / "bench" / "results.json").read_text())
    row = saved["rows"][0]
    for name, rows, words in (("no-keys", [{"x": 1}], "row 1 has no resolution R and kernel size K"),
                              ("no-rows", [], "does not hold benchmark rows"),
                              ("text-row", ["a"], "row 1 has no resolution R and kernel size K"),
                              ("negative", [{**row, "fwd_fastconv_ms": -1.0}],
                               "row 1 (R = 8, K = 3): fwd_fastconv_ms is -1.0, not a latency")):
        (app_env / name).mkdir()
        (app_env / name / "results.json").write_text(json.dumps({**saved, "rows": rows}))
        at.text_input(key="kb-dir").set_value(str(app_env / name)).run()
        ok(at)
        assert len(errors(at)) == 1 and errors(at)[0].startswith("Benchmark: ") and words in errors(at)[0], errors(at)
        assert "failed" not in errors(at)[0] and not at.dataframe and not at.image


def _gaussian(size: int, sigma: float) -> np.ndarray:
    y, x = np.mgrid[:size, :size] - size // 2
    return np.exp(-(x ** 2 + y ** 2) / (2 * sigma ** 2))


def test_results_page_compares_runs_and_offers_downloads(app_env):
    from erf_lab.erf.metrics import compute_metrics, summary
    from erf_lab.erf.rundir import write_run_dir

    root = app_env / "runs"
    for name, sigma in (("narrow", 3.0), ("wide", 12.0)):
        write_run_dir(root / name, _gaussian(65, sigma), {"label": name, "model": "synthetic", "num_used": 1,
                                                           "input_size": 65})
    at = ok(new_app().run())
    at.switch_page("views/results.py").run()
    at.text_input(key="res-root").set_value(str(root)).run()
    ok(at)
    at.multiselect(key="res-chosen-erf").set_value(["narrow", "wide"]).run()
    ok(at)
    assert not errors(at), errors(at)
    table = at.dataframe[0].value
    expect = {n: summary(compute_metrics(_gaussian(65, s)))["area@50%"] for n, s in (("narrow", 3.0), ("wide", 12.0))}
    got = dict(zip(table["label"], table["area@50%"]))
    assert got["narrow"] == pytest.approx(expect["narrow"]) and got["wide"] == pytest.approx(expect["wide"])
    assert got["wide"] > got["narrow"]
    labels = {b.proto.label for b in at.get("download_button")}
    assert {"PNG", "PDF", "SVG", "erf.npy", "metrics.json", "run.json", "erf.png"} <= labels

    at.text_input(key="res-root").set_value("/etc").run()
    ok(at)
    assert errors(at) == ["Folder: " + refusal("results folder", "/etc")], errors(at)


def test_results_page_says_what_each_app_run_measured(app_env):
    """The app writes its ERF runs into folders named by a hash (erf-3f9c...), and the Results page listed only those
    names: which one held the K = 31 map, or the random init, was found only by opening each. Each is listed with
    what its run.json says it measured (label, size, images, layer, random init marked)."""
    from app import cache

    cache._store.clear()  # results kept in memory by earlier tests would point at their own run folders
    at = ok(new_app().run())
    at.radio(key="erf-init-1").set_value("random").run()  # the shipped K3 and K31, then K31-29-27-13 at random init
    ok(at)
    at.switch_page("views/results.py").run()
    ok(at)
    assert not errors(at), errors(at)
    shown = at.multiselect(key="res-chosen-erf").options
    assert len(shown) == 3 and all(re.fullmatch(r"erf-[0-9a-f]{16} · .+", o) for o in shown), shown
    assert sorted(o.split(" · ", 1)[1] for o in shown) == sorted([
        "K3-seed0 · trained (cue-world) · re-param · forward_features, 128x128 px, 4 images",
        "K31-seed0 · trained (cue-world) · re-param · forward_features, 128x128 px, 4 images",
        "replknet_31b · K31-29-27-13 · tiny · re-param (random init) · forward_features, 128x128 px, 4 images"])


def test_pages_say_which_weights_of_an_uploaded_checkpoint_loaded(app_env):
    """An uploaded checkpoint holding raw and EMA weights (``module.`` keys, as DDP saves them) loads its raw
    weights, which run.json records (weights_selection), but the app said so nowhere: the warning went to the server
    log, and the explorer, the Results page and its compare table showed the ERF as of "the checkpoint". Each now
    says which part loaded, and a run of a plain file says nothing."""
    import io
    import json

    import torch

    from erf_lab.models import create_model

    options = {"channels": (8, 8, 8, 8), "layers": (1, 1, 1, 1)}
    torch.manual_seed(0)
    raw, ema = (create_model("replknet_31b", large_kernel_sizes=(3, 3, 3, 3), small_kernel=None,
                             **options).state_dict() for _ in range(2))
    buf = io.BytesIO()
    torch.save({"model": {f"module.{k}": v for k, v in raw.items()}, "model_ema": ema}, buf)
    loaded = "checkpoint['model'] (passed over: 'model_ema'), prefix module. stripped"
    at = ok(new_app().run())
    assert not any(c.value.startswith("Weights loaded") for c in at.caption)  # the shipped files: whole files
    at.number_input(key="erf-ncfg").set_value(1).run()
    at.number_input(key="erf-img-cue").set_value(2).run()
    at.radio(key="erf-init-0").set_value("random").run()
    at.text_input(key="erf-opts-0").set_value("channels=(8,8,8,8) layers=(1,1,1,1)").run()
    at.file_uploader(key="erf-ckpt-0").set_value([("ddp-ema.pth", buf.getvalue(), "application/octet-stream")]).run()
    at.button(key="erf-run").click().run()
    ok(at)
    assert not errors(at), errors(at)
    assert [c.value for c in at.caption if c.value.startswith("Weights loaded")] == [f"Weights loaded: {loaded}"]

    run_dir = next(d for d in (app_env / "app-runs").glob("erf-*")
                   if json.loads((d / "run.json").read_text()).get("weights_selection"))
    assert json.loads((run_dir / "run.json").read_text())["weights_selection"] == {
        "entry": ["model"], "passed_over": ["model_ema"], "prefix_stripped": ["module."], "part": None, "left_out": 0}
    at.switch_page("views/results.py").run()
    at.text_input(key="res-root").set_value(str(run_dir)).run()
    ok(at)
    assert not errors(at), errors(at)
    assert f"Weights loaded: {loaded} (weights_selection)" in [c.value for c in at.caption]
    label = at.dataframe[0].value["label"][0]
    assert any(f"Weights loaded from the checkpoint files: {label}: {loaded}." in c.value for c in at.caption), \
        [c.value for c in at.caption]
    plain = next(d for d in (app_env / "app-runs").glob("erf-*") if d != run_dir)  # the shipped K3-seed0's run
    at.text_input(key="res-root").set_value(str(plain)).run()
    ok(at)
    assert not any("Weights loaded" in c.value for c in at.caption), [c.value for c in at.caption]


def test_results_page_chooses_the_first_run_of_a_newly_typed_folder(app_env):
    """The page opens with the first run of its folder chosen; typing another folder left nothing chosen (the old
    choice is none of its runs) and showed an empty page. The new folder's first run is chosen now, and a choice
    made in a folder is kept while the folder stays."""
    from erf_lab.erf.rundir import write_run_dir

    write_run_dir(app_env / "app-runs" / "mine", _gaussian(65, 6.0), {"label": "mine", "model": "m", "num_used": 1,
                                                                     "input_size": 65}, formats=("png",))
    other = app_env / "other"
    for name in ("a", "b"):
        write_run_dir(other / name, _gaussian(65, 4.0), {"label": name, "model": "m", "num_used": 1,
                                                         "input_size": 65}, formats=("png",))
    at = ok(new_app().run())
    at.switch_page("views/results.py").run()
    ok(at)
    # the landing page's own runs may come first; an option is the folder's name, then what its run measured
    first = at.multiselect(key="res-chosen-erf").options[0].split(" · ")[0]
    assert at.multiselect(key="res-chosen-erf").value == [first] and len(at.dataframe) == 1
    at.text_input(key="res-root").set_value(str(other)).run()
    ok(at)
    assert at.multiselect(key="res-chosen-erf").value == ["a"], at.multiselect(key="res-chosen-erf").value
    assert len(at.dataframe) == 1 and at.dataframe[0].value["label"][0] == "a"
    at.multiselect(key="res-chosen-erf").set_value(["b"]).run()
    at.run()
    assert at.multiselect(key="res-chosen-erf").value == ["b"]


def test_results_page_says_when_its_run_list_is_cut(app_env, monkeypatch):
    """The page lists at most MAX_RUNS result directories of a folder; a folder with more (a few sweeps hold
    hundreds of runs) lost the rest without a word. It now says the list may be cut and how to see the rest."""
    from app import runs

    monkeypatch.setattr(runs, "MAX_RUNS", 3)
    root = app_env / "many"
    for i in range(4):
        (root / f"r{i}").mkdir(parents=True)
        np.save(root / f"r{i}" / "erf.npy", np.ones((9, 9)))
    at = ok(new_app().run())
    at.switch_page("views/results.py").run()
    at.text_input(key="res-root").set_value(str(root)).run()
    ok(at)
    assert at.multiselect(key="res-chosen-erf").options == ["r0", "r1", "r2"]
    assert any(i.value.startswith("Listing the first 3 result directories") for i in at.info), at.info
    at.text_input(key="res-root").set_value(str(root / "r3")).run()
    ok(at)
    assert not any(i.value.startswith("Listing the first") for i in at.info), at.info


def test_an_all_zero_erf_map_is_flagged(app_env):
    """A map with no gradient at all (weights that are all zeros; an erf.npy of zeros) has no area or radius: the
    explorer and the Results page say so instead of showing n/r areas and blank radii as if measured."""
    import io

    import torch

    from app.erf_maps import EMPTY_MAP_NOTE
    from erf_lab.erf.rundir import write_run_dir
    from erf_lab.models import create_model

    net = create_model("replknet_31b", channels=models.TINY_CHANNELS, layers=models.TINY_LAYERS,
                       large_kernel_sizes=(3, 3, 3, 3), small_kernel=None)
    buf = io.BytesIO()
    torch.save({k: v if k.endswith("running_var") or not v.is_floating_point() else torch.zeros_like(v)
                for k, v in net.state_dict().items()}, buf)
    at = ok(new_app().run())
    at.number_input(key="erf-ncfg").set_value(1).run()
    at.radio(key="erf-init-0").set_value("random").run()
    at.file_uploader(key="erf-ckpt-0").set_value([("zeros.pth", buf.getvalue(), "application/octet-stream")]).run()
    at.button(key="erf-run").click().run()
    ok(at)
    assert not errors(at), errors(at)
    assert [w.value for w in at.warning] == [EMPTY_MAP_NOTE], [w.value for w in at.warning]
    assert metric(at, "Area @50%") == "n/r" and at.dataframe[0].value["area@50%"][0] == "n/r"

    root = app_env / "runs"
    write_run_dir(root / "good", _gaussian(65, 6.0), {"label": "good", "model": "m", "num_used": 1, "input_size": 65})
    (root / "zero").mkdir()
    np.save(root / "zero" / "erf.npy", np.zeros((65, 65)))
    at.switch_page("views/results.py").run()
    at.text_input(key="res-root").set_value(str(root)).run()
    at.multiselect(key="res-chosen-erf").set_value(["good", "zero"]).run()
    ok(at)
    assert not errors(at), errors(at)
    assert [w.value for w in at.warning] == [f"zero: {EMPTY_MAP_NOTE}"], [w.value for w in at.warning]


def test_results_page_table_is_the_compare_table(app_env):
    """The Results page shows `erf-lab compare`'s table: metrics recomputed from erf.npy (a run of an older version
    without metrics.json, or with a corrupt one, still gets them), an untrained run marked (random init), and maps
    of different sizes with their area ratios marked n/c (fractions of different images) and no joint heatmap."""
    from erf_lab.erf.analysis import compare
    from erf_lab.erf.rundir import write_run_dir

    root = app_env / "runs"
    write_run_dir(root / "trained", _gaussian(65, 6.0), {"label": "net", "model": "m", "num_used": 1, "input_size": 65})
    write_run_dir(root / "untrained", _gaussian(65, 3.0), {"label": "net", "model": "m", "num_used": 1,
                                                           "input_size": 65, "random_init": True})
    write_run_dir(root / "old", _gaussian(129, 6.0), {"label": "old", "model": "m", "num_used": 1, "input_size": 129})
    (root / "old" / "metrics.json").unlink()
    at = ok(new_app().run())
    at.switch_page("views/results.py").run()
    at.text_input(key="res-root").set_value(str(root)).run()

    for chosen in (["trained", "untrained"], ["old"], ["trained", "old"]):
        at.multiselect(key="res-chosen-erf").set_value(chosen).run()
        ok(at)
        assert not errors(at), errors(at)
        shown = at.dataframe[0].value
        cli = compare([root / n for n in chosen], out=app_env / "cmp" / "-".join(chosen), formats=("png",))["rows"]
        assert list(shown["label"]) == [r["label"] for r in cli]  # measured rows, then the paper's (same sizes)
        for col in ("r_rms", "area@50%"):
            assert list(shown[col][:len(chosen)]) == pytest.approx([r[col] for r in cli[:len(chosen)]]), col
    assert list(shown["area@50%"][:2]) == ["n/c", "n/c"] and len(at.image) == 0  # mixed sizes
    assert any("differ in size" in i.value for i in at.info), [i.value for i in at.info]
    at.multiselect(key="res-chosen-erf").set_value(["trained", "untrained"]).run()
    assert list(at.dataframe[0].value["label"][:2]) == ["net (trained)", "net (untrained) (random init)"]
    assert at.dataframe[0].value["r_rms"][0] > at.dataframe[0].value["r_rms"][1] > 0
    at.session_state["res-kind"] = None  # the selected kind clicked again
    at.run()
    ok(at)
    assert not at.multiselect and any("Choose a kind" in i.value for i in at.info)


def test_results_page_lists_compare_and_timeline_folders(app_env):
    """`erf-lab compare --out DIR` (compare.json) and a timeline folder (timeline.json) hold figures and tables but
    no run.json: the Results page said 'No result directories' for them. They are listed by their record, as the CLI
    tells them, with their figure, table and downloads; a stray compare.json of another program is not."""
    import json

    from erf_lab.erf.analysis import compare
    from erf_lab.erf.rundir import write_run_dir

    root = app_env / "runs"
    write_run_dir(root / "erf" / "a", _gaussian(65, 6.0), {"label": "a", "model": "m", "num_used": 1,
                                                           "input_size": 65}, formats=("png",))
    cli = compare([root / "erf" / "a"], out=root / "cmp", formats=("png", "pdf"))
    (root / "tl").mkdir()
    (root / "tl" / "timeline.json").write_text(json.dumps({"run": "/x/train", "rows": [], "complete": True}))
    (root / "stray").mkdir()
    (root / "stray" / "compare.json").write_text(json.dumps({"something": "else"}))
    at = ok(new_app().run())
    at.switch_page("views/results.py").run()
    at.text_input(key="res-root").set_value(str(root)).run()
    ok(at)
    assert not errors(at) and not at.info, (errors(at), [i.value for i in at.info])
    kinds = at.segmented_control(key="res-kind").options
    assert {"compare", "timeline"} <= set(kinds) and "run" not in kinds, kinds
    at.segmented_control(key="res-kind").set_value("compare").run()
    assert at.multiselect(key="res-chosen-compare").options == ["cmp"]
    at.multiselect(key="res-chosen-compare").set_value(["cmp"]).run()
    ok(at)
    assert not errors(at), errors(at)
    assert len(at.image) == 1 and at.dataframe[0].value["label"][0] == cli["rows"][0]["label"]
    labels = {b.proto.label for b in at.get("download_button")}
    assert {"compare.png", "compare.pdf", "compare.csv"} <= labels, labels
    at.segmented_control(key="res-kind").set_value("timeline").run()
    assert at.multiselect(key="res-chosen-timeline").options == ["tl"]


def test_results_page_shows_each_figure_of_a_run(app_env):
    """A shape-bias run holds two figures (shape_bias.png, model vs humans, and error_consistency.png); the page
    showed only the first by name, error_consistency.png, never the shape-bias figure. Each one is shown now."""
    import json

    d = app_env / "runs" / "sb"
    d.mkdir(parents=True)
    (d / "summary.json").write_text(json.dumps({"shape_bias": 0.25, "n_conflict": 12}))
    (d / "decisions.csv").write_text("set,image,shape,texture,decision\n")
    png = (REPO_ROOT / "data" / "trained" / "cue-world" / "family.png").read_bytes()
    for name in ("shape_bias.png", "error_consistency.png"):
        (d / name).write_bytes(png)
    at = ok(new_app().run())
    at.switch_page("views/results.py").run()
    at.text_input(key="res-root").set_value(str(app_env / "runs")).run()
    ok(at)
    assert at.segmented_control(key="res-kind").value == "shape-bias"
    at.multiselect(key="res-chosen-shape-bias").set_value(["sb"]).run()
    ok(at)
    assert not errors(at), errors(at)
    assert sorted(i.proto.imgs[0].caption for i in at.image) == ["error_consistency.png", "shape_bias.png"]


def test_results_page_marks_an_untrained_shape_bias_run(app_env):
    """A shape-bias run of random weights (summary.json random_weights; its run.json does not say) was listed and
    opened on the Results page as "mobilenetv2", like a trained one: only its figure's legend said random init,
    while an untrained ERF run is marked. It is marked in the list and warned about when opened now."""
    import json

    root = app_env / "runs"
    for name, random_weights in (("random", True), ("trained", False)):
        d = root / name
        d.mkdir(parents=True)
        (d / "summary.json").write_text(json.dumps({"shape_bias": 0.25, "n_conflict": 12, "model": "mobilenetv2",
                                                    "random_weights": random_weights}))
        (d / "decisions.csv").write_text("set,image,shape,texture,decision\n")
        (d / "run.json").write_text(json.dumps({"what": "erf-lab shape-bias", "model": "mobilenetv2",
                                                "seed": 0 if random_weights else None}))
    at = ok(new_app().run())
    at.switch_page("views/results.py").run()
    at.text_input(key="res-root").set_value(str(root)).run()
    ok(at)
    assert at.multiselect(key="res-chosen-shape-bias").options == ["random · mobilenetv2 (random init)",
                                                                   "trained · mobilenetv2"]
    for name, warned in (("random", True), ("trained", False)):
        at.multiselect(key="res-chosen-shape-bias").set_value([name]).run()
        ok(at)
        assert not errors(at), errors(at)
        assert any(w.value.startswith("UNTRAINED") for w in at.warning) is warned, name


def test_results_page_marks_a_threshold_not_reached(app_env):
    """An area the centred square never reaches inside the image is 'n/r' in erf-lab compare's table (and the
    explorer's); the Results page showed it as an empty NaN cell, as if the number were missing."""
    from erf_lab.erf.analysis import compare
    from erf_lab.erf.rundir import write_run_dir

    root = app_env / "runs"
    # the measured unit's centre near a corner: no centred square inside the image holds 99 % of a flat map
    write_run_dir(root / "off", np.ones((65, 65)), {"label": "off", "model": "m", "num_used": 1, "input_size": 65,
                                                    "erf_centre": [10, 10]}, formats=("png",), centre=[10, 10])
    cli = compare([root / "off"], out=app_env / "cmp", formats=("png",))
    assert cli["rows"][0]["area@99%"] is None and "| n/r |" in cli["markdown"]
    at = ok(new_app().run())
    at.switch_page("views/results.py").run()
    at.text_input(key="res-root").set_value(str(root)).run()
    ok(at)
    assert not errors(at), errors(at)
    shown = at.dataframe[0].value
    assert shown["area@99%"][0] == "n/r" and shown["label"][0] == "off"
    assert shown["r_rms"][0] == pytest.approx(cli["rows"][0]["r_rms"])
    # the paper's rows keep their numbers
    assert float(shown["area@99%"][1]) == pytest.approx(cli["rows"][1]["area@99%"])


def test_results_page_says_a_sweep_is_incomplete(app_env):
    """A sweep stopped half way has its sweep.json from the start (complete: false): the page lists it but says it
    is incomplete (how much was measured, and that its command finishes it); a finished one gets no such line."""
    import json

    root = app_env / "runs"
    base = {"command": "sweep", "argv": ["erf-lab", "sweep"], "members": ["K3-deploy", "K5-deploy"]}
    for name, complete, rows in (("stopped", False, ["K3-deploy"]), ("done", True, ["K3-deploy", "K5-deploy"])):
        (root / name).mkdir(parents=True)
        (root / name / "sweep.json").write_text(json.dumps({"complete": complete, **base, "rows": [
            {"run_dir": r} for r in rows]}))
    at = ok(new_app().run())
    at.switch_page("views/results.py").run()
    at.text_input(key="res-root").set_value(str(root)).run()
    ok(at)
    at.multiselect(key="res-chosen-sweep").set_value(["done", "stopped"]).run()
    ok(at)
    warnings = [w.value for w in at.warning]
    assert len(warnings) == 1 and warnings[0].startswith("Incomplete: an ERF sweep that was interrupted or is still "
                                                         "running") and "1 of 2 measured" in warnings[0], warnings
    assert "run its command again" in warnings[0]


def test_results_page_names_a_table_that_is_no_csv(app_env):
    """A benchmark folder whose table.csv is binary garbage was shown as a one-column table of junk with no word; a
    CSV pandas cannot parse ended the run's panel. Each gets one line naming the file and shows nothing as data; a
    good table beside them is still shown."""
    import json

    root = app_env / "runs"
    for name, table in (("garbage", b"\x00\x01garbage"), ("latin1", b"K,ms\n3,\xe9\n"),
                        ("ragged", b"K,ms\n3,0.5\n5,0.7,9,9\n"), ("good", b"K,ms\n3,0.5\n5,0.7\n")):
        (root / name).mkdir(parents=True)
        (root / name / "results.json").write_text(json.dumps({"rows": []}))
        (root / name / "table.csv").write_bytes(table)
    at = ok(new_app().run())
    at.switch_page("views/results.py").run()
    at.text_input(key="res-root").set_value(str(root)).run()
    ok(at)
    assert at.segmented_control(key="res-kind").value == "benchmark"
    for name, words in (("garbage", "garbage/table.csv is not a CSV table (binary or not UTF-8 text)"),
                        ("latin1", "latin1/table.csv is not a CSV table (binary or not UTF-8 text)"),
                        ("ragged", "cannot read ragged/table.csv as a CSV table (Error tokenizing data")):
        at.multiselect(key="res-chosen-benchmark").set_value([name]).run()
        ok(at)
        assert len(errors(at)) == 1 and errors(at)[0].startswith(words), errors(at)
        assert errors(at)[0].endswith("nothing shown from it") and not at.dataframe
    at.multiselect(key="res-chosen-benchmark").set_value(["good"]).run()
    ok(at)
    assert not errors(at) and list(at.dataframe[0].value["K"]) == [3, 5]


# ------------------------------------------------------------------------------------------- input policy
def refusal(what: str, text: str) -> str:
    """The one message of a refused typed folder (missing and forbidden alike)."""
    with pytest.raises(ErfLabError) as e:
        safety.safe_directory(text, what)
    return str(e.value)


def test_safe_directory_policy(tmp_path, monkeypatch):
    monkeypatch.delenv("ERF_LAB_APP_ROOTS", raising=False)
    monkeypatch.delenv("ERF_LAB_APP_RUNS", raising=False)
    monkeypatch.chdir(REPO_ROOT)
    assert safety.safe_directory("data") == (REPO_ROOT / "data").resolve()
    with pytest.raises(ErfLabError, match="enter a folder path"):
        safety.safe_directory("")
    outside = tmp_path / "imgs"
    outside.mkdir()
    (outside / "link").symlink_to("/etc")
    (outside / "file.txt").write_text("x")
    # Missing, a file, a system directory (also through a symlink), outside the roots, a NUL byte: one message
    # that does not tell whether the server path exists.
    cases = ["/etc", "/proc/self", "/etc-missing", str(tmp_path / "missing"), str(outside / "link"),
             str(outside / "file.txt"), "bad\x00path"]
    if not any(safety._is_within(outside.resolve(), r) for r in safety.allowed_roots()):
        cases.append(str(outside))
    shapes = {refusal("image folder", t).replace(repr(t), "<typed>") for t in cases}
    assert shapes == {"cannot open image folder <typed>: not a readable folder the app may use (under the working "
                      "directory, your home, data/, the datasets root or $ERF_LAB_APP_ROOTS; never a system "
                      "directory)"}, shapes
    monkeypatch.setenv("ERF_LAB_APP_ROOTS", str(tmp_path))
    assert safety.safe_directory(str(outside)) == outside.resolve()
    with pytest.raises(ErfLabError, match="cannot open"):  # symlinks are resolved before the check
        safety.safe_directory(str(outside / "link"))
    with pytest.raises(ErfLabError, match="no images"):
        safety.image_files(outside)


def test_an_image_in_a_linked_folder_outside_the_typed_folder_is_refused(tmp_path):
    """Links to folders are followed (as torchvision does); one that leads out of the typed folder is refused as a
    link to a file outside it is, naming the path in the folder; one inside the folder is read."""
    from PIL import Image

    outside, folder = tmp_path / "elsewhere", tmp_path / "mine"
    (folder / "inside").mkdir(parents=True)
    outside.mkdir()
    Image.new("RGB", (8, 8)).save(outside / "private.png")
    Image.new("RGB", (8, 8)).save(folder / "inside" / "a.png")
    (folder / "more").symlink_to(folder / "inside")
    assert [p.relative_to(folder).as_posix() for p in safety.image_files(folder)] == ["inside/a.png", "more/a.png"]
    (folder / "other").symlink_to(outside)
    with pytest.raises(ErfLabError) as e:
        safety.image_files(folder)
    assert str(e.value) == ("other/private.png in the image folder lies in a linked folder outside it; the app reads "
                            "only files inside the folder you typed (copy the image in)")


def test_upload_checks():
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 6), (200, 10, 10)).save(buf, format="PNG")
    img = safety.verify_image_bytes("red.png", buf.getvalue())
    assert img.size == (8, 6) and img.mode == "RGB"
    with pytest.raises(ErfLabError, match="not a valid image") as e:
        safety.verify_image_bytes("evil.png", b"#!/bin/sh\nrm -rf /\n")
    assert str(e.value) == "evil.png: not a valid image (UnidentifiedImageError: cannot identify image file)"
    with pytest.raises(ErfLabError, match="not a valid image"):
        safety.verify_image_bytes("cut.png", buf.getvalue()[:40])  # truncated
    with pytest.raises(ErfLabError, match="over the"):
        safety.verify_image_bytes("big.png", b"0" * (safety.MAX_IMAGE_MB * 2**20 + 1))
    good, skipped = safety.split_uploads([("a.png", buf.getvalue()), ("b.png", b"no"), ("c.png", buf.getvalue())])
    assert [n for n, _ in good] == ["a.png", "c.png"] and [n for n, _ in skipped] == ["b.png"]
    assert skipped[0][1].startswith("not a valid image (UnidentifiedImageError")
    with pytest.raises(ErfLabError, match="none of the 2 uploaded image"):
        safety.split_uploads([("b.png", b"no"), ("d.png", b"")])
    with pytest.raises(ErfLabError, match="must be"):
        safety.check_checkpoint_upload("model.py", 10)
    with pytest.raises(ErfLabError, match="limit"):
        safety.check_checkpoint_upload("big.pth", (safety.MAX_CHECKPOINT_MB + 1) * 2**20)
    safety.check_checkpoint_upload("w.safetensors", 1000)


def test_app_never_offers_module_factory_models():
    assert all(":" not in m for m in models.registered_models())
    with pytest.raises(ErfLabError, match="registered"):
        models.build_model("os:system")


def test_uploaded_checkpoint_keeps_its_trained_classifier(tmp_path):
    """The shape-bias and re-param pages classify with the upload's own head (it fits the model); only a head of
    another class count is replaced by the model's."""
    import io
    import json

    import torch

    from erf_lab.models import create_model

    ov = dict(channels=[8, 8, 8, 16], layers=[1, 1, 1, 1], num_classes=10)
    torch.manual_seed(1)
    src = create_model("replknet_31b", **ov)
    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)
    got = models.build_model("replknet_31b", json.dumps(ov), buf.getvalue(), "trained.pth")
    assert torch.equal(got.head.weight, src.head.weight) and torch.equal(got.head.bias, src.head.bias)
    other = models.build_model("replknet_31b", json.dumps({**ov, "num_classes": 4}), buf.getvalue(), "trained.pth")
    assert other.head.out_features == 4 and torch.equal(other.stem[0].conv.weight, src.stem[0].conv.weight)
    # shape bias classifies with the head: a 10-class upload on a 1000-class model is refused, not given a random one
    from app.shape_bias_runs import shape_bias_run

    with pytest.raises(ErfLabError, match=r"trained\.pth: classifier has 10 classes, the model 1000.*num_classes=10"):
        shape_bias_run("replknet_31b", pretrained=False, limit=2, weights=buf.getvalue(), weights_name="trained.pth",
                       overrides_json=json.dumps({k: v for k, v in ov.items() if k != "num_classes"}))


# ------------------------------------------------------------------------------------ loopback default
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening_addresses(port: int) -> set[str]:
    """Local addresses in LISTEN state on ``port`` (from /proc/net/tcp and tcp6)."""
    out = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            parts = line.split()
            addr, state = parts[1], parts[3]
            host, p = addr.rsplit(":", 1)
            if int(p, 16) == port and state == "0A":
                out.add(host)
    return out


def test_streamlit_run_binds_loopback_by_default(tmp_path):
    """`streamlit run app/main.py` with no --server.address, from another working directory, listens on
    127.0.0.1 only (app/.streamlit/config.toml, Streamlit's script-level config)."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMLIT_")}
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", str(APP), "--server.headless", "true",
                             "--server.port", str(port)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("streamlit did not answer on 127.0.0.1")
        hosts = _listening_addresses(port)
        assert hosts == {"0100007F"}, hosts  # 127.0.0.1 (little-endian hex), and nothing else
    finally:
        stop_process(proc)


def test_the_streamlit_floor_reads_the_apps_own_config():
    """app/.streamlit/config.toml (127.0.0.1 only) is read beside app/main.py from Streamlit 1.46 on (streamlit PR
    #10173: checked in the 1.45.1 and 1.46.0 wheels); with an older Streamlit, `streamlit run app/main.py` from the
    repository root served on every interface. setup.py's floor must not allow those."""
    import re

    floor = re.search(r'"streamlit>=([0-9.]+)"', (APP.parent.parent / "setup.py").read_text()).group(1)
    assert tuple(int(p) for p in floor.split(".")) >= (1, 46), floor
    assert 'address = "127.0.0.1"' in (APP.parent / ".streamlit" / "config.toml").read_text()


def test_integer_list_messages_say_what_is_expected():
    from app.ui import parse_int_tuple
    from erf_lab.errors import ErfLabError

    assert parse_int_tuple("31, 29 27;13") == (31, 29, 27, 13) and parse_int_tuple("7", n=3) == (7, 7, 7)
    for text, n, message in (("", None, "kernel sizes: expected comma-separated integers, got ''"),
                             ("1,2", 3, "kernel sizes: expected 3 comma-separated integers, got '1,2'")):
        with pytest.raises(ErfLabError) as e:
            parse_int_tuple(text, n=n, what="kernel sizes")
        assert str(e.value) == message


def _page_that_runs_out_of_memory():
    from app.ui import guard

    with guard("ERF"):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 602112000000 bytes. Error code 12 (Cannot allocate memory)")
    import streamlit as st

    st.write("the rest of the page")


def test_a_failed_allocation_is_named_in_the_app():
    """A page that asks torch for more memory than there is says so in one message (it showed the allocator's
    `[enforce fail at alloc_cpu.cpp:127]` line), and the rest of the page still renders."""
    at = AppTest.from_function(_page_that_runs_out_of_memory).run()
    assert not at.exception
    assert [e.value for e in at.error] == ["ERF: out of memory (602.1 GB requested); choose smaller sizes, a smaller "
                                          "batch or fewer images"]
    assert at.markdown[-1].value == "the rest of the page"


def test_explorer_label_says_pretrained_weights():
    """The explorer's pretrained toggle puts ``pretrained`` in the overrides: its label says so (a random init is
    marked separately), so two panels of the same model tell trained from untrained."""
    from app import erf_maps

    pre = {"model": "efficientnet_lite0", "overrides": models.overrides_key({"pretrained": True}),
           "reparameterize": True}
    assert erf_maps.spec_label(pre) == "efficientnet_lite0 · re-param · pretrained"
    assert "pretrained" not in erf_maps.spec_label({**pre, "overrides": models.overrides_key({})})


def test_a_reused_app_erf_run_takes_its_metrics_from_erf_npy(app_env):
    """The explorer / growth pages reuse a run directory of the app's run area (a restarted server, another
    session); its metrics were read from metrics.json, so a damaged one ended the page in 'TypeError: NoneType'
    (summary of None). They are run_erf's now: recomputed from erf.npy, as the CLI's reuses are."""
    from app import erf_maps

    spec = erf_maps.shipped_spec("K3-seed0", random_init=False, reparameterize=True, input_size=64, aggregate="relu")
    first = erf_maps._erf(spec, ("cue-world", 1), None, None, "reuse-test")
    (metrics,) = (app_env / "app-runs").glob("erf-*/metrics.json")
    metrics.write_text('{"shape": [64')
    again = erf_maps._erf(spec, ("cue-world", 1), None, None, "reuse-test")
    assert again["summary"] == first["summary"] and again["metrics"]["shape"] == [64, 64]



def _upload(*names: str) -> tuple:
    return ("upload", tuple((n, (REPO_ROOT / "data" / "default_images" / n).read_bytes()) for n in names), ())


def test_a_stored_upload_cut_short_is_written_again_not_measured(app_env):
    """The explorer's uploads were stored as PNG straight under their final names and reused whenever the name
    existed: a write cut short (the app stopped mid-save) left a truncated image that every later measurement of
    that upload read (skipped, or measured cut). Each stored file now appears only whole and is reused only when
    it is what was written: the truncated one is replaced, a killed write's temporary file removed, and the map
    equals the one measured from a clean store."""
    from PIL import Image

    from app import erf_maps

    source = _upload("astronaut.jpg", "brick.jpg")
    folder = Path(erf_maps._images_folder(source, 64))
    first, second = sorted(p.name for p in folder.glob("*.png"))
    whole = (folder / first).read_bytes()
    (folder / first).write_bytes(whole[:600])  # as a save cut short left it
    (folder / f".{second}.abcd1234.tmp.png").write_bytes(whole[:300])  # a killed atomic write's temporary file
    spec = erf_maps.shipped_spec("K3-seed0", reparameterize=True, input_size=64, aggregate="relu")
    cut = erf_maps._erf(spec, source, None, None, "store-cut")
    assert (folder / first).read_bytes() == whole and sorted(p.name for p in folder.iterdir()) == sorted(
        [first, second, ".stored.json"])
    for (name, data), stored in zip(source[1], (first, second)):
        assert np.array_equal(np.asarray(Image.open(folder / stored)),
                              np.asarray(safety.verify_image_bytes(name, data)))
    (folder / second).write_bytes(whole)  # a valid PNG, but not the upload's: not reused either
    erf_maps._images_folder(source, 64)
    assert np.array_equal(np.asarray(Image.open(folder / second)),
                          np.asarray(safety.verify_image_bytes(*source[1][1])))
    for p in folder.iterdir():
        p.unlink()
    clean = erf_maps._erf(spec, source, None, None, "store-clean")
    assert cut["num_used"] == clean["num_used"] == 2 and not cut["skipped"]
    assert np.array_equal(cut["erf"], clean["erf"]) and cut["summary"] == clean["summary"]


def test_stored_builtin_images_and_checkpoints_cut_short_are_written_again(app_env):
    """The chosen built-in photos (copied) and an uploaded checkpoint were stored the same way: a truncated copy
    under the stored name was reused for good. Each is checked against its content now and written again."""
    import io
    import json

    import torch

    from app import erf_maps
    from erf_lab.models import create_model

    folder = Path(erf_maps._images_folder(("builtin", ("brick.jpg",)), 64))
    source = (REPO_ROOT / "data" / "default_images" / "brick.jpg").read_bytes()
    (folder / "brick.jpg").write_bytes(source[:1000])
    assert Path(erf_maps._images_folder(("builtin", ("brick.jpg",)), 64)) == folder
    assert (folder / "brick.jpg").read_bytes() == source

    ov = dict(channels=[8, 8, 8, 16], layers=[1, 1, 1, 1], num_classes=10)
    buf = io.BytesIO()
    torch.save(create_model("replknet_31b", **ov).state_dict(), buf)
    weights = buf.getvalue()
    spec = {"model": "replknet_31b", "overrides": json.dumps(ov), "weights_name": "trained.pth"}
    path = Path(erf_maps._weights_file(spec, weights))
    assert path.read_bytes() == weights
    path.write_bytes(weights[: len(weights) // 2])
    assert Path(erf_maps._weights_file(spec, weights)) == path and path.read_bytes() == weights


def test_two_sessions_storing_one_upload_take_turns(app_env, monkeypatch):
    """Two sessions storing the same upload at once both found the file missing and both wrote it under its final
    name, one reading the other's half-written image. They take turns now: the second finds the first's files,
    whole and recorded, and encodes nothing again."""
    import threading
    import time

    from app import erf_maps

    real, calls = safety.verify_image_bytes, []

    def slow(name, data, *a, **kw):
        calls.append(name)
        time.sleep(0.3)
        return real(name, data, *a, **kw)

    monkeypatch.setattr(safety, "verify_image_bytes", slow)
    source = _upload("astronaut.jpg", "brick.jpg")
    folders, failures = [], []

    def session():
        try:
            folders.append(erf_maps._images_folder(source, 64))
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            failures.append(e)

    threads = [threading.Thread(target=session) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures and len(set(folders)) == 1, failures
    assert sorted(calls) == ["astronaut.jpg", "brick.jpg"]  # each image encoded once, by one session
    stored = sorted(Path(folders[0]).glob("*.png"))
    monkeypatch.setattr(safety, "verify_image_bytes", real)
    assert [p.read_bytes() for p in stored] == [erf_maps._png_bytes(*up) for up in source[1]]

def test_results_table_sends_not_reached_columns_as_text(app_env):
    """An ERF run with a threshold not reached ("n/r") beside the paper's numbers made a column of text and floats:
    Streamlit could not serialise it to Arrow, logged a traceback on every render and converted it itself
    (1.0 -> "1.0"). The column is now text, as in the explorer's table (erf_maps.nr_columns_as_text)."""
    import logging

    from erf_lab.erf.rundir import write_run_dir

    edge = np.ones((15, 15))
    edge[7, 14] = 1000.0  # centred at x = 2, no square inside the map reaches 99 %: not reached
    write_run_dir(app_env / "runs" / "edge", edge, {"label": "edge", "model": "synthetic", "num_used": 1,
                                                     "input_size": 15, "erf_centre": [7, 2]})
    logged = []
    handler = logging.Handler()
    handler.emit = lambda record: logged.append(record.getMessage())
    log = logging.getLogger("streamlit.dataframe_util")
    log.addHandler(handler)
    level = log.level
    log.setLevel(logging.INFO)
    try:
        at = ok(new_app())
        at.switch_page("views/results.py").run()
        at.text_input(key="res-root").set_value(str(app_env / "runs")).run()
        ok(at)
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    assert not errors(at), errors(at)
    assert not [m for m in logged if "Arrow" in m], logged
    table = at.dataframe[0].value
    assert list(table["area@99%"]) == ["n/r", "23.4", "34.9", "96.3", "98.6"]
    assert list(table["area@20%"])[1] == "1"  # the paper's 1.0 (ResNet-101), as .4g

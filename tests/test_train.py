"""erf-lab train: recipe numbers, run directory, official-layout checkpoints, exact resume, folder data, bad input."""
import csv
import json
import math
import os
import shutil
import warnings

import numpy as np
import pytest
import torch
from conftest import bad_idat_png
from PIL import Image

from erf_lab.cli.main import main
from erf_lab.errors import ErfLabError
from erf_lab.models import create_model
from erf_lab.train import checkpoints as C
from erf_lab.train.loop import train
from erf_lab.train.recipe import ModelEma, Recipe, lr_at, param_groups

TINY = {"channels": (8, 8, 16, 16), "layers": (1, 1, 1, 1), "large_kernel_sizes": (7, 7, 7, 3)}
TINY_CLI = ["--model", "replknet_31b", "--override", "channels=(8,8,16,16)", "--override", "layers=(1,1,1,1)",
            "--override", "large_kernel_sizes=(7,7,7,3)", "--input-size", "32", "--quiet"]
CUE = dict(input_size=32, train_size=32, val_size=16, num_classes=4)


def _run(out, recipe=None, **kw):
    args = {**CUE, **kw}
    return train("replknet_31b", "cue-world", out=out, overrides=TINY, show_progress=False,
                 recipe=recipe or Recipe(epochs=2, batch_size=8, warmup_epochs=0.5), **args)


@pytest.mark.parametrize("smoothing", [0.1, 0.0])
def test_curves_say_when_the_train_loss_is_label_smoothed(tmp_path, monkeypatch, smoothing, saved_figures):
    """The train loss is the smoothed objective (never near 0), the val loss plain cross-entropy: the legend says so."""
    from erf_lab.train.loop import plot_curves

    figs = saved_figures
    rows = [{"epoch": 1, "train_loss": 0.9, "train_acc": 0.5, "val_loss": 0.4, "val_acc": 0.9}]
    plot_curves(rows, tmp_path / "curves", smoothing)
    loss_legend = [t.get_text() for t in figs[0].axes[0].get_legend().get_texts()]
    acc_legend = [t.get_text() for t in figs[0].axes[1].get_legend().get_texts()]
    assert loss_legend == (["train (label smoothing 0.1)", "val"] if smoothing else ["train", "val"])
    assert acc_legend == ["train", "val"]
    # the chance level (1 / classes) is a line on the accuracy panel: a flat val curve at 0.25 reads as guessing
    plot_curves(rows, tmp_path / "curves", smoothing, chance=0.25)
    assert [t.get_text() for t in figs[1].axes[1].get_legend().get_texts()] == ["train", "val", "chance (0.25)"]
    assert [tuple(line.get_ydata()) for line in figs[1].axes[1].get_lines()][-1] == (0.25, 0.25)
    assert len(figs[1].axes[0].get_lines()) == 2  # none on the loss panel


def test_lr_schedule_warmup_then_cosine():
    lrs = [lr_at(s, 100, 10, 1e-3, 1e-5) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)  # linear warm-up
    assert lrs[10] == pytest.approx(1e-3)  # cosine starts at the peak
    assert lrs[55] == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * 0.5)))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lr_at(100, 100, 10, 1e-3, 1e-5) == pytest.approx(1e-5)


def test_no_weight_decay_on_norms_and_biases():
    model = create_model("replknet_31b", num_classes=4, **TINY)
    decay, no_decay = param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in no_decay["params"]} >= {"head.bias", "norm.weight", "norm.bias"}
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_the_optimizer_is_fused_adamw_with_the_same_steps():
    """``build_optimizer``: AdamW with the paper recipe's groups, through PyTorch's fused kernel on the CPU; given the
    same gradients, three steps land where the per-tensor AdamW's do (float32 rounding apart). Gradients recomputed
    from the diverging weights would not do: Adam's m / sqrt(v) turns a rounding-sized difference of a near-zero
    gradient into a different step (measured: 1.5e-8 apart after one step, 6e-4 after two)."""
    from erf_lab.train.recipe import build_optimizer

    torch.manual_seed(0)
    fused_net = create_model("replknet_31b", num_classes=4, **TINY)
    plain_net = create_model("replknet_31b", num_classes=4, **TINY)
    plain_net.load_state_dict(fused_net.state_dict())
    start = [p.detach().clone() for p in fused_net.parameters()]
    recipe = Recipe(lr=1e-2, weight_decay=0.05)
    fused = build_optimizer(fused_net, recipe)
    assert fused.defaults["fused"] is True and [g["weight_decay"] for g in fused.param_groups] == [0.05, 0.0]
    plain = torch.optim.AdamW(param_groups(plain_net, 0.05), lr=1e-2, betas=tuple(recipe.betas), foreach=False)
    for _ in range(3):
        grads = [torch.randn_like(p) for p in fused_net.parameters()]
        for net, opt in ((fused_net, fused), (plain_net, plain)):
            for p, g in zip(net.parameters(), grads):
                p.grad = g.clone()
            opt.step()
    names = [n for n, _ in fused_net.named_parameters()]
    for name, a, b, a0 in zip(names, fused_net.parameters(), plain_net.parameters(), start):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=name)
        assert (a - a0).abs().max() > 1e-3, name  # every parameter moved (3 steps of lr 1e-2), far beyond the tolerance


def test_ema_update_formula():
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    ema = ModelEma(a, 0.9)
    ema.update(b)
    assert torch.allclose(ema.module.weight, 0.9 * a.weight + 0.1 * b.weight)


def test_run_directory_and_official_checkpoints(tmp_path, one_thread, monkeypatch):
    from erf_lab.erf import prepare

    kept = []  # a CPU run keeps freed memory in the heap (no fresh pages for every step's activations)
    monkeypatch.setattr(prepare, "keep_freed_memory", lambda: kept.append(True) or True)
    out = tmp_path / "run"
    rc = main(["train", *TINY_CLI, "--num-classes", "4", "--train-size", "32", "--val-size", "16", "--epochs", "2",
               "--batch-size", "8", "--out", str(out)])
    assert rc == 0 and kept == [True]
    rows = list(csv.DictReader((out / "metrics.csv").read_text().splitlines()))
    assert [int(r["epoch"]) for r in rows] == [1, 2] and [int(r["step"]) for r in rows] == [4, 8]
    assert set(rows[0]) == {"epoch", "step", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "img_per_s"}
    assert all(0 <= float(r["val_acc"]) <= 1 and float(r["train_loss"]) > 0 for r in rows)
    info = json.loads((out / "run.json").read_text())
    assert info["world_size"] == 1 and info["settings"]["recipe"]["batch_size"] == 8
    assert info["command"][:2] == ["erf-lab", "train"] or info["command"][0] == "erf-lab"
    assert info["data"]["kind"] == "cue-world" and info["data"]["num_classes"] == 4
    assert info["versions"]["torch"] == torch.__version__ and info["start_time"] <= info["end_time"]
    # how it was made, as every erf-lab record says it (provenance.versions: the image decoder and the weights
    # writer too; before: a second, shorter list under "erf-lab", and no folder the relative paths are from)
    import os

    import PIL
    import safetensors

    assert info["versions"]["erf_lab"] and info["versions"]["PIL"] == PIL.__version__
    assert info["versions"]["safetensors"] == safetensors.__version__ and info["cwd"] == os.getcwd()
    assert info["final"]["val_acc"] == pytest.approx(float(rows[-1]["val_acc"]))
    assert (out / "curves.png").stat().st_size > 0 and (out / "curves.pdf").stat().st_size > 0
    assert not (out / C.STATE_FILE).exists()
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    # the files say themselves what they are: no .run.json beside the .pth any more
    assert ckpts == sorted([f"epoch_00{e}.{x}" for e in range(3) for x in ("pth", "safetensors")])
    from erf_lab.checkpoint import random_init_record, training_classes, training_input_size

    # epoch 0 is the random initialisation, marked so (what measures it says "random weights"); trained ones not;
    # each file keeps its mark and training size when copied alone (before: a .pth lost both, they were in its
    # .run.json sidecar and the run folder)
    alone = tmp_path / "alone"
    alone.mkdir()
    for x in ("pth", "safetensors"):
        for name, init in (("epoch_000", {"seed": 0}), ("epoch_002", None)):
            for path in (out / "checkpoints" / f"{name}.{x}", shutil.copy(out / "checkpoints" / f"{name}.{x}", alone)):
                assert random_init_record(path) == init and training_input_size(path)[0] == 32, path
                assert training_classes(path) == (None, None)  # cue-world's: no folder classes
    # official layout plus the erf_lab record (plain data, weights-only), loadable by create_model; the .pth and the
    # .safetensors hold the same tensors
    raw = torch.load(out / "model.pth", weights_only=True)
    assert list(raw) == ["model", "erf_lab"] and set(raw["erf_lab"]) == {"input_size", "weights_sha256"}
    assert raw["erf_lab"]["input_size"] == 32
    # the official repos' loaders (RepLKNet / SLaK / UniRepLKNet --resume: checkpoint['model']; --finetune and
    # the ERF scripts: 'model' if present, else the dict) read the weights and nothing else
    ref = create_model("replknet_31b", num_classes=4, **TINY)
    ref.load_state_dict(raw["model"])
    x = torch.rand(2, 3, 32, 32)
    outs = []
    for f in ("model.pth", "model.safetensors", "checkpoints/epoch_002.safetensors"):
        m = create_model("replknet_31b", weights=str(out / f), num_classes=4, **TINY).eval()
        assert all(torch.equal(m.state_dict()[k], v) for k, v in raw["model"].items())
        outs.append(m(x))
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    init = create_model("replknet_31b", weights=str(out / "checkpoints/epoch_000.pth"), num_classes=4, **TINY)
    assert not torch.equal(init.head.weight, raw["model"]["head.weight"])  # epoch 0 is the initialisation
    assert main(["train", *TINY_CLI, "--num-classes", "4", "--train-size", "32", "--val-size", "16", "--epochs",
                 "2", "--batch-size", "8", "--out", str(out), "--resume"]) == 0  # complete: nothing to do


class _Interrupt:
    def __init__(self, at_step, exc):
        self.at_step, self.exc = at_step, exc

    def __call__(self, epoch, step):
        if step == self.at_step:
            raise self.exc


@pytest.mark.parametrize("how", ["ctrl-c mid-epoch", "ctrl-c at an epoch's last step", "crash after epoch 1",
                                 "crash in epoch 1"])
def test_resume_is_bit_identical(tmp_path, one_thread, how):
    """3 epochs x 4 steps with drop path and EMA. Ctrl-C at step 6 saves the state there; Ctrl-C at step 4 (the
    last of epoch 1) saves it before epoch 1's evaluation; a crash (as a kill) at step 6 loses epoch 2's steps
    and resumes from the end of epoch 1. All end bit-identical to an uninterrupted run (weights, EMA and metrics
    apart from img/s, which counts every epoch's images and time over the sessions)."""
    recipe = dict(epochs=3, batch_size=8, warmup_epochs=0.5, drop_path=0.2, ema=0.9, clip_grad=1.0)
    full = _run(tmp_path / "full", Recipe(**recipe))
    out = tmp_path / "cut"
    exc = KeyboardInterrupt() if how.startswith("ctrl-c") else RuntimeError("killed")
    at_step, saved = {"ctrl-c mid-epoch": (6, (1, 2)), "ctrl-c at an epoch's last step": (4, (0, 4)),
                      "crash after epoch 1": (6, (1, 0)),
                      # a kill in the first epoch resumes from the initialisation (before: no state was saved
                      # yet, and --resume said 'nothing to resume')
                      "crash in epoch 1": (2, (0, 0))}[how]
    with pytest.raises(type(exc)):
        _run(out, Recipe(**recipe), on_step=_Interrupt(at_step, exc))
    assert not (out / "run.json").exists() and (out / C.STATE_FILE).exists()
    state = C.load_state(out)  # weights_only=True inside
    assert (state["epoch"], state["position"]) == saved
    with pytest.raises(ErfLabError, match="interrupted training run"):
        _run(out, Recipe(**recipe))
    resumed = _run(out, Recipe(**recipe), resume=True)
    a = torch.load(tmp_path / "full" / "model.pth", weights_only=True)["model"]
    b = torch.load(out / "model.pth", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    from safetensors.torch import load_file

    ea, eb = load_file(tmp_path / "full" / "model_ema.safetensors"), load_file(out / "model_ema.safetensors")
    assert all(torch.equal(ea[k], eb[k]) for k in ea)
    strip = [{k: v for k, v in r.items() if k != "img_per_s"} for r in full["rows"]]
    assert [{k: v for k, v in r.items() if k != "img_per_s"} for r in resumed["rows"]] == strip
    assert all(r["img_per_s"] > 1 for r in resumed["rows"])
    assert resumed["run_info"]["resumed"] and not (out / C.STATE_FILE).exists()


def test_training_state_holds_no_python_objects(tmp_path, one_thread):
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "r", on_step=_Interrupt(2, KeyboardInterrupt()))
    st = torch.load(tmp_path / "r" / C.STATE_FILE, weights_only=True)
    assert {"model", "optimizer", "scaler", "ema", "epoch", "step", "position", "rng", "settings"} <= set(st)
    assert st["step"] == 2 and isinstance(st["rng"][0]["torch"], torch.Tensor)


def _png(path, rng, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).convert(mode).save(path, format="PNG")


def _folder(root, classes=("a", "b"), n=6, rng=None):
    rng = rng or np.random.default_rng(0)
    for split, k in (("train", n), ("val", 2)):
        for c in classes:
            for i in range(k):
                _png(root / split / c / f"{i}.png", rng)
    return root


def test_image_folder_skips_unreadable_files(tmp_path, one_thread):
    root = _folder(tmp_path / "data")
    (root / "train" / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (root / "train" / "b" / "notes.txt").write_text("hello")
    _png(root / "val" / "b" / "image.noext", np.random.default_rng(1))  # any format PIL opens, any name
    os.mkfifo(root / "train" / "a" / "pipe.png")  # reading it blocked the scan (and the training) for good
    res = train("replknet_31b", str(root), out=tmp_path / "run", overrides=TINY, input_size=32, show_progress=False,
                recipe=Recipe(epochs=1, batch_size=4, warmup_epochs=0))
    info = res["run_info"]
    assert info["skipped_images"] == 3 and info["data"]["train_size"] == 12 and info["data"]["val_size"] == 5
    assert info["data"]["classes"] == ["a", "b"] and info["steps_per_epoch"] == 3
    # which files and why, as compute lists its skipped images (run.json kept the count alone)
    why = dict(info["skipped"])
    assert sorted(why) == ["train/a/broken.png", "train/a/pipe.png", "train/b/notes.txt"]
    assert why["train/a/broken.png"].startswith("OSError: Truncated")
    assert why["train/b/notes.txt"].startswith("UnidentifiedImageError: cannot identify image file")
    assert why["train/a/pipe.png"] == "not a regular file (a pipe, device or socket)"
    assert json.loads((tmp_path / "run" / "run.json").read_text())["skipped"] == info["skipped"]
    # each weights file names the classes its outputs stand for, copied alone too (shape-bias reads them)
    from erf_lab.checkpoint import training_classes

    alone = tmp_path / "alone"
    alone.mkdir()
    for name in ("model.pth", "model.safetensors", "checkpoints/epoch_000.pth", "checkpoints/epoch_001.safetensors"):
        assert training_classes(shutil.copy(tmp_path / "run" / name, alone))[0] == ["a", "b"], name


def _jpeg_bytes(seed: int) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def test_a_truncated_jpeg_is_skipped_by_the_scan(tmp_path):
    """PIL's verify() does not decode JPEG data: a JPEG cut short (an interrupted download) passed the scan, was
    replaced by the next image at every epoch (one warning each time) and run.json did not list it. Now the scan
    decodes a JPEG that lacks its end marker: skipped and listed with why; a whole JPEG with bytes after its end
    marker is kept."""
    from erf_lab.train.data import image_folder

    root = _folder(tmp_path / "data")
    data = _jpeg_bytes(3)
    (root / "train" / "a" / "truncated.jpg").write_bytes(data[:1500])
    (root / "train" / "b" / "trailing.jpg").write_bytes(data + b"\0" * 16)  # padded: loads whole
    train_set, _ = image_folder(root, 32)
    assert [f for f, _ in train_set.skipped] == ["train/a/truncated.jpg"]
    assert train_set.skipped[0][1].startswith("OSError: image file is truncated")
    assert len(train_set) == 13 and "trailing.jpg" in [p.name for p, _ in train_set.files]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no image is replaced
        assert all(train_set[i][0].shape == (3, 32, 32) for i in range(len(train_set)))


def test_a_folder_runs_record_tells_its_images_apart_without_reading_them(tmp_path, one_thread):
    """run.json of a --data run named its images by path only (settings' train_fingerprint / val_fingerprint, what
    --resume checks): a folder whose images were rewritten in place (resized, re-encoded) under the same names gave
    two runs the same record. run.json's data now has, per split, the image count and a SHA-256 of each file's
    path, size and modification time (no image read)."""
    from erf_lab.train.data import build_data

    root = _folder(tmp_path / "data")
    info = train("replknet_31b", str(root), out=tmp_path / "run", overrides=TINY, input_size=32, show_progress=False,
                 recipe=Recipe(epochs=1, batch_size=4, warmup_epochs=0))["run_info"]
    recorded = json.loads((tmp_path / "run" / "run.json").read_text())["data"]
    assert recorded == json.loads(json.dumps(info["data"]))
    assert (recorded["train_files"]["images"], recorded["val_files"]["images"]) == (12, 4)
    assert all(len(recorded[f"{s}_files"]["sha256"]) == 64 for s in ("train", "val"))
    again = build_data(str(root), 32).description  # nothing changed: the same digests
    assert (again["train_files"], again["val_files"]) == (recorded["train_files"], recorded["val_files"])
    image = root / "val" / "b" / "1.png"
    Image.open(image).resize((12, 10)).save(image)  # rewritten in place: same names, same count
    changed = build_data(str(root), 32)
    assert changed.val.fingerprint() == info["settings"]["val_fingerprint"]  # the names: unchanged
    assert changed.description["train_files"] == recorded["train_files"]
    assert changed.description["val_files"]["images"] == 4
    assert changed.description["val_files"]["sha256"] != recorded["val_files"]["sha256"]
    st = (root / "train" / "a" / "0.png").stat()
    os.utime(root / "train" / "a" / "0.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched: told too
    assert build_data(str(root), 32).description["train_files"]["sha256"] != recorded["train_files"]["sha256"]


def test_a_linked_folder_inside_a_class_folder_is_read_and_a_link_loop_is_skipped(tmp_path):
    """torchvision's ImageFolder follows a symlinked folder inside a class folder; the scan left its images out.
    Now they are read (in the class of the folder holding the link); a link back to a folder above is a loop,
    not followed, listed with why."""
    from erf_lab.erf.images import LINK_LOOP
    from erf_lab.train.data import image_folder

    root = _folder(tmp_path / "data")
    rng = np.random.default_rng(5)
    for i in range(3):
        _png(tmp_path / "extra" / f"x{i}.png", rng)
    (root / "train" / "a" / "extra").symlink_to(tmp_path / "extra")
    (root / "train" / "b" / "loop").symlink_to(root / "train")
    train_set, val_set = image_folder(root, 32)
    assert len(train_set) == 15 and len(val_set) == 4
    linked = [(p.relative_to(root).as_posix(), y) for p, y in train_set.files if "extra" in p.parts]
    assert linked == [("train/a/extra/x0.png", 0), ("train/a/extra/x1.png", 0), ("train/a/extra/x2.png", 0)]
    assert train_set.skipped == [["train/b/loop", LINK_LOOP]]


def test_image_that_fails_after_the_scan_is_replaced_with_a_warning(tmp_path):
    """A JPEG cut short after the scan fails when loaded: the next image takes its place, and the user is told (it
    was only counted, silently, before)."""
    from erf_lab.train.data import image_folder

    root = _folder(tmp_path / "data")
    data = _jpeg_bytes(3)
    (root / "train" / "a" / "truncated.jpg").write_bytes(data)
    train_set, _ = image_folder(root, 32)
    (root / "train" / "a" / "truncated.jpg").write_bytes(data[:1500])
    i = [p.name for p, _ in train_set.files].index("truncated.jpg")
    assert len(train_set) == 13 and not train_set.skipped
    with pytest.warns(UserWarning, match=r"cannot read .*truncated\.jpg \(image file is truncated.*next image"):
        x, y = train_set[i]
    assert torch.equal(x, train_set[i + 1][0]) and y == train_set.files[i + 1][1]
    assert len(train_set.failed_loads) == 1 and train_set.failed_loads[0][0] == "train/a/truncated.jpg"
    assert train_set.failed_loads[0][1].startswith("OSError: image file is truncated")
    assert train_set.failed_loads[0][2] == 1  # the epoch, from 1


def test_images_that_fail_after_the_scan_are_in_run_json_from_the_workers_and_a_resumed_session(
        tmp_path, one_thread):
    """Images that failed to load after the scan were counted on the dataset alone (a DataLoader worker's copy:
    lost) and never written to run.json. Now run.json's failed_loads lists each (file, why, epoch), from the
    workers of both splits and across a Ctrl-C and --resume (epoch 2's training load was in the first session)."""
    root = _folder(tmp_path / "data")
    bad_idat_png(root / "train" / "a" / "broken.png")
    bad_idat_png(root / "val" / "b" / "broken.png")
    kw = dict(out=tmp_path / "run", overrides=TINY, input_size=32, show_progress=False, num_workers=2,
              recipe=Recipe(epochs=2, batch_size=13, warmup_epochs=0))  # 1 step an epoch: every image each epoch
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(KeyboardInterrupt):
            train("replknet_31b", str(root), on_step=_Interrupt(2, KeyboardInterrupt()), **kw)
        info = train("replknet_31b", str(root), resume=True, **kw)["run_info"]
    assert info["resumed"] and info["skipped"] == [] and info["data"]["train_size"] == 13
    assert [(f, e) for f, _, e in info["failed_loads"]] == [
        ("train/a/broken.png", 1), ("val/b/broken.png", 1), ("train/a/broken.png", 2), ("val/b/broken.png", 2)]
    assert {why for _, why, _ in info["failed_loads"]} == {"OSError: broken data stream when reading image file"}
    assert json.loads((tmp_path / "run" / "run.json").read_text())["failed_loads"] == info["failed_loads"]


def test_a_class_folder_without_a_readable_image_is_refused(tmp_path):
    """An empty class folder (or one of unreadable files only) was left out without a word, and every class after it
    took another label than its place among the sorted folder names: refused, as torchvision's ImageFolder does."""
    from erf_lab.train.data import image_folder

    root = _folder(tmp_path / "data", classes=("a", "b", "c"))
    for split in ("train", "val"):
        shutil.rmtree(root / split / "b")
        (root / split / "b").mkdir()
    with pytest.raises(ErfLabError, match=r"class folder 'train/b' holds no readable image; every class needs images "
                                          r"in both train/ and val/: add images or remove the folder"):
        image_folder(root, 32)
    _png(root / "train" / "b" / "0.png", np.random.default_rng(5))
    (root / "val" / "b" / "0.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (root / "val" / "b" / "notes.txt").write_text("hello")
    with pytest.raises(ErfLabError, match=r"class folder 'val/b' holds no readable image \(only 2 unreadable file"):
        image_folder(root, 32)
    shutil.rmtree(root / "train" / "b")
    shutil.rmtree(root / "val" / "b")  # no folder at all: two classes, numbered as sorted
    train_set, val_set = image_folder(root, 32)
    assert train_set.classes == ["a", "c"] and sorted(set(train_set.targets)) == sorted(set(val_set.targets)) == [0, 1]


def test_a_class_spelled_in_other_unicode_code_points_is_named_as_such(tmp_path):
    """'été' as composed characters in train/ and decomposed (as macOS writes names) in val/: the error said
    "'été' is only in train/" though val/été was there to see. Now it says why they differ."""
    import unicodedata

    from erf_lab.train.data import image_folder

    root = _folder(tmp_path / "data")
    composed, decomposed = unicodedata.normalize("NFC", "été"), unicodedata.normalize("NFD", "été")
    assert composed != decomposed
    _png(root / "train" / composed / "0.png", np.random.default_rng(1))
    _png(root / "val" / decomposed / "0.png", np.random.default_rng(2))
    with pytest.raises(ErfLabError, match=r"class folders train/\S+ and val/\S+ have the same name in other Unicode "
                                          r"code points \('\\xe9t\\xe9' and 'e\\u0301te\\u0301'"):
        image_folder(root, 32)


def test_a_folder_run_records_its_images_per_class_and_the_majority_baseline(tmp_path):
    """Very uneven classes: run.json said how many images in all, not per class, so a val accuracy could not be told
    from always answering the largest class. Now both splits' counts per class and that baseline are recorded."""
    from erf_lab.train.data import build_data

    root = _folder(tmp_path / "data", classes=("a", "b", "c"), n=1)  # 1 train, 2 val images each
    rng = np.random.default_rng(7)
    for i in range(1, 5):
        _png(root / "train" / "b" / f"more{i}.png", rng)  # b: 5 training images, the largest class
    _png(root / "val" / "b" / "more.png", rng)
    desc = build_data(str(root), 32).description
    assert desc["train_per_class"] == {"a": 1, "b": 5, "c": 1} and desc["val_per_class"] == {"a": 2, "b": 3, "c": 2}
    assert desc["majority_class_val_acc"] == pytest.approx(3 / 7)


def test_sixteen_bit_images_use_their_range():
    from erf_lab.train.data import to_rgb_array

    a = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)
    im = Image.fromarray(a)
    assert im.mode == "I;16"
    rgb = to_rgb_array(im)
    assert rgb.shape == (8, 8, 3) and rgb.min() == 0 and rgb.max() == 255
    assert (rgb[..., 0] == np.round(a / a.max() * 255)).all()


def test_a_palette_image_with_transparency_loads_without_a_warning(tmp_path):
    """PIL warned 'Palette images with Transparency expressed in bytes should be converted to RGBA images' at the
    first such image of a run, as if the user had to convert their files: read through RGBA, the same pixels."""
    from erf_lab.train.data import to_rgb_array

    a = np.random.default_rng(0).integers(0, 255, (12, 16, 3), dtype=np.uint8)
    Image.fromarray(a).convert("P").save(tmp_path / "p.png", transparency=bytes([0] * 10 + [255] * 246))
    with Image.open(tmp_path / "p.png") as im:
        assert im.mode == "P" and isinstance(im.info["transparency"], bytes)
        expected = np.asarray(im.convert("RGBA"))[..., :3]
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert np.array_equal(to_rgb_array(im), expected)


def _bad_cases(tmp_path):
    good = _folder(tmp_path / "good")
    missing = _folder(tmp_path / "missing")
    import shutil

    shutil.rmtree(missing / "val")
    empty = _folder(tmp_path / "empty")
    shutil.rmtree(empty / "val")
    (empty / "val" / "a").mkdir(parents=True)
    one_class = _folder(tmp_path / "one_class", classes=("a",))
    one_split = _folder(tmp_path / "one_split")
    _png(one_split / "train" / "c" / "0.png", np.random.default_rng(2))
    empty_class = _folder(tmp_path / "empty_class")
    (empty_class / "train" / "c").mkdir()
    (empty_class / "val" / "c").mkdir()
    cue = ["--num-classes", "4", "--train-size", "32", "--val-size", "8", "--epochs", "1"]
    return {
        "missing split": (["--data", str(missing), "--batch-size", "4"], "no val/ folder"),
        "empty split": (["--data", str(empty), "--batch-size", "4"], "no readable image"),
        "one class": (["--data", str(one_class), "--batch-size", "4"], "only one class ('a')"),
        "class in one split": (["--data", str(one_split), "--batch-size", "4"], "'c' is only in train/"),
        "empty class folder": (["--data", str(empty_class), "--batch-size", "4"],
                               "class folder 'train/c' holds no readable image"),
        "other class count": (["--data", str(good), "--batch-size", "4", "--num-classes", "5"],
                              f"--num-classes 5, but {good} has 2 classes (a, b); drop --num-classes or use a "
                              "folder with 5"),
        "data is a file": (["--data", str(good / "train" / "a" / "0.png")], "must be a folder"),
        "cue-world sizes with a folder": (["--data", str(good), "--batch-size", "4", "--train-size", "5"],
                                          "--train-size sets cue-world's image counts; --data"),
        "batch size 0": ([*cue, "--batch-size", "0"], "--batch-size must be at least 1"),
        "negative batch size": ([*cue, "--batch-size", "-3"], "--batch-size must be at least 1"),
        "batch larger than the train set": ([*cue, "--batch-size", "33"], "larger than the train set"),
        "unknown model": ([*cue, "--batch-size", "8", "--model", "replknet_99"], "unknown model"),
        "resume with no run": ([*cue, "--batch-size", "8", "--resume"], "nothing to resume"),
        "sync-bn on cpu": ([*cue, "--batch-size", "8", "--sync-bn"], "needs CUDA"),
        "fp16 on cpu": ([*cue, "--batch-size", "8", "--amp", "fp16"], "needs a CUDA device"),
        "unknown device": ([*cue, "--batch-size", "8", "--device", "tpu"], "unknown --device"),
        "negative lr": ([*cue, "--batch-size", "8", "--lr", "-1"], "--lr must be above 0, got -1"),
        # each recipe error says the allowed values (it said "--warmup-epochs out of range: 20.0", no range)
        "warm-up longer than the run": ([*cue, "--batch-size", "8", "--epochs", "2", "--warmup-epochs", "3"],
                                        "--warmup-epochs must be from 0 to --epochs (2), got 3"),
        "min-lr above lr": ([*cue, "--batch-size", "8", "--min-lr", "0.01"],
                            "--min-lr must be from 0 to --lr (0.002), got 0.01"),
        "ema of 1": ([*cue, "--batch-size", "8", "--ema", "1"], "--ema must be 0 (off) or between 0 and 1, e.g. 0.999"),
        "infinite lr": ([*cue, "--batch-size", "8", "--lr", "inf"], "--lr must be a finite number, got inf"),
        # build_model sets both: --override num_classes was dropped, drop_path_rate trained with drop path while
        # run.json recorded drop_path_rate 0.0
        "num_classes override": ([*cue, "--batch-size", "8", "--override", "num_classes=7"],
                                 "--override num_classes: training sets it from --num-classes"),
        "drop_path_rate override": ([*cue, "--batch-size", "8", "--override", "drop_path_rate=0.5"],
                                    "--override drop_path_rate: training sets it from --drop-path"),
        # cue-world's own limits, with the option that set the value (it said "cue-world val size must be ...")
        "cue-world val size 0": ([*cue, "--batch-size", "8", "--val-size", "0"],
                                 "error: --val-size: cue-world val size must be 1 to 10,000,000 images, got 0"),
        "cue-world train size too large": ([*cue, "--batch-size", "8", "--train-size", "10000001"],
                                           "error: --train-size: cue-world train size must be 1 to 10,000,000 images, "
                                           "got 10,000,001; to train on more, --resample draws"),
        "cue-world classes": ([*cue, "--batch-size", "8", "--num-classes", "13"],
                              "error: --num-classes: cue-world has 2 to 12 classes, got 13"),
        # the last stage's maps are 1x1 at 32 px: one value per channel (was a ValueError traceback at step 1)
        "one image per step at a 1x1 map": ([*cue, "--batch-size", "1"],
                                            "--batch-size 1: replknet_31b's BatchNorm transitions.2.1.bn sees a 1x1"),
    }


def test_another_class_count_names_a_few_of_the_folders_classes(tmp_path, capsys):
    """--num-classes against a folder of many classes listed every one in the error line (an ImageNet folder:
    1000 names in one line): the first six now."""
    root = tmp_path / "data"
    for c in range(9):
        for split in ("train", "val"):
            _png(root / split / f"class{c}" / "0.png", np.random.default_rng(c))
    out = tmp_path / "run"
    assert main(["train", *TINY_CLI, "--data", str(root), "--batch-size", "4", "--num-classes", "5", "--out",
                 str(out)]) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "error:" in ln]
    assert len(lines) == 1 and lines[0].endswith(f"--num-classes 5, but {root} has 9 classes (class0, class1, class2, "
                                                 "class3, class4, class5, ...); drop --num-classes or use a folder "
                                                 "with 5"), lines
    assert not out.exists()


def test_bad_input_one_error_line_exit_2_nothing_written(tmp_path, capsys):
    for name, (extra, message) in _bad_cases(tmp_path).items():
        out = tmp_path / "out" / name.replace(" ", "_")
        args = ["train", *TINY_CLI, *extra, "--out", str(out)]
        if "--model" in extra:
            i = args.index("--model")
            del args[i:i + 2]
        rc = main(args)
        err = capsys.readouterr().err
        lines = [ln for ln in err.splitlines() if "error:" in ln]
        assert rc == 2, (name, err)
        assert len(lines) == 1 and message in lines[0] and "Traceback" not in err, (name, err)
        assert not out.exists(), name  # validated before anything is written


def test_a_val_accuracy_at_chance_is_said_so(tmp_path, capsys, one_thread):
    """'val acc 0.312' after 2 epochs on 4 cue-world classes read as learning, where guessing scores 0.25 and 16 val
    images cannot tell 0.31 from it: the final line names chance, and a note (also in run.json) says when the val
    accuracy is within 3 standard errors of it."""
    from erf_lab.train.loop import chance_note

    out = tmp_path / "run"
    assert main(["train", *TINY_CLI, "--num-classes", "4", "--train-size", "32", "--val-size", "16", "--epochs", "1",
                 "--batch-size", "8", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    info = json.loads((out / "run.json").read_text())
    acc = info["final"]["val_acc"]
    assert info["data"]["chance_val_acc"] == 0.25
    assert acc <= 0.25 + 3 * (0.25 * 0.75 / 16) ** 0.5  # 1 epoch of 4 steps: this tiny model learns nothing yet
    assert info["val_acc_at_chance"] is True and info["chance_note"] == chance_note(acc, 4, 16)
    assert f"val acc {acc:.3f} (chance 0.250), val loss" in lines[-3]
    assert lines[-2] == f"note: val acc {acc:.3f} is within 3 standard errors of chance (1/4 = 0.250) on 16 val " \
        "images: the model has not measurably learned the task (train longer or on more images; more val images " \
        "measure it more finely)"
    # above chance + 3 standard errors (0.25 + 3 * 0.108 = 0.575 on 16 images; 0.25 + 3 * 0.0137 on 1000): no note
    assert chance_note(0.5625, 4, 16) is not None and chance_note(0.625, 4, 16) is None
    assert chance_note(0.3, 4, 1000) is None and chance_note(0.5, 2, 16) is not None
    # a folder's uneven classes: the floor is always answering the largest one where that beats guessing (0.8 of 2
    # classes, 100 val images: 0.8 + 3 * 0.04 = 0.92), said as such
    assert chance_note(0.9, 2, 100, majority=0.8) == "val acc 0.900 is within 3 standard errors of always answering " \
        "the largest training class (0.800) on 100 val images: the model has not measurably learned more than the " \
        "class frequencies (train longer or on more images; more val images measure it more finely)"
    assert chance_note(0.93, 2, 100, majority=0.8) is None and chance_note(0.9, 2, 100) is None
    assert chance_note(0.3, 4, 16, majority=0.2) == chance_note(0.3, 4, 16)  # below guessing: chance is the floor


def test_an_ema_run_says_the_ema_val_accuracy(tmp_path, capsys, one_thread):
    """With --ema the epoch lines and the final line said the raw weights' val accuracy alone, where
    model_ema.safetensors is what shape-bias measures: the EMA's, from metrics.csv's columns, beside it."""
    out = tmp_path / "run"
    assert main(["train", *TINY_CLI, "--num-classes", "4", "--train-size", "32", "--val-size", "16", "--epochs", "1",
                 "--batch-size", "8", "--ema", "0.5", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    row = next(csv.DictReader((out / "metrics.csv").read_text().splitlines()))
    loss, acc = float(row["val_loss_ema"]), float(row["val_acc_ema"])
    assert lines[0].endswith(f" acc {float(row['val_acc']):.3f}, EMA val loss {loss:.4f} acc {acc:.3f}"), lines
    assert f"val loss {float(row['val_loss']):.4f}, EMA val acc {acc:.3f}, " in lines[1], lines


@pytest.mark.parametrize("epochs, warmup, said", [
    ("1", None, "the warm-up (--warmup-epochs 1) spans the whole run (4 steps): the learning rate only rises, to its "
                "peak at the last step, and the cosine never lowers it; train more epochs or warm up for fewer"),
    ("1", "0.1", "the warm-up (--warmup-epochs 0.1) rounds to no step (0.4 of the 4 steps per epoch): training "
                 "starts at the peak learning rate"),
    ("1", "0.5", None)])
def test_a_warm_up_that_is_the_whole_run_or_no_step_is_said(tmp_path, capsys, one_thread, epochs, warmup, said):
    """--epochs 1 with the default warm-up of 1 epoch trained at a rising learning rate only, ending at the peak, the
    cosine never reached, without a word; a warm-up that rounds to no step took none. Both are said in one line."""
    out = tmp_path / "run"
    assert main(["train", *TINY_CLI, "--num-classes", "4", "--train-size", "32", "--val-size", "16", "--epochs", epochs,
                 "--batch-size", "8", *(["--warmup-epochs", warmup] if warmup else []), "--out", str(out)]) == 0
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "warning:" in ln]
    assert lines == ([f"erf-lab train: warning: {said}"] if said else []), lines
    lr = [float(r["lr"]) for r in csv.DictReader((out / "metrics.csv").read_text().splitlines())]
    assert lr == [2e-3] if warmup is None else lr[0] < 2e-3  # the whole run a warm-up: it ends at the peak


def test_out_with_a_tilde_is_the_home_folder(tmp_path, monkeypatch, one_thread):
    """--out '~/run' (quoted: a script, a config) trains into $HOME/run, as every other --out expands it (before:
    a FileNotFoundError traceback from the writability check, with $HOME/run left behind)."""
    from erf_lab.paths import cache_dir

    monkeypatch.setenv("ERF_LAB_CACHE", str(cache_dir()))  # the cue-world already rendered, not a new HOME's cache
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    res = _run("~/run", recipe=Recipe(epochs=1, batch_size=8))
    assert res["out_dir"] == tmp_path / "home" / "run" and (tmp_path / "home" / "run" / "run.json").is_file()
    assert not (tmp_path / "~").exists()


def test_batch_size_one_is_refused_only_where_a_batchnorm_sees_a_1x1_map():
    """The check behind the 'one image per step at a 1x1 map' case: 64 px (2x2 last maps) passes, 32 px does not,
    and the check's forward leaves the BatchNorm statistics and the mode as they were."""
    from erf_lab.train.loop import _refuse_single_value_norms

    net = create_model("replknet_31b", num_classes=4, **TINY).train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    _refuse_single_value_norms(net, "replknet_31b", 64)
    with pytest.raises(ErfLabError, match="transitions.2.1.bn sees a 1x1 map at --input-size 32"):
        _refuse_single_value_norms(net, "replknet_31b", 32)
    assert net.training and all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    net(torch.rand(1, 3, 64, 64))  # what the check lets through trains
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        net(torch.rand(1, 3, 32, 32))  # and what it refuses is what PyTorch refuses


def test_a_diverging_run_stops_with_one_line_and_keeps_no_nan_checkpoint(tmp_path, capsys, one_thread):
    """--lr 1e9: the loss turns NaN; the run stops with exit 2 and one line naming the epoch and what to change,
    before a NaN checkpoint or a run.json is written (before: 'val loss nan', exit 0, NaN weights as the model)."""
    out = tmp_path / "run"
    rc = main(["train", *TINY_CLI, "--epochs", "3", "--train-size", "64", "--lr", "1e9", "--out", str(out)])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("erf-lab train: error: training diverged in epoch 1 at ") and \
        lines[0].endswith("use a lower --lr (or --clip-grad, a longer --warmup-epochs) and start over with --force")
    assert list((out / "checkpoints").glob("epoch_000.*")) and not list((out / "checkpoints").glob("epoch_001*"))
    assert not (out / "run.json").exists()


def test_corrupt_or_malicious_training_state_is_refused(tmp_path, capsys):
    import io
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("ran code",))

    weights = io.BytesIO()  # a weights file, not a training state
    torch.save({"model": create_model("replknet_31b", num_classes=4, **TINY).state_dict()}, weights)
    for name, payload in (("corrupt", b"\x80\x02garbage"), ("malicious", pickle.dumps({"model": Evil()})),
                          ("weights", weights.getvalue())):
        out = tmp_path / name
        out.mkdir()
        (out / C.STATE_FILE).write_bytes(payload)
        rc = main(["train", *TINY_CLI, "--num-classes", "4", "--train-size", "32", "--batch-size", "8",
                   "--out", str(out), "--resume"])
        cap = capsys.readouterr()
        assert rc == 2 and cap.err.count("error:") == 1 and "training state" in cap.err, cap.err
        assert "ran code" not in cap.out and not (out / "run.json").exists()


def test_out_that_is_a_file_or_not_empty(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    for out, message in ((f, "is not a folder"), (other, "is not empty")):
        rc = main(["train", *TINY_CLI, "--num-classes", "4", "--train-size", "32", "--batch-size", "8",
                   "--out", str(out)])
        err = capsys.readouterr().err
        assert rc == 2 and err.count("error:") == 1 and message in err, err
    assert f.read_text() == "x" and sorted(p.name for p in other.iterdir()) == ["notes.txt"]


def test_resume_with_other_settings_is_refused(tmp_path, capsys, one_thread):
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        _run(out, on_step=_Interrupt(2, KeyboardInterrupt()))
    before = sorted(p.name for p in out.rglob("*"))
    rc = main(["train", *TINY_CLI, "--num-classes", "4", "--train-size", "32", "--val-size", "16", "--epochs", "2",
               "--batch-size", "8", "--lr", "0.01", "--warmup-epochs", "0.5", "--out", str(out), "--resume"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("error:") == 1 and "other settings" in err and "lr" in err
    assert "(1 differ, e.g. --lr: 0.002 there, 0.01 now)" in err, err  # the option, not the whole recipe
    assert sorted(p.name for p in out.rglob("*")) == before and not (out / "run.json").exists()
    # more epochs do not continue it: the cosine schedule of the steps so far was the 2-epoch one (the refusal says so)
    assert main(["train", *TINY_CLI, "--num-classes", "4", "--train-size", "32", "--val-size", "16", "--epochs", "3",
                 "--batch-size", "8", "--warmup-epochs", "0.5", "--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "(1 differ, e.g. --epochs: 2 there, 3 now: the cosine learning-rate " \
        "schedule spans all the epochs: its steps so far followed the 2-epoch curve, while a 3-epoch run's lr" in err
    assert sorted(p.name for p in out.rglob("*")) == before
    # the same settings resume it
    assert main(["train", *TINY_CLI, "--num-classes", "4", "--train-size", "32", "--val-size", "16", "--epochs",
                 "2", "--batch-size", "8", "--warmup-epochs", "0.5", "--out", str(out), "--resume"]) == 0
    assert (out / "run.json").exists()
    # --resume of the finished run: nothing to do with its settings, refused with others (not "nothing to resume")
    capsys.readouterr()
    finished = (out / "run.json").read_text()
    assert main(["train", *TINY_CLI, "--num-classes", "4", "--train-size", "32", "--val-size", "16", "--epochs",
                 "2", "--batch-size", "8", "--warmup-epochs", "0.5", "--out", str(out), "--resume"]) == 0
    rc = main(["train", *TINY_CLI, "--num-classes", "4", "--train-size", "32", "--val-size", "16", "--epochs", "3",
               "--batch-size", "8", "--warmup-epochs", "0.5", "--out", str(out), "--resume"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("error:") == 1 and "complete training run with other settings (--epochs); --epochs " \
        "3 would not extend it: the cosine learning-rate schedule spans all the epochs" in err, err
    assert (out / "run.json").read_text() == finished


def test_a_run_resumes_on_another_device_with_its_own_amp(tmp_path, monkeypatch, capsys, one_thread):
    """A CUDA run (--amp auto: bf16) resumed with --device cpu, --amp not given, was refused as "--amp: 'bf16' there,
    'none' now", an option the user never passed (the reverse too). The state is device-independent: the run keeps
    its own autocast dtype and continues, bit-identical to the run done in one session; each session's device is
    in run.json. An explicit other --amp is still refused; an fp16 run, which the CPU cannot continue, is refused
    naming the devices. The first session's device choice is emulated (no CUDA here): auto resolved as on CUDA."""
    from erf_lab.train import loop

    cli = ["train", *TINY_CLI, "--num-classes", "4", "--train-size", "32", "--val-size", "16", "--epochs", "2",
           "--batch-size", "8", "--warmup-epochs", "0.5"]
    real = loop._amp_dtype
    with monkeypatch.context() as m:  # the first session: auto resolved on CUDA
        m.setattr(loop, "_amp_dtype", lambda amp, device: real(amp, "cuda" if amp == "auto" else device))
        with pytest.raises(KeyboardInterrupt):
            _run(tmp_path / "run", on_step=_Interrupt(3, KeyboardInterrupt()))
    state = torch.load(tmp_path / "run" / C.STATE_FILE, weights_only=True)
    assert state["settings"]["amp"] == "bf16"
    state["sessions"][0]["device"] = "cuda"  # where it ran
    C.save_state(tmp_path / "run", state)
    fp16 = tmp_path / "fp16"
    shutil.copytree(tmp_path / "run", fp16)
    C.save_state(fp16, {**state, "settings": {**state["settings"], "amp": "fp16"}})
    capsys.readouterr()

    # an explicit other --amp is what differs
    assert main([*cli, "--amp", "none", "--out", str(tmp_path / "run"), "--resume"]) == 2
    assert "(1 differ, e.g. --amp: 'bf16' there, 'none' now)" in capsys.readouterr().err
    assert main([*cli, "--out", str(tmp_path / "run"), "--resume"]) == 0, capsys.readouterr().err
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["settings"]["amp"] == "bf16" and [s["device"] for s in info["sessions"]] == ["cuda", "cpu"]
    assert main([*cli, "--out", str(tmp_path / "run"), "--resume"]) == 0  # finished: nothing to do, not refused
    assert "already holds a complete run" in capsys.readouterr().out
    # the same as one session with bf16
    assert main([*cli, "--amp", "bf16", "--out", str(tmp_path / "whole")]) == 0
    rows = [(tmp_path / name / "metrics.csv").read_text().splitlines() for name in ("run", "whole")]
    strip = [[",".join(v for k, v in zip(r[0].split(","), line.split(",")) if k != "img_per_s") for line in r]
             for r in rows]
    assert strip[0] == strip[1]
    from safetensors.torch import load_file
    a, b = (load_file(tmp_path / name / "model.safetensors") for name in ("run", "whole"))
    assert all(torch.equal(a[k], b[k]) for k in b)

    capsys.readouterr()
    assert main([*cli, "--out", str(fp16), "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and f"the run in {fp16} trained with --amp fp16 on --device cuda, which " \
        "--device cpu cannot continue (fp16 needs a CUDA device); resume it on CUDA" in err, err


@pytest.mark.parametrize("recorded", [True, False], ids=["recorded", "older-state"])
def test_a_resumed_run_keeps_its_checkpoint_format(tmp_path, capsys, one_thread, recorded):
    """`train --resume --checkpoint-format safetensors` of a .pth run was accepted and left a run folder with
    epochs in both formats. An explicit other format is refused as another setting; without the option the run
    continues in its own format (recorded in its state; a state of an older erf-lab: the format of its saved
    checkpoints)."""
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        _run(out, checkpoint_format="pth", on_step=_Interrupt(2, KeyboardInterrupt()))
    if not recorded:
        state = C.load_state(out)
        del state["settings"]["checkpoint_format"]
        C.save_state(out, state)
    before = sorted(p.name for p in out.rglob("*"))
    cli = ["train", *TINY_CLI, "--num-classes", "4", "--train-size", "32", "--val-size", "16", "--epochs", "2",
           "--batch-size", "8", "--warmup-epochs", "0.5", "--out", str(out), "--resume"]
    assert main([*cli, "--checkpoint-format", "safetensors"]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "(1 differ, e.g. --checkpoint-format: 'pth' there, 'safetensors' now)" in err
    assert sorted(p.name for p in out.rglob("*")) == before and not (out / "run.json").exists()
    assert main(cli) == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch_000.pth", "epoch_001.pth",
                                                                       "epoch_002.pth"]
    assert (out / "model.pth").is_file() and not list(out.glob("*.safetensors"))
    info = json.loads((out / "run.json").read_text())
    assert info["checkpoint_format"] == "pth" and info["settings"]["checkpoint_format"] == "pth"


def test_speed_levers_convert_the_small_depthwise_convs_and_keep_the_model(one_thread):
    """``speed_levers`` (what ``train`` applies): every stride-1 'same' depthwise conv from 3x3 up becomes a
    fastconv module (the 5x5 re-param branches, the stem's 3x3), nothing else changes type; same state-dict keys;
    outputs and parameter gradients within rounding of stock float32 PyTorch in the same memory format, and near a
    float64 run of the model (channels_last alone moves stock PyTorch 1e-5 to 5e-5 further from float64 than NCHW
    on this model, seeds 0-5: train-mode BN over a few values amplifies rounding)."""
    import fastconv
    from erf_lab.train.loop import build_model, speed_levers

    stock, stock_cl, exact = (build_model("replknet_31b", TINY, 4, 0.0, seed=0).train() for _ in range(3))
    exact.double()
    stock_cl.to(memory_format=torch.channels_last)
    net = build_model("replknet_31b", TINY, 4, 0.0, seed=0).train()
    before = {n: type(m) for n, m in net.named_modules()}
    speed_levers(net, channels_last=True)
    changed = sorted(n for n, m in net.named_modules() if type(m) is not before[n])
    assert changed == [f"stages.{i}.blocks.0.large_kernel.small_conv.conv" for i in range(3)] + [
        "stages.3.blocks.0.large_kernel.lkb_origin.conv", "stem.1.conv"]  # stage 3's large kernel is 3x3 here
    assert all(type(net.get_submodule(n)) is fastconv.DepthwiseConv2d for n in changed)
    assert list(net.state_dict()) == list(stock.state_dict())
    assert net.stem[0].conv.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    x_cl = x.contiguous(memory_format=torch.channels_last)
    models = (stock, stock_cl, net)
    outs = [stock(x), stock_cl(x_cl), net(x_cl), exact(x.double())]
    for y in outs:
        y.square().sum().backward()
    y_err = [(y.double() - outs[3]).abs().max().item() / outs[3].abs().max().item() for y in outs[:3]]
    scale = max(p.grad.abs().max().item() for p in exact.parameters())
    g_err = [max((a.grad.double() - b.grad).abs().max().item() for a, b in zip(m.parameters(), exact.parameters()))
             / scale for m in models]
    y_cl = (outs[2] - outs[1]).abs().max().item() / outs[3].abs().max().item()
    g_cl = max((a.grad - b.grad).abs().max().item() for a, b in zip(net.parameters(), stock_cl.parameters())) / scale
    print(f"vs float64: output {y_err[2]:.1e} (stock NCHW {y_err[0]:.1e}, channels_last {y_err[1]:.1e}), "
          f"gradients {g_err[2]:.1e} (stock NCHW {g_err[0]:.1e}, channels_last {g_err[1]:.1e}); "
          f"vs stock channels_last: {y_cl:.1e}, {g_cl:.1e}")
    assert y_cl <= 1e-5 and g_cl <= 1e-4  # the fastconv modules round differently, nothing more
    assert y_err[2] < 1.2e-4 and g_err[2] < 5e-4  # 3x what this draw gives (4.0e-5, 1.5e-4)


def test_channels_last_is_the_cpu_default_and_a_resumed_run_keeps_its_own(tmp_path, one_thread):
    fresh = _run(tmp_path / "fresh", Recipe(epochs=1, batch_size=8, warmup_epochs=0.5))
    assert fresh["run_info"]["settings"]["channels_last"] is True
    out = tmp_path / "nchw"
    with pytest.raises(KeyboardInterrupt):
        _run(out, channels_last=False, on_step=_Interrupt(2, KeyboardInterrupt()))
    with pytest.raises(ErfLabError, match="other settings.*--channels-last: False there, True now"):
        _run(out, channels_last=True, resume=True)
    resumed = _run(out, resume=True)  # None: the run's own setting
    assert resumed["run_info"]["settings"]["channels_last"] is False and resumed["run_info"]["resumed"]


def test_resume_of_a_folder_that_changed_is_refused(tmp_path, capsys, one_thread):
    """A class or images added to the folder since the interruption (validation images too), or a class renamed: one
    error line (a class was a size-mismatch traceback, images or names a silent change of the data)."""
    root = _folder(tmp_path / "data")
    args = ["train", *TINY_CLI, "--data", str(root), "--batch-size", "4", "--epochs", "2", "--warmup-epochs", "0"]
    def rename(a, b):
        for split in ("train", "val"):
            (root / split / a).rename(root / split / b)

    for name, change, message in (("class", lambda: _folder(root, classes=("c",)), "now has 3 classes"),
                                  ("image", lambda: _png(root / "train" / "a" / "new.png", np.random.default_rng(5)),
                                   "now has 13 training images, the interrupted run in"),
                                  ("renamed", lambda: rename("b", "z"), "class names or training images of"),
                                  # the epochs so far were measured on the others: metrics.csv would mix two sets
                                  ("validation image", lambda: _png(root / "val" / "a" / "new.png",
                                                                    np.random.default_rng(6)),
                                   "the validation images of")):
        out = tmp_path / name
        with pytest.raises(KeyboardInterrupt):
            train("replknet_31b", str(root), out=out, overrides=TINY, input_size=32, show_progress=False,
                  recipe=Recipe(epochs=2, batch_size=4, warmup_epochs=0), on_step=_Interrupt(2, KeyboardInterrupt()))
        change()
        rc = main([*args, "--out", str(out), "--resume"])
        err = capsys.readouterr().err
        assert rc == 2 and err.count("error:") == 1 and message in err and "Traceback" not in err, err
        assert (out / C.STATE_FILE).exists() and not (out / "run.json").exists()
        shutil.rmtree(root / "train" / "c", ignore_errors=True)
        shutil.rmtree(root / "val" / "c", ignore_errors=True)
        (root / "val" / "a" / "new.png").unlink(missing_ok=True)
        if name == "renamed":
            rename("z", "b")


def test_a_folder_run_records_no_cue_world_image_counts(tmp_path, one_thread):
    """run.json's settings of a folder run said train_size 2000 and val_size 500, cue-world's defaults, which it never
    used (its images: 12 and 4): None now. A folder run interrupted under an erf-lab that recorded them resumes."""
    root = _folder(tmp_path / "data")
    out = tmp_path / "run"
    kw = dict(out=out, overrides=TINY, input_size=32, show_progress=False,
              recipe=Recipe(epochs=1, batch_size=4, warmup_epochs=0))
    with pytest.raises(KeyboardInterrupt):
        train("replknet_31b", str(root), on_step=_Interrupt(1, KeyboardInterrupt()), **kw)
    state = torch.load(out / C.STATE_FILE, weights_only=True)
    assert (state["settings"]["train_size"], state["settings"]["val_size"]) == (None, None)
    state["settings"].update(train_size=2000, val_size=500)  # as an older erf-lab saved it
    C.save_state(out, state)
    info = train("replknet_31b", str(root), resume=True, **kw)["run_info"]
    assert (info["settings"]["train_size"], info["settings"]["val_size"]) == (None, None)
    assert (info["data"]["train_size"], info["data"]["val_size"]) == (12, 4) and info["resumed"]


def test_resume_takes_the_same_data_folder_spelled_otherwise(tmp_path, monkeypatch, capsys, one_thread):
    """--data data at the start, ./data/ or its absolute path at --resume: the same run (before: refused as other
    settings, '--data: 'data' there, './data/' now'); another folder is still refused."""
    monkeypatch.chdir(tmp_path)
    _folder(tmp_path / "data")
    _folder(tmp_path / "other")
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train("replknet_31b", "data", out=out, overrides=TINY, input_size=32, show_progress=False,
              recipe=Recipe(epochs=1, batch_size=4, warmup_epochs=0), on_step=_Interrupt(1, KeyboardInterrupt()))
    args = ["train", *TINY_CLI, "--batch-size", "4", "--epochs", "1", "--warmup-epochs", "0", "--out", str(out),
            "--resume"]
    assert main([*args, "--data", "other"]) == 2 and "--data: 'data' there, 'other' now" in capsys.readouterr().err
    assert main([*args, "--data", "./data/"]) == 0, capsys.readouterr().err
    info = json.loads((out / "run.json").read_text())
    assert info["final"]["epoch"] == 1
    # beside the model's accuracy, that of answering the largest class alone (a folder's classes may be uneven)
    assert f"val acc {info['final']['val_acc']:.3f} (chance 0.500; always answering the largest training class: " \
        "0.500), val loss" in capsys.readouterr().out
    assert main([*args, "--data", str(tmp_path / "data")]) == 0  # complete: nothing to do, not 'other settings'
    assert "already holds a complete run" in capsys.readouterr().out


def test_kill_stops_at_a_step_and_resume_completes(tmp_path):
    """SIGTERM (``kill``) to a real ``erf-lab train`` process: it stops after the current step with exit 130 and a
    saved state, without run.json; ``--resume`` then finishes the run with every step done once."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    args = [*TINY_CLI, "--num-classes", "4", "--train-size", "32", "--val-size", "8", "--epochs", "4",
            "--batch-size", "8", "--checkpoint-format", "safetensors", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "erf_lab", "train", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (out / "checkpoints" / "epoch_001.safetensors").exists() and proc.poll() is None:
            assert time.time() < deadline
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert "continue with --resume" in err and "Traceback" not in err
    assert not (out / "run.json").exists()
    state = C.load_state(out)
    assert 1 <= state["epoch"] < 4 and state["step"] == 4 * state["epoch"] + state["position"]
    assert main(["train", *args, "--resume"]) == 0
    rows = list(csv.DictReader((out / "metrics.csv").read_text().splitlines()))
    assert [int(r["step"]) for r in rows] == [4 * e for e in range(1, 5)]
    assert json.loads((out / "run.json").read_text())["resumed"] is True


@pytest.mark.parametrize("armed", [False, True])
def test_a_stop_swallowed_by_a_finaliser_is_delivered_again(armed, capfd):
    """Python runs a signal handler inside whatever the main thread executes; inside a finaliser (here ``__del__``;
    in CI logging's fork hook, each time a DataLoader started a worker) the handler's exception was printed as
    "Exception ignored" and lost, and the run went on. It is now sent again until it lands in ordinary code."""
    import signal
    import time

    from erf_lab.train.stop import ForcedStop, StopRequest

    class SignalInFinaliser:
        def __del__(self):
            signal.raise_signal(signal.SIGTERM)
            sum(range(1000))  # the handler runs here, inside __del__

    before, t0 = signal.getsignal(signal.SIGTERM), time.time()
    with pytest.raises(ForcedStop):
        with StopRequest() as stop:
            stop.armed = stop.requested = armed  # armed: a second signal (the first asked to stop after a step)
            SignalInFinaliser()  # dropped at once: __del__ runs
            while time.time() < t0 + 10:
                time.sleep(0.005)
    assert time.time() - t0 < 2
    assert "Exception ignored" not in capfd.readouterr().err
    assert signal.getsignal(signal.SIGTERM) == before  # the handler is restored


def test_a_stop_is_held_back_until_the_block_has_finished():
    """A forced stop that comes inside ``held`` (a DataLoader starting its workers or receiving a batch) is raised
    when the block has finished: cut in half, the iterator's ``__del__`` failed ("no attribute '_workers'")."""
    import signal

    from erf_lab.train.stop import ForcedStop, StopRequest, held

    reached = []
    with pytest.raises(ForcedStop):
        with StopRequest():
            with held():
                with held():  # nested: raised when the outermost ends
                    signal.raise_signal(signal.SIGTERM)
                    sum(range(1000))
                    reached.append("inner")
                reached.append("outer")
            reached.append("after")  # not reached
    assert reached == ["inner", "outer"]


def test_stop_handling_takes_sigterm_only_where_it_has_the_default_action():
    """Library code's stop handling (shape-bias decoding) takes SIGINT, and SIGTERM where nobody handles it; a
    caller's own SIGTERM handler runs as before, and both handlers are back after the block."""
    import signal

    from erf_lab.train.stop import ForcedStop, stop_handling

    before, before_int = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    try:
        # Python's own Ctrl-C handling, as in a terminal (a suite started as a background job inherits SIGINT
        # ignored, and stop_handling then leaves both signals alone: the raised SIGTERM would end the run)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        with pytest.raises(ForcedStop) as stop:
            with stop_handling():
                signal.raise_signal(signal.SIGTERM)
        assert stop.value.args == (signal.SIGTERM,)
        seen = []
        signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
        with pytest.raises(ForcedStop):
            with stop_handling():
                signal.raise_signal(signal.SIGTERM)  # the caller's handler
                signal.raise_signal(signal.SIGINT)  # stop_handling's
        assert seen == [signal.SIGTERM] and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGTERM, before)
        signal.signal(signal.SIGINT, before_int)


@pytest.mark.parametrize("threads", ["1", "2"])
def test_kill_before_the_first_step_stops_at_once(threads, tmp_path):
    """SIGTERM while the run is still being set up (here: rendering a large cue-world cache) stops the process at
    once with exit 130: there is no step to finish and nothing to save. It used to wait for the first step."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out, err_file = tmp_path / "run", tmp_path / "stderr.txt"
    shown = [a for a in TINY_CLI if a != "--quiet"]  # the rendering's progress bar says when it has begun
    args = [*shown, "--num-classes", "4", "--train-size", "100000", "--val-size", "8", "--epochs", "1",
            "--batch-size", "8", "--out", str(out)]
    # two threads: the rendering starts two worker processes, whose fork hooks (logging's) swallowed the signal
    env = {**os.environ, "OMP_NUM_THREADS": threads, "ERF_LAB_CACHE": str(tmp_path / "cache")}
    with err_file.open("w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "erf_lab", "train", *args], env=env,
                                stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.time() + 120
        while "rendered once" not in err_file.read_text() and proc.poll() is None:
            assert time.time() < deadline
            time.sleep(0.01)
        assert proc.poll() is None, err_file.read_text()[-2000:]
        proc.send_signal(signal.SIGTERM)  # while the workers start: where it used to be lost
        proc.wait(timeout=60)  # rendering 100000 images takes ~30 s more on one core
    finally:
        if proc.poll() is None:
            proc.kill()
    err = err_file.read_text()
    assert proc.returncode == 130, err[-2000:]
    assert "erf-lab train: interrupted" in err and "Traceback" not in err and "Exception ignored" not in err
    assert not (out / C.STATE_FILE).exists() and not (out / "run.json").exists()
    assert not list((tmp_path / "cache").rglob("*.npy"))  # no half-written cache file


def test_resume_of_a_damaged_training_state_is_one_line(tmp_path, capsys, one_thread):
    """A training state with every key but content that does not fit (another model's weights, an empty
    optimizer state, a wrong type, no RNG state per process, a step past the run) is one error line and exit 2,
    not a traceback; the same for a state made under torchrun with another process count, which names it."""
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        _run(out, on_step=_Interrupt(2, KeyboardInterrupt()))
    good = (out / C.STATE_FILE).read_bytes()
    args = ["train", *TINY_CLI, "--num-classes", "4", "--train-size", "32", "--val-size", "16", "--epochs", "2",
            "--batch-size", "8", "--warmup-epochs", "0.5", "--out", str(out), "--resume"]
    other = create_model("replknet_31b", num_classes=3, **TINY).state_dict()
    for name, change, message in (
            ("other weights", {"model": other}, "does not fit this run's model"),
            ("empty optimizer", {"optimizer": {}}, "does not fit this run's model"),
            ("epoch a string", {"epoch": "1"}, "damaged training state ('epoch' is a str)"),
            ("settings a string", {"settings": "x"}, "damaged training state ('settings' is a str)"),
            ("no rng", {"rng": []}, "does not fit this run's model"),
            ("step past the run", {"epoch": 5, "step": 20}, "is damaged (epoch 5, step 20")):
        state = torch.load(__import__("io").BytesIO(good), weights_only=True)
        state.update(change)
        torch.save(state, out / C.STATE_FILE)
        rc = main(args)
        err = capsys.readouterr().err
        assert rc == 2 and err.count("error:") == 1 and message in err and "Traceback" not in err, (name, err)
        assert "start again with --force" in err and not (out / "run.json").exists(), name
    state = torch.load(__import__("io").BytesIO(good), weights_only=True)
    state["settings"]["world_size"] = 2
    torch.save(state, out / C.STATE_FILE)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "processes (torchrun --nproc_per_node): 2 there, 1 now: --batch-size is per process, so each of its " \
           "steps took 2 x 8 images in the data order of 2 process(es), which another number would not continue); " \
           "repeat its command (under torchrun --nproc_per_node=2) or start over with --force" in err, err
    (out / C.STATE_FILE).write_bytes(good)
    assert main(args) == 0 and (out / "run.json").exists()


_TRY_LOCK = ("import fcntl, os, sys\nfd = os.open(sys.argv[1], os.O_RDONLY)\ntry:\n    fcntl.flock(fd, fcntl.LOCK_EX | "
             "fcntl.LOCK_NB)\nexcept OSError:\n    sys.exit(3)\n")


def test_a_folder_another_process_writes_into_is_refused(tmp_path, capsys, one_thread):
    """Two erf-lab processes never write one run folder at once (a --resume typed in a second shell while the run
    still goes): a run holds its folder from the start (a new one from its making), and another gets one line,
    exit 2, and changes nothing; once the holder is gone the folder is free again."""
    import subprocess
    import sys

    pytest.importorskip("fcntl")
    out = tmp_path / "run"
    tries = []
    _run(out, recipe=Recipe(epochs=1, batch_size=8, warmup_epochs=0.5),
         on_step=lambda *a, **k: tries.append(subprocess.run([sys.executable, "-c", _TRY_LOCK, str(out)]).returncode)
         if not tries else None)
    assert tries == [3]  # held while it trained (a folder it made itself)
    assert subprocess.run([sys.executable, "-c", _TRY_LOCK, str(out)]).returncode == 0  # and free after

    other = tmp_path / "other"
    other.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", _TRY_LOCK + "print('held', flush=True)\nsys.stdin.read()\n",
                               str(other)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        args = ["train", *TINY_CLI, "--num-classes", "4", "--train-size", "32", "--val-size", "16", "--batch-size",
                "8", "--epochs", "1", "--out", str(other)]
        rc = main(args)
        err = capsys.readouterr().err
        assert rc == 2 and err.count("error:") == 1 and f"--out {other} is in use" in err, err
        assert not any(other.iterdir())
    finally:
        holder.communicate("")
    assert main(args) == 0 and (other / "run.json").is_file()


class _Killed(BaseException):
    """What a SIGKILL does to the process at that point: nothing after it runs (no except, no finally of ours)."""


@pytest.mark.parametrize("where", ["before the weights", "after the weights"])
def test_a_kill_before_the_first_resume_point_leaves_a_folder_the_command_runs_in_again(
        tmp_path, monkeypatch, capsys, one_thread, where):
    """A run killed (SIGKILL, a crash) while it wrote the initialisation (``epoch_000``), before its first resume
    point: the folder holds no state, only ``checkpoints/`` with epoch_000 (or an atomic write's temporary file).
    The same command again, or with ``--resume``, starts the run (nothing was trained); it used to refuse both ways
    ('--out is not empty', 'nothing to resume'), and only --force, which deletes runs, went on."""
    import erf_lab.io

    out = tmp_path / "run"
    if where == "after the weights":
        def killed_state(*a, **k):
            raise _Killed()
        monkeypatch.setattr(C, "save_state", killed_state)
    else:
        real = erf_lab.io.os.replace

        def killed_replace(src, dst):  # the epoch_000 .pth written, not yet renamed: its temporary file stays
            if "epoch_000" in str(dst):
                raise _Killed()
            return real(src, dst)
        monkeypatch.setattr(erf_lab.io.os, "replace", killed_replace)
        monkeypatch.setattr(erf_lab.io.Path, "unlink", lambda self, missing_ok=False: None)  # no clean-up either
    with pytest.raises(_Killed):
        _run(out, recipe=Recipe(epochs=1, batch_size=8, warmup_epochs=0))
    monkeypatch.undo()
    assert not (out / C.STATE_FILE).exists() and (out / "checkpoints").is_dir()
    args = ["train", *TINY_CLI, "--num-classes", "4", "--train-size", "32", "--val-size", "16", "--epochs", "1",
            "--batch-size", "8", "--warmup-epochs", "0", "--out", str(out)]
    assert main([*args, "--resume"] if where == "after the weights" else args) == 0, capsys.readouterr().err
    assert json.loads((out / "run.json").read_text())["final"]["epoch"] == 1
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if not p.name.startswith(".")) == [
        "epoch_000.pth", "epoch_000.safetensors", "epoch_001.pth", "epoch_001.safetensors"]
    # a folder with anything else in it is still refused
    other = tmp_path / "other"
    (other / "checkpoints").mkdir(parents=True)
    (other / "notes.txt").write_text("mine")
    assert main(["train", *TINY_CLI, "--epochs", "1", "--out", str(other)]) == 2
    assert "is not empty" in capsys.readouterr().err and (other / "notes.txt").read_text() == "mine"


def test_a_resume_removes_the_temporary_files_of_a_killed_write(tmp_path, monkeypatch, capsys, one_thread):
    """A run killed while it saved its state at an epoch's end (SIGKILL, a scheduler's second signal) leaves that
    write's temporary file, as large as the state (weights and optimizer); the resume removes it, and those of the
    checkpoints folder (they used to stay for good, one more per kill). Other files stay."""
    import erf_lab.io

    out = tmp_path / "run"
    real_replace, saves = erf_lab.io.os.replace, []

    def replace(src, dst):
        if str(dst).endswith(C.STATE_FILE):
            saves.append(dst)
            if len(saves) == 2:  # the first epoch's: its checkpoint is written, its state not yet
                monkeypatch.setattr(erf_lab.io.Path, "unlink", lambda self, missing_ok=False: None)
                raise _Killed()
        return real_replace(src, dst)

    monkeypatch.setattr(erf_lab.io.os, "replace", replace)
    with pytest.raises(_Killed):
        _run(out, recipe=Recipe(epochs=2, batch_size=8, warmup_epochs=0))
    monkeypatch.undo()
    (out / "checkpoints" / ".epoch_002.pth.k1lled00.tmp.pth").write_bytes(b"PK")  # as a kill mid-checkpoint leaves
    (out / ".notes.tmp").write_text("not erf-lab's")
    assert len(list(out.glob(f".{C.STATE_FILE}.*.tmp.pt"))) == 1
    args = ["train", *TINY_CLI, "--num-classes", "4", "--train-size", "32", "--val-size", "16", "--epochs", "2",
            "--batch-size", "8", "--warmup-epochs", "0", "--out", str(out), "--resume"]
    assert main(args) == 0, capsys.readouterr().err
    assert json.loads((out / "run.json").read_text())["final"]["epoch"] == 2
    assert not [p for p in [*out.iterdir(), *(out / "checkpoints").iterdir()] if ".tmp" in p.name and
                p.name != ".notes.tmp"] and (out / ".notes.tmp").is_file()


def test_curves_and_timeline_tick_whole_epochs(tmp_path, monkeypatch, saved_figures):
    """Two or three epochs gave ticks at epoch 1.2, 1.4 ... (the training curves) and 0.5, 1.5 (the timeline):
    there are no such epochs. Both axes now tick whole epochs only."""
    import matplotlib.axes
    from erf_lab.train.loop import plot_curves
    from erf_lab.train.timeline import plot_timeline

    figs = saved_figures
    rows = [{"epoch": e, "train_loss": 1.0 / e, "train_acc": 0.2 * e, "val_loss": 1.1 / e, "val_acc": 0.2 * e,
             "r_rms": 4.0 + e, "r50": 3.0, "shape_bias": 0.3} for e in (1, 2)]
    plot_curves(rows, tmp_path / "curves")
    plot_timeline(rows, {1: np.ones((8, 8))}, tmp_path / "timeline")
    for fig in figs:
        epoch_axes = [ax for ax in {id(a): a for a in fig.findobj(matplotlib.axes.Axes)}.values()
                      if ax.get_xlabel() == "epoch"]
        assert len(epoch_axes) in (2, 3)
        for ax in epoch_axes:
            ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
            assert ticks and all(float(t).is_integer() for t in ticks), ticks
    # the timeline's area panel, empty here (no area ratio reached): on the epoch axis of the others, and says why
    import matplotlib.text

    assert any("no area ratio reached" in t.get_text() for t in figs[1].findobj(matplotlib.text.Text))


def test_a_resumed_run_records_every_session(tmp_path, one_thread):
    """run.json of a resumed run gave only the last session's command, device, versions and start: how the first
    epochs were made (another erf-lab or torch, another device) was lost. It now lists every session, each with
    the step it started from; the training state carries the earlier ones."""
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        _run(out, on_step=_Interrupt(3, KeyboardInterrupt()), argv=["erf-lab", "train", "first"])
    state = C.load_state(out)  # weights-only: the sessions are plain data
    assert [s["command"] for s in state["sessions"]] == [["erf-lab", "train", "first"]] and state["step"] == 3
    info = _run(out, resume=True, argv=["erf-lab", "train", "--resume"])["run_info"]
    sessions = info["sessions"]
    assert [s["command"] for s in sessions] == [["erf-lab", "train", "first"], ["erf-lab", "train", "--resume"]]
    assert [(s["from_epoch"], s["from_step"]) for s in sessions] == [(0, 0), (state["epoch"], 3)]
    assert all(s["device"] == "cpu" and s["versions"]["torch"] == torch.__version__ for s in sessions)
    assert sessions[0]["start_time"] <= sessions[0]["end_time"] <= sessions[1]["start_time"] <= sessions[1]["end_time"]
    assert json.loads((out / "run.json").read_text())["sessions"] == sessions


_TORCHRUN = """import os, subprocess, sys
env = {**os.environ, "TORCHELASTIC_RUN_ID": "r1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "GROUP_WORLD_SIZE": "2",
       "TORCHELASTIC_RESTART_COUNT": "0", "RANK": "0", "LOCAL_RANK": "0"}
code = "import json; from erf_lab.provenance import launch; print(json.dumps(launch()))"
sys.exit(subprocess.run([sys.executable, "-c", code], env=env).returncode)
"""


def test_the_records_say_how_torchrun_started_the_job(tmp_path, monkeypatch, one_thread):
    """run.json's command was erf-lab's own argv (``erf-lab train ...``): under torchrun a reader could not tell that
    several processes ran it, nor rerun it. ``launch`` now holds torchrun's command line, read from the launching
    process (here a stand-in script named torchrun), and the process counts; None for one process."""
    import subprocess
    import sys

    from erf_lab import provenance

    script = tmp_path / "torchrun"
    script.write_text(_TORCHRUN)
    argv = [sys.executable, str(script), "--nnodes", "2", "--nproc_per_node", "2", "-m", "erf_lab", "train"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout)
    assert got["launcher"] == "torchrun" and got["argv"] == argv
    assert (got["world_size"], got["local_world_size"], got["nnodes"], got["restart_count"]) == (4, 2, 2, 0)
    for k in ("TORCHELASTIC_RUN_ID", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    assert provenance.launch() is None and provenance.provenance("x", {})["launch"] is None
    # a training run (torchrun --nproc_per_node 1 here, so that it runs in this process) records it in run.json and
    # in each session; where torchrun's command line cannot be read, a note says how to rerun
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "r2")
    monkeypatch.setattr(provenance, "_parent_argv", lambda: None)
    info = _run(tmp_path / "run", Recipe(epochs=1, batch_size=8, warmup_epochs=0))["run_info"]
    saved = json.loads((tmp_path / "run" / "run.json").read_text())
    assert saved["launch"] == info["sessions"][0]["launch"] == info["launch"]
    assert saved["launch"]["launcher"] == "torchrun" and saved["launch"]["argv"] is None
    assert "torchrun --nnodes 1 --nproc_per_node 1 -m erf_lab" in saved["launch"]["note"]


@pytest.mark.parametrize("local_rank", ["0", "1"])
def test_interrupted_is_said_once_per_node_under_torchrun(monkeypatch, capsys, local_rank):
    """Ctrl-C reaches every torchrun process: each printed 'erf-lab train: interrupted'. Now the node's first one."""
    import erf_lab.cli.commands.train as cmd

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cmd, "run", interrupted)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", local_rank)
    assert main(["train", "--model", "m", "--out", "x"]) == 130
    err = capsys.readouterr().err
    assert err == ("erf-lab train: interrupted\n" if local_rank == "0" else "")


def test_ctrl_c_during_the_last_validation_stops_the_run(tmp_path, monkeypatch, capsys, one_thread):
    """Ctrl-C while the last epoch was evaluated was only noted for the next step's check, which never came: the
    run finished (exit 0) as if no stop had been asked for. It now stops at the epoch's end with its state saved,
    and --resume finishes the run with nothing lost."""
    import signal

    import erf_lab.train.loop as L

    evaluate, calls = L.evaluate, []

    def signalled(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # epoch 2 of 2
            signal.raise_signal(signal.SIGINT)
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(L, "evaluate", signalled)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        _run(out, checkpoint_format="safetensors")
    assert not (out / "run.json").exists() and (out / "checkpoints" / "epoch_002.safetensors").exists()
    assert f"stopped after epoch 2: state saved in {out}" in capsys.readouterr().err
    state = C.load_state(out)
    assert (state["epoch"], state["position"], len(state["rows"])) == (2, 0, 2)
    res = _run(out, resume=True, checkpoint_format="safetensors")
    assert len(calls) == 2 and [r["epoch"] for r in res["rows"]] == [1, 2] and (out / "run.json").exists()


def test_an_out_folder_inside_the_data_splits_is_refused(tmp_path, capsys, one_thread):
    """`train --data D --out D/train/a --force` wrote curves.png and the checkpoints into class 'a': the next run
    on D trained on the figure as an image of 'a' (and --out D/train/runs made a class 'runs' that val/ lacks).
    Now refused before anything is written; an --out beside the splits (D itself) still trains."""
    data = tmp_path / "data"
    _folder(data)
    before = sorted(p.relative_to(data).as_posix() for p in data.rglob("*"))
    args = ["train", *TINY_CLI, "--batch-size", "4", "--epochs", "1", "--warmup-epochs", "0", "--data", str(data),
            "--quiet"]
    for out in (data / "train" / "a", data / "val" / "runs", data / "train"):
        assert main([*args, "--force", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "is inside the --data folder" in err and "Traceback" not in err, err
    assert sorted(p.relative_to(data).as_posix() for p in data.rglob("*")) == before
    assert main([*args, "--out", str(tmp_path / "run")]) == 0


def test_a_run_checkpoint_that_does_not_fit_names_the_options_it_was_trained_with(tmp_path, capsys):
    """User test: 'erf-lab compute --model replknet_31b --weights RUN/model.safetensors' after 'erf-lab train' with
    overrides failed with '848 shape mismatch(es)'; the run's options were in its run.json only. The error now names
    them as CLI options, and those options load the file."""
    import shlex

    out = tmp_path / "run"
    _run(out, recipe=Recipe(epochs=1, batch_size=8, warmup_epochs=0))
    weights = out / "model.safetensors"
    erf = ["--num-images", "1", "--input-size", "32", "--quiet", "--weights", str(weights)]
    assert main(["compute", "--model", "replknet_31b", *erf, "--out", str(tmp_path / "e1")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "shape mismatch" in err
    said = (f"; the erf-lab train run {out.resolve()} trained it as --model replknet_31b --override "
            "'channels=(8,8,16,16)' --override 'layers=(1,1,1,1)' --override 'large_kernel_sizes=(7,7,7,3)' "
            "--override num_classes=4: pass the same\n")
    assert err.endswith(said)
    # the options said load it (shlex reads them as the shell would)
    options = shlex.split(said.split(" trained it as ")[1].split(":")[0])
    assert main(["compute", *options, *erf, "--out", str(tmp_path / "e2")]) == 0, capsys.readouterr().err
    info = json.loads((tmp_path / "e2" / "run.json").read_text())
    assert info["overrides"]["channels"] == [8, 8, 16, 16] and info["random_init"] is False
    # the options of the run, with only the class count missing: the classifier error names them too
    assert main(["compute", *options[:-2], *erf, "--out", str(tmp_path / "e3")]) == 2
    err = capsys.readouterr().err
    assert "classifier has 4 classes, the model 1000" in err and err.endswith(said)
    # a file outside a training run keeps the plain error
    other = tmp_path / "copy.safetensors"
    shutil.copy(weights, other)
    assert main(["compute", "--model", "replknet_31b", *erf[:-1], str(other), "--out", str(tmp_path / "e4")]) == 2
    assert "trained it as" not in capsys.readouterr().err


def test_the_writability_check_leaves_folders_another_process_filled(tmp_path, monkeypatch):
    """A study's jobs check their runs' folders side by side: the check removes the folders it made (``runs/`` and
    the run's own), but where another job made its folder in ``runs/`` meanwhile, removing ``runs/`` failed with
    "Directory not empty" and stopped the study (seen in CI). Now the check leaves such a folder, removes its own, and
    a folder it cannot make still fails as before."""
    import erf_lab.io as eio
    from erf_lab.train import loop

    real = eio.prepare_out_dir

    def and_another_job(path, *a, **k):
        made = real(path, *a, **k)
        (made.parent / "K31-seed0").mkdir()  # the other job, between this one's check and its cleanup
        return made

    monkeypatch.setattr(eio, "prepare_out_dir", and_another_job)
    out = tmp_path / "study" / "runs" / "K3-seed0"
    loop._check_writable(out)
    assert not out.exists() and sorted(p.name for p in out.parent.iterdir()) == ["K31-seed0"]
    monkeypatch.setattr(eio, "prepare_out_dir", real)
    loop._check_writable(tmp_path / "fresh" / "run")
    assert not (tmp_path / "fresh").exists()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ErfLabError):
        loop._check_writable(blocker / "run")

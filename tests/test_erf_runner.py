"""The one ERF orchestrator (``erf_lab.erf.runner.run_erf``): bad input before any work, no lost work on SIGKILL,
reuse of finished runs, the run.json schema, and the training-resolution note."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from erf_lab.cli.main import main
from erf_lab.erf.rundir import RUN_FIELDS, load_run, validate_run_info, write_run_dir
from erf_lab.erf.runner import MAX_INPUT_SIZE, ErfSpec, run_erf, size_note, training_resolution
from erf_lab.errors import ErfLabError

TINY_KW = {"channels": (8, 8, 8, 8), "layers": (1, 1, 1, 1)}
TINY = ["--model", "replknet_31b", "--override", "channels=(8,8,8,8)", "--override", "layers=(1,1,1,1)"]


def _spec(**kw):  # one image per pass unless a test says otherwise (per-image progress, interruption points)
    return ErfSpec("replknet_31b", overrides=TINY_KW, **{"num_images": 2, "input_size": 32, "batch_size": 1, **kw})


def _cli_error(capsys, argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("extra,pattern", [
    (["--input-size", str(MAX_INPUT_SIZE + 1)], "above the maximum"),
    (["--input-size", "100000"], "above the maximum"),
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--device", "meta"], "unsupported device 'meta'"),
    (["--device", "cuda:x"], "unknown device"),
    (["--device", "cuda:99"], "CUDA device"),  # none here; 'only N CUDA device(s) present' on a GPU machine
    (["--batch-size", "0"], "--batch-size must be a positive integer"),
    (["--num-images", "-5"], "--num-images must be a positive integer"),
])
def test_bad_settings_fail_before_any_folder_is_made(tmp_path, capsys, extra, pattern):
    out = tmp_path / "out"
    err = _cli_error(capsys, ["compute", *TINY, "--num-images", "1", "--input-size", "32", *extra, "--out", str(out)])
    assert pattern in err
    assert not out.exists()  # nothing left behind


def test_out_that_is_a_file_or_under_a_file(tmp_path, capsys):
    f = tmp_path / "file.txt"
    f.write_text("x")
    for out, pattern in ((f, "is a file"), (f / "sub", "lies under a file")):
        err = _cli_error(capsys, ["compute", *TINY, "--num-images", "1", "--input-size", "32", "--out", str(out)])
        assert pattern in err
    for cmd in (["analyze", str(f)], ["compare", str(f), "--out", str(f / "x")]):
        _cli_error(capsys, cmd)


def test_unwritable_out_is_refused_before_the_work(tmp_path, monkeypatch):
    """Read-only filesystems: the write probe fails -> one error before any image is measured."""
    import erf_lab.io as io

    measured = []
    monkeypatch.setattr("erf_lab.erf.runner.compute_erf", lambda *a, **k: measured.append(1))

    def refuse(*a, **k):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(io.tempfile, "mkstemp", refuse)
    with pytest.raises(ErfLabError, match="not writable: Read-only file system"):
        run_erf(_spec(), out=tmp_path / "run", show_progress=False)
    assert not measured


def test_all_images_failing_leaves_no_state_file(tmp_path):
    from erf_lab.models import create_model

    w = tmp_path / "nan.pth"
    model = create_model("replknet_31b", **TINY_KW)
    state = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    torch.save(state, w)
    out = tmp_path / "run"
    with pytest.raises(ErfLabError, match="no usable image"):
        run_erf(_spec(weights=str(w)), out=out, show_progress=False, checkpoint_seconds=0)
    assert not out.exists() or not list(out.glob(".erf_state*"))
    res = run_erf(_spec(), out=out, show_progress=False)  # the next run there needs neither --resume nor --force
    assert res["run_info"]["num_used"] == 2


def test_out_of_memory_is_one_line_and_keeps_progress(tmp_path, monkeypatch):
    import erf_lab.erf.attribution as attribution

    real = attribution.EffectiveReceptiveField.attribute
    calls = []

    def attribute(self, x):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 1000000000000 bytes.")
        return real(self, x)

    monkeypatch.setattr(attribution.EffectiveReceptiveField, "attribute", attribute)
    out = tmp_path / "run"
    with pytest.raises(ErfLabError, match=r"out of memory .*--batch-size \(progress saved in (.*): --resume --out "
                                          r"\1, with any") as e:
        run_erf(_spec(num_images=3, batch_size=2), out=out, show_progress=False, checkpoint_seconds=0)
    assert f"progress saved in {out}:" in str(e.value)
    assert (out / ".erf_state.npz").is_file() and not (out / "run.json").exists()
    # the advised fix: resume with a smaller batch (it changes the speed, not the map): the same map as one run
    resumed = run_erf(_spec(num_images=3, batch_size=1), out=out, show_progress=False, resume=True)
    assert resumed["run_info"]["resumed_after_images"] == 2 and resumed["run_info"]["num_used"] == 3
    whole = run_erf(_spec(num_images=3), out=tmp_path / "whole", show_progress=False)
    np.testing.assert_allclose(resumed["result"].erf, whole["result"].erf, rtol=1e-6, atol=1e-12)
    with pytest.raises(ErfLabError, match="input_size"):  # a setting that changes the map still refuses
        run_erf(_spec(num_images=3, input_size=48), out=out, show_progress=False, resume=True)


def _fail_above(monkeypatch, images: int, message: str = "DefaultCPUAllocator: can't allocate memory: you tried "
                "to allocate 1000000000000 bytes. Error code 12 (Cannot allocate memory)"):
    """Passes of more than ``images`` images run out of memory (the allocator's own message); returns the sizes
    of the passes tried."""
    import erf_lab.erf.attribution as attribution

    real, tried = attribution.EffectiveReceptiveField.attribute, []

    def attribute(self, x):
        tried.append(len(x))
        if len(x) > images:
            raise RuntimeError(message)
        return real(self, x)

    monkeypatch.setattr(attribution.EffectiveReceptiveField, "attribute", attribute)
    return tried


def test_an_auto_batch_that_runs_out_of_memory_is_halved_and_the_run_goes_on(tmp_path, monkeypatch):
    """The auto batch (here 7 images of 32 px) halves where a pass runs out of memory and keeps the halved size;
    the map is the one of one-image passes, and run.json records the sizes that did not fit (issue 14)."""
    tried = _fail_above(monkeypatch, 3)
    res = run_erf(_spec(num_images=7, batch_size=None), out=tmp_path / "auto", show_progress=False)
    info = json.loads((tmp_path / "auto" / "run.json").read_text())
    assert tried == [7, 3, 3, 1] and info["batch_halved_at"] == [7] and info["batch_size"] == 3
    assert [n for n, _ in res["result"].info["batch_seconds"]] == [3, 3, 1] and info["num_used"] == 7
    validate_run_info(info)
    one = run_erf(_spec(num_images=7), out=tmp_path / "one", show_progress=False)
    assert one["run_info"]["batch_halved_at"] is None
    np.testing.assert_allclose(res["result"].erf, one["result"].erf, rtol=1e-5, atol=1e-12)


def test_the_memory_sized_batch_path_with_the_device_memory_simulated(tmp_path, monkeypatch):
    """The CUDA auto batch's logic on the CPU, the device's memory numbers simulated: a one-image pass of 1 GB peak
    with 100 GB available gives batches of half the images left (the FLOPs counted on the first pass, as in a
    fresh process), and a pass of 4 that runs out of memory is halved (issue 14). The old code read the FLOP
    counter in place of the image count there (a TypeError, or no cap at all)."""
    from erf_lab.erf import compute
    from erf_lab.models import create_model

    monkeypatch.setenv("ERF_LAB_CACHE", str(tmp_path / "cache"))  # the FLOPs are counted, not read from a cache
    monkeypatch.setattr(compute, "_sizes_batch_by_memory", lambda dev: True)
    monkeypatch.setattr(compute, "_memory_peak_start", lambda dev: 1000)
    monkeypatch.setattr(compute, "_memory_peak", lambda dev: 1000 + 10**9)
    monkeypatch.setattr(compute, "_cuda_available_bytes", lambda dev: 100 * 10**9)
    monkeypatch.setattr(compute, "_sgemm_reference", lambda dev: {"sgemm_gflops": 100.0})
    model = create_model("replknet_31b", **TINY_KW).eval()
    images = torch.rand(9, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    one = compute.compute_erf(model, images, batch_size=1, show_progress=False)
    auto = compute.compute_erf(model, images, batch_size=None, show_progress=False, roofline=True)
    assert [n for n, _ in auto.info["batch_seconds"]] == [1, 4, 4] and auto.info["flops_per_image"] > 0
    assert auto.info["batch_memory"] == {"per_image_bytes": 10**9, "available_bytes": 100 * 10**9,
                                         "fraction": 0.6, "batch_size": 4}
    np.testing.assert_allclose(auto.erf, one.erf, rtol=1e-5, atol=1e-12)
    tried = _fail_above(monkeypatch, 2, "CUDA out of memory. Tried to allocate 2.00 GiB")
    halved = compute.compute_erf(model, images, batch_size=None, show_progress=False, roofline=True)
    assert tried == [1, 4, 2, 2, 2, 2] and halved.info["batch_halved_at"] == [4]
    assert [n for n, _ in halved.info["batch_seconds"]] == [1, 2, 2, 2, 2] and halved.info["batch_size"] == 2
    np.testing.assert_allclose(halved.erf, one.erf, rtol=1e-5, atol=1e-12)


def test_a_halved_part_that_still_does_not_fit_is_halved_again_and_an_explicit_batch_never(monkeypatch):
    from erf_lab.erf.compute import compute_erf
    from erf_lab.models import create_model

    model = create_model("replknet_31b", **TINY_KW).eval()
    images = torch.rand(9, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    reference = compute_erf(model, images, batch_size=1, show_progress=False)
    tried = _fail_above(monkeypatch, 2, "CUDA out of memory. Tried to allocate 2.00 GiB")
    auto = compute_erf(model, images, batch_size=8, shrink_on_oom=True, show_progress=False)
    # 8 fails, its first half (4) fails and is run as 2 + 2, the second half at the size now in force, the ninth
    # image alone at the end
    assert tried == [8, 4, 2, 2, 2, 2, 1] and auto.info["batch_halved_at"] == [8, 4] and auto.info["batch_size"] == 2
    assert [n for n, _ in auto.info["batch_seconds"]] == [2, 2, 2, 2, 1] and auto.num_used == 9
    np.testing.assert_allclose(auto.erf, reference.erf, rtol=1e-5, atol=1e-12)
    with pytest.raises(RuntimeError, match="CUDA out of memory"):  # an explicit size is the user's: not changed
        compute_erf(model, images, batch_size=8, show_progress=False)
    tried.clear()
    with pytest.raises(RuntimeError, match="CUDA out of memory"):  # a single image that does not fit: no halving
        _fail_above(monkeypatch, 0, "CUDA out of memory. Tried to allocate 2.00 GiB")
        compute_erf(model, images, batch_size=1, shrink_on_oom=True, show_progress=False)


def test_reuse_returns_a_finished_run_and_redoes_a_different_one(tmp_path):
    out = tmp_path / "run"
    first = run_erf(_spec(), out=out, show_progress=False, reuse=True)
    assert not first["already_complete"]
    again = run_erf(_spec(), out=out, show_progress=False, reuse=True)
    assert again["already_complete"] and again["metrics"] == first["metrics"]
    other = run_erf(_spec(aggregate="abs"), out=out, show_progress=False, reuse=True)
    assert not other["already_complete"] and json.loads((out / "run.json").read_text())["aggregate"] == "abs"


def test_an_image_rewritten_in_place_is_not_resumed_or_reused(tmp_path):
    """Resume and reuse compare the images' contents, not only their names: a file rewritten under the same name
    (same size, even) would otherwise mix two image sets in one ERF matrix."""
    from PIL import Image

    from erf_lab.erf.images import load_images

    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(folder / f"{i}.bmp")
    before = load_images(folder, input_size=32)
    assert len(before.file_sha256) == 3 and len(before.content_sha256) == 64

    class _Stop(Exception):
        pass

    def stop_after_one(acc):
        if len(acc.processed) == 1:
            raise _Stop

    out, spec = tmp_path / "run", _spec(images=str(folder), num_images=3)
    with pytest.raises(_Stop):
        run_erf(spec, out=out, show_progress=False, on_batch=stop_after_one, checkpoint_seconds=0)
    size = (folder / "2.bmp").stat().st_size
    Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(folder / "2.bmp")
    assert (folder / "2.bmp").stat().st_size == size  # same name, same size: only the contents tell
    after = load_images(folder, input_size=32)
    assert after.ids == before.ids and after.content_sha256 != before.content_sha256
    with pytest.raises(ErfLabError, match=r"settings differ .*images' contents"):
        run_erf(spec, out=out, show_progress=False, resume=True)

    done = run_erf(spec, out=tmp_path / "done", show_progress=False, reuse=True)
    assert not done["already_complete"]
    assert done["run_info"]["config"]["images_sha256"] == after.content_sha256
    assert run_erf(spec, out=tmp_path / "done", show_progress=False, reuse=True)["already_complete"]
    Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(folder / "0.bmp")
    assert not run_erf(spec, out=tmp_path / "done", show_progress=False, reuse=True)["already_complete"]
    # a run written before the content check (no images_sha256) is still reused, with a warning
    info_path = tmp_path / "done" / "run.json"
    info = json.loads(info_path.read_text())
    del info["config"]["images_sha256"]
    info_path.write_text(json.dumps(info))
    with pytest.warns(UserWarning, match="predates image-content checks"):
        assert run_erf(spec, out=tmp_path / "done", show_progress=False, reuse=True)["already_complete"]


def test_config_diff_names_what_changed():
    from erf_lab.erf.runner import config_diff

    new = {"model": "m", "images": ["a.png"], "images_sha256": "x" * 64, "mean": (0.5,)}
    assert config_diff({"model": "m", "images": ["a.png"], "images_sha256": "x" * 64, "mean": [0.5]}, new) == []
    assert config_diff({"model": "m", "images": ["b.png"], "images_sha256": "y" * 64, "mean": [0.5]}, new) == \
        ["images", "images_sha256"]
    assert config_diff({"model": "m", "images": ["a.png"], "images_sha256": "x" * 64, "mean": [0.5], "old": 1},
                       new) == ["old"]
    with pytest.warns(UserWarning, match="predates"):
        assert config_diff({"model": "m", "images": ["a.png"], "mean": [0.5]}, new) == []


def test_sigkill_mid_run_loses_at_most_the_current_image(tmp_path):
    """Progress is saved atomically (here after every image); a SIGKILL leaves a resumable state, and the resumed
    run gives the same matrix as an uninterrupted one, without measuring saved images again. 120 images: the
    tiny model measures one in milliseconds, so a run of the 8 built-in ones could end between two polls."""
    from PIL import Image

    folder, n = tmp_path / "images", 120
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(folder / f"img{i:03d}.png")
    full = run_erf(_spec(num_images=n, images=str(folder)), out=tmp_path / "full", show_progress=False)
    part = tmp_path / "part"
    cmd = [sys.executable, "-m", "erf_lab", "compute", *TINY, "--images", str(folder), "--num-images", str(n),
           "--input-size", "32", "--batch-size", "1", "--checkpoint-seconds", "0", "--out", str(part), "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    state = part / ".erf_state.npz"
    deadline = time.time() + 240
    done = 0
    while time.time() < deadline and proc.poll() is None:
        if state.is_file():
            try:
                with np.load(state, allow_pickle=False) as z:
                    done = len(json.loads(str(z["processed"])))
            except (OSError, ValueError, KeyError):
                done = 0
            if done >= 3:
                break
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (part / "run.json").exists() and not (part / "erf.npy").exists()
    with np.load(state, allow_pickle=False) as z:
        saved = len(json.loads(str(z["processed"])))
    assert 3 <= saved < n
    counted = []
    res = run_erf(_spec(num_images=n, images=str(folder)), out=part, resume=True, show_progress=False,
                  on_batch=lambda a: counted.append(len(a.processed)))
    assert counted[0] == saved + 1 and res["run_info"]["resumed_after_images"] == saved
    np.testing.assert_array_equal(np.load(part / "erf.npy"), np.load(tmp_path / "full" / "erf.npy"))
    assert full["run_info"]["num_used"] == res["run_info"]["num_used"] == n


def test_run_json_schema_names_the_wrong_field(tmp_path, capsys):
    run = tmp_path / "run"
    write_run_dir(run, np.ones((9, 9)), {"model": "m", "theoretical_rf": 31, "num_used": 2})
    info = json.loads((run / "run.json").read_text())
    assert info["schema_version"] == 1 and info["kind"] == "erf" and set(info) <= set(RUN_FIELDS)
    info["theoretical_rf"] = "abc"
    (run / "run.json").write_text(json.dumps(info))
    err = _cli_error(capsys, ["analyze", str(run)])
    assert "field 'theoretical_rf' must be integer or null" in err
    with pytest.raises(ErfLabError, match="field 'num_used' must be integer"):
        validate_run_info({"schema_version": 1, "kind": "erf", "num_used": True})
    with pytest.raises(ErfLabError, match="schema_version 9"):
        validate_run_info({"schema_version": 9, "kind": "erf"})
    with pytest.raises(ErfLabError, match="field 'input_size' must be positive"):
        validate_run_info({"input_size": 0})
    legacy = {"model": "m", "input_size": 64, "theoretical_rf": 11}  # written before the schema existed
    assert validate_run_info(legacy) is legacy


def test_analyze_recomputes_a_corrupt_metrics_json(tmp_path, capsys):
    run = tmp_path / "run"
    yy, xx = np.mgrid[:33, :33]
    write_run_dir(run, np.exp(-((yy - 16) ** 2 + (xx - 16) ** 2) / 18.0), {"model": "m"}, theoretical_rf=40)
    good = json.loads((run / "metrics.json").read_text())
    (run / "metrics.json").write_text("{ truncated")
    assert load_run(run).metrics is None
    assert main(["analyze", str(run)]) == 0
    capsys.readouterr()
    assert json.loads((run / "metrics.json").read_text()) == good


def test_training_resolution_and_size_note():
    class M(torch.nn.Module):
        pretrained_cfg = {"input_size": (3, 384, 384)}

    random_init = ErfSpec("replknet_31b", weights=None)
    assert training_resolution(random_init, M()) is None  # never trained: no training resolution, no note
    trained = ErfSpec("x", weights="/w/model.pth")
    assert training_resolution(trained, torch.nn.Identity()) is None
    # the model's pretrained_cfg describes its published weights, not a file of other weights: unknown (was 384)
    assert training_resolution(trained, M()) is None
    assert training_resolution(ErfSpec("x", weights="/w/epoch_120.pth"), M()) is None  # an epoch, not a size
    assert training_resolution(ErfSpec("x", overrides={"pretrained": True}), M()) == 384
    assert training_resolution(ErfSpec("x", train_size=320), M()) == 320
    named = ErfSpec("replknet_31b", weights="/w/RepLKNet-31B_ImageNet-1K_384.pth")
    assert training_resolution(named, M()) == 384 and training_resolution(named, torch.nn.Identity()) == 384
    official = ErfSpec("replknet_31b", weights="/w/RepLKNet-31B_ImageNet-1K_224.pth")
    assert training_resolution(official, M()) == 224  # the checkpoint's own size wins over the model default
    assert size_note(1024, 224) and "4.6x" in size_note(1024, 224)
    assert size_note(448, 224) is None and size_note(100, 224) and size_note(1024, None) is None


def test_a_given_train_size_says_where_the_weights_disagree():
    """User test: --train-size 224 on weights whose record says 64 px was recorded 'given (--train-size)' without a
    word of the record, and on a random initialization (never trained) as if it meant something. The given size
    still wins (the user's word), but the disagreement is warned about and recorded, and so is a random init."""
    from erf_lab.erf.runner import training_resolution_source

    shipped = ErfSpec("replknet_31b", weights="builtin:cue-world/K31-seed0", train_size=224)
    with pytest.warns(UserWarning, match="--train-size 224 overrides the training resolution 64 px"):
        size, source = training_resolution_source(shipped, torch.nn.Identity())
    assert size == 224 and source.startswith("given (--train-size), against 64 px in ")
    same = ErfSpec("replknet_31b", weights="builtin:cue-world/K31-seed0", train_size=64)
    assert training_resolution_source(same, torch.nn.Identity()) == (64, "given (--train-size)")
    assert training_resolution_source(ErfSpec("replknet_31b", train_size=224), torch.nn.Identity()) == (
        224, "given (--train-size), for a random initialization (never trained)")


def test_training_resolution_comes_from_the_training_record(tmp_path, capsys):
    """User test: a checkpoint of 'erf-lab train' at 32 px measured at 64 px recorded train_size 224 (the model's
    default for official ImageNet weights) and a size note about 224 px. Now the run folder's run.json, the
    safetensors metadata train writes, or a run in progress give 32; a file without any record is 'unknown'."""
    import shutil

    from erf_lab.erf.runner import training_resolution_source
    from erf_lab.models import create_model
    from erf_lab.train.loop import train
    from erf_lab.train.recipe import Recipe

    run = tmp_path / "t1"
    train("replknet_31b", "cue-world", out=run, overrides=TINY_KW, show_progress=False, input_size=32, train_size=16,
          val_size=8, recipe=Recipe(epochs=1, batch_size=8, warmup_epochs=0.5))
    model = create_model("replknet_31b", num_classes=10, **TINY_KW)
    assert model.default_cfg["input_size"][-1] == 224  # what was recorded before
    for name in ("checkpoints/epoch_001.pth", "checkpoints/epoch_001.safetensors", "model.pth"):
        size, where = training_resolution_source(ErfSpec("replknet_31b", weights=str(run / name)), model)
        assert size == 32, (name, where)
    loose = tmp_path / "loose"
    loose.mkdir()
    for suffix in ("pth", "safetensors"):
        shutil.copy(run / "checkpoints" / f"epoch_001.{suffix}", loose / f"epoch_001.{suffix}")
    assert training_resolution_source(ErfSpec("replknet_31b", weights=str(loose / "epoch_001.safetensors")), model) \
        == (32, "the safetensors metadata of epoch_001.safetensors")  # the file says it, out of its folder too
    # the .pth carries it inside too ({"model": sd, "erf_lab": {...}}): before, only a run.json beside it did
    assert training_resolution_source(ErfSpec("replknet_31b", weights=str(loose / "epoch_001.pth")), model) \
        == (32, "the erf-lab record in epoch_001.pth")
    plain = loose / "plain.pth"  # the same weights saved by other code: no record
    torch.save(torch.load(loose / "epoch_001.pth", weights_only=True)["model"], plain)
    size, where = training_resolution_source(ErfSpec("replknet_31b", weights=str(plain)), model)
    assert size is None and where.startswith("unknown: plain.pth carries no training record")
    progress = tmp_path / "in_progress"
    (progress / "checkpoints").mkdir(parents=True)
    shutil.copy(plain, progress / "checkpoints" / "epoch_001.pth")
    torch.save({"settings": {"input_size": 48}}, progress / ".train_state.pt")
    in_progress = ErfSpec("replknet_31b", weights=str(progress / "checkpoints/epoch_001.pth"))
    assert training_resolution(in_progress, model) == 48
    # 'erf-lab reparam' carries the record into the deploy file it writes (metadata; the .pth's erf_lab entry), which
    # keeps it when copied alone (before: a .pth said it only through the .run.json beside it)
    (tmp_path / "elsewhere").mkdir()
    for suffix in ("safetensors", "pth"):
        deploy = loose / f"deploy.{suffix}"
        assert main(["reparam", *TINY, "--override", "num_classes=10", "--weights", str(run / "model.pth"),
                     "--check-size", "32", "--out", str(deploy)]) == 0
        assert training_resolution(ErfSpec("replknet_31b", weights=str(deploy)), model) == 32, suffix
        alone = shutil.copy(deploy, tmp_path / "elsewhere" / deploy.name)
        assert training_resolution(ErfSpec("replknet_31b", weights=str(alone)), model) == 32, suffix
    capsys.readouterr()

    out = tmp_path / "c"
    base = [*TINY, "--override", "num_classes=10", "--input-size", "128", "--num-images", "1", "--quiet"]
    older = shutil.copy(plain, run / "checkpoints" / "older.pth")  # a .pth without a record: its run folder's
    assert main(["compute", *base, "--weights", str(older), "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    info = json.loads((out / "run.json").read_text())
    assert info["train_size"] == 32 and info["train_size_source"] == f"the erf-lab train run {run.resolve()}/run.json"
    assert info["size_note"].startswith("measured at 128px, 4x the training resolution 32px") and "224" not in stdout
    assert main(["compute", *base, "--weights", str(loose / "epoch_001.pth"), "--out", str(out), "--force"]) == 0
    info = json.loads((out / "run.json").read_text())
    assert info["train_size"] == 32 and info["train_size_source"] == "the erf-lab record in epoch_001.pth"
    assert main(["compute", *base, "--weights", str(plain), "--out", str(out), "--force"]) == 0
    stdout = capsys.readouterr().out
    info = json.loads((out / "run.json").read_text())
    assert info["train_size"] is None and info["train_size_source"].startswith("unknown: ")
    assert info["size_note"].startswith("the training resolution is unknown (plain.pth carries no training record")
    assert "note: the training resolution is unknown" in stdout and "224" not in stdout


def test_size_note_is_recorded_and_printed(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["compute", *TINY, "--num-images", "1", "--input-size", "128", "--train-size", "32",
                 "--out", str(out), "--quiet"]) == 0
    stdout = capsys.readouterr().out
    info = json.loads((out / "run.json").read_text())
    assert info["train_size"] == 32 and "4x the training resolution 32px" in info["size_note"]
    assert "note: measured at 128px" in stdout


def test_auto_batch_size_rule_and_same_result(tmp_path, monkeypatch):
    from erf_lab.erf.runner import auto_batch_size

    sizes = (32, 128, 224, 256, 320, 448, 640, 1024)
    with monkeypatch.context() as m:  # an AVX2 CPU: 448^2 pixels per pass at most, capped at 8 and at the images
        m.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
        assert [auto_batch_size(s, 50) for s in sizes] == [8, 8, 4, 3, 1, 1, 1, 1]
        assert auto_batch_size(224, 3) == 3 and auto_batch_size(224, 1) == 1
    with monkeypatch.context() as m:  # PyTorch's AVX-512 kernels: twice the pixels, on the CPU only
        m.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
        assert [auto_batch_size(s, 50) for s in sizes] == [8, 8, 8, 6, 3, 2, 1, 1]
        assert auto_batch_size(224, 3) == 3 and auto_batch_size(448, 50, "cpu") == 2
        assert auto_batch_size(448, 50, "cuda") == auto_batch_size(448, 50, torch.device("cuda", 0)) == 1
    from erf_lab.erf import runner

    asked = []  # the run asks the rule with its own device
    monkeypatch.setattr(runner, "auto_batch_size", lambda *a: asked.append(a) or auto_batch_size(*a))
    auto = run_erf(_spec(num_images=5, batch_size=None), out=tmp_path / "auto", show_progress=False)
    assert asked == [(32, 5, "cpu")]
    one = run_erf(_spec(num_images=5, batch_size=1), out=tmp_path / "one", show_progress=False)
    assert auto["run_info"]["batch_size"] == 5 and one["run_info"]["batch_size"] == 1  # 32 px: all 5 in one pass
    a, b = np.load(tmp_path / "auto" / "erf.npy"), np.load(tmp_path / "one" / "erf.npy")
    assert np.allclose(a, b, rtol=1e-5, atol=1e-7 * np.abs(b).max())


def test_memory_batch_size_rule_and_auto_on_the_cpu(tmp_path):
    """On CUDA an auto batch is sized by memory (issue 14: the 50-image 1024^2 protocol in batches on a GPU): 60 % of
    the memory left after a one-image pass, at that pass's peak per image, 1 to 32 images."""
    from erf_lab.erf.compute import AUTO_BATCH_MAX_CUDA, memory_batch_size

    gib = 1 << 30
    assert memory_batch_size(4.5 * gib, 130 * gib) == 17  # RepLKNet-31B at 1024^2 (~4.5 GiB) on an H200: 0.6*130/4.5
    assert memory_batch_size(4.5 * gib, 20 * gib) == 2 and memory_batch_size(4.5 * gib, 2 * gib) == 1
    assert memory_batch_size(1 << 20, 1 << 40) == AUTO_BATCH_MAX_CUDA == 32
    assert memory_batch_size(0, 0) == 1 and memory_batch_size(gib, 10 * gib, cap=4) == 4
    # with the images left known, at most half of them: the size repeats, and its repeat gives the steady rate
    assert memory_batch_size(4.5 * gib, 130 * gib, remaining=49) == 17  # the paper's 50 at 1024^2: 1, 17, 17, 15
    assert memory_batch_size(gib, 100 * gib, remaining=49) == 24 and memory_batch_size(gib, 100 * gib, remaining=7) == 3
    assert memory_batch_size(gib, 100 * gib, remaining=1) == 1
    from erf_lab.erf.compute import compute_erf
    from erf_lab.models import create_model

    model = create_model("replknet_31b", **TINY_KW).eval()
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    auto = compute_erf(model, images, batch_size=None, show_progress=False)
    one = compute_erf(model, images, batch_size=1, show_progress=False)
    assert auto.info["batch_size"] == 1 and "batch_memory" not in auto.info  # sized by memory on CUDA only
    assert [n for n, _ in auto.info["batch_seconds"]] == [1, 1, 1]
    np.testing.assert_array_equal(auto.erf, one.erf)


def test_background_imports_run_on_their_own_thread_and_leave_failures_to_the_caller(tmp_path, monkeypatch):
    """captum and the figure backends are imported on a second thread while the model is built (issue 14): the
    module is imported there, and a failing import neither raises in the caller nor leaves a thread running."""
    import sys

    from erf_lab.erf import runner

    (tmp_path / "erf_bg_probe.py").write_text("import threading\nTHREAD = threading.current_thread().name\n")
    (tmp_path / "erf_bg_broken.py").write_text("raise RuntimeError('broken on purpose')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("erf_bg_probe", "erf_bg_broken", "erf_bg_after"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    (tmp_path / "erf_bg_after.py").write_text("X = 1\n")
    interval = sys.getswitchinterval()
    (tmp_path / "erf_bg_interval.py").write_text("import sys\nSEEN = sys.getswitchinterval()\n")
    monkeypatch.delitem(sys.modules, "erf_bg_interval", raising=False)
    thread = runner._start_background_imports(("erf_bg_broken", "erf_bg_probe", "erf_bg_missing", "erf_bg_after",
                                               "erf_bg_interval"))
    thread.join(30)
    assert not thread.is_alive() and thread.name == "erf-lab-imports"
    # a short GIL switch interval while the thread imports, the interpreter's own again afterwards
    assert sys.modules["erf_bg_interval"].SEEN == pytest.approx(runner.BACKGROUND_SWITCH_INTERVAL_S)
    assert runner.BACKGROUND_SWITCH_INTERVAL_S < interval
    assert sys.getswitchinterval() == interval
    # two at once (the app): the interval comes back when the last one ends; nothing left to import: untouched
    first, second = (runner._start_background_imports((f"erf_bg_missing_{i}",)) for i in range(2))
    first.join(30), second.join(30)
    assert sys.getswitchinterval() == interval and runner._switch["threads"] == 0
    sys.setswitchinterval(0.004)
    try:
        runner._start_background_imports(("erf_bg_after",)).join(30)
        assert sys.getswitchinterval() == 0.004
    finally:
        sys.setswitchinterval(interval)
    assert sys.modules["erf_bg_probe"].THREAD == "erf-lab-imports" and sys.modules["erf_bg_after"].X == 1
    assert "erf_bg_broken" not in sys.modules and "erf_bg_missing" not in sys.modules
    assert set(runner.BACKGROUND_IMPORTS) >= {"captum.attr", "matplotlib.backends.backend_pdf"}


@pytest.mark.parametrize("size", [45, 50, 64, 101])
def test_layer_geometry_centre_of_a_size_dependent_padding_is_the_input_sizes(tmp_path, monkeypatch, size):
    """TF-'SAME' convs (EfficientNet-Lite's SameConv2d) pad by the map's parity, so unit 0's centre depends on the
    input size; the geometry was probed at 32 px only, and erf_centre put the metrics' squares 2-3 px beside the
    centre unit's receptive field at 45 or 50 px (efficientnet_lite0 at 100 / 225 px: 28 / 31 px). The gradient of
    a linear stack says where that unit's field is centred."""
    import math

    import torch
    import torch.nn as nn

    from erf_lab.erf import runner
    from erf_lab.erf.metrics import distribution_stats
    from erf_lab.models.efficientnet_lite import SameConv2d

    monkeypatch.setenv("ERF_LAB_CACHE", str(tmp_path))
    layers = [SameConv2d(3, 1, 3, stride=2), SameConv2d(1, 1, 5), SameConv2d(1, 1, 3, stride=2), SameConv2d(1, 1, 3)]
    for conv in layers:
        nn.init.constant_(conv.weight, 1.0)
    net = nn.Sequential(*layers)
    geom = runner.layer_geometry(net, None, size)
    x = torch.zeros(1, 3, size, size, requires_grad=True)
    out = net(x)
    h, w = out.shape[-2:]
    out[0, 0, h // 2, w // 2].backward()
    com = distribution_stats(x.grad[0].sum(0).numpy())["center_of_mass"]
    assert runner.erf_centre(geom, size, (h, w)) == [math.floor(c + 0.5) for c in com]


def test_layer_geometry_of_a_model_that_refuses_the_second_probe_size(tmp_path, monkeypatch):
    """The probe at the input's residue (66 px for 98 px and stride 4) is a size the measurement never uses: a model
    that takes only some sizes is probed at the input's own size instead of failing on 66 px."""
    import torch.nn as nn

    from erf_lab.erf import runner

    class Picky(nn.Sequential):
        def forward(self, x):
            assert x.shape[-1] in (64, 98), f"size {x.shape[-1]}"
            return super().forward(x)

    monkeypatch.setenv("ERF_LAB_CACHE", str(tmp_path))
    net = Picky(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.Conv2d(4, 4, 3, stride=2, padding=1))
    geom = runner.layer_geometry(net, None, 98)
    assert geom["stride"] == 4 and geom["theoretical_rf"] == 7 and runner.erf_centre(geom, 98, (25, 25)) == [48, 48]


def test_an_input_under_the_stride_is_refused_for_what_its_map_really_is(tmp_path, monkeypatch):
    """A 'same'-padded stride-4 net at 3 px has a 1 x 1 map (one unit), which the refusal called 'under 1 pixel'
    (ResNet-18 at 16 px: 'the feature map would be under 1 pixel', for its 1 x 1 map)."""
    import torch.nn as nn

    from erf_lab.erf import runner
    from erf_lab.erf.receptive_field import list_layers

    monkeypatch.setenv("ERF_LAB_CACHE", str(tmp_path))
    same = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.Conv2d(4, 4, 3, stride=2, padding=1))
    assert list_layers(same, 3)[-1]["shape"] == [4, 1, 1]
    with pytest.raises(ErfLabError, match=r"input size 3 is too small for layer 'forward_features' \(total stride "
                                          r"4: the map would hold a single unit, fed by less than one stride of "
                                          r"image\); use --input-size >= 4"):
        runner.layer_geometry(same, None, 3)
    assert runner.layer_geometry(same, None, 4)["feature_shape"] == [4, 1, 1]


def test_layer_geometry_is_kept_per_structure_and_a_changed_structure_is_probed_again(tmp_path, monkeypatch):
    """The probe forward of ``layer_geometry`` runs once per model structure / layer / size (the erf-lab cache's
    erf_geometry.json); a different stride (same tensors) or a corrupt table makes it probe again, and the cached
    answer equals the probed one."""
    import torch.nn as nn

    from erf_lab.erf import receptive_field, runner

    monkeypatch.setenv("ERF_LAB_CACHE", str(tmp_path))
    probes = []
    real = receptive_field.list_layers

    def counting(model, size):
        probes.append(size)
        return real(model, size)

    monkeypatch.setattr(receptive_field, "list_layers", counting)

    def net(stride):
        m = nn.Sequential(nn.Conv2d(3, 4, 3, stride=stride, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 5, padding=2))
        m.forward_features = m.forward
        return m

    first = runner.layer_geometry(net(1), None, 40)
    again = runner.layer_geometry(net(1), None, 40)
    assert probes == [40] and again == first and first["theoretical_rf"] == 7 and first["feature_shape"] == [4, 40, 40]
    strided = runner.layer_geometry(net(2), None, 40)
    assert probes == [40, 40] and strided["stride"] == 2 and strided["theoretical_rf"] == 11
    assert strided["feature_shape"] == [4, 20, 20]
    assert len(json.loads((tmp_path / runner.GEOMETRY_CACHE).read_text())) == 2
    (tmp_path / runner.GEOMETRY_CACHE).write_text("{not json")
    assert runner.layer_geometry(net(1), None, 40) == first and probes == [40, 40, 40]


def test_structure_key_sees_settings_and_classes_without_a_source_file():
    """The structure key changes with a container's plain setting that forward reads (not in any repr) and with
    the bytecode of a class defined where inspect finds no source (a notebook, ``python -c``), and is stable."""
    import subprocess
    import sys

    import torch.nn as nn

    from erf_lab.erf.structure_cache import structure_key

    class Net(nn.Sequential):
        pass

    a, b = Net(nn.Conv2d(3, 4, 3)), Net(nn.Conv2d(3, 4, 3))
    b.pool = "max"
    assert structure_key(a, "x") == structure_key(Net(nn.Conv2d(3, 4, 3)), "x") != structure_key(b, "x")
    assert structure_key(a, "x") != structure_key(a.train(False), "y")
    a.train(True)
    assert structure_key(a, "x") == structure_key(a.eval(), "x")  # the train / eval flag does not count
    code = ("import torch.nn as nn\nfrom erf_lab.erf.structure_cache import structure_key\n"
            "class M(nn.Module):\n    def forward(self, x):\n        return x * {}\n"
            "print(structure_key(M(), 'k'))\n")
    keys = [subprocess.run([sys.executable, "-c", code.format(v)], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONPATH": os.getcwd()}).stdout.strip() for v in (2, 2, 3)]
    assert keys[0] == keys[1] != keys[2] and len(keys[0]) == 32


def test_a_file_name_that_is_not_utf8_is_measured(tmp_path):
    """Linux allows any bytes in a file name; the image-content hash of a run must not fail on one."""
    import os

    from PIL import Image

    from erf_lab.erf.images import load_images

    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(folder / "ok.bmp")
    raw = os.path.join(os.fsencode(folder), b"caf\xe9.bmp")
    with open(raw, "wb") as f:
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(f, format="BMP")
    images = load_images(folder, input_size=32)
    assert len(images.ids) == 2 and len(images.content_sha256) == 64
    res = run_erf(_spec(images=str(folder), num_images=2), out=tmp_path / "run", show_progress=False)
    assert res["result"].num_used == 2


@pytest.mark.parametrize("size,centre", [(224, 96), (256, 128)])
def test_metrics_centre_on_the_measured_units_receptive_field(tmp_path, size, centre):
    """RepLKNet's map at 224 px is 7 x 7: unit 3 is centred at input pixel 32 * 3 = 96, not at 112 (at 256 px,
    unit 4 of 8 at 128 = 256 // 2, the official script's centre). The run records it and its metrics use it."""
    res = run_erf(_spec(num_images=1, input_size=size), out=tmp_path / "run", show_progress=False)
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["erf_centre"] == [centre, centre] and res["metrics"]["center"] == [centre, centre]
    assert ("centre_off_map_middle" in res["metrics"]["flags"]) == (centre != size // 2)
    com = res["metrics"]["distribution"]["center_of_mass"]
    assert abs(com[0] - centre) < abs(com[0] - size // 2) or centre == size // 2
    from erf_lab.erf.analysis import analyze

    again = analyze(tmp_path / "run", out=tmp_path / "again")["metrics"]  # re-analysis keeps the centre
    assert again["center"] == [centre, centre] and again["high_contribution"] == res["metrics"]["high_contribution"]


def test_an_error_after_measured_images_or_while_writing_keeps_them_for_resume(tmp_path, monkeypatch):
    """An ErfLabError once images are measured (e.g. one raised by a later batch), or any failure while the run
    directory is written, keeps the measurement: --resume finishes it without measuring those images again."""
    import erf_lab.erf.runner as runner

    run_erf(_spec(num_images=3), out=tmp_path / "full", show_progress=False)  # the reference: erf.npy

    def fail_after_two(acc):
        if len(acc.processed) == 2:
            raise ErfLabError("a failure after two images")

    out = tmp_path / "run"
    with pytest.raises(ErfLabError, match="after two images"):
        run_erf(_spec(num_images=3), out=out, show_progress=False, on_batch=fail_after_two, checkpoint_seconds=1e9)
    assert (out / ".erf_state.npz").is_file()
    real = runner.write_run_dir

    def broken_writer(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(runner, "write_run_dir", broken_writer)
    counted = []
    with pytest.raises(OSError, match="disk full"):
        run_erf(_spec(num_images=3), out=out, show_progress=False, resume=True,
                on_batch=lambda a: counted.append(len(a.processed)))
    assert counted == [3] and (out / ".erf_state.npz").is_file() and not (out / "run.json").exists()
    monkeypatch.setattr(runner, "write_run_dir", real)
    counted.clear()
    res = run_erf(_spec(num_images=3), out=out, show_progress=False, resume=True,
                  on_batch=lambda a: counted.append(len(a.processed)))
    assert counted == [] and res["run_info"]["num_used"] == 3 and not (out / ".erf_state.npz").exists()
    np.testing.assert_array_equal(np.load(out / "erf.npy"), np.load(tmp_path / "full" / "erf.npy"))


def test_a_finished_run_is_reused_whatever_the_number_of_processes(tmp_path):
    """The ERF does not depend on how many torchrun ranks measured it: a sweep member (reuse) or --resume finds
    a run measured by 2 ranks complete in a 1-process call (only an interrupted run's state files are per rank)."""
    out = tmp_path / "run"
    run_erf(_spec(), out=out, show_progress=False)
    info = json.loads((out / "run.json").read_text())
    info["config"]["world_size"] = 2
    (out / "run.json").write_text(json.dumps(info))
    stamp = (out / "erf.npy").stat().st_mtime_ns
    assert run_erf(_spec(), out=out, show_progress=False, reuse=True)["already_complete"]
    assert run_erf(_spec(), out=out, show_progress=False, resume=True)["already_complete"]
    assert (out / "erf.npy").stat().st_mtime_ns == stamp


def _user_model(tmp_path, monkeypatch, name, body):
    """A ``name:net`` model of one's own (``--model package.module:factory``) written into ``tmp_path``."""
    import sys

    (tmp_path / f"{name}.py").write_text("import torch\nimport torch.nn as nn\n\n\n" + body)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    return f"{name}:net"


def test_run_json_records_the_precision_of_the_gradients(tmp_path, monkeypatch):
    """run.json's ``dtype``: float32 for a built-in model, bfloat16 for a model of one's own built in bfloat16
    (measured in its precision, with a warning; run.json said nothing of it before)."""
    res = run_erf(_spec(num_images=1), out=tmp_path / "f32", show_progress=False)
    assert res["run_info"]["dtype"] == "float32"
    model = _user_model(tmp_path, monkeypatch, "erf_bf16_net", (
        "def net():\n    torch.manual_seed(0)\n    return nn.Conv2d(3, 2, 3, padding=1).to(torch.bfloat16)\n"))
    with pytest.warns(UserWarning, match="measured in bfloat16"):
        run_erf(ErfSpec(model, num_images=1, input_size=32, batch_size=1), out=tmp_path / "bf16", show_progress=False)
    info = json.loads((tmp_path / "bf16" / "run.json").read_text())
    assert info["dtype"] == "bfloat16"
    validate_run_info(info)


def test_the_centre_of_a_layer_with_another_stride_per_axis(tmp_path, monkeypatch):
    """A 3x3 "valid" conv of stride (2, 1) on 32 px: a 15 x 30 map whose unit (7, 15) is centred at input pixel
    (1 + 2 * 7, 1 + 1 * 15) = (15, 16). The x axis took the larger stride (1 + 2 * 15 = 31) before."""
    model = _user_model(tmp_path, monkeypatch, "erf_aniso_net", (
        "def net():\n    c = nn.Conv2d(3, 2, 3, stride=(2, 1))\n    nn.init.ones_(c.weight)\n"
        "    nn.init.constant_(c.bias, 100.0)\n    return c\n"))
    res = run_erf(ErfSpec(model, num_images=1, input_size=32, batch_size=1), out=tmp_path / "run",
                  show_progress=False)
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    erf = np.load(tmp_path / "run" / "erf.npy")
    rows, cols = np.nonzero(erf)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (14, 16, 15, 17)
    assert info["erf_centre"] == [15, 16] and res["metrics"]["center"] == [15, 16]


def test_run_json_feature_shape_is_the_measured_maps(tmp_path, monkeypatch):
    """A 5x5 "valid" conv on 32 px makes a 28 x 28 map; run.json said [2, 32, 32] (the side of a "same"-padded
    map, ceil(S / stride))."""
    model = _user_model(tmp_path, monkeypatch, "erf_valid_net", (
        "def net():\n    c = nn.Conv2d(3, 2, 5)\n    nn.init.constant_(c.bias, 100.0)\n    return c\n"))
    run_erf(ErfSpec(model, num_images=1, input_size=32, batch_size=1), out=tmp_path / "run", show_progress=False)
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["feature_shape"] == [2, 28, 28] and info["erf_centre"] == [16, 16]


def _stopped_by_sigterm(part, prelude: str = "") -> None:
    """A tiny 6-image run in a subprocess that sends itself SIGTERM after 2 images (``prelude``: Python run first);
    it must end as an interrupted run (exit 130)."""
    script = (
        "import os, signal, sys, time\n"
        "from erf_lab.erf.runner import ErfSpec, run_erf\n" + prelude +
        f"spec = ErfSpec('replknet_31b', overrides={TINY_KW!r}, num_images=6, input_size=32, batch_size=1)\n"
        "def stop(a):\n"
        "    if len(a.processed) == 2:\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "try:\n"
        "    run_erf(spec, out=sys.argv[1], show_progress=False, on_batch=stop, checkpoint_seconds=1e9)\n"
        "except KeyboardInterrupt:\n"
        "    sys.exit(130)\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script, str(part)], env=env, capture_output=True, timeout=240)
    assert proc.returncode == 130, proc.stderr.decode()[-2000:]


def test_sigterm_mid_run_saves_progress_like_ctrl_c(tmp_path):
    """kill / timeout / a scheduler's SIGTERM saves the images measured so far, as Ctrl-C does (before: the process
    died at once and every image since the last periodic save, up to 30 s of work, was measured again)."""
    part = tmp_path / "part"
    _stopped_by_sigterm(part)
    assert not (part / "run.json").exists()
    with np.load(part / ".erf_state.npz", allow_pickle=False) as z:
        saved = len(json.loads(str(z["processed"])))
    assert 2 <= saved < 6
    res = run_erf(_spec(num_images=6), out=part, resume=True, show_progress=False)
    full = run_erf(_spec(num_images=6), out=tmp_path / "full", show_progress=False)
    assert res["run_info"]["resumed_after_images"] == saved
    np.testing.assert_array_equal(np.load(part / "erf.npy"), np.load(tmp_path / "full" / "erf.npy"))
    assert full["run_info"]["num_used"] == res["run_info"]["num_used"] == 6


def test_a_second_sigterm_does_not_cut_the_saving_short(tmp_path):
    """Under torchrun a worker may get SIGTERM twice (the scheduler's, and the agent forwarding it): the second one
    came while the first one's progress was being saved, raised KeyboardInterrupt out of the save, and every image
    was lost (the folder removed). Later SIGTERMs are ignored now while the run stops."""
    part = tmp_path / "part"
    _stopped_by_sigterm(part, prelude=(
        "from erf_lab.erf import compute\n"
        "real = compute.Accumulator.save\n"
        "def save(self, path, extra=None):\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(0.05)\n"
        "    return real(self, path, extra)\n"
        "compute.Accumulator.save = save\n"))
    with np.load(part / ".erf_state.npz", allow_pickle=False) as z:
        assert len(json.loads(str(z["processed"]))) >= 2

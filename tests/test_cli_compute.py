"""``erf-lab compute`` / ``erf-lab layers`` and the resumable run (tiny RepLKNet, small inputs, built-in images)."""
import contextlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from erf_lab.cli.options import parse_overrides
from erf_lab.cli.main import main
from erf_lab.errors import ErfLabError
from erf_lab.erf.runner import ErfSpec, run_erf

TINY = ["--model", "replknet_31b", "--override", "channels=(8,8,8,8)", "--override", "layers=(1,1,1,1)"]
TINY_KW = {"channels": (8, 8, 8, 8), "layers": (1, 1, 1, 1)}


def run_compute(model, *, out, overrides=None, show_progress=False, on_batch=None, resume=False, force=False,
                checkpoint_seconds=0.0, **spec):
    """One tiny ERF run through the runner (what ``erf-lab compute`` calls)."""
    return run_erf(ErfSpec(model=model, overrides=overrides or {}, **spec), out=out, resume=resume, force=force,
                   show_progress=show_progress, on_batch=on_batch, checkpoint_seconds=checkpoint_seconds)


def _cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_parse_overrides_literals_and_strings():
    assert parse_overrides(["channels=(8, 8)", "small_kernel=None", "name=abc", "r=0.5"]) == \
        {"channels": (8, 8), "small_kernel": None, "name": "abc", "r": 0.5}
    with pytest.raises(ErfLabError, match="key=value"):
        parse_overrides(["channels"])


def test_compute_writes_complete_run_dir(tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, err = _cli(capsys, "compute", *TINY, "--num-images", "2", "--input-size", "32",
                             "--batch-size", "2", "--out", str(out), "--quiet")
    assert code == 0, err
    assert str(out) in stdout
    for f in ("erf.npy", "metrics.json", "erf.png", "erf.pdf", "run.json"):
        assert (out / f).is_file(), f
    assert not list(out.glob(".erf_state*"))
    erf = np.load(out / "erf.npy")
    assert erf.shape == (32, 32) and np.isfinite(erf).all() and erf.sum() > 0
    info = json.loads((out / "run.json").read_text())
    assert info["model"] == "replknet_31b" and info["overrides"]["channels"] == [8, 8, 8, 8]
    assert info["layer"] == "forward_features" and info["aggregate"] == "relu" and info["input_size"] == 32
    assert info["image_list"] == ["astronaut.jpg", "brick.jpg"] and info["num_used"] == 2
    assert info["num_skipped"] == 0 and info["skipped"] == []
    assert info["reparameterized"] is True and info["batch_size"] == 2 and info["world_size"] == 1
    assert info["theoretical_rf"] == 1211 and info["seed"] == 0 and info["device"] == "cpu"
    assert info["weights"] is None and info["weights_sha256"] is None and info["random_init"] is True
    assert info["schema_version"] == 1 and info["kind"] == "erf" and info["config"]["input_size"] == 32
    for k in ("erf_lab", "torch", "captum", "numpy"):
        assert k in info["provenance"]["versions"]
    assert info["start_time"] <= info["end_time"] and info["provenance"]["argv"][0] == "erf-lab"
    # a complete run is never overwritten without --force
    code, _, err = _cli(capsys, "compute", *TINY, "--num-images", "2", "--input-size", "32", "--out", str(out))
    assert code == 2 and "already holds a complete run" in err and err.count("\n") == 1


def test_compute_shows_a_degenerate_gaussian_fit_as_not_meaningful(tmp_path, capsys):
    """User test: the tiny random-init net at 64 px gave sigma 94 / 140 px on a 64 px map, offset -1 (its bound) and
    R^2 0.07, shown as a valid fit; now metrics.json flags it (numbers kept) and the table shows n/m. Its erf/trf
    (theoretical RF 9011 px on a 64 px image) was tabled without a word on the image bounding it; a note says so."""
    out = tmp_path / "run"
    code, stdout, err = _cli(capsys, "compute", *TINY, "--num-images", "2", "--input-size", "64", "--out", str(out),
                             "--quiet")
    assert code == 0, err
    m = json.loads((out / "metrics.json").read_text())
    g = m["gaussian_fit"]
    assert g["meaningful"] is False and "gaussian_fit_not_meaningful" in m["flags"]
    assert g["offset"] == pytest.approx(-1.0) and "offset at its lower bound -1" in g["reason"]
    assert g["sigma_x"] > 64 and g["r2"] < 0.5
    assert f"| n/m ({g['sigma_y']:.4g}) | n/m ({g['sigma_x']:.4g}) |" in stdout
    assert "note: n/m = Gaussian fit not meaningful" in stdout and g["reason"] in stdout
    assert "note: erf/trf: the theoretical RF exceeds the image for replknet_31b; there the ERF is cut" in stdout
    assert json.loads((out / "run.json").read_text())["metrics_summary"]["gauss_fit"] == "n/m"


def test_weights_file_is_loaded_and_hashed(tmp_path, capsys):
    from erf_lab.io import sha256_file
    from erf_lab.models import create_model

    torch.manual_seed(5)
    w = tmp_path / "w.pth"
    torch.save(create_model("replknet_31b", **TINY_KW).state_dict(), w)
    res = run_compute("replknet_31b", weights=str(w), overrides=TINY_KW, num_images=1, input_size=32,
                      out=tmp_path / "a", show_progress=False, seed=1)
    run_compute("replknet_31b", weights=str(w), overrides=TINY_KW, num_images=1, input_size=32,
                out=tmp_path / "b", show_progress=False, seed=2)  # same weights, other seed: same ERF
    assert res["run_info"]["weights_sha256"] == sha256_file(w)
    np.testing.assert_array_equal(np.load(tmp_path / "a" / "erf.npy"), np.load(tmp_path / "b" / "erf.npy"))


class _Interrupt(Exception):
    pass


def test_interrupt_and_resume_equals_uninterrupted(tmp_path):
    kw = dict(overrides=TINY_KW, num_images=4, input_size=32, batch_size=1)  # per-image progress
    full = run_compute("replknet_31b", out=tmp_path / "full", **kw)
    seen = []

    def stop_after_two(acc):
        seen.append(len(acc.processed))
        if len(acc.processed) == 2:
            raise _Interrupt

    part = tmp_path / "part"
    with pytest.raises(_Interrupt):
        run_compute("replknet_31b", out=part, on_batch=stop_after_two, **kw)
    assert (part / ".erf_state.npz").is_file() and not (part / "run.json").exists()
    assert not (part / "erf.npy").exists()  # a partial run never looks complete
    with pytest.raises(ErfLabError, match="interrupted run"):
        run_compute("replknet_31b", out=part, **kw)
    with pytest.raises(ErfLabError, match="settings differ"):
        run_compute("replknet_31b", out=part, resume=True, **{**kw, "aggregate": "abs"})
    counted = []
    res = run_compute("replknet_31b", out=part, resume=True, on_batch=lambda a: counted.append(len(a.processed)), **kw)
    assert counted == [3, 4]  # the two saved images are not processed again
    assert res["run_info"]["resumed"] is True and res["run_info"]["resumed_after_images"] == 2
    assert res["result"].num_used == 4 and sorted(res["result"].processed) == sorted(set(res["result"].processed))
    np.testing.assert_array_equal(np.load(part / "erf.npy"), np.load(tmp_path / "full" / "erf.npy"))
    assert not (part / ".erf_state.npz").exists()
    assert full["run_info"]["image_list"] == res["run_info"]["image_list"]
    # run.json names each process that measured part of the run (before: only the last one's argv and versions)
    sessions = res["run_info"]["sessions"]
    assert [s["after_images"] for s in sessions] == [0, 2] and len(full["run_info"]["sessions"]) == 1
    assert all(s["device"] == "cpu" and s["versions"]["torch"] == torch.__version__ for s in sessions)
    assert sessions[0]["start_time"] <= sessions[1]["start_time"] <= sessions[1]["end_time"]
    assert "end_time" not in sessions[0]  # (a session stopped by Ctrl-C or a kill has no recorded end)
    assert json.loads((part / "run.json").read_text())["sessions"] == sessions


def test_cli_resume_on_complete_run_is_a_no_op(tmp_path, capsys):
    out = tmp_path / "r"
    assert _cli(capsys, "compute", *TINY, "--num-images", "1", "--input-size", "32", "--out", str(out), "--quiet")[0] == 0
    before = (out / "run.json").read_text()
    code, stdout, _ = _cli(capsys, "compute", *TINY, "--num-images", "1", "--input-size", "32", "--out", str(out),
                           "--resume", "--quiet")
    assert code == 0 and "nothing to resume" in stdout and (out / "run.json").read_text() == before
    # a complete run with other settings is no result of this command: refused, not reported as done
    code, _, err = _cli(capsys, "compute", *TINY, "--num-images", "1", "--input-size", "48", "--out", str(out),
                        "--resume", "--quiet")
    assert code == 2 and err.count("\n") == 1 and (out / "run.json").read_text() == before
    assert "already holds a complete run with other settings (input_size); use --force" in err
    code, stdout, err = _cli(capsys, "compute", *TINY, "--num-images", "1", "--input-size", "32", "--out", str(out),
                             "--force", "--quiet", "--aggregate", "abs")
    assert code == 0 and json.loads((out / "run.json").read_text())["aggregate"] == "abs"
    # its table shows the paper's rows, which are ReLU-aggregated: the output says they are not comparable
    assert ("note: The paper rows are ReLU-aggregated gradients at forward_features (the last stage's output); not "
            "comparable to them: replknet_31b (aggregate abs).") in stdout


def test_ctrl_c_says_where_the_progress_is_and_how_to_continue(tmp_path, capsys, monkeypatch):
    """User test: Ctrl-C in 'erf-lab compute' without --out said only 'interrupted'; the progress sat in a
    timestamped runs/ folder the user never saw, and the same command again started over in a new one. Now it
    names the folder, the images measured and the --resume --out that continues it."""
    from erf_lab.erf import runner

    real = runner.compute_erf

    def stopped_after_two(*a, on_batch, **kw):
        def batch(acc):
            on_batch(acc)
            if len(acc.processed) == 2:
                raise KeyboardInterrupt
        return real(*a, on_batch=batch, **kw)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(runner, "compute_erf", stopped_after_two)
    argv = ["compute", *TINY, "--num-images", "3", "--input-size", "32", "--batch-size", "1", "--quiet"]
    code, stdout, err = _cli(capsys, *argv)
    (folder,) = (tmp_path / "runs").iterdir()
    assert code == 130 and (folder / ".erf_state.npz").is_file() and not (folder / "run.json").exists()
    rel = Path("runs") / folder.name
    assert err.splitlines() == [f"stopped after 2 of 3 images: progress saved in {rel}; continue with the same "
                                f"command and --resume --out {rel}", "erf-lab compute: interrupted"]
    monkeypatch.setattr(runner, "compute_erf", real)
    code, stdout, err = _cli(capsys, *argv, "--resume", "--out", str(rel))
    assert code == 0, err
    info = json.loads((folder / "run.json").read_text())
    assert info["resumed_after_images"] == 2 and info["num_used"] == 3


def _expect_error(capsys, tmp_path, argv, pattern):
    out = tmp_path / "err_out"
    code, stdout, err = _cli(capsys, "compute", *argv, "--out", str(out), "--quiet")
    assert code == 2, (stdout, err)
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert pattern in err, err
    assert not (out / "run.json").exists() and not (out / "erf.npy").exists()


def test_bad_inputs_exit_2_with_one_line(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    bad_ckpt = tmp_path / "bad.pth"
    torch.save({"w": torch.zeros(64)}, bad_ckpt)
    bad_ckpt.write_bytes(bad_ckpt.read_bytes()[:300])  # truncated download
    base = [*TINY, "--num-images", "1", "--input-size", "64"]
    _expect_error(capsys, tmp_path, [*base, "--images", str(empty)], "no image files")
    _expect_error(capsys, tmp_path, [*base, "--images", str(tmp_path / "nope")], "image folder not found")
    _expect_error(capsys, tmp_path, [*base, "--layer", "stages.3.blockz"], "close names: stages.3.blocks")
    _expect_error(capsys, tmp_path, [*TINY, "--num-images", "1", "--input-size", "16"], "too small")
    _expect_error(capsys, tmp_path, ["--model", "replknet_31bb", "--num-images", "1"], "unknown model")
    _expect_error(capsys, tmp_path, [*base, "--weights", str(bad_ckpt)], "cannot read checkpoint")
    _expect_error(capsys, tmp_path, [*base, "--override", "channels=(8,8)"], "one kernel size")
    code, _, err = _cli(capsys, "compute", *base, "--resume")
    assert code == 2 and "--resume needs --out" in err


def test_named_layer_and_user_factory(tmp_path, capsys):
    code, _, err = _cli(capsys, "compute", "--model", "torch.nn:Identity", "--num-images", "1", "--input-size", "16",
                        "--out", str(tmp_path / "id"), "--quiet")
    assert code == 0, err  # identity: only the centre pixel contributes, 1 per channel where it is > 0 (ReLU)
    from erf_lab.erf.images import load_images

    src = load_images(None, num_images=1, input_size=16)
    positive = int((src.load(src.files[0])[:, 8, 8] > 0).sum())
    e = np.load(tmp_path / "id" / "erf.npy")
    assert e[8, 8] == positive and e.sum() == positive
    out = tmp_path / "layer"
    code, _, err = _cli(capsys, "compute", *TINY, "--num-images", "1", "--input-size", "32",
                        "--layer", "stages.1", "--out", str(out), "--quiet")
    assert code == 0, err
    info = json.loads((out / "run.json").read_text())
    assert info["layer"] == "stages.1" and info["theoretical_rf"] == 11 + 30 * 4 + 2 * 4 + 28 * 8


def test_layers_command_lists_names_shapes_and_rf(capsys):
    code, out, err = _cli(capsys, "layers", *TINY, "--input-size", "64")
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[0].split()[0] == "layer"
    last = lines[-1].split()
    assert last[0] == "forward_features" and last[1] == "8x2x2" and last[2] == "32" and last[3] == "1211"
    assert any(line.split()[0] == "stages.0.blocks.0.large_kernel" and line.split()[-1] == "131" for line in lines)
    code, _, err = _cli(capsys, "layers", "--model", "nope_model")
    assert code == 2 and "unknown model" in err


def test_layers_lists_the_form_compute_measures_and_compute_names_a_folded_layer(tmp_path, capsys):
    """``layers`` lists the deploy form (what ``compute`` measures); a train-time-only name gets a line naming the
    module it is folded into and --no-reparam, not an 'unknown layer' (the in-place re-parameterization of the CLI
    path had removed it before the check)."""
    folded = "stages.0.blocks.0.large_kernel.small_conv"
    code, out, err = _cli(capsys, "layers", *TINY, "--input-size", "64", "--filter", "stages.0.blocks.0.large")
    assert code == 0, err
    assert [line.split()[0] for line in out.splitlines()[1:]] == [
        "stages.0.blocks.0.large_kernel.lkb_reparam", "stages.0.blocks.0.large_kernel"]
    code, out, err = _cli(capsys, "layers", *TINY, "--input-size", "64", "--no-reparam", "--filter", folded)
    assert code == 0, err
    assert [line.split()[:4] for line in out.splitlines()[1:]] == [[folded + ".conv", "8x16x16", "4", "27"],
                                                                   [folded, "8x16x16", "4", "27"]]
    out_dir = tmp_path / "run"
    code, _, err = _cli(capsys, "compute", *TINY, "--num-images", "1", "--input-size", "32", "--layer", folded,
                        "--out", str(out_dir), "--quiet")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert (f"layer '{folded}' exists only in the train-time form" in err
            and "folded into 'stages.0.blocks.0.large_kernel'" in err and "--no-reparam" in err)
    assert not out_dir.exists() or not any(out_dir.iterdir())
    code, _, err = _cli(capsys, "compute", *TINY, "--num-images", "1", "--input-size", "32", "--layer", folded,
                        "--no-reparam", "--out", str(out_dir), "--quiet")
    assert code == 0, err
    assert json.loads((out_dir / "run.json").read_text())["theoretical_rf"] == 27
    # the name is checked before the folder is touched: --force keeps the finished run on a bad --layer
    code, _, err = _cli(capsys, "compute", *TINY, "--num-images", "1", "--input-size", "32", "--layer", folded,
                        "--force", "--out", str(out_dir), "--quiet")
    assert code == 2 and "exists only in the train-time form" in err
    assert json.loads((out_dir / "run.json").read_text())["layer"] == folded
    # a deploy-only name that 'layers' lists is measured
    deploy_only = "stages.0.blocks.0.large_kernel.lkb_reparam"
    code, _, err = _cli(capsys, "compute", *TINY, "--num-images", "1", "--input-size", "32", "--layer", deploy_only,
                        "--out", str(tmp_path / "deploy"), "--quiet")
    assert code == 0, err
    info = json.loads((tmp_path / "deploy" / "run.json").read_text())
    assert info["layer"] == deploy_only and info["theoretical_rf"] == 131


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_reparam_of_random_init_stays_random_through_compute_and_compare(tmp_path, capsys, suffix):
    from safetensors import safe_open

    ckpt = tmp_path / f"deploy{suffix}"
    code, stdout, err = _cli(capsys, "reparam", *TINY, "--check-size", "32", "--out", str(ckpt))
    assert code == 0, err
    assert "(random init, seed 0; the output is marked as untrained)" in stdout
    sidecar = json.loads((tmp_path / f"deploy{suffix}.run.json").read_text())
    assert sidecar["random_init"] is True and sidecar["init_seed"] == 0
    if suffix == ".safetensors":
        with safe_open(str(ckpt), framework="pt") as f:
            assert f.metadata() == {"erf_lab_random_init": "true", "erf_lab_init_seed": "0"}
    run = tmp_path / "run"
    code, stdout, err = _cli(capsys, "compute", *TINY, "--weights", str(ckpt), "--num-images", "1",
                             "--input-size", "32", "--out", str(run), "--quiet")
    assert code == 0, err
    assert f"(random initialization: {ckpt} holds untrained weights" in stdout
    info = json.loads((run / "run.json").read_text())
    assert info["random_init"] is True and info["init_seed"] == 0 and info["weights"] == str(ckpt.resolve())
    assert info["train_size"] is None
    # only the weights file copied elsewhere (the common case): still random weights (before: a .pth lost its mark
    # with its .run.json and was measured as if trained)
    (tmp_path / "elsewhere").mkdir()
    alone = shutil.copy(ckpt, tmp_path / "elsewhere" / ckpt.name)
    code, stdout, err = _cli(capsys, "compute", *TINY, "--weights", str(alone), "--num-images", "1",
                             "--input-size", "32", "--out", str(tmp_path / "run_alone"), "--quiet")
    assert code == 0, err
    assert f"(random initialization: {alone} holds untrained weights" in stdout
    info = json.loads((tmp_path / "run_alone" / "run.json").read_text())
    assert info["random_init"] is True and info["init_seed"] == 0
    code, stdout, err = _cli(capsys, "compare", str(run), "--labels", "mine", "--out", str(tmp_path / "cmp"),
                             "--formats", "png")
    assert code == 0, err
    assert "| mine (random init) | measured |" in (tmp_path / "cmp" / "compare.md").read_text()
    assert "\nmine (random init),measured," in (tmp_path / "cmp" / "compare.csv").read_text()
    rows = json.loads((tmp_path / "cmp" / "compare.json").read_text())["rows"]
    assert rows[0]["random_init"] is True and rows[0]["label"] == "mine (random init)"
    assert "random_init" not in rows[1] and rows[1]["source"] == "paper"


def test_trained_checkpoint_is_not_random_init(tmp_path):
    from erf_lab.checkpoint import random_init_record
    from erf_lab.models import create_model

    path = tmp_path / "trained.pth"
    torch.save(create_model("replknet_31b", **TINY_KW).state_dict(), path)
    assert random_init_record(path) is None
    (tmp_path / "trained.pth.run.json").write_text('{"random_init": false}')
    assert random_init_record(path) is None


def test_a_stale_sidecar_does_not_mark_other_weights_random(tmp_path, capsys):
    """reparam's sidecar speaks for the file it was written with: trained weights saved over it later are not
    random init."""
    from erf_lab.checkpoint import random_init_record
    from erf_lab.models import create_model

    ckpt = tmp_path / "deploy.pth"
    code, _, err = _cli(capsys, "reparam", *TINY, "--check-size", "32", "--out", str(ckpt))
    assert code == 0, err
    assert random_init_record(ckpt) == {"seed": 0}
    torch.manual_seed(1)
    torch.save(create_model("replknet_31b", deploy=True, **TINY_KW).state_dict(), ckpt)  # other weights, same name
    assert random_init_record(ckpt) is None


_TRY_LOCK = ("import fcntl, os, sys\nfd = os.open(sys.argv[1], os.O_RDONLY)\ntry:\n    fcntl.flock(fd, fcntl.LOCK_EX | "
             "fcntl.LOCK_NB)\nexcept OSError:\n    sys.exit(3)\n")


def test_a_run_folder_another_process_writes_into_is_refused(tmp_path, capsys):
    """Two erf-lab processes never write one ERF run folder at once (a --resume or --force typed in a second shell
    while the run goes): the run holds its folder (a new one from its making) while it measures; another gets one
    line, exit 2, and deletes or writes nothing there, --force included."""
    import subprocess
    import sys

    pytest.importorskip("fcntl")
    out = tmp_path / "run"
    tries = []
    run_compute("replknet_31b", out=out, overrides=TINY_KW, input_size=32, num_images=2, batch_size=1,
                on_batch=lambda a: tries.append(subprocess.run([sys.executable, "-c", _TRY_LOCK, str(out)]).returncode))
    assert tries and set(tries) == {3}  # held while it measured
    before = sorted((p.name, p.stat().st_mtime_ns) for p in out.iterdir())
    holder = subprocess.Popen([sys.executable, "-c", _TRY_LOCK + "print('held', flush=True)\nsys.stdin.read()\n",
                               str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        code, _, err = _cli(capsys, "compute", *TINY, "--num-images", "2", "--input-size", "32", "--batch-size", "1",
                            "--out", str(out), "--force", "--quiet")
        assert code == 2 and err.count("error:") == 1 and f"--out {out} is in use" in err, err
        assert sorted((p.name, p.stat().st_mtime_ns) for p in out.iterdir()) == before
    finally:
        holder.communicate("")
    code, _, err = _cli(capsys, "compute", *TINY, "--num-images", "2", "--input-size", "32", "--batch-size", "1",
                        "--out", str(out), "--force", "--quiet")
    assert code == 0, err


def test_a_run_folder_another_thread_writes_into_waits(tmp_path, monkeypatch):
    """Two threads of one process (two sessions of the app measuring the same map) never write one ERF run folder
    at once: the lock is the process's, so the second thread waits until the first lets the folder go, then reuses
    its complete run (before: it passed as 're-entrant' and measured into the folder beside the first)."""
    import threading
    import time

    import erf_lab.io as io

    pytest.importorskip("fcntl")
    waiting = threading.Event()

    class Signalling(threading.Condition):
        def wait(self, timeout=None):
            waiting.set()
            return super().wait(timeout)

    monkeypatch.setattr(io, "_HELD_CHANGED", Signalling(), raising=False)
    out, inside, release, results = tmp_path / "run", threading.Event(), threading.Event(), {}

    def first_batch(_):
        inside.set()
        release.wait(60)


    first = threading.Thread(target=lambda: results.setdefault("first", run_compute(
        "replknet_31b", out=out, overrides=TINY_KW, input_size=32, num_images=2, batch_size=1, on_batch=first_batch)))
    first.start()
    assert inside.wait(60)
    other = threading.Thread(target=lambda: results.setdefault("second", run_erf(
        ErfSpec(model="replknet_31b", overrides=TINY_KW, input_size=32, num_images=2, batch_size=1), out=out,
        reuse=True, show_progress=False)))
    other.start()
    deadline = time.monotonic() + 60
    while not waiting.is_set() and other.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    release.set()
    first.join(60)
    other.join(60)
    assert waiting.is_set()  # the second thread waited for the first
    assert results["first"]["already_complete"] is False and results["second"]["already_complete"] is True
    assert not io._HELD


def test_a_model_that_returns_logits_only_needs_a_layer(tmp_path, capsys, monkeypatch):
    """A classifier without ``forward_features`` whose forward returns (N, classes) logits: the default layer is no
    feature map, which was an IndexError traceback in ``compute``; ``layers`` listed it as a 5-wide "layer" with a
    3 px theoretical RF (the logits see the whole image through the mean). Now one line naming ``--layer``."""
    import sys

    (tmp_path / "erf_logits_net.py").write_text(
        "import torch.nn as nn\n\n\nclass Net(nn.Module):\n    def __init__(self):\n        super().__init__()\n"
        "        self.conv = nn.Conv2d(3, 4, 3, padding=1)\n        self.fc = nn.Linear(4, 5)\n\n"
        "    def forward(self, x):\n        return self.fc(self.conv(x).mean((2, 3)))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "erf_logits_net", raising=False)
    model = ["--model", "erf_logits_net:Net", "--num-images", "1", "--input-size", "16"]
    _expect_error(capsys, tmp_path, model, "--layer")
    code, out, err = _cli(capsys, "layers", "--model", "erf_logits_net:Net", "--input-size", "16")
    assert code == 0, err
    assert [line.split()[0] for line in out.strip().splitlines()[1:]] == ["conv"]
    code, _, err = _cli(capsys, "compute", *model, "--layer", "conv", "--out", str(tmp_path / "conv"), "--quiet")
    assert code == 0, err


class _Killed(BaseException):
    """What a SIGKILL does at that point: nothing after it runs, the temporary file of the write in progress stays."""


def _kill_while_writing(monkeypatch, name):
    """The next atomic write of a file called ``name`` dies before its rename, leaving its temporary file."""
    import erf_lab.io

    real_replace = erf_lab.io.os.replace

    def replace(src, dst):
        if Path(dst).name == name:
            monkeypatch.setattr(erf_lab.io.Path, "unlink", lambda self, missing_ok=False: None)  # no finally either
            raise _Killed()
        return real_replace(src, dst)

    monkeypatch.setattr(erf_lab.io.os, "replace", replace)


@pytest.mark.parametrize("name", [".erf_state.npz", "erf.pdf"])
def test_a_resume_removes_the_temporary_files_of_a_killed_write(tmp_path, monkeypatch, name):
    """A run killed while it wrote a file (its state at a checkpoint, a figure) leaves that write's temporary file
    (``.erf.pdf.<random>.tmp.pdf``: the final name never holds half a file). The resume, which holds the folder,
    removes it (it used to stay in the finished run folder for good, one more per kill); files of other names stay."""
    kw = dict(overrides=TINY_KW, num_images=3, input_size=32, batch_size=1)
    out = tmp_path / "run"
    full = run_compute("replknet_31b", out=tmp_path / "full", **kw)
    if name == "erf.pdf":  # killed while writing the figures: the measurement is in its state, saved after each image
        _kill_while_writing(monkeypatch, name)
        with pytest.raises(_Killed):
            run_compute("replknet_31b", out=out, **kw)
    else:  # killed while saving its progress after the second image
        def at_second(acc):
            if len(acc.processed) == 2:
                _kill_while_writing(monkeypatch, name)
        with pytest.raises(_Killed):
            run_compute("replknet_31b", out=out, on_batch=at_second, **kw)
    monkeypatch.undo()
    left = [p.name for p in out.iterdir() if ".tmp" in p.name]
    assert left and all(n.startswith(f".{name}.") for n in left) and not (out / "run.json").exists()
    (out / ".notes.tmp").write_text("not erf-lab's")
    res = run_compute("replknet_31b", out=out, resume=True, **kw)
    assert res["result"].num_used == 3
    np.testing.assert_array_equal(np.load(out / "erf.npy"), np.load(tmp_path / "full" / "erf.npy"))
    assert sorted(p.name for p in out.iterdir()) == sorted([".notes.tmp", *(p.name for p in full["out_dir"].iterdir())])


_HOLD_AND_FORK = """
import os, sys, time
from erf_lab.io import hold_folder
with hold_folder(sys.argv[1]):
    pid = os.fork()  # as a DataLoader or decode worker is started while the run holds its folder
    if pid == 0:
        time.sleep(120)
        os._exit(0)
    print(pid, flush=True)
    time.sleep(120)
"""


def test_a_worker_left_running_by_a_kill_does_not_hold_the_folder(tmp_path):
    """A run killed with SIGKILL while it had worker processes (a shape-bias run decoding, a training run's
    DataLoader) can leave them running, blocked on a pipe nobody reads. They inherited the descriptor that carries
    the folder's lock, and a flock lasts while any copy is open: every later run in the folder was refused as 'in
    use' until someone found and killed them. Forked children now drop their copies; the lock ends with the run."""
    import os
    import signal
    import subprocess
    import sys

    pytest.importorskip("fcntl")
    out = tmp_path / "run"
    out.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", _HOLD_AND_FORK, str(out)], stdout=subprocess.PIPE, text=True)
    child = None
    try:
        child = int(proc.stdout.readline())
        assert subprocess.run([sys.executable, "-c", _TRY_LOCK, str(out)]).returncode == 3  # held by the run
        proc.kill()
        proc.wait(timeout=30)
        assert os.path.exists(f"/proc/{child}") or sys.platform != "linux"  # the worker lives on
        assert subprocess.run([sys.executable, "-c", _TRY_LOCK, str(out)]).returncode == 0  # the folder is free
    finally:
        proc.kill()
        if child is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)


def test_records_name_the_source_commit(tmp_path):
    """Every record's versions said erf_lab 0.1.0, the same from commit to commit: no record said which code made
    a result. versions() now carries the git commit of the source (+dirty when tracked files differ from it)."""
    import subprocess

    from erf_lab.provenance import source_commit, versions

    repo = tmp_path / "src"
    repo.mkdir()
    assert source_commit(str(repo)) is None  # not a checkout (an installed package): no commit claimed
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run([*git, "init", "-q"], check=True)
    (repo / "a.py").write_text("x = 1\n")
    subprocess.run([*git, "add", "a.py"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "one"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    source_commit.cache_clear()  # (read once per process and folder)
    assert len(head) == 40 and source_commit(str(repo)) == head
    (repo / "a.py").write_text("x = 2\n")
    (repo / "b.py").write_text("")  # untracked files do not make it dirty
    source_commit.cache_clear()
    assert source_commit(str(repo)) == head + "+dirty"
    commit = versions()["erf_lab_commit"]  # this checkout's (None where the tests run from an installed copy)
    assert commit is None or len(commit.split("+")[0]) == 40


def test_run_json_records_the_options_a_builtin_model_was_built_with(tmp_path, capsys):
    """User test: 'compute --model replknet_31b --weights builtin:cue-world/K31-seed0' measured the shipped
    (16, 32, 64, 128)-channel, 10-class model, but run.json's "overrides" (README: "the network as built") was {},
    which reads as the 79.9M-parameter RepLKNet-31B. It now holds the options the network was built with; the
    config keeps those asked for."""
    from erf_lab.models import create_model
    from erf_lab.paths import data_dir

    out = tmp_path / "run"
    weights = "builtin:cue-world/K31-seed0"
    code, _, err = _cli(capsys, "compute", "--model", "replknet_31b", "--weights", weights, "--override",
                        "drop_path_rate=0.1", "--num-images", "1", "--input-size", "32", "--out", str(out), "--quiet")
    assert code == 0, err
    info = json.loads((out / "run.json").read_text())
    record = json.loads((data_dir() / "trained" / "cue-world" / "K31-seed0.json").read_text())
    assert record["overrides"] == {"channels": [16, 32, 64, 128], "layers": [1, 1, 1, 1]}
    assert info["overrides"] == {**record["overrides"], "num_classes": 10, "drop_path_rate": 0.1}
    assert info["config"]["overrides"] == {"drop_path_rate": 0.1}
    # the recorded options build the network that the file loads into, without the builtin: record
    net = create_model("replknet_31b", weights=info["weights"], **info["overrides"])
    assert sum(p.numel() for p in net.parameters()) < 2e6 and net.num_classes == 10


def test_reparam_records_how_its_file_was_made(tmp_path, capsys, monkeypatch):
    """User test: a deploy file's .run.json held the numbers of the merge only, no command line, erf-lab version
    or time (every other output carries them): it now carries the provenance record too."""
    out = tmp_path / "deploy.pth"
    argv = ["reparam", *TINY, "--out", str(out), "--check-size", "32"]
    monkeypatch.setattr("sys.argv", ["/somewhere/erf_lab/__main__.py", *argv])
    code, stdout, err = _cli(capsys, *argv)
    assert code == 0, err
    record = json.loads((tmp_path / "deploy.pth.run.json").read_text())
    prov = record["provenance"]
    assert prov["command"] == "reparam" and prov["argv"] == ["erf-lab", *argv]
    assert prov["parameters"]["model"] == "replknet_31b" and prov["parameters"]["check_size"] == 32
    assert prov["parameters"]["overrides"] == record["overrides"] == {"channels": [8, 8, 8, 8], "layers": [1, 1, 1, 1]}
    assert {"erf_lab", "erf_lab_commit", "torch"} <= set(prov["versions"]) and prov["time"]
    assert record["sha256"] and record["random_init"] is True  # the merge's numbers are kept as they were


def test_run_json_records_which_part_of_the_weights_file_was_measured(tmp_path, capsys):
    """User test: a timm file holds raw and EMA weights (``module.`` keys), an mmseg file a ``backbone.`` beside its
    decode head; the choice of what loaded was only a warning on the console, run.json gave the file's SHA-256
    alone. run.json (and reparam's .run.json) now record the entry, the sets passed over, the prefix stripped and
    the part loaded; a plain state dict records none."""
    from erf_lab.erf.rundir import load_run
    from erf_lab.models import create_model

    torch.manual_seed(3)
    raw, ema = (create_model("replknet_31b", **TINY_KW).state_dict() for _ in range(2))
    files = {"timm.pth": {"epoch": 9, "state_dict": {f"module.{k}": v for k, v in raw.items()},
                          "state_dict_ema": {f"module.{k}": v for k, v in ema.items()}},
             "mmseg.pth": {"meta": {"mmcv_version": "1.3.8"},
                           "state_dict": {**{f"backbone.{k}": v for k, v in raw.items()},
                                          "decode_head.conv_seg.weight": torch.randn(150, 8, 1, 1),
                                          "decode_head.conv_seg.bias": torch.randn(150)}},
             "plain.pth": raw}
    expected = {"timm.pth": {"entry": ["state_dict"], "passed_over": ["state_dict_ema"],
                             "prefix_stripped": ["module."], "part": None, "left_out": 0},
                "mmseg.pth": {"entry": ["state_dict"], "passed_over": [], "prefix_stripped": [],
                              "part": "backbone.", "left_out": 2},
                "plain.pth": None}
    for name, obj in files.items():
        torch.save(obj, tmp_path / name)
        out = tmp_path / name.replace(".pth", "")
        code, _, err = _cli(capsys, "compute", *TINY, "--weights", str(tmp_path / name), "--num-images", "1",
                            "--input-size", "32", "--out", str(out), "--quiet")
        assert code == 0, err
        info = json.loads((out / "run.json").read_text())
        assert info["weights_selection"] == expected[name], name
        assert load_run(out).run_info["weights_selection"] == expected[name], name
    code, _, err = _cli(capsys, "reparam", *TINY, "--weights", str(tmp_path / "timm.pth"),
                        "--out", str(tmp_path / "deploy.pth"), "--check-size", "32")
    assert code == 0, err
    record = json.loads((tmp_path / "deploy.pth.run.json").read_text())
    assert record["weights_selection"] == expected["timm.pth"]
    # erf-lab compare's table note says which part each run measured (it said nothing of it); a plain file: nothing
    code, _, err = _cli(capsys, "compare", *(str(tmp_path / n) for n in ("timm", "mmseg", "plain")),
                        "--labels", "timm", "mmseg", "plain", "--out", str(tmp_path / "cmp"))
    assert code == 0, err
    assert ("Weights loaded from the checkpoint files: timm: checkpoint['state_dict'] (passed over: 'state_dict_ema'), "
            "prefix module. stripped; mmseg: checkpoint['state_dict'], only the tensors under backbone. (2 other "
            "tensors left out).\n") in (tmp_path / "cmp" / "compare.md").read_text()
    # a run.json written before the field existed still reads
    info = json.loads((tmp_path / "plain" / "run.json").read_text())
    del info["weights_selection"]
    (tmp_path / "plain" / "run.json").write_text(json.dumps(info))
    assert "weights_selection" not in load_run(tmp_path / "plain").run_info

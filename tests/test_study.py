"""erf-lab study kernel-family at a toy size: plan, cached steps, tables, figure, and shipping for builtin:."""
import contextlib
import csv
import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import held_by_another_process
from erf_lab.models import create_model
from erf_lab.cli.main import main
from erf_lab.errors import ErfLabError
from erf_lab.shape_bias.analysis import at_chance
from erf_lab.train.timeline import redraw_timeline, timeline
from erf_lab.train.study import (StudySettings, markdown_table, plan, run_study, ship, table_notes,
                                 val_subset_correct)

TOY = StudySettings(channels=(8, 8, 16, 16), input_size=32, train_size=64, val_size=32, epochs=1, batch_size=32,
                    erf_input_size=48, erf_images=2, probe_size=16)


def test_plan_is_the_family_with_seeds_and_guidelines():
    names = [m.name for m in plan()]
    assert sorted(names) == sorted(["K3-seed0", "K7-seed0", "K13-seed0", "K31-seed0", "K3-seed1", "K31-seed1",
                                    "MNv2-k13-seed0", "MNv2-k13-noshortcut-seed0", "K31-noreparam-seed0"])
    by = {m.name: m for m in plan()}
    assert by["K31-seed0"].model == "replknet_31b" and by["K3-seed0"].model == "replknet_3"
    assert by["K31-noreparam-seed0"].overrides["small_kernel"] is None
    assert by["MNv2-k13-seed0"].sizes(StudySettings()) == (32, 64) and by["K7-seed0"].sizes(StudySettings()) == (64, 128)
    assert {m.seed for m in plan() if m.group == "family"} == {0, 1}
    assert [m.name for m in plan(guidelines=False)] == ["K3-seed0", "K7-seed0", "K13-seed0", "K31-seed0",
                                                        "K3-seed1", "K31-seed1"]


def test_toy_study_tables_cache_and_ship(tmp_path, monkeypatch, one_thread):
    import erf_lab.paths

    out = tmp_path / "study"
    res = run_study(out, TOY, kernels=(3, 31), seeds=(0,), guidelines=False)
    assert [r["name"] for r in res["rows"]] == ["K3-seed0", "K31-seed0"]
    rows = list(csv.DictReader((out / "family.csv").read_text().splitlines()))
    assert [r["kernel"] for r in rows] == ["3", "31"]
    for r, info in zip(rows, (json.loads((out / "runs" / n / "run.json").read_text()) for n in ("K3-seed0",
                                                                                                 "K31-seed0"))):
        assert float(r["val_acc"]) == pytest.approx(info["final"]["val_acc"])
    for r in rows:  # the labels agree with what was measured
        assert r["at_chance"] == str(at_chance(float(r["val_acc"]), 10, TOY.val_size))
        flags = json.loads((out / "erf-48px" / r["name"] / "metrics.json").read_text())["flags"]
        assert r["erf_empty"] == str("empty_map" in flags)
    md = (out / "results.md").read_text()
    assert ("†: val_acc at chance" in md) == any(r["at_chance"] == "True" for r in rows)
    assert "| K31-seed0 | 32 |" in md and (out / "family.png").is_file()
    stamp = (out / "runs" / "K3-seed0" / "model.safetensors").stat().st_mtime_ns
    run_study(out, TOY, kernels=(3, 31), seeds=(0,), guidelines=False)  # all cached: nothing retrained
    assert (out / "runs" / "K3-seed0" / "model.safetensors").stat().st_mtime_ns == stamp
    # other settings would reuse runs that do not match them (results.md would claim the new ones): refused
    with pytest.raises(ErfLabError, match=r"other settings \(1 differ, e.g. epochs: 1 there, 2 now\)"):
        run_study(out, dataclasses.replace(TOY, epochs=2), kernels=(3, 31), seeds=(0,), guidelines=False)
    assert (out / "runs" / "K3-seed0" / "model.safetensors").stat().st_mtime_ns == stamp
    assert json.loads((out / "study.json").read_text())["settings"]["epochs"] == 1

    dest = tmp_path / "data" / "trained" / "cue-world"
    stopped = out / "runs" / "K3-seed0" / "timeline"  # an erf-lab timeline interrupted after its first checkpoint
    stopped.mkdir()
    (stopped / "timeline.json").write_text(json.dumps({"complete": False, "run": str(stopped.parent), "rows": [
        {"epoch": 0}], "epochs": [0, 1]}))
    files = ship(out, dest, subset=20)
    assert {p.name for p in files} >= {"K3-seed0.safetensors", "K3-seed0.json", "K31-seed0.metrics.csv", "README.md",
                                       "family.png", "family.pdf"}  # the figure as PNG + PDF
    assert not (dest / "timeline").exists()  # not shipped as a finished timeline (it has no table or figure yet)
    # finished with --formats png (no PDF): shipped with the figure it has, and its strip's maps (strip.npz: the
    # checkpoints are not shipped), from which the shipped figure is drawn again as the timeline drew it
    shutil.rmtree(stopped)
    timeline(stopped.parent, num_images=2, probe_size=12, show_progress=False, formats=("png",), input_size=64)
    names = {p.relative_to(tmp_path / "png-only").as_posix() for p in ship(out, tmp_path / "png-only", subset=20)}
    assert {"timeline/K3-seed0/timeline.json", "timeline/K3-seed0/timeline.png", "timeline/K3-seed0/strip.npz"} <= names
    assert "timeline/K3-seed0/timeline.pdf" not in names
    shipped = tmp_path / "png-only" / "timeline" / "K3-seed0"
    (shipped / "timeline.png").unlink()
    assert redraw_timeline(shipped, formats=("png",)) == [shipped / "timeline.png"]
    drawn, redrawn = (np.asarray(Image.open(p).convert("L"), dtype=np.int16)
                      for p in (stopped / "timeline.png", shipped / "timeline.png"))
    assert drawn.shape == redrawn.shape and (np.abs(drawn - redrawn) > 64).mean() < 0.002
    rec = json.loads((dest / "K31-seed0.json").read_text())
    monkeypatch.setattr(erf_lab.paths, "data_dir", lambda: tmp_path / "data")
    net = create_model("replknet_31b", weights="builtin:cue-world/K31-seed0")
    with torch.no_grad():
        assert val_subset_correct(net, 20, 32, 10, 0) == rec["val_subset"]["correct"]
    assert rec["overrides"]["channels"] == [8, 8, 16, 16] and rec["input_size"] == 32


def test_tables_mark_empty_maps_and_models_at_chance():
    assert at_chance(0.10, 10, 500) and at_chance(0.14, 10, 500)  # chance + 3 SE = 0.1402
    assert not at_chance(0.141, 10, 500) and not at_chance(0.174, 10, 500)  # the shipped no-shortcut MNv2
    rows = [{"name": "a", "area@50%": None, "r_rms": None, "shape_bias": 0.5, "erf_empty": True, "at_chance": True},
            {"name": "b", "area@50%": 42.0, "r_rms": None, "shape_bias": 0.125, "erf_empty": False,
             "at_chance": False}]
    md = markdown_table(rows, ["name", "area@50%", "r_rms", "shape_bias"])
    assert "| a | empty | empty | 0.500 † |" in md and "| b | 42.00 | n/r | 0.125 |" in md
    notes = table_notes(rows)
    assert "empty: the ERF map is all zeros" in notes and "its shape bias means nothing" in notes
    assert table_notes(rows[1:]) == ""


def test_study_out_not_writable_is_one_line_before_any_work(tmp_path, monkeypatch, capsys):
    import errno
    import tempfile

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    rc = main(["study", "kernel-family", "--out", str(tmp_path / "s"), "--no-guidelines"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("error:") == 1 and "Traceback" not in err
    assert "--out" in err and "is not writable: Read-only file system" in err
    assert not list((tmp_path / "s").rglob("*"))


def test_a_studys_warnings_are_one_line_each(tmp_path, monkeypatch, capfd):
    """A warning of the study's training (a warm-up as long as the run, at --epochs 1) was Python's four lines (file,
    line number, category, source): one line ``erf-lab study: warning: ...`` as in train; with --jobs 2 too, where
    the models train in spawned processes (those still said Python's four lines)."""
    import warnings

    import erf_lab.train.study
    from erf_lab.train.study import in_processes

    def study(out, settings, **kw):
        warnings.warn("the warm-up spans the whole run")
        in_processes(warnings.warn, [("in a worker",)], kw["jobs"], lambda r: None, warnings_as=kw["warnings_as"])
        return {"rows": [], "out_dir": str(out)}

    monkeypatch.setattr(erf_lab.train.study, "run_study", study)
    assert main(["study", "kernel-family", "--out", str(tmp_path / "s"), "--epochs", "1", "--no-guidelines",
                 "--jobs", "2"]) == 0
    err = capfd.readouterr().err.splitlines()  # (a spawned worker may log other libraries' lines: streamlit's)
    assert [ln for ln in err if ln.startswith("erf-lab")] == [
        "erf-lab study: warning: the warm-up spans the whole run", "erf-lab study: warning: in a worker"], err
    assert not any("UserWarning" in ln or "warnings.warn" in ln for ln in err), err


def test_a_studys_warm_up_warning_names_what_the_study_sets(tmp_path, one_thread):
    """'study --epochs 1': the warning on a warm-up as long as the run named --warmup-epochs, which study does not
    have; it names the study's --epochs now (the warm-up of the shipped recipe, 1 epoch, is unchanged)."""
    from erf_lab.train.study import train_one

    m = plan(TOY, kernels=(3,), seeds=(0,), guidelines=False)[0]
    with pytest.warns(UserWarning) as said:
        train_one(m, TOY, tmp_path / "runs")
    assert [str(w.message) for w in said] == [
        "the warm-up (1 epoch) spans the whole run (2 steps): the learning rate only rises, to its peak at the last "
        "step, and the cosine never lowers it; the study's warm-up is fixed: run it with --epochs 2 or more"]
    info = json.loads((tmp_path / "runs" / m.name / "run.json").read_text())
    assert info["settings"]["recipe"]["warmup_epochs"] == 1.0 and StudySettings().recipe().warmup_epochs == 1.0


def test_results_written_when_a_guideline_model_finishes_first(tmp_path):
    """run_study(jobs > 1) writes the results as runs finish, in any order: a guideline model may be first."""
    from erf_lab.train.study import write_results

    row = {"name": "MNv2-k13-seed0", "group": "guideline", "model": "mobilenetv2_k13", "kernel": 13, "seed": 0,
           "train_px": 32, "params": 1000, "val_acc": 0.5, "area@20%": 1.0, "area@30%": 2.0, "area@50%": 3.0,
           "area@99%": 50.0, "r_rms": 3.0, "r50": 2.0, "shape_bias": 0.5, "shape_only_accuracy": 0.5,
           "texture_only_accuracy": 0.5, "img_per_s": 100.0, "erf_empty": False, "at_chance": False}
    write_results(tmp_path, [row], StudySettings())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["guidelines.csv", "results.md"]
    with open(tmp_path / "guidelines.csv", newline="") as f:
        assert [r["name"] for r in csv.DictReader(f)] == ["MNv2-k13-seed0"]
    assert "Incomplete" not in (tmp_path / "results.md").read_text()
    write_results(tmp_path, [row], StudySettings(), planned=6)  # what run_study writes after its first model
    assert (tmp_path / "results.md").read_text().splitlines()[2] == (
        "**Incomplete: 1 of 6 models measured** (the study stopped or is still running; run its command again to "
        "continue).")


def test_an_interrupted_study_model_says_to_run_the_study_again(tmp_path, monkeypatch, capsys, one_thread):
    """A study's training run stopped by Ctrl-C points to the study's own command (before: 'continue with
    --resume', an option 'erf-lab study' does not have)."""
    import erf_lab.train.loop as loop
    from erf_lab.train.study import train_one

    real = loop.train

    hints = {}

    def stopped_at_step_1(*args, **kwargs):
        def on_step(epoch, step):
            raise KeyboardInterrupt
        hints.update(diverge=kwargs["diverge_hint"])
        return real(*args, **{**kwargs, "on_step": on_step})

    monkeypatch.setattr(loop, "train", stopped_at_step_1)
    m = plan(TOY, kernels=(3,), seeds=(0,), guidelines=False)[0]
    with pytest.raises(KeyboardInterrupt):
        train_one(m, TOY, tmp_path / "runs")
    err = capsys.readouterr().err
    assert err.strip().endswith(f"state saved in {tmp_path / 'runs' / m.name}; run the same 'erf-lab study' command "
                                "again to continue the study"), err[-500:]
    # a diverged model: the study has no --lr / --force, and a re-run would resume the same diverging run
    assert hints["diverge"].startswith(f"the study's recipe does not train {m.name} at these settings; delete "
                                       f"{tmp_path / 'runs' / m.name} to try again")


def test_a_study_shows_a_progress_bar_of_its_models(tmp_path, monkeypatch, capsys):
    """The study (hours at its shipped size) shows a bar of the models done with an ETA; --quiet hides it (before:
    no bar at all, only a line per epoch)."""
    import erf_lab.train.study as study

    def job(m, settings, folder, threads):
        return {"name": m.name, "probe": {"shape_bias": 0.5}, "erf": {}}

    monkeypatch.setattr(study, "_job", job)
    monkeypatch.setattr(study, "write_results", lambda *a, **k: None)
    monkeypatch.setattr(study, "_row", lambda m, r: {"name": m.name})
    run_study(tmp_path / "s", TOY, kernels=(3, 31), seeds=(0,), guidelines=False)
    err = capsys.readouterr().err
    assert "study: 100%" in err and "2/2" in err and "model" in err, err
    run_study(tmp_path / "s", TOY, kernels=(3, 31), seeds=(0,), guidelines=False, show_progress=False)
    assert "study:" not in capsys.readouterr().err


def test_a_continued_study_counts_its_trained_models_from_the_start(tmp_path, monkeypatch, capsys):
    """A study run again after an interruption: the models trained before come back in seconds; they start the bar
    (1/2) instead of being steps of it, which made the ETA of the hours left a few seconds (0/2, then 1/2 at once)."""
    import json

    import erf_lab.train.study as study

    def job(m, settings, folder, threads):
        return {"name": m.name, "probe": {"shape_bias": 0.5}, "erf": {}}

    monkeypatch.setattr(study, "_job", job)
    monkeypatch.setattr(study, "write_results", lambda *a, **k: None)
    monkeypatch.setattr(study, "_row", lambda m, r: {"name": m.name})
    first = study.plan(TOY, kernels=(3, 31), seeds=(0,), guidelines=False)[0]
    (tmp_path / "s" / "runs" / first.name).mkdir(parents=True)
    (tmp_path / "s" / "runs" / first.name / "run.json").write_text(json.dumps({"final": {"val_acc": 0.5}}))
    run_study(tmp_path / "s", TOY, kernels=(3, 31), seeds=(0,), guidelines=False)
    shown = [line for line in capsys.readouterr().err.replace("\r", "\n").splitlines() if line.startswith("study:")]
    assert shown and "1/2" in shown[0] and "2/2" in shown[-1], shown
    assert not any("0/2" in line for line in shown), shown


def test_a_finished_model_of_other_settings_is_not_reused(tmp_path, one_thread, capsys):
    """A finished training run in runs/<name> was reused whatever it was trained with: with study.json damaged (or
    removed), a study of --epochs 2 reported the 1-epoch runs as its own. Now the run's settings must match, and a
    damaged study.json is one error line."""
    from erf_lab.train.study import train_one

    m = plan(TOY, kernels=(3,), seeds=(0,), guidelines=False)[0]
    first = train_one(m, TOY, tmp_path / "runs")
    assert train_one(m, TOY, tmp_path / "runs")["end_time"] == first["end_time"]  # kept, not trained again
    with pytest.raises(ErfLabError, match="holds a training run of other settings .*epochs: 1 there, 2 now"):
        train_one(m, dataclasses.replace(TOY, epochs=2), tmp_path / "runs")
    for damaged in ('{"settings": ', '[1, 2]', 'null'):  # not JSON, or JSON that is no record (was overwritten)
        (tmp_path / "study.json").write_text(damaged)
        with pytest.raises(ErfLabError, match="study.json is damaged"):
            run_study(tmp_path, TOY, kernels=(3,), seeds=(0,), guidelines=False)
        assert (tmp_path / "study.json").read_text() == damaged


def test_study_json_records_how_the_study_was_made(tmp_path, one_thread):
    """study.json held the settings and argv only: not the package versions, working folder or time that
    sweep.json, compare.json and timeline.json record; then not the OS, CPU, threads, end or duration."""
    run_study(tmp_path / "s", TOY, kernels=(3,), seeds=(0,), guidelines=False)
    rec = json.loads((tmp_path / "s" / "study.json").read_text())
    assert rec["settings"]["epochs"] == 1 and isinstance(rec["command"], list)
    assert rec["versions"]["erf_lab"] and rec["cwd"] and rec["time"]
    assert rec["versions"]["platform"] and rec["host"]["cpu_model"] and rec["host"]["threads"] >= 1
    assert rec["time"] <= rec["end_time"] and rec["wall_seconds"] > 0


def test_a_stop_cancels_the_models_not_yet_started(tmp_path):
    """Ctrl-C during 'study --jobs N' (here: in the study's own process, at the first finished call) stops after
    the calls under way; before, leaving the process pool ran every queued call (every remaining model) first."""
    import subprocess

    from erf_lab.train.study import in_processes

    calls = [(["sh", "-c", f"sleep 0.4; touch {tmp_path / str(i)}"],) for i in range(10)]
    finished = []

    def done(result):
        finished.append(result)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        in_processes(subprocess.call, calls, 2, done)
    assert finished == [0]
    assert 1 <= len(list(tmp_path.iterdir())) <= 2  # the calls under way (2 processes), not all 10
    ran = []
    in_processes(subprocess.call, calls[:3], 2, ran.append)  # and without a stop, every call
    assert ran == [0, 0, 0]


def test_a_study_process_that_dies_is_one_line_naming_its_model():
    """A worker killed mid-model (the OOM killer, kill -9) is one ErfLabError naming the model (before: a
    BrokenProcessPool traceback)."""
    import os

    from erf_lab.train.study import in_processes

    with pytest.raises(ErfLabError, match=r"^the process running K31-seed0 ended abruptly \(killed, or out of memory"):
        in_processes(os._exit, [(3,)], 1, lambda r: None, labels=["K31-seed0"])


def test_kill_of_a_study_with_jobs_stops_its_workers_too(tmp_path):
    """SIGTERM to 'study --jobs N' (kill PID) reaches the workers (a training run stops there after a step, its
    state saved) and the study ends as on Ctrl-C. Before, the study's process died at once (exit -15) and its
    workers ran on as orphans (here: 60 s of sleep each)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    script = ("import sys, time\nfrom erf_lab.train.study import in_processes\ntry:\n"
              "    in_processes(time.sleep, [(60,), (60,)], 2, print)\nexcept KeyboardInterrupt:\n"
              "    print('stopped', flush=True)\n    sys.exit(130)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    time.sleep(4)  # the two workers have started their calls
    workers = [int(p) for p in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                              text=True).stdout.split()]
    proc.send_signal(signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=30)
    finally:
        proc.kill()
        for pid in workers:  # orphans of the old behaviour: not left behind by the test
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
    assert proc.returncode == 130 and out.strip() == "stopped", (proc.returncode, out)


def test_ship_into_the_study_folder_itself_is_one_line_before_any_work(tmp_path, capsys):
    """--ship = --out (./s and s/ too): one line before anything is trained (before: the study ran, copied its models
    in beside its runs, then failed with a SameFileError traceback copying results.md onto itself)."""
    for ship_to in (str(tmp_path / "s"), str(tmp_path / "s") + "/", str(tmp_path / "s" / ".")):
        rc = main(["study", "kernel-family", "--out", str(tmp_path / "s"), "--no-guidelines", "--ship", ship_to,
                   "--epochs", "1", "--train-size", "64", "--channels", "8,8,8,8", "--input-size", "32",
                   "--erf-input-size", "32", "--quiet"])  # a toy size: a regression trains for seconds, not hours
        err = capsys.readouterr().err
        assert rc == 2 and err.count("error:") == 1 and "is the study folder itself" in err and "Traceback" not in err
        assert not (tmp_path / "s").exists()
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "study.json").write_text(json.dumps({"settings": {}, "models": []}))
    with pytest.raises(ErfLabError, match="is the study folder itself"):  # ship() itself too
        ship(tmp_path / "s", tmp_path / "s")


def _measured_model(m, settings) -> dict:
    """What a study job returns for a trained and measured model, without the hours."""
    info = {"settings": {"input_size": settings.input_size, "val_size": settings.val_size},
            "model_config": {"params": 1000 + m.kernel, "num_classes": 10}, "final": {"val_acc": 0.9,
                                                                                       "img_per_s": 50.0}}
    return {"name": m.name, "info": info, "erf": {"area@50%": float(m.kernel)}, "erf_flags": [],
            "probe": {"shape_bias": 0.5, "shape_only_accuracy": 0.9, "texture_only_accuracy": 0.2}}


def test_a_study_holds_its_folder(tmp_path, monkeypatch, capsys):
    """The same study in two shells (to continue it while it still ran) trained and measured the same models into
    one folder at once. The study now holds its folder while it works: the second gets one line, exit 2, and
    writes nothing; once the first is done the same command runs (and holds the folder throughout)."""
    import subprocess
    import sys

    import erf_lab.train.study as study

    out = tmp_path / "s"
    out.mkdir()
    try_lock = ("import fcntl, os, sys\nfd = os.open(sys.argv[1], os.O_RDONLY)\ntry:\n    fcntl.flock(fd, "
                "fcntl.LOCK_EX | fcntl.LOCK_NB)\nexcept OSError:\n    sys.exit(3)\n")
    tries = []

    def job(m, settings, folder, threads):  # a trained and measured model, without the hours
        tries.append(subprocess.run([sys.executable, "-c", try_lock, str(folder)]).returncode)
        return _measured_model(m, settings)

    monkeypatch.setattr(study, "_job", job)
    monkeypatch.setattr(study, "write_results", lambda *a, **k: None)
    argv = ["study", "kernel-family", "--out", str(out), "--no-guidelines", "--quiet"]
    with held_by_another_process(out):
        assert main(argv) == 2
    lines = [s for s in capsys.readouterr().err.splitlines() if s.strip()]
    assert lines == [f"erf-lab study: error: --out {out} is in use: another erf-lab process is writing a run there "
                     "now; wait for it to end (or stop it) and run the command again, or choose another --out"], lines
    assert list(out.iterdir()) == [] and tries == []
    assert main(argv) == 0, capsys.readouterr().err
    names = [m.name for m in plan(StudySettings(), guidelines=False)]
    assert tries == [3] * len(names)  # held while every model was trained and measured
    assert [m["name"] for m in json.loads((out / "study.json").read_text())["models"]] == names
    table = [line.split("|")[1].strip() for line in capsys.readouterr().out.splitlines() if line.startswith("|")]
    assert table == ["name", "---", *names]


def test_a_study_holds_its_ship_folder(tmp_path, monkeypatch, capsys):
    """Two studies shipping into one --ship DIR at once mixed their models, records and results there (the ship
    folder was written without a hold). Now it is held from the check before the training through the copies: a
    study whose DIR another process holds gets one line, exit 2, before it trains, and DIR stays as it was; ship()
    itself is refused the same way; once DIR is let go the same command trains and ships."""
    import erf_lab.train.study as study

    trained = []

    def job(m, settings, folder, threads):  # a trained and measured model, without the hours
        trained.append(m.name)
        return _measured_model(m, settings)

    monkeypatch.setattr(study, "_job", job)
    monkeypatch.setattr(study, "write_results", lambda *a, **k: None)
    out, dest = tmp_path / "s", tmp_path / "shipped"
    dest.mkdir()
    (dest / "K3-seed0.json").write_text('{"from": "the other study"}')
    argv = ["study", "kernel-family", "--out", str(out), "--no-guidelines", "--quiet", "--ship", str(dest)]
    with held_by_another_process(dest):
        assert main(argv) == 2
        lines = [s for s in capsys.readouterr().err.splitlines() if s.strip()]
        assert lines == [f"erf-lab study: error: --ship {dest} is in use: another erf-lab process is writing a run "
                         "there now; wait for it to end (or stop it) and run the command again, or choose another "
                         "--ship"], lines
        assert trained == [] and not out.exists()  # refused before the study began
        assert [p.name for p in dest.iterdir()] == ["K3-seed0.json"]
        assert main(argv[:-2]) == 0  # the study alone is not held up by it
        capsys.readouterr()
        with pytest.raises(ErfLabError, match=rf"^--ship {dest} is in use: another erf-lab process"):
            ship(out, dest)  # nor is ship() into it
        assert [p.name for p in dest.iterdir()] == ["K3-seed0.json"]
        assert (dest / "K3-seed0.json").read_text() == '{"from": "the other study"}'
    assert main(argv) == 0, capsys.readouterr().err
    assert "shipped 2 file(s) to" in capsys.readouterr().out  # nothing trained (runs mocked): README + study.json
    assert sorted(p.name for p in dest.iterdir()) == ["K3-seed0.json", "README.md", "study.json"]


def test_a_refused_study_leaves_no_ship_folder(tmp_path, capsys):
    """--ship DIR is made (and checked) before the training, but the study's own refusals came after it: a bad
    --channels, or a study folder of other settings, gave one line and left an empty DIR (and its parents) behind.
    A refused study now removes the folders it made for --ship."""
    ship_to = tmp_path / "new" / "shipped"
    argv = ["study", "kernel-family", "--out", str(tmp_path / "s"), "--no-guidelines", "--quiet", "--ship",
            str(ship_to)]
    assert main([*argv, "--channels", "8,8"]) == 2
    assert "--channels needs 4 positive integers" in capsys.readouterr().err
    assert not (tmp_path / "new").exists() and not (tmp_path / "s").exists()
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "study.json").write_text(json.dumps({"settings": {"epochs": 1}, "models": []}))
    assert main([*argv, "--epochs", "2"]) == 2
    assert "holds a study made with other settings" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    (tmp_path / "new").mkdir()  # a folder the user had stays
    assert main([*argv, "--channels", "8,8"]) == 2
    assert (tmp_path / "new").is_dir() and list((tmp_path / "new").iterdir()) == []


def test_a_ship_stopped_mid_copy_keeps_the_earlier_files(tmp_path, monkeypatch):
    """ship copied straight onto the shipped names: stopped mid-copy (Ctrl-C, a full disk) it left a truncated
    model or table where a whole one was (the next `--weights builtin:cue-world/...` loaded half a file). Each copy
    is now atomic: the earlier file stays whole, no temporary file is left, and a killed ship's ones are removed."""
    import shutil

    study, dest = tmp_path / "s", tmp_path / "shipped"
    study.mkdir()
    (study / "study.json").write_text(json.dumps({"settings": {}, "models": [], "command": ["erf-lab", "study"]}))
    (study / "results.md").write_text("# results\n\n| name |\n|---|\n| K31-seed0 |\n" * 50)
    dest.mkdir()
    (dest / "results.md").write_text("the earlier results\n")
    copyfile = shutil.copyfile

    def stopped(src, dst, **kwargs):  # half of the file written, then Ctrl-C
        with open(dst, "wb") as f:
            f.write(open(src, "rb").read()[:100])
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "copyfile", stopped)
    with pytest.raises(KeyboardInterrupt):
        ship(study, dest)
    assert [p.name for p in dest.iterdir()] == ["results.md"]
    assert (dest / "results.md").read_text() == "the earlier results\n"
    monkeypatch.setattr(shutil, "copyfile", copyfile)
    (dest / ".results.md.k1ll3d00.tmp.md").write_text("# res")  # what a ship killed mid-copy (SIGKILL) leaves
    assert {p.name for p in ship(study, dest)} == {"results.md", "study.json", "README.md"}
    assert sorted(p.name for p in dest.iterdir()) == ["README.md", "results.md", "study.json"]
    assert (dest / "results.md").read_text() == (study / "results.md").read_text()


def test_a_study_killed_while_it_writes_leaves_nothing_behind(tmp_path, one_thread):
    """A study SIGKILLed in the middle of a write (here its probe cache's, after the model was trained and its ERF
    measured) runs again to the end: no temporary file or lock of any of its writes is left anywhere in the study,
    its results are those of a study never stopped, and the user's files in it stay."""
    from conftest import killed_at_write, write_leftovers

    kw = dict(kernels=(3,), seeds=(0,), guidelines=False, show_progress=False)
    study = tmp_path / "killed"
    (study / "probes").mkdir(parents=True)
    mine = {"notes.txt": "my notes", "probes/notes.txt": "mine too"}
    for name, text in mine.items():
        (study / name).write_text(text)
    killed_at_write(f"from erf_lab.train.study import StudySettings, run_study\n"
                    f"run_study({str(study)!r}, {TOY!r}, **{kw!r})", "K3-seed0.json")
    assert [p.name for p in (study / "probes").iterdir() if p.name != "notes.txt"][0].startswith(".K3-seed0.json.")
    assert not (study / "results.md").exists()
    run_study(study, TOY, **kw)
    assert write_leftovers(study) == []
    whole = tmp_path / "whole"
    run_study(whole, TOY, **kw)

    def files(folder):
        return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())

    assert files(study) == sorted([*files(whole), *mine])
    assert {name: (study / name).read_text() for name in mine} == mine

    def table(folder):  # the last epoch's images per second are a timing, the rest the study's results
        return [{k: v for k, v in r.items() if k != "img_per_s"} for r in csv.DictReader(
            (folder / "family.csv").read_text().splitlines())]

    assert table(study) == table(whole) and len(table(study)) == 1
    for name in ("probes/K3-seed0.json", "erf-48px/K3-seed0/erf.npy", "family.png", "family.pdf"):
        assert (study / name).read_bytes() == (whole / name).read_bytes(), name


def test_a_study_with_jobs_killed_leaves_no_worker_running(tmp_path):
    """'study --jobs 2' SIGKILLed (the OOM killer, kill -9) when its first model was done: its worker processes
    lived on for good (an idle one blocked on a queue nobody fed, one under way trained its model to the end first),
    holding the terminal's pipes ('erf-lab study ... | tee study.log' never ended) and their memory. They end with
    the study now (a model under way stops after its step, its state saved), and the study run again finishes with
    no temporary file or lock left."""
    import os
    import signal
    import time

    from conftest import killed_at_write, write_leftovers

    kw = dict(kernels=(3, 31), seeds=(0,), guidelines=False, show_progress=False, jobs=2, threads=1)
    study = tmp_path / "study"
    workers = killed_at_write(f"from erf_lab.train.study import StudySettings, run_study\n"
                              f"run_study({str(study)!r}, {TOY!r}, **{kw!r})", "results.md")

    def running():
        alive = []
        for pid in workers:
            with contextlib.suppress(OSError):  # gone, or a zombie (ended, not yet reaped by init)
                if open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z":
                    alive.append(pid)
        return alive

    assert workers, "no worker process seen"
    try:
        for _ in range(120):
            if not running():
                break
            time.sleep(0.5)
        assert running() == []
    finally:
        for pid in running():  # the old behaviour's orphans: not left behind by the test
            os.kill(pid, signal.SIGKILL)
    rows = run_study(study, TOY, **{**kw, "jobs": 1})["rows"]
    assert [r["name"] for r in rows] == ["K3-seed0", "K31-seed0"] and write_leftovers(study) == []

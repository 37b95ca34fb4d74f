"""A command never writes into a folder that holds another kind of erf-lab result (its run.json, figures and
metrics would be replaced, and the command ended with exit 0): one error line, exit 2, the folder untouched."""
from __future__ import annotations

import json

import pytest

from conftest import held_by_another_process
from erf_lab.cli.main import main
from erf_lab.errors import ErfLabError
from erf_lab.io import refuse_other_result, result_kind

TINY = ["--model", "replknet_31b", "--override", "channels=(8,8,8,8)", "--override", "layers=(1,1,1,1)"]
RUN_JSON = {  # the run.json of each kind, as its command writes it (the fields that tell them apart)
    "erf": {"schema_version": 1, "kind": "erf", "model": "replknet_31b"},
    "training": {"settings": {"epochs": 1}, "model_config": {"model": "replknet_31b"}},
    "shape-bias": {"what": "erf-lab shape-bias", "model": "resnet18"},
    "shape-bias --compare": {"what": "erf-lab shape-bias --compare", "runs": []},
    "shape-bias --from-csv": {"what": "erf-lab shape-bias --from-csv", "model": "m"},
    "bench": {"command": "fastconv.bench", "argv": []},
}


def _result(tmp_path, kind: str):
    folder = tmp_path / kind.replace(" ", "_")
    folder.mkdir()
    (folder / "run.json").write_text(json.dumps(RUN_JSON[kind]))
    (folder / "metrics.json").write_text("{}")
    return folder


def _files(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _refused(capsys, argv, folder, kind_words):
    before = _files(folder)
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    lines = [s for s in err.replace("\r", "\n").splitlines() if s.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert f"{folder} holds another erf-lab result ({kind_words}); choose another --out" in lines[0] or \
        f"{folder} holds another result" in lines[0], lines[0]
    assert _files(folder) == before  # nothing written, nothing replaced


def test_result_kind_names_every_writer_and_refuses_only_another_known_kind(tmp_path):
    for kind in RUN_JSON:
        assert result_kind(_result(tmp_path, kind)) == kind
    assert result_kind(tmp_path) is None  # no run.json
    (tmp_path / "run.json").write_text("{not json")
    assert result_kind(tmp_path) == "unknown"
    old = tmp_path / "old"
    old.mkdir()
    (old / "run.json").write_text(json.dumps({"layer": "stages.3", "aggregate": "relu"}))  # before the schema
    assert result_kind(old) == "erf"
    refuse_other_result(tmp_path, "erf")  # a run.json erf-lab does not know: left to the command
    refuse_other_result(tmp_path / "training", "training")
    with pytest.raises(ErfLabError, match=r"--out .*training holds another erf-lab result \(a training run\)"):
        refuse_other_result(tmp_path / "training", "erf")


def test_compute_into_a_training_run_is_refused_with_and_without_force(tmp_path, capsys):
    folder = _result(tmp_path, "training")
    for extra in ([], ["--force"]):
        _refused(capsys, ["compute", *TINY, "--num-images", "1", "--input-size", "32", "--out", folder, *extra],
                 folder, "a training run")


def test_analyze_into_another_run_and_bench_into_a_training_run_are_refused(tmp_path, capsys):
    src = tmp_path / "src"
    assert main(["compute", *TINY, "--num-images", "1", "--input-size", "32", "--out", str(src), "--quiet"]) == 0
    capsys.readouterr()
    other = _result(tmp_path, "erf")
    _refused(capsys, ["analyze", src, "--out", other], other, "an ERF run")
    assert main(["analyze", str(src), "--out", str(src)]) == 0  # its own folder: fine
    capsys.readouterr()
    folder = _result(tmp_path, "training")
    _refused(capsys, ["bench", "--quick", "--kernels", "3", "--out", folder], folder, "a training run")
    from fastconv.bench import main as bench_main

    assert bench_main(["--quick", "--kernels", "3", "--out", str(folder)]) == 2
    assert "holds another result (its run.json is no fastconv benchmark's)" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert bench_main(["--quick", "--kernels", "3", "--out", str(tmp_path / "file" / "sub")]) == 2
    assert "lies under a file" in capsys.readouterr().err


def test_shape_bias_into_an_erf_run_is_refused(tmp_path, capsys, datasets):
    folder = _result(tmp_path, "erf")
    _refused(capsys, ["shape-bias", "--model", "resnet18", "--allow-random", "--limit", "16", "--workers", "0",
                      "--stimuli", datasets, "--out", folder], folder, "an ERF run")
    run = tmp_path / "sb"
    assert main(["shape-bias", "--model", "resnet18", "--allow-random", "--limit", "16", "--workers", "0",
                 "--stimuli", str(datasets), "--out", str(run)]) == 0
    capsys.readouterr()
    _refused(capsys, ["shape-bias", "--compare", run, "--out", folder], folder, "an ERF run")
    training = _result(tmp_path, "training")
    _refused(capsys, ["shape-bias", "--from-csv", *sorted(run.glob("*_session-1.csv")), "--out", training], training,
             "a training run")


def test_a_home_relative_out_and_a_sweep_rerun_with_another_batch_size(tmp_path, monkeypatch):
    """``~/b`` is the folder prepare_out_dir writes to, so the guard reads the same; a run with another batch size
    is the same measurement (the sweep's re-run check, as the runner's resume)."""
    from erf_lab.erf.runner import ErfSpec, run_erf, settings_differ

    monkeypatch.setenv("HOME", str(tmp_path))
    _result(tmp_path, "training")
    assert result_kind("~/training") == "training"
    with pytest.raises(ErfLabError, match="holds another erf-lab result"):
        refuse_other_result("~/training", "erf")
    spec = ErfSpec("replknet_31b", overrides={"channels": (8, 8, 8, 8), "layers": (1, 1, 1, 1)}, num_images=2,
                   input_size=32, batch_size=2)
    run_erf(spec, out=tmp_path / "run", show_progress=False)
    assert settings_differ(tmp_path / "run", ErfSpec(**{**spec.__dict__, "batch_size": 1})) == []
    assert settings_differ(tmp_path / "run", ErfSpec(**{**spec.__dict__, "input_size": 48})) == ["input_size"]


def test_a_cue_world_summary_loads_and_compare_says_why_it_cannot_draw_it(tmp_path, capsys):
    from erf_lab.shape_bias.plotting import load_run

    run = tmp_path / "cw"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"shape_bias": 0.5, "per_class": {"0": 0.5}, "model": "m"}))
    assert load_run(run)["shape_bias"] == 0.5  # the app shows it
    assert main(["shape-bias", "--compare", str(run), "--out", str(tmp_path / "cmp")]) == 2
    assert "a cue-world probe has per_class instead" in capsys.readouterr().err


# ------------------------------------------------------------------ every writer against every other kind of result
TRAIN = ["train", *TINY, "--input-size", "32", "--num-classes", "4", "--train-size", "16", "--val-size", "8",
         "--epochs", "1", "--batch-size", "8", "--quiet"]
SWEEP = ["sweep", "--kernels", "3", "--reparam", "deploy", *TINY[2:], "--input-size", "32", "--num-images", "1",
         "--quiet"]
KIND_WORDS = {"erf": "an ERF run", "training": "a training run", "compare": "an ERF comparison",
              "sweep": "an ERF sweep", "timeline": "a training timeline", "study": "a study"}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """One folder of each kind, as its command writes it (the study's record as run_study writes it: a real study
    trains six models)."""
    d = tmp_path_factory.mktemp("results")
    for argv in (["compute", *TINY, "--num-images", "1", "--input-size", "32", "--quiet", "--out", d / "erf"],
                 [*TRAIN, "--out", d / "training"],
                 ["compare", d / "erf", d / "erf", "--formats", "png", "--out", d / "compare"],
                 [*SWEEP, "--formats", "png", "--out", d / "sweep"],
                 ["timeline", d / "training", "--input-size", "32", "--num-images", "1", "--probe-size", "10",
                  "--formats", "png", "--quiet", "--out", d / "timeline"]):
        assert main([str(a) for a in argv]) == 0, argv
    from dataclasses import asdict

    from erf_lab.train.study import StudySettings, _jsonable, plan

    s = StudySettings()
    (d / "study").mkdir()
    (d / "study" / "study.json").write_text(json.dumps({"settings": _jsonable(asdict(s)), "models": [
        _jsonable(asdict(m)) for m in plan(s, guidelines=False)], "command": ["erf-lab", "study", "kernel-family"]}))
    return d


def _writer(command: str, results, out) -> list:
    """The argv of ``command`` writing its result into ``out`` (tiny sizes: they run in seconds)."""
    return {
        "compute": ["compute", *TINY, "--num-images", "1", "--input-size", "32", "--quiet", "--force", "--out", out],
        "train": [*TRAIN, "--force", "--out", out],
        "study": ["study", "kernel-family", "--no-guidelines", "--epochs", "1", "--train-size", "64", "--input-size",
                  "32", "--channels", "8,8,8,8", "--layers", "1,1,1,1", "--out", out],
        "sweep": [*SWEEP, "--out", out],
        "compare": ["compare", results / "erf", results / "erf", "--out", out],
        "timeline": ["timeline", results / "training", "--input-size", "32", "--num-images", "1", "--probe-size",
                     "10", "--quiet", "--out", out],
        "bench": ["bench", "--quick", "--kernels", "3", "--out", out],
    }[command]


OWN = {"compute": "erf", "train": "training", "study": "study", "sweep": "sweep", "compare": "compare",
       "timeline": "timeline", "bench": None}


@pytest.mark.parametrize("command,kind", [(c, k) for c in OWN for k in KIND_WORDS if k != OWN[c]])
def test_no_command_writes_into_another_kind_of_result(command, kind, results, tmp_path, capsys):
    """study / sweep / compare / timeline wrote into an ERF or training run (exit 0), and compute / train (with
    --force) / bench wrote into a compare, sweep, study or timeline folder: each is one line now, folder untouched."""
    import shutil

    assert result_kind(results / kind) == kind
    folder = tmp_path / kind
    shutil.copytree(results / kind, folder)
    capsys.readouterr()
    _refused(capsys, _writer(command, results, folder), folder, KIND_WORDS[kind])


@pytest.mark.parametrize("command", ["compute", "train", "sweep", "compare", "timeline"])
def test_a_command_writes_again_into_its_own_kind_of_result(command, results, tmp_path, capsys):
    """Its own folder stays its own: --force (compute, train), a sweep re-run that reuses its members, compare and
    timeline again; and the runs a sweep or timeline writes into its own sub-folders."""
    import shutil

    folder = tmp_path / OWN[command]
    shutil.copytree(results / OWN[command], folder)
    capsys.readouterr()
    assert main([str(a) for a in _writer(command, results, folder)]) == 0, capsys.readouterr().err
    assert result_kind(folder) == OWN[command]
    if command == "sweep":
        assert json.loads((folder / "sweep.json").read_text())["rows"][0]["reused"] is True
        assert result_kind(folder / "K3-deploy") == "erf"
    if command == "timeline":
        assert "measured 0 ERF(s) and 0 probe(s)" in capsys.readouterr().out  # all from its cache
        assert result_kind(folder / "erf-32px" / "epoch_001") == "erf"


#: per command: its argv writing into ``out`` again, and the sub-folders it writes itself (where a kill leaves the
#: temporary files of its writes); "" is the folder itself
AGAIN = {
    "analyze": (lambda results, out: ["analyze", results / "erf", "--formats", "png", "--out", out], [""]),
    "compare": (lambda results, out: _writer("compare", results, out), [""]),
    "sweep": (lambda results, out: _writer("sweep", results, out), [""]),
    "timeline": (lambda results, out: _writer("timeline", results, out),
                 ["", "probe-32px", "images-32px", "ema-weights"]),
}


@pytest.mark.parametrize("command", list(AGAIN))
def test_a_command_removes_the_temporary_files_a_kill_left_in_its_own_folders(command, results, tmp_path, capsys):
    """A command killed while it wrote (SIGKILL, a power cut) leaves the temporary file of that write
    (``.<name>.<random>.tmp<suffix>``; a timeline's EMA weights are checkpoint-sized) and only compute, train,
    shape-bias and study --ship removed theirs. Every command now removes them from the folders it writes itself
    when it takes its folder; the user's files, names that are no such temporary, the temporaries of a file that a
    reparam holds now (its lock beside it), and folders the command does not write stay."""
    import shutil

    argv, subfolders = AGAIN[command]
    folder = tmp_path / command
    if command == "analyze":
        folder.mkdir()
    else:
        shutil.copytree(results / OWN[command], folder)
    killed = [f"{sub}/.{name}".lstrip("/") for sub in subfolders
              for name in ("metrics.json.k1lled00.tmp.json", "grid.png.a_b9c8d7.tmp.png", "epoch_001.safetensors"
                           ".0z9y8x7w.tmp.safetensors", "notes.zzzzzzzz.tmp")]
    kept = [f"{sub}/{name}".lstrip("/") for sub in subfolders for name in (
        "notes.txt", ".notes.tmp", ".metrics.json.k1lled00.tmp", ".metrics.json.k1lle.tmp.json",
        ".metrics.json.k1lled00.tmp.csv", ".metrics.json.K1LLED00.tmp.json", "metrics.json.k1lled00.tmp.json",
        ".deploy.pth.k1lled00.tmp.pth", ".deploy.pth.run.json.k1lled00.tmp.json", ".deploy.pth.lock")]
    kept += ["checkpoints/.metrics.json.k1lled00.tmp.json", "probe-32px/notes/.metrics.json.k1lled00.tmp.json"]
    for name in killed + kept:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(name)
    capsys.readouterr()
    assert main([str(a) for a in argv(results, folder)]) == 0, capsys.readouterr().err
    assert [n for n in killed if (folder / n).exists()] == []
    assert [n for n in kept if not (folder / n).is_file() or (folder / n).read_text() != n] == []
    assert command == "analyze" or result_kind(folder) == OWN[command]
    if command == "analyze":
        assert json.loads((folder / "analysis.json").read_text())["command"] == "analyze"
        assert json.loads((folder / "metrics.json").read_text()) == json.loads(
            (results / "erf" / "metrics.json").read_text())


def test_a_bench_removes_the_temporary_file_a_bench_killed_while_it_wrote_left(tmp_path, capsys, one_thread,
                                                                             monkeypatch):
    """fastconv's bench named its temporaries ``.table.csv.<random>.tmp``, which erf-lab takes for no temporary of
    its own: one a kill left stayed beside the tables for good. Named as erf-lab's now, the next bench into the
    folder removes it."""
    import os
    import types
    from pathlib import Path

    import fastconv.bench as fb

    real_run = fb.run
    monkeypatch.setattr(fb, "run", lambda **kw: real_run(sgemm_size=64, **kw))  # a small SGEMM probe
    out = tmp_path / "bench"
    argv = ["bench", "--kernels", "3", "--resolutions", "8", "--batch", "1", "--channels", "4", "--layers", "1",
            "--repeats", "1", "--warmup", "0", "--mode", "fwd", "--device", "cpu", "--out", str(out)]

    def killed(src, dst):  # killed before table.csv's rename: nothing after it runs, its temporary stays
        raise _Killed()

    def unlink(path):  # of the temporary (its finally): not run either
        if not Path(path).name.startswith(".table.csv."):
            os.unlink(path)

    killed_os = types.SimpleNamespace(**{**vars(os), "replace": killed, "unlink": unlink})
    with monkeypatch.context() as m:
        m.setattr(fb, "os", killed_os)
        with pytest.raises(_Killed):
            main(argv)
    [left] = [p.name for p in out.iterdir()]
    assert left.startswith(".table.csv.") and left.endswith(".tmp.csv")
    (out / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert main(argv) == 0, capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "results.json", "run.json", "table.csv", "table.txt"]


class _Killed(BaseException):
    """What a SIGKILL does at that point: nothing after it runs."""


def test_a_study_accepts_its_own_folder_and_its_training_runs(results, tmp_path):
    """A study re-run reads its own folder (tests/test_study.py runs one); the training runs it keeps in runs/ are
    training runs for train, and its ERFs in erf-<S>px/ ERF runs for the runner."""
    import shutil

    refuse_other_result(results / "study", "study")
    study = tmp_path / "study"
    shutil.copytree(results / "study", study)
    shutil.copytree(results / "training", study / "runs" / "K3-seed1")
    shutil.copytree(results / "erf", study / "erf-128px" / "K3-seed1")
    assert result_kind(study) == "study"
    refuse_other_result(study / "runs" / "K3-seed1", "training")
    refuse_other_result(study / "erf-128px" / "K3-seed1", "erf")
    with pytest.raises(ErfLabError, match=r"holds another erf-lab result \(a study\)"):
        refuse_other_result(study, "training")


def test_a_record_of_another_program_with_a_marker_name_is_no_result(tmp_path):
    """sweep.json / compare.json / study.json / timeline.json of something else do not make a folder erf-lab's."""
    for name in ("sweep.json", "compare.json", "study.json", "timeline.json"):
        (tmp_path / name).write_text(json.dumps({"command": "other", "rows": "x"}))
    assert result_kind(tmp_path) is None
    refuse_other_result(tmp_path, "erf")


# ------------------------------------------------------------------ a sweep, comparison or timeline stopped half way
def _interrupt(monkeypatch, module, name: str, when) -> None:
    """``module.name`` raises KeyboardInterrupt (a Ctrl-C) at the first call ``when(args, calls)`` accepts."""
    real, calls = getattr(module, name), []

    def stopped(*args, **kwargs):
        calls.append(args)
        if when(args, calls):
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, stopped)


STOPPED = {  # the command, and where a Ctrl-C stops it: after its first member, checkpoint or figure
    "sweep": lambda results, out: (
        ["sweep", "--kernels", "3,5", *SWEEP[3:], "--formats", "png", "--out", out],
        ("erf_lab.erf.runner", "run_erf", lambda args, calls: len(calls) == 2)),
    "compare": lambda results, out: (
        ["compare", results / "erf", results / "erf", "--formats", "png", "--out", out],
        ("erf_lab.erf.analysis", "write_text", lambda args, calls: str(args[0]).endswith("compare.csv"))),
    "timeline": lambda results, out: (
        ["timeline", results / "training", "--input-size", "32", "--num-images", "1", "--probe-size", "10",
         "--formats", "png", "--quiet", "--out", out],
        ("erf_lab.train.timeline", "measure_checkpoint", lambda args, calls: len(calls) == 2)),
}
RECORD = {"sweep": "sweep.json", "compare": "compare.json", "timeline": "timeline.json"}


@pytest.mark.parametrize("command", list(STOPPED))
def test_an_interrupted_sweep_comparison_or_timeline_is_recognised_refused_and_completed(command, results, tmp_path,
                                                                                           capsys, monkeypatch):
    """The record (sweep.json, compare.json, timeline.json) was written only at the end: a folder stopped half way
    was no result, so compute --force and train --force wrote into it (exit 0). Now the record is there from the
    start with complete: false (and what was asked), the folder is refused by another command (one line, exit 2,
    untouched), and the same command again finishes it, reusing what was measured."""
    import importlib

    folder = tmp_path / command
    argv, (module, name, when) = STOPPED[command](results, folder)
    capsys.readouterr()
    with monkeypatch.context() as m:
        _interrupt(m, importlib.import_module(module), name, when)
        assert main([str(a) for a in argv]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert result_kind(folder) == command
    record = json.loads((folder / RECORD[command]).read_text())
    assert record["complete"] is False
    if command in ("sweep", "compare"):
        assert record["command"] == command and record["argv"] and "parameters" in record  # what it was asked
    if command == "sweep":
        assert record["members"] == ["K3-deploy", "K5-deploy"] and [r["run_dir"] for r in record["rows"]] == \
            ["K3-deploy"] and not (folder / "sweep.csv").exists()
    if command == "timeline":
        assert record["epochs"] == [0, 1] and [r["epoch"] for r in record["rows"]] == [0]
        assert not (folder / "timeline.png").exists()
    _refused(capsys, _writer("compute", results, folder), folder, KIND_WORDS[command])
    _refused(capsys, _writer("train", results, folder), folder, KIND_WORDS[command])

    assert main([str(a) for a in argv]) == 0, capsys.readouterr().err  # the same command: resumed and finished
    out = capsys.readouterr().out
    record = json.loads((folder / RECORD[command]).read_text())
    assert record["complete"] is True and result_kind(folder) == command
    if command == "sweep":
        assert [(r["run_dir"], r["reused"]) for r in record["rows"]] == [("K3-deploy", True), ("K5-deploy", False)]
        assert {"grid.png", "growth.png", "sweep.csv", "sweep.md"} <= set(record["files"])
    if command == "compare":
        assert len(record["rows"]) >= 2 and (folder / "compare.csv").is_file()
    if command == "timeline":
        assert "measured 1 ERF(s) and 1 probe(s)" in out  # epoch 0 came from its cache
        assert [r["epoch"] for r in record["rows"]] == [0, 1] and (folder / "timeline.png").is_file()
    _refused(capsys, _writer("compute", results, folder), folder, KIND_WORDS[command])


def test_a_command_record_is_incomplete_until_saved_complete_and_a_bad_input_leaves_none(tmp_path):
    """command_record: written at the start, kept by an interruption or after work was saved, taken back (or the
    earlier record put back) by an error line raised before any work."""
    from erf_lab.io import command_record, record_complete

    path = tmp_path / "sweep.json"
    base = {"command": "sweep", "parameters": {"kernels": [3]}}
    with pytest.raises(ErfLabError):
        with command_record(path, base):
            assert json.loads(path.read_text()) == {"complete": False, **base}
            raise ErfLabError("bad input")
    assert not path.exists()
    with pytest.raises(KeyboardInterrupt):
        with command_record(path, base):
            raise KeyboardInterrupt
    assert json.loads(path.read_text())["complete"] is False and result_kind(tmp_path) == "sweep"
    with command_record(path, {**base, "rows": []}) as save:
        save(rows=[1])
        assert json.loads(path.read_text()) == {"complete": False, **base, "rows": [1]}
    save(complete=True, rows=[1, 2])
    done = json.loads(path.read_text())
    timing = {k: done.pop(k) for k in ("end_time", "wall_seconds")}  # said when the record is saved complete
    assert done == {"complete": True, **base, "rows": [1, 2]} and record_complete(done)
    import datetime

    ended = datetime.datetime.fromisoformat(timing["end_time"])
    assert 0 <= timing["wall_seconds"] < 60 and abs(datetime.datetime.now(datetime.timezone.utc) - ended).seconds < 60
    done.update(timing)
    with pytest.raises(ErfLabError):
        with command_record(path, {**base, "parameters": {"kernels": [5]}}):
            raise ErfLabError("bad input")
    assert json.loads(path.read_text()) == done  # the finished record of before, as it was
    with pytest.raises(ErfLabError):
        with command_record(path, base) as save:
            save(rows=[1])
            raise ErfLabError("a later member's error")
    assert json.loads(path.read_text())["complete"] is False  # work was done: the folder stays a sweep
    assert record_complete({"command": "sweep"}) and not record_complete(None)  # a record from before the flag
    with command_record(tmp_path / "rank1" / "sweep.json", base, write=False) as save:
        save(complete=True)
    assert not (tmp_path / "rank1").exists()


def test_a_bench_holds_its_folder_and_leaves_none_it_made_when_refused(tmp_path, capsys, one_thread, monkeypatch):
    """Two benchmarks into one --out (a loop over devices, two terminals) replaced each other's rows in table.csv
    and results.json as they went. The bench now holds its folder: the second gets one line, exit 2, and writes
    nothing; once the first is done it runs. A bench refused in a folder it made leaves none behind."""
    import fastconv.bench as fb

    real_run = fb.run
    monkeypatch.setattr(fb, "run", lambda **kw: real_run(sgemm_size=64, **kw))  # a small SGEMM probe
    out = tmp_path / "bench"
    out.mkdir()
    argv = ["bench", "--kernels", "3", "--resolutions", "8", "--batch", "1", "--channels", "4", "--layers", "1",
            "--repeats", "1", "--warmup", "0", "--mode", "fwd", "--device", "cpu", "--out", str(out)]
    with held_by_another_process(out):
        assert main(argv) == 2
    lines = [s for s in capsys.readouterr().err.replace("\r", "\n").splitlines() if s.strip()]
    assert lines == [f"erf-lab bench: error: --out {out} is in use: another erf-lab process is writing a run there "
                     "now; wait for it to end (or stop it) and run the command again, or choose another --out"], lines
    assert list(out.iterdir()) == []
    assert main(argv) == 0, capsys.readouterr().err
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [(r["R"], r["K"]) for r in rows] == [(8, 3)]
    assert main([*argv[:-1], str(tmp_path / "new" / "b"), "--batch", "0"]) == 2  # refused by fastconv's checks
    assert "--batch must be positive" in capsys.readouterr().err and not (tmp_path / "new").exists()

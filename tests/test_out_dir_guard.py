"""A command never writes into a folder that holds another kind of erf-lab result (its run.json, figures and
metrics would be replaced, and the command ended with exit 0): one error line, exit 2, the folder untouched."""
from __future__ import annotations

import json

import pytest

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


def _refused(capsys, argv, folder, kind_words):
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    lines = [s for s in err.replace("\r", "\n").splitlines() if s.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert f"{folder} holds another erf-lab result ({kind_words}); choose another --out" in lines[0] or \
        f"{folder} holds another result" in lines[0], lines[0]
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # nothing written, nothing replaced


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
    _refused(capsys, ["bench", "--quick", "--kernels", "3", "--out", folder], folder, "")
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

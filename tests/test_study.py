"""erf-lab study kernel-family at a toy size: plan, cached steps, tables, figure, and shipping for builtin:."""
import csv
import json

import pytest
import torch

from erf_lab.models import create_model
from erf_lab.train.study import StudySettings, plan, run_study, ship, val_subset_correct

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
    rows = list(csv.DictReader((out / "family.csv").open()))
    assert [r["kernel"] for r in rows] == ["3", "31"]
    for r, info in zip(rows, (json.loads((out / "runs" / n / "run.json").read_text()) for n in ("K3-seed0",
                                                                                                 "K31-seed0"))):
        assert float(r["val_acc"]) == pytest.approx(info["final"]["val_acc"])
    md = (out / "results.md").read_text()
    assert "| K31-seed0 | 32 |" in md and (out / "family.png").is_file()
    stamp = (out / "runs" / "K3-seed0" / "model.safetensors").stat().st_mtime_ns
    run_study(out, TOY, kernels=(3, 31), seeds=(0,), guidelines=False)  # all cached: nothing retrained
    assert (out / "runs" / "K3-seed0" / "model.safetensors").stat().st_mtime_ns == stamp

    dest = tmp_path / "data" / "trained" / "cue-world"
    files = ship(out, dest, subset=20)
    assert {p.name for p in files} >= {"K3-seed0.safetensors", "K3-seed0.json", "K31-seed0.metrics.csv", "README.md"}
    rec = json.loads((dest / "K31-seed0.json").read_text())
    monkeypatch.setattr(erf_lab.paths, "data_dir", lambda: tmp_path / "data")
    net = create_model("replknet_31b", weights="builtin:cue-world/K31-seed0")
    with torch.no_grad():
        assert val_subset_correct(net, 20, 32, 10, 0) == rec["val_subset"]["correct"]
    assert rec["overrides"]["channels"] == [8, 8, 16, 16] and rec["input_size"] == 32

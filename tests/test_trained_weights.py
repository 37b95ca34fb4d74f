"""The shipped cue-world models (data/trained/cue-world): each loads by its builtin: name with its recorded
options and still gets its recorded count right on the fixed val subset."""
import json

import pytest
import torch

from erf_lab.models import create_model
from erf_lab.paths import data_dir
from erf_lab.train.study import val_subset_correct

SHIPPED = data_dir() / "trained" / "cue-world"
RECORDS = sorted(p for p in SHIPPED.glob("*.json") if p.stem != "study")


def test_the_kernel_family_is_shipped_and_small():
    names = {p.stem for p in RECORDS}
    assert {"K3-seed0", "K7-seed0", "K13-seed0", "K31-seed0", "K3-seed1", "K31-seed1"} <= names
    total = sum(p.stat().st_size for p in SHIPPED.glob("*.safetensors"))
    assert total <= 25 * 2 ** 20, f"{total / 2 ** 20:.1f} MB"
    for p in RECORDS:
        r = json.loads(p.read_text())
        assert (SHIPPED / f"{p.stem}.metrics.csv").is_file()
        if r["group"] == "family":
            assert r["val_acc"] > 0.6, p.stem  # learned: chance is 0.1 on 10 classes


@pytest.mark.parametrize("record", RECORDS, ids=[p.stem for p in RECORDS])
def test_shipped_model_reproduces_its_val_subset(record, one_thread):
    r = json.loads(record.read_text())
    net = create_model(r["model"], weights=f"builtin:cue-world/{record.stem}")
    assert net.num_classes == r["num_classes"] == 10
    sub = r["val_subset"]
    with torch.no_grad():
        assert val_subset_correct(net, sub["size"], r["input_size"], r["num_classes"], sub["world_seed"]) \
            == sub["correct"]

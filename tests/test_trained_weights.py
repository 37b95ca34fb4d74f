"""The shipped cue-world models (data/trained/cue-world): each loads by its builtin: name with its recorded
options and still gets its recorded count right on the fixed val subset."""
import json
from pathlib import Path

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


def same_layout(redrawn, shipped, moved_at_most=0.002):
    """The PNG ``redrawn`` has the pixel size of ``shipped`` and (nearly) every pixel: a figure drawn by another
    layout moves its panels, texts and lines (a few cells of an ERF measured again on another CPU may differ)."""
    import matplotlib
    import numpy as np
    from matplotlib.font_manager import FontProperties, findfont
    from PIL import Image

    from erf_lab.io import FIGURE_FONT

    # The shipped figures were drawn in Liberation Serif (Debian's fonts-liberation, which CI's Chromium brings):
    # where the serif resolves to another font every text is another size, so the layout cannot be compared.
    with matplotlib.rc_context(FIGURE_FONT):
        font = Path(findfont(FontProperties(family="serif"))).name
    if not font.startswith("LiberationSerif"):
        pytest.skip(f"the shipped figures were drawn in Liberation Serif; this machine's serif is {font}")
    # PNGs record the matplotlib that drew them; another release may draw its glyphs a pixel apart: the size only
    a, b = (np.asarray(Image.open(p).convert("L"), dtype=np.int16) for p in (redrawn, shipped))
    if f"version{matplotlib.__version__}," not in Image.open(shipped).info.get("Software", ""):
        slack = np.ceil(0.01 * np.asarray(b.shape))
        assert (np.abs(np.subtract(a.shape, b.shape)) <= slack).all(), f"{shipped.name}: {a.shape[::-1]} px redrawn"
        return
    assert a.shape == b.shape, f"{shipped.name}: {a.shape[::-1]} px redrawn, {b.shape[::-1]} px shipped"
    moved = float((np.abs(a - b) > 64).mean())
    assert moved <= moved_at_most, f"{shipped.name}: {moved:.2%} of the pixels differ"


def test_shipped_family_figure_is_the_current_codes(tmp_path, one_thread):
    """family.png was drawn by an older layout of plot_family (9.1 in wide, 12-14 pt, no colour bar) and nothing
    said so. Drawn again from what is shipped (study.json, family.csv, the seed-0 weights: their ERFs measured
    again), it must be the shipped figure: a change of the figures' style fails here until the figure is drawn
    again (erf_lab.train.study.redraw_shipped('data/trained/cue-world')) and shipped."""
    import csv
    import shutil

    from erf_lab.train.study import redraw_family

    rows = list(csv.DictReader((SHIPPED / "family.csv").open()))
    seed0 = [r["name"] for r in rows if int(r["seed"]) == min(int(x["seed"]) for x in rows)]
    assert len(seed0) == 4
    for name in ("study.json", "family.csv", *(f"{n}.safetensors" for n in seed0)):
        shutil.copyfile(SHIPPED / name, tmp_path / name)
    assert redraw_family(tmp_path, formats=("png",)) == [tmp_path / "family.png"]
    same_layout(tmp_path / "family.png", SHIPPED / "family.png")


def test_shipped_timeline_figures_are_the_current_codes(tmp_path):
    """The shipped timelines' figures were drawn by an older layout of plot_timeline (11.3 in wide, no colour
    bar, legends on the curves, the untrained shape bias not marked); redrawn from timeline.json and strip.npz (the
    strip's maps at their colours: the checkpoints are not shipped) they must be the shipped PNG and PDF."""
    import re
    import shutil

    from erf_lab.errors import ErfLabError
    from erf_lab.train.timeline import STRIP_FILE, redraw_timeline

    folders = sorted(p.parent for p in SHIPPED.glob(f"timeline/*/{STRIP_FILE}"))
    assert [p.name for p in folders] == sorted(p.parent.name for p in SHIPPED.glob("timeline/*/timeline.json"))
    for folder in folders:
        out = tmp_path / folder.name
        out.mkdir()
        for name in ("timeline.json", STRIP_FILE):
            shutil.copyfile(folder / name, out / name)
        assert redraw_timeline(out) == [out / "timeline.png", out / "timeline.pdf"]  # (none there: the default)
        same_layout(out / "timeline.png", folder / "timeline.png")
        page = [re.search(rb"/MediaBox\s*\[([^\]]*)\]", p.read_bytes()).group(1).split()
                for p in (out / "timeline.pdf", folder / "timeline.pdf")]
        assert page[0] == page[1], page
    if len(folders) > 1:  # a strip left beside another timeline's rows (a re-ship) is refused, not drawn
        shutil.copyfile(folders[1] / "timeline.json", tmp_path / folders[0].name / "timeline.json")
        with pytest.raises(ErfLabError, match="is not the strip of the timeline beside it"):
            redraw_timeline(tmp_path / folders[0].name)

"""Safe checkpoint loading (erf_lab/checkpoint.py): no code execution, wrappers, clear errors."""
from __future__ import annotations

import argparse
import json
import os
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from erf_lab.checkpoint import load_state_dict_file, load_weights, unwrap_state_dict
from erf_lab.errors import CheckpointError, ErfLabError
from erf_lab.models import create_model

TINY = dict(channels=(8, 8, 8, 8), layers=(1, 1, 1, 1), kernels=(7, 5, 5, 3), small_kernel=3,
            num_classes=10)


pytestmark = pytest.mark.usefixtures("one_thread")


class _Evil:
    """Unpickling this would run ``os.system(touch <marker>)``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(2)}, "payload": _Evil(marker)}, path)
    with pytest.raises(CheckpointError, match=r"refusing to load .*(posix|os|nt)\.system.*could run code"):
        load_state_dict_file(path)
    assert not marker.exists()
    with pytest.raises(CheckpointError):
        create_model("replknet_31b", weights=str(path), **TINY)
    assert not marker.exists()


def test_a_checkpoint_of_numpy_arrays_is_refused_as_such_with_a_safe_way_to_convert_it(tmp_path):
    """User test: old checkpoints store numpy arrays (the weights, or a mean beside them); their refusal read
    "references numpy._core.multiarray._reconstruct (loading it could run code)", as for a malicious file. It now
    says what the file is and how to convert it; it is still refused."""
    for name, obj in {"arrays.pth": {"state_dict": {"w": np.ones((2, 2), np.float32)}},
                      "mean.pth": {"model": {"w": torch.ones(2)}, "mean": np.zeros(3)}}.items():
        torch.save(obj, tmp_path / name)
        with pytest.raises(CheckpointError) as refused:
            load_state_dict_file(tmp_path / name)
        msg = str(refused.value)
        assert re.fullmatch(rf"refusing to load {re.escape(str(tmp_path / name))}: a checkpoint that stores numpy "
                            r"arrays \(numpy\.(_?core)\.multiarray\._reconstruct\), which weights-only loading does "
                            r"not accept .*; to convert it, load it yourself with torch\.load where you trust the file "
                            r"and save its weights with safetensors: safetensors\.torch\.save_file\(.*\)", msg), msg
        assert "could run code" not in msg and "weights_only" not in msg and "\n" not in msg


def test_refusals_never_pass_on_torchs_advice_to_load_unsafely(tmp_path):
    from erf_lab.train.checkpoints import STATE_FILE, load_state

    marker = tmp_path / "pwned"
    torch.save({"settings": {}, "payload": _Evil(marker)}, tmp_path / STATE_FILE)
    (tmp_path / "text.pth").write_text("notes\n")
    with pytest.raises(ErfLabError) as state:
        load_state(tmp_path)
    with pytest.raises(CheckpointError) as text:
        load_state_dict_file(tmp_path / "text.pth")
    assert re.fullmatch(rf"refusing to load the training state {re.escape(str(tmp_path / STATE_FILE))}: it "
                        r"references the Python object (posix|os|nt)\.system \(loading it could run code\); start "
                        r"again with --force", str(state.value))
    assert str(text.value).endswith("(UnpicklingError: Unsupported operand 110)")
    for msg in (str(state.value), str(text.value)):
        assert "weights_only" not in msg and "Re-running" not in msg and "\n" not in msg
    assert not marker.exists()


def test_training_metadata_is_tolerated(tmp_path):
    """ConvNeXt/official-style training checkpoints carry ``args`` (a Namespace) and numpy scalars."""
    model = create_model("replknet_31b", **TINY)
    path = tmp_path / "ckpt.pth"
    torch.save({"model": model.state_dict(), "args": argparse.Namespace(lr=4e-3, model="RepLKNet-31B"),
                "epoch": 299, "max_accuracy": np.float64(83.5)}, path)
    sd = load_state_dict_file(path)
    assert sd.keys() == model.state_dict().keys()


def _truncated_zip() -> bytes:
    import io

    buf = io.BytesIO()
    torch.save({"w": torch.arange(1000.0)}, buf)
    return buf.getvalue()[:300]


_TEXT = b"model: replknet_31b\nweights are elsewhere, this is a text file\n"
_BAD_FILES = {
    "empty": b"", "zip header + garbage": b"PK\x03\x04garbage" * 20, "all bytes": bytes(range(256)) * 8,
    "truncated torch zip": _truncated_zip(), "json": b'{"model": "replknet_31b", "epochs": [1, 2, 3]}\n',
    "random bytes": bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0)).tolist()),
    # one text file per first byte: ~1 in 8 made torch's weights-only unpickler raise IndexError (issue #13)
    **{f"text starting with byte {b}": bytes([b]) + _TEXT for b in range(256)},
}


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_unreadable_files_give_one_checkpoint_error_line(tmp_path, suffix):
    """Every failure to read a file is a CheckpointError (an ErfLabError: one 'error:' line in the CLI) that
    names the file, never another exception type."""
    for what, content in _BAD_FILES.items():
        path = tmp_path / f"broken{suffix}"
        path.write_bytes(content)
        with pytest.raises(CheckpointError) as e:
            load_state_dict_file(path)
        msg = str(e.value)
        kind = "PyTorch zip checkpoint that is truncated or damaged" if what.endswith(("zip", "garbage")) else \
            "the file is empty (0 bytes" if what == "empty" else "not a PyTorch checkpoint or safetensors file"
        assert kind in msg and str(path) in msg, (what, msg)
        assert "\n" not in msg, (what, msg)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
@pytest.mark.parametrize("keep", [0.02, 0.5, 0.99])
def test_checkpoint_cut_short_is_called_truncated(tmp_path, suffix, keep):
    """An interrupted download or copy of a real checkpoint is named as such, not as a file of another kind."""
    from safetensors.torch import save_file

    sd = {k: v.contiguous() for k, v in _model().state_dict().items()}
    full = tmp_path / f"full{suffix}"
    save_file(sd, str(full)) if suffix == ".safetensors" else torch.save(sd, full)
    data = full.read_bytes()
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(data[:int(len(data) * keep)])
    with pytest.raises(CheckpointError, match=r"cannot read checkpoint .*: a (PyTorch zip|safetensors) checkpoint "
                                              r"that is truncated or damaged") as e:
        load_state_dict_file(cut)
    assert "\n" not in str(e.value) and "high likelihood" not in str(e.value)  # torch's text, cut mid-sentence


def test_a_zip_of_other_files_is_not_called_a_truncated_checkpoint(tmp_path):
    """A downloaded release zip (a model folder zipped) named .pth is no checkpoint cut short; a zip with torch's
    data.pkl that does not read is damaged, said without torch's request for feedback."""
    import zipfile

    other, damaged = tmp_path / "RepLKNet-31B.pth", tmp_path / "damaged.pth"
    with zipfile.ZipFile(other, "w") as z:
        for name in ("RepLKNet-31B/config.json", "RepLKNet-31B/model.safetensors", "RepLKNet-31B/README.md", "x"):
            z.writestr(name, "{}")
    with zipfile.ZipFile(damaged, "w") as z:
        z.writestr("archive/data.pkl", b"not a pickle")
    with pytest.raises(CheckpointError) as e:
        load_state_dict_file(other)
    assert str(e.value) == (f"cannot read checkpoint {other}: a zip archive of 4 other file(s) (RepLKNet-31B/config."
                            "json, RepLKNet-31B/model.safetensors, RepLKNet-31B/README.md, ...), not a PyTorch "
                            "checkpoint")
    with pytest.raises(CheckpointError) as e:
        load_state_dict_file(damaged)
    assert str(e.value).startswith(f"cannot read checkpoint {damaged}: a PyTorch zip checkpoint that is truncated or "
                                   "damaged (an interrupted download or copy?) (RuntimeError: ")
    assert "improved" not in str(e.value) and "report" not in str(e.value)  # torch 2.x: "(Could this error message ..."


def test_missing_and_bad_safetensors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_state_dict_file(tmp_path / "nope.pth")
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(CheckpointError, match="safetensors"):
        load_state_dict_file(bad)


def test_wrappers_prefixes_and_safetensors_round_trip(tmp_path):
    from safetensors.torch import save_file

    model = create_model("replknet_31b", **TINY)
    sd = model.state_dict()
    variants = {
        "raw.pth": sd,
        "model.pth": {"model": sd, "epoch": 3},
        "state_dict.pth": {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
        "nested.pth": {"model": {"module.module." + k: v for k, v in sd.items()}},
        # torch.compile(model).state_dict(), alone and under DDP
        "compiled.pth": {"model": {f"_orig_mod.{k}": v for k, v in sd.items()}},
        "ddp_compiled.pth": {f"module._orig_mod.{k}": v for k, v in sd.items()},
        # PyTorch's ImageNet example: the metric is a tensor beside the wrapped weights
        "imagenet_example.pth": {"epoch": 90, "arch": "x", "best_acc1": torch.tensor(76.1),
                                 "state_dict": {f"module.{k}": v for k, v in sd.items()}},
        "convnext_style.pth": {"model": sd, "model_ema": {k: v + 1 for k, v in sd.items()},
                               "max_accuracy": torch.tensor(83.5), "optimizer": {"state": {}, "param_groups": []}},
    }
    for name, obj in variants.items():
        torch.save(obj, tmp_path / name)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "w.safetensors"))
    for name in [*variants, "w.safetensors"]:
        loaded = load_state_dict_file(tmp_path / name)
        assert sorted(loaded) == sorted(sd), name  # safetensors stores keys sorted
        assert all(torch.equal(loaded[k], sd[k]) for k in sd), name
    # which part of each file loaded, as results record it (weights_selection); a plain state dict: none
    from erf_lab.checkpoint import read_weights

    def chose(entry, stripped=(), passed_over=()):
        return {"entry": entry, "passed_over": list(passed_over), "prefix_stripped": list(stripped), "part": None,
                "left_out": 0}

    expected = {"raw.pth": None, "w.safetensors": None, "model.pth": chose(["model"]),
                "nested.pth": chose(["model"], ["module.module."]), "compiled.pth": chose(["model"], ["_orig_mod."]),
                "ddp_compiled.pth": chose(None, ["module._orig_mod."]),
                "imagenet_example.pth": chose(["state_dict"], ["module."])}
    for name, selection in expected.items():
        assert read_weights(tmp_path / name)[1] == selection, name
    with pytest.warns(UserWarning, match="holds 2 sets of weights") as caught:  # said where the file was loaded
        load_state_dict_file(tmp_path / "convnext_style.pth")
        assert read_weights(tmp_path / "convnext_style.pth")[1] == chose(["model"], passed_over=["model_ema"])
    assert [w.filename for w in caught] == [__file__, __file__]
    with pytest.raises(CheckpointError, match="no state dict"):
        unwrap_state_dict({"epoch": 3, "optimizer": {"lr": 1.0}})


def test_ema_only_files_load_and_a_file_with_raw_and_ema_weights_says_which_loaded(tmp_path):
    """timm's train.py saves ``state_dict`` and ``state_dict_ema`` (ModelEmaV2/V3: ``module.`` keys), ConvNeXt-style
    scripts ``model`` and ``model_ema``; an EMA saved alone comes as ``ema`` or ``state_dict_ema``."""
    torch.manual_seed(0)
    raw, ema = _model().eval(), _model().eval()
    x = torch.randn(1, 3, 32, 32)
    files = {"ema.pth": {"ema": ema.state_dict()},
             "ema_v3.pth": {"state_dict_ema": {f"module.{k}": v for k, v in ema.state_dict().items()}, "epoch": 9},
             "timm.pth": {"epoch": 9, "arch": "x", "state_dict": raw.state_dict(), "args": argparse.Namespace(a=1),
                          "state_dict_ema": {f"module.{k}": v for k, v in ema.state_dict().items()}},
             "convnext.pth": {"model_ema": ema.state_dict(), "model": raw.state_dict(), "epoch": 9}}
    for name, obj in files.items():
        torch.save(obj, tmp_path / name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a file with one set of weights loads without a word
        for name in ("ema.pth", "ema_v3.pth"):
            got = create_model("replknet_31b", weights=str(tmp_path / name), **TINY).eval()
            assert torch.equal(got(x), ema(x)), name
    for name, (loaded, other) in {"timm.pth": ("state_dict", "state_dict_ema"),
                                  "convnext.pth": ("model", "model_ema")}.items():
        with pytest.warns(UserWarning) as caught:
            got = create_model("replknet_31b", weights=str(tmp_path / name), **TINY).eval()
        assert torch.equal(got(x), raw(x)) and not torch.equal(got(x), ema(x)), name
        assert [str(w.message) for w in caught] == [
            f"{tmp_path / name} holds 2 sets of weights ({loaded!r}, {other!r}): loaded checkpoint[{loaded!r}]; to use "
            f"another, save it alone (e.g. torch.save(checkpoint[{other!r}], FILE))"]
    from erf_lab.train.checkpoints import save_weights  # an epoch of erf-lab train --ema: its EMA has its own file

    run_pth = save_weights(raw.state_dict(), tmp_path / "epoch_001", "pth", extra={"model_ema": ema.state_dict()},
                           train_input_size=32)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(create_model("replknet_31b", weights=str(run_pth), **TINY).eval()(x), raw(x))
    torch.save({"epoch": 3, "optimizer": {"state": {}}, "net_g": {"w": [1.0]}}, tmp_path / "none.pth")
    with pytest.raises(CheckpointError, match=r"none\.pth: no state dict found \(its entries: epoch, optimizer, "
                                              r"net_g\); expected tensors, or a dict with one of 'state_dict', "
                                              r"'model', .*'ema'$"):
        load_state_dict_file(tmp_path / "none.pth")


def _model():
    return create_model("replknet_31b", **TINY)


def test_missing_unexpected_and_misshaped_keys_are_named():
    model = _model()
    sd = model.state_dict()
    missing = {k: v for k, v in sd.items() if not k.startswith("stages.2.")}
    with pytest.raises(CheckpointError, match=r"missing key\(s\): stages\.2\.blocks\.0\.pw1\.conv\.weight"):
        load_weights(model, missing, source="ckpt.pth")
    extra = {**sd, "stages.0.blocks.0.large_kernel.bogus.weight": torch.zeros(1)}
    with pytest.raises(CheckpointError, match=r"1 unexpected key\(s\): stages\.0\.blocks\.0\.large_kernel\.bogus"):
        load_weights(model, extra)
    shaped = {**sd, "stages.0.blocks.0.large_kernel.lkb_origin.conv.weight": torch.zeros(8, 1, 9, 9)}
    with pytest.raises(CheckpointError, match=r"lkb_origin\.conv\.weight is \(8, 1, 9, 9\) in the file, "
                                              r"\(8, 1, 7, 7\) in the model"):
        load_weights(model, shaped)
    # a merged (deploy) checkpoint into a train-time model names the lkb_reparam keys
    deploy = create_model("replknet_31b", deploy=True, **TINY).state_dict()
    with pytest.raises(CheckpointError, match="lkb_reparam"):
        load_weights(model, deploy)


def test_head_of_other_class_count(tmp_path):
    model = _model()
    sd = dict(model.state_dict())
    sd["head.weight"], sd["head.bias"] = torch.randn(21841, 8), torch.randn(21841)
    with pytest.raises(CheckpointError, match=r"classifier has 21841 classes, the model 10.*--override "
                                              r"num_classes=21841.*drop_head"):
        load_weights(_model(), sd)
    kept = create_model("replknet_31b", **{**TINY, "num_classes": 21841})
    load_weights(kept, sd)
    assert torch.equal(kept.head.weight, sd["head.weight"])
    fresh = _model()
    head_before = fresh.head.weight.clone()
    load_weights(fresh, sd, drop_head=True)
    assert torch.equal(fresh.head.weight, head_before)
    assert torch.equal(fresh.stem[0].conv.weight, sd["stem.0.conv.weight"])
    path = tmp_path / "in22k.pth"
    torch.save({"model": sd}, path)
    with pytest.raises(ErfLabError, match="21841"):
        create_model("replknet_31b", weights=str(path), **TINY)
    m = create_model("replknet_31b", weights=str(path), drop_head=True, **TINY)
    assert m.head.out_features == 10


def test_classifier_in_only_one_of_file_and_model(tmp_path):
    """A headless model (num_classes=0) and a file with a head, or the reverse: --drop-head loads the body."""
    with_head = {k: v.clone() for k, v in _model().state_dict().items()}
    headless = {k: v for k, v in with_head.items() if not k.startswith("head.")}
    no_head_model = lambda: create_model("replknet_31b", **{**TINY, "num_classes": 0})  # noqa: E731
    with pytest.raises(CheckpointError, match=r"the file has a classifier \(head\.weight\), the model none.*drop_head"):
        load_weights(no_head_model(), with_head, source="ck.pth")
    with pytest.raises(CheckpointError, match=r"the model has a classifier \(head\.weight\), the file none.*drop_h"):
        load_weights(_model(), headless, source="ck.pth")
    m = no_head_model()
    load_weights(m, with_head, drop_head=True)
    assert m.head is None and torch.equal(m.stem[0].conv.weight, with_head["stem.0.conv.weight"])
    m = _model()
    head_before = m.head.weight.clone()
    load_weights(m, headless, drop_head=True)
    assert torch.equal(m.head.weight, head_before) and torch.equal(m.norm.running_var, headless["norm.running_var"])
    path = tmp_path / "with_head.pth"
    torch.save(with_head, path)
    assert create_model("replknet_31b", weights=str(path), drop_head=True, **{**TINY, "num_classes": 0}).head is None


def test_bn_counters_the_file_lacks_start_at_zero(tmp_path):
    """Checkpoints without BatchNorm's num_batches_tracked (old PyTorch, conversions) load, as with PyTorch's own
    strict load_state_dict; the counters are 0, every other tensor is the file's."""
    ref = _model()
    for m in ref.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 2)
            m.num_batches_tracked.fill_(7)
    sd = {k: v for k, v in ref.state_dict().items() if not k.endswith("num_batches_tracked")}
    nn.Sequential(*ref.stem).load_state_dict({k[5:]: v for k, v in sd.items() if k.startswith("stem.")})  # torch's
    path = tmp_path / "old.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    got = create_model("replknet_31b", weights=str(path), **TINY)
    own = got.state_dict()
    assert all(torch.equal(own[k], v) for k, v in sd.items())
    counters = [v for k, v in own.items() if k.endswith("num_batches_tracked")]
    assert counters and all(int(v) == 0 for v in counters)
    partial = {k: v for k, v in sd.items() if not k.startswith("stages.1.")}  # a real gap is still named
    with pytest.raises(CheckpointError, match=r"missing key\(s\): stages\.1\.blocks\.0\.pw1\.conv\.weight"):
        load_weights(_model(), partial)


def test_drop_head_loads_a_classifier_that_fits(tmp_path):
    """drop_head only replaces a head that differs: one that fits the model is loaded (a trained classifier must not
    become a random one because the caller allowed another class count)."""
    src = _model()
    sd = {k: v.clone() for k, v in src.state_dict().items()}
    m = _model()
    load_weights(m, sd, drop_head=True)
    assert torch.equal(m.head.weight, sd["head.weight"]) and torch.equal(m.head.bias, sd["head.bias"])
    path = tmp_path / "w.pth"
    torch.save(sd, path)
    got = create_model("replknet_31b", weights=str(path), drop_head=True, **TINY)
    assert torch.equal(got.head.weight, sd["head.weight"])


def test_drop_head_replaces_only_the_head_keys_that_differ():
    """A timm-style head with a pre-logits norm beside its classifier (ConvNeXt's ``head.norm`` + ``head.fc``):
    drop_head replaces the classifier of another class count, or removes it for ``num_classes=0``, and loads the
    trained norm from the file (it shapes the features)."""
    class Net(nn.Module):
        def __init__(self, num_classes):
            super().__init__()
            self.body = nn.Linear(4, 6)
            self.head = nn.Module()
            self.head.norm = nn.LayerNorm(6)
            self.head.fc = nn.Linear(6, num_classes) if num_classes else nn.Identity()

    torch.manual_seed(0)
    src = Net(10)
    with torch.no_grad():
        src.head.norm.weight.uniform_(0.5, 1.5)
    sd = src.state_dict()
    for n in (5, 0):
        m = Net(n)
        fc = {k: v.clone() for k, v in m.head.fc.state_dict().items()}
        load_weights(m, sd, drop_head=True)
        assert torch.equal(m.head.norm.weight, sd["head.norm.weight"]) and torch.equal(m.body.weight, sd["body.weight"])
        assert all(torch.equal(v, m.head.fc.state_dict()[k]) for k, v in fc.items())  # its own (or no) classifier


def test_checkpoint_of_another_size_is_not_called_a_class_count_mismatch():
    wider = create_model("replknet_31b", **{**TINY, "channels": (8, 8, 8, 16)}).state_dict()
    head_input = {**_model().state_dict(), "head.weight": torch.randn(10, 16)}  # same class count, other width
    for sd, first in ((wider, "53 shape mismatch(es)"), (head_input, "head.weight is (10, 16) in the file, (10, 8)")):
        with pytest.raises(CheckpointError) as e:
            load_weights(_model(), sd, source="ck.pth")
        msg = str(e.value)
        assert msg.startswith("ck.pth does not match RepLKNet (a checkpoint of another architecture or size")
        assert "classes" not in msg and first in msg, msg


def test_a_checkpoint_of_another_registered_model_is_named(tmp_path):
    """The official RepLKNet-31B file given as --model replknet_31l (or as UniRepLKNet, or with other options), a
    merged UniRepLKNet-A file given as UniRepLKNet-F: the error names the model the file was saved from, its
    classifier's class count aside; a file of options no registered model has names none."""
    b31 = tmp_path / "RepLKNet-31B_100-classes.pth"
    torch.save({"model": create_model("replknet_31b", num_classes=100).state_dict()}, b31)
    for name, overrides in (("replknet_31l", {}), ("unireplknet_a", {}),
                            ("replknet_31b", {"kernels": (31, 29, 27, 7)})):
        with pytest.raises(CheckpointError, match=r"^.*does not match (RepLKNet|UniRepLKNet) .*; the file's tensors "
                           r"are those of replknet_31b with its default options \(--model replknet_31b, no "
                           r"--override\)$"):
            create_model(name, weights=str(b31), **overrides)
    uni_a = tmp_path / "unireplknet_a_deploy.pth"
    torch.save(create_model("unireplknet_a", deploy=True).state_dict(), uni_a)
    with pytest.raises(CheckpointError, match=r"those of unireplknet_a with its default options"):
        create_model("unireplknet_f", weights=str(uni_a))
    torch.save(_model().state_dict(), tmp_path / "tiny.pth")
    with pytest.raises(CheckpointError) as e:
        create_model("replknet_31b", weights=str(tmp_path / "tiny.pth"), **{**TINY, "channels": (8, 8, 8, 16)})
    assert "shape mismatch" in str(e.value) and "tensors are those of" not in str(e.value)


@pytest.mark.parametrize("name,overrides", [
    ("replknet_31b", TINY),
    ("unireplknet_a", dict(dims=(8, 16, 16, 24), depths=(1, 1, 2, 1), kernel_sizes=((3,), (13,), (7, 5), (9,)))),
    ("slak_t", dict(dims=(8, 8, 16, 16), depths=(1, 1, 1, 1), kernel_size=(13, 11, 9, 7, 3), width_factor=1.0))])
def test_deploy_asked_for_with_a_training_time_checkpoint_merges_it(tmp_path, name, overrides):
    """``deploy=True`` (``--override deploy=True``) with the training-time file: loaded as trained, then merged into
    the official deploy layout, the model a deploy file of the same weights builds (RepLKNet's scripts do the same:
    build as trained, load, merge); before, every merged key was 'missing'."""
    from erf_lab.models.deploy import official_deploy_layout
    from erf_lab.models.reparam import randomize_bn

    torch.manual_seed(0)
    trained = randomize_bn(create_model(name, **overrides), input_size=32).eval()
    torch.save({"model": trained.state_dict()}, tmp_path / "train.pth")
    merged = official_deploy_layout(trained)
    torch.save(merged.state_dict(), tmp_path / "deploy.pth")
    got = create_model(name, weights=str(tmp_path / "train.pth"), deploy=True, **overrides)
    from_deploy_file = create_model(name, weights=str(tmp_path / "deploy.pth"), **overrides)
    assert got.training and got.state_dict().keys() == from_deploy_file.state_dict().keys()
    assert all(torch.equal(v, from_deploy_file.state_dict()[k]) for k, v in got.state_dict().items())
    x = torch.randn(2, 3, 32, 32)
    out = got.eval()(x)
    assert torch.equal(out, from_deploy_file.eval()(x)) and torch.allclose(out, trained(x), rtol=1e-4, atol=1e-5)
    from erf_lab.models.deploy import export_deploy

    with pytest.raises(ErfLabError, match=rf"^{name} built with deploy=True is already in the deploy "
                                          r"\(re-parameterized\) form; nothing to merge; build it in its train-time"):
        export_deploy(name, tmp_path / "out.pth", weights=str(tmp_path / "train.pth"), deploy=True, **overrides)


def test_generic_module_without_head_names():
    net = nn.Sequential()
    net.add_module("body", nn.Conv2d(3, 4, 3))
    net.add_module("fc", nn.Linear(4, 5))
    sd = {"body.weight": torch.zeros(4, 3, 3, 3), "body.bias": torch.zeros(4),
          "fc.weight": torch.zeros(7, 4), "fc.bias": torch.zeros(7)}
    with pytest.raises(CheckpointError, match="7 classes"):
        load_weights(net, sd)
    load_weights(net, sd, drop_head=True)
    assert torch.equal(net.body.weight, torch.zeros(4, 3, 3, 3)) and net.fc.out_features == 5


@pytest.mark.parametrize("name,overrides", [("replknet_31b", dict(channels=(16, 32, 64, 128), layers=(1, 1, 2, 1),
                                                                   small_kernel=5)),
                                             ("resnet18", {}), ("mobilenetv2", {})])
def test_loading_weights_skips_random_init_but_sets_every_tensor(tmp_path, name, overrides):
    """With a checkpoint, registered models are built on the meta device and allocated uninitialized
    (the strict load then sets every tensor): same tensors and outputs as building normally and loading."""
    from erf_lab.models import registry

    torch.manual_seed(3)
    ref = create_model(name, **overrides).eval()
    for m in ref.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    path = tmp_path / "w.pth"
    torch.save(ref.state_dict(), path)
    assert registry._build_uninitialized(name, registry._resolve_factory(name), dict(overrides)) is not None
    got = create_model(name, weights=str(path), **overrides).eval()
    assert all(t.device.type == "cpu" for t in list(got.parameters()) + list(got.buffers()))
    sd_ref, sd_got = ref.state_dict(), got.state_dict()
    assert sd_ref.keys() == sd_got.keys() and all(torch.equal(sd_ref[k], sd_got[k]) for k in sd_ref)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(ref(x), got(x))


def test_model_with_non_persistent_buffer_is_built_normally():
    from erf_lab.models import registry

    class WithScratch(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.register_buffer("scale", torch.full((4,), 2.0), persistent=False)

    assert registry._build_uninitialized("x", WithScratch, {}) is None


def test_materialize_replaces_meta_tensors_and_keeps_shared_ones_shared():
    """The uninitialized build of a strict checkpoint load (no random init) makes real CPU tensors of every meta
    parameter and buffer without ``to_empty`` (whose first call imports torch's reference ops, ~0.5 s); a weight
    shared by two modules stays one tensor."""
    import torch.nn as nn

    from erf_lab.models.initialization import materialize

    with torch.device("meta"):
        m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(5, 5, bias=False))
        m.append(nn.Linear(5, 5, bias=False))
    m[3].weight = m[2].weight
    m[0].bias.requires_grad_(False)
    out = materialize(m)
    tensors = list(out.parameters()) + list(out.buffers())
    assert out is m and tensors and not any(t.is_meta for t in tensors)
    assert m[3].weight is m[2].weight and isinstance(m[2].weight, nn.Parameter)
    assert m[0].weight.shape == (4, 3, 3, 3) and m[1].running_var.shape == (4,)
    assert m[1].num_batches_tracked.dtype == torch.long and not m[0].bias.requires_grad
    assert m[0].weight.requires_grad


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_the_format_comes_from_the_bytes_not_the_name(tmp_path):
    """A safetensors file named .pth and a torch.save file named .safetensors are intact checkpoints: they load
    (not 'truncated or damaged'); a TorchScript archive is named as what it is."""
    from safetensors.torch import save_file

    sd = {"w": torch.arange(4.0), "b": torch.ones(2)}
    save_file(sd, tmp_path / "st.pth")
    torch.save(sd, tmp_path / "pt.safetensors")
    for name in ("st.pth", "pt.safetensors"):
        back = load_state_dict_file(tmp_path / name)
        assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd), name
    torch.jit.save(torch.jit.script(nn.Linear(2, 2)), tmp_path / "script.pt")
    with pytest.raises(CheckpointError) as e:
        load_state_dict_file(tmp_path / "script.pt")
    assert "TorchScript archive" in str(e.value) and "state_dict()" in str(e.value) and "\n" not in str(e.value)


def test_imagenet_weights_load_into_a_downstream_backbone_with_drop_head():
    """The official downstream option (out_indices) has no final BN, pool or head: an ImageNet checkpoint's
    ``norm.*`` belongs to its classifier there, so --drop-head loads the backbone (as the official code's
    non-strict load does) and without it the error names the classifier."""
    from erf_lab.models.replknet import RepLKNet

    cfg = dict(large_kernel_sizes=[7, 7, 7, 5], layers=[1, 1, 1, 1], channels=[8, 16, 24, 32])
    torch.manual_seed(0)
    imagenet = RepLKNet(**cfg, num_classes=1000).state_dict()
    backbone = RepLKNet(**cfg, num_classes=None, out_indices=[0, 1, 2, 3])
    with pytest.raises(CheckpointError, match=r"the file has a classifier \(head.weight\).*drop_head=True"):
        load_weights(backbone, imagenet, source="imagenet.pth")
    load_weights(backbone, imagenet, drop_head=True, source="imagenet.pth")
    own = backbone.state_dict()
    assert all(torch.equal(own[k], imagenet[k]) for k in own if not k.endswith("num_batches_tracked"))


def test_the_backbone_of_an_official_segmentation_checkpoint_loads(tmp_path):
    """The official ADE20K / COCO releases are whole mmseg / mmdet checkpoints: ``meta``, ``optimizer`` and a
    ``state_dict`` of ``backbone.*`` beside ``decode_head.*`` / ``auxiliary_head.*``. The backbone loads (into the
    downstream model, and into the classifier with drop_head), with a warning naming what was left out; before,
    every key was 'missing' or 'unexpected'."""
    cfg = dict(channels=(8, 8, 8, 8), layers=(1, 1, 1, 1), kernels=(7, 5, 5, 3), small_kernel=3)
    torch.manual_seed(0)
    backbone = create_model("replknet_31b", num_classes=None, out_indices=(0, 1, 2, 3), **cfg).eval()
    sd = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    sd.update({"decode_head.conv_seg.weight": torch.randn(150, 8, 1, 1), "decode_head.conv_seg.bias": torch.randn(150),
               "auxiliary_head.conv_seg.weight": torch.randn(150, 8, 1, 1),
               "auxiliary_head.conv_seg.bias": torch.ones(1)})
    path = tmp_path / "upernet_replknet31b_ade20k.pth"
    torch.save({"meta": {"CLASSES": ("wall", "building"), "PALETTE": [[120, 120, 120]], "mmcv_version": "1.3.8"},
                "state_dict": sd, "optimizer": {"state": {}, "param_groups": []}}, path)
    x = torch.randn(1, 3, 64, 64)
    expected = (f"{path}: loaded the tensors under backbone.* as the model's; left out its 4 other tensor(s): "
                "decode_head.conv_seg.weight, decode_head.conv_seg.bias, auxiliary_head.conv_seg.weight, ...")
    with pytest.warns(UserWarning) as caught:
        got = create_model("replknet_31b", weights=str(path), num_classes=None, out_indices=(0, 1, 2, 3), **cfg)
        classifier = create_model("replknet_31b", weights=str(path), drop_head=True, **cfg).eval()
    assert [str(w.message) for w in caught] == [expected, expected]
    assert all(torch.equal(a, b) for a, b in zip(got.eval()(x), backbone(x), strict=True))
    assert torch.equal(classifier.forward_features(x), backbone(x)[-1])
    other = create_model("replknet_31b", num_classes=None, out_indices=(0, 1, 2, 3),
                         **{**cfg, "channels": (8, 8, 8, 16)})
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in other.state_dict().items()}}, path)
    with pytest.raises(CheckpointError, match="does not match RepLKNet"):  # a backbone of another size still fails
        create_model("replknet_31b", weights=str(path), num_classes=None, out_indices=(0, 1, 2, 3), **cfg)


def test_a_downstream_backbone_state_dict_loads_into_a_classifier_with_drop_head():
    """The other way round: a backbone's state dict (out_indices: no final BN ``norm``, no ``head``; e.g. an
    official segmentation backbone's ``backbone.*`` stripped) into the classifier model, whose ERF is measured on
    ``forward_features``: --drop-head loads it, ``norm`` and ``head`` keep their init and are listed; before, the
    missing ``norm`` counted as another architecture even with --drop-head. Without it the error names the
    classifier's matrix and --drop-head, not a class count (a backbone has none)."""
    from erf_lab.models.replknet import RepLKNet

    cfg = dict(large_kernel_sizes=[7, 7, 7, 5], layers=[1, 1, 1, 1], channels=[8, 16, 24, 32])
    torch.manual_seed(0)
    backbone = RepLKNet(**cfg, num_classes=None, out_indices=[0, 1, 2, 3]).eval()
    sd = backbone.state_dict()
    classifier = RepLKNet(**cfg, num_classes=1000).eval()
    with pytest.raises(CheckpointError, match=r"the model has a classifier \(head.weight\), the file none; pass "
                                              r"drop_head=True"):
        load_weights(classifier, sd, source="backbone.pth")
    kept = load_weights(classifier, sd, drop_head=True, source="backbone.pth")
    assert kept == sorted(k for k in classifier.state_dict() if k.startswith(("norm.", "head."))
                          and not k.endswith("num_batches_tracked"))  # (a counter the file lacks starts at 0)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(classifier.forward_features(x), backbone(x)[-1])
    # an ImageNet file into the backbone: no num_classes advice (a backbone takes no classifier), --drop-head
    with pytest.raises(CheckpointError) as e:
        load_weights(backbone, classifier.state_dict(), source="imagenet.pth")
    assert "num_classes" not in str(e.value) and "drop_head=True" in str(e.value)


def test_an_erf_lab_pth_carries_its_facts_inside_and_official_layouts_load_unchanged(tmp_path):
    """The random-init mark and the training size of a .pth erf-lab writes are in the file ({"model": sd,
    "erf_lab": {...}}), so a copy of the file alone keeps them (before: only a <file>.run.json beside it had them);
    the file loads weights-only as the official loaders read it; the facts speak only for the weights they were
    written with; official plain / {'model': sd} files and older files with a sidecar read as before."""
    import shutil

    from erf_lab.checkpoint import random_init_record, training_input_size
    from erf_lab.io import sha256_file
    from erf_lab.train.checkpoints import save_weights

    torch.manual_seed(0)
    model = _model().eval()
    sd = model.state_dict()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    (tmp_path / "run").mkdir()
    (tmp_path / "alone").mkdir()
    pth = save_weights(sd, tmp_path / "run" / "w", "pth", random_init_seed=7, train_input_size=40)[0]
    alone = Path(shutil.copy(pth, tmp_path / "alone" / "w.pth"))
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["w.pth"]  # no sidecar
    for path in (pth, alone):
        assert random_init_record(path) == {"seed": 7}
        assert training_input_size(path) == (40, "the erf-lab record in w.pth")
    obj = torch.load(alone, weights_only=True)  # plain data beside the weights
    assert list(obj) == ["model", "erf_lab"] and obj["erf_lab"]["random_init"] is True
    # the official loaders: --resume (checkpoint['model']), --finetune / ERF scripts ('model' if present)
    for loaded in (obj["model"], obj["model"] if "model" in obj else obj):
        m = _model().eval()
        m.load_state_dict(loaded)
        with torch.no_grad():
            assert torch.equal(m(x), ref)
    with torch.no_grad():
        assert torch.equal(create_model("replknet_31b", weights=str(alone), **TINY).eval()(x), ref)
    # other weights saved into the same dict later: the record no longer speaks for them
    other = {k: v + 1 if v.is_floating_point() else v for k, v in sd.items()}
    torch.save({**obj, "model": other}, tmp_path / "alone" / "edited.pth")
    assert random_init_record(tmp_path / "alone" / "edited.pth") is None
    assert training_input_size(tmp_path / "alone" / "edited.pth") == (None, None)
    torch.save(obj, tmp_path / "alone" / "renamed.safetensors")  # a torch.save file by its bytes, whatever its name
    assert random_init_record(tmp_path / "alone" / "renamed.safetensors") == {"seed": 7}
    # official layouts: no record, exact outputs
    for name, saved in (("plain.pth", sd), ("wrapped.pth", {"model": sd})):
        torch.save(saved, tmp_path / name)
        assert random_init_record(tmp_path / name) is None and training_input_size(tmp_path / name) == (None, None)
        with torch.no_grad():
            assert torch.equal(create_model("replknet_31b", weights=str(tmp_path / name), **TINY).eval()(x), ref)
    # a .pth written before the record: its sidecar still counts, for that file only
    plain = tmp_path / "plain.pth"
    sidecar = tmp_path / "plain.pth.run.json"
    sidecar.write_text(json.dumps({"random_init": True, "init_seed": 3, "input_size": 48,
                                   "sha256": sha256_file(plain)}))
    assert random_init_record(plain) == {"seed": 3} and training_input_size(plain) == (48, "plain.pth.run.json")
    torch.save(other, plain)
    assert random_init_record(plain) is None and training_input_size(plain) == (None, None)


def test_a_folder_runs_class_names_travel_in_its_weights_files_and_through_reparam(tmp_path):
    """The classes a folder run's head stands for (its sorted class folders) were in its run.json alone: a weights
    file copied out, or re-parameterized, could not say what its outputs mean. Now both formats carry them, reparam
    keeps them (not with --drop-head, whose head is left out), and official files have none."""
    from erf_lab.checkpoint import training_classes
    from erf_lab.models.deploy import export_deploy
    from erf_lab.train.checkpoints import save_weights

    names = ["dog house", "\u00e9t\u00e9", *(f"c{i}" for i in range(8))]  # TINY's 10 classes
    files = save_weights(_model().state_dict(), tmp_path / "w", classes=names)
    assert [training_classes(f) for f in files] == [(names, "the erf-lab record in w.pth"),
                                                    (names, "the safetensors metadata of w.safetensors")]
    for f in files:
        out = tmp_path / f"deploy{f.suffix}"
        export_deploy("replknet_31b", out, weights=str(f), input_size=32, flops_input_size=32, show_progress=False,
                      **TINY)
        assert training_classes(out)[0] == names
    headless = tmp_path / "headless.safetensors"
    export_deploy("replknet_31b", headless, weights=str(files[1]), drop_head=True, input_size=32,
                  flops_input_size=32, show_progress=False, **{**TINY, "num_classes": 4})
    assert training_classes(headless) == (None, None)
    torch.save(_model().state_dict(), tmp_path / "plain.pth")
    assert training_classes(tmp_path / "plain.pth") == (None, None)


def test_the_pth_record_speaks_only_for_the_weights_that_load(tmp_path):
    """The record is checked against 'model', but erf-lab's loader (and timm's) takes a 'state_dict' entry first:
    trained weights saved under 'state_dict' into an erf-lab epoch-0 file loaded as the model, yet the file was still
    reported as a random initialisation (and with the record's training size)."""
    from erf_lab.checkpoint import (PTH_RECORD_KEY, pth_record, random_init_record, training_input_size,
                                    weights_facts)

    torch.manual_seed(0)
    init, trained = {"w": torch.randn(4, 4)}, {"w": torch.randn(4, 4)}
    obj = {"model": init, PTH_RECORD_KEY: pth_record(init, weights_facts(random_init_seed=0, input_size=40))}
    torch.save(obj, tmp_path / "epoch_000.pth")
    assert random_init_record(tmp_path / "epoch_000.pth") == {"seed": 0}
    torch.save({**obj, "state_dict": trained}, tmp_path / "edited.pth")
    assert torch.equal(load_state_dict_file(tmp_path / "edited.pth")["w"], trained["w"])  # what is measured
    assert random_init_record(tmp_path / "edited.pth") is None
    assert training_input_size(tmp_path / "edited.pth") == (None, None)


def test_the_pth_record_cache_sees_a_file_rewritten_in_place_with_its_size_and_mtime(tmp_path):
    """The record is cached per file version; a version was (path, size, mtime, inode), so a file rewritten in
    place (same inode) with bytes of the same size and its mtime kept (``cp -p``, ``touch -r``, rsync --inplace)
    kept the record of the bytes it held before: trained weights reported as a random initialisation."""
    import shutil

    from erf_lab.checkpoint import PTH_RECORD_KEY, pth_record, random_init_record, weights_facts

    torch.manual_seed(0)
    init, trained = {"w": torch.randn(16, 16)}, {"w": torch.randn(16, 16)}
    record = pth_record(init, weights_facts(random_init_seed=0))
    a, b = tmp_path / "a" / "w.pth", tmp_path / "b" / "w.pth"  # the same name: the same archive layout and size
    a.parent.mkdir()
    b.parent.mkdir()
    torch.save({"model": init, PTH_RECORD_KEY: record}, a)
    torch.save({"model": trained, PTH_RECORD_KEY: record}, b)  # the record of other weights: it does not count
    st = a.stat()
    os.utime(b, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert b.stat().st_size == st.st_size and random_init_record(b) is None
    assert random_init_record(a) == {"seed": 0}
    shutil.copyfile(b, a)  # in place: the same inode
    shutil.copystat(b, a)  # and b's mtime, which is a's old one
    assert a.stat().st_ino == st.st_ino and a.stat().st_mtime_ns == st.st_mtime_ns and a.stat().st_size == st.st_size
    assert random_init_record(a) is None


def test_legacy_format_checkpoint_cut_short_is_called_truncated(tmp_path):
    """A pre-1.6 ``torch.save`` file (torchvision's older ResNet weights are one) loads, and cut short it is named
    a truncated PyTorch checkpoint, not 'not a PyTorch checkpoint or safetensors file'."""
    sd = _model().state_dict()
    full = tmp_path / "legacy.pth"
    torch.save({"model": sd}, full, _use_new_zipfile_serialization=False)
    assert load_state_dict_file(full).keys() == sd.keys()
    data = full.read_bytes()
    for keep in (0.02, 0.5, 0.99):
        cut = tmp_path / "cut.pth"
        cut.write_bytes(data[:int(len(data) * keep)])
        with pytest.raises(CheckpointError, match=r"cannot read checkpoint .*: a PyTorch legacy-format checkpoint "
                                                  r"that is truncated or damaged") as e:
            load_state_dict_file(cut)
        assert "\n" not in str(e.value), keep


@pytest.mark.parametrize("dtype", [torch.int8, torch.bool, torch.complex64])
def test_float_tensors_stored_as_integers_bools_or_complex_are_refused(tmp_path, dtype):
    """An int8 / bool / complex file loaded into float parameters was cast silently (weights rounded to integers,
    0/1, or stripped of their imaginary part) and measured as if it were the checkpoint."""
    from safetensors.torch import save_file

    model = _model()
    sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    save_file(sd, tmp_path / "q.safetensors")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=rf"stored as {str(dtype).removeprefix('torch.')} in the file"):
        load_weights(model, load_state_dict_file(tmp_path / "q.safetensors"), source="q.safetensors")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing loaded


def test_half_precision_weights_still_load_as_float32():
    model = _model()
    sd = {k: v.half() if v.is_floating_point() else v for k, v in _model().state_dict().items()}
    load_weights(model, sd)
    k = "stem.0.conv.weight"
    assert model.state_dict()[k].dtype == torch.float32
    assert torch.equal(model.state_dict()[k], sd[k].float())

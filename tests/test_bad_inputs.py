"""Every bad input a careful new user tries (issue #13): exit status 2, exactly one ``error:`` line, no traceback,
and no output directory that looks complete. One table for all commands; new commands join it."""
import io
import json
import pickle
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from erf_lab.cli.main import main

TINY = ["--model", "replknet_31b", "--override", "channels=(8,8,8,8)", "--override", "layers=(1,1,1,1)"]
SMALL = ["compute", *TINY, "--num-images", "1", "--input-size", "32"]
COMPLETE_MARKERS = ("run.json", "erf.npy", "summary.json", "sweep.json", "compare.json", "analysis.json",
                    "model.pth", "model.safetensors", "metrics.csv")


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("touch /tmp/erf-lab-pwned",))


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    """Files and folders that a user gets wrong, made once."""
    from erf_lab.erf.rundir import write_run_dir
    from erf_lab.models import create_model

    d = tmp_path_factory.mktemp("bad")
    (d / "empty").mkdir()
    (d / "text_only").mkdir()
    (d / "text_only" / "notes.txt").write_text("no images here")
    (d / "broken_images").mkdir()
    Image.new("RGB", (64, 64), (10, 200, 30)).save(d / "good.png")
    (d / "broken_images" / "truncated.png").write_bytes((d / "good.png").read_bytes()[:60])
    (d / "broken_images" / "fake.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    bomb = io.BytesIO()
    Image.new("1", (30000, 30000)).save(bomb, format="PNG")  # 900 Mpx: PIL's decompression-bomb guard
    (d / "broken_images" / "bomb.png").write_bytes(bomb.getvalue())
    (d / "file.txt").write_text("a file, not a folder")
    (d / "dangling").symlink_to(d / "no-such-target")
    (d / "empty.pth").write_bytes(b"")
    (d / "notes.pth").write_text("these are my notes, not a checkpoint\n")
    torch.save(create_model("replknet_31b", channels=(8, 8, 8, 8), layers=(1, 1, 1, 1)).state_dict(), d / "tiny.pth")
    (d / "truncated.pth").write_bytes((d / "tiny.pth").read_bytes()[:4000])
    torch.save(create_model("resnet50").state_dict(), d / "resnet.pth")  # the wrong model
    torch.save(create_model("replknet_31b", channels=(8, 8, 8, 16), layers=(1, 1, 1, 1)).state_dict(),
               d / "wrong_shape.pth")
    torch.save({"model": _Evil()}, d / "evil.pth")  # a checkpoint that would run a command when unpickled
    with open(d / "evil_plain.pth", "wb") as f:
        pickle.dump({"model": _Evil()}, f)
    write_run_dir(d / "good_run", np.ones((9, 9)), {"model": "m"})
    (d / "no_npy").mkdir()
    (d / "no_npy" / "run.json").write_text("{}")
    (d / "interrupted").mkdir()
    (d / "interrupted" / ".erf_state.npz").write_bytes(b"progress")
    (d / "garbage_npy").mkdir()
    (d / "garbage_npy" / "erf.npy").write_bytes(b"not a numpy file")
    write_run_dir(d / "bad_type", np.ones((9, 9)), {"model": "m"})
    (d / "bad_type" / "run.json").write_text('{"schema_version": 1, "kind": "erf", "theoretical_rf": "abc"}')
    write_run_dir(d / "bad_json", np.ones((9, 9)), {"model": "m"})
    (d / "bad_json" / "run.json").write_text('{"model": ')
    write_run_dir(d / "bad_centre", np.ones((9, 9)), {"model": "m"})
    info = json.loads((d / "bad_centre" / "run.json").read_text())
    (d / "bad_centre" / "run.json").write_text(json.dumps({**info, "erf_centre": ["a", "b"]}))
    np.save(d / "complex.npy", np.ones((8, 8), dtype=np.complex64))
    (d / "mvh.csv").write_text("subj,session,trial,rt,object_response,category,condition,imagename\n")
    np.save(d / "nan.npy", np.full((8, 8), np.nan))
    return d


def _cases():
    c = []
    add = lambda name, argv, pattern: c.append(pytest.param(argv, pattern, id=name))  # noqa: E731
    # compute: models, layers, sizes
    add("unknown-model", ["compute", "--model", "replknet_31bb", "--num-images", "1"], "unknown model")
    add("model-other-case", ["layers", "--model", "UniRepLKNet_A"], "unknown model 'UniRepLKNet_A'; did you mean "
        "unireplknet_a?")
    add("model-dash-and-case", ["layers", "--model", "RepLKNet-31B"], "did you mean replknet_31b?")
    add("user-factory-missing", ["compute", "--model", "no_such_pkg.mod:make"], "cannot import module")
    add("user-factory-a-path", ["layers", "--model", "../models/my_net.py:make"], "is not a module name")
    add("user-factory-no-module", ["compute", "--model", ":make"], "'' is not a module name")
    add("layer-other-case", [*SMALL, "--layer", "FORWARD_FEATURES"], "unknown layer 'FORWARD_FEATURES'; close names: "
        "forward_features")
    add("misspelled-layer", [*SMALL, "--layer", "stages.3.blockz"], "close names: stages.3.blocks")
    add("size-0", ["compute", *TINY, "--input-size", "0"], "--input-size must be a positive integer")
    add("size-negative", ["compute", *TINY, "--input-size", "-5"], "--input-size must be a positive integer")
    add("size-7", ["compute", *TINY, "--num-images", "1", "--input-size", "7"], "too small")
    add("size-abc", ["compute", *TINY, "--input-size", "abc"], "invalid int value")
    add("size-huge", ["compute", *TINY, "--input-size", "100000"], "above the maximum")
    add("batch-0", [*SMALL, "--batch-size", "0"], "--batch-size must be a positive integer")
    add("device-tpu", [*SMALL, "--device", "tpu"], "unknown device")
    add("device-cuda-x", [*SMALL, "--device", "cuda:x"], "unknown device")
    add("override-nonsense", [*SMALL, "--override", "channels=(8,8)"], "one kernel size")
    add("override-unknown-key", [*SMALL, "--override", "colour=7"], "does not accept")
    add("pretrained-unpublished", ["compute", "--model", "resnet18", "--override", "pretrained=True"],
        "model 'resnet18' has no published weights in erf-lab; pass a file (--weights) or use a model that ships "
        "them: efficientnet_lite0 (timm/<name> downloads its own)")
    add("override-arithmetic", ["layers", *TINY, "--override", "channels=(2**3,8,8,8)"],
        "--override 'channels=(2**3,8,8,8)': not a Python literal")
    add("override-unclosed", ["layers", *TINY, "--override", "channels=(8,8,8,8"], "not a Python literal")
    add("override-no-equals", [*SMALL, "--override", "channels"], "key=value")
    # compute: image folders
    add("images-missing", [*SMALL, "--images", "{bad}/nope"], "image folder not found")
    add("images-a-file", [*SMALL, "--images", "{bad}/file.txt"], "must be a folder")
    add("images-empty", [*SMALL, "--images", "{bad}/empty"], "no image files")
    add("images-non-image", [*SMALL, "--images", "{bad}/text_only"], "no image files")
    add("images-all-broken", [*SMALL, "--images", "{bad}/broken_images"], "no readable images")
    # compute: checkpoints
    add("weights-missing", [*SMALL, "--weights", "{bad}/nope.pth"], "weights file not found")
    add("weights-a-folder", [*SMALL, "--weights", "{bad}/empty"],
        "weights file {bad}/empty is a folder; --weights takes a checkpoint file (.pth/.pt/.safetensors)")
    add("reparam-weights-a-folder", ["reparam", *TINY, "--weights", "{bad}/empty", "--out", "{out}/x.pth"],
        "checkpoint {bad}/empty is a folder; --weights takes a checkpoint file")
    add("shape-bias-weights-a-folder", ["shape-bias", *TINY, "--weights", "{bad}/empty", "--out", "{out}"],
        "checkpoint {bad}/empty is a folder; --weights takes a checkpoint file")
    add("weights-empty", [*SMALL, "--weights", "{bad}/empty.pth"], "the file is empty (0 bytes")
    add("weights-text", [*SMALL, "--weights", "{bad}/notes.pth"], "cannot read checkpoint")
    add("weights-truncated", [*SMALL, "--weights", "{bad}/truncated.pth"], "cannot read checkpoint")
    add("weights-wrong-model", [*SMALL, "--weights", "{bad}/resnet.pth"], "missing")
    add("weights-wrong-shape", [*SMALL, "--weights", "{bad}/wrong_shape.pth"], "shape")
    add("weights-other-size", ["compute", "--model", "replknet_3", *TINY[2:], "--weights", "{bad}/tiny.pth"],
        "does not match RepLKNet (a checkpoint of another architecture or size")
    add("weights-malicious", [*SMALL, "--weights", "{bad}/evil.pth"], "could run code")
    add("weights-malicious-plain-pickle", [*SMALL, "--weights", "{bad}/evil_plain.pth"], "cannot read checkpoint")
    # compute: --out
    add("out-is-file", [*SMALL, "--out", "{bad}/file.txt"], "is a file")
    add("out-under-file", [*SMALL, "--out", "{bad}/file.txt/run"], "lies under a file")
    add("out-broken-symlink", [*SMALL, "--out", "{bad}/dangling"],
        "--out {bad}/dangling is a broken symbolic link (to {bad}/no-such-target); remove it or choose another --out")
    add("out-under-broken-symlink", [*SMALL, "--out", "{bad}/dangling/run"],
        "--out {bad}/dangling/run lies under a broken symbolic link ({bad}/dangling, to {bad}/no-such-target)")
    add("shape-bias-out-broken-symlink", ["shape-bias", *TINY, "--allow-random", "--out", "{bad}/dangling"],
        "--out {bad}/dangling is a broken symbolic link")
    add("resume-without-out", [*SMALL, "--resume"], "--resume needs --out")
    add("resume-and-force", [*SMALL, "--resume", "--force", "--out", "{out}"],
        "--resume and --force exclude each other")
    add("checkpoint-seconds-negative", [*SMALL, "--checkpoint-seconds", "-1"],
        "--checkpoint-seconds must be 0 or more, got -1")
    # layers
    add("layers-unknown-model", ["layers", "--model", "nope_model"], "unknown model")
    add("layers-size-0", ["layers", *TINY, "--input-size", "0"], "")
    add("layers-num-classes-negative", ["layers", *TINY, "--override", "num_classes=-1"],
        "num_classes must be a whole number >= 0 (0 or None: no classifier head), got -1")
    add("replknet-channels-fraction", ["layers", *TINY, "--override", "channels=(8.5,8,8,8)"],
        "layers and channels must be whole numbers, got layers=(1, 1, 1, 1), channels=(8.5, 8, 8, 8)")
    add("unireplknet-dims-fraction", ["layers", "--model", "unireplknet_a", "--override", "dims=(8.5,16,32,64)"],
        "UniRepLKNet depths and dims must be whole numbers")
    add("slak-depths-fraction", ["layers", "--model", "slak_s", "--override", "depths=(1.5,1,1,1)"],
        "SLaK depths and dims must be whole numbers")
    add("compute-num-classes-fraction", [*SMALL, "--override", "num_classes=2.5"],
        "num_classes must be a whole number >= 0 (0 or None: no classifier head), got 2.5")
    add("compute-layer-folded-by-reparam", [*SMALL, "--layer", "stages.0.blocks.0.large_kernel.small_conv"],
        "exists only in the train-time form: structural re-parameterization removes it (it is folded into "
        "'stages.0.blocks.0.large_kernel')")
    add("layers-filter-nothing", ["layers", "--model", "resnet18", "--filter", "layer5"],
        "--filter 'layer5' matches no layer of resnet18; close names: layer4, layer3, layer2")
    # analyze / compare: corrupt run directories
    add("analyze-missing", ["analyze", "{bad}/nope"], "no such run directory")
    add("analyze-no-npy", ["analyze", "{bad}/no_npy"], "no erf.npy")
    add("analyze-interrupted", ["analyze", "{bad}/interrupted"], "an interrupted run: continue it with 'erf-lab "
        "compute --resume --out {bad}/interrupted' and its options")
    add("analyze-garbage-npy", ["analyze", "{bad}/garbage_npy"], "corrupt")
    add("analyze-run-json-type", ["analyze", "{bad}/bad_type"], "field 'theoretical_rf' must be integer or null")
    add("analyze-run-json-corrupt", ["analyze", "{bad}/bad_json"], "corrupt JSON")
    add("analyze-nan-map", ["analyze", "{bad}/nan.npy"], "non-finite")
    add("analyze-complex-map", ["analyze", "{bad}/complex.npy"], "ERF map must be numeric")
    add("analyze-run-json-centre", ["analyze", "{bad}/bad_centre"], "field 'erf_centre' must be two non-negative")
    add("reparam-check-size-huge", ["reparam", *TINY, "--out", "{out}/x.pth", "--check-size", "100000"],
        "--check-size (the equivalence check's image side) must be in [32, 4096], got 100000")
    add("reparam-check-size-zero", ["reparam", *TINY, "--out", "{out}/x.pth", "--check-size", "0"],
        "--check-size (the equivalence check's image side) must be in [32, 4096], got 0")
    add("reparam-check-batch-zero", ["reparam", *TINY, "--out", "{out}/x.pth", "--check-batch", "0"],
        "--check-batch (the equivalence check's batch) must be >= 1, got 0")
    add("layers-size-huge", ["layers", *TINY, "--input-size", "100000"], "--input-size must be in [1, 4096]")
    add("seed-out-of-range", [*SMALL, "--seed", "99999999999999999999"], "seed 99999999999999999999 out of range")
    add("override-bad-value", ["compute", "--model", "resnet18", "--override", "num_classes=abc"],
        "num_classes must be a whole number >= 0 (0 or None: no classifier head), got 'abc'")
    add("override-unknown-option", ["compute", "--model", "resnet18", "--override", "kernel_sizes=3"],
        "model 'resnet18' does not accept these options")
    add("checkpoint-seconds-nan", [*SMALL, "--checkpoint-seconds", "nan"], "--checkpoint-seconds must be 0 or more")
    add("from-csv-with-limit", ["shape-bias", "--from-csv", "{bad}/mvh.csv", "--limit", "3"],
        "--from-csv analyses CSV files without a model; drop --limit")
    # --stimuli: --compare draws finished runs (their stimuli are in them); --from-csv looks for humans there
    add("compare-with-stimuli", ["shape-bias", "--compare", "{bad}/good_run", "--stimuli", "{bad}/empty"],
        "--compare draws finished runs only; drop --stimuli")
    add("from-csv-stimuli-missing", ["shape-bias", "--from-csv", "{bad}/mvh.csv", "--stimuli", "{bad}/nope"],
        "stimulus folder not found: {bad}/nope")
    add("from-csv-stimuli-cue-world", ["shape-bias", "--from-csv", "{bad}/mvh.csv", "--stimuli", "cue-world"],
        "--stimuli cue-world is for a model run")
    add("data-base-url-not-a-url", ["data", "download", "--dest", "{out}/dl", "--base-url", "not a url"],
        "--base-url must be an http(s):// or file: URL")
    add("analyze-out-is-file", ["analyze", "{bad}/good_run", "--out", "{bad}/file.txt"], "is a file")
    add("compare-missing", ["compare", "{bad}/nope", "--out", "{out}"], "no such run directory")
    add("compare-labels", ["compare", "{bad}/nan.npy", "--labels", "a", "b"], "")
    add("compare-out-under-file", ["compare", "{bad}/good_run", "--out", "{bad}/file.txt/c"], "lies under a file")
    # sweep
    add("sweep-even-kernel", ["sweep", "--kernels", "3,8", "--out", "{out}"], "odd")
    add("sweep-bad-sizes", ["sweep", "--input-sizes", "0,224", "--out", "{out}"], "between 1")
    add("sweep-sizes-text", ["sweep", "--input-sizes", "abc", "--out", "{out}"], "comma-separated")
    add("sweep-size-and-sizes", ["sweep", "--input-sizes", "64,96", "--input-size", "128", "--out", "{out}"],
        "--input-size and --input-sizes exclude each other")
    add("sweep-size-above-max", ["sweep", "--input-sizes", "224,5000", "--out", "{out}"], "between 1 and 4096")
    add("sweep-size-below-stride", ["sweep", "--input-sizes", "8,16", "--reparam", "deploy", "--num-images", "1",
                                    *TINY[2:], "--out", "{out}"], "too small")
    add("sweep-no-weights-dir", ["sweep", "--kernels", "3", "--init", "weights", "--out", "{out}"], "--weights-dir")
    add("sweep-neither-axis", ["sweep", "--model", "resnet18", "--out", "{out}"], "give --kernels")
    add("sweep-model-with-kernels", ["sweep", "--kernels", "3", "--model", "resnet18", "--out", "{out}"],
        "--model is for an --input-sizes sweep without --kernels")
    add("sweep-weights-with-kernels", ["sweep", "--kernels", "3", "--weights", "{bad}/tiny.pth", "--out", "{out}"],
        "--weights is for an --input-sizes sweep without --kernels")
    add("sweep-weights-dir-init-random", ["sweep", "--kernels", "3", "--weights-dir", "{bad}", "--init", "random",
                                          "--out", "{out}"], "--weights-dir conflicts with --init random")
    add("sweep-weights-dir-without-kernels", ["sweep", "--input-sizes", "32", "--weights-dir", "{bad}",
                                              "--out", "{out}"], "are for --kernels")
    # reparam
    add("reparam-unknown-model", ["reparam", "--model", "replknet_99", "--out", "{out}/x.pth"], "unknown model")
    add("reparam-text-weights", ["reparam", *TINY, "--weights", "{bad}/notes.pth", "--out", "{out}/x.pth"],
        "cannot read checkpoint")
    add("reparam-out-under-file", ["reparam", *TINY, "--out", "{bad}/file.txt/x.pth"],
        "--out's folder {bad}/file.txt is a file")
    # bench (fastconv's Table 1): explicit options win over --quick's and are checked
    add("bench-quick-even-kernel", ["bench", "--quick", "--kernels", "4", "--out", "{out}"], "kernel 4 unsupported")
    add("bench-batch-0", ["bench", "--quick", "--batch", "0", "--out", "{out}"], "--batch must be positive, got 0")
    add("bench-device-foo", ["bench", "--quick", "--device", "foo", "--out", "{out}"], "unknown device 'foo'")
    # data
    add("data-dest-under-file", ["data", "download", "--dest", "{bad}/file.txt/dl"], "--dest {bad}/file.txt/dl lies")
    # shape-bias
    add("compute-train-size-above-any-input", ["compute", *TINY, "--train-size", "1000000000000"],
        "--train-size (the weights' training resolution) 1000000000000 is above 4096 px")
    add("shape-bias-untrained", ["shape-bias", "--model", "resnet50", "--out", "{out}"], "--allow-random")
    add("shape-bias-pretrained-and-allow-random", ["shape-bias", "--model", "efficientnet_lite0", "--pretrained",
                                                   "--allow-random", "--out", "{out}"],
        "--allow-random measures an untrained model; it cannot go with --pretrained (drop one)")
    add("shape-bias-weights-and-seed", ["shape-bias", *TINY, "--weights", "{bad}/tiny.pth", "--seed", "3",
                                        "--out", "{out}"],
        "--seed seeds the random initialisation of --allow-random; --weights loads trained weights: drop --seed")
    add("shape-bias-trained-weights-and-allow-random", ["shape-bias", *TINY, "--weights", "{bad}/tiny.pth",
                                                        "--allow-random", "--out", "{out}"],
        "--allow-random is for untrained weights, and {bad}/tiny.pth holds trained ones (no random-init mark): "
        "drop --allow-random")
    add("shape-bias-cue-world-trained-weights-and-allow-random",
        ["shape-bias", *TINY, "--weights", "{bad}/tiny.pth", "--allow-random", "--stimuli", "cue-world", "--out",
         "{out}"], "--allow-random is for untrained weights, and {bad}/tiny.pth holds trained ones")
    add("shape-bias-seed-without-allow-random", ["shape-bias", *TINY, "--seed", "3", "--out", "{out}"],
        "add --allow-random, or give trained weights (--weights/--pretrained) without --seed")
    add("shape-bias-stimuli-missing", ["shape-bias", *TINY, "--allow-random", "--stimuli", "{bad}/nope",
                                       "--out", "{out}"], "")
    add("shape-bias-stimuli-empty", ["shape-bias", *TINY, "--allow-random", "--stimuli", "{bad}/empty",
                                     "--out", "{out}"], "")
    add("shape-bias-workers-beyond-4-per-cpu", ["shape-bias", *TINY, "--allow-random", "--workers", "100000",
                                                "--out", "{out}"], "--workers must be >= 0 and at most ")
    add("shape-bias-unknown-model", ["shape-bias", "--model", "nope", "--allow-random", "--out", "{out}"],
        "unknown model")
    # train (the training lab): its own data checks are in tests/test_train.py
    tr = ["train", *TINY, "--input-size", "32", "--num-classes", "4", "--train-size", "16", "--val-size", "8",
          "--epochs", "1", "--quiet"]
    add("train-unknown-model", ["train", "--model", "replknet_99", "--out", "{out}"], "unknown model")
    add("train-batch-0", [*tr, "--batch-size", "0", "--out", "{out}"], "--batch-size must be at least 1")
    add("train-checkpoint-seconds-nan", [*tr, "--checkpoint-seconds", "nan", "--out", "{out}"],
        "--checkpoint-seconds must be 0 or more, got nan")
    add("train-device-tpu", [*tr, "--batch-size", "4", "--device", "tpu", "--out", "{out}"], "--device")
    add("train-into-an-erf-run", [*tr, "--batch-size", "4", "--force", "--out", "{bad}/good_run"],
        "holds another erf-lab result")
    add("train-resume-nothing", [*tr, "--batch-size", "4", "--resume", "--out", "{out}"], "nothing to resume")
    add("train-data-missing", [*tr, "--batch-size", "4", "--data", "{bad}/nope", "--out", "{out}"], "")
    add("train-data-empty", [*tr, "--batch-size", "4", "--data", "{bad}/empty", "--out", "{out}"], "")
    add("train-size-beyond-the-largest-split", [*tr, "--train-size", "100000000000000000000", "--out", "{out}"],
        "error: --train-size: cue-world train size must be 1 to 10,000,000 images, got 100,000,000,000,000,000,000")
    add("train-val-size-beyond-the-largest-split", [*tr, "--val-size", "10000001", "--out", "{out}"],
        "error: --val-size: cue-world val size must be 1 to 10,000,000 images")
    add("train-num-workers-beyond-4-per-cpu", [*tr, "--num-workers", "100000", "--out", "{out}"],
        "--num-workers must be 0 to ")
    add("train-out-is-file", [*tr, "--batch-size", "4", "--out", "{bad}/file.txt"], "")
    add("train-out-under-file", [*tr, "--batch-size", "4", "--out", "{bad}/file.txt/tr"], "lies under a file")
    add("shape-bias-cue-world-untrained", ["shape-bias", *TINY, "--stimuli", "cue-world", "--out", "{out}"],
        "random weights means nothing")
    add("shape-bias-cue-world-limit-beyond-the-largest-split",
        ["shape-bias", *TINY, "--allow-random", "--stimuli", "cue-world", "--limit", "100000000000", "--out", "{out}"],
        "cue-world probe size must be 1 to 10,000,000 images per split, got 100,000,000,000")
    add("shape-bias-builtin-unknown", ["shape-bias", "--model", "replknet_31b", "--weights", "builtin:cue-world/K99",
                                       "--stimuli", "cue-world", "--out", "{out}"], "no shipped weights")
    # timeline / study
    add("timeline-missing", ["timeline", "{bad}/nope"], "no such training run folder")
    add("timeline-empty-folder", ["timeline", "{bad}/empty"], "not an erf-lab training run")
    add("timeline-erf-run", ["timeline", "{bad}/good_run"], "not an erf-lab training run")
    add("study-channels", ["study", "kernel-family", "--out", "{out}", "--channels", "8,8"], "4 positive integers")
    add("study-out-is-file", ["study", "kernel-family", "--out", "{bad}/file.txt"], "is a file")
    st = ["study", "kernel-family", "--out", "{out}"]
    add("study-erf-size-0", [*st, "--erf-input-size", "0"], "--erf-input-size must be in [1, 4096], got 0")
    add("study-erf-size-negative", [*st, "--erf-input-size", "-32"], "--erf-input-size must be in [1, 4096]")
    add("study-erf-size-below-stride", [*st, "--erf-input-size", "8"], "--erf-input-size 8 is too small")
    add("study-input-size-0", [*st, "--input-size", "0"], "--input-size must be in [8, 4096], got 0")
    add("study-threads-negative", [*st, "--threads", "-1"], "--threads must be at least 1, got -1")
    add("study-train-size-below-batch", [*st, "--train-size", "32"],
        "--train-size 32 is smaller than the study's batch of 64 images")
    add("study-train-size-beyond-the-largest-split", [*st, "--train-size", "10000001"],
        "--train-size must be at most 10,000,000")
    add("study-threads-beyond-4-per-cpu", [*st, "--threads", "100000"], "--threads must be at most ")
    add("study-out-under-file", ["study", "kernel-family", "--out", "{bad}/file.txt/s"], "lies under a file")
    # an empty --out / --dest / --ship: Path("") is the current folder (or `x or default` the default one)
    empty = "--out is empty; name a folder (the current one is '.')"
    add("shape-bias-out-empty", ["shape-bias", "--model", "resnet18", "--allow-random", "--limit", "16", "--workers",
                                 "0", "--out", ""], empty)
    add("shape-bias-cue-world-out-empty", ["shape-bias", *TINY, "--allow-random", "--stimuli", "cue-world", "--limit",
                                           "16", "--out", ""], empty)
    add("shape-bias-compare-out-empty", ["shape-bias", "--compare", "{bad}/good_run", "--out", ""], empty)
    add("shape-bias-from-csv-out-empty", ["shape-bias", "--from-csv", "{bad}/mvh.csv", "--out", ""], empty)
    add("data-download-dest-empty", ["data", "download", "--dest", "", "--base-url", "file:{bad}/nope"],
        "--dest is empty; name a folder (the current one is '.')")
    add("train-out-empty", [*tr, "--out", ""], empty)
    add("reparam-out-empty", ["reparam", *TINY, "--out", ""],
        "--out is empty; name the checkpoint file to write (.pth, .pt or .safetensors)")
    add("study-ship-empty", ["study", "kernel-family", "--out", "{out}", "--ship", "", "--erf-input-size", "0"],
        "--ship is empty; name a folder")
    add("study-out-empty", ["study", "kernel-family", "--out", ""], empty)
    add("sweep-out-empty", ["sweep", "--kernels", "3", *TINY[2:], "--input-size", "32", "--out", ""], empty)
    add("compare-out-empty", ["compare", "{bad}/good_run", "--out", ""], empty)
    # an empty input option (an unset shell variable): '--images ""' read the current folder recursively, '--layer ""'
    # measured the default layer, '--weights ""' was named "checkpoint . is a folder"
    add("compute-images-empty", [*SMALL, "--images", ""], "--images is empty; name a folder of images")
    add("sweep-images-empty", ["sweep", "--kernels", "3", *TINY[2:], "--input-size", "32", "--images", "", "--out",
                               "{out}"], "--images is empty; name a folder of images")
    add("compute-layer-empty", [*SMALL, "--layer", ""], "--layer is empty; name a layer")
    add("compute-weights-empty", [*SMALL, "--weights", ""], "--weights is empty; name a checkpoint file")
    add("reparam-weights-empty", ["reparam", *TINY, "--weights", "", "--out", "{out}/x.pth"],
        "--weights is empty; name a checkpoint file")
    add("shape-bias-weights-empty", ["shape-bias", *TINY, "--stimuli", "cue-world", "--weights", "", "--out",
                                     "{out}"], "--weights is empty; name a checkpoint file")
    add("train-data-empty-name", [*tr, "--data", "", "--out", "{out}"], "--data is empty; name a folder")
    add("analyze-out-empty", ["analyze", "{bad}/good_run", "--out", ""], empty)
    # a name longer than the file system allows (255 bytes a name): Path.exists() raises ENAMETOOLONG
    long = "x" * 300
    add("compute-out-name-too-long", [*SMALL, "--out", long], f"File name too long: {long}")
    add("compute-images-name-too-long", [*SMALL, "--images", long], f"File name too long: {long}")
    add("compute-weights-name-too-long", [*SMALL, "--weights", long + ".pth"], "File name too long")
    add("analyze-name-too-long", ["analyze", long], f"File name too long: {long}")
    add("shape-bias-stimuli-name-too-long", ["shape-bias", *TINY, "--allow-random", "--stimuli", long, "--out",
                                             "{out}"], f"File name too long: {long}")
    add("shape-bias-from-csv-name-too-long", ["shape-bias", "--from-csv", long + ".csv"], "File name too long")
    add("data-download-dest-name-too-long", ["data", "download", "--dest", long], f"File name too long: {long}")
    return c


@pytest.mark.parametrize("argv,pattern", _cases())
def test_bad_input_is_one_error_line_exit_2_and_nothing_complete(argv, pattern, bad, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative or empty --out lands here, not in the checkout
    out = tmp_path / "out"
    argv = [a.format(bad=bad, out=out) for a in argv]
    if "compute" == argv[0] and "--out" not in argv and "--resume" not in argv:
        argv += ["--out", str(out)]
    try:
        code = main(argv + (["--quiet"] if argv[0] == "compute" else []))
    except SystemExit as e:  # argparse's own usage errors
        code = e.code
    stdout, err = capsys.readouterr()
    assert code == 2, (stdout, err)
    assert "Traceback" not in err + stdout
    error_lines = [line for line in err.splitlines() if "error:" in line]
    assert len(error_lines) == 1, err
    assert pattern.format(bad=bad) in error_lines[0], error_lines[0]
    found = [p.name for p in tmp_path.rglob("*") if p.name in COMPLETE_MARKERS]  # --out, or the current folder
    assert not found, found
    import pathlib

    assert not pathlib.Path("/tmp/erf-lab-pwned").exists()  # the malicious checkpoint never ran


@pytest.mark.parametrize("argv", [
    ["reparam", *TINY, "--out", "{out}/x.pth"],
    ["train", *TINY, "--input-size", "32", "--num-classes", "4", "--train-size", "16", "--epochs", "1", "--quiet",
     "--out", "{out}/tr"],
    ["data", "download", "--dest", "{out}/dl"],
], ids=["reparam", "train", "data-download"])
def test_read_only_output_is_one_error_line_before_the_work(argv, tmp_path, capsys, monkeypatch):
    import errno

    import erf_lab.io as io

    def refuse(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(io.tempfile, "mkstemp", refuse)
    code = main([a.format(out=tmp_path) for a in argv])
    stdout, err = capsys.readouterr()
    assert code == 2 and stdout == "" and "Traceback" not in err
    assert err.count("error:") == 1 and "is not writable: Read-only file system" in err, err


@pytest.mark.parametrize("value", ["abc", " ", "2.5"])
@pytest.mark.parametrize("argv", [["models"], ["analyze", "nope"], ["compute", "--model", "nope"]],
                         ids=["models", "analyze", "compute"])
def test_a_world_size_that_is_no_integer_is_one_error_line(argv, value, capsys, monkeypatch):
    """WORLD_SIZE (torchrun's) that is not an integer: one error line naming it, not a ValueError traceback; blank
    is unset, as before."""
    monkeypatch.setenv("WORLD_SIZE", value)
    code = main(argv)
    err = capsys.readouterr().err
    if not value.strip():
        assert code in (0, 2) and "WORLD_SIZE" not in err
        return
    assert code == 2 and err.strip().splitlines() == [
        f"erf-lab {argv[0]}: error: WORLD_SIZE={value!r} is not an integer: torchrun sets it to the number of "
        "processes; unset it to run in one process"], err


_HAND_SET = {
    "RANK=1": ({"RANK": "1"}, "RANK=1 is set but WORLD_SIZE is not: torchrun sets both (RANK from 0 to WORLD_SIZE "
                              "- 1); unset RANK to run in one process, or start the job with torchrun"),
    "RANK=2,WORLD_SIZE=2": ({"RANK": "2", "WORLD_SIZE": "2"},
                            "RANK=2 is outside 0 to 1 (WORLD_SIZE=2): torchrun numbers the processes from 0 to "
                            "WORLD_SIZE - 1; start the job with torchrun, or set RANK and WORLD_SIZE to match"),
    "RANK=x": ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x' is not an integer: torchrun sets it to the process's "
                                                 "number, 0 to WORLD_SIZE - 1; unset it to run in one process"),
    "WORLD_SIZE=0": ({"WORLD_SIZE": "0"}, "WORLD_SIZE=0 is below 1: torchrun sets it to the number of processes; "
                                          "unset it to run in one process"),
}


@pytest.mark.parametrize("case", list(_HAND_SET))
@pytest.mark.parametrize("command", ["compute", "sweep"])
def test_torchrun_variables_set_by_hand_that_torchrun_never_sets_are_one_error_line(case, command, capsys,
                                                                                    monkeypatch, tmp_path):
    """RANK / WORLD_SIZE set by hand, without torchrun: RANK=1 alone measured and then died of a TypeError (rank 1
    of 1 process: nothing written); RANK beyond WORLD_SIZE, or one that is no integer, a traceback. Now one error
    line, exit status 2, before anything is measured, and no folder left (the sweep's --out was left empty)."""
    env, line = _HAND_SET[case]
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    out = tmp_path / "out"
    argv = ([*SMALL, "--quiet"] if command == "compute" else
            ["sweep", "--input-sizes", "32", *TINY, "--reparam", "deploy", "--num-images", "1", "--quiet"])
    code = main([*argv, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.strip().splitlines() == [f"erf-lab {command}: error: {line}"], err
    assert not out.exists()


@pytest.mark.parametrize("master", ["unset", "port in use"])
@pytest.mark.parametrize("command", ["compute", "train"])
def test_a_torchrun_job_that_cannot_be_joined_is_one_error_line(master, command, capsys, monkeypatch, tmp_path):
    """RANK / WORLD_SIZE set by hand without MASTER_ADDR / MASTER_PORT, or MASTER_PORT held by another program (a
    job still running): torch's ValueError / DistNetworkError traceback. Now one line naming the variables, exit
    status 2, nothing written."""
    import socket

    for key in ("LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    out = tmp_path / "out"
    argv = ([*SMALL, "--quiet"] if command == "compute" else
            ["train", *TINY, "--input-size", "32", "--epochs", "1"])
    who = f"erf-lab {command}: error: rank 0 of 2 cannot join its torchrun job: "
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        if master == "port in use":
            port = held.getsockname()[1]
            monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
            monkeypatch.setenv("MASTER_PORT", str(port))
            line = (f"{who}port {port} of 127.0.0.1 (MASTER_PORT) is in use, by another job or program; choose a "
                    "free one (torchrun --master_port)")
        else:
            line = (f"{who}MASTER_ADDR and MASTER_PORT are not set (torchrun sets MASTER_ADDR and MASTER_PORT); "
                    "start the job with torchrun, or set both in every process")
        code = main([*argv, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.strip().splitlines() == [line], err
    assert not out.exists()


@pytest.mark.parametrize("command, value", [("compute", "abc"), ("compute", "0"), ("compute", "-5"),
                                            ("compute", "nan"), ("compute", "inf"), ("sweep", "0"),
                                            ("train", " 1e-9x")])
def test_a_bad_rank_timeout_is_one_error_line_before_the_job_is_joined(command, value, capsys, monkeypatch, tmp_path):
    """ERF_LAB_RANK_TIMEOUT, the process group's timeout, that is not a positive number of seconds: one line, exit
    status 2, nothing written, before the process joins its job (MASTER_ADDR / MASTER_PORT are unset: joining would
    be refused with that line instead)."""
    for key in ("LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("ERF_LAB_RANK_TIMEOUT", value)
    out = tmp_path / "out"
    argv = {"compute": [*SMALL, "--quiet"], "sweep": ["sweep", *TINY, "--input-sizes", "32", "--num-images", "1",
                                                      "--reparam", "deploy", "--quiet"],
            "train": ["train", *TINY, "--input-size", "32", "--epochs", "1"]}[command]
    code = main([*argv, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.strip().splitlines() == [
        f"erf-lab {command}: error: ERF_LAB_RANK_TIMEOUT={value.strip()!r} is not a positive number of seconds: it "
        f"is how long a rank of a multi-process job waits for the others (e.g. 600); unset it for torch's default "
        f"(30 minutes, NCCL's 10)"], err
    assert not out.exists()


def test_a_torchrun_job_whose_ranks_do_not_all_arrive_names_the_timeout_setting(tmp_path):
    """Rank 1 never arrives (it hangs before joining): rank 0 waited torch's 30 minutes, then printed the store's
    'wait timeout' line. Now ERF_LAB_RANK_TIMEOUT sets the wait: one line naming it after 2 s, exit status 2 (a
    process of its own: the old code's wait would hold this one)."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    env.update(RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), ERF_LAB_RANK_TIMEOUT="2",
               OMP_NUM_THREADS="1")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "erf_lab", *SMALL, "--quiet", "--out", str(out)], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"erf-lab compute: error: rank 0 of 2 cannot join its torchrun job at 127.0.0.1:{port} "
        f"(MASTER_ADDR:MASTER_PORT): no answer from the other ranks within 2 s (ERF_LAB_RANK_TIMEOUT)"], proc.stderr
    assert not out.exists()


def test_data_info_names_a_bad_erf_lab_data(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("ERF_LAB_DATA", str(tmp_path / "nonexistent"))
    assert main(["data", "info"]) == 2
    assert capsys.readouterr().err.strip() == (f"erf-lab data: error: ERF_LAB_DATA={tmp_path / 'nonexistent'} is "
                                               "not a folder; point it at the folder holding cue-conflict/ or unset it")


def test_an_unwritable_out_leaves_no_folder_behind(tmp_path, monkeypatch):
    import errno
    import tempfile

    from erf_lab.errors import ErfLabError
    from erf_lab.io import prepare_out_dir

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    with pytest.raises(ErfLabError, match="--out .* is not writable: Read-only file system"):
        prepare_out_dir(tmp_path / "a" / "b")
    assert not (tmp_path / "a").exists() and tmp_path.is_dir()


def test_a_full_disk_while_a_pdf_is_written_is_the_os_error_naming_the_figure(tmp_path):
    """matplotlib's PDF writer, failing to write (a full disk) while it ends a stream, raises an AttributeError
    ('Stream' object has no attribute 'pos') from its clean-up that hides the OSError: the CLI printed a
    traceback. save_figure raises the OSError itself, naming the figure, and leaves no file behind."""
    import errno

    import matplotlib
    import matplotlib.pyplot as plt

    from erf_lab.io import save_figure

    matplotlib.use("Agg")

    class FullDisk(io.RawIOBase):  # the disk fills up after 2000 bytes (inside a stream's end, as seen on tmpfs)
        def __init__(self):
            self.n = 0

        def writable(self):
            return True

        def write(self, b):
            if self.n + len(b) > 2000:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.n += len(b)
            return len(b)

        def tell(self):
            return self.n

    fig = plt.figure()
    plt.plot([1, 2])
    savefig = fig.savefig
    fig.savefig = lambda path, **kw: savefig(FullDisk(), **kw)
    with pytest.raises(OSError) as e:
        save_figure(fig, tmp_path / "fig", formats=("pdf",))
    plt.close(fig)
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path / "fig.pdf")
    assert list(tmp_path.iterdir()) == []


def test_atomic_writes_reach_the_disk_before_the_rename(tmp_path, monkeypatch):
    """atomic_path: the new content is fsynced before it replaces the old file, and the folder after the rename; a
    disk error (EIO) leaves the old file as it was and no temporary behind; a file system without fsync (EINVAL)
    still gets the file."""
    import errno
    import os

    from erf_lab import io as erf_io

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(erf_io.os, "fsync", fsync)
    monkeypatch.setattr(erf_io.os, "replace", replace)
    target = tmp_path / "r.json"
    erf_io.write_json(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}
    (kind0, tmp0), (kind1, dst), (kind2, folder) = events
    assert (kind0, kind1, kind2) == ("fsync", "replace", "fsync")
    assert os.path.dirname(tmp0) == str(tmp_path) and tmp0 != str(target) and dst == str(target)
    assert folder == str(tmp_path)

    def failing(code):
        def fsync(fd):
            raise OSError(code, os.strerror(code))
        return fsync

    monkeypatch.setattr(erf_io.os, "fsync", failing(errno.EIO))
    with pytest.raises(OSError, match="Input/output error"):
        erf_io.write_json(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 1} and sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]
    monkeypatch.setattr(erf_io.os, "fsync", failing(errno.EINVAL))
    erf_io.write_json(target, {"a": 3})
    assert json.loads(target.read_text()) == {"a": 3} and sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


@pytest.mark.parametrize("error,what", [
    (RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you "
                  "tried to allocate 602112000000 bytes. Error code 12 (Cannot allocate memory)"),
     "602.1 GB requested"),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB"), "on the GPU"),
    (MemoryError(), "Python could not allocate"),
], ids=["cpu-allocator", "cuda", "python"])
def test_out_of_memory_is_one_error_line_exit_2(error, what, tmp_path, capsys, monkeypatch):
    """`erf-lab reparam --check-batch 1000000` asked torch for 602 GB and ended in a traceback. A real allocation
    that large is not safe in a test (with overcommit it may succeed and wake the OOM killer), so the command
    raises what torch raised."""
    import erf_lab.cli.commands.reparam as reparam

    def run(args):
        raise error

    monkeypatch.setattr(reparam, "run", run)
    code = main(["reparam", "--model", "replknet_31b", "--check-batch", "1000000", "--out", str(tmp_path / "x.pth")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"erf-lab reparam: error: out of memory ({what}); choose smaller sizes"), err


def test_other_runtime_errors_still_raise(monkeypatch):
    """Only a failed allocation becomes an error line: any other RuntimeError is a bug and keeps its traceback."""
    import erf_lab.cli.commands.reparam as reparam

    def run(args):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(reparam, "run", run)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        main(["reparam", "--model", "replknet_31b", "--out", "x.pth"])


@pytest.mark.parametrize("stop", [KeyboardInterrupt, "error"])
def test_the_one_line_starts_its_own_line_after_a_bar_left_open(stop, monkeypatch, capsys):
    """An interrupt or an error that leaves a progress bar open (one being created when Ctrl-C came: never entered
    as a context, never closed) gets the bar closed with its newline first: the message is a line of its own, not
    text after the bar's (a shape-bias run stopped while its decode workers started, under load)."""
    import argparse

    from erf_lab.cli import main as cli
    from erf_lab.errors import ErfLabError
    from erf_lab.io import progress

    def command(args):
        bar = progress(total=10, desc="decoding", disable=False)
        bar.update(3)
        raise KeyboardInterrupt if stop is KeyboardInterrupt else ErfLabError("no usable image")

    parser = argparse.ArgumentParser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    monkeypatch.setattr(parser, "parse_args", lambda argv: argparse.Namespace(_run=command, command="x"))
    assert cli.main([]) == (130 if stop is KeyboardInterrupt else 2)
    err = capsys.readouterr().err
    last = "erf-lab x: interrupted" if stop is KeyboardInterrupt else "erf-lab x: error: no usable image"
    assert err.endswith("\n" + last + "\n") and "3/10" in err, repr(err)


def _damaged_inputs(tmp_path):
    """Files a user may point erf-lab at by mistake, each made here: (argv, words of the one error line)."""
    csv_path = tmp_path / "cue-conflict_m_session-1.csv"
    csv_path.write_bytes(b"\xff\xfesubj,imagename\n\x00\xd8")  # UTF-16 bytes, not UTF-8
    summary = tmp_path / "sb"
    summary.mkdir()
    (summary / "summary.json").write_text("[]")
    no_per_category = tmp_path / "sb2"
    no_per_category.mkdir()
    (no_per_category / "summary.json").write_text(json.dumps({"shape_bias": 0.5}))
    impossible = tmp_path / "sb3"
    impossible.mkdir()
    (impossible / "summary.json").write_text(json.dumps({"shape_bias": 1.7, "per_category": {}}))
    cases = [(["shape-bias", "--from-csv", csv_path], "not UTF-8 text, not a model-vs-human CSV"),
             (["shape-bias", "--compare", impossible], "shape_bias is 1.7: not a value an 'erf-lab shape-bias' run"),
             (["shape-bias", "--compare", summary], "not an 'erf-lab shape-bias' summary"),
             (["shape-bias", "--compare", no_per_category], "no per-category shape bias in its summary.json")]
    for name, settings, model_config, words in [
            ("size", {"model": "replknet_31b", "input_size": "big", "seed": 0, "data": "cue-world"},
             {"num_classes": 10}, "the training settings' input_size is 'big'"),
            ("model", {"model": 5, "input_size": 64, "seed": 0, "data": "cue-world"}, {"num_classes": 10},
             "the training settings' model is 5"),
            ("classes", {"model": "replknet_31b", "input_size": 64, "seed": 0, "data": "cue-world"},
             {"num_classes": "ten"}, "model_config.num_classes must be a positive integer, got 'ten'")]:
        run = tmp_path / f"train-{name}"
        (run / "checkpoints").mkdir(parents=True)
        (run / "checkpoints" / "epoch_000.safetensors").write_bytes(b"")
        (run / "run.json").write_text(json.dumps({"settings": settings, "model_config": model_config}))
        cases.append((["timeline", run, "--out", tmp_path / f"tl-{name}"], words))
    return cases


def test_damaged_csv_summary_and_training_records_are_one_line_each(tmp_path, capsys):
    for argv, words in _damaged_inputs(tmp_path):
        assert main([str(a) for a in argv]) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err and words in err, (argv, err)


def test_a_kernel_size_beyond_255_is_one_line_before_any_work(tmp_path, capsys):
    """A typo such as --kernels 9999 asked for 10^8 weights per channel: the sweep filled 24 GB and was killed,
    the benchmark ran on for minutes. Now one line each, and no folder."""
    from erf_lab.errors import ErfLabError
    from erf_lab.models import create_model

    for argv, words in [(["sweep", "--kernels", "9999", "--input-size", "64", "--num-images", "1", "--out",
                          tmp_path / "sweep"], "--kernels: sizes must be odd, from 1 to 255, got 9999"),
                        (["bench", "--kernels", "257", "--out", tmp_path / "bench"],
                         "kernel 257 unsupported: at most 255")]:
        assert main([str(a) for a in argv]) == 2
        err = capsys.readouterr().err
        assert words in err and err.count("error:") == 1 and "Traceback" not in err, err
    assert not (tmp_path / "sweep").exists() and not (tmp_path / "bench").exists()
    with pytest.raises(ErfLabError, match="large kernel sizes must be odd, from 1 to 255, got 9999"):
        create_model("replknet_31b", large_kernel_sizes=(9999, 29, 27, 13), channels=(8, 8, 8, 8))
    with pytest.raises(ErfLabError, match="SLaK kernel sizes must be odd, from 1 to 255"):
        create_model("slak_t", kernel_size=(301, 49, 47, 13, 5), depths=(1, 1, 1, 1), dims=(8, 8, 8, 8))


def test_an_empty_out_a_pipe_among_the_images_and_the_benchmark_files_mode(tmp_path, capsys, monkeypatch):
    """--out '' wrote into the current folder; a named pipe called *.png blocked `compute` for ever; the
    benchmark's files were owner-only (mkstemp) where every other output follows the umask."""
    import os
    import stat

    from erf_lab.erf.images import load_images

    monkeypatch.chdir(tmp_path)
    tiny = ["--model", "replknet_31b", "--override", "channels=(8,8,8,8)", "--override", "layers=(1,1,1,1)"]
    for argv in (["compute", *tiny, "--num-images", "1", "--input-size", "32", "--out", ""],
                 ["bench", "--quick", "--kernels", "3", "--out", ""]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "--out is empty; name a folder" in err and err.count("\n") == 1, err
    assert list(tmp_path.iterdir()) == []
    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (40, 40), (200, 10, 10)).save(folder / "a.png")
    os.mkfifo(folder / "fifo.png")
    with pytest.warns(UserWarning, match="ignored 1 non-image file"):
        src = load_images(folder, num_images=5, input_size=32, mean=(0.5,) * 3, std=(0.5,) * 3)
    assert [p.name for p in src.files] == ["a.png"]
    assert ["fifo.png", "not a regular file (a pipe, device or socket)"] in [list(s) for s in src.skipped]
    from fastconv.bench import _atomic_write

    old = os.umask(0o022)
    try:
        _atomic_write(tmp_path / "table.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "table.txt").stat().st_mode) == 0o644


def test_reparam_refuses_to_overwrite_its_own_weights_file(tmp_path, capsys):
    """`erf-lab reparam --weights W --out W` replaced the train-time checkpoint by its deploy form (the small kernels
    and their BNs are gone for good); the file is now refused as --out and left as it was."""
    from erf_lab.models import create_model

    w = tmp_path / "train.pth"
    torch.save(create_model("replknet_31b", channels=(8, 8, 8, 8), layers=(1, 1, 1, 1)).state_dict(), w)
    before = w.read_bytes()
    code = main(["reparam", *TINY, "--weights", str(w), "--check-size", "32", "--out", str(w)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "is the --weights file itself" in err, err
    assert w.read_bytes() == before and not (tmp_path / "train.pth.run.json").exists()


def test_reparam_refuses_to_overwrite_a_file_of_another_result_but_rewrites_its_own(tmp_path, capsys):
    """`erf-lab reparam --out RUN/model.pth` into a training run replaced its trained weights by a (random-init)
    deploy checkpoint, silently. A file of another erf-lab result is now refused and left as it was; reparam's own
    earlier output (it has the .run.json beside it) is still written again."""
    from erf_lab.io import write_json

    run = tmp_path / "train_run"
    run.mkdir()
    write_json(run / "run.json", {"settings": {"model": "replknet_31b"}, "model_config": {"num_classes": 10}})
    (run / "model.pth").write_bytes(b"trained weights")
    code = main(["reparam", *TINY, "--check-size", "32", "--out", str(run / "model.pth")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "is a file of a training run" in err, err
    assert (run / "model.pth").read_bytes() == b"trained weights" and not (run / "model.pth.run.json").exists()
    for _ in range(2):  # a new file beside the run's, then that file again
        assert main(["reparam", *TINY, "--check-size", "32", "--out", str(run / "deploy.pth")]) == 0
    assert (run / "deploy.pth.run.json").is_file()


def test_reparam_records_which_weights_file_it_merged(tmp_path, capsys):
    """The reparam sidecar named its input only by the path as typed (relative, no digest), so the record could not
    tell which weights a deploy file came from once the file moved or changed; it now has their SHA-256 too, as
    compute's run.json does."""
    from erf_lab.io import sha256_file
    from erf_lab.models import create_model

    w = tmp_path / "train.pth"
    torch.save(create_model("replknet_31b", channels=(8, 8, 8, 8), layers=(1, 1, 1, 1)).state_dict(), w)
    out = tmp_path / "deploy.pth"
    assert main(["reparam", *TINY, "--weights", str(w), "--check-size", "32", "--out", str(out)]) == 0
    record = json.loads((tmp_path / "deploy.pth.run.json").read_text())
    assert record["weights_sha256"] == sha256_file(w)
    assert main(["reparam", *TINY, "--check-size", "32", "--out", str(out)]) == 0
    assert json.loads((tmp_path / "deploy.pth.run.json").read_text())["weights_sha256"] is None


def test_reparam_into_a_file_another_process_writes_is_refused(tmp_path, capsys):
    """Two reparams into one --out at once wrote the checkpoint and its .run.json each atomically but unheld, so
    the file could be one run's and its record the other's. The file is held now (a lock beside it): a second
    reparam into it is refused in one line, exit 2, nothing written; another file of the same folder is not held."""
    from conftest import held_by_another_process

    from erf_lab.io import file_lock_path, sha256_file

    out = tmp_path / "deploy.pth"
    assert main(["reparam", *TINY, "--check-size", "32", "--out", str(out)]) == 0
    capsys.readouterr()
    lock = file_lock_path(out)
    assert not lock.exists()  # the hold's lock is removed when it ends
    lock.touch()  # as a killed reparam leaves it
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in tmp_path.iterdir()}
    with held_by_another_process(lock):
        code = main(["reparam", *TINY, "--check-size", "32", "--out", str(out)])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
        assert f"error: --out {out} is in use: another erf-lab process is writing a run there now" in err, err
        assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in tmp_path.iterdir()} == before
        other = tmp_path / "other.pth"
        assert main(["reparam", *TINY, "--check-size", "32", "--out", str(other)]) == 0
        assert json.loads((tmp_path / "other.pth.run.json").read_text())["sha256"] == sha256_file(other)
    assert main(["reparam", *TINY, "--check-size", "32", "--out", str(out)]) == 0  # the left lock is taken over
    assert json.loads((tmp_path / "deploy.pth.run.json").read_text())["sha256"] == sha256_file(out)
    assert not lock.exists() and not file_lock_path(other).exists()


class _Killed(BaseException):
    """What a SIGKILL does at that point: nothing after it runs, the temporary file of the write in progress stays."""


def test_reparam_removes_the_temporary_files_of_a_killed_reparam_of_the_same_file(tmp_path, monkeypatch, capsys):
    """A reparam killed while it saved the checkpoint left ``.deploy.pth.<random>.tmp.pth`` (as large as the
    checkpoint) beside it for good, one more per kill: no later command removed it. The next reparam to that file,
    which holds it (only the holder writes it), now removes the temporaries of exactly that file and its .run.json;
    those of other files (another reparam may be writing them now) and every other file stay."""
    from pathlib import Path

    import erf_lab.io
    from erf_lab.io import sha256_file

    out = tmp_path / "deploy.pth"
    real_replace = erf_lab.io.os.replace

    def replace(src, dst):  # killed before the checkpoint's rename: no finally runs either
        if Path(dst) == out:
            monkeypatch.setattr(erf_lab.io.Path, "unlink", lambda self, missing_ok=False: None)
            raise _Killed()
        return real_replace(src, dst)

    monkeypatch.setattr(erf_lab.io.os, "replace", replace)
    with pytest.raises(_Killed):
        main(["reparam", *TINY, "--check-size", "32", "--out", str(out)])
    monkeypatch.undo()
    [killed] = [p.name for p in tmp_path.iterdir() if p.name.startswith(".deploy.pth.")]
    assert killed.endswith(".tmp.pth") and not out.exists() and (tmp_path / killed).stat().st_size > 10_000
    (tmp_path / ".deploy.pth.run.json.k3j9x0qz.tmp.json").write_text("{")  # killed while writing the record
    others = {".other.pth.k3j9x0qz.tmp.pth": b"another file's write", ".deploy.pth.k3j9x0qz.tmp": b"not its suffix",
              ".deploy.pthx.k3j9x0qz.tmp.pthx": b"another name", "deploy.pth.bak": b"the user's copy",
              ".deploy.pth.notes": b"notes", ".deploy.pth.k3j9.tmp.pth": b"not mkstemp's 8 characters"}
    for name, data in others.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / ".deploy.pth.a1b2c3d4.tmp.pth").mkdir()  # not a file: not erf-lab's either
    capsys.readouterr()
    assert main(["reparam", *TINY, "--check-size", "32", "--out", str(out)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [*others, ".deploy.pth.a1b2c3d4.tmp.pth", "deploy.pth", "deploy.pth.run.json"])
    assert all((tmp_path / name).read_bytes() == data for name, data in others.items())
    record = json.loads((tmp_path / "deploy.pth.run.json").read_text())
    assert record["sha256"] == sha256_file(out)
    assert record["num_keys"] == len(torch.load(out, weights_only=True)["model"])  # (marked as random init)


def test_a_file_hold_takes_the_lock_file_there_now(tmp_path, monkeypatch):
    """io.hold_file's lock file is removed when a hold ends: a process that opened it just before that removal and
    locked it after held a file no longer anyone's, and the next writer made and locked a new one beside it (two
    holders). The hold now locks the file that is there once it has the lock, and keeps it until it ends."""
    import subprocess
    import sys

    fcntl = pytest.importorskip("fcntl")
    from erf_lab import io as erf_io

    out = tmp_path / "deploy.pth"
    lock = erf_io.file_lock_path(out)
    lock.touch()  # the lock file of the holder before
    real, calls = fcntl.flock, []

    def flock(fd, op):
        if not calls:
            lock.unlink()  # that holder ends between this process's open and its lock
        calls.append(op)
        return real(fd, op)

    monkeypatch.setattr(fcntl, "flock", flock)
    try_lock = ("import fcntl, os, sys\nfd = os.open(sys.argv[1], os.O_RDONLY)\ntry:\n    fcntl.flock(fd, "
                "fcntl.LOCK_EX | fcntl.LOCK_NB)\nexcept OSError:\n    sys.exit(3)\n")
    with erf_io.hold_file(out):
        assert len(calls) == 2 and lock.is_file()
        assert subprocess.run([sys.executable, "-c", try_lock, str(lock)]).returncode == 3  # another cannot take it
    assert not lock.exists() and not erf_io._HELD


def test_taking_a_folder_removes_what_kills_left_there_but_no_write_going_on(tmp_path):
    """hold_folder removes the atomic-write temporaries a kill left in the folder and the sub-folders the command
    names, once, when it takes the folder: not in a nested hold of the same thread (its own write in progress there
    stays), and never those of a file a reparam holds there now (hold_file's lock beside it): a compute or train into
    the folder of a reparam's --out deleted the checkpoint being written, and the reparam failed at its rename."""
    pytest.importorskip("fcntl")
    from erf_lab import io as erf_io

    out, record = tmp_path / "deploy.pth", tmp_path / "deploy.pth.run.json"
    (tmp_path / "checkpoints").mkdir()
    left = [tmp_path / ".erf.npy.k1lled00.tmp.npy", tmp_path / "checkpoints" / ".epoch_001.pth.k1lled00.tmp.pth"]
    for p in left:
        p.write_bytes(b"killed mid-write")
    with erf_io.hold_file(out, with_files=[record]), erf_io.atomic_path(out) as tmp, \
            erf_io.atomic_path(record) as tmp_record:
        tmp.write_bytes(b"weights")
        tmp_record.write_text("{}")
        with erf_io.hold_folder(tmp_path, subfolders=["check*"]):
            assert [p for p in left if p.exists()] == [] and tmp.is_file() and tmp_record.is_file()
            with erf_io.atomic_path(tmp_path / "metrics.json") as own:
                own.write_text("{}")
                with erf_io.hold_folder(tmp_path):  # nested: its own write in progress stays
                    assert own.is_file()
    assert out.read_bytes() == b"weights" and record.read_text() == "{}"
    assert (tmp_path / "metrics.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints", "deploy.pth", "deploy.pth.run.json",
                                                         "metrics.json"]


@pytest.mark.parametrize("name,value,message", [
    ("FASTCONV_BACKEND", "cpp/cpp/bogus", "fastconv: unknown backend 'cpp/cpp/bogus' (from $FASTCONV_BACKEND)"),
    ("FASTCONV_AUTOTUNE", "maybe", "fastconv: $FASTCONV_AUTOTUNE='maybe' is not a yes or no"),
    # read only at the C++ kernel's first call: a traceback after the model was built, or nothing when no layer ran it
    ("FASTCONV_CPU_LANES", "7", "fastconv: $FASTCONV_CPU_LANES='7' is not a CPU lane width; use 8, 16 or auto"),
])
def test_a_fastconv_variable_fastconv_refuses_is_one_line_exit_2(name, value, message, tmp_path, capsys,
                                                                    monkeypatch):
    """A $FASTCONV_* value fastconv refuses: one error line and exit 2 before any work. It raised fastconv's
    ValueError from the first convolution, after the model was built, as a traceback."""
    from fastconv import config

    monkeypatch.setattr(config, "_defaults", None)  # read from the environment, as in a fresh process
    monkeypatch.setenv(name, value)
    out = tmp_path / "erf"
    rc = main(["compute", "--model", "replknet_3", "--override", "channels=(8,8,8,8)", "--override",
               "layers=(1,1,1,1)", "--num-images", "1", "--input-size", "64", "--out", str(out), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith(f"erf-lab compute: error: {message}")
    assert not out.exists()


@pytest.mark.parametrize("name", ["ERF_LAB_KEEP_FREED_MEMORY", "ERF_LAB_ALLOW_TF32"])
def test_an_erf_lab_yes_or_no_variable_that_is_neither_is_one_line_exit_2(name, tmp_path, capsys, monkeypatch):
    """ERF_LAB_KEEP_FREED_MEMORY / ERF_LAB_ALLOW_TF32 took any value but '0' / '1' as the default, silently; a value
    that is no yes or no is now one error line and exit 2 before any work, as a $FASTCONV_* switch's is."""
    monkeypatch.setenv(name, "maybe")
    out = tmp_path / "erf"
    rc = main(["compute", "--model", "replknet_3", "--override", "channels=(8,8,8,8)", "--override",
               "layers=(1,1,1,1)", "--num-images", "1", "--input-size", "64", "--out", str(out), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == [f"erf-lab compute: error: {name}=maybe is not a yes or no; set it to 1 or 0 (true / "
                               f"false, yes / no, on / off) or unset it"]
    assert not out.exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_keep_freed_memory_is_turned_off_by_the_words_fastconv_takes(monkeypatch):
    """ERF_LAB_KEEP_FREED_MEMORY=false (or no / off) kept freed memory all the same: only '0' turned it off. The
    yes / no words of fastconv's switches now work here too; unset or 1 / true keeps it (glibc)."""
    from erf_lab.erf import prepare

    for value, kept in (("false", False), ("OFF", False), ("no", False), ("0", False), ("true", True), ("", True)):
        monkeypatch.setattr(prepare, "_MALLOC_KEPT", [])  # decided once per process: decide again
        monkeypatch.setenv("ERF_LAB_KEEP_FREED_MEMORY", value)
        assert prepare.keep_freed_memory() is kept, value


def test_compute_refuses_an_out_folder_inside_its_image_folder(tmp_path, capsys):
    """`compute --images D --out D --force` listed the earlier run's erf.png as an input, deleted it (--force) and
    failed on the image it had just deleted: the earlier run was lost. An --out under D fed the run's own erf.png
    into the next run. Both are now refused before anything is touched."""
    from erf_lab.erf.rundir import write_run_dir

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    Image.new("RGB", (40, 40), (10, 200, 30)).save(imgs / "a.png")
    write_run_dir(imgs, np.ones((9, 9)), {"model": "m"})  # an earlier run written into the image folder itself
    before = sorted((p.name, p.stat().st_size) for p in imgs.iterdir())
    for out in (imgs, imgs / "runs" / "r1"):
        code = main([*SMALL, "--images", str(imgs), "--force", "--quiet", "--out", str(out)])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
        assert "inside the --images folder" in err, err
    assert sorted((p.name, p.stat().st_size) for p in imgs.iterdir()) == before
    assert not (imgs / "runs").exists()


def test_an_out_folder_under_a_hidden_folder_of_the_images_is_allowed(tmp_path):
    """The image folder is listed without its hidden folders: an --out there (the app's ~/.cache runs below an
    image folder ~) cannot feed the run's figures back, and is not refused."""
    from erf_lab.erf.runner import _refuse_out_in_images
    from erf_lab.errors import ErfLabError

    _refuse_out_in_images(tmp_path / ".cache" / "runs" / "r1", tmp_path)
    _refuse_out_in_images(tmp_path / "runs", "default")
    _refuse_out_in_images(tmp_path.parent / "elsewhere", tmp_path)
    with pytest.raises(ErfLabError, match="inside the --images folder"):
        _refuse_out_in_images(tmp_path / "a" / ".." / "runs", tmp_path)

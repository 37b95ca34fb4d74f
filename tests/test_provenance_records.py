"""Every command's output folder records how it was made (erf_lab.provenance): a table of commands run at a toy size
(tiny models, 64 px, 2 images) and the fields each record must hold. Before, only compute's run.json said the CPU and
threads, no record said the OS, analyze / compare / timeline / shape-bias --compare named their sources by path only
(no digest of what they read), and sweep, compare, timeline, analyze, bench, a download and the shape-bias records had
no end or duration."""
import json
import shutil
import sys
import textwrap

import pytest

from erf_lab.cli.main import main
from erf_lab.io import sha256_file

TINY = ["--override", "channels=(8,8,16,16)", "--override", "layers=(1,1,1,1)", "--override",
        "large_kernel_sizes=(7,7,7,3)"]
SB_MODEL = textwrap.dedent('''
    import torch, torch.nn as nn

    class Tiny(nn.Module):
        def __init__(self, num_classes=1000):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 16, stride=16)
            self.fc = nn.Linear(8, num_classes)
            self.default_cfg = {"input_size": (3, 64, 64), "mean": (0.5,) * 3, "std": (0.5,) * 3}

        def forward(self, x):
            return self.fc(self.conv(x).mean((2, 3)))

    def tiny(num_classes=1000, seed=0):
        torch.manual_seed(seed)
        return Tiny(num_classes)
''')
#: what every record says, wherever the command keeps it (``prov`` below: the record's provenance part)
COMMON = ("prov.argv", "prov.versions.erf_lab", "prov.versions.erf_lab_commit", "prov.versions.python",
          "prov.versions.platform", "prov.host.cpu_model", "prov.host.cpu_count", "prov.host.threads")


def field(record: dict, path: str, prov: str):
    """The value at a dotted ``path`` (``prov.`` the record's provenance part, list items by index); KeyError
    naming the path where it is missing."""
    obj = record
    for part in path.replace("prov", prov, 1).split(".") if path.startswith("prov.") else path.split("."):
        if not part:
            continue
        if isinstance(obj, list) and part.isdigit() and int(part) < len(obj):
            obj = obj[int(part)]
        elif isinstance(obj, dict) and part in obj:
            obj = obj[part]
        else:
            raise KeyError(path)
    return obj


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """The toy results the derived commands read: two ERF runs, a training run and a shape-bias run."""
    root = tmp_path_factory.mktemp("made")
    base = ["--model", "replknet_31b", *TINY, "--input-size", "64", "--num-images", "2", "--quiet"]
    assert main(["compute", *base, "--out", str(root / "c0")]) == 0
    assert main(["compute", *base, "--seed", "1", "--out", str(root / "c1")]) == 0
    assert main(["train", "--model", "replknet_31b", *TINY, "--num-classes", "4", "--train-size", "32",
                 "--val-size", "16", "--epochs", "1", "--batch-size", "16", "--input-size", "32", "--quiet",
                 "--out", str(root / "train")]) == 0
    (root / "prov_sb_tiny.py").write_text(SB_MODEL)
    sys.path.insert(0, str(root))
    try:
        yield root
    finally:
        sys.path.remove(str(root))


def _shape_bias_run(made, fixture_datasets) -> None:
    if not (made / "sb" / "run.json").is_file():
        assert main(["shape-bias", "--model", "prov_sb_tiny:tiny", "--allow-random", "--stimuli",
                     str(fixture_datasets / "cue-conflict"), "--limit", "16", "--workers", "0", "--no-humans",
                     "--out", str(made / "sb")]) == 0


def _data_download(out, fixture_datasets):
    """A download from a file: mirror of two fixture files (no network)."""
    from erf_lab.shape_bias import download as dl

    full = dl.load_manifest()["human-cue-conflict"]
    files = dict([kv for kv in full["files"].items()
                  if (fixture_datasets / "human-cue-conflict" / kv[0]).is_file()][:2])
    for rel in files:
        target = out / "www" / full["upstream"] / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(fixture_datasets / "human-cue-conflict" / rel, target)
    manifest = {"human-cue-conflict": {"upstream": full["upstream"], "files": files}}
    dl.download(out / "dest", base_url=(out / "www").as_uri(), sets=list(manifest), manifest=manifest,
                show_progress=False)
    return "dest/human-cue-conflict/MANIFEST.json"


def _run(made, out, fixture_datasets, case):
    """Run ``case`` into ``out`` (a training or shape-bias run: the one in ``made``); the path of its record."""
    c0, c1 = str(made / "c0"), str(made / "c1")
    if case == "data download":
        return out / _data_download(out, fixture_datasets)
    if case.startswith("shape-bias") and case != "shape-bias cue-world":
        _shape_bias_run(made, fixture_datasets)
    if case in ("train", "shape-bias"):
        return made / ("train" if case == "train" else "sb") / "run.json"
    argv, record = {
        "compute": (["compute", "--model", "replknet_31b", *TINY, "--input-size", "64", "--num-images", "2",
                     "--quiet", "--out", str(out / "r")], "r/run.json"),
        "analyze": (["analyze", c0, "--out", str(out / "r"), "--formats", "png"], "r/analysis.json"),
        "compare": (["compare", c0, c1, "--out", str(out / "r"), "--formats", "png"], "r/compare.json"),
        "sweep kernels": (["sweep", "--kernels", "3", "--reparam", "deploy", "--input-size", "64", "--num-images",
                           "2", "--override", "channels=(8,8,16,16)", "--override", "layers=(1,1,1,1)", "--quiet",
                           "--formats", "png", "--out", str(out / "r")], "r/sweep.json"),
        "sweep input sizes": (["sweep", "--input-sizes", "32", "--reparam", "deploy", "--model", "replknet_31b",
                               *TINY, "--num-images", "2", "--quiet", "--formats", "png", "--out", str(out / "r")],
                              "r/sweep.json"),
        "reparam": (["reparam", "--model", "replknet_31b", *TINY, "--check-size", "32", "--out",
                     str(out / "deploy.pth")], "deploy.pth.run.json"),
        "timeline": (["timeline", str(made / "train"), "--input-size", "32", "--num-images", "2", "--probe-size",
                      "16", "--quiet", "--formats", "png", "--out", str(out / "r")], "r/timeline.json"),
        "shape-bias --from-csv": (["shape-bias", "--from-csv",
                                   *map(str, sorted((made / "sb").glob("cue-conflict_*.csv"))), "--no-humans",
                                   "--out", str(out / "r")], "r/run.json"),
        "shape-bias --compare": (["shape-bias", "--compare", str(made / "sb"), "--no-humans", "--out",
                                  str(out / "r")], "r/run.json"),
        "shape-bias cue-world": (["shape-bias", "--model", "replknet_31b", "--weights",
                                  str(made / "train" / "model.safetensors"), "--stimuli", "cue-world", "--limit", "20",
                                  "--out", str(out / "r")], "r/run.json"),
        "bench": (["bench", "--device", "cpu", "--kernels", "3", "--resolutions", "16", "--channels", "8",
                   "--layers", "1", "--repeats", "1", "--warmup", "0", "--impls", "pytorch_nchw", "--mode", "fwd",
                   "--out", str(out / "r")], "r/run.json"),
    }[case]
    assert main(argv) == 0
    return out / record


#: case -> (where its provenance part is, the fields it must hold besides COMMON)
CASES = {
    "compute": ("provenance", ("sessions.0.host.device", "config.images_sha256", "weights_sha256", "random_init",
                               "seed", "start_time", "wall_seconds")),
    "analyze": ("", ("time", "end_time", "wall_seconds", "derived_from.0.files.0.sha256",
                     "derived_from.0.random_init", "derived_from.0.time", "derived_from.0.erf_lab_commit")),
    "compare": ("", ("time", "end_time", "wall_seconds", "derived_from.1.files.0.sha256",
                     "derived_from.1.random_init", "derived_from.1.time")),
    "sweep kernels": ("", ("host.device", "parameters.seed", "time", "end_time", "wall_seconds")),
    "sweep input sizes": ("", ("host.device", "parameters.seed", "time", "end_time", "wall_seconds")),
    "reparam": ("provenance", ("provenance.host.device", "random_init", "seed", "weights_sha256",
                               "provenance.time", "provenance.end_time", "provenance.wall_seconds")),
    "train": ("", ("sessions.0.host.device", "seeds.init", "start_time", "end_time", "wall_s_this_session")),
    "timeline": ("", ("host.device", "probe.seed", "time", "end_time", "wall_seconds", "derived_from.0.time",
                      "derived_from.0.path", "derived_from.0.model", "derived_from.0.kernel_sizes",
                      "derived_from.0.seed", "derived_from.0.files.0.sha256")),
    "shape-bias": ("", ("host.device", "random_weights", "seed", "weights_sha256", "start_time", "wall_seconds")),
    "shape-bias --from-csv": ("", ("inputs.0.sha256", "time_utc", "wall_seconds")),
    "shape-bias cue-world": ("", ("host.device", "random_weights", "probe.seed", "weights_sha256", "start_time",
                                  "wall_seconds")),
    "shape-bias --compare": ("", ("derived_from.0.files.0.sha256", "derived_from.0.random_init", "time_utc",
                                  "wall_seconds")),
    "bench": ("provenance", ("threads", "provenance.host.device", "provenance.time", "provenance.wall_seconds")),
    "data download": ("provenance", ("files", "provenance.time", "provenance.wall_seconds")),
}
#: where the whole command line is: analyze / compare / sweep / timeline's provenance has argv, others "command"
ARGV = {"train": "command", "shape-bias": "command", "shape-bias --from-csv": "command",
        "shape-bias --compare": "command", "shape-bias cue-world": "command", "bench": "argv",
        "data download": "provenance.argv"}


@pytest.mark.parametrize("case", list(CASES))
def test_each_commands_record_holds_how_it_was_made(case, made, tmp_path, fixture_datasets, one_thread):
    out = tmp_path / "out"
    out.mkdir()
    path = _run(made, out, fixture_datasets, case)
    record = json.loads(path.read_text())
    prov, extra = CASES[case]
    wanted = [ARGV.get(case, "prov.argv") if f == "prov.argv" else f for f in COMMON] + list(extra)
    missing = []
    for f in wanted:
        try:
            value = field(record, f, prov)
        except KeyError:
            missing.append(f)
            continue
        # a value, where the command has one to say (the commit outside a git checkout, the threads of a command
        # that runs no torch and the weights of a random init are null, honestly)
        if value is None and not f.endswith(("erf_lab_commit", "host.threads", "weights_sha256")):
            missing.append(f"{f} (null)")
    assert not missing, f"{case}: {path.name} lacks {missing}"
    made_by = record[prov] if prov else record
    if "time" in made_by and "end_time" in made_by:  # ``time`` is the start (reparam's was taken at its end)
        assert made_by["time"] <= made_by["end_time"] and made_by["wall_seconds"] >= 0
    host = field(record, "prov.host", prov)
    assert host["cpu_count"] >= 1 and isinstance(host["cpu_model"], str) and host["cpu_model"]
    if case not in ("analyze", "compare", "shape-bias --from-csv", "shape-bias --compare", "data download"):
        assert type(host["threads"]) is int and host["threads"] >= 1  # a command that ran torch says its threads
    # a derived result names the bytes it was made from: the digest of the source as it is now
    for src in (record.get("derived_from") or []):
        for f in src.get("files", []):
            assert f["sha256"] == sha256_file(f["path"])
    for f in (record.get("inputs") or []):
        assert f["sha256"] == sha256_file(f["path"])

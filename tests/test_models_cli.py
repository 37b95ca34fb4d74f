"""``erf-lab models`` and ``erf_lab.models.summary.describe_model``."""
from __future__ import annotations

import json

import pytest

from erf_lab.cli.main import main
from erf_lab.models import list_models
from erf_lab.models.summary import describe_model

PAPER_PARAMS = {"resnet50": 25_557_032, "resnet101": 44_549_160, "resnet152": 60_192_808,
                "mobilenetv2": 3_504_872, "efficientnet_lite0": 4_652_008}

#: the papers' GFLOPs at 224 as printed, counted on the deploy form (RepLKNet Table 5 at 31B widths, UniRepLKNet's
#: ImageNet-1K table, He et al. / Sandler et al. Table 4): value and the unit of its last digit
PAPER_GFLOPS_224 = {"replknet_3": (12.9, 0.1), "replknet_7": (13.1, 0.1), "replknet_13": (13.4, 0.1),
                    "replknet_25": (14.8, 0.1), "replknet_31b": (15.3, 0.1), "unireplknet_a": (0.6, 0.1),
                    "unireplknet_f": (0.9, 0.1), "unireplknet_p": (1.6, 0.1), "unireplknet_n": (2.8, 0.1),
                    "unireplknet_t": (4.9, 0.1), "unireplknet_s": (9.1, 0.1), "resnet50": (4.1, 0.1),
                    "mobilenetv2": (0.3, 0.1)}


def run_cli(capsys, *argv):
    rc = main(["models", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def mnv2_dw_macs(k: int) -> int:
    """Depthwise MACs of MobileNetV2 at 224 with k x k kernels (Sandler et al. 2018, Table 2 shapes)."""
    total, cin, hw = 0, 32, 112
    for t, c, n, s in [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                       (6, 320, 1, 1)]:
        for i in range(n):
            hw_out = hw // (s if i == 0 else 1)
            total += hw_out * hw_out * cin * t * k * k
            cin, hw = c, hw_out
    return total


def test_json_output_has_exact_counts(capsys):
    rc, out, err = run_cli(capsys, *PAPER_PARAMS, "--json")
    assert rc == 0, err
    rows = {r["name"]: r for r in json.loads(out)}
    assert set(rows) == set(PAPER_PARAMS)
    for name, params in PAPER_PARAMS.items():
        assert rows[name]["params"] == params
        assert rows[name]["deploy_params"] == params  # nothing to re-parameterize
        assert rows[name]["deploy_flops_224"] == rows[name]["flops_224"]
    assert rows["resnet50"]["kernel_sizes"] == [7, 3]
    assert rows["efficientnet_lite0"]["kernel_sizes"] == [3, 5]
    assert rows["resnet50"]["family"] == "resnet" and rows["mobilenetv2"]["family"] == "mobilenetv2"
    # ResNet-50: 4.09 GMACs (He et al. 2016 report 3.8 GFLOPs for v1 strides); MobileNetV2: 300M (Sandler Table 4).
    assert 4.05e9 < rows["resnet50"]["flops_224"] < 4.15e9
    assert 2.95e8 < rows["mobilenetv2"]["flops_224"] < 3.05e8


def test_flops_follow_kernel_size_theory():
    """Only the depthwise convs change between kernel variants: dFLOPs = sum H*W*C*(k^2 - 9)."""
    base = describe_model("mobilenetv2")["flops_224"]
    for name, k in [("mobilenetv2_k7", 7), ("mobilenetv2_k13", 13)]:
        assert describe_model(name)["flops_224"] - base == mnv2_dw_macs(k) - mnv2_dw_macs(3)
    assert describe_model("mobilenetv2_k13_noshortcut")["flops_224"] == describe_model("mobilenetv2_k13")["flops_224"]


def test_table_lists_every_model_with_matching_numbers(capsys):
    rc, out, err = run_cli(capsys)
    assert rc == 0, err
    lines = out.strip().splitlines()
    assert lines[0].split()[:2] == ["model", "family"] and "GFLOPs@224" in lines[0]
    body = {ln.split()[0]: ln.split() for ln in lines[2:lines.index("")]}
    assert set(body) == set(list_models())
    # the SLaK paper's counting (non-zero weights of its 40 %-sparse models) beside ours, one line a variant
    note = lines[lines.index("") + 1:]
    assert note[0] == ("slak: params and GFLOPs of the dense weights; the paper counts only the non-zero weights of "
                       "its trained 40%-sparse models")
    assert note[1:4] == ["  slak_b: paper 95M / 17.1G; 40% of every conv and linear weight zero: 94.91M / 17.11G",
                         "  slak_s: paper 55M / 9.8G; 40% of every conv and linear weight zero: 54.78M / 9.96G",
                         "  slak_t: paper 30M / 5.0G; 40% of every conv and linear weight zero: 30.47M / 5.22G"]
    assert "SNIP" in note[4] and note[-1].endswith("erf-lab reparam --weights FILE prints its counts)")
    for name in list_models():
        d = describe_model(name)
        cols = body[name]
        assert cols[1] == d["family"]
        assert float(cols[2]) == pytest.approx(d["params"] / 1e6, abs=0.005)
        assert float(cols[3]) == pytest.approx(d["flops_224"] / 1e9, abs=0.005)
        assert cols[4] == ",".join(map(str, d["kernel_sizes"]))
        assert float(cols[5]) == pytest.approx(d["deploy_params"] / 1e6, abs=0.005)
        assert float(cols[6]) == pytest.approx(d["deploy_flops_224"] / 1e9, abs=0.005)
    for name, params in PAPER_PARAMS.items():
        assert body[name][2] == f"{params / 1e6:.2f}"
    rlk = describe_model("replknet_31b")
    assert rlk["kernel_sizes"] == [31, 29, 27, 13] and rlk["deploy_params"] < rlk["params"]


def test_deploy_flops_are_the_papers(capsys):
    """The papers count the re-parameterized form: its GFLOPs are a column of their own (the table showed the
    training form's only, UniRepLKNet-A 0.67 against the paper's 0.6, RepLKNet-31B 15.43 against 15.3)."""
    rc, out, err = run_cli(capsys, *PAPER_GFLOPS_224, "--json")
    assert rc == 0, err
    rows = {r["name"]: r for r in json.loads(out)}
    for name, (paper, unit) in PAPER_GFLOPS_224.items():
        assert abs(rows[name]["deploy_flops_224"] / 1e9 - paper) < unit, (name, rows[name]["deploy_flops_224"])
    for name in ("replknet_31b", "unireplknet_a"):  # the merged small kernels: fewer MACs than the training form
        assert abs(rows[name]["flops_224"] / 1e9 - PAPER_GFLOPS_224[name][0]) > 0.05
        assert rows[name]["deploy_flops_224"] < rows[name]["flops_224"]
    # RepLKNet-31B: the deploy form drops the 5x5 branch of each block: 2 * 56^2 * 128 + 2 * 28^2 * 256 +
    # 18 * 14^2 * 512 + 2 * 7^2 * 1024 depthwise channels-pixels, 25 MACs each
    assert rows["replknet_31b"]["flops_224"] - rows["replknet_31b"]["deploy_flops_224"] == 25 * (
        2 * 56 ** 2 * 128 + 2 * 28 ** 2 * 256 + 18 * 14 ** 2 * 512 + 2 * 7 ** 2 * 1024)
    rc, out, _ = run_cli(capsys, "unireplknet_a", "resnet18")
    header, _, *body = out.strip().splitlines()
    assert header.split()[-2:] == ["deploy", "GFLOPs@224"]
    assert [ln.split()[-1] for ln in body] == ["1.81", "0.64"]  # no SLaK row: no sparsity note either


def test_family_filter_and_sort(capsys):
    rc, out, _ = run_cli(capsys, "--family", "resnet", "--sort", "params", "--json")
    assert rc == 0
    rows = json.loads(out)
    assert [r["name"] for r in rows] == ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]
    rc, out, _ = run_cli(capsys, "resnet50", "mobilenetv2", "resnet50", "--sort", "flops", "--json")
    assert rc == 0 and [r["name"] for r in json.loads(out)] == ["mobilenetv2", "resnet50"]  # twice named: one row
    # the families listed are those of the models named, not all there are ("families: resnet" read as the only one)
    rc, out, err = run_cli(capsys, "resnet50", "--family", "replknet")
    assert rc == 2 and out == "" and err.count("\n") == 1
    assert "no model of family 'replknet'; families of the models named: resnet" in err, err


def test_user_errors_are_one_line(capsys):
    rc, out, err = run_cli(capsys, "resnet5O")
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and "unknown model 'resnet5O'" in err and "resnet50" in err
    rc, _, err = run_cli(capsys, "--family", "vit")
    assert rc == 2 and err.count("\n") == 1 and "replknet" in err


def test_help_documents_options(capsys):
    with pytest.raises(SystemExit) as e:
        main(["models", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for opt in ("--json", "--family", "--sort", "MODEL"):
        assert opt in out


def test_every_option_has_help_naming_its_default():
    """Every option of every command (and of ``data download`` / ``data info``) says in ``--help`` what it does,
    and one with a default value names it: shape-bias ``--batch-size`` / ``--device``, bench ``--channels`` /
    ``--mode`` showed a bare option, train ``--weight-decay`` / ``--seed``, study ``--channels`` / ``--layers`` and
    data download ``--workers`` hid their defaults."""
    import argparse

    from erf_lab.cli.main import build_parser

    def options(parser, path):
        for a in parser._actions:
            if isinstance(a, argparse._SubParsersAction):
                for name, sub in a.choices.items():
                    yield from options(sub, path + [name])
            elif not isinstance(a, (argparse._HelpAction, argparse._VersionAction)):
                yield " ".join(path + ["/".join(a.option_strings) or a.dest]), a

    found = dict(options(build_parser(), []))
    assert len(found) > 150 and "data download --workers" in found and "bench --mode" in found
    bare = [name for name, a in found.items() if not (a.help or "").strip()]
    assert bare == []
    hidden = [name for name, a in found.items()
              if a.default is not None and a.default is not False and "default" not in a.help]
    assert hidden == []

def test_help_is_fast_and_imports_no_torch():
    """``erf-lab --help`` and every ``erf-lab CMD --help`` build their parsers without importing torch
    (start-up 0.2 s instead of ~3 s); the commands import their libraries when they run."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys\nfrom erf_lab.cli.main import build_parser, main\n"
            "cmds = [a for a in build_parser()._subparsers._group_actions[0].choices]\n"
            "for argv in [['--help']] + [[c, '--help'] for c in cmds]:\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "print('COMMANDS', len(cmds), 'TORCH', 'torch' in sys.modules, file=sys.stderr)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    line = out.stderr.strip().splitlines()[-1]
    n = int(line.split()[1])
    assert n >= 10 and line.endswith("TORCH False"), line


@pytest.mark.parametrize("argv", [["models", "os:getcwd"], ["layers", "--model", "os:getcwd", "--input-size", "32"]])
def test_user_factory_that_builds_no_module_is_one_line(capsys, argv):
    """A ``package.module:factory`` whose factory returns something else than a module (here a str) is one
    error line naming what it returned, exit status 2, not an AttributeError traceback."""
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and "'os:getcwd'" in err and "returned a str, not a torch.nn.Module" in err


def test_console_script_finds_a_model_module_in_the_current_folder(tmp_path):
    """``erf-lab models mymodels:net`` beside ``mymodels.py``: the console script's ``sys.path`` holds the script's
    folder, not the current one, so the README's ``--model mypackage.mymodule:factory`` was "No module named
    'mymodels'" there while ``python -m erf_lab`` found it; now both find it (after the installed packages)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    (tmp_path / "mymodels.py").write_text("import torch.nn as nn\n\n\ndef net():\n"
                                          "    return nn.Sequential(nn.Conv2d(3, 4, 5), nn.Conv2d(4, 4, 3))\n")
    script = tmp_path / "bin" / "erf-lab"  # as pip writes the console script: its own folder on sys.path
    script.parent.mkdir()
    script.write_text("import sys\nfrom erf_lab.cli.main import run\nsys.exit(run())\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, str(script), "models", "mymodels:net", "--json"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    (row,) = json.loads(proc.stdout)
    assert row["name"] == "mymodels:net" and row["params"] == 3 * 4 * 25 + 4 + 4 * 4 * 9 + 4
    assert row["kernel_sizes"] == [3, 5]

"""The README as a newcomer reads it: each command line it shows parses with that command's own options and
choices, each Python example calls names and keywords that exist, each file and folder it names is there or is
written by the code, its run.json table is the schema, and its kernel-family and human-consistency tables are the
shipped results and what the module measures. (tests/test_packaging.py checks the options as one set.)"""
from __future__ import annotations

import argparse
import ast
import importlib
import inspect
import re
import shlex

import pytest

from conftest import REPO_ROOT

README = (REPO_ROOT / "README.md").read_text()
#: the newcomer's part: the Benchmarks section quotes the benchmark scripts' own command lines
GUIDE = README.split("\n## Benchmarks", 1)[0] + "\n## Data and credits" + README.split("\n## Data and credits", 1)[1]
FENCED = re.compile(r"```(\w*)\n(.+?)\n```", re.S)


def _code_spans() -> list[str]:
    """The inline code spans of the guide (line breaks inside a span read as spaces) and its fenced blocks."""
    inline = FENCED.sub("", GUIDE).split("`")[1::2]
    return [" ".join(s.split()) for s in inline] + [body for _, body in FENCED.findall(GUIDE)]


def _parsers() -> dict[str, argparse.ArgumentParser]:
    """``{"compute": parser, "data download": parser, ...}``, each raising ValueError instead of exiting."""
    from erf_lab.cli.main import build_parser

    def refuse(message):
        raise ValueError(message)

    out = {}

    def walk(parser, name):
        parser.error = refuse
        out[name] = parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub, p in action.choices.items():
                    walk(p, f"{name} {sub}".strip())

    walk(build_parser(), "")
    return out


def _command_lines() -> list[tuple[str, bool]]:
    """Every ``erf-lab CMD ...`` the guide shows, and the bare ``CMD --opt`` it names in its text (``reparam --out``):
    (line, whether it is a whole command line)."""
    commands = sorted({name.split()[0] for name in _parsers() if name}, key=len, reverse=True)
    start = re.compile(rf"(erf-lab |-m erf_lab )?({'|'.join(map(re.escape, commands))})(?= |$)")
    found = []
    for span in _code_spans():
        for part in re.split(r"(?=\berf-lab |-m erf_lab )|&&", " ".join(span.split())):
            m = start.match(part.strip())
            if m and (m.group(1) or " --" in part):
                found.append((part.strip().removeprefix("-m erf_lab ").removeprefix("erf-lab "), bool(m.group(1))))
    return found


def _command_of(words: list[str], parsers: dict) -> str:
    return f"{words[0]} {words[1]}" if len(words) > 1 and f"{words[0]} {words[1]}" in parsers else words[0]


def test_every_command_line_in_the_readme_parses_with_its_commands_options():
    """An option named under the wrong command (``sweep --dest``), a choice that is not one (``--reparam merged``)
    or a renamed option fails here; the test in test_packaging only asks that each option exists in some command.
    Only the required options a line leaves out to stay short (``erf-lab reparam --drop-head``) may be missing."""
    parsers = _parsers()
    lines = _command_lines()
    assert len([1 for _, whole in lines if whole]) >= 30 and any(line.startswith("reparam --out") for line, _ in lines)
    wrong = []
    for line, whole in lines:
        words = shlex.split(line.replace("...", ""))
        cmd = _command_of(words, parsers)
        options = {o for a in parsers[cmd]._actions for o in a.option_strings}
        named = {w.split("=")[0] for w in words if w.startswith("--")}
        if named - options:
            wrong.append(f"{line}: {cmd} has no {sorted(named - options)}")
        elif whole and len(words) > len(cmd.split()):  # a whole command line: its values and choices too
            try:
                parsers[""].parse_args(words)
            except ValueError as e:
                if "the following arguments are required" not in str(e):
                    wrong.append(f"{line}: {e}")
    assert not wrong, wrong


def test_each_options_bullet_names_its_own_commands_options():
    """'The options not described further below': each bullet's options belong to the command it names."""
    parsers = _parsers()
    section = README.split("The options not described further below", 1)[1].split("\n### ", 1)[0]
    bullets = re.split(r"\n- ", section)[1:]
    assert len(bullets) >= 12
    wrong = {}
    for bullet in bullets:
        words = re.match(r"`([^`]+)`", bullet).group(1).split()
        cmd = _command_of(words, parsers)
        cmd = cmd if cmd in parsers else words[0]  # `study kernel-family`: the study's positional choice
        options = {o for a in parsers[cmd]._actions for o in a.option_strings}
        stray = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", bullet)) - options
        if stray:
            wrong[cmd] = sorted(stray)
    assert not wrong, wrong


def _python_examples() -> list[str]:
    blocks = [body for lang, body in FENCED.findall(GUIDE) if lang == "python"]
    assert len(blocks) >= 3
    return blocks


@pytest.mark.parametrize("block", range(3))
def test_the_python_examples_call_what_exists(block):
    """Each README Python example imports names that exist and calls them (and the methods it calls on what they
    return) with arguments and keywords their signatures take, without building a model."""
    source = _python_examples()[block]
    tree = ast.parse(source)
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name), f"{node.module} has no {alias.name}"
                names[alias.asname or alias.name] = getattr(module, alias.name)
    assert names
    checked = 0
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Name) and func.id in names:
            target = names[func.id]
        elif (isinstance(func, ast.Attribute) and isinstance(func.value, ast.Call)
              and isinstance(func.value.func, ast.Name) and inspect.isclass(names.get(func.value.func.id))):
            cls = names[func.value.func.id]
            assert hasattr(cls, func.attr), f"{cls.__name__} has no {func.attr}"
            target = getattr(cls, func.attr)
            node = ast.Call(func=func, args=[ast.Constant(None), *node.args], keywords=node.keywords)  # self
        else:
            continue
        signature = inspect.signature(target)
        try:
            signature.bind(*[None] * len(node.args), **{k.arg: None for k in node.keywords if k.arg})
        except TypeError as e:
            pytest.fail(f"{ast.unparse(node)}: {e}")
        checked += 1
    assert checked >= 2


def test_the_run_json_table_is_the_schema():
    """The table under 'The run directory and run.json' names every field of ``RUN_FIELDS`` and no other."""
    from erf_lab.erf.rundir import RUN_FIELDS

    section = README.split("#### The run directory and run.json", 1)[1].split("\n#### ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    named = {f for row in rows for f in re.findall(r"`(\w+)`", row.split(" | ")[0])}
    assert len(rows) >= 10
    assert named == set(RUN_FIELDS), (sorted(named - set(RUN_FIELDS)), sorted(set(RUN_FIELDS) - named))


#: file names the README gives as examples of the user's own files, not as files erf-lab writes or ships
EXAMPLE_FILES = {"replknet_31b.pth", "RepLKNet-31B_ImageNet-1K_224.pth", "deploy.pth",
                 "0001_s5n_s01_0_bird_00_bird3-bird2.png"}


def test_the_files_the_readme_names_exist_or_are_written_by_the_code():
    """A repository path the guide names (``data/paper_reference.json``, ``tests/test_bad_inputs.py``) exists; an
    output file it promises (``erf.npy``, ``sweep.md``, ``model_ema.safetensors``, ``erf_flops.json``, ...) is named
    in the code that writes it, so a renamed output cannot leave the README behind."""
    text = FENCED.sub("", GUIDE)
    paths = set(re.findall(r"`((?:data|tests|benchmarks|app|erf_lab|fastconv)/[^`\s]*)`", text))
    assert len(paths) >= 10
    missing = [p for p in paths if not list(REPO_ROOT.glob(p.rstrip("/").replace("<", "*").replace(">", "*")))]
    assert not missing, missing
    code = "\n".join(p.read_text() for folder in ("erf_lab", "fastconv", "app")
                     for p in (REPO_ROOT / folder).rglob("*.py"))
    names = set(re.findall(r"(?<![\w/.-])(\.?[A-Za-z][\w-]*\.(?:json|csv|md|npy|png|pdf|svg|txt|safetensors|pth))\b",
                           text))
    # a file the repository ships (not one a run wrote into the clone: the README's main job writes runs/ there)
    shipped = {p.name for folder in ("data", "tests", "benchmarks", "app", "erf_lab", "fastconv")
               for p in (REPO_ROOT / folder).rglob("*") if p.is_file()} | {p.name for p in REPO_ROOT.glob("*.*")}
    names = {n for n in names - EXAMPLE_FILES if n not in shipped and "NNN" not in n}
    assert {"erf.npy", "metrics.json", "run.json", "sweep.json", "summary.json", "erf_flops.json"} <= names
    assert not sorted(n for n in names if n not in code)


def test_the_kernel_family_table_is_the_shipped_results():
    """The README's kernel-family table quotes ``data/trained/cue-world/family.csv`` to its printed digits, so a study
    shipped again cannot leave the README's numbers (and the conclusions drawn from them) behind."""
    import csv

    rows = {r["name"]: r for r in csv.DictReader((REPO_ROOT / "data/trained/cue-world/family.csv").open())}
    section = README.split("### The kernel-family study", 1)[1].split("\n\n| model |", 1)[1]
    lines = [line for line in section.split("\n\n", 1)[0].splitlines() if line.startswith("| K = ")]
    columns = ["val_acc", "area@20%", "area@50%", "area@99%", "r_rms", "shape_bias", "shape_only_accuracy",
               "texture_only_accuracy"]
    assert len(lines) == len(rows) == 6
    for line in lines:
        label, *cells = [c.strip() for c in line.strip("|").split("|")]
        k, _, seed = label.removeprefix("K = ").partition(", seed ")
        row = rows[f"K{k}-seed{seed or 0}"]
        for column, cell in zip(columns, cells, strict=True):
            if cell == "n/r":
                assert row[column] == "", (label, column)
            else:
                digits = len(cell.partition(".")[2])
                assert float(cell) == round(float(row[column]), digits), (label, column, cell, row[column])


def test_the_human_consistency_table_is_what_the_module_measures(shared_datasets):
    """The README's human-vs-human table (mean accuracy, observed / expected consistency, error consistency mean ± SD
    and range, accuracy difference over the 45 pairs) to its printed digits, from the 10 subjects' CSVs."""
    import statistics

    from erf_lab.shape_bias.consistency import accuracy, human_trials, human_vs_human

    section = README.split("### Consistency with humans", 1)[1].split("\n### ", 1)[0]
    lines = [line for line in section.splitlines() if re.match(r"\| [a-z-]+ \(\d+", line)]
    humans = human_trials(shared_datasets)
    assert len(lines) == len(humans) == 3
    for line in lines:
        name, *cells = [c.strip() for c in line.strip("|").split("|")]
        h = human_vs_human(humans[name.split()[0]])
        pairs = list(h["pairs"].values())
        ec = h["error_consistency"]
        expect = [f"{statistics.mean(accuracy(t) for t in humans[name.split()[0]].values()):.4f}",
                  f"{statistics.mean(p['observed_consistency'] for p in pairs):.4f}",
                  f"{statistics.mean(p['expected_consistency'] for p in pairs):.4f}",
                  f"{ec['mean']:.3f} ± {ec['sd']:.3f} ({ec['min']:.3f}–{ec['max']:.3f})",
                  f"{h['accuracy_difference']['mean']:.4f}"]
        assert cells == expect, name

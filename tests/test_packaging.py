"""The README's two set-up commands, .ci/run and the console script stay consistent."""
import re
import subprocess
import sys

from conftest import REPO_ROOT


def _readme_commands() -> list[str]:
    text = (REPO_ROOT / "README.md").read_text()
    quick = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", quick)


def test_readme_gives_exactly_two_setup_commands_and_ci_runs_the_test_one():
    commands = _readme_commands()
    assert len(commands) == 2, commands
    main_job, test_cmd = commands
    assert main_job.startswith("pip install torch==2.13.0") and "erf-lab compute --model replknet_31b" in main_job
    assert "pytest" in test_cmd and test_cmd.startswith("pip install torch==2.13.0")
    ci_lines = (REPO_ROOT / ".ci" / "run").read_text().splitlines()
    assert test_cmd in ci_lines, "the README's test command must appear verbatim as a line of .ci/run"


def test_console_script_help_lists_every_command():
    out = subprocess.run([sys.executable, "-m", "erf_lab", "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("models", "compute", "layers", "analyze", "compare", "sweep", "reparam", "shape-bias", "bench", "data",
                    "train", "timeline", "study"):
        assert re.search(rf"^\s+{re.escape(command)}\b", out, re.M), command


def test_no_command_prints_help_and_exits_2():
    proc = subprocess.run([sys.executable, "-m", "erf_lab"], capture_output=True, text=True)
    assert proc.returncode == 2 and "usage: erf-lab" in proc.stdout


def test_built_package_finds_its_data_without_the_source_tree(tmp_path):
    """setup.py ships data/ as package ``erf_lab_data`` (checksum manifest included); a build used away from the
    repository loads the manifest from there (erf_lab.paths.data_dir's installed branch)."""
    subprocess.run([sys.executable, "setup.py", "-q", "build", "--build-base", str(tmp_path / "build")],
                   cwd=REPO_ROOT, check=True, capture_output=True)
    lib = next((tmp_path / "build").glob("lib*"))
    shipped = lib / "erf_lab_data" / "shape_bias_sha256.json"
    assert shipped.read_bytes() == (REPO_ROOT / "data" / "shape_bias_sha256.json").read_bytes()
    assert not (lib / "erf_lab" / "shape_bias" / "manifest_data.py").exists()
    code = ("from erf_lab.paths import data_dir; from erf_lab.shape_bias.download import load_manifest; "
            "m = load_manifest(); print(data_dir(), sum(len(e['files']) for e in m.values()))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={"PATH": "", "PYTHONPATH": str(lib)},
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == [str(lib / "erf_lab_data"), "1630"]  # 1280 + 160 + 160 stimuli, 3 x 10 human CSVs


def test_console_script_skips_the_teardown_but_keeps_output_and_exit_codes(tmp_path):
    """The console script leaves through ``exit_now`` (os._exit once torch is loaded: ~0.8 s less per process,
    issue 14): everything printed to a pipe arrives, files are written, and the exit codes stay 0 / 2."""
    assert '"erf-lab=erf_lab.cli.main:run"' in (REPO_ROOT / "setup.py").read_text()
    code = ("import sys, erf_lab.cli.main as m; import torch; print('x' * 200000); "
            "open(sys.argv[1], 'w').write('done'); m.exit_now(3)")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "f.txt")], capture_output=True, text=True)
    assert proc.returncode == 3 and proc.stdout == "x" * 200000 + "\n" and (tmp_path / "f.txt").read_text() == "done"
    proc = subprocess.run([sys.executable, "-m", "erf_lab", "compute", "--model", "no_such_model"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "unknown model" in proc.stderr


def test_console_script_raises_the_gc_threshold_before_the_command(monkeypatch):
    """``run`` sets generation 0's threshold to ``GC_THRESHOLD`` before the command runs (the start-up's full
    collections of torch's objects: ~0.3 s per process, issue 14) and never lowers a higher one."""
    import gc

    import erf_lab.cli.main as cli

    seen = []
    monkeypatch.setattr(cli, "main", lambda argv=None: seen.append(gc.get_threshold()[0]) or 0)
    monkeypatch.setattr(cli, "exit_now", lambda code: seen.append(code))
    old = gc.get_threshold()
    try:
        gc.set_threshold(700)
        cli.run([])
        gc.set_threshold(50_000)
        cli.run([])
    finally:
        gc.set_threshold(*old)
    assert seen == [cli.GC_THRESHOLD, 0, 50_000, 0] and cli.GC_THRESHOLD == 20_000


#: options the README quotes from other programs: torchrun, the official RepLKNet scripts, benchmarks/ scripts
FOREIGN_README_OPTIONS = {"--nproc_per_node", "--max-restarts", "--finetune", "--size"}


def _cli_options() -> dict[str, set[str]]:
    """``{"compute": {"--model", ...}, "data download": {...}, ...}``: every long option of every (sub)command."""
    import argparse

    from erf_lab.cli.main import build_parser

    def walk(parser, name, out):
        out[name] = set()
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub, p in action.choices.items():
                    walk(p, f"{name} {sub}".strip(), out)
            else:
                out[name] |= {o for o in action.option_strings if o.startswith("--")}
        return out

    return walk(build_parser(), "", {})


def test_readme_documents_every_command_and_option_and_no_other():
    """Every command and option that `erf-lab ... --help` lists is named in the README (54 options of 14 commands
    were not), and every erf-lab option or command the README names exists, so neither side drifts unnoticed."""
    text = (REPO_ROOT / "README.md").read_text()
    options = _cli_options()
    named = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9_-]*)", text))
    missing = {f"{cmd}: {o}" for cmd, opts in options.items() for o in opts if o not in named}
    assert not missing, f"options missing from README.md: {sorted(missing)}"
    known = set().union(*options.values())
    assert named - known <= FOREIGN_README_OPTIONS, f"README.md names options that do not exist: {named - known}"
    commands = {c.split()[0] for c in options if c}
    quoted = set(re.findall(r"`(?:[A-Z_]+=\S+ )?erf-lab ([a-z][a-z-]*)", text))
    assert quoted == commands, (commands - quoted, quoted - commands)


def test_readme_names_every_environment_variable_the_code_reads():
    """ERF_LAB_APP_ROOTS / ERF_LAB_APP_RUNS (where the app reads and writes) and FASTCONV_NO_CPP / FASTCONV_TRITON_DOT
    were read by the code and named nowhere in the README; every ERF_LAB_* / FASTCONV_* variable now is."""
    text = (REPO_ROOT / "README.md").read_text()
    read = set()
    for folder in ("erf_lab", "fastconv", "app"):
        for path in (REPO_ROOT / folder).rglob("*.py"):
            read |= set(re.findall(r"\b((?:ERF_LAB|FASTCONV)_[A-Z0-9_]*[A-Z0-9])\b", path.read_text()))
    assert read >= {"ERF_LAB_CACHE", "ERF_LAB_DATA", "FASTCONV_CACHE"}  # the scan finds them at all
    assert not {v for v in read if v not in text}, "environment variables missing from README.md"


def test_output_piped_into_a_reader_that_leaves_ends_quietly(monkeypatch):
    """``erf-lab models --json | head`` (here ``data info``, the quickest): the reader gone, the command's ``print``
    raised BrokenPipeError, a traceback and exit status 1; now nothing on stderr and 141, the status a shell gives
    a process SIGPIPE ended.
    A broken pipe that is not standard output's (a socket, a worker's pipe) still raises."""
    import os

    import pytest

    from erf_lab.cli import main as cli
    from erf_lab.cli.commands import models

    read, write = os.pipe()
    os.close(read)
    try:
        proc = subprocess.run([sys.executable, "-m", "erf_lab", "data", "info"], stdout=write,
                              stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write)
    assert (proc.returncode, proc.stderr) == (141, "") and cli.EXIT_BROKEN_PIPE == 141

    def broken(args):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(models, "run", broken)
    with pytest.raises(BrokenPipeError):
        cli.main(["models"])

"""``torchrun --nproc_per_node=2 -m erf_lab compute``: 2 gloo ranks on 127.0.0.1 give the 1-process matrix."""
import json
import os
import re
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import held_by_another_process, torchrun_restart, two_processes
from erf_lab.erf import distributed as D
from erf_lab.erf.runner import ErfSpec, run_erf

ARGS = ["--model", "replknet_31b", "--override", "channels=(8,8,8,8)", "--override", "layers=(1,1,1,1)",
        "--num-images", "3", "--input-size", "32", "--quiet"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(*args, timeout: int = 300) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node=2 ARGS`` (a script and its arguments, or ``-m erf_lab ...``) on 127.0.0.1, one
    thread per rank, without this process's own torchrun variables."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def _torchrun_erf_lab(*args) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node=2 -m erf_lab ARGS`` (:func:`_torchrun`); asserts it succeeded."""
    proc = _torchrun("-m", "erf_lab", *args, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_shard_takes_every_nth_image():
    items = list("abcdefg")
    parts = [D.shard(items, D.DistInfo(rank=r, world_size=3)) for r in range(3)]
    assert parts == [list("adg"), list("be"), list("cf")]
    assert sorted(sum(parts, [])) == items
    assert D.env_info().world_size == int(os.environ.get("WORLD_SIZE", "1"))


def test_two_gloo_ranks_equal_one_process(tmp_path):
    spec = ErfSpec("replknet_31b", overrides={"channels": (8, 8, 8, 8), "layers": (1, 1, 1, 1)}, num_images=3,
                   input_size=32)
    single = run_erf(spec, out=tmp_path / "one", show_progress=False)
    out = tmp_path / "two"
    proc = _torchrun_erf_lab("compute", *[a for a in ARGS if a != "--quiet"], "--out", str(out))
    two = np.load(out / "erf.npy")
    one = np.load(tmp_path / "one" / "erf.npy")
    assert np.abs(two - one).max() <= 1e-6 * np.abs(one).max()
    info = json.loads((out / "run.json").read_text())
    assert info["world_size"] == 2 and info["dist_backend"] == "gloo"
    assert info["num_used"] == 3 and info["image_list"] == single["run_info"]["image_list"]
    assert not list(out.glob(".erf_state*"))
    assert proc.stdout.count("wrote ") == 1  # only rank 0 writes and reports
    # only rank 0 shows a bar, and it says that it counts its own share of the images
    assert "(rank 0 of 2: 2 of the 3 images)" in proc.stderr
    assert "rank 1" not in proc.stderr, proc.stderr[-3000:]


def _two_ranks_in_own_folders(tmp_path, out) -> list[tuple[int, list[str]]]:
    """``erf-lab compute --images imgs`` as 2 gloo ranks, rank r started in ``tmp_path/node<r>`` as the one process
    of node r (``LOCAL_RANK`` 0: each prints to its node's console); (exit status, error lines) per rank."""
    port = str(_free_port())
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "RANK": str(rank), "LOCAL_RANK": "0", "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        cmd = [sys.executable, "-m", "erf_lab", "compute", *ARGS[:6], "--images", "imgs", "--num-images", "2",
               "--input-size", "32", "--quiet", "--out", str(out)]
        procs.append(subprocess.Popen(cmd, cwd=tmp_path / f"node{rank}", env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    results = [p.communicate(timeout=600)[1] for p in procs]
    return [(p.returncode, [ln for ln in err.splitlines() if "error" in ln.lower()]) for p, err in zip(procs, results)]


def test_ranks_that_see_other_images_refuse_to_run(tmp_path):
    """Two nodes whose folders at the same path hold different bytes under the same names: every rank stops with
    one line naming what differs, exit status 2, and nothing is written (before, the run summed one ERF over two
    image sets). A node whose folder holds no images: that rank says why, and the other names it and its message
    (before, it died of a closed connection)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for node in (0, 1):
        imgs = tmp_path / f"node{node}" / "imgs"
        imgs.mkdir(parents=True)
        for i in range(2):
            pixels = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8) if node == 1 and i == 1 else \
                np.full((40, 40, 3), 60 * (i + 1), dtype=np.uint8)
            Image.fromarray(pixels).save(imgs / f"img{i}.png")
    out = tmp_path / "out"
    line = ("erf-lab compute: error: the ranks disagree on the images' contents: rank 1 differs from rank 0 (every "
            "rank must read the same images, weights and options)")
    assert _two_ranks_in_own_folders(tmp_path, out) == [(2, [line]), (2, [line])]
    assert not (out / "run.json").exists() and not (out / "erf.npy").exists()

    for f in (tmp_path / "node1" / "imgs").iterdir():  # the folder is there (checked before the ranks meet), empty
        f.unlink()
    (rc0, err0), (rc1, err1) = _two_ranks_in_own_folders(tmp_path, out)
    assert rc0 == rc1 == 2 and len(err0) == len(err1) == 1 and "no image files" in err1[0], (err0, err1)
    assert err0 == ["erf-lab compute: error: rank 1 stopped: " + err1[0].split("error: ", 1)[1]]
    assert not (out / "run.json").exists()


def test_a_torchrun_sweep_is_written_once_and_reused_by_one_process(tmp_path):
    """Under torchrun every rank measures its share of each member; rank 0 alone writes the sweep's files and
    reports, and shows the sweep's progress bar (before: every rank drew its own). A later 1-process sweep of the
    same settings reuses the members (the ERF does not depend on the number of processes)."""
    from erf_lab.erf.sweep import run_sweep

    out = tmp_path / "sweep"
    proc = _torchrun_erf_lab("sweep", "--input-sizes", "32", "--model", "replknet_31b", "--reparam", "deploy",
                             "--override", "channels=(8,8,8,8)", "--override", "layers=(1,1,1,1)", "--num-images",
                             "2", "--formats", "png", "--out", str(out))
    assert proc.stdout.count("wrote ") == 1 and (out / "sweep.csv").is_file()
    assert proc.stderr.count("sweep:   0%") == 1, proc.stderr[-3000:]
    stamp = (out / "S32-deploy" / "erf.npy").stat().st_mtime_ns
    res = run_sweep(input_sizes="32", model="replknet_31b", reparam="deploy", num_images=2,
                    overrides={"channels": (8, 8, 8, 8), "layers": (1, 1, 1, 1)}, out=out, formats=("png",),
                    show_progress=False)
    assert res["main"] and (out / "S32-deploy" / "erf.npy").stat().st_mtime_ns == stamp


def test_each_process_takes_its_own_gpu_and_a_shared_one_is_refused(monkeypatch):
    """Under torchrun ``--device cuda`` gives process i ``cuda:<LOCAL_RANK>``; ``cuda:N`` is kept with one process
    on the node and refused, on every rank and before any joins the process group, with several (they would all
    run on GPU N)."""
    import pytest
    import torch

    from erf_lab.errors import ErfLabError

    for key, value in {"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)  # a node with two GPUs, whatever this machine has
    info = D.env_info()
    assert (info.rank, info.world_size, info.local_rank, info.local_world_size) == (3, 4, 1, 2)
    assert D.device_for("cuda", info) == "cuda:1" and D.device_for("cpu", info) == "cpu"
    with pytest.raises(ErfLabError, match=r"--device cuda:0 names one GPU, but torchrun started 2 processes"):
        D.device_for("cuda:0", info)
    with pytest.raises(ErfLabError, match="CUDA_VISIBLE_DEVICES"):
        D.init("cuda:0")  # refused before torch.cuda or the process group is touched (this machine may have no GPU)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")  # one process per node: the GPU it names is its own
    assert D.device_for("cuda:3", D.env_info()) == "cuda:3"
    assert D.device_for("cuda:0", D.DistInfo()) == "cuda:0"  # one process: as given
    with pytest.raises(ErfLabError, match="'cudax' is no device name"):
        D.device_for("cudax", D.env_info())
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    # two processes on a node with one GPU: both would run on it, which NCCL refuses ("Duplicate GPU detected")
    for device in ("cuda", "cuda:0"):
        with pytest.raises(ErfLabError, match="started 2 processes on this node, which has 1 GPU: NCCL runs one"):
            D.device_for(device, D.env_info())
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-5")  # the launcher gave each process its own GPU
    assert D.device_for("cuda", D.env_info()) == D.device_for("cuda:0", D.env_info()) == "cuda:0"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.delenv("LOCAL_WORLD_SIZE")  # another launcher (a container per process, one GPU each): its own
    monkeypatch.delenv("LOCAL_RANK")
    assert D.device_for("cuda", D.env_info()) == "cuda:0"
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # 8 processes, 2 GPUs
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ErfLabError, match="started 8 processes on this node, which has 2 GPUs"):
        D.device_for("cuda", D.env_info())


_SHARED_GPU_RANK = """
import os, sys, torch.distributed as dist
from erf_lab.erf import distributed as D
from erf_lab.errors import ErfLabError
dist.init_process_group("gloo")
ids = sys.argv[1].split(",")
try:
    D.refuse_shared_gpus(ids[int(os.environ["RANK"])], D.env_info())
    print("ok")
except ErfLabError as e:
    print("refused:", e)
dist.destroy_process_group()
"""


def test_two_ranks_on_one_gpu_are_refused_on_every_rank_before_nccl_runs():
    """The identities of the ranks' GPUs meet over gloo; a shared one (a whole torchrun job under
    ``CUDA_VISIBLE_DEVICES=0``: each process sees one GPU and cannot tell it is not its own) gives every rank the
    same line, where NCCL would fail at the first collective with "Duplicate GPU detected". 3 gloo ranks on CPU,
    GPU identities given."""
    port = _free_port()

    def ranks(ids: str) -> list[str]:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "WORLD_SIZE": "3", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port)}
        procs = [subprocess.Popen([sys.executable, "-c", _SHARED_GPU_RANK, ids], env={**env, "RANK": str(r)},
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(3)]
        outs = [p.communicate(timeout=120) for p in procs]
        assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
        return [o[0].strip() for o in outs]

    assert ranks("GPU-a,GPU-b,GPU-c") == ["ok"] * 3
    port = _free_port()
    host = socket.gethostname()
    line = (f"refused: ranks 0 and 2 run on the same GPU (GPU-a on {host}): NCCL runs one process per GPU; give each "
            "its own (leave CUDA_VISIBLE_DEVICES unset for the whole job, or set it per process) or start fewer "
            "(--nproc_per_node)")
    assert ranks("GPU-a,GPU-b,GPU-a") == [line] * 3


_TAKE_ON_RANK0 = '''import os, subprocess, sys
import erf_lab.erf.runner as R
from erf_lab.cli.main import main
HOLD = "import fcntl, os, sys, time\\nfd = os.open(sys.argv[1], os.O_RDONLY)\\nfcntl.flock(fd, fcntl.LOCK_EX)\\n" \\
       "print('held', flush=True)\\nsys.stdin.read()\\n"
orig = R._existing
def taken(out_dir, *a, **k):  # another process makes and holds the new folder after the setup looked
    if os.environ.get("RANK") == "0" and not out_dir.exists():
        out_dir.mkdir(parents=True)
        p = subprocess.Popen([sys.executable, "-c", HOLD, str(out_dir)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True)
        assert p.stdout.readline().strip() == "held"
    return orig(out_dir, *a, **k)
R._existing = taken
sys.exit(main(sys.argv[1:]))
'''


def test_a_torchrun_sweep_into_a_folder_in_use_stops_every_rank_with_one_line(tmp_path):
    """Rank 0 holds the sweep's folder (rank 0 writes it); held by another erf-lab process, every rank stops with
    one line said once (rank 1's "rank 0 stopped" left out on rank 0's node), and nothing is written there."""
    out = tmp_path / "sweep"
    out.mkdir()
    with held_by_another_process(out):
        proc = _torchrun("-m", "erf_lab", "sweep", "--input-sizes", "32", *ARGS[:6], "--reparam", "deploy",
                         "--num-images", "2", "--quiet", "--out", str(out), timeout=600)
    assert proc.returncode != 0 and "Connection closed by peer" not in proc.stderr, proc.stderr[-3000:]
    said = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert said == [f"erf-lab sweep: error: --out {out} is in use: another erf-lab process is writing a run there "
                    "now; wait for it to end (or stop it) and run the command again, or choose another --out"], said
    assert list(out.iterdir()) == []


def test_a_new_folder_taken_meanwhile_stops_every_rank_with_one_line(tmp_path):
    """Rank 0 holds the run folder it makes; when another process made and holds it after the setup looked (a race
    of two computes on one new --out), every rank stops with one line (before: rank 0 alone raised, and rank 1 died
    in the next collective with gloo's 'Connection closed by peer' traceback)."""
    import pytest

    pytest.importorskip("fcntl")
    script = tmp_path / "take.py"
    script.write_text(_TAKE_ON_RANK0)
    out = tmp_path / "run"
    proc = _torchrun(str(script), "compute", *ARGS, "--out", str(out), timeout=600)
    assert proc.returncode != 0
    assert "Connection closed by peer" not in proc.stderr, proc.stderr[-3000:]
    # rank 0 says why; rank 1's line naming it ("rank 0 stopped: ...") is left out on rank 0's node
    assert proc.stderr.count("erf-lab compute: error:") == 1, proc.stderr[-3000:]
    assert f"erf-lab compute: error: --out {out} is in use" in proc.stderr
    assert not any(out.iterdir())


def test_errors_every_rank_raises_alike_are_said_once_per_node(tmp_path):
    """Under torchrun an error every rank raised alike was printed once per process. Now the node's first process
    prints a setup error every rank meets (an unknown model, gathered with the ranks' settings); every rank exits
    with status 2. An option checked before the ranks meet (--input-size) is still said by every process that got
    as far (torchrun ends the others when one exits; the first process may be the one ended)."""
    for args, line in [(["--input-size", "99999"], "erf-lab compute: error: --input-size 99999 is above the maximum"),
                       (["--override", "channels=(8,8,8,8)"], "erf-lab compute: error: unknown model 'replknet_31x'")]:
        out = tmp_path / "run"
        proc = _torchrun("-m", "erf_lab", "compute", "--model",
                         "replknet_31x" if "channels=(8,8,8,8)" in args else "replknet_31b", *args, "--quiet", "--out",
                         str(out))
        assert proc.returncode != 0 and "(exitcode: 2)" in proc.stderr, proc.stderr[-3000:]
        # an option refused before the ranks meet: every process says it (torchrun may end one before it does)
        said = (1, 2) if "--input-size" in args else (1,)
        assert proc.stderr.count("erf-lab compute: error:") in said and line in proc.stderr, proc.stderr[-3000:]
        assert not out.exists()
    # a folder holding a complete run: rank 0 decides for every rank (a node may see other files there)
    done = tmp_path / "done"
    run_erf(ErfSpec("replknet_31b", overrides={"channels": (8, 8, 8, 8), "layers": (1, 1, 1, 1)}, num_images=3,
                    input_size=32), out=done, show_progress=False)
    proc = _torchrun("-m", "erf_lab", "compute", *ARGS, "--out", str(done))
    assert proc.returncode != 0 and proc.stderr.count("erf-lab compute: error:") == 1, proc.stderr[-3000:]
    assert f"erf-lab compute: error: {done} already holds a complete run; use --force" in proc.stderr


def test_a_damaged_state_of_one_rank_stops_every_rank_with_its_line(tmp_path):
    """--resume where rank 1's saved state is damaged: rank 1 raised its line and rank 0 went on into the next
    collective (a hang or gloo's 'Connection closed by peer'). The ranks' states are read, then checked together:
    rank 1 says why, every rank exits with status 2."""
    out = tmp_path / "run"
    out.mkdir()
    (out / ".erf_state.rank1of2.npz").write_bytes(b"not a saved state" * 8)
    proc = _torchrun("-m", "erf_lab", "compute", *ARGS, "--out", str(out), "--resume")
    assert proc.returncode != 0 and "(exitcode: 2)" in proc.stderr, proc.stderr[-3000:]
    assert "Connection closed by peer" not in proc.stderr, proc.stderr[-3000:]
    line = f"erf-lab compute: error: cannot read the saved state {out / '.erf_state.rank1of2.npz'}"
    assert line in proc.stderr and proc.stderr.count("Traceback") == 1, proc.stderr[-3000:]
    assert not (out / "run.json").exists()


def test_commands_that_run_in_one_process_are_refused_under_torchrun(monkeypatch, capsys, tmp_path):
    """Under torchrun every process of shape-bias, reparam, study, ... ran the whole job and wrote the same outputs
    (N times the work, racing on one folder). They are refused before any work, in one line (by every process: the
    ranks have not met); compute, sweep and train run (one share each)."""
    from erf_lab.cli.main import _distributed_commands, main

    assert [n for n, d in _distributed_commands().items() if d] == ["compute", "sweep", "train"]
    monkeypatch.setenv("WORLD_SIZE", "2")
    out = tmp_path / "sb"
    for local_rank, said in (("0", 1), ("1", 1)):  # no MASTER_ADDR, the ranks cannot meet: said by every process
        monkeypatch.setenv("LOCAL_RANK", local_rank)
        assert main(["shape-bias", "--model", "efficientnet_lite0", "--pretrained", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("erf-lab shape-bias: error: shape-bias runs in one process; start it without torchrun "
                         "(under torchrun: compute, sweep, train)") == said, err
    assert not out.exists()


_DECIDE_RANK = """
import os, sys, torch.distributed as dist
from erf_lab.erf import distributed as D
from erf_lab.errors import ErfLabError
dist.init_process_group("gloo")
info = D.env_info()
for kind in sys.argv[1:]:
    def decide():
        if kind == "oserror":
            raise PermissionError(13, "Permission denied", "/runs/x")
        if kind == "refused":
            raise ErfLabError("/runs/x already holds a complete run")
        return {"action": "new", "rank": info.rank}
    try:
        print(kind, "ok", D.decided_on_rank0(decide, info), flush=True)
    except Exception as e:
        print(kind, type(e).__name__, getattr(e, "every_rank", False), e, flush=True)
dist.destroy_process_group()
"""


def test_a_decision_of_rank_0_reaches_every_rank_even_when_it_fails():
    """What rank 0 decides alone (what a folder holds, its first writes) reaches every rank; when it fails, every
    rank stops instead of waiting in the broadcast: an erf-lab error with the same line everywhere (said once per
    node), any other error (a PermissionError) as it is on rank 0 and named elsewhere. Before, an OSError on rank 0
    left the others waiting."""
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port)}
    procs = [subprocess.Popen([sys.executable, "-c", _DECIDE_RANK, "ok", "oserror", "refused"],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    rank0, rank1 = (o[0].splitlines() for o in outs)
    assert rank0[0] == rank1[0] == "ok ok {'action': 'new', 'rank': 0}"
    assert rank0[1] == "oserror PermissionError False [Errno 13] Permission denied: '/runs/x'"
    assert rank1[1] == ("oserror ErfLabError True rank 0 stopped: PermissionError: [Errno 13] Permission denied: "
                        "'/runs/x'")
    assert rank0[2] == rank1[2] == "refused ErfLabError True /runs/x already holds a complete run"


def test_a_torchrun_sweep_of_several_members_keeps_one_process_group(tmp_path):
    """Every member of a sweep joined and destroyed its own process group; the second one met the first group's
    stale addresses on torchrun's store and failed (gloo's 'Connection refused' traceback) or hung. Now the sweep
    holds one group for all its members."""
    out = tmp_path / "sweep"
    proc = _torchrun_erf_lab("sweep", "--input-sizes", "32,48", "--model", "replknet_31b", "--reparam", "both",
                             "--override", "channels=(8,8,8,8)", "--override", "layers=(1,1,1,1)", "--num-images",
                             "2", "--formats", "png", "--quiet", "--out", str(out))
    assert proc.stdout.count("wrote ") == 1 and (out / "sweep.csv").is_file()
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["S32-deploy", "S32-train", "S48-deploy",
                                                                      "S48-train"]


def test_a_resume_with_another_number_of_processes_is_refused_once(tmp_path):
    """Each process resumes its own state file: a run interrupted with 2 processes and resumed with 1 (or the other
    way round) ignored the saved images, said there was no interrupted run and left the other state files beside
    the finished run. Now it is one line (once per node under torchrun), the state kept. A complete folder, re-run
    without --resume, is said once per node too (before: once per process)."""
    import pytest

    from erf_lab.erf.compute import Accumulator
    from erf_lab.errors import ErfLabError

    spec = ErfSpec("replknet_31b", overrides={"channels": (8, 8, 8, 8), "layers": (1, 1, 1, 1)}, num_images=3,
                   input_size=32)
    out = tmp_path / "run"
    out.mkdir()
    Accumulator().save(out / ".erf_state.rank0of2.npz", {"config": {}})
    with pytest.raises(ErfLabError, match=r"interrupted with 2 processes, this run has 1; resume it with 2 processes"):
        run_erf(spec, out=out, resume=True, show_progress=False)
    assert sorted(p.name for p in out.iterdir()) == [".erf_state.rank0of2.npz"]

    (out / ".erf_state.rank0of2.npz").rename(out / ".erf_state.npz")
    for extra, line in [(["--resume"], "cannot resume"), ([], "already holds a complete run; use --force")]:
        if not extra:
            run_erf(spec, out=out, force=True, show_progress=False)
        proc = _torchrun("-m", "erf_lab", "compute", *ARGS, *extra, "--out", str(out))
        assert proc.returncode != 0 and "(exitcode: 2)" in proc.stderr, proc.stderr[-3000:]
        assert proc.stderr.count("erf-lab compute: error:") == 1 and line in proc.stderr, proc.stderr[-3000:]
    assert not list(out.glob(".erf_state*"))


def test_a_rank_whose_weights_file_is_missing_stops_every_rank(tmp_path):
    """Rank 1's node lacks the --weights file (a relative path, started in its own folder): it stopped before
    joining the process group and rank 0 waited there forever (compute and sweep). Now rank 1 says why and rank 0
    names it; nothing is left behind."""
    import torch

    from erf_lab.models import create_model

    for rank in (0, 1):
        (tmp_path / f"node{rank}").mkdir()
    torch.save(create_model("replknet_31b", channels=(8, 8, 8, 8), layers=(1, 1, 1, 1)).state_dict(),
               tmp_path / "node0" / "w.pth")
    sweep = ["--input-sizes", "32", "--reparam", "deploy", *ARGS[:6], "--num-images", "2", "--quiet"]
    for command, args in (("compute", ARGS), ("sweep", sweep)):
        port, procs = str(_free_port()), []
        for rank in (0, 1):
            env = {**os.environ, "OMP_NUM_THREADS": "1", "RANK": str(rank), "LOCAL_RANK": "0", "WORLD_SIZE": "2",
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
            procs.append(subprocess.Popen([sys.executable, "-m", "erf_lab", command, *args, "--weights", "w.pth",
                                           "--out", str(tmp_path / "out")], cwd=tmp_path / f"node{rank}", env=env,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        try:
            errs = [p.communicate(timeout=60)[1] for p in procs]
        finally:
            for p in procs:
                p.kill()
        lines = [[ln for ln in err.splitlines() if "error" in ln.lower()] for err in errs]
        assert lines[1] == [f"erf-lab {command}: error: weights file not found: w.pth"], errs
        assert lines[0] == [f"erf-lab {command}: error: rank 1 stopped: weights file not found: w.pth"], errs
        assert [p.returncode for p in procs] == [2, 2] and not (tmp_path / "out").exists()


def test_a_sweep_folder_removed_by_another_process_meanwhile_keeps_the_refusal(tmp_path, monkeypatch):
    """Two processes of a node both pass the sweep's checks and make --out; another rank refuses, and both remove
    the empty folder again. The one that came second (its check passed, the other's rmdir came first) raised
    FileNotFoundError instead of the line naming the rank that stopped. Now it says that line."""
    import pathlib

    import pytest

    from erf_lab.erf import sweep
    from erf_lab.errors import ErfLabError

    out = tmp_path / "sw"
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(D, "init", lambda device="cpu": D.DistInfo(rank=1, world_size=3, backend="gloo"))
    monkeypatch.setattr(D, "shutdown", lambda info: None)

    def refused(obj, error, info):
        raise ErfLabError("rank 2 stopped: weights file not found: w.pth")

    monkeypatch.setattr(D, "gather_or_fail", refused)
    real_rmdir = pathlib.Path.rmdir

    def rmdir_after_another_process(self):
        if self == out:
            real_rmdir(self)  # the node's other process came first
        real_rmdir(self)

    monkeypatch.setattr(pathlib.Path, "rmdir", rmdir_after_another_process)
    with pytest.raises(ErfLabError, match="rank 2 stopped: weights file not found"):
        sweep.run_sweep(input_sizes=[32], model="replknet_31b", reparam="deploy", num_images=2,
                        overrides={"channels": (8, 8, 8, 8), "layers": (1, 1, 1, 1)}, out=out, show_progress=False)
    assert not out.exists()


_INTERRUPT_THEN_RESUME = """
import json, os, sys, torch.distributed as dist
from erf_lab.erf import distributed as D
from erf_lab.erf.runner import ErfSpec, run_erf
dist.init_process_group("gloo")  # one group for both runs (run_erf keeps a group its caller joined)
spec = ErfSpec("replknet_31b", overrides={"channels": (8, 8, 8, 8), "layers": (1, 1, 1, 1)}, num_images=5,
               input_size=32, batch_size=1)
def stop(acc):  # rank r stops after r + 1 of its images: 1 + 2 measured before the resume
    if len(acc.processed) == D.env_info().rank + 1:
        raise KeyboardInterrupt
try:
    run_erf(spec, out=sys.argv[1], show_progress=False, on_batch=stop, checkpoint_seconds=1e9)
except KeyboardInterrupt:
    pass
if sys.argv[2] == "rank 0 saved none" and D.env_info().rank == 0:
    os.remove(os.path.join(sys.argv[1], ".erf_state.rank0of2.npz"))
dist.barrier()
res = run_erf(spec, out=sys.argv[1], resume=True, show_progress=False)
if res["run_info"] is not None:
    info = res["run_info"]
    print(json.dumps([info["resumed"], info["resumed_after_images"], info["sessions"][-1]["after_images"],
                      info["num_used"], [s["after_images"] for s in info["sessions"]]]))
dist.destroy_process_group()
"""


@pytest.mark.parametrize("case", ["both saved", "rank 0 saved none"])
def test_a_torchrun_resume_counts_the_images_every_rank_measured_before(case, tmp_path):
    """A 2-rank run stopped after 1 image of rank 0 and 2 of rank 1, then resumed: run.json said it resumed after 1
    image (rank 0's own count); where rank 0 had saved none, it said there was no interrupted run, and run.json
    that it was not resumed, while rank 1 resumed its own. Now the ranks' counts are summed, and the map is the
    1-process map, and run.json lists the interrupted session."""
    script = tmp_path / "resume.py"
    script.write_text(_INTERRUPT_THEN_RESUME)
    out = tmp_path / "run"
    proc = _torchrun(str(script), str(out), case)
    assert proc.returncode == 0, proc.stderr[-3000:]
    before = 3 if case == "both saved" else 2
    # the interrupted session is listed too (it was lost where rank 0 had saved none)
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [True, before, before, 5, [0, before]]
    assert "no interrupted run" not in proc.stderr
    one = run_erf(ErfSpec("replknet_31b", overrides={"channels": (8, 8, 8, 8), "layers": (1, 1, 1, 1)},
                          num_images=5, input_size=32), out=tmp_path / "one", show_progress=False)
    two = np.load(out / "erf.npy")
    assert np.abs(two - one["result"].erf).max() <= 1e-6 * np.abs(one["result"].erf).max()


def _folder_with_junk(root):
    """Two images, one unreadable .png and one text file: what the folder scan warns about."""
    from PIL import Image

    root.mkdir(parents=True)
    for i in range(2):
        Image.fromarray(np.full((40, 40, 3), 60 * (i + 1), dtype=np.uint8)).save(root / f"img{i}.png")
    (root / "bad.png").write_text("not an image")
    (root / "notes.txt").write_text("hello")


def test_what_the_folder_scan_warns_is_said_once_per_node(tmp_path):
    """Every process of a node scans the same --images folder: its unreadable and non-image files were warned about
    once per process (N identical lines under --nproc_per_node N). Now by the node's first process alone."""
    _folder_with_junk(tmp_path / "imgs")
    proc = _torchrun_erf_lab("compute", *ARGS[:6], "--images", str(tmp_path / "imgs"), "--input-size", "32",
                             "--quiet", "--out", str(tmp_path / "run"))
    assert proc.stderr.count("erf-lab compute: warning: skipped 1 unreadable image file(s)") == 1, proc.stderr[-3000:]
    assert proc.stderr.count("erf-lab compute: warning: ignored 1 non-image file(s)") == 1, proc.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "run.json").read_text())["num_used"] == 2


@pytest.mark.parametrize("rank, local_rank, said", [("0", "0", ["job", "node", "rank"]), ("1", "1", ["rank"]),
                                                     ("2", "0", ["node", "rank"]), ("2", None, ["rank"])])
def test_a_warning_is_said_by_the_ranks_it_concerns(rank, local_rank, said, monkeypatch, capsys):
    """Under torchrun (WORLD_SIZE 4, 2 nodes of 2) the CLI says a warning about the job (every rank meets it alike)
    in rank 0 alone; one about a node's folder (NodeWarning) in each node's first process (LOCAL_RANK 0; without
    LOCAL_RANK, RANK); one about a rank's own share (RankWarning) in that rank. Before: every process said each."""
    import warnings

    from erf_lab.cli.options import warnings_as_lines
    from erf_lab.errors import NodeWarning, RankWarning

    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", rank)
    if local_rank is None:
        monkeypatch.delenv("LOCAL_RANK", raising=False)
    else:
        monkeypatch.setenv("LOCAL_RANK", local_rank)
    with warnings_as_lines("compute"):
        warnings.simplefilter("always")
        for text, category in (("job", UserWarning), ("node", NodeWarning), ("rank", RankWarning)):
            warnings.warn(text, category)
    assert capsys.readouterr().err.splitlines() == [f"erf-lab compute: warning: {w}" for w in said]


_INTERRUPTED_CLI = """
import sys
from erf_lab.cli.main import main
from erf_lab.erf import runner

measure = runner.run_erf


def run_erf(*args, **kwargs):  # each rank stopped after its first image, as by Ctrl-C
    def stop(acc):
        raise KeyboardInterrupt
    return measure(*args, **{**kwargs, "on_batch": stop})


runner.run_erf = run_erf
sys.exit(main(sys.argv[1:]))
"""


def test_an_interrupted_torchrun_job_says_so_once_per_node(tmp_path):
    """Ctrl-C reaches every process of a torchrun job: each printed 'interrupted' (N lines for N processes). Now the
    node's first process says it; every process ends with status 130 and keeps its share for --resume."""
    script = tmp_path / "interrupt.py"
    script.write_text(_INTERRUPTED_CLI)
    out = tmp_path / "run"
    proc = _torchrun(str(script), "compute", *ARGS, "--out", str(out))
    assert proc.returncode != 0 and "exitcode  : 130" in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.count("erf-lab compute: interrupted") == 1, proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == [".erf_state.rank0of2.npz", ".erf_state.rank1of2.npz"]
    # where the progress is, said once, by rank 0 (without its own share's count: the job's is not its own)
    said = f"stopped: progress saved in {out}; continue with the same command and --resume --out {out}"
    assert proc.stderr.count("progress saved") == 1 and said in proc.stderr.splitlines(), proc.stderr[-3000:]


_SLOW_FIRST = """import os, sys, time
if os.environ.get("LOCAL_RANK") == "0":
    time.sleep(3)  # the node's first process starts late (a loaded node, imports over NFS)
from erf_lab.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_torchrun_sweep_refused_by_its_first_member_leaves_no_folder_when_rank_0_starts_late(tmp_path):
    """Every rank makes the sweep's --out in its checks; rank 0, started late, found the folder rank 1 had made and
    took it for the user's: after the first member's refusal (an unknown --layer) it left it behind, empty. Now
    the folder is the job's where any rank found it missing."""
    script = tmp_path / "slow_first.py"
    script.write_text(_SLOW_FIRST)
    out = tmp_path / "sweep"
    proc = _torchrun(str(script), "sweep", "--input-sizes", "32", "--reparam", "deploy", *ARGS[:6], "--num-images",
                     "1",
                     "--layer", "bogus", "--quiet", "--out", str(out))
    assert proc.returncode != 0 and "erf-lab sweep: error: unknown layer 'bogus'" in proc.stderr, proc.stderr[-3000:]
    assert not out.exists()


_RANK_1_DIES = """
import os, sys
from erf_lab.cli.main import main
from erf_lab.erf import runner

measure = runner.run_erf


def run_erf(*args, **kwargs):  # rank 1 is killed after its first image (os._exit: no clean-up, as by SIGKILL)
    def die(acc):
        if os.environ["RANK"] == "1":
            os._exit(9)
    return measure(*args, **{**kwargs, "on_batch": die})


runner.run_erf = run_erf
sys.exit(main(sys.argv[1:]))
"""


def test_a_rank_that_dies_mid_run_leaves_the_others_one_line_and_their_share(tmp_path):
    """Two processes started by hand (a scheduler's launcher: no torchrun agent to end the others): rank 1 dies
    after its first image; rank 0 met the closed connection in the next collective and died of gloo's RuntimeError
    traceback. Now one line saying another process is gone, exit status 1, and rank 0's images kept for --resume."""
    script = tmp_path / "die.py"
    script.write_text(_RANK_1_DIES)
    port, out, procs = str(_free_port()), tmp_path / "run", []
    for rank in (0, 1):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        procs.append(subprocess.Popen([sys.executable, str(script), "compute", *ARGS, "--num-images", "4",
                                       "--batch-size", "1", "--out", str(out)], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    err0 = procs[0].communicate(timeout=300)[1]
    procs[1].communicate(timeout=60)
    assert procs[1].returncode == 9
    assert procs[0].returncode == 1 and "Traceback" not in err0, err0[-3000:]
    lines = [ln for ln in err0.splitlines() if ln.startswith("erf-lab")]
    assert len(lines) == 1 and re.fullmatch(
        r"erf-lab compute: error: another process of this multi-process job is gone or stopped answering \(.*"
        r"Connection (closed|reset) by peer.*\): its own output says why; what was saved is kept \(compute and "
        r"train continue with --resume, a sweep with the same command\)", lines[0]), err0
    assert sorted(p.name for p in out.iterdir()) == [".erf_state.rank0of2.npz"]


_RANK_1_HANGS = """
import os, sys, time
from erf_lab.cli.main import main
from erf_lab.erf import runner

measure = runner.run_erf


def run_erf(*args, **kwargs):  # rank 1 hangs after its first image (alive, silent: a stuck filesystem, a deadlock)
    def hang(acc):
        if os.environ["RANK"] == "1":
            time.sleep(90)  # torchrun ends it once rank 0 has stopped
    return measure(*args, **{**kwargs, "on_batch": hang})


runner.run_erf = run_erf
sys.exit(main(sys.argv[1:]))
"""


def test_a_rank_that_hangs_leaves_the_others_one_line_naming_the_timeout_setting(monkeypatch, tmp_path):
    """Rank 1 hangs (alive, silent) after its first image: rank 0 waited in its next collective for torch's 30
    minutes, with no way to shorten it. Now ERF_LAB_RANK_TIMEOUT sets the process group's timeout: rank 0 stops
    after 10 s with one line naming it (exit status 1), its share kept, and torchrun ends the hung rank."""
    script = tmp_path / "hang.py"
    script.write_text(_RANK_1_HANGS)
    out = tmp_path / "run"
    monkeypatch.setenv("ERF_LAB_RANK_TIMEOUT", "10")
    start = time.monotonic()
    proc = _torchrun(str(script), "compute", *ARGS, "--num-images", "4", "--batch-size", "1", "--out", str(out),
                     timeout=240)
    took = time.monotonic() - start
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("erf-lab")]
    assert proc.returncode != 0 and lines == [
        "erf-lab compute: error: another process of this multi-process job stopped answering: no answer from the "
        "other ranks within 10 s (ERF_LAB_RANK_TIMEOUT); what was saved is kept (compute and train continue with "
        "--resume, a sweep with the same command)"], proc.stderr[-3000:]
    assert re.search(r"rank\s*: 0 \(local_rank: 0\)\s*\n\s*exitcode\s*: 1 ", proc.stderr), proc.stderr[-3000:]
    assert took < 45, took  # the 10 s timeout, not torch's 30 minutes (nor the hung rank's 90 s)
    assert ".erf_state.rank0of2.npz" in {p.name for p in out.iterdir()}


def test_a_torchrun_sweep_whose_out_is_not_shared_between_nodes_is_written_by_rank_0(tmp_path):
    """Two nodes whose --out is each its own disk (simulated: two processes started by hand in two folders, with one
    relative --out): every rank read each member back from its own --out, so rank 1 stopped with 'no such run
    directory' after the first member (and rank 0 with it at the next). Now rank 0 reads the members and gives them
    to the others: both end with status 0 and rank 0's node holds the whole sweep."""
    port, procs = str(_free_port()), []
    for rank in (0, 1):
        (tmp_path / f"node{rank}").mkdir()
        env = {**os.environ, "OMP_NUM_THREADS": "1", "RANK": str(rank), "LOCAL_RANK": "0", "WORLD_SIZE": "2",
               "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        procs.append(subprocess.Popen([sys.executable, "-m", "erf_lab", "sweep", "--input-sizes", "32,48", *ARGS[:6],
                                       "--num-images", "1", "--reparam", "deploy", "--quiet", "--out", "sweep"],
                                      cwd=tmp_path / f"node{rank}", env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    record = json.loads((tmp_path / "node0" / "sweep" / "sweep.json").read_text())
    assert record["complete"] and [r["run_dir"] for r in record["rows"]] == ["S32-deploy", "S48-deploy"]
    assert all((tmp_path / "node0" / "sweep" / m / "erf.npy").is_file() for m in ("S32-deploy", "S48-deploy"))
    assert not any((tmp_path / "node1" / "sweep").iterdir())  # rank 1 wrote nothing on its own disk


_DIE_ON_THE_FIRST_TRY = """
import os, signal, sys
from erf_lab.erf.runner import ErfSpec, run_erf
spec = ErfSpec("replknet_31b", overrides={"channels": (8, 8, 8, 8), "layers": (1, 1, 1, 1)}, num_images=5,
               input_size=32, batch_size=1)
def die(acc):  # the first try: rank 1 dies without warning (saved after each image), torchrun ends rank 0
    if os.environ["TORCHELASTIC_RESTART_COUNT"] == "0" and os.environ["RANK"] == "1" and len(acc.processed) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
run_erf(spec, out=sys.argv[1], show_progress=False, on_batch=die, checkpoint_seconds=0)
"""


def test_a_job_restarted_by_torchrun_continues_what_the_failed_try_saved(tmp_path):
    """``torchrun --max-restarts 1``: after rank 1 died, torchrun ran the same command again, which refused the
    folder ("holds an interrupted run; pass --resume"), so the restart failed too. Now the restart continues the
    run (rank 1's 2 images and rank 0's share are not measured again) and gives the 1-process map. The first try
    runs under torchrun; the restart as torchrun starts it (``torchrun_restart``)."""
    script = tmp_path / "die.py"
    script.write_text(_DIE_ON_THE_FIRST_TRY)
    out = tmp_path / "run"
    first = _torchrun(str(script), str(out))
    assert first.returncode != 0 and list(out.glob(".erf_state*")), first.stderr[-3000:]
    tries = torchrun_restart([str(script), str(out)])
    assert [code for code, _ in tries] == [0, 0] and all("holds an interrupted run" not in e for _, e in tries), tries
    info = json.loads((out / "run.json").read_text())
    assert info["resumed"] and info["resumed_after_images"] >= 2 and info["num_used"] == 5
    assert [s["launch"]["restart_count"] for s in info["sessions"]] == [0, 1]
    assert not list(out.glob(".erf_state*"))
    one = run_erf(ErfSpec("replknet_31b", overrides={"channels": (8, 8, 8, 8), "layers": (1, 1, 1, 1)},
                          num_images=5, input_size=32), out=tmp_path / "one", show_progress=False)
    two = np.load(out / "erf.npy")
    assert np.abs(two - one["result"].erf).max() <= 1e-6 * np.abs(one["result"].erf).max()


def test_the_default_folder_is_the_same_for_every_try_of_a_torchrun_job():
    """Without --out the folder is runs/<model>-<images>-<size>-<time>: a try that ``torchrun --max-restarts``
    started again (a new process of the same torchrun agent, seconds later) named a new one, left the failed try's
    behind and measured every image again. Now the time is when the agent began: every try names the same folder."""
    code = "from erf_lab.erf.runner import default_out_dir; print(default_out_dir('m', 'imgs', 32))"
    env = {**os.environ, "TORCHELASTIC_RUN_ID": "none", "TORCHELASTIC_RESTART_COUNT": "0"}
    names = []
    for restart in ("0", "1"):  # this process plays the agent: the parent of each try
        env["TORCHELASTIC_RESTART_COUNT"] = restart
        names.append(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                    check=True).stdout.strip())
        time.sleep(1.1)
    assert names[0] == names[1] and names[0].startswith(os.path.join("runs", "m-imgs-32-")), names
    assert D.job_started() is None and "TORCHELASTIC_RUN_ID" not in os.environ  # outside torchrun: the time now


@pytest.mark.parametrize("command, args, said", [
    ("compute", [*ARGS, "--resume", "--force"], "--resume and --force exclude each other"),
    ("compute", [*ARGS, "--checkpoint-seconds", "-1"], "--checkpoint-seconds must be 0 or more, got -1"),
    ("train", [*ARGS[:6], "--resume", "--force"], "--resume and --force exclude each other"),
    # checked by the command line itself before the ranks met: said by every process
    ("sweep", ["--input-sizes", "32", "--input-size", "32", *ARGS[:6], "--quiet"],
     "--input-size and --input-sizes exclude each other"),
    ("compute", [*ARGS, "--override", "foo"], "--override expects key=value (a Python identifier as key), got 'foo'"),
    ("train", [*ARGS[:6], "--data", "nowhere", "--train-size", "5"], "--train-size sets cue-world's image counts"),
    ("train", [*ARGS[:6], "--epochs", "0"], "--epochs must be at least 1, got 0"),
    # a command that runs in one process, refused under torchrun
    ("shape-bias", ["--model", "resnet18"], "shape-bias runs in one process; start it without torchrun"),
    ("timeline", ["nowhere"], "timeline runs in one process; start it without torchrun")])
def test_options_refused_are_said_once_per_node(command, args, said, tmp_path):
    """An option refused alike by every rank (``--resume --force``, a negative --checkpoint-seconds, ``--input-size``
    with ``--input-sizes``, a bad --override, --epochs 0, a command that runs in one process) was checked before the
    ranks met: said once per process (N identical lines on a node of N GPUs). Now held until the ranks have met:
    rank 0 says it, rank 1 is silent, both exit with status 2."""
    ranks = two_processes(["-m", "erf_lab", command, *args, "--out", str(tmp_path / "o")], timeout=120)
    errs = [err for _, _, err in ranks]
    assert [code for code, _, _ in ranks] == [2, 2], errs
    lines = (errs[0] + errs[1]).strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"erf-lab {command}: error: {said}") and errs[1] == "", errs
    assert not (tmp_path / "o").exists()


def test_warnings_and_notes_of_a_torchrun_job_are_said_once(tmp_path):
    """What every rank meets alike (which of a checkpoint's two sets of weights loaded, a run already complete) was
    said by every process: under torchrun --nproc_per_node 8, eight identical warnings. Now rank 0 says it once."""
    import torch

    from erf_lab.models import create_model

    net = create_model("replknet_31b", channels=(8, 8, 8, 8), layers=(1, 1, 1, 1))
    torch.save({"model": net.state_dict(), "model_ema": net.state_dict()}, tmp_path / "two.pth")
    argv = ["-m", "erf_lab", "compute", *ARGS, "--weights", str(tmp_path / "two.pth"), "--out", str(tmp_path / "o")]
    for extra, note in (([], f"wrote {tmp_path / 'o'}"),
                        (["--resume"], f"{tmp_path / 'o'} already holds a complete run; nothing to resume")):
        ranks = two_processes([*argv, *extra], timeout=120)
        assert [code for code, _, _ in ranks] == [0, 0], ranks
        out, err = "".join(o for _, o, _ in ranks), "".join(e for _, _, e in ranks)
        warning = (f"erf-lab compute: warning: {tmp_path / 'two.pth'} holds 2 sets of weights ('model', "
                   f"'model_ema'): loaded checkpoint['model']")
        assert err.count("warning:") == 1 and err.startswith(warning), err
        assert out.splitlines().count(note) == 1 and ranks[1][1] == "", out

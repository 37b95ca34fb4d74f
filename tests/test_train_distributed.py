"""``torchrun --nproc_per_node=2 -m erf_lab train`` (gloo, CPU) equals one process that accumulates the gradients
of the same two micro-batches (BatchNorm statistics per micro-batch, as on each rank), run the way ``train`` runs
on the CPU (``speed_levers``, channels_last) with one fastconv backend on both sides: AdamW's first steps move a
parameter whose gradient is only rounding noise (a BN bias before another BN) by about the learning rate in the
noise's direction, so both sides must compute the same rounding, not just the same mathematics. Its val metrics are
those of the saved model."""
import json
import os
import socket
import subprocess
import sys

import torch
import torch.nn.functional as F
from conftest import bad_idat_png

from erf_lab.erf.images import model_mean_std
from erf_lab.train.cue_world import CueWorld
from erf_lab.train.loop import build_model, speed_levers
from erf_lab.train.recipe import Recipe, build_optimizer, lr_at, set_lr
import fastconv

TINY = {"channels": (8, 8, 16, 16), "layers": (1, 1, 1, 1), "large_kernel_sizes": (7, 7, 7, 3)}
B, STEPS, TRAIN_SIZE = 4, 4, 32  # 32 images / (4 per rank x 2 ranks) = 4 steps
BACKEND = "cpp" if fastconv.cpu_kernels.cpp_available() else "channels_last"  # not timed: the same on both sides


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reference(recipe: Recipe) -> dict:
    ds = CueWorld("train", TRAIN_SIZE, 32, num_classes=4, seed=0)
    net = speed_levers(build_model("replknet_31b", TINY, 4, 0.0, seed=0), channels_last=True)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in model_mean_std(net))
    opt = build_optimizer(net, recipe)
    orders = []
    for rank in range(2):
        s = torch.utils.data.DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=0, drop_last=True)
        s.set_epoch(0)
        orders.append(list(s))
    net.train()
    for step in range(STEPS):
        set_lr(opt, lr_at(step, STEPS, round(recipe.warmup_epochs * STEPS), recipe.lr, recipe.min_lr))
        opt.zero_grad()
        for order in orders:  # rank r's batch = micro-batch r; DDP averages the two gradients
            items = [ds[i] for i in order[step * B:(step + 1) * B]]
            x = ((torch.stack([im for im, _ in items]) - mean) / std).contiguous(memory_format=torch.channels_last)
            y = torch.tensor([lab for _, lab in items])
            (F.cross_entropy(net(x), y, label_smoothing=recipe.label_smoothing) / 2).backward()
        opt.step()
    return dict(net.named_parameters())


def _torchrun_train(out, *args) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node 2 -m erf_lab train`` of the tiny RepLKNet on cue-world (4 classes, 32 px) into
    ``out``, one thread per rank; ``args``: the run's own options."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FASTCONV_BACKEND": BACKEND}
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "erf_lab", "train",
           "--model", "replknet_31b", "--override", "channels=(8,8,16,16)", "--override", "layers=(1,1,1,1)",
           "--override", "large_kernel_sizes=(7,7,7,3)", "--num-classes", "4", "--val-size", "8", "--input-size", "32",
           "--checkpoint-format", "safetensors", "--quiet", "--out", str(out), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def test_two_gloo_ranks_equal_one_process_with_accumulation(tmp_path):
    out = tmp_path / "ddp"
    proc = _torchrun_train(out, "--train-size", str(TRAIN_SIZE), "--epochs", "1", "--batch-size", str(B),
                           "--warmup-epochs", "0.5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Grad strides do not match bucket view strides" not in proc.stderr  # channels_last depthwise weights
    info = json.loads((out / "run.json").read_text())
    assert info["world_size"] == 2 and info["dist_backend"] == "gloo" and info["steps_per_epoch"] == STEPS
    # how it was started: torchrun's own command line (erf-lab's argv alone reruns it in one process)
    launch = info["launch"]
    assert launch["launcher"] == "torchrun" and (launch["world_size"], launch["local_world_size"]) == (2, 2)
    assert launch["argv"][1:3] == ["-m", "torch.distributed.run"] and "--nproc_per_node" in launch["argv"]
    assert proc.stdout.count("wrote ") == 1  # only rank 0 writes and reports
    from safetensors.torch import load_file

    ddp = load_file(out / "model.safetensors")
    torch.set_num_threads(1)
    with fastconv.use(backend=BACKEND):
        ref = _reference(Recipe(epochs=1, batch_size=B, warmup_epochs=0.5))
    worst = max(((ddp[k] - p.detach()).abs().max() / p.detach().abs().max().clamp_min(1e-12)).item()
                for k, p in ref.items())
    print(f"2 gloo ranks vs 1 process with gradient accumulation: max relative parameter error {worst:.2e}")
    assert worst < 1e-5  # float32 summation order (DDP averages the summed gradients): ~1e-7 .. 1e-6
    # the reported val loss is the saved model's (rank 0's BN statistics on every rank, not each rank its own)
    from erf_lab.train.loop import evaluate

    net = speed_levers(build_model("replknet_31b", TINY, 4), channels_last=True)
    net.load_state_dict(ddp)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in model_mean_std(net))
    with fastconv.use(backend=BACKEND):
        val_loss, _ = evaluate(net, CueWorld("val", 8, 32, num_classes=4, seed=0), batch_size=64, device="cpu",
                               mean=mean, std=std, channels_last=True)
    assert abs(val_loss - info["final"]["val_loss"]) < 1e-5 * val_loss, (val_loss, info["final"]["val_loss"])
    moved = max((ddp[k] - v).abs().max().item() for k, v in build_model("replknet_31b", TINY, 4).named_parameters())
    assert moved > 1e-3  # training changed the weights: the comparison is not trivial


_DRIVER = """
import gc
import os
import sys

import erf_lab.erf.distributed as D
from torch.nn.parallel import DistributedDataParallel
from erf_lab.train.loop import train
from erf_lab.train.recipe import Recipe

out, cut, resume = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "resume"
destroy_group = D.shutdown


def shutdown(info):  # a stopped run's traceback kept DDP (its reducer holds the group) alive past this point
    alive = sum(isinstance(o, DistributedDataParallel) for o in gc.get_objects())
    sys.stdout.flush()  # one write of the whole line: the two ranks share the pipe
    os.write(1, f"DDP objects alive at shutdown: {alive}\\n".encode())
    destroy_group(info)


D.shutdown = shutdown


def on_step(epoch, step):  # every rank stops at the same step, as after Ctrl-C
    if step == cut:
        raise KeyboardInterrupt


try:
    train("replknet_31b", "cue-world", out=out, overrides={TINY}, show_progress=False, input_size=32,
          train_size={TRAIN_SIZE}, val_size=8, num_classes=4, resume=resume, on_step=on_step,
          recipe=Recipe(epochs=2, batch_size={B}, warmup_epochs=0.5, drop_path=0.1))
except KeyboardInterrupt:
    pass
"""


def test_two_gloo_ranks_resume_mid_epoch_exactly(tmp_path):
    """Stopped at step 6 (mid-epoch 2) and resumed, 2 ranks end as an uninterrupted run: the same weights and
    metrics, train loss and accuracy included (each rank's partial-epoch sums are kept, not rank 0's for all)."""
    import csv

    from safetensors.torch import load_file

    driver = tmp_path / "driver.py"
    driver.write_text(_DRIVER.replace("{TINY}", repr(TINY)).replace("{TRAIN_SIZE}", str(TRAIN_SIZE))
                      .replace("{B}", str(B)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FASTCONV_BACKEND": BACKEND}  # no timing-dependent choice
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(k, None)
    for out, cut, mode in (("full", 0, "new"), ("cut", 6, "new"), ("cut", 0, "resume")):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(driver), str(tmp_path / out),
               str(cut), mode]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        # the stopped run too: DDP is freed before the group is destroyed, not at interpreter exit
        assert proc.stdout.count("DDP objects alive at shutdown: 0") == 2, proc.stdout[-2000:]
    full, cut = (list(csv.DictReader((tmp_path / d / "metrics.csv").read_text().splitlines())) for d in ("full", "cut"))
    assert json.loads((tmp_path / "cut" / "run.json").read_text())["resumed"]
    strip = [[{k: v for k, v in r.items() if k != "img_per_s"} for r in rows] for rows in (full, cut)]
    assert strip[0] == strip[1] and len(strip[0]) == 2
    a, b = (load_file(tmp_path / d / "model.safetensors") for d in ("full", "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_two_gloo_ranks_that_diverge_stop_together_with_one_line(tmp_path):
    """--lr 1e9 under torchrun: the ranks agree on the non-finite loss in one all-reduce and stop at the same step,
    exit status 2, no hang and no NaN model (the DDP gradients make every rank NaN, but a rank's own loss may still
    be finite at the step another's is not). The line they share is printed once on the node (before: once per
    process)."""
    out = tmp_path / "ddp"
    proc = _torchrun_train(out, "--train-size", "64", "--epochs", "3", "--batch-size", "8", "--lr", "1e9")
    # the two ranks write to one stderr: their lines may run into each other, so count the messages
    head = "erf-lab train: error: training diverged in epoch "
    said = [m.split("--force")[0] for m in proc.stderr.split(head)[1:]]
    assert proc.returncode != 0 and len(said) == 1, proc.stderr[-3000:]
    assert "(exitcode: 2)" in proc.stderr and proc.stderr.count("Traceback") == 1  # torchrun's own report only
    assert not (out / "run.json").exists() and not (out / "model.safetensors").exists()


_TAKE_ON_RANK0 = '''import os, subprocess, sys
import erf_lab.train.loop as L
from erf_lab.cli.main import main
HOLD = "import fcntl, os, sys, time\\nfd = os.open(sys.argv[1], os.O_RDONLY)\\nfcntl.flock(fd, fcntl.LOCK_EX)\\n" \\
       "print('held', flush=True)\\nsys.stdin.read()\\n"
orig = L._prepare_out_dir
def taken(out, *a, **k):  # another process makes and holds the new folder after rank 0 decided
    mode = orig(out, *a, **k)
    if not out.exists():
        out.mkdir(parents=True)
        p = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True)
        assert p.stdout.readline().strip() == "held"
    return mode
L._prepare_out_dir = taken
sys.exit(main(sys.argv[1:]))
'''


def test_a_new_folder_taken_meanwhile_stops_every_rank_with_one_line(tmp_path):
    """Rank 0 holds the run folder it makes; when another process made and holds it after rank 0 decided (a race
    of two trainings on one new --out), every rank stops with one line (before: rank 0 alone raised, and rank 1
    died in save_state's gather with gloo's 'Connection closed by peer' traceback), said once on the node."""
    import pytest

    pytest.importorskip("fcntl")
    script = tmp_path / "take.py"
    script.write_text(_TAKE_ON_RANK0)
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FASTCONV_BACKEND": BACKEND}
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(script), "train",
           "--model", "replknet_31b", "--override", "channels=(8,8,16,16)", "--override", "layers=(1,1,1,1)",
           "--override", "large_kernel_sizes=(7,7,7,3)", "--num-classes", "4", "--train-size", "32", "--val-size", "8",
           "--input-size", "32", "--batch-size", "8", "--epochs", "1", "--quiet", "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "Connection closed by peer" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.count(f"erf-lab train: error: --out {out} is in use") == 1, proc.stderr[-3000:]
    assert not any(out.iterdir())


_SLOW_FIRST = """import os, sys, time
late = float(sys.argv.pop(1))
if os.environ.get("LOCAL_RANK") == "0":
    time.sleep(late)  # the node's first process starts late (a loaded node, imports over NFS)
from erf_lab.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def test_options_refused_under_torchrun_are_said(tmp_path):
    """Every process of a torchrun job checks the options before the ranks meet, each printing its line; torchrun
    ends the others as soon as one has exited, so the line must not be left to the node's first process: where that
    one was slower (here: started 60 s late), a refusal printed there only was printed nowhere (torchrun's report:
    exit code 2, no error file). Exit status 2, the line at least once."""
    out = tmp_path / "ddp"
    proc = _torchrun_train(out, "--epochs", "1", "--input-size", "5")
    assert proc.returncode != 0 and "(exitcode: 2)" in proc.stderr, proc.stderr[-3000:]
    line = "erf-lab train: error: --input-size must be in [8, 4096], got 5"
    assert proc.stderr.count(line) in (1, 2) and proc.stderr.count("erf-lab train: error:") == proc.stderr.count(line)
    assert not out.exists()
    script = tmp_path / "slow_first.py"
    script.write_text(_SLOW_FIRST)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(script), "60", "train",
           "--model", "replknet_31b", "--epochs", "1", "--input-size", "5", "--quiet", "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "(exitcode: 2)" in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.count(line) == 1, proc.stderr[-3000:]  # rank 1's: rank 0 was ended while it slept
    assert not out.exists()


def test_a_missing_data_folder_stops_every_rank_with_one_line(tmp_path):
    """Rank 0 builds the data first while the others wait; a missing --data stopped rank 0 with its line and rank 1
    died in the barrier with gloo's 'Connection closed by peer' traceback (under torchrun only when it noticed before
    torchrun killed it). Now rank 0 tells the others (the setup's errors meet in one collective): exit status 2 on
    both, rank 0's line, and rank 1 (the node's second process) silent. Two processes started by hand, so that no
    launcher ends rank 1 first."""
    port = str(_free_port())
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "FASTCONV_BACKEND": BACKEND, "RANK": str(rank),
               "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": port}
        cmd = [sys.executable, "-m", "erf_lab", "train", "--model", "replknet_31b", "--data", str(tmp_path / "missing"),
               "--epochs", "1", "--quiet", "--out", str(tmp_path / "ddp")]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    (_, err0), (_, err1) = (p.communicate(timeout=300) for p in procs)
    assert [p.returncode for p in procs] == [2, 2], (err0[-2000:], err1[-2000:])
    assert err0.strip() == f"erf-lab train: error: --data: no such folder: {tmp_path / 'missing'}", err0[-2000:]
    assert err1.strip() == "", err1[-2000:]


def _two_ranks_by_hand(tmp_path, args_of_rank, timeout=120) -> list[tuple[int | None, str]]:
    """``erf-lab train`` as 2 gloo ranks of one node started by hand (rank r with ``args_of_rank[r]``); (exit status,
    stderr) per rank, exit status None for a rank still running after ``timeout`` seconds (then killed)."""
    port = str(_free_port())
    procs = []
    for rank, args in enumerate(args_of_rank):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "FASTCONV_BACKEND": BACKEND, "RANK": str(rank),
               "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": port}
        procs.append(subprocess.Popen([sys.executable, "-m", "erf_lab", "train", *args], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    for p in procs:
        try:
            err = p.communicate(timeout=timeout)[1]
            results.append((p.returncode, err))
        except subprocess.TimeoutExpired:
            p.kill()
            results.append((None, p.communicate()[1]))
    return results


def test_resume_of_a_complete_run_that_one_rank_refuses_stops_every_rank(tmp_path):
    """--resume of a complete run: each rank compares the run's settings with its own. A rank that found other ones
    (another command line on its node) raised into the setup's gather while the others returned at once: rank 0
    hung in its final barrier and rank 1 in the gather (until the group's 30-minute timeout). Now the others wait
    for its word in the gather: exit status 2 on both, each with one line."""
    out = tmp_path / "ddp"
    proc = _torchrun_train(out, "--train-size", "16", "--epochs", "1", "--batch-size", "4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    base = ["--model", "replknet_31b", "--override", "channels=(8,8,16,16)", "--override", "layers=(1,1,1,1)",
            "--override", "large_kernel_sizes=(7,7,7,3)", "--num-classes", "4", "--val-size", "8", "--input-size",
            "32", "--train-size", "16", "--epochs", "1", "--batch-size", "4", "--checkpoint-format", "safetensors",
            "--quiet", "--out", str(out), "--resume"]
    (rc0, err0), (rc1, err1) = _two_ranks_by_hand(tmp_path, [base, [*base, "--lr", "0.1"]], timeout=60)
    line = f"{out} already holds a complete training run with other settings (--lr)"
    assert (rc0, rc1) == (2, 2), (err0[-2000:], err1[-2000:])
    assert err1.strip() == f"erf-lab train: error: {line}; use --force to overwrite or choose another --out", err1
    assert err0.strip().startswith(f"erf-lab train: error: rank 1 stopped: {line}"), err0[-2000:]
    # the ranks that agree still find the run complete, together
    (rc0, err0), (rc1, err1) = _two_ranks_by_hand(tmp_path, [base, base], timeout=60)
    assert (rc0, rc1) == (0, 0) and not err0.strip() and not err1.strip(), (err0[-2000:], err1[-2000:])


def test_ranks_whose_data_folders_differ_refuse_to_train(tmp_path):
    """Two nodes whose --data at the same path holds other images (rank 1 lacks one): each rank counted its own
    steps per epoch and they waited for each other in a collective forever (SIGTERM, which stops at a step, could
    not end them). Now the ranks compare their settings after the setup: one line on each node, exit status 2,
    nothing written. Two processes started by hand, each the one process of its node, in its own folder."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for node in (0, 1):
        for split, n in (("train", 8), ("val", 2)):
            for c in ("a", "b"):
                folder = tmp_path / f"node{node}" / "d" / split / c
                folder.mkdir(parents=True)
                for i in range(n - (node == 1 and split == "train" and c == "a")):
                    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    port, procs = str(_free_port()), []
    for rank in (0, 1):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "FASTCONV_BACKEND": BACKEND, "RANK": str(rank), "LOCAL_RANK": "0",
               "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        cmd = [sys.executable, "-m", "erf_lab", "train", "--model", "replknet_31b", "--override", "channels=(8,8,16,16)",
               "--override", "layers=(1,1,1,1)", "--override", "large_kernel_sizes=(7,7,7,3)", "--data", "d",
               "--input-size", "32", "--batch-size", "2", "--epochs", "1", "--quiet", "--out", str(tmp_path / "ddp")]
        procs.append(subprocess.Popen(cmd, cwd=tmp_path / f"node{rank}", env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    try:
        errs = [p.communicate(timeout=90)[1] for p in procs]
    finally:
        for p in procs:
            p.kill()
    line = ("erf-lab train: error: the ranks disagree on the number of training images, the training images' names: "
            "rank 1 differs from rank 0 (every rank must read the same data and options)")
    assert [p.returncode for p in procs] == [2, 2] and [e.strip() for e in errs] == [line, line], errs
    assert not (tmp_path / "ddp").exists()


_FEWER_CPUS_ON_RANK1 = '''import os, sys
if os.environ["RANK"] == "1":  # a node with fewer CPUs: its --num-workers cap is lower
    os.cpu_count = lambda: 1
from erf_lab.cli.main import main
sys.exit(main(sys.argv[1:]))
'''


def test_a_check_that_fails_on_one_node_only_stops_every_rank(tmp_path):
    """train's checks before the ranks meet depend on the node (its CPU count caps --num-workers): a rank that failed
    one exited before joining and the others waited in init_process_group. Now the checks are said once the ranks
    have met: rank 1 says why, rank 0 names it, both exit 2. Two processes started by hand (no launcher to end
    them)."""
    script = tmp_path / "fewer_cpus.py"
    script.write_text(_FEWER_CPUS_ON_RANK1)
    port = str(_free_port())
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "FASTCONV_BACKEND": BACKEND, "RANK": str(rank),
               "LOCAL_RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": port}
        cmd = [sys.executable, str(script), "train", "--model", "replknet_31b", "--num-workers", "6", "--epochs", "1",
               "--quiet", "--out", str(tmp_path / "ddp")]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        (_, err0), (_, err1) = (p.communicate(timeout=120) for p in procs)
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [2, 2], (err0[-2000:], err1[-2000:])
    line = "--num-workers must be 0 to 4 (4 per CPU of this machine), got 6"
    assert err1.strip() == f"erf-lab train: error: {line}", err1[-2000:]
    assert err0.strip() == f"erf-lab train: error: rank 1 stopped: {line}", err0[-2000:]
    assert not (tmp_path / "ddp").exists()


def test_what_the_data_folder_scan_warns_is_said_once_per_node(tmp_path):
    """Every process of a node scans the same --data folder: its unreadable files were warned about once per
    process. Now by the node's first process alone. A load that fails later on rank 1 is in rank 0's run.json."""
    from PIL import Image

    for split in ("train", "val"):
        for c in ("a", "b"):
            (tmp_path / "data" / split / c).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(torch.full((32, 32, 3), 40 * (i + 1), dtype=torch.uint8).numpy()).save(
                    tmp_path / "data" / split / c / f"{i}.png")
    (tmp_path / "data" / "train" / "a" / "bad.png").write_text("not an image")
    bad_idat_png(tmp_path / "data" / "val" / "b" / "0bad.png")  # val item 3 of 5: rank 1 evaluates it
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "erf_lab", "train",
           "--model", "replknet_31b", "--override", "channels=(8,8,8,8)", "--override", "layers=(1,1,1,1)",
           "--data", str(tmp_path / "data"), "--input-size", "32", "--epochs", "1", "--batch-size", "2",
           "--quiet", "--out", str(tmp_path / "run")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("erf-lab train: warning: skipped 1 unreadable file(s)") == 1, proc.stderr[-3000:]
    # an image that failed to load on rank 1 is in run.json, which rank 0 writes
    assert json.loads((tmp_path / "run" / "run.json").read_text())["failed_loads"] == [
        ["val/b/0bad.png", "OSError: broken data stream when reading image file", 1]]


_KILL_RANK_1 = """
import os
import signal
import sys

from erf_lab.train.loop import train
from erf_lab.train.recipe import Recipe

out, cut, resume = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "resume"


def on_step(epoch, step):  # rank 1 dies without warning (the OOM killer, a lost node): nothing saved on its way out
    if step == cut and os.environ["RANK"] == "1" and os.environ["TORCHELASTIC_RESTART_COUNT"] == "0":
        os.kill(os.getpid(), signal.SIGKILL)


train("replknet_31b", "cue-world", out=out, overrides={TINY}, show_progress=False, input_size=32,
      train_size={TRAIN_SIZE}, val_size=8, num_classes=4, resume=resume, on_step=on_step, checkpoint_seconds=0,
      recipe=Recipe(epochs=2, batch_size={B}, warmup_epochs=0.5, drop_path=0.1))
"""


def _torchrun_driver(tmp_path, runs, template: str | None = None):
    """A driver (``template``, default :data:`_KILL_RANK_1`) under ``torchrun --nproc_per_node 2`` for each (out
    folder, its step argument (_KILL_RANK_1: where rank 1 dies, 0 none), "new" / "resume", whether the job
    succeeds); asserts each outcome; returns the driver's path."""
    driver = tmp_path / "driver.py"
    driver.write_text((template or _KILL_RANK_1).replace("{TINY}", repr(TINY)).replace("{TRAIN_SIZE}", str(TRAIN_SIZE))
                      .replace("{B}", str(B)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FASTCONV_BACKEND": BACKEND}
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(k, None)
    for out, cut, mode, ok in runs:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(driver), str(tmp_path / out),
               str(cut), mode]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert (proc.returncode == 0) == ok, proc.stderr[-3000:]
    return driver


def test_a_rank_killed_mid_epoch_resumes_from_the_last_step_saved(tmp_path):
    """Rank 1 SIGKILLed at step 7 (mid-epoch 2; torchrun then ends rank 0): the training state was saved at each
    epoch's end only, so --resume went back to step 4, the epoch's end, and every step since was lost (on a big
    data set, up to an epoch of every GPU's work). Now it is also saved mid-epoch every checkpoint_seconds (0: every
    step, agreed by the ranks): the resume continues from step 6, the last step every rank finished, and ends as an
    uninterrupted run."""
    import csv

    from safetensors.torch import load_file

    _torchrun_driver(tmp_path, [("full", 0, "new", True), ("cut", 7, "new", False), ("cut", 0, "resume", True)])
    info = json.loads((tmp_path / "cut" / "run.json").read_text())
    assert info["resumed"] and [(s["from_epoch"], s["from_step"]) for s in info["sessions"]] == [(0, 0), (1, 6)]
    full, cut = (list(csv.DictReader((tmp_path / d / "metrics.csv").read_text().splitlines())) for d in ("full", "cut"))
    strip = [[{k: v for k, v in r.items() if k != "img_per_s"} for r in rows] for rows in (full, cut)]
    assert strip[0] == strip[1] and len(strip[0]) == 2
    a, b = (load_file(tmp_path / d / "model.safetensors") for d in ("full", "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_training_restarted_by_torchrun_continues_from_the_failed_try(tmp_path):
    """``torchrun --max-restarts 1``: after rank 1 died at step 7, torchrun ran the same command again, which refused
    the folder ("holds an interrupted training run; pass --resume"), so the restart failed too. Now it continues from
    the last step saved (6) and ends as an uninterrupted run. The tries run under torchrun; the restart as torchrun
    starts it (``torchrun_restart``)."""
    from safetensors.torch import load_file

    from conftest import torchrun_restart

    driver = _torchrun_driver(tmp_path, [("full", 0, "new", True), ("restarted", 7, "new", False)])
    tries = torchrun_restart([str(driver), str(tmp_path / "restarted"), "7", "new"], {"FASTCONV_BACKEND": BACKEND})
    assert [code for code, _ in tries] == [0, 0] and all("holds an interrupted" not in e for _, e in tries), tries
    info = json.loads((tmp_path / "restarted" / "run.json").read_text())
    assert info["resumed"] and [(s["from_step"], s["launch"]["restart_count"]) for s in info["sessions"]] == \
        [(0, 0), (6, 1)]
    a, b = (load_file(tmp_path / d / "model.safetensors") for d in ("full", "restarted"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_resume_with_another_number_of_processes_says_what_the_batch_was(tmp_path):
    """A 2-rank run (4 images per rank and step) interrupted, then resumed in one process with --batch-size 8 to
    make up for it: the refusal named the batch size alone ("--batch-size: 4 there, 8 now"), as if the batch were
    the same as the run's. Now it names the number of processes and what it means for the batch."""
    import pytest

    from erf_lab.errors import ErfLabError
    from erf_lab.train.loop import train
    from erf_lab.train.recipe import Recipe

    _torchrun_driver(tmp_path, [("run", 3, "new", True)], _DRIVER)
    out = tmp_path / "run"
    assert (out / ".train_state.pt").is_file()
    with pytest.raises(ErfLabError) as e:
        train("replknet_31b", "cue-world", out=out, overrides=TINY, show_progress=False, input_size=32,
              train_size=TRAIN_SIZE, val_size=8, num_classes=4, resume=True,
              recipe=Recipe(epochs=2, batch_size=2 * B, warmup_epochs=0.5, drop_path=0.1))
    assert "(2 differ, e.g. processes (torchrun --nproc_per_node): 2 there, 1 now: --batch-size is per process, so " \
           "each of its steps took 2 x 4 images in the data order of 2 process(es)" in str(e.value), str(e.value)
    assert "repeat its command (under torchrun --nproc_per_node=2)" in str(e.value)
    assert (out / ".train_state.pt").is_file()

"""``--sync-bn`` on a GPU: two DDP ranks of B images each, their BatchNorms made SyncBatchNorms by
``erf_lab.train.loop.distributed_net`` (which ``erf-lab train --sync-bn`` calls), equal one process that normalises
the whole batch of 2B: the logits of each rank's half, the averaged gradients and the running statistics.
Both ranks share the one GPU a session may have, over gloo (NCCL refuses two ranks on one device; gloo gathers
CUDA tensors through the host, which SyncBatchNorm supports; under NCCL, as ``erf-lab train`` runs on GPUs, it
gathers with another collective, same mathematics). Each rank normalising with its own half's statistics
(plain DDP) gives other logits, so the comparison can fail. The CPU path of the same harness (plain DDP against the
per-half reference) is ``test_harness_on_cpu_without_sync``."""
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from erf_lab.train.loop import build_model

TINY = {"channels": (8, 8, 16, 16), "layers": (1, 1, 1, 1), "large_kernel_sizes": (7, 7, 7, 3)}
B = 4

_DRIVER = """
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

from erf_lab.train.loop import build_model, distributed_net

out, device, sync_bn = sys.argv[1], sys.argv[2], sys.argv[3] == "sync"
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False
dist.init_process_group("gloo")
rank = dist.get_rank()
net = build_model("replknet_31b", {TINY}, 4, 0.0, seed=0).to(device)
ranked = distributed_net(net, dist.get_world_size(), device, sync_bn)
x, y = torch.load(out + "/batch.pt", weights_only=True)
part = slice(rank * {B}, (rank + 1) * {B})
ranked.train()
logits = ranked(x[part].to(device))
F.cross_entropy(logits, y[part].to(device)).backward()
kinds = sorted({{type(m).__name__ for m in net.modules() if "BatchNorm" in type(m).__name__}})
torch.save({{"logits": logits.detach().cpu(), "grads": {{n: p.grad.cpu() for n, p in net.named_parameters()}},
             "buffers": {{n: b.cpu() for n, b in net.named_buffers()}}, "bn": kinds}}, out + f"/rank{{rank}}.pt")
# the ranks leave together, as erf_lab.train.loop's do: a rank that left right after DDP's last all-reduce could start
# interpreter shutdown while a gloo worker thread still released that collective's tensors (SIGABRT, "terminate called
# without an active exception", once in a CI run)
dist.barrier()
dist.destroy_process_group()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(2 * B, 3, 32, 32, generator=g), torch.randint(0, 4, (2 * B,), generator=g)


def _run_ranks(tmp_path, device: str, sync_bn: bool) -> list[dict]:
    torch.save(_batch(), tmp_path / "batch.pt")
    driver = tmp_path / "driver.py"
    driver.write_text(_DRIVER.format(TINY=TINY, B=B))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NVIDIA_TF32_OVERRIDE": "0"}
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(driver), str(tmp_path), device,
           "sync" if sync_bn else "local"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]


def _reference(device: str, halves: bool) -> dict:
    """One process, train mode: BatchNorm over the whole batch of 2B, or (``halves``) over each half of B, as
    plain DDP ranks do; the gradient of the mean loss over 2B (= DDP's average of the two ranks' mean losses)."""
    net = build_model("replknet_31b", TINY, 4, 0.0, seed=0).to(device).train()
    x, y = (t.to(device) for t in _batch())
    logits = torch.cat([net(x[:B]), net(x[B:])]) if halves else net(x)
    F.cross_entropy(logits, y).backward()
    return {"logits": logits.detach().cpu(), "grads": {n: p.grad.cpu() for n, p in net.named_parameters()},
            "buffers": {n: b.cpu() for n, b in net.named_buffers()}}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _flat(grads: dict) -> torch.Tensor:
    return torch.cat([g.flatten() for _, g in sorted(grads.items())])


def _compare(ranks: list[dict], ref: dict) -> dict:
    """Relative errors (2-norms): logits of both halves, the averaged gradient (every rank holds DDP's average),
    rank 0's running statistics, all of them as one vector (a BN after a BN-normalised input has running means of
    rounding noise, ~1e-9, which no two summation orders share)."""
    err = {"logits": _rel(torch.cat([r["logits"] for r in ranks]), ref["logits"]),
           "grads": max(_rel(_flat(r["grads"]), _flat(ref["grads"])) for r in ranks)}
    stats = [n for n in ref["buffers"] if n.endswith(("running_mean", "running_var"))]
    err["running_stats"] = _rel(torch.cat([ranks[0]["buffers"][n].flatten() for n in stats]),
                                torch.cat([ref["buffers"][n].flatten() for n in stats]))
    return err


@pytest.mark.gpu
def test_two_ranks_with_sync_bn_equal_one_process_over_the_whole_batch(tmp_path, monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (SyncBatchNorm runs on GPUs only)")
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    ranks = _run_ranks(tmp_path, "cuda:0", sync_bn=True)
    assert all(r["bn"] == ["SyncBatchNorm"] for r in ranks)
    err = _compare(ranks, _reference("cuda:0", halves=False))
    print(f"2 gloo ranks with SyncBatchNorm vs 1 process over the whole batch: relative errors {err}")
    assert err["logits"] < 1e-4 and err["grads"] < 1e-4 and err["running_stats"] < 1e-5, err
    local = _compare(ranks, _reference("cuda:0", halves=True))  # what the ranks would compute without sync
    assert local["logits"] > 1e-2, local


def test_harness_on_cpu_without_sync(tmp_path, one_thread):
    """The same two ranks on the CPU without ``--sync-bn``: each half normalised with its own statistics, as one
    process that runs the halves apart (rank 0's running statistics are its half's, the reference's are updated by
    both halves: not compared)."""
    ranks = _run_ranks(tmp_path, "cpu", sync_bn=False)
    assert all(r["bn"] == ["BatchNorm2d"] for r in ranks)
    err = _compare(ranks, _reference("cpu", halves=True))
    assert err["logits"] < 1e-5 and err["grads"] < 1e-4, err
    assert _compare(ranks, _reference("cpu", halves=False))["logits"] > 1e-2

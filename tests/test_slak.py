"""SLaK: official key layout, strict checkpoint loading, the exact kernel merge, parameter counts of the paper,
feature intermediates and an ERF run."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from erf_lab.erf.runner import ErfSpec, run_erf
from erf_lab.models import create_model, list_models, reparameterize_model
from erf_lab.models.reparam import randomize_bn
from erf_lab.models.slak import SLaKLargeKernel, sparse_param_count

PAPER_PARAMS_M = {"slak_t": 30, "slak_s": 55, "slak_b": 95}  # README / paper Table 2, 40 % sparse
TINY = dict(dims=(8, 8, 16, 16), depths=(1, 1, 2, 1), kernel_size=(13, 11, 9, 7, 3), width_factor=1.0)


def _official_keys(depths, dims, kernel_size, num_classes=1000):
    """Key -> shape of the official ``models/SLaK.py`` (``Decom=True``) state dict, from its module structure."""
    def conv_bn(prefix, c, kh, kw):
        return {f"{prefix}.conv.weight": (c, 1, kh, kw), f"{prefix}.bn.weight": (c,), f"{prefix}.bn.bias": (c,),
                f"{prefix}.bn.running_mean": (c,), f"{prefix}.bn.running_var": (c,),
                f"{prefix}.bn.num_batches_tracked": ()}

    small = kernel_size[-1]
    keys = {"downsample_layers.0.0.weight": (dims[0], 3, 4, 4), "downsample_layers.0.0.bias": (dims[0],),
            "downsample_layers.0.1.weight": (dims[0],), "downsample_layers.0.1.bias": (dims[0],)}
    for i in range(1, 4):
        keys.update({f"downsample_layers.{i}.0.weight": (dims[i - 1],), f"downsample_layers.{i}.0.bias": (dims[i - 1],),
                     f"downsample_layers.{i}.1.weight": (dims[i], dims[i - 1], 2, 2),
                     f"downsample_layers.{i}.1.bias": (dims[i],)})
    for s in range(4):
        c, k = dims[s], kernel_size[s]
        for j in range(depths[s]):
            p = f"stages.{s}.{j}"
            keys.update(conv_bn(f"{p}.large_kernel.LoRA1", c, k, small))
            keys.update(conv_bn(f"{p}.large_kernel.LoRA2", c, small, k))
            keys.update(conv_bn(f"{p}.large_kernel.small_conv", c, small, small))
            keys.update({f"{p}.norm.weight": (c,), f"{p}.norm.bias": (c,), f"{p}.pwconv1.weight": (4 * c, c),
                         f"{p}.pwconv1.bias": (4 * c,), f"{p}.pwconv2.weight": (c, 4 * c), f"{p}.pwconv2.bias": (c,),
                         f"{p}.gamma": (c,)})
    keys.update({"norm.weight": (dims[-1],), "norm.bias": (dims[-1],), "head.weight": (num_classes, dims[-1]),
                 "head.bias": (num_classes,)})
    return keys


def _shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_slak_t_state_dict_is_the_official_layout():
    with torch.device("meta"):
        model = create_model("slak_t")
    expected = _official_keys((3, 3, 9, 3), (124, 249, 499, 998), (51, 49, 47, 13, 5))  # int(1.3 x 96...)
    assert _shapes(model) == expected
    assert len(expected) == 18 * 25 + 16 + 4


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _randomized(seed=0, **kw):
    torch.manual_seed(seed)
    model = create_model("slak_t", num_classes=10, **{**TINY, **kw})
    randomize_bn(model, seed=seed, input_size=64)
    with torch.no_grad():
        for block in model.modules():
            if hasattr(block, "gamma") and isinstance(block.gamma, torch.nn.Parameter):
                block.gamma.uniform_(0.5, 1.5)  # layer scale 1e-6 at init would hide the block
    return model.eval()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
@pytest.mark.parametrize("decompose", [True, False])
def test_kernel_merge_is_exact(dtype, tol, decompose):
    model = _randomized(decompose=decompose).to(dtype)
    x = torch.randn(2, 3, 64, 64, dtype=dtype)
    with torch.no_grad():
        ref = model(x)
        merged = reparameterize_model(model)
        assert _rel(merged(x), ref) < tol
    keys = merged.state_dict().keys()
    assert not any("LoRA" in k or "small_conv" in k or "lkb_origin" in k for k in keys)
    assert tuple(merged.state_dict()["stages.0.0.large_kernel.lkb_reparam.weight"].shape) == (8, 1, 13, 13)
    # the merged layout is what deploy=True builds
    deployed = create_model("slak_t", num_classes=10, deploy=True, **TINY).to(dtype).eval()
    deployed.load_state_dict(merged.state_dict(), strict=True)
    with torch.no_grad():
        assert _rel(deployed(x), ref) < tol


def test_merge_is_idempotent_and_pads_each_branch_to_its_place():
    lk = SLaKLargeKernel(2, 7, 3).eval()
    with torch.no_grad():
        for b in (lk.LoRA1, lk.LoRA2, lk.small_conv):
            b.conv.weight.fill_(1.0)
    k, b = lk.equivalent_kernel_bias()
    bn_scale = 1 / (1 + 1e-5) ** 0.5  # fresh BN: gamma 1, var 1
    expected = torch.zeros(7, 7, dtype=torch.float64)
    expected[:, 2:5] += 1  # 7x3: full height, centre columns
    expected[2:5, :] += 1  # 3x7
    expected[2:5, 2:5] += 1  # 3x3
    assert torch.allclose(k[0, 0], expected * bn_scale, rtol=0, atol=1e-12)
    assert torch.equal(b, torch.zeros(2, dtype=torch.float64))
    lk.reparameterize()
    first = lk.lkb_reparam.weight.clone()
    lk.reparameterize()
    assert torch.equal(lk.lkb_reparam.weight, first)


def test_merge_when_the_small_kernel_is_wider_than_the_stage_kernel():
    """kernel_size (..., 3, 5): the 3 x 5 / 5 x 3 strips merge into a 5 x 5 kernel (cropping them to 3 x 3 would
    drop taps); the cropped taps only read padding on a 2 x 2 map, so the input is large enough to see them."""
    torch.manual_seed(0)
    lk = SLaKLargeKernel(4, 3, 5)
    with torch.no_grad():
        for m in lk.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1), m.running_var.uniform_(0.5, 1.5), m.bias.normal_(0, 0.3)
    lk.eval()
    x = torch.randn(1, 4, 16, 16)
    with torch.no_grad():
        ref = lk(x)
        lk.reparameterize()
        assert tuple(lk.lkb_reparam.weight.shape) == (4, 1, 5, 5) and _rel(lk(x), ref) < 1e-6
    merged = SLaKLargeKernel(4, 3, 5, merged=True)  # what a deploy checkpoint of it loads into
    merged.load_state_dict(lk.state_dict(), strict=True)


@pytest.mark.parametrize("merged", [False, True])
def test_official_layout_checkpoint_loads_strictly(tmp_path, merged):
    src = _randomized()
    if merged:
        src = reparameterize_model(src)
    path = tmp_path / "slak.pth"
    torch.save({"model": src.state_dict()}, path)
    model = create_model("slak_t", weights=str(path), num_classes=10, **TINY).eval()
    assert model.state_dict().keys() == src.state_dict().keys()
    assert all(torch.equal(v, src.state_dict()[k]) for k, v in model.state_dict().items())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), src(x))


@pytest.mark.parametrize("name", ["slak_t", "slak_s", "slak_b"])
def test_parameter_counts_match_the_paper(name):
    """The paper counts the non-zero weights of the 40 %-sparse training-time model (its dense weights are
    1/0.6 more for the sparsified tensors); measured: T 30.47M, S 54.78M, B 94.91M."""
    with torch.device("meta"):
        model = create_model(name)
    dense = sum(p.numel() for p in model.parameters()) / 1e6
    sparse = sparse_param_count(model) / 1e6
    assert abs(sparse - PAPER_PARAMS_M[name]) < 0.5, sparse
    assert dense > 1.5 * PAPER_PARAMS_M[name]


def test_forward_intermediates_and_registry():
    assert {"slak_t", "slak_s", "slak_b"} <= set(list_models())
    model = create_model("slak_s", num_classes=0, **TINY).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        assert [t.shape[1:] for t in inter] == [(8, 16, 16), (8, 8, 8), (16, 4, 4), (16, 2, 2)]
        assert torch.equal(final, model.forward_features(x))
        early = model.forward_intermediates(x, indices=[0], stop_early=True, intermediates_only=True)
        assert torch.equal(early[0], inter[0])


def test_erf_run_through_the_runner(tmp_path):
    spec = ErfSpec("slak_t", overrides=dict(TINY), num_images=1, input_size=64)
    res = run_erf(spec, out=tmp_path / "run", show_progress=False, formats=("png",))
    erf = res["result"].erf
    assert erf.shape == (64, 64) and float(erf.max()) > 0
    assert np.array_equal(np.load(tmp_path / "run" / "erf.npy"), erf)
    # the patchify stem: unit 1 of the 2 x 2 map is centred at 15.5 + 32 = 47.5 -> 48, not 64 // 2
    assert res["run_info"]["erf_centre"] == [48, 48] and res["metrics"]["center"] == [48, 48]
    # 100 px is no multiple of 32: the unpadded stem and downsamplings give 25 -> 12 -> 6 -> 3 (not ceil(100 / 32) =
    # 4, whose unit 2 would be centred at 79.5): unit 1 at 47.5 -> 48
    res = run_erf(ErfSpec("slak_t", overrides=dict(TINY), num_images=1, input_size=100), out=tmp_path / "r100",
                  show_progress=False, formats=("png",))
    assert res["run_info"]["erf_centre"] == [48, 48]


def test_erf_lab_models_describes_the_variants():
    from erf_lab.models.summary import describe_model

    row = describe_model("slak_t")
    assert row["family"] == "slak" and row["kernel_sizes"] == [51, 49, 47, 13]
    assert row["params"] == 50_703_838 and row["deploy_params"] == 60_577_702  # dense: merged 51x51 is larger


def _sparsified(model, sparsity=0.4, seed=0):
    """Zero ``sparsity`` of every conv and linear weight at random, as the official ``Masking`` leaves them (the
    official checkpoints hold these zeros as ordinary values, no masks)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() in (2, 4):
                p.mul_((torch.rand(p.shape, generator=gen) >= sparsity).to(p.dtype))
    return model


def test_nonzero_flops_are_output_positions_times_nonzero_weights():
    """The paper's counting of a sparse model (official FLOPs_counter.py rule): each conv / linear layer's output
    positions times its non-zero weights; the tiny model at 64 px has maps 16, 8, 4, 2 and one head row."""
    from erf_lab.models.flops import count_flops

    model = _sparsified(_randomized())
    positions = {"downsample_layers.0": 16 ** 2, "downsample_layers.1": 8 ** 2, "downsample_layers.2": 4 ** 2,
                 "downsample_layers.3": 2 ** 2, "stages.0": 16 ** 2, "stages.1": 8 ** 2, "stages.2": 4 ** 2,
                 "stages.3": 2 ** 2, "head": 1}
    dense = sparse = 0
    for name, p in model.named_parameters():
        if p.dim() in (2, 4):
            n = positions[next(k for k in positions if name.startswith(k + "."))]
            dense, sparse = dense + n * p.numel(), sparse + n * int((p != 0).sum())
    assert 0.55 < sparse / dense < 0.65
    assert count_flops(model, 64) == dense and count_flops(model, 64, nonzero=True) == sparse
    with torch.device("meta"):
        meta = create_model("slak_t", **TINY)
    with pytest.raises(ValueError, match="meta"):
        count_flops(meta, 64, nonzero=True)


@pytest.mark.parametrize("name", ["slak_t", "slak_s", "slak_b"])
def test_paper_flops_are_those_of_its_sparse_weights(name):
    """Paper Table 2 counts the non-zero weights: 60 % of the dense MACs in every layer give B's 17.1 G within its
    rounding, T's and S's 1.6-4.5 % above the paper's 5.0 / 9.8 G (where SNIP put the zeros: the dense stem,
    downsampling and head, and sparser high-resolution blocks, which only a trained checkpoint fixes)."""
    from erf_lab.models.flops import count_flops
    from erf_lab.models.slak import PAPER_SPARSITY, VARIANTS

    with torch.device("meta"):
        model = create_model(name)
    uniform = (1 - PAPER_SPARSITY) * count_flops(model, 224) / 1e9
    paper = VARIANTS[name]["gflops"]
    if name == "slak_b":
        assert abs(uniform - paper) < 0.05, uniform
    else:
        assert 0.01 < uniform / paper - 1 < 0.05, uniform


def test_official_sparse_training_checkpoint_loads_exactly(tmp_path):
    """What the official main.py saves: {'model', 'optimizer', 'epoch', 'scaler', 'args' (argparse.Namespace),
    'model_ema'}, the weights 40 % zero (the official code saves no masks); 'model' loads with a warning naming the
    EMA, every zero kept, the outputs bit-identical; its merged form (lkb_reparam) loads into deploy=True."""
    import argparse

    from erf_lab.models.flops import count_flops

    src = _sparsified(_randomized())
    state = src.state_dict()
    ema = {k: v + 0.01 if v.is_floating_point() else v for k, v in state.items()}
    args = argparse.Namespace(model="SLaK_tiny", Decom=True, sparse=True, sparsity=0.4, sparse_init="snip",
                              kernel_size=[13, 11, 9, 7, 3], width_factor=1.0, bn=True, lr=4e-3)
    path = tmp_path / "checkpoint-best.pth"
    torch.save({"model": state, "optimizer": torch.optim.AdamW(src.parameters()).state_dict(), "epoch": 299,
                "scaler": {"scale": 65536.0, "growth_factor": 2.0}, "args": args, "model_ema": ema}, path)
    with pytest.warns(UserWarning, match=r"'model', 'model_ema'.*loaded checkpoint\['model'\]"):
        model = create_model("slak_t", weights=str(path), num_classes=10, **TINY).eval()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    zeros = sum(int((v == 0).sum()) for v in model.state_dict().values() if v.dim() in (2, 4))
    assert zeros == sum(int((v == 0).sum()) for v in state.values() if v.dim() in (2, 4)) > 0
    assert count_flops(model, 64, nonzero=True) == count_flops(src, 64, nonzero=True) < count_flops(model, 64)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = src(x)
        assert torch.equal(model(x), ref)
        merged = reparameterize_model(src)
        torch.save({"model": merged.state_dict()}, tmp_path / "merged.pth")
        deployed = create_model("slak_t", weights=str(tmp_path / "merged.pth"), num_classes=10, **TINY).eval()
        assert deployed.large_kernel_sizes == (13, 11, 9, 7) and torch.equal(deployed(x), merged(x))
        assert _rel(deployed(x), ref) < 1e-5


@pytest.mark.parametrize("layout", [dict(decompose=False), dict(bn=False), dict(decompose=False, bn=False)])
def test_official_layouts_load_without_options(tmp_path, layout):
    """The official code's other layouts, fixed by its key names: ``Decom=None`` (``large_kernel.lkb_origin``) and
    ``--bn False`` (branch convs without BN) load as they are, without --override; explicit options still win."""
    src = _randomized(**layout)
    keys = src.state_dict().keys()
    assert any(".lkb_origin." in k for k in keys) == (layout.get("decompose") is False)
    assert any(".bn." in k for k in keys) == layout.get("bn", True)
    torch.save({"model": src.state_dict()}, tmp_path / "slak.pth")
    model = create_model("slak_t", weights=str(tmp_path / "slak.pth"), num_classes=10, **TINY).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), src(x))
    from erf_lab.errors import CheckpointError

    with pytest.raises(CheckpointError, match="missing key"):  # an explicit option the file contradicts
        create_model("slak_t", weights=str(tmp_path / "slak.pth"), num_classes=10, **TINY,
                     **{k: not v for k, v in layout.items()})
    # merged: the official merge_kernel's layout (lkb_reparam weight + bias; it merges only lkb_origin + small_conv)
    with torch.no_grad():
        merged = reparameterize_model(src)
        torch.save({"model": merged.state_dict()}, tmp_path / "merged.pth")
        model = create_model("slak_t", weights=str(tmp_path / "merged.pth"), num_classes=10, **TINY).eval()
        assert torch.equal(model(x), merged(x)) and _rel(model(x), src(x)) < 1e-5


def test_convnext_baseline_of_the_official_code():
    """The official README's ConvNeXt (``--kernel_size 7 7 7 7 100``, no Decom): the small kernel 100 is a sentinel
    for 'no small branch' (only the 7 x 7 conv-BN), not a size to check; decomposed it would be a strip width."""
    model = create_model("slak_t", kernel_size=(7, 7, 7, 7, 100), decompose=False, width_factor=1.0)
    lk = model.stages[0][0].large_kernel
    assert lk.small_conv is None and tuple(lk.lkb_origin.conv.weight.shape) == (96, 1, 7, 7)
    from erf_lab.errors import ErfLabError

    with pytest.raises(ErfLabError, match="odd"):
        create_model("slak_t", kernel_size=(7, 7, 7, 7, 100), width_factor=1.0)


@pytest.mark.parametrize("decompose", [True, False])
def test_a_checkpoint_of_other_kernel_sizes_names_them(tmp_path, decompose):
    """The official SLaK-T files of the kernel-size ablation (31x31, 61x61) do not fit slak_t's 51-49-47-13: the
    error names the kernel sizes the file's shapes fix and the --override that loads it, which then loads exactly."""
    from erf_lab.checkpoint import override_options
    from erf_lab.errors import CheckpointError

    kernels = (9, 7, 5, 5, 3)
    src = _randomized(kernel_size=kernels, decompose=decompose)
    torch.save({"model": src.state_dict()}, tmp_path / "slak.pth")
    with pytest.raises(CheckpointError) as info:
        create_model("slak_t", weights=str(tmp_path / "slak.pth"), num_classes=10, **TINY)
    hint = "its kernels are 9, 7, 5, 5 with small kernel 3: --override 'kernel_size=(9,7,5,5,3)'"
    assert str(info.value).endswith(hint) and override_options({"kernel_size": kernels}) in hint
    model = create_model("slak_t", weights=str(tmp_path / "slak.pth"), num_classes=10, **{**TINY,
                                                                                       "kernel_size": kernels})
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), src(x))
    with pytest.raises(CheckpointError) as info:  # kernels right, widths wrong: nothing about kernels
        create_model("slak_t", weights=str(tmp_path / "slak.pth"), num_classes=10,
                     **{**TINY, "kernel_size": kernels, "dims": (8, 8, 16, 24)})
    assert "its kernels" not in str(info.value)


def test_reparam_of_a_sparse_checkpoint_prints_the_papers_counting(tmp_path, capsys):
    """`erf-lab reparam` of a 40 %-sparse SLaK file: beside the dense counts, those of its non-zero weights (the
    paper's), before and after the merge (the merged K x K kernel's zero corners left out as well)."""
    import json

    from erf_lab.cli.main import main
    from erf_lab.models.flops import count_flops, count_params

    src = _sparsified(_randomized())
    torch.save({"model": src.state_dict()}, tmp_path / "sparse.pth")
    out = tmp_path / "deploy.pth"
    argv = ["reparam", "--model", "slak_t", "--weights", str(tmp_path / "sparse.pth"), "--out", str(out),
            "--check-size", "64"] + [f"--override={k}={v}" for k, v in {**TINY, "num_classes": 10}.items()]
    assert main(argv) == 0
    text = capsys.readouterr().out
    s = json.loads((tmp_path / "deploy.pth.run.json").read_text())
    deployed = create_model("slak_t", weights=str(out), num_classes=10, **TINY)
    assert (s["nonzero_params_before"], s["nonzero_flops_before"]) == (count_params(src, nonzero=True),
                                                                       count_flops(src, 224, nonzero=True))
    assert (s["nonzero_params_after"], s["nonzero_flops_after"]) == (count_params(deployed, nonzero=True),
                                                                     count_flops(deployed, 224, nonzero=True))
    assert s["nonzero_flops_before"] < 0.65 * s["flops_before"] and s["nonzero_flops_after"] < s["flops_after"]
    line = next(ln for ln in text.splitlines() if ln.startswith("non-zero"))
    assert line.split()[1:6] == [f"{s['nonzero_params_before'] / 1e6:.2f}M", "/",
                                 f"{s['nonzero_flops_before'] / 1e9:.2f}G", "->",
                                 f"{s['nonzero_params_after'] / 1e6:.2f}M"]

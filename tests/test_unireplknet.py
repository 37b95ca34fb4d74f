"""UniRepLKNet: official key layouts (training-time and deployed), strict checkpoint loading, exact
re-parameterization, parameter counts of the paper, feature intermediates and an ERF run."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from erf_lab.erf.runner import ErfSpec, run_erf
from erf_lab.models import create_model, list_models, reparameterize_model
from erf_lab.models.reparam import randomize_bn
from erf_lab.models.unireplknet import UniRepLKNet, UniRepLKNetBlock, dilated_to_dense_kernel

VARIANTS = ["unireplknet_a", "unireplknet_f", "unireplknet_p", "unireplknet_n", "unireplknet_t", "unireplknet_s",
            "unireplknet_b", "unireplknet_l", "unireplknet_xl"]
#: official README / paper Table (ImageNet-1K classifier), as printed: value and the unit of its last digit
PAPER_PARAMS_M = {"unireplknet_a": (4.4, 0.1), "unireplknet_f": (6.2, 0.1), "unireplknet_p": (10.7, 0.1),
                  "unireplknet_n": (18.3, 0.1), "unireplknet_t": (31, 1), "unireplknet_s": (56, 1),
                  "unireplknet_b": (98, 1), "unireplknet_l": (218, 1), "unireplknet_xl": (386, 1)}
TINY = dict(dims=(8, 16, 16, 24), depths=(1, 1, 2, 1), kernel_sizes=((3,), (13,), (7, 5), (9,)))


def _official_keys(depths, dims, kernel_sizes, deploy, num_classes=1000):
    """Key -> shape of the official ``unireplknet.py`` state dict, written out from its module structure
    (independently of erf_lab's implementation)."""
    branches = {13: [(5, 1), (7, 2), (3, 3), (3, 4), (3, 5)], 9: [(5, 1), (5, 2), (3, 3), (3, 4)],
                7: [(5, 1), (3, 2), (3, 3)]}

    def bn(prefix, c):
        return {f"{prefix}.weight": (c,), f"{prefix}.bias": (c,), f"{prefix}.running_mean": (c,),
                f"{prefix}.running_var": (c,), f"{prefix}.num_batches_tracked": ()}

    keys = {"downsample_layers.0.0.weight": (dims[0] // 2, 3, 3, 3), "downsample_layers.0.0.bias": (dims[0] // 2,),
            "downsample_layers.0.1.weight": (dims[0] // 2,), "downsample_layers.0.1.bias": (dims[0] // 2,),
            "downsample_layers.0.3.weight": (dims[0], dims[0] // 2, 3, 3), "downsample_layers.0.3.bias": (dims[0],),
            "downsample_layers.0.4.weight": (dims[0],), "downsample_layers.0.4.bias": (dims[0],)}
    for i in range(1, 4):
        keys.update({f"downsample_layers.{i}.0.weight": (dims[i], dims[i - 1], 3, 3),
                     f"downsample_layers.{i}.0.bias": (dims[i],), f"downsample_layers.{i}.1.weight": (dims[i],),
                     f"downsample_layers.{i}.1.bias": (dims[i],)})
    for s in range(4):
        c = dims[s]
        for j in range(depths[s]):
            p, k = f"stages.{s}.{j}", kernel_sizes[s][j]
            if k >= 7:
                keys[f"{p}.dwconv.lk_origin.weight"] = (c, 1, k, k)
                if deploy:
                    keys[f"{p}.dwconv.lk_origin.bias"] = (c,)
                else:
                    keys.update(bn(f"{p}.dwconv.origin_bn", c))
                    for kk, r in branches[k]:
                        keys[f"{p}.dwconv.dil_conv_k{kk}_{r}.weight"] = (c, 1, kk, kk)
                        keys.update(bn(f"{p}.dwconv.dil_bn_k{kk}_{r}", c))
            else:
                keys[f"{p}.dwconv.weight"] = (c, 1, k, k)
                if deploy:
                    keys[f"{p}.dwconv.bias"] = (c,)
            if not deploy:
                keys.update(bn(f"{p}.norm", c))
                keys.update(bn(f"{p}.pwconv2.2", c))
                keys[f"{p}.act.1.beta"] = (1, 1, 1, 4 * c)
                keys[f"{p}.gamma"] = (c,)
            else:
                keys[f"{p}.pwconv2.0.bias"] = (c,)
            keys.update({f"{p}.se.down.weight": (c // 4, c, 1, 1), f"{p}.se.down.bias": (c // 4,),
                         f"{p}.se.up.weight": (c, c // 4, 1, 1), f"{p}.se.up.bias": (c,),
                         f"{p}.pwconv1.1.weight": (4 * c, c), f"{p}.pwconv1.1.bias": (4 * c,),
                         f"{p}.act.1.gamma": (1, 1, 1, 4 * c), f"{p}.pwconv2.0.weight": (c, 4 * c)})
    keys.update({"norm.weight": (dims[-1],), "norm.bias": (dims[-1],), "head.weight": (num_classes, dims[-1]),
                 "head.bias": (num_classes,)})
    return keys


def _shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("deploy", [False, True])
def test_unireplknet_t_state_dict_is_the_official_layout(deploy):
    with torch.device("meta"):
        model = create_model("unireplknet_t", deploy=deploy)
    t_kernels = ((3,) * 3, (13,) * 3, (13, 3) * 9, (13,) * 3)
    expected = _official_keys((3, 3, 18, 3), (80, 160, 320, 640), t_kernels, deploy)
    got = _shapes(model)
    assert sorted(set(got) ^ set(expected)) == []
    assert {k: v for k, v in got.items() if expected[k] != v} == {}
    # 27 blocks (15 Dilated Reparam Blocks with 5 branches, 12 3x3): 20 + 36 / 20 + 1 tensors each (9 + 2 deployed),
    # stem / downsamplings 20, final norm + head 4
    assert len(got) == (27 * 20 + 15 * 36 + 12 + 24 if not deploy else 27 * 11 + 24)


def _randomize(model, seed=0):
    """Random BN statistics (``randomize_bn``) and non-trivial layer scales / GRN parameters (zero at init)."""
    randomize_bn(model, seed=seed, input_size=64)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("gamma", "beta")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5 + (1.0 if name.endswith(".gamma") else 0.0))
    return model.eval()


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_reparameterize_is_exact(dtype, tol):
    torch.manual_seed(0)
    model = _randomize(create_model("unireplknet_t", num_classes=10, **TINY)).to(dtype)
    x = torch.randn(2, 3, 64, 64, dtype=dtype)
    with torch.no_grad():
        ref = model(x)
        fused = reparameterize_model(model)
        out = fused(x)
    assert _rel(out, ref) < tol
    assert _rel(model(x), ref) == 0.0  # reparameterize_model copies by default
    # the fused model is the official deployed layout: a deploy=True model loads it strictly, same output
    deployed = create_model("unireplknet_t", num_classes=10, deploy=True, **TINY).to(dtype).eval()
    deployed.load_state_dict(fused.state_dict(), strict=True)
    with torch.no_grad():
        assert _rel(deployed(x), ref) < tol
    assert _shapes(deployed) == {k: tuple(v) for k, v in _official_keys(
        TINY["depths"], TINY["dims"], TINY["kernel_sizes"], True, 10).items()}


def test_block_reparameterize_is_idempotent_and_removes_branches():
    model = _randomize(create_model("unireplknet_t", **TINY))
    block = model.stages[1][0]
    assert isinstance(block, UniRepLKNetBlock) and block.dwconv.kernel_size == 13
    block.reparameterize()
    first = {k: v.clone() for k, v in block.state_dict().items()}
    block.reparameterize()
    assert first.keys() == block.state_dict().keys()
    assert all(torch.equal(first[k], v) for k, v in block.state_dict().items())
    assert not any("dil_" in k or "bn" in k or k == "gamma" for k in first)
    assert sorted(k for k in first if "dwconv" in k) == ["dwconv.lk_origin.bias", "dwconv.lk_origin.weight"]


def test_reparameterize_folds_a_sync_batchnorm():
    """`erf-lab train --sync-bn` converts the BNs to SyncBatchNorm: the deploy form must still fold them."""
    torch.manual_seed(0)
    model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(_randomize(create_model("unireplknet_t", num_classes=10,
                                                                                **TINY)))
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
    fused = reparameterize_model(model)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in fused.modules())
    deployed = create_model("unireplknet_t", num_classes=10, deploy=True, **TINY).eval()
    deployed.load_state_dict(fused.state_dict(), strict=True)


def test_dilated_kernel_conversion_equals_dilated_conv():
    g = torch.Generator().manual_seed(3)
    w, x = torch.randn(4, 1, 3, 3, generator=g, dtype=torch.float64), torch.randn(1, 4, 15, 15, generator=g,
                                                                                  dtype=torch.float64)
    dense = dilated_to_dense_kernel(w, 4)
    assert dense.shape == (4, 1, 9, 9) and torch.count_nonzero(dense) == torch.count_nonzero(w)
    ref = torch.nn.functional.conv2d(x, w, padding=4, dilation=4, groups=4)
    assert _rel(torch.nn.functional.conv2d(x, dense, padding=4, groups=4), ref) < 1e-14


@pytest.mark.parametrize("deploy", [False, True])
def test_official_layout_checkpoint_loads_strictly(tmp_path, deploy):
    src = create_model("unireplknet_t", num_classes=10, **TINY)
    _randomize(src)
    if deploy:
        src = reparameterize_model(src)
    path = tmp_path / "ckpt.pth"
    torch.save({"model": src.state_dict()}, path)  # the official checkpoints wrap the state dict in "model"
    model = create_model("unireplknet_t", weights=str(path), num_classes=10, **TINY).eval()
    assert all(torch.equal(v, src.state_dict()[k]) for k, v in model.state_dict().items())
    assert model.state_dict().keys() == src.state_dict().keys()
    assert any(k.endswith("lk_origin.bias") for k in model.state_dict()) == deploy  # deploy layout detected
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), src.eval()(x))


@pytest.mark.parametrize("name", VARIANTS)
def test_parameter_counts_match_the_paper(name):
    """The paper counts the deployed model (branches merged); the training-time one is larger."""
    with torch.device("meta"):
        deployed = create_model(name, deploy=True)
        train = create_model(name)
    paper, unit = PAPER_PARAMS_M[name]
    n_deploy = sum(p.numel() for p in deployed.parameters()) / 1e6
    n_train = sum(p.numel() for p in train.parameters()) / 1e6
    assert abs(n_deploy - paper) < unit, (n_deploy, paper)
    assert n_train > n_deploy


#: the paper's ImageNet table (deployed models): GFLOPs as printed, at 224 (IN-1K) or 384 (IN-22K-pretrained S-XL)
PAPER_GFLOPS = {("unireplknet_a", 224): 0.6, ("unireplknet_f", 224): 0.9, ("unireplknet_p", 224): 1.6,
                ("unireplknet_n", 224): 2.8, ("unireplknet_t", 224): 4.9, ("unireplknet_s", 224): 9.1,
                ("unireplknet_s", 384): 26.7, ("unireplknet_b", 384): 47.2, ("unireplknet_l", 384): 105.4,
                ("unireplknet_xl", 384): 187.0}


@pytest.mark.parametrize("name,size", list(PAPER_GFLOPS))
def test_flops_match_the_paper(name, size):
    """Multiply-accumulates of the deployed model, rounded as the paper prints them (XL: 186.8 -> 187)."""
    from erf_lab.models.flops import count_flops

    with torch.device("meta"):
        deployed = create_model(name, deploy=True)
    giga = count_flops(deployed, size) / 1e9
    assert round(giga, 0 if name == "unireplknet_xl" else 1) == PAPER_GFLOPS[name, size], giga


def test_forward_intermediates_stop_at_a_stage_and_registry():
    assert set(VARIANTS) <= set(list_models())
    model = create_model("unireplknet_a", num_classes=0, **TINY).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        assert [t.shape[1:] for t in inter] == [(8, 16, 16), (16, 8, 8), (16, 4, 4), (24, 2, 2)]
        assert torch.equal(final, model.forward_features(x)) and torch.equal(inter[-1], final)
        early = model.forward_intermediates(x, indices=[1], stop_early=True, intermediates_only=True)
        assert torch.equal(early[0], inter[1])
        assert model(x).shape == (1, 24)
    assert [f["module"] for f in model.feature_info] == [f"stages.{i}" for i in range(4)]


def test_constructor_errors():
    from erf_lab.errors import ErfLabError

    with pytest.raises(ErfLabError, match="no official kernel sizes"):
        UniRepLKNet(depths=(1, 1, 1, 1), dims=(8, 8, 8, 8))
    with pytest.raises(ErfLabError, match="kernel size 21"):
        UniRepLKNet(depths=(1, 1, 1, 1), dims=(8, 8, 8, 8), kernel_sizes=((3,), (3,), (21,), (3,)))
    # widths below 4 left the SE block 0 channels: built, then failed in the forward, blamed on the input size
    with pytest.raises(ErfLabError, match=r"widths must be >= 4 .* got dims=\(8, 8, 3, 8\)"):
        UniRepLKNet(depths=(1, 1, 1, 1), dims=(8, 8, 3, 8), kernel_sizes=((3,), (3,), (3,), (3,)))
    UniRepLKNet(depths=(1, 1, 1, 1), dims=(4, 4, 4, 4), kernel_sizes=((3,), (3,), (3,), (3,)))


def test_erf_run_through_the_runner(tmp_path):
    spec = ErfSpec("unireplknet_t", overrides=dict(TINY), num_images=1, input_size=64)
    res = run_erf(spec, out=tmp_path / "run", show_progress=False, formats=("png",))
    erf = res["result"].erf
    assert erf.shape == (64, 64) and float(erf.max()) > 0
    assert np.array_equal(np.load(tmp_path / "run" / "erf.npy"), erf)
    assert res["run_info"]["model"] == "unireplknet_t"


def test_erf_lab_models_describes_the_variants():
    from erf_lab.models.summary import describe_model

    row = describe_model("unireplknet_t")
    assert row["family"] == "unireplknet" and row["kernel_sizes"] == [3, 13, 13, 13]
    assert row["params"] == 31_693_420 and row["deploy_params"] == 31_037_980  # train-time / paper (31M) form

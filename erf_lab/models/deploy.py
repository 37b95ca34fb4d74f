"""Export a re-parameterized (deploy) checkpoint in the official RepLKNet merged key layout."""
from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn as nn

from erf_lab.errors import ErfLabError
from erf_lab.models.flops import count_flops, count_params
from erf_lab.models.replknet import ReparamLargeKernelConv, merge_large_kernels
from erf_lab.models.registry import register_deploy_layout
from erf_lab.provenance import now, provenance


def max_relative_error(reference, other) -> float:
    """``max |reference - other| / max |reference|`` (scale-free; robust to logits near zero); of lists of tensors
    (a downstream backbone's feature maps) the largest of the pairs'."""
    if isinstance(reference, (list, tuple)):
        if not isinstance(other, (list, tuple)) or len(other) != len(reference) or not reference:
            raise ValueError("max_relative_error: two equally long, non-empty lists of tensors expected")
        return max(max_relative_error(r, o) for r, o in zip(reference, other))
    reference, other = reference.double(), other.double()
    scale = reference.abs().max().clamp_min(torch.finfo(torch.float64).tiny)
    return float((reference - other).abs().max() / scale)


class ResidualBranchCheck:
    """Forward hooks on every residual branch's last module (``drop_path``, identity in eval mode): a first pass
    records each branch's output, a second pass measures each against its record (:func:`max_relative_error`).

    The logits alone can hide a wrong merge: a layer scale of 1e-6 (UniRepLKNet and SLaK at initialisation) puts
    every block's branch below the float32 rounding of the residual sum, so their logit error is 0 whatever the
    merge did. The error per branch is scale-free. Use as a context manager; ``errors`` after the second pass."""

    def __init__(self, model: nn.Module):
        self.modules = [m for n, m in model.named_modules() if n.rpartition(".")[2] == "drop_path"]
        self.reference: list[torch.Tensor] = []
        self.errors: list[float] = []
        self.recording = True

    def _hook(self, module, args, output) -> None:
        if self.recording:
            self.reference.append(output.detach().clone())
        elif len(self.errors) < len(self.reference):
            self.errors.append(max_relative_error(self.reference[len(self.errors)], output))
            self.reference[len(self.errors) - 1] = None  # measured: free it

    def __enter__(self) -> ResidualBranchCheck:
        self.handles = [m.register_forward_hook(self._hook) for m in self.modules]
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()

    @property
    def max_error(self) -> float | None:
        """The largest branch error of the second pass (None without residual branches)."""
        return max(self.errors) if self.errors else None


def has_mergeable_kernels(model: nn.Module) -> bool:
    """True when ``model`` has re-parameterizable large kernels with an official deploy layout: RepLKNet's
    large-kernel convs, UniRepLKNet's dilated re-param blocks, SLaK's decomposed kernels."""
    from erf_lab.models.slak import SLaKLargeKernel
    from erf_lab.models.unireplknet import DilatedReparamBlock

    kinds = (ReparamLargeKernelConv, DilatedReparamBlock, SLaKLargeKernel)
    return any(isinstance(m, kinds) for m in model.modules())


@register_deploy_layout
def merge_as_deployed(model: nn.Module) -> None:
    """``model`` (built as trained, its checkpoint loaded) merged in place into the official deploy layout, in
    training mode as built, where it has one (:func:`official_deploy_layout`): ``create_model(..., deploy=True)``
    with a training-time checkpoint, as RepLKNet's official scripts build, load, then merge."""
    if has_mergeable_kernels(model):
        official_deploy_layout(model, inplace=True).train()


def already_deployed(model: nn.Module) -> bool:
    """True when ``model`` is already in a merged (deploy) layout: ``lkb_reparam`` / UniRepLKNet's biased
    ``lk_origin``, as a deploy checkpoint (one written by ``erf-lab reparam``) builds it; nothing is left to merge."""
    from erf_lab.models.registry import _implies_deploy

    return _implies_deploy(model.state_dict())


def already_deployed_error(source: str | None, model_name: str = "", overrides: dict | None = None) -> ErfLabError:
    """The one line refusing to re-parameterize a model already merged: built with a deploy option (a training-time
    file with ``deploy=True`` is merged as it loads), else from ``source``, a checkpoint file in the deploy form."""
    given = ", ".join(f"{k}={v}" for k, v in (overrides or {}).items() if "deploy" in k and v)
    if source and not given:
        return ErfLabError(f"{source} is already in the deploy (re-parameterized) form; nothing to merge; use it as "
                           "it is")
    return ErfLabError(f"{model_name} built with {given or 'its options'} is already in the deploy (re-parameterized) "
                       "form; nothing to merge; build it in its train-time form (drop that --override)")


def official_deploy_layout(model: nn.Module, inplace: bool = False) -> nn.Module:
    """The layout of the family's official deploy checkpoints (a copy unless ``inplace``): RepLKNet merges only its
    large-kernel convs into ``lkb_reparam`` (:func:`merge_large_kernels`, every other conv-BN pair kept);
    UniRepLKNet and SLaK re-parameterize every block, as their official scripts do (``reparameterize_model``)."""
    from erf_lab.models.reparam import reparameterize_model

    if any(isinstance(m, ReparamLargeKernelConv) for m in model.modules()):
        return merge_large_kernels(model, inplace=inplace)
    if has_mergeable_kernels(model):
        return reparameterize_model(model, inplace=inplace)
    raise ErfLabError(f"{type(model).__name__} has no re-parameterizable large kernels (RepLKNet, UniRepLKNet "
                      "and SLaK have an official deploy layout)")


def save_state_dict(state_dict: dict[str, torch.Tensor], out: str | Path, facts: dict | None = None) -> Path:
    """Write a state dict atomically: ``.safetensors`` by suffix, else ``torch.save``. ``facts``
    (:func:`erf_lab.checkpoint.weights_facts`: random init, init seed, training size, classes) go into the file: the
    safetensors metadata, or a ``.pth`` ``{"model": state_dict, "erf_lab": {...}}`` (the official RepLKNet
    layout, which its loaders and erf-lab's read; :func:`erf_lab.checkpoint.pth_record`). Without facts a ``.pth``
    is the plain tensor dict."""
    from erf_lab.checkpoint import PTH_RECORD_KEY, pth_record, safetensors_facts
    from erf_lab.io import atomic_path

    out = Path(out)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    with atomic_path(out) as tmp:
        if out.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(tensors, str(tmp), metadata=safetensors_facts(facts or {}))
        else:
            record = pth_record(tensors, facts or {})
            torch.save(tensors if record is None else {"model": tensors, PTH_RECORD_KEY: record}, tmp)
    return out


def export_deploy(model_name: str, out: str | Path, *, weights: str | None = None, drop_head: bool = False,
                  batch_size: int = 2, input_size: int = 224, flops_input_size: int = 224, seed: int = 0,
                  show_progress: bool | None = None, argv: list[str] | None = None, **overrides) -> dict:
    """Build ``model_name`` (optionally with ``weights``), merge its kernels into the official deploy layout,
    measure the equivalence error of the logits on a random batch, and save the merged state dict to ``out``.

    Returns a summary: parameters and MACs ("FLOPs", paper convention) before/after, both also of the non-zero
    weights only (``nonzero_*``: a sparse checkpoint's zeros and merged kernels' zero taps left out), the max
    relative logit error and the largest of every residual branch's (:class:`ResidualBranchCheck`: the logits of an
    untrained UniRepLKNet / SLaK do not see their blocks), output path, its SHA-256 and the number of keys. The
    model runs in eval mode (BN running statistics), where the merge is exact up to float rounding. Without
    ``weights`` the model is initialised from ``seed``; a random init (or weights that are one) is marked in the
    output file, and so is the training size of ``weights`` where it is known (:func:`save_state_dict`); the
    summary is also written to ``<out>.run.json``, with the ``provenance`` every output carries (command line
    ``argv``, versions, time).
    """
    from erf_lab.io import (RESULT_KINDS, hold_file, missing_folders, prepare_out_dir, refuse_empty,
                            remove_empty_folders, result_kind)

    refuse_empty(out, hint="name the checkpoint file to write (.pth, .pt or .safetensors)")  # Path("") is "."
    out = Path(out)
    if out.suffix not in (".pth", ".pt", ".bin", ".safetensors", ".ckpt"):
        raise ErfLabError(f"output {out} should end in .pth, .pt or .safetensors")
    from erf_lab.erf.runner import MAX_INPUT_SIZE

    if batch_size < 1:  # named as the command line names them (the same arguments of export_deploy)
        raise ErfLabError(f"--check-batch (the equivalence check's batch) must be >= 1, got {batch_size}")
    if not 32 <= input_size <= MAX_INPUT_SIZE:
        raise ErfLabError(f"--check-size (the equivalence check's image side) must be in [32, {MAX_INPUT_SIZE}], "
                          f"got {input_size}")
    if weights and out.is_file() and Path(weights).is_file() and out.samefile(weights):
        raise ErfLabError(f"--out {out} is the --weights file itself: the deploy form would replace the train-time "
                          "weights, which cannot be recovered from it; name another output file")
    kind = result_kind(out.parent) if out.is_file() else None
    if kind not in (None, "unknown") and not out.with_name(out.name + ".run.json").is_file():
        # a file of another command's result (a training run's model.pth), not an earlier reparam output
        raise ErfLabError(f"--out {out} is a file of {RESULT_KINDS[kind]} in {out.parent}: the deploy form would "
                          "replace it; name another output file")
    made = missing_folders(out.parent)
    prepare_out_dir(out.parent, what="--out's folder")
    try:
        # held while it writes: a second reparam into the same file at once paired one's checkpoint with the
        # other's record; other files of the folder stay free. The temporaries a killed reparam left go
        with hold_file(out, with_files=[out.with_name(out.name + ".run.json")]):
            return _export_deploy(model_name, out, weights=weights, drop_head=drop_head, batch_size=batch_size,
                                  input_size=input_size, flops_input_size=flops_input_size, seed=seed,
                                  show_progress=show_progress, argv=argv, **overrides)
    except BaseException:  # a bad --weights file, a model that cannot merge, Ctrl-C: no empty folder left behind
        remove_empty_folders(made)
        raise


def _export_deploy(model_name: str, out: Path, *, weights, drop_head, batch_size, input_size, flops_input_size,
                   seed, show_progress, argv, **overrides) -> dict:
    """:func:`export_deploy` once its arguments are checked and ``out``'s folder exists."""
    from erf_lab.checkpoint import random_init_of, training_classes, training_input_size, weights_facts
    from erf_lab.io import progress, sha256_file, write_json
    from erf_lab.models.registry import create_model

    random_init = random_init_of(weights, pretrained=bool(overrides.get("pretrained")), seed=seed)
    train_size = training_input_size(weights)[0] if weights and random_init is None else None
    # a folder run's class names, what its outputs stand for (not with --drop-head: the head is left out)
    classes = training_classes(weights)[0] if weights and not drop_head else None
    t0, start_time = time.perf_counter(), now()
    bar = progress(total=6, desc=f"reparam {model_name}", unit="step",
                   disable=None if show_progress is None else not show_progress)
    try:
        bar.set_postfix_str("build")
        torch.manual_seed(seed)
        model = create_model(model_name, weights=weights, drop_head=drop_head, **overrides)
        if not has_mergeable_kernels(model):
            raise ErfLabError(f"model {model_name!r} has no re-parameterizable large kernels (RepLKNet, UniRepLKNet "
                              "and SLaK variants)")
        if already_deployed(model):  # a second merge would merge nothing and write the file again
            raise already_deployed_error(weights and str(weights), model_name, overrides)
        model.eval()
        bar.update()
        bar.set_postfix_str("count")
        params_before, flops_before = count_params(model), count_flops(model, flops_input_size)
        nonzero_before = count_params(model, nonzero=True), count_flops(model, flops_input_size, nonzero=True)
        in_ch = int(getattr(model, "default_cfg", {}).get("input_size", (3,))[0])
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(batch_size, in_ch, input_size, input_size, generator=gen)
        bar.update()
        with torch.no_grad(), ResidualBranchCheck(model) as branches:
            bar.set_postfix_str("train-time forward")
            before = model(x)
            bar.update()
            bar.set_postfix_str("merge")
            official_deploy_layout(model, inplace=True)
            bar.update()
            bar.set_postfix_str("deploy forward")
            branches.recording = False
            after = model(x)
            bar.update()
        error = max_relative_error(before, after)
        params_after, flops_after = count_params(model), count_flops(model, flops_input_size)
        nonzero_after = count_params(model, nonzero=True), count_flops(model, flops_input_size, nonzero=True)
        bar.set_postfix_str("save")
        # a classifier --drop-head kept at its random init is no part of the weights: left out, so nothing loads it
        # as trained (shape-bias would classify with it); loading the file then asks for --drop-head
        random_head = list(getattr(model, "random_init_keys", []))
        state = {k: v for k, v in model.state_dict().items() if k not in random_head}
        # the random-init mark and the training record go inside the weights file, so a copy of it alone keeps them
        facts = weights_facts(random_init=random_init is not None,
                              random_init_seed=None if random_init is None else random_init["seed"],
                              input_size=train_size or None, classes=classes)
        save_state_dict(state, out, facts=facts)
        bar.update()
    finally:
        bar.close()
    summary = dict(
        model=model_name, weights=str(weights) if weights else None,
        weights_sha256=sha256_file(weights) if weights and Path(weights).is_file() else None,
        weights_selection=getattr(model, "weights_selection", None), drop_head=drop_head,
        head_left_out=random_head,
        random_init=random_init is not None, init_seed=None if random_init is None else random_init["seed"],
        input_size=train_size, overrides={k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()},
        out=str(out), sha256=sha256_file(out), num_keys=len(state),
        params_before=params_before, params_after=params_after,
        flops_before=flops_before, flops_after=flops_after, flops_input_size=flops_input_size,
        nonzero_params_before=nonzero_before[0], nonzero_params_after=nonzero_after[0],
        nonzero_flops_before=nonzero_before[1], nonzero_flops_after=nonzero_after[1],
        max_rel_error=error, compared="stage feature maps" if isinstance(before, (list, tuple)) else "logits",
        branch_max_rel_error=branches.max_error, num_branches=len(branches.errors),
        check_batch=[batch_size, in_ch, input_size, input_size], seed=seed,
        seconds=round(time.perf_counter() - t0, 2), torch=torch.__version__,
    )
    # how the file was made (the summary held the numbers only: no command line, erf-lab version or time)
    record = provenance("reparam", {"model": model_name, "weights": summary["weights"], "drop_head": drop_head,
                                    "overrides": summary["overrides"], "out": str(out), "check_batch": batch_size,
                                    "check_size": input_size, "seed": seed}, argv, device="cpu")
    record.update(time=start_time, end_time=now(), wall_seconds=summary["seconds"])  # its start, not its end
    write_json(out.with_name(out.name + ".run.json"), {**summary, "provenance": record})
    return summary

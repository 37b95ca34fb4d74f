"""Building a model without paying for its random initialization twice, and paying for it on every core.

PyTorch draws a module's default weights in its constructor, on one thread from the global generator
(``uniform_`` is serial): 0.7-0.9 s of every ``erf-lab compute`` process for RepLKNet-31B's 79M weights on the
2-core dev box, ~4 s for XL (issue 14's fixed cost). :func:`materialize` turns a model built on the meta device
into real, uninitialized tensors (for a checkpoint that overwrites them all); :func:`init_default_` then draws
PyTorch's default initialization for every module, the large tensors on all of torch's threads, each module from
its own generator seeded from the global one. The distributions are PyTorch's own (tested against each module's
``reset_parameters``); the values are a function of ``torch.manual_seed`` alone (not of the thread count), but
not the values a serial construction draws. :func:`init_parallel_` runs any per-module draw the same way: UniRepLKNet
and SLaK draw their official truncated normal with it (:func:`trunc_normal_conv_linear`; unireplknet_l's build
4.3 -> 1.3 s, slak_b's 2.8 -> 1.2 s on the dev box).
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn as nn

#: a module with fewer weights than this is drawn on the calling thread (a task hand-over costs more)
PARALLEL_MIN_ELEMENTS = 1 << 16


def materialize(model: nn.Module, device: torch.device | str | None = None) -> nn.Module:
    """In place: every meta parameter / buffer of ``model`` becomes an uninitialized tensor of its shape and dtype
    on ``device`` (default: ``torch.get_default_device()``; shared tensors stay shared); returns ``model``.
    ``model.to_empty`` without its first-call cost: it goes through torch's Python reference ops, whose import
    (sympy included) takes ~0.5 s of a process."""
    made: dict = {}
    device = torch.get_default_device() if device is None else device

    def real(t):
        if id(t) not in made:
            e = torch.empty(t.shape, dtype=t.dtype, device=device)
            made[id(t)] = nn.Parameter(e, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else e
        return made[id(t)]

    for mod in model.modules():
        for store in (mod._parameters, mod._buffers):
            for name, t in store.items():
                if t is not None and t.is_meta:
                    store[name] = real(t)
    return model


def _draws_like_torch(module: nn.Module) -> bool:
    """True for the modules whose default initialization :func:`_reset` reproduces with an explicit generator:
    convs and linear layers that keep PyTorch's own ``reset_parameters``."""
    return ((isinstance(module, nn.modules.conv._ConvNd)
             and type(module).reset_parameters is nn.modules.conv._ConvNd.reset_parameters)
            or (isinstance(module, nn.Linear) and type(module).reset_parameters is nn.Linear.reset_parameters))


@torch.no_grad()
def _reset(module: nn.Module, generator: torch.Generator) -> None:
    """``module.reset_parameters()`` of a conv / linear layer drawn from ``generator``: PyTorch's default, i.e.
    ``kaiming_uniform_(a=sqrt(5))`` for the weight, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for the bias."""
    nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5), generator=generator)
    if module.bias is not None:
        fan_in, _ = nn.init._calculate_fan_in_and_fan_out(module.weight)
        bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
        nn.init.uniform_(module.bias, -bound, bound, generator=generator)


def is_conv_or_linear(module: nn.Module) -> bool:
    """The modules the ConvNeXt family's ``_init_weights`` draws (fastconv's depthwise module included)."""
    return isinstance(module, (nn.Conv2d, nn.Linear))


@torch.no_grad()
def trunc_normal_conv_linear(module: nn.Module, generator: torch.Generator, std: float = 0.02) -> None:
    """The ConvNeXt-family initialization (UniRepLKNet, SLaK: the official ``_init_weights``): the weight from a
    normal(0, ``std``) truncated to [-2, 2], the bias zero. At std 0.02 the bounds lie 100 std out, beyond any
    value ``normal_`` can return (its Box-Muller draw stops below 9 std), so ``normal_`` (one pass;
    ``trunc_normal_``'s inverse CDF takes five, 2x the time) draws the same distribution; bounds within 10 std
    go through ``trunc_normal_``."""
    if 2.0 >= 10 * std:
        module.weight.normal_(0.0, std, generator=generator)
    else:
        nn.init.trunc_normal_(module.weight, std=std, generator=generator)
    if module.bias is not None:
        nn.init.zeros_(module.bias)


def init_default_(model: nn.Module, threads: int | None = None) -> nn.Module:
    """In place: PyTorch's default initialization of every module of ``model`` (all of its tensors, e.g. after
    :func:`materialize`); returns ``model``. Convs and linear layers draw from their own generator (seeded, in
    module order, from one draw of the global generator) on ``threads`` threads (default: torch's intra-op
    thread count), largest first; other modules run their own ``reset_parameters()`` (BN: ones, zeros and fresh
    running statistics). A module that holds tensors and has no ``reset_parameters`` is refused: it would keep
    uninitialized memory."""
    return init_parallel_(model, _reset, _draws_like_torch, threads)


def init_parallel_(model: nn.Module, draw, select, threads: int | None = None) -> nn.Module:
    """In place: ``draw(module, generator)`` for every module of ``model`` that ``select(module)`` picks, each
    from its own generator (seeded, in module order, from one draw of the global generator) on ``threads``
    threads (default: torch's intra-op thread count), largest weight first; every other module that holds
    tensors runs its own ``reset_parameters()``, and one without it is refused (it would keep uninitialized
    memory). :func:`init_default_` is PyTorch's default; :func:`trunc_normal_conv_linear` with
    ``isinstance(module, (nn.Conv2d, nn.Linear))`` the ConvNeXt family's."""
    drawn, others = [], []
    for mod in model.modules():
        own = [t for t in (*mod._parameters.values(), *mod._buffers.values()) if t is not None]
        if not own:
            continue
        if select(mod):
            drawn.append(mod)
        elif callable(getattr(mod, "reset_parameters", None)):
            others.append(mod)
        else:
            raise RuntimeError(f"{type(mod).__name__} holds tensors but has no reset_parameters(): "
                               f"init_default_ cannot initialize it")
    if not drawn and not others:
        return model
    device = next(t for m in drawn + others for t in (*m._parameters.values(), *m._buffers.values())
                  if t is not None).device
    base = int(torch.randint(0, 2 ** 32, (), dtype=torch.int64))
    jobs = [(mod, (base + i) % 2 ** 32) for i, mod in enumerate(drawn)]

    def run(job):
        mod, seed = job
        draw(mod, torch.Generator(device=device).manual_seed(seed))

    jobs.sort(key=lambda j: -j[0].weight.numel())
    big = [j for j in jobs if j[0].weight.numel() >= PARALLEL_MIN_ELEMENTS]
    threads = max(1, min(threads or torch.get_num_threads(), len(big)))
    if threads > 1 and device.type == "cpu":
        with ThreadPoolExecutor(threads, thread_name_prefix="erf-lab-init") as pool:
            list(pool.map(run, big))  # uniform_ releases the GIL; list() re-raises a worker's error
        jobs = jobs[len(big):]
    for job in jobs:
        run(job)
    for mod in others:
        mod.reset_parameters()
    return model


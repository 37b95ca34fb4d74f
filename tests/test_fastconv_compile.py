"""fastconv under torch.compile: the graph holds fastconv's custom ops (forward and backward), which run the backend
an eager call of the same signature runs (autotuned on first use, settings honoured at run time); values and
gradients as nn.Conv2d; torch.export, vmap / jacrev inside compiled code, dynamic shapes and inductor."""
from __future__ import annotations

import statistics
import threading

import pytest
import torch
import torch.nn as nn
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd

import fastconv
from fastconv import compiled  # noqa: F401 - registers the ops
from fastconv import cpu_kernels as ck
from fastconv import dispatch
from tests.test_fastconv import _rel

FORWARD_OP, BACKWARD_OP = "fastconv.depthwise_conv2d.default", "fastconv.depthwise_conv2d_backward.default"
#: the kernels each backend runs (cpu_kernels functions), forward and backward
KERNELS = {"cpp": ("cpp_conv", "cpp_backward", "cpp_weight_grad"),
           "channels_last": ("onednn_conv_cl", "onednn_weight_grad")}


@pytest.fixture(autouse=True)
def _isolated(fastconv_isolated):
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def recording_backend(graphs: dict):
    """aot_eager that records the ops of each forward and backward graph it compiles."""
    def compiler(kind):
        def compile_graph(gm, example_inputs):
            graphs.setdefault(kind, []).append({str(n.target) for n in gm.graph.nodes if n.op == "call_function"})
            return make_boxed_func(gm.forward)
        return compile_graph
    return aot_autograd(fw_compiler=compiler("forward"), bw_compiler=compiler("backward"))


def spy_kernels(monkeypatch, names) -> list[str]:
    calls: list[str] = []
    for name in names:
        real = getattr(ck, name)
        monkeypatch.setattr(ck, name, lambda *a, _n=name, _r=real, **k: calls.append(_n) or _r(*a, **k))
    return calls


def pair(backend=None, k1=13, k2=5, channels=8):
    """A two-layer fastconv model (the second without bias) and the same weights in nn.Conv2d."""
    torch.manual_seed(0)
    model = nn.Sequential(fastconv.DepthwiseConv2d(channels, k1, backend=backend), nn.ReLU(),
                          fastconv.DepthwiseConv2d(channels, k2, bias=False, backend=backend))
    ref = nn.Sequential(nn.Conv2d(channels, channels, k1, padding=k1 // 2, groups=channels), nn.ReLU(),
                        nn.Conv2d(channels, channels, k2, padding=k2 // 2, groups=channels, bias=False))
    ref.load_state_dict(model.state_dict())
    return model, ref


def check_training_step(model, ref, run, x, tol=1e-5):
    xs = [x.clone().requires_grad_() for _ in range(2)]
    y, yr = run(xs[0]), ref(xs[1])
    assert y.stride() == yr.stride()  # the input's memory format
    y.square().sum().backward()
    yr.square().sum().backward()
    assert _rel(y, yr) <= 1e-6 and _rel(xs[0].grad, xs[1].grad) <= tol
    for p, q in zip(model.parameters(), ref.parameters()):
        assert _rel(p.grad, q.grad) <= tol
    model.zero_grad()
    ref.zero_grad()


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("backend", ["cpp", "channels_last"])
def test_compiled_graph_runs_fastconv_kernels(backend, layout, one_thread, monkeypatch):
    """The forward and backward graphs hold fastconv's ops (not aten's convolution, which the compiled graph held
    before: 10x slower at K = 31), and the backend's kernels run in them."""
    model, ref = pair(backend)
    graphs: dict = {}
    run = torch.compile(model, backend=recording_backend(graphs), fullgraph=True)
    x = torch.randn(2, 8, 12, 12)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    calls = spy_kernels(monkeypatch, KERNELS[backend])
    check_training_step(model, ref, run, x)
    (fwd,), (bwd,) = graphs["forward"], graphs["backward"]
    assert FORWARD_OP in fwd and not any("convolution" in t for t in fwd)
    assert BACKWARD_OP in bwd and not any("convolution" in t for t in bwd)
    forward_kernel = KERNELS[backend][0]
    assert calls.count(forward_kernel) >= 2 and len(set(calls) - {forward_kernel}) >= 1  # and a gradient kernel
    calls.clear()
    with torch.no_grad():  # (recompiled for grad mode off: the op's flags say no gradient)
        assert _rel(run(x), ref(x)) <= 1e-6
    assert calls == [forward_kernel] * 2


def test_compiled_call_takes_the_eager_decision_and_follows_settings(monkeypatch):
    """backend "auto": a compiled call of a signature not seen yet is autotuned as an eager call would be (the timed
    decision lands in the cache file, made on a helper thread: inside the op autograd is off) and later eager calls
    of that signature take it; ``fastconv.use`` inside the same compiled function switches the backend at run time,
    and a backend that cannot run the call raises its one-line error."""
    model, ref = pair(None, k1=7, k2=7)
    run = torch.compile(model, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 8, 12, 12)
    threads = []  # the threads that made a decision
    real_resolve = dispatch.resolve
    monkeypatch.setattr(dispatch, "resolve", lambda backend, *a: (
        backend == "auto" and dispatch._fast.get(dispatch._fast_key(*a)) is None
        and threads.append(threading.current_thread().name)) or real_resolve(backend, *a))
    check_training_step(model, ref, run, x)
    assert threads == ["fastconv-autotune"] * 2  # one per layer (the second has no bias), in the forward op
    stand_in = (x.clone().requires_grad_(), model[0].weight, model[0].bias)
    key = dispatch.cache_key(*stand_in)
    entry = dispatch._read(dispatch.cache_file())[key]
    assert entry["times_ms"] and entry["backend"] in entry["times_ms"]  # timed
    assert dispatch.resolve("auto", *stand_in) == entry["backend"]  # the eager call: the same decision, no new timing
    assert threads == ["fastconv-autotune"] * 2
    calls = spy_kernels(monkeypatch, ("onednn_conv_cl", "cpp_conv"))
    with fastconv.use(backend="channels_last"), torch.no_grad():
        assert _rel(run(x), ref(x)) <= 1e-6
    assert calls == ["onednn_conv_cl"] * 2
    with fastconv.use(backend="fft"):  # another backend, the same compiled graph
        check_training_step(model, ref, run, x)
    with fastconv.use(backend="triton"), pytest.raises(ValueError, match="triton needs a CUDA tensor"):
        run(x)


def test_compiled_backward_runs_the_forward_backend(monkeypatch):
    """As in eager mode, the backward runs the backend its forward ran, whatever the settings when it runs: a forward
    forced to "fft" and a backward outside that block (no autotuning, no kernel of another backend), and a backward
    under settings that could not run the call."""
    model, ref = pair(None, k1=7, k2=7)
    run = torch.compile(model, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 8, 12, 12)
    decisions = []
    real_resolve = dispatch.resolve
    monkeypatch.setattr(dispatch, "resolve", lambda *a: decisions.append(a[0]) or real_resolve(*a))
    calls = spy_kernels(monkeypatch, ("fft_conv", "cpp_conv", "cpp_backward", "cpp_weight_grad", "onednn_conv_cl",
                                      "onednn_weight_grad"))
    xs = [x.clone().requires_grad_() for _ in range(2)]
    with fastconv.use(backend="fft"):
        y = run(xs[0])
    y.square().sum().backward()
    ref(xs[1]).square().sum().backward()
    # two forward ops resolved (under the forced backend); the backward: PyTorch's formulas, as eager fft runs it
    assert calls == ["fft_conv"] * 2 and decisions == ["auto"] * 2
    assert _rel(xs[0].grad, xs[1].grad) <= 1e-5
    assert all(_rel(p.grad, q.grad) <= 1e-5 for p, q in zip(model.parameters(), ref.parameters()))
    y = run(x.clone().requires_grad_())
    with fastconv.use(backend="triton"):
        y.sum().backward()


def test_compiled_decision_sees_which_parameter_is_trained(monkeypatch):
    """Only the bias trained: the autotuner is asked about the call eager mode would make (no weight gradient to
    time in the per-op mixes), not one with a trained weight."""
    model, ref = pair(None, k1=7, k2=7)
    model.requires_grad_(False)
    model[0].bias.requires_grad_(True)
    seen = []
    real_resolve = dispatch.resolve
    monkeypatch.setattr(dispatch, "resolve", lambda backend, x, w, b: seen.append(
        (x.requires_grad, w.requires_grad, None if b is None else b.requires_grad)) or real_resolve(backend, x, w, b))
    run = torch.compile(model, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 8, 12, 12, requires_grad=True)
    run(x).square().sum().backward()
    assert seen == [(True, False, True), (True, False, None)]
    # ... and remembered apart from the call with a trained weight, in memory and in the cache file
    xs, weight, bias = x.detach().requires_grad_(), model[0].weight.detach(), model[0].bias
    for key in (dispatch._fast_key, dispatch.cache_key):
        assert key(xs, weight, bias) != key(xs, weight.requires_grad_(), bias)
        weight.requires_grad_(False)
    ref.requires_grad_(False)
    ref[0].bias.requires_grad_(True)
    xr = x.detach().clone().requires_grad_()
    ref(xr).square().sum().backward()
    assert _rel(model[0].bias.grad, ref[0].bias.grad) <= 1e-5 and _rel(x.grad, xr.grad) <= 1e-5


def test_compiled_dual_numbers_and_empty_input_take_the_stock_op():
    """Forward-mode AD through a compiled function (the op has no forward-mode rule: the tangent was lost) and an
    empty input (the stock op keeps a channels_last layout) trace F.conv2d."""
    import torch.autograd.forward_ad as fwad

    model, ref = pair(None, k1=5, k2=3, channels=4)
    model.requires_grad_(False)  # (a graph with trainable parameters has no forward-mode rule in torch itself)
    run = torch.compile(model, backend="aot_eager", fullgraph=True)
    x, t = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    with fwad.dual_level():
        tangent = fwad.unpack_dual(run(fwad.make_dual(x, t))).tangent
        expected = fwad.unpack_dual(ref(fwad.make_dual(x, t))).tangent
    assert tangent is not None and _rel(tangent, expected) <= 1e-6
    empty = torch.randn(0, 4, 9, 10).contiguous(memory_format=torch.channels_last)
    assert run(empty).shape == (0, 4, 9, 10) and run(empty).stride() == ref(empty).stride()


def test_compiled_frozen_weights_skip_the_weight_gradient(one_thread, monkeypatch):
    """ERF / attribution in a compiled model: weights frozen, the backward op computes dL/dx only."""
    model, ref = pair("cpp")
    model.requires_grad_(False)
    ref.requires_grad_(False)

    def boom(*a, **k):
        raise AssertionError("a weight gradient was computed")

    for name in ("onednn_weight_grad", "cpp_weight_grad", "cpp_backward"):
        monkeypatch.setattr(ck, name, boom)
    run = torch.compile(model, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 8, 12, 12)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    (g,) = torch.autograd.grad(run(xs[0]).square().sum(), xs[0])
    (gr,) = torch.autograd.grad(ref(xs[1]).square().sum(), xs[1])
    assert _rel(g, gr) <= 1e-5


@pytest.mark.parametrize("grad", [False, True])
def test_jit_trace_records_the_stock_op(grad, one_thread):
    """torch.jit.trace (TorchScript deployment, the ONNX exporter's tracing) of a model whose conv runs the C++ kernel:
    under no_grad the trace recorded only the kernel output's torch.empty_like, and the traced model returned
    uninitialised memory for every later input (errors ~1e7, and the trace's own check passed); with grad the custom
    Function became a Python op that torch.jit.save refused. Now the trace holds aten's convolution, as
    torch.export's graph does."""
    import io
    import warnings

    import torch.nn.functional as F

    m = fastconv.DepthwiseConv2d(4, 13, backend="cpp")
    x = torch.randn(2, 4, 9, 9)
    with torch.set_grad_enabled(grad), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings of the checks' Python branches
        traced = torch.jit.trace(m, x, check_trace=False)
    assert "aten::_convolution" in str(traced.graph)
    buf = io.BytesIO()
    torch.jit.save(traced, buf)
    buf.seek(0)
    loaded = torch.jit.load(buf)
    for _ in range(3):
        x2 = torch.randn(2, 4, 9, 9) * 3
        with torch.no_grad():
            expected = F.conv2d(x2, m.weight, m.bias, padding=6, groups=4)
            assert _rel(traced(x2), expected) <= 1e-5 and _rel(loaded(x2), expected) <= 1e-5


@pytest.mark.parametrize("backend", ["auto", "cpp", "fft", "native", "channels_last"])
def test_export_trace_and_vmap_over_channels_give_conv2d_numbers(backend, one_thread):
    """Each CPU backend under torch.export and torch.jit.trace (NCHW and channels_last inputs, later inputs too), and
    under vmap over the channel dimension (one channel per vmapped call): F.conv2d's numbers."""
    import warnings

    import torch.nn.functional as F

    m = fastconv.DepthwiseConv2d(4, 9, backend=None if backend == "auto" else backend).eval()
    x = torch.randn(2, 4, 11, 10)
    for fmt in (torch.contiguous_format, torch.channels_last):
        xf = x.contiguous(memory_format=fmt)
        exported = torch.export.export(m, (xf,)).module()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings of the checks' Python branches
            traced = torch.jit.trace(m, xf)
            for x2 in (xf, (torch.randn(2, 4, 11, 10) * 3).contiguous(memory_format=fmt)):
                expected = F.conv2d(x2, m.weight, m.bias, padding=4, groups=4)
                assert _rel(exported(x2), expected) <= 1e-5 and _rel(traced(x2), expected) <= 1e-5
    with torch.no_grad():
        per_channel = torch.func.vmap(
            lambda xc, wc, bc: fastconv.depthwise_conv2d(xc[:, None], wc[None], bc[None], backend=backend)[:, 0],
            in_dims=(1, 0, 0), out_dims=1)(x, m.weight, m.bias)
        assert _rel(per_channel, F.conv2d(x, m.weight, m.bias, padding=4, groups=4)) <= 1e-5


def test_real_tensors_under_fake_tensor_mode_make_fx_and_functionalize_run_the_stock_op(monkeypatch, one_thread):
    """Real (not fake) tensors under FakeTensorMode(allow_non_fake_inputs=True) reached the C++ kernel, which wrote
    through the pointer of the mode's fake output and crashed the process; make_fx (tracing_mode "real") recorded only
    the kernel output's empty_like, and its graph returned uninitialised memory; torch.func.functionalize failed with
    torch's "NYI: Functionalize rule for custom_function_call". Each now runs the stock op: fake outputs of the right
    shape and strides, a graph of aten's convolution with F.conv2d's values, functionalize's values as F.conv2d's."""
    import torch.nn.functional as F
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    x, w, b = torch.randn(2, 4, 9, 8), torch.randn(4, 1, 13, 13), torch.randn(4)
    conv = fastconv.DepthwiseConv2d(4, 13, backend="cpp")
    for name in KERNELS["cpp"]:  # the C++ kernel on a fake output or a traced call: never reached
        monkeypatch.setattr(ck, name, lambda *a, name=name, **k: pytest.fail(f"{name} reached"))
    for layout in (torch.contiguous_format, torch.channels_last):
        xl = x.contiguous(memory_format=layout)
        with FakeTensorMode(allow_non_fake_inputs=True):
            y = fastconv.depthwise_conv2d(xl, w, b, backend="cpp")
            out = conv(xl)
            out.sum().backward()
        assert isinstance(y, FakeTensor) and isinstance(out, FakeTensor)
        assert y.shape == out.shape == x.shape and y.stride() == out.stride() == xl.stride()
        assert isinstance(conv.weight.grad, FakeTensor) and conv.weight.grad.shape == (4, 1, 13, 13)
        conv.weight.grad = None
    for backend in ("cpp", "channels_last"):
        def f(x, w, b):
            return fastconv.depthwise_conv2d(x, w, b, backend=backend)
        gm = make_fx(f)(x, w, b)
        assert "aten.convolution.default" in {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
        for _ in range(2):
            x2 = torch.randn_like(x) * 3
            assert _rel(gm(x2, w, b), F.conv2d(x2, w, b, padding=6, groups=4)) <= 1e-5
        assert _rel(torch.func.functionalize(f)(x, w, b), F.conv2d(x, w, b, padding=6, groups=4)) <= 1e-5


def test_the_backward_of_an_eager_forward_under_make_fx_or_fake_tensor_mode(one_thread):
    """The backward of a forward run eagerly on the C++ kernel, traced by make_fx: its graph held only the gradient
    kernels' empty_like (F.conv2d's gradients never came out); run under FakeTensorMode(allow_non_fake_inputs=True):
    the C++ kernel wrote through a fake gradient's pointer and crashed the process. Both now run PyTorch's
    formulas."""
    import torch.nn.functional as F
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    x, w = torch.randn(2, 4, 9, 8, requires_grad=True), torch.randn(4, 1, 13, 11, requires_grad=True)
    y = fastconv.depthwise_conv2d(x, w, backend="cpp")
    gm = make_fx(lambda g: torch.autograd.grad(y, (x, w), g, retain_graph=True))(torch.ones_like(y))
    g2 = torch.randn_like(y)
    expected = torch.autograd.grad(F.conv2d(x, w, padding=(6, 5), groups=4), (x, w), g2)
    assert all(_rel(a, e) <= 1e-5 for a, e in zip(gm(g2), expected))
    with FakeTensorMode(allow_non_fake_inputs=True):
        gx, gw = torch.autograd.grad(y, (x, w), torch.ones_like(y))
    assert isinstance(gx, FakeTensor) and isinstance(gw, FakeTensor) and gx.shape == x.shape and gw.shape == w.shape


def test_fx_symbolic_trace_records_fastconv_as_one_node(one_thread):
    """torch.fx.symbolic_trace (the tracer of quantize_fx and torchvision's feature extractor) of a model with a
    DepthwiseConv2d failed ("symbolically traced variables cannot be used as inputs to control flow", the unbatched
    test), and of a forward calling depthwise_conv2d with "x and weight must be torch.Tensors"; each is one node now,
    and the GraphModule computes as F.conv2d, on batched and unbatched inputs, also after a pickle round trip (which
    traces again)."""
    import pickle

    import torch.nn.functional as F

    class UsesTheOp(nn.Module):
        def __init__(self):
            super().__init__()
            self.w, self.b = nn.Parameter(torch.randn(4, 1, 5, 3)), nn.Parameter(torch.randn(4))

        def forward(self, x):
            return fastconv.depthwise_conv2d(x, self.w, self.b, padding=(2, 1), groups=4).relu()

    model = nn.Sequential(nn.Conv2d(4, 4, 1), fastconv.DepthwiseConv2d(4, 7, backend="cpp"), UsesTheOp())
    x = torch.randn(2, 4, 9, 8)
    dw, op = model[1], model[2]

    def expected(x):
        y = F.conv2d(F.conv2d(x, model[0].weight, model[0].bias), dw.weight, dw.bias, padding=3, groups=4)
        return F.conv2d(y, op.w, op.b, padding=(2, 1), groups=4).relu()

    gm = torch.fx.symbolic_trace(model)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert fastconv.module.conv_forward in targets and fastconv.depthwise_conv2d in targets
    alone = torch.fx.symbolic_trace(dw)
    with torch.no_grad():
        for traced in (gm, pickle.loads(pickle.dumps(gm))):
            assert _rel(traced(x), expected(x)) <= 1e-5
        for traced in (alone, pickle.loads(pickle.dumps(alone))):
            assert _rel(traced(x[0]), F.conv2d(x[0], dw.weight, dw.bias, padding=3, groups=4)) <= 1e-5


def test_jit_script_of_a_converted_model_runs_the_stock_op(one_thread):
    """torch.jit.script of a model holding a DepthwiseConv2d (``convert_model``'s output) raised TorchScript's
    NotSupportedError on fastconv's Python dispatch; now the scripted module runs the stock conv (saveable, the same
    numbers) and the eager model keeps its fastconv module."""
    import io

    model = nn.Sequential(nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 13, padding=6, groups=4), nn.ReLU()).eval()
    assert fastconv.convert_model(model) == 1
    scripted = torch.jit.script(model)
    buf = io.BytesIO()
    torch.jit.save(scripted, buf)
    buf.seek(0)
    loaded = torch.jit.load(buf)
    x = torch.randn(2, 4, 9, 9)
    with torch.no_grad():
        assert _rel(scripted(x), model(x)) <= 1e-5 and _rel(loaded(x), model(x)) <= 1e-5
    assert type(model[1]) is fastconv.DepthwiseConv2d


def test_jit_script_of_code_calling_depthwise_conv2d_runs_the_stock_op(one_thread):
    """torch.jit.script of a module whose forward calls ``fastconv.depthwise_conv2d`` (or of the function itself)
    failed with TorchScript's NotSupportedError on its keyword-only arguments; it now compiles to F.conv2d with the
    eager op's checks (the same numbers, batched and unbatched, saveable; padding other than 'same' one clear error)."""
    import io

    import torch.nn.functional as F

    class UsesTheOp(nn.Module):
        def __init__(self):
            super().__init__()
            self.w, self.b = nn.Parameter(torch.randn(4, 1, 5, 3)), nn.Parameter(torch.randn(4))

        def forward(self, x):
            y = fastconv.depthwise_conv2d(x, self.w, self.b, backend="cpp", padding=[2, 1], groups=4)
            return y.relu() + fastconv.depthwise_conv2d(x, self.w, padding=(2, 1))

    model = UsesTheOp()
    scripted = torch.jit.script(model)
    buf = io.BytesIO()
    torch.jit.save(scripted, buf)
    buf.seek(0)
    loaded = torch.jit.load(buf)
    x = torch.randn(2, 4, 9, 8)
    with torch.no_grad():
        conv = F.conv2d(x, model.w, model.b, padding=(2, 1), groups=4)
        expected = conv.relu() + F.conv2d(x, model.w, padding=(2, 1), groups=4)
        assert _rel(scripted(x), expected) <= 1e-5 and _rel(loaded(x), expected) <= 1e-5
        assert _rel(scripted(x[0]), expected[0]) <= 1e-5
        fn = torch.jit.script(fastconv.depthwise_conv2d)
        assert _rel(fn(x, model.w, model.b), conv) <= 1e-5
        with pytest.raises(torch.jit.Error, match="only 'same' padding is supported"):
            fn(x, model.w, model.b, padding=3)


def test_export_keeps_the_stock_op_and_functorch_runs_inside_compiled_code(one_thread):
    """torch.export: a portable graph (aten's conv2d, which other runtimes know); vmap and jacrev inside compiled
    functions: the stock op, which functorch batches."""
    model, ref = pair(None, k1=5, k2=3, channels=4)
    x = torch.randn(2, 4, 6, 6)
    ops = {str(n.target) for n in torch.export.export(model, (x,)).graph.nodes if n.op == "call_function"}
    assert "aten.conv2d.default" in ops and not any(o.startswith("fastconv") for o in ops)
    vm = torch.compile(lambda t: torch.func.vmap(lambda u: model(u))(t), backend="aot_eager", fullgraph=True)
    xb = torch.randn(3, 2, 4, 6, 6)
    assert _rel(vm(xb), torch.func.vmap(ref)(xb)) <= 1e-6
    jr = torch.compile(lambda t: torch.func.jacrev(model)(t), backend="aot_eager", fullgraph=True)
    assert _rel(jr(x[:1]), torch.func.jacrev(ref)(x[:1])) <= 1e-5


def test_compiled_dynamic_shapes_compile_once(one_thread):
    model, ref = pair(None, k1=7, k2=3, channels=4)
    graphs: dict = {}
    run = torch.compile(model, backend=recording_backend(graphs), dynamic=True, fullgraph=True)
    for n, h, w in ((2, 6, 7), (3, 9, 5), (4, 11, 13)):  # (a size of 1 is specialized on)
        x = torch.randn(n, 4, h, w)
        check_training_step(model, ref, run, x)
    assert len(graphs["forward"]) == 1 and FORWARD_OP in graphs["forward"][0]
    x = torch.randn(3, 4, 8, 8)
    torch._dynamo.decorators.mark_unbacked(x, 0)  # a size the compiler cannot guard on (was: data-dependent error)
    check_training_step(model, ref, torch.compile(model, backend="aot_eager", fullgraph=True), x)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_inductor_block_matches_eager(layout, monkeypatch):
    """A RepLKNet-style block (1x1 conv, GELU, 13x13 depthwise, BatchNorm, GELU, 1x1 conv) compiled with inductor:
    fastconv's forward and backward ops run inside, the outputs and gradients are those of the eager block."""
    torch.manual_seed(0)

    def block(conv):
        return nn.Sequential(nn.Conv2d(16, 16, 1), nn.GELU(), conv, nn.BatchNorm2d(16), nn.GELU(), nn.Conv2d(16, 16, 1))

    # (no bias before BatchNorm, as in RepLKNet: its gradient is 0 but for rounding)
    model = block(fastconv.DepthwiseConv2d(16, 13, bias=False))
    ref = block(nn.Conv2d(16, 16, 13, padding=6, groups=16, bias=False))
    ref.load_state_dict(model.state_dict())
    run = torch.compile(model, fullgraph=True)
    x = torch.randn(2, 16, 10, 10)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    ops = []
    real_resolve = compiled.resolve_in_graph
    monkeypatch.setattr(compiled, "resolve_in_graph", lambda *a: ops.append(a[0]) or real_resolve(*a))
    check_training_step(model, ref, run, x, tol=1e-4)
    assert ops == ["auto"]  # the forward op resolves; the backward op runs the forward's backend


def test_compile_benchmark_reports_measured_ratios(tmp_path, monkeypatch, one_thread):
    """benchmarks/bench_compile.py (a): each variant's times, the median per-round ratio to fastconv eager, and the
    compiled layer's GFLOP/s inside the map over the machine's FMA peak, all from the same run's measurements."""
    import importlib.util
    import json

    from fastconv import roofline
    from tests.test_fastconv import REPO_ROOT

    spec = importlib.util.spec_from_file_location("bench_compile", REPO_ROOT / "benchmarks" / "bench_compile.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    machine = {"cpu_model": "test CPU", "isa": "avx2", "threads": 1, "torch": torch.__version__,
               "sgemm_gflops": 10.0, "fma_peak_gflops": 20.0}
    monkeypatch.setattr(roofline, "machine_roofline", lambda **k: dict(machine))
    assert bench.main(["--kernels", "7", "--channels", "8", "--res", "8", "--rounds", "3", "--steps", "0",
                       "--out", str(tmp_path), "--name", "c"]) == 0
    r = json.loads((tmp_path / "c.json").read_text())
    (row,) = r["layers"]
    assert row["k"] == 7 and set(row["ms_best"]) == set(bench.LAYER_VARIANTS)
    assert row["ratio_to_fastconv_eager"]["fastconv_eager"] == 1.0
    base = row["rounds_ms"]["fastconv_eager"]
    for name in bench.LAYER_VARIANTS:
        rounds = row["rounds_ms"][name]
        assert len(rounds) == 3 and 0 < row["ms_best"][name] <= row["ms_median"][name]
        assert row["ms_best"][name] == pytest.approx(min(rounds), abs=1e-3)
        ratio = statistics.median(t / b for t, b in zip(rounds, base))
        assert row["ratio_to_fastconv_eager"][name] == pytest.approx(ratio, rel=1e-3, abs=1e-3)  # ratio rounded to 3 places
        inside = 3 * roofline.depthwise_flops(1, 8, 8, 8, 7, 7)["inside"]
        gflops = inside / (min(rounds) / 1e3) / 1e9
        assert row["gflops_inside"][name] == pytest.approx(gflops, rel=2e-3, abs=0.06)
        assert row["fraction_of_fma_peak"][name] == pytest.approx(gflops / 20.0, rel=2e-3, abs=2e-3)
    md = (tmp_path / "c.md").read_text()
    assert "test CPU (avx2)" in md and "| 7 | stock_compiled_cl |" in md and "training step" not in md


def test_the_compile_support_costs_no_start_up_time():
    """Registering the ops does not import what tracing needs (sympy through torch's symbolic shapes: ~0.3 s of
    every erf-lab process's start-up)."""
    import subprocess
    import sys

    from tests.test_fastconv import REPO_ROOT

    code = ("import sys, torch, fastconv.functional, fastconv.compiled; "
            "print(sorted(m for m in ('sympy', 'torch.fx.experimental.symbolic_shapes') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr

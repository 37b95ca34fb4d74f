"""Roofline of an ERF measurement (``erf_lab.erf.roofline``): the FLOP count against a hand count on every
fastconv backend, the run.json fields, old run.json files without them, and the progress-bar text."""
import json

import pytest
import torch
import torch.nn as nn

import fastconv
from erf_lab.erf import roofline as R
from erf_lab.erf.attribution import EffectiveReceptiveField
from erf_lab.erf.compute import compute_erf
from erf_lab.erf.rundir import RUN_FILE, load_run
from erf_lab.erf.runner import ErfSpec, run_erf
from erf_lab.errors import ErfLabError
from tests.conftest import need_cpp

TINY_KW = {"channels": (8, 8, 8, 8), "layers": (1, 1, 1, 1)}
FAKE_REF = {"sgemm_gflops": 100.0, "sgemm_device": "cpu", "cpu_model": "test cpu", "isa": "avx2", "threads": 1}


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """FLOP counts are cached in the erf-lab cache: each test starts with an empty one."""
    monkeypatch.setenv("ERF_LAB_CACHE", str(tmp_path / "cache"))


class Tiny(nn.Module):
    """conv 3->4 (3x3) -> ReLU -> fastconv depthwise 7x7 -> ReLU -> conv 4->2 (1x1)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.dw = fastconv.DepthwiseConv2d(4, 7, bias=True)
        self.c2 = nn.Conv2d(4, 2, 1)

    def forward_features(self, x):
        return self.c2(torch.relu(self.dw(torch.relu(self.c1(x)))))


def hand_count(h, w):
    """Multiply-adds x 2 for the forward, as much again for the input gradient (frozen weights: no dL/dw)."""
    fwd = 2 * h * w * (4 * 3 * 3 * 3 + 4 * 7 * 7 + 2 * 4)
    return 2 * fwd


@pytest.mark.parametrize("backend", ["native", "channels_last", "cpp", "fft", "auto"])
def test_flop_count_of_a_tiny_model_is_the_hand_count(backend):
    torch.manual_seed(0)
    m = Tiny().eval().requires_grad_(False)
    erf = EffectiveReceptiveField(m)
    x = torch.randn(2, 3, 12, 10)
    if backend == "cpp":
        need_cpp()
    with fastconv.use(backend=backend), R.counting_flops(m) as total:
        erf.attribute(x)
    assert total() == 2 * hand_count(12, 10)  # two images
    # the depthwise products with zero padding, by brute force over outputs and taps (7x7 on 12x10, pad 3)
    inside = sum(1 for p in range(12) for i in range(7) if 0 <= p + i - 3 < 12) * \
        sum(1 for q in range(10) for j in range(7) if 0 <= q + j - 3 < 10)
    assert total.padding() == 2 * 2 * 2 * 4 * (12 * 10 * 49 - inside)  # images x (fwd + dx) x 2 FLOPs x channels


@pytest.mark.parametrize("backend,kernel", [("cpp", "cpp_conv"), ("fft", "fft_conv"),
                                            ("channels_last", "onednn_conv_cl")])
def test_the_counted_pass_runs_fastconvs_own_kernels(backend, kernel, monkeypatch):
    """The batch whose FLOPs are counted runs the kernels every other batch runs (fastconv's default under
    FlopCounterMode is the stock op, which the mode counts; erf-lab counts those calls itself): not a first image
    through the stock convolution, at K = 31 several times slower."""
    from fastconv import cpu_kernels as ck

    if backend == "cpp":
        need_cpp()
    ran, real = [], getattr(ck, kernel)
    monkeypatch.setattr(ck, kernel, lambda *a, **k: ran.append(1) or real(*a, **k))
    m = Tiny().eval().requires_grad_(False)
    with fastconv.use(backend=backend), R.counting_flops(m) as total:
        EffectiveReceptiveField(m).attribute(torch.randn(2, 3, 12, 10))
    assert total() == 2 * hand_count(12, 10) and len(ran) >= 1


def test_compute_erf_reports_flops_per_image_and_batch_times(monkeypatch):
    monkeypatch.setattr(R, "sgemm_reference", lambda dev: dict(FAKE_REF))
    torch.manual_seed(0)
    res = compute_erf(Tiny(), torch.randn(5, 3, 16, 16), batch_size=2, show_progress=False, roofline=True,
                      reparameterize=False)
    assert res.info["flops_per_image"] == hand_count(16, 16)
    assert [b[0] for b in res.info["batch_seconds"]] == [2, 2, 1]
    assert res.info["roofline"] == FAKE_REF
    # not asked: no count, no reference, still the batch times
    res = compute_erf(Tiny(), torch.randn(2, 3, 16, 16), show_progress=False, reparameterize=False)
    assert "flops_per_image" not in res.info and len(res.info["batch_seconds"]) == 2


def test_a_repeated_run_takes_the_flop_count_from_the_cache(monkeypatch):
    monkeypatch.setattr(R, "sgemm_reference", lambda dev: dict(FAKE_REF))
    x = torch.randn(2, 3, 16, 16)
    first = compute_erf(Tiny(), x, show_progress=False, roofline=True, reparameterize=False)

    def no_counting(model):
        raise AssertionError("counted again")

    monkeypatch.setattr(R, "counting_flops", no_counting)
    again = compute_erf(Tiny(), x, show_progress=False, roofline=True, reparameterize=False)
    assert again.info["flops_per_image"] == first.info["flops_per_image"] == hand_count(16, 16)
    with pytest.raises(AssertionError, match="counted again"):  # another input size is another key
        compute_erf(Tiny(), torch.randn(1, 3, 20, 16), show_progress=False, roofline=True, reparameterize=False)


def test_progress_bar_shows_gflops_and_percent_of_sgemm(monkeypatch, capsys):
    monkeypatch.setattr(R, "sgemm_reference", lambda dev: dict(FAKE_REF))
    compute_erf(Tiny(), torch.randn(3, 3, 16, 16), show_progress=True, roofline=True, reparameterize=False)
    err = capsys.readouterr().err
    assert "GFLOP/s" in err and "% of SGEMM" in err, err


def test_a_rate_above_the_cached_sgemm_rate_probes_it_again(fastconv_isolated, monkeypatch):
    """A cached SGEMM rate probed while the machine was busy would make every later run read above 100 %: a run
    faster than it probes again (merged into the cache, which keeps the best), and the CLI says what a fraction
    still above 1 means."""
    from fastconv import roofline as FR

    monkeypatch.setattr(FR, "_memo", {})  # this process's measurements: none leak into other tests
    monkeypatch.setattr(FR, "sgemm_gflops", lambda device="cpu", **kw: 123.4)
    low = {**FAKE_REF, "sgemm_gflops": 1e-6}
    monkeypatch.setattr(R, "sgemm_reference", lambda dev: dict(low))
    res = compute_erf(Tiny(), torch.randn(3, 3, 16, 16), batch_size=1, show_progress=False, roofline=True,
                      reparameterize=False)
    assert res.info["roofline"]["sgemm_gflops"] == 123.4 and res.info["roofline"]["reprobed"] is True
    probes, remeasure = [], FR.remeasure_sgemm
    monkeypatch.setattr(FR, "remeasure_sgemm", lambda: probes.append(1) or {"sgemm_gflops": 2e-6})
    res = compute_erf(Tiny(), torch.randn(4, 3, 16, 16), batch_size=1, show_progress=False, roofline=True,
                      reparameterize=False)
    assert probes == [1] and res.info["roofline"]["sgemm_gflops"] == 2e-6  # once, after the first steady batch
    monkeypatch.setattr(FR, "remeasure_sgemm", remeasure)
    _, _, key = FR._machine_key()
    assert FR._read_table()[key]["sgemm_gflops"] == 123.4  # the next run starts from it
    monkeypatch.setattr(FR, "sgemm_gflops", lambda device="cpu", **kw: 50.0)
    assert FR.remeasure_sgemm()["sgemm_gflops"] == 123.4  # a slower probe never lowers the reference
    # below the reference: no probe
    monkeypatch.setattr(FR, "remeasure_sgemm", lambda: (_ for _ in ()).throw(AssertionError("probed")))
    assert R.recheck_reference(dict(FAKE_REF), 10 ** 9, 0, [[1, 9.0], [1, 1.0]]) == FAKE_REF  # 1 GFLOP/s < 100
    # above only in the nominal count (the padding products the C++ kernel skips): no probe either
    assert R.recheck_reference(dict(FAKE_REF), 2 * 10 ** 11, 10 ** 11 + 1, [[1, 1.0]]) == FAKE_REF
    gpu = {**FAKE_REF, "sgemm_device": "NVIDIA H200"}
    assert R.recheck_reference(gpu, 10 ** 12, 0, [[1, 1.0]]) == gpu


def test_a_fraction_above_one_says_why_it_is_no_bound():
    cpu = {"sgemm_device": "cpu", "roofline_fraction": 1.02, "roofline_fraction_without_padding": 1.01}
    assert "probed while the machine ran slower" in R.fraction_note(cpu)
    gpu = {**cpu, "sgemm_device": "NVIDIA H200"}
    assert "TF32 was allowed" in R.fraction_note(gpu, tf32=True)
    assert "GPU was slower" in R.fraction_note(gpu, tf32=False)
    nominal = {**cpu, "roofline_fraction_without_padding": 0.874}
    assert R.fraction_note(nominal).endswith("the work done reaches 87.4 % of the SGEMM rate")
    assert R.fraction_note({**cpu, "roofline_fraction": 0.9, "roofline_fraction_without_padding": 0.8}) is None
    assert R.fraction_note({"sgemm_device": "cpu", "roofline_fraction": None}) is None


def test_cli_says_what_a_fraction_above_one_means(monkeypatch, capsys, tmp_path):
    from erf_lab.cli.main import main
    from fastconv import roofline as FR

    monkeypatch.setattr(R, "sgemm_reference", lambda dev: {**FAKE_REF, "sgemm_gflops": 1e-6})
    monkeypatch.setattr(FR, "remeasure_sgemm", lambda: {"sgemm_gflops": 2e-6})  # still below: reported as measured
    argv = ["compute", "--model", "replknet_31b", "--override", "channels=(8,8,8,8)", "--override",
            "layers=(1,1,1,1)", "--num-images", "2", "--input-size", "32", "--batch-size", "1", "--out",
            str(tmp_path / "r"), "--quiet"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "SGEMM rate 0.0 GFLOP/s" in out and "note: above 100 % of the SGEMM rate" in out, out
    info = json.loads((tmp_path / "r" / RUN_FILE).read_text())
    assert info["sgemm_gflops"] == 2e-6 and info["roofline_fraction"] > 1 and info["sgemm_reprobed"] is True
    assert info["roofline_note"] in out


def test_steady_time_leaves_out_the_warm_up_batch():
    assert R.steady_seconds_per_image([[2, 10.0], [2, 1.0], [1, 0.5]]) == pytest.approx(0.5)
    assert R.steady_seconds_per_image([[2, 3.0]]) == pytest.approx(1.5)
    # the first batch of each size is warm-up (new shapes: kernel choice), when a size repeats
    assert R.steady_seconds_per_image([[1, 9.0], [17, 4.0], [17, 1.7], [15, 3.0]]) == pytest.approx(0.1)
    assert R.steady_seconds_per_image([[8, 9.0], [8, 0.8], [8, 0.8], [3, 2.0]]) == pytest.approx(0.1)
    assert R.steady_seconds_per_image([[1, 9.0], [17, 1.7], [15, 3.0]]) == pytest.approx(4.7 / 32)
    assert R.steady_seconds_per_image([]) is None
    assert R.roofline_numbers(4e9, 2.0, 100.0) == {"achieved_gflops": 2.0, "roofline_fraction": 0.02}
    assert R.roofline_numbers(None, 2.0, 100.0)["roofline_fraction"] is None
    assert R.postfix(4e9, 2.0, 100.0) == "2 GFLOP/s, 2.0% of SGEMM"
    assert R.postfix(3.1e6, 0.006, 135.4) == "0.517 GFLOP/s, 0.4% of SGEMM"


def test_run_json_records_the_roofline_and_old_files_still_load(tmp_path):
    spec = ErfSpec("replknet_31b", overrides=TINY_KW, num_images=3, input_size=32, batch_size=1)
    res = run_erf(spec, out=tmp_path / "run", show_progress=False, formats=("png",))
    info = json.loads((tmp_path / "run" / RUN_FILE).read_text())
    assert info["flops_per_image"] > 0 and info["compute_seconds_per_image"] > 0
    assert info["sgemm_gflops"] > 0 and info["achieved_gflops"] > 0
    assert 0 < info["roofline_fraction"] < 1.5  # FLOPs / time / SGEMM; above 1 only if SGEMM was measured low
    assert info["roofline_fraction"] == pytest.approx(info["achieved_gflops"] / info["sgemm_gflops"], rel=1e-2)
    assert info["cpu_model"] and info["isa"] and info["threads"] >= 1 and info["sgemm_device"] == "cpu"
    assert res["run_info"]["flops_per_image"] == info["flops_per_image"]
    assert 0 < info["padding_flops_per_image"] < info["flops_per_image"]
    assert info["roofline_fraction_without_padding"] == pytest.approx(
        info["roofline_fraction"] * (1 - info["padding_flops_per_image"] / info["flops_per_image"]), rel=2e-3)
    # same FLOPs as FlopCounterMode sees on the native path (F.conv2d everywhere)
    from torch.utils.flop_counter import FlopCounterMode

    from erf_lab.erf.prepare import prepare_model
    from erf_lab.models import create_model

    torch.manual_seed(0)
    m, _ = prepare_model(create_model("replknet_31b", **TINY_KW), conv_backend="native")
    x = torch.randn(1, 3, 32, 32, requires_grad=True)
    with fastconv.use(backend="native"), FlopCounterMode(display=False) as fc:
        out = EffectiveReceptiveField(m).forward_func(x)
        torch.relu(out[:, :, out.shape[2] // 2, out.shape[3] // 2]).sum().backward()
    assert info["flops_per_image"] == fc.get_total_flops()

    # a run.json written before the roofline fields: loads as before
    for k in ("flops_per_image", "compute_seconds_per_image", "achieved_gflops", "sgemm_gflops",
              "roofline_fraction", "sgemm_device", "cpu_model", "isa", "threads", "padding_flops_per_image",
              "roofline_fraction_without_padding"):
        info.pop(k)
    (tmp_path / "run" / RUN_FILE).write_text(json.dumps(info))
    assert load_run(tmp_path / "run").run_info["model"] == "replknet_31b"
    info["roofline_fraction"] = "fast"
    (tmp_path / "run" / RUN_FILE).write_text(json.dumps(info))
    with pytest.raises(ErfLabError, match="roofline_fraction"):
        load_run(tmp_path / "run")


def test_cpu_sgemm_is_the_best_known_for_this_machine(tmp_path, monkeypatch):
    """A first SGEMM measurement taken while other processes ran is low; a later, larger one replaces it in the
    cache (a smaller one never does), and ``erf-lab compute`` takes its fraction against the best known."""
    import fastconv.roofline as FR
    from fastconv.config import settings

    old = settings().cache_dir
    fastconv.configure(cache_dir=tmp_path)
    monkeypatch.setattr(FR, "_memo", {})
    rates = iter([40.0, 130.0, 90.0])
    monkeypatch.setattr(FR, "sgemm_gflops", lambda *a, **k: next(rates))
    try:
        assert R.sgemm_reference("cpu")["sgemm_gflops"] == 40.0  # first measurement, cached
        FR._memo.clear()
        assert R.sgemm_reference("cpu")["sgemm_gflops"] == 40.0  # read back, not measured again
        for _ in range(2):  # two benchmark runs measure afresh: 130 replaces 40, then 90 does not replace 130
            FR._memo.clear()
            FR.machine_roofline(fma=False, cache=False)
        FR._memo.clear()
        assert R.sgemm_reference("cpu")["sgemm_gflops"] == 130.0
        (tmp_path / "roofline.json").write_text("not json")  # a damaged cache is measured again
        FR._memo.clear()
        monkeypatch.setattr(FR, "sgemm_gflops", lambda *a, **k: 77.0)
        assert R.sgemm_reference("cpu")["sgemm_gflops"] == 77.0
    finally:
        fastconv.configure(cache_dir=old)


@pytest.mark.parametrize("damaged", [float("nan"), -5.0, 0, 1e300, True, float("inf")])
def test_an_implausible_cached_rate_is_measured_again_and_never_kept(tmp_path, monkeypatch, damaged):
    """A roofline.json entry whose rate no probe can have measured (NaN, negative, zero, 1e300, a bool, inf: a
    damaged or hand-edited file) was returned as this machine's SGEMM rate, and 1e300 stayed the "best" for ever:
    every later fraction of the roofline was ~0. It is measured again and replaced."""
    import fastconv.roofline as FR
    from fastconv.config import settings

    old = settings().cache_dir
    fastconv.configure(cache_dir=tmp_path)
    monkeypatch.setattr(FR, "_memo", {})
    monkeypatch.setattr(FR, "sgemm_gflops", lambda *a, **k: 123.0)
    try:
        _, _, key = FR._machine_key()
        (tmp_path / "roofline.json").write_text(json.dumps({key: {"sgemm_gflops": damaged, "fma_peak_gflops": None}}))
        assert R.sgemm_reference("cpu")["sgemm_gflops"] == 123.0
        assert json.loads((tmp_path / "roofline.json").read_text())[key]["sgemm_gflops"] == 123.0
    finally:
        fastconv.configure(cache_dir=old)


def test_time_breakdown_attributes_every_flop_to_its_part():
    """benchmarks/bench_erf_breakdown.py: each convolution's FLOPs in its part (the 1x1 conv, the 3x3 conv, fastconv's
    depthwise conv, forward + input gradient each), together erf-lab's own count; the ReLUs and their gradients are
    elementwise passes with bytes and no FLOPs."""
    import importlib.util

    from conftest import REPO_ROOT

    spec = importlib.util.spec_from_file_location("bench_erf_breakdown",
                                                  REPO_ROOT / "benchmarks" / "bench_erf_breakdown.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    torch.manual_seed(0)
    m = Tiny().eval().requires_grad_(False)
    erf = EffectiveReceptiveField(m)
    x = torch.randn(2, 3, 12, 10)
    with fastconv.use(backend="channels_last"):  # oneDNN inside fastconv's backend (every machine has it)
        with R.counting_flops(m) as total:
            erf.attribute(x)
        seconds, timer = bench.time_parts(erf, x)
    per_pass = 2 * 2 * 12 * 10  # images x FLOPs per multiply-add x pixels
    assert timer.flops == {"other convs": 2 * per_pass * 4 * 3 * 3 * 3, "pointwise convs": 2 * per_pass * 2 * 4,
                           "depthwise": 2 * per_pass * 4 * 7 * 7}
    assert sum(timer.flops.values()) == total() == 2 * hand_count(12, 10)
    inside = sum(1 for p in range(12) for i in range(7) if 0 <= p + i - 3 < 12) * \
        sum(1 for q in range(10) for j in range(7) if 0 <= q + j - 3 < 10)
    assert timer.inside == 2 * 2 * 2 * 4 * inside
    assert timer.calls["depthwise"] == 2 and timer.calls["elementwise"] >= 4  # 2 ReLUs, 2 threshold_backward
    assert timer.bytes["elementwise"] > 0 and "elementwise" not in timer.flops
    assert 0 < sum(timer.seconds.values()) <= seconds
    assert [f.__name__ for f in (fastconv.backends._fwd, fastconv.backends._grad_input)] == ["_fwd", "_grad_input"]

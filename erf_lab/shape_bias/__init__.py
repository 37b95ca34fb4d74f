"""Shape-bias probes on the cue-conflict stimuli of Geirhos et al. (ICLR 2019), model-vs-human style."""
from erf_lab.shape_bias.analysis import shape_bias_from_csv, shape_bias_from_decisions, write_mvh_csv
from erf_lab.shape_bias.categories import CATEGORIES, imagenet_to_16
from erf_lab.shape_bias.stimuli import parse_name

__all__ = ["CATEGORIES", "imagenet_to_16", "parse_name", "shape_bias_from_csv", "shape_bias_from_decisions",
           "write_mvh_csv", "run_shape_bias", "compare_runs"]


def __getattr__(name):  # heavy imports (torch, matplotlib) only when used
    if name == "run_shape_bias":  # the evaluate() function lives in erf_lab.shape_bias.evaluate
        from erf_lab.shape_bias.evaluate import run_shape_bias

        return run_shape_bias
    if name == "compare_runs":
        from erf_lab.shape_bias.plotting import compare_runs

        return compare_runs
    raise AttributeError(name)

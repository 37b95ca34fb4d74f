"""The ``erf-lab`` command line: one module per command in ``erf_lab.cli.commands``."""

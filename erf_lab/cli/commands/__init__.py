"""Each module here is one ``erf-lab`` command.

A command module defines ``NAME`` (the command word), ``HELP`` (one line), ``ORDER`` (position in
``--help``), ``add_arguments(parser)`` and ``run(args) -> int``. ``run`` is a thin wrapper over a library
function that returns data; user mistakes raise ``erf_lab.errors.ErfLabError``.
"""

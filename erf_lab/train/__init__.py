"""The training lab: ``erf-lab train`` on cue-world (a built-in shape/texture world) or an ImageFolder dataset.

Library API: :func:`erf_lab.train.loop.train` (one whole run), :class:`erf_lab.train.recipe.Recipe`,
:class:`erf_lab.train.cue_world.CueWorld`, :func:`erf_lab.train.data.build_data`,
:func:`erf_lab.train.checkpoints.save_weights` / ``load_state``.
"""

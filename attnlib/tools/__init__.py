"""The teaching tools every lesson uses; none of them is an attention mechanism.

:mod:`~attnlib.tools.plotting` and :mod:`~attnlib.tools.widgets` (figures and the controls that re-draw them),
:mod:`~attnlib.tools.progress` (progress bars), :mod:`~attnlib.tools.tasks` (the synthetic tasks of lesson 02),
:mod:`~attnlib.tools.transformer` (the tiny transformer with a pluggable token mixer),
:mod:`~attnlib.tools.training` (the training loop), :mod:`~attnlib.tools.doctor` (``python -m attnlib.tools.doctor``).
"""

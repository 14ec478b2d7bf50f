"""Objectives: model outputs -> a dict of named losses with a ``loss`` total.

Importing this package registers every objective in ``OBJECTIVES``; one module per
objective family.
"""
from vlp.objectives.base import OBJECTIVES, Objective, build_objective  # noqa: F401
from vlp.objectives import contrastive, decoupled, mixing, multiview, ranking, weighted  # noqa: F401,E402
from vlp.objectives import coconut  # noqa: F401,E402
from vlp.objectives import mlcd  # noqa: F401,E402
from vlp.objectives import m3col  # noqa: F401,E402
from vlp.objectives import coca  # noqa: F401,E402

"""Objectives: model outputs -> a dict of named losses with a ``loss`` total.

Importing this package registers every objective in ``OBJECTIVES``; one module per
objective family.
"""
from vlp.objectives.base import OBJECTIVES, Objective, build_objective  # noqa: F401
from vlp.objectives import contrastive, decoupled, mixing, multiview, ranking, weighted  # noqa: F401,E402

"""Objectives: model outputs -> a dict of named losses with a ``loss`` total."""
from vlp.objectives.base import OBJECTIVES, Objective, build_objective  # noqa: F401
from vlp.objectives import contrastive  # noqa: F401  (registers infonce, siglip)

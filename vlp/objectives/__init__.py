"""Objectives: model outputs -> a dict of named losses with a ``loss`` total.

Importing this package registers every objective in ``OBJECTIVES``.
"""
import importlib

from vlp.objectives.base import OBJECTIVES, Objective, build_objective  # noqa: F401

# one module per objective family; each registers its objectives on import
_FAMILIES = ("contrastive", "decoupled", "weighted", "ranking", "multiview", "mixing", "tiled")
for _name in _FAMILIES:
    try:
        importlib.import_module(f"vlp.objectives.{_name}")
    except ModuleNotFoundError as e:  # a family being written in this change set
        if e.name != f"vlp.objectives.{_name}":
            raise

"""Objectives: model outputs -> a dict of named losses with a ``loss`` total.

Importing this package registers every objective in ``OBJECTIVES``; one module per
objective family.
"""
from vlp.objectives import (  # noqa: F401,E402
    coca,  # noqa: F401,E402
    coconut,  # noqa: F401,E402
    contrastive,
    decoupled,
    distill,  # noqa: F401,E402
    m3col,  # noqa: F401,E402
    mixing,
    mlcd,  # noqa: F401,E402
    multiview,
    ranking,
    weighted,
)
from vlp.objectives.base import OBJECTIVES, Objective, build_objective  # noqa: F401

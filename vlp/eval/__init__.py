"""Evaluation: a registry of evaluators (``vlp/eval/registry.py``), each a settings dataclass and
one entry point returning a dict. Importing this package registers every evaluator:
zero-shot classification, retrieval, classifier heads, linear probe, captioning, validation
loss. ``vlp eval continual`` (``vlp/eval/continual.py``) reads a continual run's task snapshots.
"""
from vlp.eval import caption, classify, probe, retrieval, val_loss, zeroshot  # noqa: F401  (register)
from vlp.eval.registry import EVALUATORS, EvalContext, run_evaluator, run_tasks  # noqa: F401

"""Towers, projections, logit scale/bias and the model factory. No losses, no parallelism."""
from vlp.models.factory import ModelConfig, create_model, build_tokenizer, build_transforms  # noqa: F401

"""Models: the factory (``create_model``), towers, the CLIP and CoCa models, heads, caption generation.

Importing the package registers every head (``classifier``, ``fusion_classifier``,
``coconut_classifier``, ``mlcd_cluster``).
"""
from vlp.models import classifier, cluster_head  # noqa: F401  (register heads)
from vlp.models.factory import ModelConfig, build_tokenizer, build_transforms, create_model  # noqa: F401

"""Evaluation: zero-shot classification (``vlp.eval.zeroshot``) and image-text retrieval
(``vlp.eval.retrieval``); ``vlp.eval.cli`` runs them on a saved checkpoint (``vlp eval``).

Both run in one process over an ordered pass of the eval shards; the trainer calls them
on rank 0. Nothing is imported here, so that building the ``vlp`` argument parser does
not load torch and open_clip.
"""

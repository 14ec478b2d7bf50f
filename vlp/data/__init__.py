"""Shard writing and verification, the streaming pipeline, built-in datasets."""

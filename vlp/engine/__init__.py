"""Distributed init, collectives, the gradient-cached step, DeepSpeed wiring, checkpoints."""

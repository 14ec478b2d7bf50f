"""Errors a run ends with. Bad input is a ValueError or FileNotFoundError (a damaged checkpoint
too: ``CheckpointDamaged``), which the ``vlp`` command reports in one line with exit code 2;
the others here are reported in one line with exit code 1. docs/errors.md has the whole list."""


class TrainingDiverged(RuntimeError):
    """The loss stayed non-finite for ``run.max_skipped_steps`` consecutive steps."""


class PeerFailure(RuntimeError):
    """A collective failed: another rank died or did not answer within the timeout."""


class CheckpointDamaged(ValueError):
    """A checkpoint file is missing, truncated or differs from the checksum recorded at save."""


class CheckpointWriteFailed(Exception):
    """Writing a checkpoint failed (disk full, permission): the previous one is still ``latest``.

    Not an OSError or RuntimeError, so that no handler of those (a failed collective is a
    RuntimeError) mistakes it for something else."""

"""Errors a run ends with that are not bad input (those are ValueError / FileNotFoundError,
exit 2): the ``vlp`` command reports these in one line and exits 1."""


class TrainingDiverged(RuntimeError):
    """The loss stayed non-finite for ``run.max_skipped_steps`` consecutive steps."""


class PeerFailure(RuntimeError):
    """A collective failed: another rank died or did not answer within the timeout."""

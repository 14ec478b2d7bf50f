import os

import pytest


@pytest.fixture(autouse=True)
def _restore_environ():
    """In-process engines set RANK/WORLD_SIZE/MASTER_PORT (vlp.dist normalises them
    for DeepSpeed); child processes of later tests must not inherit them, or they would
    think a launcher started them and reuse a port this process still holds."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)

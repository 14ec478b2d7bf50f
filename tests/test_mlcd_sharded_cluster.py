"""``vlp cluster --backend faiss`` beside the torch k-means: the same seeds, inertia within 1% (the
command runs it in tests/test_mlcd_sharded.py, on a sharded run)."""
import pytest
import torch

from tests.test_cluster import _blobs
from vlp.data.clusters import faiss_spherical_kmeans, inertia, spherical_kmeans

pytest.importorskip("faiss")


@pytest.mark.parametrize("seed", [0, 1])
def test_faiss_and_torch_reach_the_same_inertia(seed):
    x, _, _ = _blobs(k=8, per=60, d=16, noise=0.4, seed=seed)  # overlapping blobs: several iterations
    ours = spherical_kmeans(x, 8, iters=30, seed=seed)
    theirs = faiss_spherical_kmeans(x, 8, iters=30, seed=seed)
    a, b = inertia(x, ours.centers), inertia(x, theirs.centers)
    assert abs(a - b) <= 0.01 * a, (a, b)
    assert abs(theirs.inertia[-1] - b) <= 0.01 * b  # faiss's own objective, as an inertia
    assert torch.allclose(theirs.centers.norm(dim=1), torch.ones(8), atol=1e-5)


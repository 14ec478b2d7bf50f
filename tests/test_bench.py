"""``vlp bench loss`` and ``vlp bench gradcache`` at small sizes: the tiled loss matches open_clip's
to float32 rounding and never holds an N x N matrix, while ClipLoss holds two; the gradient-cached
step's peak memory does not grow with the batch at a fixed chunk, while the uncached one's does."""
import json
import math

import pytest

from vlp.cli import main
from vlp.commands.bench import bench_gradcache

LOSS_KEYS = {"vlp_s", "open_clip_s", "speedup", "vlp_peak_mb", "open_clip_peak_mb", "memory_ratio", "max_abs_diff",
             "scale_grad_rel_diff"}
MB = 2**20


@pytest.mark.slow  # peak memory is measured in child processes
def test_bench_loss_json(capsys):
    n, tile = 2048, 256
    argv = ["bench", "loss", "--batch", str(n), "--dim", "32", "--repeats", "1", "--tile-size", str(tile),
            "--device", "cpu", "--json"]
    assert main(argv) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert LOSS_KEYS <= r.keys() and (r["batch"], r["tile_size"], r["device"]) == (n, tile, "cpu")
    # fp32, s = 1/0.07, D = 32: the loss is about log N + (s²/D)/2 ≈ 11 (one float32 ulp: 9.5e-7);
    # 1e-5 is ~10 ulps. The input gradients are <= 2s/N per element, far below that.
    assert r["max_abs_diff"] <= 1e-5
    assert r["scale_grad_rel_diff"] <= 1e-5
    # ClipLoss materialises the image and the text logits, N x N float32 each (16 MiB at N = 2048):
    # the memory method must see at least those. The tiled loss holds (T, T) tiles, never N x N.
    nn_mb = n * n * 4 / MB
    assert r["open_clip_peak_mb"] >= 2 * nn_mb, r
    assert r["vlp_peak_mb"] < nn_mb, r
    assert r["memory_ratio"] < 0.25, r


@pytest.mark.slow
def test_bench_gradcache_rows():
    r = bench_gradcache(batches=(32, 256), chunk=32, overhead_batch=256, repeats=1)
    assert [(row["global_batch"], row["chunk_size"]) for row in r["rows"]] == [(32, 32), (256, 32)]
    for row in r["rows"]:
        assert set(row) == {"global_batch", "chunk_size", "peak_mb", "step_s"}
        assert math.isfinite(row["step_s"]) and row["step_s"] > 0
    small, large = (row["peak_mb"] for row in r["rows"])
    # 8x the batch at a fixed chunk: one chunk's activations live at a time; only the cached (N, D)
    # features and the N x N loss grow (kilobytes here), beside the fixed gradients and optimizer step
    assert large <= 1.2 * small, r
    assert r["memory_growth"] <= 1.2
    # without the cache the same batch holds all 8 chunks' activations at once (~0.7 MB a sample
    # here, ~2.4x the cached peak): the method sees activation growth, so the bound above can fail
    assert r["overhead_batch"] == 256 and r["uncached_peak_mb"] >= 1.5 * large, r


def test_bench_gradcache_chunk_must_divide(capsys):
    assert main(["bench", "gradcache", "--batches", "64,100", "--chunk-size", "32"]) == 2
    assert "must divide" in capsys.readouterr().err

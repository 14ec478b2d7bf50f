"""``vlp bench loss`` and ``vlp bench gradcache`` at tiny sizes: the JSON they report and
that the tiled loss matches open_clip's."""
import json

import pytest

from vlp.cli import main
from vlp.commands.bench import bench_gradcache

LOSS_KEYS = {"vlp_s", "open_clip_s", "speedup", "vlp_peak_mb", "open_clip_peak_mb", "memory_ratio", "max_abs_diff"}


@pytest.mark.slow  # peak memory is measured in child processes
def test_bench_loss_json(capsys):
    argv = ["bench", "loss", "--batch", "256", "--dim", "32", "--repeats", "1", "--tile-size", "96", "--json"]
    assert main(argv) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert LOSS_KEYS <= r.keys()
    assert r["max_abs_diff"] <= 1e-5  # fp32: loss and both input gradients
    assert r["vlp_peak_mb"] > 0 and r["open_clip_peak_mb"] > 0  # the memory method sees the allocations
    assert r["speedup"] > 0 and r["memory_ratio"] > 0


@pytest.mark.slow
def test_bench_gradcache_rows():
    r = bench_gradcache(batches=(64, 128), chunk=32, overhead_batch=64, repeats=1)
    assert [(row["global_batch"], row["chunk_size"]) for row in r["rows"]] == [(64, 32), (128, 32)]
    for row in r["rows"]:
        assert set(row) == {"global_batch", "chunk_size", "peak_mb", "step_s"}
        assert row["peak_mb"] > 0 and row["step_s"] > 0
    assert r["memory_growth"] == pytest.approx(r["rows"][-1]["peak_mb"] / r["rows"][0]["peak_mb"], rel=1e-2)
    assert r["time_overhead"] > 0 and r["overhead_batch"] == 64


def test_bench_gradcache_chunk_must_divide(capsys):
    assert main(["bench", "gradcache", "--batches", "64,100", "--chunk-size", "32"]) == 2
    assert "must divide" in capsys.readouterr().err

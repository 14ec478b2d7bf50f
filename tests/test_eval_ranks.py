"""Evaluation on every rank: each rank reads its share of the shards (uneven, and a rank may
get fewer samples, or none: one shard on two ranks), the evaluators combine the ranks' counts or
features, and the result equals one process on the whole data. Through the real launcher:
torchrun, 2 CPU processes."""
import json
import os
import subprocess
import sys

import pytest

from tests.helpers import make_tiny_run, noise_png
from tests.tiny import child_env
from vlp.cli import main
from vlp.data.shards import write_shards

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARDS = (6, 6, 6)  # 3 shards over 2 ranks: 12 samples on rank 0, 6 on rank 1
LAYOUTS = {"3_shards": 6, "1_shard": 18}  # samples per shard; one shard: rank 1 reads nothing
BATCH = 6  # eval batches never straddle a shard: the same batches on 1 and 2 ranks (val_loss's negatives)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ranks")
    (root / "classnames.txt").write_text("zero\none\ntwo\n")
    (root / "zeroshot_classification_templates.txt").write_text("a photo of thing {c}\nthing {c}\n")
    runs = {}
    for layout, per_shard in LAYOUTS.items():
        samples = ({"__key__": f"s{i:03d}", "png": noise_png(i), "txt": f"a photo of thing {i % 3}", "cls": i % 3}
                   for i in range(sum(SHARDS)))
        write_shards(root / layout / "val", samples, per_shard)
        for name in ("classnames.txt", "zeroshot_classification_templates.txt"):
            (root / layout / name).write_text((root / name).read_text())
        val = root / layout / "val"
        data = [f"data.val={val}", f"data.train={val}", f"eval.batch_size={BATCH}"]
        runs["clip", layout] = make_tiny_run(root / layout / "clip", data,
                                             heads={"cls": {"name": "classifier", "num_classes": 3}})
        runs["coca", layout] = make_tiny_run(root / layout / "coca", data, kind="coca",
                                             coca={"caption_queries": 4, "pooler_heads": 2, "layers": 1, "heads": 2})
    return runs


CASES = [("zeroshot", "clip", []), ("retrieval", "clip", []), ("classify", "clip", []),
         ("linear-probe", "clip", ["--knn-k", "3"]), ("val-loss", "clip", []),
         ("caption", "coca", ["--strategy", "greedy", "--max-length", "4"])]


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("name,run,extra", CASES, ids=[c[0] for c in CASES])
def test_two_ranks_equal_one_process(runs, name, run, extra, layout, capsys):
    argv = ["eval", name, "--checkpoint", runs[run, layout], *extra, "--json"]
    assert main(argv) == 0
    one = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", "29751", "-m", "vlp", *argv], cwd=ROOT, env=child_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1  # rank 0 prints
    two = json.loads(lines[0])
    assert one.get("num_samples", one.get("num_val")) in (sum(SHARDS), None)
    for key, value in one.items():
        if key in ("generation_seconds", "seconds_per_token"):
            continue  # timings
        if isinstance(value, float):  # the same features up to float32 batching noise
            assert two[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
        else:
            assert two[key] == value, key

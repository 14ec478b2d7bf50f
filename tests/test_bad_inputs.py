"""Every command over a table of bad inputs (docs/errors.md): exit code 2, one line on stderr
naming the key or the file, no traceback, and nothing of an earlier run or output folder
changed. ``vlp.cli.main`` runs in this process, its stderr captured at the file descriptor (so what
libraries write there, DeepSpeed's logging included, counts too)."""
import hashlib
import os

import pytest
import torch
from safetensors.torch import save_file

from tests.helpers import TINY_MODEL, noise_png
from tests.test_checkpoint_integrity import copy_run, damage, trained_run
from vlp.cli import main
from vlp.engine import checkpoint
from vlp.models import ModelConfig, create_model

LATEST = "step_00000004"


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    """<NAME> -> path of everything the table refers to (built once)."""
    run, digits = trained_run(tmp_path_factory)
    base = tmp_path_factory.mktemp("bad_inputs")
    p = {"R": run, "D": digits, "RCFG": os.path.join(run, "config.yaml")}

    def run_copy(name, damaged=None, how="truncate"):
        here = copy_run(run, str(base / name))
        if damaged:
            for tag in checkpoint.tags(here) if damaged.startswith("*/") else [LATEST]:
                damage(os.path.join(checkpoint.ckpt_dir(here), tag, damaged.removeprefix("*/")), how)
        return here

    p["RT"] = run_copy("truncated_weights", "model.safetensors")
    p["RF"] = run_copy("flipped_weights", "model.safetensors", how="flip")  # same size: only the checksum tells
    p["RDS"] = run_copy("truncated_deepspeed", "*/mp_rank_00_model_states.pt")  # every checkpoint
    p["RY"] = run_copy("malformed_config")
    with open(os.path.join(p["RY"], "config.yaml"), "w") as f:
        f.write("run:\n  dir: x\n  seed: [1,\n")
    p["RNONE"] = str(base / "no_checkpoints")
    os.makedirs(p["RNONE"])
    with open(p["RCFG"]) as src, open(os.path.join(p["RNONE"], "config.yaml"), "w") as dst:
        dst.write(src.read())

    files = {
        "BAD_YAML": "run:\n  seed: [1,\n",
        "RANGE_YAML": "optim:\n  lr: 0.0\n",
        "TYPE_YAML": "optim:\n  lr: fast\n",
        "UNKNOWN_YAML": "optim:\n  lrr: 1.0\n",
        "EMPTY_TXT": "",
        "EMPTY_CSV": "filepath,caption\n",
        "NOT_IMAGE": "not an image\n",
        "GARBAGE_PT": "x" * 100,
    }
    names = {"BAD_YAML": "bad.yaml", "RANGE_YAML": "range.yaml", "TYPE_YAML": "type.yaml",
             "UNKNOWN_YAML": "unknown.yaml", "EMPTY_TXT": "empty.txt", "EMPTY_CSV": "empty.csv",
             "NOT_IMAGE": "not_image.png", "GARBAGE_PT": "garbage.safetensors"}
    for key, text in files.items():
        p[key] = str(base / names[key])
        with open(p[key], "w") as f:
            f.write(text)
    p["IMG"] = str(base / "image.png")
    with open(p["IMG"], "wb") as f:
        f.write(noise_png(0))
    p["CSV"] = str(base / "one.csv")
    with open(p["CSV"], "w") as f:
        f.write(f"filepath,caption\n{p['IMG']},noise\n")
    p["EMPTY_DIR"] = str(base / "empty_dir")
    os.makedirs(p["EMPTY_DIR"])
    p["GARBAGE"] = str(base / "garbage")
    os.makedirs(p["GARBAGE"])
    with open(os.path.join(p["GARBAGE"], "shard-000000.tar"), "wb") as f:
        f.write(os.urandom(3000))
    p["WRONG_SHAPE"] = str(base / "wrong_shape.safetensors")  # the tiny CLIP at another embed_dim
    model = create_model(ModelConfig(**{**TINY_MODEL, "embed_dim": 48}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, p["WRONG_SHAPE"])
    p["CENTERS_BAD"] = str(base / "centers_bad.safetensors")  # (4, 5) centers for a head of 4 x embed_dim 32
    save_file({"centers": torch.randn(4, 5)}, p["CENTERS_BAD"])
    p["OUT"] = str(base / "out")  # an earlier output folder: must stay as it is
    os.makedirs(p["OUT"])
    with open(os.path.join(p["OUT"], "keep.txt"), "w") as f:
        f.write("an earlier output\n")
    p["NO"] = str(base / "nonexistent")
    return p


EVALUATORS = ["zeroshot", "retrieval", "classify", "caption", "linear-probe", "val-loss"]
# (id, argv with <NAME> placeholders, a text the one stderr line must contain)
TRAIN = [
    ("malformed-yaml", ["train", "<BAD_YAML>"], "bad.yaml:3:1:"),
    ("malformed-override", ["train", "<RCFG>", "run.dir=<R>", "a=[1,"], "override 'a=[1,'"),
    ("unknown-key", ["train", "<RCFG>", "run.dir=<R>", "optim.lrr=1"], "optim.lrr"),
    ("wrong-type", ["train", "<RCFG>", "run.dir=<R>", "optim.lr=fast"], "optim.lr"),
    ("wrong-type-section", ["train", "<RCFG>", "run.dir=<R>", "data=3"], "data"),
    ("batch-size-0", ["train", "<RCFG>", "run.dir=<R>", "data.batch_size=0"], "data.batch_size"),
    ("worker-niceness-20", ["train", "<RCFG>", "run.dir=<R>", "data.worker_niceness=20"], "data.worker_niceness"),
    ("tile-keep-negative", ["train", "<RCFG>", "run.dir=<R>", "objective.tile_keep_mb=-1"], "tile_keep_mb"),
    ("lr-0", ["train", "<RCFG>", "run.dir=<R>", "optim.lr=0"], "optim.lr"),
    ("lr-negative", ["train", "<RCFG>", "run.dir=<R>", "optim.lr=-1e-3"], "optim.lr"),
    ("steps-0", ["train", "<RCFG>", "run.dir=<R>", "optim.steps=0"], "optim.steps"),
    ("warmup-negative", ["train", "<RCFG>", "run.dir=<R>", "optim.warmup_steps=-1"], "optim.warmup_steps"),
    ("min-lr-ratio", ["train", "<RCFG>", "run.dir=<R>", "optim.min_lr_ratio=2"], "optim.min_lr_ratio"),
    ("betas", ["train", "<RCFG>", "run.dir=<R>", "optim.betas=[0.9,1.5]"], "optim.betas"),
    ("label-smoothing", ["train", "<RCFG>", "run.dir=<R>", "objective.label_smoothing=1.5"],
     "objective.label_smoothing"),
    ("chunk-vs-batch", ["train", "<RCFG>", "run.dir=<R>", "engine.grad_cache.chunk_size=3"],
     "engine.grad_cache.chunk_size"),
    ("keep-0", ["train", "<RCFG>", "run.dir=<R>", "run.keep_checkpoints=0"], "run.keep_checkpoints"),
    ("log-every-0", ["train", "<RCFG>", "run.dir=<R>", "logging.every_steps=0"], "logging.every_steps"),
    ("eval-batch-0", ["train", "<RCFG>", "run.dir=<R>", "eval.batch_size=0"], "eval.batch_size"),
    ("task-setting", ["train", "<RCFG>", "run.dir=<R>", "eval.tasks=[{name: linear_probe, knn_k: 0}]"],
     "eval.tasks[0].knn_k"),
    ("zero-stage-5", ["train", "<RCFG>", "run.dir=<R>", "engine.zero_stage=5"], "engine.zero_stage"),
    ("samples-0", ["train", "<RCFG>", "run.dir=<R>", "optim.samples=0"], "optim.samples"),
    ("epochs-0", ["train", "<RCFG>", "run.dir=<R>", "data.epochs=0"], "data.epochs"),
    ("recipe-missing", ["train", "<NO>.yaml"], "nonexistent.yaml"),
    ("train-missing", ["train", "<RCFG>", "run.dir=<R>", "data.train=<NO>"], "data.train"),
    ("train-empty-dir", ["train", "<RCFG>", "run.dir=<R>", "data.train=<EMPTY_DIR>"], "data.train"),
    ("train-empty-string", ["train", "<RCFG>", "run.dir=<R>", "data.train="], "data.train"),
    ("train-garbage-tar", ["train", "<RCFG>", "run.dir=<R>", "data.train=<GARBAGE>"], "shard-000000.tar"),
    ("val-missing", ["train", "<RCFG>", "run.dir=<R>", "data.val=<NO>"], "data.val"),
    ("val-garbage-tar", ["train", "<RCFG>", "run.dir=<R>", "data.val=<GARBAGE>"], "shard-000000.tar"),
    ("pretrained-missing", ["train", "<RCFG>", "run.dir=<R>", "model.pretrained=<NO>.safetensors"],
     "model.pretrained"),
    ("pretrained-wrong-shape", ["train", "<RCFG>", "run.dir=<R>", "model.pretrained=<WRONG_SHAPE>"],
     "wrong_shape.safetensors"),
    ("pretrained-garbage", ["train", "<RCFG>", "run.dir=<R>", "model.pretrained=<GARBAGE_PT>"],
     "garbage.safetensors"),
    ("classnames-missing", ["train", "<RCFG>", "run.dir=<R>", "eval.classnames=<NO>.txt"], "eval.classnames"),
    ("task-data-missing", ["train", "<RCFG>", "run.dir=<R>", "eval.tasks=[{name: retrieval, data: <NO>}]"],
     "eval.tasks[0].data"),
    ("preset-file-missing", ["train", "<RCFG>", "run.dir=<R>", "engine.preset=<NO>.json"], "nonexistent.json"),
    ("cluster-labels-missing", ["train", "<RCFG>", "run.dir=<R>", "data.cluster_labels=<NO>"],
     "data.cluster_labels"),
    ("centers-wrong-shape", ["train", "<RCFG>", "run.dir=<R>",
                             "model.heads={cluster: {name: mlcd_cluster, num_centers: 4, centers: <CENTERS_BAD>}}"],
     "centers_bad.safetensors"),
    ("sharded-head-fp16", ["train", "<RCFG>", "run.dir=<R>", "engine.precision=amp_fp16",
                           "model.heads={cluster: {name: mlcd_cluster, num_centers: 4, sharded: true}}"],
     "model.heads.cluster.sharded"),
    ("resume-from-missing", ["train", "<RCFG>", "run.dir=<R>", "run.resume_from=<NO>"], "run.resume_from"),
    ("unknown-objective", ["train", "<RCFG>", "run.dir=<R>", "objective.name=nope"], "'nope'"),
    ("unknown-tower", ["train", "<RCFG>", "run.dir=<R>", "model.image.name=nope"], "'nope'"),
    ("unknown-preset", ["train", "<RCFG>", "run.dir=<R>", "engine.preset=nope"], "'nope'"),
    ("unknown-evaluator", ["train", "<RCFG>", "run.dir=<R>", "eval.tasks=[{name: nope}]"], "'nope'"),
    ("unknown-optimizer", ["train", "<RCFG>", "run.dir=<R>", "optim.name=nope"], "optim.name"),
    ("unknown-precision", ["train", "<RCFG>", "run.dir=<R>", "engine.precision=fp8"], "engine.precision"),
    ("resume-every-checkpoint-damaged", ["train", "<RDS>/config.yaml", "run.dir=<RDS>"],
     "mp_rank_00_model_states.pt"),
]

DATA = [
    ("unknown-dataset", ["data", "nope"], "'nope'"),
    ("verify-missing", ["data", "verify", "<NO>"], "nonexistent"),
    ("verify-empty-dir", ["data", "verify", "<EMPTY_DIR>"], "empty_dir"),
    ("csv-missing", ["data", "from-csv", "--csv", "<NO>.csv", "--out", "<OUT>"], "nonexistent.csv"),
    ("csv-empty", ["data", "from-csv", "--csv", "<EMPTY_CSV>", "--out", "<OUT>"], "empty.csv"),
    ("csv-no-header", ["data", "from-csv", "--csv", "<EMPTY_TXT>", "--out", "<OUT>"], "empty.txt"),
    ("csv-shard-size-0", ["data", "from-csv", "--csv", "<CSV>", "--out", "<NO>_csv", "--shard-size", "0"],
     "shard_size"),
    ("csv-shard-size-type", ["data", "from-csv", "--csv", "<CSV>", "--out", "<OUT>", "--shard-size", "x"],
     "--shard-size"),
    ("digits-out-is-a-file", ["data", "digits", "--out", "<EMPTY_TXT>"], "empty.txt"),
    ("tones-out-is-a-file", ["data", "tones", "--out", "<EMPTY_TXT>"], "empty.txt"),
    ("multimodal-out-is-a-file", ["data", "digits-multimodal", "--out", "<EMPTY_TXT>"], "empty.txt"),
]

EVAL = [
    *((f"{e}-{row}", ["eval", e, *argv], text) for e in EVALUATORS for row, argv, text in [
        ("checkpoint-missing", ["--checkpoint", "<NO>"], "nonexistent"),
        ("truncated-safetensors", ["--checkpoint", "<RT>"], "model.safetensors"),
        ("flipped-safetensors", ["--checkpoint", "<RF>"], "model.safetensors"),
        ("malformed-run-config", ["--checkpoint", "<RY>"], "config.yaml:4:1:"),
        ("run-without-checkpoints", ["--checkpoint", "<RNONE>"], "no_checkpoints"),
        ("malformed-yaml", ["--config", "<BAD_YAML>"], "bad.yaml:3:1:"),
        ("out-of-range-yaml", ["--config", "<RANGE_YAML>"], "optim.lr"),
        ("wrong-type-yaml", ["--config", "<TYPE_YAML>"], "optim.lr"),
        ("unknown-key-yaml", ["--config", "<UNKNOWN_YAML>"], "optim.lrr"),
        ("batch-size-0", ["--checkpoint", "<R>", "--batch-size", "0"], "--batch-size"),
        ("batch-size-type", ["--checkpoint", "<R>", "--batch-size", "x"], "--batch-size"),
        ("workers-negative", ["--checkpoint", "<R>", "--workers", "-1"], "--workers"),
        ("data-missing", ["--checkpoint", "<R>", "--data", "<NO>"], "nonexistent"),
        ("data-garbage-tar", ["--checkpoint", "<R>", "--data", "<GARBAGE>"], "shard-000000.tar"),
    ]),
    ("zeroshot-data-empty-dir", ["eval", "zeroshot", "--checkpoint", "<R>", "--data", "<EMPTY_DIR>"], "empty_dir"),
    ("unknown-evaluator", ["eval", "nope"], "'nope'"),
    ("zeroshot-classnames-missing", ["eval", "zeroshot", "--checkpoint", "<R>", "--classnames", "<NO>.txt"],
     "nonexistent.txt"),
    ("zeroshot-classnames-empty", ["eval", "zeroshot", "--checkpoint", "<R>", "--classnames", "<EMPTY_TXT>"],
     "empty.txt"),
    ("zeroshot-templates-missing", ["eval", "zeroshot", "--checkpoint", "<R>", "--templates", "<NO>.txt"],
     "nonexistent.txt"),
    ("zeroshot-classnames-unknown", ["eval", "zeroshot", "--checkpoint", "<R>", "--classnames", "nope"], "'nope'"),
    ("probe-knn-0", ["eval", "linear-probe", "--checkpoint", "<R>", "--knn-k", "0"], "--knn-k"),
    ("probe-train-missing", ["eval", "linear-probe", "--checkpoint", "<R>", "--train", "<NO>"], "nonexistent"),
    ("probe-train-garbage-tar", ["eval", "linear-probe", "--checkpoint", "<R>", "--train", "<GARBAGE>"],
     "shard-000000.tar"),
    ("continual-missing", ["eval", "continual", "--checkpoint", "<NO>"], "nonexistent"),
    ("continual-not-continual", ["eval", "continual", "--checkpoint", "<R>"], "tasks.json"),
    ("continual-batch-size-0", ["eval", "continual", "--checkpoint", "<R>", "--batch-size", "0"], "--batch-size"),
]

EXPORT = [
    ("checkpoint-missing", ["--checkpoint", "<NO>"], "nonexistent"),
    ("truncated-safetensors", ["--checkpoint", "<RT>"], "model.safetensors"),
    ("flipped-safetensors", ["--checkpoint", "<RF>"], "model.safetensors"),
    ("malformed-run-config", ["--checkpoint", "<RY>"], "config.yaml:4:1:"),
    ("run-without-checkpoints", ["--checkpoint", "<RNONE>"], "no_checkpoints"),
    ("truncated-deepspeed-shard", ["--checkpoint", "<RDS>", "--fp32-from-zero"], "mp_rank_00_model_states.pt"),
    ("unknown-format", ["--checkpoint", "<R>", "--format", "nope"], "'nope'"),
    ("out-is-a-file", ["--checkpoint", "<R>", "--out", "<EMPTY_TXT>"], "empty.txt"),
]
EXPORT = [(f"export-{row}", ["export", "--out", "<OUT>", *argv], text) for row, argv, text in EXPORT]

CLUSTER = [
    ("checkpoint-missing", ["--checkpoint", "<NO>"], "nonexistent"),
    ("truncated-safetensors", ["--checkpoint", "<RT>"], "model.safetensors"),
    ("flipped-safetensors", ["--checkpoint", "<RF>"], "model.safetensors"),
    ("malformed-run-config", ["--checkpoint", "<RY>"], "config.yaml:4:1:"),
    ("run-without-checkpoints", ["--checkpoint", "<RNONE>"], "no_checkpoints"),
    ("malformed-yaml", ["--config", "<BAD_YAML>"], "bad.yaml:3:1:"),
    ("unknown-open-clip-model", ["--open-clip", "nope"], "'nope'"),
    ("data-missing", ["--checkpoint", "<R>", "--data", "<NO>"], "nonexistent"),
    ("data-empty-dir", ["--checkpoint", "<R>", "--data", "<EMPTY_DIR>"], "empty_dir"),
    ("data-garbage-tar", ["--checkpoint", "<R>", "--data", "<GARBAGE>"], "shard-000000.tar"),
    ("k-0", ["--checkpoint", "<R>", "--k", "0"], "--k"),
    ("k-type", ["--checkpoint", "<R>", "--k", "x"], "--k"),
    ("positives-above-k", ["--checkpoint", "<R>", "--positives", "3"], "--positives"),
    ("chunk-size-0", ["--checkpoint", "<R>", "--chunk-size", "0"], "--chunk-size"),
    ("batch-size-0", ["--checkpoint", "<R>", "--batch-size", "0"], "--batch-size"),
    ("iters-0", ["--checkpoint", "<R>", "--iters", "0"], "--iters"),
    ("unknown-backend", ["--checkpoint", "<R>", "--backend", "nope"], "--backend"),
    ("out-is-a-file", ["--checkpoint", "<R>", "--out", "<EMPTY_TXT>"], "empty.txt"),
]
# later options win: each row's own --data, --k, --out replace these defaults
CLUSTER = [(f"cluster-{row}", ["cluster", "--data", "<D>/val", "--k", "2", "--out", "<OUT>", *argv], text)
           for row, argv, text in CLUSTER]

CAPTION = [
    ("checkpoint-missing", ["--checkpoint", "<NO>"], "nonexistent"),
    ("truncated-safetensors", ["--checkpoint", "<RT>"], "model.safetensors"),
    ("flipped-safetensors", ["--checkpoint", "<RF>"], "model.safetensors"),
    ("malformed-run-config", ["--checkpoint", "<RY>"], "config.yaml:4:1:"),
    ("run-without-checkpoints", ["--checkpoint", "<RNONE>"], "no_checkpoints"),
    ("image-missing", ["--checkpoint", "<R>", "--images", "<NO>.png"], "nonexistent.png"),
    ("not-an-image", ["--checkpoint", "<R>", "--images", "<NOT_IMAGE>"], "not_image.png"),
    ("batch-size-0", ["--checkpoint", "<R>", "--batch-size", "0"], "--batch-size"),
    ("batch-size-type", ["--checkpoint", "<R>", "--batch-size", "x"], "--batch-size"),
    ("not-a-captioning-model", ["--checkpoint", "<R>"], "model.kind: coca"),
]
CAPTION = [(f"caption-{row}", ["caption", "--images", "<IMG>", *argv], text) for row, argv, text in CAPTION]

BENCH = [
    ("step-batch-size-0", ["step", "--batch-size", "0"], "--batch-size"),
    ("step-batch-size-type", ["step", "--batch-size", "x"], "--batch-size"),
    ("step-repeats-0", ["step", "--repeats", "0"], "--repeats"),
    ("loss-batch-0", ["loss", "--batch", "0"], "--batch"),
    ("loss-dim-0", ["loss", "--dim", "0"], "--dim"),
    ("loss-tile-size-0", ["loss", "--tile-size", "0"], "--tile-size"),
    ("loss-tile-keep-negative", ["loss", "--tile-keep-mb", "-1"], "--tile-keep-mb"),
    ("gradcache-batches-type", ["gradcache", "--batches", "a,b"], "--batches"),
    ("gradcache-batches-0", ["gradcache", "--batches", "0"], "--batches"),
    ("gradcache-chunk-size-0", ["gradcache", "--chunk-size", "0"], "--chunk-size"),
    ("gradcache-chunk-must-divide", ["gradcache", "--batches", "64,100", "--chunk-size", "32"], "must divide"),
    ("mlcd-k-0", ["mlcd", "--k", "0"], "--k"),
    ("mlcd-dim-type", ["mlcd", "--dim", "x"], "--dim"),
    ("mlcd-sample-ratio-0", ["mlcd", "--sample-ratio", "0"], "--sample-ratio"),
    ("mlcd-heads-unknown", ["mlcd", "--heads", "sharded,nope"], "--heads"),
    ("unknown-bench", ["nope"], "'nope'"),
]
BENCH = [(f"bench-{row}", ["bench", *argv], text) for row, argv, text in BENCH]

TOP = [
    ("no-command", [], "required"),
    ("unknown-command", ["nope"], "'nope'"),
]

ROWS = [*((f"train-{r[0]}", *r[1:]) for r in TRAIN), *((f"data-{r[0]}", *r[1:]) for r in DATA),
        *((f"eval-{r[0]}", *r[1:]) for r in EVAL), *EXPORT, *CLUSTER, *CAPTION, *BENCH, *TOP]
TABLE = [pytest.param(argv, text, id=name, marks=marks[0] if marks else ()) for name, argv, text, *marks in ROWS]


def _resolve(argv, p):
    out = []
    for arg in argv:
        for key in sorted(p, key=len, reverse=True):  # <RCFG> before <R>
            arg = arg.replace(f"<{key}>", p[key])
        out.append(arg)
    return out


def _state(p):
    """What must not change: every file of the runs and the earlier output folder (small files by
    content, checkpoint files by size and modification time)."""
    state = {}
    for key in ("R", "RT", "RF", "RDS", "RY", "RNONE", "OUT", "D"):
        for top, dirs, files in os.walk(p[key]):
            for name in files:
                path = os.path.join(top, name)
                st = os.stat(path)
                small = st.st_size < 1 << 16
                state[path] = hashlib.sha256(open(path, "rb").read()).hexdigest() if small else (
                    st.st_size, st.st_mtime_ns)
            state[top] = sorted(dirs)
    return state


@pytest.mark.parametrize("argv, text", TABLE)
def test_bad_input_is_one_line_and_exit_2(paths, capfd, argv, text):
    before = _state(paths)
    code = main(_resolve(argv, paths))
    err = [line for line in capfd.readouterr().err.splitlines() if line.strip()]  # what the process wrote to fd 2
    assert code == 2 and len(err) == 1, (code, err)
    assert "Traceback" not in err[0] and err[0].startswith("vlp") and ": error: " in err[0], err
    assert _resolve([text], paths)[0] in err[0], err
    assert _state(paths) == before  # nothing of an earlier run or output overwritten or deleted


def test_table_covers_every_command():
    commands = {argv[0] for _, argv, *_ in ROWS if argv}
    assert commands == {"train", "data", "eval", "export", "cluster", "caption", "bench", "nope"}
    assert {argv[1] for _, argv, *_ in ROWS if argv[:1] == ["eval"]} >= {*EVALUATORS, "continual"}

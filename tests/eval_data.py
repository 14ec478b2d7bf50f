"""Eval data in every layout vlp reads, and a tiny run whose zero-shot predictions are not all one class."""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from tests.helpers import TAG, make_tiny_run
from vlp.data.digits import CLASSNAMES, write_digits
from vlp.data.shards import expand_spec, read_shards, write_split


def _raise(exn):
    raise exn


def raw_samples(spec) -> List[Dict]:
    """Every raw sample (``{"__key__", ext: bytes}``) of a shard spec, in order."""
    return list(read_shards(({"url": u} for u in expand_spec(spec)), handler=_raise))


def webp(png: bytes) -> bytes:
    """Lossless WebP bytes of the same pixels (clip_benchmark's default image format)."""
    buf = io.BytesIO()
    Image.open(io.BytesIO(png)).save(buf, format="webp", lossless=True)
    return buf.getvalue()


def digits_and_run(root: Path) -> Tuple[Path, str]:
    """(the digits dataset root, written by ``vlp data digits``; a tiny random run over it). The mean
    direction of the val image embeddings is taken out of the run's image projection: at random init
    every image embeds nearly alike and one class wins zero-shot for all of them."""
    from vlp.data.stream import build_eval_loader
    from vlp.runs import load_model_from_run

    data = root / "digits"
    write_digits(data)
    run = make_tiny_run(root, [f"data.val={data / 'val'}", f"data.train={data / 'train'}", "eval.batch_size=128"])
    cfg, model, tokenizer, eval_tf = load_model_from_run(run)
    with torch.no_grad():
        emb = torch.cat([model.encode_image(b["image"])
                         for b in build_eval_loader(data / "val", cfg.data, eval_tf, tokenizer, batch_size=128)])
    mean = F.normalize(emb.mean(dim=0), dim=0)  # (D,)
    state = model.state_dict()
    state["visual.proj"] = state["visual.proj"] - torch.outer(state["visual.proj"] @ mean, mean)  # (width, D)
    save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(run, "checkpoints", TAG, "model.safetensors"))
    return data, run


def captionless(src, root: Path, split: str = "test", shard_size: int = 100) -> Path:
    """The samples of ``src`` as a clip_benchmark classification dataset: ``root/split/N.tar`` +
    ``nshards.txt``, each sample a lossless ``webp`` and its ``cls``, no caption; the class files at ``root``."""
    samples = ({"__key__": s["__key__"], "webp": webp(s["png"]), "cls": s["cls"]} for s in raw_samples(src))
    write_split(root / split, samples, shard_size)
    for name in ("classnames.txt", "zeroshot_classification_templates.txt"):
        (root / name).write_bytes((Path(src).parent / name).read_bytes())
    return root


def image_folder(src, folder: Path) -> Path:
    """The samples of ``src`` as torchvision's ImageFolder layout: ``folder/<class name>/<key>.png``."""
    for s in raw_samples(src):
        cls = CLASSNAMES[int(s["cls"])]
        (folder / cls).mkdir(parents=True, exist_ok=True)
        (folder / cls / f"{s['__key__']}.png").write_bytes(s["png"])
    return folder


def multi_captions(n: int, seed: int = 0) -> Iterator[List[str]]:
    """1 to 3 distinct captions per image (no two alike anywhere, so no exact score ties)."""
    g = torch.Generator().manual_seed(seed)
    words = ["red", "green", "blue", "small", "large", "old", "new", "bright", "dark", "round", "tall", "flat"]
    for i in range(n):
        count = int(torch.randint(1, 4, (1,), generator=g))
        yield [f"{words[int(torch.randint(12, (1,), generator=g))]} {words[int(torch.randint(12, (1,), generator=g))]}"
               f" thing {i} view {j}" for j in range(count)]

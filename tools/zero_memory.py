#!/usr/bin/env python
"""Memory per rank of each ZeRO stage for open_clip CLIP architectures (docs/zero.md).

    python tools/zero_memory.py                              # ViT-B-16, ViT-L-14 at W = 8, 64
    python tools/zero_memory.py --models ViT-B-32 --world 16 128
    python tools/zero_memory.py --activations                # + measured activations per sample

Model state, ZeRO paper accounting (Rajbhandari et al. 2020) for bf16/fp16 mixed
precision with fp32 master weights and Adam: Ψ parameters take 2Ψ bytes (16-bit
weights) + 2Ψ (16-bit gradients) + 12Ψ (fp32 weights, Adam m and v). Stage 1 splits the
12Ψ across the W data-parallel ranks, stage 2 the gradients too, stage 3 the weights too.
ZeRO-3 with optimizer and parameter offload (the zero3_offload preset) keeps all
partitioned state in host memory; the GPU holds only the working set. Ψ is counted on the model vlp builds
(``model.open_clip=NAME``) on the meta device: no weights are allocated.

Activations are excluded from the table. ``--activations`` measures them: the bytes of
the tensors autograd saves for backward in one forward pass of a single sample (image
224 px + 77 text tokens), with the model in bf16 as DeepSpeed's bf16 mode runs it, on
CPU, whose scaled-dot-product attention is a flash kernel like the GPU's (it keeps
q, k, v, the output and the log-sum-exp, not the attention matrix).
"""
from __future__ import annotations

import argparse
import time
from typing import Dict, List, Sequence

GIB = 2**30
# bytes per parameter (ZeRO paper, mixed precision + Adam)
WEIGHTS_16, GRADS_16, OPTIM_32 = 2, 2, 12


def per_rank_bytes(params: int, world: int) -> Dict[str, Dict[str, float]]:
    """{preset: {"gpu": bytes, "host": bytes}} of model state per rank, activations excluded."""
    p, w = params, world
    return {
        "zero0": {"gpu": (WEIGHTS_16 + GRADS_16 + OPTIM_32) * p, "host": 0.0},
        "zero1": {"gpu": (WEIGHTS_16 + GRADS_16) * p + OPTIM_32 * p / w, "host": 0.0},
        "zero2": {"gpu": WEIGHTS_16 * p + (GRADS_16 + OPTIM_32) * p / w, "host": 0.0},
        "zero3": {"gpu": (WEIGHTS_16 + GRADS_16 + OPTIM_32) * p / w, "host": 0.0},
        # all partitioned state in host memory; the GPU keeps only the working set (docs/zero.md)
        "zero3_offload": {"gpu": 0.0, "host": (WEIGHTS_16 + GRADS_16 + OPTIM_32) * p / w},
    }


def _meta_model(name: str):
    import torch

    from vlp.models import ModelConfig, create_model

    with torch.device("meta"):
        return create_model(ModelConfig(open_clip=name))


def count_params(name: str) -> Dict[str, int]:
    model = _meta_model(name)
    return {
        "total": sum(p.numel() for p in model.parameters()),
        "image": sum(p.numel() for p in model.visual.parameters()),
        "text": sum(p.numel() for p in model.text.parameters()),
    }


def saved_activation_bytes(model, batch) -> int:
    """Bytes autograd saves for backward in one forward of ``batch`` (parameters excluded)."""
    import torch

    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: Dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            seen[storage.data_ptr()] = storage.nbytes()  # views of one storage count once
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(batch)
    return sum(seen.values())


def activations_per_sample(name: str) -> float:
    """Measured bytes saved for backward per sample, bf16 weights, train mode, CPU."""
    import torch

    from vlp.models import ModelConfig, create_model

    torch.manual_seed(0)
    model = create_model(ModelConfig(open_clip=name)).train().to(torch.bfloat16)
    size = model.open_clip_cfg["vision_cfg"].get("image_size", 224)
    ctx = model.context_length
    batch = {"image": torch.randn(1, 3, size, size, dtype=torch.bfloat16), "text": torch.randint(1, 49407, (1, ctx))}
    return float(saved_activation_bytes(model, batch))


def table(models: Sequence[str], worlds: Sequence[int]) -> List[str]:
    presets = ["zero0", "zero1", "zero2", "zero3", "zero3_offload"]
    head = ["model", "params (image + text)", "W"] + presets
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in models:
        n = count_params(name)
        for w in worlds:
            cells = []
            for preset, mem in per_rank_bytes(n["total"], w).items():
                cell = f"{mem['gpu'] / GIB:.2f}"
                if mem["host"]:
                    cell += f" (+{mem['host'] / GIB:.2f} host)"
                cells.append(cell)
            params = f"{n['total'] / 1e6:.1f} M ({n['image'] / 1e6:.1f} + {n['text'] / 1e6:.1f})"
            lines.append(f"| {name} | {params} | {w} | " + " | ".join(cells) + " |")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["ViT-B-16", "ViT-L-14"], help="open_clip architectures")
    parser.add_argument("--world", nargs="+", type=int, default=[8, 64], help="data-parallel ranks W")
    parser.add_argument("--activations", action="store_true", help="also measure activations per sample (CPU)")
    args = parser.parse_args(argv)
    print("Model state per rank, GiB (bf16 weights and grads, fp32 master + Adam; activations excluded)\n")
    print("\n".join(table(args.models, args.world)))
    if args.activations:
        print("\nActivations saved for backward, per sample (bf16, image + text tower; measured on CPU)\n")
        print("| model | MiB per sample | measured in |\n|---|---|---|")
        for name in args.models:
            start = time.perf_counter()
            per_sample = activations_per_sample(name)
            print(f"| {name} | {per_sample / 2**20:.1f} | {time.perf_counter() - start:.1f} s |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
